//! The notification receiver: `POST /alerts/{namespace}/{route}` turns each notification of the
//! route's source (Alertmanager, Flux, Argo CD, Grafana) into one EmailMessage, as the AlertRoute
//! declares.
//!
//! `payload` (Alertmanager, Grafana), `flux` and `argocd` read and validate each source's JSON;
//! `incoming` reduces them to one shape and names them; `auth` checks the bearer token or the
//! signature; `render` makes the email; `route` decides retry or repeat and builds the
//! EmailMessage; `server` is the HTTP endpoint that strings them together; `tls` serves it over
//! HTTPS (and says when it may be plain HTTP); `status` keeps the routes' counts and readiness.

pub mod argocd;
pub mod auth;
pub mod flux;
pub mod incoming;
pub mod payload;
pub mod render;
pub mod route;
pub mod server;
pub mod status;
pub mod tls;

use axum::http::StatusCode;

pub use server::{AlertsConfig, serve};
pub use tls::{ReceiverFlags, ReceiverTls, receiver_tls};

/// Why a notification was not turned into a message; each says what to fix, and maps to the HTTP
/// status Alertmanager acts on (it retries 5xx, and gives up on 4xx).
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    /// No bearer token, or not the route's.
    #[error(
        "unauthorized: send the AlertRoute's token as `Authorization: Bearer <token>`, or sign the body with it (Flux generic-hmac, Grafana HMAC)"
    )]
    Unauthorized,
    /// A signature that is malformed, stale or not the body's.
    #[error("unauthorized: {0}")]
    BadSignature(auth::SignatureError),
    /// No such AlertRoute, or a name that cannot be one.
    #[error("AlertRoute {0} not found")]
    RouteNotFound(String),
    /// The operator does not serve that namespace (`--namespace`).
    #[error("namespace {0} is not served by this operator")]
    NamespaceNotServed(String),
    /// The route's token Secret or key is missing or empty.
    #[error("the AlertRoute's token cannot be read: {0}")]
    TokenUnavailable(String),
    /// The body is over the limit.
    #[error("the payload is larger than {} bytes", payload::MAX_PAYLOAD_BYTES)]
    TooLarge,
    /// The body did not arrive in time.
    #[error("the payload did not arrive within {0} seconds")]
    Timeout(u64),
    /// The body could not be read.
    #[error("the payload could not be read: {0}")]
    Body(String),
    /// The payload is not a valid Alertmanager notification.
    #[error(transparent)]
    Payload(#[from] payload::PayloadError),
    /// The notification could not be rendered.
    #[error(transparent)]
    Render(#[from] render::RenderError),
    /// The API server refused the EmailMessage.
    #[error("the EmailMessage was refused: {0}")]
    Refused(String),
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Too many requests at once.
    #[error("too many notifications in progress; retry later")]
    Busy,
}

impl AlertError {
    /// The HTTP status for Alertmanager.
    pub fn status(&self) -> StatusCode {
        match self {
            AlertError::Unauthorized | AlertError::BadSignature(_) => StatusCode::UNAUTHORIZED,
            AlertError::RouteNotFound(_) | AlertError::NamespaceNotServed(_) => StatusCode::NOT_FOUND,
            AlertError::TokenUnavailable(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AlertError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AlertError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            AlertError::Body(_) => StatusCode::BAD_REQUEST,
            AlertError::Payload(e) => StatusCode::from_u16(e.status_code()).unwrap_or(StatusCode::BAD_REQUEST),
            AlertError::Render(render::RenderError::TooLarge(_)) => StatusCode::UNPROCESSABLE_ENTITY,
            AlertError::Render(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AlertError::Refused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AlertError::Kube(kube::Error::Api(s)) if s.code == 403 => StatusCode::INTERNAL_SERVER_ERROR,
            AlertError::Kube(_) | AlertError::Busy => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alertmanager_retries_only_what_may_succeed_later() {
        let permanent = [
            AlertError::Unauthorized,
            AlertError::BadSignature(auth::SignatureError::Mismatch("X-Signature".into())),
            AlertError::RouteNotFound("a/b".into()),
            AlertError::TooLarge,
            AlertError::Payload(payload::PayloadError::Malformed("x".into())),
            AlertError::Payload(payload::PayloadError::Invalid("x".into())),
            AlertError::Render(render::RenderError::TooLarge(2 << 20)),
            AlertError::Refused("x".into()),
        ];
        for e in permanent {
            assert!(e.status().is_client_error(), "{e}: {}", e.status());
        }
        let transient = [AlertError::Busy, AlertError::TokenUnavailable("Secret a not found".into())];
        for e in transient {
            assert!(e.status().is_server_error(), "{e}: {}", e.status());
        }
        assert_eq!(AlertError::Payload(payload::PayloadError::Invalid("x".into())).status().as_u16(), 422);
    }

    /// examples/alert-route.yaml and examples/alertmanager.yml work together, and the example
    /// templates render without error.
    #[test]
    fn the_examples_agree_and_their_templates_render() {
        use k8s_openapi::api::core::v1::ConfigMap;
        let docs: Vec<&str> = include_str!("../../examples/alert-route.yaml").split("\n---").collect();
        let find = |kind: &str| docs.iter().find(|d| d.contains(&format!("kind: {kind}\n"))).copied().unwrap();
        let route: crate::api::AlertRoute = serde_yaml::from_str(find("AlertRoute")).unwrap();
        let cm: ConfigMap = serde_yaml::from_str(find("ConfigMap")).unwrap();
        assert_eq!(route.spec.template_ref.as_ref().map(|t| t.name.as_str()), cm.metadata.name.as_deref());

        let am: serde_yaml::Value = serde_yaml::from_str(include_str!("../../examples/alertmanager.yml")).unwrap();
        let url = am["receivers"][0]["webhook_configs"][0]["url"].as_str().unwrap();
        let ns = route.metadata.namespace.as_deref().unwrap();
        let name = route.metadata.name.as_deref().unwrap();
        assert!(url.ends_with(&format!("/alerts/{ns}/{name}")), "{url}");
        let auth = &am["receivers"][0]["webhook_configs"][0]["http_config"]["authorization"];
        assert_eq!(auth["type"].as_str(), Some("Bearer"));
        // The receiver serves HTTPS: Alertmanager trusts its CA.
        assert!(url.starts_with("https://"), "{url}");
        let tls = &am["receivers"][0]["webhook_configs"][0]["http_config"]["tls_config"];
        assert!(tls["ca_file"].as_str().is_some_and(|f| f.ends_with("ca.crt")), "{tls:?}");

        let n = payload::parse(include_bytes!("../../tests/fixtures/alertmanager-firing.json")).unwrap();
        let templates = render::Templates::from_config_map(&cm.data.unwrap());
        let who = render::RouteName { namespace: ns.into(), name: name.into() };
        let r = render::render(&n, &who, Some(&templates)).unwrap();
        assert!(r.template_error.is_none(), "{:?}", r.template_error);
        assert_eq!(r.mail.subject, "[FIRING] KubePodCrashLooping shop (2 firing)");
        let text = r.mail.text.unwrap();
        assert!(text.starts_with("FIRING KubePodCrashLooping [critical] since 2025-10-14 08:21:37 UTC"), "{text}");
    }

    /// The Flux, Grafana and Argo CD examples: each route's source, and the sender's URL and
    /// credential pointing at it, over HTTPS with the receiver's CA trusted.
    #[test]
    fn the_receiver_examples_point_their_senders_at_their_routes() {
        use crate::api::AlertSource;
        let route = |yaml: &str| -> crate::api::AlertRoute {
            let doc = yaml.split("\n---").find(|d| d.contains("kind: AlertRoute\n")).unwrap();
            serde_yaml::from_str(doc).unwrap()
        };
        let path = |r: &crate::api::AlertRoute| {
            format!("/alerts/{}/{}", r.metadata.namespace.as_deref().unwrap(), r.metadata.name.as_deref().unwrap())
        };

        let flux = include_str!("../../examples/flux-route.yaml");
        let r = route(flux);
        assert_eq!(r.spec.source(), AlertSource::Flux);
        let provider: serde_yaml::Value =
            serde_yaml::from_str(flux.split("\n---").find(|d| d.contains("kind: Provider\n")).unwrap()).unwrap();
        assert_eq!(provider["spec"]["type"].as_str(), Some("generic-hmac"));
        assert!(provider["spec"]["address"].as_str().unwrap().ends_with(&path(&r)));
        assert_eq!(provider["spec"]["secretRef"]["name"].as_str(), Some(r.spec.token_secret_ref.name.as_str()));
        assert_eq!(r.spec.token_secret_ref.key, "token", "Flux reads the key `token`");
        // HTTPS, trusting the CA in the Secret that certSecretRef names, under `ca.crt`.
        assert!(provider["spec"]["address"].as_str().unwrap().starts_with("https://"));
        let ca_secret = provider["spec"]["certSecretRef"]["name"].as_str().expect("certSecretRef");
        let secret: k8s_openapi::api::core::v1::Secret = flux
            .split("\n---")
            .filter(|d| d.contains("kind: Secret\n"))
            .map(|d| serde_yaml::from_str(d).unwrap())
            .find(|s: &k8s_openapi::api::core::v1::Secret| s.metadata.name.as_deref() == Some(ca_secret))
            .expect("the CA Secret");
        assert!(secret.string_data.unwrap_or_default().contains_key("ca.crt"));

        let r = route(include_str!("../../examples/grafana-route.yaml"));
        assert_eq!(r.spec.source(), AlertSource::Grafana);
        let cp: serde_yaml::Value =
            serde_yaml::from_str(include_str!("../../examples/grafana-contact-point.yaml")).unwrap();
        let settings = &cp["contactPoints"][0]["receivers"][0]["settings"];
        assert!(settings["url"].as_str().unwrap().ends_with(&path(&r)));
        let sig = r.spec.signature.as_ref().unwrap();
        assert_eq!(settings["hmacConfig"]["header"].as_str(), sig.header.as_deref());
        assert_eq!(settings["hmacConfig"]["timestampHeader"].as_str(), sig.timestamp_header.as_deref());
        assert!(settings["url"].as_str().unwrap().starts_with("https://"));
        assert!(settings["tlsConfig"]["caCertificate"].as_str().is_some(), "the contact point trusts the CA");

        let r = route(include_str!("../../examples/argocd-route.yaml"));
        assert_eq!(r.spec.source(), AlertSource::Argocd);
        let cm: k8s_openapi::api::core::v1::ConfigMap =
            serde_yaml::from_str(include_str!("../../deploy/argocd/argocd-notifications-cm.yaml")).unwrap();
        let service: serde_yaml::Value = serde_yaml::from_str(&cm.data.unwrap()["service.webhook.mailroom"]).unwrap();
        let url = service["url"].as_str().unwrap();
        assert!(url.ends_with(&path(&r)));
        // Argo CD trusts the certificates of argocd-tls-certs-cm under the URL's host, without
        // its port.
        let host = url.strip_prefix("https://").and_then(|rest| rest.split([':', '/']).next()).expect("an https URL");
        let certs: k8s_openapi::api::core::v1::ConfigMap =
            serde_yaml::from_str(include_str!("../../deploy/argocd/argocd-tls-certs-cm.yaml")).unwrap();
        assert_eq!(certs.metadata.name.as_deref(), Some("argocd-tls-certs-cm"));
        assert!(certs.data.unwrap_or_default().contains_key(host), "no certificate for {host}");
    }
}
