//! The Microsoft 365 emulator (`m365-emulator`) as a child process, and its admin API.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{repo_root, required_env};

/// A running emulator, stopped when dropped.
pub struct Emulator {
    child: Child,
    /// Its state directory (`url`, `ca.pem`).
    pub dir: tempfile::TempDir,
    /// `https://127.0.0.1:PORT`, both the authority host and the Graph endpoint.
    pub url: String,
    /// Its log (stderr), in target/test-logs.
    pub log: PathBuf,
    http: reqwest::Client,
}

/// One RSA signing key for every emulator the tests start: generating one at each start takes
/// seconds in a debug build. Made with openssl once, then shared through target/.
fn signing_key() -> Option<PathBuf> {
    static KEY: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut key = KEY.lock().unwrap_or_else(|e| e.into_inner());
    if key.is_some() {
        return key.clone();
    }
    let path = repo_root().join("target/test-emulator-signing-key.pem");
    if !path.exists() {
        // Another test process may be writing it too: each writes its own file and renames it.
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        let made = Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
            .arg(&tmp)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !made || std::fs::rename(&tmp, &path).is_err() {
            // Without openssl the emulator makes a key itself, slower but correct.
            let _ = std::fs::remove_file(&tmp);
            return None;
        }
    }
    *key = Some(path);
    key.clone()
}

/// A self-signed RSA certificate and its PKCS#8 key (PEM), made with openssl.
pub fn rsa_certificate(dir: &Path, name: &str) -> (String, String) {
    let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj"])
        .arg(format!("/CN={name}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl on PATH");
    assert!(status.success(), "openssl could not make a certificate");
    (std::fs::read_to_string(cert).expect("certificate"), std::fs::read_to_string(key).expect("key"))
}

impl Emulator {
    /// Starts `$MAILROOM_EMULATOR_BIN --listen 127.0.0.1:0 --state-dir DIR` and waits for `DIR/url`.
    pub async fn start(test: &str) -> Emulator {
        Emulator::start_with(test, &[]).await
    }

    /// Starts an emulator of one of Microsoft's national clouds (`--cloud USGovernment`, ...).
    pub async fn start_in_cloud(test: &str, cloud: &str) -> Emulator {
        Emulator::start_with(test, &["--cloud", cloud]).await
    }

    /// Starts one listening on `ip` (a private address the test environment made, such as the one
    /// a local cluster's Pods reach the host on); its certificate names that address.
    pub async fn start_on(test: &str, ip: &str) -> Emulator {
        Emulator::start_listening(test, &format!("{ip}:0"), &["--allow-private"]).await
    }

    async fn start_with(test: &str, args: &[&str]) -> Emulator {
        Emulator::start_listening(test, "127.0.0.1:0", args).await
    }

    async fn start_listening(test: &str, listen: &str, args: &[&str]) -> Emulator {
        mailroom::tls::install_crypto_provider();
        let bin = required_env("MAILROOM_EMULATOR_BIN");
        let dir = tempfile::tempdir().expect("emulator state dir");
        let logs = repo_root().join("target/test-logs");
        std::fs::create_dir_all(&logs).expect("log dir");
        let log = logs.join(format!("{test}-emulator-{}.log", uuid::Uuid::new_v4().simple()));
        let out = std::fs::File::create(&log).expect("emulator log");
        let mut command = Command::new(bin);
        command.args(["--listen", listen, "--state-dir"]).arg(dir.path()).args(args);
        if let Some(key) = signing_key() {
            command.arg("--signing-key").arg(key);
        }
        let child = command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("emulator log"))
            .stderr(out)
            .spawn()
            .expect("start the emulator");
        // `url` is written after `ca.pem`, once the server accepts connections.
        let url_file = dir.path().join("url");
        let start = Instant::now();
        let url = loop {
            if let Ok(text) = std::fs::read_to_string(&url_file)
                && !text.trim().is_empty()
            {
                break text.trim().to_string();
            }
            assert!(start.elapsed() < Duration::from_secs(60), "the emulator did not start; see {}", log.display());
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let ca = std::fs::read(dir.path().join("ca.pem")).expect("ca.pem");
        let http = mailroom::tls::TrustRoots::from_pem(&ca).expect("emulator CA").http_client().expect("client");
        Emulator { child, dir, url, log, http }
    }

    /// The CA that signed the emulator's certificate (PEM file).
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// `{url}/_emulator/introspect`, for the SMTP test server's XOAUTH2.
    pub fn introspect_url(&self) -> String {
        format!("{}/_emulator/introspect", self.url)
    }

    async fn post(&self, path: &str, body: &Value) -> Value {
        let response =
            self.http.post(format!("{}/_emulator{path}", self.url)).json(body).send().await.expect("admin request");
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert!(status.is_success(), "POST /_emulator{path}: {status}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    async fn get(&self, path: &str) -> Value {
        let response = self.http.get(format!("{}/_emulator{path}", self.url)).send().await.expect("admin request");
        assert!(response.status().is_success(), "GET /_emulator{path}: {}", response.status());
        response.json().await.expect("admin JSON")
    }

    /// Registers (or replaces) an app: `{"tenantId","clientId","secrets","certificates",
    /// "federated","roles","tokenLifetimeSeconds","allowedMailboxes"}`.
    pub async fn register_app(&self, app: Value) -> Value {
        self.post("/apps", &app).await
    }

    /// Assigns an Exchange Online RBAC for Applications role (`New-ManagementRoleAssignment`):
    /// `{"tenantId","servicePrincipalObjectId","role","mailboxes"}`.
    pub async fn assign_role(&self, assignment: Value) -> Value {
        self.post("/role-assignments", &assignment).await
    }

    /// Injects a fault: `{"target":"token"|"graph","status","count","retryAfterSeconds","latencyMs"}`.
    pub async fn fault(&self, fault: Value) -> Value {
        self.post("/faults", &fault).await
    }

    /// The accepted messages, oldest first.
    pub async fn messages(&self) -> Vec<Value> {
        array(self.get("/messages").await)
    }

    /// The token requests, oldest first (never secrets).
    pub async fn token_requests(&self) -> Vec<Value> {
        array(self.get("/token-requests").await)
    }

    /// The pending faults, each with `remaining`, `injected` and `seen`.
    pub async fn fault_list(&self) -> Vec<Value> {
        array(self.get("/faults").await)
    }

    /// The counters: `tokenRequests`, `graphRequests` (by status), `messagesAccepted`, ...
    pub async fn stats(&self) -> Value {
        self.get("/stats").await
    }

    /// Waits until at least `n` messages were accepted.
    pub async fn wait_messages(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let all = self.messages().await;
            if all.len() >= n {
                return all;
            }
            assert!(start.elapsed() < timeout, "only {} of {n} messages accepted within {timeout:?}", all.len());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the token requests satisfy `done`, and returns them.
    pub async fn wait_token_requests(&self, timeout: Duration, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let all = self.token_requests().await;
            if done(&all) {
                return all;
            }
            assert!(start.elapsed() < timeout, "token requests not as expected within {timeout:?}: {all:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn array(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) => items,
        other => panic!("expected a JSON array, got {other}"),
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `pems` one after the other into `path` (an operator `--ca-bundle` trusting several CAs).
pub fn concat_pems(path: &Path, pems: &[PathBuf]) {
    let mut all = Vec::new();
    for pem in pems {
        all.extend(std::fs::read(pem).expect("read PEM"));
        all.push(b'\n');
    }
    std::fs::write(path, all).expect("write the CA bundle");
}

impl Emulator {
    /// The access tokens the emulator issued (`GET /_emulator/issued-tokens`), oldest first.
    pub async fn get_issued_tokens(&self) -> Vec<Value> {
        array(self.get("/issued-tokens").await)
    }
}
