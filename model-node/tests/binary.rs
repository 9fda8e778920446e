//! The `model-node` binary itself: `serve` on a real socket, a call over gRPC, then SIGTERM drains and
//! exits cleanly; a broken model directory fails at start with the file named.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use ensemble_proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_then_sigterm_drains_and_exits_zero() -> anyhow::Result<()> {
    let root = common::temp_dir("binary");
    let dir = common::model_dir(&root, "mistral", "byte_level", 4)?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_model-node"))
        .args(["serve", "--listen", "127.0.0.1:0", "--shutdown-grace-secs", "20"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .env("MODEL_NODE_MODEL_DIR", &dir)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    // The node logs the address it bound; read it (the log line is the readiness signal).
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut addr = None;
    while addr.is_none() {
        let line = rx.recv_timeout(Duration::from_secs(60))?;
        if line.contains("serving") {
            addr = line
                .split("addr=")
                .nth(1)
                .map(|a| a.split_whitespace().next().unwrap_or_default().to_owned());
        }
    }
    let addr = addr.unwrap_or_default();
    let mut c = pb::model_node_client::ModelNodeClient::connect(format!("http://{addr}")).await?;
    let info = c.info(pb::InfoRequest {}).await?.into_inner();
    assert_eq!(info.architecture, "mistral");
    let inflight = tokio::spawn(async move {
        c.propose_segment(common::greedy(common::raw("hello", "", ""), 400))
            .await
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    assert!(kill.success());
    let done = inflight.await?;
    assert!(done.is_ok(), "in-flight call lost: {done:?}");
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    assert!(status.success(), "exit status {status:?}");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(rest.iter().any(|l| l.contains("draining")), "{rest:?}");
    Ok(())
}

#[test]
fn broken_model_dir_fails_at_start_naming_the_file() -> anyhow::Result<()> {
    let root = common::temp_dir("binary-broken");
    std::fs::create_dir_all(&root)?;
    let out = Command::new(env!("CARGO_BIN_EXE_model-node"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
            "--model-dir",
        ])
        .arg(&root)
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.json is missing") && err.contains("supported model_type"),
        "{err}"
    );
    Ok(())
}
