//! The node's Prometheus endpoint over real HTTP: every RPC counted by method and status code, the
//! work counters equal to the sums of the RPCs' own `Usage`, and the gauges following the sessions.

mod common;

use common::{TestNode, greedy, limits, model_args, model_dir, raw, sample};
use ensemble_proto::v1 as pb;

async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let r = reqwest::get(format!("http://{addr}/metrics")).await?;
    anyhow::ensure!(r.status() == 200, "status {}", r.status());
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    anyhow::ensure!(ct.starts_with("text/plain; version=0.0.4"), "content type {ct}");
    Ok(r.text().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_rpcs_codes_and_work_exactly() -> anyhow::Result<()> {
    let root = common::temp_dir("metrics");
    let dir = model_dir(&root, "llama", "byte_level", 7)?;
    let (mut node, maddr) = TestNode::start_with_metrics(model_args(&dir), limits()).await?;
    let mut c = node.client().await?;

    let before = scrape(maddr).await?;
    assert_eq!(sample(&before, "ensemble_node_sessions", &[]), Some(0.0));
    assert_eq!(
        sample(&before, "ensemble_node_forward_positions_total", &[]),
        Some(0.0)
    );
    assert!(sample(&before, "ensemble_node_info", &[("architecture", "llama")]) == Some(1.0));

    let p = c
        .propose_segment(greedy(raw("The Tarn", "", "m1"), 4))
        .await?
        .into_inner();
    let s = c
        .score_candidates(pb::ScoreRequest {
            context: raw("The Tarn", "", "m1"),
            candidates: vec![" flows".into(), " is".into(), " north".into()],
            string_prefix: false,
            ends_answer: vec![],
        })
        .await?
        .into_inner();
    let bad = c.propose_segment(greedy(None, 4)).await;
    assert_eq!(
        bad.map(|_| ()).map_err(|s| s.code()),
        Err(tonic::Code::InvalidArgument)
    );

    let text = scrape(maddr).await?;
    let ok = |rpc| {
        sample(
            &text,
            "ensemble_node_requests_total",
            &[("rpc", rpc), ("code", "OK")],
        )
    };
    assert_eq!(ok("ProposeSegment"), Some(1.0));
    assert_eq!(ok("ScoreCandidates"), Some(1.0));
    assert_eq!(
        sample(
            &text,
            "ensemble_node_requests_total",
            &[("rpc", "ProposeSegment"), ("code", "INVALID_ARGUMENT")]
        ),
        Some(1.0)
    );
    let (pu, su) = (p.usage.unwrap_or_default(), s.usage.unwrap_or_default());
    assert_eq!(
        sample(&text, "ensemble_node_forward_positions_total", &[]),
        Some(f64::from(pu.computed_positions + su.computed_positions))
    );
    assert_eq!(
        sample(&text, "ensemble_node_reused_positions_total", &[]),
        Some(f64::from(pu.reused_positions + su.reused_positions))
    );
    assert_eq!(
        sample(&text, "ensemble_node_forward_passes_total", &[]),
        Some(f64::from(pu.forward_passes + su.forward_passes))
    );
    assert_eq!(
        sample(&text, "ensemble_node_generated_tokens_total", &[]),
        Some(p.token_logprobs.len() as f64)
    );
    assert_eq!(
        sample(&text, "ensemble_node_scored_candidates_total", &[]),
        Some(3.0)
    );
    // Histograms: one observation per finished RPC (the failed one included).
    assert_eq!(
        sample(
            &text,
            "ensemble_node_request_duration_seconds_count",
            &[("rpc", "ProposeSegment")]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "ensemble_node_time_per_output_token_seconds_count", &[]),
        Some(1.0)
    );
    // The session m1 is held, with its KV cache.
    assert_eq!(sample(&text, "ensemble_node_sessions", &[]), Some(1.0));
    assert!(sample(&text, "ensemble_node_kv_cache_bytes", &[]).unwrap_or(0.0) > 0.0);
    assert_eq!(sample(&text, "ensemble_node_queue_depth", &[]), Some(0.0));

    c.close_session(pb::CloseSessionRequest {
        session_id: "m1".into(),
    })
    .await?;
    let text = scrape(maddr).await?;
    assert_eq!(sample(&text, "ensemble_node_sessions", &[]), Some(0.0));
    assert_eq!(sample(&text, "ensemble_node_kv_cache_bytes", &[]), Some(0.0));
    assert_eq!(
        sample(
            &text,
            "ensemble_node_requests_total",
            &[("rpc", "CloseSession"), ("code", "OK")]
        ),
        Some(1.0)
    );
    node.stop().await?;
    Ok(())
}
