//! GGUF checkpoints: the project's own converter writes tiny random models of every architecture as
//! GGUF; read back, an F32 file gives the safetensors logits, quantized ones stay within a stated
//! tolerance; candle-transformers' llama.cpp-compatible `quantized_llama` reads the files the same
//! way (names, row permutation, metadata); and a node serves a quantized model over gRPC.

mod common;

use std::path::Path;

use candle_core::quantized::{GgmlDType, gguf_file};
use candle_core::{DType, Device, Tensor};
use ensemble_proto::v1 as pb;
use model_node::model::gguf::convert;
use model_node::model::{KvCache, Transformer};
use model_node::modeldir::{ModelFiles, WeightFiles};

/// A fixed token sequence inside every fixture vocabulary.
const TOKENS: [u32; 12] = [5, 17, 3, 40, 22, 9, 31, 12, 7, 28, 14, 6];

fn load(dir: &Path) -> anyhow::Result<(ModelFiles, Transformer)> {
    let files = ModelFiles::open(dir)?;
    let model = files.load_model(&Device::Cpu, DType::F32, 64)?;
    Ok((files, model))
}

/// Logits `(seq, vocab)` of every position, as f32.
fn logits(m: &Transformer) -> anyhow::Result<Vec<Vec<f32>>> {
    let ids = Tensor::new(&TOKENS[..], &Device::Cpu)?.unsqueeze(0)?;
    let (l, _) = m.forward(&ids, &KvCache::default(), true)?;
    Ok(l.squeeze(0)?.to_vec2::<f32>()?)
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmaxes(a: &[Vec<f32>]) -> Vec<usize> {
    a.iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
                .0
        })
        .collect()
}

#[test]
fn f32_gguf_gives_the_safetensors_logits_for_every_architecture() -> anyhow::Result<()> {
    let root = common::temp_dir("gguf-f32");
    for arch in common::ARCHS {
        let src = common::model_dir(&root, arch, "byte_level", 7)?;
        let out = root.join(format!("{arch}-gguf"));
        let c = convert(&src, &out, GgmlDType::F32)?;
        assert_eq!(c.types.keys().collect::<Vec<_>>(), vec!["F32"], "{arch}");
        let (_, st) = load(&src)?;
        let (files, gg) = load(&out)?;
        assert!(
            matches!(files.weights, WeightFiles::Gguf(_)),
            "{arch}: the directory is read as GGUF"
        );
        // llama.cpp writes Mistral as `llama` (the same network; the window is kept in the metadata).
        let want = match st.config().arch {
            model_node::model::Arch::Mistral => model_node::model::Arch::Llama,
            a => a,
        };
        assert_eq!(files.config.arch, want, "{arch}");
        assert_eq!(files.config.sliding_window, st.config().sliding_window, "{arch}");
        assert_eq!(
            files.config.tie_word_embeddings,
            st.config().tie_word_embeddings,
            "{arch}"
        );
        let d = max_diff(&logits(&st)?, &logits(&gg)?);
        // Bit for bit but for the Llama-3 rotary factors, which GGUF stores as divisors (one rounding).
        assert!(d <= 1e-5, "{arch}: F32 GGUF logits differ by {d}");
    }
    Ok(())
}

#[test]
fn quantized_gguf_stays_within_tolerance() -> anyhow::Result<()> {
    let root = common::temp_dir("gguf-quant");
    // k-quants need rows of 256: a wider model (hidden 256, MLP 512).
    let src = common::model_dir(&root, "llama", "byte_level", 11)?;
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json"))?)?;
    cfg["hidden_size"] = 256.into();
    cfg["intermediate_size"] = 512.into();
    common::write_model(&src, &cfg, 11)?;
    let (_, st) = load(&src)?;
    let reference = logits(&st)?;
    let scale = reference.iter().flatten().map(|x| x.abs()).fold(0.0f32, f32::max);
    let mut report = Vec::new();
    // Measured (max |Δlogit| / max |logit|, top-1 agreement of 12): F16 3.3e-4 (12), Q8_0 7.7e-3
    // (12), Q6_K 2.9e-2 (12), Q5_K 4.5e-2 (12), Q4_K 9.6e-2 (9).
    for (ty, tol) in [
        (GgmlDType::F16, 1e-3),
        (GgmlDType::Q8_0, 2e-2),
        (GgmlDType::Q6K, 5e-2),
        (GgmlDType::Q5K, 8e-2),
        (GgmlDType::Q4K, 0.15),
    ] {
        let out = root.join(format!("{ty:?}"));
        let c = convert(&src, &out, ty)?;
        assert_eq!(
            c.types.get(&format!("{ty:?}")).copied(),
            Some(1 + 2 * 7 + 1),
            "{ty:?}: every matrix in the asked type: {:?}",
            c.types
        );
        let (_, q) = load(&out)?;
        let got = logits(&q)?;
        let rel = max_diff(&reference, &got) / scale;
        let agree = argmaxes(&reference)
            .iter()
            .zip(argmaxes(&got))
            .filter(|(a, b)| **a == *b)
            .count();
        report.push(format!(
            "{ty:?}: {rel:.2e} relative, top-1 {agree}/{}",
            TOKENS.len()
        ));
        assert!(
            rel <= tol,
            "{ty:?}: logits differ by {rel} of their range (tolerance {tol})"
        );
    }
    eprintln!("{}", report.join("\n"));
    Ok(())
}

#[test]
fn candle_transformers_quantized_llama_reads_our_files_as_llama_cpp_does() -> anyhow::Result<()> {
    // An independent reader of llama.cpp's conventions (tensor names, the interleaved-RoPE row
    // permutation of q/k, the metadata keys): its logits must equal ours.
    let root = common::temp_dir("gguf-ct");
    let src = common::model_dir(&root, "llama", "byte_level", 5)?;
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json"))?)?;
    // quantized_llama knows no rotary scaling tensor.
    cfg.as_object_mut().map(|o| o.remove("rope_scaling"));
    common::write_model(&src, &cfg, 5)?;
    for ty in [GgmlDType::F32, GgmlDType::Q8_0] {
        let out = root.join(format!("ct-{ty:?}"));
        convert(&src, &out, ty)?;
        let (_, ours) = load(&out)?;
        let mut f = std::fs::File::open(out.join("model.gguf"))?;
        let content = gguf_file::Content::read(&mut f)?;
        let mut theirs = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
            content,
            &mut f,
            &Device::Cpu,
        )?;
        let ids = Tensor::new(&TOKENS[..], &Device::Cpu)?.unsqueeze(0)?;
        let t = theirs.forward(&ids, 0)?.flatten_all()?.to_vec1::<f32>()?;
        let o = logits(&ours)?.pop().unwrap_or_default();
        let d = max_diff(&[t], &[o]);
        assert!(
            d <= 1e-3,
            "{ty:?}: candle-transformers' llama.cpp reader differs by {d}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_a_quantized_gguf_model() -> anyhow::Result<()> {
    let root = common::temp_dir("gguf-serve");
    let src = common::model_dir(&root, "qwen2", "byte_level", 3)?;
    let f32_dir = root.join("f32");
    let q8_dir = root.join("q8");
    convert(&src, &f32_dir, GgmlDType::F32)?;
    convert(&src, &q8_dir, GgmlDType::Q8_0)?;
    let mut answers = Vec::new();
    for dir in [&src, &f32_dir, &q8_dir] {
        let mut node = common::TestNode::start(common::model_args(dir), common::limits()).await?;
        let mut c = node.client().await?;
        let info = c.info(pb::InfoRequest {}).await?.into_inner();
        let p = c
            .propose_segment(common::greedy(common::chat("the cat", "", "s"), 8))
            .await?
            .into_inner();
        let s = c
            .score_candidates(pb::ScoreRequest {
                context: common::delta("s", 0, ""),
                candidates: vec![" the".into(), " a cat".into()],
                string_prefix: false,
                ends_answer: vec![],
            })
            .await?
            .into_inner();
        let n = c
            .next_char_distribution(pb::NextCharRequest {
                context: common::chat("the cat", "the ca", "n"),
                top_k: 8,
                max_hypotheses: None,
                lookahead: None,
            })
            .await?
            .into_inner();
        let total: f64 = n.chars.iter().map(|c| c.prob).sum::<f64>() + n.eos_prob + n.residual;
        assert!(
            (total - 1.0).abs() < 1e-5,
            "{}: next-character mass {total}",
            dir.display()
        );
        answers.push((
            info.model_id,
            p.text,
            s.scores.iter().map(|x| x.sum_logprob).collect::<Vec<_>>(),
            n,
        ));
        node.stop().await?;
    }
    let (st, f32, q8) = (&answers[0], &answers[1], &answers[2]);
    assert_eq!(f32.1, st.1, "F32 GGUF proposes what safetensors does");
    for (a, b) in st.2.iter().zip(&f32.2) {
        assert!((a - b).abs() < 1e-4, "F32 GGUF scores {a} vs {b}");
    }
    for (a, b) in st.2.iter().zip(&q8.2) {
        assert!((a - b).abs() < 0.1, "Q8_0 scores within 0.1 nats: {a} vs {b}");
    }
    assert_eq!(
        st.3.chars.first().map(|c| &c.char),
        q8.3.chars.first().map(|c| &c.char)
    );
    assert_eq!(q8.0, "q8", "the model id is the directory's name");
    Ok(())
}
