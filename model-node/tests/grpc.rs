//! Every RPC over real gRPC on 127.0.0.1:0, with exact work counts and the error matrix.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::{TestNode, chat, delta, greedy, raw};
use ensemble_proto::v1 as pb;
use tonic::Code;

/// One model directory per tokenizer kind, built once per test binary.
fn dirs() -> &'static [PathBuf; 3] {
    static DIRS: OnceLock<[PathBuf; 3]> = OnceLock::new();
    DIRS.get_or_init(|| {
        let root = common::temp_dir("grpc");
        let mk = |arch, kind, seed| common::model_dir(&root, arch, kind, seed).expect("model dir");
        [
            mk("qwen2", "byte_level", 1),
            mk("llama", "sentencepiece", 2),
            mk("gemma2", "char", 3),
        ]
    })
}

async fn node(i: usize) -> anyhow::Result<TestNode> {
    TestNode::start(common::model_args(&dirs()[i]), common::limits()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_describes_the_model() -> anyhow::Result<()> {
    for (i, (arch, kind)) in [
        ("qwen2", pb::TokenizerKind::ByteLevel),
        ("llama", pb::TokenizerKind::SentencePiece),
        ("gemma2", pb::TokenizerKind::Plain),
    ]
    .into_iter()
    .enumerate()
    {
        let mut n = node(i).await?;
        let info = n.client().await?.info(pb::InfoRequest {}).await?.into_inner();
        assert_eq!(info.architecture, arch);
        assert_eq!(info.tokenizer_kind(), kind);
        assert_eq!(info.has_chat_template, i == 0);
        assert_eq!(info.eos_token_ids.len(), 1, "{info:?}");
        assert_eq!(info.max_context_tokens, 512);
        assert_eq!(info.device, "cpu");
        assert_eq!(info.dtype, "f32");
        assert!(info.parameters > 10_000);
        n.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propose_is_deterministic_and_sessions_compute_only_new_positions() -> anyhow::Result<()> {
    for i in 0..3 {
        let mut n = node(i).await?;
        let mut c = n.client().await?;
        let a = c
            .propose_segment(greedy(chat("what is the cat?", "the", ""), 12))
            .await?
            .into_inner();
        let b = c
            .propose_segment(greedy(chat("what is the cat?", "the", ""), 12))
            .await?
            .into_inner();
        assert_eq!(a.text, b.text);
        assert_eq!(a.token_logprobs, b.token_logprobs);
        assert!(a.token_logprobs.iter().all(|lp| *lp <= 0.0 && lp.is_finite()));
        // 12 new tokens after the healing token, which re-spells the answer's last token.
        assert_eq!(
            a.finish_reason(),
            if a.token_logprobs.len() == 13 {
                pb::FinishReason::Length
            } else {
                pb::FinishReason::Eos
            }
        );

        // A session: the full context once, then deltas whose cost is the new tokens only.
        // (Scoring, not proposing: a draft's cached tokens could legitimately be reused below.)
        let first = c
            .score_candidates(pb::ScoreRequest {
                context: chat("what is the cat?", "the", "s1"),
                candidates: vec![" cat".into()],
                string_prefix: false,
                ends_answer: vec![],
            })
            .await?
            .into_inner();
        let u0 = first.usage.unwrap_or_default();
        assert_eq!(u0.reused_positions, 0);
        let ctx_tokens = u0.context_tokens;
        // Append text that adds whole words (a space-led word never merges with the previous token).
        let r = c
            .score_candidates(pb::ScoreRequest {
                context: delta("s1", 3, " mat and the"),
                candidates: vec![" dog".into()],
                string_prefix: false,
                ends_answer: vec![],
            })
            .await?
            .into_inner();
        let u = r.usage.unwrap_or_default();
        let k = u.context_tokens - ctx_tokens;
        assert!(k > 0);
        assert_eq!(
            u.computed_positions,
            k + r.scores[0].token_count - 1,
            "kind {i}: usage {u:?}"
        );
        assert_eq!(u.reused_positions, u.context_tokens - 1 - k);
        n.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoring_is_one_batched_pass_and_matches_single_scores() -> anyhow::Result<()> {
    for i in 0..3 {
        let mut n = node(i).await?;
        let mut c = n.client().await?;
        let cands: Vec<String> = vec![
            " the cat sat".into(),
            " a dog".into(),
            " hello world, hello".into(),
            " x".into(),
        ];
        // Warm the session's context.
        c.score_candidates(pb::ScoreRequest {
            context: raw("once upon a time", "", "warm"),
            candidates: vec!["!".into()],
            string_prefix: false,
            ends_answer: vec![],
        })
        .await?;
        let r = c
            .score_candidates(pb::ScoreRequest {
                context: delta("warm", 0, ""),
                candidates: cands.clone(),
                string_prefix: false,
                ends_answer: vec![],
            })
            .await?
            .into_inner();
        let u = r.usage.unwrap_or_default();
        assert_eq!(u.forward_passes, 1, "kind {i}: {u:?}");
        let expected: u32 = r.scores.iter().map(|s| s.token_count - 1).sum();
        assert_eq!(u.computed_positions, expected);
        for (cand, s) in cands.iter().zip(&r.scores) {
            let one = c
                .score_candidates(pb::ScoreRequest {
                    context: raw("once upon a time", "", ""),
                    candidates: vec![cand.clone()],
                    string_prefix: false,
                    ends_answer: vec![],
                })
                .await?
                .into_inner();
            let o = one.scores[0];
            assert!(
                (o.sum_logprob - s.sum_logprob).abs() < 1e-3,
                "kind {i} {cand:?}: {} vs {}",
                o.sum_logprob,
                s.sum_logprob
            );
            assert_eq!(o.token_count, s.token_count);
            assert_eq!(s.char_count as usize, cand.chars().count());
            assert!((s.mean_logprob - s.sum_logprob / f64::from(s.token_count)).abs() < 1e-9);
            assert!(s.sum_logprob < 0.0);
        }
        n.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_char_sums_to_one_and_commits_inside_a_token_are_free() -> anyhow::Result<()> {
    for i in 0..3 {
        let mut n = node(i).await?;
        let mut c = n.client().await?;
        let req = |ctx| pb::NextCharRequest {
            context: ctx,
            top_k: 256,
            max_hypotheses: None,
            lookahead: None,
        };
        let d = c
            .next_char_distribution(req(chat("hello", "the ca", "nc")))
            .await?
            .into_inner();
        let total: f64 = d.chars.iter().map(|c| c.prob).sum::<f64>() + d.eos_prob + d.residual;
        assert!(
            (total - 1.0).abs() < 1e-5,
            "kind {i}: total {total} eos {} res {} hyps {} chars {:?}",
            d.eos_prob,
            d.residual,
            d.hypotheses,
            &d.chars[..d.chars.len().min(300)]
        );
        assert!(d.chars.windows(2).all(|w| w[0].prob >= w[1].prob));
        assert!(d.chars.iter().all(|c| c.char.chars().count() == 1));
        // Commit the most likely character; count the work.
        let best = d.chars[0].char.clone();
        let d2 = c
            .next_char_distribution(req(delta("nc", 6, &best)))
            .await?
            .into_inner();
        let u = d2.usage.unwrap_or_default();
        // Look-ahead paths (at most 64 per step) plus paths crossing a boundary; the exact
        // "no call inside a token" count is a unit test of `chars`.
        assert!(
            u.forward_passes <= 64 + 2 * d2.hypotheses.max(1),
            "kind {i}: {u:?}"
        );
        let total: f64 = d2.chars.iter().map(|c| c.prob).sum::<f64>() + d2.eos_prob + d2.residual;
        assert!((total - 1.0).abs() < 1e-5);
        n.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn char_level_distribution_is_the_token_distribution() -> anyhow::Result<()> {
    // With one token per character and no look-ahead, the next-character distribution is exactly the
    // model's next-token distribution (every char token, plus EOS).
    let mut n = node(2).await?;
    let mut c = n.client().await?;
    let d = c
        .next_char_distribution(pb::NextCharRequest {
            context: raw("the c", "", ""),
            top_k: 256,
            max_hypotheses: Some(1),
            lookahead: Some(false),
        })
        .await?
        .into_inner();
    let k1: f64 = d.chars.iter().map(|c| c.prob).sum::<f64>() + d.eos_prob;
    assert!((k1 + d.residual - 1.0).abs() < 1e-6);
    // Scores of single characters agree with the distribution's ratios.
    let s = c
        .score_candidates(pb::ScoreRequest {
            context: raw("the c", "", ""),
            candidates: d.chars.iter().take(3).map(|c| c.char.clone()).collect(),
            string_prefix: false,
            ends_answer: vec![],
        })
        .await?
        .into_inner();
    let p0 = d.chars[0].prob;
    for (ch, sc) in d.chars.iter().zip(&s.scores).skip(1) {
        let ratio = (ch.prob / p0).ln();
        let diff = sc.sum_logprob - s.scores[0].sum_logprob;
        assert!((ratio - diff).abs() < 1e-3, "{ratio} vs {diff}");
    }
    n.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_report_unknown_and_mismatch_and_close() -> anyhow::Result<()> {
    let mut n = node(0).await?;
    let mut c = n.client().await?;
    let e = c
        .propose_segment(greedy(delta("nope", 0, "x"), 2))
        .await
        .expect_err("unknown session");
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("resend the full context"), "{}", e.message());
    c.propose_segment(greedy(raw("hello", "the", "s"), 2)).await?;
    let e = c
        .propose_segment(greedy(delta("s", 7, "x"), 2))
        .await
        .expect_err("mismatch");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("3 characters"), "{}", e.message());
    assert!(
        c.close_session(pb::CloseSessionRequest {
            session_id: "s".into()
        })
        .await?
        .into_inner()
        .existed
    );
    assert!(
        !c.close_session(pb::CloseSessionRequest {
            session_id: "s".into()
        })
        .await?
        .into_inner()
        .existed
    );
    n.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_session_is_rebuilt_from_the_full_context() -> anyhow::Result<()> {
    let mut limits = common::limits();
    limits.max_sessions = 1;
    let mut n = TestNode::start(common::model_args(&dirs()[0]), limits).await?;
    let mut c = n.client().await?;
    let before = c
        .propose_segment(greedy(raw("hello", "the cat", "a"), 5))
        .await?
        .into_inner();
    c.propose_segment(greedy(raw("hello", "", "b"), 2)).await?; // evicts "a"
    let e = c
        .propose_segment(greedy(delta("a", 7, ""), 5))
        .await
        .expect_err("evicted");
    assert_eq!(e.code(), Code::NotFound);
    let after = c
        .propose_segment(greedy(raw("hello", "the cat", "a"), 5))
        .await?
        .into_inner();
    assert_eq!(before.text, after.text);
    n.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_statuses() -> anyhow::Result<()> {
    let mut n = node(0).await?;
    let mut c = n.client().await?;
    let check = |r: Result<tonic::Response<pb::ProposeResponse>, tonic::Status>, code: Code, needle: &str| {
        let e = r.expect_err(needle);
        assert_eq!(e.code(), code, "{needle}: {}", e.message());
        assert!(
            e.message().contains(needle),
            "{needle:?} not in {:?}",
            e.message()
        );
    };
    check(
        c.propose_segment(greedy(None, 3)).await,
        Code::InvalidArgument,
        "context is required",
    );
    // The byte-level fixture has no BOS: an empty raw prompt has no token to condition on.
    check(
        c.propose_segment(greedy(raw("", "", ""), 3)).await,
        Code::InvalidArgument,
        "empty context",
    );
    let long = "the cat sat on the mat ".repeat(200);
    check(
        c.propose_segment(greedy(raw(&long, "", ""), 3)).await,
        Code::InvalidArgument,
        "limit of 512",
    );
    check(
        c.propose_segment(greedy(raw("hi", "", ""), 0)).await,
        Code::InvalidArgument,
        "max_new_tokens",
    );
    let mut r = greedy(raw("hi", "", ""), 3);
    r.sampling = Some(pb::Sampling {
        temperature: -0.5,
        ..Default::default()
    });
    check(c.propose_segment(r).await, Code::InvalidArgument, "temperature");
    let mut r = greedy(raw("hi", "", ""), 3);
    r.sampling = Some(pb::Sampling {
        temperature: 1.0,
        top_k: Some(0),
        ..Default::default()
    });
    check(c.propose_segment(r).await, Code::InvalidArgument, "top_k");
    let mut r = greedy(raw("hi", "", ""), 3);
    r.sampling = Some(pb::Sampling {
        temperature: 1.0,
        top_p: Some(1.5),
        ..Default::default()
    });
    check(c.propose_segment(r).await, Code::InvalidArgument, "top_p");
    let e = c
        .score_candidates(pb::ScoreRequest {
            context: raw("hi", "", ""),
            candidates: vec![],
            string_prefix: false,
            ends_answer: vec![],
        })
        .await
        .expect_err("no candidates");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .next_char_distribution(pb::NextCharRequest {
            context: raw("hi", "", ""),
            top_k: 0,
            max_hypotheses: None,
            lookahead: None,
        })
        .await
        .expect_err("top_k 0");
    assert_eq!(e.code(), Code::InvalidArgument);
    // A candidate that takes the context past the model's limit is the client's to shorten.
    let e = c
        .score_candidates(pb::ScoreRequest {
            context: raw("hi", "", ""),
            candidates: vec![" ok".into(), "the cat sat on the mat. ".repeat(100)],
            string_prefix: false,
            ends_answer: vec![],
        })
        .await
        .expect_err("candidate past the context limit");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("context too long"), "{}", e.message());
    // The node still serves after all of that.
    c.propose_segment(greedy(raw("hi", "", ""), 2)).await?;
    n.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_capacity_is_resource_exhausted() -> anyhow::Result<()> {
    let mut limits = common::limits();
    limits.queue = 1;
    let mut n = TestNode::start(common::model_args(&dirs()[0]), limits).await?;
    let ch = n.channel().await?;
    let mut calls = Vec::new();
    for i in 0..12 {
        let mut c = pb::model_node_client::ModelNodeClient::new(ch.clone());
        calls.push(tokio::spawn(async move {
            c.propose_segment(greedy(raw(&format!("hello {i}"), "", ""), 200))
                .await
        }));
    }
    let mut exhausted = 0;
    let mut ok = 0;
    for c in calls {
        match c.await? {
            Ok(_) => ok += 1,
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert!(e.message().contains("busy"), "{}", e.message());
                exhausted += 1
            }
            Err(e) => anyhow::bail!("unexpected {e:?}"),
        }
    }
    assert!(ok >= 1 && exhausted >= 1, "ok {ok}, exhausted {exhausted}");
    n.stop().await?;
    Ok(())
}

/// The healing token re-spells the end of the context, so it does not count against
/// `max_new_tokens`: one new token is one token past the context, with its text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_healing_token_does_not_count_against_max_new_tokens() -> anyhow::Result<()> {
    let mut n = node(0).await?;
    let mut c = n.client().await?;
    let mut drafted = 0;
    for prompt in ["the cat", "hello", "a b c", "once upon a time"] {
        let r = c
            .propose_segment(greedy(raw(prompt, "", ""), 1))
            .await?
            .into_inner();
        if r.finish_reason() == pb::FinishReason::Eos {
            continue;
        }
        assert_eq!(
            r.token_logprobs.len(),
            2,
            "{prompt:?}: the healing token and one new one"
        );
        assert!(!r.text.is_empty(), "{prompt:?}: one new token has text");
        drafted += 1;
    }
    assert!(drafted >= 1, "every prompt ended at once");
    n.stop().await?;
    Ok(())
}

/// Scored as string prefixes, a word cut at every character never gains probability as the cut
/// grows, and the whole word scores as its prefixes' chain (same session, one call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn string_prefix_scores_never_rise_as_a_cut_grows() -> anyhow::Result<()> {
    for i in 0..3 {
        let mut n = node(i).await?;
        let mut c = n.client().await?;
        let word = " the cat sat";
        let cuts: Vec<String> = word
            .char_indices()
            .skip(1)
            .map(|(k, _)| word[..k].to_owned())
            .chain([word.to_owned()])
            .collect();
        let r = c
            .score_candidates(pb::ScoreRequest {
                context: raw("once upon a time", "", ""),
                candidates: cuts.clone(),
                string_prefix: true,
                ends_answer: vec![],
            })
            .await?
            .into_inner();
        assert_eq!(r.scores.len(), cuts.len());
        let mut last = 0.0;
        for (cut, s) in cuts.iter().zip(&r.scores) {
            assert!(
                s.sum_logprob.is_finite() && s.sum_logprob <= 0.0,
                "{cut:?}: {}",
                s.sum_logprob
            );
            assert!(
                s.sum_logprob <= last + 1e-6,
                "node {i}, {cut:?}: {} after {last}",
                s.sum_logprob
            );
            assert_eq!(s.char_count as usize, cut.chars().count());
            last = s.sum_logprob;
        }
        n.stop().await?;
    }
    Ok(())
}

/// A conversation of `n` user messages of `bytes` bytes each.
fn many_messages(n: usize, bytes: usize) -> Option<pb::Context> {
    Some(pb::Context {
        rtd_lambda: None,
        session_id: String::new(),
        body: Some(pb::context::Body::Full(pb::FullContext {
            prompt: Some(pb::Prompt {
                kind: Some(pb::prompt::Kind::Conversation(pb::Conversation {
                    messages: vec![
                        pb::ChatMessage {
                            role: "user".into(),
                            content: "m".repeat(bytes),
                        };
                        n
                    ],
                })),
            }),
            answer: String::new(),
        })),
    })
}

/// Input past the size limits is refused before it is tokenized (no engine call), and requests
/// that cannot be decoded are the client's fault: INVALID_ARGUMENT, not INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_undecodable_requests_are_invalid_argument() -> anyhow::Result<()> {
    let mut n = node(0).await?;
    let ch = n.channel().await?;
    let mut c = pb::model_node_client::ModelNodeClient::new(ch.clone());
    let done = |i: pb::InfoResponse| i.calls_done;
    let before = done(c.info(pb::InfoRequest {}).await?.into_inner());
    let big = "x".repeat((256 << 10) + 1);
    for (ctx, names) in [
        (raw(&big, "", ""), "max_message_bytes"),
        (raw("hi", &big, ""), "max_message_bytes"),
        (many_messages(5, 250 << 10), "max_prompt_bytes"),
        (many_messages(1025, 1), "max_messages"),
    ] {
        let e = c.propose_segment(greedy(ctx, 2)).await.expect_err("over a limit");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(names), "{}", e.message());
    }
    // Over the gRPC message limit (4 MiB by default): refused before decoding.
    let e = c
        .propose_segment(greedy(raw(&"x".repeat(5 << 20), "", ""), 2))
        .await
        .expect_err("over max_request_bytes");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("max_request_bytes"), "{}", e.message());
    // A string field that is not UTF-8 (the session id of a CloseSession).
    #[derive(Clone, PartialEq, prost::Message)]
    struct Evil {
        #[prost(bytes = "vec", tag = "1")]
        session_id: Vec<u8>,
    }
    let mut g = tonic::client::Grpc::new(ch);
    g.ready().await?;
    let e = g
        .unary::<_, pb::CloseSessionResponse, _>(
            tonic::Request::new(Evil {
                session_id: vec![0xc3, 0x28],
            }),
            tonic::codegen::http::uri::PathAndQuery::from_static("/ensemble.v1.ModelNode/CloseSession"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("invalid UTF-8");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(done(c.info(pb::InfoRequest {}).await?.into_inner()), before);
    n.stop().await?;
    Ok(())
}

/// CloseSession is never refused for a full queue and never waits behind work: with a queue of 1
/// and a burst of long proposals that overflows it, every close in the burst succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_session_bypasses_a_full_queue() -> anyhow::Result<()> {
    let mut limits = common::limits();
    limits.queue = 1;
    let mut n = TestNode::start(common::model_args(&dirs()[0]), limits).await?;
    let ch = n.channel().await?;
    let mut c = pb::model_node_client::ModelNodeClient::new(ch.clone());
    for i in 0..6 {
        c.propose_segment(greedy(raw(&format!("kept {i}"), "", &format!("s{i}")), 1))
            .await?;
    }
    let mut work = Vec::new();
    for i in 0..12 {
        let mut c = c.clone();
        work.push(tokio::spawn(async move {
            c.propose_segment(greedy(raw(&format!("hello {i}"), "", ""), 200))
                .await
        }));
    }
    let mut closes = Vec::new();
    for i in 0..6 {
        let mut c = c.clone();
        closes.push(tokio::spawn(async move {
            c.close_session(pb::CloseSessionRequest {
                session_id: format!("s{i}"),
            })
            .await
        }));
    }
    for cl in closes {
        let r = cl
            .await?
            .map_err(|e| anyhow::anyhow!("a close was refused: {e:?}"))?;
        assert!(r.into_inner().existed);
    }
    let mut exhausted = 0;
    for w in work {
        if let Err(e) = w.await? {
            assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
            exhausted += 1;
        }
    }
    assert!(exhausted >= 1, "the burst never filled the queue");
    let info = c.info(pb::InfoRequest {}).await?.into_inner();
    assert_eq!(info.active_sessions, 0);
    n.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served_and_drain_flips_health() -> anyhow::Result<()> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let mut n = node(0).await?;
    let ch = n.channel().await?;
    let mut h = HealthClient::new(ch.clone());
    let st = h
        .check(HealthCheckRequest {
            service: "ensemble.v1.ModelNode".into(),
        })
        .await?
        .into_inner();
    assert_eq!(st.status(), ServingStatus::Serving);
    let mut watch = h
        .watch(HealthCheckRequest {
            service: "ensemble.v1.ModelNode".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        watch.message().await?.map(|m| m.status()),
        Some(ServingStatus::Serving)
    );

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut r = ServerReflectionClient::new(ch.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = r
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await?
        .into_inner();
    let Some(msg) = resp.message().await? else {
        anyhow::bail!("no reflection reply")
    };
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        anyhow::bail!("wrong reply")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"ensemble.v1.ModelNode"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    {
        use tonic_reflection::pb::v1alpha::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest,
        };
        let mut r = ServerReflectionClient::new(ch.clone());
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = r
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await?
            .into_inner();
        assert!(resp.message().await?.is_some());
    }

    // Drain: an in-flight call finishes; health reports NOT_SERVING to watchers.
    let mut c = pb::model_node_client::ModelNodeClient::new(ch.clone());
    let inflight = tokio::spawn(async move { c.propose_segment(greedy(raw("hello", "", ""), 400)).await });
    // Let the call reach the engine (a request sent after the drain starts is refused, by design).
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    n.stop().await?;
    let mut saw_not_serving = false;
    while let Ok(Some(m)) = watch.message().await {
        if m.status() == ServingStatus::NotServing {
            saw_not_serving = true;
            break;
        }
    }
    assert!(saw_not_serving);
    let done = inflight.await?;
    assert!(done.is_ok(), "in-flight call lost in drain: {done:?}");
    Ok(())
}

#[test]
fn broken_model_dirs_fail_with_the_file_named() -> anyhow::Result<()> {
    let root = common::temp_dir("broken");
    let good = common::model_dir(&root, "llama", "char", 9)?;
    let load = |dir: &std::path::Path| {
        model_node::node::load(&common::model_args(dir), &common::limits())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let copy = |name: &str| -> anyhow::Result<PathBuf> {
        let d = root.join(name);
        std::fs::create_dir_all(&d)?;
        for f in [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors",
        ] {
            std::fs::copy(good.join(f), d.join(f))?;
        }
        Ok(d)
    };
    let d = copy("no-config")?;
    std::fs::remove_file(d.join("config.json"))?;
    let e = load(&d);
    assert!(
        e.contains("config.json is missing") && e.contains("llama, qwen2, mistral, phi3, gemma2"),
        "{e}"
    );
    let d = copy("no-weights")?;
    std::fs::remove_file(d.join("model.safetensors"))?;
    assert!(load(&d).contains("model.safetensors"), "{}", load(&d));
    let d = copy("no-tokenizer")?;
    std::fs::remove_file(d.join("tokenizer.json"))?;
    assert!(load(&d).contains("tokenizer.json is missing"));
    let d = copy("bad-arch")?;
    std::fs::write(
        d.join("config.json"),
        r#"{"model_type":"gpt_neox","hidden_size":8,"intermediate_size":8,"vocab_size":8,"num_hidden_layers":1,"num_attention_heads":2}"#,
    )?;
    let e = load(&d);
    assert!(
        e.contains("unsupported architecture") && e.contains("gpt_neox") && e.contains("supported: llama"),
        "{e}"
    );
    let d = copy("bad-json")?;
    std::fs::write(d.join("config.json"), "{not json")?;
    assert!(load(&d).contains("config.json"));
    let d = copy("wrong-shapes")?;
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(good.join("config.json"))?)?;
    cfg["hidden_size"] = serde_json::json!(64);
    std::fs::write(d.join("config.json"), cfg.to_string())?;
    assert!(
        load(&d).contains("weights do not match config.json"),
        "{}",
        load(&d)
    );
    Ok(())
}

#[test]
fn delta_requests_do_not_grow_with_the_context() {
    use prost::Message;
    // What a client sends per step once the session exists: the same bytes at 100 and 10,000
    // characters of context (the base length is a varint: 2 vs 3 bytes at most).
    let size = |answer_chars: u64| {
        pb::NextCharRequest {
            context: delta("request-7", answer_chars, "x"),
            top_k: 8,
            max_hypotheses: None,
            lookahead: None,
        }
        .encoded_len()
    };
    assert_eq!(size(100), size(127));
    assert!(size(10_000) - size(100) <= 1, "{} vs {}", size(10_000), size(100));
    let full = |n: usize| {
        pb::NextCharRequest {
            context: raw("p", &"y".repeat(n), "request-7"),
            top_k: 8,
            max_hypotheses: None,
            lookahead: None,
        }
        .encoded_len()
    };
    assert!(
        full(10_000) > 100 * size(10_000),
        "the full context is what a delta avoids"
    );
}
