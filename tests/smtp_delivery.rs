//! Delivery over SMTP with the real API server and a real SMTP server process.

mod common;

use std::time::Duration;

use common::smtp_peer::SmtpPeer;
use common::{Operator, create_yaml, message_condition, phase};
use kube::Api;
use mail_parser::{MessageParser, MimeHeaders};
use mailroom::api::{EmailMessage, MailProfile, Phase};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn relay_profile(name: &str, port: u16, extra: &str) -> String {
    format!(
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: {name}}}
spec:
  senders: {{default: "alerts@contoso.com", allowed: ["alerts@contoso.com", "*@noreply.contoso.com"]}}
  smtp: {{host: 127.0.0.1, port: {port}, tls: None}}
{extra}"#
    )
}

fn message(name: &str, profile: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: EmailMessage
metadata: {{name: {name}}}
spec:
  profileRef: {{name: {profile}}}
  to: ["Ops Team <ops@contoso.com>"]
  subject: "Deploy finished ✅"
  body: {{text: "Version 1.4.2 is live."}}
{extra}"#
    )
}

async fn wait_phase(api: &Api<EmailMessage>, name: &str, want: Phase) -> EmailMessage {
    common::wait_for(api, name, WAIT, |m| phase(m) == Some(want)).await
}

#[tokio::test]
async fn a_full_message_arrives_exactly_as_specified() {
    let client = common::client().await;
    let ns = common::namespace(&client, "smtp-full", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("smtp-full", &ns, &[]);
    create_yaml(&client, &ns, &relay_profile("relay", peer.smtp_port, "")).await;
    create_yaml(
        &client,
        &ns,
        r#"
apiVersion: v1
kind: Secret
metadata: {name: report}
stringData: {report.csv: "a,b\n1,2\n"}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: notes}
data: {notes.txt: "release notes"}
"#,
    )
    .await;
    create_yaml(
        &client,
        &ns,
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: EmailMessage
metadata: {name: full}
spec:
  profileRef: {name: relay}
  from: "Build Bot <build@noreply.contoso.com>"
  to: ["Ops Team <ops@contoso.com>", "dev@contoso.com"]
  cc: ["Zoë Müller <zoe@contoso.com>"]
  bcc: ["audit@contoso.com"]
  replyTo: ["help@contoso.com"]
  subject: "Deploy finished ✅ — café"
  body:
    text: "Version 1.4.2 is live."
    html: "<p>Version <b>1.4.2</b> is live.</p>"
  attachments:
  - {name: report.csv, contentType: text/csv, secretRef: {name: report, key: report.csv}}
  - {name: notes.txt, configMapRef: {name: notes, key: notes.txt}}
  - {name: résumé.txt, contentType: text/plain, data: aGVsbG8K}
  headers: {X-Pipeline-Run: "1234"}
  importance: high
"#,
    )
    .await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let sent = wait_phase(&api, "full", Phase::Sent).await;
    let status = sent.status.clone().unwrap();
    assert_eq!(status.attempts, Some(1));
    assert_eq!(status.recipients, Some(4));
    assert_eq!(status.transport.as_deref(), Some("smtp-relay"));
    assert!(status.response.as_deref().unwrap_or_default().starts_with("250"), "{status:?}");
    assert!(status.sent_time.is_some());
    let cond = message_condition(&sent, "Sent").unwrap();
    assert_eq!((cond.status.as_str(), cond.observed_generation), ("True", sent.metadata.generation));
    // A 250 to the message data: the server took responsibility for it.
    assert_eq!(cond.reason, "Delivered", "{cond:?}");

    let envelopes = peer.wait_messages(1, WAIT).await;
    assert_eq!(envelopes.len(), 1);
    let env = &envelopes[0];
    assert_eq!(env["mail_from"], "build@noreply.contoso.com");
    let mut rcpts: Vec<String> =
        env["rcpt_tos"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    rcpts.sort();
    assert_eq!(rcpts, ["audit@contoso.com", "dev@contoso.com", "ops@contoso.com", "zoe@contoso.com"]);

    let raw = peer.raw(env);
    let head = String::from_utf8_lossy(&raw[..raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(raw.len())])
        .to_lowercase();
    assert!(!head.contains("\nbcc:") && !head.contains("audit@contoso.com"), "Bcc leaked into the headers:\n{head}");
    let parsed = MessageParser::default().parse(&raw).expect("parse the received message");
    assert_eq!(parsed.subject(), Some("Deploy finished ✅ — café"));
    let to: Vec<_> =
        parsed.to().unwrap().iter().map(|a| (a.name().map(str::to_string), a.address().unwrap().to_string())).collect();
    assert_eq!(to, [(Some("Ops Team".into()), "ops@contoso.com".into()), (None, "dev@contoso.com".into())]);
    let cc = parsed.cc().unwrap().first().unwrap();
    assert_eq!((cc.name(), cc.address()), (Some("Zoë Müller"), Some("zoe@contoso.com")));
    assert_eq!(parsed.reply_to().unwrap().first().unwrap().address(), Some("help@contoso.com"));
    assert_eq!(parsed.from().unwrap().first().unwrap().name(), Some("Build Bot"));
    assert_eq!(parsed.body_text(0).as_deref().map(str::trim), Some("Version 1.4.2 is live."));
    assert_eq!(parsed.body_html(0).as_deref().map(str::trim), Some("<p>Version <b>1.4.2</b> is live.</p>"));
    let id = format!("<{}>", parsed.message_id().expect("Message-ID"));
    assert_eq!(Some(id.as_str()), status.message_id.as_deref());
    assert!(id.contains(&sent.metadata.uid.clone().unwrap()), "Message-ID derives from the uid: {id}");
    assert_eq!(parsed.header_raw("X-Pipeline-Run").map(str::trim), Some("1234"));
    assert_eq!(parsed.header_raw("Importance").map(str::trim).map(str::to_lowercase).as_deref(), Some("high"));
    let atts: Vec<(String, Vec<u8>)> = parsed
        .attachments()
        .map(|a| (a.attachment_name().unwrap_or_default().to_string(), a.contents().to_vec()))
        .collect();
    assert_eq!(
        atts,
        [
            ("report.csv".to_string(), b"a,b\n1,2\n".to_vec()),
            ("notes.txt".to_string(), b"release notes".to_vec()),
            ("résumé.txt".to_string(), b"hello\n".to_vec())
        ]
    );
    let csv = parsed.attachments().next().unwrap();
    assert_eq!(
        csv.content_type().map(|c| format!("{}/{}", c.ctype(), c.subtype().unwrap_or_default())).as_deref(),
        Some("text/csv")
    );

    common::expect_event(&client, &ns, "full", |r, n| r == "Sent" && n.contains("250")).await;
}

#[tokio::test]
async fn transient_then_success_and_permanent_failure() {
    let client = common::client().await;
    let ns = common::namespace(&client, "smtp-retry", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("smtp-retry", &ns, &[]);
    create_yaml(&client, &ns, &relay_profile("relay", peer.smtp_port, "")).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);

    peer.script(json!({"data": ["451 4.3.0 Try again later"]})).await;
    create_yaml(&client, &ns, &message("retried", "relay", "")).await;
    let sent = wait_phase(&api, "retried", Phase::Sent).await;
    assert_eq!(sent.status.as_ref().unwrap().attempts, Some(2));
    common::expect_event(&client, &ns, "retried", |r, n| r == "RetryScheduled" && n.contains("451")).await;

    peer.script(json!({"data": ["550 5.7.64 TenantAttribution; Relay Access Denied"]})).await;
    create_yaml(&client, &ns, &message("refused", "relay", "")).await;
    let failed = wait_phase(&api, "refused", Phase::Failed).await;
    assert_eq!(failed.status.as_ref().unwrap().attempts, Some(1), "a 5xx is not retried");
    let cond = message_condition(&failed, "Failed").unwrap();
    assert!(
        cond.message.contains("550") && cond.message.contains("TenantAttribution; Relay Access Denied"),
        "{cond:?}"
    );
    common::expect_event(&client, &ns, "refused", |r, n| r == "Failed" && n.contains("550")).await;
}

#[tokio::test]
async fn a_server_that_is_down_and_comes_back() {
    let client = common::client().await;
    let ns = common::namespace(&client, "smtp-down", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("smtp-down", &ns, &[]);
    create_yaml(&client, &ns, &relay_profile("relay", peer.smtp_port, "")).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    peer.script(json!({"down": true})).await;
    create_yaml(&client, &ns, &message("patient", "relay", "")).await;
    let waiting = common::wait_for(&api, "patient", WAIT, |m| {
        m.status
            .as_ref()
            .is_some_and(|s| s.attempts >= Some(1) && s.phase == Some(Phase::Pending) && s.next_attempt_time.is_some())
    })
    .await;
    let cond = message_condition(&waiting, "Sent").unwrap();
    assert_eq!(cond.reason, "RetryScheduled");
    peer.script(json!({"down": false})).await;
    let sent = wait_phase(&api, "patient", Phase::Sent).await;
    assert!(sent.status.unwrap().attempts >= Some(2));
    assert_eq!(peer.messages().await.len(), 1);
}

#[tokio::test]
async fn policy_violations_each_fail_with_their_own_reason() {
    let client = common::client().await;
    let ns = common::namespace(&client, "smtp-policy", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("smtp-policy", &ns, &[]);
    create_yaml(&client, &ns, &relay_profile("relay", peer.smtp_port, "  recipientDomains: [contoso.com]")).await;
    let cluster = format!("cmp-{}", &ns);
    create_yaml(
        &client,
        &ns,
        &format!(
            r#"
apiVersion: mailroom.dev/v1alpha1
kind: ClusterMailProfile
metadata: {{name: {cluster}}}
spec:
  allowedNamespaces: {{matchLabels: {{mail: allowed}}}}
  senders: {{default: noreply@contoso.com}}
  smtp: {{host: 127.0.0.1, port: {port}, tls: None}}
"#,
            port = peer.smtp_port
        ),
    )
    .await;
    create_yaml(&client, &ns, &message("bad-sender", "relay", "  from: ceo@contoso.com")).await;
    create_yaml(&client, &ns, &message("bad-domain", "relay", "  cc: [someone@gmail.com]")).await;
    create_yaml(
        &client,
        &ns,
        &format!(
            r#"
apiVersion: mailroom.dev/v1alpha1
kind: EmailMessage
metadata: {{name: not-admitted}}
spec:
  profileRef: {{kind: ClusterMailProfile, name: {cluster}}}
  to: [ops@contoso.com]
  subject: hi
  body: {{text: hi}}
"#
        ),
    )
    .await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    for (name, reason, words) in [
        ("bad-sender", "SenderNotAllowed", "sender ceo@contoso.com is not allowed"),
        ("bad-domain", "RecipientDomainNotAllowed", "someone@gmail.com"),
        ("not-admitted", "NamespaceNotAdmitted", "is not admitted by ClusterMailProfile"),
    ] {
        let m = wait_phase(&api, name, Phase::Failed).await;
        let c = message_condition(&m, "Failed").unwrap();
        assert_eq!(c.reason, reason, "{name}: {c:?}");
        assert!(c.message.contains(words), "{name}: {c:?}");
        assert_eq!(m.status.as_ref().unwrap().attempts, None, "{name}: nothing was sent");
    }
    assert!(peer.messages().await.is_empty());
    let cmp: Api<mailroom::api::ClusterMailProfile> = Api::all(client.clone());
    let _ = cmp.delete(&cluster, &Default::default()).await;
}

#[tokio::test]
async fn a_missing_secret_or_profile_waits_and_then_sends() {
    let client = common::client().await;
    let ns = common::namespace(&client, "smtp-wait", &[]).await;
    let peer = SmtpPeer::start(&["--auth-user", "mailer", "--auth-pass", "s3cret-pass"]);
    let _op = Operator::start("smtp-wait", &ns, &[]);
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    // No profile yet.
    create_yaml(&client, &ns, &message("early", "login", "")).await;
    let m =
        common::wait_for(&api, "early", WAIT, |m| message_condition(m, "Waiting").is_some_and(|c| c.status == "True"))
            .await;
    assert_eq!(message_condition(&m, "Waiting").unwrap().reason, "ProfileNotFound");
    // The profile appears, but its Secret does not exist.
    create_yaml(
        &client,
        &ns,
        &format!(
            r#"
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: login}}
spec:
  senders: {{default: alerts@contoso.com}}
  smtp: {{host: 127.0.0.1, port: {}, tls: None, auth: {{password: {{secretRef: {{name: smtp-login}}}}}}}}
"#,
            peer.smtp_port
        ),
    )
    .await;
    let profiles: Api<MailProfile> = Api::namespaced(client.clone(), &ns);
    let p = common::wait_for(&profiles, "login", WAIT, |p| {
        p.status
            .as_ref()
            .and_then(|s| mailroom::api::find_condition(&s.conditions, "Ready"))
            .is_some_and(|c| c.status == "False")
    })
    .await;
    let ready = mailroom::api::find_condition(&p.status.as_ref().unwrap().conditions, "Ready").unwrap().clone();
    assert_eq!(ready.reason, "SecretNotFound");
    assert!(ready.message.contains("smtp-login"), "{ready:?}");
    let m = common::wait_for(&api, "early", WAIT, |m| {
        message_condition(m, "Waiting").is_some_and(|c| c.reason == "ProfileNotReady")
    })
    .await;
    assert!(message_condition(&m, "Waiting").unwrap().message.contains("SecretNotFound"));
    // The Secret is created: the profile becomes ready and the message goes out.
    create_yaml(
        &client,
        &ns,
        "apiVersion: v1\nkind: Secret\nmetadata: {name: smtp-login}\nstringData: {username: mailer, password: s3cret-pass}\n",
    )
    .await;
    let sent = wait_phase(&api, "early", Phase::Sent).await;
    assert_eq!(sent.status.as_ref().unwrap().transport.as_deref(), Some("smtp-password"));
    let env = peer.wait_messages(1, WAIT).await;
    assert_eq!(env[0]["auth_user"].as_str().or_else(|| env[0]["authenticated_user"].as_str()), Some("mailer"));
}

#[tokio::test]
async fn in_doubt_messages_follow_on_uncertain() {
    let client = common::client().await;
    let ns = common::namespace(&client, "smtp-doubt", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let mut op = Operator::start("smtp-doubt", &ns, &[]);
    create_yaml(&client, &ns, &relay_profile("relay", peer.smtp_port, "")).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    // The server holds its answer to DATA, so the operator is killed while it waits.
    peer.script(json!({"latency_ms": 4000})).await;
    create_yaml(&client, &ns, &message("resend", "relay", "")).await;
    create_yaml(&client, &ns, &message("fail", "relay", "  delivery: {onUncertain: Fail}")).await;
    for name in ["resend", "fail"] {
        wait_phase(&api, name, Phase::Sending).await;
    }
    op.kill();
    peer.script(json!({"latency_ms": 0})).await;
    let _op2 = Operator::start("smtp-doubt", &ns, &[]);
    let resent = wait_phase(&api, "resend", Phase::Sent).await;
    let status = resent.status.clone().unwrap();
    assert_eq!(status.attempts, Some(2));
    let failed = wait_phase(&api, "fail", Phase::Failed).await;
    let c = message_condition(&failed, "Failed").unwrap();
    assert_eq!(c.reason, "DeliveryUncertain");
    // Every copy of the resent message carries the same Message-ID, the one in its status.
    let ids: Vec<String> = peer
        .messages()
        .await
        .iter()
        .filter(|e| e["rcpt_tos"].as_array().is_some_and(|r| !r.is_empty()))
        .filter_map(|e| e["message_id"].as_str().map(str::to_string))
        .filter(|id| id.contains(resent.metadata.uid.as_deref().unwrap()))
        .collect();
    assert!(!ids.is_empty());
    assert!(
        ids.iter().all(|id| Some(id.as_str()) == status.message_id.as_deref()),
        "{ids:?} vs {:?}",
        status.message_id
    );
}

#[tokio::test]
async fn finished_messages_are_deleted_after_their_ttl() {
    let client = common::client().await;
    let ns = common::namespace(&client, "smtp-ttl", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("smtp-ttl", &ns, &[]);
    create_yaml(&client, &ns, &relay_profile("relay", peer.smtp_port, "")).await;
    create_yaml(&client, &ns, &message("short-lived", "relay", "  ttlSecondsAfterFinished: 2")).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    wait_phase(&api, "short-lived", Phase::Sent).await;
    let start = std::time::Instant::now();
    while api.get_opt("short-lived").await.unwrap().is_some() {
        assert!(start.elapsed() < WAIT, "not deleted after its ttl");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The operator watches unfinished messages only, and finished ones that wait for their TTL
/// through watches of their own: messages that finished before it started (Sent with a TTL,
/// Failed with a TTL) are still deleted when due, one without a TTL is left alone, and a new
/// message is sent beside them.
#[tokio::test]
async fn messages_finished_before_the_start_are_deleted_after_their_ttl_and_others_kept() {
    let client = common::client().await;
    let ns = common::namespace(&client, "smtp-history", &[]).await;
    let peer = SmtpPeer::start(&[]);
    create_yaml(&client, &ns, &relay_profile("relay", peer.smtp_port, "")).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let finished = [
        ("sent-ttl", "Sent", "  ttlSecondsAfterFinished: 1"),
        ("failed-ttl", "Failed", "  ttlSecondsAfterFinished: 1"),
        ("sent-kept", "Sent", ""),
    ];
    let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    for (name, phase, extra) in finished {
        create_yaml(&client, &ns, &message(name, "relay", extra)).await;
        let status = match phase {
            "Sent" => json!({"phase": "Sent", "attempts": 1, "sentTime": now}),
            _ => json!({"phase": "Failed", "attempts": 1, "conditions": [{
                "type": "Failed", "status": "True", "reason": "SendFailed", "message": "550 no such user",
                "lastTransitionTime": now}]}),
        };
        api.patch_status(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(json!({"status": status})))
            .await
            .unwrap();
    }
    let _op = Operator::start("smtp-history", &ns, &[]);
    create_yaml(&client, &ns, &message("new", "relay", "")).await;
    wait_phase(&api, "new", Phase::Sent).await;
    let start = std::time::Instant::now();
    for name in ["sent-ttl", "failed-ttl"] {
        while api.get_opt(name).await.unwrap().is_some() {
            assert!(start.elapsed() < WAIT, "{name} was not deleted after its ttl");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let kept = api.get("sent-kept").await.unwrap();
    assert_eq!(phase(&kept), Some(Phase::Sent), "a finished message without a TTL stays as it was");
    assert_eq!(kept.status.as_ref().and_then(|s| s.attempts), Some(1));
    let sent = peer.messages().await;
    assert_eq!(sent.len(), 1, "only the new message was sent: {sent:?}");
}

#[tokio::test]
async fn rate_limit_spaces_messages_per_mailbox() {
    let client = common::client().await;
    let ns = common::namespace(&client, "smtp-rate", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("smtp-rate", &ns, &[]);
    create_yaml(
        &client,
        &ns,
        &relay_profile("relay", peer.smtp_port, "  limits: {messagesPerMinute: 6, maxConcurrent: 1}"),
    )
    .await;
    for i in 0..7 {
        create_yaml(&client, &ns, &message(&format!("m{i}"), "relay", "")).await;
    }
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let mut times = Vec::new();
    for i in 0..7 {
        let m = wait_phase(&api, &format!("m{i}"), Phase::Sent).await;
        times.push(m.status.unwrap().sent_time.unwrap().0);
    }
    times.sort();
    // A burst of 6, then one every 10 seconds: the seventh cannot go out before ~10 s after the first.
    let spread = times[6].duration_since(times[0]);
    assert!(spread.as_secs_f64() >= 8.0, "7 messages at 6/minute went out within {spread:?}");
    // The seventh is woken when the bucket refills, not by the one-minute recheck.
    assert!(spread.as_secs_f64() < 45.0, "the seventh message was not woken when its turn came: {spread:?}");
}

#[tokio::test]
async fn messages_waiting_for_a_turn_do_not_hold_up_other_profiles() {
    let client = common::client().await;
    let ns = common::namespace(&client, "smtp-turns", &[]).await;
    let peer = SmtpPeer::start(&[]);
    // Two reconciles at once: if waiting for a turn held one, the slow profile's queue would
    // take both and the other profile's message would wait a minute.
    let _op = Operator::start("smtp-turns", &ns, &["--concurrency", "2"]);
    create_yaml(
        &client,
        &ns,
        &relay_profile("slow", peer.smtp_port, "  limits: {messagesPerMinute: 1, maxConcurrent: 1}"),
    )
    .await;
    create_yaml(&client, &ns, &relay_profile("fast", peer.smtp_port, "")).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    for i in 0..6 {
        create_yaml(&client, &ns, &message(&format!("slow{i}"), "slow", "")).await;
    }
    // One a minute: the first goes, the other five queue for the next minutes.
    peer.wait_messages(1, WAIT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    create_yaml(&client, &ns, &message("fast", "fast", "")).await;
    let fast = common::wait_for(&api, "fast", Duration::from_secs(20), |m| phase(m) == Some(Phase::Sent)).await;
    assert_eq!(phase(&fast), Some(Phase::Sent));
    let mut sent_slow = 0;
    for i in 0..6 {
        if phase(&api.get(&format!("slow{i}")).await.unwrap()) == Some(Phase::Sent) {
            sent_slow += 1;
        }
    }
    assert_eq!(sent_slow, 1, "the slow profile sends one a minute");
    assert_eq!(peer.wait_messages(2, WAIT).await.len(), 2);
}

#[tokio::test]
async fn a_partial_delivery_names_the_refused_recipients() {
    let client = common::client().await;
    let ns = common::namespace(&client, "smtp-partial", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("smtp-partial", &ns, &[]);
    create_yaml(&client, &ns, &relay_profile("relay", peer.smtp_port, "")).await;
    peer.script(json!({"rcpt": {"gone@contoso.com": "550 5.1.1 User unknown"}})).await;
    create_yaml(&client, &ns, &message("partial", "relay", "  cc: [gone@contoso.com]")).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let sent = wait_phase(&api, "partial", Phase::Sent).await;
    let c = message_condition(&sent, "Sent").unwrap();
    assert_eq!(c.reason, "PartiallyDelivered");
    assert!(c.message.contains("gone@contoso.com (550 5.1.1 User unknown)"), "{c:?}");
    let env = peer.wait_messages(1, WAIT).await;
    assert_eq!(env[0]["rcpt_tos"], json!(["ops@contoso.com"]));
}

#[tokio::test]
async fn profiles_say_why_they_are_not_ready() {
    let client = common::client().await;
    let ns = common::namespace(&client, "profile-ready", &[]).await;
    let _op = Operator::start("profile-ready", &ns, &[]);
    create_yaml(
        &client,
        &ns,
        r#"
apiVersion: v1
kind: Secret
metadata: {name: login}
stringData: {username: mailer}
---
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {name: no-secret}
spec:
  senders: {default: a@contoso.com}
  smtp: {host: 127.0.0.1, auth: {password: {secretRef: {name: missing}}}}
---
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {name: no-key}
spec:
  senders: {default: a@contoso.com}
  smtp: {host: 127.0.0.1, auth: {password: {secretRef: {name: login}}}}
---
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {name: plain-http}
spec:
  senders: {default: a@contoso.com}
  graph: {tenantId: t, clientId: c, clientSecretRef: {name: login, key: username}, endpoint: "http://127.0.0.1:9"}
---
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {name: other-namespace}
spec:
  senders: {default: a@contoso.com}
  smtp: {host: 127.0.0.1, auth: {password: {secretRef: {name: login, namespace: kube-system}}}}
---
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {name: relay}
spec:
  senders: {default: a@contoso.com}
  smtp: {host: 127.0.0.1, port: 2525, tls: None}
"#,
    )
    .await;
    let profiles: Api<MailProfile> = Api::namespaced(client.clone(), &ns);
    for (name, status, reason, words) in [
        ("no-secret", "False", "SecretNotFound", "missing"),
        ("no-key", "False", "KeyNotFound", "has no key password"),
        ("plain-http", "False", "InvalidSettings", "plain http"),
        ("other-namespace", "False", "InvalidSettings", "only use Secrets in its own namespace"),
        ("relay", "True", "Ready", ""),
    ] {
        let p = common::wait_for(&profiles, name, WAIT, |p| {
            p.status.as_ref().and_then(|s| mailroom::api::find_condition(&s.conditions, "Ready")).is_some()
        })
        .await;
        let s = p.status.unwrap();
        let c = mailroom::api::find_condition(&s.conditions, "Ready").unwrap().clone();
        assert_eq!((c.status.as_str(), c.reason.as_str()), (status, reason), "{name}: {c:?}");
        assert!(c.message.contains(words), "{name}: {c:?}");
        assert_eq!(c.observed_generation, p.metadata.generation, "{name}");
    }
    let out = common::kubectl(&["get", "mp", "-n", &ns, "relay"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let header: Vec<&str> = text.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "TRANSPORT", "READY", "TOKEN", "EXPIRES", "AGE"]);
    assert!(text.lines().nth(1).unwrap_or_default().contains("smtp-relay"), "{text}");
}
