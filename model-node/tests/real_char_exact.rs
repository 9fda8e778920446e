//! The next-character probabilities of a real checkpoint (stories260K, SentencePiece with byte
//! fallback, from `../shared/real`; skipped with a note when absent) against an independent brute-force
//! enumeration of every token path that spells the text: no trie, no pruning, no KV cache, probabilities
//! in f64 from full forward passes. (Almost) unpruned, the node's exact method agrees to float
//! precision; with the default pruning (4 hypotheses, mass share 1e-4) the error is measured and
//! bounded.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;
use model_node::chars::CharOptions;
use model_node::engine::{ContextBody, ContextSpec, Engine, Job, NextCharsParams, PromptSpec, Reply};
use model_node::model::KvCache;

fn real(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/real")).join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: {} not found", p.display());
        None
    }
}

/// Next-token probabilities (f64 softmax of a full forward pass), memoised by token sequence.
struct Brute<'a> {
    engine: &'a Engine,
    memo: HashMap<Vec<u32>, std::rc::Rc<[f64]>>,
}

/// What follows a byte prefix, over every token path that spells it: the mass of each next byte and
/// of the text ending there (EOS right after a path that spells the prefix exactly).
#[derive(Default)]
struct Next {
    by_byte: Vec<f64>,
    eos: f64,
}

impl Brute<'_> {
    fn probs(&mut self, tokens: &[u32]) -> anyhow::Result<std::rc::Rc<[f64]>> {
        if let Some(p) = self.memo.get(tokens) {
            return Ok(p.clone());
        }
        let model = self.engine.model();
        let t = Tensor::new(tokens, model.device())?.unsqueeze(0)?;
        let (logits, _) = model.forward(&t, &KvCache::default(), false)?;
        let logits: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
        let z: f64 = exp.iter().sum();
        let p: std::rc::Rc<[f64]> = exp.iter().map(|e| e / z).collect();
        self.memo.insert(tokens.to_vec(), p.clone());
        Ok(p)
    }

    /// Adds to `out`, with path weight `w`, every path after `tokens` whose bytes begin with `need`.
    fn walk(&mut self, tokens: &mut Vec<u32>, need: &[u8], w: f64, out: &mut Next) -> anyhow::Result<()> {
        let p = self.probs(tokens)?;
        let vocab = &self.engine.codec().vocab;
        for id in 0..vocab.n_rows() as u32 {
            let q = w * p[id as usize];
            match vocab.token_bytes(id) {
                None if need.is_empty() && vocab.is_eos(id) => out.eos += q,
                None => {}
                Some([]) => {}
                Some(b) if b.len() > need.len() && b.starts_with(need) => {
                    out.by_byte[usize::from(b[need.len()])] += q
                }
                Some(b) if need.starts_with(b) => {
                    tokens.push(id);
                    self.walk(tokens, &need[b.len()..], q, out)?;
                    tokens.pop();
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The bounds of P(`c` | the text so far is `prefix`) under the node's definition (a distribution
    /// over EOS and whole characters; paths whose bytes stop being UTF-8 are not outcomes): the mass
    /// of `c`'s byte over EOS plus every byte (all valid) or plus the ASCII bytes only (no multi-byte
    /// character valid). `c` must be ASCII.
    fn char_prob(&mut self, start: &[u32], prefix: &[u8], c: u8) -> anyhow::Result<(f64, f64)> {
        let mut next = Next {
            by_byte: vec![0.0; 256],
            eos: 0.0,
        };
        self.walk(&mut start.to_vec(), prefix, 1.0, &mut next)?;
        let all: f64 = next.by_byte.iter().sum();
        let ascii: f64 = next.by_byte[..128].iter().sum();
        let m = next.by_byte[usize::from(c)];
        Ok((m / (next.eos + all), m / (next.eos + ascii)))
    }
}

/// The node's exact per-character probabilities of `text` after an empty raw prompt.
fn node_observed(engine: &mut Engine, text: &str, opts: CharOptions) -> anyhow::Result<Vec<f64>> {
    let job = Job::NextChars(
        ContextSpec {
            session: String::new(),
            body: ContextBody::Full {
                prompt: PromptSpec::Raw(String::new()),
                answer: String::new(),
            },
            rtd_lambda: None,
        },
        NextCharsParams {
            continuation: text.to_owned(),
            draft_chars: 0,
            top_k: 1,
            opts,
            observed: true,
        },
    );
    let Reply::CharRun(run) = engine.run(job, 0.0, &|| false)? else {
        anyhow::bail!("wrong reply")
    };
    Ok(run.observed)
}

#[test]
fn stories260k_char_probabilities_match_brute_force_enumeration() -> anyhow::Result<()> {
    let (Some(dir), Some(text)) = (real("models/stories260K"), real("text/tinystories-valid-a.txt")) else {
        return Ok(());
    };
    let text: String = std::fs::read_to_string(text)?.chars().take(10).collect();
    assert!(text.is_ascii());
    let mut engine = model_node::node::load(&common::model_args(&dir), &common::limits())?.engine;
    // (Almost) no pruning: 256 hypotheses, paths down to 1e-12 of the mass (with none at all, the
    // byte-fallback paths into every multi-byte character would each need forward passes without end).
    let unpruned = CharOptions {
        max_hypotheses: 256,
        min_mass: 1e-12,
        lookahead: true,
    };
    let exact = node_observed(&mut engine, &text, unpruned)?;
    let pruned = node_observed(&mut engine, &text, CharOptions::default())?;
    assert_eq!((exact.len(), pruned.len()), (text.len(), text.len()));

    // The stream starts where an empty raw prompt leaves it: BOS, then the normalizer's space.
    let rendered = engine.codec().render(&PromptSpec::Raw(String::new()))?;
    let start = engine.codec().encode(&rendered, "")?;
    let mut brute = Brute {
        engine: &engine,
        memo: HashMap::new(),
    };
    let (mut worst_exact, mut worst_pruned, mut bits_exact, mut bits_pruned) = (0.0f64, 0.0f64, 0.0, 0.0);
    for (i, c) in text.bytes().enumerate() {
        let prefix = format!(" {}", &text[..i]);
        let (lo, hi) = brute.char_prob(&start, prefix.as_bytes(), c)?;
        // Float slack: the node's forward passes use the KV cache, these do not (f32 logits).
        let off = |p: f64| {
            if p < lo {
                (lo / p).ln()
            } else if p > hi {
                (p / hi).ln()
            } else {
                0.0
            }
        };
        eprintln!(
            "{i:>2} {:?}: brute [{lo:.9}, {hi:.9}] node exact {:.9} pruned {:.9}",
            c as char, exact[i], pruned[i]
        );
        worst_exact = worst_exact.max(off(exact[i]));
        worst_pruned = worst_pruned.max(off(pruned[i]));
        bits_exact -= exact[i].log2();
        bits_pruned -= pruned[i].log2();
    }
    eprintln!(
        "{} forward passes; max |ln p - ln p_brute|: unpruned {worst_exact:.2e}, default pruning {worst_pruned:.2e}; \
         bits over {:?}: unpruned {bits_exact:.6}, default pruning {bits_pruned:.6}",
        brute.memo.len(),
        text
    );
    assert!(worst_exact < 1e-5, "unpruned: {worst_exact:e}");
    assert!(worst_pruned < 1e-3, "default pruning: {worst_pruned:e}");
    Ok(())
}
