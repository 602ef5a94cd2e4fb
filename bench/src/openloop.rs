//! The open-loop run: messages created at a fixed rate below the ceiling (by default half of it)
//! while the operator runs, each on its own schedule whatever the earlier ones did, for a fixed
//! time; create-to-Sent latency on this process's clock and where it went (the create, the watch,
//! the claim, the send).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::api::PostParams;
use kube::{Api, Client};
use mailroom::api::EmailMessage;
use serde::Serialize;

use crate::cpu;
use crate::figures::{self, Timeline};
use crate::peers::Process;
use crate::run::{self, PROFILE, Peers};
use crate::{Args, BenchError, Transport};

/// Percentiles of one part of the latency, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Spread {
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
}

impl Spread {
    fn of(samples: &[Duration]) -> Spread {
        let ms = |q: f64| figures::percentile(samples, q).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        Spread { p50: ms(0.5), p95: ms(0.95), p99: ms(0.99), max: ms(1.0) }
    }
}

/// What one open-loop run measured.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenLoopResult {
    transport: Transport,
    /// The backlog size whose ceiling set the rate.
    size: usize,
    ceiling_messages_per_second: Option<f64>,
    target_messages_per_second: f64,
    achieved_create_per_second: f64,
    seconds: f64,
    messages: usize,
    sent: usize,
    failed: usize,
    /// Create request sent to the watch seeing Sent.
    latency_ms: Spread,
    /// The create request alone.
    create_ms: Spread,
    /// The create's answer to the watch event of the new message.
    watch_ms: Spread,
    /// The watch event to the watch seeing it claimed: queue, rate-limit turn, claim patch.
    claim_ms: Spread,
    /// Claimed to Sent: the provider and the outcome patch.
    send_ms: Spread,
    /// Messages whose claim the watch did not see on its own (left out of the parts).
    unattributed: usize,
    peak_rss_mib: f64,
    cpu_seconds_per_1000: f64,
    /// Cores in use on average by each process while the messages were created and sent, and
    /// the machine's busy and idle cores.
    cores: BTreeMap<String, f64>,
}

/// Runs the operator, creates messages at `fraction` of `ceiling` (or `args.open_loop_rate`) for
/// `args.open_loop_secs`, and waits until every one is Sent or Failed.
pub async fn run(
    client: &Client,
    args: &Args,
    transport: Transport,
    size: usize,
    ceiling: Option<f64>,
    peers: &Peers<'_>,
    logs: &Path,
) -> Result<OpenLoopResult, BenchError> {
    let name = format!("{transport:?}").to_lowercase();
    let tag = format!("{name} open loop");
    let rate = args.open_loop_rate.or(ceiling.map(|c| c * args.open_loop_fraction)).unwrap_or(20.0);
    let (count, due) = figures::open_loop_schedule(rate, args.open_loop_secs as f64);
    let ns = run::create_namespace(client, &format!("bench-{name}-open")).await?;
    let op_args = run::setup_profile(client, args, transport, peers, &ns).await?;
    let log = logs.join(format!("operator-{name}-open-loop.log"));
    let mut operator = Process::spawn("operator (open loop)", &args.operator_bin, &op_args, &[], log)?;
    run::wait_profile_ready(&Api::namespaced(client.clone(), &ns), &mut operator).await?;
    let (seen, watch) = run::watch_finished(client, &ns).await;
    let cpu_before = figures::cpu_ticks(&operator.proc_stat()).unwrap_or(0);
    let watched = run::watched(peers, transport, &operator);
    let cores_before = watched.snapshot();
    eprintln!("bench: [{tag}] creating {count} messages at {rate:.1}/s for {}s in {ns}", args.open_loop_secs);

    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let creates: Arc<Mutex<HashMap<String, (Instant, Instant)>>> = Arc::default();
    let start = Instant::now();
    let creating = {
        let (api, creates, args) = (api.clone(), creates.clone(), args.clone());
        tokio::spawn(async move {
            let mut tasks = Vec::with_capacity(count);
            for i in 0..count {
                tokio::time::sleep_until((start + due(i)).into()).await;
                let m = run::message(&format!("o-{i:06}"), PROFILE, i, &args)?;
                let (api, creates) = (api.clone(), creates.clone());
                // Open loop: each create goes at its time, however long the earlier ones take.
                tasks.push(tokio::spawn(async move {
                    let sent = Instant::now();
                    let made = api.create(&PostParams::default(), &m).await;
                    let answered = Instant::now();
                    if made.is_ok() {
                        let name = m.metadata.name.clone().unwrap_or_default();
                        creates.lock().unwrap_or_else(|e| e.into_inner()).insert(name, (sent, answered));
                    }
                    made.map(|_| ())
                }));
            }
            for t in tasks {
                t.await.map_err(|e| BenchError::Peer(format!("create task: {e}")))??;
            }
            Ok::<Instant, BenchError>(Instant::now())
        })
    };
    let complete = {
        let op = std::cell::RefCell::new(&mut operator);
        run::wait_finished(
            args,
            count,
            &tag,
            &seen,
            start,
            || op.borrow_mut().check_alive(),
            || run::rss_mib(&op.borrow(), "VmRSS"),
        )
        .await
    };
    let created_at = creating.await.map_err(|e| BenchError::Peer(format!("create task: {e}")))??;
    let cpu = figures::cpu_ticks(&operator.proc_stat()).unwrap_or(0).saturating_sub(cpu_before);
    let cores = cores_before.cores_until(&watched.snapshot());
    let peak_rss = run::rss_mib(&operator, "VmHWM").unwrap_or(0.0);
    watch.abort();
    operator.stop(Duration::from_secs(30));
    run::clean_namespace(client, &ns).await;
    if !complete {
        return Err(BenchError::Timeout(format!("[{tag}] not every message finished")));
    }

    let seen = std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()));
    let creates = std::mem::take(&mut *creates.lock().unwrap_or_else(|e| e.into_inner()));
    let mut whole = Vec::new();
    let mut parts: [Vec<Duration>; 4] = Default::default();
    let mut unattributed = 0;
    for (name, &at) in &seen.sent {
        let Some(&(create_sent, create_answered)) = creates.get(name) else { continue };
        whole.push(at.saturating_duration_since(create_sent));
        match (seen.added.get(name), seen.sending.get(name)) {
            (Some(&added), Some(&sending)) => {
                let t = Timeline { create_sent, create_answered, added, sending, sent: at };
                for (part, d) in parts.iter_mut().zip(figures::phases(&t)) {
                    part.push(d);
                }
            }
            _ => unattributed += 1,
        }
    }
    let [create, watch, claim, send] = parts;
    let result = OpenLoopResult {
        transport,
        size,
        ceiling_messages_per_second: ceiling,
        target_messages_per_second: rate,
        achieved_create_per_second: count as f64 / created_at.duration_since(start).as_secs_f64().max(1e-9),
        seconds: created_at.duration_since(start).as_secs_f64(),
        messages: count,
        sent: seen.sent.len(),
        failed: seen.failed.len(),
        latency_ms: Spread::of(&whole),
        create_ms: Spread::of(&create),
        watch_ms: Spread::of(&watch),
        claim_ms: Spread::of(&claim),
        send_ms: Spread::of(&send),
        unattributed,
        peak_rss_mib: peak_rss,
        cpu_seconds_per_1000: cpu as f64 / 100.0 / (count as f64 / 1000.0),
        cores,
    };
    Ok(result)
}

/// The open-loop rows: the whole latency and its parts, p50 / p99 in milliseconds.
pub fn print(results: &[OpenLoopResult]) {
    println!(
        "latency below saturation: open loop, create request to Sent seen, p50 / p99 ms (figures, not assertions)"
    );
    println!(
        "{:<6} {:>7} {:>8} {:>7} {:>6} {:>15} {:>13} {:>13} {:>13} {:>13} {:>9} {:>7}",
        "transp",
        "ceiling",
        "rate/s",
        "secs",
        "sent",
        "create→Sent",
        "create",
        "watch",
        "claim",
        "send",
        "peak RSS",
        "CPU/1k"
    );
    let pair = |s: &Spread| format!("{:.0} / {:.0}", s.p50, s.p99);
    for r in results {
        println!(
            "{:<6} {:>7} {:>8.1} {:>7.0} {:>6} {:>15} {:>13} {:>13} {:>13} {:>13} {:>6.1}MiB {:>6.2}s",
            format!("{:?}", r.transport).to_lowercase(),
            r.ceiling_messages_per_second.map_or("-".into(), |c| format!("{c:.0}")),
            r.target_messages_per_second,
            r.seconds,
            r.sent,
            pair(&r.latency_ms),
            pair(&r.create_ms),
            pair(&r.watch_ms),
            pair(&r.claim_ms),
            pair(&r.send_ms),
            r.peak_rss_mib,
            r.cpu_seconds_per_1000,
        );
    }
    for r in results {
        println!("{:<6} {}", format!("{:?}", r.transport).to_lowercase(), cpu::describe(&r.cores));
    }
}
