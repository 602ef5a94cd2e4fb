//! The real Alertmanager (built from the Go module proxy by hack/prom-tools.sh) in front of
//! mailroom's webhook receiver: alerts posted to Alertmanager's API v2 arrive as EmailMessages
//! that are Sent through the SMTP test server: firing, grouped (two alerts, one message),
//! repeated after `repeat_interval`, and resolved (`send_resolved`). Alertmanager listens on
//! loopback only, without clustering, and posts over HTTPS, trusting the receiver's CA
//! (`http_config.tls_config.ca_file`) and sending the AlertRoute's bearer token from a file
//! (`http_config.authorization.credentials_file`), as examples/alertmanager.yml does.

mod common;

use std::time::{Duration, Instant};

use common::alertmanager::Alertmanager;
use common::receiver;
use common::smtp_peer::SmtpPeer;
use common::{create_yaml, phase};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::ListParams;
use mail_parser::MessageParser;
use mailroom::api::{EmailMessage, Phase};
use serde_json::{Value, json};

/// Polls get a generous deadline: the machine may be busy; nothing here is timed.
const WAIT: Duration = Duration::from_secs(180);
const TOKEN: &str = "am-real-4b7e19d2c05a";
/// The AlertRoute's retry window (its minimum) and Alertmanager's repeat interval above it, so
/// that a reminder is told from a retry.
const RETRY_WINDOW_SECONDS: u64 = 10;
const REPEAT_INTERVAL: &str = "15s";
/// Alertmanager's default subject: the group's label values, then the other common ones.
const FIRING_SUBJECT: &str = "[FIRING:2] MailroomTestBackendDown (critical)";

/// Alertmanager with one webhook receiver posting to `receiver_url` with `token`.
async fn webhook_alertmanager(test: &str, receiver_url: &str, token: &str) -> Alertmanager {
    Alertmanager::start(test, |dir| {
        let token_file = dir.join("token");
        std::fs::write(&token_file, token).expect("token file");
        format!(
            r#"global:
  resolve_timeout: 1h
route:
  receiver: mailroom
  group_by: [alertname]
  group_wait: 1s
  group_interval: 2s
  repeat_interval: {REPEAT_INTERVAL}
receivers:
- name: mailroom
  webhook_configs:
  - url: {receiver_url}
    send_resolved: true
    http_config:
      authorization:
        type: Bearer
        credentials_file: {}
      tls_config:
        ca_file: {}
"#,
            token_file.display(),
            receiver::testdata("ca.crt").display()
        )
    })
    .await
}

/// Two alerts of one group (same alertname), firing since `starts`, or resolved at `ends`.
fn alerts(starts: Timestamp, ends: Option<Timestamp>) -> Value {
    let alert = |instance: &str| {
        let mut a = json!({
            "labels": {"alertname": "MailroomTestBackendDown", "instance": instance, "severity": "critical"},
            "annotations": {"summary": format!("Backend {instance} is down.")},
            "startsAt": starts.to_string(),
            "generatorURL": "http://prometheus.test:9090/graph",
        });
        if let Some(ends) = ends {
            a["endsAt"] = ends.to_string().into();
        }
        a
    };
    json!([alert("backend-a:8080"), alert("backend-b:8080")])
}

async fn route_messages(api: &Api<EmailMessage>) -> Vec<EmailMessage> {
    api.list(&ListParams::default().labels("mailroom.dev/alert-route=platform")).await.expect("list").items
}

fn label<'a>(m: &'a EmailMessage, key: &str) -> Option<&'a str> {
    m.metadata.labels.as_ref().and_then(|l| l.get(key)).map(String::as_str)
}

/// Polls until a message of the route satisfies `want`, and returns it once Sent.
async fn wait_message(api: &Api<EmailMessage>, what: &str, want: impl Fn(&EmailMessage) -> bool) -> EmailMessage {
    let start = Instant::now();
    let name = loop {
        let messages = route_messages(api).await;
        if let Some(m) = messages.iter().find(|m| want(m)) {
            break m.metadata.name.clone().expect("name");
        }
        let names: Vec<_> = messages.iter().filter_map(|m| m.metadata.name.clone()).collect();
        assert!(start.elapsed() < WAIT, "no message for {what}; the route's messages: {names:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    common::wait_for(api, &name, WAIT, |m| phase(m) == Some(Phase::Sent)).await
}

/// The subjects of the emails the SMTP test server received, in order.
async fn received_subjects(peer: &SmtpPeer) -> Vec<String> {
    let mut subjects = Vec::new();
    for envelope in peer.messages().await {
        let raw = peer.raw(&envelope);
        let mail = MessageParser::default().parse(&raw).expect("parse the received message");
        subjects.push(mail.subject().unwrap_or_default().to_string());
    }
    subjects
}

#[tokio::test]
async fn alertmanager_fires_groups_repeats_and_resolves_through_the_receiver() {
    let client = common::client().await;
    let ns = common::namespace(&client, "alertmanager", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let (op, base) = receiver::start_operator(&client, "alertmanager", &ns, &[]).await;
    create_yaml(
        &client,
        &ns,
        &format!(
            r#"
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: relay}}
spec:
  senders: {{default: "alerts@contoso.com"}}
  smtp: {{host: 127.0.0.1, port: {}, tls: None}}
---
apiVersion: v1
kind: Secret
metadata: {{name: alertmanager-webhook}}
stringData: {{token: "{TOKEN}"}}
---
apiVersion: mailroom.dev/v1alpha1
kind: AlertRoute
metadata: {{name: platform}}
spec:
  profileRef: {{name: relay}}
  to: ["Platform On-Call <oncall@contoso.com>"]
  tokenSecretRef: {{name: alertmanager-webhook, key: token}}
  retryWindowSeconds: {RETRY_WINDOW_SECONDS}
"#,
            peer.smtp_port
        ),
    )
    .await;
    let am = webhook_alertmanager("alertmanager", &format!("{base}/alerts/{ns}/platform"), TOKEN).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);

    // Firing, grouped: two alerts in one request, one group, one notification, one message.
    // They start now: Alertmanager flushes a group at once, without group_wait, for an alert
    // that started longer than group_wait ago, which could send the first alert alone.
    let starts = Timestamp::now();
    am.post_alerts(&alerts(starts, None)).await;
    let first =
        wait_message(&api, "the firing group", |m| label(m, "mailroom.dev/alert-status") == Some("firing")).await;
    let first_name = first.metadata.name.clone().expect("name");
    assert!(first_name.starts_with("alert-platform-"), "{first_name}");
    assert_eq!(first.spec.subject, FIRING_SUBJECT, "both alerts in one message");
    let text = first.spec.body.text.clone().unwrap_or_default();
    for words in ["Backend backend-a:8080 is down.", "Backend backend-b:8080 is down."] {
        assert!(text.contains(words), "the message lacks {words:?}:\n{text}");
    }

    // Repeating: after repeat_interval Alertmanager sends the same notification again, which is
    // past the route's retry window, so it is a new message with the next number.
    let repeat_name = format!("{first_name}-2");
    let repeat = wait_message(&api, "the reminder", |m| m.metadata.name.as_deref() == Some(repeat_name.as_str())).await;
    assert_eq!(repeat.spec.subject, first.spec.subject);
    assert_eq!(label(&repeat, "mailroom.dev/alert-status"), Some("firing"));

    // Resolving: the same alerts with an end time; send_resolved makes one more notification.
    am.post_alerts(&alerts(starts, Some(Timestamp::now()))).await;
    let resolved =
        wait_message(&api, "the resolution", |m| label(m, "mailroom.dev/alert-status") == Some("resolved")).await;
    assert!(
        resolved.spec.subject.starts_with("[RESOLVED] MailroomTestBackendDown (critical)"),
        "{}",
        resolved.spec.subject
    );

    // What the SMTP server received: the first notification, its reminder(s), the resolution,
    // and nothing else; every firing email holds both alerts.
    let messages = route_messages(&api).await;
    let start = Instant::now();
    let subjects = loop {
        let subjects = received_subjects(&peer).await;
        if subjects.len() >= messages.len() {
            break subjects;
        }
        assert!(start.elapsed() < WAIT, "the SMTP server has {subjects:?} for {} messages", messages.len());
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(subjects.len() >= 3, "{subjects:?}");
    assert_eq!(subjects[0], FIRING_SUBJECT, "{subjects:?}");
    assert_eq!(subjects[1], FIRING_SUBJECT, "{subjects:?}");
    assert!(subjects.iter().all(|s| s == FIRING_SUBJECT || s.starts_with("[RESOLVED]")), "{subjects:?}");
    assert_eq!(subjects.iter().filter(|s| s.starts_with("[RESOLVED]")).count(), 1, "{subjects:?}");
    // Each message is a notification: the firing ones are the first and its numbered repeats.
    for m in &messages {
        let name = m.metadata.name.as_deref().unwrap_or_default();
        if label(m, "mailroom.dev/alert-status") == Some("firing") {
            assert!(
                name == first_name
                    || name.strip_prefix(&format!("{first_name}-")).is_some_and(|n| n.parse::<u32>().is_ok()),
                "{name} is not the first notification or one of its repeats"
            );
        }
    }
    let log = op.log_text();
    assert!(!log.contains(TOKEN), "the token never appears in the operator's log");
}
