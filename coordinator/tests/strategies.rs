//! SpecFuse and CharED over three real model nodes on 127.0.0.1 (tiny random models of different architectures
//! and tokenizers): exact call counts per round, and a node that dies mid-request does not fail it.

mod common;

use std::time::Duration;

use common::{Node, three_nodes};

use coordinator::chared::chared;
use coordinator::specfuse::specfuse;
use coordinator::strategy::{Finish, Limits};
use coordinator::{CharedParams, NodeClient, SpecFuseParams};
use ensemble_proto::v1 as pb;

async fn clients(nodes: &[Node], session: &str) -> anyhow::Result<Vec<NodeClient>> {
    let mut out = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let ch = tonic::transport::Endpoint::from_shared(n.url.clone())?
            .connect()
            .await?;
        let mut c = NodeClient::new(format!("node{i}"), ch, Duration::from_secs(30));
        c.begin(
            session,
            pb::Prompt {
                kind: Some(pb::prompt::Kind::Raw("the cat sat on".into())),
            },
        );
        out.push(c);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_round_makes_one_propose_and_one_score_call_per_active_node() -> anyhow::Result<()> {
    let nodes = three_nodes().await?;
    let mut cs = clients(&nodes, "count").await?;
    let params = SpecFuseParams {
        segment_tokens: 4,
        ..SpecFuseParams::default()
    };
    let limits = Limits {
        max_chars: 60,
        stop: vec![],
    };
    let a = specfuse(&mut cs, params, &limits, pb::Sampling::default(), &mut |_| true).await?;
    assert!(!a.rounds.is_empty());
    assert!(a.failed.is_empty(), "{:?}", a.failed);
    // A node is called in every round it starts active; `active` is recorded per round.
    for (i, c) in cs.iter().enumerate() {
        let rounds_active = a.rounds.iter().filter(|r| r.active.contains(&i)).count() as u64;
        let (propose, score, chars) = c.calls();
        assert_eq!(propose, rounds_active, "node {i}");
        // Score calls happen in rounds with candidates; every round here had some.
        assert_eq!(score, rounds_active, "node {i}");
        assert_eq!(chars, 0);
    }
    let total_active: usize = a.rounds.iter().map(|r| r.active.len()).sum();
    assert!((a.mean_active - total_active as f64 / a.rounds.len() as f64).abs() < 1e-9);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_dies_mid_request_does_not_fail_it() -> anyhow::Result<()> {
    let mut nodes = three_nodes().await?;
    let mut cs = clients(&nodes, "kill").await?;
    // Kill node 1 right away: its server stops; the request must finish with the others.
    if let Some(tx) = nodes[1].stop.take() {
        let _ = tx.send(());
    }
    let _ = (&mut nodes[1].task).await;
    let params = SpecFuseParams {
        segment_tokens: 4,
        ..SpecFuseParams::default()
    };
    let limits = Limits {
        max_chars: 30,
        stop: vec![],
    };
    let a = specfuse(&mut cs, params, &limits, pb::Sampling::default(), &mut |_| true).await?;
    assert_eq!(a.failed.len(), 1, "{:?}", a.failed);
    assert_eq!(a.failed[0].0, 1);
    assert!(!a.text.is_empty());
    assert!(a.rounds.iter().skip(1).all(|r| !r.active.contains(&1)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chared_averages_three_tokenizers_one_call_per_node_per_character() -> anyhow::Result<()> {
    let nodes = three_nodes().await?;
    let mut cs = clients(&nodes, "chars").await?;
    let limits = Limits {
        max_chars: 12,
        stop: vec![],
    };
    let a = chared(&mut cs, CharedParams::default(), &limits, &mut |_| true).await?;
    assert!(a.failed.is_empty(), "{:?}", a.failed);
    assert_eq!(
        a.steps.len(),
        a.text.chars().count() + usize::from(a.finish == Finish::Eos)
    );
    for c in &cs {
        assert_eq!(c.calls(), (0, 0, a.steps.len() as u64));
    }
    // Each step's shares of the chosen outcome sum to 1 over the nodes that contributed.
    for s in &a.steps {
        let total: f64 = s.shares.iter().map(|x| x.share).sum();
        assert!((total - 1.0).abs() < 1e-9, "{total}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_stops_and_frees_node_sessions() -> anyhow::Result<()> {
    let nodes = three_nodes().await?;
    let mut cs = clients(&nodes, "cancel-me").await?;
    let params = SpecFuseParams {
        segment_tokens: 4,
        ..SpecFuseParams::default()
    };
    let limits = Limits {
        max_chars: 500,
        stop: vec![],
    };
    // The client goes away after the first round.
    let mut rounds = 0;
    let r = specfuse(&mut cs, params, &limits, pb::Sampling::default(), &mut |_| {
        rounds += 1;
        rounds < 2
    })
    .await;
    assert!(matches!(r, Err(coordinator::Error::Cancelled)), "{:?}", r.err());
    assert_eq!(cs[0].calls().0, 2, "stopped after the second round");
    for n in &nodes {
        let mut c = pb::model_node_client::ModelNodeClient::connect(n.url.clone()).await?;
        let closed = c
            .close_session(pb::CloseSessionRequest {
                session_id: "cancel-me".into(),
            })
            .await?
            .into_inner();
        assert!(
            !closed.existed,
            "the node still held the cancelled request's session"
        );
    }
    Ok(())
}
