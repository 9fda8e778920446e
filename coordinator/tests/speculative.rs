//! Speculative CharED against per-character CharED over real nodes: greedy answers identical
//! character by character (the chosen outcome, and its mixed probability and the alternatives' to
//! 1e-6: a node's forward passes may group positions differently, which moves f32 sums) on the bundled
//! cluster and on the real TinyStories checkpoints of `../shared/real` (three tokenizers; skipped with
//! a note when absent), with fewer waves of node calls.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use coordinator::Step;
use coordinator::evaluate::load_set;
use coordinator::service::Coordinator;
use ensemble_proto::v1 as pb;

fn chared(prompt: pb::Prompt, max_chars: u32, draft_chars: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(prompt),
        strategy: "chared".into(),
        max_chars,
        chared: Some(pb::CharEdOptions {
            draft_chars: Some(draft_chars),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One step: the chosen outcome and the (outcome, m) of the alternatives, the chosen one first.
type Traced = (String, Vec<(String, f64)>);

/// (answer, finish, round trips, steps).
type Run = (String, i32, u32, Vec<Traced>);

async fn run(c: &Coordinator, req: pb::GenerateRequest) -> anyhow::Result<Run> {
    let mut steps = Vec::new();
    let mut on_char = |s: Step<'_>| {
        let Step::Char(s) = s else { return true };
        let mut alts = vec![(format!("{:?}", s.chosen), s.prob)];
        alts.extend(
            s.alternatives
                .iter()
                .map(|a| (format!("{:?}", a.outcome), a.prob)),
        );
        steps.push((format!("{:?}", s.chosen), alts));
        true
    };
    let r = c.run(req, &mut on_char).await?;
    assert!(r.failed_nodes.is_empty(), "{:?}", r.failed_nodes);
    Ok((r.text, r.finish_reason, r.round_trips, steps))
}

/// Runs every prompt both ways (speculative with `draft` characters) and checks the answers are the
/// same; returns the round trips and steps (per-character, speculative, steps) and prints them with
/// the steps per second of each way (a report, not a check).
async fn compare(
    c: &Coordinator,
    prompts: &[pb::Prompt],
    max_chars: u32,
    draft: u32,
    what: &str,
) -> anyhow::Result<(u32, u32, usize)> {
    let (mut per_char_trips, mut spec_trips, mut chars) = (0, 0, 0);
    let (mut per_char_s, mut spec_s) = (0.0, 0.0);
    for (k, p) in prompts.iter().enumerate() {
        let t = std::time::Instant::now();
        let want = run(c, chared(p.clone(), max_chars, 0)).await?;
        per_char_s += t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let got = run(c, chared(p.clone(), max_chars, draft)).await?;
        spec_s += t.elapsed().as_secs_f64();
        assert_eq!(got.0, want.0, "prompt {k}: answers differ");
        assert_eq!(got.1, want.1, "prompt {k}: finish");
        assert_eq!(got.3.len(), want.3.len(), "prompt {k}: steps");
        for (j, (g, w)) in got.3.iter().zip(&want.3).enumerate() {
            assert_eq!(g.0, w.0, "prompt {k} step {j}");
            assert_eq!(g.1.len(), w.1.len(), "prompt {k} step {j}");
            for (a, b) in g.1.iter().zip(&w.1) {
                assert!(
                    a.0 == b.0 && (a.1 - b.1).abs() < 1e-6,
                    "prompt {k} step {j}: {a:?} vs {b:?}"
                );
            }
        }
        assert_eq!(
            want.2 as usize,
            want.3.len(),
            "prompt {k}: one round trip per character"
        );
        per_char_trips += want.2;
        spec_trips += got.2;
        chars += want.3.len();
    }
    eprintln!(
        "{what}, draft_chars {draft}: {chars} steps; round trips per step {:.3} per character vs {:.3} speculative; steps per second {:.0} vs {:.0}",
        f64::from(per_char_trips) / chars as f64,
        f64::from(spec_trips) / chars as f64,
        chars as f64 / per_char_s,
        chars as f64 / spec_s
    );
    Ok((per_char_trips, spec_trips, chars))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn greedy_speculative_chared_equals_per_character_on_the_bundled_models() -> anyhow::Result<()> {
    let (_nodes, specs) = common::start_members(common::bundled_dirs()).await?;
    let c = Coordinator::new(specs, Duration::from_secs(30)).await?;
    let items = load_set(&common::repo().join("eval/mixed.jsonl")).map_err(anyhow::Error::msg)?;
    let prompts: Vec<pb::Prompt> = items.iter().take(24).map(|it| it.prompt()).collect();
    for draft in [8, 16] {
        let (per_char, spec, _) = compare(&c, &prompts, 64, draft, "bundled").await?;
        assert!(spec < per_char, "{spec} vs {per_char}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn greedy_speculative_chared_equals_per_character_on_real_checkpoints() -> anyhow::Result<()> {
    let real = common::repo().join("../shared/real");
    if !real.is_dir() {
        eprintln!(
            "note: {} not found; real-checkpoint check skipped",
            real.display()
        );
        return Ok(());
    }
    let dirs: Vec<(String, PathBuf)> = ["stories260K", "tinystories656K", "babyllama-tok105"]
        .iter()
        .map(|m| (m.to_string(), real.join("models").join(m)))
        .collect();
    let (_nodes, specs) = common::start_members(dirs).await?;
    let c = Coordinator::new(specs, Duration::from_secs(30)).await?;
    let text = std::fs::read_to_string(real.join("text/tinystories-valid-a.txt"))?;
    // Prompts: the first three to seven words of held-out sentences.
    let prompts: Vec<pb::Prompt> = text
        .split(". ")
        .filter(|s| s.split_whitespace().count() >= 8)
        .take(16)
        .enumerate()
        .map(|(k, s)| {
            let words: Vec<&str> = s.split_whitespace().take(3 + k % 5).collect();
            pb::Prompt {
                kind: Some(pb::prompt::Kind::Raw(words.join(" "))),
            }
        })
        .collect();
    for draft in [8, 16] {
        let (per_char, spec, _) = compare(&c, &prompts, 48, draft, "real").await?;
        assert!(spec < per_char, "{spec} vs {per_char}");
    }
    Ok(())
}

/// With the confidence gate at its lowest the lead node decides every position alone: the other
/// nodes are never called, and each round is one call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gate_the_lead_always_passes_asks_no_other_node() -> anyhow::Result<()> {
    let (_nodes, specs) = common::start_members(common::bundled_dirs()).await?;
    let c = Coordinator::new(specs, Duration::from_secs(30)).await?;
    let items = load_set(&common::repo().join("eval/mixed.jsonl")).map_err(anyhow::Error::msg)?;
    for it in items.iter().take(4) {
        for draft in [0, 8] {
            let mut req = chared(it.prompt(), 48, draft);
            req.chared.get_or_insert_default().gate = Some(1e-12);
            let r = c.run(req, &mut |_| true).await?;
            assert_eq!(
                r.node_calls, r.round_trips,
                "draft {draft}: one call per round, the lead's"
            );
            let rounds = if draft == 0 { r.steps } else { r.round_trips };
            assert_eq!(r.round_trips, rounds);
            assert!(r.node_calls > 0);
            // Ungated, every node is asked in every round.
            let r = c.run(chared(it.prompt(), 48, draft), &mut |_| true).await?;
            assert!(
                r.node_calls >= 3 * r.round_trips / 2,
                "draft {draft}: {} calls, {} trips",
                r.node_calls,
                r.round_trips
            );
        }
    }
    Ok(())
}

/// SpecFuse's confidence gate at its lowest: the lead drafts alone and wins every round unverified
/// (one call per round, no other node asked); at its highest few drafts are sure enough, and a
/// round that is not gated also runs the usual propose and verify waves: 6 calls in 3 waves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn specfuse_gate_skips_the_others_only_for_sure_drafts() -> anyhow::Result<()> {
    let (_nodes, specs) = common::start_members(common::bundled_dirs()).await?;
    let c = Coordinator::new(specs, Duration::from_secs(30)).await?;
    let items = load_set(&common::repo().join("eval/mixed.jsonl")).map_err(anyhow::Error::msg)?;
    for it in items.iter().take(4) {
        let req = |gate: f64| pb::GenerateRequest {
            prompt: Some(it.prompt()),
            strategy: "specfuse".into(),
            max_chars: 48,
            specfuse: Some(pb::SpecFuseOptions {
                gate: Some(gate),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = c.run(req(1e-12), &mut |_| true).await?;
        assert_eq!((r.node_calls, r.round_trips), (r.steps, r.steps), "{r:?}");
        assert_eq!(r.mean_active_nodes, 1.0);
        let r = c.run(req(1.0), &mut |_| true).await?;
        // g gated rounds (1 call, 1 wave) and u others (lead, two proposals, three scores: 6 calls
        // in 3 waves): calls = g + 6u, waves = g + 3u.
        let u = (r.round_trips - r.steps) / 2;
        assert!(u >= 1, "{r:?}");
        assert_eq!(r.node_calls, r.steps + 5 * u, "{r:?}");
        assert_eq!(r.round_trips, r.steps + 2 * u, "{r:?}");
    }
    Ok(())
}

/// Sampled speculative CharED keeps the mixture's distribution: over the bundled models, the first
/// three characters of 400 sampled answers (temperature 1, seeds 0..400) per mode, per-character
/// against speculative, pass a two-sample chi-square test at the 0.1% level (categories with fewer
/// than 10 answers in both modes pooled). The seeds are fixed, so the check is deterministic; the
/// sampler's draws differ between the modes (the acceptance test draws once or twice per position),
/// so the answers do not match one by one, only in distribution.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sampled_speculative_chared_keeps_the_mixture_distribution() -> anyhow::Result<()> {
    let (_nodes, specs) = common::start_members(common::bundled_dirs()).await?;
    let c = Coordinator::new(specs, Duration::from_secs(30)).await?;
    let prompt = pb::Prompt {
        kind: Some(pb::prompt::Kind::Conversation(pb::Conversation {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: "What is the plural of blarch?".into(),
            }],
        })),
    };
    const N: u64 = 400;
    let mut counts: std::collections::BTreeMap<String, [f64; 2]> = std::collections::BTreeMap::new();
    let mut same = 0;
    for seed in 0..N {
        let mut got = Vec::new();
        for (mode, draft) in [(0usize, 0u32), (1, 8)] {
            let mut req = chared(prompt.clone(), 3, draft);
            let o = req.chared.get_or_insert_default();
            (o.temperature, o.seed) = (Some(1.0), Some(seed));
            let mut text = String::new();
            let mut on_char = |s: Step<'_>| {
                let Step::Char(s) = s else { return true };
                text.push_str(&format!("{:?}", s.chosen));
                true
            };
            c.run(req, &mut on_char).await?;
            counts.entry(text.clone()).or_default()[mode] += 1.0;
            got.push(text);
        }
        same += usize::from(got[0] == got[1]);
    }
    // Pool the rare categories, then the two-sample statistic: Σ (a − b)² / (a + b) (equal totals).
    let (mut cells, mut rare) = (Vec::new(), [0.0; 2]);
    for v in counts.values() {
        if v[0] + v[1] < 10.0 {
            rare[0] += v[0];
            rare[1] += v[1];
        } else {
            cells.push(*v);
        }
    }
    if rare[0] + rare[1] > 0.0 {
        cells.push(rare);
    }
    assert!(cells.len() >= 3, "too few outcomes to compare: {counts:?}");
    let chi2: f64 = cells.iter().map(|v| (v[0] - v[1]).powi(2) / (v[0] + v[1])).sum();
    // The 99.9% quantile of chi-square with k degrees of freedom (Wilson–Hilferty).
    let k = (cells.len() - 1) as f64;
    let q = k * (1.0 - 2.0 / (9.0 * k) + 3.090 * (2.0 / (9.0 * k)).sqrt()).powi(3);
    eprintln!(
        "sampled: {} outcome classes, chi2 {chi2:.2} (99.9% quantile {q:.2}); {same} of {N} answers equal by seed",
        cells.len()
    );
    assert!(chi2 < q, "chi2 {chi2} >= {q}: {counts:?}");
    assert!(
        (same as u64) < N,
        "the modes draw differently; equal answers for every seed would be a bug"
    );
    Ok(())
}
