//! The chaos run: many messages through Graph (the Microsoft 365 emulator) and SMTP (a relay and
//! an XOAUTH2 server) while the operator is killed with SIGKILL and restarted, the API server is
//! restarted, the emulator fails and throttles a share of requests and the SMTP servers cut
//! connections in the middle of DATA. At the end every message is Sent or Failed with an
//! expected reason, no delivery carries a Message-ID that is not its resource's, and a message is
//! delivered more than once only as often as a kill caught it in doubt (phase Sending).
//!
//! It runs on a private control plane (hack/testenv.sh with its own state directory), so that the
//! API server restart disturbs no other test. Scale from the environment (defaults: the short
//! form that `make test` runs; `make chaos` sets the full one):
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `MAILROOM_CHAOS_MESSAGES` | 150 | messages created |
//! | `MAILROOM_CHAOS_KILLS` | 3 | SIGKILLs of the operator, each followed by a restart |
//! | `MAILROOM_CHAOS_APISERVER_RESTARTS` | 1 | restarts of kube-apiserver |
//! | `MAILROOM_CHAOS_SEED` | random | seed of every random choice, printed at the start |
//! | `MAILROOM_CHAOS_TIMEOUT_SECS` | 300 | the run fails if messages are still unfinished then |
//! | `MAILROOM_CHAOS_TESTENV_DIR` | a temporary directory | the private control plane's state |

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::emulator::{Emulator, concat_pems};
use common::smtp_peer::SmtpPeer;
use common::{Operator, repo_root};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use mailroom::api::{EmailMessage, MailProfile, Phase, find_condition};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const TENANT: &str = "7e3b1c2d-0000-4000-8000-00000000c4a0";
const CLIENT: &str = "9a1f0c3e-1111-4111-8111-00000000c4a1";
const SECRET: &str = "chaos-client-secret";
const SENDER: &str = "alerts@contoso.com";
const NS: &str = "chaos";
/// The reasons a message may fail with in a chaos run.
const EXPECTED_FAILURES: &[&str] = &["DeliveryUncertain", "RetriesExhausted"];

/// The run's scale, from the environment.
#[derive(Debug, Clone)]
struct Scale {
    messages: usize,
    kills: usize,
    apiserver_restarts: usize,
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
            kills: env_num("MAILROOM_CHAOS_KILLS", 3),
            apiserver_restarts: env_num("MAILROOM_CHAOS_APISERVER_RESTARTS", 1),
            seed: env_num("MAILROOM_CHAOS_SEED", rand::random::<u64>() % 1_000_000),
            timeout: Duration::from_secs(env_num("MAILROOM_CHAOS_TIMEOUT_SECS", 300)),
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

    /// Restarts kube-apiserver (same port, same etcd) and returns how long it was away.
    fn restart_apiserver(&self) -> Duration {
        let start = Instant::now();
        let out = testenv(&self.dir, "restart-apiserver");
        assert!(out.status.success(), "restart-apiserver failed:\n{}", String::from_utf8_lossy(&out.stderr));
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

/// Retries an API call while the API server is away (its restart), for up to a minute.
async fn retry_api<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let start = Instant::now();
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) if start.elapsed() < Duration::from_secs(60) => {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_every_message_ends_sent_or_failed_and_duplicates_stay_within_the_kills() {
    let scale = Scale::from_env();
    let start = Instant::now();
    println!(
        "chaos: seed {} (replay with MAILROOM_CHAOS_SEED={}), {} messages, {} kills, {} API server restarts",
        scale.seed, scale.seed, scale.messages, scale.kills, scale.apiserver_restarts
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
    emu.register_app(json!({
        "tenantId": TENANT, "clientId": CLIENT, "secrets": [SECRET], "roles": ["Mail.Send", "SMTP.SendAsApp"],
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

    // Faults: 10% 503 and 5% 429 (with Retry-After) from Graph, 10% of SMTP transactions cut in DATA.
    emu.fault(json!({"target": "graph", "status": 503, "rate": 0.1, "seed": scale.seed})).await;
    emu.fault(json!({"target": "graph", "status": 429, "rate": 0.05, "retryAfterSeconds": 1, "seed": scale.seed + 1}))
        .await;
    // Every other Graph request is held 150 ms, so that more than 4 are in flight for the mailbox
    // and the emulator's concurrency limit answers 429 too (faults apply in the order added).
    emu.fault(json!({"target": "graph", "latencyMs": 150, "rate": 1.0, "seed": scale.seed + 2})).await;
    relay.script(json!({"drop_in_data_rate": 0.1, "drop_in_data_seed": scale.seed})).await;
    exo.script(json!({"drop_in_data_rate": 0.1, "drop_in_data_seed": scale.seed + 1})).await;

    let bundle = emu.dir.path().join("chaos-ca-bundle.pem");
    concat_pems(&bundle, &[emu.ca_pem(), exo.ca_pem()]);
    let bundle = bundle.display().to_string();
    let kubeconfig = plane.kubeconfig.display().to_string();
    let start_operator = || {
        Operator::start_with_env(
            "chaos",
            NS,
            &["--ca-bundle", &bundle, "--allow-custom-endpoints"],
            &[("KUBECONFIG", kubeconfig.as_str())],
        )
    };
    // Every start of the operator appends to one log; it starts empty for this run.
    let _ = std::fs::remove_file(repo_root().join("target/test-logs/chaos-chaos.log"));
    let mut operator = start_operator();
    let log = operator.log.clone();
    println!("chaos: {} operator started (log {})", elapsed(start), log.display());

    // --- messages, created over the first part of the run ------------------------------------------
    let plans = plans(&scale, &mut rng);
    let messages: Api<EmailMessage> = Api::namespaced(client.clone(), NS);
    let created = Arc::new(AtomicUsize::new(0));
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
                tokio::time::sleep(Duration::from_millis(200)).await;
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

    // --- chaos: kills at random moments, the API server restart between two of them ----------------
    let restart_after: Vec<usize> = (0..scale.apiserver_restarts).map(|_| rng.random_range(0..=scale.kills)).collect();
    let all = ListParams::default();
    // The claims (message, attempt) a kill caught in Sending: each may have been delivered before
    // the kill, so each may cost one extra copy. A claim still unresolved at the next kill is the
    // same claim and is counted once.
    let mut in_doubt: HashMap<String, BTreeSet<u32>> = HashMap::new();
    // Kills spread over the expected delivery time (about 60 ms a message here).
    let gap_ms = (scale.messages as u64 * 60 / (scale.kills as u64 + 1)).max(1500);
    let mut kills_in_doubt = 0;
    let mut apiserver_away = Vec::new();
    for k in 0..=scale.kills {
        for _ in restart_after.iter().filter(|a| **a == k) {
            tokio::time::sleep(Duration::from_millis(rng.random_range(500..2500))).await;
            let plane = Arc::clone(&plane);
            let away = tokio::task::spawn_blocking(move || plane.restart_apiserver()).await.expect("restart");
            println!("chaos: {} API server restarted ({:.1}s away)", elapsed(start), away.as_secs_f64());
            apiserver_away.push(away);
        }
        if k == scale.kills {
            break;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(gap_ms / 2..gap_ms * 3 / 2))).await;
        operator.kill();
        // Whatever is Sending now was claimed by the dead process: its outcome is unknown.
        let list = retry_api("list after kill", || messages.list(&all)).await;
        let mut caught = 0;
        for m in list.items.iter().filter(|m| phase_of(m) == Some(Phase::Sending)) {
            let attempt = m.status.as_ref().and_then(|s| s.attempts).unwrap_or(0);
            if in_doubt.entry(m.name_any()).or_default().insert(attempt) {
                caught += 1;
            }
        }
        if caught > 0 {
            kills_in_doubt += 1;
        }
        println!("chaos: {} kill {} (SIGKILL), {caught} claim(s) caught in doubt", elapsed(start), k + 1);
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..1500))).await;
        operator = start_operator();
    }
    creator.await.expect("creator");

    // --- wait for every message to finish ----------------------------------------------------------
    let list = loop {
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
                "{unfinished} of {} messages unfinished after {:?} (seed {}); operator log {}; first: {stuck:#?}",
                list.len(),
                scale.timeout,
                scale.seed,
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    done.store(true, Ordering::Relaxed);
    progress.abort();
    let total = start.elapsed();
    if let Some(status) = operator.exit_status() {
        panic!("the operator exited by itself: {status}; log {}", log.display());
    }

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

    let by_name: HashMap<String, &EmailMessage> = list.iter().map(|m| (m.name_any(), m)).collect();
    let plan_of: HashMap<&str, &Plan> = plans.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut problems = Vec::new();
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
                if reason == "DeliveryUncertain" && (plan.resend || doubt == 0) {
                    problems.push(format!(
                        "{} Failed DeliveryUncertain but onUncertain is {} and kills caught {doubt} of its sends in doubt",
                        plan.name,
                        if plan.resend { "Resend" } else { "Fail" }
                    ));
                }
                *failed.entry(reason).or_insert(0) += 1;
            }
            other => problems.push(format!("{} ended in {other:?}", plan.name)),
        }
        if n > 1 {
            duplicates += n - 1;
            // Each send of it that a kill caught in doubt may have cost one extra copy, no more;
            // a message with onUncertain Fail is never sent again after a kill.
            let allowed = if plan.resend { doubt } else { 0 };
            if n - 1 > allowed {
                problems.push(format!("{} delivered {n} times but only {doubt} of its sends were in doubt", plan.name));
            }
        }
    }

    // --- figures -------------------------------------------------------------------------------------
    let faults = emu.fault_list().await;
    let injected = |status: u64| -> u64 {
        faults.iter().filter(|f| f["status"] == status).map(|f| f["injected"].as_u64().unwrap_or(0)).sum()
    };
    let stats = emu.stats().await;
    let throttled = stats["concurrencyThrottled"].as_u64().unwrap_or(0);
    let relay_stats = relay.stats().await;
    let exo_stats = exo.stats().await;
    let drops = relay_stats["dropped"].as_u64().unwrap_or(0) + exo_stats["dropped"].as_u64().unwrap_or(0);
    let in_doubt_total: usize = in_doubt.values().map(BTreeSet::len).sum();
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
        ("operator kills (SIGKILL)".into(), scale.kills.to_string()),
        ("  kills that caught sends in doubt".into(), kills_in_doubt.to_string()),
        ("  sends in doubt (message, attempt)".into(), in_doubt_total.to_string()),
        (
            "API server restarts".into(),
            format!(
                "{} ({})",
                apiserver_away.len(),
                apiserver_away.iter().map(|d| format!("{:.1}s away", d.as_secs_f64())).collect::<Vec<_>>().join(", ")
            ),
        ),
        ("attempts (retries)".into(), format!("{attempts} ({})", attempts.saturating_sub(scale.messages as u64))),
        ("Graph 503 injected".into(), injected(503).to_string()),
        ("Graph 429 injected".into(), injected(429).to_string()),
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
    assert!(injected(503) > 0 && drops > 0, "no faults were injected: {faults:?} {relay_stats} {exo_stats}");
    drop(operator);
}
