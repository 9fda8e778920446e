//! The ensemble over the three bundled models (`models/`), on real nodes on loopback: both strategies
//! answer held-out questions, and a random-weight node added to the ensemble is exited by SpecFuse.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use coordinator::evaluate::{exact_match, load_set};
use coordinator::service::{Coordinator, NodeSpec};
use coordinator::{RoundOutcome, Step};
use ensemble_proto::v1 as pb;

async fn bundled(extra: Option<PathBuf>) -> anyhow::Result<(Vec<common::Node>, Vec<NodeSpec>)> {
    let mut dirs = common::bundled_dirs();
    dirs.extend(extra.map(|d| ("random".to_owned(), d)));
    common::start_members(dirs).await
}

/// A request as `deploy/local.toml` sends it: SpecFuse drafts of 32 tokens, so that the
/// character-level model's drafts are whole answers like the BPE models' (a 10-character draft ends
/// inside `</think>`, and the BPE verifiers misprice the partial token).
fn request(item: &coordinator::evaluate::EvalItem, strategy: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(item.prompt()),
        strategy: strategy.into(),
        max_chars: 64,
        specfuse: Some(pb::SpecFuseOptions {
            segment_tokens: Some(32),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_strategies_answer_held_out_questions() -> anyhow::Result<()> {
    let (_nodes, specs) = bundled(None).await?;
    let c = Coordinator::new(specs, Duration::from_secs(30)).await?;
    let items = load_set(&common::repo().join("eval/mixed.jsonl")).map_err(anyhow::Error::msg)?;
    let items = &items[..12];
    let mut correct = std::collections::BTreeMap::new();
    for strategy in [
        "single:arith",
        "single:atlas",
        "single:general",
        "specfuse",
        "chared",
    ] {
        let mut ok = 0;
        let mut arith_ok = 0;
        for it in items {
            let r = c.run(request(it, strategy), &mut |_| true).await?;
            assert!(r.failed_nodes.is_empty(), "{strategy}: {:?}", r.failed_nodes);
            let hit = exact_match(&r.text, &it.answer);
            ok += usize::from(hit);
            arith_ok += usize::from(hit && it.domain == "arithmetic");
            if it.domain == "arithmetic" {
                assert!(
                    r.reasoning.contains('='),
                    "{strategy}: no worked reasoning in {r:?}"
                );
            }
        }
        if !strategy.starts_with("single:") {
            // Only the arithmetic specialist can add; the ensemble must follow it.
            assert!(arith_ok >= 3, "{strategy}: {arith_ok} of 4 arithmetic questions");
        }
        correct.insert(strategy, ok);
    }
    let best_single = ["single:arith", "single:atlas", "single:general"]
        .iter()
        .map(|s| correct[s])
        .max()
        .unwrap_or(0);
    for strategy in ["specfuse", "chared"] {
        assert!(correct[strategy] > best_single, "{correct:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_random_weight_node_is_exited_within_three_rounds() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("rnd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let random = model_node::fixtures::tiny_model_dir(&root, "llama", "byte_level", 77)?;
    let (_nodes, specs) = bundled(Some(random)).await?;
    let c = Coordinator::new(specs, Duration::from_secs(30)).await?;
    let items = load_set(&common::repo().join("eval/atlas.jsonl")).map_err(anyhow::Error::msg)?;
    for it in &items[..3] {
        let mut req = request(it, "specfuse");
        req.specfuse = Some(pb::SpecFuseOptions {
            // One new token per round (the healing token that re-spells the context's last token
            // does not count against it).
            segment_tokens: Some(1),
            // Sharper than the default τ = 1: with rounds this short (one new token each), a
            // round's vote moves Q by at most 1 and τ = 1 needs many rounds to separate four nodes.
            exit_tau: Some(0.5),
            ..Default::default()
        });
        let mut rounds: Vec<RoundOutcome> = Vec::new();
        let r = c
            .run(req, &mut |s| {
                let Step::Round(o) = s else { return true };
                rounds.push(o.clone());
                true
            })
            .await?;
        let exit_round = rounds.iter().find(|o| o.exited().contains(&3)).map(|o| o.round);
        assert!(
            matches!(exit_round, Some(n) if n <= 3),
            "{:?}: random node exited at {exit_round:?} over {} rounds",
            it.messages[0].content,
            rounds.len()
        );
        // Others may leave too (the arithmetic model is no help on the atlas), never the specialist.
        assert_eq!(
            r.exited_nodes.first().map(String::as_str),
            Some("random"),
            "{:?}",
            r.exited_nodes
        );
        assert!(
            !r.exited_nodes.iter().any(|n| n == "atlas"),
            "{:?}",
            r.exited_nodes
        );
    }
    Ok(())
}
