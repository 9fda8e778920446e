//! `coordinator serve`: the `Ensemble` gRPC service over the model nodes given on the command line.

use std::net::SocketAddr;
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
    /// A model node as NAME=URL or NAME=URL@WEIGHT (repeat; comma-separated in the env var).
    #[arg(
        long = "node",
        env = "COORDINATOR_NODES",
        value_delimiter = ',',
        required = true
    )]
    nodes: Vec<String>,
    /// Address to listen on.
    #[arg(long, env = "COORDINATOR_LISTEN", default_value = "0.0.0.0:50050")]
    listen: SocketAddr,
    /// Per-call deadline for node RPCs, milliseconds.
    #[arg(long, env = "COORDINATOR_DEADLINE_MS", default_value_t = 30_000)]
    deadline_ms: u64,
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
    let nodes = args
        .nodes
        .iter()
        .map(|s| parse_node(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let coordinator = Coordinator::new(nodes, Duration::from_millis(args.deadline_ms))?;
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<EnsembleServer<EnsembleService>>().await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ensemble_proto::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        tracing::info!(listen = %args.listen, "serving");
        let reporter = health.clone();
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection)
            .add_service(EnsembleServer::new(EnsembleService::new(coordinator)))
            .serve_with_shutdown(args.listen, async move {
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
