//! Alertmanager's webhook payload (version 4), its validation, and the identity of a notification;
//! Grafana alerting's webhook payload (version 1) is the same data with a few fields more
//! (`webhookMessage` and `templates.ExtendedAlert` of grafana/alerting's `receivers/webhook/v1`).

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The largest request body accepted (Alertmanager's `max_alerts` keeps real ones far below).
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// The only payload version Alertmanager has sent since 0.10.
pub const SUPPORTED_VERSION: &str = "4";
/// The version of Grafana's webhook payload
/// (https://grafana.com/docs/grafana/latest/alerting/configure-notifications/manage-contact-points/integrations/webhook-notifier/).
pub const GRAFANA_VERSION: &str = "1";

/// One notification: a group of alerts that Alertmanager sends to a receiver together.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    /// The payload version, "4".
    pub version: String,
    /// Identifies the Alertmanager route and group the alerts belong to.
    pub group_key: String,
    /// Alerts left out by the receiver's `max_alerts`.
    #[serde(default)]
    pub truncated_alerts: u64,
    /// `firing` if any alert fires, else `resolved`.
    pub status: String,
    /// The Alertmanager receiver's name.
    #[serde(default)]
    pub receiver: String,
    /// The labels the alerts are grouped by.
    #[serde(default)]
    pub group_labels: BTreeMap<String, String>,
    /// Labels every alert has.
    #[serde(default)]
    pub common_labels: BTreeMap<String, String>,
    /// Annotations every alert has.
    #[serde(default)]
    pub common_annotations: BTreeMap<String, String>,
    /// The Alertmanager's own URL, for links back to it.
    #[serde(default, rename = "externalURL")]
    pub external_url: String,
    /// The alerts.
    pub alerts: Vec<Alert>,
    /// Grafana: the organisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<i64>,
    /// Grafana: the contact point's title (default `[FIRING:2] <group labels> (<common labels>)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Grafana: `alerting` or `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Grafana: the contact point's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One alert of a notification.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// `firing` or `resolved`.
    pub status: String,
    /// Identifying labels (alertname, severity, ...).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations (summary, description, runbook_url, ...).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// When the alert started firing (RFC 3339).
    pub starts_at: String,
    /// When it resolved; Alertmanager sends the zero time `0001-01-01T00:00:00Z` for a firing alert.
    #[serde(default)]
    pub ends_at: String,
    /// The alerting rule's expression in Prometheus.
    #[serde(default, rename = "generatorURL")]
    pub generator_url: String,
    /// Alertmanager's hash of the labels.
    #[serde(default)]
    pub fingerprint: String,
    /// Grafana: the query and expression values by reference id (`B`, `C`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<BTreeMap<String, serde_json::Value>>,
    /// Grafana: the values as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_string: Option<String>,
    /// Grafana: a prefilled silence.
    #[serde(default, rename = "silenceURL", skip_serializing_if = "Option::is_none")]
    pub silence_url: Option<String>,
    /// Grafana: the rule's dashboard.
    #[serde(default, rename = "dashboardURL", skip_serializing_if = "Option::is_none")]
    pub dashboard_url: Option<String>,
    /// Grafana: the rule's panel.
    #[serde(default, rename = "panelURL", skip_serializing_if = "Option::is_none")]
    pub panel_url: Option<String>,
    /// Grafana: a screenshot of the panel.
    #[serde(default, rename = "imageURL", skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
}

/// Why a payload was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    /// Not JSON, or not the webhook's shape.
    #[error("the body is not an Alertmanager webhook payload: {0}")]
    Malformed(String),
    /// Well-formed, but not something that can be sent.
    #[error("{0}")]
    Invalid(String),
}

impl PayloadError {
    /// 400 for a body that cannot be read as a payload, 422 for one whose content is wrong.
    pub fn status_code(&self) -> u16 {
        match self {
            PayloadError::Malformed(_) => 400,
            PayloadError::Invalid(_) => 422,
        }
    }
}

/// Reads and validates a payload.
pub fn parse(body: &[u8]) -> Result<Notification, PayloadError> {
    let n: Notification = serde_json::from_slice(body).map_err(|e| PayloadError::Malformed(e.to_string()))?;
    n.validate(SUPPORTED_VERSION, "Alertmanager's webhook sends version \"4\"")?;
    Ok(n)
}

/// Reads and validates a Grafana webhook payload.
pub fn parse_grafana(body: &[u8]) -> Result<Notification, PayloadError> {
    let n: Notification = serde_json::from_slice(body)
        .map_err(|e| PayloadError::Malformed(format!("not a Grafana webhook payload: {e}")))?;
    n.validate(GRAFANA_VERSION, "Grafana's webhook contact point sends version \"1\"")?;
    Ok(n)
}

/// Parses an RFC 3339 time as Alertmanager writes it.
pub fn parse_time(s: &str) -> Option<Timestamp> {
    s.parse().ok()
}

/// Whether a time is absent or Go's zero time, which Alertmanager sends for "not ended".
pub fn is_zero_time(s: &str) -> bool {
    s.is_empty() || parse_time(s).is_some_and(|t| t.as_second() < -62_000_000_000)
}

fn valid_status(s: &str) -> bool {
    s == "firing" || s == "resolved"
}

impl Notification {
    /// Checks what serde cannot: the version, the statuses, the times.
    pub fn validate(&self, version: &str, hint: &str) -> Result<(), PayloadError> {
        let invalid = |m: String| Err(PayloadError::Invalid(m));
        if self.version != version {
            return invalid(format!("payload version {:?} is not supported; {hint}", self.version));
        }
        if self.group_key.is_empty() {
            return invalid("groupKey is empty".into());
        }
        if !valid_status(&self.status) {
            return invalid(format!("status {:?} is neither \"firing\" nor \"resolved\"", self.status));
        }
        if self.alerts.is_empty() {
            return invalid("the notification has no alerts".into());
        }
        for (i, a) in self.alerts.iter().enumerate() {
            if !valid_status(&a.status) {
                return invalid(format!("alerts[{i}].status {:?} is neither \"firing\" nor \"resolved\"", a.status));
            }
            if parse_time(&a.starts_at).is_none() {
                return invalid(format!("alerts[{i}].startsAt {:?} is not an RFC 3339 time", a.starts_at));
            }
            if !a.ends_at.is_empty() && parse_time(&a.ends_at).is_none() {
                return invalid(format!("alerts[{i}].endsAt {:?} is not an RFC 3339 time", a.ends_at));
            }
        }
        Ok(())
    }

    /// The alerts that fire.
    pub fn firing(&self) -> impl Iterator<Item = &Alert> {
        self.alerts.iter().filter(|a| a.status == "firing")
    }

    /// The alerts that resolved.
    pub fn resolved(&self) -> impl Iterator<Item = &Alert> {
        self.alerts.iter().filter(|a| a.status == "resolved")
    }

    /// A digest of what makes this notification itself: its group, status, and each alert's
    /// identity and times. A retry of the same notification has the same key; the next one
    /// (an alert added, resolved, or restarted) has another. 16 hex digits.
    pub fn key(&self) -> String {
        let mut alerts: Vec<(String, String, String, &str)> = self
            .alerts
            .iter()
            .map(|a| (a.identity(), normal_time(&a.starts_at), normal_time(&a.ends_at), a.status.as_str()))
            .collect();
        alerts.sort();
        // JSON as the canonical encoding: no separator in a label can make two inputs collide.
        let canonical = serde_json::to_vec(&(&self.group_key, &self.status, &alerts)).unwrap_or_default();
        let digest = Sha256::digest(&canonical);
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// The alertname label of the group, if all alerts share it.
    pub fn alertname(&self) -> Option<&str> {
        self.common_labels.get("alertname").map(String::as_str)
    }

    /// Alertmanager's default email subject: `[FIRING:2] <group label values> (<other common label values>)`.
    pub fn default_subject(&self) -> String {
        let mut subject = self.status.to_uppercase();
        if self.status == "firing" {
            subject = format!("{subject}:{}", self.firing().count());
        }
        let mut out = format!("[{subject}] {}", sorted_values(&self.group_labels).join(" "));
        let others: BTreeMap<String, String> = self
            .common_labels
            .iter()
            .filter(|(k, _)| !self.group_labels.contains_key(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !others.is_empty() {
            out = format!("{out} ({})", sorted_values(&others).join(" "));
        }
        out.trim().to_string()
    }
}

impl Alert {
    /// The fingerprint, or the labels when a sender left it out.
    pub fn identity(&self) -> String {
        if self.fingerprint.is_empty() {
            serde_json::to_string(&self.labels).unwrap_or_default()
        } else {
            self.fingerprint.clone()
        }
    }

    /// The alert's name.
    pub fn name(&self) -> &str {
        self.labels.get("alertname").map(String::as_str).unwrap_or("")
    }

    /// The alert's `severity` label.
    pub fn severity(&self) -> Option<&str> {
        self.labels.get("severity").map(String::as_str)
    }
}

/// Label values in Alertmanager's order: `alertname` first, then by label name.
pub fn sorted_values(labels: &BTreeMap<String, String>) -> Vec<&str> {
    let first = labels.get("alertname").map(String::as_str);
    first.into_iter().chain(labels.iter().filter(|(k, _)| *k != "alertname").map(|(_, v)| v.as_str())).collect()
}

fn normal_time(s: &str) -> String {
    if is_zero_time(s) { String::new() } else { parse_time(s).map(|t| t.to_string()).unwrap_or_else(|| s.to_string()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRING: &str = include_str!("../../tests/fixtures/alertmanager-firing.json");

    fn firing() -> Notification {
        parse(FIRING.as_bytes()).expect("the fixture is valid")
    }

    #[test]
    fn the_recorded_payload_parses() {
        let n = firing();
        assert_eq!(n.version, "4");
        assert_eq!(n.status, "firing");
        assert_eq!(n.receiver, "mailroom-platform");
        assert_eq!(n.alerts.len(), 2);
        assert_eq!(n.firing().count(), 2);
        assert_eq!(n.alertname(), Some("KubePodCrashLooping"));
        assert!(n.external_url.starts_with("http://"));
        assert!(is_zero_time(&n.alerts[0].ends_at));
        assert!(!is_zero_time(&n.alerts[0].starts_at));
    }

    #[test]
    fn grafanas_payload_is_version_1_with_its_own_fields() {
        let g = parse_grafana(include_bytes!("../../tests/fixtures/grafana-firing.json")).unwrap();
        assert_eq!((g.org_id, g.state.as_deref()), (Some(1), Some("alerting")));
        assert_eq!(g.title.as_deref(), Some("[FIRING:2] Platform (blue)"));
        assert_eq!(g.alerts[0].values.as_ref().unwrap()["B"], serde_json::json!(44.23943737541908));
        assert!(g.alerts[0].image_url.as_deref().unwrap().ends_with(".png"));
        assert_eq!(g.key().len(), 16);
        let e = parse(include_bytes!("../../tests/fixtures/grafana-firing.json")).unwrap_err();
        assert!(e.to_string().contains("version \"1\" is not supported"), "{e}");
        let e = parse_grafana(FIRING.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("Grafana's webhook contact point sends version \"1\""), "{e}");
    }

    #[test]
    fn the_subject_is_alertmanagers_default() {
        let n = firing();
        assert_eq!(n.default_subject(), "[FIRING:2] KubePodCrashLooping shop (api kube-state-metrics critical)");
        let mut resolved = n.clone();
        resolved.status = "resolved".into();
        resolved.common_labels = resolved.group_labels.clone();
        assert_eq!(resolved.default_subject(), "[RESOLVED] KubePodCrashLooping shop");
    }

    #[test]
    fn malformed_bodies_are_400_with_serdes_reason() {
        for body in [&b"not json"[..], b"{}", b"[]", br#"{"version":"4"}"#] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.status_code(), 400, "{e}");
        }
        let e = parse(br#"{"version":"4","status":"firing","alerts":[]}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `groupKey`"), "{e}");
    }

    #[test]
    fn invalid_content_is_422_and_says_what() {
        let cases: [(&str, &str); 6] = [
            ("/version", "version \"3\" is not supported"),
            ("/status", "status \"burning\""),
            ("/alerts/0/status", "alerts[0].status \"burning\""),
            ("/alerts/1/startsAt", "alerts[1].startsAt \"burning\""),
            ("/alerts/1/endsAt", "alerts[1].endsAt \"burning\""),
            ("/groupKey", "groupKey is empty"),
        ];
        for (pointer, words) in cases {
            let mut v: serde_json::Value = serde_json::from_str(FIRING).unwrap();
            let slot = v.pointer_mut(pointer).unwrap();
            *slot = serde_json::Value::String(match pointer {
                "/version" => "3".into(),
                "/groupKey" => String::new(),
                _ => "burning".into(),
            });
            let e = parse(&serde_json::to_vec(&v).unwrap()).unwrap_err();
            assert_eq!(e.status_code(), 422, "{pointer}: {e}");
            assert!(e.to_string().contains(words), "{pointer}: {e}");
        }
        let mut v: serde_json::Value = serde_json::from_str(FIRING).unwrap();
        v["alerts"] = serde_json::json!([]);
        assert!(parse(&serde_json::to_vec(&v).unwrap()).unwrap_err().to_string().contains("no alerts"));
    }

    #[test]
    fn the_key_ignores_order_and_annotations_but_not_identity_status_or_times() {
        let n = firing();
        let key = n.key();
        assert_eq!(key.len(), 16);
        assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
        let mut reordered = n.clone();
        reordered.alerts.reverse();
        reordered.alerts[0].annotations.insert("description".into(), "changed wording".into());
        reordered.common_annotations.clear();
        assert_eq!(reordered.key(), key, "a retry with reordered alerts is the same notification");

        let mut resolved = n.clone();
        resolved.status = "resolved".into();
        resolved.alerts[0].status = "resolved".into();
        resolved.alerts[0].ends_at = "2025-10-14T09:02:37.482Z".into();
        assert_ne!(resolved.key(), key);

        let mut restarted = n.clone();
        restarted.alerts[1].starts_at = "2025-10-14T10:00:00Z".into();
        assert_ne!(restarted.key(), key);

        let mut other_group = n.clone();
        other_group.group_key.push('x');
        assert_ne!(other_group.key(), key);

        let mut added = n.clone();
        let mut third = added.alerts[0].clone();
        third.fingerprint = "0123456789abcdef".into();
        added.alerts.push(third);
        assert_ne!(added.key(), key);
    }

    #[test]
    fn the_same_time_written_differently_is_the_same_key() {
        let n = firing();
        let mut other = n.clone();
        other.alerts[0].starts_at = "2025-10-14T10:21:37.482+02:00".into();
        other.alerts[0].ends_at = String::new();
        assert_eq!(other.key(), n.key());
    }

    #[test]
    fn a_missing_fingerprint_falls_back_to_the_labels() {
        let mut n = firing();
        n.alerts.iter_mut().for_each(|a| a.fingerprint.clear());
        let key = n.key();
        n.alerts[0].labels.insert("pod".into(), "another".into());
        assert_ne!(n.key(), key);
    }

    #[test]
    fn alertmanagers_label_order_puts_alertname_first() {
        let labels: BTreeMap<String, String> =
            [("a", "1"), ("alertname", "X"), ("z", "2")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(sorted_values(&labels), ["X", "1", "2"]);
    }
}
