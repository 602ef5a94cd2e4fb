//! The admin API under `/_emulator`: registrations, Exchange role assignments, faults,
//! inspection, reset. No authentication, so it answers loopback peers only (and the host itself
//! at the private address it may listen on, never the Pods behind it).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::apps::{App, AppSpec};
use crate::clock;
use crate::faults::FaultSpec;
use crate::rbac::{RoleAssignment, RoleAssignmentSpec};
use crate::signing::AccessClaims;
use crate::state::AppState;

/// Whether `peer` may use the admin API of an emulator listening on `listen`.
fn admin_peer_allowed(peer: std::net::IpAddr, listen: std::net::IpAddr) -> bool {
    peer.is_loopback() || (!listen.is_unspecified() && peer == listen)
}

/// The admin routes.
pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/_emulator/apps", post(register_app).get(list_apps))
        .route("/_emulator/apps/{tenant}/{client}", delete(delete_app))
        .route("/_emulator/faults", post(add_fault).get(list_faults).delete(clear_faults))
        .route("/_emulator/messages", get(messages).delete(clear_messages))
        .route("/_emulator/token-requests", get(token_requests))
        .route("/_emulator/issued-tokens", get(issued_tokens))
        .route("/_emulator/introspect", post(introspect))
        .route("/_emulator/reset", post(reset))
        .route("/_emulator/stats", get(stats))
        .route("/_emulator/mailboxes", post(set_mailbox).get(list_mailboxes))
        .route(
            "/_emulator/role-assignments",
            post(add_role_assignment).get(list_role_assignments).delete(clear_role_assignments),
        )
        .route("/_emulator/health", get(health))
        .route_layer(middleware::from_fn_with_state(state, local_only))
}

/// Refuses peers other than this host: loopback, or the very address the server listens on (a
/// connection from it comes from the host; a Pod behind it has an address of its own).
async fn local_only(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    if admin_peer_allowed(peer.ip(), state.settings.listen_ip) {
        next.run(request).await
    } else {
        problem(StatusCode::FORBIDDEN, "the admin API answers this host's own clients only")
    }
}

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// Reads a JSON body, answering 400 with serde's explanation when it does not fit.
fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| Box::new(problem(StatusCode::BAD_REQUEST, e.to_string())))
}

async fn register_app(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    let spec: AppSpec = match parse(&body) {
        Ok(spec) => spec,
        Err(r) => return *r,
    };
    let app = match App::from_spec(spec) {
        Ok(app) => app,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let summary = app.summary();
    tracing::info!(tenant = %app.tenant_id, client_id = %app.client_id, "app registered");
    state.lock().apps.insert((app.tenant_id.clone(), app.client_id.clone()), Arc::new(app));
    (StatusCode::CREATED, Json(summary)).into_response()
}

async fn list_apps(State(state): State<AppState>) -> Response {
    let inner = state.lock();
    let mut apps: Vec<_> = inner.apps.values().map(|a| a.summary()).collect();
    drop(inner);
    apps.sort_by_key(|a| serde_json::to_string(a).unwrap_or_default());
    Json(apps).into_response()
}

async fn delete_app(State(state): State<AppState>, Path((tenant, client)): Path<(String, String)>) -> Response {
    let key = (tenant.to_ascii_lowercase(), client.to_ascii_lowercase());
    match state.lock().apps.remove(&key) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => problem(StatusCode::NOT_FOUND, "no such app"),
    }
}

async fn add_fault(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    let spec: FaultSpec = match parse(&body) {
        Ok(spec) => spec,
        Err(r) => return *r,
    };
    if let Some(status) = spec.status
        && !(100..=599).contains(&status)
    {
        return problem(StatusCode::BAD_REQUEST, "status must be an HTTP status code");
    }
    if let Some(why) = spec.invalid() {
        return problem(StatusCode::BAD_REQUEST, why);
    }
    let fault = state.lock().faults.push(spec);
    tracing::info!(target_endpoint = ?fault.spec.target, status = ?fault.spec.status, count = ?fault.remaining, rate = ?fault.spec.rate, "fault added");
    (StatusCode::CREATED, Json(fault)).into_response()
}

async fn list_faults(State(state): State<AppState>) -> Response {
    Json(state.lock().faults.list()).into_response()
}

async fn clear_faults(State(state): State<AppState>) -> Response {
    state.lock().faults.clear();
    StatusCode::NO_CONTENT.into_response()
}

async fn messages(State(state): State<AppState>) -> Response {
    Json(state.lock().messages.clone()).into_response()
}

async fn clear_messages(State(state): State<AppState>) -> Response {
    state.lock().messages.clear();
    StatusCode::NO_CONTENT.into_response()
}

async fn token_requests(State(state): State<AppState>) -> Response {
    Json(state.lock().token_requests.clone()).into_response()
}

async fn issued_tokens(State(state): State<AppState>) -> Response {
    Json(state.lock().issued_tokens.clone()).into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IntrospectRequest {
    token: String,
    /// With `permission`: the mailbox to decide for (an SMTP peer passes the XOAUTH2 `user`).
    #[serde(default)]
    mailbox: Option<String>,
    /// With `mailbox`: the permission, e.g. `SMTP.SendAsApp`.
    #[serde(default)]
    permission: Option<String>,
}

/// Tells a test peer what the emulator knows of a token, and with `mailbox` and `permission`
/// whether Exchange would authorize it: a peer cannot see Exchange's role assignments itself.
async fn introspect(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    let request: IntrospectRequest = match parse(&body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let question = match (request.mailbox.as_deref(), request.permission.as_deref()) {
        (Some(mailbox), Some(permission)) => Some((mailbox, permission)),
        (None, None) => None,
        _ => return problem(StatusCode::BAD_REQUEST, "mailbox and permission go together"),
    };
    let mut body = match state.signer.verify_signature(&request.token) {
        Err(rejection) => json!({ "active": false, "reason": rejection.reason() }),
        Ok(claims) => describe_token(&claims),
    };
    if let Some((mailbox, permission)) = question {
        body["authorized"] = json!(is_authorized(&state, &request.token, mailbox, permission));
    }
    Json(body).into_response()
}

/// The introspection answer for a token whose signature verifies.
fn describe_token(claims: &AccessClaims) -> serde_json::Value {
    let now = clock::now_unix();
    let reason = if now >= claims.exp {
        Some("expired")
    } else if now < claims.nbf {
        Some("not_yet_valid")
    } else {
        None
    };
    json!({
        "active": reason.is_none(),
        "reason": reason,
        "clientId": claims.appid,
        "tenantId": claims.tid,
        "roles": claims.roles,
        "aud": claims.aud,
        "exp": claims.exp,
        "iat": claims.iat,
        "appidacr": claims.appidacr,
    })
}

/// Exchange's decision for an active token: `permission` in its `roles` (Entra consent), or
/// an `Application <permission>` assignment of its service principal covering `mailbox`.
/// Application access policies are left out: they govern Graph and EWS, not SMTP. The
/// audience is the caller's to check, as the answer's `aud` says it.
fn is_authorized(state: &AppState, token: &str, mailbox: &str, permission: &str) -> bool {
    let Ok(claims) = state.signer.verify(token, clock::now_unix()) else {
        return false;
    };
    claims.has_role(permission) || state.lock().rbac_grants(&claims.tid, &claims.oid, permission, mailbox)
}

async fn add_role_assignment(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    let spec: RoleAssignmentSpec = match parse(&body) {
        Ok(spec) => spec,
        Err(r) => return *r,
    };
    let assignment = match RoleAssignment::from_spec(spec) {
        Ok(a) => a,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e.to_string()),
    };
    tracing::info!(
        tenant = %assignment.tenant_id,
        service_principal = %assignment.service_principal_object_id,
        role = assignment.role.name(),
        scoped = assignment.mailboxes.is_some(),
        "role assignment added"
    );
    state.lock().role_assignments.push(assignment.clone());
    (StatusCode::CREATED, Json(assignment)).into_response()
}

async fn list_role_assignments(State(state): State<AppState>) -> Response {
    Json(state.lock().role_assignments.clone()).into_response()
}

async fn clear_role_assignments(State(state): State<AppState>) -> Response {
    state.lock().role_assignments.clear();
    StatusCode::NO_CONTENT.into_response()
}

async fn reset(State(state): State<AppState>) -> Response {
    state.lock().reset();
    tracing::info!("state reset");
    Json(json!({ "reset": true })).into_response()
}

async fn stats(State(state): State<AppState>) -> Response {
    let inner = state.lock();
    let mut body = serde_json::to_value(&inner.stats).unwrap_or_default();
    body["inFlightPerMailbox"] = json!(inner.in_flight);
    body["pendingFaults"] = json!(inner.faults.list().len());
    body["drafts"] = json!(inner.drafts.len());
    body["uploadSessions"] = json!(inner.uploads.len());
    Json(body).into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MailboxSpec {
    address: String,
    enabled_for_rest: bool,
}

async fn set_mailbox(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    let spec: MailboxSpec = match parse(&body) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let address = spec.address.trim().to_ascii_lowercase();
    let mut inner = state.lock();
    if spec.enabled_for_rest {
        inner.disabled_mailboxes.remove(&address);
    } else {
        inner.disabled_mailboxes.insert(address.clone());
    }
    Json(json!({ "address": address, "enabledForRest": spec.enabled_for_rest })).into_response()
}

async fn list_mailboxes(State(state): State<AppState>) -> Response {
    let disabled: Vec<_> =
        state.lock().disabled_mailboxes.iter().map(|a| json!({ "address": a, "enabledForRest": false })).collect();
    Json(disabled).into_response()
}

async fn health() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

#[cfg(test)]
mod tests {
    use super::admin_peer_allowed;

    #[test]
    fn the_admin_api_answers_this_host_only() {
        let ip = |s: &str| s.parse().expect("ip");
        assert!(admin_peer_allowed(ip("127.0.0.1"), ip("127.0.0.1")));
        assert!(admin_peer_allowed(ip("127.0.0.1"), ip("10.214.0.1")));
        // The host at the private address it listens on, but no Pod behind that address.
        assert!(admin_peer_allowed(ip("10.214.0.1"), ip("10.214.0.1")));
        assert!(!admin_peer_allowed(ip("10.214.0.7"), ip("10.214.0.1")));
        assert!(!admin_peer_allowed(ip("192.0.2.2"), ip("0.0.0.0")));
    }
}
