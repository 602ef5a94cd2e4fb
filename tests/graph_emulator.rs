//! The Graph transport against the Microsoft 365 emulator: real HTTPS, real tokens.
//!
//! Needs the emulator binary: `cargo build -p m365-emulator` (found beside this test's own
//! target directory, or at `$M365_EMULATOR`).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::jiff::Timestamp;
use mailroom::auth::{AccessToken, AuthError, TokenSource};
use mailroom::tls::TrustRoots;
use mailroom::transport::Importance;
use mailroom::transport::graph::{GraphConfig, GraphTransport};
use mailroom::transport::{Address, AttachmentData, OutgoingMessage, SendError, Transport};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const TENANT: &str = "00000000-0000-0000-0000-000000000000";
const CLIENT: &str = "11111111-1111-1111-1111-111111111111";
const SECRET: &str = "emulator-client-secret";
const SENDER: &str = "alerts@contoso.com";

fn emulator_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MAILROOM_EMULATOR_BIN") {
        return PathBuf::from(path);
    }
    // This test runs from <target>/<profile>/deps/; the emulator is in <target>/<profile>/.
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target directory");
    profile_dir.join(format!("m365-emulator{}", std::env::consts::EXE_SUFFIX))
}

/// A running emulator, stopped when dropped.
struct Emulator {
    _child: Child,
    _state: tempfile::TempDir,
    url: String,
    admin: reqwest::Client,
    trust: TrustRoots,
}

impl Emulator {
    /// Starts an emulator with one app holding these application permissions.
    async fn start(roles: &[&str]) -> Self {
        mailroom::tls::install_crypto_provider();
        let binary = emulator_binary();
        assert!(binary.exists(), "{} is missing: build it with `cargo build -p m365-emulator`", binary.display());
        let state = tempfile::tempdir().expect("state dir");
        let child = Command::new(&binary)
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the emulator");
        // `url` is written after `ca.pem`, once the server accepts connections.
        let url_file = state.path().join("url");
        let mut url = String::new();
        for _ in 0..1200 {
            if let Ok(text) = std::fs::read_to_string(&url_file)
                && !text.trim().is_empty()
            {
                url = text.trim().to_string();
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!url.is_empty(), "the emulator did not start within 120 s");
        let ca = std::fs::read(state.path().join("ca.pem")).expect("ca.pem");
        let trust = TrustRoots::from_pem(&ca).expect("emulator CA");
        let admin = trust.http_client().expect("client");
        let emulator = Emulator { _child: child, _state: state, url, admin, trust };
        emulator
            .post(
                "/_emulator/apps",
                json!({"tenantId": TENANT, "clientId": CLIENT, "secrets": [SECRET],
                       "roles": roles}),
            )
            .await;
        emulator
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let response = self.admin.post(format!("{}{path}", self.url)).json(&body).send().await.expect("admin request");
        assert!(response.status().is_success(), "{path}: {}", response.status());
        response.json().await.unwrap_or(Value::Null)
    }

    async fn get(&self, path: &str) -> Value {
        self.admin
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("admin request")
            .json()
            .await
            .expect("admin JSON")
    }

    fn transport(&self, tokens: Arc<EmulatorTokens>, max_concurrent: usize) -> GraphTransport {
        let config = GraphConfig { endpoint: self.url.clone(), max_concurrent, ..GraphConfig::default() };
        let client = self.trust.http_client().expect("client");
        GraphTransport::new(config, tokens, client).expect("transport")
    }

    fn tokens(&self) -> Arc<EmulatorTokens> {
        Arc::new(EmulatorTokens {
            client: self.admin.clone(),
            token_url: format!("{}/{TENANT}/oauth2/v2.0/token", self.url),
            stale_first: false,
            invalidations: AtomicUsize::new(0),
        })
    }
}

/// Client credentials from the emulator's token endpoint, one request per call; with
/// `stale_first`, a token the emulator cannot accept until the first invalidation.
struct EmulatorTokens {
    client: reqwest::Client,
    token_url: String,
    stale_first: bool,
    invalidations: AtomicUsize,
}

#[async_trait]
impl TokenSource for EmulatorTokens {
    async fn token(&self) -> Result<AccessToken, AuthError> {
        if self.stale_first && self.invalidations.load(Ordering::SeqCst) == 0 {
            return Ok(AccessToken { secret: "not-a-token".into(), expires_at: Timestamp::now() });
        }
        let response = self
            .client
            .post(&self.token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT),
                ("client_secret", SECRET),
                ("scope", "https://graph.microsoft.com/.default"),
            ])
            .send()
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let body: Value = response.json().await.map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let secret =
            body["access_token"].as_str().ok_or_else(|| AuthError::Rejected(body["error_description"].to_string()))?;
        Ok(AccessToken { secret: secret.to_string(), expires_at: Timestamp::now() })
    }

    fn invalidate(&self) {
        self.invalidations.fetch_add(1, Ordering::SeqCst);
    }
}

fn address(email: &str, name: Option<&str>) -> Address {
    Address { name: name.map(str::to_string), email: email.to_string() }
}

fn message(id: &str) -> OutgoingMessage {
    OutgoingMessage {
        from: address(SENDER, None),
        to: vec![address("ops@contoso.com", Some("Ops Team"))],
        cc: vec![address("cc@contoso.com", None)],
        bcc: vec![address("audit@contoso.com", None)],
        reply_to: vec![],
        subject: "Deploy finished ✅".into(),
        text: Some("Version 1.4.2 is live.".into()),
        html: Some("<p>Version <b>1.4.2</b> is live.</p>".into()),
        attachments: vec![AttachmentData {
            name: "hello.txt".into(),
            content_type: "text/plain".into(),
            bytes: b"hello\n".to_vec(),
        }],
        headers: vec![("X-Pipeline-Run".into(), "1234".into())],
        importance: Importance::High,
        message_id: format!("<{id}@mailroom.dev>"),
    }
}

/// The one accepted message with this Message-ID.
async fn accepted(emulator: &Emulator, message_id: &str) -> Value {
    let messages = emulator.get("/_emulator/messages").await;
    let found: Vec<&Value> =
        messages.as_array().expect("message list").iter().filter(|m| m["messageId"] == message_id).collect();
    assert_eq!(found.len(), 1, "{messages:#}");
    found[0].clone()
}

fn addresses(list: &Value) -> Vec<&str> {
    list.as_array().expect("address list").iter().filter_map(|a| a["address"].as_str()).collect()
}

#[tokio::test]
async fn sends_json_and_mime_through_the_emulator() {
    let emulator = Emulator::start(&["Mail.Send"]).await;
    let transport = emulator.transport(emulator.tokens(), 4);

    // JSON sendMail.
    let msg = message("json-1");
    let delivered = transport.send(&msg).await.expect("sent as JSON");
    assert_eq!(delivered.response, "202 Accepted");
    let record = accepted(&emulator, &msg.message_id).await;
    assert_eq!(record["requestId"].as_str(), delivered.request_id.as_deref());
    assert_eq!(record["mode"], "json");
    assert_eq!(record["messageIdFromClient"], true);
    assert_eq!(record["sender"], SENDER);
    assert_eq!(record["subject"], "Deploy finished ✅");
    assert_eq!(record["bodyContentType"], "html");
    assert_eq!(record["importance"], "high");
    assert_eq!(addresses(&record["to"]), ["ops@contoso.com"]);
    assert_eq!(addresses(&record["cc"]), ["cc@contoso.com"]);
    assert_eq!(addresses(&record["bcc"]), ["audit@contoso.com"]);
    assert_eq!(record["headers"][0]["name"], "X-Pipeline-Run");
    assert_eq!(record["attachments"][0]["name"], "hello.txt");
    assert_eq!(record["saveToSentItems"], false);

    // Six custom headers: base64 MIME, Bcc recipients kept.
    let mut msg = message("mime-1");
    msg.headers = (0..6).map(|i| (format!("X-Custom-{i}"), i.to_string())).collect();
    transport.send(&msg).await.expect("sent as MIME");
    let record = accepted(&emulator, &msg.message_id).await;
    assert_eq!(record["mode"], "mime");
    assert_eq!(addresses(&record["bcc"]), ["audit@contoso.com"]);
}

fn with_large_attachment(id: &str) -> OutgoingMessage {
    let mut msg = message(id);
    msg.attachments.push(AttachmentData {
        name: "report.bin".into(),
        content_type: "application/octet-stream".into(),
        bytes: (0..5 * 1024 * 1024).map(|i| (i % 251) as u8).collect(),
    });
    msg
}

#[tokio::test]
async fn five_megabytes_go_through_a_draft_and_an_upload_session() {
    // Drafts need Mail.ReadWrite besides Mail.Send.
    let emulator = Emulator::start(&["Mail.Send", "Mail.ReadWrite"]).await;
    let transport = emulator.transport(emulator.tokens(), 4);
    let msg = with_large_attachment("draft-1");
    let delivered = transport.send(&msg).await.expect("sent as a draft");
    assert_eq!(delivered.response, "202 Accepted");
    let record = accepted(&emulator, &msg.message_id).await;
    assert_eq!(record["mode"], "draft");
    let mut sizes: Vec<(String, u64)> = record["attachments"]
        .as_array()
        .expect("attachments")
        .iter()
        .map(|a| (a["name"].as_str().unwrap_or("").to_string(), a["size"].as_u64().unwrap_or(0)))
        .collect();
    sizes.sort();
    assert_eq!(sizes, [("hello.txt".to_string(), 6), ("report.bin".to_string(), 5_242_880)]);
}

#[tokio::test]
async fn a_draft_without_mail_read_write_says_so() {
    let emulator = Emulator::start(&["Mail.Send"]).await;
    let transport = emulator.transport(emulator.tokens(), 4);

    let err = transport.send(&with_large_attachment("draft-2")).await.unwrap_err();

    assert!(!err.is_transient(), "{err:?}");
    let reason = err.to_string();
    assert!(reason.starts_with("creating the draft: Graph 403 ErrorAccessDenied"), "{reason}");
    assert!(reason.contains("Mail.ReadWrite"), "{reason}");
}

#[tokio::test]
async fn a_refused_token_is_replaced_once() {
    let emulator = Emulator::start(&["Mail.Send"]).await;
    let tokens =
        Arc::new(EmulatorTokens { stale_first: true, ..Arc::into_inner(emulator.tokens()).expect("sole owner") });
    let transport = emulator.transport(tokens.clone(), 4);

    let msg = message("refresh-1");
    transport.send(&msg).await.expect("sent with a fresh token");

    assert_eq!(tokens.invalidations.load(Ordering::SeqCst), 1);
    accepted(&emulator, &msg.message_id).await;
}

#[tokio::test]
async fn injected_errors_are_classified() {
    let emulator = Emulator::start(&["Mail.Send"]).await;
    let transport = emulator.transport(emulator.tokens(), 4);

    emulator
        .post("/_emulator/faults", json!({"target": "graph", "status": 503, "count": 1, "retryAfterSeconds": 9}))
        .await;
    let err = transport.send(&message("fault-1")).await.unwrap_err();
    let SendError::Transient { retry_after, .. } = &err else {
        panic!("503 must be transient: {err:?}");
    };
    assert_eq!(*retry_after, Some(Duration::from_secs(9)));

    emulator
        .post("/_emulator/faults", json!({"target": "graph", "status": 403, "count": 1, "code": "ErrorSendAsDenied"}))
        .await;
    let err = transport.send(&message("fault-2")).await.unwrap_err();
    assert!(!err.is_transient(), "{err:?}");
    assert!(err.to_string().starts_with("Graph 403 ErrorSendAsDenied"), "{err}");
    assert!(err.to_string().contains("request-id"), "{err}");
}

#[tokio::test]
async fn the_mailbox_limit_keeps_the_emulator_from_throttling() {
    let emulator = Emulator::start(&["Mail.Send"]).await;
    let transport = Arc::new(emulator.transport(emulator.tokens(), 4));
    // Slow answers so that sends pile up; more than 4 in flight would get 429s.
    emulator.post("/_emulator/faults", json!({"target": "graph", "latencyMs": 300, "count": 10})).await;

    let sends = (0..10).map(|i| {
        let transport = transport.clone();
        tokio::spawn(async move { transport.send(&message(&format!("burst-{i}"))).await })
    });
    for send in futures::future::join_all(sends).await {
        send.expect("task").expect("sent without a 429");
    }

    let stats = emulator.get("/_emulator/stats").await;
    assert_eq!(stats["concurrencyThrottled"], 0, "{stats:#}");
    assert_eq!(stats["maxInFlightPerMailbox"][SENDER], 4, "{stats:#}");
}
