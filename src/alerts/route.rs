//! What a route makes of a notification: the EmailMessage, and how repeats are told from retries.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::payload::{Notification, message_name};
use super::render::RenderedMail;
use crate::api::{AlertRouteSpec, Body, EmailMessage, EmailMessageSpec, HeaderValue};

/// Label: the AlertRoute that created the message.
pub const ROUTE_LABEL: &str = "mailroom.dev/alert-route";
/// Label: `firing` or `resolved`.
pub const STATUS_LABEL: &str = "mailroom.dev/alert-status";
/// Label: the notification's key (see [`Notification::key`]).
pub const NOTIFICATION_LABEL: &str = "mailroom.dev/alert-notification";
/// Annotation: Alertmanager's group key.
pub const GROUP_KEY_ANNOTATION: &str = "mailroom.dev/alert-group-key";
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
/// two senders ends in a conflict (AlreadyExists) rather than two messages.
pub fn occurrence(route: &str, key: &str, earlier: &[Earlier], now: Timestamp, window: SignedDuration) -> Occurrence {
    let recent =
        earlier.iter().filter(|e| e.created.is_none_or(|c| now.duration_since(c) < window)).max_by_key(|e| e.created);
    if let Some(e) = recent {
        return Occurrence::Retry(e.name.clone());
    }
    let taken = |n: u32| earlier.iter().any(|e| e.name == message_name(route, key, n));
    let next = (1..).find(|n| !taken(*n)).unwrap_or(1);
    Occurrence::Create(message_name(route, key, next))
}

/// The EmailMessage for a notification, in the route's namespace.
pub fn email_message(
    namespace: &str,
    route: &str,
    spec: &AlertRouteSpec,
    notification: &Notification,
    name: &str,
    mail: RenderedMail,
    template_error: Option<&str>,
) -> EmailMessage {
    let labels = BTreeMap::from([
        (ROUTE_LABEL.to_string(), route.to_string()),
        (STATUS_LABEL.to_string(), notification.status.clone()),
        (NOTIFICATION_LABEL.to_string(), notification.key()),
    ]);
    let mut annotations = BTreeMap::from([(GROUP_KEY_ANNOTATION.to_string(), notification.group_key.clone())]);
    if let Some(e) = template_error {
        annotations.insert(TEMPLATE_ERROR_ANNOTATION.to_string(), e.to_string());
    }
    let severities: Vec<&str> = notification.firing().filter_map(|a| a.severity()).collect();
    let mut headers = BTreeMap::from([("X-Alertmanager-Status".to_string(), header(&notification.status))]);
    if !notification.receiver.is_empty() {
        headers.insert("X-Alertmanager-Receiver".to_string(), header(&notification.receiver));
    }
    if let Some(name) = notification.alertname() {
        headers.insert("X-Alertmanager-Alertname".to_string(), header(name));
    }
    let spec = EmailMessageSpec {
        profile_ref: spec.profile_ref.clone(),
        from: spec.from.clone(),
        to: spec.to.clone(),
        cc: spec.cc.clone(),
        bcc: Vec::new(),
        reply_to: Vec::new(),
        subject: mail.subject,
        body: Body { text: mail.text, html: mail.html },
        template_ref: None,
        values: None,
        attachments: Vec::new(),
        raw: None,
        headers,
        importance: Some(spec.importance_for(severities)),
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
    use crate::alerts::payload::parse;
    use crate::api::{Importance, LocalKeySelector, ProfileRef};

    const FIRING: &str = include_str!("../../tests/fixtures/alertmanager-firing.json");
    const KEY: &str = "0123456789abcdef";
    const WINDOW: SignedDuration = SignedDuration::from_secs(600);

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_760_000_000 + secs).unwrap()
    }

    fn earlier(n: u32, created: i64) -> Earlier {
        Earlier { name: message_name("platform", KEY, n), created: Some(at(created)) }
    }

    #[test]
    fn the_first_notification_gets_the_plain_name() {
        assert_eq!(
            occurrence("platform", KEY, &[], at(0), WINDOW),
            Occurrence::Create(format!("alert-platform-{KEY}"))
        );
    }

    #[test]
    fn a_retry_within_the_window_creates_nothing() {
        let e = [earlier(1, 0)];
        assert_eq!(occurrence("platform", KEY, &e, at(5), WINDOW), Occurrence::Retry(e[0].name.clone()));
        assert_eq!(occurrence("platform", KEY, &e, at(599), WINDOW), Occurrence::Retry(e[0].name.clone()));
        assert!(matches!(occurrence("platform", KEY, &e, at(600), WINDOW), Occurrence::Create(_)));
    }

    #[test]
    fn a_repeat_after_the_window_gets_the_next_number_and_its_retries_find_it() {
        let first = [earlier(1, 0)];
        let repeat = occurrence("platform", KEY, &first, at(4 * 3600), WINDOW);
        assert_eq!(repeat, Occurrence::Create(format!("alert-platform-{KEY}-2")));
        let both = [earlier(1, 0), earlier(2, 4 * 3600)];
        assert_eq!(
            occurrence("platform", KEY, &both, at(4 * 3600 + 60), WINDOW),
            Occurrence::Retry(both[1].name.clone())
        );
        assert_eq!(
            occurrence("platform", KEY, &both, at(8 * 3600), WINDOW),
            Occurrence::Create(format!("alert-platform-{KEY}-3"))
        );
    }

    #[test]
    fn a_gap_left_by_a_deleted_message_is_reused() {
        let e = [earlier(2, 0), earlier(3, 100)];
        assert_eq!(
            occurrence("platform", KEY, &e, at(86_400), WINDOW),
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
            template_ref: None,
            importance_by_severity: None,
            retry_window_seconds: None,
            delivery: None,
            ttl_seconds_after_finished: None,
        }
    }

    fn mail() -> RenderedMail {
        RenderedMail { subject: "[FIRING:2] x".into(), text: Some("t".into()), html: None }
    }

    #[test]
    fn the_message_carries_the_routes_profile_recipients_and_labels() {
        let n = parse(FIRING.as_bytes()).unwrap();
        let m = email_message("monitoring", "platform", &route(), &n, "alert-platform-x", mail(), None);
        assert_eq!(m.metadata.name.as_deref(), Some("alert-platform-x"));
        assert_eq!(m.metadata.namespace.as_deref(), Some("monitoring"));
        let labels = m.metadata.labels.unwrap();
        assert_eq!(labels[ROUTE_LABEL], "platform");
        assert_eq!(labels[STATUS_LABEL], "firing");
        assert_eq!(labels[NOTIFICATION_LABEL], n.key());
        assert_eq!(m.metadata.annotations.unwrap()[GROUP_KEY_ANNOTATION], n.group_key);
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
        let mut n = parse(FIRING.as_bytes()).unwrap();
        n.status = "resolved".into();
        n.alerts.iter_mut().for_each(|a| a.status = "resolved".into());
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
