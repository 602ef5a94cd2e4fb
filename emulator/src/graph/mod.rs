//! Microsoft Graph mail sending: sendMail, drafts, upload sessions; and the gate every Graph
//! request passes (request ids, bearer token, mailbox concurrency, injected faults).

pub mod auth;
pub mod drafts;
pub mod errors;
pub mod message;
pub mod mime;
pub mod send_mail;
pub mod upload;

use std::collections::HashMap;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{post, put};

use crate::faults::FaultTarget;
use crate::origin::request_origin;
use crate::state::AppState;
use crate::throttle;
use errors::{GraphError, RequestIds};

/// Graph routes, behind the gate.
pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/v1.0/users/{sender}/sendMail", post(send_mail::send_mail))
        .route("/v1.0/users/{sender}/messages", post(drafts::create))
        .route("/v1.0/users/{sender}/messages/{id}/attachments", post(drafts::add_attachment))
        .route("/v1.0/users/{sender}/messages/{id}/attachments/createUploadSession", post(upload::create_session))
        .route("/v1.0/users/{sender}/messages/{id}/send", post(drafts::send))
        .route("/_upload/{session}", put(upload::put_fragment).delete(upload::cancel))
        .route_layer(middleware::from_fn_with_state(state, gate))
}

/// Runs before every Graph handler and renders every Graph answer.
async fn gate(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    mut request: Request,
    next: Next,
) -> Response {
    let ids = RequestIds {
        request_id: uuid::Uuid::new_v4().to_string(),
        client_request_id: request.headers().get("client-request-id").and_then(|v| v.to_str().ok()).map(str::to_string),
    };
    let authority = request_origin(request.headers(), request.uri(), &state.settings.base_url);
    let response = match admit(&state, &params, &mut request).await {
        Ok(guard) => {
            request.extensions_mut().insert(ids.clone());
            let response = next.run(request).await;
            drop(guard);
            response
        }
        Err(e) => e.render(&ids, &authority),
    };
    finish(&state, response, &ids, &authority)
}

/// Authentication, the concurrency limit and faults, in that order. Returns the in-flight
/// guard to hold while the handler runs.
async fn admit(
    state: &AppState,
    params: &HashMap<String, String>,
    request: &mut Request,
) -> Result<Option<throttle::InFlightGuard>, GraphError> {
    let (mailbox, guard) = if let Some(session) = params.get("session") {
        // Upload URLs carry no token (the URL is the credential) and are not counted
        // against the mailbox's concurrency.
        let mailbox = state.lock().uploads.get(session).map(|s| s.mailbox.clone());
        (mailbox, None)
    } else {
        let caller = auth::authenticate(state, request.headers())?;
        request.extensions_mut().insert(caller);
        let mailbox = params.get("sender").map(|s| s.to_ascii_lowercase()).unwrap_or_default();
        let guard = throttle::enter(state, &mailbox)
            .ok_or_else(|| GraphError::mailbox_concurrency(state.settings.throttle_retry_after))?;
        (Some(mailbox), Some(guard))
    };
    let fault = state.lock().faults.take(FaultTarget::Graph, mailbox.as_deref());
    if let Some(fault) = fault {
        if let Some(ms) = fault.latency_ms {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if let Some(status) = fault.error_status() {
            return Err(GraphError::fault(status, fault.retry_after_seconds, fault.code, fault.message));
        }
    }
    Ok(guard)
}

/// Renders a carried error, adds the id headers, and counts the answer.
fn finish(state: &AppState, response: Response, ids: &RequestIds, authority: &str) -> Response {
    let mut response = match response.extensions().get::<GraphError>().cloned() {
        Some(error) => error.render(ids, authority),
        None => response,
    };
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&ids.request_id) {
        headers.insert("request-id", v);
    }
    let client_id = ids.client_request_id.as_deref().unwrap_or(&ids.request_id);
    if let Ok(v) = HeaderValue::from_str(client_id) {
        headers.insert("client-request-id", v);
    }
    let status = response.status().as_u16().to_string();
    *state.lock().stats.graph_requests.entry(status).or_insert(0) += 1;
    response
}
