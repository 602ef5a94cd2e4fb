//! What the message cache keeps: enough to decide, not enough to send.
//!
//! The cache holds every EmailMessage in scope, Sent ones included, for as long as they exist.
//! Bodies, inline attachments, custom headers and managed fields are most of an object's size and
//! only matter when the message is built, so they are dropped on the way in; the reconciler reads
//! the whole object from the API server right before it builds and claims a message.

use crate::api::EmailMessage;

/// Annotation in which `kubectl apply` keeps a whole copy of the object.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what the cache need not keep: the subject, bodies, inline attachment data, custom
/// headers, template values, managed fields and kubectl's copy of the object. Recipients, the sender, the profile,
/// delivery settings, the TTL and the status stay: they decide whether and when a message goes.
pub fn strip_for_cache(msg: &mut EmailMessage) {
    msg.metadata.managed_fields = None;
    if let Some(annotations) = msg.metadata.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
    let spec = &mut msg.spec;
    spec.subject = String::new();
    spec.body.text = None;
    spec.body.html = None;
    spec.headers.clear();
    spec.values = None;
    for a in &mut spec.attachments {
        a.data = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> EmailMessage {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "mailroom.dev/v1alpha1", "kind": "EmailMessage",
            "metadata": {
                "name": "m", "namespace": "ns", "uid": "u1", "resourceVersion": "7",
                "annotations": {LAST_APPLIED: "{\"big\":true}", "team": "a"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
            },
            "spec": {
                "profileRef": {"name": "relay"}, "from": "a@contoso.com",
                "to": ["b@contoso.com"], "cc": ["c@contoso.com"], "bcc": ["d@contoso.com"],
                "subject": "hello", "body": {"text": "body", "html": "<p>body</p>"},
                "attachments": [{"name": "a.txt", "data": "aGk="}],
                "headers": {"X-Run": "1"}, "ttlSecondsAfterFinished": 60,
                "templateRef": {"name": "release"}, "values": {"version": "1.4.2"},
                "delivery": {"maxAttempts": 2},
            },
            "status": {"phase": "Sent", "attempts": 1},
        }))
        .expect("EmailMessage")
    }

    #[test]
    fn drops_the_bulky_parts() {
        let mut m = full();
        strip_for_cache(&mut m);
        assert!(m.metadata.managed_fields.is_none());
        let annotations = m.metadata.annotations.clone().unwrap_or_default();
        assert!(!annotations.contains_key(LAST_APPLIED));
        assert_eq!(annotations.get("team").map(String::as_str), Some("a"));
        assert_eq!(m.spec.subject, "");
        assert_eq!((m.spec.body.text.as_deref(), m.spec.body.html.as_deref()), (None, None));
        assert!(m.spec.headers.is_empty());
        assert!(m.spec.values.is_none());
        assert_eq!(m.spec.attachments.len(), 1);
        assert_eq!(m.spec.attachments[0].name, "a.txt");
        assert!(m.spec.attachments[0].data.is_none());
    }

    #[test]
    fn keeps_what_decides_whether_and_when_to_send() {
        let original = full();
        let mut m = original.clone();
        strip_for_cache(&mut m);
        assert_eq!(m.metadata.resource_version, original.metadata.resource_version);
        assert_eq!(m.metadata.uid, original.metadata.uid);
        assert_eq!(m.spec.profile_ref, original.spec.profile_ref);
        assert_eq!(m.spec.from, original.spec.from);
        assert_eq!((&m.spec.to, &m.spec.cc, &m.spec.bcc), (&original.spec.to, &original.spec.cc, &original.spec.bcc));
        assert_eq!(m.spec.delivery, original.spec.delivery);
        assert_eq!(m.spec.template_ref, original.spec.template_ref);
        assert_eq!(m.spec.ttl_seconds_after_finished, original.spec.ttl_seconds_after_finished);
        assert_eq!(m.status, original.status);
    }
}
