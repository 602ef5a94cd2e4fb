//! Isolation between namespaces, on a private control plane whose audit log records every
//! request on Secrets: a message cannot use another namespace's profile, nor a cluster profile
//! that does not admit its namespace, and the operator (as its own ServiceAccount, with the RBAC
//! of deploy/base) reads no Secret that a profile or attachment of the same namespace does not
//! reference.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::audited::{AuditedControlPlane, OPERATOR_USER};
use common::smtp_peer::SmtpPeer;
use common::{Operator, create_yaml, phase, wait_for};
use kube::Api;
use mailroom::api::{ClusterMailProfile, EmailMessage, MailProfile, Phase, find_condition};

const WAIT: Duration = Duration::from_secs(60);

fn condition(m: &EmailMessage, type_: &str) -> Option<(String, String, String)> {
    m.status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, type_))
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The (namespace, name) of every Secret the operator's identity asked for by name.
fn secret_gets(plane: &AuditedControlPlane) -> BTreeSet<(String, String)> {
    plane
        .audit_events()
        .iter()
        .filter(|e| {
            e["user"]["username"] == OPERATOR_USER && e["verb"] == "get" && e["objectRef"]["resource"] == "secrets"
        })
        .map(|e| {
            let r = &e["objectRef"];
            (
                r["namespace"].as_str().unwrap_or_default().to_string(),
                r["name"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn namespaces_cannot_reach_each_others_profiles_or_secrets() {
    let plane = AuditedControlPlane::start("isolation");
    let client = plane.client().await;
    let a = common::namespace(&client, "iso-a", &[]).await;
    let b = common::namespace(&client, "iso-b", &[]).await;
    let label = format!("allowed-{}", &a[a.len() - 8..]);
    let c = common::namespace(&client, "iso-c", &[("mail", &label)]).await;
    let peer = SmtpPeer::start(&[]);
    let port = peer.smtp_port;
    let cmp = format!("shared-{}", &a[a.len() - 8..]);

    // B: a profile whose name exists only in B, and a Secret nobody in B references.
    create_yaml(
        &client,
        &b,
        &format!(
            r#"
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: only-in-b}}
spec:
  senders: {{default: "b@contoso.com"}}
  smtp: {{host: 127.0.0.1, port: {port}, tls: None}}
---
apiVersion: v1
kind: Secret
metadata: {{name: crown-jewels}}
stringData: {{username: b-user, password: b-password-never-read}}
"#
        ),
    )
    .await;
    // A cluster profile that admits only namespaces labelled like C.
    create_yaml(
        &client,
        &a,
        &format!(
            r#"
apiVersion: mailroom.dev/v1alpha1
kind: ClusterMailProfile
metadata: {{name: {cmp}}}
spec:
  allowedNamespaces: {{matchLabels: {{mail: {label}}}}}
  senders: {{default: "shared@contoso.com"}}
  smtp: {{host: 127.0.0.1, port: {port}, tls: None}}
"#
        ),
    )
    .await;
    // A: a profile whose credentials name B's Secret; messages that try every way across.
    create_yaml(
        &client,
        &a,
        &format!(
            r#"
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: steals-from-b}}
spec:
  senders: {{default: "a@contoso.com"}}
  smtp:
    host: 127.0.0.1
    port: {port}
    tls: None
    auth: {{password: {{secretRef: {{name: crown-jewels, namespace: {b}}}}}}}
---
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: a-relay}}
spec:
  senders: {{default: "a@contoso.com"}}
  smtp: {{host: 127.0.0.1, port: {port}, tls: None}}
---
apiVersion: mailroom.dev/v1alpha1
kind: EmailMessage
metadata: {{name: attaches-b-secret}}
spec:
  profileRef: {{name: a-relay}}
  to: ["ops@contoso.com"]
  subject: "from A with B's Secret attached"
  body: {{text: "must not be sent"}}
  attachments:
  - {{name: jewels.txt, secretRef: {{name: crown-jewels, key: password}}}}
---
apiVersion: mailroom.dev/v1alpha1
kind: EmailMessage
metadata: {{name: wants-b-profile}}
spec:
  profileRef: {{name: only-in-b}}
  to: ["ops@contoso.com"]
  subject: "from A through B's profile"
  body: {{text: "must not be sent"}}
---
apiVersion: mailroom.dev/v1alpha1
kind: EmailMessage
metadata: {{name: wants-cluster-profile}}
spec:
  profileRef: {{kind: ClusterMailProfile, name: {cmp}}}
  to: ["ops@contoso.com"]
  subject: "from A through the cluster profile"
  body: {{text: "must not be sent"}}
---
apiVersion: mailroom.dev/v1alpha1
kind: EmailMessage
metadata: {{name: wants-b-secret}}
spec:
  profileRef: {{kind: ClusterMailProfile, name: {cmp}}}
  to: ["ops@contoso.com"]
  subject: "from A with B's Secret"
  body: {{text: "must not be sent"}}
  attachments:
  - {{name: jewels.txt, secretRef: {{name: crown-jewels, key: password}}}}
"#
        ),
    )
    .await;
    // C: admitted by the cluster profile, with an attachment from its own Secret.
    create_yaml(
        &client,
        &c,
        &format!(
            r#"
apiVersion: v1
kind: Secret
metadata: {{name: report}}
stringData: {{report.csv: "a,b\n1,2\n"}}
---
apiVersion: mailroom.dev/v1alpha1
kind: EmailMessage
metadata: {{name: admitted}}
spec:
  profileRef: {{kind: ClusterMailProfile, name: {cmp}}}
  to: ["ops@contoso.com"]
  subject: "from C through the cluster profile"
  body: {{text: "sent"}}
  attachments:
  - {{name: report.csv, secretRef: {{name: report, key: report.csv}}}}
"#
        ),
    )
    .await;

    let kubeconfig = plane.operator_kubeconfig().display().to_string();
    let op = Operator::start_all_with_env("isolation", &[], &[("KUBECONFIG", &kubeconfig)]);

    // C is admitted: its message goes out with its own Secret attached.
    let c_api: Api<EmailMessage> = Api::namespaced(client.clone(), &c);
    let sent = wait_for(&c_api, "admitted", WAIT, |m| phase(m).is_some_and(Phase::is_finished)).await;
    assert_eq!(phase(&sent), Some(Phase::Sent), "{:?}", sent.status);

    let a_api: Api<EmailMessage> = Api::namespaced(client.clone(), &a);
    // A name that exists only in B leaves A's message waiting.
    let m = wait_for(&a_api, "wants-b-profile", WAIT, |m| condition(m, "Waiting").is_some_and(|c| c.0 == "True")).await;
    let (_, reason, text) = condition(&m, "Waiting").expect("Waiting");
    assert_eq!(reason, "ProfileNotFound", "{text}");
    assert!(text.contains(&format!("MailProfile {a}/only-in-b")), "{text}");
    // The cluster profile does not admit A.
    for name in ["wants-cluster-profile", "wants-b-secret"] {
        let m = wait_for(&a_api, name, WAIT, |m| phase(m) == Some(Phase::Failed)).await;
        let (_, reason, text) = condition(&m, "Failed").expect("Failed");
        assert_eq!(reason, "NamespaceNotAdmitted", "{name}: {text}");
        assert!(text.contains(&a) && text.contains(&cmp), "{text}");
    }
    // An attachment's secretRef names a Secret of the message's own namespace: A has none.
    let m =
        wait_for(&a_api, "attaches-b-secret", WAIT, |m| condition(m, "Waiting").is_some_and(|c| c.0 == "True")).await;
    let (_, reason, text) = condition(&m, "Waiting").expect("Waiting");
    assert_eq!(reason, "AttachmentNotFound", "{text}");
    assert!(text.contains(&format!("Secret crown-jewels not found in namespace {a}")), "{text}");
    // A profile in A cannot take B's Secret as its credentials.
    let profiles: Api<MailProfile> = Api::namespaced(client.clone(), &a);
    let p = wait_for(&profiles, "steals-from-b", WAIT, |p| {
        p.status.as_ref().and_then(|s| find_condition(&s.conditions, "Ready")).is_some()
    })
    .await;
    let ready = p.status.as_ref().and_then(|s| find_condition(&s.conditions, "Ready")).cloned().expect("Ready");
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "InvalidSettings"), "{ready:?}");
    assert!(ready.message.contains("only use Secrets in its own namespace"), "{}", ready.message);
    let cluster: Api<ClusterMailProfile> = Api::all(client.clone());
    assert!(cluster.get(&cmp).await.is_ok());

    // Give the operator time to have tried anything it would try (a few reconciles of each).
    let m =
        wait_for(&a_api, "wants-b-profile", WAIT, |m| m.status.as_ref().and_then(|s| s.observed_generation).is_some())
            .await;
    assert_ne!(phase(&m), Some(Phase::Sent));
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Only C's message reached the peer; nothing of A, nothing through B's profile.
    let received = peer.messages().await;
    assert_eq!(received.len(), 1, "{received:#?}");
    let raw = String::from_utf8_lossy(&peer.raw(&received[0])).to_string();
    assert!(raw.contains("from C through the cluster profile"), "{raw}");
    assert!(!raw.contains("b-password-never-read") && !raw.contains("must not be sent"), "{raw}");

    // The audit log: the operator's identity fetched C's attachment Secret (so the log does see
    // its reads), and no Secret in B, ever, by any verb that names one.
    let gets = secret_gets(&plane);
    assert!(gets.contains(&(c.clone(), "report".to_string())), "the audit log shows the operator's reads: {gets:?}");
    let in_b: Vec<_> = plane
        .audit_events()
        .into_iter()
        .filter(|e| e["user"]["username"] == OPERATOR_USER && e["objectRef"]["namespace"] == b.as_str())
        .collect();
    assert!(in_b.is_empty(), "the operator made requests on Secrets in {b}: {in_b:#?}");
    // The attachment lookup stayed in A (and found nothing there).
    let allowed: BTreeSet<(String, String)> =
        [(a.clone(), "crown-jewels".to_string()), (c.clone(), "report".to_string())].into();
    assert_eq!(gets, allowed, "the operator read Secrets nothing of theirs references");
    // Any list or watch of Secrets is the cluster-wide metadata watch, not one aimed at B.
    for e in plane.audit_events() {
        if e["user"]["username"] == OPERATOR_USER {
            assert!(e["objectRef"]["namespace"].is_null() || e["objectRef"]["namespace"] != b.as_str(), "{e}");
        }
    }
    drop(op);
}
