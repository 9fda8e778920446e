//! The mixed-load table of `model-node bench`: `ScoreCandidates` calls in a loop beside concurrent
//! `ProposeSegment` streams, through a real gRPC server on loopback. The scheduler runs a score's
//! candidate rows inside the running decodes' batched pass when the step stays within 32 rows
//! (`engine::sched`); the table shows what the streams and the scores get alone and together, and
//! which share of the scores' rows rode in decode passes (from the engine's own counters).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ensemble_proto::v1 as pb;
use tonic::transport::Channel;

use super::median;
use super::serving::{Served, err, raw_context, stream_request};
use crate::config::{LimitArgs, ModelArgs};
use crate::error::{Error, Result};

/// A verifier's question: three short candidate continuations of one story (SpecFuse's shape, few
/// enough rows to fit beside 16 decode rows in a 32-row step), on a session whose context is cached
/// after the first call.
fn score_request() -> pb::ScoreRequest {
    pb::ScoreRequest {
        context: raw_context("scorer", "Once upon a time, there was a little", ""),
        candidates: vec![" girl".into(), " dog".into(), " boy".into()],
        string_prefix: false,
        ends_answer: vec![],
    }
}

/// Runs `n` greedy streams of `tokens` tokens each; returns the tokens produced.
async fn streams(channels: Vec<Channel>, tokens: usize) -> Result<usize> {
    let calls = channels.into_iter().enumerate().map(|(i, ch)| {
        tokio::spawn(async move {
            let mut c = pb::model_node_client::ModelNodeClient::new(ch);
            let r = c
                .propose_segment(stream_request(i, tokens))
                .await
                .map_err(err)?
                .into_inner();
            Ok::<_, Error>(r.token_logprobs.len())
        })
    });
    let mut total = 0;
    for h in calls.collect::<Vec<_>>() {
        total += h.await.map_err(err)??;
    }
    Ok(total)
}

/// Scores in a loop until `stop` is set (or `max` calls); returns each call's client milliseconds
/// and the rows it computed.
async fn scorer(ch: Channel, stop: Arc<AtomicBool>, max: usize) -> Result<Vec<(f64, u64)>> {
    let mut c = pb::model_node_client::ModelNodeClient::new(ch);
    // The first call prefills the session's context; it is not measured.
    c.score_candidates(score_request()).await.map_err(err)?;
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) && out.len() < max {
        let t = Instant::now();
        let r = c
            .score_candidates(score_request())
            .await
            .map_err(err)?
            .into_inner();
        let rows = r.usage.map_or(0, |u| u64::from(u.computed_positions));
        out.push((t.elapsed().as_secs_f64() * 1e3, rows));
    }
    Ok(out)
}

/// Prints the mixed-load table: `streams` streams of `tokens` tokens alone, the scorer alone, and
/// both at once.
pub fn scores_table(model: &ModelArgs, limits: &LimitArgs, streams_n: usize, tokens: usize) -> Result<()> {
    let mut limits = limits.clone();
    limits.queue = limits.queue.max(streams_n * 2 + 2);
    let node = Served::start(model, &limits)?;
    println!(
        "ScoreCandidates (3 short candidates, one session) in a loop beside {streams_n} concurrent \
         ProposeSegment streams of {tokens} tokens, {} ({} params), through gRPC",
        node.info.model_id, node.info.parameters
    );
    println!();
    println!(
        "| load | decode tokens/s | scores/s | score ms (median) | score rows per call | in decode passes |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let merged = || node.totals.merged_score_rows.load(Ordering::Relaxed);
    // Streams alone.
    let chans = (0..streams_n)
        .map(|_| node.channel())
        .collect::<Result<Vec<_>>>()?;
    let t0 = Instant::now();
    let produced = node.rt.block_on(streams(chans, tokens))?;
    let alone_tps = produced as f64 / t0.elapsed().as_secs_f64();
    println!("| {streams_n} streams | {alone_tps:.1} | | | | |");
    // The scorer alone.
    let ch = node.channel()?;
    let t0 = Instant::now();
    let calls = node
        .rt
        .block_on(scorer(ch, Arc::new(AtomicBool::new(false)), 60))?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "| scorer | | {:.1} | {:.2} | {:.1} | |",
        calls.len() as f64 / secs,
        median(calls.iter().map(|c| c.0).collect()),
        calls.iter().map(|c| c.1).sum::<u64>() as f64 / calls.len().max(1) as f64
    );
    // Both.
    let before = merged();
    let chans = (0..streams_n)
        .map(|_| node.channel())
        .collect::<Result<Vec<_>>>()?;
    let ch = node.channel()?;
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let (produced, calls, secs) = node.rt.block_on(async {
        let s = tokio::spawn(scorer(ch, stop.clone(), usize::MAX));
        let produced = streams(chans, tokens).await?;
        let secs = t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let calls = s.await.map_err(err)??;
        Ok::<_, Error>((produced, calls, secs))
    })?;
    let rows: u64 = calls.iter().map(|c| c.1).sum();
    let share = (merged() - before) as f64 / rows.max(1) as f64;
    println!(
        "| {streams_n} streams + scorer | {:.1} | {:.1} | {:.2} | {:.1} | {:.0}% |",
        produced as f64 / secs,
        calls.len() as f64 / secs,
        median(calls.iter().map(|c| c.0).collect()),
        rows as f64 / calls.len().max(1) as f64,
        100.0 * share
    );
    println!();
    Ok(())
}
