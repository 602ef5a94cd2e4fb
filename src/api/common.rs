//! Types shared by the profile and message resources.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every mailroom resource.
pub const GROUP: &str = "mailroom.dev";
/// The API version served.
pub const VERSION: &str = "v1alpha1";

/// A key in a Secret. A cluster-scoped profile names the Secret's namespace; a namespaced profile
/// may only reference Secrets in its own namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    /// Name of the Secret.
    pub name: String,
    /// Key in the Secret's data.
    pub key: String,
    /// Namespace of the Secret (ClusterMailProfile only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A whole Secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Name of the Secret.
    pub name: String,
    /// Namespace of the Secret (ClusterMailProfile only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A key in a Secret or ConfigMap of the message's own namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalKeySelector {
    /// Name of the Secret or ConfigMap.
    pub name: String,
    /// Key in its data.
    pub key: String,
}

/// Condition types and reasons written by mailroom.
pub mod conditions {
    /// A profile can send.
    pub const READY: &str = "Ready";
    /// What is known of the profile's app's permission to send (advice; it never blocks).
    pub const PERMISSIONS_VERIFIED: &str = "PermissionsVerified";
    /// A message was delivered.
    pub const SENT: &str = "Sent";
    /// A message has finished, sent or failed.
    pub const FAILED: &str = "Failed";
    /// A message waits for something outside it (its profile, a Secret).
    pub const WAITING: &str = "Waiting";
    /// A GitOps-managed message with a TTL and no idempotency key: it is sent again each time the
    /// GitOps tool re-creates it after its TTL.
    pub const RECREATION_RISK: &str = "RecreationRisk";
}

/// Finds a condition by type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Builds a condition, keeping the previous transition time when the status did not change.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Time,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = match find_condition(previous, type_) {
        Some(old) if old.status == status => old.last_transition_time.clone(),
        _ => now,
    };
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// Replaces (or adds) the condition of the same type.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(slot) => *slot = new,
        None => conditions.push(new),
    }
}

/// Whether two statuses differ in anything a reader would see: everything but their conditions'
/// transition times. Writing a status that does not differ is skipped.
pub fn differs_beyond_transition_times<T: Clone + PartialEq>(
    a: &T,
    b: &T,
    conditions: fn(&mut T) -> &mut Vec<Condition>,
) -> bool {
    let strip = |s: &T| {
        let mut s = s.clone();
        for c in conditions(&mut s) {
            c.last_transition_time = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        }
        s
    };
    strip(a) != strip(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_kept_when_status_unchanged() {
        let first = condition(&[], "Ready", false, "SecretMissing", "a", Some(1), at(10));
        let again = condition(std::slice::from_ref(&first), "Ready", false, "KeyMissing", "b", Some(2), at(20));
        assert_eq!(again.last_transition_time, at(10));
        assert_eq!(again.reason, "KeyMissing");
        let flipped = condition(&[again], "Ready", true, "Ready", "c", Some(2), at(30));
        assert_eq!(flipped.last_transition_time, at(30));
    }

    #[test]
    fn set_condition_replaces_same_type() {
        let mut all = vec![condition(&[], "Ready", false, "X", "x", None, at(1))];
        set_condition(&mut all, condition(&[], "Ready", true, "Y", "y", None, at(2)));
        set_condition(&mut all, condition(&[], "Sent", true, "Z", "z", None, at(3)));
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].reason, "Y");
    }
}
