//! `model-node bench`: prints tables of
//! 1. decode throughput through gRPC `ProposeSegment` (real server on loopback) against a plain greedy
//!    loop over the same candle model in-process;
//! 2. next-character costs per tokenizer: the once-per-forward O(V) pass (trie prefix sums) and the
//!    per-character walk (commit one character + top-k distribution, no forward pass);
//! 3. the serving tables of [`serving`]: concurrent streams (continuous batching; with `--plot`, also
//!    as an SVG chart), decode cost against context length, and `NextCharDistribution` on real text;
//! 4. with `--random-llama` and streams, [`mixed`]: scores in a loop beside 16 streams (the share of
//!    their rows that ran inside decode passes);
//! 5. with `--text`, [`char_sessions`]: 1, 4 and 16 concurrent CharED sessions on the real text (on
//!    the `--model-dir` model, and on the random Llama with `--random-llama`).

pub mod char_sessions;
pub mod mixed;
pub mod serving;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use ensemble_proto::v1 as pb;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::chars::{CharOptions, CharState, NextTokenModel, now};
use crate::config::{BenchArgs, LimitArgs};
use crate::error::{Error, Result};
use crate::model::KvCache;
use crate::vocab::Vocab;

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs every benchmark and prints the tables.
pub fn run(args: &BenchArgs) -> Result<()> {
    decode(args)?;
    println!();
    let streams: Vec<usize> = args.streams.iter().copied().filter(|&n| n > 0).collect();
    let mut measured = Vec::new();
    if !streams.is_empty() {
        measured.push(serving::streams_table(
            &args.model,
            &limits(),
            &streams,
            args.stream_tokens,
            args.repeat,
        )?);
        serving::step_table(&crate::node::load(&args.model, &limits())?)?;
    }
    if let Some(path) = &args.text {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::ModelDir(format!("{}: {e}", path.display())))?;
        serving::chars_table(&args.model, &limits(), &text, args.text_chars)?;
        serving::char_runs_table(&args.model, &limits(), &text, args.text_chars)?;
        char_sessions::table(&args.model, &limits(), &text, args.text_chars)?;
    }
    if args.random_llama {
        let root = std::env::temp_dir().join(format!("model-node-bench-{}", std::process::id()));
        let dir = serving::random_llama(&root)?;
        let model = crate::config::ModelArgs {
            model_dir: dir,
            model_id: Some("random-llama-25M".into()),
            ..args.model.clone()
        };
        if !streams.is_empty() {
            measured.push(serving::streams_table(
                &model,
                &limits(),
                &streams,
                args.stream_tokens,
                args.repeat,
            )?);
            mixed::scores_table(&model, &limits(), 16, args.stream_tokens)?;
        }
        if let Some(path) = &args.text {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::ModelDir(format!("{}: {e}", path.display())))?;
            // Random weights give flat distributions: every byte piece makes the look-ahead cut, ~55
            // forward passes per character (a real model needs ~1), so far fewer characters.
            char_sessions::table(&model, &limits(), &text, args.text_chars.div_ceil(20))?;
        }
        let loaded = crate::node::load(&model, &limits())?;
        serving::kv_table(&loaded)?;
        serving::step_table(&loaded)?;
        let _ = std::fs::remove_dir_all(&root);
    }
    if let Some(path) = &args.plot {
        if measured.is_empty() {
            eprintln!("--plot: no streams measured (--streams 0), nothing written");
        } else {
            std::fs::write(path, serving::streams_svg(&measured)?)
                .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
            eprintln!("wrote {}", path.display());
        }
    }
    if !args.rtd_keys.is_empty() {
        rtd_table(args)?;
    }
    if !args.tokenizers.is_empty() {
        println!();
        println!("| tokenizer | vocab | O(V) pass per forward (ms) | per-character walk, median (µs) |");
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

fn propose_job(n: usize) -> crate::engine::Job {
    use crate::engine::{ContextBody, ContextSpec, Job, PromptSpec, ProposeParams};
    Job::Propose(
        ContextSpec {
            session: String::new(),
            body: ContextBody::Full {
                prompt: PromptSpec::Raw(String::new()),
                answer: String::new(),
            },
            rtd_lambda: None,
        },
        ProposeParams {
            max_new_tokens: n,
            stop: vec![],
            sampling: Default::default(),
            defer_threshold: None,
        },
    )
}

/// Tokens/s of a bare greedy loop over the model (its batched decode step, one row), of the engine in-process, and through gRPC; the
/// three are interleaved in every repetition so that machine noise hits them alike.
fn decode(args: &BenchArgs) -> Result<()> {
    let n = args.tokens.max(1);
    let mut local = crate::node::load(&args.model, &limits())?;
    let bos = local.engine.codec().encode(
        &crate::engine::text::RenderedPrompt {
            text: String::new(),
            bos: true,
        },
        "",
    )?;
    let start_tokens = if bos.is_empty() { vec![0u32] } else { bos };
    let node = serving::Served::start(&args.model, &limits())?;
    let info = node.info.clone();
    let rt = &node.rt;
    let mut client = pb::model_node_client::ModelNodeClient::new(node.channel()?);
    let (mut bare, mut engine, mut grpc) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.repeat.max(1) {
        let model = local.engine.model();
        let t0 = Instant::now();
        let input = Tensor::new(start_tokens.as_slice(), model.device())?.unsqueeze(0)?;
        let (mut logits, mut kv): (Tensor, KvCache) = model.forward(&input, &KvCache::default(), false)?;
        // The engine's own decode step (one row of a batched step), so that the ratio measures the
        // serving layers, not a different kernel.
        for _ in 0..n {
            let next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
            let step = model.forward_ragged(&[next], &[&kv])?;
            logits = step.logits;
            kv = step.caches.into_iter().next().unwrap_or_default();
        }
        bare.push(n as f64 / t0.elapsed().as_secs_f64());

        let t0 = Instant::now();
        let tokens = match local.engine.run(propose_job(n), 0.0, &|| false)? {
            crate::engine::Reply::Proposal(p) => p.token_logprobs.len(),
            _ => 0,
        };
        engine.push(tokens.max(1) as f64 / t0.elapsed().as_secs_f64());

        let req = pb::ProposeRequest {
            context: Some(pb::Context {
                rtd_lambda: None,
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
            defer_threshold: None,
        };
        let t0 = Instant::now();
        let resp = rt
            .block_on(client.propose_segment(req))
            .map_err(|s| Error::ModelDir(format!("propose: {s}")))?
            .into_inner();
        grpc.push(resp.token_logprobs.len().max(1) as f64 / t0.elapsed().as_secs_f64());
    }
    drop(node);
    let (a, e, b) = (median(bare), median(engine), median(grpc));
    println!(
        "decode, {} ({} params, {}), {n} tokens, median of {}",
        info.model_id, info.parameters, info.device, args.repeat
    );
    println!();
    println!("| path | tokens/s |");
    println!("|---|---:|");
    println!("| bare greedy loop over the model, in-process | {a:.1} |");
    println!("| engine (sessions, healing, sampling), in-process | {e:.1} |");
    println!("| gRPC ProposeSegment on 127.0.0.1 | {b:.1} |");
    println!("| ratio gRPC / bare loop | {:.3} |", b / a);
    Ok(())
}

/// A stand-in language model: a fixed random distribution, except that along one token sequence (the
/// canonical tokenization of the benchmark text) the next canonical token gets 90% of the mass, as a
/// trained model's would. Costs no forward pass.
struct StandIn {
    base: Arc<[f32]>,
    canonical: Vec<u32>,
    peaked: Vec<Arc<[f32]>>,
}

impl StandIn {
    fn new(base: Arc<[f32]>, canonical: Vec<u32>) -> Self {
        let peaked = canonical
            .iter()
            .map(|&t| {
                let mut p: Vec<f32> = base.iter().map(|x| x * 0.1).collect();
                if let Some(x) = p.get_mut(t as usize) {
                    *x += 0.9;
                }
                p.into()
            })
            .collect();
        Self {
            base,
            canonical,
            peaked,
        }
    }
}

impl NextTokenModel for StandIn {
    type Error = Error;
    async fn next_probs(&mut self, tokens: &[u32]) -> Result<Arc<[f32]>> {
        if tokens.len() < self.canonical.len() && self.canonical.starts_with(tokens) {
            return Ok(self.peaked[tokens.len()].clone());
        }
        Ok(self.base.clone())
    }
}

fn random_probs(n: usize, rng: &mut StdRng) -> Arc<[f32]> {
    let logits: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 12.0).collect();
    let max = logits.iter().copied().fold(f32::MIN, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect::<Vec<_>>().into()
}

/// (vocab size, ms per O(V) pass, median µs per character step) for the tokenizer in `dir`.
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
    // Walk: the text " international, interesting" character by character after a one-token prompt,
    // along the canonical tokenization the stand-in model prefers. Each step: commit one character,
    // then the top-8 distribution. Steps that end a token pay a forward pass (here: a lookup) and its
    // O(V) pass; the others only walk the trie.
    let text = " international, interesting";
    let mut canonical = vec![0u32];
    // SentencePiece normalizers prepend the leading space themselves.
    let source = if vocab.kind() == crate::vocab::TokenizerKind::SentencePiece {
        &text[1..]
    } else {
        text
    };
    canonical.extend(
        tok.encode(source, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids(),
    );
    let mut model = StandIn::new(probs, canonical);
    let mut walk = Vec::new();
    let mut calls = 0u64;
    for _ in 0..repeat {
        let mut state = now(CharState::new(
            vec![0],
            Vec::new(),
            CharOptions::default(),
            &vocab,
            &mut model,
        ))?;
        now(state.distribution(8, &vocab, &mut model))?;
        let before = state.model_calls();
        for c in text.chars() {
            let t0 = Instant::now();
            now(state.commit(&c.to_string(), &vocab, &mut model))?;
            let d = now(state.distribution(8, &vocab, &mut model))?;
            walk.push(t0.elapsed().as_secs_f64() * 1e6);
            std::hint::black_box(d);
        }
        calls = state.model_calls() - before;
    }
    let chars = text.chars().count() as f64;
    println!(
        "  {}: {} characters, {calls} model calls for {} canonical tokens, mean walk {:.1} µs",
        dir.display(),
        chars,
        model.canonical.len() - 1,
        walk.iter().sum::<f64>() / walk.len().max(1) as f64
    );
    Ok((n, median(pass), median(walk)))
}

/// RTD: milliseconds of the exact k-NN mixture (distances to every key by one matmul, top-k,
/// the mixed distribution) per token, alone and in a batch of 8 rows, at each store size.
fn rtd_table(args: &BenchArgs) -> Result<()> {
    use candle_core::{Device, Tensor};
    let files = crate::modeldir::ModelFiles::open(&args.model.model_dir)?;
    let (hidden, vocab) = (files.config.hidden_size, files.config.vocab_size);
    println!();
    println!(
        "| RTD store keys (hidden {hidden}, vocab {vocab}, k 16) | store MB | ms per token (1 row) | ms per row (batch of 8) |"
    );
    println!("|---:|---:|---:|---:|");
    let c = |e: candle_core::Error| Error::Internal(e.to_string());
    for &n in &args.rtd_keys {
        // Deterministic pseudo-random keys and values.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let keys: Vec<f32> = (0..n * hidden).map(|_| next()).collect();
        let values: Vec<u32> = (0..n).map(|i| (i % vocab.max(1)) as u32).collect();
        let store = crate::rtd::Store {
            keys,
            values,
            model: crate::rtd::StoreModel {
                architecture: String::new(),
                hidden_size: hidden,
                vocab_size: vocab,
                vocab_hash: String::new(),
                model_id: String::new(),
            },
            examples: 0,
        };
        let params = crate::rtd::RtdParams {
            lambda: 0.5,
            k: 16,
            temperature: 1.0,
            max_distance: f64::INFINITY,
        };
        let rtd = crate::rtd::Rtd::new(&store, params, &Device::Cpu).map_err(c)?;
        let mut time = |rows: usize| -> Result<f64> {
            let q: Vec<f32> = (0..rows * hidden).map(|_| next()).collect();
            let q = Tensor::from_vec(q, (rows, hidden), &Device::Cpu).map_err(c)?;
            let logits = Tensor::zeros((rows, vocab), candle_core::DType::F32, &Device::Cpu).map_err(c)?;
            let mut best = f64::INFINITY;
            for _ in 0..args.repeat.max(1) {
                let t = std::time::Instant::now();
                rtd.mix(&logits, &q, None).map_err(c)?;
                best = best.min(t.elapsed().as_secs_f64() * 1e3 / rows as f64);
            }
            Ok(best)
        };
        let (one, batch) = (time(1)?, time(8)?);
        println!(
            "| {n} | {:.1} | {one:.3} | {batch:.3} |",
            (4 * n * (hidden + 1)) as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}
