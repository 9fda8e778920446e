//! `model-node`: parse configuration, start logging, and hand over to the library.

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use model_node::chars::CharOptions;
use model_node::config::{Cli, Command, GenerateArgs, LimitArgs, RtdBuildArgs, RtdCommand, ServeArgs};
use model_node::engine::{ContextBody, ContextSpec, Job, PromptSpec, ProposeParams, Reply};
use model_node::sampling::SamplingParams;
use model_node::template::Message;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // SAFETY: first thing in main, before the async runtime or any other thread starts.
    #[allow(unsafe_code)]
    let threads = match cli.command.model() {
        Some(m) => unsafe { model_node::threads::settle(m.threads) },
        None => 1,
    };
    ensemble_proto::cli::exit("model-node", run(cli, threads))
}

fn run(cli: Cli, threads: usize) -> anyhow::Result<()> {
    let command = match cli.command {
        // `serve` sets up its own logging and trace export.
        Command::Serve(args) => return serve(args, threads),
        Command::Health(args) => return health(&args),
        c => c,
    };
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    match command {
        Command::Serve(args) => serve(args, threads),
        Command::Generate(args) => generate(args),
        Command::Bench(args) => model_node::bench::run(&args).map_err(Into::into),
        Command::Rtd(RtdCommand::Build(args)) => rtd_build(&args),
        Command::Health(args) => health(&args),
        Command::Convert(args) => convert(&args),
    }
}

fn convert(args: &model_node::config::ConvertArgs) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    let c = model_node::model::gguf::convert(&args.model_dir, &args.out, args.ty)?;
    let mut types: Vec<String> = c.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    types.sort();
    eprintln!(
        "{}: {:.2} MB ({}) in {:.1} s",
        c.file.display(),
        c.bytes as f64 / 1e6,
        types.join(", "),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn health(args: &model_node::config::HealthArgs) -> anyhow::Result<()> {
    ensemble_proto::health::probe_local(args.listen, &args.service, Duration::from_millis(args.timeout_ms))
        .map_err(anyhow::Error::msg)
}

fn rtd_build(args: &RtdBuildArgs) -> anyhow::Result<()> {
    use model_node::rtd::build;
    let examples = build::read_examples(&args.examples)?;
    let limits = LimitArgs {
        max_sessions: 1,
        kv_cache_mb: 64,
        queue: 1,
        char_hypotheses: 1,
        char_min_mass: 1e-4,
    };
    let loaded = model_node::node::load(&args.model, &limits).context("loading the model")?;
    let files = model_node::modeldir::ModelFiles::open(&args.model.model_dir)?;
    let mut model = model_node::node::store_model(&files, &loaded.engine.codec().vocab);
    model.model_id = loaded.info.model_id.clone();
    let bar = indicatif::ProgressBar::new(examples.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {elapsed_precise} eta {eta}")
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .progress_chars("=> "),
    );
    bar.set_message("rtd build");
    let store = build::build(&loaded.engine, model, &examples, &mut |n| {
        bar.set_position(n as u64)
    })?;
    bar.finish_and_clear();
    store.save(&args.out)?;
    eprintln!(
        "{} keys from {} examples ({} MB), hidden size {}: written to {}",
        store.len(),
        store.examples,
        (4 * store.keys.len() + 4 * store.values.len()) / (1 << 20),
        store.model.hidden_size,
        args.out.display()
    );
    Ok(())
}

fn serve(args: ServeArgs, threads: usize) -> anyhow::Result<()> {
    // The runtime only moves bytes (gRPC, TLS, protobuf); the model runs on the engine thread and the
    // kernel pool. Two workers keep it off the kernels' cores as much as it can be.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.clamp(1, 2))
        .thread_name("node-io")
        .enable_all()
        .build()?;
    // Trace export (when OTEL_* asks for it) lives on the runtime; the guard flushes on return.
    let _telemetry = {
        let _enter = rt.enter();
        ensemble_proto::telemetry::init("model-node").map_err(anyhow::Error::msg)?
    };
    let node = model_node::node::load_serving(&args.model, &args.limits, &args.deferral, &args.rtd)
        .context("loading the model")?;
    tracing::info!(model = %node.info.model_id, arch = %node.info.architecture, listen = %args.listen, kernel_threads = threads, "model loaded");
    let char_defaults = CharOptions {
        max_hypotheses: args.limits.char_hypotheses.max(1),
        min_mass: args.limits.char_min_mass,
        ..CharOptions::default()
    };
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let metrics = match args.metrics_listen.0 {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .with_context(|| format!("binding the metrics endpoint {a}"))?,
            ),
            None => None,
        };
        let tls = args.tls.server();
        tracing::info!(
            addr = %listener.local_addr()?,
            tls = tls.is_some(),
            mutual_tls = args.tls.tls_client_ca.is_some(),
            metrics = ?metrics.as_ref().and_then(|l| l.local_addr().ok()),
            "serving"
        );
        let opts = model_node::server::ServeOptions {
            grace: Duration::from_secs(args.shutdown_grace_secs),
            tls,
            metrics,
            input: args.input.limits(),
        };
        model_node::server::run_with(listener, node, char_defaults, shutdown_signal(), opts).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let limits = LimitArgs {
        max_sessions: 1,
        kv_cache_mb: 1 << 16,
        queue: 1,
        char_hypotheses: 4,
        char_min_mass: 1e-4,
    };
    let mut engine = model_node::node::load(&args.model, &limits)
        .context("loading the model")?
        .engine;
    let prompt = if args.raw {
        PromptSpec::Raw(args.prompt.clone())
    } else {
        PromptSpec::Chat(vec![Message {
            role: "user".into(),
            content: args.prompt.clone(),
        }])
    };
    let max_new_tokens = args
        .max_new_tokens
        .min(engine.limits().max_context.saturating_sub(2))
        .max(1);
    let job = Job::Propose(
        ContextSpec {
            session: String::new(),
            body: ContextBody::Full {
                prompt,
                answer: String::new(),
            },
            rtd_lambda: None,
        },
        ProposeParams {
            max_new_tokens,
            stop: vec![],
            sampling: SamplingParams {
                temperature: args.temperature,
                top_p: args.top_p,
                top_k: args.top_k,
                seed: args.seed,
            },
            defer_threshold: None,
        },
    );
    let Reply::Proposal(p) = engine.run(job, 0.0, &|| false)? else {
        anyhow::bail!("unexpected engine reply")
    };
    println!("{}", p.text);
    tracing::info!(tokens = p.token_logprobs.len(), finish = ?p.finish, ms = p.usage.compute_ms, "generated");
    Ok(())
}
