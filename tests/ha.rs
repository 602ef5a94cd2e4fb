//! High availability with the real API server and the SMTP test server: of two operator processes
//! with leader election only the Lease holder sends; the other takes over when the leader dies
//! (after the Lease expires) or stops (at once, after its sends in flight finished).

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::smtp_peer::SmtpPeer;
use common::{Operator, create_yaml, phase};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use mailroom::api::{EmailMessage, Phase};
use mailroom::leader::{Election, ElectionConfig, LeaderError};
use serde_json::json;

const LEASE: &str = mailroom::leader::LEASE_NAME;
const LEASE_DURATION: Duration = mailroom::leader::LEASE_DURATION;
const MESSAGES: usize = 100;

/// A replica watching `ns`, with its Lease in `ns` too.
fn replica(test: &str, ns: &str, n: u32) -> Operator {
    Operator::start_with_args(
        &format!("{test}-{ns}-{n}"),
        &["--namespace", ns, "--leader-elect", "--leader-election-namespace", ns],
    )
}

/// Limits that never hold a message back: the tests here are about replicas, not the provider's.
const LIMITS: &str = "  limits: {messagesPerMinute: 100000, maxConcurrent: 5}\n";

fn message(name: &str) -> EmailMessage {
    serde_json::from_value(json!({
        "apiVersion": "mailroom.dev/v1alpha1",
        "kind": "EmailMessage",
        "metadata": {"name": name},
        "spec": {
            "profileRef": {"name": "relay"},
            "to": ["ops@contoso.com"],
            "subject": format!("HA {name}"),
            "body": {"text": "one of many"},
        },
    }))
    .expect("a valid EmailMessage")
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases.get_opt(LEASE).await.ok().flatten().and_then(|l| l.spec).and_then(|s| s.holder_identity)
}

/// Whether a Lease identity (`<host>_<pid>`) is this operator's.
fn is_identity_of(identity: &str, op: &Operator) -> bool {
    identity.ends_with(&format!("_{}", op.pid()))
}

/// Waits until one of the operators holds the Lease; returns its index.
async fn wait_leader(leases: &Api<Lease>, ops: &[Operator], timeout: Duration) -> usize {
    let start = Instant::now();
    loop {
        if let Some(h) = holder(leases).await
            && let Some(i) = ops.iter().position(|op| is_identity_of(&h, op))
        {
            return i;
        }
        assert!(start.elapsed() < timeout, "no operator became the leader within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The messages an operator's log says it sent, in order.
fn sent_by(op: &Operator) -> Vec<String> {
    const MARK: &str = "mailroom::controller::message::record: sent ";
    op.log_text()
        .lines()
        .filter_map(|l| l.split_once(MARK).and_then(|(_, rest)| rest.split_whitespace().next()).map(str::to_string))
        .collect()
}

fn names_in(list: &[EmailMessage], want: Phase) -> HashSet<String> {
    list.iter().filter(|m| phase(m) == Some(want)).filter_map(|m| m.metadata.name.clone()).collect()
}

async fn wait_log(op: &Operator, needle: &str, timeout: Duration) {
    let start = Instant::now();
    while !op.log_text().contains(needle) {
        assert!(start.elapsed() < timeout, "{needle:?} not in {} within {timeout:?}", op.log.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GETs one of an operator's endpoints (their addresses are in its log): (status, body).
async fn endpoint(op: &Operator, which: &str, path: &str) -> (u16, String) {
    let mark = format!("{which}=");
    let log = op.log_text();
    let addr = log
        .split_whitespace()
        .find_map(|w| w.strip_prefix(mark.as_str()))
        .unwrap_or_else(|| panic!("no {which} address in {}", op.log.display()));
    let resp = common::http().get(format!("http://{addr}{path}")).send().await.expect("GET");
    (resp.status().as_u16(), resp.text().await.unwrap_or_default())
}

/// The `mailroom_leader` gauge of an operator.
async fn leader_gauge(op: &Operator) -> String {
    let (_, text) = endpoint(op, "metrics", "/metrics").await;
    text.lines().find(|l| l.starts_with("mailroom_leader ")).unwrap_or_default().to_string()
}

#[tokio::test]
async fn one_replica_sends_and_the_other_takes_over_after_a_crash() {
    let client = common::client().await;
    let ns = common::namespace(&client, "ha-crash", &[]).await;
    let peer = SmtpPeer::start(&[]);
    // Each answer to DATA takes a while, so that some sends are in flight when the leader dies.
    peer.script(json!({"latency_ms": 300})).await;
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, LIMITS)).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);

    let mut ops = vec![replica("ha-crash", &ns, 1), replica("ha-crash", &ns, 2)];
    let leader = wait_leader(&leases, &ops, Duration::from_secs(60)).await;
    let follower = 1 - leader;
    wait_log(&ops[follower], "waiting to become the leader", Duration::from_secs(30)).await;

    for i in 0..MESSAGES {
        api.create(&PostParams::default(), &message(&format!("m{i:03}"))).await.expect("create message");
    }
    let start = Instant::now();
    loop {
        let list = api.list(&ListParams::default()).await.expect("list").items;
        if names_in(&list, Phase::Sent).len() >= 30 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "30 messages were not sent within 2 minutes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sent_by(&ops[follower]).is_empty(), "the follower sent while the leader held the Lease");

    ops[leader].kill();
    let killed = Instant::now();
    // Writes the leader made just before it died may still land; after that nothing changes
    // until the follower takes over.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at_kill = api.list(&ListParams::default()).await.expect("list").items;
    let sent_at_kill = names_in(&at_kill, Phase::Sent);
    let in_doubt = names_in(&at_kill, Phase::Sending);
    assert!(!ops[follower].log_text().contains("became the leader"));

    let takeover = loop {
        if holder(&leases).await.is_some_and(|h| is_identity_of(&h, &ops[follower])) {
            break killed.elapsed();
        }
        assert!(killed.elapsed() < LEASE_DURATION + Duration::from_secs(15), "the follower did not take over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "crash: {} Sent and {} Sending when the leader was killed; the follower took over after {:.1} s (lease {} s)",
        sent_at_kill.len(),
        in_doubt.len(),
        takeover.as_secs_f64(),
        LEASE_DURATION.as_secs()
    );
    assert!(takeover <= LEASE_DURATION + Duration::from_secs(5), "takeover took {takeover:?}");

    let start = Instant::now();
    let done = loop {
        let list = api.list(&ListParams::default()).await.expect("list").items;
        if names_in(&list, Phase::Sent).len() == MESSAGES {
            break list;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "not all messages were sent: {:?}",
            list.iter()
                .filter(|m| phase(m) != Some(Phase::Sent))
                .map(|m| (&m.metadata.name, phase(m)))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Which message carries which Message-ID, and how often the SMTP server received each.
    let name_of: HashMap<String, String> = done
        .iter()
        .filter_map(|m| {
            let id = m.status.as_ref()?.message_id.clone()?;
            Some((id.trim_matches(['<', '>']).to_string(), m.metadata.name.clone()?))
        })
        .collect();
    assert_eq!(name_of.len(), MESSAGES, "every message has its own Message-ID");
    let envelopes = peer.wait_messages(MESSAGES, Duration::from_secs(60)).await;
    let mut received: HashMap<String, usize> = HashMap::new();
    for env in &envelopes {
        let id = env["message_id"].as_str().expect("the envelope has a Message-ID").trim_matches(['<', '>']);
        *received.entry(id.to_string()).or_default() += 1;
    }
    let duplicates = envelopes.len() - received.len();
    let resent: Vec<&String> = received.iter().filter(|(_, n)| **n > 1).map(|(id, _)| &name_of[id]).collect();
    println!(
        "crash: the SMTP server received {} messages, {} distinct, {} duplicates (allowed: at most {} in doubt): {resent:?}",
        envelopes.len(),
        received.len(),
        duplicates,
        in_doubt.len()
    );
    assert_eq!(received.len(), MESSAGES, "every message arrived");
    assert!(received.keys().all(|id| name_of.contains_key(id)), "only these messages arrived");
    assert!(received.values().all(|n| *n <= 2), "no message arrived more than twice: {received:?}");
    assert!(duplicates <= in_doubt.len());
    for name in &resent {
        assert!(in_doubt.contains(*name), "{name} arrived twice but was not in doubt at the crash");
    }

    let (by_leader, by_follower) = (sent_by(&ops[leader]), sent_by(&ops[follower]));
    println!(
        "crash: the first leader logged {} sends, the second {} ({} + {} = {})",
        by_leader.len(),
        by_follower.len(),
        by_leader.len(),
        by_follower.len(),
        by_leader.len() + by_follower.len()
    );
    let by_follower_set: HashSet<String> = by_follower.iter().cloned().collect();
    assert_eq!(by_follower_set.len(), by_follower.len(), "the second leader sent each message once");
    let expected: HashSet<String> =
        (0..MESSAGES).map(|i| format!("m{i:03}")).filter(|n| !sent_at_kill.contains(n)).collect();
    assert_eq!(by_follower_set, expected, "the second leader sent exactly the messages not yet Sent");
    assert!(by_leader.iter().all(|n| sent_at_kill.contains(n)), "the first leader's sends were all recorded");
    for m in &done {
        let name = m.metadata.name.clone().unwrap_or_default();
        let attempts = m.status.as_ref().and_then(|s| s.attempts);
        let want = if in_doubt.contains(&name) { 2 } else { 1 };
        assert_eq!(attempts, Some(want), "{name}: attempts");
    }
}

#[tokio::test]
async fn a_terminated_leader_finishes_its_send_and_hands_over_at_once() {
    let client = common::client().await;
    let ns = common::namespace(&client, "ha-term", &[]).await;
    let peer = SmtpPeer::start(&[]);
    peer.script(json!({"latency_ms": 2000})).await;
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, LIMITS)).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);

    let mut ops = vec![replica("ha-term", &ns, 1)];
    wait_leader(&leases, &ops, Duration::from_secs(60)).await;
    wait_log(&ops[0], "caches synced; ready", Duration::from_secs(60)).await;
    ops.push(replica("ha-term", &ns, 2));
    wait_log(&ops[1], "waiting to become the leader", Duration::from_secs(30)).await;

    // Both are ready (a Deployment rolls out); the gauge tells which one leads.
    assert_eq!(endpoint(&ops[0], "health", "/readyz").await.0, 200);
    assert_eq!(endpoint(&ops[1], "health", "/readyz").await.0, 200);
    assert_eq!(leader_gauge(&ops[0]).await, "mailroom_leader 1");
    assert_eq!(leader_gauge(&ops[1]).await, "mailroom_leader 0");

    api.create(&PostParams::default(), &message("in-flight")).await.expect("create message");
    common::wait_for(&api, "in-flight", Duration::from_secs(60), |m| phase(m) == Some(Phase::Sending)).await;
    ops[0].terminate();
    let terminated = Instant::now();

    let (mut exited, mut released, mut taken) = (None, None, None);
    while exited.is_none() || taken.is_none() {
        assert!(
            terminated.elapsed() < Duration::from_secs(40),
            "exit {exited:?}, release {released:?}, takeover {taken:?}"
        );
        if exited.is_none()
            && let Some(status) = ops[0].exit_status()
        {
            exited = Some((terminated.elapsed(), status));
        }
        match holder(&leases).await {
            None if released.is_none() => released = Some(terminated.elapsed()),
            Some(h) if taken.is_none() && is_identity_of(&h, &ops[1]) => {
                released.get_or_insert(terminated.elapsed());
                taken = Some(terminated.elapsed());
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (exit_after, status) = exited.expect("exited");
    let (released, taken) = (released.expect("released"), taken.expect("taken over"));
    println!(
        "SIGTERM: the leader exited after {:.1} s ({status}); the Lease was free after {:.1} s and taken over after {:.1} s ({:.1} s after the exit; lease {} s)",
        exit_after.as_secs_f64(),
        released.as_secs_f64(),
        taken.as_secs_f64(),
        taken.saturating_sub(exit_after).as_secs_f64(),
        LEASE_DURATION.as_secs()
    );
    assert_eq!(status.code(), Some(0), "a graceful shutdown exits 0");
    assert!(released <= exit_after + Duration::from_millis(500), "the Lease is released before the exit");
    assert!(taken.saturating_sub(exit_after) < Duration::from_secs(5), "the follower took over at once");

    let sent = common::wait_for(&api, "in-flight", Duration::from_secs(10), |m| phase(m) == Some(Phase::Sent)).await;
    assert_eq!(sent.status.as_ref().and_then(|s| s.attempts), Some(1), "finished by the first leader, not resent");
    wait_log(&ops[0], "message::record: sent in-flight ", Duration::from_secs(5)).await;
    assert_eq!(sent_by(&ops[0]), ["in-flight"]);
    assert!(sent_by(&ops[1]).is_empty());
    let log = ops[0].log_text();
    assert!(log.contains("released the leader Lease"), "{log}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(peer.messages().await.len(), 1, "the message arrived once");
}

#[tokio::test]
async fn a_send_that_outlasts_the_shutdown_timeout_is_left_to_the_successor() {
    let client = common::client().await;
    let ns = common::namespace(&client, "ha-abandon", &[]).await;
    let peer = SmtpPeer::start(&[]);
    peer.script(json!({"latency_ms": 8000})).await;
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, LIMITS)).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);

    let mut ops = vec![Operator::start_with_args(
        &format!("ha-abandon-{ns}-1"),
        &["--namespace", &ns, "--leader-elect", "--leader-election-namespace", &ns, "--shutdown-timeout", "2"],
    )];
    wait_leader(&leases, &ops, Duration::from_secs(60)).await;
    ops.push(replica("ha-abandon", &ns, 2));
    wait_log(&ops[1], "waiting to become the leader", Duration::from_secs(30)).await;

    api.create(&PostParams::default(), &message("slow")).await.expect("create message");
    common::wait_for(&api, "slow", Duration::from_secs(60), |m| phase(m) == Some(Phase::Sending)).await;
    ops[0].terminate();
    let status = ops[0].wait_exit(Duration::from_secs(10)).expect("the leader stops after its shutdown timeout");
    peer.script(json!({"latency_ms": 0})).await;
    assert_eq!(status.code(), Some(1), "abandoned sends make the exit status non-zero");
    let log = ops[0].log_text();
    assert!(log.contains("were abandoned") && log.contains("released the leader Lease"), "{log}");

    // The successor takes over at once and resends the message in doubt with the same Message-ID.
    let sent = common::wait_for(&api, "slow", Duration::from_secs(30), |m| phase(m) == Some(Phase::Sent)).await;
    let status = sent.status.clone().unwrap_or_default();
    assert_eq!(status.attempts, Some(2), "{status:?}");
    // The status is written before the "sent" line is logged.
    wait_log(&ops[1], "message::record: sent slow ", Duration::from_secs(5)).await;
    assert_eq!(sent_by(&ops[1]), ["slow"]);
    common::expect_event(&client, &ns, "slow", |reason, _| reason == "ResendingInDoubt").await;
    let want = status.message_id.clone().unwrap_or_default();
    let envelopes = peer.messages().await;
    assert!(!envelopes.is_empty() && envelopes.len() <= 2, "{envelopes:?}");
    assert!(envelopes.iter().all(|e| e["message_id"].as_str() == Some(want.as_str())), "{envelopes:?}");
}

#[tokio::test]
async fn a_leader_whose_lease_is_taken_stops_at_once() {
    let client = common::client().await;
    let ns = common::namespace(&client, "ha-lost", &[]).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let mut ops = vec![replica("ha-lost", &ns, 1)];
    wait_leader(&leases, &ops, Duration::from_secs(60)).await;
    let patch = json!({"spec": {"holderIdentity": "intruder"}});
    leases.patch(LEASE, &PatchParams::default(), &Patch::Merge(patch)).await.expect("take the Lease");
    let taken = Instant::now();
    let status = ops[0].wait_exit(Duration::from_secs(10)).expect("the leader stops");
    println!("lost: the leader exited {:.1} s after its Lease was taken ({status})", taken.elapsed().as_secs_f64());
    assert_eq!(status.code(), Some(1));
    let log = ops[0].log_text();
    assert!(log.contains("lost the leader Lease") && log.contains("held by intruder"), "{log}");
}

#[tokio::test]
async fn elections_hand_over_on_release_and_never_release_a_lease_taken_meanwhile() {
    let client = common::client().await;
    let ns = common::namespace(&client, "ha-election", &[]).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let first = Election::new(client.clone(), ElectionConfig::new(&ns, "first")).unwrap();
    let second = Election::new(client.clone(), ElectionConfig::new(&ns, "second")).unwrap();

    let leading = first.acquire().await.expect("the first acquires a free Lease");
    assert_eq!(holder(&leases).await.as_deref(), Some("first"));
    let waiting = tokio::spawn(async move { second.acquire().await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!waiting.is_finished(), "the second waits while the first holds the Lease");
    let released = Instant::now();
    leading.release().await.expect("release");
    let leading = waiting.await.unwrap().expect("the second acquires");
    println!("election: handed over {:.1} s after the release", released.elapsed().as_secs_f64());
    assert!(released.elapsed() < Duration::from_secs(4));
    assert_eq!(holder(&leases).await.as_deref(), Some("second"));

    // Someone else writes itself in: the holder notices within a couple of seconds, and its
    // release leaves the other's claim alone.
    let patch = json!({"spec": {"holderIdentity": "intruder"}});
    leases.patch(LEASE, &PatchParams::default(), &Patch::Merge(patch)).await.expect("take the Lease");
    let reason = tokio::time::timeout(Duration::from_secs(5), leading.lost()).await.expect("noticed");
    assert!(reason.contains("held by intruder"), "{reason}");
    leading.release().await.expect("release");
    assert_eq!(holder(&leases).await.as_deref(), Some("intruder"));
}

#[tokio::test]
async fn a_missing_lease_namespace_is_a_clear_error() {
    let client = common::client().await;
    let election = Election::new(client, ElectionConfig::new("no-such-namespace-for-ha", "me")).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), election.acquire()).await.expect("fails at once");
    match err {
        Err(e @ LeaderError::NamespaceMissing(_)) => {
            assert!(e.to_string().contains("no-such-namespace-for-ha"), "{e}")
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("acquired a Lease in a namespace that does not exist"),
    }
}
