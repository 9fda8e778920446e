//! One decoder-only transformer for every supported architecture, with the KV cache held outside the
//! model ([`KvCache`]) so that the engine can keep one per session, fork it for hypotheses, truncate it
//! to a common prefix, and broadcast it over a batch of candidates.
//!
//! Tensor names are HuggingFace's, so checkpoints load unchanged; `tests/parity.rs` checks the logits
//! against candle-transformers' own implementations of the same architectures.

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use super::config::{Activation, Arch, ArchConfig, RopeScaling};

type CResult<T> = candle_core::Result<T>;

/// Keys and values of every layer for a prefix of tokens: `(batch, kv_heads, len, head_dim)` per layer.
///
/// Tensors are immutable and reference counted: cloning a cache is cheap, and extending it creates new
/// tensors, so a cache can be forked and truncated freely.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache holds no position.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `n` positions (a view; no copy).
    pub fn truncate(&self, n: usize) -> CResult<KvCache> {
        if n >= self.len {
            return Ok(self.clone());
        }
        if n == 0 {
            return Ok(KvCache::default());
        }
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| Ok((k.narrow(2, 0, n)?, v.narrow(2, 0, n)?)))
            .collect::<CResult<Vec<_>>>()?;
        Ok(KvCache { layers, len: n })
    }

    /// Bytes of key/value storage this cache accounts for.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(vb: VarBuilder, dim: usize, eps: f64, plus_one: bool) -> CResult<Self> {
        let w = vb.get(dim, "weight")?;
        // Gemma stores the norm weight as an offset from 1.
        let weight = if plus_one { (w + 1.0)? } else { w };
        Ok(Self {
            weight,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps)
    }
}

fn linear(vb: VarBuilder, i: usize, o: usize, bias: bool) -> CResult<Linear> {
    if bias {
        candle_nn::linear(i, o, vb)
    } else {
        candle_nn::linear_no_bias(i, o, vb)
    }
}

enum Qkv {
    Split { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

enum GateUp {
    Split { gate: Linear, up: Linear },
    Fused(Linear),
}

struct Layer {
    input_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    /// Gemma 2 only: norms around the MLP.
    ff_norms: Option<(RmsNorm, RmsNorm)>,
    qkv: Qkv,
    o: Linear,
    gate_up: GateUp,
    down: Linear,
    sliding_window: Option<usize>,
}

/// The model: weights plus the rotary tables. Stateless between calls; all state is in [`KvCache`].
pub struct Transformer {
    cfg: ArchConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    dtype: DType,
}

fn inv_freq(cfg: &ArchConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let base: Vec<f32> = (0..d)
        .step_by(2)
        .map(|i| 1.0 / (cfg.rope_theta as f32).powf(i as f32 / d as f32))
        .collect();
    match cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let orig = original_max_position_embeddings as f32;
            let low_wavelen = orig / low_freq_factor;
            let high_wavelen = orig / high_freq_factor;
            base.into_iter()
                .map(|freq| {
                    let wavelen = 2.0 * std::f32::consts::PI / freq;
                    if wavelen < high_wavelen {
                        freq
                    } else if wavelen > low_wavelen {
                        freq / factor
                    } else {
                        let smooth =
                            (orig / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    }
                })
                .collect()
        }
    }
}

impl Transformer {
    /// Builds the model from weights with HuggingFace names. `max_positions` bounds the rotary tables.
    pub fn load(cfg: &ArchConfig, vb: VarBuilder, max_positions: usize) -> CResult<Self> {
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let gemma = cfg.arch == Arch::Gemma2;
        let m = vb.pp("model");
        let embed = candle_nn::embedding(cfg.vocab_size, h, m.pp("embed_tokens"))?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let lb = m.pp(format!("layers.{i}"));
            let attn = lb.pp("self_attn");
            let mlp = lb.pp("mlp");
            let (qkv, gate_up) = if cfg.arch == Arch::Phi3 {
                (
                    Qkv::Fused(linear(attn.pp("qkv_proj"), h, q_out + 2 * kv_out, false)?),
                    GateUp::Fused(linear(
                        mlp.pp("gate_up_proj"),
                        h,
                        2 * cfg.intermediate_size,
                        false,
                    )?),
                )
            } else {
                (
                    Qkv::Split {
                        q: linear(attn.pp("q_proj"), h, q_out, cfg.qkv_bias)?,
                        k: linear(attn.pp("k_proj"), h, kv_out, cfg.qkv_bias)?,
                        v: linear(attn.pp("v_proj"), h, kv_out, cfg.qkv_bias)?,
                    },
                    GateUp::Split {
                        gate: linear(mlp.pp("gate_proj"), h, cfg.intermediate_size, false)?,
                        up: linear(mlp.pp("up_proj"), h, cfg.intermediate_size, false)?,
                    },
                )
            };
            let o = linear(attn.pp("o_proj"), q_out, h, gemma && cfg.qkv_bias)?;
            let down = linear(mlp.pp("down_proj"), cfg.intermediate_size, h, false)?;
            let norm = |name: &str| RmsNorm::load(lb.pp(name), h, cfg.rms_norm_eps, gemma);
            let ff_norms = if gemma {
                Some((
                    norm("pre_feedforward_layernorm")?,
                    norm("post_feedforward_layernorm")?,
                ))
            } else {
                None
            };
            let sliding_window = match cfg.sliding_window {
                Some((w, true)) => Some(w),
                Some((w, false)) if i % 2 == 0 => Some(w),
                _ => None,
            };
            layers.push(Layer {
                input_norm: norm("input_layernorm")?,
                post_attn_norm: norm("post_attention_layernorm")?,
                ff_norms,
                qkv,
                o,
                gate_up,
                down,
                sliding_window,
            });
        }
        let norm = RmsNorm::load(m.pp("norm"), h, cfg.rms_norm_eps, gemma)?;
        let lm_head = if cfg.tie_word_embeddings && !vb.contains_tensor("lm_head.weight") {
            Linear::new(embed.embeddings().clone(), None)
        } else {
            linear(vb.pp("lm_head"), h, cfg.vocab_size, false)?
        };
        let freqs = inv_freq(cfg);
        let n = max_positions.max(1);
        let freqs = Tensor::from_vec(freqs.clone(), (1, freqs.len()), &Device::Cpu)?;
        let t = Tensor::arange(0u32, n as u32, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .reshape((n, 1))?;
        let angles = t.matmul(&freqs)?;
        let cos = angles.cos()?.to_dtype(dtype)?.to_device(&device)?;
        let sin = angles.sin()?.to_dtype(dtype)?.to_device(&device)?;
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            device,
            dtype,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ArchConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Positions the rotary tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// Runs `tokens` (shape `(batch, seq)`) after the positions in `cache` (batch 1 or `batch`).
    /// Returns f32 logits `(batch, seq, vocab)` when `all_logits`, else `(batch, vocab)` of the last
    /// position, and the extended cache.
    pub fn forward(&self, tokens: &Tensor, cache: &KvCache, all_logits: bool) -> CResult<(Tensor, KvCache)> {
        let (_batch, s) = tokens.dims2()?;
        let offset = cache.len;
        if offset + s > self.max_positions() {
            candle_core::bail!(
                "{} positions exceed the rotary table of {}",
                offset + s,
                self.max_positions()
            );
        }
        let mut x = self.embed.forward(tokens)?;
        if self.cfg.arch == Arch::Gemma2 {
            x = (x * (self.cfg.hidden_size as f64).sqrt())?;
        }
        let cos = self.cos.narrow(0, offset, s)?;
        let sin = self.sin.narrow(0, offset, s)?;
        let mut new_layers = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let past = cache.layers.get(i);
            let residual = x.clone();
            let hn = layer.input_norm.forward(&x)?;
            let (attn, kv) = self.attention(layer, &hn, past, offset, &cos, &sin)?;
            new_layers.push(kv);
            let attn = if layer.ff_norms.is_some() {
                layer.post_attn_norm.forward(&attn)?
            } else {
                attn
            };
            x = (residual + attn)?;
            let residual = x.clone();
            let hn = match &layer.ff_norms {
                Some((pre, _)) => pre.forward(&x)?,
                None => layer.post_attn_norm.forward(&x)?,
            };
            let mut m = self.mlp(layer, &hn)?;
            if let Some((_, post)) = &layer.ff_norms {
                m = post.forward(&m)?;
            }
            x = (residual + m)?;
        }
        let x = if all_logits { x } else { x.narrow(1, s - 1, 1)? };
        let x = self.norm.forward(&x)?;
        let mut logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        if let Some(cap) = self.cfg.final_logit_softcapping {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        let logits = if all_logits { logits } else { logits.squeeze(1)? };
        Ok((
            logits,
            KvCache {
                layers: new_layers,
                len: offset + s,
            },
        ))
    }

    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        past: Option<&(Tensor, Tensor)>,
        offset: usize,
        cos: &Tensor,
        sin: &Tensor,
    ) -> CResult<(Tensor, (Tensor, Tensor))> {
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let (q, k, v) = match &layer.qkv {
            Qkv::Split { q, k, v } => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
            Qkv::Fused(w) => {
                let qkv = w.forward(x)?;
                (
                    qkv.narrow(2, 0, nh * hd)?,
                    qkv.narrow(2, nh * hd, nkv * hd)?,
                    qkv.narrow(2, (nh + nkv) * hd, nkv * hd)?,
                )
            }
        };
        let q = q.reshape((b, s, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((b, s, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, s, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = match past {
            Some((pk, pv)) => {
                let (pk, pv) = if pk.dim(0)? != b {
                    (
                        pk.broadcast_as((b, nkv, offset, hd))?,
                        pv.broadcast_as((b, nkv, offset, hd))?,
                    )
                } else {
                    (pk.clone(), pv.clone())
                };
                (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?)
            }
            None => (k, v),
        };
        let kv = (k.clone(), v.clone());
        let rep = nh / nkv;
        let k = candle_transformers::utils::repeat_kv(k, rep)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v, rep)?.contiguous()?;
        let scale = match self.cfg.query_pre_attn_scalar {
            Some(q) => q.powf(-0.5),
            None => (hd as f64).powf(-0.5),
        };
        let q = q.to_dtype(DType::F32)?;
        let k = k.to_dtype(DType::F32)?;
        let mut att = (q.matmul(&k.t()?)? * scale)?;
        if let Some(cap) = self.cfg.attn_logit_softcapping {
            att = ((att / cap)?.tanh()? * cap)?;
        }
        let kv_len = offset + s;
        let needs_window = layer.sliding_window.is_some_and(|w| kv_len > w);
        if s > 1 || needs_window {
            let mask = self.mask(s, offset, layer.sliding_window)?;
            att = att.broadcast_add(&mask)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?.to_dtype(v.dtype())?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, s, nh * hd))?;
        Ok((layer.o.forward(&y)?, kv))
    }

    fn mask(&self, s: usize, offset: usize, window: Option<usize>) -> CResult<Tensor> {
        let kv_len = offset + s;
        let mut m = vec![0f32; s * kv_len];
        for i in 0..s {
            let pos = offset + i;
            for (j, slot) in m[i * kv_len..(i + 1) * kv_len].iter_mut().enumerate() {
                let masked = j > pos || window.is_some_and(|w| pos >= j + w);
                if masked {
                    *slot = f32::NEG_INFINITY;
                }
            }
        }
        Tensor::from_vec(m, (s, kv_len), &self.device)
    }

    fn mlp(&self, layer: &Layer, x: &Tensor) -> CResult<Tensor> {
        let (gate, up) = match &layer.gate_up {
            GateUp::Split { gate, up } => (gate.forward(x)?, up.forward(x)?),
            GateUp::Fused(w) => {
                let gu = w.forward(x)?;
                let i = self.cfg.intermediate_size;
                (gu.narrow(D::Minus1, 0, i)?, gu.narrow(D::Minus1, i, i)?)
            }
        };
        let gate = match self.cfg.activation {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            Activation::GeluTanh => gate.gelu()?,
            Activation::Gelu => gate.gelu_erf()?,
        };
        layer.down.forward(&(gate * up)?)
    }
}
