//! `ensemble`: the project's command line.
//!
//! ```text
//! ensemble up                                   # local cluster from deploy/local.toml, Ctrl-C stops it
//! ensemble generate --local "What is 347 + 58?" # start the cluster, answer, stop
//! ensemble generate --trace "..."               # against a running coordinator, with the rounds
//! ensemble eval --local --set eval/mixed.jsonl  # accuracy per domain and strategy
//! ensemble perplexity --local --text FILE        # bits per character per member and mixture
//! ensemble nodes                                # the coordinator's nodes and their health
//! ```

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use coordinator::cluster::LocalCluster;
use coordinator::config::FileConfig;
use coordinator::evaluate::{self, Outcome, Report};
use ensemble_proto::v1 as pb;
use ensemble_proto::v1::ensemble_client::EnsembleClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

#[path = "ensemble/perplexity.rs"]
mod perplexity;

/// A client of the coordinator that sends the API key, if any, with every call.
type Client = EnsembleClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer KEY` to every call.
#[derive(Clone)]
struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Several language models answering together.
#[derive(Debug, Parser)]
#[command(name = "ensemble", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Target {
    /// The coordinator's URL.
    #[arg(long, env = "ENSEMBLE_COORDINATOR", default_value = "http://127.0.0.1:50050")]
    coordinator: String,
    /// Bearer token for a coordinator that requires one.
    #[arg(long, env = "ENSEMBLE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// CA certificate (PEM) of an https:// coordinator.
    #[arg(long, env = "ENSEMBLE_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Start a local cluster from --config for this command (and stop it after).
    #[arg(long)]
    local: bool,
    /// Cluster config for --local and `up`.
    #[arg(long, default_value = "deploy/local.toml")]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start one model-node per configured model plus the coordinator, on loopback; Ctrl-C stops them.
    Up {
        /// Cluster config.
        #[arg(long, default_value = "deploy/local.toml")]
        config: PathBuf,
    },
    /// Generate an answer, streamed to the terminal.
    Generate {
        #[command(flatten)]
        target: Target,
        /// specfuse, chared, colm, pipeline or single:NAME (default: the coordinator's), with
        /// options as in `eval`: `chared/draft_chars=16/entropy_beta=0.7`.
        #[arg(long, default_value = "")]
        strategy: String,
        /// Most characters in the answer.
        #[arg(long, default_value_t = 256)]
        max_chars: u32,
        /// Stop strings.
        #[arg(long)]
        stop: Vec<String>,
        /// Send the text as a raw prompt instead of a user message.
        #[arg(long)]
        raw: bool,
        /// Show each SpecFuse round / CharED character on stderr.
        #[arg(long)]
        trace: bool,
        /// The question.
        prompt: Vec<String>,
    },
    /// Exact-match accuracy of strategies on an evaluation set.
    Eval {
        #[command(flatten)]
        target: Target,
        /// JSON Lines set (messages, answer, domain).
        #[arg(long, default_value = "eval/mixed.jsonl")]
        set: PathBuf,
        /// Comma-separated strategies (default: single:NAME for every node, then specfuse, chared).
        /// Options may follow a strategy after `/`, each `key=value`: `chared/draft_chars=8`,
        /// `specfuse/segment_tokens=10/string_prefix=true`, `colm/handoff=word/eta=0.5`,
        /// `colm/assistants=arith+atlas` (keys of CharEdOptions, SpecFuseOptions and CoLlmOptions;
        /// unset ones are the coordinator's defaults; `pipeline` runs the configured stages).
        #[arg(long, alias = "strategy", value_delimiter = ',')]
        strategies: Vec<String>,
        /// Only the first N items.
        #[arg(long)]
        limit: Option<usize>,
        /// Most characters per answer.
        #[arg(long, default_value_t = 48)]
        max_chars: u32,
        /// Write the full report (every answer) as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write the table as Markdown, and beside it (extension `.svg`: results.md → results.svg) a
        /// bar chart of accuracy per domain and strategy.
        #[arg(long)]
        markdown: Option<PathBuf>,
    },
    /// Bits per character of a text under every member and their CharED mixture (tokenizer-
    /// independent likelihood: every character priced exactly by every member).
    Perplexity {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        args: perplexity::PerplexityArgs,
    },
    /// The coordinator's nodes and their health.
    Nodes {
        #[command(flatten)]
        target: Target,
    },
}

fn load_config(path: &Path) -> anyhow::Result<(FileConfig, PathBuf)> {
    let file = FileConfig::load(path).map_err(anyhow::Error::msg)?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok((file, base))
}

async fn start_local(
    config: &Path,
    listen: SocketAddr,
    http: Option<SocketAddr>,
) -> anyhow::Result<LocalCluster> {
    let (file, base) = load_config(config)?;
    eprintln!(
        "starting {} model nodes from {} ...",
        file.nodes.iter().filter(|n| n.model_dir.is_some()).count(),
        config.display()
    );
    let cluster = LocalCluster::start(&file, &base, listen, http)
        .await
        .map_err(anyhow::Error::msg)?;
    eprintln!(
        "cluster ready: coordinator {} (node logs in {})",
        cluster.url(),
        cluster.logs().display()
    );
    if let Some(h) = cluster.http_url() {
        eprintln!("  OpenAI-compatible API {h}/v1, metrics {h}/metrics");
    }
    Ok(cluster)
}

/// A channel to `url` (TLS with --ca-cert for https://) and the API key interceptor.
async fn connect(target: &Target, url: &str) -> anyhow::Result<Client> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())?.connect_timeout(Duration::from_secs(10));
    if url.starts_with("https://") {
        let ca = target
            .ca_cert
            .clone()
            .context("an https:// coordinator needs --ca-cert (or ENSEMBLE_CA_CERT)")?;
        let tls = ensemble_proto::tls::ClientTls {
            ca,
            ..Default::default()
        };
        endpoint = endpoint.tls_config(tls.config().map_err(anyhow::Error::msg)?)?;
    }
    let key = match &target.api_key {
        Some(k) => Some(
            format!("Bearer {}", k.trim())
                .parse()
                .map_err(|_| anyhow::anyhow!("the API key must be printable ASCII"))?,
        ),
        None => None,
    };
    let channel = endpoint.connect().await?;
    Ok(EnsembleClient::with_interceptor(channel, Bearer(key)))
}

/// Runs `f` against the target: a started local cluster or the given coordinator.
async fn with_target<T>(
    target: &Target,
    f: impl AsyncFnOnce(Client) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let cluster = if target.local {
        Some(start_local(&target.config, SocketAddr::from(([127, 0, 0, 1], 0)), None).await?)
    } else {
        None
    };
    let url = cluster
        .as_ref()
        .map_or(target.coordinator.clone(), |c| c.url().to_owned());
    let out = match connect(target, &url).await {
        Ok(client) => f(client).await,
        Err(e) => Err(anyhow::anyhow!(
            "cannot reach the coordinator at {url}: {e} (start one with `ensemble up`, or pass --local)"
        )),
    };
    if let Some(c) = cluster {
        c.stop(Duration::from_secs(10)).await;
    }
    out
}

fn conversation(text: &str, raw: bool) -> pb::Prompt {
    let kind = if raw {
        pb::prompt::Kind::Raw(text.to_owned())
    } else {
        pb::prompt::Kind::Conversation(pb::Conversation {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: text.to_owned(),
            }],
        })
    };
    pb::Prompt { kind: Some(kind) }
}

fn print_round(r: &pb::RoundTrace) {
    eprintln!("\n── round {} · active {:?}", r.round, r.active);
    for (i, c) in r.candidates.iter().enumerate() {
        let mark = if c.text == r.winner_text { "→" } else { " " };
        eprintln!("  {mark} {:>8.4}  {:?}  by {:?}", c.score, c.text, c.proposers);
        for v in &r.verifiers {
            if let (Some(lp), Some(q)) = (v.mean_logprobs.get(i), v.q.get(i)) {
                eprintln!("        {:<10} logp/token {lp:>8.3}  q {q:.3}", v.node);
            }
        }
    }
    if !r.exited.is_empty() {
        eprintln!("  exited: {:?}", r.exited);
    }
}

fn print_char(c: &pb::CharTrace) {
    let show = |ch: &str, eos: bool| {
        if eos {
            "<eos>".to_owned()
        } else {
            format!("{ch:?}")
        }
    };
    let alts: Vec<String> = c
        .alternatives
        .iter()
        .map(|a| format!("{} {:.2}", show(&a.char, a.eos), a.prob))
        .collect();
    let shares: Vec<String> = c
        .shares
        .iter()
        .map(|s| format!("{} {:.0}%", s.node, 100.0 * s.share))
        .collect();
    eprintln!(
        "  {} p={:.3} | alts: {} | shares: {}",
        show(&c.char, c.eos),
        c.prob,
        alts.join(", "),
        shares.join(", ")
    );
}

fn print_span(s: &pb::SpanTrace) {
    if s.deferred {
        eprintln!(
            "  → {:<10} {:?}  (deferred at p={:.3})",
            s.node, s.text, s.defer_prob
        );
    } else if s.defer_probs.is_empty() {
        eprintln!("    {:<10} {:?}", s.node, s.text);
    } else {
        let peak = s.defer_probs.iter().copied().fold(0.0f32, f32::max);
        eprintln!("    {:<10} {:?}  (max p(defer) {peak:.3})", s.node, s.text);
    }
}

fn print_stage(s: &pb::StageTrace) {
    eprintln!(
        "\n── stage {} {:?} on {}{}\n  prompt: {:?}\n  output: {:?}",
        s.stage,
        s.name,
        s.node,
        if s.fallback { " (fallback)" } else { "" },
        s.prompt,
        s.text
    );
}

async fn generate(mut client: Client, req: pb::GenerateRequest, trace: bool) -> anyhow::Result<()> {
    let mut stream = client.generate_stream(req).await.map_err(status)?.into_inner();
    let mut out = std::io::stdout();
    while let Some(ev) = stream.message().await.map_err(status)? {
        match ev.event {
            Some(pb::generate_event::Event::Delta(d)) if !trace => {
                write!(out, "{d}")?;
                out.flush()?;
            }
            Some(pb::generate_event::Event::Round(r)) if trace => print_round(&r),
            Some(pb::generate_event::Event::Char(c)) if trace => print_char(&c),
            Some(pb::generate_event::Event::Span(sp)) if trace => print_span(&sp),
            Some(pb::generate_event::Event::Stage(st)) if trace => print_stage(&st),
            Some(pb::generate_event::Event::Done(d)) => {
                if trace {
                    println!("{}", d.text);
                } else {
                    println!();
                }
                eprintln!(
                    "[{} · {} steps · finish {:?}{}{}{}{}]",
                    d.strategy,
                    d.steps,
                    d.finish_reason(),
                    if d.reasoning.is_empty() {
                        String::new()
                    } else {
                        format!(" · reasoning {:?}, answer {:?}", d.reasoning, d.text)
                    },
                    if d.mean_active_nodes > 0.0 {
                        format!(" · mean active nodes {:.2}", d.mean_active_nodes)
                    } else {
                        String::new()
                    },
                    if d.exited_nodes.is_empty() {
                        String::new()
                    } else {
                        format!(" · exited {:?}", d.exited_nodes)
                    },
                    if d.failed_nodes.is_empty() {
                        String::new()
                    } else {
                        format!(" · failed {:?}", d.failed_nodes)
                    },
                );
            }
            _ => {}
        }
    }
    Ok(())
}

fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

async fn eval(
    mut client: Client,
    set: &Path,
    strategies: Vec<String>,
    limit: Option<usize>,
    max_chars: u32,
) -> anyhow::Result<Report> {
    let mut items = evaluate::load_set(set).map_err(anyhow::Error::msg)?;
    if let Some(n) = limit {
        items.truncate(n);
    }
    let strategies = if strategies.is_empty() {
        let nodes = client
            .list_nodes(pb::ListNodesRequest {})
            .await
            .map_err(status)?
            .into_inner();
        let mut s: Vec<String> = nodes.nodes.iter().map(|n| format!("single:{}", n.name)).collect();
        s.extend(["specfuse".to_owned(), "chared".to_owned()]);
        s
    } else {
        strategies
    };
    let bar = indicatif::ProgressBar::new((items.len() * strategies.len()) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg:<16} [{bar:40}] {pos}/{len} {elapsed_precise} eta {eta}",
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .progress_chars("=> "),
    );
    let mut report = Report {
        set: set.display().to_string(),
        strategies: strategies.clone(),
        outcomes: Vec::new(),
    };
    for st in &strategies {
        bar.set_message(st.clone());
        for (i, item) in items.iter().enumerate() {
            let mut req = strategy_request(st)?;
            req.prompt = Some(item.prompt());
            req.max_chars = max_chars;
            let started = std::time::Instant::now();
            let (mut deferrals, mut assisted) = (0, 0);
            let (got, error, steps, active, trips, chars, calls) = match client.generate(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    deferrals = r.deferrals;
                    assisted = r
                        .spans
                        .iter()
                        .filter(|s| s.deferred)
                        .map(|s| s.text.chars().count() as u32)
                        .sum();
                    let chars = r.text.chars().count() + r.reasoning.chars().count();
                    // The reasoning block's markers were written too.
                    let markers = if r.reasoning.is_empty() {
                        0
                    } else {
                        "<think></think>".len()
                    };
                    let trips = (r.round_trips, r.node_calls);
                    (
                        r.text,
                        false,
                        r.steps,
                        r.mean_active_nodes,
                        trips.0,
                        (chars + markers) as u32,
                        trips.1,
                    )
                }
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    bar.abandon();
                    bail!("strategy {st}: {}", s.message())
                }
                Err(s) => (
                    format!("error {:?}: {}", s.code(), s.message()),
                    true,
                    0,
                    0.0,
                    0,
                    0,
                    0,
                ),
            };
            report.outcomes.push(Outcome {
                strategy: st.clone(),
                item: i,
                domain: item.domain.clone(),
                correct: !error && evaluate::exact_match(&got, &item.answer),
                expected: item.answer.clone(),
                got,
                error,
                steps,
                mean_active_nodes: active,
                round_trips: trips,
                chars,
                ms: started.elapsed().as_secs_f64() * 1e3,
                node_calls: calls,
                deferrals,
                assisted_chars: assisted,
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(report)
}

/// A request for an eval strategy spec: `NAME` or `NAME/key=value/...` (see `ensemble eval --help`).
fn strategy_request(spec: &str) -> anyhow::Result<pb::GenerateRequest> {
    let mut parts = spec.split('/');
    let strategy = parts.next().unwrap_or_default().to_owned();
    let mut req = pb::GenerateRequest {
        strategy: strategy.clone(),
        ..Default::default()
    };
    for kv in parts {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("{spec}: options are key=value, got {kv:?}");
        };
        let num = || {
            v.parse::<u32>()
                .with_context(|| format!("{spec}: {k} takes an integer"))
        };
        let flag = || {
            v.parse::<bool>()
                .with_context(|| format!("{spec}: {k} takes true or false"))
        };
        let real = || {
            v.parse::<f64>()
                .with_context(|| format!("{spec}: {k} takes a number"))
        };
        match (strategy.as_str(), k) {
            ("chared", "draft_chars") => req.chared.get_or_insert_default().draft_chars = Some(num()?),
            ("chared", "published") => req.chared.get_or_insert_default().published = Some(flag()?),
            ("chared", "gate") => req.chared.get_or_insert_default().gate = Some(real()?),
            ("chared", "entropy_beta") => req.chared.get_or_insert_default().entropy_beta = Some(real()?),
            ("specfuse", "gate") => req.specfuse.get_or_insert_default().gate = Some(real()?),
            ("specfuse", "segment_tokens") => {
                req.specfuse.get_or_insert_default().segment_tokens = Some(num()?);
            }
            ("specfuse", "string_prefix") => {
                req.specfuse.get_or_insert_default().string_prefix = Some(flag()?);
            }
            ("specfuse", "exit") => req.specfuse.get_or_insert_default().exit = Some(flag()?),
            ("specfuse", "per_char") => req.specfuse.get_or_insert_default().per_char = Some(flag()?),
            ("colm", "handoff") => req.colm.get_or_insert_default().handoff = Some(v.to_owned()),
            ("colm", "base") => req.colm.get_or_insert_default().base = Some(v.to_owned()),
            ("colm", "assistants") => {
                req.colm.get_or_insert_default().assistants = v.split('+').map(str::to_owned).collect();
            }
            ("colm", "segment_tokens") => req.colm.get_or_insert_default().segment_tokens = Some(num()?),
            ("colm", "eta") => {
                let e = v
                    .parse::<f64>()
                    .with_context(|| format!("{spec}: eta takes a number"))?;
                req.colm.get_or_insert_default().eta = Some(e);
            }
            _ => bail!("{spec}: unknown option {k:?} for {strategy}"),
        }
    }
    Ok(req)
}

fn main() -> std::process::ExitCode {
    ensemble_proto::cli::exit("ensemble", run())
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        match cli.command {
            Command::Up { config } => {
                let (file, _) = load_config(&config)?;
                let listen = file
                    .listen
                    .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50050)));
                let http = ensemble_proto::parse_listen(file.http_listen.as_deref().unwrap_or("off"))
                    .map_err(anyhow::Error::msg)?;
                let cluster = start_local(&config, listen, http).await?;
                for (name, pid) in cluster.nodes() {
                    eprintln!(
                        "  node {name} (pid {})",
                        pid.map_or("?".into(), |p| p.to_string())
                    );
                }
                eprintln!(
                    "try: ensemble generate --trace \"What is 347 + 58?\"   (Ctrl-C stops the cluster)"
                );
                coordinator::server::shutdown_signal().await;
                eprintln!("stopping ...");
                cluster.stop(Duration::from_secs(10)).await;
                Ok(())
            }
            Command::Generate {
                target,
                strategy,
                max_chars,
                stop,
                raw,
                trace,
                prompt,
            } => {
                let text = prompt.join(" ");
                if text.trim().is_empty() {
                    bail!("give a prompt, e.g. ensemble generate \"What is 347 + 58?\"");
                }
                let req = pb::GenerateRequest {
                    prompt: Some(conversation(&text, raw)),
                    max_chars,
                    stop,
                    ..strategy_request(&strategy)?
                };
                with_target(&target, async |client| generate(client, req, trace).await).await
            }
            Command::Eval {
                target,
                set,
                strategies,
                limit,
                max_chars,
                json,
                markdown,
            } => {
                let report = with_target(&target, async |client| {
                    eval(client, &set, strategies, limit, max_chars).await
                })
                .await?;
                let md = report.markdown();
                println!("{}: exact match\n\n{md}", report.set);
                if let Some(p) = json {
                    std::fs::write(&p, serde_json::to_string_pretty(&report)?)
                        .with_context(|| p.display().to_string())?;
                    eprintln!("wrote {}", p.display());
                }
                if let Some(p) = markdown {
                    std::fs::write(&p, &md).with_context(|| p.display().to_string())?;
                    eprintln!("wrote {}", p.display());
                    // results.md → results.svg; a Markdown file already named *.svg keeps its name.
                    let chart = if p.extension().is_some_and(|e| e == "svg") {
                        PathBuf::from(format!("{}.svg", p.display()))
                    } else {
                        p.with_extension("svg")
                    };
                    let svg = report.chart_svg().map_err(anyhow::Error::msg)?;
                    std::fs::write(&chart, svg).with_context(|| chart.display().to_string())?;
                    eprintln!("wrote {}", chart.display());
                }
                Ok(())
            }
            Command::Perplexity { target, args } => perplexity::run(&target, args).await,
            Command::Nodes { target } => {
                with_target(&target, async |mut client| {
                    let r = client
                        .list_nodes(pb::ListNodesRequest {})
                        .await
                        .map_err(status)?
                        .into_inner();
                    for n in r.nodes {
                        match n.info {
                            Some(i) => println!(
                                "{:<10} {:<28} weight {:<4} healthy  {} ({}, {} params, vocab {}); \
                                 {} sessions, {:.1} MiB KV, {} queued",
                                n.name,
                                n.url,
                                n.weight,
                                i.model_id,
                                i.architecture,
                                i.parameters,
                                i.vocab_size,
                                i.active_sessions,
                                i.kv_cache_bytes as f64 / (1u64 << 20) as f64,
                                i.queued_calls
                            ),
                            None => println!(
                                "{:<10} {:<28} weight {:<4} DOWN     {}",
                                n.name, n.url, n.weight, n.error
                            ),
                        }
                    }
                    Ok(())
                })
                .await
            }
        }
    })
}
