//! Per size and transport: the ceiling, the backlog run, a restart, the latency run; the table and
//! results.json.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use mailroom::api::{EmailMessage, MailProfile, Phase, find_condition};
use mailroom::controller::status::{self, Claim};
use mailroom::transport::Delivered;
use serde::Serialize;
use serde_json::json;

use crate::cpu::{self, Watched};
use crate::figures::{self, RequestKey};
use crate::peers::{Emulator, Process, SmtpPeer};
use crate::{Args, BenchError, Transport};
use crate::{history, lifecycle, openloop};

const TENANT: &str = "5b1c2d3e-0000-4000-8000-00000000be01";
const CLIENT_ID: &str = "5b1c2d3e-1111-4111-8111-00000000be02";
/// The MailProfile every run creates.
pub(crate) const PROFILE: &str = "bench";
const SECRET: &str = "bench-graph";

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunResult {
    label: String,
    transport: Transport,
    messages: usize,
    complete: bool,
    sent: usize,
    failed: usize,
    seconds: f64,
    messages_per_second: f64,
    /// None when the latency run was skipped (`--latency-run false`), as are its percentiles.
    end_to_end_per_second: Option<f64>,
    create_per_second: Option<f64>,
    ceiling_messages_per_second: Option<f64>,
    ratio_to_ceiling: Option<f64>,
    /// The ceiling's client also publishing the outcome's Event, as the operator does.
    ceiling_with_events_messages_per_second: Option<f64>,
    ratio_to_ceiling_with_events: Option<f64>,
    /// Messages per kube-apiserver CPU second in this run against the same in the ceiling's
    /// run with Events (the same writes as the operator's; the plain ceiling's without it): how
    /// much API-server work a message costs with the operator against the minimal client, apart
    /// from the cores the operator and the peer take from the API server on a machine whose cores
    /// are all busy.
    ratio_per_apiserver_core: Option<f64>,
    latency_ms: Latency,
    status_patches_per_message: f64,
    events_per_message: f64,
    api_writes_per_message: f64,
    message_gets_per_message: f64,
    other_api_writes: f64,
    token_requests: usize,
    throttled_429: u64,
    peak_rss_mib: f64,
    restart_peak_rss_mib: f64,
    cpu_seconds: f64,
    cpu_seconds_per_1000: f64,
    /// Cores in use on average by each process while the ceiling's client ran (kube-apiserver,
    /// etcd, this harness) and the machine's busy and idle cores.
    ceiling_cores: BTreeMap<String, f64>,
    /// The same while the ceiling's client also published the Events.
    ceiling_with_events_cores: BTreeMap<String, f64>,
    /// The same while the operator sent the backlog, with the operator and the peer.
    cores: BTreeMap<String, f64>,
    delivered: usize,
    duplicated: usize,
    missing: usize,
    concurrency: usize,
}

/// Created-to-Sent latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    p50: u64,
    p95: u64,
    p99: u64,
    max: u64,
}

/// Runs every size and transport, printing a table and writing results.json.
pub async fn all(args: Args) -> Result<(), BenchError> {
    let repo = std::env::current_dir().map_err(|e| BenchError::io(Path::new("."), e))?;
    let out = if args.out.is_absolute() { args.out.clone() } else { repo.join(&args.out) };
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| BenchError::io(&logs, e))?;
    let client = Client::try_default().await?;
    eprintln!("bench: starting the SMTP test server and the Microsoft 365 emulator");
    let throughput = !args.no_throughput;
    // The history run goes through the first transport.
    let history = |t: Transport| args.history > 0 && args.transports.first() == Some(&t);
    let smtp = if ((throughput || history(Transport::Smtp)) && args.transports.contains(&Transport::Smtp))
        || args.waiting > 0
    {
        Some(SmtpPeer::start(&args.python, &repo, &out.join("smtp")).await?)
    } else {
        None
    };
    let key = repo.join("target/test-emulator-signing-key.pem");
    let emulator = if ((throughput || history(Transport::Graph)) && args.transports.contains(&Transport::Graph))
        || args.profiles > 0
    {
        Some(Emulator::start(&args.emulator_bin, &out.join("emulator"), key.exists().then_some(key.as_path())).await?)
    } else {
        None
    };
    let mut results = Results::default();
    let file = out.join("results.json");
    let sizes = if throughput { args.sizes.clone() } else { Vec::new() };
    for (k, &n) in sizes.iter().enumerate() {
        for &transport in &args.transports {
            let peers = Peers { smtp: smtp.as_ref(), emulator: emulator.as_ref() };
            let result = one(&client, &args, transport, n, &peers, &logs).await?;
            print_table(std::slice::from_ref(&result), false);
            let ceiling = result.ceiling_messages_per_second;
            results.runs.push(result);
            write_results(&file, &args, &results)?;
            if k == 0 && args.open_loop_secs > 0 {
                reset_peers(&peers, transport).await?;
                let open = openloop::run(&client, &args, transport, n, ceiling, &peers, &logs).await?;
                openloop::print(std::slice::from_ref(&open));
                results.open_loop.push(open);
                write_results(&file, &args, &results)?;
            }
        }
    }
    if let Some(&transport) = args.transports.first().filter(|_| args.history > 0) {
        let peers = Peers { smtp: smtp.as_ref(), emulator: emulator.as_ref() };
        reset_peers(&peers, transport).await?;
        let result = history::run(&client, &args, transport, &peers, &logs).await?;
        history::print(&result);
        results.history = Some(result);
        write_results(&file, &args, &results)?;
    }
    if let Some(emu) = emulator.as_ref().filter(|_| args.profiles > 0) {
        let result = lifecycle::profiles(&client, &args, emu, &logs).await?;
        lifecycle::print_profiles(&result);
        results.profiles = Some(result);
        write_results(&file, &args, &results)?;
    }
    if let Some(smtp) = smtp.as_ref().filter(|_| args.waiting > 0) {
        let result = lifecycle::waiting(&client, &args, smtp, &logs).await?;
        lifecycle::print_waiting(&result);
        results.waiting = Some(result);
        write_results(&file, &args, &results)?;
    }
    eprintln!();
    if !results.runs.is_empty() {
        print_table(&results.runs, true);
        print_cores(&results.runs);
    }
    if !results.open_loop.is_empty() {
        openloop::print(&results.open_loop);
    }
    if let Some(r) = &results.history {
        history::print(r);
    }
    print_growth(&results);
    if let Some(r) = &results.profiles {
        println!("profile lifecycle: {} profiles created and deleted twice (figures, not assertions)", r.profiles);
        lifecycle::print_profiles(r);
    }
    if let Some(r) = &results.waiting {
        println!("waiting messages: kube-apiserver requests per minute (figures, not assertions)");
        lifecycle::print_waiting(r);
    }
    println!("results: {}", file.display());
    Ok(())
}

/// Everything one invocation measured.
#[derive(Default)]
struct Results {
    runs: Vec<RunResult>,
    open_loop: Vec<openloop::OpenLoopResult>,
    history: Option<history::HistoryResult>,
    profiles: Option<lifecycle::ProfilesResult>,
    waiting: Option<lifecycle::WaitingResult>,
}

pub(crate) struct Peers<'a> {
    pub(crate) smtp: Option<&'a SmtpPeer>,
    pub(crate) emulator: Option<&'a Emulator>,
}

fn write_results(file: &Path, args: &Args, results: &Results) -> Result<(), BenchError> {
    let doc = json!({
        "command": std::env::var("BENCH_COMMAND").unwrap_or_else(|_| "make bench".into()),
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "config": {
            "mailboxes": args.mailboxes, "maxConcurrent": args.max_concurrent, "concurrency": args.concurrency,
            "messagesPerMinute": args.messages_per_minute, "createConcurrency": args.create_concurrency,
            "bodyBytes": args.body_bytes, "attachmentBytes": args.attachment_bytes,
        },
        "runs": results.runs,
        "openLoop": results.open_loop,
        "history": results.history,
        "profiles": results.profiles,
        "waiting": results.waiting,
    });
    let text = serde_json::to_string_pretty(&doc).map_err(|e| BenchError::Peer(e.to_string()))?;
    std::fs::write(file, text).map_err(|e| BenchError::io(file, e))
}

/// Resets the peer of `transport` (the emulator's app, the SMTP server's mailbox).
async fn reset_peers(peers: &Peers<'_>, transport: Transport) -> Result<(), BenchError> {
    match transport {
        Transport::Graph => {
            let app =
                json!({"tenantId": TENANT, "clientId": CLIENT_ID, "secrets": [secret_value()], "roles": ["Mail.Send"]});
            peers.emulator.ok_or_else(|| BenchError::Peer("no emulator".into()))?.reset(&app).await
        }
        Transport::Smtp => peers.smtp.ok_or_else(|| BenchError::Peer("no SMTP server".into()))?.reset().await,
    }
}

/// Cost growth per transport: msg/s, peak RSS and CPU seconds per 1,000 messages by size, and
/// the fitted exponent of each total (RSS, CPU seconds) against the size: 1 is linear.
fn print_growth(results: &Results) {
    // Each transport once, in the order of the runs (they alternate when there are several sizes).
    let mut transports: Vec<Transport> = Vec::new();
    for r in &results.runs {
        if !transports.contains(&r.transport) {
            transports.push(r.transport);
        }
    }
    if results.runs.len() < 2 && results.history.is_none() {
        return;
    }
    println!("cost growth (figures, not assertions; exponent of the total against N: 1 is linear)");
    for t in transports {
        let runs: Vec<&RunResult> = results.runs.iter().filter(|r| r.transport == t).collect();
        let cells: Vec<String> = runs
            .iter()
            .map(|r| {
                format!(
                    "N={}: {:.1} msg/s, {:.1} MiB, {:.2} CPU s/1k",
                    r.messages, r.messages_per_second, r.peak_rss_mib, r.cpu_seconds_per_1000
                )
            })
            .collect();
        let rss: Vec<(f64, f64)> = runs.iter().map(|r| (r.messages as f64, r.peak_rss_mib)).collect();
        let cpu: Vec<(f64, f64)> = runs.iter().map(|r| (r.messages as f64, r.cpu_seconds)).collect();
        let exp = |p: &[(f64, f64)]| figures::growth_exponent(p).map_or("-".into(), |e| format!("{e:.2}"));
        println!(
            "{:<6} {}  | exponent: RSS {}, CPU {}",
            format!("{t:?}").to_lowercase(),
            cells.join("; "),
            exp(&rss),
            exp(&cpu)
        );
    }
    if let Some(h) = &results.history {
        println!(
            "history N={}: start to Ready {:.1}s, {:.1} MiB peak, {:.3} CPU s/1k present",
            h.finished_count(),
            h.seconds_to_ready(),
            h.peak_rss(),
            h.cpu_per_1000()
        );
    }
}

fn print_table(results: &[RunResult], header_line: bool) {
    if header_line {
        println!("mailroom benchmark (figures, not assertions)");
    }
    println!(
        "{:<9} {:<6} {:>6} {:>8} {:>9} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>10} {:>7} {:>6} {:>4} {:>9} {:>11} {:>8} {:>4} {:>7}",
        "build",
        "transp",
        "N",
        "msg/s",
        "ceiling",
        "ratio",
        "+Events",
        "e2e/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "writes/msg",
        "GET/msg",
        "tokens",
        "429",
        "peak RSS",
        "restart RSS",
        "CPU/1k",
        "dup",
        "missing"
    );
    for r in results {
        let ceiling = r.ceiling_messages_per_second.map_or("-".into(), |c| format!("{c:.0}"));
        let ratio = r.ratio_to_ceiling.map_or("-".into(), |c| format!("{:.0}%", c * 100.0));
        let ratio_events = r.ratio_to_ceiling_with_events.map_or("-".into(), |c| format!("{:.0}%", c * 100.0));
        let e2e = r.end_to_end_per_second.map_or("-".into(), |x| format!("{x:.1}"));
        let ms = |p: u64| if r.end_to_end_per_second.is_some() { p.to_string() } else { "-".into() };
        println!(
            "{:<9} {:<6} {:>6} {:>8.1} {:>9} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>10} {:>7.2} {:>6} {:>4} {:>6.1}MiB {:>8.1}MiB {:>7.2}s {:>4} {:>7}",
            r.label,
            format!("{:?}", r.transport).to_lowercase(),
            r.messages,
            r.messages_per_second,
            ceiling,
            ratio,
            ratio_events,
            e2e,
            ms(r.latency_ms.p50),
            ms(r.latency_ms.p95),
            ms(r.latency_ms.p99),
            format!("{:.2}+{:.2}", r.status_patches_per_message, r.events_per_message),
            r.message_gets_per_message,
            r.token_requests,
            r.throttled_429,
            r.peak_rss_mib,
            r.restart_peak_rss_mib,
            r.cpu_seconds_per_1000,
            r.duplicated,
            r.missing + r.failed,
        );
    }
}

/// The processes whose CPU a run of `transport` reports: the control plane, this harness, the
/// operator and the transport's peer.
pub(crate) fn watched(peers: &Peers<'_>, transport: Transport, operator: &Process) -> Watched {
    let watched = Watched::control_plane().with("operator", operator.pid());
    let peer = match transport {
        Transport::Graph => peers.emulator.map(|e| ("emulator", e.pid())),
        Transport::Smtp => peers.smtp.map(|s| ("SMTP server", s.pid())),
    };
    match peer {
        Some((name, pid)) => watched.with(name, pid),
        None => watched,
    }
}

/// Where the CPU went in each run: the ceiling's and the operator's, process by process.
fn print_cores(results: &[RunResult]) {
    println!("where the CPU went (cores in use on average; figures, not assertions)");
    for r in results {
        let tag = format!("{:<6} {:>6}", format!("{:?}", r.transport).to_lowercase(), r.messages);
        if !r.ceiling_cores.is_empty() {
            println!("{tag} ceiling   {}", cpu::describe(&r.ceiling_cores));
        }
        if !r.ceiling_with_events_cores.is_empty() {
            println!("{tag} +Events   {}", cpu::describe(&r.ceiling_with_events_cores));
        }
        println!("{tag} operator  {}", cpu::describe(&r.cores));
        if let Some(x) = r.ratio_per_apiserver_core {
            println!(
                "{tag} messages per kube-apiserver CPU second against the ceiling's{}: {:.0}%",
                if r.ceiling_with_events_cores.is_empty() { "" } else { " with Events" },
                x * 100.0
            );
        }
    }
}

fn sender(i: usize, mailboxes: usize) -> String {
    format!("sender{}@contoso.com", i % mailboxes.max(1))
}

/// The message every run creates: a text body and an inline attachment of the configured sizes.
pub(crate) fn message(name: &str, profile: &str, i: usize, args: &Args) -> Result<EmailMessage, BenchError> {
    let body: String = "mailroom benchmark body line\n".chars().cycle().take(args.body_bytes).collect();
    let mut spec = json!({
        "profileRef": {"name": profile},
        "from": sender(i, args.mailboxes),
        "to": [format!("rcpt{}@contoso.com", i % 50)],
        "subject": format!("benchmark message {i}"),
        "body": {"text": body},
        "headers": {"X-Bench-Index": i.to_string()},
    });
    if args.attachment_bytes > 0 {
        // "QUJD" is base64 of "ABC": any number of them is valid base64.
        let data = "QUJD".repeat(args.attachment_bytes.div_ceil(3));
        spec["attachments"] = json!([{"name": "report.txt", "contentType": "text/plain", "data": data}]);
    }
    serde_json::from_value(json!({
        "apiVersion": "mailroom.dev/v1alpha1", "kind": "EmailMessage",
        "metadata": {"name": name}, "spec": spec,
    }))
    .map_err(|e| BenchError::Peer(format!("message template: {e}")))
}

pub(crate) async fn create_namespace(client: &Client, prefix: &str) -> Result<String, BenchError> {
    let name = format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name}})).map_err(|e| BenchError::Peer(e.to_string()))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    Ok(name)
}

/// Removes what a run left (there is no namespace controller to do it).
pub async fn clean_namespace(client: &Client, ns: &str) {
    let dp = DeleteParams::default();
    let lp = ListParams::default();
    let _ = Api::<EmailMessage>::namespaced(client.clone(), ns).delete_collection(&dp, &lp).await;
    let _ = Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), ns).delete_collection(&dp, &lp).await;
    let _ = Api::<Namespace>::all(client.clone()).delete(ns, &dp).await;
}

/// Creates `n` messages with bounded concurrency; returns when each create was sent, by name.
async fn create_messages(
    client: &Client,
    ns: &str,
    profile: &str,
    prefix: &str,
    n: usize,
    args: &Args,
    created: Arc<Mutex<HashMap<String, Instant>>>,
) -> Result<Vec<EmailMessage>, BenchError> {
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), ns);
    let mut templates = Vec::with_capacity(n);
    for i in 0..n {
        templates.push(message(&format!("{prefix}-{i:05}"), profile, i, args)?);
    }
    futures::stream::iter(templates)
        .map(|m| {
            let api = api.clone();
            let created = created.clone();
            async move {
                let started = Instant::now();
                let made = api.create(&PostParams::default(), &m).await?;
                created.lock().unwrap_or_else(|e| e.into_inner()).insert(m.name_any(), started);
                Ok::<_, BenchError>(made)
            }
        })
        .buffer_unordered(args.create_concurrency.max(1))
        .try_collect()
        .await
}

/// The ceiling: the backlog run with the operator replaced by a minimal client. `n` messages
/// exist first; then the client starts, lists and watches them like the operator, and makes only
/// the writes one message needs (claim with the resourceVersion, then the outcome: merge patches
/// on the status subresource), `concurrency` at a time. Timed like the operator's run: from the
/// client's start to the last Sent this process sees.
async fn measure_ceiling(
    client: &Client,
    args: &Args,
    n: usize,
    concurrency: usize,
    tag: &str,
    events: bool,
) -> Result<(f64, BTreeMap<String, f64>), BenchError> {
    let ns = create_namespace(client, "bench-ceiling").await?;
    let tag = format!("{tag} ceiling{}", if events { " with Events" } else { "" });
    eprintln!("bench: [{tag}] creating {n} messages in {ns}");
    create_messages(client, &ns, "none", "m", n, args, Arc::default()).await?;
    let (seen, watch) = watch_finished(client, &ns).await;
    eprintln!("bench: [{tag}] a minimal client claims and records them, {concurrency} at a time");
    let start = Instant::now();
    let watched = Watched::control_plane();
    let cpu_before = watched.snapshot();
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let worker = tokio::spawn(minimal_client(api, args.mailboxes, concurrency, events));
    let complete = wait_finished(args, n, &tag, &seen, start, || Ok(()), || None).await;
    let cores = cpu_before.cores_until(&watched.snapshot());
    worker.abort();
    watch.abort();
    clean_namespace(client, &ns).await;
    if !complete {
        return Err(BenchError::Timeout(format!("[{tag}] the ceiling run did not finish")));
    }
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    let last = seen.sent.values().max().copied().unwrap_or(start);
    Ok((n as f64 / last.duration_since(start).as_secs_f64().max(1e-9), cores))
}

/// Watches the messages in `api`'s namespace and claims and records each new one; with `events`,
/// it also publishes the outcome's Event as the operator does.
async fn minimal_client(api: Api<EmailMessage>, mailboxes: usize, concurrency: usize, events: bool) {
    let (tx, rx) = futures::channel::mpsc::unbounded::<EmailMessage>();
    let feed = {
        let api = api.clone();
        async move {
            let stream = watcher(api, watcher::Config::default()).applied_objects();
            futures::pin_mut!(stream);
            while let Some(item) = stream.next().await {
                if let Ok(m) = item
                    && m.status.is_none()
                {
                    let _ = tx.unbounded_send(m);
                }
            }
        }
    };
    let work = rx.for_each_concurrent(concurrency.max(1), |m| {
        let api = api.clone();
        async move {
            let i: usize = m.name_any().rsplit('-').next().and_then(|i| i.parse().ok()).unwrap_or(0);
            let claim = Claim {
                attempt: 1,
                message_id: format!("<{}@contoso.com>", m.uid().unwrap_or_default()),
                recipients: 1,
                transport: "graph".into(),
                from: sender(i, mailboxes),
                id: format!("bench-{i}"),
                holder: "mailroom-bench".into(),
                interruptions: 0,
            };
            let g = m.metadata.generation;
            let claimed = status::claimed(&Default::default(), &claim, g, Timestamp::now());
            let patch = json!({"status": claimed, "metadata": {"resourceVersion": m.resource_version()}});
            if let Err(e) = api.patch_status(&m.name_any(), &PatchParams::default(), &Patch::Merge(patch)).await {
                eprintln!("bench: ceiling claim {}: {e}", m.name_any());
                return;
            }
            let accepted = Delivered { response: "202 Accepted".into(), ..Delivered::default() };
            let sent = status::sent(&claimed, &accepted, g, Timestamp::now());
            if let Err(e) =
                api.patch_status(&m.name_any(), &PatchParams::default(), &Patch::Merge(json!({"status": sent}))).await
            {
                eprintln!("bench: ceiling outcome {}: {e}", m.name_any());
            }
            if events {
                let ev = mailroom::controller::message::message_event(
                    &m,
                    kube::runtime::events::EventType::Normal,
                    mailroom::controller::reason::Reason::Sent,
                    "202 Accepted",
                    "mailroom-bench",
                    Timestamp::now(),
                );
                let ns = m.namespace().unwrap_or_default();
                let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(api.clone().into_client(), &ns);
                if let Err(e) = events.create(&PostParams::default(), &ev).await {
                    eprintln!("bench: ceiling Event {}: {e}", m.name_any());
                }
            }
        }
    });
    futures::join!(feed, work);
}

/// Follows the messages of a namespace: when each was first seen Sent or Failed. Returns once
/// the watch has listed the namespace, so that no outcome is missed.
pub(crate) async fn watch_finished(client: &Client, ns: &str) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let watch = {
        let api: Api<EmailMessage> = Api::namespaced(client.clone(), ns);
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let stream = watcher(api, watcher::Config::default());
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                let now = Instant::now();
                let m = match event {
                    Ok(watcher::Event::Apply(m)) => {
                        seen.lock().unwrap_or_else(|e| e.into_inner()).added.entry(m.name_any()).or_insert(now);
                        m
                    }
                    Ok(watcher::Event::InitApply(m)) => m,
                    Ok(watcher::Event::InitDone) => {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                        continue;
                    }
                    _ => continue,
                };
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                match m.status.as_ref().and_then(|s| s.phase) {
                    Some(Phase::Sending) => {
                        seen.sending.entry(m.name_any()).or_insert(now);
                    }
                    Some(Phase::Sent) => {
                        seen.sent.entry(m.name_any()).or_insert(now);
                    }
                    Some(Phase::Failed) => {
                        let why = m.status.as_ref().and_then(|s| s.conditions.last()).map(|c| c.message.clone());
                        seen.failed.entry(m.name_any()).or_insert(why.unwrap_or_default());
                    }
                    _ => {}
                }
            }
        })
    };
    let _ = ready_rx.await;
    (seen, watch)
}

/// What creating the messages while the operator runs found.
struct Driven {
    start: Instant,
    created: HashMap<String, Instant>,
    created_at: Option<Instant>,
    complete: bool,
}

/// Creates `n` messages (named `{prefix}-NNNNN`) while the operator runs, until every one is
/// Sent or Failed.
#[allow(clippy::too_many_arguments)]
async fn drive(
    client: &Client,
    args: &Args,
    ns: &str,
    prefix: &'static str,
    n: usize,
    tag: &str,
    seen: &Arc<Mutex<Seen>>,
    alive: impl FnMut() -> Result<(), BenchError>,
    rss: impl Fn() -> Option<f64>,
) -> Result<Driven, BenchError> {
    eprintln!(
        "bench: [{tag}] creating {n} messages in {ns} while the operator runs ({} at a time)",
        args.create_concurrency
    );
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let start = Instant::now();
    let creating = {
        let (client, ns, args, created) = (client.clone(), ns.to_string(), args.clone(), created.clone());
        tokio::spawn(async move {
            create_messages(&client, &ns, PROFILE, prefix, n, &args, created).await.map(|_| Instant::now())
        })
    };
    let complete = wait_finished(args, n, tag, seen, start, alive, rss).await;
    let created_at = match creating.await {
        Ok(Ok(at)) => Some(at),
        Ok(Err(e)) => return Err(e),
        Err(e) => return Err(BenchError::Peer(format!("create task: {e}"))),
    };
    let created = std::mem::take(&mut *created.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(Driven { start, created, created_at, complete })
}

/// Shows progress until `n` messages are Sent or Failed (true), `alive` fails or the timeout
/// passes (false). `rss` is the operator's current RSS in MiB, if there is one.
pub(crate) async fn wait_finished(
    args: &Args,
    n: usize,
    tag: &str,
    seen: &Arc<Mutex<Seen>>,
    start: Instant,
    mut alive: impl FnMut() -> Result<(), BenchError>,
    rss: impl Fn() -> Option<f64>,
) -> bool {
    let mut last_print = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (sent, failed) = {
            let s = seen.lock().unwrap_or_else(|e| e.into_inner());
            (s.sent.len(), s.failed.len())
        };
        if last_print.elapsed() >= Duration::from_secs(2) || sent + failed >= n {
            last_print = Instant::now();
            let secs = start.elapsed().as_secs_f64();
            let rss = rss().map_or(String::new(), |r| format!("  operator RSS {r:.1} MiB"));
            eprintln!(
                "bench: [{tag}] {secs:6.1}s  sent {sent}/{n}  failed {failed}  ({:.0} sent/s){rss}",
                sent as f64 / secs.max(1e-9)
            );
        }
        if sent + failed >= n {
            return true;
        }
        if let Err(e) = alive() {
            eprintln!("bench: [{tag}] {e}");
            return false;
        }
        if start.elapsed() > Duration::from_secs(args.timeout) {
            eprintln!("bench: [{tag}] timed out after {}s", args.timeout);
            return false;
        }
    }
}

/// kube-apiserver's `apiserver_request_total`, summed by group, resource, subresource and verb.
pub async fn apiserver_requests(client: &Client) -> Result<HashMap<RequestKey, f64>, BenchError> {
    let req = http::Request::get("/metrics").body(Vec::new()).map_err(|e| BenchError::Peer(e.to_string()))?;
    Ok(figures::request_totals(&client.request_text(req).await?))
}

pub(crate) async fn wait_profile_ready(api: &Api<MailProfile>, operator: &mut Process) -> Result<(), BenchError> {
    let start = Instant::now();
    loop {
        operator.check_alive()?;
        if let Some(p) = api.get_opt(PROFILE).await?
            && let Some(s) = &p.status
            && find_condition(&s.conditions, "Ready").is_some_and(|c| c.status == "True")
        {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(BenchError::Timeout(format!(
                "the profile was not Ready within 60s; see {}",
                operator.log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Where the watch has seen messages finish.
#[derive(Default)]
pub(crate) struct Seen {
    /// When each message was first seen after the list (its creation, for one created later).
    pub(crate) added: HashMap<String, Instant>,
    /// When each was first seen `Sending` (claimed).
    pub(crate) sending: HashMap<String, Instant>,
    pub(crate) sent: HashMap<String, Instant>,
    pub(crate) failed: HashMap<String, String>,
}

/// The MailProfile `bench` in `ns` for `transport`, and the operator's arguments for it.
pub(crate) async fn setup_profile(
    client: &Client,
    args: &Args,
    transport: Transport,
    peers: &Peers<'_>,
    ns: &str,
) -> Result<Vec<String>, BenchError> {
    let limits = json!({"messagesPerMinute": args.messages_per_minute, "maxConcurrent": args.max_concurrent});
    let senders = json!({"default": sender(0, args.mailboxes), "allowed": ["*@contoso.com"]});
    let mut op_args: Vec<String> = [
        "run",
        "--metrics-addr",
        "127.0.0.1:0",
        "--health-addr",
        "127.0.0.1:0",
        "--allow-custom-endpoints",
        "--namespace",
        ns,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    op_args.extend(["--concurrency".to_string(), args.concurrency.to_string()]);
    let spec = match transport {
        Transport::Graph => {
            let emu = peers.emulator.ok_or_else(|| BenchError::Peer("no emulator".into()))?;
            let secret: Secret = serde_json::from_value(json!({
                "metadata": {"name": SECRET}, "stringData": {"client-secret": secret_value()},
            }))
            .map_err(|e| BenchError::Peer(e.to_string()))?;
            Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &secret).await?;
            op_args.extend(["--ca-bundle".into(), emu.ca.display().to_string()]);
            json!({"senders": senders, "limits": limits, "graph": {
                "tenantId": TENANT, "clientId": CLIENT_ID, "clientSecretRef": {"name": SECRET, "key": "client-secret"},
                "authorityHost": emu.url, "endpoint": emu.url,
            }})
        }
        Transport::Smtp => {
            let smtp = peers.smtp.ok_or_else(|| BenchError::Peer("no SMTP server".into()))?;
            json!({"senders": senders, "limits": limits, "smtp": {"host": "127.0.0.1", "port": smtp.smtp_port, "tls": "None"}})
        }
    };
    let profile: MailProfile = serde_json::from_value(json!({
        "apiVersion": "mailroom.dev/v1alpha1", "kind": "MailProfile", "metadata": {"name": PROFILE}, "spec": spec,
    }))
    .map_err(|e| BenchError::Peer(format!("profile: {e}")))?;
    Api::<MailProfile>::namespaced(client.clone(), ns).create(&PostParams::default(), &profile).await?;
    Ok(op_args)
}

/// A `kB` field of the process's /proc status (`VmRSS`, `VmHWM`) in MiB.
pub fn rss_mib(p: &Process, field: &str) -> Option<f64> {
    figures::status_kb(&p.proc_status(), field).map(|kb| kb as f64 / 1048576.0)
}

/// One size and transport: the ceiling; the backlog run (n messages exist, then the operator
/// starts: throughput, writes, tokens, memory, CPU); a restart over the n finished messages; the
/// latency run (n messages created while the operator runs: created-to-Sent latency).
async fn one(
    client: &Client,
    args: &Args,
    transport: Transport,
    n: usize,
    peers: &Peers<'_>,
    logs: &Path,
) -> Result<RunResult, BenchError> {
    let name = format!("{transport:?}").to_lowercase();
    let tag = format!("{name} n={n}");
    let concurrency = args.concurrency;
    let (ceiling, ceiling_cores) = if args.no_ceiling {
        (None, BTreeMap::new())
    } else {
        let (c, cores) = measure_ceiling(client, args, n, concurrency, &tag, false).await?;
        eprintln!("bench: [{tag}] ceiling {c:.0} messages/s; {}", cpu::describe(&cores));
        (Some(c), cores)
    };
    let (ceiling_events, ceiling_with_events_cores) = if args.no_ceiling || !args.ceiling_with_events {
        (None, BTreeMap::new())
    } else {
        let (c, cores) = measure_ceiling(client, args, n, concurrency, &tag, true).await?;
        eprintln!("bench: [{tag}] ceiling with Events {c:.0} messages/s; {}", cpu::describe(&cores));
        (Some(c), cores)
    };
    reset_peers(peers, transport).await?;

    // The backlog run.
    let ns = create_namespace(client, &format!("bench-{name}")).await?;
    let op_args = setup_profile(client, args, transport, peers, &ns).await?;
    eprintln!("bench: [{tag}] creating {n} messages in {ns} before the operator starts");
    create_messages(client, &ns, PROFILE, "m", n, args, Arc::default()).await?;
    let (seen, watch) = watch_finished(client, &ns).await;
    let before = apiserver_requests(client).await?;
    let tokens_before = match peers.emulator {
        Some(emu) if transport == Transport::Graph => emu.token_requests().await?,
        _ => 0,
    };
    eprintln!("bench: [{tag}] starting the operator over {n} pending messages");
    let start = Instant::now();
    let log: PathBuf = logs.join(format!("operator-{name}-{n}.log"));
    let mut operator = Process::spawn("operator", &args.operator_bin, &op_args, &[], log)?;
    let watched = watched(peers, transport, &operator);
    let cpu_before = watched.snapshot();
    let complete = {
        let op = std::cell::RefCell::new(&mut operator);
        wait_finished(args, n, &tag, &seen, start, || op.borrow_mut().check_alive(), || rss_mib(&op.borrow(), "VmRSS"))
            .await
    };
    let cpu_ticks = figures::cpu_ticks(&operator.proc_stat()).unwrap_or(0);
    let cores = cpu_before.cores_until(&watched.snapshot());
    eprintln!("bench: [{tag}] {}", cpu::describe(&cores));
    // The Event follows the outcome write; give the last ones a moment before counting.
    let events_key = |b: &HashMap<RequestKey, f64>, a: &HashMap<RequestKey, f64>| {
        figures::delta(b, a, ("events.k8s.io", "events", "", "POST")) + figures::delta(b, a, ("", "events", "", "POST"))
    };
    let mut after = apiserver_requests(client).await?;
    let settle = Instant::now();
    while events_key(&before, &after) < n as f64 && settle.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        after = apiserver_requests(client).await?;
    }
    let peak_rss = rss_mib(&operator, "VmHWM").unwrap_or(0.0);
    watch.abort();
    let seen = std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()));
    let last_sent = seen.sent.values().max().copied().unwrap_or(start);
    let seconds = last_sent.duration_since(start).as_secs_f64();
    let per = |x: f64| x / n.max(1) as f64;
    let patches = figures::delta(&before, &after, ("mailroom.dev", "emailmessages", "status", "PATCH"));
    let events =
        events_key(&before, &after) + figures::delta(&before, &after, ("events.k8s.io", "events", "", "PATCH"));
    let gets = figures::delta(&before, &after, ("mailroom.dev", "emailmessages", "", "GET"));
    let creates = figures::delta(&before, &after, ("mailroom.dev", "emailmessages", "", "POST"));
    let all_writes: f64 = after
        .iter()
        .filter(|((_, _, _, verb), _)| matches!(verb.as_str(), "POST" | "PUT" | "PATCH" | "DELETE"))
        .map(|(k, v)| v - before.get(k).copied().unwrap_or(0.0))
        .sum();
    let tokens = match peers.emulator {
        Some(emu) if transport == Transport::Graph => emu.token_requests().await?.saturating_sub(tokens_before),
        _ => 0,
    };
    if let Some((name, why)) = seen.failed.iter().next() {
        eprintln!("bench: [{tag}] {} failed, e.g. {name}: {why}", seen.failed.len());
    }
    operator.stop(Duration::from_secs(30));
    // A fresh operator with all of them present and finished: its caches fill from a LIST.
    let restart_rss = restart_peak_rss(args, &op_args, logs, &tag).await?;
    clean_namespace(client, &ns).await;

    // The latency run.
    let latency =
        if args.latency_run { Some(latency_run(client, args, transport, n, peers, logs, &tag).await?) } else { None };

    // Both runs' deliveries, by Message-ID.
    let (throttled, ids) = match transport {
        Transport::Graph => {
            let emu = peers.emulator.ok_or_else(|| BenchError::Peer("no emulator".into()))?;
            let stats = emu.stats().await?;
            (stats["graphRequests"]["429"].as_u64().unwrap_or(0), emu.message_ids().await?)
        }
        Transport::Smtp => {
            (0, peers.smtp.ok_or_else(|| BenchError::Peer("no SMTP server".into()))?.message_ids().await?)
        }
    };
    let (distinct, duplicated, _extra) = figures::duplicates(ids.iter().map(String::as_str));

    let mps = n as f64 / seconds.max(1e-9);
    let runs = if latency.is_some() { 2 } else { 1 };
    let latency = latency.unwrap_or_default();
    Ok(RunResult {
        label: args.label.clone(),
        transport,
        messages: n,
        complete: complete && latency.complete,
        sent: seen.sent.len(),
        failed: seen.failed.len() + latency.failed,
        seconds,
        messages_per_second: mps,
        end_to_end_per_second: latency.end_to_end_per_second,
        create_per_second: latency.create_per_second,
        ceiling_messages_per_second: ceiling,
        ratio_to_ceiling: ceiling.map(|c| mps / c),
        ceiling_with_events_messages_per_second: ceiling_events,
        ratio_to_ceiling_with_events: ceiling_events.map(|c| mps / c),
        ratio_per_apiserver_core: {
            let (c, c_cores) = match ceiling_events {
                Some(c) => (Some(c), &ceiling_with_events_cores),
                None => (ceiling, &ceiling_cores),
            };
            c.and_then(|c| {
                figures::per_core_ratio(mps, *cores.get("kube-apiserver")?, c, *c_cores.get("kube-apiserver")?)
            })
        },
        latency_ms: latency.latency_ms,
        status_patches_per_message: per(patches),
        events_per_message: per(events),
        api_writes_per_message: per(patches + events),
        message_gets_per_message: per(gets),
        other_api_writes: all_writes - patches - events - creates,
        token_requests: tokens,
        throttled_429: throttled,
        peak_rss_mib: peak_rss,
        restart_peak_rss_mib: restart_rss,
        cpu_seconds: cpu_ticks as f64 / 100.0,
        cpu_seconds_per_1000: cpu_ticks as f64 / 100.0 / (n as f64 / 1000.0),
        ceiling_cores,
        ceiling_with_events_cores,
        cores,
        delivered: ids.len(),
        duplicated,
        missing: (runs * n).saturating_sub(distinct),
        concurrency,
    })
}

/// What the latency run measured; its default is a run that was skipped (complete, nothing failed).
struct LatencyRun {
    latency_ms: Latency,
    end_to_end_per_second: Option<f64>,
    create_per_second: Option<f64>,
    failed: usize,
    complete: bool,
}

impl Default for LatencyRun {
    fn default() -> LatencyRun {
        LatencyRun {
            latency_ms: Latency::default(),
            end_to_end_per_second: None,
            create_per_second: None,
            failed: 0,
            complete: true,
        }
    }
}

/// The latency run: `n` messages created while the operator runs, and the created-to-Sent
/// latency as this process observes both.
async fn latency_run(
    client: &Client,
    args: &Args,
    transport: Transport,
    n: usize,
    peers: &Peers<'_>,
    logs: &Path,
    tag: &str,
) -> Result<LatencyRun, BenchError> {
    let name = format!("{transport:?}").to_lowercase();
    let ns = create_namespace(client, &format!("bench-{name}-latency")).await?;
    let op_args = setup_profile(client, args, transport, peers, &ns).await?;
    let log: PathBuf = logs.join(format!("operator-{name}-{n}-latency.log"));
    let mut operator = Process::spawn("operator (latency run)", &args.operator_bin, &op_args, &[], log)?;
    wait_profile_ready(&Api::namespaced(client.clone(), &ns), &mut operator).await?;
    let (latency_seen, watch) = watch_finished(client, &ns).await;
    let driven = {
        let op = std::cell::RefCell::new(&mut operator);
        drive(
            client,
            args,
            &ns,
            "l",
            n,
            &format!("{tag} latency"),
            &latency_seen,
            || op.borrow_mut().check_alive(),
            || rss_mib(&op.borrow(), "VmRSS"),
        )
        .await?
    };
    watch.abort();
    operator.stop(Duration::from_secs(30));
    clean_namespace(client, &ns).await;
    let latency_seen = std::mem::take(&mut *latency_seen.lock().unwrap_or_else(|e| e.into_inner()));
    let latencies: Vec<Duration> = latency_seen
        .sent
        .iter()
        .filter_map(|(name, at)| driven.created.get(name).map(|c| at.saturating_duration_since(*c)))
        .collect();
    let ms = |q: f64| figures::percentile(&latencies, q).map_or(0, |d| d.as_millis() as u64);
    let latency_last = latency_seen.sent.values().max().copied().unwrap_or(driven.start);
    let create_secs = driven.created_at.map_or(0.0, |c| c.duration_since(driven.start).as_secs_f64());
    Ok(LatencyRun {
        latency_ms: Latency { p50: ms(0.50), p95: ms(0.95), p99: ms(0.99), max: ms(1.0) },
        end_to_end_per_second: Some(n as f64 / latency_last.duration_since(driven.start).as_secs_f64().max(1e-9)),
        create_per_second: Some(n as f64 / create_secs.max(1e-9)),
        failed: latency_seen.failed.len(),
        complete: driven.complete,
    })
}

/// Starts the operator again over the finished messages and reads its peak RSS once it is ready
/// and has had a few seconds to reconcile them all.
async fn restart_peak_rss(args: &Args, op_args: &[String], logs: &Path, tag: &str) -> Result<f64, BenchError> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| BenchError::Start(format!("a free port: {e}")))?
        .port();
    let mut op_args = op_args.to_vec();
    if let Some(i) = op_args.iter().position(|a| a == "--health-addr") {
        op_args[i + 1] = format!("127.0.0.1:{port}");
    }
    let log = logs.join(format!("operator-{}-restart.log", tag.replace([' ', '='], "-")));
    let mut operator = Process::spawn("operator (restart)", &args.operator_bin, &op_args, &[], log)?;
    let http = reqwest::Client::new();
    let start = Instant::now();
    loop {
        operator.check_alive()?;
        let ready = http.get(format!("http://127.0.0.1:{port}/readyz")).send().await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err(BenchError::Timeout("the restarted operator was not ready within 120s".into()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ready_after = start.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss = figures::status_kb(&operator.proc_status(), "VmHWM").unwrap_or(0) as f64 / 1048576.0;
    eprintln!("bench: [{tag}] restarted operator ready in {:.1}s, peak RSS {rss:.1} MiB", ready_after.as_secs_f64());
    operator.stop(Duration::from_secs(30));
    Ok(rss)
}

/// The client secret of the benchmark's emulator app: made up at every start, and only ever sent
/// to the loopback emulator.
pub fn secret_value() -> String {
    static SECRET: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SECRET.get_or_init(|| uuid::Uuid::new_v4().simple().to_string()).clone()
}
