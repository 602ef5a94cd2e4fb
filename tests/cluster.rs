//! The operator as users run it: its image, installed by its Helm chart in the real one-node
//! cluster of `hack/cluster.sh` (kubelet, containerd, kube-proxy, the controller-manager), with
//! the mail peers listening on the address Pods reach the host on.
//!
//! These tests need that cluster and are ignored by a plain `cargo test`: `hack/e2e.sh` runs
//! them (`make e2e` the full form, `make test` the short form, MAILROOM_E2E_MODE=short).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::emulator::{Emulator, concat_pems};
use common::smtp_peer::SmtpPeer;
use common::{create_yaml, required_env};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use mailroom::api::{EmailMessage, Phase};
use serde_json::{Value, json};

const NS: &str = "mailroom-e2e";
const RELEASE: &str = "mailroom";
const TENANT: &str = "7e3b1c2d-0000-4000-8000-00000000c1a5";
const CLIENT: &str = "9a1f0c3e-1111-4111-8111-00000000c1a5";
const SENDER: &str = "alerts@contoso.com";
/// Exchange Online's 30 messages a minute per mailbox, the default, would make the batches take
/// an hour; the emulator and the SMTP test server take this many.
const RATE: u32 = 6000;

/// Batch sizes: the full form (`make e2e`) and the short one (`make test`).
struct Scale {
    per_transport: usize,
    failover: usize,
    large: usize,
    /// Messages created while no operator runs, all waiting when it starts.
    backlog: usize,
}

impl Scale {
    fn from_env() -> Scale {
        if std::env::var("MAILROOM_E2E_MODE").as_deref() == Ok("short") {
            Scale { per_transport: 5, failover: 40, large: 200, backlog: 500 }
        } else {
            Scale { per_transport: 50, failover: 200, large: 2000, backlog: 10_000 }
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn helm(args: &[&str]) -> Output {
    run(Command::new(required_env("MAILROOM_HELM")).args(args).current_dir(common::repo_root()))
}

fn chart() -> String {
    common::repo_root().join("deploy/helm/mailroom").display().to_string()
}

/// The image the tests install: `MAILROOM_E2E_IMAGE` (repository:tag), imported into the node.
fn image() -> (String, String) {
    let image = required_env("MAILROOM_E2E_IMAGE");
    let (repository, tag) = image.rsplit_once(':').expect("MAILROOM_E2E_IMAGE is repository:tag");
    (repository.to_string(), tag.to_string())
}

/// Polls `check` every 250 ms until it returns Some, failing after `timeout` with `what`.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The notification receiver's certificate, the committed test pair, as the kubernetes.io/tls
/// Secret `name` in `namespace`.
async fn receiver_cert_secret(client: &Client, namespace: &str, name: &str) {
    let read = |f: &str| std::fs::read(common::receiver::testdata(f)).expect("the test pair");
    common::receiver::put_cert_secret(client, namespace, name, &read("localhost.crt"), &read("localhost.key")).await;
}

/// Waits until every Ready operator Pod in `namespace` logged that the notification receiver
/// loaded its certificate (read from the Secret through the Pod's own RBAC).
async fn wait_receiver_certificate(client: &Client, namespace: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let lp = ListParams::default().labels("app.kubernetes.io/name=mailroom");
    eventually("every operator Pod to load the receiver's certificate", Duration::from_secs(120), || {
        let pods = pods.clone();
        let lp = lp.clone();
        async move {
            let running: Vec<Pod> = pods.list(&lp).await.ok()?.items.into_iter().filter(pod_ready).collect();
            if running.is_empty() {
                return None;
            }
            for pod in &running {
                let log = pods.logs(&pod.name_any(), &LogParams::default()).await.ok()?;
                if !log.contains("notification receiver: certificate loaded") {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
}

/// The operator's Pods, by name.
async fn operator_pods(client: &Client) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let lp = ListParams::default().labels("app.kubernetes.io/name=mailroom");
    pods.list(&lp)
        .await
        .expect("list pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| cs.iter().map(|c| c.restart_count).sum())
        .unwrap_or(0)
}

/// No operator Pod restarted or was terminated (OOMKilled among the reasons) `under` a load.
async fn assert_never_restarted(client: &Client, under: &str) {
    for p in operator_pods(client).await {
        assert_eq!(restarts(&p), 0, "{} restarted under {under}", p.name_any());
        let terminated: Vec<_> = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| c.last_state.as_ref().and_then(|l| l.terminated.as_ref()).map(|t| t.reason.clone()))
            .collect();
        assert!(terminated.is_empty(), "{} was terminated under {under}: {terminated:?}", p.name_any());
    }
}

async fn wait_pods_ready(client: &Client, n: usize, timeout: Duration) -> Vec<Pod> {
    eventually(&format!("{n} Ready operator Pods"), timeout, || async {
        let pods = operator_pods(client).await;
        (pods.len() == n && pods.iter().all(pod_ready)).then_some(pods)
    })
    .await
}

/// The Pod holding the leader Lease (its identity is `<pod>_<pid>`).
async fn lease_holder(client: &Client) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let holder = leases.get_opt("mailroom-leader").await.ok().flatten()?.spec?.holder_identity?;
    holder.rsplit_once('_').map(|(pod, _)| pod.to_string()).filter(|p| !p.is_empty())
}

/// The Pod's memory cgroup on this host (cgroup v1, the cgroupfs driver: kubepods/<qos>/pod<uid>).
fn pod_memory_cgroup(p: &Pod) -> PathBuf {
    let uid = p.metadata.uid.clone().expect("uid");
    let qos = p.status.as_ref().and_then(|s| s.qos_class.clone()).expect("QoS class").to_lowercase();
    let root = PathBuf::from("/sys/fs/cgroup/memory/kubepods");
    let dir =
        if qos == "guaranteed" { root.join(format!("pod{uid}")) } else { root.join(qos).join(format!("pod{uid}")) };
    assert!(dir.is_dir(), "no memory cgroup at {}", dir.display());
    dir
}

/// The cgroup's working set: its usage less its inactive file pages.
fn working_set(cgroup: &std::path::Path) -> Option<u64> {
    let usage: u64 = std::fs::read_to_string(cgroup.join("memory.usage_in_bytes")).ok()?.trim().parse().ok()?;
    let stat = std::fs::read_to_string(cgroup.join("memory.stat")).ok()?;
    let inactive: u64 = stat.lines().find_map(|l| l.strip_prefix("total_inactive_file "))?.trim().parse().ok()?;
    Some(usage.saturating_sub(inactive))
}

/// The world of these tests: the mail peers on the host address Pods reach, and the chart's
/// release in NS.
struct World {
    client: Client,
    host_ip: String,
    emu: Emulator,
    relay: SmtpPeer,
    exo: SmtpPeer,
    bundle: PathBuf,
    scale: Scale,
}

impl World {
    async fn new() -> World {
        let client = common::client().await;
        let host_ip = required_env("MAILROOM_CLUSTER_HOST_IP");
        let emu = Emulator::start_on("cluster", &host_ip).await;
        let relay = SmtpPeer::start_on(&host_ip, &["--self-signed"]);
        let emu_ca = emu.ca_pem().display().to_string();
        let exo = SmtpPeer::start_on(
            &host_ip,
            &[
                "--self-signed",
                "--require-starttls",
                "--xoauth2-introspect",
                &emu.introspect_url(),
                "--xoauth2-ca",
                &emu_ca,
            ],
        );
        let bundle = emu.dir.path().join("ca-bundle.pem");
        concat_pems(&bundle, &[emu.ca_pem(), relay.ca_pem(), exo.ca_pem()]);
        World { client, host_ip, emu, relay, exo, bundle, scale: Scale::from_env() }
    }

    fn messages(&self) -> Api<EmailMessage> {
        Api::namespaced(self.client.clone(), NS)
    }

    /// `helm install` (or upgrade --install) of the chart with the image and `extra` values.
    fn install(&self, verb: &[&str], extra: &[&str]) {
        let (repository, tag) = image();
        let mut args: Vec<String> = verb.iter().map(|s| s.to_string()).collect();
        args.extend([RELEASE.to_string(), chart()]);
        for a in [
            "--namespace",
            NS,
            "--wait",
            "--timeout",
            "240s",
            "--set",
            &format!("image.repository={repository}"),
            "--set",
            &format!("image.tag={tag}"),
            "--set",
            "image.pullPolicy=Never",
            "--set-file",
            &format!("caBundle.pem={}", self.bundle.display()),
        ] {
            args.push(a.to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&format!("helm {}", verb.join(" ")), helm(&args));
    }

    /// Graph (client secret), the SMTP relay (STARTTLS, no authentication) and SMTP with
    /// XOAUTH2, all through the peers on the host address.
    async fn profiles(&self) {
        self.emu
            .register_app(json!({"tenantId": TENANT, "clientId": CLIENT, "secrets": ["e2e-secret-1"], "roles": ["Mail.Send", "SMTP.SendAsApp"]}))
            .await;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), NS);
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "entra-app"},
            "stringData": {"client-secret": "e2e-secret-1"},
        }))
        .expect("Secret");
        secrets.create(&PostParams::default(), &secret).await.expect("create Secret");
        let (emu, ip) = (&self.emu.url, &self.host_ip);
        let yaml = format!(
            r#"
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: graph}}
spec:
  senders: {{default: "{SENDER}"}}
  limits: {{messagesPerMinute: {RATE}}}
  graph:
    tenantId: {TENANT}
    clientId: {CLIENT}
    authorityHost: {emu}
    endpoint: {emu}
    clientSecretRef: {{name: entra-app, key: client-secret}}
---
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: relay}}
spec:
  senders: {{default: "{SENDER}"}}
  limits: {{messagesPerMinute: {RATE}}}
  smtp: {{host: "{ip}", port: {relay}, tls: StartTLS}}
---
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: exo}}
spec:
  senders: {{default: "{SENDER}"}}
  limits: {{messagesPerMinute: {RATE}}}
  smtp:
    host: "{ip}"
    port: {exo}
    tls: StartTLS
    auth:
      oauth2:
        tenantId: {TENANT}
        clientId: {CLIENT}
        authorityHost: {emu}
        clientSecretRef: {{name: entra-app, key: client-secret}}
"#,
            relay = self.relay.smtp_port,
            exo = self.exo.smtp_port,
        );
        create_yaml(&self.client, NS, &yaml).await;
    }

    async fn send(&self, name: &str, profile: &str) {
        let message: EmailMessage = serde_json::from_value(json!({
            "apiVersion": "mailroom.dev/v1alpha1", "kind": "EmailMessage",
            "metadata": {"name": name},
            "spec": {
                "profileRef": {"name": profile},
                "to": ["Ops Team <ops@contoso.com>"],
                "subject": format!("cluster {name}"),
                "body": {"text": "Delivered from a Pod."},
            },
        }))
        .expect("EmailMessage");
        self.messages().create(&PostParams::default(), &message).await.unwrap_or_else(|e| panic!("create {name}: {e}"));
    }

    /// Waits until every message named is Sent; returns name → status Message-ID.
    async fn wait_sent(&self, names: &[String], timeout: Duration) -> BTreeMap<String, String> {
        let want: BTreeSet<&String> = names.iter().collect();
        eventually(&format!("{} messages Sent", names.len()), timeout, || async {
            let all = self.messages().list(&ListParams::default()).await.ok()?;
            let mut sent = BTreeMap::new();
            for m in all.items {
                if !want.contains(&m.name_any()) {
                    continue;
                }
                match m.phase() {
                    Some(Phase::Sent) => {
                        let id = m
                            .status
                            .as_ref()
                            .and_then(|s| s.message_id.clone())
                            .expect("a Sent message has a Message-ID");
                        sent.insert(m.name_any(), id);
                    }
                    Some(Phase::Failed) => panic!("{} Failed: {:#?}", m.name_any(), m.status),
                    _ => {}
                }
            }
            (sent.len() == want.len()).then_some(sent)
        })
        .await
    }

    /// The Message-IDs every peer received, with how many copies of each.
    async fn received(&self) -> BTreeMap<String, usize> {
        let mut copies = BTreeMap::new();
        let mut ids: Vec<String> = Vec::new();
        for m in self.relay.messages().await.into_iter().chain(self.exo.messages().await) {
            ids.push(m["message_id"].as_str().unwrap_or_default().to_string());
        }
        for m in self.emu.messages().await {
            ids.push(graph_message_id(&m));
        }
        for id in ids {
            *copies.entry(id).or_insert(0) += 1;
        }
        copies
    }
}

/// The Message-ID of a message the emulator accepted.
fn graph_message_id(m: &Value) -> String {
    m["messageId"].as_str().unwrap_or_default().to_string()
}

/// Names of the Events that said a send was caught in doubt.
async fn doubts(client: &Client) -> BTreeSet<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), NS);
    let all = events.list(&ListParams::default()).await.expect("list events");
    all.items
        .into_iter()
        .filter(|e| {
            e.note.as_deref().is_some_and(|n| n.contains("was interrupted") || n.contains("stopped while sending"))
        })
        .filter_map(|e| e.regarding.and_then(|r| r.name))
        .collect()
}

/// The chart's default requests and limits under a backlog: the Deployment is scaled to zero while
/// `scale.backlog` messages are created, then back to two replicas, so that the new leader lists
/// them all waiting at once (what the memory limit is sized for; `make bench`'s backlog run
/// measures the same outside a container). Every message is Sent once, no Pod restarts or is
/// killed, and the Pods' peak working sets are printed against `limit`.
async fn backlog(w: &World, limit: &str) {
    let client = &w.client;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let scale = |replicas: i32| {
        let deployments = deployments.clone();
        async move {
            let patch = Patch::Merge(json!({"spec": {"replicas": replicas}}));
            deployments.patch_scale(RELEASE, &PatchParams::default(), &patch).await.expect("scale the Deployment");
        }
    };
    scale(0).await;
    eventually("no operator Pods", Duration::from_secs(120), || async {
        operator_pods(client).await.is_empty().then_some(())
    })
    .await;

    let n = w.scale.backlog;
    let label = "mailroom.dev/e2e-batch=backlog";
    let profiles = ["graph", "relay", "exo"];
    let started = Instant::now();
    futures::stream::iter(0..n)
        .for_each_concurrent(16, |i| async move {
            let message: EmailMessage = serde_json::from_value(json!({
                "apiVersion": "mailroom.dev/v1alpha1", "kind": "EmailMessage",
                "metadata": {"name": format!("backlog-{i:05}"), "labels": {"mailroom.dev/e2e-batch": "backlog"}},
                "spec": {
                    "profileRef": {"name": profiles[i % 3]},
                    "to": ["Ops Team <ops@contoso.com>"],
                    "subject": format!("backlog {i}"),
                    "body": {"text": "Waited for the operator."},
                },
            }))
            .expect("EmailMessage");
            w.messages().create(&PostParams::default(), &message).await.unwrap_or_else(|e| panic!("create {i}: {e}"));
        })
        .await;
    eprintln!("e2e: {n} messages created with no operator running in {:.1}s", started.elapsed().as_secs_f64());

    scale(2).await;
    let started = Instant::now();
    let running = eventually("2 running operator Pods", Duration::from_secs(120), || async {
        let pods = operator_pods(client).await;
        let running = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        (pods.len() == 2 && pods.iter().all(running)).then_some(pods)
    })
    .await;
    let peaks: Vec<(String, std::sync::Arc<std::sync::atomic::AtomicU64>)> =
        running.iter().map(|p| (p.name_any(), Default::default())).collect();
    let sampler = {
        let cgroups: Vec<PathBuf> = running.iter().map(pod_memory_cgroup).collect();
        let peaks: Vec<_> = peaks.iter().map(|(_, peak)| peak.clone()).collect();
        tokio::spawn(async move {
            loop {
                for (cgroup, peak) in cgroups.iter().zip(&peaks) {
                    if let Some(ws) = working_set(cgroup) {
                        peak.fetch_max(ws, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // Counted by the phase field selector, by name only: a whole list of 10,000 every poll would
    // be most of the API server's work.
    let count = |phase: Phase| async move {
        let lp = ListParams::default().labels(label).fields(&format!("status.phase={phase:?}"));
        w.messages().list_metadata(&lp).await.map(|l| l.items.len()).ok()
    };
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        if let Some(failed) = count(Phase::Failed).await {
            assert_eq!(failed, 0, "backlog messages Failed");
        }
        if count(Phase::Sent).await == Some(n) {
            break;
        }
        assert!(Instant::now() < deadline, "the backlog of {n} was not Sent within 900s");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    sampler.abort();
    assert_never_restarted(client, "the backlog").await;
    let leader = lease_holder(client).await.unwrap_or_default();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    for (pod, peak) in &peaks {
        let role = if *pod == leader { "leader" } else { "follower" };
        eprintln!(
            "e2e: backlog of {n}: {pod} ({role}) peak working set {:.1} MiB against its limit of {limit}",
            mib(peak.load(std::sync::atomic::Ordering::Relaxed))
        );
    }
    eprintln!("e2e: backlog of {n} Sent in {elapsed:.1}s from the scale-up (Pods started, caches listed, all sent)");

    // Each once, by Message-ID at the peers.
    let copies = w.received().await;
    let sent = w.messages().list(&ListParams::default().labels(label)).await.expect("list the backlog");
    assert_eq!(sent.items.len(), n);
    for m in &sent.items {
        let id = m.status.as_ref().and_then(|s| s.message_id.clone()).expect("a Sent message has a Message-ID");
        assert_eq!(copies.get(&id), Some(&1), "{} ({id}) arrived {:?} times", m.name_any(), copies.get(&id));
    }
    // Out of the way of the steps after this one.
    w.messages()
        .delete_collection(&DeleteParams::default(), &ListParams::default().labels(label))
        .await
        .expect("delete the backlog");
    wait_pods_ready(client, 2, Duration::from_secs(120)).await;
}

async fn create_namespace(client: &Client) {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    if api.get_opt(NS).await.expect("get namespace").is_some() {
        api.delete(NS, &DeleteParams::default()).await.ok();
        eventually("the old namespace to go", Duration::from_secs(120), || async {
            api.get_opt(NS).await.ok().flatten().is_none().then_some(())
        })
        .await;
    }
    let ns = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NS, "labels": {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
        }},
    }))
    .expect("Namespace");
    api.create(&PostParams::default(), &ns).await.expect("create namespace");
    // The controller-manager publishes the default ServiceAccount; Pods need it.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), NS);
    eventually("the default ServiceAccount", Duration::from_secs(60), || async {
        sas.get_opt("default").await.ok().flatten().map(|_| ())
    })
    .await;
}

/// Runs a one-shot Pod of the toolbox image with `command`, restricted like the operator's,
/// and returns its log once it succeeded.
async fn toolbox(client: &Client, name: &str, command: &[&str]) -> String {
    toolbox_in(client, NS, name, command).await
}

async fn toolbox_in(client: &Client, namespace: &str, name: &str, command: &[&str]) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "toolbox", "image": required_env("MAILROOM_E2E_TOOLBOX"), "imagePullPolicy": "Never",
                "command": command,
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": true},
            }],
        },
    }))
    .expect("Pod");
    pods.create(&PostParams::default(), &pod).await.unwrap_or_else(|e| panic!("create Pod {name}: {e}"));
    let phase = eventually(&format!("Pod {name} to finish"), Duration::from_secs(90), || async {
        let p = pods.get(name).await.ok()?;
        let phase = p.status?.phase?;
        matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
    })
    .await;
    let log = pods.logs(name, &LogParams::default()).await.unwrap_or_default();
    assert_eq!(phase, "Succeeded", "Pod {name} {phase}; its log:\n{log}");
    pods.delete(name, &DeleteParams::default()).await.ok();
    log
}

/// The operator from its chart: Ready through its probes, admitted by restricted Pod Security,
/// reaching the API server with its own ServiceAccount, delivering through Graph, the SMTP relay
/// and XOAUTH2, handing over when the leader Pod is deleted, serving metrics to another Pod, and
/// leaving nothing but its CRDs when uninstalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the one-node cluster: make e2e, or make test"]
async fn the_chart_runs_delivers_fails_over_and_uninstalls() {
    let w = World::new().await;
    let client = &w.client;
    create_namespace(client).await;

    // Install, two replicas with leader election, and only the image, the CA bundle and the
    // emulator's endpoints (custom endpoints) changed from the defaults.
    let started = Instant::now();
    w.install(&["install"], &["--set", "replicas=2", "--set", "allowCustomEndpoints=true"]);
    let pods = wait_pods_ready(client, 2, Duration::from_secs(120)).await;
    eprintln!("e2e: helm install --wait took {:.1}s; both Pods Ready", started.elapsed().as_secs_f64());

    // Start-up and access: the readiness probe made them Ready; /healthz (the liveness probe's
    // path) answers on each Pod's own address, which the host reaches over the bridge.
    for p in &pods {
        let spec = p.spec.as_ref().expect("spec");
        let c = &spec.containers[0];
        assert_eq!(
            c.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).map(|g| g.path.as_deref()),
            Some(Some("/readyz"))
        );
        assert_eq!(
            c.liveness_probe.as_ref().and_then(|p| p.http_get.as_ref()).map(|g| g.path.as_deref()),
            Some(Some("/healthz"))
        );
        let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone()).expect("Pod IP");
        let body = common::http().get(format!("http://{ip}:8081/healthz")).send().await.expect("GET /healthz");
        assert!(body.status().is_success());
        assert_eq!(spec.service_account_name.as_deref(), Some(RELEASE));
        // The projected ServiceAccount token, and no other credential.
        let volumes = spec.volumes.as_deref().unwrap_or_default();
        assert!(volumes.iter().any(|v| v.projected.is_some()), "no projected token volume: {volumes:#?}");
        assert!(volumes.iter().all(|v| v.secret.is_none() && v.host_path.is_none()), "{volumes:#?}");
        let env = c.env.as_deref().unwrap_or_default();
        assert!(env.iter().all(|e| e.name != "KUBECONFIG"), "{env:#?}");
    }
    // The Lease is held by one of the Pods: it talked to the API server through the kubernetes
    // Service with its token, and its RBAC allowed the Lease.
    let leader = eventually("a leader", Duration::from_secs(60), || lease_holder(client)).await;
    let names: BTreeSet<String> = pods.iter().map(|p| p.name_any()).collect();
    assert!(names.contains(&leader), "the Lease holder {leader} is none of {names:?}");

    // Pod Security: a Pod without the restricted security context is refused by the admission
    // plugin on this namespace.
    let bare: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "unrestricted"},
        "spec": {"containers": [{"name": "c", "image": required_env("MAILROOM_E2E_TOOLBOX"), "imagePullPolicy": "Never"}]},
    }))
    .expect("Pod");
    let refused = Api::<Pod>::namespaced(client.clone(), NS).create(&PostParams::default(), &bare).await;
    match refused {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 403, "{e:?}");
            assert!(e.message.contains("violates PodSecurity \"restricted"), "{}", e.message);
        }
        other => panic!("a Pod without a security context was admitted: {other:?}"),
    }

    // Delivery through the three transports.
    w.profiles().await;
    let mut names = Vec::new();
    for profile in ["graph", "relay", "exo"] {
        for i in 0..w.scale.per_transport {
            let name = format!("{profile}-{i:03}");
            w.send(&name, profile).await;
            names.push(name);
        }
    }
    let started = Instant::now();
    let sent = w.wait_sent(&names, Duration::from_secs(180)).await;
    eprintln!(
        "e2e: {} messages over Graph, the relay and XOAUTH2 Sent in {:.1}s",
        sent.len(),
        started.elapsed().as_secs_f64()
    );
    let copies = w.received().await;
    for (name, id) in &sent {
        assert_eq!(copies.get(id), Some(&1), "{name} ({id}) arrived {:?} times", copies.get(id));
    }

    // Failover: delete the leader Pod in the middle of a batch. The relay answers DATA after a
    // second, so that the deleted Pod has sends in flight when it is told to stop.
    w.relay.script(json!({"latency_ms": 1000})).await;
    let batch: Vec<String> = (0..w.scale.failover).map(|i| format!("failover-{i:03}")).collect();
    for name in &batch {
        w.send(name, "relay").await;
    }
    let before = w.relay.messages().await.len();
    eventually("the batch to be under way", Duration::from_secs(60), || async {
        (w.relay.messages().await.len() >= before + 5).then_some(())
    })
    .await;
    let old = lease_holder(client).await.expect("a leader");
    let deleted = Instant::now();
    Api::<Pod>::namespaced(client.clone(), NS).delete(&old, &DeleteParams::default()).await.expect("delete the leader");
    let new = eventually("another replica to take the Lease", Duration::from_secs(120), || async {
        lease_holder(client).await.filter(|h| h != &old)
    })
    .await;
    let handover = deleted.elapsed();
    let sent = w.wait_sent(&batch, Duration::from_secs(300)).await;
    w.relay.script(json!({"latency_ms": 0})).await;
    eprintln!(
        "e2e: deleted the leader {old} during {} messages; {new} took over {:.1}s later; all Sent",
        batch.len(),
        handover.as_secs_f64()
    );
    let copies = w.received().await;
    let in_doubt = doubts(client).await;
    for (name, id) in &sent {
        let n = copies.get(id).copied().unwrap_or(0);
        assert!(n >= 1, "{name} ({id}) never arrived");
        assert!(n == 1 || in_doubt.contains(name), "{name} arrived {n} times and was never in doubt");
    }
    // A deleted Pod is stopped with SIGTERM and finishes what it had in flight within the grace
    // period: nothing is caught in doubt.
    assert!(in_doubt.is_empty(), "sends caught in doubt by a graceful deletion: {in_doubt:?}");
    let pods = wait_pods_ready(client, 2, Duration::from_secs(120)).await;
    for p in &pods {
        assert_eq!(restarts(p), 0, "{} restarted", p.name_any());
    }

    // A rolling restart during a batch: every message Sent once, no send caught in doubt.
    let batch: Vec<String> = (0..w.scale.failover).map(|i| format!("rollout-{i:03}")).collect();
    for name in &batch {
        w.send(name, "relay").await;
    }
    let started = Instant::now();
    ok(
        "kubectl rollout restart",
        run(Command::new("kubectl").args(["-n", NS, "rollout", "restart", &format!("deployment/{RELEASE}")])),
    );
    let sent = w.wait_sent(&batch, Duration::from_secs(300)).await;
    ok(
        "kubectl rollout status",
        run(Command::new("kubectl").args([
            "-n",
            NS,
            "rollout",
            "status",
            &format!("deployment/{RELEASE}"),
            "--timeout=180s",
        ])),
    );
    let copies = w.received().await;
    for (name, id) in &sent {
        assert_eq!(
            copies.get(id),
            Some(&1),
            "{name} ({id}) arrived {:?} times during the rolling restart",
            copies.get(id)
        );
    }
    let in_doubt = doubts(client).await;
    assert!(in_doubt.is_empty(), "sends caught in doubt by a rolling restart: {in_doubt:?}");
    eprintln!(
        "e2e: rolling restart during {} messages: all Sent once in {:.1}s",
        batch.len(),
        started.elapsed().as_secs_f64()
    );

    // The chart's default requests and limits hold under a large batch: no restart, no OOM kill;
    // the leader's peak working set (usage less inactive file pages, as the kubelet counts it).
    let pods = wait_pods_ready(client, 2, Duration::from_secs(120)).await;
    let limit = pods[0]
        .spec
        .as_ref()
        .and_then(|s| s.containers[0].resources.as_ref())
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
        .map(|q| q.0.clone())
        .expect("a memory limit");
    let batch: Vec<String> = (0..w.scale.large).map(|i| format!("large-{i:04}")).collect();
    let profiles = ["graph", "relay", "exo"];
    // From the first create: the operator sends while the batch is being created.
    let started = Instant::now();
    for (i, name) in batch.iter().enumerate() {
        w.send(name, profiles[i % 3]).await;
    }
    let leader = eventually("a leader", Duration::from_secs(60), || lease_holder(client)).await;
    let leader_pod = pods.iter().find(|p| p.name_any() == leader).expect("the leader is one of the Pods");
    let cgroup = pod_memory_cgroup(leader_pod);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let (peak, cgroup) = (peak.clone(), cgroup.clone());
        tokio::spawn(async move {
            loop {
                if let Some(ws) = working_set(&cgroup) {
                    peak.fetch_max(ws, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    w.wait_sent(&batch, Duration::from_secs(900)).await;
    sampler.abort();
    assert_never_restarted(client, "the batch").await;
    eprintln!(
        "e2e: {} messages created and Sent in {:.1}s; the leader's peak working set {:.1} MiB against its limit of {limit}",
        batch.len(),
        started.elapsed().as_secs_f64(),
        peak.load(std::sync::atomic::Ordering::Relaxed) as f64 / (1024.0 * 1024.0)
    );

    backlog(&w, &limit).await;

    // Metrics: another Pod scrapes the operator through the metrics Service.
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let svc = services.get(&format!("{RELEASE}-metrics")).await.expect("the metrics Service");
    let ip = svc.spec.and_then(|s| s.cluster_ip).expect("ClusterIP");
    // OpenMetrics, as Prometheus asks for it (without the header the answer is the text format).
    let accept = "Accept: application/openmetrics-text; version=1.0.0";
    let scraped =
        toolbox(client, "scrape", &["wget", "-O-", "--header", accept, &format!("http://{ip}:8080/metrics")]).await;
    assert!(scraped.contains("# TYPE mailroom_leader gauge") && scraped.contains("# EOF"), "{scraped}");

    // Garbage collection: `mailroom send` puts a large attachment into a Secret the message
    // owns; the controller-manager's garbage collector deletes it with the message.
    let attachment = w.emu.dir.path().join("report.csv");
    std::fs::write(&attachment, "x,".repeat(60 * 1024)).expect("attachment");
    let body = w.emu.dir.path().join("body.txt");
    std::fs::write(&body, "See the report.").expect("body");
    let out = run(Command::new(required_env("MAILROOM_BIN")).args([
        "send",
        "--namespace",
        NS,
        "--profile",
        "relay",
        "--to",
        "ops@contoso.com",
        "--subject",
        "with an attachment",
        "--text-file",
        &body.display().to_string(),
        "--attach",
        &attachment.display().to_string(),
        "--wait",
        "--timeout",
        "60s",
    ]));
    ok("mailroom send --attach", out);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let owned: Vec<Secret> = secrets
        .list(&ListParams::default())
        .await
        .expect("list secrets")
        .items
        .into_iter()
        .filter(|s| s.owner_references().iter().any(|o| o.kind == "EmailMessage"))
        .collect();
    assert_eq!(owned.len(), 1, "one Secret owned by the message");
    let owner = owned[0].owner_references()[0].name.clone();
    let secret = owned[0].name_any();
    w.messages().delete(&owner, &DeleteParams::default()).await.expect("delete the message");
    let started = Instant::now();
    eventually("the garbage collector to delete the owned Secret", Duration::from_secs(60), || async {
        secrets.get_opt(&secret).await.ok().flatten().is_none().then_some(())
    })
    .await;
    eprintln!(
        "e2e: the owned Secret was collected {:.1}s after its message was deleted",
        started.elapsed().as_secs_f64()
    );

    // Upgrade with changed values: the alerts receiver, reached by another Pod, and the
    // ServiceMonitor, accepted by the Prometheus Operator's own CRD and selecting the metrics
    // Service.
    ok(
        "kubectl apply the ServiceMonitor CRD",
        run(Command::new("kubectl").args([
            "apply",
            "--server-side",
            "-f",
            &required_env("MAILROOM_E2E_SERVICEMONITOR_CRD"),
        ])),
    );
    ok(
        "the ServiceMonitor CRD is established",
        run(Command::new("kubectl").args([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/servicemonitors.monitoring.coreos.com",
        ])),
    );
    // The receiver serves HTTPS with the Secret the chart names by default.
    receiver_cert_secret(client, NS, &format!("{RELEASE}-alerts-tls")).await;
    w.install(
        &["upgrade", "--reuse-values"],
        &["--set", "alerts.enabled=true", "--set", "metrics.serviceMonitor.enabled=true"],
    );
    wait_pods_ready(client, 2, Duration::from_secs(120)).await;
    wait_receiver_certificate(client, NS).await;
    let monitor: Value = serde_json::from_str(&ok(
        "kubectl get servicemonitor",
        run(Command::new("kubectl").args(["-n", NS, "get", "servicemonitor", RELEASE, "-o", "json"])),
    ))
    .expect("ServiceMonitor JSON");
    let metrics_svc = services.get(&format!("{RELEASE}-metrics")).await.expect("the metrics Service");
    let labels = metrics_svc.metadata.labels.clone().unwrap_or_default();
    let selector = monitor["spec"]["selector"]["matchLabels"].as_object().expect("matchLabels");
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(
            labels.get(k).map(String::as_str),
            v.as_str(),
            "the ServiceMonitor does not select the metrics Service on {k}"
        );
    }
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics", "{monitor:#}");
    let alerts = services.get(&format!("{RELEASE}-alerts")).await.expect("the alerts Service");
    let alerts_ip = alerts.spec.and_then(|s| s.cluster_ip).expect("ClusterIP");
    // Another Pod reaches the receiver through the Service, and the port serves HTTPS: a plain
    // HTTP request gets the 400 that says so (tests/receiver_tls.rs covers HTTPS itself).
    let answer = toolbox(
        client,
        "alert",
        &["sh", "-c", &format!("wget -S -O- --header 'Content-Type: application/json' --post-data '{{}}' http://{alerts_ip}:8082/alerts/{NS}/none 2>&1; true")],
    )
    .await;
    assert!(answer.contains("HTTP/1.0 400"), "no answer from the alerts Service's HTTPS port: {answer}");

    // Uninstall: nothing of the release is left but the CRDs (kept on purpose).
    ok("helm uninstall", helm(&["uninstall", RELEASE, "--namespace", NS, "--wait", "--timeout", "120s"]));
    let lp = ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}"));
    eventually("the release's Pods to go", Duration::from_secs(90), || async {
        operator_pods(client).await.is_empty().then_some(())
    })
    .await;
    let left_cms = Api::<ConfigMap>::namespaced(client.clone(), NS).list(&lp).await.expect("list").items.len();
    let left_svcs = services.list(&lp).await.expect("list").items.len();
    let left_sas = Api::<ServiceAccount>::namespaced(client.clone(), NS).list(&lp).await.expect("list").items.len();
    let left_crb = Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(client.clone())
        .list(&lp)
        .await
        .expect("list")
        .items
        .len();
    let left_cr =
        Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(client.clone()).list(&lp).await.expect("list").items.len();
    assert_eq!((left_cms, left_svcs, left_sas, left_crb, left_cr), (0, 0, 0, 0, 0), "left behind by helm uninstall");
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    assert!(crds.get_opt("emailmessages.mailroom.dev").await.expect("get CRD").is_some(), "the CRDs are kept");
    let monitors = ok(
        "kubectl get servicemonitors",
        run(Command::new("kubectl").args(["-n", NS, "get", "servicemonitors", "-o", "name"])),
    );
    assert!(monitors.trim().is_empty(), "left behind by helm uninstall: {monitors}");
}

/// The kustomize base, unchanged (its image is the one imported into the node), then the alerts
/// overlay on top of it: the operator delivers, and another Pod reaches the alerts Service.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the one-node cluster: make e2e, or make test"]
async fn the_kustomize_base_and_the_alerts_overlay_run() {
    const SYSTEM: &str = "mailroom-system";
    let client = common::client().await;
    let host_ip = required_env("MAILROOM_CLUSTER_HOST_IP");
    let relay = SmtpPeer::start_on(&host_ip, &[]);
    let kubectl = |args: &[&str]| run(Command::new("kubectl").args(args).current_dir(common::repo_root()));
    let (repository, tag) = image();
    assert_eq!(
        format!("{repository}:{tag}"),
        format!("ghcr.io/mailroom-dev/mailroom:{}", env!("CARGO_PKG_VERSION")),
        "the base names the released image; the node must hold it under that name"
    );

    // The CRDs may be left by a Helm release (kept on uninstall): this apply takes them over.
    ok("kubectl apply -k deploy/base", kubectl(&["apply", "--server-side", "--force-conflicts", "-k", "deploy/base"]));
    let rollout = |what: &str| {
        ok(what, kubectl(&["-n", SYSTEM, "rollout", "status", "deployment/mailroom", "--timeout=180s"]));
    };
    rollout("the base's Deployment rolls out");
    let pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM);
    let running = pods.list(&ListParams::default().labels("app.kubernetes.io/name=mailroom")).await.expect("list pods");
    assert!(running.items.iter().any(pod_ready), "no Ready operator Pod from the base");

    // A team's namespace, a relay profile and a message: Sent by the operator of the base.
    let ns = common::namespace(&client, "kustomize", &[]).await;
    create_yaml(
        &client,
        &ns,
        &common::relay_profile("relay", 0, "")
            .replace("host: 127.0.0.1, port: 0", &format!("host: \"{host_ip}\", port: {}", relay.smtp_port)),
    )
    .await;
    let messages: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let message: EmailMessage = serde_json::from_value(json!({
        "apiVersion": "mailroom.dev/v1alpha1", "kind": "EmailMessage", "metadata": {"name": "hello"},
        "spec": {"profileRef": {"name": "relay"}, "to": ["ops@contoso.com"], "subject": "from the base", "body": {"text": "hi"}},
    }))
    .expect("EmailMessage");
    messages.create(&PostParams::default(), &message).await.expect("create message");
    common::wait_for(&messages, "hello", Duration::from_secs(120), |m| m.phase() == Some(Phase::Sent)).await;
    assert_eq!(relay.wait_messages(1, Duration::from_secs(30)).await.len(), 1);

    // The alerts overlay on top, with its certificate Secret: the receiver's Service answers
    // another Pod.
    receiver_cert_secret(&client, SYSTEM, "mailroom-alerts-tls").await;
    ok(
        "kubectl apply -k deploy/overlays/alerts",
        kubectl(&["apply", "--server-side", "--force-conflicts", "-k", "deploy/overlays/alerts"]),
    );
    rollout("the overlay's Deployment rolls out");
    wait_receiver_certificate(&client, SYSTEM).await;
    let services: Api<Service> = Api::namespaced(client.clone(), SYSTEM);
    let alerts = services.get("mailroom-alerts").await.expect("the overlay's alerts Service");
    let spec = alerts.spec.expect("spec");
    let port = spec.ports.as_ref().and_then(|p| p.first()).map(|p| p.port).expect("a port");
    let ip = spec.cluster_ip.expect("ClusterIP");
    let answer = toolbox_in(
        &client,
        &ns,
        "alert",
        &["sh", "-c", &format!("wget -S -O- --header 'Content-Type: application/json' --post-data '{{}}' http://{ip}:{port}/alerts/{ns}/none 2>&1; true")],
    )
    .await;
    assert!(answer.contains("HTTP/1.0 400"), "the alerts Service's HTTPS port did not answer: {answer}");

    ok("kubectl delete namespace", kubectl(&["delete", "namespace", &ns, "--wait=false"]));
    // The overlay's objects without the CRDs, which the chart test and others share.
    ok(
        "kubectl delete the overlay",
        kubectl(&[
            "-n",
            SYSTEM,
            "delete",
            "deployment,service,serviceaccount",
            "-l",
            "app.kubernetes.io/part-of=mailroom",
            "--wait=true",
        ]),
    );
    ok("kubectl delete the receiver's Secret", kubectl(&["-n", SYSTEM, "delete", "secret", "mailroom-alerts-tls"]));
}
