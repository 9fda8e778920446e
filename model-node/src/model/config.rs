//! `config.json` → one [`ArchConfig`] for every supported architecture.
//!
//! HuggingFace configs of the Llama family share field names, so one serde struct reads them all;
//! per-architecture differences (fused projections, biases, Gemma's norms and soft-capping) become
//! flags on [`ArchConfig`].

use serde::Deserialize;

use crate::error::{Error, Result};

/// Architectures the node can serve (`model_type` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 1/2/3 (including Llama-3 rope scaling), TinyLlama, SmolLM, ...
    Llama,
    /// Qwen2 / Qwen2.5 (biases on q/k/v).
    Qwen2,
    /// Mistral (optional sliding window).
    Mistral,
    /// Phi-3 (fused qkv and gate/up projections).
    Phi3,
    /// Gemma 2 (extra norms, soft-capping, alternating sliding window).
    Gemma2,
}

/// Supported `model_type` values, for error messages.
pub const SUPPORTED: &str = "llama, qwen2, mistral, phi3, gemma2";

impl Arch {
    /// The `model_type` string.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Mistral => "mistral",
            Arch::Phi3 => "phi3",
            Arch::Gemma2 => "gemma2",
        }
    }

    fn from_model_type(s: &str) -> Option<Self> {
        Some(match s {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "mistral" => Arch::Mistral,
            "phi3" => Arch::Phi3,
            "gemma2" => Arch::Gemma2,
            _ => return None,
        })
    }

    fn from_architectures(s: &str) -> Option<Self> {
        Some(match s {
            "LlamaForCausalLM" => Arch::Llama,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "MistralForCausalLM" => Arch::Mistral,
            "Phi3ForCausalLM" => Arch::Phi3,
            "Gemma2ForCausalLM" => Arch::Gemma2,
            _ => return None,
        })
    }
}

/// Rotary embedding frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// Scaling factor.
        factor: f32,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        /// Scaling factor.
        factor: f32,
        /// Low-frequency factor.
        low_freq_factor: f32,
        /// High-frequency factor.
        high_freq_factor: f32,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: usize,
    },
    /// Each frequency divided by its own factor (GGUF's `rope_freqs`, how llama.cpp stores Llama 3.1's
    /// scaling).
    Factors(Vec<f32>),
}

/// Hidden activation of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (swish).
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
    /// GELU, exact.
    Gelu,
}

/// Everything the forward pass needs to know, for every architecture.
#[derive(Debug, Clone)]
pub struct ArchConfig {
    /// Which architecture.
    pub arch: Arch,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Rows of the embedding / output layer.
    pub vocab_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Longest supported context.
    pub max_position_embeddings: usize,
    /// Output layer shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections (Qwen2; Gemma2's `attention_bias`).
    pub qkv_bias: bool,
    /// MLP activation.
    pub activation: Activation,
    /// Sliding-window attention width, and whether it applies to every layer (`false`: even layers only, Gemma 2).
    pub sliding_window: Option<(usize, bool)>,
    /// Gemma 2: tanh soft-capping of attention logits.
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2: tanh soft-capping of output logits.
    pub final_logit_softcapping: Option<f64>,
    /// Attention scale is `query_pre_attn_scalar^-0.5` (Gemma 2) instead of `head_dim^-0.5`.
    pub query_pre_attn_scalar: Option<f64>,
    /// BOS token id from config.json, if any.
    pub bos_token_id: Option<u32>,
    /// EOS token ids from config.json.
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Deserialize)]
struct RawRopeScaling {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    hidden_size: usize,
    intermediate_size: usize,
    vocab_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRopeScaling>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    query_pre_attn_scalar: Option<f64>,
    bos_token_id: Option<OneOrMany>,
    eos_token_id: Option<OneOrMany>,
}

fn ids(v: Option<OneOrMany>) -> Vec<u32> {
    match v {
        None => vec![],
        Some(OneOrMany::One(x)) => vec![x],
        Some(OneOrMany::Many(v)) => v,
    }
}

impl ArchConfig {
    /// Parses `config.json` text. `path` only names the file in errors.
    pub fn from_json(text: &str, path: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| Error::ModelDir(format!("{path}: invalid config: {e}")))?;
        let arch = raw
            .model_type
            .as_deref()
            .and_then(Arch::from_model_type)
            .or_else(|| raw.architectures.iter().flatten().find_map(|a| Arch::from_architectures(a)))
            .ok_or_else(|| {
                Error::ModelDir(format!(
                    "{path}: unsupported architecture (model_type {:?}, architectures {:?}); supported: {SUPPORTED}",
                    raw.model_type.as_deref().unwrap_or("missing"),
                    raw.architectures.as_deref().unwrap_or_default()
                ))
            })?;
        let bad = |msg: String| Error::ModelDir(format!("{path}: {msg}"));
        if raw.num_attention_heads == 0
            || raw.hidden_size == 0
            || raw.num_hidden_layers == 0
            || raw.vocab_size == 0
        {
            return Err(bad(
                "hidden_size, num_attention_heads, num_hidden_layers and vocab_size must be positive".into(),
            ));
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if num_kv_heads == 0 || !raw.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({num_kv_heads})",
                raw.num_attention_heads
            )));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(bad(format!("head_dim {head_dim} must be even and positive")));
        }
        let rope_scaling = match raw.rope_scaling {
            None => RopeScaling::None,
            Some(s) => match s.rope_type.as_deref().unwrap_or("default") {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear {
                    factor: s
                        .factor
                        .ok_or_else(|| bad("rope_scaling.factor missing".into()))?,
                },
                "llama3" => RopeScaling::Llama3 {
                    factor: s
                        .factor
                        .ok_or_else(|| bad("rope_scaling.factor missing".into()))?,
                    low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                    original_max_position_embeddings: s.original_max_position_embeddings.unwrap_or(8192),
                },
                other => {
                    return Err(bad(format!(
                        "rope_scaling type {other:?} is not supported (supported: default, linear, llama3)"
                    )));
                }
            },
        };
        let act_name = raw
            .hidden_activation
            .or(raw.hidden_act)
            .unwrap_or_else(|| "silu".into());
        let activation = match act_name.as_str() {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            other => {
                return Err(bad(format!(
                    "hidden activation {other:?} is not supported (silu, gelu, gelu_pytorch_tanh)"
                )));
            }
        };
        let sliding_window = match arch {
            Arch::Mistral => raw.sliding_window.map(|w| (w, true)),
            Arch::Qwen2 if raw.use_sliding_window.unwrap_or(false) => raw.sliding_window.map(|w| (w, true)),
            Arch::Gemma2 => raw.sliding_window.map(|w| (w, false)),
            _ => None,
        };
        let gemma = arch == Arch::Gemma2;
        Ok(ArchConfig {
            arch,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            vocab_size: raw.vocab_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(gemma),
            qkv_bias: arch == Arch::Qwen2 || raw.attention_bias.unwrap_or(false),
            activation,
            sliding_window,
            attn_logit_softcapping: if gemma { raw.attn_logit_softcapping } else { None },
            final_logit_softcapping: if gemma { raw.final_logit_softcapping } else { None },
            query_pre_attn_scalar: if gemma { raw.query_pre_attn_scalar } else { None },
            bos_token_id: ids(raw.bos_token_id).first().copied(),
            eos_token_ids: ids(raw.eos_token_id),
        })
    }

    /// Number of parameters (weights) the config implies.
    pub fn parameter_count(&self) -> u64 {
        let (h, i, v) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.vocab_size as u64,
        );
        let q = (self.num_heads * self.head_dim) as u64;
        let kv = (self.num_kv_heads * self.head_dim) as u64;
        let bias = if self.qkv_bias { q + 2 * kv } else { 0 };
        let norms = if self.arch == Arch::Gemma2 { 4 * h } else { 2 * h };
        let layer = h * (q + 2 * kv) + bias + q * h + 3 * h * i + norms;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_layers as u64 * layer + h + head
    }
}
