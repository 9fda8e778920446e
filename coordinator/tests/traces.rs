//! One request, one trace across processes: three `model-node` processes and a `coordinator`
//! process export OTLP to a real OTLP/gRPC receiver in this test, configured only by the standard
//! `OTEL_*` variables. The client's W3C `traceparent` is the root; every span of every process must
//! hang off it: client → `generate` → `round` → `node_rpc` → the node's `rpc`, one node RPC span per
//! coordinator call, counted exactly.

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

fn otel(cmd: &mut tokio::process::Command, endpoint: &str, service: &str) {
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_SERVICE_NAME", service)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("RUST_LOG", "info")
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
        otel(&mut cmd, &endpoint, &format!("node-{i}"));
        children.push(cmd.spawn()?);
        members.push(format!("n{i}=http://127.0.0.1:{port}"));
    }
    let port = common::free_port()?;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_coordinator"));
    cmd.args(["serve", "--node", &members.join(",")]).args([
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--http-listen",
        "off",
    ]);
    otel(&mut cmd, &endpoint, "coordinator");
    let coordinator = cmd.spawn()?;

    // Wait until the coordinator and its nodes answer.
    let url = format!("http://127.0.0.1:{port}");
    let mut client = None;
    for _ in 0..200 {
        if let Ok(mut c) = pb::ensemble_client::EnsembleClient::connect(url.clone()).await {
            let nodes = c.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes;
            if nodes.iter().all(|n| n.healthy) {
                client = Some(c);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut client = client.ok_or_else(|| anyhow::anyhow!("the cluster did not come up"))?;

    let (trace_id, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
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
    let answer = client.generate(req).await?.into_inner();
    let rounds = answer.steps as usize;
    assert!(rounds >= 1);

    // Stopping flushes every exporter.
    terminate(&coordinator);
    for c in &children {
        terminate(c);
    }
    tokio::time::timeout(Duration::from_secs(60), coordinator.wait_with_output()).await??;
    for c in children {
        tokio::time::timeout(Duration::from_secs(60), c.wait_with_output()).await??;
    }

    let spans: Vec<(String, Span)> = received
        .spans()
        .into_iter()
        .filter(|(_, s)| hex(&s.trace_id) == trace_id)
        .collect();
    let of = |service: &str, name: &str| -> Vec<&Span> {
        spans
            .iter()
            .filter(|(sv, s)| sv == service && s.name == name)
            .map(|(_, s)| s)
            .collect()
    };
    let generate = of("coordinator", "generate");
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
    let round_spans = of("coordinator", "round");
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

    let calls = of("coordinator", "node_rpc");
    let rpc_of = |s: &Span| {
        attr(&s.attributes, "rpc")
            .and_then(|a| a.as_str().map(str::to_owned))
            .unwrap_or_default()
    };
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
