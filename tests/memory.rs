//! Bounded memory: a tenant that creates many large messages at once cannot push the operator
//! past its memory budget. Messages with attachments of 1 MiB (the most a Secret holds) read from
//! Secrets go at once through one profile, to the SMTP test server and to the Microsoft 365
//! emulator's Graph (a draft and upload sessions: each message is over the 4 MB a JSON sendMail
//! may carry); the operator's peak resident set (VmHWM) stays under what it was before they came,
//! plus the budget, plus a fixed allowance. Without the budget the same messages are built side by
//! side, each holding its attachments and their encoding at once: several GB.
//!
//! Two sizes: 64 messages of 8 MiB (many at once, each a fraction of the budget), and messages at
//! the largest size the operator accepts over SMTP (25 MiB of attachments and body,
//! `MAX_SMTP_MESSAGE_BYTES`; a larger one fails `MessageTooLarge` before anything is read), each
//! close to half the budget.

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
use mailroom::controller::outgoing::MAX_SMTP_MESSAGE_BYTES;
use mailroom::delivery::footprint::{self, Encoding};
use serde_json::json;

const MIB: u64 = 1024 * 1024;
/// The Secrets the attachments come from, each holding one key of [`SOURCE_BYTES`]; a message's
/// attachments take them in turn, so etcd holds 8 MiB however many attachments there are.
const SOURCES: usize = 8;
/// Just under 1 MiB, the most a Secret's data may be.
const SOURCE_BYTES: usize = 1024 * 1024 - 1024;
/// What the operator may hold besides the budget while it sends: its runtime's and its
/// allocator's working memory, the objects of messages whose outcome is being recorded, one
/// Secret watch event and the API client's buffers.
const ALLOWANCE: u64 = 64 * MIB;

/// How many messages of what size, and the budget the operator runs with.
struct Load {
    /// Messages created at once.
    messages: usize,
    /// Attachments per message, each a whole Secret's worth.
    attachments: usize,
    /// `--memory-budget`.
    budget: u64,
}

impl Load {
    /// The bytes of one message's attachments.
    fn content(&self) -> u64 {
        (self.attachments * SOURCE_BYTES) as u64
    }
}

/// 64 messages (the operator's default reconcile concurrency) of 8 MiB under a 64 MiB budget:
/// about 7 at a time fit it.
const MANY: Load = Load { messages: 64, attachments: 8, budget: 64 * MIB };

/// The most attachments a message over SMTP may carry: 25 Secrets' worth is 24.98 MiB, with the
/// short text body just under `MAX_SMTP_MESSAGE_BYTES` (25 MiB); one more is over it.
const AT_MAXIMUM_ATTACHMENTS: usize = MAX_SMTP_MESSAGE_BYTES / SOURCE_BYTES;
const _: () = assert!(AT_MAXIMUM_ATTACHMENTS * SOURCE_BYTES + 64 <= MAX_SMTP_MESSAGE_BYTES);
const _: () = assert!((AT_MAXIMUM_ATTACHMENTS + 1) * SOURCE_BYTES > MAX_SMTP_MESSAGE_BYTES);

/// Messages at the SMTP maximum under a 256 MiB budget. Before it reads anything such a message
/// reserves the most it could hold (`footprint::before_reading`: 25 sources of 1 MiB, the object,
/// their MIME encoding twice over, about 115 MiB), so two are built at a time, never three; once
/// built each holds about 94 MiB (its 25 MiB, the base64 parts and the formatted message). The
/// count is what makes the bound a proof of the budget rather than of the count: 8 messages at
/// once, as they come without a budget, hold about 8 x 94 = 750 MiB, twice the bound (baseline +
/// 256 MiB + the allowance, about 360 MiB; measured with `--memory-budget 100Gi`: a peak of
/// 684 MiB), while keeping the run short (8 messages of 36 MB for the test server to store, the
/// same 8 MiB of Secrets in etcd; about 40 s). Measured with the budget: a peak of 223 MiB.
const AT_MAXIMUM: Load = Load { messages: 8, attachments: AT_MAXIMUM_ATTACHMENTS, budget: 256 * MIB };

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

    /// Creates the messages at once, waits until all are Sent (or sending stalls), and checks the
    /// operator's peak resident set against the bound.
    async fn send_all_and_measure(&self, operator: &Operator, path: &str, load: &Load) {
        // Without the budget these messages would be built side by side; the count is chosen so
        // that they would then hold far more than the bound allows (the SMTP encoding is the
        // larger; Graph's is bounded per request but still holds every message's content).
        let unbudgeted = load.messages as u64 * footprint::while_sending(Encoding::Smtp, load.content(), 0);
        assert!(
            unbudgeted > 2 * (load.budget + ALLOWANCE),
            "{} messages would hold {unbudgeted} bytes without the budget: too few to prove it",
            load.messages
        );
        let baseline = proc_status_bytes(operator.pid(), "VmHWM:");
        let messages: Api<EmailMessage> = Api::namespaced(self.client.clone(), &self.ns);
        let attachments: Vec<_> = (0..load.attachments)
            .map(|i| {
                json!({"name": format!("report-{i}.bin"), "contentType": "application/octet-stream",
                       "secretRef": {"name": format!("report-{}", i % SOURCES), "key": "report.bin"}})
            })
            .collect();
        for i in 0..load.messages {
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
            if sent == load.messages || last_progress.elapsed() > STALL {
                break sent;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let peak = proc_status_bytes(operator.pid(), "VmHWM:");
        let bound = baseline + load.budget + ALLOWANCE;
        eprintln!(
            "memory ({path}): {} messages x {} attachments of {SOURCE_BYTES} bytes, budget {} MiB: \
             baseline VmHWM {:.1} MiB, peak VmHWM {:.1} MiB, bound {:.1} MiB (baseline + budget + {} MiB), {sent} sent",
            load.messages,
            load.attachments,
            load.budget / MIB,
            baseline as f64 / MIB as f64,
            peak as f64 / MIB as f64,
            bound as f64 / MIB as f64,
            ALLOWANCE / MIB,
        );
        assert_eq!(sent, load.messages, "every message is sent: waiting for memory never deadlocks");
        assert!(peak <= bound, "peak resident set {peak} bytes is over the bound of {bound} bytes");
    }
}

/// `load` through an SMTP relay profile: every message arrives whole.
async fn through_smtp(prefix: &'static str, load: &Load) {
    let run = Run::new(prefix, "relay").await;
    let peer = SmtpPeer::start(&[]);
    let profile = relay_profile("relay", peer.smtp_port, "  limits: {messagesPerMinute: 100000, maxConcurrent: 64}");
    create_yaml(&run.client, &run.ns, &profile).await;
    run.create_sources().await;

    let budget = format!("{}Mi", load.budget / MIB);
    let operator = Operator::start(prefix, &run.ns, &["--memory-budget", &budget]);
    run.wait_profile_ready().await;
    run.send_all_and_measure(&operator, "SMTP", load).await;

    // Everything arrived whole: every attachment in base64, 76 characters and CRLF per 57 bytes.
    let received = peer.wait_messages(load.messages, Duration::from_secs(60)).await;
    assert_eq!(received.len(), load.messages);
    for m in &received {
        let size = m["size"].as_u64().expect("size");
        let encoded = load.attachments as u64 * footprint::mime_base64_len(SOURCE_BYTES as u64);
        assert!(size > encoded, "message of {size} bytes is short of its {encoded} bytes of attachments");
    }
    drop(operator);
}

#[tokio::test]
async fn many_large_messages_at_once_stay_within_the_memory_budget() {
    through_smtp("memory", &MANY).await;
}

/// A tenant sending the largest messages SMTP takes: they go two at a time within the budget, and
/// the test server (whose limit is 35 MiB, as Exchange Online's after encoding) takes each whole.
#[tokio::test]
async fn messages_at_the_smtp_size_maximum_stay_within_the_memory_budget() {
    through_smtp("memory-max", &AT_MAXIMUM).await;
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
    let budget = format!("{}Mi", MANY.budget / MIB);
    let operator = Operator::start(
        "memory-graph",
        &run.ns,
        &["--memory-budget", &budget, "--ca-bundle", &bundle, "--allow-custom-endpoints"],
    );
    run.wait_profile_ready().await;
    run.send_all_and_measure(&operator, "Graph", &MANY).await;

    // Everything arrived whole: every attachment, with the bytes of its Secret.
    let received = emu.wait_messages(MANY.messages, Duration::from_secs(30)).await;
    assert_eq!(received.len(), MANY.messages);
    let digests: Vec<String> = (0..SOURCES).map(|i| hex_sha256(&payload(i))).collect();
    for m in &received {
        assert_eq!(m["mode"], "draft", "a message over 4 MB goes as a draft: {}", m["subject"]);
        let attachments = m["attachments"].as_array().expect("attachments");
        assert_eq!(attachments.len(), MANY.attachments, "{}", m["subject"]);
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
