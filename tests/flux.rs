//! Flux's real notification-controller (built from the Go module proxy by hack/gitops-tools.sh)
//! in front of mailroom's Flux receiver, against the test API server: its CRDs installed, a
//! `generic-hmac` Provider whose Secret holds the route's key, and an Alert. Events are posted to
//! the controller's event server exactly as Flux's other controllers post them
//! (fluxcd/pkg, runtime/events/recorder.go). The controller forwards each one, signed; it arrives
//! as an EmailMessage that is Sent through the SMTP test server. The same event forwarded again
//! creates nothing new; a Provider with the wrong key gets 401, creates nothing, and the
//! controller reports it as a `NotificationDispatchFailed` Warning Event on its Alert.

mod common;

use std::time::{Duration, Instant};

use common::flux::NotificationController;
use common::smtp_peer::SmtpPeer;
use common::{create_yaml, phase};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, ListParams};
use mail_parser::MessageParser;
use mailroom::api::{AlertRoute, EmailMessage, Importance, Phase};
use serde_json::{Value, json};

/// Polls get a generous deadline: the machine may be busy; nothing here is timed.
const WAIT: Duration = Duration::from_secs(180);
const KEY: &str = "flux-hmac-key-6d1f0b93e2a4";
const WRONG_KEY: &str = "not-the-route-key-41c7a9";
/// notification-controller's finalizer (`apiv1.NotificationFinalizer`).
const FINALIZER: &str = "finalizers.fluxcd.io";
const REVISION: &str = "main@sha1:9b2c6e1f0a7d4c3b8e5f2a1d0c9b8a7f6e5d4c3b";

/// An event as kustomize-controller emits it: `eventv1.Event` with the involved object's
/// reference, the severity its event type maps to, `metav1.Now()` (RFC 3339, seconds), the
/// revision annotation under the object's API group, and the controller's name and instance.
fn kustomize_event(ns: &str, kind: &str, name: &str, severity: &str, reason: &str, message: &str) -> Value {
    let (api_version, controller) = match kind {
        "HelmRelease" => ("helm.toolkit.fluxcd.io/v2", "helm-controller"),
        _ => ("kustomize.toolkit.fluxcd.io/v1", "kustomize-controller"),
    };
    let group = api_version.split('/').next().expect("group");
    json!({
        "involvedObject": {
            "kind": kind,
            "namespace": ns,
            "name": name,
            "uid": uuid::Uuid::new_v4().to_string(),
            "apiVersion": api_version,
            "resourceVersion": "4211",
        },
        "severity": severity,
        "timestamp": Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        "message": message,
        "reason": reason,
        "metadata": {format!("{group}/revision"): REVISION},
        "reportingController": controller,
        "reportingInstance": format!("{controller}-7f5d4d8c9b-x2x9q"),
    })
}

async fn route_messages(api: &Api<EmailMessage>) -> Vec<EmailMessage> {
    api.list(&ListParams::default().labels("mailroom.dev/alert-route=flux")).await.expect("list").items
}

/// Waits until the route's status shows these counts (received, created, rejected).
async fn wait_counts(client: &kube::Client, ns: &str, counts: (i64, i64, i64)) -> AlertRoute {
    let api: Api<AlertRoute> = Api::namespaced(client.clone(), ns);
    common::wait_for(&api, "flux", WAIT, |r| {
        r.status.as_ref().is_some_and(|s| (s.received, s.created, s.rejected) == counts)
    })
    .await
}

/// Waits until notification-controller has seen the object in its cache, which the event server
/// reads the Alerts and Providers from: it puts its finalizer on a Provider, and takes it off an
/// Alert (Alerts are static since v1beta3; its Alert reconciler only removes the finalizer that
/// older releases added, so the test's Alerts are created with it).
async fn wait_seen(client: &kube::Client, ns: &str, kind: &str, name: &str) {
    let gvk = kube::core::GroupVersionKind::gvk("notification.toolkit.fluxcd.io", "v1beta3", kind);
    let ar = ApiResource::from_gvk(&gvk);
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    let has_finalizer =
        |o: &DynamicObject| o.metadata.finalizers.as_ref().is_some_and(|f| f.iter().any(|f| f == FINALIZER));
    common::wait_for(&api, name, WAIT, |o| has_finalizer(o) == (kind == "Provider")).await;
}

/// Posts the event until notification-controller takes it (202). It answers 429 to an event it
/// took less than `--rate-limit-interval` ago (its duplicate filter), which Flux's controllers
/// treat as delivered.
async fn post_until_accepted(nc: &NotificationController, event: &Value) {
    let start = Instant::now();
    loop {
        let status = nc.post_event(event).await;
        if status == 202 {
            return;
        }
        assert_eq!(status, 429, "the event server answered {status}:\n{}", nc.log_text());
        assert!(start.elapsed() < WAIT, "the event server kept answering 429:\n{}", nc.log_text());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn notification_controller_forwards_signed_events_once_and_a_wrong_key_gets_401() {
    let client = common::client().await;
    let ns = common::namespace(&client, "flux", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let (_op, base) = common::receiver::start_operator(&client, "flux", &ns, &[]).await;
    // A short duplicate filter, so that the test can have the controller forward the same event
    // a second time, as it does when the same event comes again after the interval.
    let nc = NotificationController::start("flux", &["--rate-limit-interval=2s"]).await;
    let url = format!("{base}/alerts/{ns}/flux");
    // The Providers trust the receiver's CA through certSecretRef (key ca.crt), as Flux's docs say.
    let ca: String =
        String::from_utf8(common::receiver::test_ca()).expect("PEM").lines().map(|l| format!("    {l}\n")).collect();
    let ca = ca.trim_end();
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    create_yaml(
        &client,
        &ns,
        &format!(
            r#"
apiVersion: v1
kind: Secret
metadata: {{name: flux-mailroom}}
stringData: {{token: "{KEY}"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: flux-wrong-key}}
stringData: {{token: "{WRONG_KEY}"}}
---
apiVersion: mailroom.dev/v1alpha1
kind: AlertRoute
metadata: {{name: flux}}
spec:
  source: flux
  profileRef: {{name: relay}}
  to: ["Apps Team <apps-team@contoso.com>"]
  tokenSecretRef: {{name: flux-mailroom, key: token}}
---
apiVersion: v1
kind: Secret
metadata: {{name: mailroom-ca}}
stringData:
  ca.crt: |
{ca}
---
apiVersion: notification.toolkit.fluxcd.io/v1beta3
kind: Provider
metadata: {{name: mailroom}}
spec:
  type: generic-hmac
  address: {url}
  secretRef: {{name: flux-mailroom}}
  certSecretRef: {{name: mailroom-ca}}
---
apiVersion: notification.toolkit.fluxcd.io/v1beta3
kind: Alert
metadata: {{name: mailroom, finalizers: ["{FINALIZER}"]}}
spec:
  providerRef: {{name: mailroom}}
  eventMetadata: {{summary: "Production apps"}}
  eventSeverity: info
  eventSources:
  - {{kind: Kustomization, name: '*'}}
---
apiVersion: notification.toolkit.fluxcd.io/v1beta3
kind: Provider
metadata: {{name: wrong-key}}
spec:
  type: generic-hmac
  address: {url}
  secretRef: {{name: flux-wrong-key}}
  certSecretRef: {{name: mailroom-ca}}
---
apiVersion: notification.toolkit.fluxcd.io/v1beta3
kind: Alert
metadata: {{name: wrong-key, finalizers: ["{FINALIZER}"]}}
spec:
  providerRef: {{name: wrong-key}}
  eventSeverity: info
  eventSources:
  - {{kind: HelmRelease, name: '*'}}
"#
        ),
    )
    .await;
    for (kind, name) in
        [("Provider", "mailroom"), ("Alert", "mailroom"), ("Provider", "wrong-key"), ("Alert", "wrong-key")]
    {
        wait_seen(&client, &ns, kind, name).await;
    }

    // An error event of a Kustomization: forwarded, signed, and sent.
    let event = kustomize_event(
        &ns,
        "Kustomization",
        "webapp",
        "error",
        "ValidationFailed",
        "service/apps/webapp validation error: spec.type: Unsupported value: Ingress",
    );
    post_until_accepted(&nc, &event).await;
    let messages: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let start = Instant::now();
    let name = loop {
        if let Some(m) = route_messages(&messages).await.first() {
            break m.metadata.name.clone().expect("name");
        }
        assert!(start.elapsed() < WAIT, "no message; notification-controller's log:\n{}", nc.log_text());
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(name.starts_with("flux-flux-"), "{name}");
    let sent = common::wait_for(&messages, &name, WAIT, |m| phase(m) == Some(Phase::Sent)).await;
    assert_eq!(sent.spec.importance, Some(Importance::High), "an error event is high importance");
    let route = wait_counts(&client, &ns, (1, 1, 0)).await;
    let outcome = route.status.and_then(|s| s.last_outcome).unwrap_or_default();
    assert_eq!(outcome, format!("Created {name}"));

    let received = peer.wait_messages(1, WAIT).await;
    let raw = peer.raw(&received[0]);
    let mail = MessageParser::default().parse(&raw).expect("parse the received message");
    assert_eq!(mail.subject(), Some(format!("[Flux ERROR] Kustomization {ns}/webapp: ValidationFailed").as_str()));
    // notification-controller strips the API group from the revision key and adds the Alert's
    // eventMetadata: both arrive.
    assert_eq!(mail.header_raw("X-Flux-Revision").map(str::trim), Some(REVISION));
    assert_eq!(mail.header_raw("X-Flux-Object").map(str::trim), Some(format!("Kustomization/{ns}/webapp").as_str()));
    let text = mail.body_text(0).expect("a text body");
    assert!(text.contains("Production apps"), "the Alert's summary: {text}");
    assert!(text.contains("spec.type: Unsupported value: Ingress"), "{text}");
    assert!(text.contains("kustomize-controller"), "{text}");

    // The same event again: the controller forwards it a second time (once its duplicate
    // filter lets it through), and mailroom finds the message it already made.
    post_until_accepted(&nc, &event).await;
    let route = wait_counts(&client, &ns, (2, 1, 0)).await;
    let outcome = route.status.and_then(|s| s.last_outcome).unwrap_or_default();
    assert_eq!(outcome, format!("AlreadyCreated {name}"));
    assert_eq!(route_messages(&messages).await.len(), 1, "a replay creates no message");

    // A HelmRelease event goes to the Provider with the wrong key: 401, nothing created, and
    // the controller says so on its Alert (it does not retry a 4xx).
    let wrong = kustomize_event(&ns, "HelmRelease", "podinfo", "info", "UpgradeSucceeded", "Helm upgrade succeeded");
    post_until_accepted(&nc, &wrong).await;
    let route = wait_counts(&client, &ns, (3, 1, 1)).await;
    let outcome = route.status.and_then(|s| s.last_outcome).unwrap_or_default();
    assert!(outcome.starts_with("Rejected 401"), "{outcome}");
    let events = common::events_until(&client, &ns, "wrong-key", |reason, note| {
        reason == "NotificationDispatchFailed" && note.contains("401")
    })
    .await;
    let (_, note) = events
        .iter()
        .find(|(reason, note)| reason == "NotificationDispatchFailed" && note.contains("401"))
        .unwrap_or_else(|| panic!("no NotificationDispatchFailed Event on the Alert: {events:?}"));
    assert!(note.contains(&format!("HelmRelease/{ns}/podinfo")), "{note}");
    for (_, note) in &events {
        assert!(!note.contains(KEY) && !note.contains(WRONG_KEY), "a key in an Event: {note}");
    }
    assert_eq!(route_messages(&messages).await.len(), 1, "a wrong key creates no message");
    assert_eq!(peer.messages().await.len(), 1, "one email in all");
    let all = common::events_for(&client, &ns, "mailroom").await;
    assert!(
        !all.iter().any(|(reason, _)| reason == "NotificationDispatchFailed"),
        "the right Provider's deliveries all succeeded: {all:?}"
    );
}
