//! A server certificate kept in a `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`; what
//! cert-manager writes), watched and swapped in when the Secret changes: handshakes after the
//! change present the new certificate, connections already open keep theirs.

use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why a Secret's certificate cannot be served.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertError {
    /// A key is missing from the Secret.
    #[error("the Secret has no {0}")]
    Missing(&'static str),
    /// `tls.crt` holds no certificate.
    #[error("tls.crt holds no PEM certificate")]
    NoCertificate,
    /// `tls.key` holds no usable private key.
    #[error("tls.key holds no PEM private key rustls can use")]
    BadKey,
}

/// Parses a PEM certificate chain and private key into what rustls serves.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, CertError> {
    let chain: Vec<_> = rustls_pemfile::certs(&mut &cert_pem[..]).filter_map(Result::ok).collect();
    if chain.is_empty() {
        return Err(CertError::NoCertificate);
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..]).ok().flatten().ok_or(CertError::BadKey)?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|_| CertError::BadKey)?;
    Ok(CertifiedKey::new(chain, signing))
}

/// A Secret named on the command line as `NAMESPACE/NAME`, or `NAME` in `default_namespace`
/// (the pod's); `None` when either part is empty or there is more than one `/`.
pub fn secret_name(flag: &str, default_namespace: &str) -> Option<(String, String)> {
    let (namespace, name) = match flag.split_once('/') {
        Some((ns, name)) => (ns, name),
        None => (default_namespace, flag),
    };
    if namespace.is_empty() || name.is_empty() || name.contains('/') {
        return None;
    }
    Some((namespace.to_string(), name.to_string()))
}

/// The certificate of a Secret's data.
pub fn from_secret(secret: &Secret) -> Result<CertifiedKey, CertError> {
    let data = secret.data.as_ref();
    let get = |k: &'static str| data.and_then(|d| d.get(k)).map(|v| v.0.as_slice()).ok_or(CertError::Missing(k));
    certified_key(get("tls.crt")?, get("tls.key")?)
}

/// The certificate served now; none until the Secret is first read.
#[derive(Debug, Default)]
pub struct ServingCert {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl ServingCert {
    /// Serves `key` from the next handshake on.
    pub fn set(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(key));
    }

    /// Whether a certificate is loaded.
    pub fn is_loaded(&self) -> bool {
        self.current.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// A rustls server configuration that presents whatever certificate is current.
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols.clear();
        Arc::new(config)
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Watches the Secret `namespace/name` and loads every version of it into `cert`; a version that
/// cannot be served is logged and the previous certificate kept. Runs until the process ends.
pub async fn watch(client: Client, namespace: String, name: String, cert: Arc<ServingCert>, what: &'static str) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher::watcher(api, config).boxed();
    while let Some(event) = events.next().await {
        let secret = match event {
            Ok(Event::Apply(s) | Event::InitApply(s)) => s,
            Ok(Event::Delete(_)) => {
                tracing::warn!(secret = %format!("{namespace}/{name}"), "{what}: the certificate Secret was deleted; the last certificate is still served");
                continue;
            }
            Ok(Event::Init | Event::InitDone) => continue,
            Err(e) => {
                tracing::warn!(secret = %format!("{namespace}/{name}"), error = %e, "{what}: watching the certificate Secret");
                continue;
            }
        };
        match from_secret(&secret) {
            Ok(key) => {
                cert.set(key);
                tracing::info!(secret = %format!("{namespace}/{name}"), resource_version = ?secret.metadata.resource_version, "{what}: certificate loaded");
            }
            Err(e) => {
                tracing::error!(secret = %format!("{namespace}/{name}"), error = %e, "{what}: the certificate Secret cannot be served; keeping the previous certificate");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &[u8] = include_bytes!("submission/testdata/localhost.crt");
    const KEY: &[u8] = include_bytes!("submission/testdata/localhost.key");

    #[test]
    fn a_pem_pair_loads_and_broken_ones_say_what_is_wrong() {
        assert!(certified_key(CERT, KEY).is_ok());
        assert_eq!(certified_key(b"", KEY).err(), Some(CertError::NoCertificate));
        assert_eq!(
            certified_key(CERT, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").err(),
            Some(CertError::BadKey)
        );
        assert_eq!(certified_key(CERT, CERT).err(), Some(CertError::BadKey));
        let empty = Secret::default();
        assert_eq!(from_secret(&empty).err(), Some(CertError::Missing("tls.crt")));
    }

    #[test]
    fn a_secret_is_named_with_or_without_its_namespace() {
        let named = |ns: &str, name: &str| Some((ns.to_string(), name.to_string()));
        assert_eq!(secret_name("monitoring/alerts-tls", "mailroom-system"), named("monitoring", "alerts-tls"));
        assert_eq!(secret_name("alerts-tls", "mailroom-system"), named("mailroom-system", "alerts-tls"));
        for bad in ["", "/", "ns/", "/name", "a/b/c"] {
            assert_eq!(secret_name(bad, "mailroom-system"), None, "{bad:?}");
        }
        assert_eq!(secret_name("alerts-tls", ""), None);
    }

    #[test]
    fn the_resolver_serves_the_latest_certificate() {
        let cert = Arc::new(ServingCert::default());
        assert!(!cert.is_loaded());
        cert.set(certified_key(CERT, KEY).unwrap());
        assert!(cert.is_loaded());
    }
}
