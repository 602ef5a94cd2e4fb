//! Argo CD Notifications' `webhook` service
//! (https://argo-cd.readthedocs.io/en/stable/operator-manual/notifications/services/webhook/):
//! Argo CD posts whatever body its template renders, so mailroom ships the templates
//! (deploy/argocd/argocd-notifications-cm.yaml) and reads the JSON they render.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::payload::PayloadError;

/// The events the shipped triggers send, and whether each is bad news.
pub const EVENTS: [(&str, bool); 3] = [("sync-succeeded", false), ("sync-failed", true), ("health-degraded", true)];

/// The body rendered by mailroom's Argo CD templates. Every field but `event` and `app` may be
/// absent or null (an Application that never synced has no operation state).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ArgoNotification {
    /// `sync-succeeded`, `sync-failed`, `health-degraded`, or a name of the user's own trigger.
    pub event: String,
    /// The Application's name.
    pub app: String,
    /// The Application's namespace.
    #[serde(default, deserialize_with = "text")]
    pub app_namespace: String,
    /// Its AppProject.
    #[serde(default, deserialize_with = "text")]
    pub project: String,
    /// The namespace it deploys to.
    #[serde(default, deserialize_with = "text")]
    pub destination_namespace: String,
    /// `status.sync.status`: Synced, OutOfSync, Unknown.
    #[serde(default, deserialize_with = "text")]
    pub sync_status: String,
    /// `status.health.status`: Healthy, Progressing, Degraded, Suspended, Missing, Unknown.
    #[serde(default, deserialize_with = "text")]
    pub health_status: String,
    /// `status.sync.revision`.
    #[serde(default, deserialize_with = "text")]
    pub revision: String,
    /// `spec.source.repoURL`.
    #[serde(default, rename = "repoURL", deserialize_with = "text")]
    pub repo_url: String,
    /// `status.operationState.phase`: Succeeded, Failed, Error, Running.
    #[serde(default, deserialize_with = "text")]
    pub operation_phase: String,
    /// `status.operationState.message`.
    #[serde(default, deserialize_with = "text")]
    pub operation_message: String,
    /// `status.operationState.startedAt`.
    #[serde(default, deserialize_with = "text")]
    pub started_at: String,
    /// `status.operationState.finishedAt`.
    #[serde(default, deserialize_with = "text")]
    pub finished_at: String,
    /// `status.reconciledAt`: tells two notifications of the same state apart.
    #[serde(default, deserialize_with = "text")]
    pub reconciled_at: String,
    /// The Application's page (`{{.context.argocdUrl}}/applications/...`).
    #[serde(default, rename = "appURL", deserialize_with = "text")]
    pub app_url: String,
}

/// A string field that a Go template may render as null (toJson of a missing value) or as
/// `<no value>` (a missing map key printed): both are empty.
fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v: Option<String> = Option::deserialize(d)?;
    Ok(v.filter(|s| s != "<no value>").unwrap_or_default())
}

/// Reads and validates a notification.
pub fn parse(body: &[u8]) -> Result<ArgoNotification, PayloadError> {
    let n: ArgoNotification = serde_json::from_slice(body)
        .map_err(|e| PayloadError::Malformed(format!("not the body of mailroom's Argo CD templates: {e}")))?;
    if n.event.trim().is_empty() || n.event.contains(char::is_control) {
        return Err(PayloadError::Invalid("event is empty".into()));
    }
    if n.app.trim().is_empty() || n.app == "<no value>" {
        return Err(PayloadError::Invalid("app is empty".into()));
    }
    Ok(n)
}

impl ArgoNotification {
    /// A digest of the whole notification: Argo CD retries the same rendered body (3 times); the
    /// next notification differs at least in `reconciledAt` or the operation's times. 16 hex digits.
    pub fn key(&self) -> String {
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        Sha256::digest(&canonical).iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// `error` for the shipped bad-news events, a failed operation or a degraded app; else `info`.
    pub fn severity(&self) -> &'static str {
        let known_bad = EVENTS.iter().any(|(e, bad)| *bad && *e == self.event);
        let failed = matches!(self.operation_phase.as_str(), "Failed" | "Error");
        if known_bad || failed || self.health_status == "Degraded" { "error" } else { "info" }
    }

    /// What templates see (see the README's Argo CD section).
    pub fn context(&self) -> Map<String, Value> {
        let title = match self.event.as_str() {
            "sync-succeeded" => "sync succeeded".to_string(),
            "sync-failed" => "sync failed".to_string(),
            "health-degraded" => "health degraded".to_string(),
            other => other.replace('-', " "),
        };
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            m.insert("severity".into(), json!(self.severity()));
            m.insert("title".into(), json!(title));
            m.insert("shortRevision".into(), json!(self.revision.chars().take(8).collect::<String>()));
            return m.clone();
        }
        Map::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAILED: &str = include_str!("../../tests/fixtures/argocd-sync-failed.json");

    #[test]
    fn the_rendered_body_parses() {
        let n = parse(FAILED.as_bytes()).unwrap();
        assert_eq!((n.event.as_str(), n.app.as_str(), n.severity()), ("sync-failed", "guestbook", "error"));
        assert!(n.operation_message.contains("\"guestbook-ui\""), "quotes survive toJson");
        let ctx = n.context();
        assert_eq!(ctx["title"], "sync failed");
        assert_eq!(ctx["shortRevision"], "4e9c917f");
    }

    #[test]
    fn missing_values_are_empty_and_the_key_is_the_body() {
        let body = br#"{"event":"sync-succeeded","app":"guestbook","revision":null,"healthStatus":"<no value>","reconciledAt":"2025-10-14T08:00:00Z"}"#;
        let n = parse(body).unwrap();
        assert_eq!((n.revision.as_str(), n.health_status.as_str(), n.severity()), ("", "", "info"));
        let mut later = n.clone();
        later.reconciled_at = "2025-10-14T09:00:00Z".into();
        assert_ne!(later.key(), n.key());
        assert_eq!(parse(body).unwrap().key(), n.key(), "a retry has the same key");
    }

    #[test]
    fn a_body_without_event_or_app_is_refused() {
        assert_eq!(parse(br#"{"app":"x"}"#).unwrap_err().status_code(), 400);
        assert_eq!(parse(br#"{"event":"","app":"x"}"#).unwrap_err().status_code(), 422);
        assert_eq!(parse(br#"{"event":"sync-failed","app":"<no value>"}"#).unwrap_err().status_code(), 422);
    }
}
