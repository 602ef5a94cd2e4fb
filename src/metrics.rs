//! Prometheus metrics: what a platform team alerts on.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use k8s_openapi::jiff::Timestamp;

use crate::delivery::budget::BudgetFigures;

/// Labels of a message outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `namespace/name` or the cluster profile's name.
    pub profile: String,
    /// graph, smtp-relay, smtp-password, smtp-oauth2.
    pub transport: String,
    /// sent, failed, retried.
    pub outcome: String,
}

/// Labels naming a profile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProfileLabels {
    /// The profile.
    pub profile: String,
}

/// Labels of a reconcile error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// messages or profiles.
    pub controller: String,
    /// The error's kind.
    pub error: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    /// Messages by profile, transport and outcome.
    pub messages: Family<OutcomeLabels, Counter>,
    /// Send attempts by profile.
    pub attempts: Family<ProfileLabels, Counter>,
    /// Seconds from creation to Sent.
    pub delivery_seconds: Histogram,
    /// Token requests that succeeded, by profile.
    pub token_refreshes: Family<ProfileLabels, Counter>,
    /// Token requests that failed, by profile.
    pub token_failures: Family<ProfileLabels, Counter>,
    /// Seconds until the profile's token expires, as of the cache's last refresh or failure.
    pub token_expiry_seconds: Family<ProfileLabels, Gauge<f64, AtomicU64>>,
    /// When the profile's token expires (Unix seconds): `… - time()` counts down between
    /// refreshes, so an alert sees a token running out even when nothing refreshes it.
    pub token_expiry_timestamp: Family<ProfileLabels, Gauge<f64, AtomicU64>>,
    /// Reconcile errors.
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    /// Messages not yet finished (Pending or Sending), as last counted.
    pub queue_depth: Gauge,
    /// 1 while this process leads (holds the leader Lease, or runs without leader election).
    pub leader: Gauge,
    /// Profiles this process holds resolved (transport, settings, readiness).
    pub profiles: Gauge,
    /// Token caches, one per OAuth profile and scope, each refreshing in the background.
    pub token_caches: Gauge,
    /// Sender mailboxes with rate-limit state (bucket, sends in flight, queue).
    pub limit_mailboxes: Gauge,
    /// Tasks alive in the async runtime, counted when the metrics are scraped: a number that
    /// grows without bound is a leak (a task per message or per profile never ended).
    pub tasks: Gauge,
    /// Bytes the allocator has handed out and not yet had back (the live heap).
    pub heap_allocated: Gauge,
    /// Bytes of physical memory the allocator holds: the heap, its free pages not yet returned,
    /// and its own metadata. Far above `heap_allocated` after a peak is fragmentation.
    pub heap_resident: Gauge,
    heap_probe: std::sync::OnceLock<HeapProbe>,
    /// The memory budget for the messages being built and sent, in bytes.
    pub budget_bytes: Gauge,
    /// Bytes of the budget granted, or kept for messages woken for their turn.
    pub budget_held_bytes: Gauge,
    /// Messages waiting for budget bytes.
    pub budget_waiting: Gauge,
    budget_probe: std::sync::OnceLock<BudgetProbe>,
}

/// Reads the memory budget's figures at scrape time; the controller supplies it.
pub type BudgetProbe = Box<dyn Fn() -> Option<BudgetFigures> + Send + Sync>;

/// Reads the allocator's (allocated, resident) bytes; the binary supplies it, for the allocator
/// it links.
pub type HeapProbe = fn() -> Option<(u64, u64)>;

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mailroom");
        let messages = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "messages",
            "Messages by profile, transport and outcome (sent, failed, retried)",
            messages.clone(),
        );
        let attempts = Family::<ProfileLabels, Counter>::default();
        registry.register("send_attempts", "Send attempts started", attempts.clone());
        let delivery_seconds = Histogram::new([0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0]);
        registry.register(
            "delivery_latency_seconds",
            "Seconds from an EmailMessage's creation to Sent",
            delivery_seconds.clone(),
        );
        let token_refreshes = Family::<ProfileLabels, Counter>::default();
        registry.register("token_refreshes", "Tokens obtained from Microsoft Entra ID", token_refreshes.clone());
        let token_failures = Family::<ProfileLabels, Counter>::default();
        registry.register("token_refresh_failures", "Token requests that failed", token_failures.clone());
        let token_expiry_seconds = Family::<ProfileLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "token_expiry_seconds",
            "Seconds until the profile's current token expires, as of its last refresh or failed refresh",
            token_expiry_seconds.clone(),
        );
        let token_expiry_timestamp = Family::<ProfileLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "token_expiry_timestamp_seconds",
            "When the profile's current token expires, in seconds since the Unix epoch",
            token_expiry_timestamp.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register("reconcile_errors", "Reconciles that failed and were retried", reconcile_errors.clone());
        let queue_depth = Gauge::default();
        registry.register("queue_depth", "EmailMessages not yet Sent or Failed", queue_depth.clone());
        let leader = Gauge::default();
        registry.register("leader", "1 while this process holds the leader Lease and sends, else 0", leader.clone());
        let profiles = Gauge::default();
        registry.register(
            "profiles",
            "MailProfiles and ClusterMailProfiles this process holds resolved",
            profiles.clone(),
        );
        let token_caches = Gauge::default();
        registry.register(
            "token_caches",
            "Token caches (one per OAuth profile and scope) refreshing in the background",
            token_caches.clone(),
        );
        let limit_mailboxes = Gauge::default();
        registry.register(
            "rate_limit_mailboxes",
            "Sender mailboxes with rate-limit state; idle ones are forgotten after five minutes",
            limit_mailboxes.clone(),
        );
        let tasks = Gauge::default();
        registry.register("tasks", "Tasks alive in the async runtime, counted at scrape time", tasks.clone());
        let heap_allocated = Gauge::default();
        registry.register(
            "heap_allocated_bytes",
            "Bytes of heap in use, as the allocator counts them at scrape time",
            heap_allocated.clone(),
        );
        let heap_resident = Gauge::default();
        registry.register(
            "heap_resident_bytes",
            "Bytes of physical memory the allocator holds (heap, unreturned free pages, metadata)",
            heap_resident.clone(),
        );
        let budget_bytes = Gauge::default();
        registry.register(
            "memory_budget_bytes",
            "The memory budget for the messages being built and sent (--memory-budget)",
            budget_bytes.clone(),
        );
        let budget_held_bytes = Gauge::default();
        registry.register(
            "memory_budget_held_bytes",
            "Bytes of the memory budget granted to messages, or kept for messages woken for their turn",
            budget_held_bytes.clone(),
        );
        let budget_waiting = Gauge::default();
        registry.register(
            "memory_budget_waiting",
            "Messages waiting for bytes of the memory budget",
            budget_waiting.clone(),
        );
        Metrics {
            registry,
            messages,
            attempts,
            delivery_seconds,
            token_refreshes,
            token_failures,
            token_expiry_seconds,
            token_expiry_timestamp,
            reconcile_errors,
            queue_depth,
            leader,
            profiles,
            token_caches,
            limit_mailboxes,
            tasks,
            heap_allocated,
            heap_resident,
            heap_probe: std::sync::OnceLock::new(),
            budget_bytes,
            budget_held_bytes,
            budget_waiting,
            budget_probe: std::sync::OnceLock::new(),
        }
    }
}

impl Metrics {
    /// Counts a message outcome.
    pub fn outcome(&self, profile: &str, transport: &str, outcome: &str) {
        self.messages
            .get_or_create(&OutcomeLabels {
                profile: profile.into(),
                transport: transport.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Records when a profile's token expires, seen at `now`.
    pub fn token_expiry(&self, profile: &str, expires_at: Timestamp, now: Timestamp) {
        let labels = ProfileLabels { profile: profile.to_string() };
        let left = expires_at.duration_since(now).as_secs_f64();
        self.token_expiry_seconds.get_or_create(&labels).set(left);
        let at = expires_at.duration_since(Timestamp::UNIX_EPOCH).as_secs_f64();
        self.token_expiry_timestamp.get_or_create(&labels).set(at);
    }

    /// Drops a profile's token series (it was deleted, or no longer uses a token): a stale
    /// `token_expiry_seconds` would otherwise count down forever for a profile that is gone.
    pub fn forget_token_series(&self, profile: &str) {
        let labels = ProfileLabels { profile: profile.to_string() };
        self.token_refreshes.remove(&labels);
        self.token_failures.remove(&labels);
        self.token_expiry_seconds.remove(&labels);
        self.token_expiry_timestamp.remove(&labels);
    }

    /// Sets how the heap gauges are read (once; later calls are ignored).
    pub fn set_heap_probe(&self, probe: HeapProbe) {
        let _ = self.heap_probe.set(probe);
    }

    /// Sets how the memory budget's gauges are read (once; later calls are ignored).
    pub fn set_budget_probe(&self, probe: BudgetProbe) {
        let _ = self.budget_probe.set(probe);
    }

    /// Reads the gauges that are sampled at scrape time: the heap and the memory budget.
    pub fn sample(&self) {
        self.sample_heap();
        if let Some(f) = self.budget_probe.get().and_then(|probe| probe()) {
            let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.budget_bytes.set(gauge(f.total));
            self.budget_held_bytes.set(gauge(f.held));
            self.budget_waiting.set(gauge(f.waiting));
        }
    }

    /// Reads the heap gauges through the probe, where there is one.
    pub fn sample_heap(&self) {
        if let Some((allocated, resident)) = self.heap_probe.get().and_then(|probe| probe()) {
            self.heap_allocated.set(i64::try_from(allocated).unwrap_or(i64::MAX));
            self.heap_resident.set(i64::try_from(resident).unwrap_or(i64::MAX));
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heap_gauges_come_from_the_probe() {
        let m = Metrics::default();
        m.sample_heap();
        assert!(m.encode().contains("mailroom_heap_allocated_bytes 0"));
        m.set_heap_probe(|| Some((1234, 5678)));
        m.sample_heap();
        let text = m.encode();
        assert!(text.contains("mailroom_heap_allocated_bytes 1234"), "{text}");
        assert!(text.contains("mailroom_heap_resident_bytes 5678"), "{text}");
    }

    #[test]
    fn the_budget_gauges_come_from_the_probe() {
        let m = Metrics::default();
        m.set_budget_probe(Box::new(|| Some(BudgetFigures { total: 512, held: 300, waiting: 7 })));
        m.sample();
        let text = m.encode();
        assert!(text.contains("mailroom_memory_budget_bytes 512"), "{text}");
        assert!(text.contains("mailroom_memory_budget_held_bytes 300"), "{text}");
        assert!(text.contains("mailroom_memory_budget_waiting 7"), "{text}");
    }

    #[test]
    fn encodes_outcomes() {
        let m = Metrics::default();
        m.outcome("team-a/relay", "smtp-relay", "sent");
        m.outcome("team-a/relay", "smtp-relay", "sent");
        m.delivery_seconds.observe(0.3);
        let text = m.encode();
        assert!(
            text.contains(r#"mailroom_messages_total{profile="team-a/relay",transport="smtp-relay",outcome="sent"} 2"#),
            "{text}"
        );
        assert!(text.contains("mailroom_delivery_latency_seconds_count 1"), "{text}");
    }

    #[test]
    fn a_forgotten_profile_loses_its_token_series() {
        let m = Metrics::default();
        let labels = |p: &str| ProfileLabels { profile: p.into() };
        m.token_refreshes.get_or_create(&labels("team-a/gone")).inc();
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        m.token_expiry("team-a/gone", Timestamp::from_second(1_800_003_000).unwrap(), now);
        m.token_refreshes.get_or_create(&labels("team-a/kept")).inc();
        m.forget_token_series("team-a/gone");
        let text = m.encode();
        assert!(!text.contains("team-a/gone"), "{text}");
        assert!(text.contains(r#"mailroom_token_refreshes_total{profile="team-a/kept"} 1"#), "{text}");
        assert!(text.contains("mailroom_profiles 0") && text.contains("mailroom_token_caches 0"), "{text}");
        assert!(text.contains("mailroom_rate_limit_mailboxes 0"), "{text}");
    }

    #[test]
    fn a_token_expiry_is_both_a_countdown_and_a_timestamp() {
        let m = Metrics::default();
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let expires = Timestamp::from_second(1_800_003_599).unwrap();
        m.token_expiry("team-a/graph", expires, now);
        let text = m.encode();
        assert!(text.contains(r#"mailroom_token_expiry_seconds{profile="team-a/graph"} 3599.0"#), "{text}");
        assert!(
            text.contains(r#"mailroom_token_expiry_timestamp_seconds{profile="team-a/graph"} 1800003599.0"#),
            "{text}"
        );
        // An expired token: the countdown is negative, the timestamp stays where it was.
        m.token_expiry("team-a/graph", expires, Timestamp::from_second(1_800_003_659).unwrap());
        let text = m.encode();
        assert!(text.contains(r#"mailroom_token_expiry_seconds{profile="team-a/graph"} -60.0"#), "{text}");
        assert!(text.contains("# TYPE mailroom_token_expiry_timestamp_seconds gauge"), "{text}");
    }
}
