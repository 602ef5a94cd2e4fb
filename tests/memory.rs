//! Bounded memory: a tenant that creates many large messages at once cannot push the operator
//! past its memory budget. 64 messages, each with attachments of 1 MiB (the most a Secret holds)
//! read from Secrets, go at once through one profile, to the SMTP test server in one test and to
//! the Microsoft 365 emulator's Graph in the other (a draft and upload sessions: each message is
//! over the 4 MB a JSON sendMail may carry); the operator's peak resident set (VmHWM) stays
//! under what it was before they came, plus the budget, plus a fixed allowance. Without the
//! budget the same messages are built side by side: 64 × 8 MiB of attachments, each also held
//! encoded twice, several GB.
//!
//! Each message carries 8 MiB rather than the 25 MiB an SMTP message may: the bound does not
//! depend on the size (a message over the budget goes alone), and the test server stores
//! every message, so 64 of the largest would only make the run long.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::emulator::{Emulator, concat_pems};
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

/// One run's setup: the namespace, the profile the messages use, and the operator's flags.
struct Run {
    client: kube::Client,
    ns: String,
    profile: &'static str,
}

impl Run {
    async fn new(prefix: &str, profile: &'static str) -> Run {
        let client = common::client().await;
        let ns = common::namespace(&client, prefix, &[]).await;
        Run { client, ns, profile }
    }

    /// The Secrets the attachments come from.
    async fn create_sources(&self) {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        for i in 0..SOURCES {
            let secret = Secret {
                metadata: kube::api::ObjectMeta { name: Some(format!("report-{i}")), ..Default::default() },
                data: Some(BTreeMap::from([("report.bin".to_string(), ByteString(payload(i)))])),
                ..Default::default()
            };
            secrets.create(&PostParams::default(), &secret).await.expect("create the Secret");
        }
    }

    async fn wait_profile_ready(&self) {
        let profiles: Api<MailProfile> = Api::namespaced(self.client.clone(), &self.ns);
        wait_for(&profiles, self.profile, Duration::from_secs(60), |p| {
            p.status.as_ref().and_then(|s| find_condition(&s.conditions, "Ready")).is_some_and(|c| c.status == "True")
        })
        .await;
        // Settled: the caches are listed and the Secrets' watch events were seen.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    /// Creates the messages at once, waits until all are Sent (or sending stalls), and returns
    /// the number sent and the operator's peak resident set, checked against the bound.
    async fn send_all_and_measure(&self, operator: &Operator, path: &str) -> usize {
        let baseline = proc_status_bytes(operator.pid(), "VmHWM:");
        let messages: Api<EmailMessage> = Api::namespaced(self.client.clone(), &self.ns);
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
                    "profileRef": {"name": self.profile},
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
            "memory ({path}): {MESSAGES} messages x {ATTACHMENTS} attachments of {SOURCE_BYTES} bytes, budget {} MiB: \
             baseline VmHWM {:.1} MiB, peak VmHWM {:.1} MiB, bound {:.1} MiB (baseline + budget + {} MiB), {sent} sent",
            BUDGET / MIB,
            baseline as f64 / MIB as f64,
            peak as f64 / MIB as f64,
            bound as f64 / MIB as f64,
            ALLOWANCE / MIB,
        );
        assert_eq!(sent, MESSAGES, "every message is sent: waiting for memory never deadlocks");
        assert!(peak <= bound, "peak resident set {peak} bytes is over the bound of {bound} bytes");
        sent
    }
}

#[tokio::test]
async fn many_large_messages_at_once_stay_within_the_memory_budget() {
    let run = Run::new("memory", "relay").await;
    let peer = SmtpPeer::start(&[]);
    let profile = relay_profile("relay", peer.smtp_port, "  limits: {messagesPerMinute: 100000, maxConcurrent: 64}");
    create_yaml(&run.client, &run.ns, &profile).await;
    run.create_sources().await;

    let budget = format!("{}Mi", BUDGET / MIB);
    let operator = Operator::start("memory", &run.ns, &["--memory-budget", &budget]);
    run.wait_profile_ready().await;
    run.send_all_and_measure(&operator, "SMTP").await;

    // Everything arrived whole.
    let received = peer.wait_messages(MESSAGES, Duration::from_secs(30)).await;
    assert_eq!(received.len(), MESSAGES);
    for m in &received {
        let size = m["size"].as_u64().expect("size");
        assert!(size > (ATTACHMENTS * SOURCE_BYTES) as u64 * 4 / 3, "message of {size} bytes is short");
    }
    drop(operator);
}

const TENANT: &str = "7e3b1c2d-0000-4000-8000-00000000a3e0";
const CLIENT: &str = "9a1f0c3e-1111-4111-8111-00000000a3e1";

#[tokio::test]
async fn many_large_messages_through_graph_stay_within_the_memory_budget() {
    let run = Run::new("memory-graph", "graph").await;
    let emu = Emulator::start("memory-graph").await;
    // A message over 4 MB goes as a draft, which Graph lets an app create with Mail.ReadWrite.
    let app = json!({"tenantId": TENANT, "clientId": CLIENT, "secrets": ["memory-secret-1"],
                     "roles": ["Mail.Send", "Mail.ReadWrite"]});
    emu.register_app(app).await;
    let credentials: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "graph-credentials"}, "stringData": {"client-secret": "memory-secret-1"},
    }))
    .expect("Secret");
    Api::<Secret>::namespaced(run.client.clone(), &run.ns)
        .create(&PostParams::default(), &credentials)
        .await
        .expect("create the credentials");
    let profile: MailProfile = serde_json::from_value(json!({
        "apiVersion": "mailroom.dev/v1alpha1", "kind": "MailProfile",
        "metadata": {"name": "graph"},
        "spec": {
            "senders": {"default": "alerts@contoso.com"},
            "limits": {"messagesPerMinute": 100000, "maxConcurrent": 64},
            "graph": {
                "tenantId": TENANT, "clientId": CLIENT,
                "authorityHost": emu.url, "endpoint": emu.url,
                "clientSecretRef": {"name": "graph-credentials", "key": "client-secret"},
            },
        },
    }))
    .expect("MailProfile");
    Api::<MailProfile>::namespaced(run.client.clone(), &run.ns)
        .create(&PostParams::default(), &profile)
        .await
        .expect("create the profile");
    run.create_sources().await;

    let bundle = emu.dir.path().join("operator-ca-bundle.pem");
    concat_pems(&bundle, &[emu.ca_pem()]);
    let bundle = bundle.display().to_string();
    let budget = format!("{}Mi", BUDGET / MIB);
    let operator = Operator::start(
        "memory-graph",
        &run.ns,
        &["--memory-budget", &budget, "--ca-bundle", &bundle, "--allow-custom-endpoints"],
    );
    run.wait_profile_ready().await;
    run.send_all_and_measure(&operator, "Graph").await;

    // Everything arrived whole: every attachment, with the bytes of its Secret.
    let received = emu.wait_messages(MESSAGES, Duration::from_secs(30)).await;
    assert_eq!(received.len(), MESSAGES);
    let digests: Vec<String> = (0..SOURCES).map(|i| hex_sha256(&payload(i))).collect();
    for m in &received {
        assert_eq!(m["mode"], "draft", "a message over 4 MB goes as a draft: {}", m["subject"]);
        let attachments = m["attachments"].as_array().expect("attachments");
        assert_eq!(attachments.len(), ATTACHMENTS, "{}", m["subject"]);
        for (i, a) in attachments.iter().enumerate() {
            let name = a["name"].as_str().expect("name");
            let index: usize = name.trim_start_matches("report-").trim_end_matches(".bin").parse().expect("index");
            assert_eq!(a["size"], SOURCE_BYTES as u64, "attachment {i} of {}", m["subject"]);
            assert_eq!(a["sha256"], digests[index % SOURCES].as_str(), "attachment {name} of {}", m["subject"]);
        }
    }
    drop(operator);
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
