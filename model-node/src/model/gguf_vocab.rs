//! The tokenizer as GGUF metadata (`tokenizer.ggml.*`), written by `model-node convert` so that
//! llama.cpp can load the files too: a byte-level BPE `tokenizer.json` becomes llama.cpp's `gpt2`
//! model (tokens, merges), a SentencePiece-style one (`▁` for spaces, byte fallback) its `llama`
//! model (tokens, scores that replay the merges in order, byte tokens marked). Other tokenizers
//! (character-level without merges, WordPiece, Unigram) get no tokenizer metadata: the node reads
//! `tokenizer.json` beside the file anyway.

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
