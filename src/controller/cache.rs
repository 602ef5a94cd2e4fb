//! What the message cache keeps: enough to decide, not enough to send.
//!
//! The cache holds the unfinished EmailMessages in scope ([`UNFINISHED`]); finished ones are
//! cached only while they wait for `ttlSecondsAfterFinished` ([`expiring`]). Bodies, inline attachments, custom headers and managed fields are most of an object's size and
//! only matter when the message is built, so they are dropped on the way in: the claim's answer
//! from the API server is the whole object, and the message is built from it. A finished message
//! keeps even less: what deleting it after its TTL needs.

use kube::runtime::watcher::Event;

use crate::api::{EmailMessage, Phase, conditions};

/// The field selector of the messages the operator works on: those not finished. A message that
/// finishes leaves this watch (the API server sends its deletion), so finished messages, however
/// many, are neither listed at start nor kept ([custom resource field selectors](https://kubernetes.io/docs/reference/kubernetes-api/extend-resources/custom-resource-definition-v1/#CustomResourceDefinitionSpec):
/// `selectableFields`; a message without a status has an empty phase and is selected).
pub const UNFINISHED: &str = "status.phase!=Sent,status.phase!=Failed";

/// The field selector of the finished messages in `phase` (Sent or Failed): the expiry watches.
pub fn finished_in(phase: Phase) -> String {
    format!("status.phase={phase:?}")
}

/// Whether an expiry watch keeps an event: a finished message is cached only when it has a
/// `ttlSecondsAfterFinished` to honour; deletions and the list's markers always pass.
pub fn expiring(event: &Event<EmailMessage>) -> bool {
    match event {
        Event::Apply(m) | Event::InitApply(m) => m.spec.ttl_seconds_after_finished.is_some(),
        Event::Delete(_) | Event::Init | Event::InitDone => true,
    }
}

/// Drops what the cache need not keep: the subject, bodies, inline attachment data, custom
/// headers, template values, managed fields and annotations (kubectl's copy of the object among them). Recipients, the sender, the profile,
/// delivery settings, the TTL and the status stay: they decide whether and when a message goes.
pub fn strip_for_cache(msg: &mut EmailMessage) {
    msg.metadata.managed_fields = None;
    // No decision reads a message's annotations; kubectl's copy of the object is one of them.
    msg.metadata.annotations = None;
    let spec = &mut msg.spec;
    spec.subject = String::new();
    spec.body.text = None;
    spec.body.html = None;
    spec.headers.clear();
    spec.values = None;
    for a in &mut spec.attachments {
        a.data = None;
    }
    if msg.is_finished() {
        strip_finished(msg);
    }
}

/// A finished message is only looked at again to delete it after `ttlSecondsAfterFinished`, which
/// needs its phase and when it finished; with thousands present, the rest (recipients,
/// attachments, the provider's answer, condition texts) would be most of the cache.
fn strip_finished(msg: &mut EmailMessage) {
    let spec = &mut msg.spec;
    spec.from = None;
    spec.to = Vec::new();
    spec.cc = Vec::new();
    spec.bcc = Vec::new();
    spec.reply_to = Vec::new();
    spec.attachments = Vec::new();
    spec.template_ref = None;
    if let Some(s) = msg.status.as_mut() {
        s.response = None;
        s.request_id = None;
        s.message_id = None;
        s.transport = None;
        s.from = None;
        // The Failed condition's time is when a failed message finished (a sent one has sentTime;
        // one found already sent has its Sent condition's time).
        let found_sent = s.phase == Some(crate::api::Phase::Sent) && s.sent_time.is_none();
        s.conditions.retain(|c| c.type_ == conditions::FAILED || (found_sent && c.type_ == conditions::SENT));
        for c in &mut s.conditions {
            c.message = String::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Annotation in which `kubectl apply` keeps a whole copy of the object.
    const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

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
            "status": {"phase": "Pending", "attempts": 1},
        }))
        .expect("EmailMessage")
    }

    #[test]
    fn drops_the_bulky_parts() {
        let mut m = full();
        strip_for_cache(&mut m);
        assert!(m.metadata.managed_fields.is_none());
        assert!(m.metadata.annotations.is_none(), "kubectl's copy of the object and every other annotation");
        assert_eq!(m.spec.subject, "");
        assert_eq!((m.spec.body.text.as_deref(), m.spec.body.html.as_deref()), (None, None));
        assert!(m.spec.headers.is_empty());
        assert!(m.spec.values.is_none());
        assert_eq!(m.spec.attachments.len(), 1);
        assert_eq!(m.spec.attachments[0].name, "a.txt");
        assert!(m.spec.attachments[0].data.is_none());
    }

    #[test]
    fn a_finished_message_keeps_only_what_its_expiry_needs() {
        for (phase, extra) in [
            ("Sent", serde_json::json!({"sentTime": "2026-11-28T12:00:00Z", "response": "202 Accepted"})),
            ("Failed", serde_json::json!({})),
        ] {
            let mut m = full();
            let mut status = serde_json::json!({
                "phase": phase, "attempts": 1, "messageId": "<m@contoso.com>", "transport": "graph",
                "conditions": [
                    {"type": "Sent", "status": "False", "reason": "SendFailed", "message": "550 no such user",
                     "lastTransitionTime": "2026-11-28T12:00:00Z"},
                    {"type": "Failed", "status": "True", "reason": "SendFailed", "message": "550 no such user",
                     "lastTransitionTime": "2026-11-28T12:00:01Z"},
                ],
            });
            status.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            m.status = Some(serde_json::from_value(status).unwrap());
            let original = m.clone();
            strip_for_cache(&mut m);
            let s = m.status.clone().unwrap();
            assert_eq!(s.phase, original.status.as_ref().unwrap().phase);
            assert_eq!(s.sent_time, original.status.as_ref().unwrap().sent_time);
            assert_eq!(
                crate::controller::status::finished_at(&s),
                crate::controller::status::finished_at(original.status.as_ref().unwrap()),
                "{phase}: the expiry time survives"
            );
            assert!(s.response.is_none() && s.message_id.is_none() && s.transport.is_none());
            assert!(s.conditions.iter().all(|c| c.type_ == "Failed" && c.message.is_empty()));
            assert_eq!(m.spec.ttl_seconds_after_finished, original.spec.ttl_seconds_after_finished);
            assert_eq!(m.spec.profile_ref, original.spec.profile_ref);
            assert!(m.spec.to.is_empty() && m.spec.bcc.is_empty() && m.spec.attachments.is_empty());
            assert_eq!(m.metadata.uid, original.metadata.uid);
            assert!(m.metadata.annotations.is_none());
        }
    }

    #[test]
    fn keeps_what_decides_whether_and_when_to_send() {
        let mut original = full();
        original.status = Some(serde_json::from_value(serde_json::json!({"phase": "Pending", "attempts": 1})).unwrap());
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

    #[test]
    fn the_selectors_split_unfinished_from_finished() {
        assert_eq!(UNFINISHED, "status.phase!=Sent,status.phase!=Failed");
        assert_eq!(finished_in(Phase::Sent), "status.phase=Sent");
        assert_eq!(finished_in(Phase::Failed), "status.phase=Failed");
        // Every phase is in exactly one of the three watches' selections.
        for phase in [Phase::Pending, Phase::Sending, Phase::Sent, Phase::Failed] {
            let unfinished = !UNFINISHED.split(',').any(|r| r == format!("status.phase!={phase:?}"));
            assert_eq!(unfinished, !phase.is_finished(), "{phase:?}");
        }
    }

    #[test]
    fn expiry_watches_keep_only_messages_with_a_ttl() {
        let mut with_ttl = full();
        with_ttl.status = Some(serde_json::from_value(serde_json::json!({"phase": "Sent"})).unwrap());
        let mut without = with_ttl.clone();
        without.spec.ttl_seconds_after_finished = None;
        assert!(expiring(&Event::Apply(with_ttl.clone())));
        assert!(expiring(&Event::InitApply(with_ttl.clone())));
        assert!(!expiring(&Event::Apply(without.clone())));
        assert!(!expiring(&Event::InitApply(without.clone())));
        assert!(expiring(&Event::Delete(without)), "a deletion always reaches the cache");
        assert!(expiring(&Event::Init) && expiring(&Event::InitDone));
    }
}
