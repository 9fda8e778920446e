//! TLS, mutual TLS and bearer tokens on real sockets: a node that requires the coordinator's client
//! certificate, a coordinator that serves gRPC over TLS and checks tokens, and the `coordinator`
//! binary's logs, which never show a key.

mod common;

use std::sync::Arc;
use std::time::Duration;

use coordinator::auth::ApiKeys;
use coordinator::config::Settings;
use coordinator::replicas::SystemResolver;
use coordinator::service::{Coordinator, NodeSpec};
use ensemble_proto::tls::ClientTls;
use ensemble_proto::v1 as pb;
use tonic::transport::{Channel, Endpoint};

use common::pki;

fn request(max_chars: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::Prompt {
            kind: Some(pb::prompt::Kind::Raw("The Tarn".into())),
        }),
        strategy: "specfuse".into(),
        max_chars,
        ..Default::default()
    }
}

fn one_member(name: &str, url: &str) -> Settings {
    Settings::new(vec![
        NodeSpec {
            name: name.into(),
            url: url.into(),
            weight: 1.0,
        }
        .into(),
    ])
}

fn tiny_dir(tag: &str) -> anyhow::Result<std::path::PathBuf> {
    let root = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("sec-{tag}-{}", std::process::id()));
    Ok(model_node::fixtures::tiny_model_dir(
        &root,
        "llama",
        "byte_level",
        5,
    )?)
}

async fn tls_channel(url: &str, tls: &ClientTls) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .tls_config(tls.config().map_err(anyhow::Error::msg)?)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

/// `GET path` over TLS (trusting `ca`), HTTP/1.1 by hand: the response head and body as text.
async fn https_get(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n{auth}connection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    tls.read_to_string(&mut out).await?;
    Ok(out)
}

async fn info(channel: Channel) -> Result<pb::InfoResponse, tonic::Status> {
    let mut c = pb::model_node_client::ModelNodeClient::new(channel);
    let mut req = tonic::Request::new(pb::InfoRequest {});
    req.set_timeout(Duration::from_secs(5));
    c.info(req).await.map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_mutual_tls_serves_only_clients_with_a_certificate() -> anyhow::Result<()> {
    let pki = pki::fresh("node")?;
    let opts = model_node::server::ServeOptions {
        grace: Duration::from_secs(1),
        tls: Some(pki.server(true)),
        metrics: None,
        ..Default::default()
    };
    let node = common::start_with(tiny_dir("mtls")?, opts).await?;
    assert!(node.url.starts_with("https://127.0.0.1:"));

    // A plain-text client gets no answer from a TLS listener.
    let plain_url = node.url.replacen("https", "http", 1);
    let plain = Endpoint::from_shared(plain_url)?
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    assert!(info(plain).await.is_err(), "plain text is refused");

    // TLS without a client certificate: the handshake (or the first call) fails.
    let no_cert = pki.ca_only();
    let refused = match tls_channel(&node.url, &no_cert).await {
        Ok(ch) => info(ch).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a client without a certificate is refused");

    // With the client certificate: served, and the coordinator reaches the node the same way.
    let mtls = pki.mutual();
    let i = info(tls_channel(&node.url, &mtls).await?).await?;
    assert_eq!(i.architecture, "llama");
    let mut settings = one_member("tls", &node.url);
    settings.node_tls = Some(mtls);
    let c = Coordinator::start(settings, Arc::new(SystemResolver)).await?;
    let r = c.run(request(8), &mut |_| true).await?;
    assert!(r.steps >= 1 && r.failed_nodes.is_empty(), "{r:?}");

    // An https:// member without [node_tls] is a configuration error named at start-up.
    let bad = one_member("tls", &node.url);
    let e = Coordinator::start(bad, Arc::new(SystemResolver))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("node_tls"), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_coordinator_serves_tls_and_refuses_wrong_tokens() -> anyhow::Result<()> {
    let pki = pki::fresh("coord")?;
    let node = common::start(tiny_dir("coord")?).await?;
    let mut settings = one_member("a", &node.url);
    settings.api_keys = ApiKeys::new(["right-token"]);
    let c = Coordinator::start(settings, Arc::new(SystemResolver)).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://{}", listener.local_addr()?);
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http_addr = http.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let opts = coordinator::server::ServeOptions {
        tls: Some(pki.server(false)),
        http: Some(http),
    };
    tokio::spawn(coordinator::server::serve_with(
        c,
        listener,
        async {
            let _ = stopped.await;
        },
        opts,
    ));

    let plain = Endpoint::from_shared(url.replacen("https", "http", 1))?.connect_lazy();
    let mut client = pb::ensemble_client::EnsembleClient::new(plain);
    assert!(
        client.generate(request(4)).await.is_err(),
        "plain text is refused"
    );

    let tls = pki.ca_only();
    let mut client = pb::ensemble_client::EnsembleClient::new(tls_channel(&url, &tls).await?);
    let with = |token: Option<&str>| {
        let mut r = tonic::Request::new(request(4));
        if let Some(t) = token {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().expect("ascii"));
        }
        r
    };
    let e = client.generate(with(None)).await.expect_err("no token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("authorization: Bearer"), "{}", e.message());
    let e = client
        .generate(with(Some("wrong-token")))
        .await
        .expect_err("wrong token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(!e.message().contains("wrong-token"));
    let r = client.generate(with(Some("right-token"))).await?.into_inner();
    assert!(r.steps >= 1);
    // Health stays open for probes.
    let mut health = tonic_health::pb::health_client::HealthClient::new(tls_channel(&url, &tls).await?);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    assert_eq!(
        h.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // The HTTP face speaks TLS with the same certificate; plain HTTP gets no answer.
    let health = https_get(http_addr, &pki.ca, "/health", None).await?;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let refused = https_get(http_addr, &pki.ca, "/v1/models", Some("wrong-token")).await?;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    let models = https_get(http_addr, &pki.ca, "/v1/models", Some("right-token")).await?;
    assert!(
        models.starts_with("HTTP/1.1 200") && models.contains("\"ensemble\""),
        "{models}"
    );
    let plain = reqwest::Client::new()
        .get(format!("http://{http_addr}/health"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP to the TLS face: {plain:?}");

    // The CLI reaches it with the CA and the key, and says why when the key is wrong.
    let cli = |key: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ensemble"))
            .args(["nodes", "--coordinator", &url, "--api-key", key])
            .arg("--ca-cert")
            .arg(&pki.ca)
            .output()
    };
    let ok = cli("right-token")?;
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let refused = cli("wrong-token")?;
    let err = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(
        !refused.status.success() && err.contains("invalid API key"),
        "{err}"
    );
    let _ = stop.send(());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_with_a_client_ca_requires_client_certificates() -> anyhow::Result<()> {
    let pki = pki::fresh("cmtls")?;
    let node = common::start(tiny_dir("cmtls")?).await?;
    let settings = one_member("a", &node.url);
    let c = Coordinator::start(settings, Arc::new(SystemResolver)).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://{}", listener.local_addr()?);
    let opts = coordinator::server::ServeOptions {
        tls: Some(pki.server(true)),
        http: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(coordinator::server::serve_with(
        c,
        listener,
        async {
            let _ = stopped.await;
        },
        opts,
    ));
    let no_cert = pki.ca_only();
    let refused = match tls_channel(&url, &no_cert).await {
        Ok(ch) => pb::ensemble_client::EnsembleClient::new(ch)
            .generate(request(4))
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(refused, "a client without a certificate is refused");
    let with_cert = pki.mutual();
    let mut client = pb::ensemble_client::EnsembleClient::new(tls_channel(&url, &with_cert).await?);
    assert!(client.generate(request(4)).await?.into_inner().steps >= 1);
    let _ = stop.send(());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_key_appears_in_the_coordinators_logs() -> anyhow::Result<()> {
    let node = common::start(tiny_dir("logs")?).await?;
    let (grpc, http) = (common::free_port()?, common::free_port()?);
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["serve", "--node", &format!("a={}", node.url)])
        .args([
            "--listen",
            &format!("127.0.0.1:{grpc}"),
            "--http-listen",
            &format!("127.0.0.1:{http}"),
        ])
        .env("COORDINATOR_API_KEYS", "sk-live-1234567890")
        .env("RUST_LOG", "debug")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let url = format!("http://127.0.0.1:{grpc}");
    let mut client = None;
    for _ in 0..100 {
        if let Ok(c) = pb::ensemble_client::EnsembleClient::connect(url.clone()).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut client = client.ok_or_else(|| anyhow::anyhow!("coordinator did not start"))?;
    for token in ["sk-wrong-0987654321", "sk-live-1234567890"] {
        let mut r = tonic::Request::new(request(4));
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        let _ = client.generate(r).await;
    }
    let http_refused = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{http}/v1/models"))
        .bearer_auth("sk-wrong-0987654321")
        .send()
        .await?;
    assert_eq!(http_refused.status(), 401);
    // `--help` shows where the keys come from, never their values.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["serve", "--help"])
        .env("COORDINATOR_API_KEYS", "sk-live-1234567890")
        .output()?;
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    assert!(
        help.contains("COORDINATOR_API_KEYS") && !help.contains("sk-live"),
        "{help}"
    );

    #[cfg(unix)]
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output()).await??;
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(
        logs.contains("request refused"),
        "the refusals are logged:\n{logs}"
    );
    assert!(
        !logs.contains("sk-live") && !logs.contains("sk-wrong"),
        "a key leaked into the logs:\n{logs}"
    );
    Ok(())
}
