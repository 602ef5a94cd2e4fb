//! The profile lifecycle run (memory with N profiles, after deleting them, after doing it again)
//! and the waiting run (kube-apiserver requests per minute with N messages waiting).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, Namespace, Secret};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use mailroom::api::{ClusterMailProfile, EmailMessage, MailProfile, find_condition};
use serde::Serialize;
use serde_json::{Value, json};

use crate::figures::RequestKey;
use crate::peers::{Emulator, Process, SmtpPeer};
use crate::run::{apiserver_requests, clean_namespace, rss_mib, secret_value};
use crate::{Args, BenchError};

const TENANT: &str = "5b1c2d3e-0000-4000-8000-00000000be01";
const CLIENT_ID: &str = "5b1c2d3e-1111-4111-8111-00000000be02";
const SECRET: &str = "bench-graph";

/// What the profile lifecycle run measured.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProfilesResult {
    label: String,
    /// How many profiles each cycle created.
    pub profiles: usize,
    /// Seconds from the first create to every profile Ready.
    seconds_to_ready: f64,
    /// VmRSS of the ready operator before any profile exists.
    rss_baseline_mib: f64,
    /// VmRSS with all profiles Ready.
    rss_with_profiles_mib: f64,
    /// VmRSS once they are deleted (and the operator had time to free them).
    rss_after_delete_mib: f64,
    /// VmRSS after creating and deleting as many again, under other names.
    rss_after_second_cycle_mib: f64,
    /// VmRSS after the idle wait that follows (past the HTTP clients' 90 s idle-connection timeout).
    rss_idle_mib: f64,
    /// jemalloc's live heap (`mailroom_heap_allocated_bytes`, MiB) at the same five points:
    /// what the operator still holds, as opposed to what the allocator has not returned.
    heap_mib: Vec<Option<f64>>,
    /// What jemalloc holds resident (`mailroom_heap_resident_bytes`, MiB) at the same points: the
    /// live heap plus partly used pages, unreturned free pages and the allocator's metadata.
    heap_resident_mib: Vec<Option<f64>>,
    /// `mailroom_profiles` and `mailroom_token_caches` after the deletions; None where the build
    /// has no such gauges.
    gauges_after_delete: Option<(f64, f64)>,
    /// Token requests in the minute after the second deletion.
    token_requests_after_delete: usize,
}

/// What the waiting run measured.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WaitingResult {
    label: String,
    messages: usize,
    window_seconds: u64,
    /// Requests per minute on what the operator reads and writes (mailroom.dev, namespaces,
    /// secrets, configmaps, events).
    requests_per_minute: f64,
    /// The same by resource and verb, largest first.
    by_request: Vec<(String, f64)>,
    /// Every resource request the API server counted, per minute (its own included).
    all_requests_per_minute: f64,
    /// The operator's memory at the end of the window, the messages created while it ran.
    running: WaitingMemory,
    /// A fresh operator started over the same waiting messages: its list holds them all at once.
    restarted: WaitingMemory,
}

/// The operator's memory with the waiting messages present, in MiB.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WaitingMemory {
    /// VmRSS.
    rss_mib: f64,
    /// VmHWM: the peak since the process started.
    peak_rss_mib: f64,
    /// The live heap (`mailroom_heap_allocated_bytes`).
    heap_mib: Option<f64>,
    /// What the allocator holds resident (`mailroom_heap_resident_bytes`).
    heap_resident_mib: Option<f64>,
    /// From the process's start to `/readyz` answering.
    ready_seconds: f64,
}

impl WaitingMemory {
    async fn of(op: &Operator, ready_seconds: f64) -> Result<WaitingMemory, BenchError> {
        Ok(WaitingMemory {
            rss_mib: op.rss(),
            peak_rss_mib: rss_mib(&op.process, "VmHWM").unwrap_or(0.0),
            heap_mib: op.heap().await?,
            heap_resident_mib: op.heap_resident().await?,
            ready_seconds,
        })
    }
}

/// A free loopback port.
fn free_port() -> Result<u16, BenchError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| BenchError::Start(format!("a free port: {e}")))
}

/// A running operator with known metrics and health ports.
pub(crate) struct Operator {
    pub(crate) process: Process,
    metrics: u16,
    health: u16,
    http: reqwest::Client,
}

impl Operator {
    pub(crate) fn start(args: &Args, ns: &str, extra: &[String], log: &Path) -> Result<Operator, BenchError> {
        let (metrics, health) = (free_port()?, free_port()?);
        let mut op_args: Vec<String> = vec![
            "run".into(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{metrics}"),
            "--health-addr".into(),
            format!("127.0.0.1:{health}"),
            "--namespace".into(),
            ns.into(),
            "--concurrency".into(),
            args.concurrency.to_string(),
        ];
        op_args.extend_from_slice(extra);
        let process = Process::spawn("operator", &args.operator_bin, &op_args, &[], log.to_path_buf())?;
        Ok(Operator { process, metrics, health, http: reqwest::Client::new() })
    }

    pub(crate) async fn wait_ready(&mut self) -> Result<(), BenchError> {
        let start = Instant::now();
        loop {
            self.process.check_alive()?;
            let ready = self.http.get(format!("http://127.0.0.1:{}/readyz", self.health)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(120) {
                return Err(BenchError::Timeout("the operator was not ready within 120s".into()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A gauge from its /metrics; None when this build has no such metric.
    pub(crate) async fn gauge(&self, name: &str) -> Result<Option<f64>, BenchError> {
        let text = self.http.get(format!("http://127.0.0.1:{}/metrics", self.metrics)).send().await?.text().await?;
        let prefix = format!("{name} ");
        Ok(text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()))
    }

    fn rss(&self) -> f64 {
        rss_mib(&self.process, "VmRSS").unwrap_or(0.0)
    }

    /// The live heap in MiB, from the operator's own gauge (None on a build without it).
    async fn heap(&self) -> Result<Option<f64>, BenchError> {
        Ok(self.gauge("mailroom_heap_allocated_bytes").await?.map(|b| b / 1_048_576.0))
    }

    /// What the allocator holds resident, in MiB (None on a build without the gauge).
    async fn heap_resident(&self) -> Result<Option<f64>, BenchError> {
        Ok(self.gauge("mailroom_heap_resident_bytes").await?.map(|b| b / 1_048_576.0))
    }
}

async fn labelled_namespace(client: &Client, prefix: &str, labels: Value) -> Result<String, BenchError> {
    let name = format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))
        .map_err(|e| BenchError::Peer(e.to_string()))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    Ok(name)
}

/// Creates `names` in `ns`, every other one a Graph profile through the emulator and the rest
/// SMTP relays, 16 at a time.
async fn create_profiles(client: &Client, ns: &str, emu: &Emulator, names: &[String]) -> Result<(), BenchError> {
    let api: Api<MailProfile> = Api::namespaced(client.clone(), ns);
    let specs = names.iter().enumerate().map(|(i, name)| {
        let spec = if i.is_multiple_of(2) {
            json!({"senders": {"default": "sender0@contoso.com"}, "graph": {
                "tenantId": TENANT, "clientId": CLIENT_ID, "clientSecretRef": {"name": SECRET, "key": "client-secret"},
                "authorityHost": emu.url, "endpoint": emu.url,
            }})
        } else {
            // Never contacted: a relay profile is Ready without a connection.
            json!({"senders": {"default": "sender0@contoso.com"}, "smtp": {"host": "127.0.0.1", "port": 2525, "tls": "None"}})
        };
        serde_json::from_value::<MailProfile>(json!({
            "apiVersion": "mailroom.dev/v1alpha1", "kind": "MailProfile", "metadata": {"name": name}, "spec": spec,
        }))
        .map_err(|e| BenchError::Peer(format!("profile: {e}")))
    });
    let profiles: Vec<MailProfile> = specs.collect::<Result<_, _>>()?;
    let results: Vec<Result<MailProfile, kube::Error>> = futures::stream::iter(profiles)
        .map(|p| {
            let api = api.clone();
            async move { api.create(&PostParams::default(), &p).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().try_for_each(|r| r.map(|_| ()))?;
    Ok(())
}

async fn delete_profiles(client: &Client, ns: &str, names: &[String]) -> Result<(), BenchError> {
    let api: Api<MailProfile> = Api::namespaced(client.clone(), ns);
    let results: Vec<Result<(), kube::Error>> = futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let api = api.clone();
            // Gone already is deleted: a delete retried after an answer lost under load says 404.
            async move {
                match api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                    Err(e) => Err(e),
                }
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().try_for_each(|r| r)?;
    Ok(())
}

/// Waits until `count` profiles of `ns` are Ready=True.
async fn wait_profiles_ready(client: &Client, ns: &str, count: usize, op: &mut Operator) -> Result<(), BenchError> {
    let api: Api<MailProfile> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    let mut last_print = Instant::now();
    loop {
        op.process.check_alive()?;
        let all = api.list(&ListParams::default()).await?.items;
        let ready = all
            .iter()
            .filter(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| find_condition(&s.conditions, "Ready"))
                    .is_some_and(|c| c.status == "True")
            })
            .count();
        if ready >= count {
            return Ok(());
        }
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!("bench: [profiles] {ready}/{count} Ready  operator RSS {:.1} MiB", op.rss());
        }
        if start.elapsed() > Duration::from_secs(300) {
            return Err(BenchError::Timeout(format!("only {ready} of {count} profiles Ready within 300s")));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until the operator says it holds no profile (at most `limit`; a build without the
/// gauge waits the whole time), then a little longer for the allocator to return what was freed.
async fn wait_freed(op: &Operator, limit: Duration) -> Result<Option<(f64, f64)>, BenchError> {
    let start = Instant::now();
    let gauges = loop {
        let gauges = (op.gauge("mailroom_profiles").await?, op.gauge("mailroom_token_caches").await?);
        if gauges == (Some(0.0), Some(0.0)) || start.elapsed() > limit {
            break gauges;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    tokio::time::sleep(Duration::from_secs(15)).await;
    Ok(match gauges {
        (Some(p), Some(t)) => Some((p, t)),
        _ => None,
    })
}

/// N profiles (half Graph with client-secret tokens, half SMTP relays) created while the operator
/// runs and deleted again, twice, under new names the second time: the operator's memory at each
/// step, what its gauges still hold, and token requests after the deletions.
pub async fn profiles(client: &Client, args: &Args, emu: &Emulator, logs: &Path) -> Result<ProfilesResult, BenchError> {
    let n = args.profiles;
    let app = json!({"tenantId": TENANT, "clientId": CLIENT_ID, "secrets": [secret_value()], "roles": ["Mail.Send"]});
    emu.reset(&app).await?;
    let ns = labelled_namespace(client, "bench-profiles", json!({})).await?;
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": SECRET}, "stringData": {"client-secret": secret_value()}}))
            .map_err(|e| BenchError::Peer(e.to_string()))?;
    Api::<Secret>::namespaced(client.clone(), &ns).create(&PostParams::default(), &secret).await?;
    let extra = ["--ca-bundle".to_string(), emu.ca.display().to_string(), "--allow-custom-endpoints".into()];
    let mut op = Operator::start(args, &ns, &extra, &logs.join(format!("operator-profiles-{n}.log")))?;
    op.wait_ready().await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_baseline = op.rss();
    let mut heap = vec![op.heap().await?];
    let mut resident = vec![op.heap_resident().await?];
    eprintln!(
        "bench: [profiles] operator ready, RSS {rss_baseline:.1} MiB, heap {}; creating {n} profiles in {ns}",
        mib(heap[0])
    );

    let first: Vec<String> = (0..n).map(|i| format!("p-{i:05}")).collect();
    let start = Instant::now();
    create_profiles(client, &ns, emu, &first).await?;
    wait_profiles_ready(client, &ns, n, &mut op).await?;
    let seconds_to_ready = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_with = op.rss();
    heap.push(op.heap().await?);
    resident.push(op.heap_resident().await?);
    eprintln!(
        "bench: [profiles] {n} Ready after {seconds_to_ready:.1}s, RSS {rss_with:.1} MiB, heap {}; deleting them",
        mib(heap[1])
    );
    delete_profiles(client, &ns, &first).await?;
    let gauges = wait_freed(&op, Duration::from_secs(30)).await?;
    let rss_after = op.rss();
    heap.push(op.heap().await?);
    resident.push(op.heap_resident().await?);
    eprintln!(
        "bench: [profiles] deleted, RSS {rss_after:.1} MiB, heap {}, gauges (profiles, token caches) {gauges:?}",
        mib(heap[2])
    );

    let second: Vec<String> = (0..n).map(|i| format!("q-{i:05}")).collect();
    create_profiles(client, &ns, emu, &second).await?;
    wait_profiles_ready(client, &ns, n, &mut op).await?;
    delete_profiles(client, &ns, &second).await?;
    let gauges = wait_freed(&op, Duration::from_secs(30)).await?;
    let rss_second = op.rss();
    heap.push(op.heap().await?);
    resident.push(op.heap_resident().await?);
    let tokens_before = emu.token_requests().await?;
    eprintln!(
        "bench: [profiles] second cycle deleted, RSS {rss_second:.1} MiB, heap {}; {} s without profiles",
        mib(heap[3]),
        IDLE_WAIT.as_secs()
    );
    tokio::time::sleep(IDLE_WAIT).await;
    let token_requests_after_delete = emu.token_requests().await?.saturating_sub(tokens_before);
    let rss_idle = op.rss();
    heap.push(op.heap().await?);
    resident.push(op.heap_resident().await?);
    eprintln!("bench: [profiles] idle, RSS {rss_idle:.1} MiB, heap {}", mib(heap[4]));
    op.process.stop(Duration::from_secs(30));
    clean_namespace(client, &ns).await;
    Ok(ProfilesResult {
        label: args.label.clone(),
        profiles: n,
        seconds_to_ready,
        rss_baseline_mib: rss_baseline,
        rss_with_profiles_mib: rss_with,
        rss_after_delete_mib: rss_after,
        rss_after_second_cycle_mib: rss_second,
        rss_idle_mib: rss_idle,
        heap_mib: heap,
        heap_resident_mib: resident,
        gauges_after_delete: gauges,
        token_requests_after_delete,
    })
}

/// The message of the waiting run: small, from the one sender mailbox.
fn waiting_message(name: &str, profile: &str) -> Result<EmailMessage, BenchError> {
    serde_json::from_value(json!({
        "apiVersion": "mailroom.dev/v1alpha1", "kind": "EmailMessage", "metadata": {"name": name},
        "spec": {
            "profileRef": {"kind": "ClusterMailProfile", "name": profile},
            "to": ["rcpt@contoso.com"], "subject": name, "body": {"text": "waiting for its turn"},
        },
    }))
    .map_err(|e| BenchError::Peer(format!("message: {e}")))
}

/// Whether a request counter is about what the operator reads or writes (the API server's own
/// leases and the like are not).
fn operator_resource(key: &RequestKey) -> bool {
    let (group, resource) = (key.0.as_str(), key.1.as_str());
    group == "mailroom.dev"
        || (group.is_empty() && matches!(resource, "namespaces" | "secrets" | "configmaps" | "events"))
        || (group == "events.k8s.io" && resource == "events")
}

/// Per-minute rates of the counters that grew between `before` and `after` over `seconds`.
pub fn rates(
    before: &HashMap<RequestKey, f64>,
    after: &HashMap<RequestKey, f64>,
    seconds: f64,
    keep: impl Fn(&RequestKey) -> bool,
) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = after
        .iter()
        .filter(|(k, _)| !k.1.is_empty() && keep(k))
        .map(|(k, v)| {
            let (group, resource, sub, verb) = k;
            let name = match (group.is_empty(), sub.is_empty()) {
                (true, true) => format!("{verb} {resource}"),
                (true, false) => format!("{verb} {resource}/{sub}"),
                (false, true) => format!("{verb} {resource}.{group}"),
                (false, false) => format!("{verb} {resource}.{group}/{sub}"),
            };
            (name, (v - before.get(k).copied().unwrap_or(0.0)) * 60.0 / seconds.max(1e-9))
        })
        .filter(|(_, rate)| *rate > 0.0)
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out
}

/// N messages waiting for their turn: a ClusterMailProfile (an SMTP relay) allowing one message a
/// minute from the one sender, its namespace admitted by label, the messages created while the
/// operator runs. Once they all wait, kube-apiserver's request counters over a window (by
/// default one profile resync, 300 s) give the requests per minute such a backlog costs.
pub async fn waiting(client: &Client, args: &Args, smtp: &SmtpPeer, logs: &Path) -> Result<WaitingResult, BenchError> {
    let n = args.waiting;
    let tag = format!("waiting n={n}");
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let label = format!("waiting-{suffix}");
    let ns = labelled_namespace(client, "bench-waiting", json!({"mailroom.dev/bench": label})).await?;
    let profile_name = format!("bench-waiting-{suffix}");
    let cluster: Api<ClusterMailProfile> = Api::all(client.clone());
    let profile: ClusterMailProfile = serde_json::from_value(json!({
        "apiVersion": "mailroom.dev/v1alpha1", "kind": "ClusterMailProfile", "metadata": {"name": profile_name},
        "spec": {
            "allowedNamespaces": {"matchLabels": {"mailroom.dev/bench": label}},
            "senders": {"default": "sender0@contoso.com"},
            "smtp": {"host": "127.0.0.1", "port": smtp.smtp_port, "tls": "None"},
            "limits": {"messagesPerMinute": 1, "maxConcurrent": 1},
        },
    }))
    .map_err(|e| BenchError::Peer(format!("profile: {e}")))?;
    cluster.create(&PostParams::default(), &profile).await?;
    let started = Instant::now();
    let mut op = Operator::start(args, &ns, &[], &logs.join(format!("operator-waiting-{n}.log")))?;
    op.wait_ready().await?;
    let ready_seconds = started.elapsed().as_secs_f64();
    let start = Instant::now();
    loop {
        op.process.check_alive()?;
        let ready = cluster
            .get_opt(&profile_name)
            .await?
            .and_then(|p| p.status)
            .is_some_and(|s| find_condition(&s.conditions, "Ready").is_some_and(|c| c.status == "True"));
        if ready {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(BenchError::Timeout(format!("[{tag}] the ClusterMailProfile was not Ready within 60s")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    eprintln!("bench: [{tag}] creating {n} messages in {ns} while the operator runs");
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let messages: Vec<EmailMessage> =
        (0..n).map(|i| waiting_message(&format!("w-{i:05}"), &profile_name)).collect::<Result<_, _>>()?;
    let created = std::sync::atomic::AtomicUsize::new(0);
    let create_start = Instant::now();
    let results: Vec<Result<(), kube::Error>> = futures::stream::iter(messages)
        .map(|m| {
            let (api, created, tag) = (api.clone(), &created, &tag);
            async move {
                api.create(&PostParams::default(), &m).await?;
                let done = created.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if done.is_multiple_of(1000) {
                    eprintln!(
                        "bench: [{tag}] {done}/{n} created ({:.0}/s)",
                        done as f64 / create_start.elapsed().as_secs_f64()
                    );
                }
                Ok(())
            }
        })
        .buffer_unordered(args.create_concurrency.max(1))
        .collect()
        .await;
    results.into_iter().try_for_each(|r| r)?;
    eprintln!("bench: [{tag}] letting the operator settle for {}s", args.waiting_settle_secs);
    tokio::time::sleep(Duration::from_secs(args.waiting_settle_secs)).await;
    op.process.check_alive()?;

    let window = args.waiting_window_secs.max(1);
    eprintln!("bench: [{tag}] counting kube-apiserver requests for {window}s");
    let before = apiserver_requests(client).await?;
    let counted = Instant::now();
    while counted.elapsed() < Duration::from_secs(window) {
        tokio::time::sleep(Duration::from_secs(30).min(Duration::from_secs(window).saturating_sub(counted.elapsed())))
            .await;
        op.process.check_alive()?;
        eprintln!(
            "bench: [{tag}] {:4.0}s of {window}s  operator RSS {:.1} MiB",
            counted.elapsed().as_secs_f64(),
            op.rss()
        );
    }
    let after = apiserver_requests(client).await?;
    let seconds = counted.elapsed().as_secs_f64();
    let running = WaitingMemory::of(&op, ready_seconds).await?;
    op.process.stop(Duration::from_secs(30));

    eprintln!("bench: [{tag}] restarting the operator over the {n} waiting messages");
    let started = Instant::now();
    let mut op = Operator::start(args, &ns, &[], &logs.join(format!("operator-waiting-{n}-restart.log")))?;
    op.wait_ready().await?;
    let ready_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(args.waiting_settle_secs)).await;
    op.process.check_alive()?;
    let restarted = WaitingMemory::of(&op, ready_seconds).await?;
    op.process.stop(Duration::from_secs(30));

    let by_request = rates(&before, &after, seconds, operator_resource);
    let all = rates(&before, &after, seconds, |_| true);
    let _ = cluster.delete(&profile_name, &DeleteParams::default()).await;
    let _ = Api::<Event>::namespaced(client.clone(), &ns)
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    clean_namespace(client, &ns).await;
    Ok(WaitingResult {
        label: args.label.clone(),
        messages: n,
        window_seconds: window,
        requests_per_minute: by_request.iter().map(|(_, r)| r).sum(),
        by_request,
        all_requests_per_minute: all.iter().map(|(_, r)| r).sum(),
        running,
        restarted,
    })
}

/// How long the lifecycle run watches an operator without profiles, for token requests and its
/// idle RSS: longer than the 90 s after which idle HTTP connections (and the TLS configuration
/// each holds) are closed.
const IDLE_WAIT: Duration = Duration::from_secs(100);

fn mib(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.1} MiB"))
}

/// Prints the lifecycle run's figures.
pub fn print_profiles(r: &ProfilesResult) {
    let gauges = r.gauges_after_delete.map_or("-".to_string(), |(p, t)| format!("{p:.0} / {t:.0}"));
    println!(
        "{:<9} {:>9} {:>9} {:>12} {:>14} {:>13} {:>15} {:>11} {:>22} {:>14}",
        "build",
        "profiles",
        "ready s",
        "RSS before",
        "RSS with them",
        "RSS deleted",
        "RSS 2nd cycle",
        "RSS idle",
        "profiles/caches left",
        "tokens after"
    );
    println!(
        "{:<9} {:>9} {:>9.1} {:>9.1}MiB {:>11.1}MiB {:>10.1}MiB {:>12.1}MiB {:>8.1}MiB {:>22} {:>14}",
        r.label,
        r.profiles,
        r.seconds_to_ready,
        r.rss_baseline_mib,
        r.rss_with_profiles_mib,
        r.rss_after_delete_mib,
        r.rss_after_second_cycle_mib,
        r.rss_idle_mib,
        gauges,
        r.token_requests_after_delete
    );
    let heap: Vec<String> = r.heap_mib.iter().map(|v| mib(*v)).collect();
    println!("{:<9} live heap at the same points: {}", "", heap.join(" / "));
    let resident: Vec<String> = r.heap_resident_mib.iter().map(|v| mib(*v)).collect();
    println!("{:<9} allocator resident at the same points: {}", "", resident.join(" / "));
}

/// Prints the waiting run's figures.
pub fn print_waiting(r: &WaitingResult) {
    println!(
        "{:<9} {} messages waiting, {} s counted: {:.1} API requests/min on the operator's resources ({:.1}/min on all)",
        r.label, r.messages, r.window_seconds, r.requests_per_minute, r.all_requests_per_minute
    );
    for (name, rate) in &r.by_request {
        println!("{:<9}   {rate:>9.1}/min  {name}", "");
    }
    for (when, m) in [("created while it ran", &r.running), ("after a restart over them", &r.restarted)] {
        println!(
            "{:<9}   {} waiting, {when}: RSS {:.1} MiB, peak {:.1} MiB, live heap {}, allocator resident {}, ready in {:.1} s",
            "",
            r.messages,
            m.rss_mib,
            m.peak_rss_mib,
            mib(m.heap_mib),
            mib(m.heap_resident_mib),
            m.ready_seconds
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(group: &str, resource: &str, sub: &str, verb: &str) -> RequestKey {
        (group.into(), resource.into(), sub.into(), verb.into())
    }

    #[test]
    fn rates_per_minute_of_the_operators_requests() {
        let before = HashMap::from([(key("", "namespaces", "", "GET"), 100.0)]);
        let after = HashMap::from([
            (key("", "namespaces", "", "GET"), 1100.0),
            (key("mailroom.dev", "emailmessages", "status", "PATCH"), 10.0),
            (key("coordination.k8s.io", "leases", "", "PUT"), 30.0),
            (key("", "", "", "GET"), 50.0),
        ]);
        let mine = rates(&before, &after, 300.0, operator_resource);
        assert_eq!(
            mine,
            vec![("GET namespaces".to_string(), 200.0), ("PATCH emailmessages.mailroom.dev/status".to_string(), 2.0)]
        );
        let all = rates(&before, &after, 300.0, |_| true);
        assert_eq!(all.len(), 3, "non-resource requests are left out: {all:?}");
    }
}
