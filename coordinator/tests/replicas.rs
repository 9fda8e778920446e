//! A member with two replicas behind one DNS name (a resolver that answers with two real nodes on
//! loopback, as a headless Service would): requests are spread over both, and when one replica dies the
//! member stays in the ensemble — its calls are retried on the other replica.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use coordinator::config::{Discovery, NodeConfig, Settings};
use coordinator::replicas::Resolve;
use coordinator::service::Coordinator;
use ensemble_proto::v1 as pb;

struct TwoReplicas(Vec<SocketAddr>);

impl Resolve for TwoReplicas {
    fn resolve(
        &self,
        host: String,
        _port: u16,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>> {
        let v = if host == "model-a.headless" {
            self.0.clone()
        } else {
            vec![]
        };
        Box::pin(async move { Ok(v) })
    }
}

fn addr(url: &str) -> anyhow::Result<SocketAddr> {
    Ok(url.trim_start_matches("http://").parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_survives_losing_one_of_its_replicas() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("replicas-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let dir = model_node::fixtures::tiny_model_dir(&root, "llama", "byte_level", 3)?;
    let other = model_node::fixtures::tiny_model_dir(&root, "qwen2", "sentencepiece", 4)?;
    let mut r1 = common::start(dir.clone()).await?;
    let r2 = common::start(dir).await?;
    let b = common::start(other).await?;
    let resolver = Arc::new(TwoReplicas(vec![addr(&r1.url)?, addr(&r2.url)?]));
    let mut settings = Settings::new(vec![
        NodeConfig {
            name: "a".into(),
            url: "http://model-a.headless:50051".into(),
            weight: 1.0,
            discovery: Discovery::Dns,
            dns_refresh_ms: 60_000,
            model_dir: None,
            node_args: vec![],
        },
        NodeConfig {
            name: "b".into(),
            url: b.url.clone(),
            weight: 1.0,
            discovery: Discovery::Static,
            dns_refresh_ms: 5000,
            model_dir: None,
            node_args: vec![],
        },
    ]);
    settings.deadline = Duration::from_secs(20);
    settings.retries = 1;
    let c = Coordinator::start(settings, resolver).await?;
    let req = || pb::GenerateRequest {
        prompt: Some(pb::Prompt {
            kind: Some(pb::prompt::Kind::Raw("the cat".into())),
        }),
        strategy: "specfuse".into(),
        max_chars: 12,
        ..Default::default()
    };
    for _ in 0..2 {
        let r = c.run(req(), &mut |_| true).await?;
        assert!(r.failed_nodes.is_empty(), "{:?}", r.failed_nodes);
    }
    // Replica 1 goes away (the DNS answer still lists it, as during a pod's termination).
    if let Some(tx) = r1.stop.take() {
        let _ = tx.send(());
    }
    let _ = (&mut r1.task).await;
    for _ in 0..4 {
        let r = c.run(req(), &mut |_| true).await?;
        assert!(
            r.failed_nodes.is_empty(),
            "member a must fail over to replica 2: {:?}",
            r.failed_nodes
        );
        assert!(!r.text.is_empty());
    }
    drop(r2);
    Ok(())
}
