//! TLS trust shared by every HTTPS and SMTP client: the platform's roots plus `--ca-bundle`.

use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore, pki_types::CertificateDer};

/// Errors reading extra trust roots.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The PEM could not be parsed.
    #[error("CA bundle is not valid PEM: {0}")]
    Pem(String),
    /// A certificate was refused as a root.
    #[error("CA bundle certificate rejected: {0}")]
    Certificate(String),
}

/// Installs ring as the process-wide rustls provider. Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The roots trusted besides the built-in web PKI roots.
#[derive(Clone, Debug, Default)]
pub struct TrustRoots {
    extra: Vec<CertificateDer<'static>>,
}

impl TrustRoots {
    /// Parses PEM certificates (a CA bundle).
    pub fn from_pem(pem: &[u8]) -> Result<Self, TlsError> {
        let mut roots = TrustRoots::default();
        roots.add_pem(pem)?;
        Ok(roots)
    }

    /// Adds the certificates of a PEM bundle.
    pub fn add_pem(&mut self, pem: &[u8]) -> Result<(), TlsError> {
        let mut reader = pem;
        for cert in rustls_pemfile::certs(&mut reader) {
            self.extra.push(cert.map_err(|e| TlsError::Pem(e.to_string()))?);
        }
        Ok(())
    }

    /// These roots plus another set (a profile's own bundle on top of the operator's).
    pub fn with(&self, other: &TrustRoots) -> TrustRoots {
        let mut extra = self.extra.clone();
        extra.extend(other.extra.iter().cloned());
        TrustRoots { extra }
    }

    /// The extra roots, DER.
    pub fn extra(&self) -> &[CertificateDer<'static>] {
        &self.extra
    }

    /// A rustls client configuration on ring trusting web PKI roots and these.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        let mut store = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        for cert in &self.extra {
            store.add(cert.clone()).map_err(|e| TlsError::Certificate(e.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Certificate(e.to_string()))?
            .with_root_certificates(store)
            .with_no_client_auth();
        Ok(config)
    }

    /// An HTTP client for token endpoints and Graph trusting these roots.
    pub fn http_client(&self) -> Result<reqwest::Client, TlsError> {
        reqwest::Client::builder()
            .tls_backend_preconfigured(self.client_config()?)
            .user_agent(concat!("mailroom/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(120))
            // Idle connections go after 30 s, at most 8 per host: a burst of sends or token
            // requests does not leave a pool of connections (and their TLS state) behind.
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .pool_max_idle_per_host(8)
            .build()
            .map_err(|e| TlsError::Certificate(e.to_string()))
    }
}
