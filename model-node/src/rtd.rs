//! Reference Trustable Decoding (ALGORITHMS.md "RTD"): a reference datastore of (key, value) pairs,
//! the model's last hidden state after the final norm at every answer position of reference examples
//! and the token that followed it, mixed into every next-token distribution the engine uses:
//! `p = λ·r + (1−λ)·p_LM`, where `r` is the softmax of `−d/T` over the `k` nearest keys (squared
//! Euclidean distance, exact), summed per token id.
//!
//! The mixture is applied where the model turns hidden states into logits
//! ([`crate::model::Transformer::lm_logits`]), so proposals (greedy and sampled), candidate scores and
//! next-character distributions (look-ahead forwards included) all see it, batched as the engine
//! batches. The mixed log-probabilities take the logits' place (a softmax of them is the mixture
//! exactly). λ = 0 leaves the model untouched: no store is set. **Ours:** with `max_distance`, a
//! position whose nearest key is farther than that keeps the model's own distribution, so contexts
//! the store knows nothing about are not pulled toward its tokens.
//!
//! # Store format
//! A safetensors file written by `model-node rtd build`:
//! - tensor `keys`: f32 `(N, hidden_size)`;
//! - tensor `values`: u32 `(N,)`, token ids;
//! - metadata `architecture`, `hidden_size`, `vocab_size`, `vocab_hash` (FNV-1a 64 of every token's
//!   bytes in id order, hex): a store built for another model (or another tokenizer) is refused at
//!   start; `model_id` and `examples` are informational.

pub mod build;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::vocab::Vocab;

/// What a store was built for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreModel {
    /// `model_type` of the model.
    pub architecture: String,
    /// Its hidden size (the keys' width).
    pub hidden_size: usize,
    /// Its vocabulary size (values are below it).
    pub vocab_size: usize,
    /// [`vocab_hash`] of its tokenizer.
    pub vocab_hash: String,
    /// The model id (informational).
    pub model_id: String,
}

/// A reference datastore in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Store {
    /// Keys, row-major `(N, hidden_size)`.
    pub keys: Vec<f32>,
    /// The token that followed each key.
    pub values: Vec<u32>,
    /// What it was built for.
    pub model: StoreModel,
    /// Examples it was built from (informational).
    pub examples: usize,
}

/// FNV-1a 64 over every token's bytes in id order (a missing token counts as one 0xff byte), as
/// hex: two tokenizers with the same vocabulary hash alike.
pub fn vocab_hash(vocab: &Vocab, vocab_size: usize) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    for id in 0..vocab_size as u32 {
        match vocab.token_bytes(id) {
            Some(bytes) => {
                for &b in bytes {
                    eat(b);
                }
                eat(0);
            }
            None => eat(0xff),
        }
    }
    format!("{h:016x}")
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::RtdStore(format!("{}: {msg}", path.display()))
}

impl Store {
    /// Entries.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether it has no entries.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Writes the store (the same bytes for the same store).
    pub fn save(&self, path: &Path) -> Result<()> {
        let (n, h) = (self.len(), self.model.hidden_size);
        if self.keys.len() != n * h {
            return Err(bad(path, "keys and values disagree in number"));
        }
        let mut meta = serde_json::Map::new();
        for (k, v) in [
            ("architecture", self.model.architecture.clone()),
            ("hidden_size", h.to_string()),
            ("vocab_size", self.model.vocab_size.to_string()),
            ("vocab_hash", self.model.vocab_hash.clone()),
            ("model_id", self.model.model_id.clone()),
            ("examples", self.examples.to_string()),
        ] {
            meta.insert(k.into(), v.into());
        }
        let bytes = crate::sidecar::safetensors_bytes(
            meta,
            &[
                (
                    "values",
                    "U32",
                    vec![n],
                    self.values.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ),
                (
                    "keys",
                    "F32",
                    vec![n, h],
                    self.keys.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ),
            ],
        );
        std::fs::write(path, bytes).map_err(|e| bad(path, e))
    }

    /// Reads a store; a file that is not one (truncated, corrupt, wrong tensors) is an error naming
    /// the file and what is wrong.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| bad(path, e))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
        let meta: BTreeMap<String, String> =
            meta.metadata().clone().unwrap_or_default().into_iter().collect();
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
        let get = |k: &str| {
            meta.get(k)
                .cloned()
                .ok_or_else(|| bad(path, format!("metadata `{k}` missing: not an RTD store")))
        };
        let num = |k: &str| -> Result<usize> {
            get(k)?
                .parse()
                .map_err(|_| bad(path, format!("metadata `{k}` is not a number")))
        };
        let model = StoreModel {
            architecture: get("architecture")?,
            hidden_size: num("hidden_size")?,
            vocab_size: num("vocab_size")?,
            vocab_hash: get("vocab_hash")?,
            model_id: meta.get("model_id").cloned().unwrap_or_default(),
        };
        let keys = st
            .tensor("keys")
            .map_err(|e| bad(path, format!("no tensor `keys` ({e})")))?;
        let values = st
            .tensor("values")
            .map_err(|e| bad(path, format!("no tensor `values` ({e})")))?;
        if keys.dtype() != Dtype::F32 || values.dtype() != Dtype::U32 {
            return Err(bad(
                path,
                format!(
                    "`keys` is {:?} and `values` {:?}; expected F32 and U32",
                    keys.dtype(),
                    values.dtype()
                ),
            ));
        }
        let n = values.shape().first().copied().unwrap_or(0);
        if values.shape() != [n] || keys.shape() != [n, model.hidden_size] || model.hidden_size == 0 {
            return Err(bad(
                path,
                format!(
                    "`keys` {:?} and `values` {:?} do not fit hidden size {}",
                    keys.shape(),
                    values.shape(),
                    model.hidden_size
                ),
            ));
        }
        let values: Vec<u32> = values
            .data()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if let Some(v) = values.iter().find(|&&v| v as usize >= model.vocab_size) {
            return Err(bad(
                path,
                format!("value {v} is outside the vocabulary of {}", model.vocab_size),
            ));
        }
        let keys: Vec<f32> = keys
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if keys.iter().any(|k| !k.is_finite()) {
            return Err(bad(path, "a key is not finite"));
        }
        Ok(Self {
            keys,
            values,
            model,
            examples: meta.get("examples").and_then(|e| e.parse().ok()).unwrap_or(0),
        })
    }

    /// Refuses a store built for another model: names the file and what differs.
    pub fn check_model(&self, path: &Path, model: &StoreModel) -> Result<()> {
        let s = &self.model;
        let mut diffs = Vec::new();
        if s.architecture != model.architecture {
            diffs.push(format!(
                "architecture {} (model: {})",
                s.architecture, model.architecture
            ));
        }
        if s.hidden_size != model.hidden_size {
            diffs.push(format!(
                "hidden size {} (model: {})",
                s.hidden_size, model.hidden_size
            ));
        }
        if s.vocab_size != model.vocab_size {
            diffs.push(format!(
                "vocabulary size {} (model: {})",
                s.vocab_size, model.vocab_size
            ));
        }
        if s.vocab_hash != model.vocab_hash {
            diffs.push(format!(
                "vocabulary hash {} (model: {})",
                s.vocab_hash, model.vocab_hash
            ));
        }
        if diffs.is_empty() {
            return Ok(());
        }
        Err(bad(
            path,
            format!(
                "built for another model ({}): {}; rebuild it with `model-node rtd build` for this one",
                if s.model_id.is_empty() {
                    "unnamed"
                } else {
                    &s.model_id
                },
                diffs.join(", ")
            ),
        ))
    }
}

/// The mixture's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RtdParams {
    /// λ in [0, 1): the store's share.
    pub lambda: f64,
    /// Neighbours per position.
    pub k: usize,
    /// Temperature T of the neighbours' softmax over −distance.
    pub temperature: f64,
    /// **Ours:** a position whose nearest key is farther than this (squared distance) keeps the
    /// model's own distribution (λ = 0 there). Infinite: the published constant λ.
    pub max_distance: f64,
}

impl RtdParams {
    /// Checks the ranges.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.lambda >= 0.0 && self.lambda < 1.0) {
            return Err(format!("--rtd-lambda must be in [0, 1), got {}", self.lambda));
        }
        if self.k == 0 {
            return Err("--rtd-k must be at least 1".into());
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(format!("--rtd-temperature must be > 0, got {}", self.temperature));
        }
        if self.max_distance.is_nan() || self.max_distance < 0.0 {
            return Err(format!(
                "--rtd-max-distance must be >= 0, got {}",
                self.max_distance
            ));
        }
        Ok(())
    }
}

/// A store on the model's device, ready to mix.
#[derive(Debug)]
pub struct Rtd {
    /// Keys transposed, `(hidden, N)` f32.
    keys_t: Tensor,
    /// Squared norms of the keys, `(1, N)`.
    key_sq: Tensor,
    values: Vec<u32>,
    params: RtdParams,
}

impl Rtd {
    /// Puts `store` on `device` with `params`.
    pub fn new(store: &Store, params: RtdParams, device: &Device) -> candle_core::Result<Self> {
        let (n, h) = (store.len(), store.model.hidden_size);
        let keys = Tensor::from_slice(&store.keys, (n, h), device)?;
        Ok(Self {
            keys_t: keys.t()?.contiguous()?,
            key_sq: keys.sqr()?.sum_keepdim(1)?.t()?.contiguous()?,
            values: store.values.clone(),
            params,
        })
    }

    /// The settings.
    pub fn params(&self) -> RtdParams {
        self.params
    }

    /// The mixture `log(λ·r + (1−λ)·softmax(logits))` of each row of `logits` `(…, vocab)` with the
    /// reference distribution `r` of its hidden state in `normed` `(…, hidden)`. `lambdas` overrides
    /// λ per row (one value: every row; `None`: the store's); a row whose λ is 0 keeps its logits
    /// exactly, and when every row's is, nothing is computed.
    pub fn mix(
        &self,
        logits: &Tensor,
        normed: &Tensor,
        lambdas: Option<&[Option<f64>]>,
    ) -> candle_core::Result<Tensor> {
        let dims = logits.dims().to_vec();
        let vocab = dims.last().copied().unwrap_or(0);
        let m = logits.elem_count() / vocab.max(1);
        let lambda_of = |i: usize| -> f64 {
            let given = match lambdas {
                Some([one]) => *one,
                Some(v) => v.get(i).copied().flatten(),
                None => None,
            };
            given.unwrap_or(self.params.lambda)
        };
        if (0..m).all(|i| lambda_of(i) == 0.0) {
            return Ok(logits.clone());
        }
        let hidden = self.keys_t.dim(0)?;
        let q = normed.reshape((m, hidden))?.to_dtype(DType::F32)?;
        // Squared distances: |q|² − 2 q·k + |k|², one matmul for the whole batch.
        let d = q
            .sqr()?
            .sum_keepdim(1)?
            .broadcast_add(&self.key_sq)?
            .sub(&(q.matmul(&self.keys_t)? * 2.0)?)?
            .to_vec2::<f32>()?;
        let raw = logits
            .reshape((m, vocab))?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut out = Vec::with_capacity(m * vocab);
        for (i, (drow, row)) in d.iter().zip(&raw).enumerate() {
            let lambda = lambda_of(i);
            let nearest = drow.iter().copied().fold(f32::INFINITY, f32::min);
            // λ 0, or nothing stored near: the row's logits as they are.
            if lambda == 0.0 || f64::from(nearest) > self.params.max_distance {
                out.extend_from_slice(row);
                continue;
            }
            // The model's distribution, on the host (the row is here already).
            let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f64> = row.iter().map(|&z| f64::from(z - top).exp()).collect();
            let total: f64 = exps.iter().sum();
            let r = self.reference(drow, vocab);
            out.extend(
                exps.iter()
                    .zip(&r)
                    .map(|(&e, &rv)| (lambda * rv + (1.0 - lambda) * e / total).ln() as f32),
            );
        }
        Tensor::from_vec(out, dims, logits.device())
    }

    /// `r` over `vocab` tokens from one row of squared distances to every key.
    pub fn reference(&self, dist: &[f32], vocab: usize) -> Vec<f64> {
        let mut r = vec![0.0f64; vocab];
        if dist.is_empty() {
            return r;
        }
        let k = self.params.k.min(dist.len());
        let mut idx: Vec<usize> = (0..dist.len()).collect();
        let by_dist = |a: &usize, b: &usize| dist[*a].total_cmp(&dist[*b]).then(a.cmp(b));
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, by_dist);
            idx.truncate(k);
        }
        idx.sort_by(by_dist);
        let t = self.params.temperature;
        let d0 = f64::from(dist[idx[0]].max(0.0));
        let w: Vec<f64> = idx
            .iter()
            .map(|&i| (-(f64::from(dist[i].max(0.0)) - d0) / t).exp())
            .collect();
        let total: f64 = w.iter().sum();
        for (&i, wi) in idx.iter().zip(&w) {
            if let Some(slot) = r.get_mut(self.values[i] as usize) {
                *slot += wi / total;
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(keys: Vec<f32>, values: Vec<u32>, hidden: usize) -> Store {
        Store {
            keys,
            values,
            model: StoreModel {
                architecture: "llama".into(),
                hidden_size: hidden,
                vocab_size: 4,
                vocab_hash: "00".into(),
                model_id: "t".into(),
            },
            examples: 1,
        }
    }

    #[test]
    fn the_mixture_is_lambda_r_plus_the_rest_on_hand_computed_keys() -> candle_core::Result<()> {
        // Keys (0,0) → token 1, (1,0) → token 2, (0,2) → token 1, (3,3) → token 3; query (0,0):
        // squared distances 0, 1, 4, 18; k = 3, T = 1: weights e^0, e^-1, e^-4 over tokens 1, 2, 1.
        let s = store(vec![0.0, 0.0, 1.0, 0.0, 0.0, 2.0, 3.0, 3.0], vec![1, 2, 1, 3], 2);
        let params = RtdParams {
            lambda: 0.25,
            k: 3,
            temperature: 1.0,
            max_distance: f64::INFINITY,
        };
        let rtd = Rtd::new(&s, params, &Device::Cpu)?;
        let logits = Tensor::new(&[[0.0f32, 1.0, 2.0, 3.0]], &Device::Cpu)?;
        let q = Tensor::new(&[[0.0f32, 0.0]], &Device::Cpu)?;
        let got = rtd.mix(&logits, &q, None)?.to_vec2::<f32>()?;
        // λ 0 for the row: its logits exactly.
        let off = rtd.mix(&logits, &q, Some(&[Some(0.0)]))?.to_vec2::<f32>()?;
        assert_eq!(off, logits.to_vec2::<f32>()?);
        let z: f64 = 1.0 + (-1f64).exp() + (-4f64).exp();
        let r = [0.0, (1.0 + (-4f64).exp()) / z, (-1f64).exp() / z, 0.0];
        let lz: f64 = (0..4).map(|i| (i as f64).exp()).sum();
        for (i, g) in got[0].iter().enumerate() {
            let want = 0.25 * r[i] + 0.75 * (i as f64).exp() / lz;
            assert!(
                (f64::from(*g) - want.ln()).abs() < 1e-5,
                "{i}: {g} vs {}",
                want.ln()
            );
        }
        Ok(())
    }

    #[test]
    fn an_exact_match_retrieves_its_next_token() -> candle_core::Result<()> {
        let s = store(vec![0.5, -1.0, 2.0, 0.0, 0.0, 1.0], vec![3, 0, 2], 2);
        let rtd = Rtd::new(
            &s,
            RtdParams {
                lambda: 0.5,
                k: 3,
                temperature: 0.01,
                max_distance: f64::INFINITY,
            },
            &Device::Cpu,
        )?;
        let r = rtd.reference(&[0.0, 5.25, 2.25], 4);
        assert!(r[3] > 0.999_999, "{r:?}");
        Ok(())
    }

    #[test]
    fn stores_round_trip_and_bad_files_are_refused_by_name() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("rtd-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| bad(&dir, e))?;
        let path = dir.join("s.rtd");
        let s = store(vec![0.5, -1.0, 2.0, 0.0], vec![3, 0], 2);
        s.save(&path)?;
        assert_eq!(Store::load(&path)?, s);
        let bytes = std::fs::read(&path).map_err(|e| bad(&path, e))?;
        for (name, broken) in [
            ("truncated", bytes[..bytes.len() - 3].to_vec()),
            ("header cut", bytes[..20].to_vec()),
            ("empty", vec![]),
            ("garbage", vec![0xff; 64]),
        ] {
            let p = dir.join(format!("{name}.rtd"));
            std::fs::write(&p, broken).map_err(|e| bad(&p, e))?;
            let e = Store::load(&p).expect_err(name).to_string();
            assert!(e.contains(&p.display().to_string()), "{name}: {e}");
        }
        let mut other = s.model.clone();
        other.vocab_hash = "11".into();
        let e = s.check_model(&path, &other).expect_err("other model").to_string();
        assert!(e.contains("vocabulary hash 00 (model: 11)"), "{e}");
        Ok(())
    }
}
