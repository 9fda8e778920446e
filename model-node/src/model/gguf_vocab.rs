//! The tokenizer as GGUF metadata (`tokenizer.ggml.*`), both ways.
//!
//! - [`metadata`], written by `model-node convert` so that llama.cpp can load the files too: a
//!   byte-level BPE `tokenizer.json` becomes llama.cpp's `gpt2` model (tokens, merges), a
//!   SentencePiece-style one (`▁` for spaces, byte fallback) its `llama` model (tokens, scores that
//!   replay the merges in order, byte tokens marked). Other tokenizers (character-level without
//!   merges, WordPiece, Unigram) get no tokenizer metadata: the node reads `tokenizer.json` beside
//!   the file anyway.
//! - [`tokenizer`], read when no `tokenizer.json` lies beside a GGUF file (as published GGUF files
//!   usually come): `gpt2` through candle's reader; `llama` (SentencePiece), which candle does not
//!   read, as HuggingFace's own converter does it: a byte-fallback BPE whose merges are every split
//!   of a token into two tokens, ranked by the joined token's score.

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

fn merges(model: &Json) -> Vec<(String, String)> {
    model
        .get("merges")
        .and_then(Json::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|m| match m {
                    Json::String(s) => s.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())),
                    Json::Array(p) if p.len() == 2 => {
                        Some((p[0].as_str()?.to_owned(), p[1].as_str()?.to_owned()))
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn mentions(v: Option<&Json>, what: &str) -> bool {
    v.is_some_and(|v| v.to_string().contains(what))
}

/// The `tokenizer.ggml.*` entries for `tokenizer.json` (none when llama.cpp has no model for it).
/// `add_bos`: whether prompts start with BOS; `rows`: the model's vocabulary rows (the list is padded
/// with unused tokens up to it, as llama.cpp wants one token per row).
pub fn metadata(tokenizer_json: &str, add_bos: bool, rows: usize) -> Vec<(String, Value)> {
    let Ok(t) = serde_json::from_str::<Json>(tokenizer_json) else {
        return vec![];
    };
    let Some(model) = t.get("model") else {
        return vec![];
    };
    if model.get("type").and_then(Json::as_str) != Some("BPE") {
        return vec![];
    }
    let Some(vocab) = model.get("vocab").and_then(Json::as_object) else {
        return vec![];
    };
    let mut tokens: Vec<Option<String>> = vec![None; vocab.len()];
    let mut add = |text: &str, id: u64| {
        let id = id as usize;
        if id >= tokens.len() {
            tokens.resize(id + 1, None);
        }
        tokens[id] = Some(text.to_owned());
    };
    for (text, id) in vocab {
        if let Some(id) = id.as_u64() {
            add(text, id);
        }
    }
    let mut special = std::collections::HashSet::new();
    for a in t
        .get("added_tokens")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        if let (Some(text), Some(id)) = (
            a.get("content").and_then(Json::as_str),
            a.get("id").and_then(Json::as_u64),
        ) {
            add(text, id);
            if a.get("special").and_then(Json::as_bool).unwrap_or(false) {
                special.insert(id as usize);
            }
        }
    }
    if tokens.iter().any(Option::is_none) || tokens.len() > rows {
        return vec![];
    }
    let known = tokens.len();
    let mut tokens: Vec<String> = tokens.into_iter().flatten().collect();
    tokens.extend((known..rows).map(|i| format!("<unused{i}>")));
    let unk = model.get("unk_token").and_then(Json::as_str);
    let merges = merges(model);
    let byte_level = mentions(t.get("pre_tokenizer"), "ByteLevel") || mentions(t.get("decoder"), "ByteLevel");
    let spm = model
        .get("byte_fallback")
        .and_then(Json::as_bool)
        .unwrap_or(false)
        || mentions(t.get("normalizer"), "\u{2581}")
        || mentions(t.get("decoder"), "\u{2581}");
    let types: Vec<Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let ty = if i >= known {
                UNUSED
            } else if Some(s.as_str()) == unk {
                UNKNOWN
            } else if special.contains(&i) {
                CONTROL
            } else if spm && s.len() == 6 && s.starts_with("<0x") && s.ends_with('>') {
                BYTE
            } else {
                NORMAL
            };
            Value::I32(ty)
        })
        .collect();
    let mut out: Vec<(String, Value)> = Vec::new();
    if byte_level {
        out.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
        out.push(("tokenizer.ggml.pre".into(), Value::String("default".into())));
        out.push((
            "tokenizer.ggml.merges".into(),
            Value::Array(
                merges
                    .iter()
                    .map(|(a, b)| Value::String(format!("{a} {b}")))
                    .collect(),
            ),
        ));
    } else if spm {
        // llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined token scores
        // highest: the negated merge rank replays the BPE merges in their order.
        let mut score = vec![0f32; tokens.len()];
        let index: std::collections::HashMap<&str, usize> =
            tokens.iter().enumerate().map(|(i, s)| (s.as_str(), i)).collect();
        for (rank, (a, b)) in merges.iter().enumerate() {
            if let Some(&i) = index.get(format!("{a}{b}").as_str()) {
                score[i] = -(rank as f32) - 1.0;
            }
        }
        out.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
        out.push((
            "tokenizer.ggml.scores".into(),
            Value::Array(score.into_iter().map(Value::F32).collect()),
        ));
    } else {
        return vec![];
    }
    out.push((
        "tokenizer.ggml.tokens".into(),
        Value::Array(tokens.into_iter().map(Value::String).collect()),
    ));
    out.push(("tokenizer.ggml.token_type".into(), Value::Array(types)));
    out.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    if let Some(u) = unk.and_then(|u| vocab.get(u)).and_then(Json::as_u64) {
        out.push(("tokenizer.ggml.unknown_token_id".into(), Value::U32(u as u32)));
    }
    out
}

/// A metadata value as integers (token types, ids).
fn ints(v: &Value) -> Option<i64> {
    match v {
        Value::U8(x) => Some(i64::from(*x)),
        Value::I8(x) => Some(i64::from(*x)),
        Value::U16(x) => Some(i64::from(*x)),
        Value::I16(x) => Some(i64::from(*x)),
        Value::U32(x) => Some(i64::from(*x)),
        Value::I32(x) => Some(i64::from(*x)),
        Value::U64(x) => i64::try_from(*x).ok(),
        Value::I64(x) => Some(*x),
        _ => None,
    }
}

/// The tokenizer a GGUF file's `tokenizer.ggml.*` metadata describes; an error names what is
/// missing or unsupported.
pub fn tokenizer(
    content: &candle_core::quantized::gguf_file::Content,
) -> Result<tokenizers::Tokenizer, String> {
    let meta = &content.metadata;
    let kind = meta
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .ok_or("no tokenizer.ggml.model in its metadata")?;
    if kind != "llama" {
        use candle_core::quantized::tokenizer::TokenizerFromGguf as _;
        return tokenizers::Tokenizer::from_gguf(content).map_err(|e| e.to_string());
    }
    let strings = |key: &str| -> Result<Vec<String>, String> {
        meta.get(key)
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| format!("no {key} in its metadata"))?
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| format!("{key} holds a non-string"))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let list = |key: &str| meta.get(key).and_then(|v| v.to_vec().ok());
    let types: Vec<i64> = list("tokenizer.ggml.token_type")
        .map(|l| l.iter().map(|v| ints(v).unwrap_or(i64::from(NORMAL))).collect())
        .unwrap_or_else(|| vec![i64::from(NORMAL); tokens.len()]);
    // Without scores, earlier tokens merge first (HuggingFace's rule too).
    let scores: Vec<f32> = list("tokenizer.ggml.scores")
        .map(|l| l.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect())
        .unwrap_or_else(|| (0..tokens.len()).map(|i| -(i as f32)).collect());
    if types.len() != tokens.len() || scores.len() != tokens.len() {
        return Err("tokenizer.ggml.tokens, token_type and scores differ in length".into());
    }
    let flag = |key: &str, default: bool| meta.get(key).and_then(|v| v.to_bool().ok()).unwrap_or(default);
    let id = |key: &str| meta.get(key).and_then(ints).and_then(|i| usize::try_from(i).ok());
    let index: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    // Every split of a normal token into two tokens, ranked by the joined token's score (then by
    // the token's id and the parts' ids).
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        if types[i] != i64::from(NORMAL) {
            continue;
        }
        for (at, _) in t.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (index.get(&t[..at]), index.get(&t[at..])) {
                merges.push((scores[i], i, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3))));
    let unk = id("tokenizer.ggml.unknown_token_id")
        .or_else(|| types.iter().position(|&t| t == i64::from(UNKNOWN)))
        .and_then(|i| tokens.get(i));
    let bos = id("tokenizer.ggml.bos_token_id").unwrap_or(1);
    let space_prefix = flag("tokenizer.ggml.add_space_prefix", true);
    let special: Vec<Json> = types
        .iter()
        .enumerate()
        .filter(|&(_, &t)| t == i64::from(UNKNOWN) || t == i64::from(CONTROL) || t == 4)
        .map(|(i, &t)| {
            serde_json::json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": t != 4})
        })
        .collect();
    let mut normalizers =
        vec![serde_json::json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})];
    let mut decoders = vec![
        serde_json::json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        serde_json::json!({"type": "ByteFallback"}),
        serde_json::json!({"type": "Fuse"}),
    ];
    if space_prefix {
        normalizers.insert(0, serde_json::json!({"type": "Prepend", "prepend": "\u{2581}"}));
        decoders.push(serde_json::json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let post = match tokens.get(bos) {
        Some(b) if flag("tokenizer.ggml.add_bos_token", true) => serde_json::json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b.as_str(): {"id": b, "ids": [bos], "tokens": [b]}}
        }),
        _ => Json::Null,
    };
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), Json::from(i)))
        .collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": types.contains(&i64::from(BYTE)),
            "vocab": vocab,
            "merges": merges.iter().map(|&(_, _, l, r)| [&tokens[l], &tokens[r]]).collect::<Vec<_>>(),
        }
    });
    json.to_string()
        .parse::<tokenizers::Tokenizer>()
        .map_err(|e| format!("its SentencePiece vocabulary does not make a tokenizer: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentencepiece_style_bpe_becomes_llama_with_merge_scores() {
        let json = r#"{"normalizer": {"type": "Replace", "content": "\u2581"},
            "model": {"type": "BPE", "byte_fallback": true, "unk_token": "<unk>",
              "vocab": {"<unk>": 0, "<s>": 1, "<0x41>": 2, "a": 3, "b": 4, "ab": 5, "abb": 6},
              "merges": ["a b", "ab b"]},
            "added_tokens": [{"id": 1, "content": "<s>", "special": true}]}"#;
        let m: std::collections::HashMap<String, Value> = metadata(json, true, 7).into_iter().collect();
        assert_eq!(
            m["tokenizer.ggml.model"].to_string().ok().map(String::as_str),
            Some("llama")
        );
        let scores: Vec<f32> = m["tokenizer.ggml.scores"]
            .to_vec()
            .into_iter()
            .flatten()
            .filter_map(|v| v.to_f32().ok())
            .collect();
        assert_eq!(scores, vec![0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -2.0]);
        let types: Vec<i32> = m["tokenizer.ggml.token_type"]
            .to_vec()
            .into_iter()
            .flatten()
            .filter_map(|v| v.to_i32().ok())
            .collect();
        assert_eq!(
            types,
            vec![UNKNOWN, CONTROL, BYTE, NORMAL, NORMAL, NORMAL, NORMAL]
        );
    }

    #[test]
    fn byte_level_bpe_becomes_gpt2_and_others_get_nothing() {
        let json = r#"{"pre_tokenizer": {"type": "ByteLevel"}, "model": {"type": "BPE",
            "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]}}"#;
        let m: std::collections::HashMap<String, Value> = metadata(json, false, 4).into_iter().collect();
        assert_eq!(
            m["tokenizer.ggml.model"].to_string().ok().map(String::as_str),
            Some("gpt2")
        );
        assert_eq!(m["tokenizer.ggml.merges"].to_vec().ok().map(Vec::len), Some(1));
        assert_eq!(
            m["tokenizer.ggml.tokens"].to_vec().ok().map(Vec::len),
            Some(4),
            "padded to the rows"
        );
        assert!(metadata(r#"{"model": {"type": "WordPiece", "vocab": {}}}"#, false, 4).is_empty());
    }
}
