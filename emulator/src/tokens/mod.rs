//! Entra ID's token endpoint (`/{tenant}/oauth2/v2.0/token`, client credentials grant) and
//! the discovery documents beside it.

pub mod assertion;
pub mod errors;
pub mod request;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::apps::App;
use crate::clock;
use crate::cloud::Cloud;
use crate::faults::FaultTarget;
use crate::origin::request_origin;
use crate::records::{GrantKind, IssuedToken, TokenRequestRecord};
use crate::signing::AccessClaims;
use crate::state::AppState;
use assertion::VerifiedAssertion;
use errors::AadError;
use request::{Credential, Resource, TokenForm};

/// Routes of the authority host.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        .route("/{tenant}/v2.0/.well-known/openid-configuration", get(openid_configuration))
        .route("/{tenant}/discovery/v2.0/keys", get(keys))
}

/// What is known about a token request, success or not, for the record.
struct Attempt {
    client_id: Option<String>,
    grant: GrantKind,
    scope: Option<String>,
}

/// A token that was issued.
struct Issued {
    access_token: String,
    lifetime: u64,
}

async fn token(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    let correlation_id = headers
        .get("client-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let origin = request_origin(&headers, &uri, &state.settings.base_url);
    let mut attempt = Attempt { client_id: None, grant: GrantKind::None, scope: None };

    let fault = state.lock().faults.take(FaultTarget::Token, None);
    let mut outcome = Err(AadError::MissingCredential);
    let mut faulted = false;
    if let Some(fault) = fault {
        if let Some(ms) = fault.latency_ms {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if fault.drop_connection {
            tracing::info!(tenant = %tenant, outcome = "fault:dropped", "token request");
            let mut inner = state.lock();
            *inner.stats.token_requests.entry("fault:dropped".into()).or_insert(0) += 1;
            inner.token_requests.push(TokenRequestRecord {
                time: clock::now_rfc3339(),
                tenant: tenant.clone(),
                client_id: None,
                grant: attempt.grant,
                scope: None,
                outcome: "fault:dropped".into(),
                status: 0,
                expires_in: None,
            });
            return dropped_connection();
        }
        if let Some(status) = fault.error_status() {
            faulted = true;
            outcome = Err(AadError::Fault {
                status,
                retry_after: fault.retry_after_seconds,
                code: fault.code.as_deref().and_then(|c| c.trim_start_matches("AADSTS").parse().ok()),
                message: fault.message.clone(),
            });
        }
    }
    if !faulted {
        outcome = issue(&state, &tenant, &origin, &headers, &body, &mut attempt);
    }

    let (status, label, expires_in) = match &outcome {
        Ok(issued) => (200, "success".to_string(), Some(issued.lifetime)),
        Err(e) => (e.status().as_u16(), e.outcome(), None),
    };
    tracing::info!(
        tenant = %tenant,
        client_id = %attempt.client_id.as_deref().unwrap_or("-"),
        grant = ?attempt.grant,
        outcome = %label,
        "token request"
    );
    {
        let mut inner = state.lock();
        *inner.stats.token_requests.entry(label.clone()).or_insert(0) += 1;
        inner.token_requests.push(TokenRequestRecord {
            time: clock::now_rfc3339(),
            tenant: tenant.clone(),
            client_id: attempt.client_id.clone(),
            grant: attempt.grant,
            scope: attempt.scope.clone(),
            outcome: label,
            status,
            expires_in,
        });
        if let Ok(issued) = &outcome {
            inner.issued_tokens.push(IssuedToken {
                time: clock::now_rfc3339(),
                tenant: tenant.clone(),
                client_id: attempt.client_id.clone(),
                scope: attempt.scope.clone(),
                access_token: issued.access_token.clone(),
            });
        }
    }

    let mut response = match outcome {
        Ok(issued) => {
            let body = serde_json::json!({
                "token_type": "Bearer",
                "expires_in": issued.lifetime,
                "ext_expires_in": issued.lifetime,
                "access_token": issued.access_token,
            });
            let mut r = axum::Json(body).into_response();
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store, no-cache"));
            r.headers_mut().insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
            r
        }
        Err(e) => e.into_response_with(&origin, &correlation_id),
    };
    if let Ok(v) = HeaderValue::from_str(&correlation_id) {
        response.headers_mut().insert("client-request-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()) {
        response.headers_mut().insert("x-ms-request-id", v);
    }
    response
}

/// Runs Entra ID's checks in its order and signs a token when they pass.
fn issue(
    state: &AppState,
    tenant: &str,
    origin: &str,
    headers: &HeaderMap,
    body: &[u8],
    attempt: &mut Attempt,
) -> Result<Issued, AadError> {
    let tenant_key = tenant.to_ascii_lowercase();
    // An unknown tenant is reported before anything about the body.
    let form = TokenForm::parse(body).map_err(|e| {
        if state.lock().tenant_exists(&tenant_key) { e } else { AadError::TenantNotFound(tenant.to_string()) }
    })?;
    let basic = request::basic_credentials(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()));
    attempt.client_id = form.get("client_id").map(str::to_string).or_else(|| basic.as_ref().map(|(id, _)| id.clone()));
    attempt.scope = form.get("scope").map(str::to_string);
    attempt.grant = match (form.get("client_secret").is_some() || basic.is_some(), form.get("client_assertion")) {
        (_, Some(_)) => GrantKind::Certificate,
        (true, None) => GrantKind::Secret,
        _ => GrantKind::None,
    };
    if !state.lock().tenant_exists(&tenant_key) {
        return Err(AadError::TenantNotFound(tenant.to_string()));
    }

    match form.get("grant_type") {
        None => return Err(AadError::MissingParameter("grant_type")),
        Some("client_credentials") => {}
        Some(other) => return Err(AadError::UnsupportedGrantType(other.to_string())),
    }
    let client_id = attempt.client_id.clone().ok_or(AadError::MissingParameter("client_id"))?;
    let app = state
        .lock()
        .app(&tenant_key, &client_id)
        .ok_or_else(|| AadError::ApplicationNotFound { client: client_id.clone(), tenant: tenant.to_string() })?;
    let scope = attempt.scope.clone().ok_or(AadError::MissingParameter("scope"))?;
    let resource = request::parse_scope(&scope, tenant, state.settings.cloud)?;

    let now = clock::now_unix();
    let appidacr = match request::credential(&form, basic.map(|(_, secret)| secret))? {
        Credential::Secret(secret) => {
            if !app.secrets.iter().any(|s| s == &secret) {
                return Err(AadError::InvalidSecret { client: app.client_id.clone() });
            }
            "1"
        }
        Credential::Assertion(jwt) => {
            let token_urls =
                [format!("{origin}/{tenant}/oauth2/v2.0/token"), format!("{origin}/{tenant}/oauth2/token")];
            if assertion::is_federated(&jwt, &app.client_id) {
                attempt.grant = GrantKind::Federated;
            }
            let verified = assertion::verify(&jwt, &app, &token_urls, now)?;
            if let VerifiedAssertion::Certificate { jti, exp } = verified
                && !state.lock().use_jti(&app.client_id, &jti, exp, now)
            {
                return Err(AadError::AssertionReplayed);
            }
            "2"
        }
    };

    let lifetime = app.token_lifetime_seconds.unwrap_or(state.settings.default_token_lifetime);
    let claims = access_claims(&app, state.settings.cloud, resource, appidacr, now, lifetime);
    let access_token = state.signer.sign(&claims).map_err(|e| AadError::Fault {
        status: 500,
        retry_after: None,
        code: None,
        message: Some(format!("signing failed: {e}")),
    })?;
    Ok(Issued { access_token, lifetime })
}

/// Entra's v1 app-only claims. `roles` carries only what was consented in Entra: grants made in
/// Exchange Online (RBAC for Applications) never reach the token.
fn access_claims(
    app: &Arc<App>,
    cloud: Cloud,
    resource: Resource,
    appidacr: &str,
    now: i64,
    lifetime: u64,
) -> AccessClaims {
    let issuer = format!("{}/{}/", cloud.v1_issuer_host(), app.tenant_id);
    AccessClaims {
        aud: resource.audience(cloud).to_string(),
        iss: issuer.clone(),
        iat: now,
        nbf: now,
        exp: now + i64::try_from(lifetime).unwrap_or(i64::MAX / 2),
        appid: app.client_id.clone(),
        appidacr: appidacr.to_string(),
        idp: issuer,
        idtyp: "app".into(),
        oid: app.object_id.clone(),
        roles: app.roles.clone(),
        sub: app.object_id.clone(),
        tid: app.tenant_id.clone(),
        uti: uuid::Uuid::new_v4().simple().to_string(),
        ver: "1.0".into(),
    }
}

async fn openid_configuration(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let origin = request_origin(&headers, &uri, &state.settings.base_url);
    axum::Json(serde_json::json!({
        "issuer": format!("{origin}/{tenant}/v2.0"),
        "token_endpoint": format!("{origin}/{tenant}/oauth2/v2.0/token"),
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
        "jwks_uri": format!("{origin}/{tenant}/discovery/v2.0/keys"),
        "response_types_supported": ["token"],
        "grant_types_supported": ["client_credentials"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "tenant_region_scope": "WW",
    }))
    .into_response()
}

async fn keys(State(state): State<AppState>) -> Response {
    axum::Json(serde_json::json!({ "keys": [state.signer.jwk()] })).into_response()
}

/// A response whose body fails before its first byte: the server closes the connection, and
/// the client sees it end without a complete answer, as when a proxy or load balancer drops it.
fn dropped_connection() -> Response {
    let failing = futures::stream::once(async {
        Err::<axum::body::Bytes, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "injected fault: connection dropped",
        ))
    });
    axum::body::Body::from_stream(failing).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apps::AppSpec;

    fn app() -> Arc<App> {
        let spec: AppSpec =
            serde_json::from_value(serde_json::json!({"tenantId": "t1", "clientId": "c1"})).expect("spec");
        Arc::new(App::from_spec(spec).expect("app"))
    }

    #[test]
    fn claims_name_the_cloud_resource_and_issuer() {
        let app = app();
        let public = access_claims(&app, Cloud::Public, Resource::Graph, "1", 100, 60);
        assert_eq!(
            (public.aud.as_str(), public.iss.as_str()),
            ("https://graph.microsoft.com", "https://sts.windows.net/t1/")
        );
        let gov = access_claims(&app, Cloud::USGovernment, Resource::Outlook, "1", 100, 60);
        assert_eq!(gov.aud, "https://outlook.office365.us");
        let china = access_claims(&app, Cloud::China, Resource::Graph, "2", 100, 60);
        assert_eq!(china.aud, "https://microsoftgraph.chinacloudapi.cn");
        assert_eq!(china.iss, "https://sts.chinacloudapi.cn/t1/");
        assert_eq!((china.oid.as_str(), china.exp), (app.object_id.as_str(), 160));
    }
}
