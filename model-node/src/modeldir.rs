//! Opening a HuggingFace model directory: `config.json`, `tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json` (optional) and `model.safetensors` or a sharded
//! `model.safetensors.index.json`; or a GGUF file (`--model-dir` naming the file, or a directory
//! holding one `*.gguf` and no safetensors), whose metadata replaces `config.json` and may carry the
//! tokenizer and chat template when no `tokenizer.json` / `tokenizer_config.json` lies beside it.
//! Every failure names the file and what is wrong with it.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::model::gguf::{self, GgufFile};
use crate::model::{ArchConfig, SUPPORTED, Transformer};
use crate::template::ChatTemplate;

/// Everything read from a model directory except the weights.
pub struct ModelFiles {
    /// The directory.
    pub dir: PathBuf,
    /// Parsed `config.json`.
    pub config: ArchConfig,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template (or the plain fallback).
    pub template: ChatTemplate,
    /// BOS token text and id, if the tokenizer has one.
    pub bos: Option<(String, u32)>,
    /// Whether raw prompts start with BOS.
    pub add_bos: bool,
    /// EOS token ids (config, generation config and tokenizer config together).
    pub eos_ids: Vec<u32>,
    /// Where the weights are.
    pub weights: WeightFiles,
}

/// The files holding the weights.
pub enum WeightFiles {
    /// Safetensors (one file or the shards of an index).
    Safetensors(Vec<PathBuf>),
    /// One GGUF file, opened (metadata and tensor index read).
    Gguf(Box<GgufFile>),
}

impl WeightFiles {
    /// The files, for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Safetensors(f) => f
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            Self::Gguf(g) => g.path.display().to_string(),
        }
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::ModelDir(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| Error::ModelDir(format!("{}: invalid JSON: {e}", path.display())))
}

/// A special token in tokenizer_config.json: a string or `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

fn id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => vec![],
    }
}

impl ModelFiles {
    /// Reads and checks everything but the weights. `path` is a model directory or a `.gguf` file.
    pub fn open(path: &Path) -> Result<Self> {
        let (dir, gguf_path) = if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
            (
                path.parent().unwrap_or(Path::new(".")).to_owned(),
                Some(path.to_owned()),
            )
        } else if path.is_dir() {
            (path.to_owned(), lone_gguf(path)?)
        } else {
            return Err(Error::ModelDir(format!(
                "{} is neither a directory nor a .gguf file",
                path.display()
            )));
        };
        let dir = dir.as_path();
        let (config, weights) = match gguf_path {
            Some(p) => {
                let g = GgufFile::open(&p)?;
                (gguf::arch_config(&g)?, WeightFiles::Gguf(Box::new(g)))
            }
            None => {
                let cfg_path = dir.join("config.json");
                if !cfg_path.is_file() {
                    return Err(Error::ModelDir(format!(
                        "{} is missing: a HuggingFace model directory needs config.json (supported \
                         model_type: {SUPPORTED}), or give a GGUF file",
                        cfg_path.display()
                    )));
                }
                let cfg_text = std::fs::read_to_string(&cfg_path)
                    .map_err(|e| Error::ModelDir(format!("{}: {e}", cfg_path.display())))?;
                let config = ArchConfig::from_json(&cfg_text, &cfg_path.display().to_string())?;
                (config, WeightFiles::Safetensors(weight_files(dir)?))
            }
        };
        let gguf_file = match &weights {
            WeightFiles::Gguf(g) => Some(g.as_ref()),
            WeightFiles::Safetensors(_) => None,
        };

        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.is_file() {
            Tokenizer::from_file(&tok_path)
                .map_err(|e| Error::ModelDir(format!("{}: not a valid tokenizer: {e}", tok_path.display())))?
        } else if let Some(g) = gguf_file {
            crate::model::gguf::tokenizer_from_metadata(&g.content).map_err(|e| {
                Error::ModelDir(format!(
                    "{}: no tokenizer.json beside it, and its own tokenizer cannot be used ({e}): put \
                     the model's tokenizer.json in {}",
                    g.path.display(),
                    dir.display()
                ))
            })?
        } else {
            return Err(Error::ModelDir(format!("{} is missing", tok_path.display())));
        };

        let tc_path = dir.join("tokenizer_config.json");
        let tc = if tc_path.is_file() {
            read_json(&tc_path)?
        } else {
            Value::Null
        };
        let chat_template = match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
            _ => gguf_file.and_then(|g| g.meta_str("tokenizer.chat_template").map(str::to_owned)),
        };
        let bos_text = token_text(tc.get("bos_token"));
        let bos = bos_text
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t).map(|id| (t.to_owned(), id)))
            .or_else(|| {
                config
                    .bos_token_id
                    .and_then(|id| tokenizer.id_to_token(id).map(|t| (t, id)))
            });
        let eos_text = token_text(tc.get("eos_token"));
        let gguf_add_bos = gguf_file
            .and_then(|g| g.meta("tokenizer.ggml.add_bos_token"))
            .and_then(|v| v.to_bool().ok());
        let add_bos = tc
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .or(gguf_add_bos)
            .unwrap_or(bos.is_some() && bos_text.is_some());

        let mut eos_ids = config.eos_token_ids.clone();
        let gen_path = dir.join("generation_config.json");
        if gen_path.is_file() {
            eos_ids.extend(id_list(read_json(&gen_path)?.get("eos_token_id")));
        }
        if let Some(id) = eos_text.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let template = ChatTemplate::new(
            chat_template,
            bos.as_ref().map(|b| b.0.clone()).unwrap_or_default(),
            eos_text.unwrap_or_default(),
        )
        .map_err(|e| Error::ModelDir(format!("{}: {e}", tc_path.display())))?;

        Ok(Self {
            dir: dir.to_owned(),
            config,
            tokenizer,
            template,
            bos,
            add_bos,
            eos_ids,
            weights,
        })
    }

    /// The safetensors weights, memory-mapped (a GGUF directory has none).
    pub fn safetensors(&self, device: &Device, dtype: DType) -> Result<VarBuilder<'static>> {
        match &self.weights {
            WeightFiles::Safetensors(files) => mmap_weights(files, dtype, device),
            WeightFiles::Gguf(g) => Err(Error::ModelDir(format!(
                "{}: a GGUF file, not safetensors",
                g.path.display()
            ))),
        }
    }

    /// Loads the weights onto `device` as `dtype`, with rotary tables for `max_positions`.
    pub fn load_model(&self, device: &Device, dtype: DType, max_positions: usize) -> Result<Transformer> {
        let loaded = match &self.weights {
            WeightFiles::Safetensors(files) => {
                let vb = mmap_weights(files, dtype, device)?;
                Transformer::load(&self.config, vb, max_positions)
            }
            WeightFiles::Gguf(g) => {
                let w = gguf::GgufWeights::new(g, &self.config, device, dtype);
                Transformer::load_from(&self.config, &w, max_positions)
            }
        };
        loaded.map_err(|e| {
            let source = match &self.weights {
                WeightFiles::Safetensors(_) => "config.json",
                WeightFiles::Gguf(_) => "its metadata",
            };
            Error::ModelDir(format!(
                "{}: the weights do not match {source}: {}. A {} checkpoint must hold HuggingFace \
                 transformers' tensor names and shapes for that architecture (model.embed_tokens.weight \
                 [vocab, hidden], model.layers.N.*, model.norm.weight, and lm_head.weight unless \
                 tie_word_embeddings is true, when either of the two names may hold the shared matrix), \
                 or, in GGUF, llama.cpp's (token_embd, blk.N.*, output_norm, output). \
                 Supported architectures: {}.",
                self.weights.describe(),
                crate::error::candle_message(&e),
                self.config.arch.name(),
                crate::model::config::SUPPORTED,
            ))
        })
    }
}

/// The one `*.gguf` of a directory without safetensors (none: a safetensors directory).
fn lone_gguf(dir: &Path) -> Result<Option<PathBuf>> {
    if dir.join("model.safetensors").is_file() || dir.join("model.safetensors.index.json").is_file() {
        return Ok(None);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::ModelDir(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    found.sort();
    match found.len() {
        0 | 1 => Ok(found.pop()),
        _ => Err(Error::ModelDir(format!(
            "{} holds {} GGUF files ({}): name one with --model-dir FILE.gguf",
            dir.display(),
            found.len(),
            found
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(Error::ModelDir(format!(
            "{}: neither model.safetensors, model.safetensors.index.json nor a *.gguf file is present",
            dir.display()
        )));
    }
    let map = read_json(&index)?;
    let Some(Value::Object(weight_map)) = map.get("weight_map") else {
        return Err(Error::ModelDir(format!(
            "{}: no \"weight_map\" object",
            index.display()
        )));
    };
    let mut files: Vec<String> = weight_map
        .values()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    files.sort();
    files.dedup();
    let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        return Err(Error::ModelDir(format!(
            "{} (named by {}) is missing",
            missing.display(),
            index.display()
        )));
    }
    Ok(files)
}

#[allow(unsafe_code)]
fn mmap_weights(files: &[PathBuf], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    // SAFETY: the files are memory-mapped read-only; the node never writes them, and operators mount
    // model directories read-only (a file changed underneath a running node is outside our contract).
    unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }
        .map_err(|e| Error::ModelDir(format!("reading safetensors {files:?}: {e}")))
}
