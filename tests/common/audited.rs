//! A private control plane with an audit log of requests on Secrets (`hack/testenv.sh` with
//! `MAILROOM_TESTENV_AUDIT=1`), and the operator's own ServiceAccount identity in it.

use std::path::{Path, PathBuf};
use std::process::Command;

use kube::Client;
use kube::config::{Config, KubeConfigOptions, Kubeconfig};
use serde_json::Value;

use super::repo_root;

/// The ServiceAccount the operator runs as (deploy/base).
pub const OPERATOR_USER: &str = "system:serviceaccount:mailroom-system:mailroom";

/// A control plane of one test, stopped and removed when dropped.
pub struct AuditedControlPlane {
    /// Its state directory.
    pub dir: PathBuf,
    kubectl: PathBuf,
}

fn testenv(dir: &Path, cmd: &str) -> std::process::Output {
    Command::new("bash")
        .arg(repo_root().join("hack/testenv.sh"))
        .arg(cmd)
        .env("MAILROOM_TESTENV_DIR", dir)
        .env("MAILROOM_TESTENV_AUDIT", "1")
        .output()
        .expect("run hack/testenv.sh")
}

impl AuditedControlPlane {
    /// Starts etcd and kube-apiserver with the audit log, installs the CRDs, and the operator's
    /// namespace, ServiceAccount and RBAC exactly as deploy/base declares them.
    pub fn start(test: &str) -> AuditedControlPlane {
        let dir =
            repo_root().join(format!("target/testenv-{test}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
        let out = testenv(&dir, "up");
        assert!(out.status.success(), "testenv up failed: {}", String::from_utf8_lossy(&out.stderr));
        let env = std::fs::read_to_string(dir.join("testenv.env")).expect("testenv.env");
        let bin = env
            .lines()
            .find_map(|l| l.strip_prefix("MAILROOM_TESTENV_BIN="))
            .map(|v| v.trim_matches('\'').to_string())
            .expect("MAILROOM_TESTENV_BIN in testenv.env");
        let plane = AuditedControlPlane { dir, kubectl: PathBuf::from(bin).join("kubectl") };
        for file in [
            "crds/mailroom.dev.yaml",
            "deploy/base/namespace.yaml",
            "deploy/base/serviceaccount.yaml",
            "deploy/base/rbac.yaml",
        ] {
            plane.kubectl_ok(&["apply", "--server-side", "-f", &repo_root().join(file).display().to_string()]);
        }
        plane.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/mailprofiles.mailroom.dev",
            "crd/clustermailprofiles.mailroom.dev",
            "crd/emailmessages.mailroom.dev",
        ]);
        plane
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Runs kubectl as admin and returns its stdout; panics on failure.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = Command::new(&self.kubectl)
            .arg(format!("--kubeconfig={}", self.kubeconfig().display()))
            .args(args)
            .output()
            .expect("run kubectl");
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// An admin client.
    pub async fn client(&self) -> Client {
        mailroom::tls::install_crypto_provider();
        let kc = Kubeconfig::read_from(self.kubeconfig()).expect("kubeconfig");
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("config");
        Client::try_from(config).expect("client")
    }

    /// A kubeconfig for the operator's ServiceAccount, with a token the API server issued.
    pub fn operator_kubeconfig(&self) -> PathBuf {
        let token = self.kubectl_ok(&["create", "token", "mailroom", "-n", "mailroom-system", "--duration=1h"]);
        let admin: Value =
            serde_yaml::from_str(&std::fs::read_to_string(self.kubeconfig()).expect("read kubeconfig")).expect("YAML");
        let cluster = admin["clusters"][0]["cluster"].clone();
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": cluster}],
            "users": [{"name": "mailroom", "user": {"token": token.trim()}}],
            "contexts": [{"name": "operator", "context": {"cluster": "test", "user": "mailroom"}}],
            "current-context": "operator",
        });
        let path = self.dir.join("operator-kubeconfig");
        std::fs::write(&path, serde_yaml::to_string(&config).expect("YAML")).expect("write kubeconfig");
        path
    }

    /// Every audit event so far (requests on Secrets).
    pub fn audit_events(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("logs/audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for AuditedControlPlane {
    fn drop(&mut self) {
        let _ = testenv(&self.dir, "down");
    }
}
