//! Flux's real notification-controller (built from the Go module proxy by hack/gitops-tools.sh)
//! for the tests: its CRDs from the same module, the controller against the test API server
//! (the admin kubeconfig), every address on loopback, no leader election, no metrics listener.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::repo_root;

const WAIT: Duration = Duration::from_secs(180);

/// The notification-controller binary: `MAILROOM_NOTIFICATION_CONTROLLER`, or the one
/// hack/gitops-tools.sh builds.
pub fn notification_controller_bin() -> PathBuf {
    if let Ok(path) = std::env::var("MAILROOM_NOTIFICATION_CONTROLLER") {
        return PathBuf::from(path);
    }
    let out = Command::new("bash")
        .arg(repo_root().join("hack/gitops-tools.sh"))
        .arg("notification-controller")
        .stderr(Stdio::inherit())
        .output()
        .expect("run hack/gitops-tools.sh");
    assert!(out.status.success(), "hack/gitops-tools.sh could not build notification-controller");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8");
    PathBuf::from(stdout.lines().last().expect("the script prints the path").trim())
}

/// Applies the controller's CRDs (Alert, Provider, Receiver: config/crd/bases of the pinned
/// module, copied beside the binary) and waits until the API server serves them.
pub fn install_crds(bin: &Path) {
    let dir = bin.parent().expect("the binary's directory").join("crds");
    let dir = dir.to_str().expect("a UTF-8 path");
    let applied = super::kubectl(&["apply", "--server-side", "--force-conflicts", "-f", dir]);
    assert!(applied.status.success(), "kubectl apply: {}", String::from_utf8_lossy(&applied.stderr));
    let established = super::kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=120s",
        "crd/alerts.notification.toolkit.fluxcd.io",
        "crd/providers.notification.toolkit.fluxcd.io",
        "crd/receivers.notification.toolkit.fluxcd.io",
    ]);
    assert!(established.status.success(), "kubectl wait: {}", String::from_utf8_lossy(&established.stderr));
}

/// A free TCP port on 127.0.0.1 (the kernel picks it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// One notification-controller process, watching every namespace.
pub struct NotificationController {
    child: Child,
    /// The event server's URL, where Flux's controllers post their events (`--events-addr`).
    pub events_url: String,
    log: PathBuf,
}

impl NotificationController {
    /// Installs the CRDs, starts the controller with `extra` flags, and waits until its health
    /// endpoint is ready and its event server accepts connections.
    pub async fn start(test: &str, extra: &[&str]) -> NotificationController {
        let bin = notification_controller_bin();
        install_crds(&bin);
        let logs = repo_root().join("target/test-logs");
        std::fs::create_dir_all(&logs).expect("log dir");
        let log = logs.join(format!("{test}-notification-controller.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let (events, receiver, health) = (free_port(), free_port(), free_port());
        super::required_env("KUBECONFIG");
        let child = Command::new(&bin)
            .arg(format!("--events-addr=127.0.0.1:{events}"))
            .arg(format!("--receiverAddr=127.0.0.1:{receiver}"))
            .arg(format!("--health-addr=127.0.0.1:{health}"))
            // "0" turns controller-runtime's metrics listener off.
            .arg("--metrics-addr=0")
            .arg("--enable-leader-election=false")
            .arg("--log-encoding=console")
            .arg("--log-level=debug")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .expect("start notification-controller");
        let nc = NotificationController { child, events_url: format!("http://127.0.0.1:{events}/"), log };
        let start = Instant::now();
        loop {
            let ready = super::http().get(format!("http://127.0.0.1:{health}/readyz")).send().await;
            let listening = std::net::TcpStream::connect(("127.0.0.1", events)).is_ok();
            if listening && ready.is_ok_and(|r| r.status().is_success()) {
                return nc;
            }
            assert!(start.elapsed() < WAIT, "notification-controller did not become ready:\n{}", nc.log_text());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Posts an event the way Flux's controllers do (fluxcd/pkg, runtime/events/recorder.go,
    /// `Recorder.AnnotatedEventf`: `json.Marshal` of an `eventv1.Event`, then
    /// `Client.Post(webhook, "application/json", body)`), and returns the HTTP status.
    pub async fn post_event(&self, event: &serde_json::Value) -> u16 {
        let body = serde_json::to_vec(event).expect("JSON");
        let resp = super::http()
            .post(&self.events_url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("the event server answers");
        resp.status().as_u16()
    }
}

impl Drop for NotificationController {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
