//! A local cluster on loopback, for `ensemble up` and `ensemble generate|eval --local`: one
//! `model-node` process per `[[nodes]]` entry that has a `model_dir`, and the coordinator in this
//! process. Nodes are started together, waited for until they answer `Info`, and stopped with
//! SIGTERM (they drain), then killed if they outlive the grace period.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ensemble_proto::v1 as pb;
use tokio::process::{Child, Command};

use crate::config::{FileConfig, Settings};
use crate::core::Coordinator;
use crate::replicas::SystemResolver;

/// Errors starting a cluster (all of them for a person to act on).
pub type ClusterError = String;

/// A running local cluster.
pub struct LocalCluster {
    nodes: Vec<(String, Child)>,
    url: String,
    http_url: Option<String>,
    logs: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

/// Where `model-node` is: `$ENSEMBLE_MODEL_NODE_BIN`, else next to this executable.
pub fn model_node_binary() -> Result<PathBuf, ClusterError> {
    if let Some(p) = std::env::var_os("ENSEMBLE_MODEL_NODE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate this executable: {e}"))?;
    let p = exe.with_file_name(format!("model-node{}", std::env::consts::EXE_SUFFIX));
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "{} not found: build it with `cargo build --release --workspace` (or set ENSEMBLE_MODEL_NODE_BIN)",
            p.display()
        ))
    }
}

fn listen_addr(url: &str) -> Option<SocketAddr> {
    url.split_once("://")?.1.trim_end_matches('/').parse().ok()
}

impl LocalCluster {
    /// Starts every node of `file` that has a `model_dir` (relative paths are relative to the config
    /// file's directory `base`) and the coordinator on `listen` (port 0: any free port), with its
    /// HTTP face on `http` when given.
    pub async fn start(
        file: &FileConfig,
        base: &Path,
        listen: SocketAddr,
        http: Option<SocketAddr>,
    ) -> Result<Self, ClusterError> {
        let settings = Settings::from_file(file).map_err(|e| format!("invalid configuration: {e}"))?;
        let bin = model_node_binary()?;
        let logs = std::env::temp_dir().join(format!("ensemble-up-{}", std::process::id()));
        std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
        let mut cluster = Self {
            nodes: Vec::new(),
            url: String::new(),
            http_url: None,
            logs: logs.clone(),
            stop: None,
            server: None,
        };
        for n in &file.nodes {
            let Some(dir) = &n.model_dir else { continue };
            let dir = if dir.is_relative() {
                base.join(dir)
            } else {
                dir.clone()
            };
            if !dir.join("config.json").exists() {
                return Err(format!(
                    "node {}: {} is not a model directory (no config.json)",
                    n.name,
                    dir.display()
                ));
            }
            let addr = listen_addr(&n.url).ok_or_else(|| {
                format!(
                    "node {}: url {} must be http://IP:PORT to start it locally",
                    n.name, n.url
                )
            })?;
            let log_path = logs.join(format!("{}.log", n.name));
            let log = std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
            let err = log.try_clone().map_err(|e| e.to_string())?;
            let mut cmd = Command::new(&bin);
            cmd.arg("serve");
            cmd.args(&n.node_args);
            let child = cmd
                .arg("--model-dir")
                .arg(&dir)
                .arg("--model-id")
                .arg(&n.name)
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--shutdown-grace-secs")
                .arg("5")
                // Several nodes share this host: each picks a free metrics port (logged).
                .args(["--metrics-listen", "127.0.0.1:0"])
                .stdin(Stdio::null())
                .stdout(Stdio::from(log))
                .stderr(Stdio::from(err))
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("starting {}: {e}", bin.display()))?;
            cluster.nodes.push((n.name.clone(), child));
        }
        cluster.wait_ready(file, Duration::from_secs(120)).await?;
        let coordinator = Coordinator::start(settings, Arc::new(SystemResolver))
            .await
            .map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("binding {listen}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        cluster.url = format!("http://{addr}");
        let http = match http {
            Some(a) => {
                let l = tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|e| format!("binding the HTTP API {a}: {e}"))?;
                cluster.http_url = Some(format!("http://{}", l.local_addr().map_err(|e| e.to_string())?));
                Some(l)
            }
            None => None,
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        cluster.stop = Some(tx);
        let opts = crate::server::ServeOptions { tls: None, http };
        cluster.server = Some(tokio::spawn(async move {
            if let Err(e) = crate::server::serve_with(
                coordinator,
                listener,
                async {
                    let _ = rx.await;
                },
                opts,
            )
            .await
            {
                tracing::error!(error = %e, "coordinator stopped");
            }
        }));
        Ok(cluster)
    }

    async fn wait_ready(&mut self, file: &FileConfig, limit: Duration) -> Result<(), ClusterError> {
        let started = Instant::now();
        for n in file.nodes.iter().filter(|n| n.model_dir.is_some()) {
            loop {
                if let Some((_, child)) = self.nodes.iter_mut().find(|(name, _)| name == &n.name)
                    && let Ok(Some(status)) = child.try_wait()
                {
                    let log = std::fs::read_to_string(self.logs.join(format!("{}.log", n.name)))
                        .unwrap_or_default();
                    let tail: String = log
                        .lines()
                        .rev()
                        .take(5)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n");
                    return Err(format!(
                        "node {} exited ({status}) while starting:\n{tail}",
                        n.name
                    ));
                }
                let ok = async {
                    let mut c = pb::model_node_client::ModelNodeClient::connect(n.url.clone())
                        .await
                        .ok()?;
                    c.info(pb::InfoRequest {}).await.ok()
                };
                if tokio::time::timeout(Duration::from_secs(2), ok)
                    .await
                    .ok()
                    .flatten()
                    .is_some()
                {
                    break;
                }
                if started.elapsed() > limit {
                    return Err(format!(
                        "node {} did not answer within {} s (log: {})",
                        n.name,
                        limit.as_secs(),
                        self.logs.display()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// The coordinator's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The HTTP API's URL, when served.
    pub fn http_url(&self) -> Option<&str> {
        self.http_url.as_deref()
    }

    /// Where the nodes' logs are.
    pub fn logs(&self) -> &Path {
        &self.logs
    }

    /// The started nodes' names and process ids.
    pub fn nodes(&self) -> Vec<(String, Option<u32>)> {
        self.nodes.iter().map(|(n, c)| (n.clone(), c.id())).collect()
    }

    /// Stops the coordinator (draining) and the nodes: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.server.take() {
            let _ = tokio::time::timeout(grace, h).await;
        }
        for (_, child) in &self.nodes {
            if let Some(pid) = child.id() {
                terminate(pid);
            }
        }
        for (name, child) in &mut self.nodes {
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                tracing::warn!(node = %name, "did not stop within the grace period; killing");
                let _ = child.kill().await;
            }
        }
    }
}

#[cfg(unix)]
fn terminate(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
    }
}

#[cfg(not(unix))]
fn terminate(_pid: u32) {}
