//! Co-LLM deferral heads (ALGORITHMS.md "Co-LLM"): one vector `g_j` and bias `b_j` per assistant over
//! the base model's last hidden state `h` (after the final norm, the vector the LM head multiplies);
//! the deferral probability of assistant `j` at a position is `σ(h·g_j + b_j)`.
//!
//! # File format
//! A safetensors file beside (never inside) the checkpoint, written by `ensemble-train deferral`:
//! - tensor `heads`: f32 `(H, hidden_size)`, one row per assistant;
//! - tensor `bias`: f32 `(H,)`;
//! - metadata `assistants`: a JSON array of H member names, in head order;
//! - metadata `eta`: the threshold chosen on validation data, a decimal string in (0, 1) (the
//!   default for clients that give none);
//! - metadata `base`: the model id the head was trained on (informational).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// A set of deferral heads, one per assistant.
#[derive(Debug, Clone, PartialEq)]
pub struct DeferralHead {
    /// One vector per assistant, each of the base's hidden size.
    pub heads: Vec<Vec<f32>>,
    /// One bias per assistant.
    pub bias: Vec<f32>,
    /// The assistant each head defers to, in head order.
    pub assistants: Vec<String>,
    /// The default threshold η in (0, 1).
    pub eta: f64,
    /// The model id the heads were trained on (informational).
    pub base: String,
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::DeferralHead(format!("{}: {msg}", path.display()))
}

/// The logistic function.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn f32s(path: &Path, st: &SafeTensors<'_>, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let t = st.tensor(name).map_err(|e| {
        bad(
            path,
            format!("no tensor `{name}` ({e}); a deferral head holds `heads` and `bias`"),
        )
    })?;
    if t.dtype() != Dtype::F32 {
        return Err(bad(
            path,
            format!("tensor `{name}` is {:?}, expected F32", t.dtype()),
        ));
    }
    let data = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((t.shape().to_vec(), data))
}

impl DeferralHead {
    /// Heads in the file.
    pub fn len(&self) -> usize {
        self.heads.len()
    }

    /// Whether there are no heads.
    pub fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }

    /// The hidden size the heads were trained for.
    pub fn hidden_size(&self) -> usize {
        self.heads.first().map_or(0, Vec::len)
    }

    /// Reads and checks a head file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| bad(path, e))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
        let (hshape, hdata) = f32s(path, &st, "heads")?;
        let (bshape, bias) = f32s(path, &st, "bias")?;
        let &[n, hidden] = hshape.as_slice() else {
            return Err(bad(
                path,
                format!("`heads` has shape {hshape:?}, expected (heads, hidden_size)"),
            ));
        };
        if n == 0 || hidden == 0 {
            return Err(bad(path, format!("`heads` has shape {hshape:?}: empty")));
        }
        if bshape != [n] {
            return Err(bad(
                path,
                format!("`bias` has shape {bshape:?}, expected ({n},) like `heads`"),
            ));
        }
        let assistants: Vec<String> = match meta.get("assistants") {
            Some(a) => serde_json::from_str(a).map_err(|e| {
                bad(
                    path,
                    format!("metadata `assistants` is not a JSON array of names: {e}"),
                )
            })?,
            None => {
                return Err(bad(
                    path,
                    "metadata `assistants` is missing (a JSON array of member names)",
                ));
            }
        };
        if assistants.len() != n {
            return Err(bad(
                path,
                format!(
                    "metadata `assistants` names {} members for {n} heads",
                    assistants.len()
                ),
            ));
        }
        let eta: f64 = match meta.get("eta") {
            Some(e) => e
                .trim()
                .parse()
                .map_err(|_| bad(path, format!("metadata `eta` is {e:?}, not a number")))?,
            None => return Err(bad(path, "metadata `eta` is missing")),
        };
        if !(eta > 0.0 && eta < 1.0) {
            return Err(bad(path, format!("metadata `eta` is {eta}, expected in (0, 1)")));
        }
        if hdata.iter().chain(&bias).any(|x| !x.is_finite()) {
            return Err(bad(path, "the heads hold a non-finite value"));
        }
        Ok(Self {
            heads: hdata.chunks_exact(hidden).map(<[f32]>::to_vec).collect(),
            bias,
            assistants,
            eta,
            base: meta.get("base").cloned().unwrap_or_default(),
        })
    }

    /// Writes the head file (the trainer's output).
    pub fn save(&self, path: &Path) -> Result<()> {
        let hidden = self.hidden_size();
        if self.heads.iter().any(|h| h.len() != hidden) || self.bias.len() != self.len() {
            return Err(bad(path, "heads of unequal sizes, or one bias per head missing"));
        }
        let n = self.len();
        let mut meta = serde_json::Map::new();
        let assistants = serde_json::to_string(&self.assistants).map_err(|e| bad(path, e))?;
        meta.insert("assistants".into(), assistants.into());
        meta.insert("base".into(), self.base.clone().into());
        meta.insert("eta".into(), format!("{}", self.eta).into());
        let bytes = crate::sidecar::safetensors_bytes(
            meta,
            &[
                (
                    "bias",
                    "F32",
                    vec![n],
                    self.bias.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ),
                (
                    "heads",
                    "F32",
                    vec![n, hidden],
                    self.heads
                        .iter()
                        .flatten()
                        .flat_map(|x| x.to_le_bytes())
                        .collect(),
                ),
            ],
        );
        std::fs::write(path, bytes).map_err(|e| bad(path, e))
    }

    /// Checks the heads against the model's hidden size: a start-up error naming the file and both
    /// sizes when they differ.
    pub fn check_hidden(&self, path: &Path, model_hidden: usize) -> Result<()> {
        if self.hidden_size() != model_hidden {
            return Err(bad(
                path,
                format!(
                    "the heads have hidden size {} but the model's config.json says hidden_size {model_hidden}: \
                     this head was trained for another base model{}",
                    self.hidden_size(),
                    if self.base.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", self.base)
                    }
                ),
            ));
        }
        Ok(())
    }

    /// The heads `(H, hidden)` and biases `(H,)` as f32 tensors on `device`.
    pub fn tensors(&self, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let flat: Vec<f32> = self.heads.iter().flatten().copied().collect();
        Ok((
            Tensor::from_vec(flat, (self.len(), self.hidden_size()), device)?,
            Tensor::from_vec(self.bias.clone(), self.len(), device)?,
        ))
    }

    /// Each head's deferral probability `σ(h·g + b)` for one hidden state.
    pub fn probs(&self, h: &[f32]) -> Vec<f64> {
        self.heads
            .iter()
            .zip(&self.bias)
            .map(|(g, b)| {
                let z: f64 = g.iter().zip(h).map(|(a, x)| f64::from(*a) * f64::from(*x)).sum();
                sigmoid(z + f64::from(*b))
            })
            .collect()
    }
}

/// Where `--deferral-head FILE` points: as given when it exists (absolute, or relative to the working
/// directory), else relative to the model directory (so `--deferral-head deferral.safetensors` finds
/// the file beside the checkpoint).
pub fn resolve_path(file: &Path, model_dir: &Path) -> PathBuf {
    if file.is_absolute() || file.exists() {
        file.to_path_buf()
    } else {
        model_dir.join(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load_is_the_same_and_errors_name_the_file() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("deferral-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| bad(&dir, e))?;
        let path = dir.join("d.safetensors");
        let h = DeferralHead {
            heads: vec![vec![0.5, -1.0, 2.0], vec![0.0, 0.25, -0.125]],
            bias: vec![0.1, -3.0],
            assistants: vec!["arith".into(), "atlas".into()],
            eta: 0.6,
            base: "general".into(),
        };
        h.save(&path)?;
        assert_eq!(DeferralHead::load(&path)?, h);
        let err = h
            .check_hidden(&path, 96)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("d.safetensors") && err.contains("hidden size 3") && err.contains("96"),
            "{err}"
        );
        let p = h.probs(&[1.0, 1.0, 1.0]);
        assert!((p[0] - sigmoid(1.6)).abs() < 1e-7 && (p[1] - sigmoid(-2.875)).abs() < 1e-7);
        std::fs::write(&path, b"nonsense").map_err(|e| bad(&path, e))?;
        let err = DeferralHead::load(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("not a safetensors file"), "{err}");
        Ok(())
    }
}
