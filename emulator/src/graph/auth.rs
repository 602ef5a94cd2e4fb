//! Who is calling Graph, and what they may do: bearer token checks, app roles, Exchange RBAC
//! for Applications, and per-mailbox access.

use std::sync::Arc;

use axum::http::{HeaderMap, header};

use super::errors::GraphError;
use crate::apps::App;
use crate::clock;
use crate::cloud::{Cloud, GRAPH_APP_ID};
use crate::signing::{AccessClaims, TokenRejection};
use crate::state::AppState;

/// Whether Graph in `cloud` accepts a token for `aud`: its own cloud's Graph URL or Graph's
/// application id. A token for another cloud's Graph is not for this service.
fn is_graph_audience(cloud: Cloud, aud: &str) -> bool {
    aud == cloud.graph_resource() || aud == GRAPH_APP_ID
}

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
    if !is_graph_audience(state.settings.cloud, &claims.aud) {
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
    /// The permission's name, as in a token's `roles` and after `Application ` in Exchange.
    pub fn role(self) -> &'static str {
        match self {
            Self::MailSend => "Mail.Send",
            Self::MailReadWrite => "Mail.ReadWrite",
        }
    }
}

/// Every check between the gate and the body, in order: the user id in the URL (404), the
/// permission (403), the mailbox enabled for REST (404).
pub fn authorize(state: &AppState, caller: &Caller, permission: Permission, sender: &str) -> Result<(), GraphError> {
    require_user_id(sender)?;
    require_permission(state, caller, permission, sender)?;
    require_rest_enabled(state, sender)
}

/// 404 ErrorInvalidUser unless `sender` is an address or an object id.
fn require_user_id(sender: &str) -> Result<(), GraphError> {
    if is_user_id(sender) {
        Ok(())
    } else {
        Err(GraphError::new(
            axum::http::StatusCode::NOT_FOUND,
            "ErrorInvalidUser",
            format!("The requested user '{sender}' is invalid."),
        ))
    }
}

/// Grants are additive, as Exchange Online evaluates them: `permission` in the token's
/// `roles` (Entra consent, tenant-wide, narrowed by an application access policy), or an
/// Exchange RBAC for Applications assignment of the token's service principal whose scope
/// covers `sender`. Refused: 403 `ErrorSendAsDenied` when only the access policy stood in the
/// way, else 403 `ErrorAccessDenied`.
/// See <https://learn.microsoft.com/en-us/exchange/permissions-exo/application-rbac> and
/// <https://learn.microsoft.com/graph/auth-limit-mailbox-access>.
pub fn require_permission(
    state: &AppState,
    caller: &Caller,
    permission: Permission,
    sender: &str,
) -> Result<(), GraphError> {
    let entra = caller.claims.has_role(permission.role());
    if entra && policy_allows(caller, sender) {
        return Ok(());
    }
    let claims = &caller.claims;
    if state.lock().rbac_grants(&claims.tid, &claims.oid, permission.role(), sender) {
        return Ok(());
    }
    Err(if entra { GraphError::send_as_denied() } else { GraphError::access_denied() })
}

/// Whether the app's application access policy, if any, lets it act for `mailbox`.
fn policy_allows(caller: &Caller, mailbox: &str) -> bool {
    caller.app.as_ref().is_none_or(|app| app.may_use_mailbox(mailbox))
}

/// 404 MailboxNotEnabledForRESTAPI for a mailbox marked so through the admin API.
fn require_rest_enabled(state: &AppState, sender: &str) -> Result<(), GraphError> {
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

    #[test]
    fn graph_accepts_its_own_cloud_audience_only() {
        assert!(is_graph_audience(Cloud::Public, "https://graph.microsoft.com"));
        assert!(is_graph_audience(Cloud::USGovernment, "https://graph.microsoft.us"));
        assert!(is_graph_audience(Cloud::China, GRAPH_APP_ID));
        assert!(!is_graph_audience(Cloud::USGovernment, "https://graph.microsoft.com"));
        assert!(!is_graph_audience(Cloud::Public, "https://outlook.office365.com"));
    }
}
