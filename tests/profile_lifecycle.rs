//! A profile's lifecycle frees what the operator holds for it: deleting profiles of any
//! transport, or changing a profile's token scope or transport, leaves no registry entry, token
//! cache or rate-limit mailbox behind, and no token is requested for what is gone. The real API
//! server, the Microsoft 365 emulator and the SMTP test server; the operator's gauges
//! (`mailroom_profiles`, `mailroom_token_caches`, `mailroom_rate_limit_mailboxes`) on /metrics.

mod common;

use std::time::{Duration, Instant};

use common::emulator::Emulator;
use common::smtp_peer::SmtpPeer;
use common::{Operator, phase};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use mailroom::api::{ClusterMailProfile, EmailMessage, MailProfile, Phase, find_condition};
use serde_json::{Value, json};

const TENANT: &str = "3c4d5e6f-0000-4000-8000-00000000fe01";
const CLIENT: &str = "3c4d5e6f-1111-4111-8111-00000000fe02";
const SECRET: &str = "lifecycle-secret-1";
const SENDER: &str = "alerts@contoso.com";
const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";
const OUTLOOK_SCOPE: &str = "https://outlook.office365.com/.default";
/// Short-lived tokens, refreshed every 5 s while their profile exists: a cache left behind shows
/// within seconds.
const LIFETIME: u64 = 10;
const WAIT: Duration = Duration::from_secs(90);
/// The tokens of the 1,000-profile run: refreshed after 2.5 minutes, so that 500 Graph profiles
/// ask the emulator for about 3 tokens a second.
const SCALE_LIFETIME: u64 = 300;

/// One test's world: a namespace, the emulator, the SMTP test server and the operator.
struct World {
    client: Client,
    ns: String,
    emu: Emulator,
    smtp: SmtpPeer,
    op: Operator,
    metrics: String,
    /// The gauges (profiles, token caches) for what existed before the test.
    base: (f64, f64),
}

impl World {
    async fn new(test: &'static str, apps: &[&str]) -> World {
        World::with_token_lifetime(test, apps, LIFETIME).await
    }

    /// A world whose apps' tokens live `lifetime` seconds.
    async fn with_token_lifetime(test: &'static str, apps: &[&str], lifetime: u64) -> World {
        let client = common::client().await;
        let ns = common::namespace(&client, test, &[]).await;
        let emu = Emulator::start(test).await;
        for client_id in apps {
            emu.register_app(json!({
                "tenantId": TENANT, "clientId": client_id, "secrets": [SECRET], "roles": ["Mail.Send"],
                "tokenLifetimeSeconds": lifetime,
            }))
            .await;
        }
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "graph"}, "stringData": {"client-secret": SECRET},
        }))
        .expect("Secret");
        Api::<Secret>::namespaced(client.clone(), &ns).create(&PostParams::default(), &secret).await.expect("Secret");
        let smtp = SmtpPeer::start(&[]);
        let ca = emu.ca_pem().display().to_string();
        let op = Operator::start(test, &ns, &["--ca-bundle", &ca, "--allow-custom-endpoints"]);
        let metrics = metrics_address(&op).await;
        let mut w = World { client, ns, emu, smtp, op, metrics, base: (0.0, 0.0) };
        w.base = w.baseline().await;
        w
    }

    /// What the gauges read for the ClusterMailProfiles that exist before the test (another
    /// test's, say), once the operator has resolved each: the test's figures come on top.
    async fn baseline(&self) -> (f64, f64) {
        let cluster = Api::<ClusterMailProfile>::all(self.client.clone());
        let count = cluster.list(&Default::default()).await.expect("ClusterMailProfiles").items.len() as f64;
        let start = Instant::now();
        while self.gauge("mailroom_profiles").await < count {
            assert!(start.elapsed() < WAIT, "the operator did not resolve the {count} existing ClusterMailProfiles");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        (self.gauge("mailroom_profiles").await, self.gauge("mailroom_token_caches").await)
    }

    fn profiles(&self) -> Api<MailProfile> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn graph_spec(&self, client_id: &str) -> Value {
        json!({
            "senders": {"default": SENDER},
            "graph": {
                "tenantId": TENANT, "clientId": client_id, "authorityHost": self.emu.url, "endpoint": self.emu.url,
                "clientSecretRef": {"name": "graph", "key": "client-secret"},
            },
        })
    }

    fn relay_spec(&self) -> Value {
        json!({"senders": {"default": SENDER}, "smtp": {"host": "127.0.0.1", "port": self.smtp.smtp_port, "tls": "None"}})
    }

    async fn create_profile(&self, name: &str, spec: Value) {
        let profile: MailProfile = serde_json::from_value(json!({
            "apiVersion": "mailroom.dev/v1alpha1", "kind": "MailProfile", "metadata": {"name": name}, "spec": spec,
        }))
        .expect("MailProfile");
        self.profiles().create(&PostParams::default(), &profile).await.unwrap_or_else(|e| panic!("create {name}: {e}"));
    }

    /// Waits until every profile of the namespace is `Ready=True`. A stall fails it: no profile
    /// more Ready for [`WAIT`] (1,000 token requests at once take a loaded machine a while).
    async fn wait_all_ready(&self, count: usize) {
        let (mut last_ready, mut last_progress) = (0, Instant::now());
        loop {
            let all = self.profiles().list(&Default::default()).await.expect("list profiles").items;
            let ready = all.iter().filter(|p| ready_status(p) == Some("True")).count();
            if all.len() == count && ready == count {
                return;
            }
            if ready > last_ready {
                (last_ready, last_progress) = (ready, Instant::now());
            }
            assert!(last_progress.elapsed() < WAIT, "{ready} of {count} profiles Ready, none more for {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn send(&self, name: &str, profile: &str) {
        let message: EmailMessage = serde_json::from_value(json!({
            "apiVersion": "mailroom.dev/v1alpha1", "kind": "EmailMessage", "metadata": {"name": name},
            "spec": {"profileRef": {"name": profile}, "to": ["ops@contoso.com"], "subject": name, "body": {"text": "t"}},
        }))
        .expect("EmailMessage");
        let api: Api<EmailMessage> = Api::namespaced(self.client.clone(), &self.ns);
        api.create(&PostParams::default(), &message).await.unwrap_or_else(|e| panic!("create {name}: {e}"));
    }

    async fn wait_sent(&self, name: &str) {
        let api: Api<EmailMessage> = Api::namespaced(self.client.clone(), &self.ns);
        common::wait_for(&api, name, WAIT, |m| {
            assert_ne!(phase(m), Some(Phase::Failed), "{name}: {:#?}", m.status);
            phase(m) == Some(Phase::Sent)
        })
        .await;
    }

    /// The operator's gauge `name`.
    async fn gauge(&self, name: &str) -> f64 {
        let text = common::http()
            .get(format!("http://{}/metrics", self.metrics))
            .send()
            .await
            .expect("/metrics")
            .text()
            .await
            .expect("/metrics text");
        let prefix = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
    }

    /// Waits until the gauges read `profiles`, `caches` and `mailboxes` (above the baseline).
    async fn wait_gauges(&self, profiles: f64, caches: f64, mailboxes: f64) {
        let (profiles, caches) = (profiles + self.base.0, caches + self.base.1);
        let start = Instant::now();
        loop {
            let now = (
                self.gauge("mailroom_profiles").await,
                self.gauge("mailroom_token_caches").await,
                self.gauge("mailroom_rate_limit_mailboxes").await,
            );
            if now == (profiles, caches, mailboxes) {
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "gauges (profiles, token caches, mailboxes) {now:?}, not {:?}; log {}",
                (profiles, caches, mailboxes),
                self.op.log.display()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Successful token requests so far for `client_id` and `scope`.
    async fn tokens(&self, client_id: &str, scope: &str) -> usize {
        self.emu
            .token_requests()
            .await
            .iter()
            .filter(|t| t["clientId"] == client_id && t["scope"] == scope && t["outcome"] == "success")
            .count()
    }
}

fn ready_status(p: &MailProfile) -> Option<&str> {
    p.status.as_ref().and_then(|s| find_condition(&s.conditions, "Ready")).map(|c| c.status.as_str())
}

/// The metrics address the operator logged (`metrics=127.0.0.1:PORT`).
async fn metrics_address(op: &Operator) -> String {
    let start = Instant::now();
    loop {
        let log = op.log_text();
        if let Some(addr) = log.split_whitespace().find_map(|w| w.strip_prefix("metrics=")) {
            return addr.to_string();
        }
        assert!(start.elapsed() < WAIT, "the operator never logged its metrics address:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The operator's resident set (`VmRSS` in /proc/PID/status), in bytes.
fn vm_rss(op: &Operator) -> u64 {
    proc_status(op, "VmRSS:")
}

/// A figure of /proc/PID/status in bytes (`VmRSS:`, `VmHWM:`).
fn proc_status(op: &Operator, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", op.pid())).expect("/proc/PID/status");
    let line = status.lines().find(|l| l.starts_with(field)).expect("the field in /proc/PID/status");
    let kib: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("a number of kB");
    kib * 1024
}

const MIB: u64 = 1024 * 1024;

/// How far above its baseline the operator's resident set may stay once 1,000 profiles it held
/// are deleted. The baseline is taken after the operator has served a profile of each kind once
/// (so the code of a token request, a TLS handshake and a send is paged in and counted in it);
/// what may remain above it is what scales with the peak, not with the profiles ever created:
/// the allocator's metadata, which grows with the peak and is never returned, partly used pages
/// of what lives on (the watch caches' and maps' grown tables), more code paged in, and the API
/// client's pooled connections. Measured in the debug build the tests run: 9.6 to 11.5 MiB above.
/// A profile's state left behind (before deletions freed it) left over 50 MiB.
const RSS_AFTER_DELETION: u64 = 16 * MIB;

/// How far above the baseline the operator's peak resident set (`VmHWM`) may go while it holds
/// 1,000 profiles (500 of them Graph, with a token each). Measured in the debug build: 36 MiB
/// above with one HTTP client per set of trust roots; 65 MiB with a client and connection pool
/// per profile and another for its token requests (63 MiB in a release build, against 25 now).
const PEAK_WITH_PROFILES: u64 = 48 * MIB;

/// Creates `count` profiles (every other one Graph with a client secret, the rest SMTP relays),
/// sends through a few of each, deletes them all, and checks that nothing is left: the gauges
/// return to zero and no token is requested afterwards. `MAILROOM_LIFECYCLE_PROFILES` changes
/// the count (`make bench` runs 1,000 and reports the memory). With `rss_bound`, the operator's
/// resident set must also come back to within that many bytes of its baseline.
async fn create_and_delete_profiles(test: &'static str, count: usize, rss_bound: Option<u64>) {
    // 500 Graph profiles refreshing 10 s tokens every 5 s would ask the emulator for 100 tokens a
    // second: at scale the tokens live 5 minutes, and the check after the deletions is that no
    // token cache is left (the gauge) and no token is requested while the memory comes back.
    let lifetime = if count > 100 { SCALE_LIFETIME } else { LIFETIME };
    let w = World::with_token_lifetime(test, &[CLIENT], lifetime).await;
    let baseline = match rss_bound {
        Some(_) => Some(warm_up(&w).await),
        None => None,
    };
    let started = Instant::now();
    let names: Vec<String> = (0..count).map(|i| format!("p-{i:04}")).collect();
    let graph = |i: usize| i.is_multiple_of(2);
    futures::stream::iter(names.iter().enumerate())
        .for_each_concurrent(16, |(i, name)| {
            let spec = if graph(i) { w.graph_spec(CLIENT) } else { w.relay_spec() };
            let w = &w;
            async move { w.create_profile(name, spec).await }
        })
        .await;
    w.wait_all_ready(count).await;
    let graphs = (0..count).filter(|&i| graph(i)).count();
    // A few sends through each kind: their mailboxes get rate-limit state.
    let senders: Vec<&String> = names.iter().take(6).collect();
    for (i, profile) in senders.iter().enumerate() {
        w.send(&format!("m-{i}"), profile).await;
    }
    for i in 0..senders.len() {
        w.wait_sent(&format!("m-{i}")).await;
    }
    w.wait_gauges(count as f64, graphs as f64, senders.len() as f64).await;
    eprintln!("{count} profiles ready and sending after {:.1}s", started.elapsed().as_secs_f64());
    if let Some(baseline) = baseline {
        let peak = proc_status(&w.op, "VmHWM:");
        eprintln!(
            "VmHWM with {count} profiles: {:.1} MiB, baseline VmRSS {:.1} MiB (bound: baseline + {} MiB)",
            peak as f64 / MIB as f64,
            baseline as f64 / MIB as f64,
            PEAK_WITH_PROFILES / MIB
        );
        assert!(peak <= baseline + PEAK_WITH_PROFILES, "VmHWM {peak} bytes with {count} profiles");
    }

    futures::stream::iter(names.iter())
        .for_each_concurrent(16, |name| {
            let api = w.profiles();
            async move { api.delete(name, &DeleteParams::default()).await.map(|_| ()).expect("delete") }
        })
        .await;
    w.wait_gauges(0.0, 0.0, 0.0).await;
    eprintln!("all freed after {:.1}s", started.elapsed().as_secs_f64());
    let after = w.tokens(CLIENT, GRAPH_SCOPE).await;
    assert!(after >= graphs, "each Graph profile had its token: {after} < {graphs}");
    // Over more than one refresh interval of the deleted profiles' tokens (at scale: while the
    // memory comes back, below): nothing.
    if lifetime == LIFETIME {
        tokio::time::sleep(Duration::from_secs(LIFETIME / 2 + 3)).await;
        assert_eq!(w.tokens(CLIENT, GRAPH_SCOPE).await, after, "tokens requested for deleted profiles");
    }
    let log = w.op.log_text();
    assert!(log.contains("profile deleted: its token refreshes stopped"), "log {}", w.op.log.display());
    assert!(log.contains("profile deleted: its transport and limits freed"), "log {}", w.op.log.display());

    if let (Some(bound), Some(baseline)) = (rss_bound, baseline) {
        // Freed pages go back to the system from the allocator's background thread, about a
        // second after they were freed: wait for it, with a generous limit.
        let start = Instant::now();
        let mut rss = vm_rss(&w.op);
        while rss > baseline + bound && start.elapsed() < WAIT {
            tokio::time::sleep(Duration::from_millis(500)).await;
            rss = vm_rss(&w.op);
        }
        eprintln!(
            "VmRSS: baseline {:.1} MiB, after {count} profiles were deleted {:.1} MiB (bound: baseline + {} MiB)",
            baseline as f64 / MIB as f64,
            rss as f64 / MIB as f64,
            bound / MIB
        );
        assert!(
            rss <= baseline + bound,
            "VmRSS {rss} bytes after the deletions, over the baseline {baseline} + {bound} bytes; log {}",
            w.op.log.display()
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(w.tokens(CLIENT, GRAPH_SCOPE).await, after, "tokens requested for deleted profiles");
    }
}

/// Serves one profile of each kind once (a token, a Graph send, a relay send) and deletes them,
/// then returns the operator's resident set: the baseline, with the code those paths run paged in.
async fn warm_up(w: &World) -> u64 {
    w.create_profile("warm-graph", w.graph_spec(CLIENT)).await;
    w.create_profile("warm-relay", w.relay_spec()).await;
    w.wait_all_ready(2).await;
    w.send("warm-0", "warm-graph").await;
    w.send("warm-1", "warm-relay").await;
    w.wait_sent("warm-0").await;
    w.wait_sent("warm-1").await;
    for name in ["warm-graph", "warm-relay"] {
        w.profiles().delete(name, &DeleteParams::default()).await.expect("delete");
    }
    w.wait_gauges(0.0, 0.0, 0.0).await;
    // The messages stay (their profile gone, finished): deleted so that the namespace holds only
    // the profiles the test counts.
    let messages: Api<EmailMessage> = Api::namespaced(w.client.clone(), &w.ns);
    for name in ["warm-0", "warm-1"] {
        messages.delete(name, &DeleteParams::default()).await.expect("delete");
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    vm_rss(&w.op)
}

#[tokio::test]
async fn deleted_profiles_leave_nothing_behind() {
    let count = std::env::var("MAILROOM_LIFECYCLE_PROFILES").ok().and_then(|n| n.parse().ok()).unwrap_or(100);
    create_and_delete_profiles("lifecycle", count, None).await;
}

/// The same at the scale of `make bench`'s memory figure, and the memory comes back: the
/// operator's resident set returns to within [`RSS_AFTER_DELETION`] of its baseline.
#[tokio::test]
async fn a_thousand_deleted_profiles_give_their_memory_back() {
    create_and_delete_profiles("lifecycle-scale", 1000, Some(RSS_AFTER_DELETION)).await;
}

/// A profile that changes its token scope stops refreshing the old scope's token at once, and one
/// that changes from Graph to an SMTP relay stops refreshing tokens at all; each keeps sending.
#[tokio::test]
async fn a_changed_scope_or_transport_drops_the_old_token() {
    const MOVED: &str = "3c4d5e6f-2222-4222-8222-00000000fe03";
    const RELAYED: &str = "3c4d5e6f-3333-4333-8333-00000000fe04";
    let w = World::new("lifecycle-change", &[MOVED, RELAYED]).await;
    w.create_profile("moved", w.graph_spec(MOVED)).await;
    w.create_profile("relayed", w.graph_spec(RELAYED)).await;
    w.wait_all_ready(2).await;
    w.wait_gauges(2.0, 2.0, 0.0).await;

    // Another scope for the first (as a tokenScope or another cloud would give), a relay for the second.
    let patch = json!({"spec": {"graph": {"tokenScope": OUTLOOK_SCOPE}}});
    w.profiles().patch("moved", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch");
    let relay = json!({"spec": {"graph": null, "smtp": w.relay_spec()["smtp"]}});
    w.profiles().patch("relayed", &PatchParams::default(), &Patch::Merge(&relay)).await.expect("patch");

    let start = Instant::now();
    while w.tokens(MOVED, OUTLOOK_SCOPE).await == 0 {
        assert!(start.elapsed() < WAIT, "no token for the new scope");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w.wait_gauges(2.0, 1.0, 0.0).await;
    let transport = |p: &MailProfile| p.status.as_ref().and_then(|s| s.transport.clone());
    common::wait_for(&w.profiles(), "relayed", WAIT, |p| {
        transport(p).as_deref() == Some("smtp-relay")
            && ready_status(p) == Some("True")
            && p.status.as_ref().is_some_and(|s| s.token.is_none())
    })
    .await;
    let (old_scope, relayed) = (w.tokens(MOVED, GRAPH_SCOPE).await, w.tokens(RELAYED, GRAPH_SCOPE).await);
    let new_scope = w.tokens(MOVED, OUTLOOK_SCOPE).await;
    tokio::time::sleep(Duration::from_secs(LIFETIME / 2 + 3)).await;
    assert_eq!(w.tokens(MOVED, GRAPH_SCOPE).await, old_scope, "the old scope's token is still refreshed");
    assert_eq!(w.tokens(RELAYED, GRAPH_SCOPE).await, relayed, "a relay profile still refreshes a token");
    assert!(w.tokens(MOVED, OUTLOOK_SCOPE).await > new_scope, "the new scope's token is refreshed");

    // The relay sends; the queue of the profile's mailbox is freed with the profile.
    w.send("after-change", "relayed").await;
    w.wait_sent("after-change").await;
    w.wait_gauges(2.0, 1.0, 1.0).await;
    w.profiles().delete("relayed", &DeleteParams::default()).await.expect("delete");
    w.wait_gauges(1.0, 1.0, 0.0).await;
}

/// The operator binary carries its allocator options (a background thread purging freed pages
/// after about a second), so memory freed by deleted profiles goes back while it is idle. jemalloc
/// prints the options in force when asked to through its environment variable.
#[test]
fn the_operator_returns_freed_memory_while_idle() {
    let bin = std::env::var("MAILROOM_BIN")
        .unwrap_or_else(|_| common::repo_root().join("target/debug/mailroom").display().to_string());
    let out = std::process::Command::new(bin)
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .output()
        .expect("run the operator binary");
    let stats = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    for option in ["opt.background_thread: true", "opt.dirty_decay_ms: 1000", "opt.muzzy_decay_ms: 0"] {
        assert!(
            stats.contains(option),
            "{option} not in force:\n{}",
            stats.lines().take(40).collect::<Vec<_>>().join("\n")
        );
    }
}
