//! Argo CD Notifications' own engine (github.com/argoproj/notifications-engine, in
//! tools/argocd-notify, built from the Go module proxy by hack/gitops-tools.sh) in front of
//! mailroom's Argo CD receiver: the shipped deploy/argocd/argocd-notifications-cm.yaml (only its
//! webhook URL pointed at the test's route) and an argocd-notifications-secret holding the
//! route's token. For an Application whose sync failed and whose health is Degraded, the engine
//! evaluates the three shipped triggers, renders the two that fire with the shipped templates and
//! posts them through its webhook service; each becomes an EmailMessage that is Sent through the
//! SMTP test server. The same notifications sent again create nothing new; a wrong token gets
//! 401, creates nothing, and the engine reports the failure.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::smtp_peer::SmtpPeer;
use common::{create_yaml, phase, repo_root};
use kube::Api;
use kube::api::ListParams;
use mail_parser::MessageParser;
use mailroom::api::{AlertRoute, EmailMessage, Importance, Phase};
use serde_json::Value;

/// Polls get a generous deadline: the machine may be busy; nothing here is timed.
const WAIT: Duration = Duration::from_secs(180);
const TOKEN: &str = "argocd-route-token-3e8a51c0d9";
/// The route URL in the shipped ConfigMap, which the test replaces with its own.
const SHIPPED_URL: &str = "url: https://mailroom-alerts.mailroom-system.svc:8082/alerts/team-a/deploys";
const TRIGGERS: [&str; 3] = ["on-mailroom-sync-succeeded", "on-mailroom-sync-failed", "on-mailroom-health-degraded"];

/// An Application as Argo CD's API serves it: a sync that failed, health Degraded.
const APPLICATION: &str = r#"
apiVersion: argoproj.io/v1alpha1
kind: Application
metadata: {name: guestbook, namespace: argocd}
spec:
  project: default
  source: {repoURL: "https://git.contoso.com/platform/guestbook.git", path: guestbook, targetRevision: HEAD}
  destination: {server: "https://kubernetes.default.svc", namespace: guestbook}
status:
  sync: {status: OutOfSync, revision: 4e9c917f1c3b2a0d5e6f7a8b9c0d1e2f3a4b5c6d}
  health: {status: Degraded}
  reconciledAt: "2026-10-14T08:20:10Z"
  operationState:
    phase: Failed
    message: 'one or more objects failed to apply, reason: Deployment.apps "guestbook-ui" is invalid'
    startedAt: "2026-10-14T08:20:01Z"
    finishedAt: "2026-10-14T08:20:09Z"
    syncResult: {revision: 4e9c917f1c3b2a0d5e6f7a8b9c0d1e2f3a4b5c6d}
"#;

/// The argocd-notify binary: `MAILROOM_ARGOCD_NOTIFY`, or the one hack/gitops-tools.sh builds.
fn argocd_notify_bin() -> std::path::PathBuf {
    if let Ok(path) = std::env::var("MAILROOM_ARGOCD_NOTIFY") {
        return path.into();
    }
    let out = Command::new("bash")
        .arg(repo_root().join("hack/gitops-tools.sh"))
        .arg("argocd-notify")
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run hack/gitops-tools.sh");
    assert!(out.status.success(), "hack/gitops-tools.sh could not build argocd-notify");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8");
    stdout.lines().last().expect("the script prints the path").trim().into()
}

/// Runs the engine over the three shipped triggers with the ConfigMap in `dir` and a Secret
/// holding `token`; returns whether it succeeded and its JSON line per trigger.
fn notify(dir: &Path, token: &str) -> (bool, Vec<Value>) {
    let secret = dir.join("secret.yaml");
    std::fs::write(
        &secret,
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: argocd-notifications-secret, namespace: argocd}}\nstringData: {{mailroom-token: \"{token}\"}}\n"
        ),
    )
    .expect("secret");
    let mut cmd = Command::new(argocd_notify_bin());
    // The receiver's CA: Go reads extra roots from SSL_CERT_FILE (Argo CD itself takes them from
    // argocd-tls-certs-cm, which deploy/argocd ships).
    cmd.env("SSL_CERT_FILE", common::receiver::testdata("ca.crt"));
    cmd.arg("--config").arg(dir.join("cm.yaml")).arg("--secret").arg(&secret).arg("--app").arg(dir.join("app.yaml"));
    for trigger in TRIGGERS {
        cmd.args(["--trigger", trigger]);
    }
    let out = cmd.output().expect("run argocd-notify");
    let lines = String::from_utf8(out.stdout)
        .expect("UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    (out.status.success(), lines)
}

async fn route_messages(api: &Api<EmailMessage>) -> Vec<EmailMessage> {
    api.list(&ListParams::default().labels("mailroom.dev/alert-route=deploys")).await.expect("list").items
}

async fn wait_counts(client: &kube::Client, ns: &str, counts: (i64, i64, i64)) -> AlertRoute {
    let api: Api<AlertRoute> = Api::namespaced(client.clone(), ns);
    common::wait_for(&api, "deploys", WAIT, |r| {
        r.status.as_ref().is_some_and(|s| (s.received, s.created, s.rejected) == counts)
    })
    .await
}

#[tokio::test]
async fn notifications_engine_renders_the_shipped_templates_and_each_notification_is_sent_once() {
    let client = common::client().await;
    let ns = common::namespace(&client, "argocd", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let (_op, base) = common::receiver::start_operator(&client, "argocd", &ns, &[]).await;
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    create_yaml(
        &client,
        &ns,
        &format!(
            r#"
apiVersion: v1
kind: Secret
metadata: {{name: argocd-mailroom}}
stringData: {{token: "{TOKEN}"}}
---
apiVersion: mailroom.dev/v1alpha1
kind: AlertRoute
metadata: {{name: deploys}}
spec:
  source: argocd
  profileRef: {{name: relay}}
  to: ["Team A <team-a@contoso.com>"]
  tokenSecretRef: {{name: argocd-mailroom, key: token}}
"#
        ),
    )
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let shipped = std::fs::read_to_string(repo_root().join("deploy/argocd/argocd-notifications-cm.yaml")).expect("cm");
    assert!(shipped.contains(SHIPPED_URL), "the shipped ConfigMap's URL changed: update SHIPPED_URL");
    let cm = shipped.replace(SHIPPED_URL, &format!("url: {base}/alerts/{ns}/deploys"));
    std::fs::write(dir.path().join("cm.yaml"), cm).expect("cm");
    std::fs::write(dir.path().join("app.yaml"), APPLICATION).expect("app");

    let (ok, lines) = notify(dir.path(), TOKEN);
    assert!(ok, "argocd-notify failed: {lines:?}");
    let fired: Vec<(&str, bool)> =
        lines.iter().map(|l| (l["trigger"].as_str().unwrap_or(""), l["triggered"] == true)).collect();
    assert_eq!(
        fired,
        [
            ("on-mailroom-sync-succeeded", false),
            ("on-mailroom-sync-failed", true),
            ("on-mailroom-health-degraded", true)
        ]
    );

    let messages: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    wait_counts(&client, &ns, (2, 2, 0)).await;
    let created = route_messages(&messages).await;
    assert_eq!(created.len(), 2, "one message per notification");
    for m in &created {
        let name = m.metadata.name.clone().expect("name");
        assert!(name.starts_with("argocd-deploys-"), "{name}");
        let sent = common::wait_for(&messages, &name, WAIT, |m| phase(m) == Some(Phase::Sent)).await;
        assert_eq!(sent.spec.importance, Some(Importance::High), "bad news is high importance");
    }
    let mut subjects = Vec::new();
    for envelope in peer.wait_messages(2, WAIT).await {
        let raw = peer.raw(&envelope);
        let mail = MessageParser::default().parse(&raw).expect("parse the received message");
        let text = mail.body_text(0).expect("a text body").to_string();
        assert!(text.contains("guestbook-ui"), "the operation message: {text}");
        assert!(text.contains("https://argocd.example.com/applications/argocd/guestbook"), "the app's link: {text}");
        subjects.push(mail.subject().unwrap_or_default().to_string());
    }
    subjects.sort();
    assert_eq!(
        subjects,
        ["[Argo CD] guestbook: health degraded (4e9c917f)", "[Argo CD] guestbook: sync failed (4e9c917f)"]
    );

    // The same notifications again (a retry, or the controller resending): nothing new.
    let (ok, lines) = notify(dir.path(), TOKEN);
    assert!(ok, "argocd-notify failed: {lines:?}");
    let route = wait_counts(&client, &ns, (4, 2, 0)).await;
    let outcome = route.status.and_then(|s| s.last_outcome).unwrap_or_default();
    assert!(outcome.starts_with("AlreadyCreated argocd-deploys-"), "{outcome}");
    assert_eq!(route_messages(&messages).await.len(), 2, "a replay creates no message");

    // A wrong token: 401 for each, nothing created, and the engine says so.
    let wrong = "not-the-route-token-77d2";
    let (ok, lines) = notify(dir.path(), wrong);
    assert!(!ok, "argocd-notify succeeded with a wrong token: {lines:?}");
    let errors: Vec<&str> = lines.iter().filter_map(|l| l["error"].as_str()).collect();
    assert_eq!(errors.len(), 2, "{lines:?}");
    for e in &errors {
        assert!(e.contains("401"), "{e}");
        assert!(!e.contains(wrong) && !e.contains(TOKEN), "a token in the engine's error: {e}");
    }
    let route = wait_counts(&client, &ns, (6, 2, 2)).await;
    let outcome = route.status.and_then(|s| s.last_outcome).unwrap_or_default();
    assert!(outcome.starts_with("Rejected 401"), "{outcome}");
    assert_eq!(route_messages(&messages).await.len(), 2, "a wrong token creates no message");
    assert_eq!(peer.messages().await.len(), 2, "two emails in all");
}
