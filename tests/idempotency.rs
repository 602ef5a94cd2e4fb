//! Idempotency keys with the real API server and the SMTP test server: a message kept in Git is
//! sent once, even when its TTL deletes it and the GitOps tool re-creates it.
//!
//! Flux's kustomize-controller and Argo CD are not run here: the messages carry the metadata they
//! apply to every object they sync, as their documentation gives it. Flux's kustomize-controller
//! labels each object `kustomize.toolkit.fluxcd.io/name` and `kustomize.toolkit.fluxcd.io/namespace`
//! (<https://fluxcd.io/flux/components/kustomize/kustomizations/>); Argo CD sets the annotation
//! `argocd.argoproj.io/tracking-id` (its default tracking method) or the label
//! `app.kubernetes.io/instance` (<https://argo-cd.readthedocs.io/en/stable/user-guide/resource_tracking/>).
//! A re-sync after the TTL is a create of the same manifest; a prune is a delete.

mod common;

use std::time::{Duration, Instant};

use common::smtp_peer::SmtpPeer;
use common::{Operator, create_yaml, expect_event, message_condition, phase};
use kube::api::{Api, DeleteParams};
use mailroom::api::{EmailMessage, Phase, SendRecord, SendRecordState};
use mailroom::delivery::idempotency::record_name;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn message(name: &str, meta: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: EmailMessage
metadata:
  name: {name}
{meta}
spec:
  profileRef: {{name: relay}}
  to: ["ops@contoso.com"]
  subject: "Deploy finished"
  body: {{text: "Version 1.4.2 is live."}}
{extra}"#
    )
}

/// The labels Flux's kustomize-controller sets (see the module comment).
const FLUX: &str =
    "  labels: {kustomize.toolkit.fluxcd.io/name: apps, kustomize.toolkit.fluxcd.io/namespace: flux-system}";

/// The annotation Argo CD sets (see the module comment).
fn argo(ns: &str, name: &str) -> String {
    format!("  annotations: {{argocd.argoproj.io/tracking-id: \"shop:mailroom.dev/EmailMessage:{ns}/{name}\"}}")
}

/// Sent by a send of its own (it has a sentTime).
fn sent_itself(m: &EmailMessage) -> bool {
    phase(m) == Some(Phase::Sent) && m.status.as_ref().is_some_and(|s| s.sent_time.is_some())
}

/// Sent because its key was: reason AlreadySent, no send of its own.
fn found_sent(m: &EmailMessage) -> bool {
    phase(m) == Some(Phase::Sent)
        && message_condition(m, "Sent").is_some_and(|c| c.reason == "AlreadySent")
        && m.status.as_ref().is_some_and(|s| s.sent_time.is_none())
}

async fn wait_gone(api: &Api<EmailMessage>, name: &str) {
    let start = Instant::now();
    while api.get_opt(name).await.expect("get").is_some() {
        assert!(start.elapsed() < WAIT, "{name} was not deleted by its TTL");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Asserts that the peer accepted exactly `n` messages, a little after the last outcome (so that
/// a late duplicate would be seen).
async fn exactly(peer: &SmtpPeer, n: usize) {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = peer.messages().await.len();
    assert_eq!(got, n, "the SMTP peer accepted {got} messages, expected {n}");
}

#[tokio::test]
async fn a_flux_message_recreated_after_its_ttl_is_not_sent_again() {
    let client = common::client().await;
    let ns = common::namespace(&client, "idem-ttl", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("idem-ttl", &ns, &[]);
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let records: Api<SendRecord> = Api::namespaced(client.clone(), &ns);
    let manifest = message("deploy-finished", FLUX, "  ttlSecondsAfterFinished: 2");

    create_yaml(&client, &ns, &manifest).await;
    let first = common::wait_for(&api, "deploy-finished", WAIT, sent_itself).await;
    let status = first.status.clone().expect("status");
    let key = status.idempotency_key.clone().expect("a derived key");
    assert!(key.starts_with(&format!("{ns}/deploy-finished@")), "{key}");
    wait_gone(&api, "deploy-finished").await;

    // The record outlived the message: Sent, by it, with its Message-ID.
    let record = records.get(&record_name(&key)).await.expect("the SendRecord");
    assert_eq!(record.spec.state, SendRecordState::Sent);
    assert_eq!(record.spec.message.uid, first.metadata.uid.clone().expect("uid"));
    assert_eq!(record.spec.message_id, status.message_id);
    assert!(record.metadata.owner_references.is_none(), "no owner: it outlives the message");

    // Flux's next reconcile re-creates the same manifest under the same name.
    create_yaml(&client, &ns, &manifest).await;
    let again = common::wait_for(&api, "deploy-finished", WAIT, found_sent).await;
    let s = again.status.clone().expect("status");
    assert_eq!(s.message_id, status.message_id, "the original's Message-ID");
    let text = message_condition(&again, "Sent").expect("Sent").message;
    assert!(text.contains("deploy-finished") && text.contains(status.message_id.as_deref().unwrap_or("-")), "{text}");
    expect_event(&client, &ns, "deploy-finished", |r, n| r == "AlreadySent" && n.contains("not sent")).await;
    exactly(&peer, 1).await;
}

#[tokio::test]
async fn an_argo_cd_message_pruned_and_recreated_is_not_sent_again_and_a_changed_one_is() {
    let client = common::client().await;
    let ns = common::namespace(&client, "idem-argo", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("idem-argo", &ns, &[]);
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);

    let meta = argo(&ns, "release");
    create_yaml(&client, &ns, &message("release", &meta, "")).await;
    common::wait_for(&api, "release", WAIT, sent_itself).await;
    // Pruned (removed from Git), then put back unchanged: the derived key is the same.
    api.delete("release", &DeleteParams::default()).await.expect("prune");
    wait_gone(&api, "release").await;
    create_yaml(&client, &ns, &message("release", &meta, "")).await;
    common::wait_for(&api, "release", WAIT, found_sent).await;
    exactly(&peer, 1).await;

    // A changed manifest under the same name has another derived key: it is sent.
    api.delete("release", &DeleteParams::default()).await.expect("delete");
    wait_gone(&api, "release").await;
    create_yaml(&client, &ns, &message("release", &meta, "  cc: [\"audit@contoso.com\"]")).await;
    common::wait_for(&api, "release", WAIT, sent_itself).await;
    exactly(&peer, 2).await;
}

#[tokio::test]
async fn the_key_wins_when_the_spec_changes_under_it() {
    let client = common::client().await;
    let ns = common::namespace(&client, "idem-spec", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("idem-spec", &ns, &[]);
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);

    create_yaml(&client, &ns, &message("v1", "", "  idempotencyKey: release-1.4.2")).await;
    let original = common::wait_for(&api, "v1", WAIT, sent_itself).await;
    let other = "  idempotencyKey: release-1.4.2\n  cc: [\"audit@contoso.com\"]\n  headers: {X-Run: \"2\"}";
    create_yaml(&client, &ns, &message("v2", "", other).replace("1.4.2 is live", "1.4.2 is live, again")).await;
    let second = common::wait_for(&api, "v2", WAIT, found_sent).await;
    let text = message_condition(&second, "Sent").expect("Sent").message;
    assert!(text.contains("v1"), "names the original: {text}");
    assert_eq!(
        second.status.and_then(|s| s.message_id),
        original.status.and_then(|s| s.message_id),
        "the original's Message-ID"
    );
    exactly(&peer, 1).await;
}

#[tokio::test]
async fn the_record_survives_an_operator_restart_and_expires() {
    let client = common::client().await;
    let ns = common::namespace(&client, "idem-restart", &[]).await;
    let peer = SmtpPeer::start(&[]);
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let records: Api<SendRecord> = Api::namespaced(client.clone(), &ns);
    let key = "  idempotencyKey: nightly-report\n  idempotencyRetentionSeconds: 8";

    // The operator with a sweep every second, stopped after the send, as in a rollout.
    let sweep = ["--send-record-sweep-interval", "1"];
    let mut first = Operator::start("idem-restart-1", &ns, &sweep);
    create_yaml(&client, &ns, &message("m1", "", key)).await;
    common::wait_for(&api, "m1", WAIT, sent_itself).await;
    first.terminate();
    assert!(first.wait_exit(Duration::from_secs(30)).is_some(), "the operator did not stop");

    let _second = Operator::start("idem-restart-2", &ns, &sweep);
    create_yaml(&client, &ns, &message("m2", "", key)).await;
    common::wait_for(&api, "m2", WAIT, found_sent).await;
    exactly(&peer, 1).await;

    // After the retention the sweep deletes the record, and the key may be sent again.
    let name = record_name("nightly-report");
    let start = Instant::now();
    while records.get_opt(&name).await.expect("get").is_some() {
        assert!(start.elapsed() < WAIT, "the expired SendRecord was not deleted");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    create_yaml(&client, &ns, &message("m3", "", key)).await;
    common::wait_for(&api, "m3", WAIT, sent_itself).await;
    exactly(&peer, 2).await;
}

/// A replica with leader election, its Lease in `ns`.
fn replica(test: &str, ns: &str) -> Operator {
    Operator::start_with_args(
        &format!("{test}-{ns}"),
        &["--namespace", ns, "--leader-elect", "--leader-election-namespace", ns],
    )
}

#[tokio::test]
async fn of_messages_with_the_same_key_created_at_once_exactly_one_is_sent_also_after_a_handover() {
    let client = common::client().await;
    let ns = common::namespace(&client, "idem-race", &[]).await;
    let peer = SmtpPeer::start(&[]);
    // Two replicas; the leader reconciles the messages concurrently, and only the API server's
    // create of the SendRecord decides between them.
    let mut a = replica("idem-race-a", &ns);
    let _b = replica("idem-race-b", &ns);
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let names = ["race-0", "race-1", "race-2", "race-3", "race-4", "race-5"];
    let yaml: Vec<String> = names.iter().map(|n| message(n, "", "  idempotencyKey: once")).collect();
    let creates = yaml.iter().map(|y| create_yaml(&client, &ns, y));
    futures::future::join_all(creates).await;

    let mut own = 0;
    for name in names {
        let m = common::wait_for(&api, name, WAIT, |m| sent_itself(m) || found_sent(m)).await;
        own += usize::from(sent_itself(&m));
    }
    assert_eq!(own, 1, "exactly one message sends under the key");
    exactly(&peer, 1).await;

    // One replica stops (if it led, the other takes the Lease over): the key stays sent.
    a.terminate();
    assert!(a.wait_exit(Duration::from_secs(30)).is_some(), "the replica did not stop");
    create_yaml(&client, &ns, &message("after-handover", "", "  idempotencyKey: once")).await;
    common::wait_for(&api, "after-handover", WAIT, found_sent).await;
    exactly(&peer, 1).await;
}

#[tokio::test]
async fn a_failed_message_does_not_consume_its_key() {
    let client = common::client().await;
    let ns = common::namespace(&client, "idem-failed", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("idem-failed", &ns, &[]);
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let records: Api<SendRecord> = Api::namespaced(client.clone(), &ns);

    peer.script(json!({"data": ["550 5.7.64 TenantAttribution; Relay Access Denied"]})).await;
    create_yaml(&client, &ns, &message("first", "", "  idempotencyKey: welcome-alice")).await;
    common::wait_for(&api, "first", WAIT, |m| phase(m) == Some(Phase::Failed)).await;
    // Released (just after the Failed status is written).
    let start = Instant::now();
    while records.get_opt(&record_name("welcome-alice")).await.expect("get").is_some() {
        assert!(start.elapsed() < WAIT, "the failed message's key was not released");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    create_yaml(&client, &ns, &message("second", "", "  idempotencyKey: welcome-alice")).await;
    common::wait_for(&api, "second", WAIT, sent_itself).await;
    let record = records.get(&record_name("welcome-alice")).await.expect("the SendRecord");
    assert_eq!((record.spec.state, record.spec.message.name.as_str()), (SendRecordState::Sent, "second"));
    exactly(&peer, 1).await;
}

#[tokio::test]
async fn a_gitops_message_with_a_ttl_and_no_key_is_warned_about() {
    let client = common::client().await;
    let ns = common::namespace(&client, "idem-warn", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("idem-warn", &ns, &[]);
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);

    let meta = format!("{FLUX}\n  annotations: {{mailroom.dev/idempotency: \"off\"}}");
    create_yaml(&client, &ns, &message("opted-out", &meta, "  ttlSecondsAfterFinished: 3600")).await;
    let m = common::wait_for(&api, "opted-out", WAIT, sent_itself).await;
    assert_eq!(m.status.as_ref().and_then(|s| s.idempotency_key.clone()), None, "no key");
    let c = message_condition(&m, "RecreationRisk").expect("the RecreationRisk condition");
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "TTLWithoutIdempotencyKey"));
    assert!(c.message.contains("Flux re-creates it"), "{}", c.message);
    expect_event(&client, &ns, "opted-out", |r, n| r == "RecreationRisk" && n.contains("sent again")).await;
}

/// A record left `Reserved` by an operator that stopped between reserving and recording, for the
/// message `name` with uid `uid`.
async fn left_reserved(client: &kube::Client, ns: &str, key: &str, name: &str, uid: &str) {
    use mailroom::api::RecordedMessage;
    use mailroom::delivery::idempotency::reserved;
    let holder = RecordedMessage { name: name.into(), uid: uid.into() };
    let spec = reserved(key, holder, k8s_openapi::jiff::Timestamp::now());
    let mut record = SendRecord::new(&record_name(key), spec);
    record.metadata.namespace = Some(ns.to_string());
    let records: Api<SendRecord> = Api::namespaced(client.clone(), ns);
    records.create(&Default::default(), &record).await.expect("create the SendRecord");
}

#[tokio::test]
async fn a_reserved_key_is_taken_over_when_its_holder_is_gone_and_confirmed_when_it_was_sent() {
    let client = common::client().await;
    let ns = common::namespace(&client, "idem-takeover", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("idem-takeover", &ns, &[]);
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let records: Api<SendRecord> = Api::namespaced(client.clone(), &ns);

    // Its holder is gone (deleted before anything was recorded): the key is free.
    left_reserved(&client, &ns, "gone-holder", "vanished", "00000000-0000-0000-0000-000000000000").await;
    create_yaml(&client, &ns, &message("taker", "", "  idempotencyKey: gone-holder")).await;
    common::wait_for(&api, "taker", WAIT, sent_itself).await;
    let record = records.get(&record_name("gone-holder")).await.expect("the SendRecord");
    assert_eq!((record.spec.state, record.spec.message.name.as_str()), (SendRecordState::Sent, "taker"));
    exactly(&peer, 1).await;

    // Its holder was sent, and the record's confirmation was lost: the key is sent.
    create_yaml(&client, &ns, &message("holder", "", "")).await;
    let holder = common::wait_for(&api, "holder", WAIT, sent_itself).await;
    let uid = holder.metadata.uid.clone().expect("uid");
    left_reserved(&client, &ns, "lost-confirmation", "holder", &uid).await;
    create_yaml(&client, &ns, &message("late", "", "  idempotencyKey: lost-confirmation")).await;
    let late = common::wait_for(&api, "late", WAIT, found_sent).await;
    let record = records.get(&record_name("lost-confirmation")).await.expect("the SendRecord");
    assert_eq!(record.spec.state, SendRecordState::Sent, "confirmed from the holder's status");
    assert_eq!(record.spec.message_id, holder.status.and_then(|s| s.message_id));
    assert_eq!(late.status.and_then(|s| s.message_id), record.spec.message_id);
    exactly(&peer, 2).await;
}
