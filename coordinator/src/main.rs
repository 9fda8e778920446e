//! `coordinator serve`: the `Ensemble` gRPC service over the configured model nodes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use coordinator::auth::ApiKeys;
use coordinator::config::{FileConfig, Settings, parse_node};
use coordinator::core::Coordinator;
use coordinator::replicas::SystemResolver;

/// The ensemble coordinator.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the Ensemble gRPC API.
    Serve(ServeArgs),
    /// Ask a running coordinator for its grpc.health.v1 status (the container health check): exits 0
    /// when it answers SERVING, 1 otherwise, with the reason on stderr.
    Health(HealthArgs),
}

#[derive(Debug, Args)]
struct HealthArgs {
    /// The coordinator's gRPC listen address; default: `listen` of --config, else 0.0.0.0:50050. A
    /// wildcard address is probed on loopback, as from inside the coordinator's container.
    #[arg(long, env = "COORDINATOR_LISTEN")]
    listen: Option<SocketAddr>,
    /// The TOML config `serve` reads (for its `listen`).
    #[arg(long, env = "COORDINATOR_CONFIG")]
    config: Option<PathBuf>,
    /// The health service name: `ensemble.v1.Ensemble` (ready: enough members up, not draining) or
    /// the empty string (the process).
    #[arg(long, default_value = "ensemble.v1.Ensemble")]
    service: String,
    /// How long to wait for the answer, milliseconds.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML config (see deploy/local.toml): listen, deadline_ms, retries, default_strategy, max_chars,
    /// [specfuse], [chared], and [[nodes]] with name, url, weight, discovery, dns_refresh_ms.
    #[arg(long, env = "COORDINATOR_CONFIG")]
    config: Option<PathBuf>,
    /// A model node as NAME=URL or NAME=URL@WEIGHT (repeat; comma-separated in the env var); replaces
    /// the config's nodes.
    #[arg(long = "node", env = "COORDINATOR_NODES", value_delimiter = ',')]
    nodes: Vec<String>,
    /// Address to listen on (default 0.0.0.0:50050).
    #[arg(long, env = "COORDINATOR_LISTEN")]
    listen: Option<SocketAddr>,
    /// Per-call deadline for node RPCs, milliseconds (default 30000).
    #[arg(long, env = "COORDINATOR_DEADLINE_MS")]
    deadline_ms: Option<u64>,
    /// Retries of a refused or unavailable node call, on the next replica (default 1).
    #[arg(long, env = "COORDINATOR_RETRIES")]
    retries: Option<u32>,
    /// Strategy for requests that name none: specfuse, chared or single:NAME (default specfuse).
    #[arg(long, env = "COORDINATOR_DEFAULT_STRATEGY")]
    default_strategy: Option<String>,
    /// HTTP address of the OpenAI-compatible API, /metrics and /health, or `off` (default
    /// 0.0.0.0:8080).
    #[arg(long, env = "COORDINATOR_HTTP_LISTEN")]
    http_listen: Option<String>,
    /// Bearer tokens clients must present, comma-separated (prefer --api-key-file).
    #[arg(
        long,
        env = "COORDINATOR_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// File with one bearer token per line.
    #[arg(long, env = "COORDINATOR_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// Certificate chain (PEM) of the gRPC listener; with --tls-key, gRPC is served over TLS only.
    #[arg(long, env = "COORDINATOR_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the gRPC listener.
    #[arg(long, env = "COORDINATOR_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) of client certificates: clients must present one (mutual TLS).
    #[arg(long, env = "COORDINATOR_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    ensemble_proto::cli::exit("coordinator", run())
}

fn run() -> anyhow::Result<()> {
    let args = match Cli::parse().command {
        Command::Serve(args) => args,
        Command::Health(args) => return health(&args),
    };
    let rt = tokio::runtime::Runtime::new()?;
    // Trace export (when OTEL_* asks for it) lives on the runtime; the guard flushes on return.
    let _telemetry = {
        let _enter = rt.enter();
        ensemble_proto::telemetry::init("ensemble-coordinator").map_err(anyhow::Error::msg)?
    };
    let mut file = match &args.config {
        Some(p) => FileConfig::load(p).map_err(anyhow::Error::msg)?,
        None => FileConfig::default(),
    };
    if !args.nodes.is_empty() {
        file.nodes = args
            .nodes
            .iter()
            .map(|s| parse_node(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?;
    }
    anyhow::ensure!(
        !file.nodes.is_empty(),
        "no model node: give --node NAME=URL or [[nodes]] in --config"
    );
    file.deadline_ms = args.deadline_ms.or(file.deadline_ms);
    file.retries = args.retries.or(file.retries);
    file.default_strategy = args.default_strategy.clone().or(file.default_strategy);
    if args.api_key_file.is_some() {
        file.api_key_file = args.api_key_file.clone();
    }
    let mut settings: Settings = Settings::from_file(&file).context("invalid configuration")?;
    settings.api_keys = settings.api_keys.merged(&ApiKeys::new(&args.api_keys));
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(ensemble_proto::tls::ServerTls {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.tls_client_ca.clone(),
        }),
        _ => file.tls.as_ref().map(Into::into),
    };
    let http_listen = ensemble_proto::parse_listen(
        args.http_listen
            .as_deref()
            .or(file.http_listen.as_deref())
            .unwrap_or("0.0.0.0:8080"),
    )
    .map_err(anyhow::Error::msg)?;
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 50050)));
    rt.block_on(async {
        let auth = settings.api_keys.enabled();
        let coordinator = Coordinator::start(settings, Arc::new(SystemResolver)).await?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let http = match http_listen {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .with_context(|| format!("binding the HTTP API {a}"))?,
            ),
            None => None,
        };
        tracing::info!(
            %listen,
            http = ?http.as_ref().and_then(|l| l.local_addr().ok()),
            tls = tls.is_some(),
            auth,
            deadline = ?Duration::from_millis(file.deadline_ms.unwrap_or(30_000)),
            "serving"
        );
        let opts = coordinator::server::ServeOptions { tls, http };
        coordinator::server::serve_with(
            coordinator,
            listener,
            coordinator::server::shutdown_signal(),
            opts,
        )
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
        Ok(())
    })
}

fn health(args: &HealthArgs) -> anyhow::Result<()> {
    let listen = match (args.listen, &args.config) {
        (Some(l), _) => l,
        (None, Some(p)) => FileConfig::load(p)
            .map_err(anyhow::Error::msg)?
            .listen
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 50050))),
        (None, None) => SocketAddr::from(([0, 0, 0, 0], 50050)),
    };
    ensemble_proto::health::probe_local(listen, &args.service, Duration::from_millis(args.timeout_ms))
        .map_err(anyhow::Error::msg)
}
