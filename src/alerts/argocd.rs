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

    /// Every value a Go template renders, stood in for by a JSON string, line by line.
    fn stand_in(body: &str) -> String {
        body.lines()
            .map(|line| match line.split_once(": ") {
                Some((key, value)) if value.contains("{{") => {
                    format!("{key}: \"v\"{}", if value.trim_end().ends_with(',') { "," } else { "" })
                }
                _ => line.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// deploy/argocd's templates render the body this module reads, one per shipped event, with
    /// every field; the webhook service sends the route's token as a bearer token.
    #[test]
    fn the_shipped_templates_render_what_the_receiver_reads() {
        let cm: k8s_openapi::api::core::v1::ConfigMap =
            serde_yaml::from_str(include_str!("../../deploy/argocd/argocd-notifications-cm.yaml")).unwrap();
        let data = cm.data.unwrap();
        let fields: Vec<String> = match serde_json::to_value(parse(br#"{"event":"e","app":"a"}"#).unwrap()).unwrap() {
            Value::Object(m) => m.keys().cloned().collect(),
            _ => unreachable!(),
        };
        for (event, _) in EVENTS {
            let template: serde_yaml::Value =
                serde_yaml::from_str(&data[&format!("template.mailroom-app-{event}")]).unwrap();
            let body = template["webhook"]["mailroom"]["body"].as_str().expect("a body");
            assert_eq!(template["webhook"]["mailroom"]["method"].as_str(), Some("POST"));
            let rendered: Value =
                serde_json::from_str(&stand_in(body)).unwrap_or_else(|e| panic!("{event}: {e}\n{body}"));
            for f in &fields {
                assert!(rendered.get(f).is_some(), "{event}: the template lacks {f}");
            }
            let n = parse(rendered.to_string().as_bytes()).unwrap();
            assert_eq!(n.event, event);
            let trigger: serde_yaml::Value =
                serde_yaml::from_str(&data[&format!("trigger.on-mailroom-{event}")]).unwrap();
            assert_eq!(trigger[0]["send"][0].as_str(), Some(format!("mailroom-app-{event}").as_str()));
        }
        let service: serde_yaml::Value = serde_yaml::from_str(&data["service.webhook.mailroom"]).unwrap();
        assert!(service["url"].as_str().unwrap().contains("/alerts/team-a/deploys"));
        let auth = service["headers"].as_sequence().unwrap().iter().find(|h| h["name"] == "Authorization").unwrap();
        assert_eq!(auth["value"].as_str(), Some("Bearer $mailroom-token"));
    }

    #[test]
    fn a_body_without_event_or_app_is_refused() {
        assert_eq!(parse(br#"{"app":"x"}"#).unwrap_err().status_code(), 400);
        assert_eq!(parse(br#"{"event":"","app":"x"}"#).unwrap_err().status_code(), 422);
        assert_eq!(parse(br#"{"event":"sync-failed","app":"<no value>"}"#).unwrap_err().status_code(), 422);
    }
}
