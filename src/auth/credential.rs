//! What a profile authenticates with: the Entra ID application and its credential.

use std::fmt;
use std::path::PathBuf;

use super::AuthError;
use super::assertion::CertificateKey;

/// The public cloud's authority host.
pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";

/// The credential of an Entra ID application, as resolved from the profile's Secret or pod.
/// `Debug` never shows secret material.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// A client secret (the secret's value, not its ID).
    ClientSecret(String),
    /// A certificate and its private key (`tls.crt` and `tls.key` of a `kubernetes.io/tls`
    /// Secret); RSA, PKCS#1 or PKCS#8 PEM.
    Certificate {
        /// The certificate, PEM (the first certificate is the client's).
        cert_pem: Vec<u8>,
        /// The private key, PEM.
        key_pem: Vec<u8>,
    },
    /// Workload identity federation: a projected service account token file whose content is
    /// the client assertion. It is read anew for every request because the kubelet rotates it.
    FederatedTokenFile(PathBuf),
}

impl Credential {
    /// The kind of credential, for messages and status.
    pub fn kind(&self) -> &'static str {
        match self {
            Credential::ClientSecret(_) => "client secret",
            Credential::Certificate { .. } => "certificate",
            Credential::FederatedTokenFile(_) => "federated token file",
        }
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::ClientSecret(_) => f.write_str("ClientSecret(<redacted>)"),
            Credential::Certificate { cert_pem, .. } => f
                .debug_struct("Certificate")
                .field("cert_pem", &format_args!("<{} bytes>", cert_pem.len()))
                .field("key_pem", &"<redacted>")
                .finish(),
            // The path is configuration, not a secret.
            Credential::FederatedTokenFile(path) => f.debug_tuple("FederatedTokenFile").field(path).finish(),
        }
    }
}

/// An Entra ID application registration and how it authenticates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntraApp {
    /// The authority host, e.g. `https://login.microsoftonline.com` (sovereign clouds differ).
    pub authority_host: String,
    /// The directory (tenant) ID or a verified domain of the tenant.
    pub tenant_id: String,
    /// The application (client) ID.
    pub client_id: String,
    /// The credential the application proves itself with.
    pub credential: Credential,
}

impl EntraApp {
    /// Checks what can be checked without the network: the authority host's scheme, the tenant
    /// and client IDs, and that the certificate and key parse. `allow_insecure` admits `http://`.
    pub fn validate(&self, allow_insecure: bool) -> Result<(), AuthError> {
        check_authority_host(&self.authority_host, allow_insecure)?;
        check_tenant_id(&self.tenant_id)?;
        if self.client_id.trim().is_empty() {
            return Err(AuthError::Credential("clientId is empty".into()));
        }
        match &self.credential {
            Credential::ClientSecret(secret) if secret.is_empty() => {
                Err(AuthError::Credential("the client secret is empty".into()))
            }
            Credential::ClientSecret(_) => Ok(()),
            Credential::Certificate { cert_pem, key_pem } => CertificateKey::from_pem(cert_pem, key_pem).map(|_| ()),
            Credential::FederatedTokenFile(path) if path.as_os_str().is_empty() => {
                Err(AuthError::Credential("the federated token file path is empty".into()))
            }
            Credential::FederatedTokenFile(_) => Ok(()),
        }
    }
}

/// Refuses an authority host that is not an absolute `https://` URL (`http://` only when
/// `allow_insecure`, the operator's `--allow-insecure-endpoints`).
pub fn check_authority_host(host: &str, allow_insecure: bool) -> Result<(), AuthError> {
    let url = reqwest::Url::parse(host)
        .map_err(|e| AuthError::Credential(format!("authorityHost {host:?} is not a URL: {e}")))?;
    if url.host_str().is_none() {
        return Err(AuthError::Credential(format!("authorityHost {host:?} has no host")));
    }
    match url.scheme() {
        "https" => Ok(()),
        "http" if allow_insecure => Ok(()),
        "http" => Err(AuthError::Credential(format!(
            "authorityHost {host} is plain http; refused unless the operator runs with \
             --allow-insecure-endpoints"
        ))),
        other => {
            Err(AuthError::Credential(format!("authorityHost {host} has scheme {other:?}; only https is supported")))
        }
    }
}

/// A tenant goes into the token URL's path, so only ID and domain characters are allowed.
fn check_tenant_id(tenant: &str) -> Result<(), AuthError> {
    let ok = !tenant.is_empty() && tenant.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok { Ok(()) } else { Err(AuthError::Credential(format!("tenantId {tenant:?} is not a tenant ID or domain"))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(host: &str, credential: Credential) -> EntraApp {
        EntraApp {
            authority_host: host.into(),
            tenant_id: "contoso.onmicrosoft.com".into(),
            client_id: "11111111-1111-1111-1111-111111111111".into(),
            credential,
        }
    }

    #[test]
    fn debug_never_shows_secrets() {
        let secret = Credential::ClientSecret("s3cr3t-value".into());
        let cert = Credential::Certificate {
            cert_pem: b"CERT".to_vec(),
            key_pem: b"-----BEGIN PRIVATE KEY----- KEYMATERIAL".to_vec(),
        };
        let shown = format!("{secret:?} {cert:?} {:?}", app(DEFAULT_AUTHORITY_HOST, secret.clone()));
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(!shown.contains("KEYMATERIAL"), "{shown}");
        assert!(shown.contains("<redacted>"));
        let file = format!("{:?}", Credential::FederatedTokenFile("/var/run/token".into()));
        assert!(file.contains("/var/run/token"));
    }

    #[test]
    fn authority_host_must_be_https_unless_insecure_allowed() {
        assert!(check_authority_host("https://login.microsoftonline.us/", false).is_ok());
        assert!(matches!(
            check_authority_host("http://127.0.0.1:8080", false),
            Err(AuthError::Credential(m)) if m.contains("--allow-insecure-endpoints")
        ));
        assert!(check_authority_host("http://127.0.0.1:8080", true).is_ok());
        assert!(check_authority_host("ftp://example.com", true).is_err());
        assert!(check_authority_host("login.microsoftonline.com", true).is_err());
    }

    #[test]
    fn validate_checks_ids_and_material() {
        let ok = app(DEFAULT_AUTHORITY_HOST, Credential::ClientSecret("x".into()));
        assert!(ok.validate(false).is_ok());
        let mut bad = ok.clone();
        bad.tenant_id = "contoso/../x".into();
        assert!(bad.validate(false).is_err());
        let mut bad = ok.clone();
        bad.client_id = " ".into();
        assert!(bad.validate(false).is_err());
        let empty = app(DEFAULT_AUTHORITY_HOST, Credential::ClientSecret(String::new()));
        assert!(empty.validate(false).is_err());
        let garbage = app(
            DEFAULT_AUTHORITY_HOST,
            Credential::Certificate { cert_pem: b"nope".to_vec(), key_pem: b"nope".to_vec() },
        );
        assert!(matches!(garbage.validate(false), Err(AuthError::Credential(_))));
    }
}
