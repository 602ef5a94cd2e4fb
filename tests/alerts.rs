//! The Alertmanager webhook receiver (over HTTPS with the test certificate) with the real API
//! server and a real SMTP server: a recorded notification becomes one delivered email; retries
//! create nothing; bad callers and bad payloads get a 4xx with the reason.

mod common;

use std::time::Duration;

use common::receiver;
use common::smtp_peer::SmtpPeer;
use common::{create_yaml, phase};
use kube::Api;
use kube::api::ListParams;
use mail_parser::MessageParser;
use mailroom::api::{EmailMessage, Importance, Phase};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
const FIRING: &str = include_str!("fixtures/alertmanager-firing.json");
const TOKEN: &str = "am-webhook-6f1d2c9e";

/// A relay profile to the SMTP peer, the token Secret and an AlertRoute named `platform`.
async fn route_setup(client: &kube::Client, ns: &str, smtp_port: u16, extra: &str) {
    create_yaml(
        client,
        ns,
        &format!(
            r#"
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: relay}}
spec:
  senders: {{default: "alerts@contoso.com"}}
  smtp: {{host: 127.0.0.1, port: {smtp_port}, tls: None}}
---
apiVersion: v1
kind: Secret
metadata: {{name: alertmanager-webhook}}
stringData: {{token: "{TOKEN}\n"}}
---
apiVersion: mailroom.dev/v1alpha1
kind: AlertRoute
metadata: {{name: platform}}
spec:
  profileRef: {{name: relay}}
  to: ["Platform On-Call <oncall@contoso.com>"]
  cc: ["sre@contoso.com"]
  tokenSecretRef: {{name: alertmanager-webhook, key: token}}
{extra}"#
        ),
    )
    .await;
}

async fn post(
    url: &str,
    token: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, String, reqwest::header::HeaderMap) {
    let mut req = receiver::https().post(url).header("content-type", "application/json").body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("the receiver answers");
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, resp.text().await.unwrap_or_default(), headers)
}

async fn route_messages(client: &kube::Client, ns: &str) -> Vec<EmailMessage> {
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default().labels("mailroom.dev/alert-route=platform")).await.expect("list").items
}

/// The message name in a receiver's answer (`... EmailMessage ns/name`).
fn named(answer: &str, ns: &str) -> String {
    let prefix = format!("EmailMessage {ns}/");
    answer.split(&prefix).nth(1).map(|s| s.trim().to_string()).unwrap_or_else(|| panic!("no name in {answer:?}"))
}

fn resolved_payload() -> String {
    let mut v: Value = serde_json::from_str(FIRING).unwrap();
    v["status"] = "resolved".into();
    for a in v["alerts"].as_array_mut().unwrap() {
        a["status"] = "resolved".into();
        a["endsAt"] = "2025-10-14T09:02:37.482Z".into();
    }
    v.to_string()
}

#[tokio::test]
async fn a_recorded_notification_becomes_one_delivered_email_and_a_retry_nothing_more() {
    let client = common::client().await;
    let ns = common::namespace(&client, "alerts-deliver", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let (_op, base) = receiver::start_operator(&client, "alerts-deliver", &ns, &[]).await;
    route_setup(&client, &ns, peer.smtp_port, "").await;
    let url = format!("{base}/alerts/{ns}/platform");

    let (status, answer, _) = post(&url, Some(TOKEN), FIRING).await;
    assert_eq!(status, 201, "{answer}");
    let name = named(&answer, &ns);
    assert!(name.starts_with("alert-platform-"), "{name}");

    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let sent = common::wait_for(&api, &name, WAIT, |m| phase(m) == Some(Phase::Sent)).await;
    let labels = sent.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("mailroom.dev/alert-route").map(String::as_str), Some("platform"));
    assert_eq!(labels.get("mailroom.dev/alert-status").map(String::as_str), Some("firing"));
    assert_eq!(sent.spec.profile_ref.name, "relay");
    assert_eq!(sent.spec.importance, Some(Importance::High), "critical alerts are high importance");
    assert_eq!(sent.spec.ttl_seconds_after_finished, Some(604_800));

    let envelopes = peer.wait_messages(1, WAIT).await;
    let mut rcpts: Vec<&str> = envelopes[0]["rcpt_tos"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    rcpts.sort();
    assert_eq!(rcpts, ["oncall@contoso.com", "sre@contoso.com"]);
    let raw = peer.raw(&envelopes[0]);
    let mail = MessageParser::default().parse(&raw).expect("parse the received message");
    assert_eq!(mail.subject(), Some("[FIRING:2] KubePodCrashLooping shop (api kube-state-metrics critical)"));
    let text = mail.body_text(0).expect("a text part").to_string();
    for words in ["Pod is crash looping.", "CrashLoopBackOff", "2025-10-14 08:21:37 UTC", "pod=api-7d9f8c6b5-q8k2m"] {
        assert!(text.contains(words), "text lacks {words:?}:\n{text}");
    }
    assert!(text.contains("http://alertmanager-main-0:9093/#/silences/new?filter="), "{text}");
    let html = mail.body_html(0).expect("an HTML part").to_string();
    assert!(html.contains(">Silence</a>") && html.contains("FIRING"), "{html}");
    assert_eq!(mail.header_raw("X-Alertmanager-Status").map(str::trim), Some("firing"));
    assert_eq!(mail.header_raw("Importance").map(str::trim).map(str::to_lowercase).as_deref(), Some("high"));

    // Alertmanager retries (or its HA peer sends the same): nothing new is created or sent.
    for _ in 0..2 {
        let (status, again, _) = post(&url, Some(TOKEN), FIRING).await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(named(&again, &ns), name);
    }
    assert_eq!(route_messages(&client, &ns).await.len(), 1);

    // The resolution is another notification: another message.
    let (status, answer, _) = post(&url, Some(TOKEN), resolved_payload()).await;
    assert_eq!(status, 201, "{answer}");
    let resolved = named(&answer, &ns);
    assert_ne!(resolved, name);
    let m = common::wait_for(&api, &resolved, WAIT, |m| phase(m) == Some(Phase::Sent)).await;
    assert_eq!(m.spec.importance, Some(Importance::Normal));
    assert!(m.spec.subject.starts_with("[RESOLVED] KubePodCrashLooping"), "{}", m.spec.subject);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(peer.messages().await.len(), 2, "one email per notification");
    assert_eq!(route_messages(&client, &ns).await.len(), 2);

    // The same new notification from several senders at once (an HA pair, a retry racing the
    // first attempt): exactly one is created, the others find it.
    let mut other: Value = serde_json::from_str(FIRING).unwrap();
    other["groupKey"] =
        "{}/{severity=~\"critical|warning\"}:{alertname=\"KubePodCrashLooping\", namespace=\"cart\"}".into();
    let body = other.to_string();
    let answers = futures::future::join_all((0..4).map(|_| post(&url, Some(TOKEN), body.clone()))).await;
    let mut statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 201], "{answers:?}");
    let names: std::collections::BTreeSet<String> = answers.iter().map(|a| named(&a.1, &ns)).collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert_eq!(route_messages(&client, &ns).await.len(), 3);

    common::expect_event(&client, &ns, "platform", |r, n| r == "MessageCreated" && n.contains(&name)).await;
}

#[tokio::test]
async fn callers_without_the_routes_token_get_401_and_create_nothing() {
    let client = common::client().await;
    let ns = common::namespace(&client, "alerts-auth", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let (_op, base) = receiver::start_operator(&client, "alerts-auth", &ns, &[]).await;
    route_setup(&client, &ns, peer.smtp_port, "").await;
    let url = format!("{base}/alerts/{ns}/platform");

    let (status, answer, headers) = post(&url, None, FIRING).await;
    assert_eq!(status, 401, "{answer}");
    assert!(answer.contains("Authorization: Bearer"), "{answer}");
    assert_eq!(headers.get("www-authenticate").and_then(|v| v.to_str().ok()), Some("Bearer"));
    for wrong in ["am-webhook-6f1d2c9", "am-webhook-6f1d2c9e0", "AM-WEBHOOK-6F1D2C9E", "x"] {
        let (status, answer, _) = post(&url, Some(wrong), FIRING).await;
        assert_eq!(status, 401, "{wrong}: {answer}");
    }
    let basic = receiver::https()
        .post(&url)
        .basic_auth("alertmanager", Some(TOKEN))
        .body(FIRING)
        .send()
        .await
        .expect("the receiver answers");
    assert_eq!(basic.status().as_u16(), 401);

    // Unknown routes and namespaces the operator does not serve.
    let (status, answer, _) = post(&format!("{base}/alerts/{ns}/nobody"), Some(TOKEN), FIRING).await;
    assert_eq!((status, answer.contains("not found")), (404, true), "{answer}");
    let (status, answer, _) = post(&format!("{base}/alerts/kube-system/platform"), Some(TOKEN), FIRING).await;
    assert_eq!((status, answer.contains("not served")), (404, true), "{answer}");

    // A route whose token Secret is missing answers 500 (Alertmanager retries) and sends nothing.
    create_yaml(
        &client,
        &ns,
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: AlertRoute
metadata: {name: unkeyed}
spec:
  profileRef: {name: relay}
  to: [oncall@contoso.com]
  tokenSecretRef: {name: not-there, key: token}
"#,
    )
    .await;
    let (status, answer, _) = post(&format!("{base}/alerts/{ns}/unkeyed"), Some(TOKEN), FIRING).await;
    assert_eq!(status, 500, "{answer}");
    assert!(answer.contains("Secret") && answer.contains("not-there") && !answer.contains(TOKEN), "{answer}");

    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    assert!(api.list(&ListParams::default()).await.unwrap().items.is_empty(), "nothing was created");
    assert!(peer.messages().await.is_empty());
}

#[tokio::test]
async fn oversized_and_malformed_payloads_get_4xx_with_the_reason() {
    let client = common::client().await;
    let ns = common::namespace(&client, "alerts-bad", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let (op, base) = receiver::start_operator(&client, "alerts-bad", &ns, &[]).await;
    route_setup(&client, &ns, peer.smtp_port, "").await;
    let url = format!("{base}/alerts/{ns}/platform");

    let mut huge: Value = serde_json::from_str(FIRING).unwrap();
    // Just over the limit, so that the refused remainder fits in loopback buffers.
    huge["commonAnnotations"]["description"] = "x".repeat(1024 * 1024).into();
    let (status, answer, _) = post(&url, Some(TOKEN), huge.to_string()).await;
    assert_eq!(status, 413, "{answer}");
    assert!(answer.contains("larger than 1048576 bytes"), "{answer}");

    let (status, answer, _) = post(&url, Some(TOKEN), "{\"version\": \"4\", \"alerts\": [").await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("not an Alertmanager webhook payload"), "{answer}");

    let (status, answer, _) = post(&url, Some(TOKEN), r#"{"version":"4","status":"firing","alerts":[]}"#).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("missing field `groupKey`"), "{answer}");

    let mut v3: Value = serde_json::from_str(FIRING).unwrap();
    v3["version"] = "3".into();
    let (status, answer, _) = post(&url, Some(TOKEN), v3.to_string()).await;
    assert_eq!(status, 422, "{answer}");
    assert!(answer.contains("version \"3\" is not supported"), "{answer}");

    let mut no_alerts: Value = serde_json::from_str(FIRING).unwrap();
    no_alerts["alerts"] = Value::Array(vec![]);
    let (status, answer, _) = post(&url, Some(TOKEN), no_alerts.to_string()).await;
    assert_eq!((status, answer.contains("no alerts")), (422, true), "{answer}");

    let mut bad_time: Value = serde_json::from_str(FIRING).unwrap();
    bad_time["alerts"][0]["startsAt"] = "yesterday".into();
    let (status, answer, _) = post(&url, Some(TOKEN), bad_time.to_string()).await;
    assert_eq!((status, answer.contains("alerts[0].startsAt")), (422, true), "{answer}");

    let get = receiver::https().get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(get.status().as_u16(), 405);

    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    assert!(api.list(&ListParams::default()).await.unwrap().items.is_empty(), "nothing was created");
    assert!(!op.log_text().contains(TOKEN), "the token never appears in the log");
}

#[tokio::test]
async fn a_routes_template_shapes_the_email_and_a_broken_one_falls_back_to_the_default() {
    let client = common::client().await;
    let ns = common::namespace(&client, "alerts-tmpl", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let (_op, base) = receiver::start_operator(&client, "alerts-tmpl", &ns, &[]).await;
    create_yaml(
        &client,
        &ns,
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: alert-templates}
data:
  subject: "{{ status|upper }}: {{ commonLabels.alertname }} in {{ groupLabels.namespace }} ({{ firing|length }})"
  text: |
    {% for a in alerts %}- {{ a.name }} on {{ a.labels.pod }}: {{ a.summary }}
    {% endfor %}
"#,
    )
    .await;
    route_setup(
        &client,
        &ns,
        peer.smtp_port,
        "  templateRef: {name: alert-templates}\n  importanceBySeverity: {critical: low}",
    )
    .await;
    let url = format!("{base}/alerts/{ns}/platform");

    let (status, answer, _) = post(&url, Some(TOKEN), FIRING).await;
    assert_eq!(status, 201, "{answer}");
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let m = common::wait_for(&api, &named(&answer, &ns), WAIT, |m| phase(m) == Some(Phase::Sent)).await;
    assert_eq!(m.spec.subject, "FIRING: KubePodCrashLooping in shop (2)");
    assert_eq!(m.spec.importance, Some(Importance::Low), "the route's own severity mapping");
    let text = m.spec.body.text.clone().unwrap();
    assert!(text.contains("- KubePodCrashLooping on api-7d9f8c6b5-x2x9q: Pod is crash looping."), "{text}");
    assert!(m.spec.body.html.as_deref().unwrap_or_default().contains("<!DOCTYPE html>"), "html keeps the default");

    // Someone breaks the template: the alert still goes out, with the default layout, and says why.
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), &ns);
    cms.patch(
        "alert-templates",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"data": {"subject": "{% if status %}unclosed"}})),
    )
    .await
    .unwrap();
    let (status, answer, _) = post(&url, Some(TOKEN), resolved_payload()).await;
    assert_eq!(status, 201, "{answer}");
    let m = common::wait_for(&api, &named(&answer, &ns), WAIT, |m| phase(m) == Some(Phase::Sent)).await;
    assert!(m.spec.subject.starts_with("[RESOLVED] KubePodCrashLooping shop"), "{}", m.spec.subject);
    let why = m.metadata.annotations.clone().unwrap_or_default().remove("mailroom.dev/alert-template-error");
    assert!(why.as_deref().is_some_and(|w| w.contains("subject template") && w.contains("syntax error")), "{why:?}");
    assert!(m.spec.body.text.as_deref().unwrap_or_default().contains("could not be used"));
    common::expect_event(&client, &ns, "platform", |r, n| r == "TemplateFailed" && n.contains("syntax error")).await;
    peer.wait_messages(2, WAIT).await;
}
