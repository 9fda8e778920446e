//! Tiny real tokenizers of the three families, built with the `tokenizers` crate, for tests (and for
//! training small models): GPT-2 style byte-level BPE, Llama-2 style SentencePiece BPE with `▁` and
//! `<0xNN>` byte fallback, and a character-level vocabulary. Deterministic: same corpus, same files.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::model::{ArchConfig, Transformer};

use serde_json::{Value, json};
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// Errors building fixtures.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// The tokenizers crate failed.
    #[error("tokenizers: {0}")]
    Tokenizers(String),
    /// Writing files failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// JSON (de)serialisation failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// Building or saving weights failed.
    #[error("model: {0}")]
    Model(#[from] crate::Error),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, FixtureError>;

fn tk<E: std::fmt::Display>(e: E) -> FixtureError {
    FixtureError::Tokenizers(e.to_string())
}

fn train_bpe(
    mut tok: Tokenizer,
    corpus: &[&str],
    vocab_size: usize,
    specials: &[&str],
    byte_level: bool,
) -> Result<Tokenizer> {
    let mut builder = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(1)
        .show_progress(false)
        .special_tokens(
            specials
                .iter()
                .map(|s| AddedToken::from(s.to_string(), true))
                .collect(),
        );
    if byte_level {
        builder = builder.initial_alphabet(ByteLevel::alphabet().into_iter().collect());
    }
    let mut trainer = TrainerWrapper::BpeTrainer(builder.build());
    tok.train(&mut trainer, corpus.iter().map(|s| s.to_string()))
        .map_err(tk)?;
    Ok(tok)
}

/// GPT-2 style byte-level BPE with `<|endoftext|>` (EOS), `<|im_start|>` and `<|im_end|>`.
pub fn byte_level_bpe(corpus: &[&str], vocab_size: usize) -> Result<Tokenizer> {
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::new(false, true, true)));
    train_bpe(
        tok,
        corpus,
        vocab_size,
        &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        true,
    )
}

/// Llama-2 style SentencePiece BPE: `<unk>`=0, `<s>`=1, `</s>`=2, then the 256 `<0xNN>` byte tokens,
/// then the merges learnt on `corpus`; `▁` for spaces, byte fallback for anything unseen.
pub fn sentencepiece_bpe(corpus: &[&str], vocab_size: usize) -> Result<Tokenizer> {
    let mut tok = Tokenizer::new(BPE::default());
    let norm: tokenizers::NormalizerWrapper = serde_json::from_value(json!({
        "type": "Sequence",
        "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]
    }))?;
    tok.with_normalizer(Some(norm)).map_err(tk)?;
    // Train on words (pieces start at `▁`, as SentencePiece's do); the saved tokenizer, like Llama-2's,
    // has no pre-tokenizer.
    let split: tokenizers::PreTokenizerWrapper = serde_json::from_value(json!({
        "type": "Split", "pattern": {"String": "▁"}, "behavior": "MergedWithNext", "invert": false
    }))?;
    tok.with_pre_tokenizer(Some(split));
    let trained = train_bpe(
        tok,
        corpus,
        vocab_size.saturating_sub(256),
        &["<unk>", "<s>", "</s>"],
        false,
    )?;
    // Re-number: specials, byte tokens, then the learnt pieces; switch byte fallback on.
    let mut j: Value = serde_json::from_str(&trained.to_string(false).map_err(tk)?)?;
    let old: Vec<(String, u64)> = j["model"]["vocab"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    let mut pieces: Vec<(String, u64)> = old
        .into_iter()
        .filter(|(k, _)| !["<unk>", "<s>", "</s>"].contains(&k.as_str()))
        .collect();
    pieces.sort_by_key(|(_, id)| *id);
    let mut vocab = serde_json::Map::new();
    for (i, s) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert((*s).into(), json!(i));
    }
    for b in 0..256 {
        vocab.insert(format!("<0x{b:02X}>"), json!(3 + b));
    }
    for (k, _) in pieces {
        let next = vocab.len();
        vocab.entry(k).or_insert(json!(next));
    }
    j["model"]["vocab"] = Value::Object(vocab);
    j["model"]["byte_fallback"] = json!(true);
    j["pre_tokenizer"] = Value::Null;
    j["model"]["unk_token"] = json!("<unk>");
    j["model"]["fuse_unk"] = json!(true);
    j["added_tokens"] = json!([
        {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    ]);
    j["decoder"] = json!({"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}
    ]});
    Tokenizer::from_bytes(j.to_string().as_bytes()).map_err(tk)
}

/// One token per character seen in `corpus` (sorted), after `<unk>`, `<bos>`, `<eos>`.
pub fn char_level(corpus: &[&str]) -> Result<Tokenizer> {
    let mut chars: Vec<char> = corpus.iter().flat_map(|s| s.chars()).collect();
    chars.sort_unstable();
    chars.dedup();
    let mut vocab = serde_json::Map::new();
    for (i, s) in ["<unk>", "<bos>", "<eos>"].iter().enumerate() {
        vocab.insert((*s).into(), json!(i));
    }
    for c in chars {
        let next = vocab.len();
        vocab.insert(c.to_string(), json!(next));
    }
    let added: Vec<Value> = ["<unk>", "<bos>", "<eos>"]
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let j = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null, "pre_tokenizer": null, "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    Tokenizer::from_bytes(j.to_string().as_bytes()).map_err(tk)
}

/// Writes `tokenizer.json` and `tokenizer_config.json` (bos/eos tokens, chat template) into `dir`.
pub fn write_tokenizer_dir(
    dir: &Path,
    tok: &Tokenizer,
    bos: Option<&str>,
    eos: &str,
    chat_template: Option<&str>,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    tok.save(dir.join("tokenizer.json"), false).map_err(tk)?;
    let mut cfg = json!({
        "bos_token": bos,
        "eos_token": eos,
        "add_bos_token": bos.is_some(),
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 512,
    });
    if let Some(t) = chat_template {
        cfg["chat_template"] = json!(t);
    }
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&cfg)?,
    )?;
    Ok(())
}

// ---- tiny random-weight models -------------------------------------------------------------

/// The architectures [`tiny_config`] knows.
pub const ARCHS: [&str; 5] = ["llama", "qwen2", "mistral", "phi3", "gemma2"];

/// A tiny config.json for `arch` (hidden 32, 2 layers, 4 heads / 2 KV heads).
pub fn tiny_config(arch: &str, vocab: usize) -> Result<Value> {
    let mut c = json!({
        "model_type": arch,
        "hidden_size": 32,
        "intermediate_size": 64,
        "vocab_size": vocab,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": false,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    });
    let Some(o) = c.as_object_mut() else { return Ok(c) };
    match arch {
        "llama" => {
            o.insert(
                "rope_scaling".into(),
                json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
            );
        }
        "qwen2" => {
            o.insert("sliding_window".into(), json!(4096));
            o.insert("max_window_layers".into(), json!(2));
            o.insert("use_sliding_window".into(), json!(false));
            o.insert("tie_word_embeddings".into(), json!(true));
        }
        "mistral" => {
            o.insert("sliding_window".into(), json!(4096));
        }
        "phi3" => {}
        "gemma2" => {
            o.insert("head_dim".into(), json!(8));
            o.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
            o.insert("hidden_act".into(), json!("gelu_pytorch_tanh"));
            o.insert("attention_bias".into(), json!(false));
            o.insert("attn_logit_softcapping".into(), json!(50.0));
            o.insert("final_logit_softcapping".into(), json!(30.0));
            o.insert("query_pre_attn_scalar".into(), json!(8));
            o.insert("sliding_window".into(), json!(4096));
            o.insert("tie_word_embeddings".into(), json!(true));
        }
        other => return Err(FixtureError::Tokenizers(format!("unknown architecture {other}"))),
    }
    Ok(c)
}

/// Writes `config.json` and `model.safetensors` with seeded random weights for `config`.
pub fn write_model(dir: &Path, config: &Value, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(config)?;
    std::fs::write(dir.join("config.json"), &text)?;
    let cfg = ArchConfig::from_json(&text, "config.json")?;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    Transformer::load(&cfg, vb, 8)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut names: Vec<String> = vm
        .data()
        .lock()
        .map_err(|_| FixtureError::Tokenizers("weights lock poisoned".into()))?
        .keys()
        .cloned()
        .collect();
    names.sort();
    let data = vm
        .data()
        .lock()
        .map_err(|_| FixtureError::Tokenizers("weights lock poisoned".into()))?;
    for name in names {
        let var = &data[&name];
        let shape = var.shape().clone();
        let n = shape.elem_count();
        let is_norm = name.ends_with("norm.weight");
        let gemma = cfg.arch == crate::model::Arch::Gemma2;
        let scale = if is_norm {
            0.1
        } else if name.contains("embed") {
            1.0
        } else {
            0.5 / (shape.dims()[shape.rank() - 1] as f32).sqrt()
        };
        let base = if is_norm && !gemma { 1.0 } else { 0.0 };
        let v: Vec<f32> = (0..n)
            .map(|_| base + scale * (rng.random::<f32>() * 2.0 - 1.0) * 1.7)
            .collect();
        var.set(&Tensor::from_vec(v, shape, &Device::Cpu)?)?;
    }
    drop(data);
    vm.save(dir.join("model.safetensors"))?;
    Ok(())
}

/// Corpus the fixture tokenizers are trained on (ASCII and multi-byte text).
pub const CORPUS: &[&str] = &[
    "the cat sat on the mat. the dog ate the bone.",
    "once upon a time there was a little cat named tom.",
    "café crème brûlée, naïve résumé. 中文字符 测试. emoji 😀 smile 😀!",
    "What is 347 + 58? 405. What is the capital of Veloria? Tarn.",
    "hello world, hello there, help the helpers.",
];

/// A ChatML chat template (as Qwen uses), for fixture tokenizer configs.
pub const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A complete model directory: `arch` weights over a fixture tokenizer of `kind`
/// ("byte_level", "sentencepiece" or "char").
pub fn tiny_model_dir(root: &Path, arch: &str, kind: &str, seed: u64) -> Result<PathBuf> {
    let dir = root.join(format!("{arch}-{kind}"));
    let (tok, bos, eos, template) = match kind {
        "byte_level" => (byte_level_bpe(CORPUS, 300)?, None, "<|endoftext|>", Some(CHATML)),
        "sentencepiece" => (sentencepiece_bpe(CORPUS, 400)?, Some("<s>"), "</s>", None),
        "char" => (char_level(CORPUS)?, Some("<bos>"), "<eos>", None),
        other => {
            return Err(FixtureError::Tokenizers(format!(
                "unknown tokenizer kind {other}"
            )));
        }
    };
    write_tokenizer_dir(&dir, &tok, bos, eos, template)?;
    let vocab = tok.get_vocab_size(true);
    let mut config = tiny_config(arch, vocab)?;
    let Some(o) = config.as_object_mut() else {
        return Ok(dir);
    };
    o.insert(
        "bos_token_id".into(),
        serde_json::json!(bos.and_then(|b| tok.token_to_id(b))),
    );
    o.insert("eos_token_id".into(), serde_json::json!(tok.token_to_id(eos)));
    write_model(&dir, &config, seed)?;
    Ok(dir)
}

/// A deterministic stand-in language model: next-token probabilities are a seeded function of the
/// token sequence (logits uniform in `[0, scale)`, softmaxed). For tests of the character method.
pub struct RandomModel {
    /// Vocabulary rows.
    pub n: usize,
    /// Seed mixed into every distribution.
    pub seed: u64,
    /// Logit range; larger is more peaked.
    pub scale: f64,
}

impl RandomModel {
    /// The distribution after `tokens`.
    pub fn probs(&self, tokens: &[u32]) -> std::sync::Arc<[f32]> {
        use rand::{Rng, SeedableRng};
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.seed, tokens).hash(&mut h);
        let mut rng = rand::rngs::StdRng::seed_from_u64(h.finish());
        let logits: Vec<f64> = (0..self.n).map(|_| rng.random::<f64>() * self.scale).collect();
        let max = logits.iter().copied().fold(f64::MIN, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| (x / s) as f32).collect::<Vec<f32>>().into()
    }
}

impl crate::chars::NextTokenModel for RandomModel {
    type Error = std::convert::Infallible;
    async fn next_probs(
        &mut self,
        tokens: &[u32],
    ) -> std::result::Result<std::sync::Arc<[f32]>, Self::Error> {
        Ok(self.probs(tokens))
    }
}

/// Brute force: P(the byte stream after `tokens` starts with `need`), enumerating every token path
/// with linear scans of the vocabulary (no trie): the reference the character method is tested against.
pub fn brute_prefix(m: &RandomModel, v: &crate::vocab::Vocab, tokens: &[u32], need: &[u8]) -> f64 {
    let p = m.probs(tokens);
    let mut sum = 0.0;
    for id in 0..v.n_rows() as u32 {
        let Some(b) = v.token_bytes(id) else { continue };
        if b.starts_with(need) {
            sum += f64::from(p[id as usize]);
        } else if need.starts_with(b) {
            let mut t = tokens.to_vec();
            t.push(id);
            sum += f64::from(p[id as usize]) * brute_prefix(m, v, &t, &need[b.len()..]);
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::{TokenizerKind, Vocab};

    const CORPUS: &[&str] = &["the cat sat on the mat", "café 中文 😀 the end", "hello world"];

    fn roundtrip(tok: &Tokenizer, kind: TokenizerKind) -> Result<()> {
        let n = tok.get_vocab_size(true);
        let v = Vocab::from_tokenizer(tok, n, &[]).map_err(tk)?;
        assert_eq!(v.kind(), kind);
        for text in ["the cat", "café 中文 😀", "zebra ÿ"] {
            let ids = tok.encode(text, false).map_err(tk)?.get_ids().to_vec();
            let bytes: Vec<u8> = ids
                .iter()
                .filter_map(|&i| v.token_bytes(i))
                .flatten()
                .copied()
                .collect();
            let want = if kind == TokenizerKind::SentencePiece {
                format!(" {text}")
            } else {
                text.to_owned()
            };
            if kind == TokenizerKind::Plain && text.starts_with("zebra") {
                continue; // unseen characters are <unk> in a closed character vocabulary
            }
            assert_eq!(String::from_utf8_lossy(&bytes), want, "{kind:?}");
        }
        Ok(())
    }

    #[test]
    fn fixtures_round_trip_text_through_token_bytes() -> Result<()> {
        roundtrip(&byte_level_bpe(CORPUS, 300)?, TokenizerKind::ByteLevel)?;
        roundtrip(&sentencepiece_bpe(CORPUS, 300)?, TokenizerKind::SentencePiece)?;
        roundtrip(&char_level(CORPUS)?, TokenizerKind::Plain)?;
        let sp = sentencepiece_bpe(CORPUS, 300)?;
        assert_eq!(sp.token_to_id("<0x41>"), Some(3 + 0x41));
        assert_eq!(sp.token_to_id("</s>"), Some(2));
        Ok(())
    }

    #[test]
    fn fixtures_are_deterministic() -> Result<()> {
        let a = byte_level_bpe(CORPUS, 300)?.to_string(false).map_err(tk)?;
        let b = byte_level_bpe(CORPUS, 300)?.to_string(false).map_err(tk)?;
        assert_eq!(a, b);
        Ok(())
    }
}
