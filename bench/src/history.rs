//! The retained-history run: N finished messages exist (created directly with a Sent status, as
//! the operator writes it; nothing is sent), then the operator starts over them: time to Ready,
//! peak RSS and CPU, and how long a new message takes to be Sent with that history present.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use mailroom::api::{EmailMessage, Phase};
use mailroom::controller::status::{self, Claim};
use mailroom::transport::Delivered;
use serde::Serialize;
use serde_json::json;

use crate::figures;
use crate::peers::Process;
use crate::run::{self, PROFILE, Peers};
use crate::{Args, BenchError, Transport};

/// What the history run measured.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryResult {
    transport: Transport,
    /// Finished messages present.
    finished: usize,
    /// How long creating them took (create and status patch each).
    create_seconds: f64,
    /// Operator start to /readyz answering 200.
    seconds_to_ready: f64,
    /// VmHWM after Ready and a settling pause.
    peak_rss_mib: f64,
    /// VmRSS at the same point.
    rss_mib: f64,
    /// CPU seconds from start to the end of the settling pause, per 1,000 finished messages.
    cpu_seconds_per_1000: f64,
    /// Create request to Sent seen, for each new message created with the history present.
    new_message_ms: Vec<u64>,
    /// VmHWM at the end, after the new messages.
    peak_rss_end_mib: f64,
}

impl HistoryResult {
    /// Finished messages present.
    pub fn finished_count(&self) -> usize {
        self.finished
    }
    /// Operator start to Ready.
    pub fn seconds_to_ready(&self) -> f64 {
        self.seconds_to_ready
    }
    /// Peak RSS after Ready.
    pub fn peak_rss(&self) -> f64 {
        self.peak_rss_mib
    }
    /// CPU seconds per 1,000 finished messages present.
    pub fn cpu_per_1000(&self) -> f64 {
        self.cpu_seconds_per_1000
    }
}

/// Creates `args.history` finished messages, starts the operator and measures it.
pub async fn run(
    client: &Client,
    args: &Args,
    transport: Transport,
    peers: &Peers<'_>,
    logs: &Path,
) -> Result<HistoryResult, BenchError> {
    let n = args.history;
    let name = format!("{transport:?}").to_lowercase();
    let tag = format!("{name} history n={n}");
    let ns = run::create_namespace(client, &format!("bench-{name}-history")).await?;
    let op_args = run::setup_profile(client, args, transport, peers, &ns).await?;
    eprintln!("bench: [{tag}] creating {n} finished messages in {ns}");
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let start = Instant::now();
    let done = std::sync::atomic::AtomicUsize::new(0);
    futures::stream::iter(0..n)
        .map(|i| {
            let (api, done, name, tag) = (api.clone(), &done, &name, &tag);
            async move {
                let m = finished_message(&format!("h-{i:06}"), i, args)?;
                let made = api.create(&PostParams::default(), &m).await?;
                let claim = Claim {
                    attempt: 1,
                    message_id: format!("<{}@contoso.com>", made.uid().unwrap_or_default()),
                    recipients: 1,
                    transport: name.clone(),
                    from: m.spec.from.clone().unwrap_or_default(),
                    id: format!("history-{i}"),
                    holder: "mailroom-bench".into(),
                    interruptions: 0,
                };
                let g = made.metadata.generation;
                let claimed = status::claimed(&Default::default(), &claim, g, Timestamp::now());
                let accepted = Delivered { response: "250 2.0.0 OK queued".into(), ..Delivered::default() };
                let sent = status::sent(&claimed, &accepted, g, Timestamp::now());
                api.patch_status(&made.name_any(), &PatchParams::default(), &Patch::Merge(json!({"status": sent})))
                    .await?;
                let k = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if k % 10_000 == 0 {
                    eprintln!(
                        "bench: [{tag}] {k}/{n} finished messages ({:.0}/s)",
                        k as f64 / start.elapsed().as_secs_f64()
                    );
                }
                Ok::<_, BenchError>(())
            }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<()>>()
        .await?;
    let create_seconds = start.elapsed().as_secs_f64();

    let port = free_port()?;
    let mut op_args = op_args;
    if let Some(i) = op_args.iter().position(|a| a == "--health-addr") {
        op_args[i + 1] = format!("127.0.0.1:{port}");
    }
    eprintln!("bench: [{tag}] starting the operator over {n} finished messages");
    let log = logs.join(format!("operator-{name}-history-{n}.log"));
    let mut operator = Process::spawn("operator (history)", &args.operator_bin, &op_args, &[], log)?;
    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        operator.check_alive()?;
        let ready = http.get(format!("http://127.0.0.1:{port}/readyz")).send().await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        if started.elapsed() > Duration::from_secs(args.timeout) {
            return Err(BenchError::Timeout(format!("[{tag}] the operator was not ready within {}s", args.timeout)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds_to_ready = started.elapsed().as_secs_f64();
    eprintln!("bench: [{tag}] ready after {seconds_to_ready:.1}s; settling 10s");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let peak_rss = run::rss_mib(&operator, "VmHWM").unwrap_or(0.0);
    let rss = run::rss_mib(&operator, "VmRSS").unwrap_or(0.0);
    let cpu = figures::cpu_ticks(&operator.proc_stat()).unwrap_or(0);

    // New messages with the history present, one at a time, each watched by name.
    let mut new_message_ms = Vec::new();
    for i in 0..5 {
        let m = run::message(&format!("new-{i}"), PROFILE, i, args)?;
        let ms = time_to_sent(&api, &m, Duration::from_secs(args.timeout)).await?;
        eprintln!("bench: [{tag}] new message {i} Sent {ms} ms after its create");
        new_message_ms.push(ms);
    }
    let peak_rss_end = run::rss_mib(&operator, "VmHWM").unwrap_or(0.0);
    operator.stop(Duration::from_secs(30));
    eprintln!("bench: [{tag}] deleting the history");
    run::clean_namespace(client, &ns).await;
    Ok(HistoryResult {
        transport,
        finished: n,
        create_seconds,
        seconds_to_ready,
        peak_rss_mib: peak_rss,
        rss_mib: rss,
        cpu_seconds_per_1000: cpu as f64 / 100.0 / (n.max(1) as f64 / 1000.0),
        new_message_ms,
        peak_rss_end_mib: peak_rss_end,
    })
}

/// A small finished message of the history: a short body, no attachment.
fn finished_message(name: &str, i: usize, args: &Args) -> Result<EmailMessage, BenchError> {
    let mut m = run::message(name, PROFILE, i, &Args { attachment_bytes: 0, body_bytes: 256, ..args.clone() })?;
    m.spec.headers.clear();
    Ok(m)
}

/// Creates `m` and waits, watching it by name, until it is Sent: milliseconds from the create
/// request to the watch event.
async fn time_to_sent(api: &Api<EmailMessage>, m: &EmailMessage, timeout: Duration) -> Result<u64, BenchError> {
    let name = m.name_any();
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let watch = {
        let api = api.clone();
        tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let stream = watcher(api, config);
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::InitDone) => {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(watcher::Event::Apply(m)) if m.status.as_ref().and_then(|s| s.phase) == Some(Phase::Sent) => {
                        return Some(Instant::now());
                    }
                    _ => {}
                }
            }
            None
        })
    };
    let _ = ready_rx.await;
    let created = Instant::now();
    api.create(&PostParams::default(), m).await?;
    let sent = tokio::time::timeout(timeout, watch)
        .await
        .map_err(|_| BenchError::Timeout(format!("{name} was not Sent within {timeout:?}")))?
        .map_err(|e| BenchError::Peer(format!("watch task: {e}")))?
        .ok_or_else(|| BenchError::Peer(format!("the watch of {name} ended")))?;
    Ok(sent.duration_since(created).as_millis() as u64)
}

fn free_port() -> Result<u16, BenchError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| BenchError::Start(format!("a free port: {e}")))
}

/// The history row.
pub fn print(r: &HistoryResult) {
    println!("retained history: {} finished messages present (figures, not assertions)", r.finished);
    println!(
        "{:<6} {:>9} {:>11} {:>9} {:>9} {:>8} {:>22} {:>13}",
        "transp", "finished", "to Ready s", "peak RSS", "RSS", "CPU/1k", "new message Sent ms", "peak RSS end"
    );
    let new: Vec<String> = r.new_message_ms.iter().map(|ms| ms.to_string()).collect();
    println!(
        "{:<6} {:>9} {:>11.1} {:>6.1}MiB {:>6.1}MiB {:>7.3}s {:>22} {:>10.1}MiB",
        format!("{:?}", r.transport).to_lowercase(),
        r.finished,
        r.seconds_to_ready,
        r.peak_rss_mib,
        r.rss_mib,
        r.cpu_seconds_per_1000,
        new.join(","),
        r.peak_rss_end_mib,
    );
}
