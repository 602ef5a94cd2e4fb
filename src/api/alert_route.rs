//! `AlertRoute`: where the Alertmanager notifications posted to one webhook URL are sent.

use std::collections::BTreeMap;

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

/// Turns the Alertmanager notifications posted to `/alerts/{namespace}/{name}` into EmailMessages
/// in the route's namespace, sent with its profile to its recipients.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailroom.dev",
    version = "v1alpha1",
    kind = "AlertRoute",
    namespaced,
    shortname = "ar",
    category = "mailroom",
    printcolumn = r#"{"name":"Profile","type":"string","jsonPath":".spec.profileRef.name"}"#,
    printcolumn = r#"{"name":"To","type":"string","jsonPath":".spec.to"}"#,
    printcolumn = r#"{"name":"Template","type":"string","jsonPath":".spec.templateRef.name"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("size(self.metadata.name) <= 63").message("an AlertRoute's name is at most 63 characters: it labels the messages the route creates")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.to) ? size(self.to) : 0) + (has(self.cc) ? size(self.cc) : 0) > 0").message("at least one recipient is required in to or cc"))]
pub struct AlertRouteSpec {
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
    /// The key of a Secret in the route's namespace holding the bearer token that Alertmanager
    /// sends (`http_config.authorization.credentials`).
    pub token_secret_ref: LocalKeySelector,
    /// A ConfigMap in the route's namespace whose keys `subject`, `text` and `html` (each optional)
    /// replace the default templates (minijinja syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_ref: Option<LocalReference>,
    /// The importance of a notification with firing alerts, by their `severity` label; the highest
    /// wins. Default: `{critical: high}`; other severities and resolved notifications are normal.
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

/// An object in the same namespace, by name.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalReference {
    /// Its name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

impl AlertRouteSpec {
    /// The importance of a notification whose firing alerts carry these severities.
    pub fn importance_for<'a>(&self, firing_severities: impl IntoIterator<Item = &'a str>) -> Importance {
        let rank = |i: Importance| match i {
            Importance::Low => 0,
            Importance::Normal => 1,
            Importance::High => 2,
        };
        let lookup = |severity: &str| match &self.importance_by_severity {
            Some(map) => map.get(severity).copied(),
            None => (severity == "critical").then_some(Importance::High),
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
            template_ref: None,
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
