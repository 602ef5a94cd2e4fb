//! Builds a profile's transport from its settings and resolved credentials.

use std::path::PathBuf;
use std::sync::Arc;

use super::registry::NotReady;
use crate::api::MailProfileSpec;
use crate::tls::TrustRoots;
use crate::transport::Transport;
use crate::transport::smtp::{SmtpConfig, SmtpCredentials, SmtpTransport};

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
}

/// The transport for a profile.
pub async fn build_transport(inputs: TransportInputs<'_>) -> Result<Arc<dyn Transport>, NotReady> {
    let settings = inputs.settings;
    if let Some(smtp) = &settings.smtp {
        let credentials = match (&inputs.credential, smtp.auth.as_ref().and_then(|a| a.oauth2.as_ref())) {
            (CredentialMaterial::None, _) => SmtpCredentials::None,
            (CredentialMaterial::Password { username, password }, _) => {
                SmtpCredentials::Password { username: username.clone(), password: password.clone() }
            }
            (_, Some(_)) => {
                return Err(NotReady {
                    reason: "TransportUnavailable".into(),
                    message: "SMTP with OAuth 2.0 is not available in this build".into(),
                });
            }
            (_, None) => {
                return Err(NotReady { reason: "InvalidSettings".into(), message: "unexpected credential".into() });
            }
        };
        let config = SmtpConfig::from_spec(smtp, inputs.trust.clone(), credentials);
        return SmtpTransport::new(config)
            .map(|t| Arc::new(t) as Arc<dyn Transport>)
            .map_err(|e| NotReady { reason: "InvalidSettings".into(), message: e.to_string() });
    }
    Err(NotReady {
        reason: "TransportUnavailable".into(),
        message: "Microsoft Graph is not available in this build".into(),
    })
}
