//! `ensemble-train`: retrains the bundled demo models and writes the held-out evaluation sets.
//!
//! ```text
//! ensemble-train model --recipe arith --out models/arith      # one model (deterministic)
//! ensemble-train eval-sets --out eval                         # eval/*.jsonl
//! ensemble-train deferral --base models/general \
//!     --assistant arith=models/arith --assistant atlas=models/atlas  # models/general/deferral.safetensors
//! ```

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use model_node::train::deferral::{EtaRule, FitOptions, PosWeight};
use model_node::train::deferral_data;
use model_node::train::world::{Domain, World};
use model_node::train::{recipe, train};

/// Trains the bundled demo models on CPU.
#[derive(Debug, Parser)]
#[command(name = "ensemble-train", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train one bundled recipe and write a HuggingFace model directory.
    Model {
        /// arith, atlas or general.
        #[arg(long)]
        recipe: String,
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
        /// Override the recipe's step count (CI runs a short smoke training).
        #[arg(long)]
        steps: Option<usize>,
        /// Override the recipe's batch size.
        #[arg(long)]
        batch: Option<usize>,
        /// Override the recipe's peak learning rate.
        #[arg(long)]
        lr: Option<f64>,
        /// Override the recipe's domain mix: three weights, arithmetic,atlas,words.
        #[arg(long, value_delimiter = ',')]
        mix: Option<Vec<f64>>,
        /// Override the model shape: decoder layers.
        #[arg(long)]
        layers: Option<usize>,
        /// Override the model shape: hidden size.
        #[arg(long)]
        hidden: Option<usize>,
        /// Override the model shape: attention heads.
        #[arg(long)]
        heads: Option<usize>,
        /// Override the model shape: MLP inner size.
        #[arg(long)]
        intermediate: Option<usize>,
        /// Seed of the synthetic world.
        #[arg(long, default_value_t = 2026)]
        world_seed: u64,
        /// Held-out items per domain for the closing accuracy check.
        #[arg(long, default_value_t = 100)]
        eval_items: usize,
        /// CPU threads (0: the cgroup's CPU quota, else the available cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Held-out exact match of a model directory through the node's engine (greedy); updates the
    /// accuracy in its training.json when there is one.
    Check {
        /// The model directory.
        #[arg(long)]
        model_dir: PathBuf,
        /// Seed of the synthetic world.
        #[arg(long, default_value_t = 2026)]
        world_seed: u64,
        /// Held-out items per domain.
        #[arg(long, default_value_t = 100)]
        eval_items: usize,
    },
    /// Train Co-LLM deferral heads for a base model, one per assistant, on the synthetic world's
    /// training items (weak labels from each model's own greedy guesses), choose η on a disjoint
    /// validation split, and write the head file.
    Deferral {
        /// The base model directory.
        #[arg(long)]
        base: PathBuf,
        /// An assistant, NAME=DIR (repeat for several; one head each, in this order).
        #[arg(long = "assistant", value_parser = name_dir, required = true)]
        assistants: Vec<(String, PathBuf)>,
        /// Seed of the synthetic world.
        #[arg(long, default_value_t = 2026)]
        world_seed: u64,
        /// Training items (the three domains in turn).
        #[arg(long, default_value_t = 2000)]
        train_items: usize,
        /// Validation items for η (disjoint from the training items).
        #[arg(long, default_value_t = 600)]
        val_items: usize,
        /// Positive class weight of the BCE: `auto` (negatives / positives per head) or a number.
        #[arg(long, default_value = "auto")]
        pos_weight: PosWeight,
        /// How η is chosen on validation: `youden` (max TPR − FPR) or `rate:R` (defer at a share R).
        #[arg(long, default_value = "youden")]
        eta_rule: EtaRule,
        /// Full-batch Adam steps.
        #[arg(long, default_value_t = 400)]
        epochs: usize,
        /// Adam step size.
        #[arg(long, default_value_t = 0.02)]
        lr: f64,
        /// L2 penalty on each head's vector.
        #[arg(long, default_value_t = 1e-4)]
        l2: f64,
        /// The head file (default: deferral.safetensors in the base directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also write the report as JSON here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// CPU threads (0: the cgroup's CPU quota, else the available cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Write RTD reference examples for a recipe's model: `store.jsonl`, every phrasing of every atlas
    /// fact the recipe never trained on (what `model-node rtd build` stores), and `val.jsonl`, a
    /// mixed validation split of all three domains disjoint from the evaluation sets (for tuning λ
    /// and T without touching `eval/`).
    RtdExamples {
        /// The recipe whose unseen facts are stored.
        #[arg(long, default_value = "general")]
        recipe: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the synthetic world.
        #[arg(long, default_value_t = 2026)]
        world_seed: u64,
        /// Validation items per domain.
        #[arg(long, default_value_t = 60)]
        val: usize,
    },
    /// Write the held-out evaluation sets (JSON Lines) to a directory.
    EvalSets {
        /// Output directory.
        #[arg(long, default_value = "eval")]
        out: PathBuf,
        /// Seed of the synthetic world.
        #[arg(long, default_value_t = 2026)]
        world_seed: u64,
        /// Items per domain set; the mixed set takes a third of each.
        #[arg(long, default_value_t = 150)]
        n: usize,
    },
}

fn line(item: &model_node::train::world::Item) -> String {
    serde_json::json!({
        "messages": [{"role": "user", "content": item.question}],
        "answer": item.answer,
        "domain": item.domain.name(),
    })
    .to_string()
}

/// `NAME=DIR`.
fn name_dir(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((n, d)) if !n.is_empty() && !d.is_empty() => Ok((n.to_owned(), PathBuf::from(d))),
        _ => Err(format!("expected NAME=DIR, got {s:?}")),
    }
}

fn deferral(o: &deferral_data::Options, report_path: Option<&PathBuf>) -> anyhow::Result<()> {
    let r = deferral_data::run(o).context("training the deferral heads")?;
    if let Some(p) = report_path {
        std::fs::write(p, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    println!(
        "base {}: {} train / {} val positions ({} / {} items); base right at {} of train positions",
        r.base,
        r.train.positions,
        r.val.positions,
        r.train.items,
        r.val.items,
        pct(r.train.base_right as f64 / r.train.positions.max(1) as f64),
    );
    println!("| head | positives train / val | pos weight | train loss | val loss | val AUC |");
    println!("|---|---:|---:|---:|---:|---:|");
    for h in &r.heads {
        println!(
            "| {} | {} / {} | {:.2} | {:.3} → {:.3} | {:.3} → {:.3} | {} |",
            h.assistant,
            r.train.positives.get(&h.assistant).unwrap_or(&0),
            r.val.positives.get(&h.assistant).unwrap_or(&0),
            h.pos_weight,
            h.train_loss.0,
            h.train_loss.1,
            h.val_loss.0,
            h.val_loss.1,
            h.val_auc.map_or("-".into(), |a| format!("{a:.3}")),
        );
    }
    let (rate, tpr, fpr) = r.at_eta;
    let by: Vec<String> = r
        .val_defer_rate_by_domain
        .iter()
        .map(|(d, x)| format!("{d} {}", pct(*x)))
        .collect();
    println!(
        "η = {:.4} ({}): on val, defers at {} of positions (TPR {}, FPR {}; AUC of max over heads {}); by domain: {}",
        r.eta,
        r.eta_rule,
        pct(rate),
        pct(tpr),
        pct(fpr),
        r.val_auc_any.map_or("-".into(), |a| format!("{a:.3}")),
        by.join(", "),
    );
    println!(
        "labels {:.1} s, fit {:.1} s, total {:.1} s; written to {}",
        r.seconds.0, r.seconds.1, r.seconds.2, r.out
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    ensemble_proto::cli::exit("ensemble-train", run())
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let requested = match &cli.command {
        Command::Model { threads, .. } | Command::Deferral { threads, .. } => *threads,
        _ => 0,
    };
    // SAFETY: first thing in main, before any other thread starts.
    #[allow(unsafe_code)]
    unsafe {
        model_node::threads::settle(requested)
    };
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Model {
            recipe: name,
            out,
            steps,
            batch,
            lr,
            mix,
            layers,
            hidden,
            heads,
            intermediate,
            world_seed,
            eval_items,
            threads: _,
        } => {
            let mut r = recipe::recipe(&name)?;
            if let Some(b) = batch {
                r.batch = b;
            }
            if let Some(lr) = lr {
                r.lr = lr;
            }
            if let Some(m) = mix {
                anyhow::ensure!(
                    m.len() == 3 && m.iter().all(|w| *w >= 0.0) && m.iter().sum::<f64>() > 0.0,
                    "--mix takes three non-negative weights (arithmetic,atlas,words), not all zero"
                );
                r.mix = [m[0], m[1], m[2]];
            }
            r.shape.layers = layers.unwrap_or(r.shape.layers);
            r.shape.hidden = hidden.unwrap_or(r.shape.hidden);
            r.shape.heads = heads.unwrap_or(r.shape.heads);
            r.shape.intermediate = intermediate.unwrap_or(r.shape.intermediate);
            anyhow::ensure!(
                r.shape.heads > 0 && r.shape.hidden % (2 * r.shape.heads) == 0,
                "--hidden must be a multiple of twice --heads (an even head size for RoPE)"
            );
            let steps_total = steps.unwrap_or(r.steps);
            let started = std::time::Instant::now();
            let report = train(&r, world_seed, steps, &out, eval_items, &mut |step, loss| {
                tracing::info!(
                    recipe = r.name,
                    step,
                    of = steps_total,
                    loss = format!("{loss:.4}"),
                    elapsed_s = started.elapsed().as_secs(),
                    "training"
                );
            })
            .with_context(|| format!("training {name}"))?;
            let acc: Vec<String> = report
                .accuracy
                .iter()
                .map(|(d, a)| format!("{} {:.1}%", d.name(), a * 100.0))
                .collect();
            println!(
                "{}: {} parameters, {} steps in {:.0} s, final loss {:.4}; held-out greedy: {}; written to {}",
                report.recipe,
                report.parameters,
                report.steps,
                report.seconds,
                report.final_loss,
                acc.join(", "),
                out.display()
            );
        }
        Command::Check {
            model_dir,
            world_seed,
            eval_items,
        } => {
            let acc = model_node::train::accuracy(&model_dir, &World::new(world_seed), eval_items)?;
            let line: Vec<String> = acc
                .iter()
                .map(|(d, a)| format!("{} {:.1}%", d.name(), a * 100.0))
                .collect();
            println!("{}: held-out greedy: {}", model_dir.display(), line.join(", "));
            let tj = model_dir.join("training.json");
            if let Ok(text) = std::fs::read_to_string(&tj) {
                let mut v: serde_json::Value = serde_json::from_str(&text)?;
                v["report"]["accuracy"] = serde_json::to_value(&acc)?;
                std::fs::write(&tj, serde_json::to_string_pretty(&v)?)?;
            }
        }
        Command::Deferral {
            base,
            assistants,
            world_seed,
            train_items,
            val_items,
            pos_weight,
            eta_rule,
            epochs,
            lr,
            l2,
            out,
            report,
            threads: _,
        } => {
            let o = deferral_data::Options {
                out: out.unwrap_or_else(|| deferral_data::default_out(&base)),
                base,
                assistants,
                world_seed,
                train_items,
                val_items,
                pos_weight,
                eta_rule,
                fit: FitOptions {
                    epochs,
                    lr,
                    l2,
                    pos_weight: 1.0,
                },
            };
            deferral(&o, report.as_ref())?;
        }
        Command::RtdExamples {
            recipe,
            out,
            world_seed,
            val,
        } => {
            use rand::SeedableRng as _;
            std::fs::create_dir_all(&out)?;
            let world = World::new(world_seed);
            let seen = model_node::train::recipe::recipe(&recipe)?.countries(&world);
            let mut rng = rand::rngs::StdRng::seed_from_u64(world_seed ^ 0x5747);
            let mut f = std::io::BufWriter::new(std::fs::File::create(out.join("store.jsonl"))?);
            let mut facts = 0;
            for c in (0..world.countries.len()).filter(|c| !seen.contains(c)) {
                for attr in model_node::train::world::ATTRIBUTES {
                    // Every phrasing: the generator picks one at random.
                    let mut questions = std::collections::BTreeSet::new();
                    for _ in 0..32 {
                        let it = world.atlas_item(&mut rng, c, attr);
                        if questions.insert(it.question.clone()) {
                            writeln!(f, "{}", line(&it))?;
                        }
                    }
                    facts += 1;
                }
            }
            drop(f);
            let eval: std::collections::BTreeSet<String> = Domain::ALL
                .iter()
                .flat_map(|&d| world.eval_set(d, 150))
                .map(|it| it.question)
                .collect();
            let all: Vec<usize> = (0..world.countries.len()).collect();
            let mut f = std::io::BufWriter::new(std::fs::File::create(out.join("val.jsonl"))?);
            let mut taken = std::collections::BTreeSet::new();
            let mut n = 0;
            for d in Domain::ALL {
                let mut k = 0;
                while k < val {
                    let it = match d {
                        Domain::Arithmetic => world.arithmetic(&mut rng, true),
                        Domain::Atlas => world.atlas(&mut rng, &all),
                        Domain::Words => world.words(&mut rng, true),
                    };
                    if !eval.contains(&it.question) && taken.insert(it.question.clone()) {
                        writeln!(f, "{}", line(&it))?;
                        k += 1;
                        n += 1;
                    }
                }
            }
            println!(
                "{facts} unseen facts of recipe {recipe} in {}, {n} validation items in {}",
                out.join("store.jsonl").display(),
                out.join("val.jsonl").display()
            );
        }
        Command::EvalSets { out, world_seed, n } => {
            std::fs::create_dir_all(&out)?;
            let world = World::new(world_seed);
            let mut mixed = Vec::new();
            for d in Domain::ALL {
                let set = world.eval_set(d, n);
                let path = out.join(format!("{}.jsonl", d.name()));
                let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
                for it in &set {
                    writeln!(f, "{}", line(it))?;
                }
                mixed.push(set.into_iter().take(n / 3).collect::<Vec<_>>());
            }
            let mut f = std::io::BufWriter::new(std::fs::File::create(out.join("mixed.jsonl"))?);
            for i in 0..n / 3 {
                for set in &mixed {
                    if let Some(it) = set.get(i) {
                        writeln!(f, "{}", line(it))?;
                    }
                }
            }
            println!(
                "wrote {} sets of {n} and mixed.jsonl of {} to {}",
                Domain::ALL.len(),
                3 * (n / 3),
                out.display()
            );
        }
    }
    Ok(())
}
