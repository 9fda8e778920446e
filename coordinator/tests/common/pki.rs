//! A throwaway PKI for the TLS tests: one CA, a server certificate for 127.0.0.1 / localhost and a
//! client certificate, written as PEM files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};

/// The files of one PKI.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn leaf(
    name: &str,
    sans: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    ca: &CertifiedIssuer<'_, KeyPair>,
) -> anyhow::Result<(String, String)> {
    let mut p = CertificateParams::new(sans)?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![usage];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl Pki {
    /// A client that trusts the CA and presents no certificate.
    pub fn ca_only(&self) -> ensemble_proto::tls::ClientTls {
        ensemble_proto::tls::ClientTls {
            ca: self.ca.clone(),
            ..Default::default()
        }
    }

    /// A client that trusts the CA and presents the client certificate (mutual TLS).
    pub fn mutual(&self) -> ensemble_proto::tls::ClientTls {
        ensemble_proto::tls::ClientTls {
            ca: self.ca.clone(),
            cert: Some(self.client_cert.clone()),
            key: Some(self.client_key.clone()),
            domain: None,
        }
    }

    /// The server side: the server certificate, with `client_ca` when clients must present one.
    pub fn server(&self, require_client_cert: bool) -> ensemble_proto::tls::ServerTls {
        ensemble_proto::tls::ServerTls {
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            client_ca: require_client_cert.then(|| self.ca.clone()),
        }
    }
}

/// A fresh PKI in a directory of its own under the test target dir.
pub fn fresh(tag: &str) -> anyhow::Result<Pki> {
    make(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("pki-{tag}-{}", std::process::id())))
}

/// A fresh CA and its two leaves under `dir`.
pub fn make(dir: &Path) -> anyhow::Result<Pki> {
    std::fs::create_dir_all(dir)?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, "ensemble test CA");
    let ca = CertifiedIssuer::self_signed(p, KeyPair::generate()?)?;
    let (server_cert, server_key) = leaf(
        "model-node",
        vec!["127.0.0.1".into(), "localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
        &ca,
    )?;
    let (client_cert, client_key) = leaf("coordinator", vec![], ExtendedKeyUsagePurpose::ClientAuth, &ca)?;
    let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        Ok(path)
    };
    Ok(Pki {
        ca: write("ca.crt", &ca.pem())?,
        server_cert: write("server.crt", &server_cert)?,
        server_key: write("server.key", &server_key)?,
        client_cert: write("client.crt", &client_cert)?,
        client_key: write("client.key", &client_key)?,
    })
}
