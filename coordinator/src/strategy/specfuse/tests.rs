//! SpecFuse unit tests: hand-computed rounds, exit, online weights, faults.

use super::*;

const EPS: f64 = 1e-12;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < EPS
}

fn assert_all_close(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(close(*g, *w), "{got:?} vs {want:?}");
    }
}

/// Mean log-probs whose softmax is exactly the distribution `q` (up to rounding).
fn logs(q: &[f64]) -> Vec<f64> {
    q.iter().map(|p| p.ln()).collect()
}

fn no_exit() -> SpecFuseParams {
    SpecFuseParams {
        exit: ExitParams {
            enabled: false,
            ..ExitParams::default()
        },
        ..SpecFuseParams::default()
    }
}

/// Every node drafts a distinct finished text ("d0", "d1", ...).
fn distinct_drafts(sf: &SpecFuse) -> Drafts {
    sf.prepare_drafts(
        sf.active_nodes()
            .into_iter()
            .map(|i| (i, DraftText::finished(format!("d{i}"))))
            .collect(),
    )
}

fn sf(params: SpecFuseParams, nodes: usize) -> SpecFuse {
    match SpecFuse::new(params, nodes) {
        Ok(s) => s,
        Err(e) => panic!("valid params refused: {e}"),
    }
}

fn combine(s: &mut SpecFuse, d: &Drafts, scores: &[(usize, Vec<f64>)]) -> RoundOutcome {
    match s.combine(d, scores) {
        Ok(o) => o,
        Err(e) => panic!("combine failed: {e}"),
    }
}

#[test]
fn defaults_follow_algorithms_md() {
    let p = SpecFuseParams::default();
    assert_eq!(p.segment_tokens, 10);
    assert_eq!(p.weights, None);
    assert!(p.self_votes && p.cut_to_word_boundary);
    assert_eq!(
        p.exit,
        ExitParams {
            enabled: true,
            delta: 0.5,
            tau: 1.0,
            warmup_rounds: 1,
            min_active: 1
        }
    );
    assert_eq!(p.online_weights, None);
    assert_eq!(p.validate(), Ok(()));
}

#[test]
fn validation_messages_name_parameter_value_and_range() {
    let msg = |p: SpecFuseParams| p.validate().map_err(|e| e.to_string()).err().unwrap_or_default();
    let d = SpecFuseParams::default;
    assert_eq!(
        msg(SpecFuseParams {
            segment_tokens: 0,
            ..d()
        }),
        "invalid parameter `segment_tokens` = 0: must be an integer in 1..=4096"
    );
    assert!(
        msg(SpecFuseParams {
            segment_tokens: 5000,
            ..d()
        })
        .contains("`segment_tokens` = 5000")
    );
    assert_eq!(
        msg(SpecFuseParams {
            exit: ExitParams {
                delta: 1.5,
                ..ExitParams::default()
            },
            ..d()
        }),
        "invalid parameter `exit.delta` = 1.5: must be a finite number in [0, 1]"
    );
    assert!(
        msg(SpecFuseParams {
            exit: ExitParams {
                delta: f64::NAN,
                ..ExitParams::default()
            },
            ..d()
        })
        .contains("`exit.delta` = NaN")
    );
    assert_eq!(
        msg(SpecFuseParams {
            exit: ExitParams {
                tau: 0.0,
                ..ExitParams::default()
            },
            ..d()
        }),
        "invalid parameter `exit.tau` = 0: must be a finite number > 0"
    );
    assert!(
        msg(SpecFuseParams {
            exit: ExitParams {
                min_active: 0,
                ..ExitParams::default()
            },
            ..d()
        })
        .contains("`exit.min_active` = 0: must be an integer >= 1")
    );
    assert!(
        msg(SpecFuseParams {
            weights: Some(vec![1.0, -2.0]),
            ..d()
        })
        .contains("`weights[1]` = -2: must be a finite number > 0")
    );
    assert!(
        msg(SpecFuseParams {
            weights: Some(vec![f64::INFINITY]),
            ..d()
        })
        .contains("`weights[0]` = inf")
    );
    assert!(
        msg(SpecFuseParams {
            online_weights: Some(OnlineWeights { lr: -1.0 }),
            ..d()
        })
        .contains("`online_weights.lr` = -1")
    );
    // Construction checks the weights against the node count.
    let e = SpecFuse::new(
        SpecFuseParams {
            weights: Some(vec![1.0, 1.0]),
            ..d()
        },
        3,
    )
    .err();
    assert_eq!(e, Some(Error::WeightCount { expected: 3, got: 2 }));
    assert_eq!(SpecFuse::new(d(), 0).err(), Some(Error::NoNodes));
}

#[test]
fn drafts_are_cut_deduplicated_and_ordered_by_lowest_proposer() {
    let s = sf(SpecFuseParams::default(), 5);
    let d = s.prepare_drafts(vec![
        (3, DraftText::unfinished("Hello, wor")), // cut to "Hello,"
        (1, DraftText::finished("Hello,")),       // same text, ended the answer
        (0, DraftText::unfinished("Bye")),        // one partial word: kept whole
        (2, DraftText::unfinished("")),           // empty: dropped
        (4, DraftText::finished("The end wo")),   // ended the answer: never cut
        (9, DraftText::finished("x")),            // unknown node
        (4, DraftText::finished("again")),        // second draft of node 4
    ]);
    assert_eq!(d.texts(), vec!["Bye", "Hello,", "The end wo"]);
    assert_eq!(d.candidates()[1].proposers, vec![1, 3]);
    assert!(
        d.candidates()[1].ends_answer,
        "any proposer ending the answer ends it"
    );
    assert!(!d.candidates()[0].ends_answer);
    assert_eq!(d.candidate_of(3), Some(1));
    assert_eq!(d.candidate_of(2), None);
    assert_eq!(
        d.cuts(),
        &[CutDraft {
            node: 3,
            removed: " wor".into()
        }]
    );
    assert_eq!(
        d.dropped(),
        &[
            DroppedDraft {
                node: 2,
                reason: DropReason::Empty { ended_answer: false }
            },
            DroppedDraft {
                node: 4,
                reason: DropReason::Duplicate
            },
            DroppedDraft {
                node: 9,
                reason: DropReason::UnknownNode
            },
        ]
    );
    assert!(d.ended_empty().is_empty());
}

#[test]
fn cut_can_be_turned_off() {
    let s = sf(
        SpecFuseParams {
            cut_to_word_boundary: false,
            ..SpecFuseParams::default()
        },
        1,
    );
    let d = s.prepare_drafts(vec![(0, DraftText::unfinished("Hello, wor"))]);
    assert_eq!(d.texts(), vec!["Hello, wor"]);
    assert!(d.cuts().is_empty());
}

#[test]
fn weighted_combination_hand_computed() {
    // w = [3, 1] -> [0.75, 0.25]; q_0 = [0.75, 0.25], q_1 = [0.25, 0.75].
    let mut s = sf(
        SpecFuseParams {
            weights: Some(vec![3.0, 1.0]),
            ..no_exit()
        },
        2,
    );
    let d = distinct_drafts(&s);
    let o = combine(
        &mut s,
        &d,
        &[(0, vec![-1.0, -1.0 - 3f64.ln()]), (1, logs(&[0.25, 0.75]))],
    );
    assert_all_close(&o.verifiers[0].q, &[0.75, 0.25]);
    assert_all_close(&o.verifiers[1].q, &[0.25, 0.75]);
    // score_0 = 0.75*0.75 + 0.25*0.25 = 0.625; score_1 = 0.375.
    assert_all_close(&o.combined, &[0.625, 0.375]);
    assert_eq!(
        o.winner,
        Winner {
            candidate: Some(0),
            node: 0,
            text: "d0".into(),
            ends_answer: true
        }
    );
    assert_all_close(&o.cumulative, &[0.625, 0.375]);
    assert_eq!(o.round, 1);
    assert_eq!(o.active, vec![0, 1]);
    assert_eq!(o.exit, None);
}

#[test]
fn self_votes_switch_changes_the_winner() {
    // Node 1 loves its own draft; the others prefer d0 and d2 equally.
    let scores = [
        (0, logs(&[0.4, 0.2, 0.4])),
        (1, logs(&[0.05, 0.9, 0.05])),
        (2, logs(&[0.4, 0.2, 0.4])),
    ];
    let mut with = sf(no_exit(), 3);
    let d = distinct_drafts(&with);
    let o = combine(&mut with, &d, &scores);
    assert_all_close(&o.combined, &[0.85 / 3.0, 1.3 / 3.0, 0.85 / 3.0]);
    assert_eq!(o.winner.node, 1);

    let mut without = sf(
        SpecFuseParams {
            self_votes: false,
            ..no_exit()
        },
        3,
    );
    let o = combine(&mut without, &d, &scores);
    // c0 = (0.05 + 0.4)/2, c1 = (0.2 + 0.2)/2, c2 = (0.4 + 0.05)/2: c0 and c2 tie; c0 wins (lower node).
    assert_all_close(&o.combined, &[0.225, 0.2, 0.225]);
    assert_eq!(o.winner.candidate, Some(0));
}

#[test]
fn without_self_votes_a_candidate_only_its_proposer_verified_scores_zero() {
    let mut s = sf(
        SpecFuseParams {
            self_votes: false,
            ..no_exit()
        },
        2,
    );
    let d = distinct_drafts(&s);
    // Only node 0 answered: its own draft gets no vote at all.
    let o = combine(&mut s, &d, &[(0, logs(&[0.9, 0.1]))]);
    assert_all_close(&o.combined, &[0.0, 0.1]);
    assert_eq!(o.winner.node, 1);
    // Shared drafts exclude every proposer.
    let mut s = sf(
        SpecFuseParams {
            self_votes: false,
            ..no_exit()
        },
        3,
    );
    let d = s.prepare_drafts(vec![
        (0, DraftText::finished("a")),
        (1, DraftText::finished("a")),
        (2, DraftText::finished("b")),
    ]);
    let o = combine(
        &mut s,
        &d,
        &[
            (0, logs(&[0.9, 0.1])),
            (1, logs(&[0.8, 0.2])),
            (2, logs(&[0.3, 0.7])),
        ],
    );
    assert_all_close(&o.combined, &[0.3, 0.15]);
    assert_eq!(o.winner.text, "a");
    // Both proposers of "a" are credited with its score in Q.
    assert_all_close(&o.cumulative, &[0.3, 0.3, 0.15]);
}

#[test]
fn exact_ties_go_to_the_lower_node() {
    let mut s = sf(no_exit(), 2);
    // Node 1 drafts "a", node 0 drafts "b": candidate 0 is node 0's.
    let d = s.prepare_drafts(vec![(1, DraftText::finished("a")), (0, DraftText::finished("b"))]);
    assert_eq!(d.texts(), vec!["b", "a"]);
    let o = combine(&mut s, &d, &[(0, vec![-1.0, -2.0]), (1, vec![-2.0, -1.0])]);
    assert_eq!(o.combined[0], o.combined[1]);
    assert_eq!((o.winner.node, o.winner.text.as_str()), (0, "b"));
}

#[test]
fn bad_verifiers_are_ignored_for_the_round() {
    let mut s = sf(
        SpecFuseParams {
            weights: Some(vec![1.0, 1.0, 2.0, 1.0]),
            ..no_exit()
        },
        4,
    );
    let d = distinct_drafts(&s);
    let q = logs(&[0.1, 0.2, 0.3, 0.4]);
    let o = combine(
        &mut s,
        &d,
        &[
            (0, vec![f64::NAN, -1.0, -1.0, -1.0]),
            (1, vec![-1.0, f64::INFINITY, -1.0, -1.0]),
            (2, vec![f64::NEG_INFINITY, q[1], q[2], q[3]]),
            (3, vec![-1.0; 3]),
            (2, q.clone()),
        ],
    );
    let reasons: Vec<_> = o.ignored_verifiers.iter().map(|v| (v.node, v.reason)).collect();
    assert_eq!(
        reasons,
        vec![
            (0, IgnoreReason::NonFinite),
            (1, IgnoreReason::NonFinite),
            (3, IgnoreReason::WrongCount { expected: 4, got: 3 }),
            (2, IgnoreReason::Duplicate),
        ]
    );
    // Only node 2 counts (a single -inf is fine: q = 0 there); its weight is renormalised to 1.
    assert_eq!(o.verifiers.len(), 1);
    assert_all_close(&o.combined, &[0.0, 0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9]);
    assert_eq!(o.winner.node, 3);
    // All -inf is no distribution.
    let before = s.rounds();
    let r = s.combine(&d, &[(0, vec![f64::NEG_INFINITY; 4]), (1, vec![f64::NAN; 4])]);
    assert_eq!(r, Err(Error::NoVerifier { ignored: 2 }));
    assert_eq!(s.rounds(), before, "a failed combine leaves the state unchanged");
    assert_eq!(
        s.combine(&d, &[(7, q)]),
        Err(Error::UnknownNode { node: 7, nodes: 4 })
    );
}

/// Three nodes; node 2's draft is far worse than the other two under every verifier.
fn losing_round(s: &mut SpecFuse) -> RoundOutcome {
    let d = distinct_drafts(s);
    let n = d.candidates().len();
    let row: Vec<f64> = d
        .candidates()
        .iter()
        .map(|c| if c.proposers == [2] { -5.0 } else { -1.0 })
        .collect();
    let scores: Vec<(usize, Vec<f64>)> = s.active_nodes().into_iter().map(|j| (j, row.clone())).collect();
    assert_eq!(row.len(), n);
    combine(s, &d, &scores)
}

#[test]
fn a_node_that_keeps_losing_exits_after_warmup() {
    let mut s = sf(SpecFuseParams::default(), 3);
    let r1 = losing_round(&mut s);
    assert_eq!(r1.exit, None, "round 1 is the warm-up");
    assert_eq!(s.active_nodes(), vec![0, 1, 2]);
    let r2 = losing_round(&mut s);
    // Q = 2·[a, a, b] with a = 1/(2 + e^-4), b = e^-4/(2 + e^-4); p_2 ≈ 0.159 < 0.5/3.
    let (a, b) = (1.0 / (2.0 + (-4f64).exp()), (-4f64).exp() / (2.0 + (-4f64).exp()));
    assert_all_close(&r2.cumulative, &[2.0 * a, 2.0 * a, 2.0 * b]);
    let e = (2.0 * b).exp() / (2.0 * (2.0 * a).exp() + (2.0 * b).exp());
    let check = r2
        .exit
        .clone()
        .unwrap_or_else(|| panic!("exit rule must run in round 2"));
    assert!(close(check.threshold, 0.5 / 3.0));
    assert_eq!(check.exited.len(), 1);
    assert_eq!(check.exited[0].node, 2);
    assert!(close(check.exited[0].p, e) && e < 0.5 / 3.0);
    assert_eq!(r2.exited(), vec![2]);
    assert_eq!(s.active_nodes(), vec![0, 1]);
    // Later rounds neither ask node 2 nor accept its drafts or scores.
    let d = s.prepare_drafts(vec![(2, DraftText::finished("late"))]);
    assert_eq!(
        d.dropped(),
        &[DroppedDraft {
            node: 2,
            reason: DropReason::Inactive
        }]
    );
    let r3 = losing_round(&mut s);
    assert!(r3.exited().is_empty());
    assert_eq!(s.rounds(), 3);
    assert_eq!(s.active_node_rounds(), 3 + 3 + 2);
    assert!(close(s.mean_active_nodes().unwrap_or_default(), 8.0 / 3.0));
}

#[test]
fn warmup_and_tau_hand_computed() {
    // Two nodes, both verifiers give q = [0.8, 0.2]: Q_1 - Q_0 = -0.6 per round.
    let run = |params: SpecFuseParams, rounds: usize| -> Vec<Vec<usize>> {
        let mut s = sf(params, 2);
        (0..rounds)
            .map(|_| {
                let d = distinct_drafts(&s);
                let row = if d.candidates().len() == 2 {
                    logs(&[0.8, 0.2])
                } else {
                    vec![-1.0]
                };
                let scores: Vec<_> = s.active_nodes().into_iter().map(|j| (j, row.clone())).collect();
                combine(&mut s, &d, &scores).exited()
            })
            .collect()
    };
    let none: Vec<usize> = vec![];
    // τ = 1: round 2 has p_1 = 1/(1 + e^1.2) ≈ 0.231 < 0.25.
    assert_eq!(
        run(SpecFuseParams::default(), 3),
        vec![none.clone(), vec![1], none.clone()]
    );
    // τ = 2: p_1 = 1/(1 + e^0.6) ≈ 0.354, then 1/(1 + e^0.9) ≈ 0.289, then 1/(1 + e^1.2): exit in round 4.
    let tau2 = SpecFuseParams {
        exit: ExitParams {
            tau: 2.0,
            ..ExitParams::default()
        },
        ..SpecFuseParams::default()
    };
    assert_eq!(
        run(tau2, 4),
        vec![none.clone(), none.clone(), none.clone(), vec![1]]
    );
    // Warm-up of 3 rounds: nothing before round 4, although p_1 < 0.25 from round 2.
    let warm = SpecFuseParams {
        exit: ExitParams {
            warmup_rounds: 3,
            ..ExitParams::default()
        },
        ..SpecFuseParams::default()
    };
    assert_eq!(
        run(warm, 4),
        vec![none.clone(), none.clone(), none.clone(), vec![1]]
    );
    // Warm-up 0: the rule applies from round 1 (p_1 = 1/(1 + e^0.6) ≈ 0.354 stays).
    let cold = SpecFuseParams {
        exit: ExitParams {
            warmup_rounds: 0,
            delta: 1.0,
            ..ExitParams::default()
        },
        ..SpecFuseParams::default()
    };
    // δ = 1: threshold 0.5, so the loser leaves at once.
    assert_eq!(run(cold, 1), vec![vec![1]]);
    // δ = 0 never exits.
    let never = SpecFuseParams {
        exit: ExitParams {
            delta: 0.0,
            ..ExitParams::default()
        },
        ..SpecFuseParams::default()
    };
    assert_eq!(run(never, 5), vec![none; 5]);
}

#[test]
fn exits_never_go_below_min_active_and_the_lowest_leaves_first() {
    // Nodes 1 and 2 both lose, node 2 worse; min_active = 2 keeps node 1.
    let params = SpecFuseParams {
        exit: ExitParams {
            warmup_rounds: 0,
            min_active: 2,
            tau: 0.25,
            ..ExitParams::default()
        },
        ..SpecFuseParams::default()
    };
    let mut s = sf(params.clone(), 3);
    for _ in 0..10 {
        let d = distinct_drafts(&s);
        let row: Vec<f64> = d
            .candidates()
            .iter()
            .map(|c| -(1.0 + 3.0 * c.proposers[0] as f64))
            .collect();
        let scores: Vec<_> = s.active_nodes().into_iter().map(|j| (j, row.clone())).collect();
        let o = combine(&mut s, &d, &scores);
        assert!(s.active_nodes().len() >= 2);
        if o.round == 1 {
            let check = o.exit.unwrap_or_else(|| panic!("warm-up is 0"));
            assert_eq!(check.exited.iter().map(|e| e.node).collect::<Vec<_>>(), vec![2]);
            assert_eq!(check.spared, vec![1]);
        }
    }
    assert_eq!(s.active_nodes(), vec![0, 1]);

    // With the default min_active = 1, one node always stays, however bad the drafts.
    let mut s = sf(
        SpecFuseParams {
            exit: ExitParams {
                delta: 1.0,
                ..ExitParams::default()
            },
            ..Default::default()
        },
        4,
    );
    for _ in 0..10 {
        let d = distinct_drafts(&s);
        let row = vec![-1.0; d.candidates().len()];
        let scores: Vec<_> = s.active_nodes().into_iter().map(|j| (j, row.clone())).collect();
        combine(&mut s, &d, &scores);
        assert!(!s.active_nodes().is_empty());
    }
    // Equal Q: p_i = 1/|active| is never below δ/|active| with δ ≤ 1, so everyone stays.
    assert_eq!(s.active_nodes(), vec![0, 1, 2, 3]);
}

#[test]
fn equal_p_ties_exit_the_higher_node_first() {
    let params = SpecFuseParams {
        exit: ExitParams {
            warmup_rounds: 0,
            min_active: 2,
            tau: 0.25,
            ..ExitParams::default()
        },
        ..SpecFuseParams::default()
    };
    let mut s = sf(params, 3);
    let d = distinct_drafts(&s);
    let row = vec![0.0, -9.0, -9.0];
    let o = combine(&mut s, &d, &[(0, row.clone()), (1, row.clone()), (2, row)]);
    assert_eq!(o.exited(), vec![2]);
    assert_eq!(o.exit.map(|e| e.spared), Some(vec![1]));
}

#[test]
fn online_weights_hand_computed_and_moving_toward_the_winner() {
    let params = SpecFuseParams {
        online_weights: Some(OnlineWeights { lr: 1.0 }),
        ..no_exit()
    };
    let mut s = sf(params, 3);
    let d = distinct_drafts(&s);
    let scores: Vec<_> = (0..3).map(|j| (j, vec![-1.0, -2.0, -3.0])).collect();
    let o = combine(&mut s, &d, &scores);
    // Node 0 wins all 4 pairs, node 1 wins 2 of 4 (beats node 2 only), node 2 none.
    assert_eq!(o.rewards, vec![(0, 1.0), (1, 0.5), (2, 0.0)]);
    let eta = (1.0f64 / 3.0).sqrt();
    let raw = [eta.exp(), (0.5 * eta).exp(), 1.0];
    let total: f64 = raw.iter().sum();
    assert_all_close(&o.weights, &raw.map(|w| w / total));
    assert_all_close(s.weights(), &o.weights);
    // Over more rounds node 0's weight keeps growing, with a decaying step (η_t = η_1 / t).
    let mut last = o.weights[0];
    let mut last_step = f64::INFINITY;
    for _ in 0..5 {
        let o = combine(&mut s, &d, &scores);
        assert!(o.weights[0] > last);
        assert!(o.weights[0] - last < last_step);
        last_step = o.weights[0] - last;
        last = o.weights[0];
        assert!(close(o.weights.iter().sum(), 1.0));
    }
    // A node that drafted nothing earns no reward but still counts as a beaten k for the others.
    let mut s = sf(
        SpecFuseParams {
            online_weights: Some(OnlineWeights { lr: 1.0 }),
            ..no_exit()
        },
        3,
    );
    let d = s.prepare_drafts(vec![(0, DraftText::finished("a")), (1, DraftText::finished("b"))]);
    let o = combine(
        &mut s,
        &d,
        &[
            (0, vec![-1.0, -2.0]),
            (1, vec![-1.0, -2.0]),
            (2, vec![-1.0, -2.0]),
        ],
    );
    assert_eq!(o.rewards, vec![(0, 1.0), (1, 0.5), (2, 0.0)]);
}

#[test]
fn node_failures_and_empty_rounds() {
    let mut s = sf(SpecFuseParams::default(), 3);
    assert_eq!(s.node_failed(5), Err(Error::UnknownNode { node: 5, nodes: 3 }));
    assert_eq!(s.node_failed(1), Ok(()));
    assert_eq!(s.active_nodes(), vec![0, 2]);
    // A late score from the failed node is ignored; the round goes on.
    let d = distinct_drafts(&s);
    let o = combine(&mut s, &d, &[(1, vec![0.0, -1.0]), (2, vec![-1.0, 0.0])]);
    assert_eq!(o.ignored_verifiers[0].reason, IgnoreReason::Inactive);
    assert_eq!(o.winner.node, 2);
    // Nobody drafted text and nobody ended the answer.
    let d = s.prepare_drafts(vec![
        (0, DraftText::unfinished("")),
        (2, DraftText::unfinished("")),
    ]);
    assert_eq!(s.combine(&d, &[]), Err(Error::NoCandidates));
    // Nobody drafted text but node 2 ended the answer: the answer ends.
    let d = s.prepare_drafts(vec![(0, DraftText::unfinished("")), (2, DraftText::finished(""))]);
    assert_eq!(d.ended_empty(), vec![2]);
    let o = combine(&mut s, &d, &[]);
    assert_eq!(
        o.winner,
        Winner {
            candidate: None,
            node: 2,
            text: String::new(),
            ends_answer: true
        }
    );
    assert_eq!(s.rounds(), 2);
    // Drafts from an ensemble of another size are refused.
    let other = sf(SpecFuseParams::default(), 2);
    let foreign = distinct_drafts(&other);
    assert_eq!(
        s.combine(&foreign, &[]),
        Err(Error::DraftsMismatch { expected: 3, got: 2 })
    );
    // The last node failing leaves nothing to run.
    assert_eq!(s.node_failed(0), Ok(()));
    assert_eq!(s.node_failed(2), Err(Error::NoActiveNode));
    assert_eq!(s.combine(&d, &[]), Err(Error::NoActiveNode));
    assert_eq!(s.mean_active_nodes(), Some(2.0));
}

#[test]
fn single_node_ensemble_and_empty_input_do_not_panic() {
    let mut s = sf(SpecFuseParams::default(), 1);
    let d = s.prepare_drafts(vec![]);
    assert!(d.is_empty());
    assert_eq!(s.combine(&d, &[]), Err(Error::NoCandidates));
    let d = s.prepare_drafts(vec![(0, DraftText::unfinished("alone here"))]);
    let o = combine(&mut s, &d, &[(0, vec![-0.5])]);
    assert_eq!(
        (o.winner.text.as_str(), o.combined.as_slice()),
        ("alone", &[1.0][..])
    );
    for _ in 0..3 {
        combine(&mut s, &d, &[(0, vec![-0.5])]);
    }
    assert_eq!(s.active_nodes(), vec![0]);
    assert_eq!(
        s.combine(&d, &[(0, vec![])]),
        Err(Error::NoVerifier { ignored: 1 })
    );
}

#[test]
fn the_gate_lead_is_the_best_so_far_and_wins_alone() {
    let mut s = sf(no_exit(), 3);
    assert_eq!(s.lead(), Some(0), "no score yet: the lowest index");
    // Node 2's draft wins a full round: it leads from then on.
    let d = distinct_drafts(&s);
    combine(
        &mut s,
        &d,
        &[(0, logs(&[0.1, 0.1, 0.8])), (1, logs(&[0.1, 0.1, 0.8]))],
    );
    assert_eq!(s.lead(), Some(2));
    let before = s.cumulative().to_vec();
    let d = s.prepare_drafts(vec![(2, DraftText::finished("sure"))]);
    let o = match s.accept_lead(&d, 2) {
        Ok(o) => o,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(
        (o.winner.node, o.winner.text.as_str(), o.winner.ends_answer),
        (2, "sure", true)
    );
    assert_eq!(o.active, vec![2]);
    assert_eq!(s.cumulative(), &before[..], "a gated round scores nobody");
    assert_eq!((s.rounds(), s.active_node_rounds()), (2, 4));
    // A lead with no draft and no end cannot win.
    let d = s.prepare_drafts(vec![(
        2,
        DraftText {
            text: String::new(),
            finished_by_eos_or_stop: false,
        },
    )]);
    assert!(matches!(s.accept_lead(&d, 2), Err(Error::NoCandidates)));
    let bad = SpecFuseParams {
        gate: Some(1.5),
        ..SpecFuseParams::default()
    };
    assert!(bad.validate().is_err_and(|e| e.to_string().contains("gate")));
}
