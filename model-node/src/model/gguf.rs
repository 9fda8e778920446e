//! GGUF checkpoints, as llama.cpp writes them, through the same forward pass as safetensors.
//!
//! Reading: [`arch_config`] turns the file's metadata (`general.architecture`, `{arch}.block_count`,
//! ...) into an [`ArchConfig`]; [`GgufWeights`] answers HuggingFace tensor names with llama.cpp's
//! (`model.layers.3.self_attn.q_proj.weight` is `blk.3.attn_q.weight`), undoes the row permutation
//! llama.cpp's converter applies to Llama's query and key projections (its RoPE rotates interleaved
//! pairs, HuggingFace's rotates halves), and keeps Gemma's norm weights as stored. Float tensors
//! (F32, F16, BF16) become dense matrices, so an F32 GGUF computes exactly what its safetensors do;
//! quantized ones (Q8_0, Q4_K, ...) stay quantized and multiply through candle's `QMatMul`.
//!
//! Writing: [`convert`] writes a HuggingFace directory as GGUF with the same conventions (names,
//! permutation, metadata, the tokenizer as `tokenizer.ggml.*` where llama.cpp has a model for it:
//! `gguf_vocab`), every matrix in the GGML type asked for, and copies the tokenizer files beside it.

pub use super::gguf_vocab::{metadata as tokenizer_metadata, tokenizer as tokenizer_from_metadata};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use super::config::{Activation, Arch, ArchConfig, RopeScaling, SUPPORTED};
use super::weights::{Linear, WeightSource};
use crate::error::{Error, Result};

type CResult<T> = candle_core::Result<T>;

/// llama.cpp's architecture name for ours (Mistral is written as `llama`, as llama.cpp does).
fn gguf_arch(arch: Arch) -> &'static str {
    match arch {
        Arch::Llama | Arch::Mistral => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::Phi3 => "phi3",
        Arch::Gemma2 => "gemma2",
    }
}

/// Whether llama.cpp permutes the rows of the query and key projections for `arch`.
fn permuted(arch: Arch) -> bool {
    matches!(arch, Arch::Llama | Arch::Mistral)
}

/// The llama.cpp name of a HuggingFace tensor name (none: not a tensor this model has).
pub fn gguf_name(arch: Arch, hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "lm_head.weight" => Some("output.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_owned());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let gemma = arch == Arch::Gemma2;
    let name = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if gemma => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.qkv_proj" => "attn_qkv",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" | "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{name}.{kind}"))
}

/// The permutation llama.cpp applies to the rows of a query/key matrix of `heads` heads: GGUF row
/// `h·d + 2i + t` holds HuggingFace row `h·d + t·d/2 + i`. Returns, for each HuggingFace row, its GGUF row.
fn hf_rows_from_gguf(rows: usize, heads: usize) -> Vec<usize> {
    let d = rows / heads.max(1);
    (0..rows)
        .map(|r| {
            let (h, j) = (r / d, r % d);
            let (t, i) = (j / (d / 2), j % (d / 2));
            h * d + 2 * i + t
        })
        .collect()
}

/// Reorders the rows of a GGML tensor (rows are whole blocks, so quantized rows move as bytes).
/// `from[r]` is the source row of destination row `r`.
fn reorder_rows(q: &QTensor, from: &[usize], device: &Device) -> CResult<QTensor> {
    let dims = q.shape().dims().to_vec();
    let data = q.data()?;
    let rows = dims.first().copied().unwrap_or(1);
    if from.len() != rows || data.len() % rows != 0 {
        candle_core::bail!("cannot reorder {rows} rows of {:?}", dims);
    }
    let row = data.len() / rows;
    let mut out = Vec::with_capacity(data.len());
    for &r in from {
        out.extend_from_slice(&data[r * row..(r + 1) * row]);
    }
    QTensor::new(QStorage::from_data(Cow::Owned(out), device, q.dtype())?, dims)
}

/// A GGUF file opened for reading: its metadata and tensor index (the tensors are read on demand).
pub struct GgufFile {
    /// The file.
    pub path: PathBuf,
    /// Metadata and tensor index.
    pub content: Content,
    file: Mutex<File>,
}

impl GgufFile {
    /// Opens and indexes `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |e: String| Error::ModelDir(format!("{}: {e}", path.display()));
        let mut file = File::open(path).map_err(|e| bad(e.to_string()))?;
        let content = Content::read(&mut file).map_err(|e| bad(format!("not a GGUF file: {e}")))?;
        Ok(Self {
            path: path.to_owned(),
            content,
            file: Mutex::new(file),
        })
    }

    /// A metadata value.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// A metadata integer (any integer type).
    pub fn meta_u64(&self, key: &str) -> Option<u64> {
        match self.meta(key)? {
            Value::U8(v) => Some(u64::from(*v)),
            Value::U16(v) => Some(u64::from(*v)),
            Value::U32(v) => Some(u64::from(*v)),
            Value::U64(v) => Some(*v),
            Value::I8(v) => u64::try_from(*v).ok(),
            Value::I16(v) => u64::try_from(*v).ok(),
            Value::I32(v) => u64::try_from(*v).ok(),
            Value::I64(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    /// A metadata float (F32 or F64).
    pub fn meta_f64(&self, key: &str) -> Option<f64> {
        match self.meta(key)? {
            Value::F32(v) => Some(f64::from(*v)),
            Value::F64(v) => Some(*v),
            _ => None,
        }
    }

    /// A metadata string.
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta(key)?.to_string().ok().map(String::as_str)
    }

    /// The tensor `name` (llama.cpp's name), read onto the CPU.
    pub fn qtensor(&self, name: &str) -> CResult<QTensor> {
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        self.content.tensor(&mut *f, name, &Device::Cpu)
    }
}

/// The model's configuration from a GGUF file's metadata.
pub fn arch_config(g: &GgufFile) -> Result<ArchConfig> {
    let path = g.path.display().to_string();
    let bad = |m: String| Error::ModelDir(format!("{path}: {m}"));
    let name = g
        .meta_str("general.architecture")
        .ok_or_else(|| bad("no general.architecture in the metadata".into()))?
        .to_owned();
    let arch = match name.as_str() {
        "llama" => Arch::Llama,
        "mistral" => Arch::Mistral,
        "qwen2" => Arch::Qwen2,
        "phi3" => Arch::Phi3,
        "gemma2" => Arch::Gemma2,
        other => {
            return Err(bad(format!(
                "GGUF architecture {other:?} is not supported (supported: {SUPPORTED})"
            )));
        }
    };
    let need = |k: &str| {
        g.meta_u64(&format!("{name}.{k}"))
            .map(|v| v as usize)
            .ok_or_else(|| bad(format!("metadata {name}.{k} is missing")))
    };
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let kv_heads = g
        .meta_u64(&format!("{name}.attention.head_count_kv"))
        .map_or(heads, |v| v as usize);
    if hidden == 0 || heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(bad(format!(
            "embedding_length {hidden}, head_count {heads}, head_count_kv {kv_heads}: not a valid shape"
        )));
    }
    let head_dim = g
        .meta_u64(&format!("{name}.attention.key_length"))
        .map_or(hidden / heads, |v| v as usize);
    let embed = g
        .content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| bad("no token_embd.weight tensor".into()))?;
    let vocab = embed.shape.dims().first().copied().unwrap_or(0);
    let has = |t: &str| g.content.tensor_infos.contains_key(t);
    let rope_scaling = if has("rope_freqs.weight") {
        let f = g
            .qtensor("rope_freqs.weight")
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|t| t.to_dtype(DType::F32)?.to_vec1::<f32>())
            .map_err(|e| bad(format!("rope_freqs.weight: {e}")))?;
        RopeScaling::Factors(f)
    } else {
        match g.meta_str(&format!("{name}.rope.scaling.type")) {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: g
                    .meta_f64(&format!("{name}.rope.scaling.factor"))
                    .ok_or_else(|| bad("rope.scaling.factor missing".into()))? as f32,
            },
            Some(other) => {
                return Err(bad(format!(
                    "rope scaling {other:?} is not supported (none, linear, llama3 factors)"
                )));
            }
        }
    };
    let gemma = arch == Arch::Gemma2;
    let window = g
        .meta_u64(&format!("{name}.attention.sliding_window"))
        .map(|w| w as usize);
    let eos: Vec<u32> = g
        .meta_u64("tokenizer.ggml.eos_token_id")
        .map(|v| v as u32)
        .into_iter()
        .collect();
    Ok(ArchConfig {
        arch,
        hidden_size: hidden,
        intermediate_size: need("feed_forward_length")?,
        vocab_size: vocab,
        num_layers: need("block_count")?,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rms_norm_eps: g
            .meta_f64(&format!("{name}.attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-6),
        rope_theta: g.meta_f64(&format!("{name}.rope.freq_base")).unwrap_or(10_000.0),
        rope_scaling,
        max_position_embeddings: g
            .meta_u64(&format!("{name}.context_length"))
            .map_or(4096, |v| v as usize),
        tie_word_embeddings: !has("output.weight"),
        qkv_bias: has("blk.0.attn_q.bias") || has("blk.0.attn_output.bias"),
        activation: if gemma {
            Activation::GeluTanh
        } else {
            Activation::Silu
        },
        sliding_window: match arch {
            Arch::Gemma2 => window.map(|w| (w, false)),
            Arch::Llama | Arch::Mistral | Arch::Qwen2 => window.map(|w| (w, true)),
            Arch::Phi3 => None,
        },
        attn_logit_softcapping: g
            .meta_f64(&format!("{name}.attn_logit_softcapping"))
            .filter(|_| gemma),
        final_logit_softcapping: g
            .meta_f64(&format!("{name}.final_logit_softcapping"))
            .filter(|_| gemma),
        query_pre_attn_scalar: if gemma {
            g.meta_f64(&format!("{name}.attention.query_pre_attn_scalar"))
                .or(Some(head_dim as f64))
        } else {
            None
        },
        bos_token_id: g.meta_u64("tokenizer.ggml.bos_token_id").map(|v| v as u32),
        eos_token_ids: eos,
    })
}

/// The weights of a GGUF file, by HuggingFace names.
pub struct GgufWeights<'a> {
    file: &'a GgufFile,
    cfg: &'a ArchConfig,
    device: Device,
    dtype: DType,
}

impl<'a> GgufWeights<'a> {
    /// Dense tensors become `dtype` on `device`; quantized matrices stay quantized on `device`.
    pub fn new(file: &'a GgufFile, cfg: &'a ArchConfig, device: &Device, dtype: DType) -> Self {
        Self {
            file,
            cfg,
            device: device.clone(),
            dtype,
        }
    }

    fn qtensor(&self, hf: &str) -> CResult<QTensor> {
        let name = gguf_name(self.cfg.arch, hf)
            .ok_or_else(|| candle_core::Error::Msg(format!("no GGUF name for {hf}")))?;
        let q = self
            .file
            .qtensor(&name)
            .map_err(|e| candle_core::Error::Msg(format!("{name} ({hf}): {e}")))?;
        let heads = if hf.ends_with("q_proj.weight") {
            Some(self.cfg.num_heads)
        } else if hf.ends_with("k_proj.weight") {
            Some(self.cfg.num_kv_heads)
        } else {
            None
        };
        match heads {
            Some(h) if permuted(self.cfg.arch) => {
                let rows = q.shape().dims().first().copied().unwrap_or(0);
                reorder_rows(&q, &hf_rows_from_gguf(rows, h), &self.device)
            }
            _ if !self.device.is_cpu() => {
                let dims = q.shape().dims().to_vec();
                QTensor::new(QStorage::from_data(q.data()?, &self.device, q.dtype())?, dims)
            }
            _ => Ok(q),
        }
    }
}

impl WeightSource for GgufWeights<'_> {
    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(self.cfg.arch, name).is_some_and(|g| self.file.content.tensor_infos.contains_key(&g))
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> CResult<Tensor> {
        let t = self
            .qtensor(name)?
            .dequantize(&self.device)?
            .to_dtype(self.dtype)?;
        if t.dims() != shape {
            candle_core::bail!(
                "{name}: shape {:?} in the GGUF file, {shape:?} expected",
                t.dims()
            );
        }
        Ok(t)
    }

    fn linear(&self, prefix: &str, inp: usize, out: usize, bias: bool) -> CResult<Linear> {
        let name = format!("{prefix}.weight");
        let q = self.qtensor(&name)?;
        if q.shape().dims() != [out, inp] {
            candle_core::bail!(
                "{name}: shape {:?} in the GGUF file, {:?} expected",
                q.shape().dims(),
                [out, inp]
            );
        }
        let b = if bias {
            Some(self.tensor(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Linear::from_qtensor(q, self.dtype, &self.device, b)
    }

    fn tied_head(&self, embed: &Tensor) -> CResult<Linear> {
        // A float embedding is already dense: share it. A quantized one is read again, to multiply
        // through QMatMul instead of as a dequantized copy.
        let stored = gguf_name(self.cfg.arch, "model.embed_tokens.weight")
            .and_then(|n| self.file.content.tensor_infos.get(&n))
            .map(|t| t.ggml_dtype);
        match stored {
            Some(GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) | None => {
                Ok(Linear::dense(embed.clone(), None))
            }
            Some(_) => Linear::from_qtensor(
                self.qtensor("model.embed_tokens.weight")?,
                self.dtype,
                &self.device,
                None,
            ),
        }
    }

    fn norms_stored_whole(&self) -> bool {
        true
    }
}

/// What [`convert`] writes the matrices as: one GGML type, or one of llama.cpp's k-quant mixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    /// Every matrix in this type.
    Type(GgmlDType),
    /// llama.cpp's `Q4_K_M`: Q4_K, with Q6_K for the output head and for the value projections and
    /// MLP down projections of the layers that matter most (the first and last eighth and every third
    /// between), Q5_K for fused QKV projections.
    Q4KM,
    /// llama.cpp's `Q5_K_M`: the same rule over Q5_K (fused QKV projections Q6_K).
    Q5KM,
}

impl From<GgmlDType> for Quant {
    fn from(t: GgmlDType) -> Self {
        Quant::Type(t)
    }
}

/// llama.cpp's `use_more_bits`: the layers whose value and MLP down projections a `_M` mix keeps
/// at Q6_K.
fn more_bits(layer: usize, layers: usize) -> bool {
    let first = layers / 8;
    layer < first || layer >= 7 * layers / 8 || (layer - first) % 3 == 2
}

impl Quant {
    /// The type of the matrix with GGUF name `name` (before the block-size fallback), in a model of
    /// `layers` layers whose output head is `tied` to the embedding.
    fn of(self, name: &str, layers: usize, tied: bool) -> GgmlDType {
        let (base, qkv) = match self {
            Quant::Type(t) => return t,
            Quant::Q4KM => (GgmlDType::Q4K, GgmlDType::Q5K),
            Quant::Q5KM => (GgmlDType::Q5K, GgmlDType::Q6K),
        };
        if name == "output.weight" || (tied && name == "token_embd.weight") {
            return GgmlDType::Q6K;
        }
        let layer = name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        match layer {
            Some(i) if name.ends_with(".attn_v.weight") || name.ends_with(".ffn_down.weight") => {
                if more_bits(i, layers) {
                    GgmlDType::Q6K
                } else {
                    base
                }
            }
            Some(_) if name.ends_with(".attn_qkv.weight") => qkv,
            _ => base,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`) for the file, when it has one.
    fn file_type(self) -> Option<u32> {
        Some(match self {
            Quant::Type(GgmlDType::F32) => 0,
            Quant::Type(GgmlDType::F16) => 1,
            Quant::Type(GgmlDType::Q4_0) => 2,
            Quant::Type(GgmlDType::Q4_1) => 3,
            Quant::Type(GgmlDType::Q8_0) => 7,
            Quant::Type(GgmlDType::Q5_0) => 8,
            Quant::Type(GgmlDType::Q5_1) => 9,
            Quant::Type(GgmlDType::Q2K) => 10,
            Quant::Q4KM => 15,
            Quant::Q5KM => 17,
            Quant::Type(GgmlDType::Q6K) => 18,
            Quant::Type(GgmlDType::BF16) => 32,
            Quant::Type(_) => return None,
        })
    }
}

/// GGML types and mixes `convert` writes, by their llama.cpp names.
pub fn parse_type(s: &str) -> std::result::Result<Quant, String> {
    Ok(Quant::Type(match s.to_ascii_lowercase().as_str() {
        "f32" => GgmlDType::F32,
        "f16" => GgmlDType::F16,
        "bf16" => GgmlDType::BF16,
        "q8_0" => GgmlDType::Q8_0,
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q2_k" => GgmlDType::Q2K,
        "q3_k" => GgmlDType::Q3K,
        "q4_k" => GgmlDType::Q4K,
        "q5_k" => GgmlDType::Q5K,
        "q6_k" => GgmlDType::Q6K,
        "q4_k_m" => return Ok(Quant::Q4KM),
        "q5_k_m" => return Ok(Quant::Q5KM),
        other => {
            return Err(format!(
                "{other:?}: expected f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, \
                 q6_k, q4_k_m or q5_k_m"
            ));
        }
    }))
}

/// What [`convert`] wrote.
#[derive(Debug)]
pub struct Converted {
    /// The GGUF file.
    pub file: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Tensors per GGML type (matrices whose rows are not a whole number of the asked type's blocks
    /// fall back to Q8_0, or F16, or F32, as llama.cpp does).
    pub types: HashMap<String, usize>,
}

fn matrix_type(want: GgmlDType, cols: usize) -> GgmlDType {
    [want, GgmlDType::Q8_0, GgmlDType::F16, GgmlDType::F32]
        .into_iter()
        .find(|t| cols.is_multiple_of(t.block_size()))
        .unwrap_or(GgmlDType::F32)
}

/// Writes the HuggingFace directory `src` as `out/model.gguf`, every matrix as `ty` says (norms and
/// biases F32), with llama.cpp's names, permutation and metadata, and copies the tokenizer files
/// beside it.
pub fn convert(src: &Path, out: &Path, ty: impl Into<Quant>) -> Result<Converted> {
    let ty: Quant = ty.into();
    use crate::modeldir::ModelFiles;
    let files = ModelFiles::open(src)?;
    let cfg = files.config.clone();
    let arch = gguf_arch(cfg.arch);
    let vb = files.safetensors(&Device::Cpu, DType::F32)?;
    let w: &dyn WeightSource = &vb;
    let fail = |e: candle_core::Error| Error::ModelDir(format!("{}: {e}", src.display()));

    let mut names: Vec<String> = vec!["model.embed_tokens.weight".into()];
    let tied = cfg.tie_word_embeddings && !w.contains("lm_head.weight");
    if !w.contains("model.embed_tokens.weight") {
        // Tied, stored only as lm_head.weight (tinystories656K): the embedding is that matrix.
        names[0] = "lm_head.weight".into();
    }
    for i in 0..cfg.num_layers {
        let l = format!("model.layers.{i}");
        let mut per = vec!["input_layernorm", "post_attention_layernorm"];
        if cfg.arch == Arch::Gemma2 {
            per.extend(["pre_feedforward_layernorm", "post_feedforward_layernorm"]);
        }
        names.extend(per.iter().map(|n| format!("{l}.{n}.weight")));
        let mods: &[&str] = if cfg.arch == Arch::Phi3 {
            &[
                "self_attn.qkv_proj",
                "self_attn.o_proj",
                "mlp.gate_up_proj",
                "mlp.down_proj",
            ]
        } else {
            &[
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ]
        };
        for m in mods {
            names.push(format!("{l}.{m}.weight"));
            let bias = format!("{l}.{m}.bias");
            if w.contains(&bias) {
                names.push(bias);
            }
        }
    }
    names.push("model.norm.weight".into());
    if !tied {
        names.push("lm_head.weight".into());
    }

    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    let mut types: HashMap<String, usize> = HashMap::new();
    for (k, hf) in names.iter().enumerate() {
        let target = if k == 0 {
            "model.embed_tokens.weight"
        } else {
            hf.as_str()
        };
        let gname =
            gguf_name(cfg.arch, target).ok_or_else(|| Error::ModelDir(format!("{hf}: no GGUF name")))?;
        let mut t = vb.get_unchecked_dtype(hf, DType::F32).map_err(fail)?;
        let gemma_norm = cfg.arch == Arch::Gemma2 && hf.ends_with("norm.weight");
        if gemma_norm {
            t = (t + 1.0).map_err(fail)?;
        }
        if permuted(cfg.arch) && (hf.ends_with("q_proj.weight") || hf.ends_with("k_proj.weight")) {
            let heads = if hf.ends_with("q_proj.weight") {
                cfg.num_heads
            } else {
                cfg.num_kv_heads
            };
            let rows = t.dim(0).map_err(fail)?;
            // The inverse of hf_rows_from_gguf: GGUF row g holds HuggingFace row inv[g].
            let map = hf_rows_from_gguf(rows, heads);
            let mut inv = vec![0u32; rows];
            for (hf_row, g_row) in map.iter().enumerate() {
                inv[*g_row] = hf_row as u32;
            }
            let idx = Tensor::from_vec(inv, rows, &Device::Cpu).map_err(fail)?;
            t = t.index_select(&idx, 0).map_err(fail)?;
        }
        let qt = if t.rank() == 2 {
            matrix_type(ty.of(&gname, cfg.num_layers, tied), t.dim(1).map_err(fail)?)
        } else {
            GgmlDType::F32
        };
        let q = QTensor::quantize(&t, qt).map_err(fail)?;
        *types.entry(format!("{qt:?}")).or_default() += 1;
        tensors.push((gname, q));
    }
    if let RopeScaling::Llama3 { .. } = cfg.rope_scaling {
        let f = super::transformer::rope_factors(&cfg);
        let t = Tensor::from_vec(f.clone(), f.len(), &Device::Cpu).map_err(fail)?;
        tensors.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32).map_err(fail)?,
        ));
    }

    let a = |k: &str| format!("{arch}.{k}");
    let u32v = |v: usize| Value::U32(v as u32);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            "general.name".into(),
            Value::String(
                src.file_name()
                    .map_or("model".into(), |n| n.to_string_lossy().into_owned()),
            ),
        ),
        (a("context_length"), u32v(cfg.max_position_embeddings)),
        (a("embedding_length"), u32v(cfg.hidden_size)),
        (a("feed_forward_length"), u32v(cfg.intermediate_size)),
        (a("block_count"), u32v(cfg.num_layers)),
        (a("attention.head_count"), u32v(cfg.num_heads)),
        (a("attention.head_count_kv"), u32v(cfg.num_kv_heads)),
        (a("attention.key_length"), u32v(cfg.head_dim)),
        (a("attention.value_length"), u32v(cfg.head_dim)),
        (a("rope.dimension_count"), u32v(cfg.head_dim)),
        (
            a("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (a("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
    ];
    if let Some(ft) = ty.file_type() {
        meta.push(("general.file_type".into(), Value::U32(ft)));
    }
    if let RopeScaling::Linear { factor } = cfg.rope_scaling {
        meta.push((a("rope.scaling.type"), Value::String("linear".into())));
        meta.push((a("rope.scaling.factor"), Value::F32(factor)));
    }
    if let Some((w, _)) = cfg.sliding_window {
        meta.push((a("attention.sliding_window"), u32v(w)));
    }
    for (k, v) in [
        ("attn_logit_softcapping", cfg.attn_logit_softcapping),
        ("final_logit_softcapping", cfg.final_logit_softcapping),
        ("attention.query_pre_attn_scalar", cfg.query_pre_attn_scalar),
    ] {
        if let Some(v) = v {
            meta.push((a(k), Value::F32(v as f32)));
        }
    }
    if let Some((_, id)) = &files.bos {
        meta.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(*id)));
    }
    if let Some(id) = files.eos_ids.first() {
        meta.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(*id)));
    }

    if let Ok(text) = std::fs::read_to_string(src.join("tokenizer.json")) {
        meta.extend(super::gguf_vocab::metadata(&text, files.add_bos, cfg.vocab_size));
    }

    std::fs::create_dir_all(out).map_err(|e| Error::ModelDir(format!("{}: {e}", out.display())))?;
    let path = out.join("model.gguf");
    let io = |e: std::io::Error| Error::ModelDir(format!("{}: {e}", path.display()));
    let mut f = std::io::BufWriter::new(File::create(&path).map_err(io)?);
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).map_err(fail)?;
    drop(f);
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
    ] {
        let from = src.join(name);
        if from.is_file() {
            std::fs::copy(&from, out.join(name))
                .map_err(|e| Error::ModelDir(format!("{}: {e}", from.display())))?;
        }
    }
    let bytes = std::fs::metadata(&path).map_err(io)?.len();
    Ok(Converted {
        file: path,
        bytes,
        types,
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_m_mixes_keep_llama_cpps_layers_at_q6_k() {
        // llama.cpp's use_more_bits over 32 layers: the first and last four, and every third between.
        let more: Vec<usize> = (0..32).filter(|&i| super::more_bits(i, 32)).collect();
        assert_eq!(more, [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]);
        let q = super::Quant::Q4KM;
        assert_eq!(q.of("output.weight", 32, false), GgmlDType::Q6K);
        assert_eq!(q.of("token_embd.weight", 32, false), GgmlDType::Q4K);
        assert_eq!(
            q.of("token_embd.weight", 32, true),
            GgmlDType::Q6K,
            "tied: the head"
        );
        assert_eq!(q.of("blk.6.attn_v.weight", 32, false), GgmlDType::Q6K);
        assert_eq!(q.of("blk.7.ffn_down.weight", 32, false), GgmlDType::Q4K);
        assert_eq!(q.of("blk.7.attn_qkv.weight", 32, false), GgmlDType::Q5K);
        assert_eq!(q.of("blk.7.ffn_up.weight", 32, false), GgmlDType::Q4K);
        assert_eq!(
            super::Quant::Q5KM.of("blk.3.ffn_gate.weight", 32, false),
            GgmlDType::Q5K
        );
        assert_eq!(super::parse_type("Q4_K_M"), Ok(super::Quant::Q4KM));
        assert!(super::parse_type("q4_k_s").is_err());
    }

    use super::*;

    #[test]
    fn the_row_permutation_is_llama_cpps() {
        // Two heads of width 4: HF rows [a0 a1 b0 b1] (halves a, b) become GGUF [a0 b0 a1 b1].
        let map = hf_rows_from_gguf(8, 2);
        assert_eq!(map, vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }

    #[test]
    fn names_follow_llama_cpp() {
        let n = |a, s| gguf_name(a, s);
        assert_eq!(
            n(Arch::Llama, "model.layers.3.self_attn.q_proj.weight").as_deref(),
            Some("blk.3.attn_q.weight")
        );
        assert_eq!(
            n(Arch::Qwen2, "model.layers.0.self_attn.k_proj.bias").as_deref(),
            Some("blk.0.attn_k.bias")
        );
        assert_eq!(
            n(Arch::Llama, "model.layers.1.post_attention_layernorm.weight").as_deref(),
            Some("blk.1.ffn_norm.weight")
        );
        assert_eq!(
            n(Arch::Gemma2, "model.layers.1.post_attention_layernorm.weight").as_deref(),
            Some("blk.1.post_attention_norm.weight")
        );
        assert_eq!(
            n(Arch::Phi3, "model.layers.2.mlp.gate_up_proj.weight").as_deref(),
            Some("blk.2.ffn_up.weight")
        );
        assert_eq!(n(Arch::Llama, "lm_head.weight").as_deref(), Some("output.weight"));
        assert_eq!(n(Arch::Llama, "model.layers.0.unknown.weight"), None);
    }
}
