//! TLS between nodes (mutual: every node presents a certificate signed by
//! the cluster's CA and checks its peer's).

use std::path::PathBuf;
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::ClusterError;

/// TLS settings of a node. Every node of a TLS cluster needs them: a node
/// without TLS cannot talk to one with it.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM file with this node's certificate chain (leaf first).
    pub cert_chain: PathBuf,
    /// PEM file with the certificate's private key.
    pub private_key: PathBuf,
    /// PEM file with the CA certificate(s) that sign the nodes' certificates.
    pub ca: PathBuf,
    /// The name peers' certificates must carry (a DNS name or an IP
    /// address in their subject alternative names).
    pub server_name: String,
}

pub(crate) struct Tls {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) connector: TlsConnector,
    pub(crate) server_name: ServerName<'static>,
}

fn bad(what: &str, path: &std::path::Path, e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Config(format!("TLS {what} `{}`: {e}", path.display()))
}

impl Tls {
    pub(crate) fn load(config: &TlsConfig) -> Result<Self, ClusterError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert_chain)
            .map_err(|e| bad("certificate chain", &config.cert_chain, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad("certificate chain", &config.cert_chain, e))?;
        if certs.is_empty() {
            return Err(bad(
                "certificate chain",
                &config.cert_chain,
                "no certificate",
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&config.private_key)
            .map_err(|e| bad("private key", &config.private_key, e))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(&config.ca).map_err(|e| bad("CA", &config.ca, e))? {
            let ca = ca.map_err(|e| bad("CA", &config.ca, e))?;
            roots.add(ca).map_err(|e| bad("CA", &config.ca, e))?;
        }
        if roots.is_empty() {
            return Err(bad("CA", &config.ca, "no certificate"));
        }
        let roots = Arc::new(roots);
        // ring, named explicitly: the process may link more than one provider.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls_err = |e: rustls::Error| ClusterError::Config(format!("TLS: {e}"));
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| ClusterError::Config(format!("TLS client verifier: {e}")))?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(tls_err)?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(tls_err)?;
        let server_name = ServerName::try_from(config.server_name.clone()).map_err(|e| {
            ClusterError::Config(format!("TLS server name `{}`: {e}", config.server_name))
        })?;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
            server_name,
        })
    }
}
