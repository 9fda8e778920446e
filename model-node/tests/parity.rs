//! The node's transformer against candle-transformers' implementation of each architecture, on tiny
//! random-weight checkpoints: same logits for a prompt and for cached incremental steps.

mod common;

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models as ct;
use model_node::model::{ArchConfig, KvCache, Transformer};

/// candle-transformers' model behind one interface: logits of the last position.
enum Reference {
    Llama(ct::llama::Llama, ct::llama::Cache),
    Qwen2(ct::qwen2::ModelForCausalLM),
    Mistral(ct::mistral::Model),
    Phi3(ct::phi3::Model),
    Gemma2(ct::gemma2::Model),
}

impl Reference {
    fn load(arch: &str, text: &str, vb: VarBuilder) -> anyhow::Result<Self> {
        Ok(match arch {
            "llama" => {
                let cfg: ct::llama::LlamaConfig = serde_json::from_str(text)?;
                let cfg = cfg.into_config(false);
                let cache = ct::llama::Cache::new(true, DType::F32, &cfg, &Device::Cpu)?;
                Reference::Llama(ct::llama::Llama::load(vb, &cfg)?, cache)
            }
            "qwen2" => Reference::Qwen2(ct::qwen2::ModelForCausalLM::new(
                &serde_json::from_str(text)?,
                vb,
            )?),
            "mistral" => Reference::Mistral(ct::mistral::Model::new(&serde_json::from_str(text)?, vb)?),
            "phi3" => Reference::Phi3(ct::phi3::Model::new(&serde_json::from_str(text)?, vb)?),
            "gemma2" => Reference::Gemma2(ct::gemma2::Model::new(false, &serde_json::from_str(text)?, vb)?),
            other => anyhow::bail!("no reference for {other}"),
        })
    }

    fn last_logits(&mut self, ids: &[u32], offset: usize) -> anyhow::Result<Vec<f32>> {
        let input = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
        let out = match self {
            Reference::Llama(m, c) => m.forward(&input, offset, c)?,
            Reference::Qwen2(m) => m.forward(&input, offset)?,
            Reference::Mistral(m) => m.forward(&input, offset)?,
            Reference::Phi3(m) => m.forward(&input, offset)?,
            Reference::Gemma2(m) => m.forward(&input, offset)?,
        };
        let v = out.flatten_all()?.to_vec1::<f32>()?;
        let n = out.dim(D::Minus1)?;
        Ok(v[v.len() - n..].to_vec())
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn logits_match_candle_transformers_for_every_architecture() -> anyhow::Result<()> {
    let root = common::temp_dir("parity");
    for (i, arch) in common::ARCHS.iter().enumerate() {
        let dir = root.join(arch);
        let config = common::tiny_config(arch, 97)?;
        common::write_model(&dir, &config, 11 + i as u64)?;
        let text = std::fs::read_to_string(dir.join("config.json"))?;
        let weights = [dir.join("model.safetensors")];
        let cfg = ArchConfig::from_json(&text, "config.json")?;
        let vb = candle_nn::VarBuilder::from_tensors(
            candle_core::safetensors::load(&weights[0], &Device::Cpu)?,
            DType::F32,
            &Device::Cpu,
        );
        let ours = Transformer::load(&cfg, vb.clone(), 128)?;
        let mut reference = Reference::load(arch, &text, vb)?;

        let prompt: Vec<u32> = vec![1, 5, 17, 33, 8, 90, 42];
        let input = Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let (logits, mut kv) = ours.forward(&input, &KvCache::default(), false)?;
        let ours_v = logits.squeeze(0)?.to_vec1::<f32>()?;
        let ref_v = reference.last_logits(&prompt, 0)?;
        let d = max_diff(&ours_v, &ref_v);
        assert!(d < 1e-4, "{arch}: prompt logits differ by {d}");
        let spread =
            ours_v.iter().copied().fold(f32::MIN, f32::max) - ours_v.iter().copied().fold(f32::MAX, f32::min);
        assert!(spread > 0.1, "{arch}: degenerate model (logit spread {spread})");

        for (offset, &t) in (prompt.len()..).zip(&[7u32, 64, 3]) {
            let input = Tensor::new(&[t], &Device::Cpu)?.unsqueeze(0)?;
            let (l, k) = ours.forward(&input, &kv, false)?;
            kv = k;
            let d = max_diff(
                &l.squeeze(0)?.to_vec1::<f32>()?,
                &reference.last_logits(&[t], offset)?,
            );
            assert!(d < 1e-4, "{arch}: cached step logits differ by {d}");
        }
        assert_eq!(kv.len(), prompt.len() + 3);
    }
    Ok(())
}

#[test]
fn batched_candidates_over_a_shared_cache_match_single_runs() -> anyhow::Result<()> {
    let root = common::temp_dir("batch");
    let dir = root.join("qwen2");
    common::write_model(&dir, &common::tiny_config("qwen2", 97)?, 5)?;
    let text = std::fs::read_to_string(dir.join("config.json"))?;
    let cfg = ArchConfig::from_json(&text, "config.json")?;
    let vb = VarBuilder::from_tensors(
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?,
        DType::F32,
        &Device::Cpu,
    );
    let m = Transformer::load(&cfg, vb, 64)?;
    let ctx = Tensor::new(&[1u32, 4, 9, 16], &Device::Cpu)?.unsqueeze(0)?;
    let (_, kv) = m.forward(&ctx, &KvCache::default(), false)?;
    // Two candidates, the second right-padded.
    let batch = Tensor::new(&[[20u32, 21, 22], [30, 31, 0]], &Device::Cpu)?;
    let (all, _) = m.forward(&batch, &kv, true)?;
    for (row, cand) in [vec![20u32, 21, 22], vec![30, 31]].iter().enumerate() {
        let single = Tensor::new(cand.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let (one, _) = m.forward(&single, &kv, true)?;
        let got = all
            .get(row)?
            .narrow(0, 0, cand.len())?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let want = one.flatten_all()?.to_vec1::<f32>()?;
        assert!(max_diff(&got, &want) < 1e-4, "row {row}");
    }
    Ok(())
}

/// The trainer's candle-nn model saves weights that candle-transformers and the node load as a
/// checkpoint of the same architecture, with the same logits; and every one of its tensors gets a
/// gradient (candle-transformers' fused ops have no backward pass, so a model built on them would
/// silently train only the layers above them).
#[test]
fn trained_weights_load_through_candle_transformers() -> anyhow::Result<()> {
    use candle_nn::{Optimizer, VarMap};
    use model_node::train::model::{Shape, TrainModel};
    let root = common::temp_dir("train-roundtrip");
    for (i, arch) in ["llama", "qwen2", "mistral"].into_iter().enumerate() {
        let shape = Shape {
            arch,
            vocab: 61,
            hidden: 32,
            layers: 2,
            heads: 4,
            intermediate: 48,
            max_positions: 64,
        };
        let vars = VarMap::new();
        let model = TrainModel::new(shape.clone(), &vars, 5 + i as u64, &Device::Cpu)?;
        let ids = Tensor::new(
            &[[3u32, 9, 14, 27, 5, 8, 44, 2], [7, 7, 1, 30, 12, 60, 0, 9]],
            &Device::Cpu,
        )?;
        let rows = Tensor::new(&[2u32, 5, 6, 9, 13, 14], &Device::Cpu)?;
        let targets = Tensor::new(&[27u32, 44, 2, 1, 0, 9], &Device::Cpu)?;

        let grads = model.loss(&ids, &rows, &targets)?.backward()?;
        for (name, var) in vars.data().lock().map_err(|_| anyhow::anyhow!("lock"))?.iter() {
            let g = grads
                .get(var.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("{arch}: no gradient reaches {name}"))?;
            let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(norm > 0.0, "{arch}: zero gradient for {name}");
        }
        let mut opt = candle_nn::AdamW::new_lr(vars.all_vars(), 1e-2)?;
        let first = model.loss(&ids, &rows, &targets)?.to_scalar::<f32>()?;
        for _ in 0..20 {
            opt.backward_step(&model.loss(&ids, &rows, &targets)?)?;
        }
        let last = model.loss(&ids, &rows, &targets)?.to_scalar::<f32>()?;
        assert!(last < first * 0.5, "{arch}: loss {first} -> {last}");

        let dir = root.join(arch);
        std::fs::create_dir_all(&dir)?;
        let text = serde_json::to_string(&shape.config_json(1, &[2]))?;
        std::fs::write(dir.join("config.json"), &text)?;
        vars.save(dir.join("model.safetensors"))?;
        let names: Vec<String> = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?
            .into_keys()
            .collect();
        assert_eq!(
            names.iter().any(|n| n == "lm_head.weight"),
            arch != "qwen2",
            "{arch}: {names:?}"
        );

        let vb = VarBuilder::from_tensors(
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?,
            DType::F32,
            &Device::Cpu,
        );
        let prompt = [1u32, 5, 17, 33, 8, 59, 42];
        let x = Tensor::new(&prompt, &Device::Cpu)?.unsqueeze(0)?;
        let h = model.hidden(&x)?.squeeze(0)?.narrow(0, prompt.len() - 1, 1)?;
        let trained = model.logits(&h)?.flatten_all()?.to_vec1::<f32>()?;
        let mut reference = Reference::load(arch, &text, vb.clone())?;
        let theirs = reference.last_logits(&prompt, 0)?;
        assert!(
            max_diff(&trained, &theirs) < 1e-4,
            "{arch}: candle-transformers differs by {}",
            max_diff(&trained, &theirs)
        );
        let cfg = ArchConfig::from_json(&text, "config.json")?;
        let ours = Transformer::load(&cfg, vb, 64)?;
        let (logits, _) = ours.forward(&x, &KvCache::default(), false)?;
        let ours_last = logits.flatten_all()?.to_vec1::<f32>()?;
        let ours_last = &ours_last[ours_last.len() - shape.vocab..];
        assert!(
            max_diff(&trained, ours_last) < 1e-4,
            "{arch}: node transformer differs by {}",
            max_diff(&trained, ours_last)
        );
    }
    Ok(())
}

/// A batched decode step (`forward_ragged`: on the CPU, the ragged attention kernel, each row over
/// its own cache) gives every sequence the logits of its own single-sequence step (candle's path,
/// masked), for sequences of different lengths, on every architecture; sliding windows shorter than
/// the sequences and Gemma's soft-capping included.
#[test]
fn ragged_decode_steps_match_single_sequence_steps() -> anyhow::Result<()> {
    let root = common::temp_dir("ragged");
    for arch in ["llama", "qwen2", "mistral", "phi3", "gemma2"] {
        let dir = root.join(arch);
        let mut config = common::tiny_config(arch, 97)?;
        if matches!(arch, "mistral" | "gemma2") {
            config["sliding_window"] = serde_json::json!(5);
        }
        common::write_model(&dir, &config, 11)?;
        let cfg = ArchConfig::from_json(&std::fs::read_to_string(dir.join("config.json"))?, "config.json")?;
        let vb = VarBuilder::from_tensors(
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?,
            DType::F32,
            &Device::Cpu,
        );
        let m = Transformer::load(&cfg, vb, 64)?;
        let mut ragged = Vec::new();
        let mut single = Vec::new();
        for len in [1usize, 4, 9] {
            let ids: Vec<u32> = (0..len as u32).map(|i| 3 + (i * 7 + len as u32) % 90).collect();
            let (_, kv) = m.forward(
                &Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
                &KvCache::default(),
                false,
            )?;
            ragged.push(kv.clone());
            single.push(kv);
        }
        for step in 0..6u32 {
            let tokens: Vec<u32> = (0..3).map(|j| 5 + (step * 11 + j * 3) % 80).collect();
            let refs: Vec<&KvCache> = ragged.iter().collect();
            let out = m.forward_ragged(&tokens, &refs)?;
            let rows = out.logits.to_vec2::<f32>()?;
            ragged = out.caches;
            for (j, tok) in tokens.iter().enumerate() {
                let input = Tensor::new(&[*tok], &Device::Cpu)?.unsqueeze(0)?;
                let (logits, kv) = m.forward(&input, &single[j], false)?;
                single[j] = kv;
                let want = logits.flatten_all()?.to_vec1::<f32>()?;
                let diff = max_diff(&rows[j], &want);
                assert!(
                    diff < 1e-5,
                    "{arch}: sequence {j}, step {step}: logits differ by {diff}"
                );
                assert_eq!(ragged[j].len(), single[j].len());
            }
        }
    }
    Ok(())
}
