//! One request, one trace across processes: three `model-node` processes and a `coordinator`
//! process export OTLP to a real OTLP/gRPC receiver in this test, configured only by the standard
//! `OTEL_*` variables. The client's W3C `traceparent` is the root; every span of every process must
//! hang off it: client → `generate` → `round` → the node's `rpc` at the default level, with a
//! `node_rpc` span per coordinator call between the last two when `coordinator::node_client` logs at
//! `debug`, counted exactly.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::otlp::{Attr, attr};
use ensemble_proto::v1 as pb;
use opentelemetry_proto::tonic::trace::v1::Span;

fn model_node_binary() -> anyhow::Result<PathBuf> {
    let p = std::path::Path::new(env!("CARGO_BIN_EXE_coordinator"))
        .with_file_name(format!("model-node{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        p.exists(),
        "{} not built: run the tests with --workspace",
        p.display()
    );
    Ok(p)
}

/// The standard `OTEL_*` variables, and `log` as `RUST_LOG`.
fn otel(cmd: &mut tokio::process::Command, endpoint: &str, service: &str, log: &str) {
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_SERVICE_NAME", service)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("RUST_LOG", log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
}

fn terminate(child: &tokio::process::Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
}

/// A coordinator process over `members`, exporting as `service` at log level `log`; returns it and a
/// client once every node answers healthy.
async fn coordinator(
    members: &[String],
    endpoint: &str,
    service: &str,
    log: &str,
) -> anyhow::Result<(
    tokio::process::Child,
    pb::ensemble_client::EnsembleClient<tonic::transport::Channel>,
)> {
    let port = common::free_port()?;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_coordinator"));
    cmd.args(["serve", "--node", &members.join(",")]).args([
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--http-listen",
        "off",
    ]);
    otel(&mut cmd, endpoint, service, log);
    let child = cmd.spawn()?;
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if let Ok(mut c) = pb::ensemble_client::EnsembleClient::connect(url.clone()).await {
            let nodes = c.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes;
            if nodes.iter().all(|n| n.healthy) {
                return Ok((child, c));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("{service} did not come up")
}

/// One SpecFuse request under the client's trace `trace_id` / span `client_span`; its rounds.
async fn request(
    client: &mut pb::ensemble_client::EnsembleClient<tonic::transport::Channel>,
    trace_id: &str,
    client_span: &str,
) -> anyhow::Result<usize> {
    let mut req = tonic::Request::new(pb::GenerateRequest {
        prompt: Some(pb::Prompt {
            kind: Some(pb::prompt::Kind::Raw("The Tarn".into())),
        }),
        strategy: "specfuse".into(),
        max_chars: 12,
        specfuse: Some(pb::SpecFuseOptions {
            segment_tokens: Some(2),
            exit: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("traceparent", format!("00-{trace_id}-{client_span}-01").parse()?);
    let rounds = client.generate(req).await?.into_inner().steps as usize;
    anyhow::ensure!(rounds >= 1);
    Ok(rounds)
}

/// Two coordinators over the same three nodes: one at the default level (`info`: per request a
/// `generate` span, per round a `round` span, each node's `rpc` span under its round), one with the
/// coordinator's per-call spans on (`coordinator::node_client=debug`: a `node_rpc` span per call
/// between the round and the node's `rpc`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_request_is_one_trace_across_the_coordinator_and_every_node() -> anyhow::Result<()> {
    let (endpoint, received) = common::otlp::start().await?;

    let mut children = Vec::new();
    let mut members = Vec::new();
    for (i, dir) in common::three_model_dirs()?.into_iter().enumerate() {
        let port = common::free_port()?;
        let mut cmd = tokio::process::Command::new(model_node_binary()?);
        cmd.arg("serve").arg("--model-dir").arg(&dir).args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            "off",
        ]);
        otel(&mut cmd, &endpoint, &format!("node-{i}"), "info");
        children.push(cmd.spawn()?);
        members.push(format!("n{i}=http://127.0.0.1:{port}"));
    }
    let (plain, mut plain_client) = coordinator(&members, &endpoint, "coordinator", "info").await?;
    let (calls, mut calls_client) = coordinator(
        &members,
        &endpoint,
        "coordinator-calls",
        "info,coordinator::node_client=debug",
    )
    .await?;

    let client_span = "00f067aa0ba902b7";
    let (plain_trace, calls_trace) = (
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "5ce0e9a56015fec5aadfa328ae398115",
    );
    let plain_rounds = request(&mut plain_client, plain_trace, client_span).await?;
    let calls_rounds = request(&mut calls_client, calls_trace, client_span).await?;

    // Stopping flushes every exporter.
    for c in [&plain, &calls].into_iter().chain(&children) {
        terminate(c);
    }
    for c in [plain, calls].into_iter().chain(children) {
        tokio::time::timeout(Duration::from_secs(60), c.wait_with_output()).await??;
    }
    let all = received.spans();
    check(&all, plain_trace, client_span, "coordinator", plain_rounds, false)?;
    check(
        &all,
        calls_trace,
        client_span,
        "coordinator-calls",
        calls_rounds,
        true,
    )?;
    Ok(())
}

/// The trace `trace_id` of one SpecFuse request of `rounds` rounds to the coordinator `service`, with
/// (`per_call`) or without its `node_rpc` spans.
fn check(
    all: &[(String, Span)],
    trace_id: &str,
    client_span: &str,
    service: &str,
    rounds: usize,
    per_call: bool,
) -> anyhow::Result<()> {
    let spans: Vec<(String, Span)> = all
        .iter()
        .filter(|(_, s)| hex(&s.trace_id) == trace_id)
        .cloned()
        .collect();
    let of = |service: &str, name: &str| -> Vec<&Span> {
        spans
            .iter()
            .filter(|(sv, s)| sv == service && s.name == name)
            .map(|(_, s)| s)
            .collect()
    };
    let generate = of(service, "generate");
    assert_eq!(generate.len(), 1, "one request span: {:?}", names(&spans));
    let g = generate[0];
    assert_eq!(
        hex(&g.parent_span_id),
        client_span,
        "the client's span is the parent"
    );
    assert_eq!(
        attr(&g.attributes, "strategy")
            .and_then(|a| a.as_str().map(str::to_owned))
            .as_deref(),
        Some("specfuse")
    );
    let round_spans = of(service, "round");
    assert_eq!(round_spans.len(), rounds, "one span per round");
    assert!(round_spans.iter().all(|r| r.parent_span_id == g.span_id));
    assert!(
        round_spans
            .iter()
            .all(|r| matches!(attr(&r.attributes, "candidates"), Some(Attr::Int(n)) if n >= 1)),
        "{:?}",
        round_spans[0].attributes
    );
    let round_ids: Vec<&Vec<u8>> = round_spans.iter().map(|r| &r.span_id).collect();
    let rpc_of = |s: &Span| {
        attr(&s.attributes, "rpc")
            .and_then(|a| a.as_str().map(str::to_owned))
            .unwrap_or_default()
    };

    let calls = of(service, "node_rpc");
    if !per_call {
        assert!(calls.is_empty(), "no per-call spans at info: {:?}", names(&spans));
        for i in 0..3 {
            let served = of(&format!("node-{i}"), "rpc");
            let p = served.iter().filter(|s| rpc_of(s) == "ProposeSegment").count();
            assert_eq!(p, rounds, "node-{i} served one ProposeSegment per round");
            for s in &served {
                let in_round = round_ids.contains(&&s.parent_span_id);
                assert!(
                    in_round || (rpc_of(s) == "CloseSession" && s.parent_span_id == g.span_id),
                    "node-{i}'s {} span hangs off a round",
                    rpc_of(s)
                );
            }
        }
        return Ok(());
    }
    let proposes: Vec<&&Span> = calls.iter().filter(|c| rpc_of(c) == "ProposeSegment").collect();
    assert_eq!(proposes.len(), 3 * rounds, "every node proposes every round");
    for c in calls.iter().filter(|c| rpc_of(c) != "CloseSession") {
        assert!(
            round_ids.contains(&&c.parent_span_id),
            "a node call belongs to its round"
        );
    }
    let by_id: HashMap<&Vec<u8>, &Span> = calls.iter().map(|c| (&c.span_id, *c)).collect();
    for i in 0..3 {
        let served = of(&format!("node-{i}"), "rpc");
        let p = served.iter().filter(|s| rpc_of(s) == "ProposeSegment").count();
        assert_eq!(p, rounds, "node-{i} served one ProposeSegment per round");
        for s in &served {
            let parent = by_id.get(&s.parent_span_id);
            assert!(
                parent.is_some(),
                "node-{i}'s {} span hangs off a coordinator call",
                rpc_of(s)
            );
            assert_eq!(
                parent.map(|p| rpc_of(p)),
                Some(rpc_of(s)),
                "same method on both sides"
            );
            if rpc_of(s) == "ProposeSegment" {
                assert!(matches!(attr(&s.attributes, "computed_positions"), Some(Attr::Int(n)) if n >= 1));
            }
        }
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn names(spans: &[(String, Span)]) -> Vec<String> {
    spans.iter().map(|(sv, s)| format!("{sv}/{}", s.name)).collect()
}
