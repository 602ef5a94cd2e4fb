//! Bounded memory: a tenant that creates many large messages at once cannot push the operator
//! past its memory budget. 64 messages, each with attachments of 1 MiB (the most a Secret holds)
//! read from Secrets, go at once through one profile to the SMTP test server; the operator's
//! peak resident set (VmHWM) stays under what it was before they came, plus the budget, plus a
//! fixed allowance. Without the budget the same messages are built side by side: 64 × 8 MiB of
//! attachments, each also held encoded twice, several GB.
//!
//! Each message carries 8 MiB rather than the 25 MiB an SMTP message may: the bound does not
//! depend on the size (a message over the budget goes alone), and the test server stores
//! every message, so 64 of the largest would only make the run long.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::smtp_peer::SmtpPeer;
use common::{Operator, create_yaml, relay_profile, wait_for};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::PostParams;
use mailroom::api::{EmailMessage, MailProfile, Phase, find_condition};
use serde_json::json;

const MIB: u64 = 1024 * 1024;
/// Messages created at once: the operator's default reconcile concurrency.
const MESSAGES: usize = 64;
/// Attachments per message, each a whole Secret's worth.
const ATTACHMENTS: usize = 8;
/// The Secrets the attachments come from, each holding one key of [`SOURCE_BYTES`].
const SOURCES: usize = 8;
/// Just under 1 MiB, the most a Secret's data may be.
const SOURCE_BYTES: usize = 1024 * 1024 - 1024;
/// The budget the operator runs with.
const BUDGET: u64 = 64 * MIB;
/// What the operator may hold besides the budget while it sends: its runtime's and its
/// allocator's working memory, the objects of messages whose outcome is being recorded, one
/// Secret watch event and the API client's buffers.
const ALLOWANCE: u64 = 64 * MIB;

/// A kernel figure of a process, in bytes (`VmHWM`, `VmRSS`).
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} in status"));
    let kib: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("a number of kB");
    kib * 1024
}

/// Bytes that base64 cannot shorten and MIME must encode: not ASCII, not repetitive.
fn payload(seed: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed as u64;
    (0..SOURCE_BYTES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test]
async fn many_large_messages_at_once_stay_within_the_memory_budget() {
    let client = common::client().await;
    let ns = common::namespace(&client, "memory", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let profile = relay_profile("relay", peer.smtp_port, "  limits: {messagesPerMinute: 100000, maxConcurrent: 64}");
    create_yaml(&client, &ns, &profile).await;

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    for i in 0..SOURCES {
        let secret = Secret {
            metadata: kube::api::ObjectMeta { name: Some(format!("report-{i}")), ..Default::default() },
            data: Some(BTreeMap::from([("report.bin".to_string(), ByteString(payload(i)))])),
            ..Default::default()
        };
        secrets.create(&PostParams::default(), &secret).await.expect("create the Secret");
    }

    let budget = format!("{}Mi", BUDGET / MIB);
    let operator = Operator::start("memory", &ns, &["--memory-budget", &budget]);
    let profiles: Api<MailProfile> = Api::namespaced(client.clone(), &ns);
    wait_for(&profiles, "relay", Duration::from_secs(60), |p| {
        p.status.as_ref().and_then(|s| find_condition(&s.conditions, "Ready")).is_some_and(|c| c.status == "True")
    })
    .await;
    // Settled: the caches are listed and the Secrets' watch events were seen.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline = proc_status_bytes(operator.pid(), "VmHWM:");

    let messages: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let attachments: Vec<_> = (0..ATTACHMENTS)
        .map(|i| {
            json!({"name": format!("report-{i}.bin"), "contentType": "application/octet-stream",
                   "secretRef": {"name": format!("report-{}", i % SOURCES), "key": "report.bin"}})
        })
        .collect();
    for i in 0..MESSAGES {
        let msg: EmailMessage = serde_json::from_value(json!({
            "apiVersion": "mailroom.dev/v1alpha1", "kind": "EmailMessage",
            "metadata": {"name": format!("large-{i}")},
            "spec": {
                "profileRef": {"name": "relay"},
                "to": ["ops@contoso.com"],
                "subject": format!("large {i}"),
                "body": {"text": "reports attached"},
                "attachments": attachments,
            },
        }))
        .expect("EmailMessage");
        messages.create(&PostParams::default(), &msg).await.expect("create the message");
    }

    // A deadlock is a stall: no message sent for STALL. A slow machine only takes longer.
    const STALL: Duration = Duration::from_secs(90);
    let (mut last_sent, mut last_progress) = (0, Instant::now());
    let sent = loop {
        let list = messages.list(&Default::default()).await.expect("list messages");
        let failed: Vec<_> = list.items.iter().filter(|m| m.phase() == Some(Phase::Failed)).collect();
        assert!(failed.is_empty(), "failed: {:#?}", failed.first().map(|m| &m.status));
        let sent = list.items.iter().filter(|m| m.phase() == Some(Phase::Sent)).count();
        if sent > last_sent {
            (last_sent, last_progress) = (sent, Instant::now());
        }
        if sent == MESSAGES || last_progress.elapsed() > STALL {
            break sent;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let peak = proc_status_bytes(operator.pid(), "VmHWM:");
    let bound = baseline + BUDGET + ALLOWANCE;
    eprintln!(
        "memory: {MESSAGES} messages x {ATTACHMENTS} attachments of {SOURCE_BYTES} bytes, budget {} MiB: \
         baseline VmHWM {:.1} MiB, peak VmHWM {:.1} MiB, bound {:.1} MiB (baseline + budget + {} MiB), {sent} sent",
        BUDGET / MIB,
        baseline as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        bound as f64 / MIB as f64,
        ALLOWANCE / MIB,
    );
    assert_eq!(sent, MESSAGES, "every message is sent: waiting for memory never deadlocks");
    assert!(peak <= bound, "peak resident set {peak} bytes is over the bound of {bound} bytes");

    // Everything arrived whole.
    let received = peer.wait_messages(MESSAGES, Duration::from_secs(30)).await;
    assert_eq!(received.len(), MESSAGES);
    for m in &received {
        let size = m["size"].as_u64().expect("size");
        assert!(size > (ATTACHMENTS * SOURCE_BYTES) as u64 * 4 / 3, "message of {size} bytes is short");
    }
    drop(operator);
}
