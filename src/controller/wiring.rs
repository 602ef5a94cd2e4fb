//! Builds a profile's transport from its settings and resolved credentials: the one place that
//! maps the API's types (`crate::api`) to the transports' configuration, which knows nothing of
//! the resources.

use std::path::PathBuf;
use std::sync::Arc;

use super::registry::NotReady;
use crate::api::{self, EntraCredentials, MailProfileSpec};
use crate::auth::{Credential, EntraApp, EntraTokenProvider, TokenCache, TokenCaches, TokenSource};
use crate::tls::TrustRoots;
use crate::transport::graph::{GraphConfig, GraphTransport};
use crate::transport::smtp::{SmtpConfig, SmtpCredentials, SmtpTransport, TlsMode};
use crate::transport::{Importance, Transport};

/// A credential read from a Secret or a file. Its Debug never shows the secret.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum CredentialMaterial {
    /// No credential (an IP-authenticated relay).
    None,
    /// An SMTP login.
    Password {
        /// The user name.
        username: String,
        /// The password.
        password: String,
    },
    /// An Entra ID client secret.
    ClientSecret(String),
    /// A certificate and its private key, PEM.
    Certificate {
        /// tls.crt.
        cert_pem: Vec<u8>,
        /// tls.key.
        key_pem: Vec<u8>,
    },
    /// A federated token file (workload identity).
    FederatedTokenFile(PathBuf),
}

impl std::fmt::Debug for CredentialMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            CredentialMaterial::None => "None",
            CredentialMaterial::Password { .. } => "Password(<redacted>)",
            CredentialMaterial::ClientSecret(_) => "ClientSecret(<redacted>)",
            CredentialMaterial::Certificate { .. } => "Certificate(<redacted>)",
            CredentialMaterial::FederatedTokenFile(_) => "FederatedTokenFile",
        };
        f.write_str(kind)
    }
}

/// What building a transport needs beyond the settings.
pub struct TransportInputs<'a> {
    /// The profile's key, as text (for token cache and limit keys).
    pub profile: String,
    /// Its settings.
    pub settings: &'a MailProfileSpec,
    /// The credential.
    pub credential: CredentialMaterial,
    /// Roots: the operator's plus the profile's caBundle.
    pub trust: TrustRoots,
    /// Accept http:// endpoints.
    pub allow_insecure: bool,
    /// Whether the profile still exists; no token cache is created for one that is gone.
    pub live: &'a (dyn Fn() -> bool + Sync),
}

/// A profile's transport and, for OAuth profiles, the token cache behind it.
pub struct Built {
    /// The transport.
    pub transport: Arc<dyn Transport>,
    /// The token cache (Graph, SMTP XOAUTH2).
    pub tokens: Option<Arc<TokenCache>>,
}

fn not_ready(reason: &str, message: impl Into<String>) -> NotReady {
    NotReady { reason: reason.into(), message: message.into() }
}

/// The Entra app a profile authenticates as.
pub fn entra_app(c: &EntraCredentials, credential: &CredentialMaterial) -> Result<EntraApp, NotReady> {
    let credential = match credential {
        CredentialMaterial::ClientSecret(s) => Credential::ClientSecret(s.clone()),
        CredentialMaterial::Certificate { cert_pem, key_pem } => {
            Credential::Certificate { cert_pem: cert_pem.clone(), key_pem: key_pem.clone() }
        }
        CredentialMaterial::FederatedTokenFile(p) => Credential::FederatedTokenFile(p.clone()),
        CredentialMaterial::None | CredentialMaterial::Password { .. } => {
            return Err(not_ready(
                "InvalidSettings",
                "an OAuth profile needs a client secret, certificate or workload identity",
            ));
        }
    };
    Ok(EntraApp {
        authority_host: c.authority_host().trim_end_matches('/').to_string(),
        tenant_id: c.tenant_id.clone(),
        client_id: c.client_id.clone(),
        credential,
    })
}

fn token_cache(
    inputs: &TransportInputs<'_>,
    caches: &TokenCaches,
    c: &EntraCredentials,
    scope: &str,
) -> Result<Arc<TokenCache>, NotReady> {
    let app = entra_app(c, &inputs.credential)?;
    app.validate(inputs.allow_insecure).map_err(|e| not_ready("InvalidSettings", e.to_string()))?;
    let issuer = EntraTokenProvider::from_trust_roots(&inputs.trust, inputs.allow_insecure)
        .map_err(|e| not_ready("InvalidSettings", e.to_string()))?;
    caches
        .get_or_create_if(&inputs.profile, scope, app, Arc::new(issuer), inputs.live)
        .ok_or_else(|| not_ready("Deleted", "the profile was deleted"))
}

/// The SMTP configuration of a profile with an `smtp` section, and its token cache (XOAUTH2).
pub fn smtp_config(
    inputs: &TransportInputs<'_>,
    caches: &TokenCaches,
    smtp: &crate::api::SmtpTransport,
) -> Result<(SmtpConfig, Option<Arc<TokenCache>>), NotReady> {
    let mut tokens = None;
    let credentials = match (&inputs.credential, smtp.auth.as_ref().and_then(|a| a.oauth2.as_ref())) {
        (CredentialMaterial::None, _) => SmtpCredentials::None,
        (CredentialMaterial::Password { username, password }, _) => {
            SmtpCredentials::Password { username: username.clone(), password: password.clone() }
        }
        (_, Some(oauth2)) => {
            let scope = smtp.token_scope().unwrap_or_default();
            let cache = token_cache(inputs, caches, oauth2, &scope)?;
            tokens = Some(Arc::clone(&cache));
            SmtpCredentials::XOAuth2(cache as Arc<dyn TokenSource>)
        }
        (_, None) => return Err(not_ready("InvalidSettings", "unexpected credential for smtp")),
    };
    Ok((smtp_server(smtp, inputs.trust.clone(), credentials), tokens))
}

/// The SMTP configuration of a profile's `smtp` section (host, port and TLS mode defaulted; a
/// profile without a server gets an empty host, which [`SmtpTransport::new`] refuses).
pub fn smtp_server(spec: &api::SmtpTransport, roots: TrustRoots, credentials: SmtpCredentials) -> SmtpConfig {
    SmtpConfig::new(spec.server().unwrap_or_default().to_string(), spec.port(), spec.tls().into(), roots, credentials)
}

impl From<api::TlsMode> for TlsMode {
    fn from(mode: api::TlsMode) -> Self {
        match mode {
            api::TlsMode::StartTLS => TlsMode::StartTLS,
            api::TlsMode::Implicit => TlsMode::Implicit,
            api::TlsMode::None => TlsMode::None,
        }
    }
}

impl From<api::Importance> for Importance {
    fn from(importance: api::Importance) -> Self {
        match importance {
            api::Importance::Low => Importance::Low,
            api::Importance::Normal => Importance::Normal,
            api::Importance::High => Importance::High,
        }
    }
}

/// The transport for a profile.
pub async fn build_transport(inputs: TransportInputs<'_>, caches: &TokenCaches) -> Result<Built, NotReady> {
    let settings = inputs.settings;
    if let Some(smtp) = &settings.smtp {
        let (config, tokens) = smtp_config(&inputs, caches, smtp)?;
        let transport = SmtpTransport::new(config).map_err(|e| not_ready("InvalidSettings", e.to_string()))?;
        return Ok(Built { transport: Arc::new(transport), tokens });
    }
    let Some(graph) = &settings.graph else {
        return Err(not_ready("InvalidSettings", "a profile needs exactly one transport: graph or smtp"));
    };
    let cache = token_cache(&inputs, caches, &graph.credentials, &graph.token_scope())?;
    let config = GraphConfig {
        endpoint: graph.endpoint().trim_end_matches('/').to_string(),
        save_to_sent_items: graph.save_to_sent_items.unwrap_or(false),
        max_concurrent: settings.max_concurrent() as usize,
        allow_insecure: inputs.allow_insecure,
    };
    let http = inputs.trust.shared_http_client().map_err(|e| not_ready("InvalidSettings", e.to_string()))?;
    let transport = GraphTransport::new(config, Arc::clone(&cache) as Arc<dyn TokenSource>, http)
        .map_err(|e| not_ready("InvalidSettings", e.to_string()))?;
    Ok(Built { transport: Arc::new(transport), tokens: Some(cache) })
}
