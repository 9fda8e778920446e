//! The concurrent CharED table of `model-node bench`: 1, 4 and 16 sessions at once, each
//! teacher-forcing `NextCharDistribution` (top_k 32) through its own stretch of real text, through a
//! real gRPC server on loopback. The engine runs each call's walk over token paths as a resumable
//! computation and gathers the forward passes that concurrent walks wait for into shared batched
//! passes (`engine::walk`), so the aggregate should grow with the sessions while the model's
//! passes dominate. Printed: aggregate characters/s, its ratio to one session, each session's mean
//! client milliseconds per character, and the node's forward passes per character.

use std::time::Instant;

use ensemble_proto::v1 as pb;
use tonic::transport::Channel;

use super::serving::{Served, err, raw_context};
use crate::config::{LimitArgs, ModelArgs};
use crate::error::Result;

/// One session's characters: a call per character, each appending the previous one as a delta;
/// returns the client milliseconds and the forward passes its calls counted. The prompt is
/// `"Story: "` (some tokenizers have no BOS, so an empty context is not a context).
async fn session(ch: Channel, name: String, text: Vec<char>) -> Result<(f64, u64)> {
    let mut c = pb::model_node_client::ModelNodeClient::new(ch);
    let (mut ms, mut passes) = (0.0, 0u64);
    for i in 0..text.len() {
        let context = if i == 0 {
            raw_context(&name, "Story: ", "")
        } else {
            Some(pb::Context {
                rtd_lambda: None,
                session_id: name.clone(),
                body: Some(pb::context::Body::Delta(pb::ContextDelta {
                    base_chars: (i - 1) as u64,
                    append: text[i - 1].to_string(),
                })),
            })
        };
        let t0 = Instant::now();
        let r = c
            .next_char_distribution(pb::NextCharRequest {
                context,
                top_k: 32,
                ..Default::default()
            })
            .await
            .map_err(err)?
            .into_inner();
        ms += t0.elapsed().as_secs_f64() * 1e3;
        passes += u64::from(r.usage.unwrap_or_default().forward_passes);
    }
    c.close_session(pb::CloseSessionRequest { session_id: name })
        .await
        .map_err(err)?;
    Ok((ms, passes))
}

/// `n` sessions at once over `chars` characters each (session `i` starts `i · chars` characters
/// into `text`); returns the wall seconds, the sessions' mean ms per character and the forward
/// passes per character.
fn round(node: &Served, text: &[char], n: usize, chars: usize, tag: &str) -> Result<(f64, f64, f64)> {
    let mut handles = Vec::with_capacity(n);
    let t0 = Instant::now();
    for i in 0..n {
        let start = (i * chars) % text.len().saturating_sub(chars).max(1);
        let mine = text[start..(start + chars).min(text.len())].to_vec();
        let ch = node.channel()?;
        handles.push(node.rt.spawn(session(ch, format!("{tag}-{n}-{i}"), mine)));
    }
    let (mut ms, mut passes) = (0.0, 0u64);
    for h in handles {
        let (m, p) = node.rt.block_on(h).map_err(err)??;
        ms += m;
        passes += p;
    }
    let wall = t0.elapsed().as_secs_f64();
    let total = (n * chars) as f64;
    Ok((wall, ms / total, passes as f64 / total))
}

/// Prints the table for `model` over `text`, `chars` characters per session.
pub fn table(model: &ModelArgs, limits: &LimitArgs, text: &str, chars: usize) -> Result<()> {
    let node = Served::start(model, limits)?;
    let text: Vec<char> = text.chars().filter(|c| *c != '\n').collect();
    let chars = chars.min(text.len()).max(1);
    println!(
        "Concurrent CharED sessions, {} (NextCharDistribution, top_k 32, {chars} characters teacher-forced per session; after a warm-up round)",
        node.info.model_id
    );
    println!();
    println!(
        "| sessions | aggregate chars/s | × one session | client ms per character (per session) | forward passes per character |"
    );
    println!("|---:|---:|---:|---:|---:|");
    round(&node, &text, 4, chars.min(20), "warm")?;
    let mut one = None;
    for n in [1usize, 4, 16] {
        let (wall, ms, passes) = round(&node, &text, n, chars, "sessions")?;
        let rate = (n * chars) as f64 / wall;
        let base = *one.get_or_insert(rate);
        println!("| {n} | {rate:.0} | {:.2} | {ms:.3} | {passes:.2} |", rate / base);
    }
    println!();
    Ok(())
}
