//! The SMTP test server (tests/peers/smtp_server.py, aiosmtpd) as a child process.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{repo_root, required_env, wait_for_file};

/// A running SMTP test server.
pub struct SmtpPeer {
    child: Child,
    /// Its state directory (messages/, ca.pem).
    pub dir: tempfile::TempDir,
    /// The SMTP port on 127.0.0.1.
    pub smtp_port: u16,
    /// The control API port on 127.0.0.1.
    pub control_port: u16,
}

impl SmtpPeer {
    /// Starts the server with extra flags (e.g. `--self-signed`, `--auth-user`).
    pub fn start(args: &[&str]) -> SmtpPeer {
        SmtpPeer::start_listening("127.0.0.1", args)
    }

    /// Starts one whose SMTP port listens on `ip` (a private address the test environment made,
    /// such as the one a local cluster's Pods reach the host on); the control API stays on
    /// loopback, and `--self-signed` certificates name `ip`.
    pub fn start_on(ip: &str, args: &[&str]) -> SmtpPeer {
        let mut all = vec!["--allow-private"];
        all.extend_from_slice(args);
        SmtpPeer::start_listening(ip, &all)
    }

    fn start_listening(ip: &str, args: &[&str]) -> SmtpPeer {
        let python = required_env("MAILROOM_PYTHON");
        let dir = tempfile::tempdir().expect("temp dir");
        let log = std::fs::File::create(dir.path().join("server.log")).expect("log");
        let child = Command::new(python)
            .arg(repo_root().join("tests/peers/smtp_server.py"))
            .arg("--listen")
            .arg(format!("{ip}:0"))
            .arg("--state-dir")
            .arg(dir.path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the SMTP test server");
        let ready: Value =
            serde_json::from_str(&wait_for_file(&dir.path().join("ready.json"), Duration::from_secs(30)))
                .expect("ready.json is JSON");
        SmtpPeer {
            child,
            smtp_port: ready["smtp_port"].as_u64().expect("smtp_port") as u16,
            control_port: ready["control_port"].as_u64().expect("control_port") as u16,
            dir,
        }
    }

    /// The CA that signs its certificate (with `--self-signed`).
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.control_port)
    }

    /// Scripts its behaviour (see tests/peers/README.md).
    pub async fn script(&self, body: Value) {
        let resp = super::http().post(self.url("/script")).json(&body).send().await.expect("control API");
        assert!(resp.status().is_success(), "script refused: {}", resp.text().await.unwrap_or_default());
    }

    /// The envelopes of the accepted messages.
    pub async fn messages(&self) -> Vec<Value> {
        let v: Value =
            super::http().get(self.url("/messages")).send().await.expect("control API").json().await.expect("JSON");
        match v {
            Value::Array(items) => items,
            Value::Object(mut o) => o.remove("messages").and_then(|m| m.as_array().cloned()).unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// The counters: `connections`, `accepted`, `dropped`, `rejected`, ...
    pub async fn stats(&self) -> Value {
        super::http().get(self.url("/stats")).send().await.expect("control API").json().await.expect("JSON")
    }

    /// Waits until at least `n` messages were accepted.
    pub async fn wait_messages(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let start = std::time::Instant::now();
        loop {
            let all = self.messages().await;
            if all.len() >= n {
                return all;
            }
            assert!(start.elapsed() < timeout, "only {} of {n} messages arrived within {timeout:?}", all.len());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The raw bytes of an accepted message, by its envelope.
    pub fn raw(&self, envelope: &Value) -> Vec<u8> {
        let path = envelope["eml_path"]
            .as_str()
            .or_else(|| envelope["eml"].as_str())
            .map(PathBuf::from)
            .expect("envelope names its .eml file");
        std::fs::read(path).expect("read .eml")
    }
}

impl Drop for SmtpPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
