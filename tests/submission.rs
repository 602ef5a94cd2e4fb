//! The SMTP submission listener with real clients (Python's smtplib, swaks), the real API server
//! and the SMTP test server as the relay: accepted mail becomes one EmailMessage that is sent;
//! wrong passwords, open-relay attempts, an unreachable API server and an operator killed between
//! DATA and its answer lose nothing and duplicate nothing.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::alertmanager::Alertmanager;
use common::api_proxy::ApiProxy;
use common::emulator::{Emulator, concat_pems};
use common::smtp_peer::SmtpPeer;
use common::{Operator, create_yaml, phase};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use mailroom::api::{EmailMessage, Phase};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
const PASSWORD: &str = "correct horse battery staple";

fn testdata(file: &str) -> String {
    common::repo_root().join("src/submission/testdata").join(file).display().to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The relay profile, the listener's certificate and the credential `grafana` (username
/// `grafana@team`).
async fn setup(client: &Client, ns: &str, relay_port: u16) {
    let profile = format!(
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: relay}}
spec:
  senders: {{default: "alerts@contoso.com", allowed: ["*@noreply.contoso.com"]}}
  recipientDomains: [contoso.com]
  smtp: {{host: 127.0.0.1, port: {relay_port}, tls: None}}
"#
    );
    setup_with_profile(client, ns, &profile).await;
}

/// The listener's certificate, the credential `grafana` (username `grafana@team`) and `profile`
/// (a MailProfile named `relay`).
async fn setup_with_profile(client: &Client, ns: &str, profile: &str) {
    let cert = std::fs::read_to_string(testdata("localhost.crt")).unwrap();
    let key = std::fs::read_to_string(testdata("localhost.key")).unwrap();
    let indent = |s: &str| s.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n");
    create_yaml(
        client,
        ns,
        &format!(
            r#"
apiVersion: v1
kind: Secret
metadata: {{name: smtp-tls}}
type: kubernetes.io/tls
stringData:
  tls.crt: |
{}
  tls.key: |
{}
"#,
            indent(&cert),
            indent(&key)
        ),
    )
    .await;
    create_yaml(client, ns, profile).await;
    create_yaml(
        client,
        ns,
        &format!(
            r#"
apiVersion: v1
kind: Secret
metadata: {{name: grafana-smtp}}
type: kubernetes.io/basic-auth
stringData: {{username: "grafana@team", password: "{PASSWORD}"}}
"#
        ),
    )
    .await;
    create_yaml(
        client,
        ns,
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: SmtpCredential
metadata: {name: grafana}
spec:
  secretRef: {name: grafana-smtp}
  profileRef: {name: relay}
"#,
    )
    .await;
}

/// The operator with the listener on `port`, once it serves its certificate.
async fn start_operator(test: &str, ns: &str, port: u16, extra: &[&str], env: &[(&str, &str)]) -> Operator {
    let addr = format!("127.0.0.1:{port}");
    let secret = format!("{ns}/smtp-tls");
    let mut args = vec!["--smtp-addr", &addr, "--smtp-tls-secret", &secret];
    args.extend_from_slice(extra);
    let op = Operator::start_with_env(test, ns, &args, env);
    let start = Instant::now();
    while !op.log_text().contains("SMTP submission: certificate loaded") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the listener did not load its certificate:\n{}",
            op.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    op
}

fn message(subject: &str) -> String {
    format!(
        "From: Grafana <alerts@noreply.contoso.com>\r\nTo: ops@contoso.com\r\nBcc: audit@contoso.com\r\n\
         Subject: {subject}\r\nDate: Fri, 04 Dec 2026 20:00:00 +0000\r\nMessage-ID: <{subject}@grafana.test>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
         Disk is 91% full on node-1 \u{2014} caf\u{e9}.\r\n.leading dot\r\n"
    )
}

/// Runs the smtplib client (tests/clients/smtp_submit.py) to the end; its attempts' lines.
async fn submit(settings: Value) -> Vec<Value> {
    let out = submit_process(settings).wait_with_output().await.expect("smtplib client");
    parse_attempts(&out.stdout, &out.stderr)
}

fn submit_process(settings: Value) -> tokio::process::Child {
    tokio::process::Command::new(common::required_env("MAILROOM_PYTHON"))
        .arg(common::repo_root().join("tests/clients/smtp_submit.py"))
        .arg(settings.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the smtplib client")
}

fn parse_attempts(stdout: &[u8], stderr: &[u8]) -> Vec<Value> {
    let lines: Vec<Value> = String::from_utf8_lossy(stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!lines.is_empty(), "the client printed nothing; stderr: {}", String::from_utf8_lossy(stderr));
    lines
}

fn settings(port: u16, file: &std::path::Path, extra: Value) -> Value {
    let mut s = json!({
        "host": "127.0.0.1", "port": port, "mode": "starttls", "cafile": testdata("ca.crt"),
        "username": "grafana@team", "password": PASSWORD,
        "from": "alerts@noreply.contoso.com", "to": ["ops@contoso.com", "audit@contoso.com"],
        "message": file.display().to_string(),
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            s.as_object_mut().unwrap().remove(k);
        } else {
            s[k] = v.clone();
        }
    }
    s
}

/// A proxy in front of the API server that loses nothing until told, and a kubeconfig through it
/// (in the returned directory).
async fn proxied(seed: u64) -> (ApiProxy, tempfile::TempDir, std::path::PathBuf) {
    let proxy = ApiProxy::start(std::path::Path::new(&common::required_env("KUBECONFIG")), 0.0, seed).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("proxied.kubeconfig");
    proxy.write_kubeconfig(&kubeconfig);
    (proxy, dir, kubeconfig)
}

/// The message a `250 2.0.0 ok: queued as ns/name` names.
fn queued_name(reply: &str) -> String {
    let id = reply.rsplit("queued as ").next().unwrap().trim();
    id.split('/').nth(1).unwrap_or_else(|| panic!("no queue id in {reply:?}")).to_string()
}

async fn messages(client: &Client, ns: &str) -> Vec<EmailMessage> {
    Api::<EmailMessage>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap().items
}

fn write_message(dir: &tempfile::TempDir, name: &str, subject: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, message(subject)).unwrap();
    path
}

#[tokio::test]
async fn smtplib_submits_and_the_mail_is_sent_once_as_submitted() {
    let client = common::client().await;
    let ns = common::namespace(&client, "submit", &[]).await;
    let peer = SmtpPeer::start(&[]);
    setup(&client, &ns, peer.smtp_port).await;
    let port = free_port();
    let op = start_operator("submit", &ns, port, &[], &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_message(&dir, "m.eml", "disk-full");

    let attempts = submit(settings(port, &file, json!({}))).await;
    let last = attempts.last().unwrap();
    assert_eq!((last["stage"].as_str(), last["code"].as_u64()), (Some("data"), Some(250)), "{attempts:?}");
    let name = queued_name(last["reply"].as_str().unwrap());
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let sent = common::wait_for(&api, &name, WAIT, |m| phase(m) == Some(Phase::Sent)).await;
    assert_eq!(sent.status.as_ref().unwrap().message_id.as_deref(), Some("<disk-full@grafana.test>"));
    assert_eq!(sent.labels().get("mailroom.dev/smtp-credential").map(String::as_str), Some("grafana"));
    let spec = &sent.spec;
    assert_eq!(spec.from.as_deref(), Some("alerts@noreply.contoso.com"));
    assert_eq!(spec.to, ["ops@contoso.com", "audit@contoso.com"]);
    // The raw MIME is in a Secret the message owns.
    let secret_name = &spec.raw.as_ref().unwrap().secret_ref.name;
    let secret =
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns).get(secret_name).await.unwrap();
    let owners = secret.metadata.owner_references.unwrap_or_default();
    assert_eq!(owners.len(), 1);
    assert_eq!((owners[0].kind.as_str(), owners[0].uid.as_str()), ("EmailMessage", sent.uid().unwrap().as_str()));

    // Delivered once, to the envelope's recipients, as submitted but for the Bcc field.
    let delivered = peer.wait_messages(1, WAIT).await;
    assert_eq!(delivered[0]["mail_from"], "alerts@noreply.contoso.com");
    let mut rcpts: Vec<&str> = delivered[0]["rcpt_tos"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    rcpts.sort();
    assert_eq!(rcpts, ["audit@contoso.com", "ops@contoso.com"]);
    let received = String::from_utf8(peer.raw(&delivered[0])).unwrap();
    assert_eq!(received, message("disk-full").replace("Bcc: audit@contoso.com\r\n", ""));

    // The same mail again (a client that lost the 250 and retries) is the same message.
    let again = submit(settings(port, &file, json!({}))).await;
    assert_eq!(queued_name(again.last().unwrap()["reply"].as_str().unwrap()), name, "{again:?}");
    assert_eq!(messages(&client, &ns).await.len(), 1);

    // A wrong password: 535, and nothing is created.
    let wrong = submit(settings(
        port,
        &file,
        json!({"password": "wrong", "message": write_message(&dir, "w.eml", "wrong-pw")}),
    ))
    .await;
    assert_eq!((wrong[0]["stage"].as_str(), wrong[0]["code"].as_u64()), (Some("auth"), Some(535)), "{wrong:?}");
    // Open relay attempts: no login, a sender outside the policy, a recipient outside its domains.
    let anonymous =
        submit(settings(port, &file, json!({"username": null, "message": write_message(&dir, "a.eml", "anon")}))).await;
    assert_eq!(
        (anonymous[0]["stage"].as_str(), anonymous[0]["code"].as_u64()),
        (Some("mail"), Some(530)),
        "{anonymous:?}"
    );
    let sender = submit(settings(port, &file, json!({"from": "ceo@contoso.com"}))).await;
    assert_eq!((sender[0]["stage"].as_str(), sender[0]["code"].as_u64()), (Some("mail"), Some(550)), "{sender:?}");
    let relay = submit(settings(port, &file, json!({"to": ["someone@elsewhere.example"]}))).await;
    assert_eq!((relay[0]["stage"].as_str(), relay[0]["code"].as_u64()), (Some("rcpt"), Some(550)), "{relay:?}");
    // A From: field the profile does not allow is refused at DATA, though the envelope is fine.
    let forged = dir.path().join("forged.eml");
    std::fs::write(
        &forged,
        message("forged").replace("From: Grafana <alerts@noreply.contoso.com>", "From: ceo@contoso.com"),
    )
    .unwrap();
    let forged = submit(settings(port, &forged, json!({}))).await;
    assert_eq!((forged[0]["stage"].as_str(), forged[0]["code"].as_u64()), (Some("data"), Some(550)), "{forged:?}");
    // Without TLS, AUTH is not even offered.
    let clear = submit(settings(port, &file, json!({"mode": "plain"}))).await;
    assert_eq!(clear[0]["stage"].as_str(), Some("auth"), "{clear:?}");
    assert_eq!(messages(&client, &ns).await.len(), 1, "none of the refused mails became a message");

    // Each credential has its own rate: `cron` may submit one mail a minute.
    create_yaml(
        &client,
        &ns,
        r#"
apiVersion: v1
kind: Secret
metadata: {name: cron-smtp}
type: kubernetes.io/basic-auth
stringData: {username: "cron@team", password: "another one"}
---
apiVersion: mailroom.dev/v1alpha1
kind: SmtpCredential
metadata: {name: cron}
spec:
  secretRef: {name: cron-smtp}
  profileRef: {name: relay}
  messagesPerMinute: 1
"#,
    )
    .await;
    let cron =
        json!({"username": "cron@team", "password": "another one", "message": write_message(&dir, "c1.eml", "cron-1")});
    let mut first = submit(settings(port, &file, cron.clone())).await;
    for _ in 0..20 {
        // The listener reads credentials again at most every 10 s.
        if first[0]["stage"] != "auth" {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        first = submit(settings(port, &file, cron.clone())).await;
    }
    assert_eq!(first[0]["code"].as_u64(), Some(250), "{first:?}");
    let second = submit(settings(
        port,
        &file,
        json!({"username": "cron@team", "password": "another one", "message": write_message(&dir, "c2.eml", "cron-2")}),
    ))
    .await;
    assert_eq!((second[0]["stage"].as_str(), second[0]["code"].as_u64()), (Some("mail"), Some(451)), "{second:?}");
    assert!(second[0]["reply"].as_str().unwrap().contains("4.7.1"), "{second:?}");
    // grafana's rate is its own.
    let other = submit(settings(port, &write_message(&dir, "g2.eml", "grafana-2"), json!({}))).await;
    assert_eq!(other[0]["code"].as_u64(), Some(250), "{other:?}");
    peer.wait_messages(3, WAIT).await;

    // The credentials' status: Ready with the username; a missing Secret and a username two
    // credentials claim are said, and that username then logs in as neither.
    let creds: Api<mailroom::api::SmtpCredential> = Api::namespaced(client.clone(), &ns);
    let ready = |c: &mailroom::api::SmtpCredential| {
        c.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    let grafana = common::wait_for(&creds, "grafana", WAIT, |c| ready(c).is_some()).await;
    assert_eq!(ready(&grafana), Some(("True".into(), "Ready".into())));
    assert_eq!(grafana.status.unwrap().username.as_deref(), Some("grafana@team"));
    create_yaml(
        &client,
        &ns,
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: SmtpCredential
metadata: {name: orphan}
spec:
  secretRef: {name: no-such-secret}
  profileRef: {name: relay}
---
apiVersion: mailroom.dev/v1alpha1
kind: SmtpCredential
metadata: {name: copy}
spec:
  secretRef: {name: grafana-smtp}
  profileRef: {name: relay}
"#,
    )
    .await;
    let orphan = common::wait_for(&creds, "orphan", WAIT, |c| ready(c).is_some()).await;
    assert_eq!(ready(&orphan), Some(("False".into(), "SecretNotFound".into())));
    let copy = common::wait_for(&creds, "copy", WAIT, |c| ready(c).is_some_and(|r| r.1 == "UsernameConflict")).await;
    assert!(copy.status.unwrap().conditions[0].message.contains("grafana"), "names the other credential");
    common::wait_for(&creds, "grafana", WAIT, |c| ready(c).is_some_and(|r| r.1 == "UsernameConflict")).await;
    let start = Instant::now();
    loop {
        let conflict = submit(settings(port, &write_message(&dir, "x.eml", "conflict"), json!({}))).await;
        if conflict[0]["code"].as_u64() == Some(535) {
            break;
        }
        // The listener reads credentials again at most every 10 s.
        assert!(start.elapsed() < WAIT, "a claimed-twice username still logs in: {conflict:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let log = op.log_text();
    assert!(!log.contains(PASSWORD) && !log.contains("Disk is 91%"), "the log shows a password or a message body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_api_server_away_mail_gets_451_and_is_accepted_once_it_is_back() {
    let client = common::client().await;
    let ns = common::namespace(&client, "submit-away", &[]).await;
    let peer = SmtpPeer::start(&[]);
    setup(&client, &ns, peer.smtp_port).await;
    let (proxy, dir, kubeconfig) = proxied(1).await;
    let port = free_port();
    let _op = start_operator("submit-away", &ns, port, &[], &[("KUBECONFIG", kubeconfig.to_str().unwrap())]).await;

    // A first mail while all is well (the listener now knows the credential).
    let first = submit(settings(port, &write_message(&dir, "1.eml", "first"), json!({}))).await;
    assert_eq!(first.last().unwrap()["code"].as_u64(), Some(250), "{first:?}");

    proxy.pause();
    let file = write_message(&dir, "2.eml", "second");
    let away = submit(settings(port, &file, json!({}))).await;
    let a = &away[0];
    assert_eq!((a["stage"].as_str(), a["code"].as_u64()), (Some("data"), Some(451)), "{away:?}");
    assert!(a["reply"].as_str().unwrap().contains("4.3.0"), "{away:?}");

    // The client retries; the API server is back before its third attempt.
    let retrying = submit_process(settings(port, &file, json!({"attempts": 30, "delay": 1})));
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.resume();
    let out = tokio::time::timeout(Duration::from_secs(90), retrying.wait_with_output())
        .await
        .expect("the client finishes")
        .unwrap();
    let attempts = parse_attempts(&out.stdout, &out.stderr);
    let last = attempts.last().unwrap();
    assert_eq!((last["stage"].as_str(), last["code"].as_u64()), (Some("data"), Some(250)), "{attempts:?}");
    assert!(attempts.len() > 1, "the first retries fell in the outage: {attempts:?}");
    let name = queued_name(last["reply"].as_str().unwrap());
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    common::wait_for(&api, &name, WAIT, |m| phase(m) == Some(Phase::Sent)).await;
    assert_eq!(messages(&client, &ns).await.len(), 2);
    let delivered = peer.wait_messages(2, WAIT).await;
    assert_eq!(delivered.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_killed_between_data_and_its_answer_leaves_exactly_one_message() {
    let client = common::client().await;
    let ns = common::namespace(&client, "submit-kill", &[]).await;
    let peer = SmtpPeer::start(&[]);
    setup(&client, &ns, peer.smtp_port).await;
    let (proxy, dir, kubeconfig) = proxied(2).await;
    let env = [("KUBECONFIG", kubeconfig.to_str().unwrap())];
    // Two replicas, as a Deployment runs them: the leader sends, and the client's connection
    // lands on the other one (the Service's choice), which only listens.
    let elect = ["--leader-elect", "--leader-election-namespace", ns.as_str()];
    let leader = Operator::start("submit-kill-leader", &ns, &elect);
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), &ns);
    let start = Instant::now();
    loop {
        let holder = leases.get_opt(mailroom::leader::LEASE_NAME).await.unwrap().and_then(|l| l.spec?.holder_identity);
        if holder.is_some_and(|h| h.ends_with(&format!("_{}", leader.pid()))) {
            break;
        }
        assert!(start.elapsed() < WAIT, "the leader never took the Lease:\n{}", leader.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let port = free_port();
    let mut op = start_operator("submit-kill", &ns, port, &elect, &env).await;

    // The Secret holding the mail and the EmailMessage are created, and the message's answer
    // never comes back: the operator waits on it with the client's DATA unanswered.
    proxy.hold_message_creates(true);
    let file = write_message(&dir, "k.eml", "killed");
    let retrying = submit_process(settings(port, &file, json!({"attempts": 60, "delay": 1})));
    let start = Instant::now();
    while proxy.held() == 0 {
        assert!(start.elapsed() < WAIT, "the listener never created the message:\n{}", op.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(messages(&client, &ns).await.len(), 1, "the message exists before the client has its answer");
    op.kill();
    proxy.hold_message_creates(false);
    let _op = start_operator("submit-kill-2", &ns, port, &elect, &env).await;

    let out = tokio::time::timeout(Duration::from_secs(120), retrying.wait_with_output())
        .await
        .expect("the client finishes")
        .unwrap();
    let attempts = parse_attempts(&out.stdout, &out.stderr);
    assert!(attempts[0]["code"].is_null(), "the first attempt lost its connection: {attempts:?}");
    let last = attempts.last().unwrap();
    assert_eq!((last["stage"].as_str(), last["code"].as_u64()), (Some("data"), Some(250)), "{attempts:?}");
    let name = queued_name(last["reply"].as_str().unwrap());
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let sent = common::wait_for(&api, &name, WAIT, |m| phase(m) == Some(Phase::Sent)).await;
    assert_eq!(messages(&client, &ns).await.len(), 1, "exactly one message");
    // The retry finished what the dead operator left: the Secret is the message's.
    let secret = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns).get(&name).await.unwrap();
    let owners = secret.metadata.owner_references.unwrap_or_default();
    assert_eq!(owners.iter().map(|o| o.uid.as_str()).collect::<Vec<_>>(), [sent.uid().unwrap().as_str()]);
    let delivered = peer.wait_messages(1, WAIT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(peer.messages().await.len(), 1, "delivered once: {delivered:?}");
}

#[tokio::test]
async fn alertmanager_email_configs_deliver_through_the_listener_to_graph() {
    const TENANT: &str = "7e3b1c2d-0000-4000-8000-00000000b0b0";
    const CLIENT: &str = "9a1f0c3e-1111-4111-8111-00000000b0b1";
    let client = common::client().await;
    let ns = common::namespace(&client, "submit-am", &[]).await;
    let emu = Emulator::start("submit-am").await;
    emu.register_app(
        json!({"tenantId": TENANT, "clientId": CLIENT, "secrets": ["am-secret-1"], "roles": ["Mail.Send"]}),
    )
    .await;
    let bundle = emu.dir.path().join("operator-ca-bundle.pem");
    concat_pems(&bundle, &[emu.ca_pem()]);
    let bundle = bundle.display().to_string();
    let url = &emu.url;
    let profile = format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: graph-credentials}}
stringData: {{client-secret: am-secret-1}}
---
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: relay}}
spec:
  senders: {{default: "alerts@contoso.com", allowed: ["*@noreply.contoso.com"]}}
  recipientDomains: [contoso.com]
  graph:
    tenantId: {TENANT}
    clientId: {CLIENT}
    clientSecretRef: {{name: graph-credentials, key: client-secret}}
    authorityHost: {url}
    endpoint: {url}
"#
    );
    setup_with_profile(&client, &ns, &profile).await;
    let port = free_port();
    let _op = start_operator("submit-am", &ns, port, &["--ca-bundle", &bundle, "--allow-custom-endpoints"], &[]).await;
    // Alertmanager's own email receiver, as its documentation configures it: STARTTLS
    // required, the listener's CA, AUTH with the credential's username and password.
    let am = Alertmanager::start("submit-am", |dir| {
        let password = dir.join("password");
        std::fs::write(&password, PASSWORD).unwrap();
        format!(
            r#"global:
  smtp_smarthost: 127.0.0.1:{port}
  smtp_from: Alertmanager <alerts@noreply.contoso.com>
  smtp_hello: alertmanager.test
  smtp_auth_username: grafana@team
  smtp_auth_password_file: {}
  smtp_require_tls: true
route:
  receiver: mail
  group_by: [alertname]
  group_wait: 1s
  group_interval: 2s
  repeat_interval: 1h
receivers:
- name: mail
  email_configs:
  - to: ops@contoso.com
    send_resolved: true
    tls_config:
      ca_file: {}
      server_name: localhost
"#,
            password.display(),
            testdata("ca.crt")
        )
    })
    .await;
    let now = k8s_openapi::jiff::Timestamp::now();
    am.post_alerts(&json!([{
        "labels": {"alertname": "DiskFull", "severity": "critical", "instance": "node-1"},
        "annotations": {"summary": "Disk is 91% full"},
        "startsAt": now.to_string(),
    }]))
    .await;
    let start = Instant::now();
    let message = loop {
        if let Some(m) = messages(&client, &ns).await.into_iter().next() {
            break m;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no message from Alertmanager:\n{}", am.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let sent = common::wait_for(&api, &message.name_any(), WAIT, |m| phase(m) == Some(Phase::Sent)).await;
    assert_eq!(sent.spec.from.as_deref(), Some("alerts@noreply.contoso.com"));
    assert_eq!(sent.status.as_ref().unwrap().transport.as_deref(), Some("graph"));
    // Graph's MIME sendMail got the message as Alertmanager wrote it.
    let m = &emu.wait_messages(1, WAIT).await[0];
    assert_eq!(m["mode"], "mime");
    assert_eq!(m["sender"], "alerts@noreply.contoso.com");
    assert!(m["subject"].as_str().is_some_and(|s| s.starts_with("[FIRING:1] DiskFull")), "{m}");
    assert_eq!(m["to"][0]["address"], "ops@contoso.com");
}

/// Runs swaks (Debian's `swaks`; hack/test.sh installs it) to the end: its exit status and its
/// transcript.
fn swaks(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new("swaks")
        .args(["--server", "127.0.0.1", "--helo", "swaks.test", "--timeout", "60"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run swaks (apt-get install swaks libnet-ssleay-perl)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn swaks_at_the_protocol_edges() {
    let client = common::client().await;
    let ns = common::namespace(&client, "submit-swaks", &[]).await;
    let peer = SmtpPeer::start(&[]);
    setup(&client, &ns, peer.smtp_port).await;
    let (port, tls_port) = (free_port(), free_port());
    let implicit = format!("127.0.0.1:{tls_port}");
    let op = start_operator("submit-swaks", &ns, port, &["--smtps-addr", &implicit], &[]).await;
    let (port_s, tls_port_s, ca) = (port.to_string(), tls_port.to_string(), testdata("ca.crt"));
    let dir = tempfile::tempdir().unwrap();
    let data = write_message(&dir, "s.eml", "swaks-pipelined");
    let data = format!("@{}", data.display());
    let login = ["--auth-user", "grafana@team", "--auth-password", PASSWORD];
    let envelope = ["--from", "alerts@noreply.contoso.com", "--to", "ops@contoso.com,audit@contoso.com"];

    // STARTTLS with the certificate verified, AUTH LOGIN, the envelope pipelined, 8-bit data.
    let mut args =
        vec!["--port", &port_s, "--tls", "--tls-verify", "--tls-ca-path", &ca, "--auth", "LOGIN", "--pipeline"];
    args.extend(login);
    args.extend(envelope);
    args.extend(["--data", &data]);
    let (code, transcript) = swaks(&args);
    assert_eq!(code, 0, "{transcript}");
    assert!(transcript.contains("250 2.0.0 ok: queued as"), "{transcript}");
    assert!(transcript.contains("PIPELINING") && transcript.contains("SIZE 1048565"), "{transcript}");

    // Implicit TLS on the other port, AUTH PLAIN.
    let implicit_data = format!("@{}", write_message(&dir, "i.eml", "swaks-implicit").display());
    let mut args =
        vec!["--port", &tls_port_s, "--tls-on-connect", "--tls-verify", "--tls-ca-path", &ca, "--auth", "PLAIN"];
    args.extend(login);
    args.extend(envelope);
    args.extend(["--data", &implicit_data]);
    let (code, transcript) = swaks(&args);
    assert_eq!(code, 0, "{transcript}");

    // Without TLS, AUTH is not offered: swaks fails its AUTH step (exit 28).
    let mut args = vec!["--port", &port_s, "--auth", "PLAIN"];
    args.extend(login);
    args.extend(envelope);
    let (code, transcript) = swaks(&args);
    assert_eq!(code, 28, "{transcript}");
    assert!(!transcript.contains("AUTH PLAIN LOGIN"), "AUTH offered in the clear: {transcript}");

    // A wrong password: 535 (exit 28).
    let (code, transcript) = swaks(&[
        "--port",
        &port_s,
        "--tls",
        "--tls-ca-path",
        &ca,
        "--tls-verify",
        "--auth",
        "PLAIN",
        "--auth-user",
        "grafana@team",
        "--auth-password",
        "nope",
        "--from",
        "alerts@noreply.contoso.com",
        "--to",
        "ops@contoso.com",
    ]);
    assert_eq!(code, 28, "{transcript}");
    assert!(transcript.contains("535 5.7.8"), "{transcript}");

    // A message over SIZE: 552 after the data (exit 26), and nothing is created.
    let big = dir.path().join("big.eml");
    let mut body = message("too-big");
    body.push_str(&format!("{}\r\n", "x".repeat(998)).repeat(1100));
    std::fs::write(&big, body).unwrap();
    let big = format!("@{}", big.display());
    let mut args = vec!["--port", &port_s, "--tls", "--tls-verify", "--tls-ca-path", &ca, "--auth", "PLAIN"];
    args.extend(login);
    args.extend(envelope);
    args.extend(["--data", &big]);
    let (code, transcript) = swaks(&args);
    assert_eq!(code, 26, "{transcript}");
    assert!(transcript.contains("552 5.3.4"), "{transcript}");

    let names: Vec<String> = messages(&client, &ns).await.iter().map(|m| m.name_any()).collect();
    assert_eq!(names.len(), 2, "the two accepted mails, nothing else: {names:?}");
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    for name in &names {
        common::wait_for(&api, name, WAIT, |m| phase(m) == Some(Phase::Sent)).await;
    }
    peer.wait_messages(2, WAIT).await;
    assert!(!op.log_text().contains(PASSWORD));
}

/// A new CA and a certificate it signed for localhost and 127.0.0.1: (CA PEM, certificate PEM, key PEM).
fn another_certificate() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "renewed test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let client = common::client().await;
    let ns = common::namespace(&client, "submit-renew", &[]).await;
    let peer = SmtpPeer::start(&[]);
    setup(&client, &ns, peer.smtp_port).await;
    let port = free_port();
    let op = start_operator("submit-renew", &ns, port, &[], &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_message(&dir, "r.eml", "before-renewal");
    let before = submit(settings(port, &file, json!({}))).await;
    assert_eq!(before.last().unwrap()["code"].as_u64(), Some(250), "{before:?}");

    // cert-manager renews: the Secret gets a certificate from another CA.
    let (ca, cert, key) = another_certificate();
    let new_ca = dir.path().join("new-ca.crt");
    std::fs::write(&new_ca, &ca).unwrap();
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let patch = json!({"data": {"tls.crt": b64(&cert), "tls.key": b64(&key)}});
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns)
        .patch("smtp-tls", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
        .await
        .unwrap();
    let start = Instant::now();
    while op.log_text().matches("SMTP submission: certificate loaded").count() < 2 {
        assert!(start.elapsed() < WAIT, "the renewed certificate was not loaded:\n{}", op.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A client trusting only the new CA now succeeds; one trusting only the old CA fails its
    // handshake; the operator never restarted.
    let file = write_message(&dir, "r2.eml", "after-renewal");
    let after = submit(settings(port, &file, json!({"cafile": new_ca.display().to_string()}))).await;
    assert_eq!(after.last().unwrap()["code"].as_u64(), Some(250), "{after:?}");
    let old = submit(settings(port, &file, json!({}))).await;
    assert_eq!((old[0]["stage"].as_str(), old[0]["code"].as_u64()), (Some("starttls"), None), "{old:?}");
    assert!(old[0]["reply"].as_str().unwrap().contains("CERTIFICATE_VERIFY_FAILED"), "{old:?}");
    assert_eq!(messages(&client, &ns).await.len(), 2);
}
