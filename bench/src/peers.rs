//! The processes a run needs: the SMTP test server, the Microsoft 365 emulator and the operator.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::BenchError;

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Process {
    child: Child,
    /// What it is, for messages.
    pub name: &'static str,
    /// Its combined output.
    pub log: PathBuf,
}

impl Process {
    /// Starts `program` with `args`, output to `log`.
    pub fn spawn(
        name: &'static str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> Result<Process, BenchError> {
        let out = std::fs::File::create(&log).map_err(|e| BenchError::io(&log, e))?;
        let err = out.try_clone().map_err(|e| BenchError::io(&log, e))?;
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| BenchError::Start(format!("{name} ({}): {e}", program.display())))?;
        Ok(Process { child, name, log })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when it exited.
    pub fn check_alive(&mut self) -> Result<(), BenchError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                Err(BenchError::Start(format!("{} exited ({status}); see {}", self.name, self.log.display())))
            }
            Err(e) => Err(BenchError::Start(format!("{}: {e}", self.name))),
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let start = Instant::now();
        while start.elapsed() < grace {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// /proc/PID/status.
    pub fn proc_status(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default()
    }

    /// /proc/PID/stat.
    pub fn proc_stat(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// Waits until `path` exists with content; the process must stay alive meanwhile.
pub async fn wait_for_file(process: &mut Process, path: &Path, timeout: Duration) -> Result<String, BenchError> {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && !text.trim().is_empty()
        {
            return Ok(text);
        }
        process.check_alive()?;
        if start.elapsed() > timeout {
            return Err(BenchError::Start(format!("{} wrote no {} within {timeout:?}", process.name, path.display())));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The SMTP test server, a plain relay.
pub struct SmtpPeer {
    /// The process, stopped when this is dropped.
    _process: Process,
    /// Its SMTP port.
    pub smtp_port: u16,
    control: String,
    http: reqwest::Client,
}

impl SmtpPeer {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self._process.pid()
    }

    /// Starts tests/peers/smtp_server.py with `python` in `dir`.
    pub async fn start(python: &Path, repo: &Path, dir: &Path) -> Result<SmtpPeer, BenchError> {
        // A fresh state directory: an earlier run's messages and ready.json must not count.
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
        let args = vec![
            repo.join("tests/peers/smtp_server.py").display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--state-dir".into(),
            dir.display().to_string(),
            "--log-level".into(),
            "WARNING".into(),
        ];
        let mut process = Process::spawn("SMTP test server", python, &args, &[], dir.join("server.log"))?;
        let ready: Value =
            serde_json::from_str(&wait_for_file(&mut process, &dir.join("ready.json"), Duration::from_secs(30)).await?)
                .map_err(|e| BenchError::Peer(format!("ready.json: {e}")))?;
        let port = |k: &str| {
            ready[k].as_u64().map(|p| p as u16).ok_or_else(|| BenchError::Peer(format!("ready.json has no {k}")))
        };
        Ok(SmtpPeer {
            smtp_port: port("smtp_port")?,
            control: format!("http://127.0.0.1:{}", port("control_port")?),
            _process: process,
            http: reqwest::Client::new(),
        })
    }

    /// Forgets the stored messages and counters.
    pub async fn reset(&self) -> Result<(), BenchError> {
        self.http.post(format!("{}/reset", self.control)).send().await?.error_for_status()?;
        Ok(())
    }

    /// The Message-IDs of the stored messages.
    pub async fn message_ids(&self) -> Result<Vec<String>, BenchError> {
        let v: Value =
            self.http.get(format!("{}/messages", self.control)).send().await?.error_for_status()?.json().await?;
        Ok(ids(&v, "message_id"))
    }
}

/// The Microsoft 365 emulator.
pub struct Emulator {
    /// The process, stopped when this is dropped.
    _process: Process,
    /// Authority host and Graph endpoint.
    pub url: String,
    /// Its CA certificate (PEM file).
    pub ca: PathBuf,
    http: reqwest::Client,
}

impl Emulator {
    /// The emulator's process id.
    pub fn pid(&self) -> u32 {
        self._process.pid()
    }

    /// Starts the emulator binary in `dir`, reusing `signing_key` (made once, then shared).
    pub async fn start(bin: &Path, dir: &Path, signing_key: Option<&Path>) -> Result<Emulator, BenchError> {
        std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
        let _ = std::fs::remove_file(dir.join("url"));
        let mut args =
            vec!["--listen".to_string(), "127.0.0.1:0".into(), "--state-dir".into(), dir.display().to_string()];
        if let Some(key) = signing_key {
            args.extend(["--signing-key".into(), key.display().to_string()]);
        }
        let mut process =
            Process::spawn("Microsoft 365 emulator", bin, &args, &[("RUST_LOG", "warn")], dir.join("emulator.log"))?;
        let url = wait_for_file(&mut process, &dir.join("url"), Duration::from_secs(120)).await?.trim().to_string();
        let ca = dir.join("ca.pem");
        let pem = std::fs::read(&ca).map_err(|e| BenchError::io(&ca, e))?;
        let http = mailroom::tls::TrustRoots::from_pem(&pem)
            .and_then(|t| t.http_client())
            .map_err(|e| BenchError::Peer(format!("emulator CA: {e}")))?;
        Ok(Emulator { _process: process, url, ca, http })
    }

    async fn admin(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value, BenchError> {
        let mut req = self.http.request(method, format!("{}/_emulator{path}", self.url));
        if let Some(body) = body {
            req = req.json(body);
        }
        let text = req.send().await?.error_for_status()?.text().await?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Forgets apps, messages, token requests and counters, then registers the benchmark's app.
    pub async fn reset(&self, app: &Value) -> Result<(), BenchError> {
        self.admin(reqwest::Method::POST, "/reset", None).await?;
        self.admin(reqwest::Method::POST, "/apps", Some(app)).await?;
        Ok(())
    }

    /// The counters (`tokenRequests`, `graphRequests`, `concurrencyThrottled`, ...).
    pub async fn stats(&self) -> Result<Value, BenchError> {
        self.admin(reqwest::Method::GET, "/stats", None).await
    }

    /// Token requests so far.
    pub async fn token_requests(&self) -> Result<usize, BenchError> {
        Ok(self.admin(reqwest::Method::GET, "/token-requests", None).await?.as_array().map_or(0, Vec::len))
    }

    /// The Message-IDs of the accepted messages.
    pub async fn message_ids(&self) -> Result<Vec<String>, BenchError> {
        Ok(ids(&self.admin(reqwest::Method::GET, "/messages", None).await?, "messageId"))
    }
}

fn ids(list: &Value, field: &str) -> Vec<String> {
    list.as_array()
        .map(|items| items.iter().filter_map(|m| m[field].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}
