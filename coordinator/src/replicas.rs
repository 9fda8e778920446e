//! The replicas of one ensemble member: a single address, or every address its host name resolves
//! to (a Kubernetes headless Service), re-resolved in the background. A request sticks to one replica
//! (its node session and KV cache live there); requests are spread round-robin, and a call refused
//! by one replica is retried on the next (see [`crate::NodeClient`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::config::{Discovery, NodeConfig};
use crate::error::{Error, Result};

/// Resolves a host and port to addresses (the system resolver; tests substitute their own).
pub trait Resolve: Send + Sync + 'static {
    /// The addresses of `host:port`.
    fn resolve(
        &self,
        host: String,
        port: u16,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>;
}

/// The system resolver (`getaddrinfo` through tokio).
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(
        &self,
        host: String,
        port: u16,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), port)).await?.collect()) })
    }
}

/// One replica.
#[derive(Clone)]
pub struct Replica {
    /// Its address, as a URL.
    pub url: String,
    /// A lazily connected channel.
    pub channel: Channel,
}

/// The replicas of one member.
pub struct Replicas {
    name: String,
    list: RwLock<Vec<Replica>>,
    next: AtomicUsize,
    connect_timeout: Duration,
    tls: Option<ClientTlsConfig>,
}

fn invalid(name: &str, url: &str) -> Error {
    Error::InvalidParameter {
        name: format!("node {name} url"),
        value: url.to_owned(),
        allowed: "a URL such as http://host:50051",
    }
}

fn channel(
    url: &str,
    name: &str,
    connect_timeout: Duration,
    tls: Option<&ClientTlsConfig>,
) -> Result<Channel> {
    let mut endpoint = Endpoint::from_shared(url.to_owned()).map_err(|_| invalid(name, url))?;
    if url.starts_with("https://") {
        let tls = tls.ok_or_else(|| Error::InvalidParameter {
            name: format!("node {name} url"),
            value: url.to_owned(),
            allowed: "http:// URLs, or https:// with a [node_tls] section (the CA to trust)",
        })?;
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| Error::InvalidParameter {
                name: format!("node {name} TLS"),
                value: e.to_string(),
                allowed: "a valid [node_tls] configuration",
            })?;
    }
    Ok(endpoint.connect_timeout(connect_timeout).connect_lazy())
}

/// Scheme, host and port of `http://host:port[/]`.
fn split_url(url: &str) -> Option<(&str, &str, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((scheme, host, port.parse().ok()?))
}

impl Replicas {
    /// The replicas of `node`. With DNS discovery the first resolution happens here (an empty answer
    /// is not an error: the member has no replica until the next refresh), then every
    /// `dns_refresh_ms` in a task that ends when the returned value is dropped.
    pub async fn start(
        node: &NodeConfig,
        connect_timeout: Duration,
        resolver: Arc<dyn Resolve>,
    ) -> Result<Arc<Self>> {
        Self::start_with(node, connect_timeout, None, resolver).await
    }

    /// [`Replicas::start`] with TLS for `https://` URLs.
    pub async fn start_with(
        node: &NodeConfig,
        connect_timeout: Duration,
        tls: Option<ClientTlsConfig>,
        resolver: Arc<dyn Resolve>,
    ) -> Result<Arc<Self>> {
        let this = Arc::new(Self {
            name: node.name.clone(),
            list: RwLock::new(Vec::new()),
            next: AtomicUsize::new(0),
            connect_timeout,
            tls,
        });
        match node.discovery {
            Discovery::Static => {
                let ch = channel(&node.url, &node.name, connect_timeout, this.tls.as_ref())?;
                this.set(vec![Replica {
                    url: node.url.clone(),
                    channel: ch,
                }]);
            }
            Discovery::Dns => {
                let (scheme, host, port) =
                    split_url(&node.url).ok_or_else(|| invalid(&node.name, &node.url))?;
                let (scheme, host) = (scheme.to_owned(), host.to_owned());
                this.refresh(&*resolver, &scheme, &host, port).await;
                let weak: Weak<Self> = Arc::downgrade(&this);
                let period = Duration::from_millis(node.dns_refresh_ms.max(1));
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(period).await;
                        let Some(me) = weak.upgrade() else { break };
                        me.refresh(&*resolver, &scheme, &host, port).await;
                    }
                });
            }
        }
        Ok(this)
    }

    async fn refresh(&self, resolver: &dyn Resolve, scheme: &str, host: &str, port: u16) {
        match resolver.resolve(host.to_owned(), port).await {
            Ok(mut addrs) if !addrs.is_empty() => {
                addrs.sort();
                addrs.dedup();
                let old = self.list.read().map(|l| l.clone()).unwrap_or_default();
                let mut new = Vec::with_capacity(addrs.len());
                for a in addrs {
                    let url = format!("{scheme}://{a}");
                    match old.iter().find(|r| r.url == url) {
                        Some(r) => new.push(r.clone()),
                        None => match channel(&url, &self.name, self.connect_timeout, self.tls.as_ref()) {
                            Ok(channel) => new.push(Replica { url, channel }),
                            Err(e) => tracing::warn!(node = %self.name, %url, error = %e, "skipping address"),
                        },
                    }
                }
                if new.iter().map(|r| &r.url).ne(old.iter().map(|r| &r.url)) {
                    tracing::info!(node = %self.name, replicas = ?new.iter().map(|r| &r.url).collect::<Vec<_>>(), "replicas changed");
                }
                self.set(new);
            }
            // Keep the last known replicas: a failed or empty lookup (all pods restarting) should not
            // make the member vanish; calls to dead replicas fail fast and are retried elsewhere.
            Ok(_) => {
                tracing::warn!(node = %self.name, host, "DNS returned no address; keeping the last replicas")
            }
            Err(e) => {
                tracing::warn!(node = %self.name, host, error = %e, "DNS lookup failed; keeping the last replicas")
            }
        }
    }

    fn set(&self, list: Vec<Replica>) {
        if let Ok(mut l) = self.list.write() {
            *l = list;
        }
    }

    /// The current replicas' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.list
            .read()
            .map(|l| l.iter().map(|r| r.url.clone()).collect())
            .unwrap_or_default()
    }

    /// The next replica, round-robin (None while there is none).
    pub fn pick(&self) -> Option<Replica> {
        let l = self.list.read().ok()?;
        if l.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % l.len();
        Some(l[i].clone())
    }

    /// The replica after the one at `url` (for a retry elsewhere); the same one when it is alone.
    pub fn after(&self, url: &str) -> Option<Replica> {
        let l = self.list.read().ok()?;
        let i = l.iter().position(|r| r.url == url).map_or(0, |i| i + 1);
        l.get(i % l.len().max(1)).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split() {
        assert_eq!(
            split_url("http://a.b.svc:50051"),
            Some(("http", "a.b.svc", 50051))
        );
        assert_eq!(split_url("http://[::1]:7/"), Some(("http", "::1", 7)));
        assert_eq!(split_url("http://nohost"), None);
    }

    struct Fixed(std::sync::Mutex<Vec<SocketAddr>>);

    impl Resolve for Fixed {
        fn resolve(
            &self,
            _host: String,
            _port: u16,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>
        {
            let v = self.0.lock().map(|v| v.clone()).unwrap_or_default();
            Box::pin(async move { Ok(v) })
        }
    }

    #[tokio::test]
    async fn dns_replicas_round_robin_and_refresh() -> anyhow::Result<()> {
        let a: SocketAddr = "10.0.0.1:50051".parse()?;
        let b: SocketAddr = "10.0.0.2:50051".parse()?;
        let resolver = Arc::new(Fixed(std::sync::Mutex::new(vec![b, a])));
        let node = NodeConfig {
            name: "n".into(),
            url: "http://svc.ns:50051".into(),
            weight: 1.0,
            discovery: Discovery::Dns,
            dns_refresh_ms: 20,
            model_dir: None,
            node_args: vec![],
        };
        let r = Replicas::start(&node, Duration::from_secs(1), resolver.clone()).await?;
        assert_eq!(r.urls(), vec!["http://10.0.0.1:50051", "http://10.0.0.2:50051"]);
        let picks: Vec<String> = (0..4).filter_map(|_| r.pick()).map(|x| x.url).collect();
        assert_eq!(picks[0], picks[2]);
        assert_ne!(picks[0], picks[1]);
        assert_eq!(
            r.after("http://10.0.0.2:50051").map(|x| x.url).as_deref(),
            Some("http://10.0.0.1:50051")
        );
        // A replica goes away; an empty answer keeps the last list.
        *resolver.0.lock().map_err(|_| anyhow::anyhow!("lock"))? = vec![b];
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(r.urls(), vec!["http://10.0.0.2:50051"]);
        resolver.0.lock().map_err(|_| anyhow::anyhow!("lock"))?.clear();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(r.urls(), vec!["http://10.0.0.2:50051"]);
        Ok(())
    }
}
