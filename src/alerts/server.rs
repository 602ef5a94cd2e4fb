//! The HTTP endpoint: authenticate → read → validate → decide (retry or not) → render → create.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ListParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::AlertError;
use super::auth::{bearer_token, stored_token, token_matches};
use super::payload::{self, MAX_PAYLOAD_BYTES, Notification};
use super::render::{self, RenderedMail, RouteName, Templates};
use super::route::{self, Earlier, NOTIFICATION_LABEL, Occurrence, ROUTE_LABEL};
use crate::api::{AlertRoute, EmailMessage};

/// Requests handled at once; more get 503, which Alertmanager retries.
const MAX_IN_FLIGHT: usize = 16;
/// How long a client may take to send its body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// The field manager of the messages created.
const FIELD_MANAGER: &str = "mailroom-alerts";

/// Settings of the receiver.
#[derive(Clone, Debug, Default)]
pub struct AlertsConfig {
    /// Serve only routes in this namespace (the operator's `--namespace`).
    pub namespace: Option<String>,
    /// This process's name in Events (the pod name).
    pub instance: String,
}

/// The receiver's shared state.
pub struct AlertReceiver {
    client: Client,
    config: AlertsConfig,
    recorder: Recorder,
    in_flight: Semaphore,
}

/// The templates a route asks for.
enum TemplateChoice {
    /// It names none.
    Defaults,
    /// Its ConfigMap's.
    Route(Templates),
    /// It names a ConfigMap that is missing or empty: why.
    Unusable(String),
}

/// What became of an accepted notification.
#[derive(Debug)]
enum Accepted {
    /// A new message.
    Created(String),
    /// A retry of a notification that already has its message.
    AlreadyCreated(String),
}

impl AlertReceiver {
    /// A receiver that creates messages with this client.
    pub fn new(client: Client, config: AlertsConfig) -> AlertReceiver {
        let reporter = Reporter {
            controller: crate::controller::message::REPORTING_CONTROLLER.into(),
            instance: Some(config.instance.clone()),
        };
        let recorder = Recorder::new(client.clone(), reporter);
        AlertReceiver { client, config, recorder, in_flight: Semaphore::new(MAX_IN_FLIGHT) }
    }

    /// The pipeline: authenticate → read → retry or not → render → create.
    async fn handle(&self, ns: &str, name: &str, headers: &HeaderMap, body: Body) -> Result<Accepted, AlertError> {
        let _permit = self.in_flight.try_acquire().map_err(|_| AlertError::Busy)?;
        let route = self.authorized_route(ns, name, headers).await?;
        let notification = read_notification(headers, body).await?;
        let message_name = match self.occurrence(ns, &route, &notification).await? {
            Occurrence::Retry(existing) => return Ok(Accepted::AlreadyCreated(existing)),
            Occurrence::Create(n) => n,
        };
        let (mail, template_error) = self.render(ns, &route, &notification).await?;
        let message =
            route::email_message(ns, name, &route.spec, &notification, &message_name, mail, template_error.as_deref());
        let messages: Api<EmailMessage> = Api::namespaced(self.client.clone(), ns);
        let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        match messages.create(&params, &message).await {
            Ok(_) => {
                let note = summary(&notification, &message_name);
                self.event(&route, EventType::Normal, "MessageCreated", &note).await;
                Ok(Accepted::Created(message_name))
            }
            // Another copy of the same notification got there first.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Accepted::AlreadyCreated(message_name)),
            Err(kube::Error::Api(s)) if s.code == 400 || s.code == 422 => Err(AlertError::Refused(s.message.clone())),
            Err(e) => Err(e.into()),
        }
    }

    /// The route, once the caller has shown its token.
    async fn authorized_route(&self, ns: &str, name: &str, headers: &HeaderMap) -> Result<AlertRoute, AlertError> {
        let qualified = format!("{ns}/{name}");
        if !is_object_name(ns) || !is_object_name(name) {
            return Err(AlertError::RouteNotFound(qualified));
        }
        if self.config.namespace.as_deref().is_some_and(|served| served != ns) {
            return Err(AlertError::NamespaceNotServed(ns.to_string()));
        }
        // Anonymous requests are turned away before any call to the API server.
        let presented = bearer_token(headers).ok_or(AlertError::Unauthorized)?;
        let routes: Api<AlertRoute> = Api::namespaced(self.client.clone(), ns);
        let route = routes.get_opt(name).await?.ok_or(AlertError::RouteNotFound(qualified))?;
        self.authenticate(ns, &route, presented).await?;
        Ok(route)
    }

    /// Whether the notification is a retry of one that already has its message.
    async fn occurrence(&self, ns: &str, route: &AlertRoute, n: &Notification) -> Result<Occurrence, AlertError> {
        let (name, key) = (route.name_any(), n.key());
        let messages: Api<EmailMessage> = Api::namespaced(self.client.clone(), ns);
        let selector = format!("{ROUTE_LABEL}={name},{NOTIFICATION_LABEL}={key}");
        let earlier: Vec<Earlier> = messages
            .list_metadata(&ListParams::default().labels(&selector))
            .await?
            .items
            .into_iter()
            .map(|m| Earlier { name: m.name_any(), created: m.metadata.creation_timestamp.map(|t| t.0) })
            .collect();
        let window = SignedDuration::from_secs(route.spec.retry_window_seconds());
        Ok(route::occurrence(&name, &key, &earlier, Timestamp::now(), window))
    }

    /// The email, with the route's templates or, when they cannot be used, the defaults and why.
    async fn render(
        &self,
        ns: &str,
        route: &AlertRoute,
        n: &Notification,
    ) -> Result<(RenderedMail, Option<String>), AlertError> {
        let who = RouteName { namespace: ns.to_string(), name: route.name_any() };
        let (mail, template_error) = match self.templates(ns, route).await? {
            TemplateChoice::Defaults => (render::render(n, &who, None)?.mail, None),
            TemplateChoice::Route(custom) => {
                let r = render::render(n, &who, Some(&custom))?;
                (r.mail, r.template_error.map(|e| e.to_string()))
            }
            TemplateChoice::Unusable(why) => (render::render(n, &who, None)?.mail, Some(why)),
        };
        if let Some(reason) = &template_error {
            warn!(route = %format!("{ns}/{}", who.name), reason = %reason, "the route's template cannot be used; the default is");
            let note = format!("{reason}; the default template was used");
            self.event(route, EventType::Warning, "TemplateFailed", &note).await;
        }
        Ok((mail, template_error))
    }

    /// Compares the presented token with the one in the route's Secret.
    async fn authenticate(&self, ns: &str, route: &AlertRoute, presented: &[u8]) -> Result<(), AlertError> {
        let sel = &route.spec.token_secret_ref;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let secret = secrets
            .get_opt(&sel.name)
            .await?
            .ok_or_else(|| AlertError::TokenUnavailable(format!("Secret {ns}/{} not found", sel.name)))?;
        let data =
            secret.data.as_ref().and_then(|d| d.get(&sel.key)).ok_or_else(|| {
                AlertError::TokenUnavailable(format!("Secret {ns}/{} has no key {}", sel.name, sel.key))
            })?;
        let expected = stored_token(&data.0);
        if expected.is_empty() {
            return Err(AlertError::TokenUnavailable(format!("key {} of Secret {ns}/{} is empty", sel.key, sel.name)));
        }
        if token_matches(presented, expected) { Ok(()) } else { Err(AlertError::Unauthorized) }
    }

    /// Which templates the route asks for, and whether they can be had.
    async fn templates(&self, ns: &str, route: &AlertRoute) -> Result<TemplateChoice, AlertError> {
        let Some(r) = &route.spec.template_ref else {
            return Ok(TemplateChoice::Defaults);
        };
        let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let Some(cm) = config_maps.get_opt(&r.name).await? else {
            return Ok(TemplateChoice::Unusable(format!("the template ConfigMap {ns}/{} was not found", r.name)));
        };
        let templates = Templates::from_config_map(&cm.data.unwrap_or_default());
        if templates.is_empty() {
            let keys = render::TEMPLATE_KEYS.join(", ");
            let why = format!("the template ConfigMap {ns}/{} has none of the keys {keys}", r.name);
            return Ok(TemplateChoice::Unusable(why));
        }
        Ok(TemplateChoice::Route(templates))
    }

    async fn event(&self, route: &AlertRoute, type_: EventType, reason: &str, note: &str) {
        // The API server refuses an Event note over 1 KiB: cut in bytes, not characters.
        let note = crate::text::prefix(note, crate::controller::message::MAX_NOTE).to_string();
        let ev = Event { type_, reason: reason.into(), note: Some(note), action: "Receive".into(), secondary: None };
        if let Err(e) = self.recorder.publish(&ev, &route.object_ref(&())).await {
            warn!(route = %route.name_any(), error = %e, "could not publish event");
        }
    }
}

/// The Event note of a created message.
fn summary(n: &Notification, message: &str) -> String {
    format!(
        "{} notification with {} alert(s) from receiver {:?}: EmailMessage {message}",
        n.status,
        n.alerts.len(),
        n.receiver
    )
}

/// Whether a path segment can name a namespace or an object (a DNS subdomain).
fn is_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// The notification in the body: no larger than the limit, in time, valid.
async fn read_notification(headers: &HeaderMap, body: Body) -> Result<Notification, AlertError> {
    // A declared length over the limit is refused without reading; a body that grows past it
    // while being read is refused there.
    if declared_length(headers).is_some_and(|n| n > MAX_PAYLOAD_BYTES as u64) {
        return Err(AlertError::TooLarge);
    }
    let body = read_body(body, MAX_PAYLOAD_BYTES, BODY_TIMEOUT).await?;
    Ok(payload::parse(&body)?)
}

/// The Content-Length the client declared.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Reads the body up to `limit` bytes within `timeout`.
async fn read_body(body: Body, limit: usize, timeout: Duration) -> Result<Vec<u8>, AlertError> {
    let read = async {
        let mut out = Vec::new();
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| AlertError::Body(e.to_string()))?;
            if out.len() + chunk.len() > limit {
                return Err(AlertError::TooLarge);
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| AlertError::Timeout(timeout.as_secs()))?
}

async fn receive(
    State(rx): State<Arc<AlertReceiver>>,
    Path((namespace, route)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match rx.handle(&namespace, &route, &headers, body).await {
        Ok(Accepted::Created(name)) => {
            info!(route = %format!("{namespace}/{route}"), email_message = %name, "notification received; EmailMessage created");
            (StatusCode::CREATED, format!("created EmailMessage {namespace}/{name}\n")).into_response()
        }
        Ok(Accepted::AlreadyCreated(name)) => {
            info!(route = %format!("{namespace}/{route}"), email_message = %name, "notification received again; nothing created");
            (StatusCode::OK, format!("already received: EmailMessage {namespace}/{name}\n")).into_response()
        }
        Err(e) => {
            let status = e.status();
            warn!(route = %format!("{namespace}/{route}"), status = status.as_u16(), reason = %e, "notification refused");
            let mut resp = (status, format!("{e}\n")).into_response();
            if status == StatusCode::UNAUTHORIZED {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            resp
        }
    }
}

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "POST Alertmanager webhooks to /alerts/{namespace}/{alertroute}\n")
}

/// The receiver's routes.
pub fn router(rx: Arc<AlertReceiver>) -> Router {
    Router::new().route("/alerts/{namespace}/{route}", post(receive)).fallback(not_found).with_state(rx)
}

/// Binds the receiver (port 0 picks a free port) and serves it in the background; returns the
/// bound address.
pub async fn serve(addr: SocketAddr, client: Client, config: AlertsConfig) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(Arc::new(AlertReceiver::new(client, config)));
    tokio::spawn(async move { axum::serve(listener, app).await });
    info!(alerts_addr = %bound, "serving Alertmanager webhooks on POST /alerts/{{namespace}}/{{alertroute}}");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_must_be_object_names() {
        for ok in ["monitoring", "platform", "team-a.alerts", "a", "0x"] {
            assert!(is_object_name(ok), "{ok}");
        }
        for bad in ["", "Platform", "-a", "a-", "a_b", "a b", "..", &"a".repeat(254)] {
            assert!(!is_object_name(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_refused_while_reading() {
        let small = read_body(Body::from("{}"), 10, BODY_TIMEOUT).await.unwrap();
        assert_eq!(small, b"{}");
        let big = read_body(Body::from(vec![b'x'; 11]), 10, BODY_TIMEOUT).await;
        assert!(matches!(big, Err(AlertError::TooLarge)));
    }
}
