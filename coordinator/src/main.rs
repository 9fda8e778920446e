//! `coordinator serve`: the `Ensemble` gRPC service over the configured model nodes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use coordinator::config::{FileConfig, Settings, parse_node};
use coordinator::replicas::SystemResolver;
use coordinator::service::Coordinator;

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
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let Command::Serve(args) = Cli::parse().command;
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
    let settings: Settings = Settings::from_file(&file).context("invalid configuration")?;
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 50050)));
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let coordinator = Coordinator::start(settings, Arc::new(SystemResolver)).await?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        tracing::info!(%listen, deadline = ?Duration::from_millis(file.deadline_ms.unwrap_or(30_000)), "serving");
        coordinator::server::serve(coordinator, listener, coordinator::server::shutdown_signal())
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        Ok(())
    })
}
