//! `ensemble-train deferral`: the data and the run. Every model is loaded by the node's own loader
//! and asked the way a served node is asked (its own chat template and tokenizer), on the synthetic
//! world's *training* items of all three domains; a disjoint validation split chooses η.
//!
//! At each position of the base's canonical tokenization of the gold response (character offset c):
//! - the feature is the base's last hidden state after the final norm, at the position before;
//! - the base's guess is its argmax over the tokens a proposal may produce (EOS and text tokens);
//! - each assistant's guess is its greedy `ProposeSegment` of one token after `gold[..c]`
//!   ([`crate::engine::Job::Propose`] through its own engine, token healing included), exactly what
//!   the coordinator asks an assistant at a deferral.
//!
//! The end of the answer is a position too (c = the gold length): there only EOS is right, so a head
//! also learns to hand the decision to stop to an assistant that knows the answer is complete.
//! Positions whose token starts inside the prompt (a token merging the prompt's end with the
//! answer's start), or inside a multi-byte character, are skipped.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::IndexOp;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;

use super::deferral::{EtaRule, FitOptions, Guess, PosWeight, auc, choose_eta, fit, label, loss, rates};
use super::world::{Domain, Item, World};
use super::{Result, TrainError, chat, load_engine};
use crate::deferral::DeferralHead;
use crate::engine::{ContextBody, ContextSpec, Engine, Finish, Job, ProposeParams, Reply};

/// What `ensemble-train deferral` is asked.
#[derive(Debug, Clone)]
pub struct Options {
    /// The base model directory.
    pub base: PathBuf,
    /// Assistants: member name and model directory, in head order.
    pub assistants: Vec<(String, PathBuf)>,
    /// Seed of the synthetic world.
    pub world_seed: u64,
    /// Training items (all domains, in turn).
    pub train_items: usize,
    /// Validation items (disjoint from the training items).
    pub val_items: usize,
    /// Positive class weight.
    pub pos_weight: PosWeight,
    /// How η is chosen.
    pub eta_rule: EtaRule,
    /// Adam steps and step size.
    pub fit: FitOptions,
    /// The head file written.
    pub out: PathBuf,
}

/// One gold position.
#[derive(Debug, Clone)]
pub struct Position {
    /// The item's domain.
    pub domain: Domain,
    /// The base's normed last hidden state before the position.
    pub h: Vec<f32>,
    /// Per assistant: the weak label.
    pub labels: Vec<bool>,
    /// Per assistant: whether its guess was right.
    pub assistant_right: Vec<bool>,
    /// Whether the base's guess was right.
    pub base_right: bool,
}

impl Position {
    /// "Some assistant right, base wrong": the label η is chosen for.
    pub fn any(&self) -> bool {
        self.labels.iter().any(|l| *l)
    }
}

/// Training items of every domain in turn, from `seed`, skipping questions in `exclude`.
fn items(world: &World, seed: u64, n: usize, exclude: &HashSet<String>) -> Vec<Item> {
    let mut rng = StdRng::seed_from_u64(seed);
    let countries: Vec<usize> = (0..world.countries.len()).collect();
    let mut out = Vec::with_capacity(n);
    let mut seen = HashSet::new();
    let mut i = 0;
    while out.len() < n && i < 100 * (n + 1) {
        let it = match Domain::ALL[i % Domain::ALL.len()] {
            Domain::Arithmetic => world.arithmetic(&mut rng, false),
            Domain::Atlas => world.atlas(&mut rng, &countries),
            Domain::Words => world.words(&mut rng, false),
        };
        i += 1;
        if !exclude.contains(&it.question) && seen.insert(it.question.clone()) {
            out.push(it);
        }
    }
    out
}

/// The greedy next text of `engine` after the gold prefix, as a [`Guess`].
fn propose_one(engine: &mut Engine, session: &str, question: &str, answer: &str) -> Result<Guess> {
    let job = Job::Propose(
        ContextSpec {
            session: session.into(),
            body: ContextBody::Full {
                prompt: chat(question),
                answer: answer.into(),
            },
            rtd_lambda: None,
        },
        ProposeParams {
            max_new_tokens: 1,
            stop: vec![],
            sampling: Default::default(),
            defer_threshold: None,
        },
    );
    match engine.run(job, 0.0, &|| false)? {
        Reply::Proposal(p) if p.text.is_empty() && p.finish == Finish::Eos => Ok(Guess::Eos),
        Reply::Proposal(p) => Ok(Guess::Text(p.text.into_bytes())),
        _ => Err(TrainError::Other(
            "the engine answered a proposal with something else".into(),
        )),
    }
}

/// The positions of one item, or `None` when the base's tokenization does not end with the gold
/// response's bytes (the item is skipped).
fn positions(
    base: &mut Engine,
    assistants: &mut [(String, Engine)],
    item: &Item,
    key: &str,
) -> Result<Option<Vec<Position>>> {
    let gold = item.response();
    let g = gold.as_bytes();
    let codec = base.codec();
    let vocab = &codec.vocab;
    let tokens = codec.encode(&codec.render(&chat(&item.question))?, &gold)?;
    let lens: Vec<usize> = tokens
        .iter()
        .map(|&t| vocab.token_bytes(t).map_or(0, <[u8]>::len))
        .collect();
    let all = codec.bytes_of(&tokens);
    if !all.ends_with(g) {
        return Ok(None);
    }
    let gold_start = all.len() - g.len();
    let model = base.model();
    let hidden = model.hidden_states(&tokens)?;
    let logits = model.lm_logits(&hidden)?.to_vec2::<f32>()?;
    let allowed =
        |t: usize| vocab.is_eos(t as u32) || vocab.token_bytes(t as u32).is_some_and(|b| !b.is_empty());
    // (offset in gold, base guess, hidden) per position t in 1..=len (t = len: the end).
    let mut todo = Vec::new();
    let mut off = 0;
    for t in 0..=tokens.len() {
        if t > 0 && off >= gold_start && gold.is_char_boundary(off - gold_start) {
            let row = &logits[t - 1];
            let best = (0..row.len())
                .filter(|&k| allowed(k))
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap_or(0) as u32;
            let guess = if vocab.is_eos(best) {
                Guess::Eos
            } else {
                Guess::Text(vocab.token_bytes(best).unwrap_or_default().to_vec())
            };
            todo.push((off - gold_start, guess, hidden.i(t - 1)?.to_vec1::<f32>()?));
        }
        off += lens.get(t).copied().unwrap_or(0);
    }
    let mut out = Vec::with_capacity(todo.len());
    for (c, base_guess, h) in todo {
        let rest = &g[c..];
        let mut labels = Vec::with_capacity(assistants.len());
        let mut assistant_right = Vec::with_capacity(assistants.len());
        for (_, engine) in assistants.iter_mut() {
            let guess = propose_one(engine, key, &item.question, &gold[..c])?;
            labels.push(label(&base_guess, &guess, rest));
            assistant_right.push(super::deferral::right(&guess, rest));
        }
        out.push(Position {
            domain: item.domain,
            h,
            labels,
            assistant_right,
            base_right: super::deferral::right(&base_guess, rest),
        });
    }
    for (_, engine) in assistants.iter_mut() {
        engine.run(Job::Close(key.into()), 0.0, &|| false)?;
    }
    Ok(Some(out))
}

/// Positions of every item; the count of items skipped.
fn collect(
    base: &mut Engine,
    assistants: &mut [(String, Engine)],
    items: &[Item],
    split: &str,
) -> Result<(Vec<Position>, usize)> {
    let mut out = Vec::new();
    let mut skipped = 0;
    for (i, it) in items.iter().enumerate() {
        match positions(base, assistants, it, &format!("{split}-{i}"))? {
            Some(p) => out.extend(p),
            None => skipped += 1,
        }
    }
    Ok((out, skipped))
}

/// Counts over a split.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SplitCounts {
    /// Items used.
    pub items: usize,
    /// Items skipped (the base's tokenization did not end with the gold bytes).
    pub skipped_items: usize,
    /// Positions.
    pub positions: usize,
    /// Positions where the base's guess was right.
    pub base_right: usize,
    /// Positive labels per assistant.
    pub positives: BTreeMap<String, usize>,
    /// Positions where some assistant is right and the base wrong.
    pub positives_any: usize,
    /// Per domain: (positions, positives_any).
    pub by_domain: BTreeMap<String, (usize, usize)>,
}

fn counts(ps: &[Position], names: &[String], items: usize, skipped: usize) -> SplitCounts {
    let mut c = SplitCounts {
        items,
        skipped_items: skipped,
        positions: ps.len(),
        base_right: ps.iter().filter(|p| p.base_right).count(),
        positives_any: ps.iter().filter(|p| p.any()).count(),
        ..Default::default()
    };
    for (j, n) in names.iter().enumerate() {
        c.positives
            .insert(n.clone(), ps.iter().filter(|p| p.labels[j]).count());
    }
    for p in ps {
        let e = c.by_domain.entry(p.domain.name().into()).or_default();
        e.0 += 1;
        e.1 += usize::from(p.any());
    }
    c
}

/// One head's training summary.
#[derive(Debug, Clone, Serialize)]
pub struct HeadReport {
    /// The assistant.
    pub assistant: String,
    /// Positive class weight used.
    pub pos_weight: f64,
    /// Weighted BCE on the training split, at the start and the end.
    pub train_loss: (f64, f64),
    /// Weighted BCE on the validation split, at the start and the end.
    pub val_loss: (f64, f64),
    /// ROC AUC of the head on its own validation labels (absent without both classes).
    pub val_auc: Option<f64>,
}

/// What `ensemble-train deferral` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The base model id.
    pub base: String,
    /// Assistants in head order.
    pub assistants: Vec<String>,
    /// World seed.
    pub world_seed: u64,
    /// Training split counts.
    pub train: SplitCounts,
    /// Validation split counts.
    pub val: SplitCounts,
    /// Per head.
    pub heads: Vec<HeadReport>,
    /// ROC AUC of max over heads for "some assistant right, base wrong" on validation.
    pub val_auc_any: Option<f64>,
    /// The rule and the threshold chosen.
    pub eta_rule: String,
    /// η.
    pub eta: f64,
    /// On validation at η: deferral rate, TPR, FPR.
    pub at_eta: (f64, f64, f64),
    /// On validation at η: deferral rate per domain.
    pub val_defer_rate_by_domain: BTreeMap<String, f64>,
    /// Seconds: collecting labels, fitting, in all.
    pub seconds: (f64, f64, f64),
    /// The head file written.
    pub out: String,
}

/// Collects, fits, chooses η, writes the head file; the report.
pub fn run(o: &Options) -> Result<Report> {
    let t0 = Instant::now();
    let base_loaded = load_engine(&o.base)?;
    let base_id = base_loaded.info.model_id.clone();
    let mut base = base_loaded.engine;
    let mut assistants = Vec::new();
    for (name, dir) in &o.assistants {
        assistants.push((name.clone(), load_engine(dir)?.engine));
    }
    let names: Vec<String> = o.assistants.iter().map(|(n, _)| n.clone()).collect();
    let world = World::new(o.world_seed);
    let train_items = items(&world, o.world_seed ^ 0xdefe_2a11, o.train_items, &HashSet::new());
    let seen: HashSet<String> = train_items.iter().map(|i| i.question.clone()).collect();
    let val_items = items(&world, o.world_seed ^ 0xdefe_0a1d, o.val_items, &seen);
    let (train, train_skipped) = collect(&mut base, &mut assistants, &train_items, "train")?;
    let (val, val_skipped) = collect(&mut base, &mut assistants, &val_items, "val")?;
    let t_collect = t0.elapsed().as_secs_f64();
    tracing::info!(
        train = train.len(),
        val = val.len(),
        seconds = t_collect,
        "labels collected"
    );

    let init = base.model().lm_head_mean()?.to_vec1::<f32>()?;
    let xs: Vec<Vec<f32>> = train.iter().map(|p| p.h.clone()).collect();
    let vxs: Vec<Vec<f32>> = val.iter().map(|p| p.h.clone()).collect();
    let mut heads = Vec::new();
    let mut fits = Vec::new();
    for (j, name) in names.iter().enumerate() {
        let ys: Vec<bool> = train.iter().map(|p| p.labels[j]).collect();
        let vys: Vec<bool> = val.iter().map(|p| p.labels[j]).collect();
        let pw = o.pos_weight.for_labels(&ys);
        let f = fit(
            &xs,
            &ys,
            &init,
            &FitOptions {
                pos_weight: pw,
                ..o.fit
            },
        );
        let g0: Vec<f64> = init.iter().map(|&x| f64::from(x)).collect();
        let vscores: Vec<f64> = vxs.iter().map(|x| f.prob(x)).collect();
        heads.push(HeadReport {
            assistant: name.clone(),
            pos_weight: pw,
            train_loss: (f.losses[0], f.losses[f.losses.len() - 1]),
            val_loss: (loss(&g0, 0.0, &vxs, &vys, pw), loss(&f.g, f.b, &vxs, &vys, pw)),
            val_auc: auc(&vscores, &vys),
        });
        fits.push(f);
    }
    let t_fit = t0.elapsed().as_secs_f64() - t_collect;
    let score = |h: &[f32]| fits.iter().map(|f| f.prob(h)).fold(0.0, f64::max);
    let vscores: Vec<f64> = vxs.iter().map(|x| score(x)).collect();
    let vany: Vec<bool> = val.iter().map(Position::any).collect();
    let eta = choose_eta(o.eta_rule, &vscores, &vany);
    let mut by_domain = BTreeMap::new();
    for d in Domain::ALL {
        let (s, y): (Vec<f64>, Vec<bool>) = val
            .iter()
            .zip(&vscores)
            .filter(|(p, _)| p.domain == d)
            .map(|(p, s)| (*s, p.any()))
            .unzip();
        by_domain.insert(d.name().to_owned(), rates(&s, &y, eta).0);
    }
    let head = DeferralHead {
        heads: fits
            .iter()
            .map(|f| f.g.iter().map(|&x| x as f32).collect())
            .collect(),
        bias: fits.iter().map(|f| f.b as f32).collect(),
        assistants: names.clone(),
        eta,
        base: base_id.clone(),
    };
    head.save(&o.out)?;
    Ok(Report {
        base: base_id,
        assistants: names.clone(),
        world_seed: o.world_seed,
        train: counts(&train, &names, train_items.len(), train_skipped),
        val: counts(&val, &names, val_items.len(), val_skipped),
        heads,
        val_auc_any: auc(&vscores, &vany),
        eta_rule: o.eta_rule.to_string(),
        eta,
        at_eta: rates(&vscores, &vany, eta),
        val_defer_rate_by_domain: by_domain,
        seconds: (t_collect, t_fit, t0.elapsed().as_secs_f64()),
        out: o.out.display().to_string(),
    })
}

/// The default head file: `deferral.safetensors` in the base's directory.
pub fn default_out(base: &Path) -> PathBuf {
    base.join("deferral.safetensors")
}
