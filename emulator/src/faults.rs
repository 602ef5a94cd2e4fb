//! Fault injection: the next N requests to a target get an error status and/or added latency.

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
    /// How many requests the fault applies to.
    #[serde(default = "one")]
    pub count: u32,
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
}

fn one() -> u32 {
    1
}

impl FaultSpec {
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
    /// Requests still to be affected.
    pub remaining: u32,
    /// The fault.
    #[serde(flatten)]
    pub spec: FaultSpec,
}

/// Pending faults, applied in the order they were added.
#[derive(Debug, Default)]
pub struct FaultQueue {
    faults: Vec<ActiveFault>,
}

impl FaultQueue {
    /// Adds a fault and returns its id.
    pub fn push(&mut self, spec: FaultSpec) -> ActiveFault {
        let fault = ActiveFault { id: uuid::Uuid::new_v4().to_string(), remaining: spec.count, spec };
        if fault.remaining > 0 {
            self.faults.push(fault.clone());
        }
        fault
    }

    /// Consumes one use of the first fault that matches a request to `target` for `mailbox`.
    pub fn take(&mut self, target: FaultTarget, mailbox: Option<&str>) -> Option<FaultSpec> {
        let index = self.faults.iter().position(|f| {
            f.spec.target == target
                && match (&f.spec.mailbox, mailbox) {
                    (None, _) => true,
                    (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                    (Some(_), None) => false,
                }
        })?;
        let fault = &mut self.faults[index];
        fault.remaining -= 1;
        let spec = fault.spec.clone();
        if fault.remaining == 0 {
            self.faults.remove(index);
        }
        Some(spec)
    }

    /// The pending faults.
    pub fn list(&self) -> Vec<ActiveFault> {
        self.faults.clone()
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
        assert_eq!(f.count, 1);
        assert_eq!(f.error_status(), None);
    }
}
