//! Continuous batching over real gRPC: concurrent `ProposeSegment` calls share batched decode passes
//! and give what the same calls give one by one — the same tokens, text, finish reason and every
//! token's log-probability, bit for bit (in steps of up to 32 sequences a row's products, attention
//! and norms never depend on its batch mates) — on every architecture;
//! the passes are counted exactly; scores that arrive while proposals run share their passes and
//! give what they give alone, bit for bit; a proposal that can never fit the KV budget is refused at
//! once with `RESOURCE_EXHAUSTED`.

mod common;

use common::{TestNode, limits, model_args, model_dir, raw, sample};
use ensemble_proto::v1 as pb;

async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    Ok(reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .text()
        .await?)
}

/// 16 different proposals: prompts, lengths, greedy or seeded sampling, some with a stop string.
fn requests() -> Vec<pb::ProposeRequest> {
    (0..16u32)
        .map(|i| pb::ProposeRequest {
            context: raw(
                &format!("Story {i}: the river"),
                if i % 3 == 0 { " and" } else { "" },
                "",
            ),
            max_new_tokens: 3 + (i * 7) % 23,
            stop: if i % 5 == 4 { vec!["e".into()] } else { vec![] },
            sampling: Some(if i % 2 == 0 {
                pb::Sampling::default()
            } else {
                pb::Sampling {
                    temperature: 0.9,
                    top_p: Some(0.95),
                    top_k: None,
                    seed: Some(u64::from(i)),
                }
            }),
            defer_threshold: None,
        })
        .collect()
}

/// Same text, finish and token count; log-probabilities within 1e-5.
fn same(a: &pb::ProposeResponse, b: &pb::ProposeResponse) -> bool {
    a.text == b.text
        && a.finish_reason == b.finish_reason
        && a.token_logprobs.len() == b.token_logprobs.len()
        && a.token_logprobs
            .iter()
            .zip(&b.token_logprobs)
            .all(|(x, y)| x == y)
}

/// Decode passes a proposal feeds: one per token but the last.
fn feeds(r: &pb::ProposeResponse) -> u64 {
    r.token_logprobs.len().saturating_sub(1) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_proposals_are_batched_and_identical_to_one_by_one() -> anyhow::Result<()> {
    let root = common::temp_dir("batching");
    for (i, (arch, kind)) in [
        ("llama", "byte_level"),
        ("qwen2", "sentencepiece"),
        ("phi3", "char"),
        ("gemma2", "byte_level"),
        ("mistral", "sentencepiece"),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = model_dir(&root.join(arch), arch, kind, 40 + i as u64)?;
        let (mut node, maddr) = TestNode::start_with_metrics(model_args(&dir), limits()).await?;
        let mut c = node.client().await?;

        // One by one: every decode step is a batch of one.
        let mut alone = Vec::new();
        let mut fed = 0;
        for r in requests() {
            let p = c.propose_segment(r).await?.into_inner();
            fed += feeds(&p);
            alone.push(p);
        }
        let m = scrape(maddr).await?;
        let steps = sample(&m, "ensemble_node_decode_steps_total", &[]);
        let rows = sample(&m, "ensemble_node_decode_rows_total", &[]);
        assert_eq!(steps, Some(fed as f64), "{arch}: one pass per fed token");
        assert_eq!(rows, Some(fed as f64), "{arch}");

        // All at once, on separate connections.
        let calls = requests().into_iter().map(|r| {
            let addr = node.addr;
            async move {
                let mut c = pb::model_node_client::ModelNodeClient::connect(format!("http://{addr}")).await?;
                anyhow::Ok(c.propose_segment(r).await?.into_inner())
            }
        });
        let together: Vec<pb::ProposeResponse> = futures_join(calls).await?;
        for (k, (a, b)) in alone.iter().zip(&together).enumerate() {
            assert!(
                same(a, b),
                "{arch}: request {k} differs when batched:\n{a:?}\n{b:?}"
            );
        }
        let m = scrape(maddr).await?;
        let steps2 = sample(&m, "ensemble_node_decode_steps_total", &[]).unwrap_or(0.0) - fed as f64;
        let rows2 = sample(&m, "ensemble_node_decode_rows_total", &[]).unwrap_or(0.0) - fed as f64;
        assert_eq!(rows2, fed as f64, "{arch}: every fed token is one row");
        assert!(
            steps2 < rows2,
            "{arch}: concurrent proposals shared no pass ({steps2} steps for {rows2} rows)"
        );
        node.stop().await?;
    }
    Ok(())
}

/// Runs the calls concurrently, in order.
async fn futures_join<F>(calls: impl Iterator<Item = F>) -> anyhow::Result<Vec<pb::ProposeResponse>>
where
    F: std::future::Future<Output = anyhow::Result<pb::ProposeResponse>> + Send + 'static,
{
    let handles: Vec<_> = calls.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await??);
    }
    Ok(out)
}

/// Six scores of three candidates each (words, a partial word, a candidate of one token).
fn score_requests() -> Vec<pb::ScoreRequest> {
    (0..6u32)
        .map(|i| pb::ScoreRequest {
            context: raw(
                &format!("Tale {i}: a small boat"),
                if i % 2 == 0 { " went" } else { "" },
                "",
            ),
            candidates: vec![" down the river".into(), format!(" and {i} fish"), "s".into()],
            string_prefix: false,
            ends_answer: vec![],
        })
        .collect()
}

/// Every candidate's score and token count, as bits.
fn score_bits(r: &pb::ScoreResponse) -> Vec<(u64, u32)> {
    r.scores
        .iter()
        .map(|s| (s.sum_logprob.to_bits(), s.token_count))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scores_during_proposals_share_their_passes_and_match_scores_alone() -> anyhow::Result<()> {
    let root = common::temp_dir("score-merge");
    for (i, (arch, kind)) in [
        ("llama", "byte_level"),
        ("gemma2", "byte_level"),
        ("qwen2", "sentencepiece"),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = model_dir(&root.join(arch), arch, kind, 60 + i as u64)?;
        let (mut node, maddr) = TestNode::start_with_metrics(model_args(&dir), limits()).await?;
        let mut c = node.client().await?;
        let mut alone = Vec::new();
        for r in score_requests() {
            alone.push(score_bits(&c.score_candidates(r).await?.into_inner()));
        }
        let m = scrape(maddr).await?;
        let before = sample(&m, "ensemble_node_decode_merged_score_rows_total", &[]).unwrap_or(0.0);
        assert_eq!(
            before, 0.0,
            "{arch}: no proposal ran, so no score shared a decode pass"
        );

        // The same scores again and again while 8 long proposals decode, until some shared a pass.
        let mut merged = 0.0;
        for _round in 0..5 {
            let addr = node.addr;
            let calls = requests().into_iter().take(8).map(move |mut r| {
                r.max_new_tokens = 48;
                r.stop.clear();
                async move {
                    let mut c =
                        pb::model_node_client::ModelNodeClient::connect(format!("http://{addr}")).await?;
                    anyhow::Ok(c.propose_segment(r).await?.into_inner())
                }
            });
            let proposals = tokio::spawn(futures_join(calls));
            while !proposals.is_finished() {
                for (k, r) in score_requests().into_iter().enumerate() {
                    let got = score_bits(&c.score_candidates(r).await?.into_inner());
                    assert_eq!(got, alone[k], "{arch}: score request {k} differs beside decodes");
                }
            }
            proposals.await??;
            let m = scrape(maddr).await?;
            merged = sample(&m, "ensemble_node_decode_merged_score_rows_total", &[]).unwrap_or(0.0);
            if merged > 0.0 {
                break;
            }
        }
        assert!(
            merged > 0.0,
            "{arch}: no score shared a decode pass in five rounds"
        );
        node.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_that_can_never_fit_the_kv_budget_is_refused_at_once() -> anyhow::Result<()> {
    let root = common::temp_dir("kvbudget");
    let dir = model_dir(&root, "llama", "byte_level", 3)?;
    let mut lim = limits();
    lim.kv_cache_mb = 0;
    let mut node = TestNode::start(model_args(&dir), lim).await?;
    let mut c = node.client().await?;
    let e = c
        .propose_segment(common::greedy(raw("The river", "", ""), 8))
        .await
        .expect_err("no KV budget");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("KV-cache budget is 0 bytes"),
        "{}",
        e.message()
    );
    node.stop().await?;
    Ok(())
}
