//! A notification of any source, reduced to what a route needs: its identity, how it is named
//! and labelled, what its templates see, and how important it is.

use std::collections::BTreeMap;

use axum::http::HeaderMap;
use serde_json::{Map, Value};

use super::payload::{self, Notification, PayloadError};
use super::render::{self, Defaults, web_url};
use super::{argocd, flux};
use crate::api::AlertSource;

/// One notification, whatever sent it.
#[derive(Clone, Debug)]
pub struct Incoming {
    /// Who sent it.
    pub source: AlertSource,
    /// 16 hex digits: the same notification sent again has the same key.
    pub key: String,
    /// The `mailroom.dev/alert-status` label: `firing`/`resolved` (Alertmanager, Grafana), the
    /// event's severity (Flux), the event (Argo CD).
    pub status: String,
    /// The severities that decide the importance (firing alerts' `severity` labels; Flux's and
    /// Argo CD's severity).
    pub severities: Vec<String>,
    /// Whether the same notification after the retry window is a reminder to send again
    /// (Alertmanager's and Grafana's `repeat_interval`); Flux and Argo CD never repeat one.
    pub repeats: bool,
    /// Headers of the email (`X-Alertmanager-*`, `X-Flux-*`, `X-ArgoCD-*`, `X-Grafana-*`).
    pub headers: BTreeMap<String, String>,
    /// Annotations of the message (the group key).
    pub annotations: BTreeMap<String, String>,
    /// What templates see.
    pub context: Map<String, Value>,
    /// The default templates.
    pub defaults: Defaults,
    /// The Event note of the created message (without the message name).
    pub summary: String,
}

/// Annotation: Alertmanager's or Grafana's group key.
pub const GROUP_KEY_ANNOTATION: &str = "mailroom.dev/alert-group-key";

/// Reads a body as the route's source sends it.
pub fn parse(source: AlertSource, headers: &HeaderMap, body: &[u8]) -> Result<Incoming, PayloadError> {
    match source {
        AlertSource::Alertmanager => Ok(from_alertmanager(&payload::parse(body)?, false)),
        AlertSource::Grafana => Ok(from_alertmanager(&payload::parse_grafana(body)?, true)),
        AlertSource::Flux => {
            let component = headers.get(flux::COMPONENT_HEADER).and_then(|v| v.to_str().ok());
            Ok(from_flux(&flux::parse(body)?, component))
        }
        AlertSource::Argocd => Ok(from_argocd(&argocd::parse(body)?)),
    }
}

fn from_alertmanager(n: &Notification, grafana: bool) -> Incoming {
    let (source, prefix) =
        if grafana { (AlertSource::Grafana, "X-Grafana") } else { (AlertSource::Alertmanager, "X-Alertmanager") };
    let mut headers = BTreeMap::from([(format!("{prefix}-Status"), n.status.clone())]);
    if !n.receiver.is_empty() {
        headers.insert(format!("{prefix}-Receiver"), n.receiver.clone());
    }
    if let Some(name) = n.alertname() {
        headers.insert(format!("{prefix}-Alertname"), name.to_string());
    }
    Incoming {
        source,
        key: n.key(),
        status: n.status.clone(),
        severities: n.firing().filter_map(|a| a.severity()).map(str::to_string).collect(),
        repeats: true,
        headers,
        annotations: BTreeMap::from([(GROUP_KEY_ANNOTATION.to_string(), n.group_key.clone())]),
        context: render::alertmanager_context(n, grafana),
        defaults: render::ALERTMANAGER,
        summary: format!("{} notification with {} alert(s) from receiver {:?}", n.status, n.alerts.len(), n.receiver),
    }
}

fn from_flux(e: &flux::FluxEvent, component: Option<&str>) -> Incoming {
    let o = &e.involved_object;
    let object = format!(
        "{}/{}",
        o.kind,
        if o.namespace.is_empty() { o.name.clone() } else { format!("{}/{}", o.namespace, o.name) }
    );
    let mut headers = BTreeMap::from([
        ("X-Flux-Object".to_string(), object.clone()),
        ("X-Flux-Severity".to_string(), e.severity.clone()),
    ]);
    if !e.reason.is_empty() {
        headers.insert("X-Flux-Reason".into(), e.reason.clone());
    }
    if !e.revision().is_empty() {
        headers.insert("X-Flux-Revision".into(), e.revision().to_string());
    }
    Incoming {
        source: AlertSource::Flux,
        key: e.key(),
        status: label_value(&e.severity),
        severities: vec![e.severity.clone()],
        repeats: false,
        headers,
        annotations: BTreeMap::new(),
        context: e.context(component),
        defaults: render::FLUX,
        summary: format!("{} event {} for {object}", e.severity, e.reason),
    }
}

fn from_argocd(n: &argocd::ArgoNotification) -> Incoming {
    let mut context = n.context();
    // Only web links become links in an email.
    for k in ["appURL", "repoURL"] {
        let safe = context.get(k).and_then(Value::as_str).and_then(web_url).unwrap_or_default().to_string();
        context.insert(k.into(), Value::String(safe));
    }
    let mut headers = BTreeMap::from([
        ("X-ArgoCD-Application".to_string(), n.app.clone()),
        ("X-ArgoCD-Event".to_string(), n.event.clone()),
    ]);
    if !n.revision.is_empty() {
        headers.insert("X-ArgoCD-Revision".into(), n.revision.clone());
    }
    Incoming {
        source: AlertSource::Argocd,
        key: n.key(),
        status: label_value(&n.event),
        severities: vec![n.severity().to_string()],
        repeats: false,
        headers,
        annotations: BTreeMap::new(),
        context,
        defaults: render::ARGOCD,
        summary: format!("{} for application {}", n.event, n.app),
    }
}

/// A value a label may hold: alphanumerics, `-`, `_` and `.`, at most 63, alphanumeric at the ends.
pub fn label_value(s: &str) -> String {
    let cleaned: String =
        s.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '-' }).take(63).collect();
    cleaned.trim_matches(|c: char| !c.is_ascii_alphanumeric()).to_string()
}

/// The name of the `n`th message (from 1) of a notification with this key, sent through this
/// route: `<prefix>-<route>-<key>`, then `-2`, `-3` for repeats (Alertmanager and Grafana only).
/// The prefix is `alert` for Alertmanager (as before sources existed), else the source.
pub fn message_name(source: AlertSource, route: &str, key: &str, n: u32) -> String {
    let prefix = match source {
        AlertSource::Alertmanager => "alert",
        other => other.as_str(),
    };
    if n <= 1 { format!("{prefix}-{route}-{key}") } else { format!("{prefix}-{route}-{key}-{n}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(source: AlertSource, body: &str) -> Incoming {
        let mut headers = HeaderMap::new();
        headers.insert(flux::COMPONENT_HEADER, "kustomize-controller".parse().unwrap());
        parse(source, &headers, body.as_bytes()).unwrap()
    }

    #[test]
    fn each_source_reads_its_own_payload_only() {
        let am = include_str!("../../tests/fixtures/alertmanager-firing.json");
        let fl = include_str!("../../tests/fixtures/flux-event-error.json");
        let ar = include_str!("../../tests/fixtures/argocd-sync-failed.json");
        let gr = include_str!("../../tests/fixtures/grafana-firing.json");
        assert_eq!(parsed(AlertSource::Alertmanager, am).status, "firing");
        assert_eq!(parsed(AlertSource::Flux, fl).status, "error");
        assert_eq!(parsed(AlertSource::Argocd, ar).status, "sync-failed");
        assert_eq!(parsed(AlertSource::Grafana, gr).headers["X-Grafana-Receiver"], "mailroom-team-a");
        for (source, wrong) in [
            (AlertSource::Alertmanager, gr),
            (AlertSource::Grafana, am),
            (AlertSource::Flux, am),
            (AlertSource::Argocd, fl),
        ] {
            assert!(parse(source, &HeaderMap::new(), wrong.as_bytes()).is_err(), "{source:?}");
        }
    }

    #[test]
    fn flux_events_render_with_the_flux_defaults() {
        let i = parsed(AlertSource::Flux, include_str!("../../tests/fixtures/flux-event-error.json"));
        assert!(!i.repeats);
        assert_eq!(i.headers["X-Flux-Revision"], "main@sha1:731f7eaddfb6af01cb2173e18f0f75b0ba780ef1");
        let who = render::RouteName { namespace: "apps".into(), name: "flux".into() };
        let r = render::render_context(i.context, &i.defaults, &who, None).unwrap();
        assert_eq!(r.mail.subject, "[Flux ERROR] Kustomization apps/webapp: ValidationFailed");
        let text = r.mail.text.unwrap();
        for words in [
            "Production apps",
            "service/apps/webapp validation error: spec.type: Unsupported value: Ingress",
            "Revision:    main@sha1:731f7eaddfb6af01cb2173e18f0f75b0ba780ef1",
            "Time:        2022-10-28 07:26:19 UTC",
            "Controller:  kustomize-controller",
        ] {
            assert!(text.contains(words), "text lacks {words:?}:\n{text}");
        }
        assert!(!text.contains("summary:"), "{text}");
        assert!(r.mail.html.unwrap().contains("ValidationFailed"));
    }

    #[test]
    fn argocd_notifications_render_with_the_argocd_defaults() {
        let mut v: Value = serde_json::from_str(include_str!("../../tests/fixtures/argocd-sync-failed.json")).unwrap();
        v["repoURL"] = "javascript:alert(1)".into();
        let i = parsed(AlertSource::Argocd, &v.to_string());
        assert_eq!(i.severities, ["error"]);
        let who = render::RouteName { namespace: "argocd".into(), name: "deploys".into() };
        let r = render::render_context(i.context, &i.defaults, &who, None).unwrap();
        assert_eq!(r.mail.subject, "[Argo CD] guestbook: sync failed (4e9c917f)");
        let text = r.mail.text.unwrap();
        for words in [
            "Sync status: OutOfSync",
            "Health:      Degraded",
            "Revision:    4e9c917f1c3b2a0d5e6f7a8b9c0d1e2f3a4b5c6d",
            "Operation:   Failed, finished 2025-10-14 08:20:09 UTC",
            "Deployment.apps \"guestbook-ui\" is invalid",
            "Argo CD:    https://argocd.contoso.com/applications/argocd/guestbook",
        ] {
            assert!(text.contains(words), "text lacks {words:?}:\n{text}");
        }
        assert!(!text.contains("javascript:"), "{text}");
    }

    #[test]
    fn names_are_per_source_and_labels_are_valid() {
        let k = "0123456789abcdef";
        assert_eq!(message_name(AlertSource::Alertmanager, "p", k, 1), format!("alert-p-{k}"));
        assert_eq!(message_name(AlertSource::Flux, "p", k, 1), format!("flux-p-{k}"));
        assert_eq!(message_name(AlertSource::Argocd, "p", k, 1), format!("argocd-p-{k}"));
        assert_eq!(message_name(AlertSource::Grafana, "p", k, 2), format!("grafana-p-{k}-2"));
        assert_eq!(message_name(AlertSource::Alertmanager, "platform", k, 3), format!("alert-platform-{k}-3"));
        // The longest route name (63) still gives a valid object name.
        assert!(message_name(AlertSource::Argocd, &"r".repeat(63), k, 999).len() <= 253);
        assert_eq!(label_value("sync failed!"), "sync-failed");
        assert_eq!(label_value(&"x".repeat(100)).len(), 63);
    }
}
