//! The chaos run: many messages through Graph (the Microsoft 365 emulator) and SMTP (a relay and
//! an XOAUTH2 server) sent by three operator replicas with leader election, while
//!
//! - the leader is killed with SIGKILL and restarted (a follower takes the Lease over once it
//!   expires);
//! - the API server is stopped for longer than the renew deadline, so that the leader steps down
//!   (it exits, as it must) and a new one is elected once the API server is back, and is
//!   restarted quickly (same port), which the replicas ride out;
//! - a proxy between the replicas and kube-apiserver loses the answers of a share of the claims
//!   (status PATCHes setting phase Sending): the claim lands, its answer never arrives;
//! - the emulator's token endpoint answers 503, 429 with Retry-After, or drops the connection
//!   (tokens live a minute here, so they are refreshed during the run), Graph fails and
//!   throttles a share of requests, and the SMTP servers cut connections in the middle of DATA.
//!
//! At the end every message is Sent or Failed with an expected reason, no delivery carries a
//! Message-ID that is not its resource's, a message is delivered more than once only as often as
//! the death of a replica (killed, or stepped down) caught it in doubt (phase Sending, claimed by
//! that replica), every "in doubt" decision the operator announced names a claim of a replica
//! that had died, and a message whose claim only lost its answer never ends DeliveryUncertain.
//!
//! It runs on a private control plane (hack/testenv.sh with its own state directory), so that the
//! API server stops disturb no other test. Scale from the environment (defaults: the short form
//! that `make test` runs; `make chaos` sets the full one):
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `MAILROOM_CHAOS_MESSAGES` | 150 | messages created |
//! | `MAILROOM_CHAOS_REPLICAS` | 3 | operator processes with `--leader-elect` |
//! | `MAILROOM_CHAOS_KILLS` | 2 | SIGKILLs of the leader, each followed by a restart of it |
//! | `MAILROOM_CHAOS_APISERVER_RESTARTS` | 1 | quick restarts of kube-apiserver |
//! | `MAILROOM_CHAOS_OUTAGES` | 1 | kube-apiserver stopped until the leader steps down |
//! | `MAILROOM_CHAOS_LOST_ANSWERS` | 0.15 | share of claims whose answer the proxy withholds |
//! | `MAILROOM_CHAOS_SEED` | random | seed of every random choice, printed at the start |
//! | `MAILROOM_CHAOS_TIMEOUT_SECS` | 420 | the run fails if messages are still unfinished then |
//! | `MAILROOM_CHAOS_TESTENV_DIR` | a temporary directory | the private control plane's state |

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::api_proxy::ApiProxy;
use common::emulator::{Emulator, concat_pems};
use common::smtp_peer::SmtpPeer;
use common::{Operator, repo_root};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use mailroom::api::{EmailMessage, MailProfile, Phase, find_condition};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const TENANT: &str = "7e3b1c2d-0000-4000-8000-00000000c4a0";
const CLIENT: &str = "9a1f0c3e-1111-4111-8111-00000000c4a1";
const SECRET: &str = "chaos-client-secret";
const SENDER: &str = "alerts@contoso.com";
const NS: &str = "chaos";
/// The reasons a message may fail with in a chaos run (RepeatedlyInterrupted only after three
/// deaths caught it in doubt, DeliveryUncertain only after one did).
const EXPECTED_FAILURES: &[&str] = &["DeliveryUncertain", "RetriesExhausted", "RepeatedlyInterrupted"];

/// The run's scale, from the environment.
#[derive(Debug, Clone)]
struct Scale {
    messages: usize,
    replicas: usize,
    kills: usize,
    apiserver_restarts: usize,
    outages: usize,
    lost_answers: f64,
    seed: u64,
    timeout: Duration,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

impl Scale {
    fn from_env() -> Scale {
        Scale {
            messages: env_num("MAILROOM_CHAOS_MESSAGES", 150),
            replicas: env_num("MAILROOM_CHAOS_REPLICAS", 3).max(2),
            kills: env_num("MAILROOM_CHAOS_KILLS", 2),
            apiserver_restarts: env_num("MAILROOM_CHAOS_APISERVER_RESTARTS", 1),
            outages: env_num("MAILROOM_CHAOS_OUTAGES", 1),
            lost_answers: env_num("MAILROOM_CHAOS_LOST_ANSWERS", 0.15),
            seed: env_num("MAILROOM_CHAOS_SEED", rand::random::<u64>() % 1_000_000),
            timeout: Duration::from_secs(env_num("MAILROOM_CHAOS_TIMEOUT_SECS", 420)),
        }
    }
}

/// A private control plane, stopped and removed when dropped.
struct ControlPlane {
    dir: PathBuf,
    kubeconfig: PathBuf,
}

fn testenv(dir: &Path, command: &str) -> std::process::Output {
    Command::new("bash")
        .arg(repo_root().join("hack/testenv.sh"))
        .arg(command)
        .env("MAILROOM_TESTENV_DIR", dir)
        .output()
        .expect("run hack/testenv.sh")
}

impl ControlPlane {
    fn up() -> ControlPlane {
        let dir = std::env::var("MAILROOM_CHAOS_TESTENV_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| std::env::temp_dir().join(format!("mailroom-chaos-{}", std::process::id())));
        let out = testenv(&dir, "up");
        assert!(out.status.success(), "hack/testenv.sh up failed:\n{}", String::from_utf8_lossy(&out.stderr));
        ControlPlane { kubeconfig: dir.join("kubeconfig"), dir }
    }

    /// Runs one of hack/testenv.sh's kube-apiserver commands and returns how long it took.
    fn apiserver(&self, command: &str) -> Duration {
        let start = Instant::now();
        let out = testenv(&self.dir, command);
        assert!(out.status.success(), "{command} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        start.elapsed()
    }

    async fn client(&self) -> Client {
        mailroom::tls::install_crypto_provider();
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("private kubeconfig");
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("config");
        Client::try_from(config).expect("client")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::env::var("MAILROOM_KEEP_TESTENV").as_deref() != Ok("1") {
            let _ = testenv(&self.dir, "down");
        }
    }
}

/// Retries an API call while the API server is away (its restart or outage), for up to two minutes.
async fn retry_api<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let start = Instant::now();
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) if start.elapsed() < Duration::from_secs(120) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in mailroom::api::crd::all() {
        let name = crd.name_any();
        crds.patch(&name, &PatchParams::apply("chaos").force(), &Patch::Apply(&crd)).await.expect("apply CRD");
    }
    for crd in mailroom::api::crd::all() {
        let name = crd.name_any();
        let start = Instant::now();
        loop {
            let c = crds.get(&name).await.expect("get CRD");
            let established = c
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "CRD {name} not established");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn create<K>(api: &Api<K>, obj: Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(obj).expect("object");
    api.create(&PostParams::default(), &obj).await.expect("create");
}

/// Which profile each message goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Route {
    Graph,
    Relay,
    Xoauth2,
}

impl Route {
    fn profile(self) -> &'static str {
        match self {
            Route::Graph => "graph",
            Route::Relay => "relay",
            Route::Xoauth2 => "xoauth2",
        }
    }
}

/// What the harness decided about one message before creating it.
#[derive(Debug, Clone)]
struct Plan {
    name: String,
    route: Route,
    resend: bool,
}

fn plans(scale: &Scale, rng: &mut StdRng) -> Vec<Plan> {
    (0..scale.messages)
        .map(|i| {
            let r: f64 = rng.random();
            let route = if r < 0.45 {
                Route::Graph
            } else if r < 0.8 {
                Route::Relay
            } else {
                Route::Xoauth2
            };
            Plan { name: format!("m-{i:05}"), route, resend: rng.random::<f64>() >= 0.15 }
        })
        .collect()
}

fn message_object(plan: &Plan) -> Value {
    json!({
        "apiVersion": "mailroom.dev/v1alpha1", "kind": "EmailMessage",
        "metadata": {"name": plan.name},
        "spec": {
            "profileRef": {"name": plan.route.profile()},
            "to": ["Ops Team <ops@contoso.com>"],
            "subject": format!("chaos {}", plan.name),
            "body": {"text": "A message of the chaos run."},
            "delivery": {"maxAttempts": 20, "onUncertain": if plan.resend { "Resend" } else { "Fail" }},
        }
    })
}

/// One delivery seen at a peer: the Message-ID it carried and the resource its subject names.
#[derive(Debug, Clone)]
struct Delivery {
    peer: &'static str,
    message_id: String,
    name: Option<String>,
}

fn name_from_subject(subject: &str) -> Option<String> {
    subject.strip_prefix("chaos ").map(str::to_string)
}

/// The Subject header of a stored .eml (unfolded enough for our one-line subjects).
fn eml_subject(raw: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    head.lines().find_map(|l| l.strip_prefix("Subject: ").map(|s| s.trim().to_string()))
}

async fn smtp_deliveries(peer_name: &'static str, peer: &SmtpPeer) -> Vec<Delivery> {
    peer.messages()
        .await
        .iter()
        .map(|envelope| Delivery {
            peer: peer_name,
            message_id: envelope["message_id"].as_str().unwrap_or_default().to_string(),
            name: eml_subject(&peer.raw(envelope)).as_deref().and_then(name_from_subject),
        })
        .collect()
}

fn phase_of(m: &EmailMessage) -> Option<Phase> {
    m.status.as_ref().and_then(|s| s.phase)
}

fn failed_reason(m: &EmailMessage) -> Option<String> {
    m.status.as_ref().and_then(|s| find_condition(&s.conditions, "Failed")).map(|c| c.reason.clone())
}

fn phase_counts(list: &[EmailMessage]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for m in list {
        let p = phase_of(m).map(|p| format!("{p:?}")).unwrap_or_else(|| "New".into());
        *counts.entry(p).or_insert(0) += 1;
    }
    counts
}

fn elapsed(start: Instant) -> String {
    format!("{:6.1}s", start.elapsed().as_secs_f64())
}

/// One operator process of the fleet; `name` is its POD_NAME, so its claims carry it
/// (`claimedBy`) and its Lease identity is `<name>_<pid>`.
struct Replica {
    name: String,
    op: Operator,
}

/// How a replica's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Death {
    /// SIGKILL from the harness while it led.
    Killed,
    /// It exited by itself after losing the Lease while the API server was stopped.
    SteppedDown,
    /// It exited by itself at another time.
    Exited,
}

/// The claims (message → attempts) that a death caught in Sending: each may have been delivered
/// before the death, so each may cost one extra copy. A claim still unresolved at a later death
/// is the same claim and is counted once.
type InDoubt = HashMap<String, BTreeSet<u32>>;

/// The operator replicas, restarted like a Deployment restarts its pods.
struct Fleet {
    replicas: Vec<Replica>,
    starts: usize,
    args: Vec<String>,
    kubeconfig: String,
    leases: Api<Lease>,
    messages: Api<EmailMessage>,
    /// Every process that died: (name, how, seconds into the run, claims caught in doubt).
    deaths: Vec<(String, Death, f64, usize)>,
    /// The names of the Lease holders seen, in order.
    leaders: Vec<String>,
    in_doubt: InDoubt,
    problems: Vec<String>,
    start: Instant,
    /// The replicas' way to the API server.
    proxy: Arc<ApiProxy>,
}

impl Fleet {
    fn spawn(&mut self) -> Replica {
        let name = format!("replica-{}", self.starts);
        self.starts += 1;
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let op = Operator::start_with_env(
            &format!("chaos-{name}"),
            NS,
            &args,
            &[("KUBECONFIG", self.kubeconfig.as_str()), ("POD_NAME", name.as_str())],
        );
        Replica { name, op }
    }

    fn start_all(&mut self, n: usize) {
        for _ in 0..n {
            let r = self.spawn();
            self.replicas.push(r);
        }
    }

    fn names(&self) -> Vec<String> {
        self.replicas.iter().map(|r| r.name.clone()).collect()
    }

    /// The replica (index) whose live process holds the Lease.
    async fn leader(&mut self) -> Option<usize> {
        let holder = self.leases.get_opt(mailroom::leader::LEASE_NAME).await.ok().flatten()?.spec?.holder_identity?;
        let (name, pid) = holder.rsplit_once('_')?;
        let i = self.replicas.iter().position(|r| r.name == name && r.op.pid().to_string() == pid)?;
        if self.leaders.last().map(String::as_str) != Some(name) {
            println!("chaos: {} {name} leads", elapsed(self.start));
            self.leaders.push(name.to_string());
        }
        Some(i)
    }

    /// Waits until a live replica leads, looking after the others meanwhile.
    async fn wait_leader(&mut self) -> usize {
        let since = Instant::now();
        loop {
            self.supervise().await;
            if let Some(i) = self.leader().await {
                return i;
            }
            assert!(
                since.elapsed() < Duration::from_secs(120),
                "no replica became the leader within 2 minutes; replicas {:?}",
                self.names()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Sleeps, looking after the replicas every 200 ms.
    async fn sleep(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.supervise().await;
            tokio::time::sleep(Duration::from_millis(200).min(until.saturating_duration_since(Instant::now()))).await;
        }
    }

    /// Restarts a replica whose process exited by itself, after noting what its death caught in
    /// doubt. Only a leader that lost its Lease may exit by itself (the Deployment restarts it);
    /// any other exit is a problem.
    async fn supervise(&mut self) {
        for i in 0..self.replicas.len() {
            let Some(status) = self.replicas[i].op.exit_status() else {
                continue;
            };
            let name = self.replicas[i].name.clone();
            let log = self.replicas[i].op.log_text();
            if !log.contains("lost the leader Lease") {
                self.problems.push(format!(
                    "{name} exited by itself ({status}) without losing the Lease; log {}",
                    self.replicas[i].op.log.display()
                ));
            }
            // It stopped at most a moment ago (the harness looks every 200 ms, through API
            // server restarts too), 10 s after its last renewal: the Lease is valid for 5 s
            // more, so no other replica has acted on its claims yet. The proxy holds them off
            // while the harness looks, which may have to wait for a restarting API server.
            self.proxy.pause();
            let caught = self.catch(&name).await;
            self.proxy.resume();
            println!(
                "chaos: {} {name} exited by itself ({status}), {caught} claim(s) caught in doubt",
                elapsed(self.start)
            );
            self.deaths.push((name, Death::Exited, self.start.elapsed().as_secs_f64(), caught));
            self.replicas[i] = self.spawn();
        }
    }

    /// Notes the claims of `holder` (dead) still in Sending; returns how many were new.
    async fn catch(&mut self, holder: &str) -> usize {
        let all = ListParams::default();
        let list = retry_api("list after a death", || self.messages.list(&all)).await;
        let mut caught = 0;
        for m in &list.items {
            let Some(s) = m.status.as_ref() else { continue };
            if s.phase == Some(Phase::Sending)
                && s.claimed_by.as_deref() == Some(holder)
                && self.in_doubt.entry(m.name_any()).or_default().insert(s.attempts.unwrap_or(0))
            {
                caught += 1;
            }
        }
        caught
    }

    /// Waits (up to `max`) until the replica `name` has a claim in Sending, so that its death
    /// catches a send in doubt (when messages are left to send at all); whether it had.
    async fn wait_for_sends(&mut self, name: &str, max: Duration) -> bool {
        let until = Instant::now() + max;
        let all = ListParams::default();
        while Instant::now() < until {
            if let Ok(list) = self.messages.list(&all).await
                && list.items.iter().any(|m| {
                    m.status
                        .as_ref()
                        .is_some_and(|s| s.phase == Some(Phase::Sending) && s.claimed_by.as_deref() == Some(name))
                })
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// SIGKILLs the leader, preferably while it sends, and starts a new replica in its place.
    async fn kill_leader(&mut self, rng: &mut StdRng) {
        let i = self.wait_leader().await;
        let name = self.replicas[i].name.clone();
        self.wait_for_sends(&name, Duration::from_secs(10)).await;
        self.replicas[i].op.kill();
        // Nothing of the dead process changes the messages from now on, except requests it
        // wrote just before it died that the proxy and the API server still carry out: look
        // twice. Its Lease stays valid for at least 10 s, so nobody else has acted meanwhile.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut caught = self.catch(&name).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        caught += self.catch(&name).await;
        println!(
            "chaos: {} killed the leader {name} (SIGKILL), {caught} claim(s) caught in doubt",
            elapsed(self.start)
        );
        self.deaths.push((name, Death::Killed, self.start.elapsed().as_secs_f64(), caught));
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..1500))).await;
        self.replicas[i] = self.spawn();
    }

    /// Stops kube-apiserver, preferably while the leader sends, until the leader stepped down (it
    /// must, after the renew deadline),
    /// then starts it again; returns how long it was away. The proxy holds the replicas off
    /// while the harness notes the claims the leader left, so the note is exact.
    async fn outage(&mut self, plane: &Arc<ControlPlane>) -> Duration {
        let proxy = Arc::clone(&self.proxy);
        let i = self.wait_leader().await;
        let name = self.replicas[i].name.clone();
        self.wait_for_sends(&name, Duration::from_secs(10)).await;
        let stopped = Instant::now();
        let p = Arc::clone(plane);
        tokio::task::spawn_blocking(move || p.apiserver("stop-apiserver")).await.expect("stop");
        println!("chaos: {} API server stopped while {name} leads", elapsed(self.start));
        let exit = loop {
            if let Some(status) = self.replicas[i].op.exit_status() {
                break status;
            }
            assert!(
                stopped.elapsed() < Duration::from_secs(60),
                "the leader {name} did not step down within 60 s of the API server stopping ({})",
                self.replicas[i].op.log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let stepped_down = stopped.elapsed();
        if !self.replicas[i].op.log_text().contains("lost the leader Lease") || exit.success() {
            self.problems.push(format!(
                "{name} exited ({exit}) during the outage but not for the lost Lease; log {}",
                self.replicas[i].op.log.display()
            ));
        }
        proxy.pause();
        let p = Arc::clone(plane);
        tokio::task::spawn_blocking(move || p.apiserver("start-apiserver")).await.expect("start");
        let away = stopped.elapsed();
        let caught = self.catch(&name).await;
        self.replicas[i] = self.spawn();
        proxy.resume();
        println!(
            "chaos: {} {name} stepped down {:.1}s after the API server stopped; it was away {:.1}s; {caught} claim(s) caught in doubt",
            elapsed(self.start),
            stepped_down.as_secs_f64(),
            away.as_secs_f64()
        );
        self.deaths.push((name, Death::SteppedDown, self.start.elapsed().as_secs_f64(), caught));
        away
    }

    /// The names of every process that died.
    fn dead(&self) -> BTreeSet<String> {
        self.deaths.iter().map(|(n, ..)| n.clone()).collect()
    }
}

/// What the operator said, in an Event, about a claim it found in doubt: (message, attempt,
/// holder). The texts are `in_doubt`'s in src/controller/message.rs: "attempt N (claimed by X)
/// was interrupted ...".
fn doubt_event(e: &Event) -> Option<(String, u32, String)> {
    let note = e.note.as_deref()?;
    if !note.contains("was interrupted") && !note.contains("stopped while sending") {
        return None;
    }
    let name = e.regarding.as_ref()?.name.clone()?;
    let attempt = note.split("attempt ").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    let holder = note.split("(claimed by ").nth(1)?.split(')').next()?.to_string();
    Some((name, attempt, holder))
}

/// Every Event in the namespace, page by page.
async fn all_events(client: &Client) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), NS);
    let mut all = Vec::new();
    let mut lp = ListParams::default().limit(500);
    loop {
        let page = retry_api("list events", || api.list(&lp)).await;
        all.extend(page.items);
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => return all,
        }
    }
}

/// One disruption of the run.
#[derive(Debug, Clone, Copy)]
enum Disruption {
    KillLeader,
    RestartApiServer,
    Outage,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_every_message_ends_sent_or_failed_and_duplicates_stay_within_the_kills() {
    let scale = Scale::from_env();
    let start = Instant::now();
    println!(
        "chaos: seed {} (replay with MAILROOM_CHAOS_SEED={}), {} messages, {} replicas, {} leader kills, {} API server restarts, {} outages, {:.0}% of claim answers lost",
        scale.seed,
        scale.seed,
        scale.messages,
        scale.replicas,
        scale.kills,
        scale.apiserver_restarts,
        scale.outages,
        scale.lost_answers * 100.0
    );
    let mut rng = StdRng::seed_from_u64(scale.seed);

    // --- the world -------------------------------------------------------------------------------
    let plane = Arc::new(ControlPlane::up());
    let client = plane.client().await;
    install_crds(&client).await;
    let ns = Namespace { metadata: ObjectMeta { name: Some(NS.into()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("namespace");
    println!("chaos: {} private control plane up in {}", elapsed(start), plane.dir.display());

    let emu = Emulator::start("chaos").await;
    // Tokens live a minute, so that they are refreshed (about every 30 s) while messages go out,
    // through the token endpoint's faults.
    emu.register_app(json!({
        "tenantId": TENANT, "clientId": CLIENT, "secrets": [SECRET], "roles": ["Mail.Send", "SMTP.SendAsApp"],
        "tokenLifetimeSeconds": 60,
    }))
    .await;
    let relay = SmtpPeer::start(&[]);
    let emu_ca = emu.ca_pem().display().to_string();
    let exo = SmtpPeer::start(&[
        "--self-signed",
        "--require-starttls",
        "--xoauth2-introspect",
        &emu.introspect_url(),
        "--xoauth2-ca",
        &emu_ca,
    ]);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    create(
        &secrets,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "entra"}, "stringData": {"secret": SECRET}}),
    )
    .await;
    let credentials = json!({
        "tenantId": TENANT, "clientId": CLIENT, "authorityHost": emu.url,
        "clientSecretRef": {"name": "entra", "key": "secret"},
    });
    // Above Graph's 4 requests in flight per mailbox, so that the emulator throttles too.
    let limits = json!({"messagesPerMinute": 100000, "maxConcurrent": 8});
    let profiles: Api<MailProfile> = Api::namespaced(client.clone(), NS);
    let mut graph = credentials.clone();
    graph["endpoint"] = json!(emu.url);
    for (name, transport) in [
        ("graph", json!({"graph": graph})),
        ("relay", json!({"smtp": {"host": "127.0.0.1", "port": relay.smtp_port, "tls": "None"}})),
        (
            "xoauth2",
            json!({"smtp": {"host": "127.0.0.1", "port": exo.smtp_port, "tls": "StartTLS", "auth": {"oauth2": credentials}}}),
        ),
    ] {
        let mut spec = json!({"senders": {"default": SENDER}, "limits": limits});
        spec.as_object_mut().expect("object").extend(transport.as_object().expect("object").clone());
        create(
            &profiles,
            json!({"apiVersion": "mailroom.dev/v1alpha1", "kind": "MailProfile", "metadata": {"name": name}, "spec": spec}),
        )
        .await;
    }

    // The token endpoint: its first three requests answer 503, 429 (Retry-After 2 s) and a dropped
    // connection, so that each fault happens at least once; after that 10% 503, 5% 429 and 5%
    // dropped connections (faults apply in the order added).
    for fault in [
        json!({"target": "token", "status": 503, "count": 1}),
        json!({"target": "token", "status": 429, "retryAfterSeconds": 2, "count": 1}),
        json!({"target": "token", "dropConnection": true, "count": 1}),
        json!({"target": "token", "status": 503, "rate": 0.1, "seed": scale.seed + 3}),
        json!({"target": "token", "status": 429, "retryAfterSeconds": 1, "rate": 0.05, "seed": scale.seed + 4}),
        json!({"target": "token", "dropConnection": true, "rate": 0.05, "seed": scale.seed + 5}),
    ] {
        emu.fault(fault).await;
    }
    // Graph: 10% 503 and 5% 429 (with Retry-After); 10% of SMTP transactions cut in DATA.
    emu.fault(json!({"target": "graph", "status": 503, "rate": 0.1, "seed": scale.seed})).await;
    emu.fault(json!({"target": "graph", "status": 429, "rate": 0.05, "retryAfterSeconds": 1, "seed": scale.seed + 1}))
        .await;
    // Every other Graph request is held 150 ms, so that more than 4 are in flight for the mailbox
    // and the emulator's concurrency limit answers 429 too.
    emu.fault(json!({"target": "graph", "latencyMs": 150, "rate": 1.0, "seed": scale.seed + 2})).await;
    // Each answer to DATA takes 100 ms, so that SMTP sends too are under way when a replica dies.
    relay.script(json!({"drop_in_data_rate": 0.1, "drop_in_data_seed": scale.seed, "latency_ms": 100})).await;
    exo.script(json!({"drop_in_data_rate": 0.1, "drop_in_data_seed": scale.seed + 1, "latency_ms": 100})).await;

    // The replicas reach the API server through the proxy that loses claim answers; the harness
    // talks to it directly.
    let proxy = Arc::new(ApiProxy::start(&plane.kubeconfig, scale.lost_answers, scale.seed + 6).await);
    let proxied = plane.dir.join("kubeconfig-proxied");
    proxy.write_kubeconfig(&proxied);

    let bundle = emu.dir.path().join("chaos-ca-bundle.pem");
    concat_pems(&bundle, &[emu.ca_pem(), exo.ca_pem()]);
    let logs = repo_root().join("target/test-logs");
    if let Ok(dir) = std::fs::read_dir(&logs) {
        for e in dir.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("chaos-replica-")) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let messages: Api<EmailMessage> = Api::namespaced(client.clone(), NS);
    let mut fleet = Fleet {
        replicas: Vec::new(),
        starts: 0,
        args: ["--ca-bundle", &bundle.display().to_string(), "--allow-custom-endpoints"]
            .iter()
            .map(|s| s.to_string())
            .chain(["--leader-elect".into(), "--leader-election-namespace".into(), NS.into()])
            .collect(),
        kubeconfig: proxied.display().to_string(),
        leases: Api::namespaced(client.clone(), NS),
        messages: messages.clone(),
        deaths: Vec::new(),
        leaders: Vec::new(),
        in_doubt: HashMap::new(),
        problems: Vec::new(),
        start,
        proxy: Arc::clone(&proxy),
    };
    fleet.start_all(scale.replicas);
    println!("chaos: {} {} replicas started (logs {}/chaos-replica-*)", elapsed(start), scale.replicas, logs.display());

    // --- messages, created in batches spread over the time the disruptions take -------------------
    // (a takeover waits for the Lease to expire, about 20 s), so that each finds sends to catch.
    let plans = plans(&scale, &mut rng);
    let created = Arc::new(AtomicUsize::new(0));
    let expected_secs = 20 * (scale.kills + scale.outages) + 8 * scale.apiserver_restarts + 5;
    let pause = Duration::from_millis((expected_secs as u64 * 1000 / (scale.messages as u64 / 25).max(1)).max(200));
    let creator = {
        let messages = messages.clone();
        let created = Arc::clone(&created);
        let plans = plans.clone();
        tokio::spawn(async move {
            for batch in plans.chunks(25) {
                futures::stream::iter(batch.iter().cloned())
                    .for_each_concurrent(8, |plan| {
                        let messages = messages.clone();
                        let created = Arc::clone(&created);
                        async move {
                            let obj: EmailMessage = serde_json::from_value(message_object(&plan)).expect("message");
                            retry_api("create message", || async {
                                match messages.create(&PostParams::default(), &obj).await {
                                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                                    other => other.map(|_| ()),
                                }
                            })
                            .await;
                            created.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                    .await;
                tokio::time::sleep(pause).await;
            }
        })
    };

    // --- progress ----------------------------------------------------------------------------------
    let done = Arc::new(AtomicBool::new(false));
    let progress = {
        let messages = messages.clone();
        let done = Arc::clone(&done);
        let created = Arc::clone(&created);
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if let Ok(list) = messages.list(&ListParams::default()).await {
                    println!(
                        "chaos: {} created {:>5}  {:?}",
                        elapsed(start),
                        created.load(Ordering::Relaxed),
                        phase_counts(&list.items)
                    );
                }
            }
        })
    };

    // --- chaos: the disruptions in a random order, each while a leader is at work ------------------
    let mut disruptions: Vec<Disruption> = std::iter::repeat_n(Disruption::KillLeader, scale.kills)
        .chain(std::iter::repeat_n(Disruption::RestartApiServer, scale.apiserver_restarts))
        .chain(std::iter::repeat_n(Disruption::Outage, scale.outages))
        .collect();
    disruptions.shuffle(&mut rng);
    // Spread over the expected delivery time (about 60 ms a message here), after each takeover.
    let gap_ms = (scale.messages as u64 * 60 / (disruptions.len() as u64 + 1)).max(1500);
    let mut apiserver_away = Vec::new();
    let mut outages_away = Vec::new();
    for d in &disruptions {
        fleet.wait_leader().await;
        let gap = Duration::from_millis(rng.random_range(gap_ms / 2..gap_ms * 3 / 2));
        fleet.sleep(gap).await;
        match d {
            Disruption::KillLeader => fleet.kill_leader(&mut rng).await,
            Disruption::RestartApiServer => {
                // A leader whose renewals fail for the whole restart steps down meanwhile: the
                // harness keeps looking after the replicas, to note what its death caught.
                let p = Arc::clone(&plane);
                let restart = tokio::task::spawn_blocking(move || p.apiserver("restart-apiserver"));
                while !restart.is_finished() {
                    fleet.sleep(Duration::from_millis(200)).await;
                }
                let away = restart.await.expect("restart");
                println!("chaos: {} API server restarted ({:.1}s away)", elapsed(start), away.as_secs_f64());
                apiserver_away.push(away);
            }
            Disruption::Outage => outages_away.push(fleet.outage(&plane).await),
        }
    }
    while !creator.is_finished() {
        fleet.sleep(Duration::from_millis(200)).await;
    }
    creator.await.expect("creator");

    // --- wait for every message to finish ----------------------------------------------------------
    let all = ListParams::default();
    let list = loop {
        fleet.supervise().await;
        let list = retry_api("list", || messages.list(&all)).await.items;
        let unfinished = list.iter().filter(|m| !phase_of(m).is_some_and(|p| p.is_finished())).count();
        if list.len() == scale.messages && unfinished == 0 {
            break list;
        }
        if start.elapsed() > scale.timeout {
            let stuck: Vec<String> = list
                .iter()
                .filter(|m| !phase_of(m).is_some_and(|p| p.is_finished()))
                .take(10)
                .map(|m| format!("{} {:?} {:?}", m.name_any(), phase_of(m), m.status))
                .collect();
            panic!(
                "{unfinished} of {} messages unfinished after {:?} (seed {}); replica logs {}/chaos-replica-*; first: {stuck:#?}",
                list.len(),
                scale.timeout,
                scale.seed,
                logs.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    done.store(true, Ordering::Relaxed);
    progress.abort();
    let total = start.elapsed();
    fleet.supervise().await;

    // --- what the peers received ---------------------------------------------------------------------
    let mut deliveries: Vec<Delivery> = emu
        .messages()
        .await
        .iter()
        .map(|m| Delivery {
            peer: "graph",
            message_id: m["messageId"].as_str().unwrap_or_default().to_string(),
            name: m["subject"].as_str().and_then(name_from_subject),
        })
        .collect();
    deliveries.extend(smtp_deliveries("relay", &relay).await);
    deliveries.extend(smtp_deliveries("xoauth2", &exo).await);

    let in_doubt = fleet.in_doubt.clone();
    let dead = fleet.dead();
    let by_name: HashMap<String, &EmailMessage> = list.iter().map(|m| (m.name_any(), m)).collect();
    let plan_of: HashMap<&str, &Plan> = plans.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut problems = std::mem::take(&mut fleet.problems);
    let mut copies: HashMap<String, usize> = HashMap::new();
    for d in &deliveries {
        let Some(name) = &d.name else {
            problems.push(format!("a delivery at {} names no message: {d:?}", d.peer));
            continue;
        };
        let Some(m) = by_name.get(name) else {
            problems.push(format!("a delivery at {} of {name}, which does not exist", d.peer));
            continue;
        };
        let own = m.status.as_ref().and_then(|s| s.message_id.clone()).unwrap_or_default();
        if d.message_id != own {
            problems
                .push(format!("{name} delivered at {} with Message-ID {} but its own is {own}", d.peer, d.message_id));
        }
        if plan_of.get(name.as_str()).map(|p| p.route.profile()) != Some(d.peer) {
            problems.push(format!("{name} delivered at {}, not through its profile", d.peer));
        }
        *copies.entry(name.clone()).or_insert(0) += 1;
    }

    let mut sent = 0;
    let mut failed: BTreeMap<String, usize> = BTreeMap::new();
    let mut duplicates = 0;
    let mut attempts = 0u64;
    let mut by_route: BTreeMap<Route, (usize, usize)> = BTreeMap::new();
    for plan in &plans {
        let Some(m) = by_name.get(&plan.name) else {
            problems.push(format!("{} was created but is gone", plan.name));
            continue;
        };
        let n = copies.get(&plan.name).copied().unwrap_or(0);
        let doubt = in_doubt.get(&plan.name).map(BTreeSet::len).unwrap_or(0);
        attempts += u64::from(m.status.as_ref().and_then(|s| s.attempts).unwrap_or(0));
        let entry = by_route.entry(plan.route).or_default();
        match phase_of(m) {
            Some(Phase::Sent) => {
                sent += 1;
                entry.0 += 1;
                if n == 0 {
                    problems.push(format!("{} is Sent but no peer received it", plan.name));
                }
            }
            Some(Phase::Failed) => {
                entry.1 += 1;
                let reason = failed_reason(m).unwrap_or_default();
                if !EXPECTED_FAILURES.contains(&reason.as_str()) {
                    problems.push(format!("{} Failed with unexpected reason {reason:?}: {:?}", plan.name, m.status));
                }
                // A claim whose answer was lost is no claim in doubt: only a death makes one.
                if reason == "DeliveryUncertain" && (plan.resend || doubt == 0) {
                    problems.push(format!(
                        "{} Failed DeliveryUncertain but onUncertain is {} and deaths caught {doubt} of its sends in doubt",
                        plan.name,
                        if plan.resend { "Resend" } else { "Fail" }
                    ));
                }
                if reason == "RepeatedlyInterrupted"
                    && doubt < mailroom::controller::message::MAX_INTERRUPTIONS as usize
                {
                    problems.push(format!("{} Failed RepeatedlyInterrupted after {doubt} deaths caught it", plan.name));
                }
                *failed.entry(reason).or_insert(0) += 1;
            }
            other => problems.push(format!("{} ended in {other:?}", plan.name)),
        }
        if n > 1 {
            duplicates += n - 1;
            // Each send of it that a death caught in doubt may have cost one extra copy, no more;
            // a message with onUncertain Fail is never sent again after a death.
            let allowed = if plan.resend { doubt } else { 0 };
            if n - 1 > allowed {
                problems.push(format!("{} delivered {n} times but only {doubt} of its sends were in doubt", plan.name));
            }
        }
    }

    // Every claim the operator took as in doubt was a dead replica's, caught by its death.
    let events = all_events(&client).await;
    let mut doubt_decisions = BTreeSet::new();
    for (name, attempt, holder) in events.iter().filter_map(doubt_event) {
        if !doubt_decisions.insert((name.clone(), attempt)) {
            continue;
        }
        if !dead.contains(&holder) {
            problems.push(format!("{name}: attempt {attempt} taken as in doubt, but its holder {holder} never died"));
        } else if !in_doubt.get(&name).is_some_and(|a| a.contains(&attempt)) {
            problems.push(format!(
                "{name}: attempt {attempt} of {holder} taken as in doubt, but no death caught it in Sending"
            ));
        }
    }

    // --- figures -------------------------------------------------------------------------------------
    let faults = emu.fault_list().await;
    let injected = |target: &str, status: u64| -> u64 {
        faults
            .iter()
            .filter(|f| f["target"] == target && f["status"] == status)
            .map(|f| f["injected"].as_u64().unwrap_or(0))
            .sum()
    };
    let token_requests = emu.token_requests().await;
    let token_outcome = |outcome: &str| token_requests.iter().filter(|r| r["outcome"] == outcome).count();
    let stats = emu.stats().await;
    let throttled = stats["concurrencyThrottled"].as_u64().unwrap_or(0);
    let relay_stats = relay.stats().await;
    let exo_stats = exo.stats().await;
    let drops = relay_stats["dropped"].as_u64().unwrap_or(0) + exo_stats["dropped"].as_u64().unwrap_or(0);
    let lost = proxy.lost_answers();
    let lost_landed = lost.iter().filter(|l| l.status == 200).count();
    let in_doubt_total: usize = in_doubt.values().map(BTreeSet::len).sum();
    let deaths_of = |how: Death| fleet.deaths.iter().filter(|d| d.1 == how).count();
    let deaths_in_doubt = fleet.deaths.iter().filter(|d| d.3 > 0).count();
    let away =
        |v: &[Duration]| v.iter().map(|d| format!("{:.1}s away", d.as_secs_f64())).collect::<Vec<_>>().join(", ");
    let rows = [
        ("seed".to_string(), scale.seed.to_string()),
        ("messages".into(), scale.messages.to_string()),
        (
            "  by profile (sent/failed)".into(),
            by_route.iter().map(|(r, (s, f))| format!("{} {s}/{f}", r.profile())).collect::<Vec<_>>().join(", "),
        ),
        ("sent".into(), sent.to_string()),
        (
            "failed".into(),
            format!(
                "{} ({})",
                failed.values().sum::<usize>(),
                failed.iter().map(|(r, n)| format!("{r} {n}")).collect::<Vec<_>>().join(", ")
            ),
        ),
        ("lost (not Sent or Failed)".into(), (scale.messages - sent - failed.values().sum::<usize>()).to_string()),
        ("deliveries at the peers".into(), deliveries.len().to_string()),
        ("duplicates (same Message-ID)".into(), duplicates.to_string()),
        ("replicas (processes started)".into(), format!("{} ({})", scale.replicas, fleet.starts)),
        ("leaders in turn".into(), fleet.leaders.len().to_string()),
        ("leader kills (SIGKILL)".into(), deaths_of(Death::Killed).to_string()),
        ("leader step-downs (API server stopped)".into(), deaths_of(Death::SteppedDown).to_string()),
        ("other exits (lost Lease)".into(), deaths_of(Death::Exited).to_string()),
        ("  deaths that caught sends in doubt".into(), deaths_in_doubt.to_string()),
        ("  sends in doubt (message, attempt)".into(), in_doubt_total.to_string()),
        ("  claims taken as in doubt (Events)".into(), doubt_decisions.len().to_string()),
        ("API server restarts".into(), format!("{} ({})", apiserver_away.len(), away(&apiserver_away))),
        ("API server outages".into(), format!("{} ({})", outages_away.len(), away(&outages_away))),
        ("claims seen by the proxy".into(), proxy.claims().to_string()),
        ("  answers lost (claim landed)".into(), format!("{} ({lost_landed})", lost.len())),
        ("attempts (retries)".into(), format!("{attempts} ({})", attempts.saturating_sub(scale.messages as u64))),
        ("token requests".into(), token_requests.len().to_string()),
        (
            "  token faults: 503 / 429 / dropped".into(),
            format!(
                "{} / {} / {}",
                token_outcome("fault:503"),
                token_outcome("fault:429"),
                token_outcome("fault:dropped")
            ),
        ),
        ("Graph 503 injected".into(), injected("graph", 503).to_string()),
        ("Graph 429 injected".into(), injected("graph", 429).to_string()),
        ("Graph 429 from the concurrency limit".into(), throttled.to_string()),
        ("SMTP connections cut in DATA".into(), drops.to_string()),
        ("total time".into(), format!("{:.1}s", total.as_secs_f64())),
    ];
    println!("\nchaos summary");
    println!("| {:<40} | {:<40} |", "figure", "value");
    println!("|{:-<42}|{:-<42}|", "", "");
    for (k, v) in &rows {
        println!("| {k:<40} | {v:<40} |");
    }
    println!();

    assert!(problems.is_empty(), "{} problem(s) (seed {}):\n{}", problems.len(), scale.seed, problems.join("\n"));
    // The faults were really there, or the run proved nothing.
    assert!(injected("graph", 503) > 0 && drops > 0, "no faults were injected: {faults:?} {relay_stats} {exo_stats}");
    for outcome in ["fault:503", "fault:429", "fault:dropped"] {
        assert!(token_outcome(outcome) > 0, "no token request got {outcome}: {token_requests:?}");
    }
    if scale.lost_answers > 0.0 {
        assert!(lost_landed > 0, "no claim lost its answer ({} claims seen)", proxy.claims());
    }
    assert_eq!(deaths_of(Death::Killed), scale.kills, "every kill was of a leader");
    assert_eq!(deaths_of(Death::SteppedDown), scale.outages, "every outage made the leader step down");
    // After the last death a new leader was elected and finished the work.
    fleet.wait_leader().await;
    assert!(fleet.leaders.len() > scale.kills + scale.outages, "leaders in turn: {:?}", fleet.leaders);
    drop(fleet);
}
