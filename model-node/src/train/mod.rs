//! Training the bundled demo models on CPU.
//!
//! - [`world`]: the synthetic world (arithmetic, atlas, plurals) and its held-out splits;
//! - [`model`]: a trainable decoder with HuggingFace tensor names;
//! - [`recipe`]: the three bundled recipes (arithmetic specialist, atlas specialist, generalist),
//!   their tokenizers and chat templates;
//! - [`deferral`], [`deferral_data`]: Co-LLM deferral heads for a base and its assistants (weak
//!   labels, logistic regression, η) and the run that collects their data through the engines;
//! - this file: batching, the AdamW loop, a greedy held-out check, and writing the model directory.

pub mod deferral;
pub mod deferral_data;
pub mod model;
pub mod recipe;
pub mod world;

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::engine::text::{PromptSpec, TextCodec};
use crate::template::{ChatTemplate, Message};
use crate::vocab::Vocab;
use model::{Shape, TrainModel};
use recipe::{Recipe, Tokenizers};
use world::{Domain, Item, World};

/// Errors while training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    /// Building the tokenizer or a fixture failed.
    #[error("{0}")]
    Fixture(#[from] crate::fixtures::FixtureError),
    /// The node's text handling failed.
    #[error("{0}")]
    Node(#[from] crate::Error),
    /// Writing files failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// JSON failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, TrainError>;

/// Encodes chat items exactly as the node will see them.
pub struct Encoder {
    codec: TextCodec,
    eos: u32,
}

/// One encoded item: the token ids and where the answer starts.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Prompt + answer + EOS.
    pub ids: Vec<u32>,
    /// Index of the first token that is trained on (the answer's first token).
    pub answer_start: usize,
}

impl Encoder {
    /// An encoder over a tokenizer, its chat template and EOS.
    pub fn new(tok: &tokenizers::Tokenizer, template: &str, bos: Option<&str>, eos: &str) -> Result<Self> {
        let eos_id = tok
            .token_to_id(eos)
            .ok_or_else(|| TrainError::Other(format!("EOS {eos:?} is not in the vocabulary")))?;
        let vocab = Vocab::from_tokenizer(tok, tok.get_vocab_size(true), &[eos_id])
            .map_err(|e| TrainError::Other(e.to_string()))?;
        let template = ChatTemplate::new(
            Some(template.to_owned()),
            bos.unwrap_or("").to_owned(),
            eos.to_owned(),
        )?;
        let bos_id = bos.and_then(|b| tok.token_to_id(b));
        let codec = TextCodec::new(tok.clone(), vocab, template, bos_id, false)?;
        Ok(Self { codec, eos: eos_id })
    }

    /// The prompt tokens of a question (what the node feeds before generating).
    pub fn prompt(&self, question: &str) -> Result<Vec<u32>> {
        let p = self.codec.render(&chat(question))?;
        Ok(self.codec.encode(&p, "")?)
    }

    /// Prompt, answer and EOS; training starts at the first token where the joint tokenization leaves
    /// the prompt's own.
    pub fn item(&self, item: &Item) -> Result<Encoded> {
        let p = self.codec.render(&chat(&item.question))?;
        let prompt = self.codec.encode(&p, "")?;
        let mut ids = self.codec.encode(&p, &item.response())?;
        let answer_start = prompt.iter().zip(&ids).take_while(|(a, b)| a == b).count();
        ids.push(self.eos);
        Ok(Encoded { ids, answer_start })
    }

    /// Decodes generated tokens to text.
    pub fn decode(&self, ids: &[u32]) -> String {
        crate::engine::text::text_of(&self.codec.bytes_of(ids))
    }

    /// The EOS id.
    pub fn eos(&self) -> u32 {
        self.eos
    }
}

fn chat(question: &str) -> PromptSpec {
    PromptSpec::Chat(vec![Message {
        role: "user".into(),
        content: question.into(),
    }])
}

/// Picks the domain of the next batch by the recipe's mix. A batch holds one domain, so that short
/// arithmetic items are not padded to the length of atlas questions.
fn pick_domain(recipe: &Recipe, rng: &mut StdRng) -> Domain {
    let r: f64 = rng.random::<f64>() * recipe.mix.iter().sum::<f64>();
    if r < recipe.mix[0] {
        Domain::Arithmetic
    } else if r < recipe.mix[0] + recipe.mix[1] {
        Domain::Atlas
    } else {
        Domain::Words
    }
}

/// A training item of `domain` at `progress` (0..1) through training. Arithmetic follows a short
/// curriculum: 3-digit operands rise from 15% to the evaluation's 50% over the first 40% of the
/// steps, so that digit alignment is learnt on short numbers first.
fn sample(world: &World, domain: Domain, countries: &[usize], progress: f64, rng: &mut StdRng) -> Item {
    match domain {
        Domain::Arithmetic => {
            let p_three = 0.15 + 0.35 * (progress / 0.4).min(1.0);
            world.arithmetic_with(rng, false, p_three)
        }
        Domain::Atlas => world.atlas(rng, countries),
        Domain::Words => world.words(rng, false),
    }
}

/// A padded batch: ids `[B, T]`, the flattened positions that predict, and their targets.
fn batch(items: &[Encoded], pad: u32, device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
    let t = items.iter().map(|e| e.ids.len() - 1).max().unwrap_or(1).max(1);
    let mut ids = Vec::with_capacity(items.len() * t);
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for (b, e) in items.iter().enumerate() {
        let input = &e.ids[..e.ids.len() - 1];
        ids.extend_from_slice(input);
        ids.extend(std::iter::repeat_n(pad, t - input.len()));
        for pos in e.answer_start.max(1)..e.ids.len() {
            rows.push((b * t + pos - 1) as u32);
            targets.push(e.ids[pos]);
        }
    }
    Ok((
        Tensor::from_vec(ids, (items.len(), t), device)?,
        Tensor::new(rows, device)?,
        Tensor::new(targets, device)?,
    ))
}

/// Exact-match accuracy per domain on `n` held-out items each: the written model directory loaded by
/// the node's own engine (template, token healing, EOS handling exactly as served), greedy.
pub fn accuracy(dir: &Path, world: &World, n: usize) -> Result<Vec<(Domain, f64)>> {
    accuracy_of(&mut load_engine(dir)?.engine, world, n)
}

/// A model directory loaded by the node's own loader, on the CPU in f32, with small limits (no
/// deferral head): what the trainer's checks drive in-process.
pub fn load_engine(dir: &Path) -> Result<crate::node::Loaded> {
    use crate::config::{DTypeArg, LimitArgs, ModelArgs};
    let args = ModelArgs {
        model_dir: dir.to_path_buf(),
        model_id: None,
        device: "cpu".into(),
        dtype: DTypeArg::F32,
        threads: 0,
        max_context: None,
    };
    let limits = LimitArgs {
        max_sessions: 4,
        kv_cache_mb: 64,
        queue: 4,
        char_hypotheses: 4,
        char_min_mass: 1e-4,
    };
    Ok(crate::node::load(&args, &limits)?)
}

fn accuracy_of(engine: &mut crate::engine::Engine, world: &World, n: usize) -> Result<Vec<(Domain, f64)>> {
    use crate::engine::{ContextBody, ContextSpec, Job, ProposeParams, Reply};
    let mut out = Vec::new();
    for d in Domain::ALL {
        let set = world.eval_set(d, n);
        let mut ok = 0;
        for it in &set {
            let job = Job::Propose(
                ContextSpec {
                    session: String::new(),
                    body: ContextBody::Full {
                        prompt: chat(&it.question),
                        answer: String::new(),
                    },
                    rtd_lambda: None,
                },
                ProposeParams {
                    max_new_tokens: 48,
                    stop: vec![],
                    sampling: Default::default(),
                    defer_threshold: None,
                },
            );
            if let Reply::Proposal(p) = engine.run(job, 0.0, &|| false)?
                && world::strip_reasoning(&p.text).trim() == it.answer
            {
                ok += 1;
            }
        }
        out.push((d, ok as f64 / set.len().max(1) as f64));
    }
    Ok(out)
}

/// What a training run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Recipe name.
    pub recipe: String,
    /// Steps run.
    pub steps: usize,
    /// Seconds spent.
    pub seconds: f64,
    /// Mean loss over the last 50 steps.
    pub final_loss: f64,
    /// Parameters.
    pub parameters: usize,
    /// Held-out exact match per domain (greedy, in-process).
    pub accuracy: Vec<(Domain, f64)>,
}

/// Trains `recipe` for `steps` (None: the recipe's own) and writes a complete HuggingFace directory to
/// `out`. `progress` is called every `log_every` steps with (step, mean loss).
pub fn train(
    recipe: &Recipe,
    world_seed: u64,
    steps: Option<usize>,
    out: &Path,
    eval_items: usize,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<Report> {
    let started = Instant::now();
    let device = Device::Cpu;
    let world = World::new(world_seed);
    let toks: Tokenizers = recipe::build_tokenizer(recipe, &world)?;
    let enc = Encoder::new(&toks.tokenizer, recipe.template, toks.bos.as_deref(), &toks.eos)?;
    let shape = Shape {
        vocab: toks.tokenizer.get_vocab_size(true),
        ..recipe.shape.clone()
    };
    let vars = VarMap::new();
    let model = TrainModel::new(shape.clone(), &vars, recipe.seed, &device)?;
    let steps = steps.unwrap_or(recipe.steps);
    let mut opt = AdamW::new(
        vars.all_vars(),
        ParamsAdamW {
            lr: recipe.lr,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.01,
        },
    )?;
    let countries = recipe.countries(&world);
    let mut rng = StdRng::seed_from_u64(recipe.seed ^ 0x5eed);
    let mut recent = std::collections::VecDeque::new();
    let log_every = 50;
    let warmup = (steps / 20).clamp(1, 200);
    for step in 0..steps {
        let lr = if step < warmup {
            recipe.lr * (step + 1) as f64 / warmup as f64
        } else {
            let p = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
            recipe.lr * (0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
        };
        opt.set_learning_rate(lr);
        let domain = pick_domain(recipe, &mut rng);
        let fraction = step as f64 / steps as f64;
        let items: Vec<Encoded> = (0..recipe.batch)
            .map(|_| enc.item(&sample(&world, domain, &countries, fraction, &mut rng)))
            .collect::<Result<_>>()?;
        let (ids, rows, targets) = batch(&items, enc.eos(), &device)?;
        let loss = model.loss(&ids, &rows, &targets)?;
        opt.backward_step(&loss)?;
        recent.push_back(f64::from(loss.to_scalar::<f32>()?));
        if recent.len() > log_every {
            recent.pop_front();
        }
        if (step + 1) % log_every == 0 || step + 1 == steps {
            progress(step + 1, recent.iter().sum::<f64>() / recent.len() as f64);
        }
    }
    let mut report = Report {
        recipe: recipe.name.to_owned(),
        steps,
        seconds: started.elapsed().as_secs_f64(),
        final_loss: recent.iter().sum::<f64>() / recent.len().max(1) as f64,
        parameters: shape.parameters(),
        accuracy: vec![],
    };
    write_dir(out, recipe, &toks, &shape, &vars, &report)?;
    drop(model);
    report.accuracy = accuracy(out, &world, eval_items)?;
    write_dir(out, recipe, &toks, &shape, &vars, &report)?;
    Ok(report)
}

/// Writes config, tokenizer files, generation config, weights and the training report.
fn write_dir(
    out: &Path,
    recipe: &Recipe,
    toks: &Tokenizers,
    shape: &Shape,
    vars: &VarMap,
    report: &Report,
) -> Result<()> {
    crate::fixtures::write_tokenizer_dir(
        out,
        &toks.tokenizer,
        toks.bos.as_deref(),
        &toks.eos,
        Some(recipe.template),
    )?;
    let id = |t: &str| toks.tokenizer.token_to_id(t);
    let eos: Vec<u32> = toks.eos_all.iter().filter_map(|t| id(t)).collect();
    let bos = toks
        .bos
        .as_deref()
        .and_then(id)
        .or(eos.first().copied())
        .unwrap_or(0);
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&shape.config_json(bos, &eos))?,
    )?;
    std::fs::write(
        out.join("generation_config.json"),
        serde_json::to_string_pretty(&json!({"bos_token_id": bos, "eos_token_id": eos, "do_sample": false}))?,
    )?;
    vars.save(out.join("model.safetensors"))?;
    std::fs::write(
        out.join("training.json"),
        serde_json::to_string_pretty(&json!({
            "recipe": recipe.name, "description": recipe.description, "report": report,
            "shape": {"arch": shape.arch, "hidden": shape.hidden, "layers": shape.layers, "heads": shape.heads,
                      "intermediate": shape.intermediate, "vocab": shape.vocab},
            "batch": recipe.batch, "lr": recipe.lr, "seed": recipe.seed, "mix": recipe.mix,
            "dtype": format!("{:?}", DType::F32),
        }))?,
    )?;
    Ok(())
}
