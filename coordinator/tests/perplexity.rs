//! Bits per character across tokenizers: every character of a text priced by every member through
//! the coordinator (sessions, chunks, sliding windows past a member's context, tokenizers without
//! BOS); the fitted mixture never does worse than the uniform one or any member, the fitted
//! per-context mixture never worse than the fitted one; and the `Perplexity` and `PerplexityStream`
//! RPCs report and refuse as documented.

mod common;

use std::sync::Arc;
use std::time::Duration;

use coordinator::config::Settings;
use coordinator::replicas::SystemResolver;
use coordinator::service::{Coordinator, EnsembleService};
use ensemble_proto::v1 as pb;
use ensemble_proto::v1::ensemble_server::Ensemble;

const DOCS: [&str; 4] = [
    "the cat sat on the mat, and then it looked at the dog for a long while.",
    "Once upon a time there was a tiny robot who liked to sing!",
    "é and ü are letters too; so is ß.",
    "the end",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_character_is_priced_as_the_member_lists_it() -> anyhow::Result<()> {
    let dirs = common::three_model_dirs()?;
    let mut nodes = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let mut args = common::model_args(dir.clone());
        // The third member sees at most 40 positions: long documents slide its window.
        if i == 2 {
            args.max_context = Some(40);
        }
        nodes.push(common::start_model(args, Default::default()).await?);
    }
    let members = common::members(&nodes, &["a", "b", "c"]);
    let mut settings = Settings::new(members);
    settings.deadline = Duration::from_secs(20);
    let coordinator = Arc::new(Coordinator::start(settings, Arc::new(SystemResolver)).await?);
    let docs: Vec<String> = DOCS.iter().map(|d| d.to_string()).collect();
    let mut seen = Vec::new();
    let p = coordinator::perplexity::measure(&coordinator, &docs, &mut |d| seen.push(d)).await?;
    assert_eq!(seen, [1, 2, 3, 4]);
    let chars: usize = DOCS.iter().map(|d| d.chars().count()).sum();
    assert_eq!(p.doc_chars.iter().sum::<usize>(), chars);
    assert_eq!(
        p.doc_bytes.iter().sum::<usize>(),
        DOCS.iter().map(|d| d.len()).sum::<usize>()
    );
    // Probabilities (0 where the node's hypothesis pruning left a character no path: the floor
    // prices it, and the rows count it as `floored`).
    for m in &p.members {
        assert_eq!(m.probs.len(), chars, "{}", m.name);
        assert_eq!(m.entropy.len(), chars, "{}", m.name);
        for (q, h) in m.probs.iter().zip(&m.entropy) {
            // An entropy wherever a probability, within [0, ln(top_k + 2)] (32 listed, EOS, residual).
            assert_eq!(q.is_nan(), h.is_nan());
            assert!(h.is_nan() || (0.0..=34f64.ln() + 1e-12).contains(h), "{h}");
        }
        let bad: Vec<(usize, f64)> = m
            .probs
            .iter()
            .copied()
            .enumerate()
            .filter(|&(_, q)| !(q.is_nan() || (0.0..=1.0 + 1e-12).contains(&q)))
            .collect();
        assert!(bad.is_empty(), "{}: {bad:?}", m.name);
    }
    assert_eq!(p.members[0].slides, 0);
    assert!(
        p.members[2].slides > 0,
        "the 40-position member must slide its window"
    );

    // The members' probabilities come from NextCharDistributions in one session per document and
    // window; that each equals the listed probability one call per character is the node's test
    // (model-node/tests/next_chars.rs). A fresh context per character can differ: it re-derives the
    // token-path hypotheses from a backed-off context (at most 4, mass 1e-4), where the session
    // carries them along the text.

    // Fitted weights: a distribution, and never worse than uniform on the text they were fitted on.
    let all = |_: usize| true;
    let w = p.fit_weights(&all);
    assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{w:?}");
    let fitted = p.bits(&w, &all).per_char;
    let uniform = p.bits(&[1.0, 1.0, 1.0], &all).per_char;
    assert!(fitted <= uniform + 1e-12, "fitted {fitted} > uniform {uniform}");
    for m in 0..3 {
        assert!(
            fitted <= p.member_bits(m, &all).per_char + 1e-12,
            "fitted worse than member {m}"
        );
    }

    // The per-context mixture: at β = 0 it is the plain mixture; fitted, never worse than the fitted
    // weights alone (β = 0 is on its grid), and its weights a distribution.
    let plain = p.bits(&w, &all);
    assert_eq!(p.bits_in_context(&w, 0.0, &all), plain);
    let (cw, beta) = p.fit_context(&all);
    assert!((cw.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{cw:?}");
    assert!((0.0..=4.0).contains(&beta), "{beta}");
    let ctx = p.bits_in_context(&cw, beta, &all).per_char;
    assert!(
        ctx <= plain.per_char + 1e-12,
        "per-context {ctx} > fitted {}",
        plain.per_char
    );
    assert_ne!(
        p.bits_in_context(&w, 2.0, &all),
        plain,
        "β must change the mixture"
    );

    // The RPC: members, then the mixture; with fit_weights the held-out rows; refusals.
    let svc = EnsembleService::shared(coordinator.clone());
    let r = svc
        .perplexity(tonic::Request::new(pb::PerplexityRequest {
            documents: docs.clone(),
            fit_weights: true,
        }))
        .await?
        .into_inner();
    let names: Vec<&str> = r.rows.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "mixture"]);
    // The members' work as their nodes reported it: every character is priced by some pass.
    for (m, run) in r.rows.iter().zip(&p.members) {
        assert_eq!((m.calls, m.windows_slid), (run.calls, run.slides), "{}", m.name);
        assert!(
            m.forward_passes > 0 && m.computed_positions >= m.forward_passes,
            "{m:?}"
        );
    }
    assert_eq!((r.rows[3].forward_passes, r.rows[3].calls), (0, 0));
    // Members without BOS cannot price a document's first character: it is left out of every row.
    let unscored = if p.members.iter().any(|m| m.probs[0].is_nan()) {
        DOCS.len()
    } else {
        0
    };
    assert_eq!(r.chars as usize, chars - unscored);
    let held: Vec<&str> = r.held_out.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        held,
        [
            "a",
            "b",
            "c",
            "mixture",
            "fitted mixture",
            "fitted per-context mixture"
        ]
    );
    let odd = |d: usize| d % 2 == 1;
    let even = |d: usize| d.is_multiple_of(2);
    let (cw, beta) = p.fit_context(&even);
    assert_eq!(r.held_out[5].entropy_beta, beta);
    assert_eq!(r.held_out[5].weights, cw);
    assert_eq!(
        r.held_out[5].bits_per_char,
        p.bits_in_context(&cw, beta, &odd).per_char
    );

    // The stream: one progress event per document, then the same report.
    let mut events = svc
        .perplexity_stream(tonic::Request::new(pb::PerplexityRequest {
            documents: docs.clone(),
            fit_weights: true,
        }))
        .await?
        .into_inner();
    let mut progress = Vec::new();
    let mut done = None;
    while let Some(e) = tokio_stream::StreamExt::next(&mut events).await {
        match e?.event {
            Some(pb::perplexity_event::Event::Progress(p)) => {
                assert!(done.is_none(), "progress after the report");
                assert_eq!((p.documents, p.chars), (DOCS.len() as u64, chars as u64));
                progress.push((p.documents_done, p.chars_done));
            }
            Some(pb::perplexity_event::Event::Done(d)) => done = Some(d),
            None => anyhow::bail!("an empty event"),
        }
    }
    let mut at = 0;
    let want: Vec<(u64, u64)> = DOCS
        .iter()
        .enumerate()
        .map(|(i, d)| {
            at += d.chars().count() as u64;
            (i as u64 + 1, at)
        })
        .collect();
    assert_eq!(progress, want);
    assert_eq!(done, Some(r.clone()));
    assert_eq!(
        r.held_out_chars as usize,
        DOCS[1].chars().count() + DOCS[3].chars().count() - unscored / 2
    );
    for (req, says) in [
        (
            pb::PerplexityRequest {
                documents: vec![],
                fit_weights: false,
            },
            "documents",
        ),
        (
            pb::PerplexityRequest {
                documents: vec![String::new()],
                fit_weights: false,
            },
            "documents",
        ),
        (
            pb::PerplexityRequest {
                documents: vec!["x".into()],
                fit_weights: true,
            },
            "fit_weights",
        ),
        (
            pb::PerplexityRequest {
                documents: vec!["x".into(), String::new()],
                fit_weights: true,
            },
            "fit_weights",
        ),
    ] {
        let e = svc
            .perplexity(tonic::Request::new(req))
            .await
            .expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains(says), "{}", e.message());
    }
    Ok(())
}
