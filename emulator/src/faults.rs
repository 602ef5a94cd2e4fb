//! Fault injection: the next N requests to a target get an error status and/or added latency,
//! or, with a rate, each request gets it with that probability (from a seeded RNG, so a run can
//! be replayed).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Which endpoint family a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultTarget {
    /// The token endpoint.
    Token,
    /// Graph requests, including upload-session PUTs.
    Graph,
}

/// What `POST /_emulator/faults` accepts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultSpec {
    /// The endpoint family.
    pub target: FaultTarget,
    /// The status to answer with; absent (or below 400) means only latency is added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// How many requests the fault applies to: 1 when absent, or unlimited when `rate` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Applies to each matching request with this probability (0 to 1) instead of to the next
    /// `count` ones; `count` then caps how many requests it hits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Seed of the RNG that draws for `rate` (random when absent), to replay a run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Sent as `Retry-After` with the error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
    /// Added before answering (and while the request counts as in flight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Only Graph requests for this mailbox (case-insensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mailbox: Option<String>,
    /// Overrides the error code (Graph `error.code`, or a numeric AADSTS code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Overrides the error message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Closes the connection instead of answering (token requests only): the request is
    /// read, then the client sees the connection end without a complete answer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drop_connection: bool,
}

impl FaultSpec {
    /// How many requests it may hit: `count`, else 1 for a count fault and unlimited for a rate.
    pub fn limit(&self) -> Option<u32> {
        match (self.count, self.rate) {
            (Some(n), _) => Some(n),
            (None, Some(_)) => None,
            (None, None) => Some(1),
        }
    }

    /// Why the spec cannot be used, if it cannot.
    pub fn invalid(&self) -> Option<String> {
        match self.rate {
            Some(r) if !(0.0..=1.0).contains(&r) => Some(format!("rate must be between 0 and 1, not {r}")),
            _ => None,
        }
    }

    /// The error status this fault answers with, if it answers with one.
    pub fn error_status(&self) -> Option<u16> {
        self.status.filter(|s| (400..=599).contains(s))
    }
}

/// A fault with what is left of its count, as `GET /_emulator/faults` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ActiveFault {
    /// Identifier.
    pub id: String,
    /// Requests still to be affected; null for a rate fault without a count.
    pub remaining: Option<u32>,
    /// Requests it has hit so far.
    pub injected: u64,
    /// Matching requests it has seen (hit or not) so far.
    pub seen: u64,
    /// The fault.
    #[serde(flatten)]
    pub spec: FaultSpec,
}

/// Pending faults, applied in the order they were added.
#[derive(Debug, Default)]
pub struct FaultQueue {
    faults: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    active: ActiveFault,
    /// Draws for a rate fault.
    rng: Option<StdRng>,
}

impl FaultQueue {
    /// Adds a fault and returns its id.
    pub fn push(&mut self, spec: FaultSpec) -> ActiveFault {
        let rng = spec.rate.map(|_| match spec.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        });
        let active =
            ActiveFault { id: uuid::Uuid::new_v4().to_string(), remaining: spec.limit(), injected: 0, seen: 0, spec };
        if active.remaining != Some(0) {
            self.faults.push(Entry { active: active.clone(), rng });
        }
        active
    }

    /// Consumes one use of the first fault that matches a request to `target` for `mailbox`
    /// and, for a rate fault, whose draw hits; a rate fault that misses lets later faults try.
    pub fn take(&mut self, target: FaultTarget, mailbox: Option<&str>) -> Option<FaultSpec> {
        let mut index = None;
        for (i, entry) in self.faults.iter_mut().enumerate() {
            let f = &entry.active.spec;
            let matches = f.target == target
                && match (&f.mailbox, mailbox) {
                    (None, _) => true,
                    (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                    (Some(_), None) => false,
                };
            if !matches {
                continue;
            }
            entry.active.seen += 1;
            let hit = match (f.rate, entry.rng.as_mut()) {
                (Some(rate), Some(rng)) => rng.r#gen::<f64>() < rate,
                _ => true,
            };
            if hit {
                index = Some(i);
                break;
            }
        }
        let index = index?;
        let fault = &mut self.faults[index].active;
        fault.injected += 1;
        if let Some(n) = fault.remaining.as_mut() {
            *n = n.saturating_sub(1);
        }
        let spec = fault.spec.clone();
        if fault.remaining == Some(0) {
            self.faults.remove(index);
        }
        Some(spec)
    }

    /// The pending faults.
    pub fn list(&self) -> Vec<ActiveFault> {
        self.faults.iter().map(|e| e.active.clone()).collect()
    }

    /// Removes every pending fault.
    pub fn clear(&mut self) {
        self.faults.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(target: FaultTarget, count: u32) -> FaultSpec {
        serde_json::from_value(serde_json::json!({
            "target": target, "status": 503, "count": count
        }))
        .expect("spec")
    }

    #[test]
    fn a_fault_applies_count_times_then_disappears() {
        let mut q = FaultQueue::default();
        q.push(spec(FaultTarget::Graph, 2));
        assert!(q.take(FaultTarget::Token, None).is_none());
        assert_eq!(q.take(FaultTarget::Graph, None).and_then(|f| f.status), Some(503));
        assert!(q.take(FaultTarget::Graph, None).is_some());
        assert!(q.take(FaultTarget::Graph, None).is_none());
        assert!(q.list().is_empty());
    }

    #[test]
    fn faults_apply_in_order_and_respect_the_mailbox_filter() {
        let mut q = FaultQueue::default();
        let mut first = spec(FaultTarget::Graph, 1);
        first.mailbox = Some("A@x.com".into());
        q.push(first);
        q.push(spec(FaultTarget::Graph, 1));
        let got = q.take(FaultTarget::Graph, Some("b@x.com")).expect("fault");
        assert_eq!(got.mailbox, None);
        let got = q.take(FaultTarget::Graph, Some("a@x.com")).expect("fault");
        assert_eq!(got.mailbox.as_deref(), Some("A@x.com"));
    }

    #[test]
    fn count_defaults_to_one_and_latency_only_has_no_error_status() {
        let f: FaultSpec =
            serde_json::from_value(serde_json::json!({"target": "token", "latencyMs": 10})).expect("spec");
        assert_eq!(f.limit(), Some(1));
        assert_eq!(f.error_status(), None);
    }

    fn rate_spec(rate: f64, seed: u64, count: Option<u32>) -> FaultSpec {
        let mut f = spec(FaultTarget::Graph, 1);
        f.count = count;
        f.rate = Some(rate);
        f.seed = Some(seed);
        f
    }

    fn hits(q: &mut FaultQueue, n: usize) -> Vec<bool> {
        (0..n).map(|_| q.take(FaultTarget::Graph, None).is_some()).collect()
    }

    #[test]
    fn a_rate_fault_hits_about_that_share_and_stays() {
        let mut q = FaultQueue::default();
        q.push(rate_spec(0.1, 7, None));
        let hit = hits(&mut q, 10_000).iter().filter(|h| **h).count();
        assert!((800..=1200).contains(&hit), "{hit} hits of 10000 at rate 0.1");
        let [f] = q.list().try_into().expect("one fault left");
        assert_eq!((f.remaining, f.injected, f.seen), (None, hit as u64, 10_000));
    }

    #[test]
    fn the_same_seed_gives_the_same_hits() {
        let (mut a, mut b, mut c) = (FaultQueue::default(), FaultQueue::default(), FaultQueue::default());
        a.push(rate_spec(0.3, 42, None));
        b.push(rate_spec(0.3, 42, None));
        c.push(rate_spec(0.3, 43, None));
        let (ha, hb, hc) = (hits(&mut a, 200), hits(&mut b, 200), hits(&mut c, 200));
        assert_eq!(ha, hb);
        assert_ne!(ha, hc);
    }

    #[test]
    fn a_rate_fault_with_a_count_stops_after_count_hits_and_a_miss_falls_through() {
        let mut q = FaultQueue::default();
        q.push(rate_spec(0.5, 1, Some(3)));
        let mut second = spec(FaultTarget::Graph, 1000);
        second.status = Some(429);
        q.push(second);
        let got: Vec<u16> = (0..50).filter_map(|_| q.take(FaultTarget::Graph, None)).filter_map(|f| f.status).collect();
        // Every request hits one of the two faults; the rate fault only three times.
        assert_eq!(got.len(), 50);
        assert_eq!(got.iter().filter(|s| **s == 503).count(), 3);
        assert_eq!(q.list().len(), 1);
    }

    #[test]
    fn rates_outside_zero_to_one_are_invalid_and_zero_never_hits() {
        assert!(rate_spec(1.5, 1, None).invalid().is_some());
        assert!(rate_spec(-0.1, 1, None).invalid().is_some());
        let mut q = FaultQueue::default();
        q.push(rate_spec(0.0, 1, None));
        assert!(hits(&mut q, 100).iter().all(|h| !h));
        let mut q = FaultQueue::default();
        q.push(rate_spec(1.0, 1, None));
        assert!(hits(&mut q, 100).iter().all(|h| *h));
    }
}
