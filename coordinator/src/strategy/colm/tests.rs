//! Co-LLM's state machine on hand-made turns.

use super::*;

fn plan(handoff: Handoff) -> Plan {
    Plan {
        base: 0,
        heads: vec![Some(1), Some(2)],
        eta: 0.6,
        handoff,
        segment_tokens: 32,
        word_tokens: 8,
    }
}

fn deferred(text: &str, heads: &[f32]) -> BaseTurn {
    BaseTurn {
        text: text.into(),
        deferred: true,
        head_probs: heads.to_vec(),
        ..BaseTurn::default()
    }
}

#[test]
fn the_base_writes_first_with_eta() {
    let c = CoLlm::new(plan(Handoff::Token));
    assert_eq!(
        c.next(),
        Action::Base {
            max_tokens: 32,
            threshold: Some(0.6)
        }
    );
}

#[test]
fn a_deferral_goes_to_the_surest_allowed_head_then_back_to_the_base() {
    let mut c = CoLlm::new(plan(Handoff::Token));
    let (span, ends) = c.base_wrote(deferred("The sum is ", &[0.2, 0.9]));
    assert_eq!(
        (span.node, span.text.as_str(), span.deferred, ends),
        (0, "The sum is ", false, false)
    );
    assert_eq!(
        c.next(),
        Action::Assistant {
            node: 2,
            max_tokens: 1,
            prob: f64::from(0.9f32)
        }
    );
    let (span, ends) = c.assistant_wrote("4", false);
    assert_eq!(
        (span.node, span.text.as_str(), span.deferred, ends),
        (2, "4", true, false)
    );
    assert_eq!(c.deferrals(), 1);
    assert_eq!(
        c.next(),
        Action::Base {
            max_tokens: 32,
            threshold: Some(0.6)
        }
    );
}

#[test]
fn a_head_the_request_does_not_allow_is_never_chosen() {
    let mut p = plan(Handoff::Token);
    p.heads = vec![Some(1), None];
    let mut c = CoLlm::new(p);
    c.base_wrote(deferred("", &[0.3, 0.99]));
    assert!(matches!(c.next(), Action::Assistant { node: 1, .. }));
    // With no allowed head at all the base writes the token itself, without deferring.
    let mut p = plan(Handoff::Token);
    p.heads = vec![None, None];
    let mut c = CoLlm::new(p);
    c.base_wrote(deferred("x", &[0.9, 0.9]));
    assert_eq!(
        c.next(),
        Action::Base {
            max_tokens: 32,
            threshold: None
        }
    );
}

#[test]
fn an_empty_handoff_lets_the_base_write_without_deferring_once() {
    let mut c = CoLlm::new(plan(Handoff::Token));
    c.base_wrote(deferred("", &[0.9, 0.1]));
    let (span, _) = c.assistant_wrote("", false);
    assert!(span.text.is_empty());
    assert_eq!(
        c.next(),
        Action::Base {
            max_tokens: 32,
            threshold: None
        }
    );
    c.base_wrote(BaseTurn {
        text: "ok".into(),
        ..BaseTurn::default()
    });
    assert_eq!(
        c.next(),
        Action::Base {
            max_tokens: 32,
            threshold: Some(0.6)
        }
    );
}

#[test]
fn a_word_handoff_asks_for_word_tokens_and_keeps_the_first_word() {
    let mut c = CoLlm::new(plan(Handoff::Word));
    c.base_wrote(deferred("capital: ", &[0.1, 0.8]));
    assert!(matches!(
        c.next(),
        Action::Assistant {
            node: 2,
            max_tokens: 8,
            ..
        }
    ));
    // The word ends before the space; an end the assistant wrote after it does not count.
    let (span, ends) = c.assistant_wrote("Tarn is", true);
    assert_eq!((span.text.as_str(), ends), ("Tarn", false));
    c.base_wrote(deferred(" x", &[0.1, 0.8]));
    let (span, ends) = c.assistant_wrote(" Tarn", true);
    assert_eq!((span.text.as_str(), ends), (" Tarn", true));
}

#[test]
fn the_base_ending_ends_the_answer() {
    let mut c = CoLlm::new(plan(Handoff::Token));
    let (_, ends) = c.base_wrote(BaseTurn {
        text: "done".into(),
        ends: true,
        ..BaseTurn::default()
    });
    assert!(ends);
}

#[test]
fn word_end_finds_the_end_of_the_first_word() {
    assert_eq!(word_end("abc def"), Some(3));
    assert_eq!(word_end("  abc def"), Some(5));
    assert_eq!(word_end("abc"), None);
    assert_eq!(word_end("   "), None);
    assert_eq!(word_end("é\ný"), Some(2));
    // Without spaces: a run of letters and digits, or of other characters.
    assert_eq!(word_end("057</think>750"), Some(3));
    assert_eq!(word_end("</think>7"), Some(2));
    assert_eq!(word_end("Dairox."), Some(6));
    assert_eq!(word_end("+084="), Some(1));
}

#[test]
fn params_are_range_checked() {
    let ok = CoLlmParams::default();
    assert!(ok.validate().is_ok());
    for (p, field) in [
        (
            CoLlmParams {
                eta: Some(1.0),
                ..ok.clone()
            },
            "colm.eta",
        ),
        (
            CoLlmParams {
                eta: Some(0.0),
                ..ok.clone()
            },
            "colm.eta",
        ),
        (
            CoLlmParams {
                segment_tokens: 0,
                ..ok.clone()
            },
            "colm.segment_tokens",
        ),
        (
            CoLlmParams {
                word_tokens: 65,
                ..ok.clone()
            },
            "colm.word_tokens",
        ),
    ] {
        match p.validate() {
            Err(Error::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
}
