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

/// A llama fixture wide enough for k-quants, whose rows must be whole blocks of 256 (hidden 256, MLP
/// 512, two layers).
fn wide_model(root: &Path) -> anyhow::Result<std::path::PathBuf> {
    let src = common::model_dir(root, "llama", "byte_level", 11)?;
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json"))?)?;
    cfg["hidden_size"] = 256.into();
    cfg["intermediate_size"] = 512.into();
    common::write_model(&src, &cfg, 11)?;
    Ok(src)
}

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
    let src = wide_model(&root)?;
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

/// A prefill of more rows than a decode step takes (48 > 32: on CPUs without VNNI the weights are
/// dequantized for it) stays within the type's tolerance of the safetensors logits, and its last
/// position agrees as closely with the same sequence stepped one token at a time (quantized products).
#[test]
fn a_long_prefill_on_a_quantized_model_agrees_with_decode_steps() -> anyhow::Result<()> {
    let root = common::temp_dir("gguf-prefill");
    let src = wide_model(&root)?;
    let (_, st) = load(&src)?;
    let tokens: Vec<u32> = (0..48u32)
        .map(|i| TOKENS[(i as usize * 5) % TOKENS.len()] + i % 3)
        .collect();
    let all = |m: &Transformer| -> anyhow::Result<Vec<Vec<f32>>> {
        let ids = Tensor::new(tokens.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        Ok(m.forward(&ids, &KvCache::default(), true)?
            .0
            .squeeze(0)?
            .to_vec2::<f32>()?)
    };
    let reference = all(&st)?;
    let scale = reference.iter().flatten().map(|x| x.abs()).fold(0.0f32, f32::max);
    for (ty, tol) in [(GgmlDType::Q8_0, 2e-2), (GgmlDType::Q4K, 0.15)] {
        let out = root.join(format!("{ty:?}"));
        convert(&src, &out, ty)?;
        let (_, q) = load(&out)?;
        let prefill = all(&q)?;
        let rel = max_diff(&reference, &prefill) / scale;
        assert!(
            rel <= tol,
            "{ty:?}: a 48-row prefill differs by {rel} of the range (tolerance {tol})"
        );
        let ids = Tensor::new(&tokens[..8], &Device::Cpu)?.unsqueeze(0)?;
        let (_, mut kv) = q.forward(&ids, &KvCache::default(), false)?;
        let mut last = Vec::new();
        for &t in &tokens[8..] {
            let step = q.forward_ragged(&[t], &[&kv])?;
            last = step.logits.squeeze(0)?.to_vec1::<f32>()?;
            kv = step.caches.into_iter().next().unwrap_or_default();
        }
        let stepped = max_diff(&[last], &prefill[47..]) / scale;
        assert!(
            stepped <= tol,
            "{ty:?}: stepped and prefilled last logits differ by {stepped} of the range (tolerance {tol})"
        );
    }
    Ok(())
}

/// llama.cpp's `Q4_K_M` and `Q5_K_M` mixes: the output head and the second (last) layer's value and
/// MLP down projections at Q6_K, the rest at the base k-quant; `general.file_type` says which mix;
/// the logits stay within the base type's tolerance.
#[test]
fn k_quant_mixes_follow_llama_cpp() -> anyhow::Result<()> {
    use model_node::model::gguf::Quant;
    let root = common::temp_dir("gguf-mix");
    let src = wide_model(&root)?;
    let (_, st) = load(&src)?;
    let reference = logits(&st)?;
    let scale = reference.iter().flatten().map(|x| x.abs()).fold(0.0f32, f32::max);
    for (mix, base, file_type, tol) in [
        (Quant::Q4KM, GgmlDType::Q4K, 15, 0.15),
        (Quant::Q5KM, GgmlDType::Q5K, 17, 8e-2),
    ] {
        let out = root.join(format!("{mix:?}"));
        let c = convert(&src, &out, mix)?;
        let count = |t: GgmlDType| c.types.get(&format!("{t:?}")).copied().unwrap_or(0);
        assert_eq!(
            (count(GgmlDType::Q6K), count(base)),
            (3, 13),
            "{mix:?}: {:?}",
            c.types
        );
        let mut f = std::fs::File::open(&c.file)?;
        let content = gguf_file::Content::read(&mut f)?;
        let types: Vec<(String, GgmlDType)> =
            ["output.weight", "blk.1.attn_v.weight", "blk.1.ffn_down.weight"]
                .iter()
                .map(|n| (n.to_string(), content.tensor_infos[*n].ggml_dtype))
                .collect();
        assert!(
            types.iter().all(|(_, t)| *t == GgmlDType::Q6K),
            "{mix:?}: {types:?}"
        );
        assert_eq!(content.tensor_infos["blk.0.attn_v.weight"].ggml_dtype, base);
        assert_eq!(content.metadata["general.file_type"].to_u32()?, file_type);
        let (_, q) = load(&out)?;
        let rel = max_diff(&reference, &logits(&q)?) / scale;
        eprintln!("{mix:?}: {rel:.2e} relative");
        assert!(
            rel <= tol,
            "{mix:?}: logits differ by {rel} of their range (tolerance {tol})"
        );
    }
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

/// The real tokenizers and text in `../shared/real` (absent: the test says so and checks only the
/// fixture).
fn real() -> Option<std::path::PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/real");
    p.join("tokenizers").is_dir().then_some(p)
}

/// A GGUF file read without a `tokenizer.json` beside it takes its tokenizer from its metadata:
/// SentencePiece ones (llama.cpp's `llama` model, which candle does not read) are rebuilt as
/// HuggingFace's converter does. The tokens of real text, with and without BOS, are those of the
/// original `tokenizer.json`: the real Llama 2 and Phi-3 tokenizers through the metadata the
/// converter writes, and a SentencePiece fixture model converted and loaded as a node would.
/// (Special-token text inside the input is left out: whether it is matched before or after
/// normalization is a per-token flag of `tokenizer.json` that GGUF metadata does not carry, and the
/// real files differ on it.)
#[test]
fn a_gguf_file_alone_tokenizes_as_its_tokenizer_json() -> anyhow::Result<()> {
    let mut texts: Vec<String> = vec![
        "Once upon a time, there was a little girl named Lily.".into(),
        "  two spaces,\nnew lines\tand tabs; ünïcödé, 日本語 and an emoji 🙂!".into(),
        "digits 1234567, [brackets] <angles> and \"quotes\"".into(),
        String::new(),
    ];
    let mut checked = Vec::new();
    if let Some(real) = real() {
        let text = std::fs::read_to_string(real.join("text/tinystories-valid-a.txt"))?;
        texts.extend(text.lines().take(200).map(str::to_owned));
        for name in ["llama2", "phi3"] {
            let path = real.join("tokenizers").join(name).join("tokenizer.json");
            let json = std::fs::read_to_string(&path)?;
            let original = tokenizers::Tokenizer::from_file(&path).map_err(anyhow::Error::msg)?;
            let len = |special| {
                original
                    .encode("x", special)
                    .map(|e| e.len())
                    .map_err(anyhow::Error::msg)
            };
            let add_bos = len(true)? > len(false)?;
            let meta =
                model_node::model::gguf::tokenizer_metadata(&json, add_bos, original.get_vocab_size(true));
            let content = gguf_file::Content {
                magic: gguf_file::VersionedMagic::GgufV3,
                metadata: meta.into_iter().collect(),
                tensor_infos: Default::default(),
                tensor_data_offset: 0,
            };
            let read =
                model_node::model::gguf::tokenizer_from_metadata(&content).map_err(anyhow::Error::msg)?;
            same_tokens(name, &original, &read, &texts, &[false, true])?;
            checked.push(name);
        }
    } else {
        eprintln!("../shared/real is absent: only the fixture is checked");
    }
    let root = common::temp_dir("gguf-tokenizer");
    let src = common::model_dir(&root, "llama", "sentencepiece", 5)?;
    let out = root.join("gguf");
    convert(&src, &out, GgmlDType::F32)?;
    let alone = root.join("alone");
    std::fs::create_dir_all(&alone)?;
    std::fs::rename(out.join("model.gguf"), alone.join("model.gguf"))?;
    let files = ModelFiles::open(&alone)?;
    let before = ModelFiles::open(&src)?;
    // The node encodes without special tokens and adds BOS itself, as `add_bos` says.
    same_tokens("fixture", &before.tokenizer, &files.tokenizer, &texts, &[false])?;
    assert_eq!(
        (files.add_bos, &files.bos, &files.eos_ids),
        (before.add_bos, &before.bos, &before.eos_ids)
    );
    checked.push("fixture");
    eprintln!("checked: {checked:?} over {} texts", texts.len());
    Ok(())
}

/// The same ids for every text (with and without special tokens, as `specials` asks), and the
/// same decoded text.
fn same_tokens(
    name: &str,
    a: &tokenizers::Tokenizer,
    b: &tokenizers::Tokenizer,
    texts: &[String],
    specials: &[bool],
) -> anyhow::Result<()> {
    for t in texts {
        for &special in specials {
            let x = a.encode(t.as_str(), special).map_err(anyhow::Error::msg)?;
            let y = b.encode(t.as_str(), special).map_err(anyhow::Error::msg)?;
            assert_eq!(
                x.get_ids(),
                y.get_ids(),
                "{name}: {t:?} (special tokens: {special})"
            );
        }
        let ids = a.encode(t.as_str(), false).map_err(anyhow::Error::msg)?;
        assert_eq!(
            a.decode(ids.get_ids(), true).map_err(anyhow::Error::msg)?,
            b.decode(ids.get_ids(), true).map_err(anyhow::Error::msg)?,
            "{name}: decoding {t:?}"
        );
    }
    Ok(())
}
