//! A trainable decoder written with candle-nn's differentiable basic ops, with the tensor names of the
//! HuggingFace Llama / Mistral / Qwen2 checkpoints (`model.layers.N.self_attn.q_proj.weight`, ...), so
//! that the weights it saves load through candle-transformers and the node like any checkpoint.
//!
//! candle-transformers' inference code uses fused kernels (RMSNorm, RoPE, softmax) that have no
//! backward pass; here each is spelt with ops that do. One KV head per query head (no GQA), no KV
//! cache: this model only trains.

use candle_core::{D, DType, Device, Result, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// Shape of a trainable model.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    /// `model_type` written to config.json: "llama", "mistral" or "qwen2".
    pub arch: &'static str,
    /// Vocabulary size.
    pub vocab: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Attention heads (= KV heads).
    pub heads: usize,
    /// MLP inner size.
    pub intermediate: usize,
    /// Longest sequence.
    pub max_positions: usize,
}

impl Shape {
    fn qkv_bias(&self) -> bool {
        self.arch == "qwen2"
    }

    fn tied(&self) -> bool {
        self.arch == "qwen2"
    }

    /// The HuggingFace `config.json` of this shape.
    pub fn config_json(&self, bos: u32, eos: &[u32]) -> Value {
        let mut c = json!({
            "architectures": [match self.arch { "qwen2" => "Qwen2ForCausalLM", "mistral" => "MistralForCausalLM", _ => "LlamaForCausalLM" }],
            "model_type": self.arch,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "vocab_size": self.vocab,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads,
            "rms_norm_eps": RMS_EPS,
            "rope_theta": ROPE_THETA,
            "max_position_embeddings": self.max_positions,
            "tie_word_embeddings": self.tied(),
            "hidden_act": "silu",
            "bos_token_id": bos,
            "eos_token_id": if eos.len() == 1 { json!(eos[0]) } else { json!(eos) },
            "torch_dtype": "float32",
        });
        if let Some(o) = c.as_object_mut() {
            match self.arch {
                "qwen2" => {
                    o.insert("sliding_window".into(), json!(self.max_positions));
                    o.insert("max_window_layers".into(), json!(self.layers));
                    o.insert("use_sliding_window".into(), json!(false));
                }
                "mistral" => {
                    o.insert("sliding_window".into(), json!(self.max_positions));
                }
                _ => {}
            }
        }
        c
    }

    /// Parameter count.
    pub fn parameters(&self) -> usize {
        let (h, i, v) = (self.hidden, self.intermediate, self.vocab);
        let bias = if self.qkv_bias() { 3 * h } else { 0 };
        let layer = 4 * h * h + bias + 3 * h * i + 2 * h;
        v * h * if self.tied() { 1 } else { 2 } + self.layers * layer + h
    }
}

const RMS_EPS: f64 = 1e-5;
const ROPE_THETA: f64 = 10000.0;

struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    fn new(vb: VarBuilder, inp: usize, out: usize, bias: bool) -> Result<Self> {
        let std = (1.0 / inp as f64).sqrt();
        let w = vb.get_with_hints(
            (out, inp),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        )?;
        let b = if bias {
            Some(vb.get_with_hints(out, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self { w, b })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // One [rows, in] × [in, out] product: a broadcast batched matmul over the weight is several
        // times slower on CPU, forward and backward.
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = x.reshape((rows, dims[dims.len() - 1]))?.matmul(&self.w.t()?)?;
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = self.w.dim(0)?;
        let y = y.reshape(out)?;
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

fn rms_norm(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + RMS_EPS)?.sqrt()?)?.broadcast_mul(w)
}

/// HF `rotate_half` RoPE: `x * cos + rotate_half(x) * sin`, cos/sin of shape `[T, head_dim]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    ln1: Tensor,
    ln2: Tensor,
}

/// The trainable decoder.
pub struct TrainModel {
    /// Its shape.
    pub shape: Shape,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    cos: Tensor,
    sin: Tensor,
}

impl TrainModel {
    /// Creates the model's variables in `vars` (HF names) and initialises them from `seed`
    /// (CPU random numbers in candle cannot be seeded, so initialisation is done here).
    pub fn new(shape: Shape, vars: &VarMap, seed: u64, device: &Device) -> Result<Self> {
        let vb = VarBuilder::from_varmap(vars, DType::F32, device);
        let m = vb.pp("model");
        let (h, i) = (shape.hidden, shape.intermediate);
        let embed = m
            .pp("embed_tokens")
            .get_with_hints((shape.vocab, h), "weight", Init::Const(0.0))?;
        let mut layers = Vec::with_capacity(shape.layers);
        for l in 0..shape.layers {
            let lb = m.pp(format!("layers.{l}"));
            let a = lb.pp("self_attn");
            let mlp = lb.pp("mlp");
            layers.push(Layer {
                q: Linear::new(a.pp("q_proj"), h, h, shape.qkv_bias())?,
                k: Linear::new(a.pp("k_proj"), h, h, shape.qkv_bias())?,
                v: Linear::new(a.pp("v_proj"), h, h, shape.qkv_bias())?,
                o: Linear::new(a.pp("o_proj"), h, h, false)?,
                gate: Linear::new(mlp.pp("gate_proj"), h, i, false)?,
                up: Linear::new(mlp.pp("up_proj"), h, i, false)?,
                down: Linear::new(mlp.pp("down_proj"), i, h, false)?,
                ln1: lb
                    .pp("input_layernorm")
                    .get_with_hints(h, "weight", Init::Const(1.0))?,
                ln2: lb
                    .pp("post_attention_layernorm")
                    .get_with_hints(h, "weight", Init::Const(1.0))?,
            });
        }
        let norm = m.pp("norm").get_with_hints(h, "weight", Init::Const(1.0))?;
        let lm_head = if shape.tied() {
            None
        } else {
            Some(
                vb.pp("lm_head")
                    .get_with_hints((shape.vocab, h), "weight", Init::Const(0.0))?,
            )
        };
        seeded_init(vars, seed, shape.layers)?;
        let hd = h / shape.heads;
        let inv: Vec<f32> = (0..hd / 2)
            .map(|j| 1.0 / (ROPE_THETA as f32).powf(2.0 * j as f32 / hd as f32))
            .collect();
        let pos: Vec<f32> = (0..shape.max_positions).map(|p| p as f32).collect();
        let inv = Tensor::from_vec(inv, (1, hd / 2), device)?;
        let pos = Tensor::from_vec(pos, (shape.max_positions, 1), device)?;
        let freqs = pos.broadcast_mul(&inv)?;
        let freqs = Tensor::cat(&[&freqs, &freqs], 1)?;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            shape,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// Final hidden states `[B, T, hidden]` of token ids `[B, T]` (causal attention).
    pub fn hidden(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (nh, hd) = (self.shape.heads, self.shape.hidden / self.shape.heads);
        let mut x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.shape.hidden))?;
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { -1e9 } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), ids.device())?;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in &self.layers {
            let h = rms_norm(&x, &l.ln1)?;
            let split =
                |y: Tensor| -> Result<Tensor> { y.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous() };
            let q = rope(&split(l.q.forward(&h)?)?, &cos, &sin)?;
            let k = rope(&split(l.k.forward(&h)?)?, &cos, &sin)?;
            let v = split(l.v.forward(&h)?)?;
            let att = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax(&att, D::Minus1)?;
            let y = att
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, t, self.shape.hidden))?;
            x = (x + l.o.forward(&y)?)?;
            let h = rms_norm(&x, &l.ln2)?;
            let m = (l.gate.forward(&h)?.silu()? * l.up.forward(&h)?)?;
            x = (x + l.down.forward(&m)?)?;
        }
        rms_norm(&x, &self.norm)
    }

    /// Logits `[N, vocab]` of hidden rows `[N, hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        hidden.matmul(&head.t()?)
    }

    /// Mean cross-entropy of `targets` at the flattened positions `rows` of a `[B, T]` batch.
    pub fn loss(&self, ids: &Tensor, rows: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let h = self.hidden(ids)?;
        let h = h.reshape(((), self.shape.hidden))?.index_select(rows, 0)?;
        let logp = candle_nn::ops::log_softmax(&self.logits(&h)?, D::Minus1)?;
        let picked = logp.gather(&targets.unsqueeze(1)?, 1)?;
        picked.mean_all()?.neg()
    }
}

/// Initialises every variable deterministically: norms to 1, biases to 0, matrices to
/// N(0, 1/fan_in) (embeddings N(0, 0.02²)·fan-in scaled, output projections shrunk by depth).
fn seeded_init(vars: &VarMap, seed: u64, layers: usize) -> Result<()> {
    let data = vars
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("variables lock poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = StdRng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        let shape = var.shape().clone();
        let n = shape.elem_count();
        let values: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            let fan_in = shape.dims()[shape.rank() - 1] as f32;
            let mut std = if name.contains("embed_tokens") || name.contains("lm_head") {
                0.5 / fan_in.sqrt()
            } else {
                1.0 / fan_in.sqrt()
            };
            if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                std /= (2.0 * layers as f32).sqrt();
            }
            (0..n).map(|_| std * normal(&mut rng)).collect()
        };
        var.set(&Tensor::from_vec(values, shape, var.device())?)?;
    }
    Ok(())
}

/// A standard normal sample (Box–Muller).
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.random::<f32>().max(1e-7);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}
