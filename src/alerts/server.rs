//! The HTTP endpoint: authenticate → read → validate → decide (retry or not) → render → create,
//! for every source a route may name; each outcome is tallied for the route's status.

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
use super::auth::{self, bearer_token, stored_token, token_matches};
use super::incoming::{self, Incoming};
use super::payload::MAX_PAYLOAD_BYTES;
use super::render::{self, RenderedMail, RouteName, Templates};
use super::route::{self, Content, Earlier, NOTIFICATION_LABEL, Occurrence, ROUTE_LABEL};
use super::status::{Outcome, Tallies};
use super::tls::ReceiverTls;
use crate::api::{AlertRoute, AlertSource, EmailMessage};
use crate::serving_cert::{self, ServingCert};

/// Requests handled at once; more get 503, which Alertmanager retries.
const MAX_IN_FLIGHT: usize = 16;
/// How long a client may take to send its body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// How the certificate's log lines name the receiver.
const CERT_WHAT: &str = "notification receiver";
/// The field manager of the messages created.
const FIELD_MANAGER: &str = "mailroom-alerts";

/// Settings of the receiver.
#[derive(Clone, Debug, Default)]
pub struct AlertsConfig {
    /// Serve only routes in this namespace (the operator's `--namespace`).
    pub namespace: Option<String>,
    /// This process's name in Events (the pod name).
    pub instance: String,
    /// The receiver's address as senders reach it (`--alerts-url`), for the routes' `status.url`.
    pub public_url: Option<String>,
}

/// The receiver's shared state.
pub struct AlertReceiver {
    client: Client,
    config: AlertsConfig,
    recorder: Recorder,
    in_flight: Semaphore,
    tallies: Arc<Tallies>,
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
    pub fn new(client: Client, config: AlertsConfig, tallies: Arc<Tallies>) -> AlertReceiver {
        let reporter = Reporter {
            controller: crate::controller::message::REPORTING_CONTROLLER.into(),
            instance: Some(config.instance.clone()),
        };
        let recorder = Recorder::new(client.clone(), reporter);
        AlertReceiver { client, config, recorder, in_flight: Semaphore::new(MAX_IN_FLIGHT), tallies }
    }

    /// The pipeline: authenticate → read → retry or not → render → create.
    async fn handle(&self, ns: &str, name: &str, headers: &HeaderMap, body: Body) -> Result<Accepted, AlertError> {
        let _permit = self.in_flight.try_acquire().map_err(|_| AlertError::Busy)?;
        let route = self.found_route(ns, name, headers).await?;
        // The body is read before the credential is checked: a signature covers it.
        let body = read_limited(headers, body).await?;
        self.authenticate(ns, &route, headers, &body).await?;
        let source = route.spec.source();
        let incoming = incoming::parse(source, headers, &body)?;
        let message_name = match self.occurrence(ns, &route, &incoming).await? {
            Occurrence::Retry(existing) => return Ok(Accepted::AlreadyCreated(existing)),
            Occurrence::Create(n) => n,
        };
        let (content, template_error) = match &route.spec.email_template_ref {
            Some(t) => (Content::EmailTemplate(t.name.clone()), None),
            None => {
                let (mail, error) = self.render(ns, &route, &incoming).await?;
                (Content::Rendered(mail), error)
            }
        };
        let message =
            route::email_message(ns, name, &route.spec, &incoming, &message_name, content, template_error.as_deref());
        let messages: Api<EmailMessage> = Api::namespaced(self.client.clone(), ns);
        let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        match messages.create(&params, &message).await {
            Ok(_) => {
                let note = format!("{}: EmailMessage {message_name}", incoming.summary);
                self.event(&route, EventType::Normal, "MessageCreated", &note).await;
                Ok(Accepted::Created(message_name))
            }
            // Another copy of the same notification got there first.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Accepted::AlreadyCreated(message_name)),
            Err(kube::Error::Api(s)) if s.code == 400 || s.code == 422 => Err(AlertError::Refused(s.message.clone())),
            Err(e) => Err(e.into()),
        }
    }

    /// The route, once the request shows it carries a credential.
    async fn found_route(&self, ns: &str, name: &str, headers: &HeaderMap) -> Result<AlertRoute, AlertError> {
        let qualified = format!("{ns}/{name}");
        if !is_object_name(ns) || !is_object_name(name) {
            return Err(AlertError::RouteNotFound(qualified));
        }
        if self.config.namespace.as_deref().is_some_and(|served| served != ns) {
            return Err(AlertError::NamespaceNotServed(ns.to_string()));
        }
        // Anonymous requests (no bearer token, no signature header) are turned away before any
        // call to the API server.
        if bearer_token(headers).is_none() && !has_signature_header(headers) {
            return Err(AlertError::Unauthorized);
        }
        let routes: Api<AlertRoute> = Api::namespaced(self.client.clone(), ns);
        routes.get_opt(name).await?.ok_or(AlertError::RouteNotFound(qualified))
    }

    /// Whether the notification is a retry of one that already has its message.
    async fn occurrence(&self, ns: &str, route: &AlertRoute, n: &Incoming) -> Result<Occurrence, AlertError> {
        let (name, key) = (route.name_any(), n.key.clone());
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
        Ok(route::occurrence(n.source, n.repeats, &name, &key, &earlier, Timestamp::now(), window))
    }

    /// The email, with the route's templates or, when they cannot be used, the defaults and why.
    async fn render(
        &self,
        ns: &str,
        route: &AlertRoute,
        n: &Incoming,
    ) -> Result<(RenderedMail, Option<String>), AlertError> {
        let who = RouteName { namespace: ns.to_string(), name: route.name_any() };
        let draw = |custom: Option<&Templates>| render::render_context(n.context.clone(), &n.defaults, &who, custom);
        let (mail, template_error) = match self.templates(ns, route).await? {
            TemplateChoice::Defaults => (draw(None)?.mail, None),
            TemplateChoice::Route(custom) => {
                let r = draw(Some(&custom))?;
                (r.mail, r.template_error.map(|e| e.to_string()))
            }
            TemplateChoice::Unusable(why) => (draw(None)?.mail, Some(why)),
        };
        if let Some(reason) = &template_error {
            warn!(route = %format!("{ns}/{}", who.name), reason = %reason, "the route's template cannot be used; the default is");
            let note = format!("{reason}; the default template was used");
            self.event(route, EventType::Warning, "TemplateFailed", &note).await;
        }
        Ok((mail, template_error))
    }

    /// Checks the request's credential against the route's Secret, as its source presents it.
    async fn authenticate(
        &self,
        ns: &str,
        route: &AlertRoute,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(), AlertError> {
        let key = self.route_key(ns, route).await?;
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let signed = match route.spec.source() {
            AlertSource::Flux => header(auth::FLUX_SIGNATURE_HEADER).map(|v| auth::verify_flux(v, body, &key)),
            AlertSource::Grafana => {
                let settings = route.spec.signature.as_ref();
                let name = settings.and_then(|s| s.header.as_deref()).unwrap_or(auth::GRAFANA_SIGNATURE_HEADER);
                let timestamp = settings.and_then(|s| s.timestamp_header.as_deref()).map(|t| (t, header(t)));
                match header(name) {
                    Some(v) => Some(auth::verify_grafana(name, v, timestamp, body, &key, Timestamp::now())),
                    // A route that declares its signature accepts nothing else.
                    None if settings.is_some() => return Err(AlertError::Unauthorized),
                    None => None,
                }
            }
            AlertSource::Alertmanager | AlertSource::Argocd => None,
        };
        match signed {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(AlertError::BadSignature(e)),
            None => match bearer_token(headers) {
                Some(presented) if token_matches(presented, &key) => Ok(()),
                _ => Err(AlertError::Unauthorized),
            },
        }
    }

    /// The route's credential, from its Secret.
    async fn route_key(&self, ns: &str, route: &AlertRoute) -> Result<Vec<u8>, AlertError> {
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
        Ok(expected.to_vec())
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

/// Whether the request carries a signature header (Flux's `X-Signature`, Grafana's
/// `X-Grafana-Alerting-Signature` or a contact point's own `...-Signature`).
fn has_signature_header(headers: &HeaderMap) -> bool {
    headers.keys().any(|k| k.as_str().ends_with("-signature"))
}

/// Whether a path segment can name a namespace or an object (a DNS subdomain).
fn is_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// The body: no larger than the limit, in time.
async fn read_limited(headers: &HeaderMap, body: Body) -> Result<Vec<u8>, AlertError> {
    // A declared length over the limit is refused without reading; a body that grows past it
    // while being read is refused there.
    if declared_length(headers).is_some_and(|n| n > MAX_PAYLOAD_BYTES as u64) {
        return Err(AlertError::TooLarge);
    }
    read_body(body, MAX_PAYLOAD_BYTES, BODY_TIMEOUT).await
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
    let answer = rx.handle(&namespace, &route, &headers, body).await;
    let outcome = match &answer {
        Ok(Accepted::Created(name)) => Some(Outcome::Created(name.clone())),
        Ok(Accepted::AlreadyCreated(name)) => Some(Outcome::AlreadyCreated(name.clone())),
        // Nothing to count on a route that does not exist or is not served.
        Err(AlertError::RouteNotFound(_) | AlertError::NamespaceNotServed(_)) => None,
        Err(e) => Some(Outcome::Rejected(e.status().as_u16(), e.to_string())),
    };
    if let Some(o) = outcome {
        rx.tallies.record(&namespace, &route, &o);
    }
    match answer {
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
            if status == StatusCode::UNAUTHORIZED && matches!(e, AlertError::Unauthorized) {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            resp
        }
    }
}

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "POST notifications to /alerts/{namespace}/{alertroute}\n")
}

/// The receiver's routes.
pub fn router(rx: Arc<AlertReceiver>) -> Router {
    Router::new().route("/alerts/{namespace}/{route}", post(receive)).fallback(not_found).with_state(rx)
}

/// Binds the receiver (port 0 picks a free port) and serves it in the background, over HTTPS
/// with the certificate of the Secret `tls` names (watched, and swapped in when it changes) or
/// over plain HTTP when `tls` says so; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    client: Client,
    config: AlertsConfig,
    tls: &ReceiverTls,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let tallies = Arc::new(Tallies::default());
    let status =
        super::status::run(client.clone(), config.namespace.clone(), config.public_url.clone(), tallies.clone());
    tokio::spawn(status);
    let app = router(Arc::new(AlertReceiver::new(client.clone(), config, tallies)));
    match tls {
        ReceiverTls::Secret { namespace, name } => {
            let cert = Arc::new(ServingCert::default());
            let watch = serving_cert::watch(client, namespace.clone(), name.clone(), cert.clone(), CERT_WHAT);
            tokio::spawn(watch);
            tokio::spawn(super::tls::serve_https(listener, app, cert));
            info!(alerts_addr = %bound, tls_secret = %format!("{namespace}/{name}"), "serving notifications over HTTPS on POST /alerts/{{namespace}}/{{alertroute}}");
        }
        ReceiverTls::InsecureHttp => {
            tokio::spawn(async move { axum::serve(listener, app).await });
            warn!(alerts_addr = %bound, "serving notifications over plain HTTP (--alerts-insecure-http) on POST /alerts/{{namespace}}/{{alertroute}}");
        }
    }
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

    #[test]
    fn signature_headers_count_as_credentials() {
        let mut h = HeaderMap::new();
        assert!(!has_signature_header(&h));
        h.insert("x-signature", HeaderValue::from_static("sha256=00"));
        assert!(has_signature_header(&h));
        let mut g = HeaderMap::new();
        g.insert("X-Grafana-Alerting-Signature", HeaderValue::from_static("00"));
        assert!(has_signature_header(&g));
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_refused_while_reading() {
        let small = read_body(Body::from("{}"), 10, BODY_TIMEOUT).await.unwrap();
        assert_eq!(small, b"{}");
        let big = read_body(Body::from(vec![b'x'; 11]), 10, BODY_TIMEOUT).await;
        assert!(matches!(big, Err(AlertError::TooLarge)));
    }
}
