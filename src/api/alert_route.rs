//! `AlertRoute`: where the notifications posted to one webhook URL are sent, by Alertmanager,
//! Flux's notification-controller, Argo CD Notifications or Grafana alerting.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::LocalKeySelector;
use super::message::{Delivery, Importance, ProfileRef, mailbox_list_rule, mailbox_rule};

/// Default `ttlSecondsAfterFinished` of the messages a route creates: a week.
pub const DEFAULT_ALERT_TTL_SECONDS: i64 = 7 * 24 * 3600;

/// Default `retryWindowSeconds`: above Alertmanager's default `group_interval` (5 minutes), within
/// which it retries, and far below its default `repeat_interval` (4 hours).
pub const DEFAULT_RETRY_WINDOW_SECONDS: i64 = 600;

/// Turns the notifications posted to `/alerts/{namespace}/{name}` into EmailMessages in the
/// route's namespace, sent with its profile to its recipients.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailroom.dev",
    version = "v1alpha1",
    kind = "AlertRoute",
    namespaced,
    shortname = "ar",
    category = "mailroom",
    status = "AlertRouteStatus",
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".status.source"}"#,
    printcolumn = r#"{"name":"Profile","type":"string","jsonPath":".spec.profileRef.name"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Received","type":"integer","jsonPath":".status.received"}"#,
    printcolumn = r#"{"name":"Created","type":"integer","jsonPath":".status.created"}"#,
    printcolumn = r#"{"name":"Rejected","type":"integer","jsonPath":".status.rejected"}"#,
    printcolumn = r#"{"name":"Last","type":"date","jsonPath":".status.lastNotificationTime"}"#,
    printcolumn = r#"{"name":"Outcome","type":"string","jsonPath":".status.lastOutcome","priority":1}"#,
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".status.url","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("size(self.metadata.name) <= 63").message("an AlertRoute's name is at most 63 characters: it labels the messages the route creates")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.to) ? size(self.to) : 0) + (has(self.cc) ? size(self.cc) : 0) > 0").message("at least one recipient is required in to or cc"))]
#[x_kube(validation = Rule::new("!(has(self.templateRef) && has(self.emailTemplateRef))").message("templateRef and emailTemplateRef exclude each other: name one template"))]
#[x_kube(validation = Rule::new("!has(self.signature) || (has(self.source) && self.source == 'grafana')").message("signature applies to source grafana only (Flux's generic-hmac signature header is fixed)"))]
pub struct AlertRouteSpec {
    /// Who posts to the route: `alertmanager` (default), `flux` (notification-controller's
    /// `generic` or `generic-hmac` Provider), `argocd` (Argo CD Notifications' `webhook` service
    /// with mailroom's body template) or `grafana` (a Grafana alerting webhook contact point).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<AlertSource>,
    /// The profile that sends the messages (the same shape as an EmailMessage's).
    pub profile_ref: ProfileRef,
    /// The sender; default: the profile's default sender. Must be allowed by the profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(mailbox_rule("self")).message("from must be an RFC 5322 mailbox such as 'Name <user@example.com>' or 'user@example.com'"))]
    #[schemars(length(max = 320))]
    pub from: Option<String>,
    /// Recipients.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new(mailbox_list_rule()).message("every address in to must be an RFC 5322 mailbox such as 'Name <user@example.com>' or 'user@example.com'"))]
    #[schemars(length(max = 100), inner(length(max = 320)))]
    pub to: Vec<String>,
    /// Copy recipients.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new(mailbox_list_rule()).message("every address in cc must be an RFC 5322 mailbox such as 'Name <user@example.com>' or 'user@example.com'"))]
    #[schemars(length(max = 100), inner(length(max = 320)))]
    pub cc: Vec<String>,
    /// The key of a Secret in the route's namespace holding the route's credential: the bearer
    /// token the sender presents (`Authorization: Bearer`), which is also the HMAC key of a signed
    /// notification (Flux `generic-hmac`, Grafana's HMAC signature).
    pub token_secret_ref: LocalKeySelector,
    /// Grafana's HMAC signature settings, when the contact point signs its requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<SignatureSettings>,
    /// A ConfigMap in the route's namespace whose keys `subject`, `text` and `html` (each optional)
    /// replace the default templates (minijinja syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_ref: Option<LocalReference>,
    /// An EmailTemplate in the route's namespace that the messages name instead (`spec.templateRef`,
    /// with the notification as `spec.values`); rendered when each message is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_template_ref: Option<LocalReference>,
    /// The importance of a notification by its severities (firing alerts' `severity` labels, Flux's
    /// and Argo CD's severity); the highest wins. Default: `{critical: high}` (Alertmanager,
    /// Grafana) or `{error: high}` (Flux, Argo CD); anything else, and resolved notifications, are normal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 32))]
    pub importance_by_severity: Option<BTreeMap<String, Importance>>,
    /// A notification received again within this many seconds of the message it created is a retry
    /// (or the same notification from the other Alertmanager of an HA pair) and creates nothing;
    /// later, it is a `repeat_interval` reminder and is sent again. Keep it above the Alertmanager
    /// route's `group_interval` and below its `repeat_interval`. Default 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub retry_window_seconds: Option<i64>,
    /// Retries and their limits of the messages created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
    /// Delete the messages this many seconds after they are Sent or Failed; default a week.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,
}

/// The sender of a route's notifications.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AlertSource {
    /// Prometheus Alertmanager's webhook receiver (payload version 4).
    #[default]
    Alertmanager,
    /// Flux's notification-controller, Provider type `generic` or `generic-hmac`.
    Flux,
    /// Argo CD Notifications' `webhook` service.
    Argocd,
    /// Grafana alerting's webhook contact point (payload version 1).
    Grafana,
}

impl AlertSource {
    /// The name used in status, labels and message names.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertSource::Alertmanager => "alertmanager",
            AlertSource::Flux => "flux",
            AlertSource::Argocd => "argocd",
            AlertSource::Grafana => "grafana",
        }
    }
}

/// Where Grafana puts its HMAC-SHA256 signature, and the timestamp it signs with.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SignatureSettings {
    /// The signature header; default `X-Grafana-Alerting-Signature`, as Grafana's. Its name ends
    /// in `-Signature`, so that the receiver knows a signed request before reading the route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.lowerAscii().endsWith('-signature')").message("the signature header's name ends in -Signature (e.g. X-Grafana-Alerting-Signature)"))]
    #[schemars(length(min = 1, max = 128))]
    pub header: Option<String>,
    /// The header carrying the Unix timestamp Grafana signs with (`timestamp:body`), if the contact
    /// point names one; Grafana has no default. A timestamp more than 5 minutes off is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub timestamp_header: Option<String>,
}

/// What the route has received, and whether it can deliver.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertRouteStatus {
    /// `Ready`: the profile resolves and the token Secret holds the key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The route's source, as defaulted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The URL to configure in the sender (the path alone when the operator is not told its
    /// address with `--alerts-url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Notifications posted to the route.
    #[serde(default)]
    pub received: i64,
    /// Notifications that created a message.
    #[serde(default)]
    pub created: i64,
    /// Notifications refused (401, 4xx, 5xx).
    #[serde(default)]
    pub rejected: i64,
    /// When the last notification arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_notification_time: Option<Time>,
    /// What became of it: `Created <message>`, `AlreadyCreated <message>`, or `Rejected <status>: <why>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_outcome: Option<String>,
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// An object in the same namespace, by name.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalReference {
    /// Its name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

impl AlertRouteSpec {
    /// `source`, defaulted.
    pub fn source(&self) -> AlertSource {
        self.source.unwrap_or_default()
    }

    /// The importance of a notification whose firing alerts carry these severities.
    pub fn importance_for<'a>(&self, firing_severities: impl IntoIterator<Item = &'a str>) -> Importance {
        let rank = |i: Importance| match i {
            Importance::Low => 0,
            Importance::Normal => 1,
            Importance::High => 2,
        };
        // Alertmanager's and Grafana's alerts say `critical`; Flux's and Argo CD's bad news `error`.
        let urgent = match self.source() {
            AlertSource::Alertmanager | AlertSource::Grafana => "critical",
            AlertSource::Flux | AlertSource::Argocd => "error",
        };
        let lookup = |severity: &str| match &self.importance_by_severity {
            Some(map) => map.get(severity).copied(),
            None => (severity == urgent).then_some(Importance::High),
        };
        firing_severities
            .into_iter()
            .map(|s| lookup(s).unwrap_or(Importance::Normal))
            .max_by_key(|i| rank(*i))
            .unwrap_or(Importance::Normal)
    }

    /// `retryWindowSeconds`, defaulted.
    pub fn retry_window_seconds(&self) -> i64 {
        self.retry_window_seconds.unwrap_or(DEFAULT_RETRY_WINDOW_SECONDS)
    }

    /// `ttlSecondsAfterFinished`, defaulted.
    pub fn ttl_seconds_after_finished(&self) -> i64 {
        self.ttl_seconds_after_finished.unwrap_or(DEFAULT_ALERT_TTL_SECONDS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(map: Option<&[(&str, Importance)]>) -> AlertRouteSpec {
        AlertRouteSpec {
            profile_ref: ProfileRef { kind: None, name: "relay".into() },
            from: None,
            to: vec!["ops@contoso.com".into()],
            cc: vec![],
            token_secret_ref: LocalKeySelector { name: "t".into(), key: "token".into() },
            source: None,
            signature: None,
            template_ref: None,
            email_template_ref: None,
            importance_by_severity: map.map(|m| m.iter().map(|(k, v)| (k.to_string(), *v)).collect()),
            retry_window_seconds: None,
            delivery: None,
            ttl_seconds_after_finished: None,
        }
    }

    #[test]
    fn critical_is_high_by_default_and_the_rest_normal() {
        let s = spec(None);
        assert_eq!(s.importance_for(["warning", "critical"]), Importance::High);
        assert_eq!(s.importance_for(["warning"]), Importance::Normal);
        assert_eq!(s.importance_for([]), Importance::Normal);
        assert_eq!(s.ttl_seconds_after_finished(), DEFAULT_ALERT_TTL_SECONDS);
        let flux = AlertRouteSpec { source: Some(AlertSource::Flux), ..spec(None) };
        assert_eq!(flux.importance_for(["error"]), Importance::High);
        assert_eq!(flux.importance_for(["info"]), Importance::Normal);
        assert_eq!(flux.importance_for(["critical"]), Importance::Normal);
    }

    #[test]
    fn a_declared_mapping_replaces_the_default_and_the_highest_wins() {
        let s = spec(Some(&[("page", Importance::High), ("info", Importance::Low), ("warning", Importance::Normal)]));
        assert_eq!(s.importance_for(["critical"]), Importance::Normal);
        assert_eq!(s.importance_for(["info"]), Importance::Low);
        assert_eq!(s.importance_for(["info", "warning"]), Importance::Normal);
        assert_eq!(s.importance_for(["info", "unmapped"]), Importance::Normal);
        assert_eq!(s.importance_for(["info", "page"]), Importance::High);
    }
}
