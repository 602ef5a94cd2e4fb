//! Idempotency keys: which key a message is sent under (its own, or one derived for a message
//! that a GitOps tool keeps in the cluster), what the `SendRecord` found under that key means,
//! and how long a sent key stays taken. Pure functions, no I/O; the reads and writes are in
//! `controller::message::key`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use crate::api::{
    EmailMessage, EmailMessageSpec, MailProfileSpec, Phase, RecordedMessage, SendRecordSpec, SendRecordState,
};

/// How long a sent key stays taken unless the message or its profile says otherwise: 30 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// The annotation that turns the derived key off: `mailroom.dev/idempotency: "off"`.
pub const IDEMPOTENCY_ANNOTATION: &str = "mailroom.dev/idempotency";

/// Argo CD's tracking label (its `label` and `annotation+label` tracking methods), also the
/// Kubernetes recommended label that Helm charts set:
/// <https://argo-cd.readthedocs.io/en/stable/user-guide/resource_tracking/>.
pub const ARGOCD_INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// Argo CD's tracking annotation (the default tracking method since Argo CD 3.0), same page.
pub const ARGOCD_TRACKING_ANNOTATION: &str = "argocd.argoproj.io/tracking-id";
/// The labels Flux's kustomize-controller sets on every object it applies (the Kustomization's
/// name and namespace): <https://fluxcd.io/flux/components/kustomize/kustomizations/>.
pub const FLUX_NAME_LABEL: &str = "kustomize.toolkit.fluxcd.io/name";
/// See [`FLUX_NAME_LABEL`].
pub const FLUX_NAMESPACE_LABEL: &str = "kustomize.toolkit.fluxcd.io/namespace";

/// The GitOps tool whose tracking metadata a message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GitOpsTool {
    /// Argo CD (its tracking label or annotation).
    ArgoCd,
    /// Flux (kustomize-controller's labels).
    Flux,
}

impl fmt::Display for GitOpsTool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GitOpsTool::ArgoCd => "Argo CD",
            GitOpsTool::Flux => "Flux",
        })
    }
}

/// The GitOps tool that manages an object, by its labels and annotations.
pub fn gitops_tool(labels: &BTreeMap<String, String>, annotations: &BTreeMap<String, String>) -> Option<GitOpsTool> {
    let set = |m: &BTreeMap<String, String>, k: &str| m.get(k).is_some_and(|v| !v.is_empty());
    if set(labels, FLUX_NAME_LABEL) || set(labels, FLUX_NAMESPACE_LABEL) {
        Some(GitOpsTool::Flux)
    } else if set(annotations, ARGOCD_TRACKING_ANNOTATION) || set(labels, ARGOCD_INSTANCE_LABEL) {
        Some(GitOpsTool::ArgoCd)
    } else {
        None
    }
}

/// Which key a message is sent under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyChoice {
    /// This key: the message's own (`derived: None`) or derived for a GitOps-managed message.
    Key {
        /// The key.
        key: String,
        /// The tool whose message got a derived key.
        derived: Option<GitOpsTool>,
    },
    /// No key, because the message asked for none; `tool` if a GitOps tool manages it.
    OptedOut {
        /// The tool that manages the message, if any.
        tool: Option<GitOpsTool>,
    },
    /// No key: none given, and no GitOps tool manages the message.
    None,
}

impl KeyChoice {
    /// The key, if there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            KeyChoice::Key { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// The key a message is sent under: `spec.idempotencyKey` when set (empty: none at all); else,
/// for a message with Argo CD's or Flux's tracking metadata and without the annotation
/// `mailroom.dev/idempotency: "off"`, one derived from its namespace, name and spec.
pub fn choose_key(msg: &EmailMessage) -> KeyChoice {
    let tool = gitops_tool(msg.labels(), msg.annotations());
    match msg.spec.idempotency_key.as_deref() {
        Some("") => return KeyChoice::OptedOut { tool },
        Some(key) => return KeyChoice::Key { key: key.to_string(), derived: None },
        None => {}
    }
    let Some(tool) = tool else {
        return KeyChoice::None;
    };
    if msg.annotations().get(IDEMPOTENCY_ANNOTATION).is_some_and(|v| v.trim().eq_ignore_ascii_case("off")) {
        return KeyChoice::OptedOut { tool: Some(tool) };
    }
    let key = derived_key(&msg.namespace().unwrap_or_default(), &msg.name_any(), &msg.spec);
    KeyChoice::Key { key, derived: Some(tool) }
}

/// The key of a GitOps-managed message: `<namespace>/<name>@<hash of the spec>`. The same
/// manifest re-created under the same name has the same key; a changed manifest has another.
pub fn derived_key(namespace: &str, name: &str, spec: &EmailMessageSpec) -> String {
    format!("{namespace}/{name}@{}", spec_hash(spec))
}

/// The first 16 hex digits of a SHA-256 over the spec as canonical JSON (object keys sorted,
/// defaults and empty lists left out as the API types serialize them), so that the same
/// manifest hashes the same whatever the order of its fields.
pub fn spec_hash(spec: &EmailMessageSpec) -> String {
    let value = serde_json::to_value(spec).unwrap_or(serde_json::Value::Null);
    let mut canonical = String::new();
    write_canonical(&value, &mut canonical);
    let digest = Sha256::digest(canonical.as_bytes());
    hex(&digest[..8])
}

fn write_canonical(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The name of the SendRecord of a key: `key-` and 40 hex digits of its SHA-256 (any key, of any
/// characters and length, makes a valid and fixed-length object name).
pub fn record_name(key: &str) -> String {
    format!("key-{}", hex(&Sha256::digest(key.as_bytes())[..20]))
}

/// How long a sent key stays taken: the message's retention, else its profile's, else 30 days.
pub fn retention(spec: &EmailMessageSpec, profile: &MailProfileSpec) -> Duration {
    let secs = spec.idempotency_retention_seconds.or(profile.idempotency_retention_seconds);
    secs.map(Duration::from_secs).unwrap_or(DEFAULT_RETENTION)
}

/// The warning for a GitOps-managed message with a TTL and no key: the tool re-creates it after
/// the TTL deleted it, and each copy is sent again.
pub fn recreation_warning(msg: &EmailMessage, choice: &KeyChoice) -> Option<String> {
    let KeyChoice::OptedOut { tool: Some(tool) } = choice else {
        return None;
    };
    let ttl = msg.spec.ttl_seconds_after_finished?;
    Some(format!(
        "{tool} manages this message and it has ttlSecondsAfterFinished ({ttl} s) but no idempotency key: \
         once sent it is deleted after {ttl} s, {tool} re-creates it on its next sync, and the new copy is sent again, \
         after every TTL, for as long as it is in Git. Remove the opt-out (idempotencyKey: \"\" or the annotation \
         {IDEMPOTENCY_ANNOTATION}: off), set an idempotencyKey, or drop ttlSecondsAfterFinished"
    ))
}

/// The SendRecord of a key just reserved by `me`.
pub fn reserved(key: &str, me: RecordedMessage, now: Timestamp) -> SendRecordSpec {
    SendRecordSpec {
        key: key.to_string(),
        state: SendRecordState::Reserved,
        message: me,
        reserved_time: Time(now),
        sent_time: None,
        message_id: None,
        expires_at: None,
        retention_seconds: None,
    }
}

/// The record once its message was sent: it expires `retention` after the send.
pub fn sent(
    record: &SendRecordSpec,
    message_id: Option<String>,
    sent_time: Timestamp,
    retention: Duration,
) -> SendRecordSpec {
    SendRecordSpec {
        state: SendRecordState::Sent,
        sent_time: Some(Time(sent_time)),
        message_id,
        expires_at: Some(Time(add(sent_time, retention))),
        retention_seconds: Some(retention.as_secs()),
        ..record.clone()
    }
}

/// A sent key found again keeps being taken for at least `retention` from now: a message kept in
/// Git and re-created after each TTL is sent once for as long as it stays there. None: no change.
pub fn extended(record: &SendRecordSpec, now: Timestamp, retention: Duration) -> Option<SendRecordSpec> {
    let want = add(now, retention);
    match &record.expires_at {
        Some(t) if t.0 >= want => None,
        _ => Some(SendRecordSpec { expires_at: Some(Time(want)), ..record.clone() }),
    }
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    crate::delivery::retry::add(t, d)
}

/// What the record under a message's key says to that message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// The message itself holds it (it reserved it before, and is sent again after a crash or
    /// a transient failure).
    Ours,
    /// It was sent, and its retention has passed: delete it and reserve anew.
    Expired,
    /// It was sent, by this message.
    AlreadySent,
    /// Another message holds it, and may be being sent.
    HeldBy(RecordedMessage),
}

/// Judges a record found under the key of the message with uid `uid`.
pub fn judge_record(record: &SendRecordSpec, uid: &str, now: Timestamp) -> Found {
    match record.state {
        SendRecordState::Sent if record.expires_at.as_ref().is_some_and(|t| t.0 <= now) => Found::Expired,
        SendRecordState::Sent => Found::AlreadySent,
        SendRecordState::Reserved if record.message.uid == uid => Found::Ours,
        SendRecordState::Reserved => Found::HeldBy(record.message.clone()),
    }
}

/// What the message holding a reserved key tells of the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HolderState {
    /// It exists and is not finished: the key stays its.
    Sending,
    /// It was sent (its outcome was written, the record's confirmation was not): the key is sent.
    Sent {
        /// Its Message-ID.
        message_id: Option<String>,
        /// When it was sent.
        sent_time: Timestamp,
    },
    /// It failed, or is gone, or another message took its name: the key is free. A failed
    /// message does not consume its key.
    Released,
}

/// Judges the holder `holder` of a reserved key, as the API server has the message of its name.
pub fn judge_holder(holder: &RecordedMessage, found: Option<&EmailMessage>, now: Timestamp) -> HolderState {
    let Some(msg) = found.filter(|m| m.uid().as_deref() == Some(holder.uid.as_str())) else {
        return HolderState::Released;
    };
    let status = msg.status.as_ref();
    match status.and_then(|s| s.phase) {
        Some(Phase::Failed) => HolderState::Released,
        Some(Phase::Sent) => HolderState::Sent {
            message_id: status.and_then(|s| s.message_id.clone()),
            sent_time: status.and_then(|s| s.sent_time.as_ref()).map(|t| t.0).unwrap_or(now),
        },
        _ => HolderState::Sending,
    }
}

/// The text of a message that was not sent because its key was: the original message, its
/// Message-ID and when it was sent.
pub fn already_sent_text(key: &str, record: &SendRecordSpec) -> String {
    let id = record.message_id.as_deref().unwrap_or("(unknown)");
    let when = record.sent_time.as_ref().map(|t| t.0.to_string()).unwrap_or_else(|| "(unknown)".into());
    let until = record.expires_at.as_ref().map(|t| format!("; the key is taken until {}", t.0)).unwrap_or_default();
    format!(
        "not sent: idempotency key {key:?} was already sent by EmailMessage {} (uid {}) as Message-ID {id} at {when}{until}",
        record.message.name, record.message.uid
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(meta: serde_json::Value, extra: serde_json::Value) -> EmailMessage {
        let mut doc = serde_json::json!({
            "apiVersion": "mailroom.dev/v1alpha1", "kind": "EmailMessage",
            "metadata": {"name": "deploy-finished", "namespace": "team-a", "uid": "u1"},
            "spec": {"profileRef": {"name": "relay"}, "to": ["ops@contoso.com"], "subject": "Deploy finished", "body": {"text": "1.4.2 is live"}},
        });
        if let (Some(m), Some(e)) = (doc["metadata"].as_object_mut(), meta.as_object()) {
            m.extend(e.clone());
        }
        if let (Some(s), Some(e)) = (doc["spec"].as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        serde_json::from_value(doc).expect("message")
    }

    fn argo() -> serde_json::Value {
        serde_json::json!({"annotations": {ARGOCD_TRACKING_ANNOTATION: "shop:mailroom.dev/EmailMessage:team-a/deploy-finished"}})
    }

    fn flux() -> serde_json::Value {
        serde_json::json!({"labels": {FLUX_NAME_LABEL: "apps", FLUX_NAMESPACE_LABEL: "flux-system"}})
    }

    #[test]
    fn a_message_without_key_or_gitops_metadata_has_no_key() {
        assert_eq!(choose_key(&message(serde_json::json!({}), serde_json::json!({}))), KeyChoice::None);
        // The opt-out annotation alone changes nothing.
        let off = serde_json::json!({"annotations": {IDEMPOTENCY_ANNOTATION: "off"}});
        assert_eq!(choose_key(&message(off, serde_json::json!({}))), KeyChoice::None);
    }

    #[test]
    fn an_explicit_key_wins_and_an_empty_one_opts_out() {
        let k = choose_key(&message(argo(), serde_json::json!({"idempotencyKey": "release-1.4.2"})));
        assert_eq!(k, KeyChoice::Key { key: "release-1.4.2".into(), derived: None });
        let k = choose_key(&message(serde_json::json!({}), serde_json::json!({"idempotencyKey": "release-1.4.2"})));
        assert_eq!(k.key(), Some("release-1.4.2"));
        let k = choose_key(&message(flux(), serde_json::json!({"idempotencyKey": ""})));
        assert_eq!(k, KeyChoice::OptedOut { tool: Some(GitOpsTool::Flux) });
        let k = choose_key(&message(serde_json::json!({}), serde_json::json!({"idempotencyKey": ""})));
        assert_eq!(k, KeyChoice::OptedOut { tool: None });
    }

    #[test]
    fn gitops_messages_get_a_derived_key_unless_the_annotation_says_off() {
        for (meta, tool) in [
            (argo(), GitOpsTool::ArgoCd),
            (serde_json::json!({"labels": {ARGOCD_INSTANCE_LABEL: "shop"}}), GitOpsTool::ArgoCd),
            (flux(), GitOpsTool::Flux),
            (serde_json::json!({"labels": {FLUX_NAME_LABEL: "apps"}}), GitOpsTool::Flux),
        ] {
            let msg = message(meta.clone(), serde_json::json!({}));
            let key = format!("team-a/deploy-finished@{}", spec_hash(&msg.spec));
            assert_eq!(choose_key(&msg), KeyChoice::Key { key, derived: Some(tool) }, "{meta}");
            let mut off = meta.clone();
            off.as_object_mut().unwrap().entry("annotations").or_insert(serde_json::json!({}))
                [IDEMPOTENCY_ANNOTATION] = serde_json::json!("Off");
            assert_eq!(choose_key(&message(off, serde_json::json!({}))), KeyChoice::OptedOut { tool: Some(tool) });
        }
        // An empty label is no tracking.
        let empty = serde_json::json!({"labels": {ARGOCD_INSTANCE_LABEL: ""}});
        assert_eq!(choose_key(&message(empty, serde_json::json!({}))), KeyChoice::None);
    }

    #[test]
    fn a_raw_message_gets_a_derived_key_from_its_secret_reference() {
        let raw = |secret: &str| {
            let mut m = message(argo(), serde_json::json!({}));
            m.spec.subject = String::new();
            m.spec.body = Default::default();
            m.spec.raw = Some(serde_json::from_value(serde_json::json!({"secretRef": {"name": secret}})).unwrap());
            m
        };
        let (a, b) = (raw("release-eml"), raw("other-eml"));
        let key = |m: &EmailMessage| choose_key(m).key().map(str::to_string);
        assert_eq!(key(&a), Some(format!("team-a/deploy-finished@{}", spec_hash(&a.spec))));
        // The same manifest re-created is the same key; another Secret is another message.
        assert_eq!(key(&a), key(&raw("release-eml")));
        assert_ne!(key(&a), key(&b));
    }

    #[test]
    fn the_tool_is_told_by_its_metadata() {
        let map = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let none = BTreeMap::new();
        assert_eq!(gitops_tool(&none, &none), None);
        assert_eq!(gitops_tool(&map(&[(FLUX_NAMESPACE_LABEL, "flux-system")]), &none), Some(GitOpsTool::Flux));
        assert_eq!(gitops_tool(&none, &map(&[(ARGOCD_TRACKING_ANNOTATION, "a:b")])), Some(GitOpsTool::ArgoCd));
        // Flux's own labels name it even when a chart also set the instance label.
        let both = map(&[(ARGOCD_INSTANCE_LABEL, "shop"), (FLUX_NAME_LABEL, "apps")]);
        assert_eq!(gitops_tool(&both, &none), Some(GitOpsTool::Flux));
        // Other tools' labels are no tracking.
        assert_eq!(gitops_tool(&map(&[("app.kubernetes.io/managed-by", "Helm")]), &none), None);
        assert_eq!(GitOpsTool::ArgoCd.to_string(), "Argo CD");
    }

    #[test]
    fn a_record_without_an_expiry_is_extended() {
        let r = reserved("k", me(), ts(100));
        let e = extended(&r, ts(100), Duration::from_secs(5)).expect("an expiry");
        assert_eq!(e.expires_at, Some(Time(ts(105))));
    }

    #[test]
    fn the_derived_key_follows_the_name_and_the_spec() {
        let a = message(argo(), serde_json::json!({}));
        let same = message(argo(), serde_json::json!({"cc": []}));
        assert_eq!(choose_key(&a), choose_key(&same), "an empty list is the field left out");
        let other_body = message(argo(), serde_json::json!({"body": {"text": "1.4.3 is live"}}));
        assert_ne!(choose_key(&a), choose_key(&other_body));
        let mut renamed = a.clone();
        renamed.metadata.name = Some("deploy-finished-2".into());
        assert_ne!(choose_key(&a), choose_key(&renamed));
    }

    #[test]
    fn the_spec_hash_is_stable() {
        // Fixed (the SHA-256 of `{"body":{"text":"1.4.2 is live"},"profileRef":{"name":"relay"},
        // "subject":"Deploy finished","to":["ops@contoso.com"]}`): a change here would send every
        // GitOps-managed message once more after an upgrade.
        let msg = message(serde_json::json!({}), serde_json::json!({}));
        assert_eq!(spec_hash(&msg.spec), "8d2dd32cfd560e98");
        // Key order in free-form values does not matter.
        let with_values = |values: &str| {
            let mut m = msg.clone();
            m.spec.values = Some(serde_json::from_str(values).expect("values"));
            m
        };
        let a = with_values(r#"{"a": 1, "b": {"x": 1, "y": 2}}"#);
        let b = with_values(r#"{"b": {"y": 2, "x": 1}, "a": 1}"#);
        assert_ne!(spec_hash(&a.spec), spec_hash(&msg.spec));
        assert_eq!(spec_hash(&a.spec), spec_hash(&b.spec));
        assert_eq!(spec_hash(&a.spec).len(), 16);
    }

    #[test]
    fn record_names_are_valid_fixed_length_object_names() {
        let n = record_name("team-a/deploy-finished@0123456789abcdef");
        assert_eq!(n.len(), 44);
        assert!(n.starts_with("key-") && n[4..].chars().all(|c| c.is_ascii_hexdigit()), "{n}");
        assert_eq!(n, record_name("team-a/deploy-finished@0123456789abcdef"));
        assert_ne!(n, record_name("Release 1.4.2 ✅ / anything goes"));
    }

    #[test]
    fn retention_comes_from_the_message_then_the_profile_then_30_days() {
        let profile: MailProfileSpec = serde_json::from_value(serde_json::json!({
            "senders": {"default": "a@contoso.com"}, "smtp": {"host": "relay"},
        }))
        .unwrap();
        let msg = message(serde_json::json!({}), serde_json::json!({}));
        assert_eq!(retention(&msg.spec, &profile), DEFAULT_RETENTION);
        let profile = MailProfileSpec { idempotency_retention_seconds: Some(3600), ..profile };
        assert_eq!(retention(&msg.spec, &profile), Duration::from_secs(3600));
        let msg = message(serde_json::json!({}), serde_json::json!({"idempotencyRetentionSeconds": 60}));
        assert_eq!(retention(&msg.spec, &profile), Duration::from_secs(60));
    }

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn me() -> RecordedMessage {
        RecordedMessage { name: "deploy-finished".into(), uid: "u1".into() }
    }

    #[test]
    fn a_record_is_ours_held_sent_or_expired() {
        let r = reserved("k", me(), ts(100));
        assert_eq!(judge_record(&r, "u1", ts(200)), Found::Ours);
        assert_eq!(judge_record(&r, "u2", ts(200)), Found::HeldBy(me()));
        let s = sent(&r, Some("<m@contoso.com>".into()), ts(150), Duration::from_secs(60));
        assert_eq!(s.expires_at, Some(Time(ts(210))));
        assert_eq!(s.retention_seconds, Some(60));
        assert_eq!((s.reserved_time.clone(), s.message.clone()), (Time(ts(100)), me()));
        for uid in ["u1", "u2"] {
            assert_eq!(judge_record(&s, uid, ts(209)), Found::AlreadySent);
            assert_eq!(judge_record(&s, uid, ts(210)), Found::Expired, "the retention has passed");
        }
    }

    #[test]
    fn a_sent_key_found_again_is_kept_for_the_retention_from_now() {
        let s = sent(&reserved("k", me(), ts(100)), None, ts(100), Duration::from_secs(60));
        assert_eq!(extended(&s, ts(120), Duration::from_secs(60)).and_then(|r| r.expires_at), Some(Time(ts(180))));
        assert_eq!(extended(&s, ts(120), Duration::from_secs(10)), None, "never shortened");
    }

    #[test]
    fn the_holder_decides_whether_a_reserved_key_is_free() {
        let holder = me();
        let mut m = message(serde_json::json!({}), serde_json::json!({}));
        assert_eq!(judge_holder(&holder, None, ts(1)), HolderState::Released, "gone");
        assert_eq!(judge_holder(&holder, Some(&m), ts(1)), HolderState::Sending, "new");
        let mut other = m.clone();
        other.metadata.uid = Some("u9".into());
        assert_eq!(judge_holder(&holder, Some(&other), ts(1)), HolderState::Released, "re-created under its name");
        m.status = Some(serde_json::from_value(serde_json::json!({"phase": "Failed"})).unwrap());
        assert_eq!(judge_holder(&holder, Some(&m), ts(1)), HolderState::Released, "failed messages free the key");
        m.status = Some(
            serde_json::from_value(
                serde_json::json!({"phase": "Sent", "messageId": "<m@x>", "sentTime": "2027-01-15T08:00:00Z"}),
            )
            .unwrap(),
        );
        assert_eq!(
            judge_holder(&holder, Some(&m), ts(1)),
            HolderState::Sent { message_id: Some("<m@x>".into()), sent_time: "2027-01-15T08:00:00Z".parse().unwrap() }
        );
        m.status = Some(serde_json::from_value(serde_json::json!({"phase": "Sending"})).unwrap());
        assert_eq!(judge_holder(&holder, Some(&m), ts(1)), HolderState::Sending);
    }

    #[test]
    fn the_warning_is_for_opted_out_gitops_messages_with_a_ttl() {
        let ttl = serde_json::json!({"ttlSecondsAfterFinished": 86400, "idempotencyKey": ""});
        let msg = message(argo(), ttl.clone());
        let text = recreation_warning(&msg, &choose_key(&msg)).expect("a warning");
        assert!(text.contains("Argo CD re-creates it") && text.contains("86400 s"), "{text}");
        // No TTL, a key, or no GitOps tool: no warning.
        let msg = message(argo(), serde_json::json!({"idempotencyKey": ""}));
        assert_eq!(recreation_warning(&msg, &choose_key(&msg)), None);
        let msg = message(argo(), serde_json::json!({"ttlSecondsAfterFinished": 86400}));
        assert_eq!(recreation_warning(&msg, &choose_key(&msg)), None);
        let msg = message(serde_json::json!({}), ttl);
        assert_eq!(recreation_warning(&msg, &choose_key(&msg)), None);
    }

    #[test]
    fn the_already_sent_text_names_the_original() {
        let s = sent(&reserved("k", me(), ts(100)), Some("<m@contoso.com>".into()), ts(100), Duration::from_secs(60));
        let text = already_sent_text("k", &s);
        assert!(text.contains("deploy-finished (uid u1)") && text.contains("<m@contoso.com>"), "{text}");
        assert!(text.contains(&ts(100).to_string()) && text.contains(&ts(160).to_string()), "{text}");
    }
}
