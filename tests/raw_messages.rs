//! Raw messages (`spec.raw`): a ready-made RFC 5322 message in a Secret, sent through the real
//! API server by the operator to the SMTP test server and to the Microsoft 365 emulator.

mod common;

use std::time::Duration;

use common::emulator::{Emulator, concat_pems};
use common::smtp_peer::SmtpPeer;
use common::{Operator, create_yaml, message_condition, phase};
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};
use mailroom::api::{EmailMessage, Phase};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
/// A message waiting for its Secret looks again every minute.
const WAIT_FOR_SECRET: Duration = Duration::from_secs(150);
/// Only in the messages' bodies: it must never reach a status, an Event or the operator's log.
const MARKER: &str = "ZEBRA-BODY-7f3a91";

fn relay_profile(port: u16, extra: &str) -> String {
    format!(
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: relay}}
spec:
  senders: {{default: "alerts@contoso.com", allowed: ["alerts@contoso.com", "*@noreply.contoso.com"]}}
  smtp: {{host: 127.0.0.1, port: {port}, tls: None}}
{extra}"#
    )
}

fn raw_message(name: &str, secret: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: EmailMessage
metadata: {{name: {name}}}
spec:
  profileRef: {{name: relay}}
  raw: {{secretRef: {{name: {secret}}}}}
{extra}"#
    )
}

async fn eml_secret(client: &Client, ns: &str, name: &str, key: &str, bytes: &[u8]) {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
        "data": {key: base64_encode(bytes)},
    }))
    .expect("Secret");
    Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &secret).await.expect("create Secret");
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn wait_phase(api: &Api<EmailMessage>, name: &str, want: Phase) -> EmailMessage {
    common::wait_for(api, name, WAIT, |m| phase(m) == Some(want)).await
}

fn status(m: &EmailMessage) -> mailroom::api::EmailMessageStatus {
    m.status.clone().unwrap_or_default()
}

/// Neither the message's status nor its Events nor the operator's log carry the marker.
async fn assert_no_content_leaked(client: &Client, ns: &str, msg: &EmailMessage, op: &Operator) {
    let status = serde_json::to_string(&msg.status).expect("status");
    assert!(!status.contains(MARKER), "the status shows the message's content: {status}");
    for (reason, note) in common::events_for(client, ns, &msg.name_any()).await {
        assert!(!note.contains(MARKER), "Event {reason} shows the message's content: {note}");
    }
    assert!(!op.log_text().contains(MARKER), "the operator's log shows the message's content");
}

const WITHOUT_ID: &str = "From: Build Bot <build@noreply.contoso.com>\r\n\
To: Ops Team <ops@contoso.com>\r\n\
Cc: dev@contoso.com\r\n\
Bcc: audit@contoso.com,\r\n archive@contoso.com\r\n\
Subject: Deploy finished\r\n\
Date: Fri, 15 Jan 2027 08:00:00 +0000\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\
X-Pipeline-Run: 1234\r\n\
\r\n\
Version 1.4.2 is live. ZEBRA-BODY-7f3a91\r\n\
.a line that starts with a dot\r\n\
\r\n";

#[tokio::test]
async fn raw_messages_reach_the_smtp_server_as_they_are() {
    let client = common::client().await;
    let ns = common::namespace(&client, "raw-smtp", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let op = Operator::start("raw-smtp", &ns, &[]);
    create_yaml(&client, &ns, &relay_profile(peer.smtp_port, "")).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);

    // Envelope from the header fields, Bcc included; Message-ID assigned and inserted.
    eml_secret(&client, &ns, "deploy-eml", "message.eml", WITHOUT_ID.as_bytes()).await;
    create_yaml(&client, &ns, &raw_message("headers", "deploy-eml", "")).await;
    let sent = wait_phase(&api, "headers", Phase::Sent).await;
    let s = status(&sent);
    let uid = sent.uid().expect("uid");
    let assigned = format!("<{uid}.mailroom@contoso.com>");
    assert_eq!(s.message_id.as_deref(), Some(assigned.as_str()));
    assert_eq!(s.recipients, Some(4));
    assert_eq!(s.from.as_deref(), Some("alerts@contoso.com"));
    assert_eq!(message_condition(&sent, "Sent").map(|c| c.reason).as_deref(), Some("Delivered"));
    let env = peer.wait_messages(1, WAIT).await;
    assert_eq!(env[0]["mail_from"], "alerts@contoso.com");
    let mut rcpts: Vec<&str> = env[0]["rcpt_tos"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    rcpts.sort();
    assert_eq!(rcpts, ["archive@contoso.com", "audit@contoso.com", "dev@contoso.com", "ops@contoso.com"]);
    let received = peer.raw(&env[0]);
    let without_bcc = WITHOUT_ID.replace("Bcc: audit@contoso.com,\r\n archive@contoso.com\r\n", "");
    let expected = format!("Message-ID: {assigned}\r\n{without_bcc}");
    assert_eq!(String::from_utf8_lossy(&received), expected, "byte for byte, but the Message-ID and the Bcc");

    // Envelope from the spec (LF line endings in the Secret, its own Message-ID, another key).
    let own = format!("Message-ID: <own-42@build.contoso.com>\r\n{WITHOUT_ID}").replace("\r\n", "\n");
    eml_secret(&client, &ns, "own-eml", "deploy.eml", own.as_bytes()).await;
    let extra = "  to: [\"ops@contoso.com\"]\n  bcc: [\"lead@contoso.com\"]\n";
    let yaml =
        raw_message("spec-envelope", "own-eml", extra).replace("name: own-eml}", "name: own-eml, key: deploy.eml}");
    create_yaml(&client, &ns, &yaml).await;
    let sent = wait_phase(&api, "spec-envelope", Phase::Sent).await;
    assert_eq!(status(&sent).message_id.as_deref(), Some("<own-42@build.contoso.com>"));
    assert_eq!(status(&sent).recipients, Some(2));
    let env = peer.wait_messages(2, WAIT).await;
    let mut rcpts: Vec<&str> = env[1]["rcpt_tos"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    rcpts.sort();
    assert_eq!(rcpts, ["lead@contoso.com", "ops@contoso.com"], "the spec's recipients, not the header fields'");
    let expected = format!("Message-ID: <own-42@build.contoso.com>\r\n{without_bcc}");
    assert_eq!(String::from_utf8_lossy(&peer.raw(&env[1])), expected, "CRLF line endings, nothing else changed");
    assert_no_content_leaked(&client, &ns, &sent, &op).await;
}

#[tokio::test]
async fn a_raw_message_waits_for_its_secret_then_is_sent() {
    let client = common::client().await;
    let ns = common::namespace(&client, "raw-wait", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("raw-wait", &ns, &[]);
    create_yaml(&client, &ns, &relay_profile(peer.smtp_port, "")).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    create_yaml(&client, &ns, &raw_message("later", "later-eml", "")).await;
    let waiting = common::wait_for(&api, "later", WAIT, |m| {
        message_condition(m, "Waiting").is_some_and(|c| c.reason == "RawMessageNotFound")
    })
    .await;
    assert_eq!(phase(&waiting), Some(Phase::Pending));
    let text = message_condition(&waiting, "Waiting").map(|c| c.message.clone()).unwrap_or_default();
    assert!(text.contains("Secret later-eml not found"), "{text}");
    assert_eq!(status(&waiting).attempts.unwrap_or(0), 0, "waiting costs no attempt");
    common::expect_event(&client, &ns, "later", |reason, _| reason == "RawMessageNotFound").await;

    // A Secret without the key still waits, naming the key.
    eml_secret(&client, &ns, "later-eml", "other.eml", WITHOUT_ID.as_bytes()).await;
    common::wait_for(&api, "later", WAIT_FOR_SECRET, |m| {
        message_condition(m, "Waiting").is_some_and(|c| c.message.contains("key message.eml not found"))
    })
    .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let patch = json!({"data": {"message.eml": base64_encode(WITHOUT_ID.as_bytes())}});
    secrets
        .patch("later-eml", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
        .await
        .expect("patch Secret");
    let sent = common::wait_for(&api, "later", WAIT_FOR_SECRET, |m| phase(m) == Some(Phase::Sent)).await;
    assert_eq!(status(&sent).attempts, Some(1));
    assert_eq!(peer.wait_messages(1, WAIT).await.len(), 1);
}

#[tokio::test]
async fn invalid_and_unauthorised_raw_messages_fail_without_sending() {
    let client = common::client().await;
    let ns = common::namespace(&client, "raw-invalid", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let op = Operator::start("raw-invalid", &ns, &[]);
    create_yaml(&client, &ns, &relay_profile(peer.smtp_port, "  recipientDomains: [contoso.com]\n")).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);

    // A header section with a line that is no field.
    let broken =
        format!("From: alerts@contoso.com\r\nTo: ops@contoso.com\r\nthis line {MARKER} is no field\r\n\r\nx\r\n");
    eml_secret(&client, &ns, "broken", "message.eml", broken.as_bytes()).await;
    create_yaml(&client, &ns, &raw_message("broken", "broken", "")).await;
    // The From: field names a sender the profile does not allow.
    let ceo = WITHOUT_ID.replace("From: Build Bot <build@noreply.contoso.com>", "From: CEO <ceo@contoso.com>");
    eml_secret(&client, &ns, "ceo", "message.eml", ceo.as_bytes()).await;
    create_yaml(&client, &ns, &raw_message("from-outside-policy", "ceo", "")).await;
    // A Bcc: recipient outside recipientDomains.
    let fabrikam = WITHOUT_ID.replace("archive@contoso.com", "archive@fabrikam.com");
    eml_secret(&client, &ns, "fabrikam", "message.eml", fabrikam.as_bytes()).await;
    create_yaml(&client, &ns, &raw_message("bcc-outside-domains", "fabrikam", "")).await;

    let cases = [
        ("broken", "InvalidRawMessage", "line 3 is not a header field"),
        ("from-outside-policy", "SenderNotAllowed", "From: field: sender ceo@contoso.com is not allowed"),
        ("bcc-outside-domains", "RecipientDomainNotAllowed", "archive@fabrikam.com"),
    ];
    for (name, reason, words) in cases {
        let failed = wait_phase(&api, name, Phase::Failed).await;
        let c = message_condition(&failed, "Failed").expect("Failed condition");
        assert_eq!(c.reason, reason, "{name}: {}", c.message);
        assert!(c.message.contains(words), "{name}: {}", c.message);
        assert_eq!(status(&failed).attempts.unwrap_or(0), 0, "{name}: refused before any attempt");
        common::expect_event(&client, &ns, name, |r, _| r == "Failed" || r == reason).await;
        assert_no_content_leaked(&client, &ns, &failed, &op).await;
    }
    assert!(peer.messages().await.is_empty(), "nothing reached the SMTP server");

    // The schema refuses raw next to the fields of a built message.
    let both = raw_message("both", "broken", "  subject: hi\n");
    let doc: Value = serde_yaml::from_str(&both).expect("yaml");
    let msg: EmailMessage = serde_json::from_value(doc).expect("EmailMessage");
    let err = api.create(&PostParams::default(), &msg).await.expect_err("raw with a subject is refused");
    assert!(err.to_string().contains("raw is the whole message"), "{err}");
}

#[tokio::test]
async fn a_raw_message_goes_to_graph_as_mime() {
    const TENANT: &str = "7e3b1c2d-0000-4000-8000-00000000a0a0";
    const CLIENT: &str = "9a1f0c3e-1111-4111-8111-00000000a0a1";
    let client = common::client().await;
    let ns = common::namespace(&client, "raw-graph", &[]).await;
    let emu = Emulator::start("raw-graph").await;
    emu.register_app(
        json!({"tenantId": TENANT, "clientId": CLIENT, "secrets": ["raw-secret-1"], "roles": ["Mail.Send"]}),
    )
    .await;
    let bundle = emu.dir.path().join("operator-ca-bundle.pem");
    concat_pems(&bundle, &[emu.ca_pem()]);
    let bundle = bundle.display().to_string();
    let op = Operator::start("raw-graph", &ns, &["--ca-bundle", &bundle, "--allow-custom-endpoints"]);
    let url = &emu.url;
    create_yaml(
        &client,
        &ns,
        &format!(
            r#"
apiVersion: v1
kind: Secret
metadata: {{name: graph-credentials}}
stringData: {{client-secret: raw-secret-1}}
---
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: relay}}
spec:
  senders: {{default: "alerts@contoso.com", allowed: ["*@noreply.contoso.com"]}}
  graph:
    tenantId: {TENANT}
    clientId: {CLIENT}
    clientSecretRef: {{name: graph-credentials, key: client-secret}}
    authorityHost: {url}
    endpoint: {url}
"#
        ),
    )
    .await;
    eml_secret(&client, &ns, "deploy-eml", "message.eml", WITHOUT_ID.as_bytes()).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    create_yaml(&client, &ns, &raw_message("graph", "deploy-eml", "  from: build@noreply.contoso.com\n")).await;
    let sent = wait_phase(&api, "graph", Phase::Sent).await;
    let s = status(&sent);
    assert_eq!(message_condition(&sent, "Sent").map(|c| c.reason).as_deref(), Some("Accepted"));
    assert_eq!(s.transport.as_deref(), Some("graph"));
    let assigned = format!("<{}.mailroom@noreply.contoso.com>", sent.uid().expect("uid"));
    assert_eq!(s.message_id.as_deref(), Some(assigned.as_str()));
    let m = &emu.wait_messages(1, WAIT).await[0];
    assert_eq!(m["mode"], "mime");
    assert_eq!(m["sender"], "build@noreply.contoso.com", "the envelope sender is the mailbox in the URL");
    assert_eq!(m["from"]["address"], "build@noreply.contoso.com");
    assert_eq!(m["subject"], "Deploy finished");
    assert_eq!(m["messageId"], assigned.as_str());
    assert_eq!(m["to"][0]["address"], "ops@contoso.com");
    assert_eq!(m["cc"][0]["address"], "dev@contoso.com");
    let bcc: Vec<&str> = m["bcc"].as_array().unwrap().iter().filter_map(|a| a["address"].as_str()).collect();
    assert_eq!(bcc, ["audit@contoso.com", "archive@contoso.com"], "Graph takes Bcc from the MIME header");
    assert_eq!(m["headers"][0]["name"], "X-Pipeline-Run");
    assert!(m["body"].as_str().is_some_and(|b| b.contains("Version 1.4.2 is live.")), "{m}");
    assert_eq!(m["saveToSentItems"], true);
    assert_no_content_leaked(&client, &ns, &sent, &op).await;
}
