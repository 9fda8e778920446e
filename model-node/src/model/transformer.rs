//! One decoder-only transformer for every supported architecture, with the KV cache held outside the
//! model ([`KvCache`]) so that the engine can keep one per session, fork it for hypotheses, truncate it
//! to a common prefix, and broadcast it over a batch of candidates.
//!
//! Tensor names are HuggingFace's, so checkpoints load unchanged; `tests/parity.rs` checks the logits
//! against candle-transformers' own implementations of the same architectures.

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::weights::{Linear, WeightSource};

use super::config::{Activation, Arch, ArchConfig, RopeScaling};
pub use super::kv::KvCache;
use super::kv::KvShape;
use super::ragged;

type CResult<T> = candle_core::Result<T>;

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// `plus_one`: Gemma's safetensors store the norm weight as an offset from 1 (its GGUF files
    /// store the weight itself).
    fn load(w: &dyn WeightSource, name: &str, dim: usize, eps: f64, plus_one: bool) -> CResult<Self> {
        let t = w.tensor(name, &[dim])?;
        let weight = if plus_one { (t + 1.0)? } else { t };
        Ok(Self {
            weight,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps)
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

impl Layer {
    /// Every projection of the layer.
    fn projections(&self) -> impl Iterator<Item = &Linear> {
        let qkv: Vec<&Linear> = match &self.qkv {
            Qkv::Split { q, k, v } => vec![q, k, v],
            Qkv::Fused(w) => vec![w],
        };
        let gate_up: Vec<&Linear> = match &self.gate_up {
            GateUp::Split { gate, up } => vec![gate, up],
            GateUp::Fused(w) => vec![w],
        };
        qkv.into_iter()
            .chain([&self.o])
            .chain(gate_up)
            .chain([&self.down])
    }
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
    /// Co-LLM deferral heads: `(hidden, H)` (the vectors as columns) and the biases `(H,)`, f32.
    deferral: Option<(Tensor, Tensor)>,
    /// RTD: the reference store mixed into every next-token distribution.
    rtd: Option<std::sync::Arc<crate::rtd::Rtd>>,
    /// RTD: λ per row of the next [`Transformer::lm_logits`] calls (one value: every row; `None` in
    /// a row: the store's own), set by the engine around each call's forward passes.
    rtd_lambdas: std::sync::Mutex<Option<Vec<Option<f64>>>>,
}

/// One sequence's part of a [`Transformer::forward_chunks`] step.
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    /// The new tokens, right after `cache`.
    pub tokens: &'a [u32],
    /// The sequence's cache (batch 1).
    pub cache: &'a KvCache,
    /// Keep the new positions: the step returns the extended cache (a decode). Otherwise the rows
    /// are only computed (a scored candidate) and the cache is returned as it was.
    pub keep: bool,
}

/// What one [`Transformer::forward_chunks`] (or `forward_ragged`) step returns.
#[derive(Debug)]
pub struct RaggedStep {
    /// f32 logits `(n, vocab)`.
    pub logits: Tensor,
    /// f32 deferral logits `(n, H)` (`h·g_j + b_j` per head), when deferral heads are set.
    pub deferral: Option<Tensor>,
    /// The extended caches, one per sequence.
    pub caches: Vec<KvCache>,
}

fn base_freq(cfg: &ArchConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    (0..d)
        .step_by(2)
        .map(|i| 1.0 / (cfg.rope_theta as f32).powf(i as f32 / d as f32))
        .collect()
}

/// The factor each rotary frequency is divided by (llama.cpp's `rope_freqs` tensor): 1 without
/// scaling.
pub(crate) fn rope_factors(cfg: &ArchConfig) -> Vec<f32> {
    base_freq(cfg)
        .into_iter()
        .zip(inv_freq(cfg))
        .map(|(b, f)| b / f)
        .collect()
}

fn inv_freq(cfg: &ArchConfig) -> Vec<f32> {
    let base = base_freq(cfg);
    match &cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Factors(f) => base.into_iter().zip(f).map(|(b, f)| b / f).collect(),
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
        &RopeScaling::Llama3 {
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
    /// Builds the model from safetensors weights with HuggingFace names. `max_positions` bounds the
    /// rotary tables.
    pub fn load(cfg: &ArchConfig, vb: VarBuilder, max_positions: usize) -> CResult<Self> {
        Self::load_from(cfg, &vb, max_positions)
    }

    /// Builds the model from any [`WeightSource`] (safetensors, GGUF).
    pub fn load_from(cfg: &ArchConfig, w: &dyn WeightSource, max_positions: usize) -> CResult<Self> {
        let device = w.device().clone();
        let dtype = w.dtype();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let gemma = cfg.arch == Arch::Gemma2;
        let plus_one = gemma && !w.norms_stored_whole();
        // A tied checkpoint may store the shared matrix under either name (HF transformers accepts
        // both): tinystories656K, for one, ships only `lm_head.weight`.
        let embed_name = if cfg.tie_word_embeddings
            && !w.contains("model.embed_tokens.weight")
            && w.contains("lm_head.weight")
        {
            "lm_head.weight"
        } else {
            "model.embed_tokens.weight"
        };
        let embed = Embedding::new(w.tensor(embed_name, &[cfg.vocab_size, h])?, h);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let lp = format!("model.layers.{i}");
            let attn = format!("{lp}.self_attn");
            let mlp = format!("{lp}.mlp");
            let (qkv, gate_up) = if cfg.arch == Arch::Phi3 {
                (
                    Qkv::Fused(w.linear(&format!("{attn}.qkv_proj"), h, q_out + 2 * kv_out, false)?),
                    GateUp::Fused(w.linear(
                        &format!("{mlp}.gate_up_proj"),
                        h,
                        2 * cfg.intermediate_size,
                        false,
                    )?),
                )
            } else {
                // Stored apart, run stacked where dense: one product per step for the three input
                // projections and one for gate and up (fewer dispatches over the kernel pool and
                // fewer small tensors; every output row is computed as alone).
                let (q, k, v) = (
                    w.linear(&format!("{attn}.q_proj"), h, q_out, cfg.qkv_bias)?,
                    w.linear(&format!("{attn}.k_proj"), h, kv_out, cfg.qkv_bias)?,
                    w.linear(&format!("{attn}.v_proj"), h, kv_out, cfg.qkv_bias)?,
                );
                let qkv = match Linear::stacked(&[&q, &k, &v])? {
                    Some(fused) => Qkv::Fused(fused),
                    None => Qkv::Split { q, k, v },
                };
                let (gate, up) = (
                    w.linear(&format!("{mlp}.gate_proj"), h, cfg.intermediate_size, false)?,
                    w.linear(&format!("{mlp}.up_proj"), h, cfg.intermediate_size, false)?,
                );
                let gate_up = match Linear::stacked(&[&gate, &up])? {
                    Some(fused) => GateUp::Fused(fused),
                    None => GateUp::Split { gate, up },
                };
                (qkv, gate_up)
            };
            let o = w.linear(&format!("{attn}.o_proj"), q_out, h, gemma && cfg.qkv_bias)?;
            let down = w.linear(&format!("{mlp}.down_proj"), cfg.intermediate_size, h, false)?;
            let norm =
                |name: &str| RmsNorm::load(w, &format!("{lp}.{name}.weight"), h, cfg.rms_norm_eps, plus_one);
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
        let norm = RmsNorm::load(w, "model.norm.weight", h, cfg.rms_norm_eps, plus_one)?;
        let lm_head = if cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
            w.tied_head(embed.embeddings())?
        } else {
            w.linear("lm_head", h, cfg.vocab_size, false)?
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
            deferral: None,
            rtd: None,
            rtd_lambdas: std::sync::Mutex::new(None),
        })
    }

    /// Whether any projection holds GGML-quantized weights.
    pub fn is_quantized(&self) -> bool {
        self.lm_head.is_quantized()
            || self
                .layers
                .iter()
                .any(|l| l.projections().any(Linear::is_quantized))
    }

    /// One position through the model, its result dropped: candle repacks quantized weights for its
    /// x86 kernels on their first product, so a quantized model pays that once here, at load,
    /// rather than in the first request (at 150M parameters in Q8_0 the repack took ~1.2 s).
    /// Nothing is kept.
    pub fn warm_up(&self) -> CResult<()> {
        let input = Tensor::new(&[0u32], &self.device)?.unsqueeze(0)?;
        self.forward(&input, &KvCache::default(), false).map(drop)
    }

    /// Sets the RTD reference store: from then on every logits row is the log of
    /// `λ·r + (1−λ)·softmax(logits)` ([`crate::rtd`]).
    pub fn set_rtd(&mut self, rtd: std::sync::Arc<crate::rtd::Rtd>) {
        self.rtd = Some(rtd);
    }

    /// RTD: the λ of the rows of the next forward passes (a request's override; one value applies to
    /// every row), until set again; `None`: the store's own λ.
    pub fn set_rtd_lambdas(&self, lambdas: Option<Vec<Option<f64>>>) {
        if self.rtd.is_some()
            && let Ok(mut l) = self.rtd_lambdas.lock()
        {
            *l = lambdas;
        }
    }

    /// Sets the Co-LLM deferral heads: `heads` `(H, hidden)` (one vector g per assistant) and `bias`
    /// `(H,)`. Every [`Transformer::forward_ragged`] step then also returns the deferral logits
    /// `h·g + b` of its rows, `h` the last hidden state after the final norm.
    pub fn set_deferral(&mut self, heads: &Tensor, bias: &Tensor) -> CResult<()> {
        let (n, hidden) = heads.dims2()?;
        if hidden != self.cfg.hidden_size || bias.dims1()? != n || n == 0 {
            candle_core::bail!(
                "deferral heads {:?} and bias {:?} do not fit hidden size {}",
                heads.dims(),
                bias.dims(),
                self.cfg.hidden_size
            );
        }
        let g = heads
            .to_dtype(DType::F32)?
            .to_device(&self.device)?
            .t()?
            .contiguous()?;
        let b = bias.to_dtype(DType::F32)?.to_device(&self.device)?;
        self.deferral = Some((g, b));
        Ok(())
    }

    /// Deferral heads set (0: none).
    pub fn deferral_heads(&self) -> usize {
        self.deferral
            .as_ref()
            .and_then(|(g, _)| g.dim(1).ok())
            .unwrap_or(0)
    }

    /// The deferral logits `(n, H)` of normed hidden states `(n, hidden)`, when heads are set.
    fn deferral_logits(&self, normed: &Tensor) -> CResult<Option<Tensor>> {
        let Some((g, b)) = &self.deferral else {
            return Ok(None);
        };
        Ok(Some(normed.to_dtype(DType::F32)?.matmul(g)?.broadcast_add(b)?))
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

    /// `cache` with room for `positions` in all, appended to in place up to there (its own storage,
    /// or one copy into storage of the next power of two): a decode takes its room when it starts.
    pub fn reserve(&self, cache: &KvCache, positions: usize) -> CResult<KvCache> {
        cache.with_room(positions, &self.kv_shape(), &self.device)
    }

    fn kv_shape(&self) -> KvShape {
        KvShape {
            layers: self.layers.len(),
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            max_positions: self.max_positions(),
            dtype: self.dtype,
        }
    }

    /// The attention shape and options of `layer`, for the ragged decode kernel.
    fn attn_spec(&self, layer: &Layer) -> ragged::AttnSpec {
        ragged::AttnSpec {
            heads: self.cfg.num_heads,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            scale: self.attn_scale() as f32,
            softcap: self.cfg.attn_logit_softcapping.map(|c| c as f32),
            window: layer.sliding_window,
        }
    }

    /// The factor on query·key scores.
    fn attn_scale(&self) -> f64 {
        match self.cfg.query_pre_attn_scalar {
            Some(q) => q.powf(-0.5),
            None => (self.cfg.head_dim as f64).powf(-0.5),
        }
    }

    fn check_positions(&self, n: usize) -> CResult<()> {
        if n > self.max_positions() {
            candle_core::bail!(
                "{n} positions exceed the rotary table of {}",
                self.max_positions()
            );
        }
        Ok(())
    }

    /// Runs `tokens` (shape `(batch, seq)`) after the positions in `cache` (batch 1 or `batch`).
    /// Returns f32 logits `(batch, seq, vocab)` when `all_logits`, else `(batch, vocab)` of the last
    /// position, and the extended cache.
    pub fn forward(&self, tokens: &Tensor, cache: &KvCache, all_logits: bool) -> CResult<(Tensor, KvCache)> {
        let (b, s) = tokens.dims2()?;
        let offset = cache.len;
        self.check_positions(offset + s)?;
        // Batch 1 on the CPU kernel's path (a prefill): the positions as the rows of one sequence, as
        // in a `forward_chunks` step. The kernel computes only the causal triangle and allocates no
        // `(s, s)` scores or mask: a 481-token prefill spent ~10% of its samples in `expf` over the
        // masked half and ~25% in page faults on those buffers (stories260K).
        if b == 1 && s > 1 && ragged::supported(&self.device, self.dtype) {
            let ids = tokens.squeeze(0)?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
            let chunk = Chunk {
                tokens: &ids,
                cache,
                keep: true,
            };
            let (x, mut caches) = self.chunks_hidden(std::slice::from_ref(&chunk))?;
            let x = x.reshape((1, s, self.cfg.hidden_size))?;
            return Ok((self.logits(&x, all_logits)?, caches.pop().unwrap_or_default()));
        }
        let mut out = cache.for_append(b, s, &self.kv_shape(), &self.device)?;
        let cos = self.cos.narrow(0, offset, s)?;
        let sin = self.sin.narrow(0, offset, s)?;
        let x = self.layers_forward(tokens, &mut |li, layer, hn| {
            let (q, k, v) = self.project(layer, hn, &cos, &sin)?;
            self.attend(layer, li, (&q, &k, &v), &out, offset)
        })?;
        out.len = offset + s;
        Ok((self.logits(&x, all_logits)?, out))
    }

    /// One decode step of several sequences at once: `tokens[i]` follows `caches[i]` (each of batch 1,
    /// of any length), kept in the returned caches. [`Transformer::forward_chunks`] with one-token
    /// chunks.
    pub fn forward_ragged(&self, tokens: &[u32], caches: &[&KvCache]) -> CResult<RaggedStep> {
        if tokens.is_empty() || caches.len() != tokens.len() {
            candle_core::bail!(
                "forward_ragged: {} tokens for {} caches",
                tokens.len(),
                caches.len()
            );
        }
        let chunks: Vec<Chunk> = tokens
            .iter()
            .zip(caches)
            .map(|(t, c)| Chunk {
                tokens: std::slice::from_ref(t),
                cache: c,
                keep: true,
            })
            .collect();
        self.forward_chunks(&chunks)
    }

    /// One step over several sequences, each running one or more new tokens after its own cache
    /// (batch 1, any length): decode rows and scored candidates together. The embedding,
    /// projections, MLPs and LM head run once over all the rows (one product per weight); attention
    /// runs per sequence against its own cache and its own new rows (causal), so nothing is padded.
    /// Returns f32 logits `(rows, vocab)` (every row, in chunk order), the deferral logits
    /// `(rows, H)` when heads are set ([`Transformer::set_deferral`]), and per chunk its cache:
    /// extended when `keep`, else the input cache (read, never written, on the CPU kernel's path).
    pub fn forward_chunks(&self, chunks: &[Chunk]) -> CResult<RaggedStep> {
        let (x, caches) = self.chunks_hidden(chunks)?;
        let normed = self.norm.forward(&x)?;
        Ok(RaggedStep {
            logits: self.lm_logits(&normed)?.squeeze(1)?,
            deferral: self.deferral_logits(&normed.squeeze(1)?)?,
            caches,
        })
    }

    /// The layers of a [`Transformer::forward_chunks`] step: the last hidden states `(rows, 1,
    /// hidden)` (before the final norm) and per chunk its cache, as `forward_chunks` returns it.
    fn chunks_hidden(&self, chunks: &[Chunk]) -> CResult<(Tensor, Vec<KvCache>)> {
        let n: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        if n == 0 || chunks.iter().any(|c| c.tokens.is_empty()) {
            candle_core::bail!("forward_chunks: every chunk needs a token");
        }
        let shape = self.kv_shape();
        let kernel = ragged::supported(&self.device, self.dtype);
        let mut outs = Vec::with_capacity(chunks.len());
        let mut positions = Vec::with_capacity(n);
        let mut input = Vec::with_capacity(n);
        for c in chunks {
            let s = c.tokens.len();
            self.check_positions(c.cache.len + s)?;
            // Off the kernel's path, candle's attention writes the rows into claimed storage.
            outs.push(if c.keep || !kernel {
                c.cache.for_append(1, s, &shape, &self.device)?
            } else {
                c.cache.clone()
            });
            positions.extend((c.cache.len..c.cache.len + s).map(|p| p as u32));
            input.extend_from_slice(c.tokens);
        }
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let half = self.cos.dim(1)?;
        let cos = self.cos.index_select(&positions, 0)?.reshape((n, 1, half))?;
        let sin = self.sin.index_select(&positions, 0)?.reshape((n, 1, half))?;
        let input = Tensor::new(input.as_slice(), &self.device)?.reshape((n, 1))?;
        let x = self.layers_forward(&input, &mut |li, layer, hn| {
            let (q, k, v) = self.project(layer, hn, &cos, &sin)?;
            if kernel {
                let seqs: Vec<ragged::SeqRows> = chunks
                    .iter()
                    .zip(&outs)
                    .map(|(c, out)| ragged::SeqRows {
                        cache: out,
                        rows: c.tokens.len(),
                        write: c.keep,
                    })
                    .collect();
                return ragged::chunk_attention(&self.attn_spec(layer), li, (&q, &k, &v), &seqs);
            }
            let mut ys = Vec::with_capacity(chunks.len());
            let mut first = 0;
            for (c, out) in chunks.iter().zip(&outs) {
                let s = c.tokens.len();
                // Rows (s, heads, 1, head_dim) as one sequence (1, heads, s, head_dim).
                let seq = |t: &Tensor| t.narrow(0, first, s)?.transpose(0, 2);
                let y = self.attend(layer, li, (&seq(&q)?, &seq(&k)?, &seq(&v)?), out, out.len)?;
                ys.push(y.reshape((s, 1, self.cfg.num_heads * self.cfg.head_dim))?);
                first += s;
            }
            Tensor::cat(&ys, 0)
        })?;
        let caches = chunks
            .iter()
            .zip(outs)
            .map(|(c, mut out)| {
                if c.keep {
                    out.len += c.tokens.len();
                    out
                } else {
                    c.cache.clone()
                }
            })
            .collect();
        Ok((x, caches))
    }

    /// The deferral logits `(H,)` of the position holding `token` right after `cache` (the last
    /// position of a prefix, `cache` holding the rest): one position through the model, attending to
    /// `cache` without writing to it, so views of its storage stay untouched. `None` without heads.
    /// The decode's first position needs it; the prefill that computed its logits keeps no hidden state.
    pub fn deferral_after(&self, token: u32, cache: &KvCache) -> CResult<Option<Tensor>> {
        if self.deferral.is_none() {
            return Ok(None);
        }
        let offset = cache.len;
        self.check_positions(offset + 1)?;
        let cos = self.cos.narrow(0, offset, 1)?;
        let sin = self.sin.narrow(0, offset, 1)?;
        let input = Tensor::new(&[token], &self.device)?.reshape((1, 1))?;
        let x = self.layers_forward(&input, &mut |li, layer, hn| {
            let (q, k, v) = self.project(layer, hn, &cos, &sin)?;
            self.attend_detached(layer, li, (&q, &k, &v), cache, offset)
        })?;
        let normed = self.norm.forward(&x)?.reshape((1, self.cfg.hidden_size))?;
        self.deferral_logits(&normed)?.map(|d| d.squeeze(0)).transpose()
    }

    /// The last hidden state after the final norm at every position of `tokens` (run from an empty
    /// cache): f32 `(seq, hidden)`, the vectors the LM head multiplies (and the deferral heads'
    /// features; the trainer's path).
    pub fn hidden_states(&self, tokens: &[u32]) -> CResult<Tensor> {
        let s = tokens.len();
        self.check_positions(s)?;
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let out = KvCache::default().for_append(1, s, &self.kv_shape(), &self.device)?;
        let cos = self.cos.narrow(0, 0, s)?;
        let sin = self.sin.narrow(0, 0, s)?;
        let x = self.layers_forward(&input, &mut |li, layer, hn| {
            let (q, k, v) = self.project(layer, hn, &cos, &sin)?;
            self.attend(layer, li, (&q, &k, &v), &out, 0)
        })?;
        self.norm.forward(&x)?.squeeze(0)?.to_dtype(DType::F32)
    }

    /// f32 logits of normed hidden states (any leading shape, last dimension hidden): the LM head,
    /// the final soft-capping and, with an RTD store, the mixture with it (as log-probabilities).
    pub fn lm_logits(&self, normed: &Tensor) -> CResult<Tensor> {
        let normed = normed.to_dtype(self.dtype)?;
        let mut logits = self.lm_head.forward(&normed)?.to_dtype(DType::F32)?;
        if let Some(cap) = self.cfg.final_logit_softcapping {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        if let Some(rtd) = &self.rtd {
            let lambdas = self.rtd_lambdas.lock().ok().and_then(|l| l.clone());
            logits = rtd.mix(&logits, &normed, lambdas.as_deref())?;
        }
        Ok(logits)
    }

    /// The mean of the LM head's rows, f32 `(hidden,)`: Co-LLM's initial deferral vector.
    pub fn lm_head_mean(&self) -> CResult<Tensor> {
        self.lm_head.weight_f32()?.mean(0)
    }

    /// Embedding and every layer; `attention(layer index, layer, normed input)` returns the attention
    /// output before the output projection, `(batch, seq, heads * head_dim)`.
    fn layers_forward(
        &self,
        tokens: &Tensor,
        attention: &mut dyn FnMut(usize, &Layer, &Tensor) -> CResult<Tensor>,
    ) -> CResult<Tensor> {
        let mut x = self.embed.forward(tokens)?;
        if self.cfg.arch == Arch::Gemma2 {
            x = (x * (self.cfg.hidden_size as f64).sqrt())?;
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let residual = x.clone();
            let hn = layer.input_norm.forward(&x)?;
            let attn = layer.o.forward(&attention(i, layer, &hn)?)?;
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
        Ok(x)
    }

    /// Final norm and LM head: f32 logits `(batch, seq, vocab)`, or `(batch, vocab)` of the last
    /// position.
    fn logits(&self, x: &Tensor, all_logits: bool) -> CResult<Tensor> {
        let s = x.dim(1)?;
        let x = if all_logits {
            x.clone()
        } else {
            x.narrow(1, s - 1, 1)?
        };
        let logits = self.lm_logits(&self.norm.forward(&x)?)?;
        if all_logits { Ok(logits) } else { logits.squeeze(1) }
    }

    /// Queries `(b, heads, s, head_dim)` and keys, values `(b, kv_heads, s, head_dim)`, rotated by
    /// `cos`/`sin` (`(s, head_dim / 2)`, or `(b, s, head_dim / 2)` for per-row positions).
    fn project(
        &self,
        layer: &Layer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> CResult<(Tensor, Tensor, Tensor)> {
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
        Ok((q, k, v))
    }

    /// Writes `k`, `v` at `offset` into `cache`'s storage of layer `li` (claimed by
    /// [`KvCache::for_append`]) and attends from `q` over positions `..offset + s`. Grouped-query
    /// heads need no repeated K/V: the query heads of one KV head are the rows of one matmul.
    fn attend(
        &self,
        layer: &Layer,
        li: usize,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        cache: &KvCache,
        offset: usize,
    ) -> CResult<Tensor> {
        let (b, nh, s, hd) = q.dims4()?;
        let nkv = self.cfg.num_kv_heads;
        let Some((kb, vb)) = cache.layers.get(li) else {
            candle_core::bail!("KV cache has no layer {li}");
        };
        kb.slice_set(&k.contiguous()?, 2, offset)?;
        vb.slice_set(&v.contiguous()?, 2, offset)?;
        let kv_len = offset + s;
        let k = kb.narrow(2, 0, kv_len)?;
        let v = vb.narrow(2, 0, kv_len)?;
        let rep = nh / nkv;
        let scale = self.attn_scale();
        let q = q.reshape((b, nkv, rep * s, hd))?.to_dtype(DType::F32)?;
        let k = k.to_dtype(DType::F32)?;
        let mut att = (q.matmul(&k.t()?)? * scale)?;
        if let Some(cap) = self.cfg.attn_logit_softcapping {
            att = ((att / cap)?.tanh()? * cap)?;
        }
        let needs_window = layer.sliding_window.is_some_and(|w| kv_len > w);
        if s > 1 || needs_window {
            let mask = self.mask(s, offset, layer.sliding_window)?;
            att = att
                .reshape((b, nkv, rep, s, kv_len))?
                .broadcast_add(&mask)?
                .reshape((b, nkv, rep * s, kv_len))?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?.to_dtype(v.dtype())?;
        att.matmul(&v)?
            .reshape((b, nh, s, hd))?
            .transpose(1, 2)?
            .reshape((b, s, nh * hd))
    }

    /// Attention of one new position (`q`, `k`, `v` of sequence length 1, batch 1) at `offset` over
    /// `cache`'s positions and itself, reading the cache without writing it: the cached and the own
    /// scores are softmaxed together and the two value products summed (no K/V copy).
    fn attend_detached(
        &self,
        layer: &Layer,
        li: usize,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        cache: &KvCache,
        offset: usize,
    ) -> CResult<Tensor> {
        let (b, nh, s, hd) = q.dims4()?;
        let nkv = self.cfg.num_kv_heads;
        let rep = nh / nkv;
        // The sliding window masks cached positions j with offset >= j + w.
        let start = layer
            .sliding_window
            .map_or(0, |w| (offset + 1).saturating_sub(w))
            .min(offset);
        let held = offset - start;
        let scale = self.attn_scale();
        let q = q.reshape((b, nkv, rep * s, hd))?.to_dtype(DType::F32)?;
        let own = q.matmul(&k.to_dtype(DType::F32)?.t()?)?;
        let cached = if held > 0 {
            let Some((kb, vb)) = cache.layers.get(li) else {
                candle_core::bail!("KV cache has no layer {li}");
            };
            let ck = kb.narrow(2, start, held)?.to_dtype(DType::F32)?;
            Some((q.matmul(&ck.t()?)?, vb.narrow(2, start, held)?))
        } else {
            None
        };
        let mut att = match &cached {
            Some((sc, _)) => Tensor::cat(&[sc, &own], 3)?,
            None => own,
        };
        att = (att * scale)?;
        if let Some(cap) = self.cfg.attn_logit_softcapping {
            att = ((att / cap)?.tanh()? * cap)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?.to_dtype(v.dtype())?;
        let mut y = att.narrow(3, held, 1)?.contiguous()?.matmul(v)?;
        if let Some((_, cv)) = &cached {
            y = (y + att.narrow(3, 0, held)?.contiguous()?.matmul(cv)?)?;
        }
        y.reshape((b, nh, s, hd))?
            .transpose(1, 2)?
            .reshape((b, s, nh * hd))
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
