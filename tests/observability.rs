//! /metrics, /healthz, /readyz and JSON logs of a running operator.

mod common;

use std::time::Duration;

use common::smtp_peer::SmtpPeer;
use common::{Operator, create_yaml, phase};
use kube::Api;
use mailroom::api::{EmailMessage, Phase};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// The metrics and health addresses the operator logged (JSON log lines).
async fn addresses(op: &Operator) -> (String, String) {
    let start = std::time::Instant::now();
    loop {
        for line in op.log_text().lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            if let (Some(m), Some(h)) = (v["fields"]["metrics"].as_str(), v["fields"]["health"].as_str()) {
                return (m.to_string(), h.to_string());
            }
        }
        assert!(start.elapsed() < WAIT, "the operator never logged its addresses:\n{}", op.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_count_deliveries_and_health_answers() {
    let client = common::client().await;
    let ns = common::namespace(&client, "observe", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let op = Operator::start("observe", &ns, &["--log-format", "json"]);
    let (metrics, health) = addresses(&op).await;
    let http = common::http();

    let healthz = http.get(format!("http://{health}/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200);
    let ready = async {
        loop {
            if http.get(format!("http://{health}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(WAIT, ready).await.expect("/readyz turns 200 once the caches are synced");

    create_yaml(
        &client,
        &ns,
        &format!(
            r#"
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: relay}}
spec:
  senders: {{default: alerts@contoso.com}}
  smtp: {{host: 127.0.0.1, port: {}, tls: None}}
"#,
            peer.smtp_port
        ),
    )
    .await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let msg = |name: &str| {
        format!(
            "apiVersion: mailroom.dev/v1alpha1\nkind: EmailMessage\nmetadata: {{name: {name}}}\nspec:\n  profileRef: {{name: relay}}\n  to: [ops@contoso.com]\n  subject: s\n  body: {{text: t}}\n"
        )
    };
    for name in ["one", "two"] {
        create_yaml(&client, &ns, &msg(name)).await;
        common::wait_for(&api, name, WAIT, |m| phase(m) == Some(Phase::Sent)).await;
    }
    peer.script(json!({"data": ["550 5.7.1 Rejected by policy"]})).await;
    create_yaml(&client, &ns, &msg("three")).await;
    common::wait_for(&api, "three", WAIT, |m| phase(m) == Some(Phase::Failed)).await;

    let text = http.get(format!("http://{metrics}/metrics")).send().await.unwrap().text().await.unwrap();
    let profile = format!("{ns}/relay");
    let count = |outcome: &str| {
        sample(
            &text,
            &format!(r#"mailroom_messages_total{{profile="{profile}",transport="smtp-relay",outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(count("sent"), Some(2.0), "{text}");
    assert_eq!(count("failed"), Some(1.0), "{text}");
    assert_eq!(sample(&text, &format!(r#"mailroom_send_attempts_total{{profile="{profile}"}}"#)), Some(3.0), "{text}");
    assert_eq!(sample(&text, "mailroom_delivery_latency_seconds_count"), Some(2.0), "{text}");
    assert!(text.contains("# TYPE mailroom_queue_depth gauge"), "{text}");

    // Every log line is one JSON object, and none carries a secret-looking field.
    for line in op.log_text().lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
}
