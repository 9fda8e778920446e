//! Shared test helpers: tiny random-weight models of each architecture, written as real HuggingFace
//! directories, and nodes served on 127.0.0.1:0.
#![allow(dead_code, missing_docs)]

use std::path::{Path, PathBuf};

#[allow(unused_imports)]
pub use model_node::fixtures::{ARCHS, tiny_config, write_model};

/// A fresh temporary directory under the target dir (kept for inspection on failure).
pub fn temp_dir(name: &str) -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).expect("create temp dir");
    base
}

use std::net::SocketAddr;
use std::time::Duration;

use ensemble_proto::v1 as pb;
use model_node::chars::CharOptions;
use model_node::config::{DTypeArg, LimitArgs, ModelArgs};
use tokio::sync::oneshot;

#[allow(unused_imports)]
pub use model_node::fixtures::{CHATML, CORPUS, tiny_model_dir as model_dir};

pub fn model_args(dir: &Path) -> ModelArgs {
    ModelArgs {
        model_dir: dir.to_owned(),
        model_id: None,
        device: "cpu".into(),
        dtype: DTypeArg::F32,
        threads: 0,
        max_context: None,
    }
}

pub fn limits() -> LimitArgs {
    LimitArgs {
        max_sessions: 64,
        kv_cache_mb: 256,
        queue: 16,
        char_hypotheses: 4,
        char_min_mass: 1e-4,
    }
}

/// A node serving on 127.0.0.1:0; dropping it (or `stop`) shuts the server down.
pub struct TestNode {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<model_node::Result<()>>>,
}

impl TestNode {
    pub async fn start(args: ModelArgs, limits: LimitArgs) -> anyhow::Result<Self> {
        let opts = model_node::server::ServeOptions {
            grace: Duration::from_secs(10),
            ..Default::default()
        };
        Self::start_with(args, limits, opts).await
    }

    pub async fn start_with(
        args: ModelArgs,
        limits: LimitArgs,
        opts: model_node::server::ServeOptions,
    ) -> anyhow::Result<Self> {
        Self::start_loaded(model_node::node::load(&args, &limits)?, opts).await
    }

    /// Serves the model with its metrics and health HTTP listener too; returns the node and that
    /// listener's address.
    pub async fn start_with_metrics(
        args: ModelArgs,
        limits: LimitArgs,
    ) -> anyhow::Result<(Self, SocketAddr)> {
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let maddr = metrics.local_addr()?;
        let opts = model_node::server::ServeOptions {
            grace: Duration::from_secs(5),
            metrics: Some(metrics),
            ..Default::default()
        };
        Ok((Self::start_with(args, limits, opts).await?, maddr))
    }

    /// Serves an already loaded node (e.g. one with a deferral head).
    pub async fn start_loaded(
        loaded: model_node::node::Loaded,
        opts: model_node::server::ServeOptions,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = rx.await;
        };
        let task = tokio::spawn(model_node::server::run_with(
            listener,
            loaded,
            CharOptions::default(),
            shutdown,
            opts,
        ));
        Ok(Self {
            addr,
            stop: Some(tx),
            task: Some(task),
        })
    }

    pub async fn client(
        &self,
    ) -> anyhow::Result<pb::model_node_client::ModelNodeClient<tonic::transport::Channel>> {
        Ok(pb::model_node_client::ModelNodeClient::connect(format!("http://{}", self.addr)).await?)
    }

    pub async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        Ok(
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))?
                .connect()
                .await?,
        )
    }

    /// Starts the drain and waits for the server to stop.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await??;
        }
        Ok(())
    }
}

pub fn raw(prompt: &str, answer: &str, session: &str) -> Option<pb::Context> {
    Some(pb::Context {
        rtd_lambda: None,
        session_id: session.into(),
        body: Some(pb::context::Body::Full(pb::FullContext {
            prompt: Some(pb::Prompt {
                kind: Some(pb::prompt::Kind::Raw(prompt.into())),
            }),
            answer: answer.into(),
        })),
    })
}

pub fn chat(user: &str, answer: &str, session: &str) -> Option<pb::Context> {
    Some(pb::Context {
        rtd_lambda: None,
        session_id: session.into(),
        body: Some(pb::context::Body::Full(pb::FullContext {
            prompt: Some(pb::Prompt {
                kind: Some(pb::prompt::Kind::Conversation(pb::Conversation {
                    messages: vec![pb::ChatMessage {
                        role: "user".into(),
                        content: user.into(),
                    }],
                })),
            }),
            answer: answer.into(),
        })),
    })
}

pub fn delta(session: &str, base_chars: u64, append: &str) -> Option<pb::Context> {
    Some(pb::Context {
        rtd_lambda: None,
        session_id: session.into(),
        body: Some(pb::context::Body::Delta(pb::ContextDelta {
            base_chars,
            append: append.into(),
        })),
    })
}

pub fn greedy(ctx: Option<pb::Context>, n: u32) -> pb::ProposeRequest {
    pb::ProposeRequest {
        context: ctx,
        max_new_tokens: n,
        stop: vec![],
        sampling: Some(pb::Sampling::default()),
        defer_threshold: None,
    }
}

pub mod prom;
#[allow(unused_imports)]
pub use prom::sample;
