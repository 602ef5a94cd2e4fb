//! The SMTP transport against a real SMTP server on loopback: the project's aiosmtpd test peer
//! (tests/peers/smtp_server.py, in the virtual environment that hack/pyenv.sh prepares).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use mail_parser::{MessageParser, MimeHeaders};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use mailroom::auth::{AccessToken, AuthError, TokenSource};
use mailroom::tls::{TrustRoots, install_crypto_provider};
use mailroom::transport::Importance;
use mailroom::transport::smtp::TlsMode;
use mailroom::transport::smtp::{SmtpConfig, SmtpCredentials, SmtpTransport};
use mailroom::transport::{
    Acceptance, AttachmentData, Delivered, OutgoingMessage, SendError, Transport, parse_mailbox,
};

/// The repository root: where hack/ and tests/peers/ are.
fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The venv's python: `MAILROOM_PYTHON` when `make test` set it, else what hack/pyenv.sh
/// prepares (once per test binary), so these tests also run with a plain `cargo test`.
fn python() -> PathBuf {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = PYTHON.get_or_init(|| {
        if let Some(python) = std::env::var_os("MAILROOM_PYTHON").filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(python));
        }
        let script = repo_root().join("hack/pyenv.sh");
        if !script.is_file() {
            return Err(format!("{} is missing", script.display()));
        }
        let output = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !output.status.success() {
            return Err(format!("{} failed: {}", script.display(), output.status));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        stdout
            .lines()
            .last()
            .map(|line| PathBuf::from(line.trim()))
            .ok_or_else(|| format!("{} printed no python path", script.display()))
    });
    match result {
        Ok(path) => path.clone(),
        Err(e) => panic!("the SMTP test peer needs its Python environment: {e}"),
    }
}

/// A running test peer; killed when dropped.
struct Peer {
    child: Child,
    dir: TempDir,
    smtp_port: u16,
    control_port: u16,
    http: reqwest::Client,
}

impl Peer {
    async fn start(args: &[&str]) -> Peer {
        install_crypto_provider();
        let server = repo_root().join("tests/peers/smtp_server.py");
        assert!(server.is_file(), "{} is missing", server.display());
        let dir = tempfile::tempdir().expect("temporary directory");
        let log = std::fs::File::create(dir.path().join("peer.log")).expect("peer log");
        let child = Command::new(python())
            .arg(&server)
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir.path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("peer log"))
            .stderr(log)
            .spawn()
            .expect("start the SMTP test peer");
        let mut peer = Peer {
            child,
            dir,
            smtp_port: 0,
            control_port: 0,
            http: TrustRoots::default().http_client().expect("HTTP client"),
        };
        let ready = peer.dir.path().join("ready.json");
        for _ in 0..300 {
            if let Ok(text) = std::fs::read_to_string(&ready)
                && let Ok(value) = serde_json::from_str::<Value>(&text)
            {
                peer.smtp_port = port(&value["smtp_port"]);
                peer.control_port = port(&value["control_port"]);
                return peer;
            }
            if let Ok(Some(status)) = peer.child.try_wait() {
                panic!("the SMTP test peer exited ({status}):\n{}", peer.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the SMTP test peer did not get ready:\n{}", peer.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("peer.log")).unwrap_or_default()
    }

    fn ca(&self) -> TrustRoots {
        let pem = std::fs::read(self.dir.path().join("ca.pem")).expect("ca.pem");
        TrustRoots::from_pem(&pem).expect("the peer's CA parses")
    }

    async fn script(&self, body: Value) {
        let response = self
            .http
            .post(format!("http://127.0.0.1:{}/script", self.control_port))
            .json(&body)
            .send()
            .await
            .expect("POST /script");
        assert!(response.status().is_success(), "POST /script {body}");
    }

    async fn get(&self, path: &str) -> Value {
        let url = format!("http://127.0.0.1:{}{path}", self.control_port);
        self.http.get(&url).send().await.expect(&url).json().await.expect("a JSON answer")
    }

    async fn messages(&self) -> Vec<Value> {
        serde_json::from_value(self.get("/messages").await).expect("a list of messages")
    }

    /// The peer's counters (connections, open sessions, QUITs, accepted messages, ...).
    async fn stats(&self) -> Value {
        self.get("/stats").await
    }

    fn config(&self, tls: TlsMode, roots: TrustRoots, credentials: SmtpCredentials) -> SmtpConfig {
        let mut config = SmtpConfig::new("127.0.0.1", self.smtp_port, tls, roots, credentials);
        config.hello_name = Some("mailroom-test".into());
        config.connect_timeout = Duration::from_secs(10);
        config.command_timeout = Duration::from_secs(10);
        config.data_timeout = Duration::from_secs(20);
        config
    }

    fn transport(&self, tls: TlsMode, roots: TrustRoots, credentials: SmtpCredentials) -> SmtpTransport {
        SmtpTransport::new(self.config(tls, roots, credentials)).expect("transport")
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn port(value: &Value) -> u16 {
    value.as_u64().and_then(|p| u16::try_from(p).ok()).expect("a port in ready.json")
}

fn message() -> OutgoingMessage {
    let addr = |s: &str| parse_mailbox(s).expect("test address");
    OutgoingMessage {
        from: addr("Alerts Bot <alerts@contoso.com>"),
        to: vec![addr("Ops Team <ops@contoso.com>")],
        cc: vec![addr(r#""Doe, Jane" <jane@contoso.com>"#)],
        bcc: vec![addr("audit@contoso.com")],
        reply_to: vec![],
        subject: "Deploy finished ✅ déjà vu".into(),
        text: Some("Version 1.4.2 is live.\n".into()),
        html: Some("<p>Version <b>1.4.2</b> is live.</p>".into()),
        attachments: vec![AttachmentData {
            name: "résumé.pdf".into(),
            content_type: "application/pdf".into(),
            bytes: (0..=255u8).collect(),
        }],
        headers: vec![("X-Pipeline-Run".into(), "1234".into())],
        importance: Importance::High,
        message_id: "<smtp-test-1@mailroom.dev>".into(),
    }
}

fn reason(error: &SendError) -> &str {
    error.reason()
}

fn rcpt_tos(record: &Value) -> Vec<String> {
    record["rcpt_tos"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// Checks the stored message: envelope, headers (no Bcc), bodies, attachment.
fn check_received(record: &Value, delivered: &Delivered) {
    assert_eq!(record["mail_from"], "alerts@contoso.com");
    assert_eq!(rcpt_tos(record), vec!["ops@contoso.com", "jane@contoso.com", "audit@contoso.com"]);
    assert_eq!(record["message_id"], "<smtp-test-1@mailroom.dev>");
    let queue_id = record["queue_id"].as_str().expect("queue id");
    assert!(delivered.response.starts_with("250 ") && delivered.response.contains(queue_id), "{delivered:?}");
    assert!(delivered.rejected.is_empty());
    // A 250 to the message data: the server took responsibility for it.
    assert_eq!(delivered.acceptance, Acceptance::ResponsibilityTaken);

    let raw = std::fs::read(record["eml"].as_str().expect("eml path")).expect("stored message");
    let header_end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
    let headers = String::from_utf8_lossy(&raw[..header_end]).to_ascii_lowercase();
    assert!(!headers.contains("\nbcc:") && !headers.starts_with("bcc:"), "{headers}");
    assert!(!headers.contains("audit@contoso.com"), "{headers}");

    let parsed =
        MessageParser::new().with_minimal_headers().with_message_ids().parse(&raw).expect("the stored message parses");
    assert_eq!(parsed.subject(), Some("Deploy finished ✅ déjà vu"));
    assert_eq!(parsed.message_id(), Some("smtp-test-1@mailroom.dev"));
    let to = parsed.to().and_then(|a| a.first()).expect("To");
    assert_eq!((to.name(), to.address()), (Some("Ops Team"), Some("ops@contoso.com")));
    let cc = parsed.cc().and_then(|a| a.first()).expect("Cc");
    assert_eq!((cc.name(), cc.address()), (Some("Doe, Jane"), Some("jane@contoso.com")));
    assert!(parsed.bcc().is_none());
    assert_eq!(parsed.body_text(0).as_deref(), Some("Version 1.4.2 is live.\r\n"));
    assert_eq!(parsed.body_html(0).as_deref(), Some("<p>Version <b>1.4.2</b> is live.</p>"));
    let attachment = parsed.attachments().next().expect("an attachment");
    assert_eq!(attachment.attachment_name(), Some("résumé.pdf"));
    assert_eq!(attachment.contents(), (0..=255u8).collect::<Vec<_>>().as_slice());
    assert_eq!(parsed.header_raw("X-Pipeline-Run").map(str::trim), Some("1234"));
    assert_eq!(parsed.header_raw("Importance").map(str::trim), Some("high"));
    assert_eq!(parsed.header_raw("X-Priority").map(str::trim), Some("1"));
}

#[tokio::test]
async fn relay_without_tls() {
    let peer = Peer::start(&[]).await;
    let transport = peer.transport(TlsMode::None, TrustRoots::default(), SmtpCredentials::None);
    let delivered = transport.send(&message()).await.expect("delivered");
    let messages = peer.messages().await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["tls"], false);
    assert_eq!(messages[0]["helo"], "mailroom-test");
    check_received(&messages[0], &delivered);
}

#[tokio::test]
async fn starttls_trusting_the_peer_ca() {
    let peer = Peer::start(&["--self-signed", "--require-starttls"]).await;
    let transport = peer.transport(TlsMode::StartTLS, peer.ca(), SmtpCredentials::None);
    let delivered = transport.send(&message()).await.expect("delivered");
    let messages = peer.messages().await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["tls"], true);
    check_received(&messages[0], &delivered);
}

#[tokio::test]
async fn starttls_with_an_untrusted_ca_is_permanent() {
    let peer = Peer::start(&["--self-signed", "--require-starttls"]).await;
    let transport = peer.transport(TlsMode::StartTLS, TrustRoots::default(), SmtpCredentials::None);
    let error = transport.send(&message()).await.expect_err("untrusted");
    assert!(!error.is_transient(), "{error:?}");
    assert!(reason(&error).contains("caBundle"), "{error}");
    assert!(peer.messages().await.is_empty());
}

#[tokio::test]
async fn starttls_required_but_not_offered_is_permanent() {
    let peer = Peer::start(&[]).await;
    let transport = peer.transport(TlsMode::StartTLS, TrustRoots::default(), SmtpCredentials::None);
    let error = transport.send(&message()).await.expect_err("no STARTTLS");
    assert!(!error.is_transient(), "{error:?}");
    assert!(reason(&error).contains("STARTTLS"), "{error}");
}

#[tokio::test]
async fn implicit_tls() {
    let peer = Peer::start(&["--self-signed", "--implicit-tls"]).await;
    let transport = peer.transport(TlsMode::Implicit, peer.ca(), SmtpCredentials::None);
    let delivered = transport.send(&message()).await.expect("delivered");
    let messages = peer.messages().await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["tls"], true);
    check_received(&messages[0], &delivered);
}

const PASSWORD_PEER: &[&str] =
    &["--self-signed", "--require-starttls", "--require-auth", "--auth-user", "mailer", "--auth-pass", "s3cret-pass"];

#[tokio::test]
async fn password_auth_good() {
    let peer = Peer::start(PASSWORD_PEER).await;
    let credentials = SmtpCredentials::Password { username: "mailer".into(), password: "s3cret-pass".into() };
    let transport = peer.transport(TlsMode::StartTLS, peer.ca(), credentials);
    let delivered = transport.send(&message()).await.expect("delivered");
    let messages = peer.messages().await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["auth_user"], "mailer");
    check_received(&messages[0], &delivered);
}

#[tokio::test]
async fn password_auth_bad_is_permanent_without_the_password() {
    let peer = Peer::start(PASSWORD_PEER).await;
    let credentials = SmtpCredentials::Password { username: "mailer".into(), password: "wrong-pass-xyz".into() };
    let transport = peer.transport(TlsMode::StartTLS, peer.ca(), credentials);
    let error = transport.send(&message()).await.expect_err("refused");
    assert!(!error.is_transient(), "{error:?}");
    assert!(reason(&error).contains("535"), "{error}");
    assert!(!reason(&error).contains("wrong-pass-xyz"), "{error}");
    assert!(!format!("{transport:?}").contains("wrong-pass-xyz"));
    assert!(peer.messages().await.is_empty());
}

#[tokio::test]
async fn data_451_is_transient() {
    let peer = Peer::start(&[]).await;
    peer.script(json!({"data": ["451 4.3.0 Try again later"]})).await;
    let transport = peer.transport(TlsMode::None, TrustRoots::default(), SmtpCredentials::None);
    let error = transport.send(&message()).await.expect_err("deferred");
    assert!(error.is_transient(), "{error:?}");
    assert!(reason(&error).contains("451 4.3.0 Try again later"), "{error}");
    assert!(peer.messages().await.is_empty());
    // The script is used up: the next attempt goes through.
    transport.send(&message()).await.expect("delivered on retry");
}

#[tokio::test]
async fn one_of_two_recipients_refused_still_delivers() {
    let peer = Peer::start(&[]).await;
    peer.script(json!({"rcpt": {"bad@example.com": "550 5.1.1 User unknown"}})).await;
    let mut msg = message();
    msg.to = vec![parse_mailbox("good@example.com").unwrap(), parse_mailbox("Bad <bad@example.com>").unwrap()];
    msg.cc.clear();
    msg.bcc.clear();
    let transport = peer.transport(TlsMode::None, TrustRoots::default(), SmtpCredentials::None);
    let delivered = transport.send(&msg).await.expect("delivered to one");
    assert_eq!(delivered.rejected, vec![("bad@example.com".to_string(), "550 5.1.1 User unknown".to_string())]);
    assert!(delivered.response.starts_with("250 "), "{delivered:?}");
    let messages = peer.messages().await;
    assert_eq!(messages.len(), 1);
    assert_eq!(rcpt_tos(&messages[0]), vec!["good@example.com"]);
}

#[tokio::test]
async fn every_recipient_refused_is_permanent() {
    let peer = Peer::start(&[]).await;
    peer.script(json!({"rcpt": {"@contoso.com": "550 5.7.64 TenantAttribution; Relay Access Denied"}})).await;
    let transport = peer.transport(TlsMode::None, TrustRoots::default(), SmtpCredentials::None);
    let error = transport.send(&message()).await.expect_err("all refused");
    assert!(!error.is_transient(), "{error:?}");
    assert!(reason(&error).contains("550 5.7.64 TenantAttribution; Relay Access Denied"), "{error}");
    assert!(reason(&error).contains("audit@contoso.com"), "{error}");
    assert!(peer.messages().await.is_empty());
}

#[tokio::test]
async fn connection_refused_is_transient() {
    install_crypto_provider();
    // A port that was just free: nothing listens there.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let config = SmtpConfig::new("127.0.0.1", port, TlsMode::None, TrustRoots::default(), SmtpCredentials::None);
    let transport = SmtpTransport::new(config).expect("transport");
    let error = transport.send(&message()).await.expect_err("refused");
    assert!(error.is_transient(), "{error:?}");
    assert!(reason(&error).contains("connection refused"), "{error}");
}

#[tokio::test]
async fn server_down_is_transient() {
    let peer = Peer::start(&[]).await;
    peer.script(json!({"down": true})).await;
    let transport = peer.transport(TlsMode::None, TrustRoots::default(), SmtpCredentials::None);
    let error = transport.send(&message()).await.expect_err("down");
    assert!(error.is_transient(), "{error:?}");
    peer.script(json!({"down": "421"})).await;
    let error = transport.send(&message()).await.expect_err("421");
    assert!(error.is_transient(), "{error:?}");
    assert!(reason(&error).contains("421"), "{error}");
}

#[tokio::test]
async fn drop_in_data_is_transient() {
    let peer = Peer::start(&[]).await;
    peer.script(json!({"drop_in_data": 1})).await;
    let transport = peer.transport(TlsMode::None, TrustRoots::default(), SmtpCredentials::None);
    let error = transport.send(&message()).await.expect_err("dropped");
    assert!(error.is_transient(), "{error:?}");
    assert!(reason(&error).contains("closed the connection") && reason(&error).contains("same Message-ID"), "{error}");
    assert!(peer.messages().await.is_empty());
}

/// A server that greets, then answers EHLO with a line that never ends; returns its port and
/// how many bytes it managed to send before the client closed the connection.
async fn endless_reply_server() -> (u16, tokio::task::JoinHandle<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        socket.write_all(b"220 hostile.example ESMTP\r\n").await.expect("greeting");
        let mut command = [0u8; 512];
        let _ = socket.read(&mut command).await;
        let mut sent = socket.write(b"250-").await.unwrap_or(0);
        let line = [b'x'; 16 * 1024];
        // Until the client hangs up, or 64 MiB: far past any bound the client should keep.
        while sent < 64 * 1024 * 1024 {
            match socket.write(&line).await {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        sent
    });
    (port, server)
}

#[tokio::test]
async fn a_reply_that_never_ends_is_cut_at_the_bound() {
    install_crypto_provider();
    let (port, server) = endless_reply_server().await;
    let config = SmtpConfig::new("127.0.0.1", port, TlsMode::None, TrustRoots::default(), SmtpCredentials::None);
    let transport = SmtpTransport::new(config).expect("transport");
    let error = transport.send(&message()).await.expect_err("a reply without end");
    assert!(error.is_transient(), "{error:?}");
    assert!(reason(&error).contains("without waiting for a command"), "{error}");
    drop(transport);
    let sent = server.await.expect("server task");
    // The client stopped reading at the bound: the server could not push more than the bound
    // plus what the kernel's socket buffers hold.
    let most = mailroom::transport::smtp::MAX_UNANSWERED_BYTES + 16 * 1024 * 1024;
    assert!(sent < most, "the server sent {sent} bytes: the client kept reading past the bound");
}

// ---------------------------------------------------------------------------------------------
// Sessions kept open between messages.

/// The test message with its own Message-ID, from `from`.
fn message_from(from: &str, n: usize) -> OutgoingMessage {
    OutgoingMessage {
        from: parse_mailbox(from).expect("sender"),
        message_id: format!("<session-{n}@mailroom.dev>"),
        ..message()
    }
}

/// The peer's counters that say how sessions were used.
async fn sessions(peer: &Peer) -> (u64, u64, u64, u64) {
    let stats = peer.stats().await;
    let n = |k: &str| stats[k].as_u64().unwrap_or_else(|| panic!("{k} in {stats}"));
    (n("connections"), n("open"), n("quits"), n("accepted"))
}

/// Waits up to 5 s for the peer's (connections, open, QUITs, accepted) to be `want`: a session
/// the client ended is closed at the server a moment later.
async fn assert_sessions(peer: &Peer, want: (u64, u64, u64, u64)) {
    let start = std::time::Instant::now();
    loop {
        let got = sessions(peer).await;
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "(connections, open, QUITs, accepted): {got:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn message_ids(messages: &[Value]) -> Vec<String> {
    messages.iter().map(|m| m["message_id"].as_str().unwrap_or_default().to_string()).collect()
}

#[tokio::test]
async fn a_session_carries_the_next_messages_and_is_ended_once_idle() {
    let peer = Peer::start(&[]).await;
    let mut config = peer.config(TlsMode::None, TrustRoots::default(), SmtpCredentials::None);
    config.idle_session = Duration::from_secs(1);
    let transport = SmtpTransport::new(config).expect("transport");
    for n in 0..3 {
        transport.send(&message_from("alerts@contoso.com", n)).await.expect("delivered");
    }
    assert_sessions(&peer, (1, 1, 0, 3)).await;
    // Idle past its time (1 s), it is ended with QUIT without another message to prompt it.
    assert_sessions(&peer, (1, 0, 1, 3)).await;
    transport.send(&message_from("alerts@contoso.com", 3)).await.expect("delivered over a new session");
    assert_sessions(&peer, (2, 1, 1, 4)).await;
    let ids = message_ids(&peer.messages().await);
    assert_eq!(ids, (0..4).map(|n| format!("<session-{n}@mailroom.dev>")).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_session_the_server_closed_is_replaced_and_the_message_goes_once() {
    let peer = Peer::start(&[]).await;
    let transport = peer.transport(TlsMode::None, TrustRoots::default(), SmtpCredentials::None);
    transport.send(&message_from("alerts@contoso.com", 0)).await.expect("delivered");
    // The server goes away and comes back: the kept session is closed under the transport.
    peer.script(json!({"down": true})).await;
    peer.script(json!({"down": false})).await;
    transport.send(&message_from("alerts@contoso.com", 1)).await.expect("delivered over a new session");
    assert_sessions(&peer, (2, 1, 0, 2)).await;
    assert_eq!(message_ids(&peer.messages().await), ["<session-0@mailroom.dev>", "<session-1@mailroom.dev>"]);
}

#[tokio::test]
async fn an_answer_on_a_kept_session_stands() {
    let peer = Peer::start(&[]).await;
    let transport = peer.transport(TlsMode::None, TrustRoots::default(), SmtpCredentials::None);
    transport.send(&message_from("alerts@contoso.com", 0)).await.expect("delivered");
    peer.script(json!({"mail": ["451 4.3.0 Try again later"]})).await;
    let error = transport.send(&message_from("alerts@contoso.com", 1)).await.expect_err("the server's answer");
    assert!(error.is_transient() && reason(&error).contains("451 4.3.0"), "{error:?}");
    // Not tried again on another session; the session that answered was ended (lettre's abort
    // says QUIT).
    assert_sessions(&peer, (1, 0, 1, 1)).await;
    transport.send(&message_from("alerts@contoso.com", 2)).await.expect("delivered");
    assert_sessions(&peer, (2, 1, 1, 2)).await;
}

#[tokio::test]
async fn zero_idle_time_opens_a_session_per_message() {
    let peer = Peer::start(&[]).await;
    let mut config = peer.config(TlsMode::None, TrustRoots::default(), SmtpCredentials::None);
    config.idle_session = Duration::ZERO;
    let transport = SmtpTransport::new(config).expect("transport");
    for n in 0..2 {
        transport.send(&message_from("alerts@contoso.com", n)).await.expect("delivered");
    }
    assert_sessions(&peer, (2, 0, 2, 2)).await;
}

// ---------------------------------------------------------------------------------------------
// XOAUTH2: the peer asks an introspection endpoint about each token; this file serves one.

/// Hands out tokens from a list (the last one repeats) and counts invalidations.
struct ScriptedTokens {
    tokens: Mutex<Vec<&'static str>>,
    invalidations: AtomicUsize,
}

impl ScriptedTokens {
    fn new(tokens: &[&'static str]) -> Arc<Self> {
        Arc::new(ScriptedTokens {
            tokens: Mutex::new(tokens.iter().rev().copied().collect()),
            invalidations: AtomicUsize::new(0),
        })
    }
}

#[async_trait]
impl TokenSource for ScriptedTokens {
    async fn token(&self) -> Result<AccessToken, AuthError> {
        let mut tokens = self.tokens.lock().expect("lock");
        let secret = if tokens.len() > 1 { tokens.pop() } else { tokens.last().copied() }
            .ok_or_else(|| AuthError::Unavailable("no token".into()))?;
        Ok(AccessToken { secret: secret.to_string(), expires_at: Timestamp::now() + SignedDuration::from_secs(3600) })
    }

    fn invalidate(&self) {
        self.invalidations.fetch_add(1, Ordering::SeqCst);
    }
}

/// A one-route HTTP server: `POST /introspect {"token"}`; only `good-token` is active.
async fn introspection_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut buffer).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buffer[..n]);
                    if let Some(body) = complete_body(&request) {
                        let token: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                        let answer = if token["token"] == "good-token" {
                            json!({
                                "active": true,
                                "aud": "https://outlook.office365.com",
                                "roles": ["SMTP.SendAsApp"],
                                // As the emulator answers when asked for a mailbox and permission.
                                "authorized": true,
                                "clientId": "11111111-1111-1111-1111-111111111111",
                                "exp": Timestamp::now().as_second() + 3600,
                            })
                        } else {
                            json!({"active": false})
                        };
                        let body = answer.to_string();
                        let response = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = stream.write_all(response.as_bytes()).await;
                        return;
                    }
                }
            });
        }
    });
    format!("http://{address}/introspect")
}

/// The body of a complete HTTP request (by Content-Length), if it has all arrived.
fn complete_body(request: &[u8]) -> Option<&[u8]> {
    let end = request.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    (request.len() >= end + length).then(|| &request[end..end + length])
}

async fn xoauth2_peer() -> Peer {
    let url = introspection_server().await;
    Peer::start(&["--self-signed", "--require-starttls", "--require-auth", "--xoauth2-introspect", &url]).await
}

#[tokio::test]
async fn xoauth2_as_the_sender() {
    let peer = xoauth2_peer().await;
    let tokens = ScriptedTokens::new(&["good-token"]);
    let transport = peer.transport(TlsMode::StartTLS, peer.ca(), SmtpCredentials::XOAuth2(tokens.clone()));
    let delivered = transport.send(&message()).await.expect("delivered");
    let messages = peer.messages().await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["auth_mechanism"], "XOAUTH2");
    assert_eq!(messages[0]["auth_user"], "alerts@contoso.com");
    check_received(&messages[0], &delivered);
    assert_eq!(tokens.invalidations.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn xoauth2_sessions_are_kept_per_sender() {
    let peer = xoauth2_peer().await;
    let tokens = ScriptedTokens::new(&["good-token"]);
    let transport = peer.transport(TlsMode::StartTLS, peer.ca(), SmtpCredentials::XOAuth2(tokens.clone()));
    let senders = ["alerts@contoso.com", "billing@contoso.com", "Alerts@Contoso.com", "billing@contoso.com"];
    for (n, from) in senders.iter().enumerate() {
        transport.send(&message_from(from, n)).await.expect("delivered");
    }
    // One session per mailbox, each logged in as it; the second message of each went over it.
    assert_sessions(&peer, (2, 2, 0, 4)).await;
    assert_eq!(peer.stats().await["auth"]["succeeded"], 2);
    for m in peer.messages().await {
        assert_eq!(
            m["auth_user"].as_str().map(str::to_lowercase),
            m["mail_from"].as_str().map(str::to_lowercase),
            "{m}"
        );
    }
}

#[tokio::test]
async fn xoauth2_stale_token_is_transient_once_and_replaced() {
    let peer = xoauth2_peer().await;
    let tokens = ScriptedTokens::new(&["stale-token", "good-token"]);
    let transport = peer.transport(TlsMode::StartTLS, peer.ca(), SmtpCredentials::XOAuth2(tokens.clone()));
    let error = transport.send(&message()).await.expect_err("stale");
    assert!(error.is_transient(), "{error:?}");
    assert!(reason(&error).contains("535"), "{error}");
    assert!(!reason(&error).contains("stale-token"), "{error}");
    assert_eq!(tokens.invalidations.load(Ordering::SeqCst), 1);
    transport.send(&message()).await.expect("delivered with the new token");
    assert_eq!(peer.messages().await.len(), 1);
}

#[tokio::test]
async fn xoauth2_new_token_refused_too_is_permanent() {
    let peer = xoauth2_peer().await;
    let tokens = ScriptedTokens::new(&["refused-1", "refused-2"]);
    let transport = peer.transport(TlsMode::StartTLS, peer.ca(), SmtpCredentials::XOAuth2(tokens.clone()));
    let first = transport.send(&message()).await.expect_err("refused");
    assert!(first.is_transient(), "{first:?}");
    let second = transport.send(&message()).await.expect_err("refused again");
    assert!(!second.is_transient(), "{second:?}");
    assert!(reason(&second).contains("SMTP.SendAsApp"), "{second}");
    assert!(!reason(&second).contains("refused-2"), "{second}");
    assert_eq!(tokens.invalidations.load(Ordering::SeqCst), 2);
}
