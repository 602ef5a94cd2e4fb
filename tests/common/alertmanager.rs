//! A real Alertmanager (built from the Go module proxy by hack/prom-tools.sh) for the tests:
//! loopback only, no clustering, its configuration and storage in a temporary directory.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::repo_root;

const WAIT: Duration = Duration::from_secs(180);

/// The alertmanager binary: `MAILROOM_ALERTMANAGER`, or the one hack/prom-tools.sh builds.
pub fn alertmanager_bin() -> PathBuf {
    if let Ok(path) = std::env::var("MAILROOM_ALERTMANAGER") {
        return PathBuf::from(path);
    }
    let out = Command::new("bash")
        .arg(repo_root().join("hack/prom-tools.sh"))
        .arg("alertmanager")
        .stderr(Stdio::inherit())
        .output()
        .expect("run hack/prom-tools.sh");
    assert!(out.status.success(), "hack/prom-tools.sh could not build alertmanager");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8");
    PathBuf::from(stdout.lines().last().expect("the script prints the path").trim())
}

/// A free TCP port on 127.0.0.1 (the kernel picks it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// One Alertmanager process.
pub struct Alertmanager {
    child: Child,
    /// Its directory (configuration, storage, and any file the configuration names).
    pub dir: tempfile::TempDir,
    /// Its API's base URL.
    pub url: String,
    log: PathBuf,
}

impl Alertmanager {
    /// Starts Alertmanager with the configuration `config(dir)` returns for its directory, and
    /// waits until it is ready.
    pub async fn start(test: &str, config: impl FnOnce(&std::path::Path) -> String) -> Alertmanager {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = config(dir.path());
        let config_file = dir.path().join("alertmanager.yml");
        std::fs::write(&config_file, config).expect("config");
        let logs = repo_root().join("target/test-logs");
        std::fs::create_dir_all(&logs).expect("log dir");
        let log = logs.join(format!("{test}-alertmanager.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let port = free_port();
        let child = Command::new(alertmanager_bin())
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            // No gossip: an empty cluster address turns the HA cluster off.
            .arg("--cluster.listen-address=")
            .arg("--log.level=debug")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .expect("start alertmanager");
        let am = Alertmanager { child, dir, url: format!("http://127.0.0.1:{port}"), log };
        let start = Instant::now();
        loop {
            let ready = super::http().get(format!("{}/-/ready", am.url)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return am;
            }
            assert!(start.elapsed() < WAIT, "alertmanager did not become ready:\n{}", am.log_text());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `POST /api/v2/alerts`, as Prometheus sends them.
    pub async fn post_alerts(&self, alerts: &Value) {
        let resp = super::http()
            .post(format!("{}/api/v2/alerts", self.url))
            .json(alerts)
            .send()
            .await
            .expect("alertmanager answers");
        let status = resp.status();
        assert!(status.is_success(), "POST /api/v2/alerts: {status} {}", resp.text().await.unwrap_or_default());
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
