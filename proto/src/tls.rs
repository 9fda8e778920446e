//! TLS for the gRPC hops (rustls through tonic): PEM files in, tonic configurations out.
//!
//! A server presents `cert` + `key`; with `client_ca` it also requires every client to present a
//! certificate signed by that CA (mutual TLS). A client trusts `ca` (a private CA: no system roots
//! are loaded) and, for mutual TLS, presents `cert` + `key`.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(format!("{what} {}: not a PEM file", path.display()));
    }
    Ok(bytes)
}

/// A server's TLS files.
#[derive(Debug, Clone, Default)]
pub struct ServerTls {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (PEM).
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// The tonic server configuration; the error names the file at fault.
    pub fn config(&self) -> Result<ServerTlsConfig, String> {
        let identity = Identity::from_pem(read("TLS certificate", &self.cert)?, read("TLS key", &self.key)?);
        let mut c = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            c = c.client_ca_root(Certificate::from_pem(read("client CA", ca)?));
        }
        Ok(c)
    }
}

/// A client's TLS files.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// CA that signed the servers' certificates (PEM).
    pub ca: PathBuf,
    /// Client certificate for mutual TLS (PEM; with `key`).
    pub cert: Option<PathBuf>,
    /// Client private key (PEM; with `cert`).
    pub key: Option<PathBuf>,
    /// Name to verify the server certificate against (default: the host of the URL).
    pub domain: Option<String>,
}

impl ClientTls {
    /// The tonic client configuration; the error names the file at fault.
    pub fn config(&self) -> Result<ClientTlsConfig, String> {
        let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("TLS CA", &self.ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                c = c.identity(Identity::from_pem(
                    read("client certificate", cert)?,
                    read("client key", key)?,
                ));
            }
            (None, None) => {}
            _ => return Err("mutual TLS needs both a client certificate and its key".into()),
        }
        if let Some(d) = &self.domain {
            c = c.domain_name(d.clone());
        }
        Ok(c)
    }
}
