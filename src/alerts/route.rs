//! What a route makes of a notification: the EmailMessage, and how repeats are told from retries.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::incoming::{Incoming, message_name};
use super::render::{RenderedMail, RouteName};
use crate::api::{AlertRouteSpec, AlertSource, Body, EmailMessage, EmailMessageSpec, HeaderValue};

/// Label: the AlertRoute that created the message.
pub const ROUTE_LABEL: &str = "mailroom.dev/alert-route";
/// Label: the route's source (`alertmanager`, `flux`, `argocd`, `grafana`).
pub const SOURCE_LABEL: &str = "mailroom.dev/alert-source";
/// Label: `firing` or `resolved`; Flux's severity; Argo CD's event.
pub const STATUS_LABEL: &str = "mailroom.dev/alert-status";
/// Label: the notification's key (see [`Incoming::key`]).
pub const NOTIFICATION_LABEL: &str = "mailroom.dev/alert-notification";
pub use super::incoming::GROUP_KEY_ANNOTATION;
/// Annotation: why the route's template was set aside, when it was.
pub const TEMPLATE_ERROR_ANNOTATION: &str = "mailroom.dev/alert-template-error";

/// What to do with a notification, given the messages its key already created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Occurrence {
    /// A retry of the notification that created this message.
    Retry(String),
    /// A new notification, or a repeat: create the message with this name.
    Create(String),
}

/// A message the notification's key already created: its name and when it was created.
#[derive(Clone, Debug)]
pub struct Earlier {
    /// The message's name.
    pub name: String,
    /// When it was created.
    pub created: Option<Timestamp>,
}

/// Decides between a retry and a new or repeated notification. A notification seen again within
/// `window` of the message it created is Alertmanager retrying (or the other Alertmanager of an
/// HA pair sending it too); later, it is Alertmanager's `repeat_interval` reminder. Names are
/// numbered so that the retries of a repeat also find one deterministic name, and a race between
/// two senders ends in a conflict (AlreadyExists) rather than two messages. A source whose
/// notifications never repeat (`repeats` false: Flux, Argo CD) treats any earlier message of the
/// key as the one a retry finds.
pub fn occurrence(
    source: AlertSource,
    repeats: bool,
    route: &str,
    key: &str,
    earlier: &[Earlier],
    now: Timestamp,
    window: SignedDuration,
) -> Occurrence {
    let recent = earlier
        .iter()
        .filter(|e| !repeats || e.created.is_none_or(|c| now.duration_since(c) < window))
        .max_by_key(|e| e.created);
    if let Some(e) = recent {
        return Occurrence::Retry(e.name.clone());
    }
    let taken = |n: u32| earlier.iter().any(|e| e.name == message_name(source, route, key, n));
    let next = (1..).find(|n| !taken(*n)).unwrap_or(1);
    Occurrence::Create(message_name(source, route, key, next))
}

/// How the message gets its subject and body.
#[derive(Clone, Debug)]
pub enum Content {
    /// Rendered by the receiver.
    Rendered(RenderedMail),
    /// Rendered when sent, from the route's EmailTemplate with the notification as values.
    EmailTemplate(String),
}

/// The EmailMessage for a notification, in the route's namespace.
pub fn email_message(
    namespace: &str,
    route: &str,
    spec: &AlertRouteSpec,
    incoming: &Incoming,
    name: &str,
    content: Content,
    template_error: Option<&str>,
) -> EmailMessage {
    let labels = BTreeMap::from([
        (ROUTE_LABEL.to_string(), route.to_string()),
        (SOURCE_LABEL.to_string(), incoming.source.as_str().to_string()),
        (STATUS_LABEL.to_string(), incoming.status.clone()),
        (NOTIFICATION_LABEL.to_string(), incoming.key.clone()),
    ]);
    let mut annotations = incoming.annotations.clone();
    if let Some(e) = template_error {
        annotations.insert(TEMPLATE_ERROR_ANNOTATION.to_string(), e.to_string());
    }
    let headers = incoming.headers.iter().map(|(k, v)| (k.clone(), header(v))).collect();
    let (subject, body, template_ref, values) = match content {
        Content::Rendered(mail) => (mail.subject, Body { text: mail.text, html: mail.html }, None, None),
        Content::EmailTemplate(template) => {
            let mut values = incoming.context.clone();
            let who = RouteName { namespace: namespace.to_string(), name: route.to_string() };
            values.insert("route".into(), serde_json::to_value(who).unwrap_or_default());
            values.insert("source".into(), serde_json::Value::String(incoming.source.as_str().into()));
            let reference = crate::api::LocalReference { name: template };
            (String::new(), Body { text: None, html: None }, Some(reference), Some(values))
        }
    };
    let spec = EmailMessageSpec {
        profile_ref: spec.profile_ref.clone(),
        from: spec.from.clone(),
        to: spec.to.clone(),
        cc: spec.cc.clone(),
        bcc: Vec::new(),
        reply_to: Vec::new(),
        subject,
        body,
        template_ref,
        values,
        attachments: Vec::new(),
        raw: None,
        headers,
        importance: Some(spec.importance_for(incoming.severities.iter().map(String::as_str))),
        delivery: spec.delivery.clone(),
        ttl_seconds_after_finished: Some(spec.ttl_seconds_after_finished()),
        idempotency_key: None,
        idempotency_retention_seconds: None,
    };
    let metadata = ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        labels: Some(labels),
        annotations: Some(annotations),
        ..Default::default()
    };
    EmailMessage { metadata, spec, status: None }
}

/// A header value on one line, as long as RFC 5322 allows.
fn header(value: &str) -> HeaderValue {
    let line: String = value.chars().map(|c| if c.is_control() { ' ' } else { c }).take(998).collect();
    HeaderValue(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::incoming;
    use crate::api::{Importance, LocalKeySelector, ProfileRef};

    const FIRING: &str = include_str!("../../tests/fixtures/alertmanager-firing.json");
    const KEY: &str = "0123456789abcdef";
    const WINDOW: SignedDuration = SignedDuration::from_secs(600);
    const AM: AlertSource = AlertSource::Alertmanager;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_760_000_000 + secs).unwrap()
    }

    fn earlier(n: u32, created: i64) -> Earlier {
        Earlier { name: message_name(AM, "platform", KEY, n), created: Some(at(created)) }
    }

    #[test]
    fn the_first_notification_gets_the_plain_name() {
        assert_eq!(
            occurrence(AM, true, "platform", KEY, &[], at(0), WINDOW),
            Occurrence::Create(format!("alert-platform-{KEY}"))
        );
    }

    #[test]
    fn a_retry_within_the_window_creates_nothing() {
        let e = [earlier(1, 0)];
        assert_eq!(occurrence(AM, true, "platform", KEY, &e, at(5), WINDOW), Occurrence::Retry(e[0].name.clone()));
        assert_eq!(occurrence(AM, true, "platform", KEY, &e, at(599), WINDOW), Occurrence::Retry(e[0].name.clone()));
        assert!(matches!(occurrence(AM, true, "platform", KEY, &e, at(600), WINDOW), Occurrence::Create(_)));
    }

    #[test]
    fn a_repeat_after_the_window_gets_the_next_number_and_its_retries_find_it() {
        let first = [earlier(1, 0)];
        let repeat = occurrence(AM, true, "platform", KEY, &first, at(4 * 3600), WINDOW);
        assert_eq!(repeat, Occurrence::Create(format!("alert-platform-{KEY}-2")));
        let both = [earlier(1, 0), earlier(2, 4 * 3600)];
        assert_eq!(
            occurrence(AM, true, "platform", KEY, &both, at(4 * 3600 + 60), WINDOW),
            Occurrence::Retry(both[1].name.clone())
        );
        assert_eq!(
            occurrence(AM, true, "platform", KEY, &both, at(8 * 3600), WINDOW),
            Occurrence::Create(format!("alert-platform-{KEY}-3"))
        );
    }

    #[test]
    fn a_gap_left_by_a_deleted_message_is_reused() {
        let e = [earlier(2, 0), earlier(3, 100)];
        assert_eq!(
            occurrence(AM, true, "platform", KEY, &e, at(86_400), WINDOW),
            Occurrence::Create(format!("alert-platform-{KEY}"))
        );
    }

    fn route() -> AlertRouteSpec {
        AlertRouteSpec {
            profile_ref: ProfileRef { kind: None, name: "m365".into() },
            from: Some("alerts@contoso.com".into()),
            to: vec!["Platform <platform@contoso.com>".into()],
            cc: vec!["sre@contoso.com".into()],
            token_secret_ref: LocalKeySelector { name: "am".into(), key: "token".into() },
            source: None,
            signature: None,
            template_ref: None,
            email_template_ref: None,
            importance_by_severity: None,
            retry_window_seconds: None,
            delivery: None,
            ttl_seconds_after_finished: None,
        }
    }

    fn mail() -> Content {
        Content::Rendered(RenderedMail { subject: "[FIRING:2] x".into(), text: Some("t".into()), html: None })
    }

    fn parse(body: &[u8]) -> Incoming {
        incoming::parse(AM, &axum::http::HeaderMap::new(), body).unwrap()
    }

    #[test]
    fn flux_and_argocd_notifications_never_repeat() {
        let e = [Earlier { name: message_name(AlertSource::Flux, "p", KEY, 1), created: Some(at(0)) }];
        assert_eq!(
            occurrence(AlertSource::Flux, false, "p", KEY, &e, at(30 * 86_400), WINDOW),
            Occurrence::Retry(e[0].name.clone())
        );
        assert_eq!(
            occurrence(AlertSource::Argocd, false, "p", KEY, &[], at(0), WINDOW),
            Occurrence::Create(format!("argocd-p-{KEY}"))
        );
    }

    #[test]
    fn a_route_with_an_email_template_names_it_with_the_notification_as_values() {
        let n = parse(FIRING.as_bytes());
        let content = Content::EmailTemplate("alert-mail".into());
        let m = email_message("monitoring", "platform", &route(), &n, "x", content, None);
        assert_eq!(m.spec.template_ref.map(|r| r.name).as_deref(), Some("alert-mail"));
        assert!(m.spec.subject.is_empty() && m.spec.body.is_empty());
        let values = m.spec.values.unwrap();
        assert_eq!(values["status"], "firing");
        assert_eq!(values["route"]["name"], "platform");
        assert_eq!(values["source"], "alertmanager");
    }

    #[test]
    fn the_message_carries_the_routes_profile_recipients_and_labels() {
        let n = parse(FIRING.as_bytes());
        let m = email_message("monitoring", "platform", &route(), &n, "alert-platform-x", mail(), None);
        assert_eq!(m.metadata.name.as_deref(), Some("alert-platform-x"));
        assert_eq!(m.metadata.namespace.as_deref(), Some("monitoring"));
        let labels = m.metadata.labels.unwrap();
        assert_eq!(labels[ROUTE_LABEL], "platform");
        assert_eq!(labels[STATUS_LABEL], "firing");
        assert_eq!(labels[NOTIFICATION_LABEL], n.key);
        assert_eq!(labels[SOURCE_LABEL], "alertmanager");
        assert!(m.metadata.annotations.unwrap()[GROUP_KEY_ANNOTATION].contains("KubePodCrashLooping"));
        assert_eq!(m.spec.profile_ref.name, "m365");
        assert_eq!(m.spec.from.as_deref(), Some("alerts@contoso.com"));
        assert_eq!(m.spec.to, ["Platform <platform@contoso.com>"]);
        assert_eq!(m.spec.cc, ["sre@contoso.com"]);
        assert_eq!(m.spec.subject, "[FIRING:2] x");
        assert_eq!(m.spec.importance, Some(Importance::High), "critical is high by default");
        assert_eq!(m.spec.ttl_seconds_after_finished, Some(604_800));
        assert_eq!(m.spec.headers["X-Alertmanager-Status"].0, "firing");
        assert_eq!(m.spec.headers["X-Alertmanager-Alertname"].0, "KubePodCrashLooping");
    }

    #[test]
    fn a_resolved_notification_is_normal_importance() {
        let mut v: serde_json::Value = serde_json::from_str(FIRING).unwrap();
        v["status"] = "resolved".into();
        v["alerts"].as_array_mut().unwrap().iter_mut().for_each(|a| a["status"] = "resolved".into());
        let n = parse(v.to_string().as_bytes());
        let m = email_message("monitoring", "platform", &route(), &n, "x", mail(), Some("the subject template: x"));
        assert_eq!(m.spec.importance, Some(Importance::Normal));
        assert_eq!(m.metadata.labels.unwrap()[STATUS_LABEL], "resolved");
        assert_eq!(m.metadata.annotations.unwrap()[TEMPLATE_ERROR_ANNOTATION], "the subject template: x");
    }

    #[test]
    fn header_values_stay_on_one_line() {
        assert_eq!(header("a\r\nb").0, "a  b");
        assert_eq!(header(&"x".repeat(2000)).0.len(), 998);
    }
}
