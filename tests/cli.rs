//! The command line as a user runs it: the `mailroom` binary as a subprocess, against the real API
//! server, the operator, the SMTP test server and the Microsoft 365 emulator.

mod common;

use std::process::Output;
use std::time::Duration;

use common::emulator::{Emulator, concat_pems};
use common::smtp_peer::SmtpPeer;
use common::{Operator, create_yaml};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::PostParams;
use mail_parser::{MessageParser, MimeHeaders};
use mailroom::api::EmailMessage;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);
const TENANT: &str = "7e3b1c2d-0000-4000-8000-00000000c1c0";
const CLIENT: &str = "9a1f0c3e-1111-4111-8111-00000000c1c1";

/// `mailroom ARGS` with `stdin`; `env` overrides variables (a bogus KUBECONFIG, say).
async fn mailroom(args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Output {
    run(&common::required_env("MAILROOM_BIN"), args, stdin, env).await
}

/// `program ARGS` with `stdin` and `env`, its output once it exited.
async fn run(program: &str, args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    // A program that refuses its flags may exit before it reads stdin: a closed pipe is no error.
    match input.write_all(stdin).await {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("write stdin: {e}"),
        _ => {}
    }
    drop(input);
    tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} did not finish"))
        .expect("its output")
}

/// Exit code, stdout and stderr.
fn parts(out: &Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The name in `emailmessage/NAME created in namespace NS`.
fn created_name(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("emailmessage/").and_then(|rest| rest.split_once(" created")).map(|(n, _)| n))
        .unwrap_or_else(|| panic!("no created message in: {stdout}"))
        .to_string()
}

async fn messages_in(ns: &str) -> Vec<EmailMessage> {
    let api: Api<EmailMessage> = Api::namespaced(common::client().await, ns);
    api.list(&Default::default()).await.expect("list messages").items
}

#[tokio::test]
async fn send_waits_for_sent_and_the_server_gets_it() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cli-send", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("cli-send", &ns, &[]);
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    let args = [
        "send",
        "--namespace",
        &ns,
        "--profile",
        "relay",
        "--to",
        "Ops Team <ops@contoso.com>",
        "--cc",
        "dev@contoso.com",
        "--bcc",
        "audit@contoso.com",
        "--subject",
        "Deploy 1.4.2 finished ✅",
        "--text-file",
        "-",
        "--header",
        "X-Pipeline-Run=1234",
        "--importance",
        "high",
        "--wait",
        "--timeout",
        "60s",
    ];
    let out = mailroom(&args, "Version 1.4.2 is live.\n".as_bytes(), &[]).await;
    let (code, stdout, stderr) = parts(&out);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("phase: Sent") && stdout.contains("attempts: 1"), "{stdout}");
    let message_id = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("messageId: "))
        .unwrap_or_else(|| panic!("no messageId in: {stdout}"))
        .to_string();

    let envelopes = peer.wait_messages(1, WAIT).await;
    let mut rcpts: Vec<String> =
        envelopes[0]["rcpt_tos"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    rcpts.sort();
    assert_eq!(rcpts, ["audit@contoso.com", "dev@contoso.com", "ops@contoso.com"]);
    assert_eq!(envelopes[0]["mail_from"], "alerts@contoso.com");
    let raw = peer.raw(&envelopes[0]);
    let parsed = MessageParser::default().parse(&raw).expect("parse the received message");
    assert_eq!(parsed.subject(), Some("Deploy 1.4.2 finished ✅"));
    assert_eq!(parsed.body_text(0).as_deref().map(str::trim), Some("Version 1.4.2 is live."));
    assert_eq!(format!("<{}>", parsed.message_id().unwrap_or_default()), message_id);
    assert_eq!(parsed.header_raw("X-Pipeline-Run").map(str::trim), Some("1234"));
    assert_eq!(parsed.cc().and_then(|c| c.first()).and_then(|a| a.address()), Some("dev@contoso.com"));
    let head = String::from_utf8_lossy(&raw).to_lowercase();
    assert!(!head.contains("audit@contoso.com"), "Bcc leaked into the message");
}

#[tokio::test]
async fn send_with_a_template_renders_the_values() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cli-template", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("cli-template", &ns, &[]);
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    create_yaml(
        &client,
        &ns,
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: EmailTemplate
metadata: {name: release}
spec:
  subject: "{{ app }} {{ version }} is live in {{ env }}"
  text: "Commit {{ build.commit }} by {{ build.author }}."
"#,
    )
    .await;
    let args = [
        "send",
        "--namespace",
        &ns,
        "--profile",
        "relay",
        "--to",
        "ops@contoso.com",
        "--template",
        "release",
        "--values",
        "-",
        "--set",
        "version=1.4.2",
        "--wait",
        "--timeout",
        "60s",
    ];
    let values = "app: shop\nenv: production\nversion: '0.0.1'\nbuild: {commit: 9fceb02, author: Ann}\n";
    let out = mailroom(&args, values.as_bytes(), &[]).await;
    let (code, stdout, stderr) = parts(&out);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    let envelopes = peer.wait_messages(1, WAIT).await;
    let raw = peer.raw(&envelopes[0]);
    let parsed = MessageParser::default().parse(&raw).expect("parse the received message");
    assert_eq!(parsed.subject(), Some("shop 1.4.2 is live in production"), "--set wins over --values");
    assert_eq!(parsed.body_text(0).as_deref().map(str::trim), Some("Commit 9fceb02 by Ann."));

    // A template that needs a value the command line did not give fails, and says which.
    let missing = ["send", "--namespace", &ns, "--profile", "relay", "--to", "ops@contoso.com"];
    let missing =
        [&missing[..], &["--template", "release", "--set", "app=shop", "--wait", "--timeout", "60s"]].concat();
    let out = mailroom(&missing, b"", &[]).await;
    let (code, stdout, stderr) = parts(&out);
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("TemplateError") && stdout.contains("version"), "{stdout}");
}

#[tokio::test]
async fn a_refused_message_exits_1_with_the_reason() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cli-refused", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("cli-refused", &ns, &[]);
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    peer.script(json!({"data": ["550 5.7.64 TenantAttribution; Relay Access Denied"]})).await;
    let out = mailroom(
        &["send", "-n", &ns, "--profile", "relay", "--to", "ops@contoso.com", "--text", "hello", "--wait"],
        b"",
        &[],
    )
    .await;
    let (code, stdout, stderr) = parts(&out);
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("phase: Failed"), "{stdout}");
    assert!(stdout.contains("550 5.7.64 TenantAttribution; Relay Access Denied"), "{stdout}");
    assert!(stdout.lines().any(|l| l.trim().starts_with("reason: ")), "{stdout}");
}

#[tokio::test]
async fn wait_without_an_operator_times_out_with_exit_2() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cli-timeout", &[]).await;
    create_yaml(&client, &ns, &common::relay_profile("relay", 9, "")).await;
    let started = std::time::Instant::now();
    let out = mailroom(
        &[
            "send",
            "-n",
            &ns,
            "--profile",
            "relay",
            "--to",
            "ops@contoso.com",
            "--text-file",
            "-",
            "--wait",
            "--timeout",
            "3s",
        ],
        b"hello",
        &[],
    )
    .await;
    let (code, stdout, stderr) = parts(&out);
    assert_eq!(code, 2, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("timed out after 3s"), "{stdout}");
    assert!(started.elapsed() >= Duration::from_secs(3), "it waited the whole --timeout");
    let name = created_name(&stdout);
    let all = messages_in(&ns).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].metadata.name.as_deref(), Some(name.as_str()));
    assert!(all[0].status.is_none(), "no operator touched it");
}

#[tokio::test]
async fn dry_run_prints_a_manifest_and_creates_nothing() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cli-dry", &[]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "release notes").expect("write");
    let notes = notes.display().to_string();
    let args = [
        "send",
        "-n",
        &ns,
        "--profile",
        "m365",
        "--cluster-profile",
        "--to",
        "ops@contoso.com",
        "--subject",
        "Dry",
        "--html-file",
        "-",
        "--attach",
        &notes,
        "--ttl",
        "1h",
        "--generate-name",
        "deploy-",
        "--dry-run",
    ];
    // No API server is needed: the kubeconfig named here does not exist.
    let out = mailroom(&args, b"<p>hi</p>", &[("KUBECONFIG", "/nonexistent/kubeconfig")]).await;
    let (code, stdout, stderr) = parts(&out);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    let message: EmailMessage = serde_yaml::from_str(&stdout).expect("the output parses as an EmailMessage");
    assert_eq!(message.metadata.generate_name.as_deref(), Some("deploy-"));
    assert_eq!(message.metadata.namespace.as_deref(), Some(ns.as_str()));
    assert_eq!(message.spec.profile_ref.kind(), mailroom::api::ProfileKind::ClusterMailProfile);
    assert_eq!(message.spec.body.html.as_deref(), Some("<p>hi</p>"));
    assert_eq!(message.spec.ttl_seconds_after_finished, Some(3600));
    let att = &message.spec.attachments[0];
    assert_eq!((att.name.as_str(), att.content_type.as_deref()), ("notes.txt", Some("text/plain")));
    assert_eq!(att.data.as_deref(), Some("cmVsZWFzZSBub3Rlcw=="));
    // The manifest is one the API server accepts, and the dry run itself created nothing.
    assert!(messages_in(&ns).await.is_empty());
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let mut accepted = message.clone();
    accepted.metadata.namespace = None;
    let made = api.create(&PostParams { dry_run: true, ..Default::default() }, &accepted).await;
    assert!(made.is_ok(), "the API server refuses the manifest: {made:?}");
}

#[tokio::test]
async fn an_invalid_address_is_a_usage_error_before_any_api_call() {
    // With a kubeconfig that does not exist, any API call would end in exit 3 instead.
    let out = mailroom(
        &["send", "--profile", "relay", "--to", "ops@contoso.com", "--cc", "dev@@contoso", "--text-file", "-"],
        b"hello",
        &[("KUBECONFIG", "/nonexistent/kubeconfig")],
    )
    .await;
    let (code, stdout, stderr) = parts(&out);
    assert_eq!(code, 64, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains("--cc") && stderr.contains("dev@@contoso"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");

    let bad_flag = mailroom(&["send", "--profile", "relay", "--bogus"], b"", &[]).await;
    assert_eq!(parts(&bad_flag).0, 64, "a bad flag is a usage error, not clap's 2 (a timeout)");
    let api_down = mailroom(
        &["send", "--profile", "relay", "--to", "ops@contoso.com", "--text-file", "-"],
        b"hello",
        &[("KUBECONFIG", "/nonexistent/kubeconfig")],
    )
    .await;
    assert_eq!(parts(&api_down).0, 3, "no kubeconfig: an API error; {:?}", parts(&api_down));
}

#[tokio::test]
async fn attachments_inline_and_in_an_owned_secret_arrive_intact() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cli-attach", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("cli-attach", &ns, &[]);
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let small = dir.path().join("summary.csv");
    std::fs::write(&small, "a,b\n1,2\n").expect("write");
    let big = dir.path().join("build.log.gz");
    let big_bytes: Vec<u8> = (0..200 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&big, &big_bytes).expect("write");
    let (small, big) = (small.display().to_string(), big.display().to_string());
    let args = [
        "send",
        "-n",
        &ns,
        "--profile",
        "relay",
        "--to",
        "ops@contoso.com",
        "--subject",
        "Logs",
        "--text-file",
        "-",
        "--attach",
        &small,
        "--attach",
        &big,
        "--wait",
    ];
    let out = mailroom(&args, b"see attached", &[]).await;
    let (code, stdout, stderr) = parts(&out);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    let name = created_name(&stdout);

    let message = Api::<EmailMessage>::namespaced(client.clone(), &ns).get(&name).await.expect("the message");
    let atts = &message.spec.attachments;
    assert_eq!(atts.len(), 2);
    assert!(atts[0].data.is_some() && atts[0].secret_ref.is_none(), "the small file goes inline: {:?}", atts[0]);
    assert_eq!(atts[0].content_type.as_deref(), Some("text/csv"));
    let r = atts[1].secret_ref.as_ref().expect("the large file is in a Secret");
    assert_eq!(r.name, name, "the Secret is named like the message");
    let secret = Api::<Secret>::namespaced(client.clone(), &ns).get(&r.name).await.expect("the Secret");
    assert_eq!(secret.data.as_ref().and_then(|d| d.get(&r.key)).map(|b| b.0.clone()), Some(big_bytes.clone()));
    let owners = secret.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert_eq!(
        (owners[0].kind.as_str(), owners[0].api_version.as_str(), owners[0].name.as_str()),
        ("EmailMessage", "mailroom.dev/v1alpha1", name.as_str())
    );
    assert_eq!(Some(&owners[0].uid), message.metadata.uid.as_ref(), "owned by this message's uid");

    let envelopes = peer.wait_messages(1, WAIT).await;
    let raw = peer.raw(&envelopes[0]);
    let parsed = MessageParser::default().parse(&raw).expect("parse");
    let got: Vec<(String, Vec<u8>)> = parsed
        .attachments()
        .map(|a| (a.attachment_name().unwrap_or_default().to_string(), a.contents().to_vec()))
        .collect();
    assert_eq!(got, [("summary.csv".to_string(), b"a,b\n1,2\n".to_vec()), ("build.log.gz".to_string(), big_bytes)]);
}

/// A Graph profile against the emulator, with `secret` in its Secret (unless `secret` is None).
async fn graph_world(test: &str, roles: &[&str], secret: Option<&str>) -> (String, Emulator) {
    let client = common::client().await;
    let ns = common::namespace(&client, test, &[]).await;
    let emu = Emulator::start(test).await;
    emu.register_app(
        json!({"tenantId": TENANT, "clientId": CLIENT, "secrets": ["right-Secret-c1c2d3"], "roles": roles}),
    )
    .await;
    if let Some(value) = secret {
        let s: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "graph-credentials"},
            "stringData": {"client-secret": value},
        }))
        .expect("Secret");
        Api::<Secret>::namespaced(client.clone(), &ns).create(&PostParams::default(), &s).await.expect("Secret");
    }
    create_yaml(&client, &ns, &graph_profile(&emu.url)).await;
    (ns, emu)
}

/// The Graph MailProfile `m365`, whose token authority and Graph endpoint are both `url`, with
/// its client secret in the Secret `graph-credentials`.
fn graph_profile(url: &str) -> String {
    format!(
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: m365}}
spec:
  senders: {{default: "alerts@contoso.com"}}
  graph:
    tenantId: {TENANT}
    clientId: {CLIENT}
    clientSecretRef: {{name: graph-credentials, key: client-secret}}
    authorityHost: {url}
    endpoint: {url}
"#
    )
}

async fn check(ns: &str, emu: &Emulator, extra: &[&str]) -> (i32, String, String) {
    let ca = emu.ca_pem().display().to_string();
    let mut args = vec!["profile", "check", "m365", "--namespace", ns, "--ca-bundle", &ca, "--allow-custom-endpoints"];
    args.extend_from_slice(extra);
    parts(&mailroom(&args, b"", &[]).await)
}

#[tokio::test]
async fn check_a_graph_profile_and_send_a_test_message() {
    let (ns, emu) = graph_world("cli-graph", &["Mail.Send"], Some("right-Secret-c1c2d3")).await;
    let (code, stdout, stderr) = check(&ns, &emu, &[]).await;
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("token: expires ") && stdout.contains("roles: Mail.Send"), "{stdout}");
    assert!(stdout.contains("ready: token acquired; profile can send"), "{stdout}");
    for text in [&stdout, &stderr] {
        assert!(!text.contains("eyJ"), "a token was printed: {text}");
        assert!(!text.contains("right-Secret-c1c2d3"), "the client secret was printed");
    }
    let tokens = emu.token_requests().await;
    assert_eq!(tokens.len(), 1, "one token request: {tokens:#?}");
    assert!(emu.messages().await.is_empty(), "a check alone sends nothing");

    let (code, stdout, stderr) = check(&ns, &emu, &["--send-test", "Ops <ops@contoso.com>"]).await;
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("test message: accepted: ") && stdout.contains("request-id: "), "{stdout}");
    let sent = emu.wait_messages(1, WAIT).await;
    assert!(sent[0].to_string().contains("ops@contoso.com"), "{:#}", sent[0]);
    assert!(sent[0].to_string().contains("mailroom profile check: m365"), "{:#}", sent[0]);
}

#[tokio::test]
async fn check_explains_a_wrong_client_secret() {
    let (ns, emu) = graph_world("cli-wrong", &["Mail.Send"], Some("wrong-Secret-9e8d7c")).await;
    let (code, stdout, stderr) = check(&ns, &emu, &[]).await;
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("not ready: TokenRequestFailed: AADSTS7000215"), "{stdout}");
    for text in [&stdout, &stderr] {
        assert!(!text.contains("wrong-Secret-9e8d7c") && !text.contains("right-Secret-c1c2d3"), "a secret was printed");
    }
}

#[tokio::test]
async fn check_names_the_authorisation_path() {
    // No role in the token: Exchange Online RBAC for Applications may still authorise the app,
    // so the check says so instead of failing, and a test send shows the provider's answer.
    let (ns, emu) = graph_world("cli-noperm", &[], Some("right-Secret-c1c2d3")).await;
    let (code, stdout, stderr) = check(&ns, &emu, &[]).await;
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("roles: none"), "{stdout}");
    assert!(stdout.contains("authorisation: no Mail.Send role in the token: Exchange Online RBAC"), "{stdout}");
    let (code, stdout, _) = check(&ns, &emu, &["--send-test", "ops@contoso.com"]).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("not ready: SendFailed: Graph 403 ErrorAccessDenied"), "{stdout}");

    let (ns, emu) = graph_world("cli-perm", &["Mail.Send"], Some("right-Secret-c1c2d3")).await;
    let (code, stdout, _) = check(&ns, &emu, &[]).await;
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("authorisation: Microsoft Entra application permission Mail.Send"), "{stdout}");
}

#[tokio::test]
async fn check_explains_a_missing_secret_and_a_missing_profile() {
    let (ns, emu) = graph_world("cli-nosecret", &["Mail.Send"], None).await;
    let (code, stdout, stderr) = check(&ns, &emu, &[]).await;
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains(&format!("not ready: SecretNotFound: Secret {ns}/graph-credentials not found")),
        "{stdout}"
    );
    assert!(emu.token_requests().await.is_empty(), "no token without a credential");

    let out = mailroom(&["profile", "check", "absent", "-n", &ns], b"", &[]).await;
    let (code, stdout, _) = parts(&out);
    assert_eq!(code, 1);
    assert!(stdout.contains("ProfileNotFound"), "{stdout}");
}

#[tokio::test]
async fn check_an_smtp_profile_shows_greeting_mechanisms_and_login() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cli-smtp", &[]).await;
    let peer = SmtpPeer::start(&[
        "--self-signed",
        "--require-starttls",
        "--auth-user",
        "mailer",
        "--auth-pass",
        "s3cret-pass",
    ]);
    let profile = format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: smtp-login}}
stringData: {{username: mailer, password: s3cret-pass}}
---
apiVersion: v1
kind: Secret
metadata: {{name: bad-login}}
stringData: {{username: mailer, password: not-the-pass}}
---
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: login}}
spec:
  senders: {{default: "alerts@contoso.com"}}
  smtp: {{host: 127.0.0.1, port: {port}, tls: StartTLS, auth: {{password: {{secretRef: {{name: smtp-login}}}}}}}}
---
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: bad}}
spec:
  senders: {{default: "alerts@contoso.com"}}
  smtp: {{host: 127.0.0.1, port: {port}, tls: StartTLS, auth: {{password: {{secretRef: {{name: bad-login}}}}}}}}
"#,
        port = peer.smtp_port
    );
    create_yaml(&client, &ns, &profile).await;
    let ca = peer.ca_pem().display().to_string();

    let out = mailroom(&["profile", "check", "login", "-n", &ns, "--ca-bundle", &ca], b"", &[]).await;
    let (code, stdout, stderr) = parts(&out);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("greeting: 220 "), "{stdout}");
    assert!(
        stdout.contains("auth mechanisms (encrypted): ") && stdout.contains("PLAIN") && stdout.contains("LOGIN"),
        "{stdout}"
    );
    assert!(stdout.contains("login: accepted for mailer"), "{stdout}");
    assert!(!stdout.contains("s3cret-pass") && !stderr.contains("s3cret-pass"), "the password was printed");
    assert!(peer.messages().await.is_empty(), "a check alone sends nothing");

    // Without the CA the server's certificate is not trusted, and the check says so.
    let (code, stdout, stderr) = parts(&mailroom(&["profile", "check", "login", "-n", &ns], b"", &[]).await);
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("SmtpCheckFailed") && stdout.to_lowercase().contains("certificate"), "{stdout}");

    let (code, stdout, stderr) =
        parts(&mailroom(&["profile", "check", "bad", "-n", &ns, "--ca-bundle", &ca], b"", &[]).await);
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("SmtpCheckFailed") && stdout.contains("535"), "{stdout}");
    assert!(!stdout.contains("not-the-pass"), "the password was printed");

    // The profile's own caBundle is trusted as the operator trusts it.
    let pem = std::fs::read_to_string(peer.ca_pem()).expect("the CA");
    let with_bundle: mailroom::api::MailProfile = serde_json::from_value(json!({
        "apiVersion": "mailroom.dev/v1alpha1", "kind": "MailProfile", "metadata": {"name": "bundled"},
        "spec": {
            "senders": {"default": "alerts@contoso.com"}, "caBundle": pem,
            "smtp": {"host": "127.0.0.1", "port": peer.smtp_port, "tls": "StartTLS",
                     "auth": {"password": {"secretRef": {"name": "smtp-login"}}}},
        },
    }))
    .expect("MailProfile");
    Api::<mailroom::api::MailProfile>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &with_bundle)
        .await
        .expect("create the profile");
    let (code, stdout, stderr) = parts(&mailroom(&["profile", "check", "bundled", "-n", &ns], b"", &[]).await);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("login: accepted for mailer"), "{stdout}");

    let out = mailroom(
        &["profile", "check", "login", "-n", &ns, "--ca-bundle", &ca, "--send-test", "ops@contoso.com"],
        b"",
        &[],
    )
    .await;
    let (code, stdout, stderr) = parts(&out);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("test message: accepted: 250"), "{stdout}");
    let envelopes = peer.wait_messages(1, WAIT).await;
    assert_eq!(envelopes[0]["rcpt_tos"], json!(["ops@contoso.com"]));
    let raw = peer.raw(&envelopes[0]);
    let parsed = MessageParser::default().parse(&raw).expect("parse");
    assert_eq!(parsed.subject(), Some("mailroom profile check: login"));
}

#[tokio::test]
async fn check_an_implicit_tls_relay() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cli-smtps", &[]).await;
    let peer = SmtpPeer::start(&["--self-signed", "--implicit-tls"]);
    let profile = format!(
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: smtps}}
spec:
  senders: {{default: "alerts@contoso.com"}}
  smtp: {{host: 127.0.0.1, port: {port}, tls: Implicit}}
"#,
        port = peer.smtp_port
    );
    create_yaml(&client, &ns, &profile).await;
    let ca = peer.ca_pem().display().to_string();
    let (code, stdout, stderr) =
        parts(&mailroom(&["profile", "check", "smtps", "-n", &ns, "--ca-bundle", &ca], b"", &[]).await);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("greeting: 220 "), "the greeting is read inside TLS: {stdout}");
    assert!(stdout.contains("auth mechanisms (encrypted): none"), "a relay offers no AUTH: {stdout}");
    assert!(!stdout.contains("login:"), "{stdout}");
}

/// SMTP with XOAUTH2: a token for Exchange Online with SMTP.SendAsApp, then AUTH XOAUTH2 after
/// STARTTLS, checked by the SMTP server through the emulator; a ClusterMailProfile whose Secret
/// reference carries its namespace.
#[tokio::test]
async fn check_a_cluster_profile_with_xoauth2() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cli-xoauth2", &[]).await;
    let emu = Emulator::start("cli-xoauth2").await;
    let emu_ca = emu.ca_pem().display().to_string();
    let peer = SmtpPeer::start(&[
        "--self-signed",
        "--require-starttls",
        "--xoauth2-introspect",
        &emu.introspect_url(),
        "--xoauth2-ca",
        &emu_ca,
    ]);
    emu.register_app(
        json!({"tenantId": TENANT, "clientId": CLIENT, "secrets": ["xo-Secret-4f5e6d"], "roles": ["SMTP.SendAsApp"]}),
    )
    .await;
    let yaml = format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: exo-credentials}}
stringData: {{client-secret: xo-Secret-4f5e6d}}
---
apiVersion: mailroom.dev/v1alpha1
kind: ClusterMailProfile
metadata: {{name: {ns}}}
spec:
  senders: {{default: "alerts@contoso.com"}}
  smtp:
    host: 127.0.0.1
    port: {port}
    tls: StartTLS
    auth:
      oauth2:
        tenantId: {TENANT}
        clientId: {CLIENT}
        authorityHost: {url}
        clientSecretRef: {{name: exo-credentials, namespace: {ns}, key: client-secret}}
"#,
        port = peer.smtp_port,
        url = emu.url
    );
    create_yaml(&client, &ns, &yaml).await;
    // A cluster-scoped profile outlives the test's namespace: it goes with the test, even a failed one.
    let _cleanup = ClusterProfileCleanup(ns.clone());
    let bundle = emu.dir.path().join("cli-ca-bundle.pem");
    concat_pems(&bundle, &[emu.ca_pem(), peer.ca_pem()]);
    let bundle = bundle.display().to_string();

    let out = mailroom(&["profile", "check", &ns, "--cluster", "--ca-bundle", &bundle], b"", &[]).await;
    let (code, stdout, stderr) = parts(&out);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains(&format!("profile: ClusterMailProfile {ns} (smtp-oauth2)")), "{stdout}");
    assert!(stdout.contains("roles: SMTP.SendAsApp"), "{stdout}");
    assert!(stdout.contains("auth mechanisms (encrypted): ") && stdout.contains("XOAUTH2"), "{stdout}");
    assert!(stdout.contains("login: accepted for alerts@contoso.com"), "{stdout}");
    assert!(!stdout.contains("eyJ") && !stdout.contains("xo-Secret-4f5e6d"), "a secret was printed: {stdout}");
    let tokens = emu.token_requests().await;
    assert_eq!(tokens.len(), 1, "{tokens:#?}");
    assert_eq!(tokens[0]["scope"], "https://outlook.office365.com/.default");
}

/// Without --namespace, the kubeconfig context's namespace is used, as kubectl does.
#[tokio::test]
async fn the_kubeconfig_context_names_the_namespace() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cli-context", &[]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::copy(common::required_env("KUBECONFIG"), &kubeconfig).expect("copy the kubeconfig");
    let kubeconfig = kubeconfig.display().to_string();
    let set = common::kubectl(&["config", "set-context", "--current", "--namespace", &ns, "--kubeconfig", &kubeconfig]);
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    let env = [("KUBECONFIG", kubeconfig.as_str())];

    let out = mailroom(
        &["send", "--profile", "relay", "--to", "ops@contoso.com", "--text-file", "-", "--dry-run"],
        b"x",
        &env,
    )
    .await;
    let (code, stdout, stderr) = parts(&out);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    let message: EmailMessage = serde_yaml::from_str(&stdout).expect("an EmailMessage");
    assert_eq!(message.metadata.namespace.as_deref(), Some(ns.as_str()));

    let out =
        mailroom(&["send", "--profile", "relay", "--to", "ops@contoso.com", "--text-file", "-"], b"x", &env).await;
    let (code, stdout, stderr) = parts(&out);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains(&format!("created in namespace {ns}")), "{stdout}");
    assert_eq!(messages_in(&ns).await.len(), 1);
}

/// Plain http:// endpoints are refused as the operator refuses them, unless allowed.
#[tokio::test]
async fn check_refuses_plain_http_unless_allowed() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cli-insecure", &[]).await;
    let yaml = format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: graph-credentials}}
stringData: {{client-secret: some-Secret-a1b2}}
---{}"#,
        graph_profile("http://127.0.0.1:9")
    );
    create_yaml(&client, &ns, &yaml).await;
    let (code, stdout, _) = parts(&mailroom(&["profile", "check", "m365", "-n", &ns], b"", &[]).await);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("not ready: InvalidSettings: ") && stdout.contains("plain http"), "{stdout}");

    // Allowed, the check goes on to the token endpoint, which nothing serves here.
    let args = ["profile", "check", "m365", "-n", &ns, "--allow-insecure-endpoints", "--timeout", "20s"];
    let (code, stdout, _) = parts(&mailroom(&args, b"", &[]).await);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("not ready: TokenRequestFailed: "), "{stdout}");
    assert!(!stdout.contains("some-Secret-a1b2"), "the secret was printed");
}

/// Deletes a ClusterMailProfile when dropped, so that no other test's operator sees it.
struct ClusterProfileCleanup(String);

impl Drop for ClusterProfileCleanup {
    fn drop(&mut self) {
        common::kubectl(&["delete", "clustermailprofile", &self.0, "--ignore-not-found", "--wait=false"]);
    }
}

/// A kubeconfig that does not exist: any API call ends in exit 3, so 64 proves none was made.
const NO_API: [(&str, &str); 1] = [("KUBECONFIG", "/nonexistent/kubeconfig")];

#[tokio::test]
async fn inline_bodies_and_body_files_arrive_as_given() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cli-bodies", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("cli-bodies", &ns, &[]);
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    let base = ["send", "-n", &ns, "--profile", "relay", "--to", "ops@contoso.com", "--wait", "--timeout", "60s"];

    let inline = [&base[..], &["--subject", "inline", "--text", "Deploy done", "--html", "<p>Deploy <b>done</b></p>"]];
    let (code, stdout, stderr) = parts(&mailroom(&inline.concat(), b"", &[]).await);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");

    let dir = tempfile::tempdir().expect("temp dir");
    let body = dir.path().join("body.txt");
    std::fs::write(&body, "From a file.\n").expect("write");
    let body = body.display().to_string();
    let files = [&base[..], &["--subject", "files", "--text-file", &body, "--html-file", "-"]];
    let (code, stdout, stderr) = parts(&mailroom(&files.concat(), b"<p>From <i>stdin</i>.</p>", &[]).await);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");

    let envelopes = peer.wait_messages(2, WAIT).await;
    let mut got: Vec<(String, String, String)> = envelopes
        .iter()
        .map(|e| {
            let raw = peer.raw(e);
            let m = MessageParser::default().parse(&raw).expect("parse");
            let text = m.body_text(0).unwrap_or_default().trim().to_string();
            let html = m.body_html(0).unwrap_or_default().trim().to_string();
            (m.subject().unwrap_or_default().to_string(), text, html)
        })
        .collect();
    got.sort();
    assert_eq!(got[0].0, "files");
    assert_eq!(got[0].1, "From a file.");
    assert!(got[0].2.contains("<p>From <i>stdin</i>.</p>"), "{:?}", got[0]);
    assert_eq!(got[1].0, "inline");
    assert_eq!(got[1].1, "Deploy done", "--text is the body itself, not a file name");
    assert!(got[1].2.contains("<p>Deploy <b>done</b></p>"), "{:?}", got[1]);
}

#[tokio::test]
async fn conflicting_or_out_of_range_flags_exit_64_before_any_api_call() {
    let base = ["send", "--profile", "relay", "--to", "ops@contoso.com"];
    let cases: [(&[&str], &str); 9] = [
        (&["--text", "inline", "--text-file", "body.txt"], "--text and --text-file both give the body"),
        (&["--html", "<p>x</p>", "--html-file", "-"], "--html and --html-file both give the body"),
        (&["--text", "-"], "to read it from stdin use --text-file -"),
        (&["--text-file", "-", "--html-file", "-"], "stdin can be read only once"),
        (&["--text-file", "/nonexistent/body.txt"], "--text-file /nonexistent/body.txt: "),
        (&["--text", "x", "--max-attempts", "0"], "--max-attempts"),
        (&["--text", "x", "--max-attempts", "101"], "from 1 to 100"),
        (&["--text", "x", "--deadline", "0s"], "at least 1s"),
        (&["--text", "x", "--deadline", "soon"], "--deadline"),
    ];
    for (extra, expected) in cases {
        let args = [&base[..], extra].concat();
        let (code, stdout, stderr) = parts(&mailroom(&args, b"stdin", &NO_API).await);
        assert_eq!(code, 64, "{extra:?}: stdout: {stdout}\nstderr: {stderr}");
        assert!(stderr.contains(expected), "{extra:?}: {expected:?} not in: {stderr}");
        assert!(stdout.is_empty(), "{extra:?}: {stdout}");
    }
}

/// The receiver serves HTTPS with a certificate Secret, or plain HTTP when that is said: `run`
/// refuses anything else before it reads a kubeconfig (there is none here) or listens.
#[tokio::test]
async fn the_receiver_flags_say_https_or_plain_http_explicitly_or_run_refuses_to_start() {
    let base = ["run", "--metrics-addr", "127.0.0.1:0", "--health-addr", "127.0.0.1:0"];
    let cases: [(&[&str], &str); 5] = [
        (&["--alerts-addr", "127.0.0.1:0"], "--alerts-addr needs --alerts-tls-secret [NAMESPACE/]NAME"),
        (
            &["--alerts-addr", "127.0.0.1:0", "--alerts-tls-secret", "alerts-tls", "--alerts-insecure-http"],
            "exclude each other",
        ),
        (&["--alerts-addr", "127.0.0.1:0", "--alerts-tls-secret", "ns/"], "is not [NAMESPACE/]NAME"),
        (
            &["--alerts-addr", "127.0.0.1:0", "--alerts-tls-secret", "alerts-tls", "--alerts-url", "http://a:8082"],
            "must start with https://",
        ),
        (&["--alerts-insecure-http"], "the receiver is off without --alerts-addr"),
    ];
    for (extra, expected) in cases {
        let args = [&base[..], extra].concat();
        let (code, _, stderr) = parts(&mailroom(&args, b"", &NO_API).await);
        assert_eq!(code, 1, "{extra:?}: {stderr}");
        assert!(stderr.contains(expected), "{extra:?}: {expected:?} not in: {stderr}");
        assert!(!stderr.contains("Kubernetes configuration"), "{extra:?}: refused only after the kubeconfig: {stderr}");
    }
    // Either choice passes the flag check, and the operator goes on to the (missing) kubeconfig.
    for choice in [&["--alerts-tls-secret", "alerts-tls"][..], &["--alerts-insecure-http"][..]] {
        let args = [&base[..], &["--alerts-addr", "127.0.0.1:0"], choice].concat();
        let (code, _, stderr) = parts(&mailroom(&args, b"", &NO_API).await);
        assert_eq!(code, 1, "{choice:?}: {stderr}");
        assert!(stderr.contains("Kubernetes configuration"), "{choice:?}: {stderr}");
    }
}

#[tokio::test]
async fn max_attempts_and_deadline_land_in_the_spec() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cli-delivery", &[]).await;
    let args = [
        "send",
        "-n",
        &ns,
        "--profile",
        "relay",
        "--to",
        "ops@contoso.com",
        "--text",
        "x",
        "--max-attempts",
        "3",
        "--deadline",
        "10m",
    ];
    let (code, stdout, stderr) = parts(&mailroom(&args, b"", &[]).await);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    let name = created_name(&stdout);
    let message = Api::<EmailMessage>::namespaced(client.clone(), &ns).get(&name).await.expect("the message");
    let delivery = message.spec.delivery.clone().expect("delivery");
    assert_eq!((delivery.max_attempts, delivery.deadline_seconds), (Some(3), Some(600)));
    assert_eq!((message.spec.max_attempts(), message.spec.deadline_seconds()), (3, 600));

    // Without the flags the spec leaves delivery to the operator's defaults.
    let plain = ["send", "-n", &ns, "--profile", "relay", "--to", "ops@contoso.com", "--text", "x"];
    let (code, stdout, _) = parts(&mailroom(&plain, b"", &[]).await);
    assert_eq!(code, 0, "{stdout}");
    let message = Api::<EmailMessage>::namespaced(client, &ns).get(&created_name(&stdout)).await.expect("the message");
    assert_eq!(message.spec.delivery, None);
}

#[tokio::test]
async fn completions_name_the_commands_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, script, stderr) = parts(&mailroom(&["completion", shell], b"", &NO_API).await);
        assert_eq!(code, 0, "{shell}: {stderr}");
        for word in ["send", "profile", "check", "completion", "man", "text-file", "max-attempts", "send-test"] {
            assert!(script.contains(word), "{shell}: {word} is not completed:\n{script}");
        }
    }
    // bash loads the script and completes `mailroom` with it.
    let (bash, _, _) = parts(&mailroom(&["completion", "bash"], b"", &NO_API).await);
    assert_eq!(bash, 0);
    let bin = common::required_env("MAILROOM_BIN");
    let loaded = std::process::Command::new("bash")
        .args(["-c", "source <(\"$0\" completion bash) && complete -p mailroom", &bin])
        .output()
        .expect("bash");
    let complete = String::from_utf8_lossy(&loaded.stdout);
    assert!(loaded.status.success() && complete.contains("_mailroom") && complete.trim_end().ends_with("mailroom"));

    let (code, _, stderr) = parts(&mailroom(&["completion", "tcsh"], b"", &NO_API).await);
    assert_eq!(code, 64, "an unknown shell is a usage error: {stderr}");
}

#[tokio::test]
async fn man_pages_are_roff_and_name_the_commands() {
    let (code, top, stderr) = parts(&mailroom(&["man"], b"", &NO_API).await);
    assert_eq!(code, 0, "{stderr}");
    assert!(top.lines().any(|l| l.starts_with(".TH mailroom 1 ")), "{top}");
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH DESCRIPTION", ".SH SUBCOMMANDS"] {
        assert!(top.lines().any(|l| l == section), "{section} missing:\n{top}");
    }
    for sub in ["run", "send", "profile", "crd", "completion", "man", "version"] {
        assert!(top.contains(&format!("mailroom\\-{sub}(1)")), "{sub} is not listed:\n{top}");
    }
    let (code, send, _) = parts(&mailroom(&["man", "send"], b"", &NO_API).await);
    assert_eq!(code, 0);
    assert!(send.lines().any(|l| l.starts_with(".TH mailroom-send 1 ")), "{send}");
    assert!(send.contains("\\-\\-text\\-file") && send.contains("\\-\\-deadline"), "{send}");
    let (code, check, _) = parts(&mailroom(&["man", "profile", "check"], b"", &NO_API).await);
    assert_eq!(code, 0);
    assert!(check.contains("\\-\\-send\\-test") && check.contains("\\-\\-from"), "{check}");

    // groff reads each page without a warning (-ww: all warnings; -z: no output).
    for (name, page) in [("mailroom", &top), ("mailroom-send", &send), ("mailroom-profile-check", &check)] {
        let mut groff = match std::process::Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => panic!("groff (Debian's groff-base) checks the man pages: {e}"),
        };
        use std::io::Write;
        groff.stdin.take().expect("stdin").write_all(page.as_bytes()).expect("write");
        let out = groff.wait_with_output().expect("groff");
        assert!(out.status.success() && out.stderr.is_empty(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
    }

    let (code, _, stderr) = parts(&mailroom(&["man", "profile", "lint"], b"", &NO_API).await);
    assert_eq!(code, 64);
    assert!(stderr.contains("mailroom profile has no command \"lint\"; its commands: check"), "{stderr}");
}

#[tokio::test]
async fn kubectl_runs_the_binary_as_its_mailroom_plugin() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cli-plugin", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("cli-plugin", &ns, &[]);
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    // Installed as krew installs it: a link named kubectl-mailroom on the PATH.
    let dir = tempfile::tempdir().expect("temp dir");
    std::os::unix::fs::symlink(common::required_env("MAILROOM_BIN"), dir.path().join("kubectl-mailroom"))
        .expect("link the plugin");
    let path = format!("{}:{}", dir.path().display(), common::required_env("PATH"));
    let env = [("PATH", path.as_str())];

    let (code, listed, stderr) = parts(&run("kubectl", &["plugin", "list"], b"", &env).await);
    assert_eq!(code, 0, "{stderr}");
    assert!(listed.contains(&format!("{}/kubectl-mailroom", dir.path().display())), "{listed}");

    let send = vec!["mailroom", "send", "-n", &ns, "--profile", "relay", "--to", "ops@contoso.com"];
    let send = [send, vec!["--subject", "via kubectl", "--text", "Sent by kubectl mailroom.", "--wait"]].concat();
    let (code, stdout, stderr) = parts(&run("kubectl", &send, b"", &env).await);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("phase: Sent"), "{stdout}");
    let envelopes = peer.wait_messages(1, WAIT).await;
    let raw = peer.raw(&envelopes[0]);
    let parsed = MessageParser::default().parse(&raw).expect("parse");
    assert_eq!(parsed.subject(), Some("via kubectl"));
    assert_eq!(parsed.body_text(0).as_deref().map(str::trim), Some("Sent by kubectl mailroom."));

    let (code, stdout, stderr) =
        parts(&run("kubectl", &["mailroom", "profile", "check", "relay", "-n", &ns], b"", &env).await);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains(&format!("profile: MailProfile {ns}/relay (smtp")), "{stdout}");
    assert!(stdout.contains("greeting: 220 "), "{stdout}");

    // Help and usage name the command as typed; exit codes pass through kubectl.
    let (code, help, _) = parts(&run("kubectl", &["mailroom", "send", "--help"], b"", &env).await);
    assert_eq!(code, 0);
    assert!(help.contains("Usage: kubectl mailroom send [OPTIONS] --profile <PROFILE>"), "{help}");
    let (code, _, stderr) = parts(&run("kubectl", &["mailroom", "profile", "check"], b"", &env).await);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("Usage: kubectl mailroom profile check"), "{stderr}");
    let (code, stdout, _) =
        parts(&run("kubectl", &["mailroom", "profile", "check", "absent", "-n", &ns], b"", &env).await);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("ProfileNotFound"), "{stdout}");
}

#[tokio::test]
async fn send_test_obeys_the_profiles_sender_and_recipient_policy() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cli-policy", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let profile = format!(
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: relay}}
spec:
  senders: {{default: "alerts@contoso.com", allowed: ["*@noreply.contoso.com"]}}
  recipientDomains: ["contoso.com"]
  smtp: {{host: 127.0.0.1, port: {port}, tls: None}}
"#,
        port = peer.smtp_port
    );
    create_yaml(&client, &ns, &profile).await;
    let check = ["profile", "check", "relay", "-n", &ns, "--send-test"];

    let (code, stdout, stderr) = parts(&mailroom(&[&check[..], &["Ann <ann@fabrikam.com>"]].concat(), b"", &[]).await);
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains(&format!(
            "test message refused: RecipientDomainNotAllowed: recipient ann@fabrikam.com is not in the recipient \
             domains of profile MailProfile {ns}/relay (contoso.com); nothing was sent"
        )),
        "{stdout}"
    );
    assert!(!stdout.contains("ready:"), "refused before the check went on: {stdout}");

    let (code, stdout, _) =
        parts(&mailroom(&[&check[..], &["ops@contoso.com", "--from", "ceo@contoso.com"]].concat(), b"", &[]).await);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("test message refused: SenderNotAllowed: sender ceo@contoso.com is not allowed"),
        "{stdout}"
    );

    // What the policy allows is sent: a subdomain recipient, an allowed sender pattern. The
    // server has it when the check returns, so it holds this one message and no other.
    let allowed = [&check[..], &["ops@eu.contoso.com", "--from", "CI <ci@noreply.contoso.com>"]].concat();
    let (code, stdout, stderr) = parts(&mailroom(&allowed, b"", &[]).await);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("test message: accepted: 250"), "{stdout}");
    let received = peer.messages().await;
    assert_eq!(received.len(), 1, "the refused test messages were not sent: {received:#?}");
    assert_eq!(received[0]["mail_from"], "ci@noreply.contoso.com");
    assert_eq!(received[0]["rcpt_tos"], json!(["ops@eu.contoso.com"]));

    // Bad flags are usage errors; no kubeconfig is an API error.
    let (code, _, stderr) = parts(&mailroom(&["profile", "check", "relay", "--from", "a@contoso.com"], b"", &[]).await);
    assert_eq!(code, 64, "--from needs --send-test: {stderr}");
    let bad_from = ["profile", "check", "relay", "--send-test", "ops@contoso.com", "--from", "a@@contoso"];
    let (code, _, stderr) = parts(&mailroom(&bad_from, b"", &NO_API).await);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("--from"), "{stderr}");
    let (code, _, stderr) = parts(&mailroom(&["profile", "check", "relay"], b"", &NO_API).await);
    assert_eq!(code, 3, "no kubeconfig: {stderr}");
}

/// A ready-made message: its own From, To, Bcc and Message-ID.
const EML: &str = "From: Alerts <alerts@contoso.com>\r\nTo: Ops <ops@contoso.com>\r\nBcc: audit@contoso.com\r\n\
Subject: Backup finished\r\nMessage-ID: <backup-42@contoso.com>\r\nMIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\r\nThe nightly backup finished in 4m 12s.\r\n";

#[tokio::test]
async fn send_eml_sends_a_file_and_stdin_as_they_are() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cli-eml", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let _op = Operator::start("cli-eml", &ns, &[]);
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("backup.eml");
    std::fs::write(&file, EML).expect("write");
    let file = file.display().to_string();

    // From a file: the envelope recipients are the message's own To and Bcc.
    let args = ["send", "-n", &ns, "--profile", "relay", "--eml", &file, "--wait", "--timeout", "60s"];
    let (code, stdout, stderr) = parts(&mailroom(&args, b"", &[]).await);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("phase: Sent") && stdout.contains("<backup-42@contoso.com>"), "{stdout}");
    let name = created_name(&stdout);
    let message = Api::<EmailMessage>::namespaced(client.clone(), &ns).get(&name).await.expect("the message");
    let raw_ref = message.spec.raw.as_ref().expect("spec.raw");
    assert_eq!(raw_ref.secret_ref.name, name, "the Secret is named like the message");
    let secret = Api::<Secret>::namespaced(client.clone(), &ns).get(&name).await.expect("the Secret");
    assert_eq!(
        secret.data.as_ref().and_then(|d| d.get("message.eml")).map(|b| b.0.clone()),
        Some(EML.as_bytes().to_vec())
    );
    let owners = secret.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owners.first().map(|o| o.uid.clone()), message.metadata.uid.clone(), "owned by the message");

    let envelopes = peer.wait_messages(1, WAIT).await;
    let mut rcpts: Vec<&str> =
        envelopes[0]["rcpt_tos"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    rcpts.sort();
    assert_eq!(rcpts, ["audit@contoso.com", "ops@contoso.com"]);
    let received = String::from_utf8(peer.raw(&envelopes[0])).expect("UTF-8");
    let expected = EML.replace("Bcc: audit@contoso.com\r\n", "");
    assert!(received.ends_with(&expected), "sent as it is, but for its Bcc:\n{received}");

    // From stdin, with --to as the envelope: only that recipient gets it.
    let args = ["send", "-n", &ns, "--profile", "relay", "--eml", "-", "--to", "ops@contoso.com", "--wait"];
    let (code, stdout, stderr) = parts(&mailroom(&args, EML.as_bytes(), &[]).await);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    let envelopes = peer.wait_messages(2, WAIT).await;
    assert_eq!(envelopes[1]["rcpt_tos"], json!(["ops@contoso.com"]));
}

#[tokio::test]
async fn send_eml_refuses_what_cannot_be_sent_with_exit_64_before_any_api_call() {
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, content: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).expect("write");
        path.display().to_string()
    };
    let good = write("good.eml", EML.as_bytes());
    let no_from = write("no-from.eml", b"To: ops@contoso.com\r\nSubject: x\r\n\r\nbody\r\n");
    let no_rcpt = write("no-rcpt.eml", b"From: alerts@contoso.com\r\nSubject: x\r\n\r\nbody\r\n");
    let too_big = write("big.eml", &vec![b'a'; 1024 * 1024 + 1]);
    // A kubeconfig that does not exist: a command that got past its checks would exit 3.
    let env = [("KUBECONFIG", "/nonexistent/kubeconfig")];
    for (args, wanted) in [
        (vec!["--eml", no_from.as_str()], "0 From: fields"),
        (vec!["--eml", no_rcpt.as_str()], "no To, Cc or Bcc"),
        (vec!["--eml", too_big.as_str()], "at most 1 MiB"),
        (vec!["--eml", "/nonexistent/message.eml"], "No such file"),
        (vec!["--eml", good.as_str(), "--subject", "s"], "leave out --subject"),
        (vec!["--eml", good.as_str(), "--text", "t", "--attach", good.as_str()], "leave out --text, --attach"),
        (vec!["--eml", "-", "--values", "-"], "leave out --values"),
    ] {
        let mut argv = vec!["send", "--profile", "relay"];
        argv.extend(&args);
        let (code, stdout, stderr) = parts(&mailroom(&argv, b"", &env).await);
        assert_eq!(code, 64, "{args:?}: stdout: {stdout}\nstderr: {stderr}");
        assert!(stderr.contains(wanted), "{args:?}: {stderr}");
    }
    // A good one gets past the checks, to the missing kubeconfig.
    let (code, _, stderr) = parts(&mailroom(&["send", "--profile", "relay", "--eml", &good], b"", &env).await);
    assert_eq!(code, 3, "{stderr}");
}

#[tokio::test]
async fn send_eml_dry_run_prints_the_secret_and_the_message() {
    let args = ["send", "-n", "team-a", "--profile", "relay", "--eml", "-", "--dry-run"];
    let (code, stdout, stderr) = parts(&mailroom(&args, EML.as_bytes(), &[]).await);
    assert_eq!(code, 0, "{stderr}");
    let docs: Vec<serde_json::Value> = stdout
        .split("\n---\n")
        .map(|d| serde_yaml::from_str(d).unwrap_or_else(|e| panic!("YAML: {e}\n{stdout}")))
        .collect();
    assert_eq!(docs.len(), 2, "{stdout}");
    assert_eq!(docs[0]["kind"], "Secret");
    assert_eq!(docs[1]["kind"], "EmailMessage");
    let name = docs[1]["metadata"]["name"].as_str().expect("a name chosen for both");
    assert_eq!(docs[0]["metadata"]["name"], name);
    assert_eq!(docs[1]["spec"]["raw"]["secretRef"]["name"], name);
    use base64::Engine as _;
    let data = docs[0]["data"]["message.eml"].as_str().expect("message.eml");
    assert_eq!(base64::engine::general_purpose::STANDARD.decode(data).expect("base64"), EML.as_bytes());
    assert!(docs[1]["spec"].get("subject").is_none_or(|s| s == ""), "{stdout}");
}
