//! Flux notification-controller's events, as its `generic` and `generic-hmac` Providers post them:
//! the JSON of an Event (https://fluxcd.io/flux/components/notification/events/; the Go type is
//! `github.com/fluxcd/pkg/apis/event/v1beta1.Event`), with the `Gotk-Component` header naming the
//! controller (https://fluxcd.io/flux/components/notification/providers/#generic-webhook).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::payload::{PayloadError, parse_time};

/// The header carrying the reporting controller's name.
pub const COMPONENT_HEADER: &str = "Gotk-Component";

/// The object an event is about.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct InvolvedObject {
    /// Its kind (Kustomization, HelmRelease, GitRepository, ...).
    pub kind: String,
    /// Its namespace.
    #[serde(default)]
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its uid.
    #[serde(default)]
    pub uid: String,
    /// Its API version.
    #[serde(default)]
    pub api_version: String,
}

/// One Flux event.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FluxEvent {
    /// The object the event is about.
    pub involved_object: InvolvedObject,
    /// `info` or `error` (`trace` is never forwarded to providers).
    pub severity: String,
    /// When the event was emitted (RFC 3339).
    pub timestamp: String,
    /// The human-readable message.
    pub message: String,
    /// A CamelCase reason (ReconciliationSucceeded, ValidationFailed, ...).
    #[serde(default)]
    pub reason: String,
    /// Extra data: the revision (`<group>/revision`), the Alert's summary, ...
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// The controller that emitted it.
    #[serde(default)]
    pub reporting_controller: String,
    /// The controller's instance.
    #[serde(default)]
    pub reporting_instance: String,
}

/// Reads and validates an event.
pub fn parse(body: &[u8]) -> Result<FluxEvent, PayloadError> {
    let e: FluxEvent =
        serde_json::from_slice(body).map_err(|e| PayloadError::Malformed(format!("not a Flux event: {e}")))?;
    let invalid = |m: &str| Err(PayloadError::Invalid(m.to_string()));
    if e.involved_object.kind.is_empty() || e.involved_object.name.is_empty() {
        return invalid("involvedObject needs a kind and a name");
    }
    if e.severity.is_empty() {
        return invalid("severity is empty");
    }
    if parse_time(&e.timestamp).is_none() {
        return Err(PayloadError::Invalid(format!("timestamp {:?} is not an RFC 3339 time", e.timestamp)));
    }
    if e.message.trim().is_empty() {
        return invalid("message is empty");
    }
    Ok(e)
}

impl FluxEvent {
    /// A digest of the whole event: notification-controller retries the same bytes (4 times),
    /// and a new event has at least a new timestamp. 16 hex digits.
    pub fn key(&self) -> String {
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        Sha256::digest(&canonical).iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// The source revision, from the metadata key `<group>/revision` (or `revision`).
    pub fn revision(&self) -> &str {
        self.metadata
            .iter()
            .find(|(k, _)| *k == "revision" || k.ends_with("/revision"))
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }

    /// The Alert's `spec.eventMetadata.summary` (or the deprecated `spec.summary`), which
    /// notification-controller adds as metadata `summary`.
    pub fn summary(&self) -> &str {
        self.metadata.get("summary").map(String::as_str).unwrap_or("")
    }

    /// What templates see (see the README's Flux section).
    pub fn context(&self, component: Option<&str>) -> Map<String, Value> {
        let o = &self.involved_object;
        let component = component.filter(|c| !c.is_empty()).unwrap_or(&self.reporting_controller);
        let value = json!({
            "kind": o.kind,
            "name": o.name,
            "namespace": o.namespace,
            "object": format!("{}/{}", o.kind, if o.namespace.is_empty() { o.name.clone() } else { format!("{}/{}", o.namespace, o.name) }),
            "involvedObject": o,
            "severity": self.severity,
            "reason": self.reason,
            "message": self.message,
            "revision": self.revision(),
            "summary": self.summary(),
            "metadata": self.metadata,
            "extraMetadata": self.metadata.iter()
                .filter(|(k, _)| *k != "summary" && *k != "revision" && !k.ends_with("/revision"))
                .collect::<BTreeMap<_, _>>(),
            "timestamp": self.timestamp,
            "reportingController": self.reporting_controller,
            "component": component,
        });
        match value {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ERROR: &str = include_str!("../../tests/fixtures/flux-event-error.json");

    #[test]
    fn the_recorded_event_parses_with_its_revision() {
        let e = parse(ERROR.as_bytes()).unwrap();
        assert_eq!(e.involved_object.kind, "Kustomization");
        assert_eq!(e.severity, "error");
        assert_eq!(e.revision(), "main@sha1:731f7eaddfb6af01cb2173e18f0f75b0ba780ef1");
        let ctx = e.context(Some("kustomize-controller"));
        assert_eq!(ctx["object"], "Kustomization/apps/webapp");
        assert_eq!(ctx["component"], "kustomize-controller");
    }

    #[test]
    fn the_key_is_the_whole_event() {
        let e = parse(ERROR.as_bytes()).unwrap();
        let key = e.key();
        assert_eq!(key.len(), 16);
        // The same event posted again (a retry) has the same key, whatever the JSON's layout.
        let v: Value = serde_json::from_str(ERROR).unwrap();
        assert_eq!(parse(v.to_string().as_bytes()).unwrap().key(), key);
        let mut later = e.clone();
        later.timestamp = "2022-10-28T07:31:19Z".into();
        assert_ne!(later.key(), key, "the same message emitted again later is a new event");
        let mut other = e.clone();
        other.involved_object.name = "other".into();
        assert_ne!(other.key(), key);
    }

    #[test]
    fn bad_events_say_why() {
        assert_eq!(parse(b"[]").unwrap_err().status_code(), 400);
        let mut v: Value = serde_json::from_str(ERROR).unwrap();
        v["timestamp"] = "yesterday".into();
        let e = parse(v.to_string().as_bytes()).unwrap_err();
        assert_eq!((e.status_code(), e.to_string().contains("timestamp")), (422, true), "{e}");
        let mut v: Value = serde_json::from_str(ERROR).unwrap();
        v["involvedObject"]["name"] = "".into();
        assert_eq!(parse(v.to_string().as_bytes()).unwrap_err().status_code(), 422);
    }
}
