//! Who is calling Graph, and what they may do: bearer token checks, app roles, and
//! per-mailbox access.

use std::sync::Arc;

use axum::http::{HeaderMap, header};

use super::errors::GraphError;
use crate::apps::App;
use crate::clock;
use crate::signing::{AccessClaims, TokenRejection};
use crate::state::AppState;

/// The audiences Graph accepts: its URL and its application id.
const GRAPH_AUDIENCES: [&str; 2] = ["https://graph.microsoft.com", "00000003-0000-0000-c000-000000000000"];

/// An authenticated Graph caller.
#[derive(Clone)]
pub struct Caller {
    /// The token's claims.
    pub claims: AccessClaims,
    /// The app registration, if it still exists.
    pub app: Option<Arc<App>>,
}

/// Checks the `Authorization: Bearer` token.
pub fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Caller, GraphError> {
    let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::trim).unwrap_or_default();
    let token = match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ if value.is_empty() => return Err(GraphError::invalid_token("Access token is empty.")),
        _ => return Err(GraphError::invalid_token("Access token validation failure.")),
    };
    if token.is_empty() {
        return Err(GraphError::invalid_token("Access token is empty."));
    }
    let claims = state
        .signer
        .verify(token, clock::now_unix())
        .map_err(|rejection| GraphError::invalid_token(rejection_message(&rejection, token)))?;
    if !GRAPH_AUDIENCES.contains(&claims.aud.as_str()) {
        return Err(GraphError::invalid_token("Access token validation failure. Invalid audience."));
    }
    let app = state.lock().app(&claims.tid, &claims.appid);
    Ok(Caller { claims, app })
}

fn rejection_message(rejection: &TokenRejection, token: &str) -> String {
    match rejection {
        TokenRejection::Expired => "Lifetime validation failed, the token is expired.".into(),
        TokenRejection::NotYetValid => "Lifetime validation failed, the token is not yet valid.".into(),
        TokenRejection::Malformed if !token.contains('.') => "IDX14100: JWT is not well formed, there are no dots (.).\nThe token needs to be in JWS or JWE Compact Serialization Format. (JWS): 'EncodedHeader.EndcodedPayload.EncodedSignature'. (JWE): 'EncodedProtectedHeader.EncodedEncryptedKey.EncodedInitializationVector.EncodedCiphertext.EncodedAuthenticationTag'.".into(),
        TokenRejection::Malformed | TokenRejection::BadSignature => {
            "Access token validation failure.".into()
        }
    }
}

/// The application permission an operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Sending mail.
    MailSend,
    /// Creating drafts and attachments.
    MailReadWrite,
}

impl Permission {
    fn role(self) -> &'static str {
        match self {
            Self::MailSend => "Mail.Send",
            Self::MailReadWrite => "Mail.ReadWrite",
        }
    }
}

/// Checks the token's roles for `permission`, as Graph does (from the token, not the app).
pub fn require(caller: &Caller, permission: Permission) -> Result<(), GraphError> {
    if caller.claims.roles.iter().any(|r| r.eq_ignore_ascii_case(permission.role())) {
        Ok(())
    } else {
        Err(GraphError::access_denied())
    }
}

/// Checks that the mailbox in the URL exists, is enabled for REST, and that the app's
/// access policy lets it act for it.
pub fn require_mailbox(state: &AppState, caller: &Caller, sender: &str) -> Result<(), GraphError> {
    if !is_user_id(sender) {
        return Err(GraphError::new(
            axum::http::StatusCode::NOT_FOUND,
            "ErrorInvalidUser",
            format!("The requested user '{sender}' is invalid."),
        ));
    }
    if let Some(app) = &caller.app
        && !app.may_use_mailbox(sender)
    {
        return Err(GraphError::send_as_denied());
    }
    if state.lock().disabled_mailboxes.contains(&sender.to_ascii_lowercase()) {
        return Err(GraphError::new(
            axum::http::StatusCode::NOT_FOUND,
            "MailboxNotEnabledForRESTAPI",
            "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
        ));
    }
    Ok(())
}

/// A user id in a Graph URL: a user principal name (address) or an object id (GUID).
pub fn is_user_id(s: &str) -> bool {
    super::message::is_valid_address(s) || uuid::Uuid::parse_str(s).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_addresses_or_guids() {
        assert!(is_user_id("alerts@contoso.com"));
        assert!(is_user_id("11111111-1111-1111-1111-111111111111"));
        assert!(!is_user_id("alerts"));
    }
}
