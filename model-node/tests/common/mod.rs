//! Shared test helpers: tiny random-weight models of each architecture, written as real HuggingFace
//! directories, and nodes served on 127.0.0.1:0.
#![allow(dead_code, missing_docs)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use model_node::model::{ArchConfig, Transformer};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

pub const ARCHS: [&str; 5] = ["llama", "qwen2", "mistral", "phi3", "gemma2"];

/// A tiny config.json for `arch` (hidden 32, 2 layers, 4 heads / 2 KV heads).
pub fn tiny_config(arch: &str, vocab: usize) -> Value {
    let mut c = json!({
        "model_type": arch,
        "hidden_size": 32,
        "intermediate_size": 64,
        "vocab_size": vocab,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": false,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    });
    let o = c.as_object_mut().expect("object");
    match arch {
        "llama" => {
            o.insert(
                "rope_scaling".into(),
                json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
            );
        }
        "qwen2" => {
            o.insert("sliding_window".into(), json!(4096));
            o.insert("max_window_layers".into(), json!(2));
            o.insert("use_sliding_window".into(), json!(false));
            o.insert("tie_word_embeddings".into(), json!(true));
        }
        "mistral" => {
            o.insert("sliding_window".into(), json!(4096));
        }
        "phi3" => {}
        "gemma2" => {
            o.insert("head_dim".into(), json!(8));
            o.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
            o.insert("hidden_act".into(), json!("gelu_pytorch_tanh"));
            o.insert("attention_bias".into(), json!(false));
            o.insert("attn_logit_softcapping".into(), json!(50.0));
            o.insert("final_logit_softcapping".into(), json!(30.0));
            o.insert("query_pre_attn_scalar".into(), json!(8));
            o.insert("sliding_window".into(), json!(4096));
            o.insert("tie_word_embeddings".into(), json!(true));
        }
        other => panic!("unknown arch {other}"),
    }
    c
}

/// Writes `config.json` and `model.safetensors` with seeded random weights for `config`.
pub fn write_model(dir: &Path, config: &Value, seed: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(config)?;
    std::fs::write(dir.join("config.json"), &text)?;
    let cfg = ArchConfig::from_json(&text, "config.json")?;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    Transformer::load(&cfg, vb, 8)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut names: Vec<String> = vm
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .keys()
        .cloned()
        .collect();
    names.sort();
    let data = vm.data().lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    for name in names {
        let var = &data[&name];
        let shape = var.shape().clone();
        let n = shape.elem_count();
        let is_norm = name.ends_with("norm.weight");
        let gemma = cfg.arch == model_node::model::Arch::Gemma2;
        let scale = if is_norm {
            0.1
        } else if name.contains("embed") {
            1.0
        } else {
            0.5 / (shape.dims()[shape.rank() - 1] as f32).sqrt()
        };
        let base = if is_norm && !gemma { 1.0 } else { 0.0 };
        let v: Vec<f32> = (0..n)
            .map(|_| base + scale * (rng.random::<f32>() * 2.0 - 1.0) * 1.7)
            .collect();
        var.set(&Tensor::from_vec(v, shape, &Device::Cpu)?)?;
    }
    drop(data);
    vm.save(dir.join("model.safetensors"))?;
    Ok(())
}

/// A fresh temporary directory under the target dir (kept for inspection on failure).
pub fn temp_dir(name: &str) -> PathBuf {
    let base =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).expect("create temp dir");
    base
}
