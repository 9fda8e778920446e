//! Shared helpers: real model nodes (tiny random models) on 127.0.0.1:0.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use model_node::chars::CharOptions;
use model_node::config::{DTypeArg, LimitArgs, ModelArgs};

pub struct Node {
    pub url: String,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<model_node::Result<()>>,
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The bundled models' directories (`models/`), by name.
pub fn bundled_dirs() -> Vec<(String, PathBuf)> {
    ["arith", "atlas", "general"]
        .iter()
        .map(|n| (n.to_string(), repo().join("models").join(n)))
        .collect()
}

/// One node per named model directory, and the members (weight 1) that name them.
pub async fn start_members(
    dirs: Vec<(String, PathBuf)>,
) -> anyhow::Result<(Vec<Node>, Vec<coordinator::service::NodeSpec>)> {
    let (mut nodes, mut specs) = (Vec::new(), Vec::new());
    for (name, dir) in dirs {
        let node = start(dir).await?;
        specs.push(coordinator::service::NodeSpec {
            name,
            url: node.url.clone(),
            weight: 1.0,
        });
        nodes.push(node);
    }
    Ok((nodes, specs))
}

pub async fn start(dir: PathBuf) -> anyhow::Result<Node> {
    let opts = model_node::server::ServeOptions {
        grace: Duration::from_secs(1),
        ..Default::default()
    };
    start_with(dir, opts).await
}

/// A node with serving options (TLS: the URL is `https://`).
pub async fn start_with(dir: PathBuf, opts: model_node::server::ServeOptions) -> anyhow::Result<Node> {
    start_model(model_args(dir), opts).await
}

/// How the test nodes load `dir`.
pub fn model_args(dir: PathBuf) -> ModelArgs {
    ModelArgs {
        model_dir: dir,
        model_id: None,
        device: "cpu".into(),
        dtype: DTypeArg::F32,
        threads: 0,
        max_context: None,
    }
}

/// A node for `args` with serving options.
pub async fn start_model(args: ModelArgs, opts: model_node::server::ServeOptions) -> anyhow::Result<Node> {
    start_model_with(args, &model_node::config::DeferralArgs::default(), opts).await
}

/// A node for `args` that serves the Co-LLM deferral head `deferral` names.
pub async fn start_model_with(
    args: ModelArgs,
    deferral: &model_node::config::DeferralArgs,
    opts: model_node::server::ServeOptions,
) -> anyhow::Result<Node> {
    let limits = LimitArgs {
        max_sessions: 8,
        kv_cache_mb: 64,
        queue: 8,
        char_hypotheses: 4,
        char_min_mass: 1e-4,
    };
    let loaded = model_node::node::load_with(&args, &limits, deferral)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{}", listener.local_addr()?);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(model_node::server::run_with(
        listener,
        loaded,
        CharOptions::default(),
        async {
            let _ = rx.await;
        },
        opts,
    ));
    Ok(Node {
        url,
        stop: Some(tx),
        task,
    })
}

/// Three tiny models with different tokenizers (byte-level BPE Llama, SentencePiece Qwen2,
/// character-level Phi-3), written to a fresh directory per call: the tests of one binary run in
/// parallel, and a shared directory that one test rewrites while another loads it is a race.
pub fn three_model_dirs() -> anyhow::Result<Vec<PathBuf>> {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("sf-{}-{call}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    [
        ("llama", "byte_level"),
        ("qwen2", "sentencepiece"),
        ("phi3", "char"),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (arch, kind))| {
        Ok(model_node::fixtures::tiny_model_dir(
            &root,
            arch,
            kind,
            30 + i as u64,
        )?)
    })
    .collect()
}

/// A node on each of [`three_model_dirs`].
pub async fn three_nodes() -> anyhow::Result<Vec<Node>> {
    let mut nodes = Vec::new();
    for dir in three_model_dirs()? {
        nodes.push(start(dir).await?);
    }
    Ok(nodes)
}

/// Members named `names` (weight 1), one per node in order.
pub fn members(nodes: &[Node], names: &[&str]) -> Vec<coordinator::config::NodeConfig> {
    nodes
        .iter()
        .zip(names)
        .map(|(n, name)| {
            coordinator::service::NodeSpec {
                name: (*name).into(),
                url: n.url.clone(),
                weight: 1.0,
            }
            .into()
        })
        .collect()
}

/// A port that was free a moment ago (for child processes that take an address, not a listener).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub mod otlp;
pub mod pki;

/// Prometheus text parsing, shared with the node's tests.
#[path = "../../../model-node/tests/common/prom.rs"]
pub mod prom;
#[allow(unused_imports)]
pub use prom::{sample, samples};
