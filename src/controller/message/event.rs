//! The Events a message's steps publish.

use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use tracing::warn;

use super::super::context::Context;
use super::super::reason::Reason;
use crate::api::EmailMessage;

/// The `reportingController` of the operator's Events.
pub const REPORTING_CONTROLLER: &str = "mailroom";

/// Publishes an Event on the message; a failure to publish is logged, never fatal.
///
/// Events are created directly rather than through kube's `Recorder`, which keeps every Event it
/// published for six minutes (to count repeats as a series) and scans that cache under a lock on
/// every publish: with thousands of messages, each with an Event or two and hardly any repeats,
/// that cache was the largest part of the operator's memory and a CPU cost growing with the run.
pub async fn event(ctx: &Context, msg: &EmailMessage, type_: EventType, reason: Reason, note: &str) {
    let ev = message_event(msg, type_, reason, note, &ctx.config.instance, Timestamp::now());
    let ns = msg.namespace().unwrap_or_default();
    let api: Api<K8sEvent> = Api::namespaced(ctx.client.clone(), &ns);
    if let Err(e) = api.create(&PostParams::default(), &ev).await {
        warn!(message = %msg.name_any(), error = %e, "could not publish event");
    }
}

/// The longest Event note kept, in bytes (the API server's limit is 1 KiB).
pub const MAX_NOTE: usize = 1000;

/// The events.k8s.io/v1 Event about a message, named like kube's Recorder names them.
pub fn message_event(
    msg: &EmailMessage,
    type_: EventType,
    reason: Reason,
    note: &str,
    instance: &str,
    now: Timestamp,
) -> K8sEvent {
    // The API server refuses an Event whose note is over 1 KiB.
    let note = crate::text::prefix(note, MAX_NOTE).to_string();
    let name = msg.name_any();
    K8sEvent {
        metadata: ObjectMeta {
            namespace: msg.namespace(),
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            ..Default::default()
        },
        action: Some("Send".into()),
        reason: Some(reason.as_str().to_string()),
        note: Some(note),
        type_: Some(match type_ {
            EventType::Normal => "Normal".into(),
            EventType::Warning => "Warning".into(),
        }),
        event_time: Some(MicroTime(now)),
        regarding: Some(msg.object_ref(&())),
        reporting_controller: Some(REPORTING_CONTROLLER.into()),
        reporting_instance: Some(instance.to_string()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_name_the_message_and_the_instance_and_clip_the_note() {
        let msg: EmailMessage = serde_json::from_value(serde_json::json!({
            "apiVersion": "mailroom.dev/v1alpha1", "kind": "EmailMessage",
            "metadata": {"name": "m", "namespace": "ns", "uid": "u1"},
            "spec": {"profileRef": {"name": "p"}, "to": ["b@contoso.com"], "subject": "s", "body": {"text": "t"}},
        }))
        .unwrap();
        let now: Timestamp = "2026-11-28T12:00:00Z".parse().unwrap();
        let long = "é".repeat(600);
        let ev = message_event(&msg, EventType::Warning, Reason::Failed, &long, "mailroom-0", now);
        assert_eq!(ev.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(ev.metadata.name, Some(format!("m.{:x}", now.as_nanosecond())));
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        assert_eq!(ev.reason.as_deref(), Some("Failed"));
        assert_eq!(ev.action.as_deref(), Some("Send"));
        assert_eq!(ev.reporting_controller.as_deref(), Some("mailroom"));
        assert_eq!(ev.reporting_instance.as_deref(), Some("mailroom-0"));
        let regarding = ev.regarding.unwrap();
        assert_eq!((regarding.kind.as_deref(), regarding.uid.as_deref()), (Some("EmailMessage"), Some("u1")));
        let note = ev.note.unwrap();
        assert!(note.len() <= 1000 && note.chars().all(|c| c == 'é'), "{}", note.len());
    }
}
