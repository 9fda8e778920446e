//! The `Ensemble` gRPC service over three real model nodes: every strategy answers, and the bad-request
//! matrix gets INVALID_ARGUMENT with a message naming the problem; all nodes down is UNAVAILABLE.

mod common;

use std::time::{Duration, Instant};

use coordinator::Step;
use coordinator::service::{Coordinator, EnsembleService, NodeSpec};
use ensemble_proto::v1 as pb;
use ensemble_proto::v1::ensemble_client::EnsembleClient;
use ensemble_proto::v1::ensemble_server::EnsembleServer;
use tonic::Code;

async fn serve(
    nodes: Vec<NodeSpec>,
) -> anyhow::Result<(
    EnsembleClient<tonic::transport::Channel>,
    tokio::sync::oneshot::Sender<()>,
)> {
    let coordinator = Coordinator::new(nodes, Duration::from_secs(20)).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EnsembleServer::new(EnsembleService::new(coordinator)))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
                let _ = rx.await;
            }),
    );
    Ok((EnsembleClient::connect(url).await?, tx))
}

/// The nodes as members n0, n1, ... of weight 1.
fn specs(nodes: &[common::Node]) -> Vec<NodeSpec> {
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| NodeSpec {
            name: format!("n{i}"),
            url: n.url.clone(),
            weight: 1.0,
        })
        .collect()
}

fn request(strategy: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::Prompt {
            kind: Some(pb::prompt::Kind::Raw("the cat".into())),
        }),
        strategy: strategy.into(),
        max_chars: 16,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_answers_and_bad_requests_are_invalid_argument() -> anyhow::Result<()> {
    let nodes = common::three_nodes().await?;
    let (mut c, _stop) = serve(specs(&nodes)).await?;
    for s in ["specfuse", "chared", "single:n1", ""] {
        let r = c.generate(request(s)).await?.into_inner();
        assert!(
            !r.text.is_empty() || r.finish_reason() == pb::FinishReason::Eos,
            "{s}: {r:?}"
        );
        assert!(r.text.chars().count() <= 16);
        assert!(r.steps >= 1);
        assert!(r.failed_nodes.is_empty());
    }
    let list = c.list_nodes(pb::ListNodesRequest {}).await?.into_inner();
    assert_eq!(list.nodes.len(), 3);
    assert!(list.nodes.iter().all(|n| n.healthy && n.info.is_some()));

    let check = |r: Result<tonic::Response<pb::GenerateResponse>, tonic::Status>, needle: &str| {
        let e = r.expect_err(needle);
        assert_eq!(e.code(), Code::InvalidArgument, "{needle}: {}", e.message());
        assert!(
            e.message().contains(needle),
            "{needle:?} not in {:?}",
            e.message()
        );
    };
    check(c.generate(request("beam")).await, "unknown strategy");
    check(c.generate(request("single:nope")).await, "unknown node");
    let mut r = request("specfuse");
    r.specfuse = Some(pb::SpecFuseOptions {
        weights: vec![1.0, 0.0, 1.0],
        ..Default::default()
    });
    check(c.generate(r).await, "weights");
    let mut r = request("chared");
    r.chared = Some(pb::CharEdOptions {
        weights: vec![1.0, -1.0, 1.0],
        ..Default::default()
    });
    check(c.generate(r).await, "weights");
    let mut r = request("specfuse");
    r.prompt = None;
    check(c.generate(r).await, "prompt is required");
    let mut r = request("specfuse");
    r.max_chars = 0;
    check(c.generate(r).await, "max_chars");
    let mut r = request("specfuse");
    r.specfuse = Some(pb::SpecFuseOptions {
        exit_delta: Some(1.5),
        ..Default::default()
    });
    check(c.generate(r).await, "exit.delta");

    // The client's mistakes get the same INVALID_ARGUMENT from every strategy, checked before any node
    // is called (CharED samples in the coordinator and would not ask the nodes) or passed on from the
    // nodes when every one of them refuses the request.
    let calls_before: u64 = loads(&nodes).await?.iter().map(|l| l.1).sum();
    for s in ["specfuse", "chared", "single:n1"] {
        for (sampling, needle) in [
            (
                pb::Sampling {
                    temperature: -1.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                pb::Sampling {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                pb::Sampling {
                    temperature: 1.0,
                    top_p: Some(0.0),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                pb::Sampling {
                    temperature: 1.0,
                    top_k: Some(0),
                    ..Default::default()
                },
                "top_k",
            ),
        ] {
            let mut r = request(s);
            r.sampling = Some(sampling);
            check(c.generate(r).await, needle);
        }
    }
    let calls_after: u64 = loads(&nodes).await?.iter().map(|l| l.1).sum();
    assert_eq!(calls_after, calls_before, "bad sampling reached a node");
    for s in ["specfuse", "chared", "single:n1"] {
        let mut r = request(s);
        // Far past every member's 512-token context.
        r.prompt = Some(pb::Prompt {
            kind: Some(pb::prompt::Kind::Raw("the cat sat on the mat. ".repeat(200))),
        });
        check(c.generate(r).await, "context too long");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_nodes_down_is_unavailable_fast() -> anyhow::Result<()> {
    // Ports that were just free: nothing listens there.
    let mut specs = Vec::new();
    for i in 0..3 {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        specs.push(NodeSpec {
            name: format!("n{i}"),
            url: format!("http://{}", l.local_addr()?),
            weight: 1.0,
        });
    }
    let (mut c, _stop) = serve(specs).await?;
    for s in ["specfuse", "chared"] {
        let t0 = Instant::now();
        let e = c.generate(request(s)).await.expect_err("no node");
        assert_eq!(e.code(), Code::Unavailable, "{s}: {}", e.message());
        for i in 0..3 {
            assert!(
                e.message().contains(&format!("n{i}")),
                "{s}: failed node n{i} not named: {}",
                e.message()
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{s}: took {:?}",
            t0.elapsed()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_stream_sends_deltas_and_a_trace_of_every_step() -> anyhow::Result<()> {
    let nodes = common::three_nodes().await?;
    let (mut c, _stop) = serve(specs(&nodes)).await?;
    for s in ["specfuse", "chared"] {
        let mut stream = c.generate_stream(request(s)).await?.into_inner();
        let (mut deltas, mut traces, mut done) = (String::new(), 0u32, None);
        while let Some(ev) = stream.message().await? {
            match ev.event {
                Some(pb::generate_event::Event::Delta(d)) => deltas.push_str(&d),
                Some(pb::generate_event::Event::Round(r)) => {
                    traces += 1;
                    assert_eq!(r.round, u64::from(traces));
                    assert!(!r.active.is_empty() && !r.verifiers.is_empty(), "{r:?}");
                    assert!(r.candidates.iter().any(|c| c.text == r.winner_text));
                }
                Some(pb::generate_event::Event::Char(ch)) => {
                    traces += 1;
                    let total: f64 = ch.shares.iter().map(|s| s.share).sum();
                    assert!((total - 1.0).abs() < 1e-9);
                }
                Some(pb::generate_event::Event::Done(d)) => done = Some(d),
                Some(pb::generate_event::Event::Span(_) | pb::generate_event::Event::Stage(_)) => {
                    anyhow::bail!("{s}: spans and stages are Co-LLM's and pipelines'")
                }
                None => anyhow::bail!("empty event"),
            }
        }
        let done = done.ok_or_else(|| anyhow::anyhow!("{s}: no summary"))?;
        assert_eq!(done.steps, traces, "{s}");
        assert!(
            deltas.starts_with(&done.text),
            "{s}: {deltas:?} vs {:?}",
            done.text
        );
    }
    Ok(())
}

/// Each node's (sessions held, engine calls done), from `Info`.
async fn loads(nodes: &[common::Node]) -> anyhow::Result<Vec<(u32, u64)>> {
    let mut out = Vec::new();
    for n in nodes {
        let mut c = pb::model_node_client::ModelNodeClient::connect(n.url.clone()).await?;
        let i = c.info(pb::InfoRequest {}).await?.into_inner();
        out.push((i.active_sessions, i.calls_done));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_stops_node_work_and_frees_every_session() -> anyhow::Result<()> {
    let nodes = common::three_nodes().await?;
    let (mut c, _stop) = serve(specs(&nodes)).await?;
    for s in ["specfuse", "chared"] {
        let mut req = request(s);
        req.max_chars = 400;
        // Short drafts: many rounds, so that the few a dropped stream still runs are a small share.
        req.specfuse = Some(pb::SpecFuseOptions {
            segment_tokens: Some(2),
            exit: Some(false),
            ..Default::default()
        });
        // The whole request, unary (greedy, so the stream below would take the same steps): how
        // much node work it takes when nobody cancels.
        let before = loads(&nodes).await?;
        let full = c.generate(req.clone()).await?.into_inner();
        let after = loads(&nodes).await?;
        let full_calls: u64 = after.iter().zip(&before).map(|(a, b)| a.1 - b.1).sum();
        assert!(
            full.steps >= 12,
            "{s}: only {} steps; the test needs a long answer",
            full.steps
        );
        assert!(
            after.iter().all(|l| l.0 == 0),
            "{s}: a finished request left sessions: {after:?}"
        );

        // The same request streamed; the client reads one event and goes away.
        let before = loads(&nodes).await?;
        let mut stream = c.generate_stream(req).await?.into_inner();
        let first = stream.message().await?.and_then(|e| e.event);
        assert!(
            !matches!(first, Some(pb::generate_event::Event::Done(_)) | None),
            "{s}: {first:?}"
        );
        drop(stream);
        // Wait (bounded) for the coordinator to notice and close the sessions.
        let mut now = loads(&nodes).await?;
        for _ in 0..200 {
            if now.iter().all(|l| l.0 == 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
            now = loads(&nodes).await?;
        }
        assert!(
            now.iter().all(|l| l.0 == 0),
            "{s}: sessions left after the client went away: {now:?}"
        );
        let cancelled_calls: u64 = now.iter().zip(&before).map(|(a, b)| a.1 - b.1).sum();
        assert!(
            cancelled_calls * 3 < full_calls,
            "{s}: the dropped stream cost {cancelled_calls} node calls, the whole request {full_calls}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_node_costs_one_deadline_then_none_once_ejected() -> anyhow::Result<()> {
    let nodes = common::three_nodes().await?;
    // A member that accepts connections (the kernel's backlog) and never answers: a hung process.
    let hole = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mut members = specs(&nodes[..2]);
    members.push(NodeSpec {
        name: "hung".into(),
        url: format!("http://{}", hole.local_addr()?),
        weight: 1.0,
    });
    let deadline = Duration::from_secs(3);
    let coordinator = Coordinator::new(members, deadline).await?;
    for s in ["specfuse", "chared"] {
        let t0 = Instant::now();
        let r = coordinator
            .run(request(s), &mut |_| true)
            .await
            .map_err(|e| anyhow::anyhow!("{s}: {e}"))?;
        let took = t0.elapsed();
        assert_eq!(r.failed_nodes, vec!["hung".to_string()], "{s}");
        if s == "specfuse" {
            // One deadline for the call that hung; closing its session waits at most 0.5 s more.
            // Before, the close waited a whole second deadline (>= 6 s).
            assert!(
                took < deadline * 2 - Duration::from_millis(500),
                "{s}: took {took:?}"
            );
        } else {
            // The hung member was ejected: the next request skips it and pays no deadline.
            assert!(
                took < deadline / 2,
                "{s}: took {took:?} with the hung node ejected"
            );
        }
    }
    let m = coordinator.metrics().render();
    assert_eq!(
        common::sample(&m, "ensemble_node_ejections_total", &[("node", "hung")]),
        Some(1.0)
    );
    // The healthy members hold no session after the requests that the hung one slowed down.
    assert_eq!(
        loads(&nodes[..2]).await?.iter().map(|l| l.0).collect::<Vec<_>>(),
        vec![0, 0]
    );
    drop(hole);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_fills_the_context_ends_with_length_and_keeps_its_text() -> anyhow::Result<()> {
    // Three members with a 40-token context: a long answer reaches it.
    let mut nodes = Vec::new();
    for dir in common::three_model_dirs()? {
        let mut args = common::model_args(dir);
        args.max_context = Some(40);
        let opts = model_node::server::ServeOptions {
            grace: Duration::from_secs(1),
            ..Default::default()
        };
        nodes.push(common::start_model(args, opts).await?);
    }
    let (mut c, _stop) = serve(specs(&nodes)).await?;
    let mut lengths = 0;
    for s in ["specfuse", "chared", "single:n1"] {
        let mut r = request(s);
        r.max_chars = 2000;
        r.specfuse = Some(pb::SpecFuseOptions {
            segment_tokens: Some(4),
            exit: Some(false),
            ..Default::default()
        });
        // Greedy random models may end early with EOS; what must never happen is an error.
        let a = c
            .generate(r)
            .await
            .map_err(|e| anyhow::anyhow!("{s}: {e:?}"))?
            .into_inner();
        eprintln!(
            "{s}: {:?} after {} chars",
            a.finish_reason(),
            a.text.chars().count()
        );
        if a.finish_reason() == pb::FinishReason::Length {
            lengths += 1;
            assert!(!a.text.is_empty(), "{s}");
            assert!(
                a.text.chars().count() < 2000,
                "{s}: ended by the context, not max_chars"
            );
        }
        // Streamed: the same, and the deltas add up to the answer.
        let mut r = request(s);
        r.max_chars = 2000;
        let mut stream = c.generate_stream(r).await?.into_inner();
        let mut deltas = String::new();
        let mut done = None;
        while let Some(e) = stream
            .message()
            .await
            .map_err(|e| anyhow::anyhow!("{s} stream: {e:?}"))?
        {
            match e.event {
                Some(pb::generate_event::Event::Delta(d)) => deltas.push_str(&d),
                Some(pb::generate_event::Event::Done(d)) => done = Some(d),
                _ => {}
            }
        }
        let done = done.ok_or_else(|| anyhow::anyhow!("{s}: no final event"))?;
        if !s.starts_with("single:") {
            // (`single:NAME` streams send no text deltas yet, only the final answer.)
            assert!(
                deltas.starts_with(&done.text),
                "{s}: {deltas:?} vs {:?}",
                done.text
            );
        }
    }
    assert_eq!(lengths, 3, "every strategy ends at the context limit with LENGTH");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn specfuse_with_string_prefix_scoring_answers_with_finite_scores() -> anyhow::Result<()> {
    let nodes = common::three_nodes().await?;
    let coordinator = Coordinator::new(specs(&nodes), Duration::from_secs(20)).await?;
    let mut r = request("specfuse");
    r.max_chars = 24;
    r.specfuse = Some(pb::SpecFuseOptions {
        segment_tokens: Some(2),
        string_prefix: Some(true),
        exit: Some(false),
        ..Default::default()
    });
    let mut verified = 0;
    let resp = coordinator
        .run(r, &mut |s| {
            let Step::Round(o) = s else { return true };
            for v in &o.verifiers {
                for s in &v.scores {
                    assert!(s.is_finite() && *s <= 0.0, "{s}");
                    verified += 1;
                }
            }
            true
        })
        .await?;
    assert!(resp.steps >= 1 && verified >= 3, "{resp:?}");
    Ok(())
}
