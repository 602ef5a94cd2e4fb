//! Requests app tokens from the Entra ID token endpoint.

use std::error::Error as _;
use std::sync::Arc;

use async_trait::async_trait;
use k8s_openapi::jiff::Timestamp;
use reqwest::StatusCode;
use uuid::Uuid;

use super::AuthError;
use super::assertion::CertificateKey;
use super::credential::{Credential, EntraApp};
use super::request::{ClientAuthentication, token_request, token_url};
use super::response::{IssuedToken, describe_oversized_answer, describe_token_error, parse_token_response};
use crate::response_body::{BodyError, read_capped};
use crate::tls::TrustRoots;

/// The largest token endpoint answer read. A token answer is one JSON object holding one
/// access token (a JWT of a few KiB, more with many role claims) and an error answer a few
/// hundred bytes of Microsoft's words: 64 KiB is ample for both, and nothing a token endpoint
/// says is worth more.
pub const TOKEN_ANSWER_LIMIT: usize = 64 * 1024;

/// Something that issues tokens for an application and scope (the token endpoint, or a stand-in
/// in tests). The cache asks it; it never caches.
#[async_trait]
pub trait TokenIssuer: Send + Sync {
    /// Requests a new token for `app` and `scope`.
    async fn issue(&self, app: &EntraApp, scope: &str) -> Result<IssuedToken, AuthError>;
}

/// The client credentials flow against Entra ID (or any endpoint speaking it).
#[derive(Clone, Debug)]
pub struct EntraTokenProvider {
    http: Arc<reqwest::Client>,
    allow_insecure: bool,
}

impl EntraTokenProvider {
    /// A provider on `http`; `allow_insecure` admits `http://` authority hosts.
    pub fn new(http: impl Into<Arc<reqwest::Client>>, allow_insecure: bool) -> Self {
        EntraTokenProvider { http: http.into(), allow_insecure }
    }

    /// A provider whose HTTPS client trusts `roots` besides the web PKI (the client shared by
    /// everything that trusts the same roots).
    pub fn from_trust_roots(roots: &TrustRoots, allow_insecure: bool) -> Result<Self, AuthError> {
        let http = roots
            .shared_http_client()
            .map_err(|e| AuthError::Credential(format!("cannot build the HTTPS client: {e}")))?;
        Ok(Self::new(http, allow_insecure))
    }

    /// How `app` authenticates one request to `token_url`: its secret, a freshly signed
    /// certificate assertion, or the federated token file's current content.
    pub async fn client_authentication(
        &self,
        app: &EntraApp,
        token_url: &str,
    ) -> Result<ClientAuthentication, AuthError> {
        match &app.credential {
            Credential::ClientSecret(secret) if secret.is_empty() => {
                Err(AuthError::Credential("the client secret is empty".into()))
            }
            Credential::ClientSecret(secret) => Ok(ClientAuthentication::Secret(secret.clone())),
            Credential::Certificate { cert_pem, key_pem } => {
                let key = CertificateKey::from_pem(cert_pem, key_pem)?;
                let assertion = key.client_assertion(token_url, &app.client_id, Timestamp::now(), Uuid::new_v4())?;
                Ok(ClientAuthentication::Assertion(assertion))
            }
            Credential::FederatedTokenFile(path) => {
                // Read on every request: the kubelet replaces the file before the token expires.
                let content = tokio::fs::read_to_string(path).await.map_err(|e| {
                    AuthError::Credential(format!("cannot read the federated token file {}: {e}", path.display()))
                })?;
                let assertion = content.trim();
                if assertion.is_empty() {
                    return Err(AuthError::Credential(format!("the federated token file {} is empty", path.display())));
                }
                Ok(ClientAuthentication::Assertion(assertion.to_owned()))
            }
        }
    }

    /// Requests a token for `app` and `scope`.
    pub async fn request_token(&self, app: &EntraApp, scope: &str) -> Result<IssuedToken, AuthError> {
        app.validate(self.allow_insecure)?;
        let url = token_url(&app.authority_host, &app.tenant_id);
        let auth = self.client_authentication(app, &url).await?;
        let request = token_request(app, scope, auth);
        tracing::debug!(
            url = %request.url,
            client_id = %app.client_id,
            credential = app.credential.kind(),
            scope,
            "requesting token"
        );
        let response =
            self.http.post(&request.url).form(&request.form).send().await.map_err(|e| unreachable(&request.url, &e))?;
        let status = response.status();
        let body = match read_capped(response, TOKEN_ANSWER_LIMIT).await {
            Ok(body) => body,
            Err(BodyError::Read(e)) => return Err(unreachable(&request.url, &e)),
            Err(BodyError::TooLarge { limit }) => return Err(describe_oversized_answer(status, limit)),
        };
        // JSON is UTF-8 (RFC 8259); anything else is no token answer and fails to parse.
        let body = String::from_utf8_lossy(&body);
        if status == StatusCode::OK { parse_token_response(&body) } else { Err(describe_token_error(status, &body)) }
    }
}

#[async_trait]
impl TokenIssuer for EntraTokenProvider {
    async fn issue(&self, app: &EntraApp, scope: &str) -> Result<IssuedToken, AuthError> {
        self.request_token(app, scope).await
    }
}

/// A network failure, with its causes (reqwest's own message hides them).
fn unreachable(url: &str, error: &reqwest::Error) -> AuthError {
    let what = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut message = format!("token endpoint {url} unreachable: {what}");
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    AuthError::Unavailable(message)
}
