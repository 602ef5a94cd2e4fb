//! `make soak`: the operator (release build) for a long while at a steady message rate, through
//! Graph (the emulator, with tokens that expire, so they are refreshed during the run) and an SMTP
//! relay, every message deleted `ttlSecondsAfterFinished` after it finished. Every few seconds it
//! samples the operator's resident memory, its async tasks (the `mailroom_tasks` gauge), its
//! threads and its open file descriptors (/proc), and how many messages exist. At the end it fits
//! a straight line through each series after a warm-up and prints the slopes per hour, with the
//! samples written to CSV and JSON. A series is called a leak only when its slope stands out of
//! the noise (over three standard errors) and grows by more than a bound per 1,000 messages
//! handled (a task, a descriptor, 256 bytes): a figure to look at, never an assertion.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use mailroom::api::{EmailMessage, MailProfile};
use serde::Serialize;
use serde_json::json;

use crate::figures::slope_per_hour;
use crate::lifecycle::Operator;
use crate::peers::{Emulator, SmtpPeer};
use crate::run::{clean_namespace, secret_value};
use crate::{Args, BenchError};

const TENANT: &str = "5b1c2d3e-0000-4000-8000-00000000be01";
const CLIENT_ID: &str = "5b1c2d3e-1111-4111-8111-00000000be02";
const SECRET: &str = "bench-graph";
/// Token lifetime the emulator gives the soak's app: refreshed about every five minutes.
const TOKEN_LIFETIME_SECS: u64 = 600;
/// RSS growth per 1,000 messages handled that counts as a leak: 256 bytes a message.
const LEAK_MIB_PER_THOUSAND: f64 = 0.25;

/// One sample of the operator.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Sample {
    /// Seconds since the operator started.
    t: f64,
    rss_mib: f64,
    /// Tasks alive in its runtime (None: a build without the gauge).
    tasks: Option<f64>,
    threads: f64,
    fds: f64,
    /// EmailMessages in the namespace (finished ones wait for their TTL).
    messages: usize,
    created: u64,
}

/// A series' figures after the warm-up.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Trend {
    name: &'static str,
    unit: &'static str,
    mean: f64,
    min: f64,
    max: f64,
    slope_per_hour: Option<f64>,
    /// The slope's standard error per hour.
    slope_error_per_hour: Option<f64>,
    /// The slope per 1,000 messages handled.
    per_thousand_messages: Option<f64>,
    verdict: &'static str,
}

/// The figures of one series; `leak_per_thousand` is the growth per 1,000 messages handled above
/// which a real trend counts as a leak (None: a workload figure, not a resource).
fn trend(
    name: &'static str,
    unit: &'static str,
    points: &[(f64, f64)],
    messages_per_hour: f64,
    leak_per_thousand: Option<f64>,
) -> Trend {
    let values: Vec<f64> = points.iter().map(|p| p.1).collect();
    let mean = if values.is_empty() { 0.0 } else { values.iter().sum::<f64>() / values.len() as f64 };
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let line = slope_per_hour(points);
    let per_thousand = line.map(|(slope, _)| slope / (messages_per_hour / 1000.0).max(f64::MIN_POSITIVE));
    Trend {
        name,
        unit,
        mean,
        min,
        max,
        slope_per_hour: line.map(|l| l.0),
        slope_error_per_hour: line.map(|l| l.1),
        per_thousand_messages: per_thousand,
        verdict: verdict(line, per_thousand, leak_per_thousand),
    }
}

/// Flat, unless the slope stands out of the noise (over three standard errors) and grows by
/// more than `limit` per 1,000 messages: a leak of a task, a descriptor or a few hundred bytes per
/// message shows within a soak's few thousand messages; allocator noise and a busy moment do not.
fn verdict(line: Option<(f64, f64)>, per_thousand: Option<f64>, limit: Option<f64>) -> &'static str {
    let (Some((slope, error)), Some(per_thousand), Some(limit)) = (line, per_thousand, limit) else {
        return "";
    };
    let real = slope > 3.0 * error;
    match (real, per_thousand > limit) {
        (true, true) => "LEAK? grows with the messages handled",
        (true, false) => "flat (a trend, below the leak bound)",
        (false, _) => "flat",
    }
}

/// Entries of /proc/PID/fd.
fn open_fds(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as f64).unwrap_or(0.0)
}

/// The `Threads:` line of /proc/PID/status.
fn threads(status: &str) -> f64 {
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

/// Runs the soak for `minutes`.
pub async fn run(args: Args, minutes: u64) -> Result<(), BenchError> {
    let repo = std::env::current_dir().map_err(|e| BenchError::io(Path::new("."), e))?;
    let out = if args.out.is_absolute() { args.out.clone() } else { repo.join(&args.out) };
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| BenchError::io(&logs, e))?;
    let client = Client::try_default().await?;
    let duration = Duration::from_secs(minutes * 60);
    let warmup = Duration::from_secs(args.soak_warmup_minutes * 60).min(duration / 2);
    let sample_every = Duration::from_secs(args.soak_sample_secs.max(1));
    eprintln!(
        "soak: {minutes} min at {} messages/s, TTL {} s after finishing, a sample every {} s, warm-up {} min",
        args.soak_rate,
        args.soak_ttl_secs,
        sample_every.as_secs(),
        warmup.as_secs() / 60
    );

    let smtp = SmtpPeer::start(&args.python, &repo, &out.join("smtp")).await?;
    let key = repo.join("target/test-emulator-signing-key.pem");
    let emu = Emulator::start(&args.emulator_bin, &out.join("emulator"), key.exists().then_some(key.as_path())).await?;
    let app = json!({
        "tenantId": TENANT, "clientId": CLIENT_ID, "secrets": [secret_value()], "roles": ["Mail.Send"],
        "tokenLifetimeSeconds": TOKEN_LIFETIME_SECS,
    });
    emu.reset(&app).await?;

    let ns = format!("soak-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": ns}})).map_err(|e| BenchError::Peer(e.to_string()))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &namespace).await?;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": SECRET}, "stringData": {"client-secret": secret_value()},
    }))
    .map_err(|e| BenchError::Peer(e.to_string()))?;
    Api::<Secret>::namespaced(client.clone(), &ns).create(&PostParams::default(), &secret).await?;
    let limits = json!({"messagesPerMinute": 100_000, "maxConcurrent": 4});
    let senders = json!({"default": "sender0@contoso.com"});
    for (name, transport) in [
        (
            "graph",
            json!({"graph": {
                "tenantId": TENANT, "clientId": CLIENT_ID, "clientSecretRef": {"name": SECRET, "key": "client-secret"},
                "authorityHost": emu.url, "endpoint": emu.url,
            }}),
        ),
        ("smtp", json!({"smtp": {"host": "127.0.0.1", "port": smtp.smtp_port, "tls": "None"}})),
    ] {
        let mut spec = json!({"senders": senders, "limits": limits});
        if let (Some(s), Some(t)) = (spec.as_object_mut(), transport.as_object()) {
            s.extend(t.clone());
        }
        let profile: MailProfile = serde_json::from_value(json!({
            "apiVersion": "mailroom.dev/v1alpha1", "kind": "MailProfile", "metadata": {"name": name}, "spec": spec,
        }))
        .map_err(|e| BenchError::Peer(format!("profile: {e}")))?;
        Api::<MailProfile>::namespaced(client.clone(), &ns).create(&PostParams::default(), &profile).await?;
    }

    let extra = vec!["--allow-custom-endpoints".to_string(), "--ca-bundle".into(), emu.ca.display().to_string()];
    let mut op = Operator::start(&args, &ns, &extra, &logs.join("soak-operator.log"))?;
    op.wait_ready().await?;
    let started = Instant::now();
    eprintln!("soak: operator ready (pid {}); log {}", op.process.pid(), logs.join("soak-operator.log").display());

    // The steady stream of messages, each deleted TTL seconds after it finished.
    let created = Arc::new(AtomicU64::new(0));
    let create_errors = Arc::new(AtomicU64::new(0));
    let messages: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let creator = {
        let (messages, created, errors) = (messages.clone(), Arc::clone(&created), Arc::clone(&create_errors));
        let (rate, ttl, body_bytes) = (args.soak_rate.max(0.01), args.soak_ttl_secs, args.body_bytes);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let body: String = "mailroom soak body line\n".chars().cycle().take(body_bytes).collect();
            for i in 0u64.. {
                tick.tick().await;
                let profile = if i % 2 == 0 { "graph" } else { "smtp" };
                let obj = serde_json::from_value::<EmailMessage>(json!({
                    "apiVersion": "mailroom.dev/v1alpha1", "kind": "EmailMessage",
                    "metadata": {"generateName": "soak-"},
                    "spec": {
                        "profileRef": {"name": profile}, "to": [format!("rcpt{}@contoso.com", i % 50)],
                        "subject": format!("soak message {i}"), "body": {"text": body},
                        "ttlSecondsAfterFinished": ttl,
                    },
                }));
                let Ok(obj) = obj else { continue };
                match messages.create(&PostParams::default(), &obj).await {
                    Ok(_) => created.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };

    let mut samples: Vec<Sample> = Vec::new();
    let mut tick = tokio::time::interval(sample_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_print = Instant::now() - Duration::from_secs(3600);
    while started.elapsed() < duration {
        tick.tick().await;
        if let Err(e) = op.process.check_alive() {
            creator.abort();
            return Err(e);
        }
        let status = op.process.proc_status();
        let existing = messages.list_metadata(&ListParams::default()).await.map(|l| l.items.len()).unwrap_or(0);
        let sample = Sample {
            t: started.elapsed().as_secs_f64(),
            rss_mib: crate::figures::status_kb(&status, "VmRSS").map_or(0.0, |b| b as f64 / 1048576.0),
            tasks: op.gauge("mailroom_tasks").await.ok().flatten(),
            threads: threads(&status),
            fds: open_fds(op.process.pid()),
            messages: existing,
            created: created.load(Ordering::Relaxed),
        };
        if last_print.elapsed() >= Duration::from_secs(60) {
            last_print = Instant::now();
            eprintln!(
                "soak: {:>6.0}s  RSS {:>6.1} MiB  tasks {:>5}  threads {:>3}  fds {:>4}  messages {:>5}  created {:>6}",
                sample.t,
                sample.rss_mib,
                sample.tasks.map_or("-".into(), |t| format!("{t:.0}")),
                sample.threads,
                sample.fds,
                sample.messages,
                sample.created
            );
        }
        samples.push(sample);
    }
    creator.abort();

    // Every message sent (or failed) and deleted after its TTL: the run lost nothing.
    let settle = Instant::now();
    let remaining = loop {
        let n = messages.list_metadata(&ListParams::default()).await.map(|l| l.items.len()).unwrap_or(usize::MAX);
        if n == 0 || settle.elapsed() > Duration::from_secs(args.soak_ttl_secs + 120) {
            break n;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let stats = emu.stats().await?;
    let graph_accepted = stats["messagesAccepted"].as_u64().unwrap_or(0);
    let smtp_received = smtp.message_ids().await?.len();
    let token_requests = emu.token_requests().await?;
    op.process.stop(Duration::from_secs(30));
    clean_namespace(&client, &ns).await;

    let after: Vec<&Sample> = samples.iter().filter(|s| s.t >= warmup.as_secs_f64()).collect();
    let series = |f: &dyn Fn(&Sample) -> Option<f64>| -> Vec<(f64, f64)> {
        after.iter().filter_map(|s| f(s).map(|v| (s.t, v))).collect()
    };
    let per_hour = args.soak_rate * 3600.0;
    let trends = vec![
        trend("RSS", "MiB", &series(&|s| Some(s.rss_mib)), per_hour, Some(LEAK_MIB_PER_THOUSAND)),
        trend("tasks (mailroom_tasks)", "tasks", &series(&|s| s.tasks), per_hour, Some(1.0)),
        trend("threads (/proc)", "threads", &series(&|s| Some(s.threads)), per_hour, Some(1.0)),
        trend("open fds (/proc)", "fds", &series(&|s| Some(s.fds)), per_hour, Some(1.0)),
        trend("messages existing", "messages", &series(&|s| Some(s.messages as f64)), per_hour, None),
    ];
    let total_created = created.load(Ordering::Relaxed);

    let csv = out.join("soak-samples.csv");
    let mut text = String::from("t_seconds,rss_mib,tasks,threads,fds,messages,created\n");
    for s in &samples {
        text.push_str(&format!(
            "{:.1},{:.2},{},{},{},{},{}\n",
            s.t,
            s.rss_mib,
            s.tasks.map_or(String::new(), |t| format!("{t:.0}")),
            s.threads,
            s.fds,
            s.messages,
            s.created
        ));
    }
    std::fs::write(&csv, text).map_err(|e| BenchError::io(&csv, e))?;
    let file = out.join("soak.json");
    let doc = json!({
        "command": std::env::var("BENCH_COMMAND").unwrap_or_else(|_| "make soak".into()),
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "config": {
            "minutes": minutes, "ratePerSecond": args.soak_rate, "ttlSecondsAfterFinished": args.soak_ttl_secs,
            "sampleSeconds": sample_every.as_secs(), "warmupSeconds": warmup.as_secs(),
            "tokenLifetimeSeconds": TOKEN_LIFETIME_SECS, "bodyBytes": args.body_bytes,
        },
        "created": total_created,
        "createErrors": create_errors.load(Ordering::Relaxed),
        "graphAccepted": graph_accepted,
        "smtpReceived": smtp_received,
        "tokenRequests": token_requests,
        "remainingAfterSettle": remaining,
        "trends": trends,
        "samples": samples,
    });
    let pretty = serde_json::to_string_pretty(&doc).map_err(|e| BenchError::Peer(e.to_string()))?;
    std::fs::write(&file, pretty).map_err(|e| BenchError::io(&file, e))?;

    println!();
    println!(
        "mailroom soak: {minutes} min, {total_created} messages created ({} errors), {graph_accepted} accepted by Graph, {smtp_received} received by SMTP, {token_requests} token requests, {remaining} left after the last TTL (figures, not assertions)",
        create_errors.load(Ordering::Relaxed)
    );
    println!("after a {} min warm-up, {} samples:", warmup.as_secs() / 60, after.len());
    println!(
        "{:<24} {:>8} {:>8} {:>8} {:>22} {:>16}  verdict",
        "series", "mean", "min", "max", "slope per hour", "per 1,000 msgs"
    );
    for t in &trends {
        let slope = match (t.slope_per_hour, t.slope_error_per_hour) {
            (Some(s), Some(e)) => format!("{s:+.3} ± {e:.3} {}", t.unit),
            _ => "-".into(),
        };
        println!(
            "{:<24} {:>8.1} {:>8.1} {:>8.1} {:>22} {:>16}  {}",
            t.name,
            t.mean,
            t.min,
            t.max,
            slope,
            t.per_thousand_messages.map_or("-".into(), |p| format!("{p:+.3}")),
            t.verdict
        );
    }
    println!("samples: {}", csv.display());
    println!("results: {}", file.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leak_must_be_real_and_large_per_message() {
        // 7,200 messages an hour.
        let hour = 7200.0;
        // One fd per 100 messages, with no noise: a leak.
        let leak: Vec<(f64, f64)> = (0..100).map(|i| (i as f64 * 10.0, 20.0 + i as f64 * 0.2)).collect();
        assert_eq!(trend("fds", "fds", &leak, hour, Some(1.0)).verdict, "LEAK? grows with the messages handled");
        // Integer noise around a constant: flat.
        let noise: Vec<(f64, f64)> =
            (0..100).map(|i| (i as f64 * 10.0, 22.0 + [0.0, 2.0, 1.0, 0.0, 3.0][i % 5])).collect();
        assert_eq!(trend("tasks", "tasks", &noise, hour, Some(1.0)).verdict, "flat");
        // A real but tiny rise: a trend below the bound.
        let tiny: Vec<(f64, f64)> = (0..100).map(|i| (i as f64 * 10.0, 21.0 + i as f64 * 0.0001)).collect();
        assert_eq!(trend("RSS", "MiB", &tiny, hour, Some(0.25)).verdict, "flat (a trend, below the leak bound)");
        // A workload figure gets no verdict.
        assert_eq!(trend("messages", "messages", &leak, hour, None).verdict, "");
    }
}
