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
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).expect("create temp dir");
    base
}

use std::net::SocketAddr;
use std::time::Duration;

use ensemble_proto::v1 as pb;
use model_node::chars::CharOptions;
use model_node::config::{DTypeArg, LimitArgs, ModelArgs};
use tokio::sync::oneshot;

/// Corpus the fixture tokenizers are trained on (ASCII and multi-byte text).
pub const CORPUS: &[&str] = &[
    "the cat sat on the mat. the dog ate the bone.",
    "once upon a time there was a little cat named tom.",
    "café crème brûlée, naïve résumé. 中文字符 测试. emoji 😀 smile 😀!",
    "What is 347 + 58? 405. What is the capital of Veloria? Tarn.",
    "hello world, hello there, help the helpers.",
];

pub const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A complete model directory: `arch` weights over a fixture tokenizer of `kind`
/// ("byte_level", "sentencepiece" or "char").
pub fn model_dir(root: &Path, arch: &str, kind: &str, seed: u64) -> anyhow::Result<PathBuf> {
    use model_node::fixtures;
    let dir = root.join(format!("{arch}-{kind}"));
    let (tok, bos, eos, template) = match kind {
        "byte_level" => (
            fixtures::byte_level_bpe(CORPUS, 300)?,
            None,
            "<|endoftext|>",
            Some(CHATML),
        ),
        "sentencepiece" => (
            fixtures::sentencepiece_bpe(CORPUS, 400)?,
            Some("<s>"),
            "</s>",
            None,
        ),
        "char" => (fixtures::char_level(CORPUS)?, Some("<bos>"), "<eos>", None),
        other => anyhow::bail!("unknown tokenizer kind {other}"),
    };
    fixtures::write_tokenizer_dir(&dir, &tok, bos, eos, template)?;
    let vocab = tok.get_vocab_size(true);
    let mut config = tiny_config(arch, vocab);
    let o = config.as_object_mut().expect("object");
    o.insert(
        "bos_token_id".into(),
        serde_json::json!(bos.and_then(|b| tok.token_to_id(b))),
    );
    o.insert("eos_token_id".into(), serde_json::json!(tok.token_to_id(eos)));
    write_model(&dir, &config, seed)?;
    Ok(dir)
}

pub fn model_args(dir: &Path) -> ModelArgs {
    ModelArgs {
        model_dir: dir.to_owned(),
        model_id: None,
        device: "cpu".into(),
        dtype: DTypeArg::F32,
        threads: 0,
        max_context: None,
    }
}

pub fn limits() -> LimitArgs {
    LimitArgs {
        max_sessions: 64,
        kv_cache_mb: 256,
        queue: 16,
        char_hypotheses: 4,
        char_min_mass: 1e-4,
    }
}

/// A node serving on 127.0.0.1:0; dropping it (or `stop`) shuts the server down.
pub struct TestNode {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<model_node::Result<()>>>,
}

impl TestNode {
    pub async fn start(args: ModelArgs, limits: LimitArgs) -> anyhow::Result<Self> {
        let loaded = model_node::node::load(&args, &limits)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = rx.await;
        };
        let task = tokio::spawn(model_node::server::run(
            listener,
            loaded,
            CharOptions::default(),
            shutdown,
            Duration::from_secs(10),
        ));
        Ok(Self {
            addr,
            stop: Some(tx),
            task: Some(task),
        })
    }

    pub async fn client(
        &self,
    ) -> anyhow::Result<pb::model_node_client::ModelNodeClient<tonic::transport::Channel>> {
        Ok(pb::model_node_client::ModelNodeClient::connect(format!("http://{}", self.addr)).await?)
    }

    pub async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        Ok(
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))?
                .connect()
                .await?,
        )
    }

    /// Starts the drain and waits for the server to stop.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await??;
        }
        Ok(())
    }
}

pub fn raw(prompt: &str, answer: &str, session: &str) -> Option<pb::Context> {
    Some(pb::Context {
        session_id: session.into(),
        body: Some(pb::context::Body::Full(pb::FullContext {
            prompt: Some(pb::Prompt {
                kind: Some(pb::prompt::Kind::Raw(prompt.into())),
            }),
            answer: answer.into(),
        })),
    })
}

pub fn chat(user: &str, answer: &str, session: &str) -> Option<pb::Context> {
    Some(pb::Context {
        session_id: session.into(),
        body: Some(pb::context::Body::Full(pb::FullContext {
            prompt: Some(pb::Prompt {
                kind: Some(pb::prompt::Kind::Conversation(pb::Conversation {
                    messages: vec![pb::ChatMessage {
                        role: "user".into(),
                        content: user.into(),
                    }],
                })),
            }),
            answer: answer.into(),
        })),
    })
}

pub fn delta(session: &str, base_chars: u64, append: &str) -> Option<pb::Context> {
    Some(pb::Context {
        session_id: session.into(),
        body: Some(pb::context::Body::Delta(pb::ContextDelta {
            base_chars,
            append: append.into(),
        })),
    })
}

pub fn greedy(ctx: Option<pb::Context>, n: u32) -> pb::ProposeRequest {
    pb::ProposeRequest {
        context: ctx,
        max_new_tokens: n,
        stop: vec![],
        sampling: Some(pb::Sampling::default()),
    }
}
