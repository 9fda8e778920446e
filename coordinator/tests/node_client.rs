//! `NodeClient` against a real model node on 127.0.0.1:0: deltas keep the node's session in step,
//! a lost session is rebuilt from the full context without failing the call, deadlines hold.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use coordinator::{Error, NodeClient};
use ensemble_proto::v1 as pb;
use model_node::chars::CharOptions;
use model_node::config::{DTypeArg, LimitArgs, ModelArgs};

fn model_dir() -> anyhow::Result<PathBuf> {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("coord-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    Ok(model_node::fixtures::tiny_model_dir(
        &root,
        "llama",
        "byte_level",
        21,
    )?)
}

async fn start_node(
    dir: &std::path::Path,
    max_sessions: usize,
) -> anyhow::Result<(String, tokio::sync::oneshot::Sender<()>)> {
    let args = ModelArgs {
        model_dir: dir.to_owned(),
        model_id: None,
        device: "cpu".into(),
        dtype: DTypeArg::F32,
        threads: 0,
        max_context: None,
    };
    let limits = LimitArgs {
        max_sessions,
        kv_cache_mb: 64,
        queue: 8,
        char_hypotheses: 4,
        char_min_mass: 1e-4,
    };
    let loaded = model_node::node::load(&args, &limits)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(model_node::server::run(
        listener,
        loaded,
        CharOptions::default(),
        async {
            let _ = rx.await;
        },
        Duration::from_secs(5),
    ));
    Ok((url, tx))
}

fn prompt(text: &str) -> pb::Prompt {
    pb::Prompt {
        kind: Some(pb::prompt::Kind::Raw(text.into())),
    }
}

async fn channel(url: &str) -> anyhow::Result<tonic::transport::Channel> {
    Ok(tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect()
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_follow_the_answer_and_lost_sessions_are_rebuilt() -> anyhow::Result<()> {
    let dir = model_dir()?;
    // One session slot: two requests evict each other's session on every call.
    let (url, stop) = start_node(&dir, 1).await?;
    let ch = channel(&url).await?;
    let deadline = Duration::from_secs(30);
    let mut a = NodeClient::new("n0", ch.clone(), deadline);
    let mut b = NodeClient::new("n0", ch.clone(), deadline);
    a.begin("req-a", prompt("the cat"));
    b.begin("req-b", prompt("hello"));
    for _ in 0..3 {
        let pa = a.propose(4, &[], pb::Sampling::default()).await?;
        a.accept(&pa.text);
        let pb_ = b.propose(4, &[], pb::Sampling::default()).await?;
        b.accept(&pb_.text);
    }
    assert!(
        a.resends() >= 2 && b.resends() >= 2,
        "resends a {} b {}",
        a.resends(),
        b.resends()
    );
    // The same answer through a fresh, stateless client: identical scores.
    let sa = a.score(&[" sat".to_owned()], false, &[]).await?;
    let mut replay = NodeClient::new("n0", ch, deadline);
    replay.begin("req-c", prompt("the cat"));
    // The same answer, built by a client whose session was never evicted, then sent in one go.
    let mut whole = String::new();
    let mut ta = NodeClient::new("n0", channel(&url).await?, deadline);
    ta.begin("req-d", prompt("the cat"));
    for _ in 0..3 {
        let p = ta.propose(4, &[], pb::Sampling::default()).await?;
        ta.accept(&p.text);
        whole.push_str(&p.text);
    }
    replay.accept(&whole);
    let sr = replay.score(&[" sat".to_owned()], false, &[]).await?;
    assert!((sa.scores[0].sum_logprob - sr.scores[0].sum_logprob).abs() < 1e-4);
    let _ = stop.send(());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_node_is_cut_at_its_deadline() -> anyhow::Result<()> {
    let dir = model_dir()?;
    let (url, stop) = start_node(&dir, 8).await?;
    let mut c = NodeClient::new("slow", channel(&url).await?, Duration::from_millis(5));
    c.begin("req", prompt("the cat"));
    let t0 = Instant::now();
    let r = c
        .propose(
            500,
            &[],
            pb::Sampling {
                temperature: 1.0,
                ..Default::default()
            },
        )
        .await;
    assert!(
        matches!(r, Err(Error::Timeout { ref node, deadline_ms: 5 }) if node == "slow"),
        "{:?}",
        r.err()
    );
    // Generous bound: the point is that the call did not run its 500 tokens.
    assert!(t0.elapsed() < Duration::from_secs(5));
    let _ = stop.send(());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_error_is_reported_with_its_code() -> anyhow::Result<()> {
    let dir = model_dir()?;
    let (url, stop) = start_node(&dir, 8).await?;
    let mut c = NodeClient::new("n0", channel(&url).await?, Duration::from_secs(10));
    c.begin("req", prompt("the cat"));
    let r = c.next_char(0, None, None).await;
    assert!(
        matches!(r, Err(Error::Node { code: tonic::Code::InvalidArgument, ref message, .. }) if message.contains("top_k")),
        "{:?}",
        r.err()
    );
    let _ = stop.send(());
    Ok(())
}

/// A TCP proxy to `upstream`; when `kill` is set, the next client chunk that carries a request (more
/// than a control frame's few bytes) closes that connection instead of being forwarded: the node's
/// connection is lost mid-call, as when its process dies.
async fn proxy(
    upstream: String,
    kill: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let upstream = upstream.trim_start_matches("http://").to_owned();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let kill = kill.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async {
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if n > 40 && kill.swap(false, std::sync::atomic::Ordering::SeqCst) {
                            return;
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                let down = async {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                };
                tokio::select! {
                    _ = up => {}
                    _ = down => {}
                }
            });
        }
    });
    Ok(url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_connection_is_lost_is_retried_once_with_the_full_context() -> anyhow::Result<()> {
    let dir = model_dir()?;
    let (url, stop) = start_node(&dir, 8).await?;
    let kill = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let via = proxy(url, kill.clone()).await?;
    let mut c = NodeClient::new("n0", channel(&via).await?, Duration::from_secs(10)).retries(1);
    c.begin("req", prompt("the cat"));
    let p = c.propose(4, &[], pb::Sampling::default()).await?;
    c.accept(&p.text);
    kill.store(true, std::sync::atomic::Ordering::SeqCst);
    let p = c.propose(4, &[], pb::Sampling::default()).await;
    assert!(p.is_ok(), "{:?}", p.err());
    assert!(
        !kill.load(std::sync::atomic::Ordering::SeqCst),
        "the connection was cut"
    );
    assert_eq!(c.retried(), 1, "retried once");
    let _ = stop.send(());
    Ok(())
}
