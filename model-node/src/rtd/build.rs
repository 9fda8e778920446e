//! `model-node rtd build`: the reference store of a model over reference examples, through the
//! node's own tokenizer, chat template and forward pass (deterministic: the same examples give the
//! same bytes).

use std::io::BufRead as _;
use std::path::Path;

use candle_core::IndexOp;
use serde::Deserialize;

use super::{Store, StoreModel};
use crate::engine::{Engine, PromptSpec};
use crate::error::{Error, Result};
use crate::template::Message;

/// One reference example.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Example {
    /// A conversation and its answer (the format of `eval/`): keys at every answer position and
    /// after its last character (whose value is EOS).
    Chat {
        /// The conversation.
        messages: Vec<Message>,
        /// The answer.
        answer: String,
    },
    /// Raw text: keys at every position after the first token.
    Raw {
        /// The text.
        text: String,
    },
}

/// Reads JSON Lines of examples; a bad line is an error naming the file and the line.
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    let bad = |msg: String| Error::RtdStore(format!("{}: {msg}", path.display()));
    let f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| bad(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let ex: Example = serde_json::from_str(&line).map_err(|e| {
            bad(format!(
                "line {}: {e}; expected {{\"messages\": [...], \"answer\": \"...\"}} or {{\"text\": \"...\"}}",
                i + 1
            ))
        })?;
        out.push(ex);
    }
    if out.is_empty() {
        return Err(bad("no examples".into()));
    }
    Ok(out)
}

/// The (key, value) pairs of one example: the hidden state before each answer token, and that
/// token.
fn pairs(engine: &Engine, ex: &Example) -> Result<Vec<(Vec<f32>, u32)>> {
    let codec = engine.codec();
    let vocab = &codec.vocab;
    let (tokens, first) = match ex {
        Example::Chat { messages, answer } => {
            let rendered = codec.render(&PromptSpec::Chat(messages.clone()))?;
            let mut tokens = codec.encode(&rendered, answer)?;
            let all = codec.bytes_of(&tokens);
            let Some(start) = all.len().checked_sub(answer.len()) else {
                return Ok(vec![]);
            };
            // The first token that starts at or after the answer's first byte.
            let mut off = 0;
            let mut first = tokens.len();
            for (i, &t) in tokens.iter().enumerate() {
                if off >= start {
                    first = i;
                    break;
                }
                off += vocab.token_bytes(t).map_or(0, <[u8]>::len);
            }
            if let Some(&eos) = vocab.eos_ids().first() {
                tokens.push(eos);
            }
            (tokens, first.max(1))
        }
        Example::Raw { text } => {
            let rendered = codec.render(&PromptSpec::Raw(text.clone()))?;
            (codec.encode(&rendered, "")?, 1)
        }
    };
    if tokens.len() < 2 || first >= tokens.len() {
        return Ok(vec![]);
    }
    let max = engine.model().max_positions();
    let tokens = &tokens[..tokens.len().min(max)];
    let hidden = engine.model().hidden_states(&tokens[..tokens.len() - 1])?;
    let mut out = Vec::with_capacity(tokens.len() - first);
    for (t, &token) in tokens.iter().enumerate().skip(first) {
        out.push((hidden.i(t - 1)?.to_vec1::<f32>()?, token));
    }
    Ok(out)
}

/// Builds the store of `engine`'s model over `examples`, with `progress` called after each.
pub fn build(
    engine: &Engine,
    model: StoreModel,
    examples: &[Example],
    progress: &mut dyn FnMut(usize),
) -> Result<Store> {
    let mut keys = Vec::new();
    let mut values = Vec::new();
    for (i, ex) in examples.iter().enumerate() {
        for (k, v) in pairs(engine, ex)? {
            keys.extend(k);
            values.push(v);
        }
        progress(i + 1);
    }
    Ok(Store {
        keys,
        values,
        model,
        examples: examples.len(),
    })
}
