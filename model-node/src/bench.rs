//! `model-node bench`: prints tables of
//! 1. decode throughput through gRPC `ProposeSegment` (real server on loopback) against a plain greedy
//!    loop over the same candle model in-process;
//! 2. next-character costs per tokenizer: the once-per-forward O(V) pass (trie prefix sums) and the
//!    per-character walk (commit one character + top-k distribution, no forward pass).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use ensemble_proto::v1 as pb;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::chars::{CharOptions, CharState, NextTokenModel};
use crate::config::{BenchArgs, LimitArgs};
use crate::error::{Error, Result};
use crate::model::KvCache;
use crate::vocab::Vocab;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs every benchmark and prints the tables.
pub fn run(args: &BenchArgs) -> Result<()> {
    decode(args)?;
    if !args.tokenizers.is_empty() {
        println!();
        println!("| tokenizer | vocab | O(V) pass per forward (ms) | per-character walk (µs) |");
        println!("|---|---:|---:|---:|");
        for dir in &args.tokenizers {
            let (v, pass_ms, walk_us) = next_char_costs(dir, args.repeat.max(1))?;
            println!("| {} | {v} | {pass_ms:.3} | {walk_us:.1} |", dir.display());
        }
    }
    Ok(())
}

fn limits() -> LimitArgs {
    LimitArgs {
        max_sessions: 16,
        kv_cache_mb: 4096,
        queue: 16,
        char_hypotheses: 4,
        char_min_mass: 1e-4,
    }
}

/// Tokens/s of a bare greedy loop over the model, and through gRPC.
fn decode(args: &BenchArgs) -> Result<()> {
    let n = args.tokens.max(1);
    let loaded = crate::node::load(&args.model, &limits())?;
    let model = loaded.engine.model();
    let bos = loaded.engine.codec().encode(
        &crate::engine::text::RenderedPrompt {
            text: String::new(),
            bos: true,
        },
        "",
    )?;
    let start_tokens = if bos.is_empty() { vec![0u32] } else { bos };
    let mut in_process = Vec::new();
    for _ in 0..args.repeat.max(1) {
        let t0 = Instant::now();
        let input = Tensor::new(start_tokens.as_slice(), model.device())?.unsqueeze(0)?;
        let (mut logits, mut kv): (Tensor, KvCache) = model.forward(&input, &KvCache::default(), false)?;
        for _ in 0..n {
            let next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
            let input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
            (logits, kv) = model.forward(&input, &kv, false)?;
        }
        in_process.push(n as f64 / t0.elapsed().as_secs_f64());
    }
    let info = loaded.info.clone();
    let rt = tokio::runtime::Runtime::new().map_err(|e| Error::ModelDir(e.to_string()))?;
    let grpc = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::ModelDir(e.to_string()))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::ModelDir(e.to_string()))?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(crate::server::run(
            listener,
            loaded,
            CharOptions::default(),
            async {
                let _ = stop_rx.await;
            },
            Duration::from_secs(5),
        ));
        let mut client = pb::model_node_client::ModelNodeClient::connect(format!("http://{addr}"))
            .await
            .map_err(|e| Error::ModelDir(format!("connect: {e}")))?;
        let mut rates = Vec::new();
        for _ in 0..args.repeat.max(1) {
            let req = pb::ProposeRequest {
                context: Some(pb::Context {
                    session_id: String::new(),
                    body: Some(pb::context::Body::Full(pb::FullContext {
                        prompt: Some(pb::Prompt {
                            kind: Some(pb::prompt::Kind::Raw(String::new())),
                        }),
                        answer: String::new(),
                    })),
                }),
                max_new_tokens: n as u32,
                stop: vec![],
                sampling: Some(pb::Sampling::default()),
            };
            let t0 = Instant::now();
            let resp = client
                .propose_segment(req)
                .await
                .map_err(|s| Error::ModelDir(format!("propose: {s}")))?
                .into_inner();
            let tokens = resp.token_logprobs.len().max(1);
            rates.push(tokens as f64 / t0.elapsed().as_secs_f64());
        }
        let _ = stop_tx.send(());
        let _ = server.await;
        Ok::<_, Error>(rates)
    })?;
    let (a, b) = (median(in_process), median(grpc));
    println!(
        "decode, {} ({} params, {}), {n} tokens, median of {}",
        info.model_id, info.parameters, info.device, args.repeat
    );
    println!();
    println!("| path | tokens/s |");
    println!("|---|---:|");
    println!("| in-process greedy loop | {a:.1} |");
    println!("| gRPC ProposeSegment | {b:.1} |");
    println!("| ratio gRPC / in-process | {:.3} |", b / a);
    Ok(())
}

/// A model that answers the same random distribution for every context (costs no forward pass).
struct FixedModel(Arc<[f32]>);

impl NextTokenModel for FixedModel {
    type Error = Error;
    fn next_probs(&mut self, _tokens: &[u32]) -> Result<Arc<[f32]>> {
        Ok(self.0.clone())
    }
}

fn random_probs(n: usize, rng: &mut StdRng) -> Arc<[f32]> {
    let logits: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 12.0).collect();
    let max = logits.iter().copied().fold(f32::MIN, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect::<Vec<_>>().into()
}

/// (vocab size, ms per O(V) pass, µs per character walk) for the tokenizer in `dir`.
fn next_char_costs(dir: &Path, repeat: usize) -> Result<(usize, f64, f64)> {
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| Error::ModelDir(format!("{}: {e}", dir.display())))?;
    let n = tok.get_vocab_size(true);
    let vocab = Vocab::from_tokenizer(&tok, n, &[])?;
    let mut rng = StdRng::seed_from_u64(7);
    let probs = random_probs(n, &mut rng);
    let mut pass = Vec::new();
    for _ in 0..repeat * 5 {
        let t0 = Instant::now();
        let sums = vocab.trie_cumsum(&probs);
        pass.push(t0.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(sums);
    }
    // Walk: a context whose last token is a long word, then commit characters inside it.
    let word = " international";
    let ids = tok
        .encode(word, false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?
        .get_ids()
        .to_vec();
    let mut model = FixedModel(probs);
    let mut walk = Vec::new();
    for _ in 0..repeat {
        let mut state = CharState::new(
            ids.clone(),
            vec![b' '],
            CharOptions::default(),
            &vocab,
            &mut model,
        )?;
        state.distribution(8, &vocab, &mut model)?;
        for c in "inte".chars() {
            let t0 = Instant::now();
            state.commit(&c.to_string(), &vocab, &mut model)?;
            let d = state.distribution(8, &vocab, &mut model)?;
            walk.push(t0.elapsed().as_secs_f64() * 1e6);
            std::hint::black_box(d);
        }
    }
    Ok((n, median(pass), median(walk)))
}
