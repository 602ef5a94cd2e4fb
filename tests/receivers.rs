//! The notification receiver for every source but Alertmanager (tests/alerts.rs), over HTTPS with
//! the test certificate, with the real API server, a real SMTP server and the Microsoft 365
//! emulator: Flux's events (generic-hmac and generic), Argo CD's webhook (through Graph),
//! Grafana's webhook (HMAC with a timestamp). Each accepted notification becomes one sent email; a
//! wrong signature or token gets 401 and creates nothing; a replay creates nothing new; the
//! route's status counts them. A route naming a profile and a template that do not exist yet is
//! not Ready, and its messages wait for them.

mod common;

use std::time::Duration;

use common::emulator::Emulator;
use common::receiver;
use common::smtp_peer::SmtpPeer;
use common::{Operator, create_yaml, message_condition, phase};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::ListParams;
use mail_parser::MessageParser;
use mailroom::alerts::auth::sign_hex;
use mailroom::api::{AlertRoute, EmailMessage, Importance, Phase, find_condition};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "route-key-5b2e91d04c";
const FLUX: &str = include_str!("fixtures/flux-event-error.json");
const ARGOCD: &str = include_str!("fixtures/argocd-sync-failed.json");
const GRAFANA: &str = include_str!("fixtures/grafana-firing.json");
const PUBLIC_URL: &str = "https://mailroom-alerts.mailroom-system.svc:8082";

/// The operator with the receiver on a free port over HTTPS, and that port's base URL.
async fn start_operator(client: &kube::Client, test: &str, ns: &str, extra: &[&str]) -> (Operator, String) {
    let mut args = vec!["--alerts-url", PUBLIC_URL];
    args.extend_from_slice(extra);
    receiver::start_operator(client, test, ns, &args).await
}

/// The token Secret and a route `name` of `source`; `extra` is more of its spec.
fn route_yaml(name: &str, source: &str, profile: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: {name}-key}}
stringData: {{token: "{TOKEN}"}}
---
apiVersion: mailroom.dev/v1alpha1
kind: AlertRoute
metadata: {{name: {name}}}
spec:
  source: {source}
  profileRef: {{name: {profile}}}
  to: ["Platform <platform@contoso.com>"]
  tokenSecretRef: {{name: {name}-key, key: token}}
{extra}"#
    )
}

async fn post(url: &str, headers: &[(&str, String)], body: &str) -> (u16, String) {
    let mut req = receiver::https().post(url).header("content-type", "application/json").body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = req.send().await.expect("the receiver answers");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// The message name in a receiver's answer (`... EmailMessage ns/name`).
fn named(answer: &str, ns: &str) -> String {
    let prefix = format!("EmailMessage {ns}/");
    answer.split(&prefix).nth(1).map(|s| s.trim().to_string()).unwrap_or_else(|| panic!("no name in {answer:?}"))
}

async fn route_messages(client: &kube::Client, ns: &str, route: &str) -> Vec<EmailMessage> {
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), ns);
    let selector = format!("mailroom.dev/alert-route={route}");
    api.list(&ListParams::default().labels(&selector)).await.expect("list").items
}

/// Waits until the route's status shows these counts (received, created, rejected) and Ready.
async fn wait_route_status(
    client: &kube::Client,
    ns: &str,
    name: &str,
    counts: (i64, i64, i64),
    ready: bool,
) -> AlertRoute {
    let api: Api<AlertRoute> = Api::namespaced(client.clone(), ns);
    common::wait_for(&api, name, WAIT, |r| {
        r.status.as_ref().is_some_and(|s| {
            (s.received, s.created, s.rejected) == counts
                && find_condition(&s.conditions, "Ready").is_some_and(|c| (c.status == "True") == ready)
        })
    })
    .await
}

fn flux_signature(body: &str, key: &str) -> String {
    format!("sha256={}", sign_hex(key.as_bytes(), &[body.as_bytes()]))
}

#[tokio::test]
async fn flux_events_signed_or_with_a_token_become_emails_and_bad_signatures_and_retries_create_nothing() {
    let client = common::client().await;
    let ns = common::namespace(&client, "recv-flux", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let (op, base) = start_operator(&client, "recv-flux", &ns, &[]).await;
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    create_yaml(&client, &ns, &route_yaml("flux", "flux", "relay", "")).await;
    let url = format!("{base}/alerts/{ns}/flux");
    let signed = |body: &str| {
        vec![("X-Signature", flux_signature(body, TOKEN)), ("Gotk-Component", "kustomize-controller".to_string())]
    };

    // generic-hmac: the event as notification-controller posts it.
    let (status, answer) = post(&url, &signed(FLUX), FLUX).await;
    assert_eq!(status, 201, "{answer}");
    let name = named(&answer, &ns);
    assert!(name.starts_with("flux-flux-"), "{name}");
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let sent = common::wait_for(&api, &name, WAIT, |m| phase(m) == Some(Phase::Sent)).await;
    assert_eq!(sent.spec.importance, Some(Importance::High), "Flux errors are high importance");
    let labels = sent.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("mailroom.dev/alert-source").map(String::as_str), Some("flux"));
    assert_eq!(labels.get("mailroom.dev/alert-status").map(String::as_str), Some("error"));
    let envelopes = peer.wait_messages(1, WAIT).await;
    let raw = peer.raw(&envelopes[0]);
    let mail = MessageParser::default().parse(&raw).expect("parse the received message");
    assert_eq!(mail.subject(), Some("[Flux ERROR] Kustomization apps/webapp: ValidationFailed"));
    let text = mail.body_text(0).expect("a text part").to_string();
    for words in [
        "service/apps/webapp validation error: spec.type: Unsupported value: Ingress",
        "main@sha1:731f7eaddfb6af01cb2173e18f0f75b0ba780ef1",
        "Controller:  kustomize-controller",
    ] {
        assert!(text.contains(words), "text lacks {words:?}:\n{text}");
    }
    assert_eq!(mail.header_raw("X-Flux-Object").map(str::trim), Some("Kustomization/apps/webapp"));

    // notification-controller retries (4 times): nothing new.
    for _ in 0..4 {
        let (status, again) = post(&url, &signed(FLUX), FLUX).await;
        assert_eq!((status, named(&again, &ns)), (200, name.clone()), "{again}");
    }

    // Wrong signatures: another key, a body changed after signing, not hex, no credential at all.
    let mut tampered: Value = serde_json::from_str(FLUX).unwrap();
    tampered["message"] = "all good".into();
    let tampered = tampered.to_string();
    let wrong = [
        (vec![("X-Signature", flux_signature(FLUX, "another-key"))], FLUX.to_string()),
        (vec![("X-Signature", flux_signature(FLUX, TOKEN))], tampered),
        (vec![("X-Signature", "sha256=not-hex".to_string())], FLUX.to_string()),
        (vec![("X-Signature", flux_signature(FLUX, TOKEN)), ("Authorization", format!("Bearer {TOKEN}x"))], {
            let mut v: Value = serde_json::from_str(FLUX).unwrap();
            v["timestamp"] = "2022-10-28T08:00:00Z".into();
            v.to_string()
        }),
        (vec![], FLUX.to_string()),
    ];
    for (headers, body) in &wrong {
        let (status, answer) = post(&url, headers, body).await;
        assert_eq!(status, 401, "{headers:?}: {answer}");
        assert!(!answer.contains(TOKEN), "{answer}");
    }

    // A generic Provider sends the token as a header (its Secret's `headers`): a new event.
    let mut later: Value = serde_json::from_str(FLUX).unwrap();
    later["timestamp"] = "2022-10-28T07:31:19Z".into();
    later["severity"] = "info".into();
    later["reason"] = "ReconciliationSucceeded".into();
    let later = later.to_string();
    let (status, answer) = post(&url, &[("Authorization", format!("Bearer {TOKEN}"))], &later).await;
    assert_eq!(status, 201, "{answer}");
    let info = common::wait_for(&api, &named(&answer, &ns), WAIT, |m| phase(m) == Some(Phase::Sent)).await;
    assert_eq!(info.spec.importance, Some(Importance::Normal));
    assert_eq!(route_messages(&client, &ns, "flux").await.len(), 2, "one message per event");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(peer.messages().await.len(), 2);

    // 1 + 4 retries + 5 refused + 1 = 11 received; 2 created; 5 rejected.
    let route = wait_route_status(&client, &ns, "flux", (11, 2, 5), true).await;
    let s = route.status.expect("status");
    assert_eq!(s.url.as_deref(), Some(format!("{PUBLIC_URL}/alerts/{ns}/flux").as_str()));
    assert_eq!(s.source.as_deref(), Some("flux"));
    assert!(s.last_notification_time.is_some());
    assert!(s.last_outcome.as_deref().is_some_and(|o| o.starts_with("Created flux-flux-")), "{:?}", s.last_outcome);
    let printed = common::kubectl(&["get", "ar", "-n", &ns, "flux", "-o", "wide"]);
    let table = String::from_utf8_lossy(&printed.stdout);
    for column in ["SOURCE", "READY", "RECEIVED", "CREATED", "REJECTED", "URL", "flux", "True", "11"] {
        assert!(table.contains(column), "kubectl get ar lacks {column}:\n{table}");
    }
    assert!(!op.log_text().contains(TOKEN), "the key never appears in the log");
}

#[tokio::test]
async fn argocd_notifications_are_sent_through_graph_and_a_wrong_token_or_a_retry_creates_nothing() {
    let client = common::client().await;
    let ns = common::namespace(&client, "recv-argocd", &[]).await;
    let emu = Emulator::start("recv-argocd").await;
    let (tenant, app, secret) =
        ("7c0a4c7e-7a1b-4b8e-9a55-3c1f2d3e4f50", "0d5e3f7a-1b2c-4d5e-8f90-a1b2c3d4e5f6", "s3cr3t");
    emu.register_app(
        serde_json::json!({"tenantId": tenant, "clientId": app, "secrets": [secret], "roles": ["Mail.Send"]}),
    )
    .await;
    let ca = emu.ca_pem().display().to_string();
    let (_op, base) =
        start_operator(&client, "recv-argocd", &ns, &["--ca-bundle", &ca, "--allow-custom-endpoints"]).await;
    create_yaml(
        &client,
        &ns,
        &format!(
            r#"
apiVersion: v1
kind: Secret
metadata: {{name: entra}}
stringData: {{secret: "{secret}"}}
---
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: graph}}
spec:
  senders: {{default: "alerts@contoso.com"}}
  graph: {{tenantId: "{tenant}", clientId: "{app}", clientSecretRef: {{name: entra, key: secret}}, authorityHost: "{url}", endpoint: "{url}"}}
"#,
            url = emu.url
        ),
    )
    .await;
    create_yaml(&client, &ns, &route_yaml("deploys", "argocd", "graph", "")).await;
    let url = format!("{base}/alerts/{ns}/deploys");
    let bearer = vec![("Authorization", format!("Bearer {TOKEN}"))];

    let (status, answer) = post(&url, &bearer, ARGOCD).await;
    assert_eq!(status, 201, "{answer}");
    let name = named(&answer, &ns);
    assert!(name.starts_with("argocd-deploys-"), "{name}");
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let sent = common::wait_for(&api, &name, WAIT, |m| matches!(phase(m), Some(Phase::Sent | Phase::Failed))).await;
    assert_eq!(phase(&sent), Some(Phase::Sent), "{:?}", sent.status);
    assert_eq!(sent.spec.subject, "[Argo CD] guestbook: sync failed (4e9c917f)");
    assert_eq!(sent.spec.importance, Some(Importance::High));
    let accepted = emu.wait_messages(1, WAIT).await;
    let graph_message = accepted[0].to_string();
    assert!(graph_message.contains("[Argo CD] guestbook: sync failed (4e9c917f)"), "{graph_message}");
    assert!(graph_message.contains("OutOfSync") && graph_message.contains("Degraded"), "{graph_message}");

    // Argo CD retries the same rendered body (3 times): nothing new.
    for _ in 0..3 {
        let (status, again) = post(&url, &bearer, ARGOCD).await;
        assert_eq!((status, named(&again, &ns)), (200, name.clone()), "{again}");
    }
    for wrong in [vec![("Authorization", format!("Bearer {TOKEN}0"))], vec![("Authorization", "Basic eDp5".into())]] {
        let (status, answer) = post(&url, &wrong, ARGOCD).await;
        assert_eq!(status, 401, "{answer}");
    }
    // An Argo CD route takes no signature in place of the token.
    let signed = vec![("X-Signature", flux_signature(ARGOCD, TOKEN))];
    assert_eq!(post(&url, &signed, ARGOCD).await.0, 401);

    // The next sync, succeeded: another notification (another reconciledAt), another message.
    let mut ok: Value = serde_json::from_str(ARGOCD).unwrap();
    ok["event"] = "sync-succeeded".into();
    ok["syncStatus"] = "Synced".into();
    ok["healthStatus"] = "Healthy".into();
    ok["operationPhase"] = "Succeeded".into();
    ok["operationMessage"] = "successfully synced (all tasks run)".into();
    ok["reconciledAt"] = "2025-10-14T08:31:00Z".into();
    let (status, answer) = post(&url, &bearer, &ok.to_string()).await;
    assert_eq!(status, 201, "{answer}");
    let m = common::wait_for(&api, &named(&answer, &ns), WAIT, |m| phase(m) == Some(Phase::Sent)).await;
    assert_eq!(m.spec.importance, Some(Importance::Normal));
    assert_eq!(route_messages(&client, &ns, "deploys").await.len(), 2);
    emu.wait_messages(2, WAIT).await;
    wait_route_status(&client, &ns, "deploys", (8, 2, 3), true).await;
}

#[tokio::test]
async fn grafana_hmac_notifications_with_a_timestamp_become_emails_and_stale_or_wrong_ones_get_401() {
    let client = common::client().await;
    let ns = common::namespace(&client, "recv-grafana", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let (_op, base) = start_operator(&client, "recv-grafana", &ns, &[]).await;
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    create_yaml(
        &client,
        &ns,
        &route_yaml("grafana", "grafana", "relay", "  signature: {timestampHeader: X-Grafana-Alerting-Timestamp}"),
    )
    .await;
    let url = format!("{base}/alerts/{ns}/grafana");
    let signed_at = |body: &str, ts: i64, key: &str| {
        let ts = ts.to_string();
        vec![
            ("X-Grafana-Alerting-Signature", sign_hex(key.as_bytes(), &[ts.as_bytes(), b":", body.as_bytes()])),
            ("X-Grafana-Alerting-Timestamp", ts),
        ]
    };
    let now = || Timestamp::now().as_second();

    let (status, answer) = post(&url, &signed_at(GRAFANA, now(), TOKEN), GRAFANA).await;
    assert_eq!(status, 201, "{answer}");
    let name = named(&answer, &ns);
    assert!(name.starts_with("grafana-grafana-"), "{name}");
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    common::wait_for(&api, &name, WAIT, |m| phase(m) == Some(Phase::Sent)).await;
    let envelopes = peer.wait_messages(1, WAIT).await;
    let raw = peer.raw(&envelopes[0]);
    let mail = MessageParser::default().parse(&raw).expect("parse the received message");
    assert_eq!(mail.subject(), Some("[FIRING:2] Platform (blue)"));
    let text = mail.body_text(0).expect("a text part").to_string();
    for words in ["High memory usage", "B=44.23943737541908", "Dashboard:   https://grafana.contoso.com/d/a1b2c3"] {
        assert!(text.contains(words), "text lacks {words:?}:\n{text}");
    }
    assert_eq!(mail.header_raw("X-Grafana-Status").map(str::trim), Some("firing"));

    // The other Grafana of an HA pair sends the same notification, signed at its own time.
    let (status, again) = post(&url, &signed_at(GRAFANA, now() + 1, TOKEN), GRAFANA).await;
    assert_eq!((status, named(&again, &ns)), (200, name.clone()), "{again}");

    let bearer_only = vec![("Authorization", format!("Bearer {TOKEN}"))];
    for (what, headers) in [
        ("another key", signed_at(GRAFANA, now(), "another-key")),
        ("a stale timestamp", signed_at(GRAFANA, now() - 3600, TOKEN)),
        ("the token instead of the signature the route declares", bearer_only),
    ] {
        let (status, answer) = post(&url, &headers, GRAFANA).await;
        assert_eq!(status, 401, "{what}: {answer}");
    }
    // A signature over another body.
    let mut resolved: Value = serde_json::from_str(GRAFANA).unwrap();
    resolved["status"] = "resolved".into();
    let resolved = resolved.to_string();
    assert_eq!(post(&url, &signed_at(GRAFANA, now(), TOKEN), &resolved).await.0, 401);
    // An Alertmanager payload to a Grafana route is not Grafana's.
    let am = include_str!("fixtures/alertmanager-firing.json");
    let (status, answer) = post(&url, &signed_at(am, now(), TOKEN), am).await;
    assert_eq!(status, 422, "{answer}");

    assert_eq!(route_messages(&client, &ns, "grafana").await.len(), 1);
    wait_route_status(&client, &ns, "grafana", (7, 1, 5), true).await;
}

#[tokio::test]
async fn a_route_naming_a_missing_profile_and_template_is_not_ready_and_its_messages_wait_for_them() {
    let client = common::client().await;
    let ns = common::namespace(&client, "recv-order", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let (_op, base) = start_operator(&client, "recv-order", &ns, &[]).await;
    // The route first, as a GitOps tool may apply it: its profile and EmailTemplate come later.
    create_yaml(&client, &ns, &route_yaml("flux", "flux", "relay", "  emailTemplateRef: {name: flux-mail}")).await;
    let routes: Api<AlertRoute> = Api::namespaced(client.clone(), &ns);
    let route = common::wait_for(&routes, "flux", WAIT, |r| {
        r.status.as_ref().and_then(|s| find_condition(&s.conditions, "Ready")).is_some_and(|c| c.status == "False")
    })
    .await;
    let ready = find_condition(&route.status.as_ref().expect("status").conditions, "Ready").cloned().expect("Ready");
    assert_eq!(ready.reason, "ProfileNotFound", "{ready:?}");
    assert!(ready.message.contains(&format!("MailProfile {ns}/relay not found")), "{ready:?}");

    let url = format!("{base}/alerts/{ns}/flux");
    let (status, answer) = post(
        &url,
        &[("X-Signature", flux_signature(FLUX, TOKEN)), ("Gotk-Component", "kustomize-controller".into())],
        FLUX,
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let name = named(&answer, &ns);
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let waiting = common::wait_for(&api, &name, WAIT, |m| {
        message_condition(m, "Waiting").is_some_and(|c| c.status == "True" && c.reason == "ProfileNotFound")
    })
    .await;
    assert_eq!(waiting.spec.template_ref.as_ref().map(|t| t.name.as_str()), Some("flux-mail"));
    assert_eq!(waiting.spec.values.as_ref().and_then(|v| v.get("kind")), Some(&Value::from("Kustomization")));

    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    common::wait_for(&api, &name, WAIT, |m| {
        message_condition(m, "Waiting").is_some_and(|c| c.status == "True" && c.reason == "TemplateNotFound")
    })
    .await;
    wait_route_status(&client, &ns, "flux", (1, 1, 0), true).await;
    create_yaml(
        &client,
        &ns,
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: EmailTemplate
metadata: {name: flux-mail}
spec:
  subject: "{{ kind }} {{ name }} in {{ namespace }}: {{ reason }}"
  text: "{{ message }} at {{ revision }} (AlertRoute {{ route.name }}, source {{ source }})"
"#,
    )
    .await;
    // A waiting message is looked at again every minute.
    let sent = common::wait_for(&api, &name, Duration::from_secs(180), |m| {
        matches!(phase(m), Some(Phase::Sent | Phase::Failed))
    })
    .await;
    assert_eq!(phase(&sent), Some(Phase::Sent), "{:?}", sent.status);
    let envelopes = peer.wait_messages(1, WAIT).await;
    let raw = peer.raw(&envelopes[0]);
    let mail = MessageParser::default().parse(&raw).expect("parse the received message");
    assert_eq!(mail.subject(), Some("Kustomization webapp in apps: ValidationFailed"));
    let text = mail.body_text(0).expect("a text part").to_string();
    assert!(
        text.contains("at main@sha1:731f7eaddfb6af01cb2173e18f0f75b0ba780ef1 (AlertRoute flux, source flux)"),
        "{text}"
    );
}

/// Two replicas receive for the same route: each counts in memory and adds its counts with
/// conditional writes, so none is lost, and the notification's name makes one message of the
/// copies both receive.
#[tokio::test]
async fn two_replicas_count_every_notification_once_and_create_one_message() {
    let client = common::client().await;
    let ns = common::namespace(&client, "recv-replicas", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let (_a, base_a) = start_operator(&client, "recv-replicas-a", &ns, &[]).await;
    let (_b, base_b) = start_operator(&client, "recv-replicas-b", &ns, &[]).await;
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    create_yaml(&client, &ns, &route_yaml("on-call", "alertmanager", "relay", "")).await;
    let am = include_str!("fixtures/alertmanager-firing.json");
    let good = vec![("Authorization", format!("Bearer {TOKEN}"))];
    let bad = vec![("Authorization", format!("Bearer {TOKEN}-not"))];
    let mut statuses = Vec::new();
    for round in 0..4 {
        let posts = [&base_a, &base_b].into_iter().flat_map(|base| {
            let url = format!("{base}/alerts/{ns}/on-call");
            let headers = if round == 3 { bad.clone() } else { good.clone() };
            (0..5).map(move |_| {
                let (url, headers) = (url.clone(), headers.clone());
                async move { post(&url, &headers, am).await.0 }
            })
        });
        statuses.extend(futures::future::join_all(posts).await);
    }
    let created = statuses.iter().filter(|s| **s == 201).count();
    let retried = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 401).count();
    assert_eq!((created, retried, refused), (1, 29, 10), "{statuses:?}");
    assert_eq!(route_messages(&client, &ns, "on-call").await.len(), 1);
    let route = wait_route_status(&client, &ns, "on-call", (40, 1, 10), true).await;
    assert!(route.status.and_then(|s| s.last_outcome).is_some_and(|o| o.starts_with("Rejected 401")));
}
