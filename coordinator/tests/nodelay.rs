//! Every listener of both servers sets TCP_NODELAY on the sockets it accepts: read back from the
//! server side of a real accepted connection (found through `/proc/net/tcp` and this process's file
//! descriptors), for the node's gRPC (plain and TLS) and metrics listeners and the coordinator's gRPC
//! and HTTP listeners (plain and TLS). Without it a response of a few hundred bytes waits ~40 ms for
//! Nagle's algorithm to meet the client's delayed ACK.
#![allow(unsafe_code)] // borrowing a file descriptor of this process to read a socket option

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use coordinator::config::Settings;
use coordinator::replicas::SystemResolver;
use coordinator::service::{Coordinator, NodeSpec};

/// The inode of the server-side socket of the connection `server` ← `client` (0 while queued).
fn socket_inode(server: SocketAddr, client: SocketAddr) -> Option<u64> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => format!("{:08X}:{:04X}", u32::from_le_bytes(v4.ip().octets()), v4.port()),
        SocketAddr::V6(_) => String::new(),
    };
    let (local, remote) = (hex(server), hex(client));
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 9 && f[1] == local && f[2] == remote).then(|| f[9].parse().ok())?
    })
}

/// The file descriptor of this process that holds socket `inode`.
fn fd_of(inode: u64) -> Option<i32> {
    let want = format!("socket:[{inode}]");
    std::fs::read_dir("/proc/self/fd").ok()?.find_map(|e| {
        let e = e.ok()?;
        let target = std::fs::read_link(e.path()).ok()?;
        (target.to_str()? == want).then(|| e.file_name().to_str()?.parse().ok())?
    })
}

/// TCP_NODELAY on the server side of a fresh connection to `server`, once the server accepted it.
async fn server_side_nodelay(server: SocketAddr) -> anyhow::Result<bool> {
    let client = tokio::net::TcpStream::connect(server).await?;
    let local = client.local_addr()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(fd) = socket_inode(server, local).filter(|i| *i != 0).and_then(fd_of) {
            // SAFETY: `fd` is an open socket of this process, held by the server for as long as
            // `client` keeps the connection open; it is only borrowed for one getsockopt.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            let on = socket2::SockRef::from(&fd).tcp_nodelay()?;
            if on || tokio::time::Instant::now() > deadline {
                return Ok(on);
            }
        } else if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the server never accepted the connection from {local}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn addr(url: &str) -> anyhow::Result<SocketAddr> {
    Ok(url.rsplit("//").next().unwrap_or(url).parse()?)
}

fn tiny_dir(tag: &str) -> anyhow::Result<std::path::PathBuf> {
    let root = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("nodelay-{tag}-{}", std::process::id()));
    Ok(model_node::fixtures::tiny_model_dir(
        &root,
        "llama",
        "byte_level",
        5,
    )?)
}

/// A coordinator over `node_url` serving gRPC and HTTP (TLS with `tls`): both addresses.
async fn coordinator(
    node_url: &str,
    tls: Option<ensemble_proto::tls::ServerTls>,
) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let settings = Settings::new(vec![
        NodeSpec {
            name: "a".into(),
            url: node_url.into(),
            weight: 1.0,
        }
        .into(),
    ]);
    let c = Coordinator::start(settings, Arc::new(SystemResolver)).await?;
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addrs = (grpc.local_addr()?, http.local_addr()?);
    let opts = coordinator::server::ServeOptions {
        tls,
        http: Some(http),
    };
    tokio::spawn(coordinator::server::serve_with(
        c,
        grpc,
        std::future::pending(),
        opts,
    ));
    Ok(addrs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listener_sets_tcp_nodelay_on_accepted_sockets() -> anyhow::Result<()> {
    let pki = common::pki::fresh("nodelay")?;
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let metrics_addr = metrics.local_addr()?;
    let plain = common::start_with(
        tiny_dir("plain")?,
        model_node::server::ServeOptions {
            grace: Duration::from_secs(1),
            tls: None,
            metrics: Some(metrics),
            ..Default::default()
        },
    )
    .await?;
    let tls = common::start_with(
        tiny_dir("tls")?,
        model_node::server::ServeOptions {
            grace: Duration::from_secs(1),
            tls: Some(pki.server(false)),
            metrics: None,
            ..Default::default()
        },
    )
    .await?;
    let (grpc, http) = coordinator(&plain.url, None).await?;
    let (grpc_tls, http_tls) = coordinator(&plain.url, Some(pki.server(false))).await?;

    let listeners = [
        ("node gRPC", addr(&plain.url)?),
        ("node gRPC over TLS", addr(&tls.url)?),
        ("node metrics and health", metrics_addr),
        ("coordinator gRPC", grpc),
        ("coordinator gRPC over TLS", grpc_tls),
        ("coordinator HTTP", http),
        ("coordinator HTTPS", http_tls),
    ];
    let mut off = Vec::new();
    for (name, at) in listeners {
        if !server_side_nodelay(at).await? {
            off.push(name);
        }
    }
    assert!(
        off.is_empty(),
        "TCP_NODELAY is off on accepted sockets of: {off:?}"
    );
    Ok(())
}
