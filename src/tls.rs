//! TLS trust shared by every HTTPS and SMTP client: the platform's roots plus `--ca-bundle`.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, Weak};

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

/// The HTTP clients in use, by the DER of the extra roots they trust.
type SharedClients = HashMap<Vec<Vec<u8>>, Weak<reqwest::Client>>;

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

    /// The HTTP client for token endpoints and Graph trusting these roots, shared by every
    /// profile that trusts the same roots, and freed with the last of them.
    ///
    /// One client per profile (and one more for its token requests) was most of what 1,000
    /// profiles cost: each client has its TLS configuration (about 30 KiB, half of it the
    /// session cache) and its own connection pool, so every profile also kept its own idle TLS
    /// connection to the same token endpoint and Graph. Interleaved with what lives on, the
    /// freed pages of that burst stayed resident as fragments and allocator metadata after the
    /// profiles were deleted. A shared client keeps one pool (at most 8 idle connections per
    /// host), and TLS sessions are resumed across profiles; what a client verifies depends only
    /// on the roots, which are its key.
    pub fn shared_http_client(&self) -> Result<Arc<reqwest::Client>, TlsError> {
        static SHARED: LazyLock<Mutex<SharedClients>> = LazyLock::new(Default::default);
        let key: Vec<Vec<u8>> = self.extra.iter().map(|c| c.as_ref().to_vec()).collect();
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        shared.retain(|_, client| client.strong_count() > 0);
        if let Some(client) = shared.get(&key).and_then(Weak::upgrade) {
            return Ok(client);
        }
        let client = Arc::new(self.http_client()?);
        shared.insert(key, Arc::downgrade(&client));
        Ok(client)
    }

    /// A new HTTP client for token endpoints and Graph trusting these roots.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate in PEM, for roots other than the default.
    const OTHER_ROOT: &str = include_str!("auth/testdata/cert.pem");

    #[test]
    fn profiles_with_the_same_roots_share_one_client_freed_with_the_last() {
        install_crypto_provider();
        let default = TrustRoots::default();
        let a = default.shared_http_client().unwrap();
        let b = default.shared_http_client().unwrap();
        assert!(Arc::ptr_eq(&a, &b), "the same roots share a client");

        let other = TrustRoots::from_pem(OTHER_ROOT.as_bytes()).unwrap();
        assert!(!other.extra().is_empty());
        let c = other.shared_http_client().unwrap();
        assert!(!Arc::ptr_eq(&a, &c), "other roots get a client of their own");

        let weak = Arc::downgrade(&c);
        drop(c);
        assert!(weak.upgrade().is_none(), "the last user frees the client");
        let d = other.shared_http_client().unwrap();
        assert!(Arc::strong_count(&d) == 1, "a new client is built once the old one is gone");
        drop((a, b));
    }
}
