//! `coordinator serve`: the `Ensemble` gRPC service over the configured model nodes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use coordinator::service::{Coordinator, EnsembleService, NodeSpec};
use ensemble_proto::v1::ensemble_server::EnsembleServer;

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
    /// TOML config: `listen`, `deadline_ms`, and `[[nodes]]` with `name`, `url`, `weight`.
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
}

/// The config file; flags and environment variables override it.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    deadline_ms: Option<u64>,
    #[serde(default)]
    nodes: Vec<FileNode>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNode {
    name: String,
    url: String,
    #[serde(default = "one")]
    weight: f64,
}

fn one() -> f64 {
    1.0
}

fn parse_node(s: &str) -> anyhow::Result<NodeSpec> {
    let (name, rest) = s
        .split_once('=')
        .with_context(|| format!("node {s:?}: expected NAME=URL[@WEIGHT]"))?;
    let (url, weight) = match rest.rsplit_once('@') {
        Some((u, w)) => (
            u,
            w.parse::<f64>()
                .with_context(|| format!("node {name}: weight {w:?} is not a number"))?,
        ),
        None => (rest, 1.0),
    };
    Ok(NodeSpec {
        name: name.to_owned(),
        url: url.to_owned(),
        weight,
    })
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let Command::Serve(args) = Cli::parse().command;
    let file: FileConfig = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("{}: invalid config", p.display()))?
        }
        None => FileConfig::default(),
    };
    let nodes: Vec<NodeSpec> = if args.nodes.is_empty() {
        file.nodes
            .into_iter()
            .map(|n| NodeSpec {
                name: n.name,
                url: n.url,
                weight: n.weight,
            })
            .collect()
    } else {
        args.nodes
            .iter()
            .map(|s| parse_node(s))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    anyhow::ensure!(
        !nodes.is_empty(),
        "no model node: give --node NAME=URL or [[nodes]] in --config"
    );
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 50050)));
    let deadline = Duration::from_millis(args.deadline_ms.or(file.deadline_ms).unwrap_or(30_000));
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let coordinator = Coordinator::new(nodes, deadline)?;
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<EnsembleServer<EnsembleService>>().await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ensemble_proto::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        tracing::info!(%listen, "serving");
        let reporter = health.clone();
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection)
            .add_service(EnsembleServer::new(EnsembleService::new(coordinator)))
            .serve_with_shutdown(listen, async move {
                shutdown_signal().await;
                // Stop routing first, then let tonic finish the in-flight requests.
                tracing::info!("shutdown requested: health NOT_SERVING, draining");
                reporter
                    .set_not_serving::<EnsembleServer<EnsembleService>>()
                    .await;
            })
            .await?;
        Ok(())
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
