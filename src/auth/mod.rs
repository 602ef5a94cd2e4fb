//! OAuth 2.0 app tokens from Microsoft Entra ID, cached per profile and scope.
//!
//! The controller resolves a profile's Secrets into an [`EntraApp`]; [`TokenCaches`] keeps one
//! [`TokenCache`] per profile and scope, which asks an [`EntraTokenProvider`] for tokens.

mod assertion;
mod cache;
mod caches;
mod credential;
mod permissions;
mod provider;
mod request;
mod response;
mod schedule;

pub use assertion::{ASSERTION_ALGORITHM, ASSERTION_LIFETIME, AssertionClaims, CertificateKey, assertion_claims};
pub use cache::{TokenCache, TokenState};
pub use caches::TokenCaches;
pub use credential::{Credential, DEFAULT_AUTHORITY_HOST, EntraApp, check_authority_host};
pub use permissions::{
    AuthorizationPath, MAIL_SEND, PermissionVerdict, SMTP_SEND_AS_APP, SendEvidence, entra_remedy, rbac_remedy,
    verify_permissions,
};
pub use provider::{EntraTokenProvider, TOKEN_ANSWER_LIMIT, TokenIssuer};
pub use request::{ClientAuthentication, JWT_BEARER_ASSERTION_TYPE, TokenRequest, token_request, token_url};
pub use response::{
    IssuedToken, aadsts_hint, describe_oversized_answer, describe_token_error, parse_token_response, token_roles,
};
pub use schedule::{TokenCacheConfig, refresh_delay, retry_backoff, usable_for};

use std::fmt;

use async_trait::async_trait;
use k8s_openapi::jiff::Timestamp;

/// Scope of Microsoft Graph.
pub const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";
/// Scope of Exchange Online (SMTP XOAUTH2).
pub const OUTLOOK_SCOPE: &str = "https://outlook.office365.com/.default";

/// An access token. Its `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken {
    /// The bearer token.
    pub secret: String,
    /// When it expires.
    pub expires_at: Timestamp,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken").field("secret", &"<redacted>").field("expires_at", &self.expires_at).finish()
    }
}

/// Why no token could be had.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The token endpoint refused the credentials (AADSTS code and Microsoft's words).
    #[error("{0}")]
    Rejected(String),
    /// The token endpoint could not be reached or answered 5xx; worth retrying.
    #[error("{0}")]
    Unavailable(String),
    /// The profile's credential is missing or unusable (Secret, key, certificate, token file).
    #[error("{0}")]
    Credential(String),
}

/// A source of tokens for one profile and scope. Implementations share one request among
/// concurrent callers and refresh ahead of expiry.
#[async_trait]
pub trait TokenSource: Send + Sync {
    /// A currently valid token.
    async fn token(&self) -> Result<AccessToken, AuthError>;
    /// Drops the cached token (after a 401) so the next call fetches a new one.
    fn invalidate(&self);
    /// Drops the cached token only if it is `token` (the one a 401 answered), so many senders
    /// failing with the same old token cause one new request, not one each.
    fn invalidate_token(&self, token: &AccessToken) {
        let _ = token;
        self.invalidate();
    }
}
