//! CharED unit tests: hand-computed mixes, skips, ties, sampling.

use super::*;

const EPS: f64 = 1e-12;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < EPS
}

fn dist(chars: &[(char, f64)], eos: f64, residual: f64) -> NodeCharDist {
    NodeCharDist {
        chars: chars.to_vec(),
        eos,
        residual,
    }
}

fn ed(params: CharedParams, nodes: usize) -> CharEd {
    match CharEd::new(params, nodes) {
        Ok(e) => e,
        Err(e) => panic!("valid params refused: {e}"),
    }
}

fn step(e: &mut CharEd, dists: &[(usize, NodeCharDist)]) -> CharStep {
    match e.combine(dists) {
        Ok(s) => s,
        Err(err) => panic!("combine failed: {err}"),
    }
}

fn c(ch: char) -> CharOutcome {
    CharOutcome::Char(ch)
}

#[test]
fn defaults_and_node_query() {
    let p = CharedParams::default();
    assert_eq!(
        (p.temperature, p.top_p, p.seed, p.published, p.top_k),
        (0.0, 1.0, 0, false, 32)
    );
    assert_eq!(p.validate(), Ok(()));
    let e = ed(p.clone(), 2);
    assert_eq!(
        e.node_query(),
        NodeQuery {
            top_k: 32,
            max_hypotheses: None,
            lookahead: None
        }
    );
    let e = ed(CharedParams { published: true, ..p }, 2);
    assert_eq!(
        e.node_query(),
        NodeQuery {
            top_k: 32,
            max_hypotheses: Some(1),
            lookahead: Some(false)
        }
    );
}

#[test]
fn validation_messages_name_parameter_value_and_range() {
    let msg = |p: CharedParams| p.validate().map_err(|e| e.to_string()).err().unwrap_or_default();
    let d = CharedParams::default;
    assert_eq!(
        msg(CharedParams {
            temperature: -1.0,
            ..d()
        }),
        "invalid parameter `temperature` = -1: must be a finite number >= 0 (0 = greedy)"
    );
    assert!(
        msg(CharedParams {
            temperature: f64::NAN,
            ..d()
        })
        .contains("`temperature` = NaN")
    );
    assert_eq!(
        msg(CharedParams { top_p: 0.0, ..d() }),
        "invalid parameter `top_p` = 0: must be a number in (0, 1]"
    );
    assert!(msg(CharedParams { top_p: 1.5, ..d() }).contains("`top_p` = 1.5"));
    assert!(msg(CharedParams { top_k: 0, ..d() }).contains("`top_k` = 0: must be an integer in 1..=256"));
    assert!(msg(CharedParams { top_k: 300, ..d() }).contains("`top_k` = 300"));
    assert!(
        msg(CharedParams {
            alternatives: 1000,
            ..d()
        })
        .contains("`alternatives` = 1000")
    );
    assert!(
        msg(CharedParams {
            weights: Some(vec![0.0]),
            ..d()
        })
        .contains("`weights[0]` = 0")
    );
    assert_eq!(
        CharEd::new(
            CharedParams {
                weights: Some(vec![1.0]),
                ..d()
            },
            2
        )
        .err(),
        Some(Error::WeightCount { expected: 2, got: 1 })
    );
    assert_eq!(CharEd::new(d(), 0).err(), Some(Error::NoNodes));
}

#[test]
fn weighted_mix_hand_computed() {
    // w = [1, 3] -> [0.25, 0.75].
    let mut e = ed(
        CharedParams {
            weights: Some(vec![1.0, 3.0]),
            ..CharedParams::default()
        },
        2,
    );
    let s = step(
        &mut e,
        &[
            (1, dist(&[('b', 0.6), ('c', 0.2)], 0.0, 0.2)),
            (0, dist(&[('a', 0.5), ('b', 0.3)], 0.1, 0.1)),
        ],
    );
    // m(a) = 0.125, m(b) = 0.075 + 0.45 = 0.525, m(c) = 0.15 ('c' is unlisted by node 0: 0 there),
    // m(EOS) = 0.025; the weighted residual 0.175 is not assigned.
    assert_eq!(s.chosen, c('b'));
    assert!(close(s.prob, 0.525));
    assert!(!s.sampled);
    assert!(close(s.listed_mass, 0.825));
    let alts: Vec<CharOutcome> = s.alternatives.iter().map(|a| a.outcome).collect();
    assert_eq!(alts, vec![c('b'), c('c'), c('a'), CharOutcome::Eos]);
    let probs: Vec<f64> = s.alternatives.iter().map(|a| a.prob).collect();
    for (g, w) in probs.iter().zip([0.525, 0.15, 0.125, 0.025]) {
        assert!(close(*g, w), "{probs:?}");
    }
    // Shares: node 0 gives 0.25·0.3 = 0.075 of 0.525 (1/7), node 1 gives 0.45 (6/7).
    assert_eq!(s.shares.iter().map(|x| x.node).collect::<Vec<_>>(), vec![0, 1]);
    assert!(close(s.shares[0].share, 1.0 / 7.0) && close(s.shares[1].share, 6.0 / 7.0));
    assert!(close(s.shares[0].prob, 0.3) && close(s.shares[1].weight, 0.75));
    assert!(s.skipped.is_empty());
    assert_eq!((e.steps(), e.contributing_node_steps()), (1, 2));
}

#[test]
fn unnormalised_answers_are_divided_by_their_total() {
    let mut a = ed(CharedParams::default(), 2);
    let mut b = ed(CharedParams::default(), 2);
    let s1 = step(
        &mut a,
        &[
            (0, dist(&[('x', 0.6)], 0.2, 0.2)),
            (1, dist(&[('y', 0.7)], 0.0, 0.3)),
        ],
    );
    let s2 = step(
        &mut b,
        &[
            (0, dist(&[('x', 1.2)], 0.4, 0.4)),
            (1, dist(&[('y', 0.7)], 0.0, 0.3)),
        ],
    );
    assert_eq!(s1.chosen, c('y'));
    assert_eq!(s1.chosen, s2.chosen);
    assert!(close(s1.prob, s2.prob) && close(s1.prob, 0.35));
}

#[test]
fn bad_nodes_are_skipped_and_weights_renormalised() {
    let mut e = ed(
        CharedParams {
            weights: Some(vec![1.0, 1.0, 2.0, 1.0, 4.0]),
            ..CharedParams::default()
        },
        5,
    );
    let s = step(
        &mut e,
        &[
            (0, dist(&[('a', f64::NAN)], 0.5, 0.5)),
            (1, dist(&[('a', 0.9)], -0.1, 0.2)),
            (2, dist(&[('z', 0.4)], 0.1, 0.5)),
            (3, dist(&[], 0.0, 1.0)),
            (4, dist(&[('a', 0.0)], 0.0, 1.0)),
            (2, dist(&[('q', 1.0)], 0.0, 0.0)),
        ],
    );
    let skipped: Vec<(usize, SkipReason)> = s.skipped.iter().map(|x| (x.node, x.reason)).collect();
    assert_eq!(
        skipped,
        vec![
            (0, SkipReason::Invalid),
            (1, SkipReason::Invalid),
            (2, SkipReason::Duplicate),
            (3, SkipReason::NoMass),
            (4, SkipReason::NoMass),
        ]
    );
    // Node 2 alone: weight 1, m(z) = 0.4.
    assert_eq!(s.chosen, c('z'));
    assert!(close(s.prob, 0.4) && close(s.shares[0].weight, 1.0) && close(s.shares[0].share, 1.0));
    let r = e.combine(&[
        (0, dist(&[], 0.0, 1.0)),
        (1, dist(&[('a', f64::INFINITY)], 0.0, 0.0)),
    ]);
    assert_eq!(r, Err(Error::NoDistribution { skipped: 2 }));
    assert_eq!(e.combine(&[]), Err(Error::NoDistribution { skipped: 0 }));
    assert_eq!(
        e.combine(&[(5, dist(&[('a', 1.0)], 0.0, 0.0))]),
        Err(Error::UnknownNode { node: 5, nodes: 5 })
    );
    assert_eq!(e.steps(), 1, "failed steps are not counted");
}

#[test]
fn ties_prefer_characters_over_eos_then_the_first_listed_by_the_lowest_node() {
    let mut e = ed(CharedParams::default(), 2);
    // m(EOS) = m('a') = 0.5: the character wins.
    let s = step(&mut e, &[(0, dist(&[('a', 0.5)], 0.5, 0.0))]);
    assert_eq!(s.chosen, c('a'));
    // EOS wins when strictly ahead.
    let s = step(&mut e, &[(0, dist(&[('a', 0.4)], 0.6, 0.0))]);
    assert_eq!(s.chosen, CharOutcome::Eos);
    assert!(close(s.prob, 0.6));
    // m(b) = m(a) = 0.5: node 0 lists 'b' first.
    let s = step(
        &mut e,
        &[
            (1, dist(&[('a', 1.0)], 0.0, 0.0)),
            (0, dist(&[('b', 1.0)], 0.0, 0.0)),
        ],
    );
    assert_eq!(s.chosen, c('b'));
    // Within one list, the first listed wins a tie.
    let s = step(&mut e, &[(0, dist(&[('y', 0.5), ('x', 0.5)], 0.0, 0.0))]);
    assert_eq!(s.chosen, c('y'));
    // A character listed twice adds up.
    let s = step(
        &mut e,
        &[(0, dist(&[('y', 0.3), ('x', 0.4), ('y', 0.3)], 0.0, 0.0))],
    );
    assert_eq!(s.chosen, c('y'));
    assert!(close(s.prob, 0.6));
}

/// A small deterministic generator of node answers (no RNG crate needed in the inputs).
fn varied_dists(k: usize) -> Vec<(usize, NodeCharDist)> {
    let letters = ['a', 'b', 'c', 'd', 'é', '中'];
    (0..3)
        .map(|node| {
            let x = |i: usize| ((k * 7 + node * 13 + i * 5) % 11) as f64 + 0.5;
            let chars: Vec<(char, f64)> = (0..3)
                .map(|i| (letters[(k + node + i) % letters.len()], x(i)))
                .collect();
            let eos = if (k + node).is_multiple_of(3) { x(4) } else { 0.0 };
            let total: f64 = chars.iter().map(|(_, p)| p).sum::<f64>() + eos + x(5);
            let chars = chars.into_iter().map(|(ch, p)| (ch, p / total)).collect();
            (
                node,
                NodeCharDist {
                    chars,
                    eos: eos / total,
                    residual: x(5) / total,
                },
            )
        })
        .collect()
}

#[test]
fn shares_sum_to_one() {
    for temperature in [0.0, 0.7, 1.5] {
        let params = CharedParams {
            weights: Some(vec![1.0, 2.0, 5.0]),
            temperature,
            ..CharedParams::default()
        };
        let mut e = ed(params, 3);
        for k in 0..50 {
            let s = step(&mut e, &varied_dists(k));
            let total: f64 = s.shares.iter().map(|x| x.share).sum();
            assert!((total - 1.0).abs() < 1e-9, "step {k}: shares sum to {total}");
            let m: f64 = s.shares.iter().map(|x| x.weight * x.prob).sum();
            assert!((m - s.prob).abs() < 1e-12);
            assert!(s.prob > 0.0);
        }
    }
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let run = |seed: u64| -> Vec<CharOutcome> {
        let mut e = ed(
            CharedParams {
                temperature: 1.0,
                seed,
                ..CharedParams::default()
            },
            3,
        );
        (0..100).map(|k| step(&mut e, &varied_dists(k)).chosen).collect()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
    // Sampled steps are marked as such.
    let mut e = ed(
        CharedParams {
            temperature: 1.0,
            ..CharedParams::default()
        },
        3,
    );
    assert!(step(&mut e, &varied_dists(0)).sampled);
}

#[test]
fn sampling_follows_temperature_and_top_p() {
    let d = [(0, dist(&[('a', 0.6), ('b', 0.2)], 0.0, 0.2))];
    let count_a = |temperature: f64, top_p: f64| -> usize {
        let mut e = ed(
            CharedParams {
                temperature,
                top_p,
                seed: 7,
                ..CharedParams::default()
            },
            1,
        );
        (0..4000).filter(|_| step(&mut e, &d).chosen == c('a')).count()
    };
    // T = 1 over the listed outcomes: P(a) = 0.6 / 0.8 = 0.75.
    let n = count_a(1.0, 1.0);
    assert!((2850..=3150).contains(&n), "a drawn {n} times of 4000");
    // T = 0.5 sharpens: P(a) = 0.36 / (0.36 + 0.04) = 0.9.
    let n = count_a(0.5, 1.0);
    assert!((3480..=3720).contains(&n), "a drawn {n} times of 4000");
    // top_p = 0.7 keeps only 'a' (0.75 of the mass).
    assert_eq!(count_a(1.0, 0.7), 4000);
    // A tiny temperature is as good as greedy, and neither overflows nor yields NaN.
    assert_eq!(count_a(1e-300, 1.0), 4000);
    // A huge one is nearly uniform over the listed outcomes (EOS has m = 0 and is never drawn).
    let n = count_a(1e300, 1.0);
    assert!((1850..=2150).contains(&n), "a drawn {n} times of 4000");
}

fn draft_of(s: &str) -> Vec<char> {
    s.chars().collect()
}

fn accept(e: &mut CharEd, positions: &[Vec<(usize, NodeCharDist)>], draft: &str) -> Vec<CharStep> {
    match e.accept_draft(positions, &draft_of(draft)) {
        Ok(s) => s,
        Err(err) => panic!("accept_draft failed: {err}"),
    }
}

/// Two nodes' answers at three positions: the mixture's argmax is 'a', then 'b', then 'c'.
fn three_positions() -> Vec<Vec<(usize, NodeCharDist)>> {
    vec![
        vec![
            (0, dist(&[('a', 0.6), ('x', 0.3)], 0.1, 0.0)),
            (1, dist(&[('a', 0.5), ('b', 0.4)], 0.1, 0.0)),
        ],
        vec![
            (0, dist(&[('b', 0.7), ('y', 0.2)], 0.1, 0.0)),
            (1, dist(&[('y', 0.6), ('b', 0.3)], 0.1, 0.0)),
        ],
        vec![
            (0, dist(&[('c', 0.5)], 0.5, 0.0)),
            (1, dist(&[('c', 0.9)], 0.1, 0.0)),
        ],
    ]
}

#[test]
fn a_greedy_round_keeps_the_agreeing_prefix_and_adds_the_mixture_choice() {
    let positions = three_positions();
    // Per-character CharED over the same answers: a, b, c.
    let mut per_char = ed(CharedParams::default(), 2);
    let want: Vec<CharStep> = positions.iter().map(|p| step(&mut per_char, p)).collect();
    assert_eq!(
        want.iter().map(|s| s.chosen).collect::<Vec<_>>(),
        vec![c('a'), c('b'), c('c')]
    );

    // Draft "ab": both accepted, then the bonus position chooses 'c'.
    let mut e = ed(CharedParams::default(), 2);
    let got = accept(&mut e, &positions, "ab");
    assert_eq!(got.len(), 3);
    for (j, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.chosen, w.chosen);
        assert_eq!(g.prob, w.prob);
        assert_eq!(g.alternatives, w.alternatives);
        assert_eq!(g.shares, w.shares);
        assert_eq!(g.round, 1);
        assert_eq!(g.drafted, j < 2, "position {j}");
    }
    assert_eq!((e.rounds(), e.steps()), (1, 3));

    // Draft "ay": 'a' accepted, 'y' rejected for 'b', and the round ends there.
    let mut e = ed(CharedParams::default(), 2);
    let got = accept(&mut e, &positions, "ay");
    assert_eq!(
        got.iter().map(|s| (s.chosen, s.drafted)).collect::<Vec<_>>(),
        vec![(c('a'), true), (c('b'), false)]
    );

    // An empty draft is one per-character step.
    let mut e = ed(CharedParams::default(), 2);
    let got = accept(&mut e, &positions[..1], "");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].chosen, want[0].chosen);
    assert!(!got[0].drafted);

    // EOS ends a round even inside the draft.
    let eos_first = vec![
        vec![(0, dist(&[('a', 0.1)], 0.9, 0.0))],
        vec![(0, dist(&[('b', 1.0)], 0.0, 0.0))],
    ];
    let mut e = ed(CharedParams::default(), 1);
    let got = accept(&mut e, &eos_first, "a");
    assert_eq!(
        got.iter().map(|s| s.chosen).collect::<Vec<_>>(),
        vec![CharOutcome::Eos]
    );
}

#[test]
fn a_round_with_no_answer_at_its_first_position_is_no_distribution() {
    let mut e = ed(CharedParams::default(), 2);
    assert!(matches!(
        e.accept_draft(&[vec![]], &[]),
        Err(Error::NoDistribution { .. })
    ));
    // A later position nobody answered ends the round before it.
    let positions = vec![vec![(0, dist(&[('a', 1.0)], 0.0, 0.0))], vec![]];
    let got = accept(&mut e, &positions, "a");
    assert_eq!(
        got.iter().map(|s| (s.chosen, s.drafted)).collect::<Vec<_>>(),
        vec![(c('a'), true)]
    );
}

/// The speculative acceptance test leaves every character distributed as the sampled mixture p
/// (temperature and top-p applied), whichever character the draft holds: frequencies over many
/// seeded draws agree with p within 5 standard errors, for a drafted argmax, a drafted unlikely
/// character, a drafted character outside the top-p cut and one no node lists.
#[test]
fn sampled_rounds_keep_the_mixture_distribution() {
    let answers = vec![
        (0, dist(&[('a', 0.5), ('b', 0.3), ('c', 0.1)], 0.1, 0.0)),
        (1, dist(&[('b', 0.4), ('a', 0.2), ('d', 0.1)], 0.2, 0.1)),
    ];
    let params = CharedParams {
        temperature: 0.8,
        top_p: 0.95,
        seed: 7,
        ..CharedParams::default()
    };
    // p: m over the listed outcomes, ^(1/T), cut to top-p mass, normalised.
    let mut reference = ed(params.clone(), 2);
    let probe = step(&mut reference, &answers);
    let mix: Vec<(CharOutcome, f64)> = probe.alternatives.iter().map(|a| (a.outcome, a.prob)).collect();
    let mut p: Vec<(CharOutcome, f64)> = mix.iter().map(|&(o, q)| (o, q.powf(1.0 / 0.8))).collect();
    let total: f64 = p.iter().map(|x| x.1).sum();
    let mut kept = 0;
    let mut mass = 0.0;
    while kept < p.len() {
        mass += p[kept].1;
        kept += 1;
        if mass >= 0.95 * total {
            break;
        }
    }
    p.truncate(kept);
    for x in &mut p {
        x.1 /= mass;
    }
    assert!(
        p.len() >= 3 && p.len() < mix.len(),
        "the cut must drop something: {p:?}"
    );
    let CharOutcome::Char(dropped) = mix[p.len()].0 else {
        panic!("the cut drops a character here: {mix:?}")
    };
    const N: usize = 60_000;
    for draft in ['a', 'c', dropped, 'z'] {
        let mut e = ed(params.clone(), 2);
        let mut counts: HashMap<CharOutcome, usize> = HashMap::new();
        for _ in 0..N {
            let got = accept(&mut e, std::slice::from_ref(&answers), &draft.to_string());
            *counts.entry(got[0].chosen).or_default() += 1;
            assert_eq!(got.len(), 1);
        }
        for &(o, want) in &p {
            let f = counts.get(&o).copied().unwrap_or(0) as f64 / N as f64;
            let se = (want * (1.0 - want) / N as f64).sqrt();
            assert!((f - want).abs() < 5.0 * se, "draft {draft}: {o:?} {f} vs {want}");
        }
        let outside: usize = counts
            .iter()
            .filter(|(o, _)| !p.iter().any(|x| x.0 == **o))
            .map(|x| x.1)
            .sum();
        assert_eq!(outside, 0, "draft {draft}: sampled outside the top-p cut");
    }
}

#[test]
fn the_gate_counts_the_positions_the_lead_is_sure_of() {
    let lead = [
        dist(&[('a', 0.9), ('b', 0.1)], 0.0, 0.0),
        dist(&[('b', 0.8), ('c', 0.2)], 0.0, 0.0),
        dist(&[('c', 0.5), ('d', 0.3)], 0.2, 0.0),
        dist(&[('x', 0.1)], 0.9, 0.0),
    ];
    let gated = |g: Option<f64>, draft: &str, upto: usize| {
        let e = ed(
            CharedParams {
                gate: g,
                ..CharedParams::default()
            },
            2,
        );
        e.confident_prefix(&lead[..upto], &draft_of(draft))
    };
    assert_eq!(gated(None, "abc", 4), 0, "off");
    assert_eq!(gated(Some(0.75), "abc", 4), 2, "'c' at 0.5 is not sure");
    assert_eq!(
        gated(Some(0.5), "abc", 4),
        4,
        "the whole draft and the EOS after it"
    );
    assert_eq!(gated(Some(0.85), "abc", 4), 1);
    assert_eq!(
        gated(Some(0.5), "ab", 3),
        3,
        "the position after the draft counts"
    );
    assert_eq!(
        gated(Some(0.5), "ax", 4),
        1,
        "a draft character that is not the lead's choice"
    );
    // Probabilities are normalised by the lead's own total.
    let e = ed(
        CharedParams {
            gate: Some(0.9),
            ..CharedParams::default()
        },
        1,
    );
    assert_eq!(e.confident_prefix(&[dist(&[('a', 1.8)], 0.2, 0.0)], &[]), 1);
    assert_eq!(e.confident_prefix(&[dist(&[('a', 0.8)], 0.2, 0.0)], &[]), 0);
    let bad = CharedParams {
        gate: Some(0.0),
        ..CharedParams::default()
    };
    assert!(bad.validate().is_err_and(|e| e.to_string().contains("gate")));
}

#[test]
fn entropy_beta_weighs_each_node_by_its_own_confidence() {
    // Node 0 is sure of 'a' (entropy of 0.9/0.1), node 1 unsure between 'a' and 'b' (ln 2) and
    // leaning to 'b'.
    let sure = dist(&[('a', 0.9), ('b', 0.1)], 0.0, 0.0);
    let unsure = dist(&[('b', 0.55), ('a', 0.35)], 0.0, 0.1);
    let h0 = -(0.9f64 * 0.9f64.ln() + 0.1 * 0.1f64.ln());
    let h1 = -(0.55f64 * 0.55f64.ln() + 0.35 * 0.35f64.ln() + 0.1 * 0.1f64.ln());
    assert!(close(sure.entropy(), h0) && close(unsure.entropy(), h1));
    assert!(close(dist(&[], 0.0, 0.0).entropy(), 0.0));
    for beta in [0.0, 1.0, 3.0] {
        let mut e = ed(
            CharedParams {
                entropy_beta: beta,
                weights: Some(vec![1.0, 5.0]),
                ..Default::default()
            },
            2,
        );
        let s = step(&mut e, &[(0, sure.clone()), (1, unsure.clone())]);
        let (w0, w1) = ((-beta * h0).exp() / 6.0, 5.0 * (-beta * h1).exp() / 6.0);
        let (w0, w1) = (w0 / (w0 + w1), w1 / (w0 + w1));
        let pa = w0 * 0.9 + w1 * 0.35;
        let pb = w0 * 0.1 + w1 * 0.55;
        assert!(close(s.prob, pa.max(pb)), "β {beta}: {} vs {pa} / {pb}", s.prob);
        assert!(close(s.shares[0].weight, w0) && close(s.shares[1].weight, w1));
        // With the weights alone the heavier, unsure node wins 'b'; confidence turns it to 'a'.
        assert_eq!(s.chosen, if beta >= 1.0 { c('a') } else { c('b') }, "β {beta}");
    }
    for bad in [-0.5, f64::NAN, 101.0] {
        let p = CharedParams {
            entropy_beta: bad,
            ..Default::default()
        };
        assert!(p.validate().is_err(), "{bad}");
    }
}
