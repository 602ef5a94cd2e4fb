//! The status a message moves through, as pure functions producing the next status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::reason::Reason;
use crate::api::{EmailMessageStatus, Phase, condition, conditions, set_condition};
use crate::transport::{Acceptance, Delivered};

/// The longest reason text kept in a condition message.
const MAX_MESSAGE: usize = 1024;

/// Facts written when a message is claimed for an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The attempt number, from 1.
    pub attempt: u32,
    /// The stable Message-ID.
    pub message_id: String,
    /// Recipients in to, cc and bcc.
    pub recipients: u32,
    /// The transport name.
    pub transport: String,
    /// The sender's address.
    pub from: String,
    /// This claim's id (unique per claim).
    pub id: String,
    /// Who claims: the operator instance.
    pub holder: String,
    /// Attempts in a row before this one that were interrupted (0 normally).
    pub interruptions: u32,
}

fn clip(s: &str) -> String {
    crate::text::clip(s, MAX_MESSAGE)
}

/// `Sending`, attempt N.
pub fn claimed(
    prev: &EmailMessageStatus,
    claim: &Claim,
    generation: Option<i64>,
    now: Timestamp,
) -> EmailMessageStatus {
    let mut s = prev.clone();
    s.phase = Some(Phase::Sending);
    s.attempts = Some(claim.attempt);
    s.last_attempt_time = Some(Time(now));
    s.next_attempt_time = None;
    s.message_id = Some(claim.message_id.clone());
    s.recipients = Some(claim.recipients);
    s.transport = Some(claim.transport.clone());
    s.from = Some(claim.from.clone());
    s.claim_id = Some(claim.id.clone());
    s.claimed_by = Some(claim.holder.clone());
    s.interruptions = (claim.interruptions > 0).then_some(claim.interruptions);
    s.observed_generation = generation;
    let msg = format!("attempt {} in progress via {}", claim.attempt, claim.transport);
    set_condition(
        &mut s.conditions,
        condition(&prev.conditions, conditions::SENT, false, Reason::Sending.as_str(), msg, generation, Time(now)),
    );
    set_condition(
        &mut s.conditions,
        condition(&prev.conditions, conditions::WAITING, false, Reason::Claimed.as_str(), "", generation, Time(now)),
    );
    s
}

/// `Sent`, with the provider's answer.
pub fn sent(
    prev: &EmailMessageStatus,
    delivered: &Delivered,
    generation: Option<i64>,
    now: Timestamp,
) -> EmailMessageStatus {
    let mut s = prev.clone();
    s.phase = Some(Phase::Sent);
    s.interruptions = None;
    s.sent_time = Some(Time(now));
    s.next_attempt_time = None;
    s.response = Some(clip(&delivered.response));
    s.request_id = delivered.request_id.clone();
    let (reason, msg) = sent_condition(delivered);
    set_condition(
        &mut s.conditions,
        condition(&prev.conditions, conditions::SENT, true, reason.as_str(), clip(&msg), generation, Time(now)),
    );
    s
}

/// The reason and message of the `Sent` condition: no more than the provider's answer promises.
pub fn sent_condition(delivered: &Delivered) -> (Reason, String) {
    let response = &delivered.response;
    if !delivered.rejected.is_empty() {
        let list: Vec<String> = delivered.rejected.iter().map(|(r, why)| format!("{r} ({why})")).collect();
        return (Reason::PartiallyDelivered, format!("accepted for some recipients; rejected: {}", list.join("; ")));
    }
    match delivered.acceptance {
        Acceptance::AcceptedForDelivery => {
            let answer = match &delivered.request_id {
                Some(id) => format!("{response}, request-id {id}"),
                None => response.clone(),
            };
            (
                Reason::Accepted,
                format!(
                    "Microsoft Graph accepted the message for delivery ({answer}); delivery itself is not confirmed"
                ),
            )
        }
        Acceptance::ResponsibilityTaken => {
            (Reason::Delivered, format!("the SMTP server took responsibility for delivering the message: {response}"))
        }
    }
}

/// Back to `Pending` until `next`, after a transient failure.
pub fn retrying(
    prev: &EmailMessageStatus,
    reason: &str,
    next: Timestamp,
    generation: Option<i64>,
    now: Timestamp,
) -> EmailMessageStatus {
    let mut s = prev.clone();
    s.phase = Some(Phase::Pending);
    s.interruptions = None;
    s.next_attempt_time = Some(Time(next));
    let attempt = s.attempts.unwrap_or(0);
    let msg = format!("attempt {attempt} failed, retrying at {next}: {reason}");
    set_condition(
        &mut s.conditions,
        condition(
            &prev.conditions,
            conditions::SENT,
            false,
            Reason::RetryScheduled.as_str(),
            clip(&msg),
            generation,
            Time(now),
        ),
    );
    s
}

/// `Failed`, for good, with a reason a person can act on.
pub fn failed(
    prev: &EmailMessageStatus,
    reason: Reason,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> EmailMessageStatus {
    let mut s = prev.clone();
    s.phase = Some(Phase::Failed);
    s.interruptions = None;
    s.next_attempt_time = None;
    s.observed_generation = generation;
    set_condition(
        &mut s.conditions,
        condition(&prev.conditions, conditions::SENT, false, reason.as_str(), clip(message), generation, Time(now)),
    );
    set_condition(
        &mut s.conditions,
        condition(&prev.conditions, conditions::FAILED, true, reason.as_str(), clip(message), generation, Time(now)),
    );
    set_condition(
        &mut s.conditions,
        condition(&prev.conditions, conditions::WAITING, false, reason.as_str(), "", generation, Time(now)),
    );
    s
}

/// `Pending`, waiting for something outside the message (a profile, a Secret).
pub fn waiting(
    prev: &EmailMessageStatus,
    reason: Reason,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> EmailMessageStatus {
    let mut s = prev.clone();
    s.phase = Some(Phase::Pending);
    s.observed_generation = generation;
    set_condition(
        &mut s.conditions,
        condition(&prev.conditions, conditions::WAITING, true, reason.as_str(), clip(message), generation, Time(now)),
    );
    s
}

/// `Sent` without sending: a message with the same idempotency key was sent; `text` names it.
/// No `sentTime` (this message sent nothing); `messageId` is the original's.
pub fn already_sent(
    prev: &EmailMessageStatus,
    key: &str,
    text: &str,
    message_id: Option<String>,
    generation: Option<i64>,
    now: Timestamp,
) -> EmailMessageStatus {
    let mut s = prev.clone();
    s.phase = Some(Phase::Sent);
    s.interruptions = None;
    s.next_attempt_time = None;
    s.sent_time = None;
    s.message_id = message_id;
    s.idempotency_key = Some(key.to_string());
    s.observed_generation = generation;
    let reason = Reason::AlreadySent.as_str();
    set_condition(
        &mut s.conditions,
        condition(&prev.conditions, conditions::SENT, true, reason, clip(text), generation, Time(now)),
    );
    set_condition(
        &mut s.conditions,
        condition(&prev.conditions, conditions::WAITING, false, reason, "", generation, Time(now)),
    );
    s
}

/// Adds the `RecreationRisk` condition (a GitOps-managed message with a TTL and no key).
pub fn recreation_risk(s: &mut EmailMessageStatus, text: &str, generation: Option<i64>, now: Timestamp) {
    let c = condition(
        &s.conditions,
        conditions::RECREATION_RISK,
        true,
        Reason::TTLWithoutIdempotencyKey.as_str(),
        clip(text),
        generation,
        Time(now),
    );
    set_condition(&mut s.conditions, c);
}

/// When the message finished (Sent or Failed), for `ttlSecondsAfterFinished`: for a message found
/// already sent, when that was found.
pub fn finished_at(s: &EmailMessageStatus) -> Option<Timestamp> {
    match s.phase {
        Some(Phase::Sent) => {
            s.sent_time.as_ref().map(|t| t.0).or_else(|| {
                crate::api::find_condition(&s.conditions, conditions::SENT).map(|c| c.last_transition_time.0)
            })
        }
        Some(Phase::Failed) => {
            crate::api::find_condition(&s.conditions, conditions::FAILED).map(|c| c.last_transition_time.0)
        }
        _ => None,
    }
}

/// Whether writing `next` over `prev` changes anything a reader would see (ignoring times).
pub fn differs(prev: &EmailMessageStatus, next: &EmailMessageStatus) -> bool {
    crate::api::differs_beyond_transition_times(prev, next, |s| &mut s.conditions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::find_condition;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn claim(n: u32) -> Claim {
        Claim {
            attempt: n,
            message_id: "<a@b>".into(),
            recipients: 2,
            transport: "smtp-relay".into(),
            from: "a@b".into(),
            id: format!("claim-{n}"),
            holder: "mailroom-0".into(),
            interruptions: 0,
        }
    }

    fn smtp_reply(response: &str, rejected: &[(&str, &str)]) -> Delivered {
        Delivered {
            acceptance: Acceptance::ResponsibilityTaken,
            response: response.into(),
            request_id: None,
            rejected: rejected.iter().map(|(r, why)| (r.to_string(), why.to_string())).collect(),
        }
    }

    #[test]
    fn claim_then_sent() {
        let s = claimed(&EmailMessageStatus::default(), &claim(1), Some(1), ts(10));
        assert_eq!(s.phase, Some(Phase::Sending));
        assert_eq!(s.attempts, Some(1));
        let s = sent(&s, &smtp_reply("250 2.0.0 OK", &[]), Some(1), ts(11));
        assert_eq!(s.phase, Some(Phase::Sent));
        let c = find_condition(&s.conditions, "Sent").unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Delivered"));
        assert_eq!(c.message, "the SMTP server took responsibility for delivering the message: 250 2.0.0 OK");
        assert_eq!(c.last_transition_time, Time(ts(11)));
        assert_eq!(finished_at(&s), Some(ts(11)));
    }

    #[test]
    fn graph_202_is_accepted_not_delivered() {
        let graph = Delivered {
            acceptance: Acceptance::AcceptedForDelivery,
            response: "202 Accepted".into(),
            request_id: Some("5c2e1a8e".into()),
            rejected: vec![],
        };
        let s = sent(&EmailMessageStatus::default(), &graph, Some(1), ts(11));
        assert_eq!(s.phase, Some(Phase::Sent));
        assert_eq!((s.response.as_deref(), s.request_id.as_deref()), (Some("202 Accepted"), Some("5c2e1a8e")));
        let c = find_condition(&s.conditions, "Sent").unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Accepted"));
        assert_eq!(
            c.message,
            "Microsoft Graph accepted the message for delivery (202 Accepted, request-id 5c2e1a8e); \
             delivery itself is not confirmed"
        );
        let without_id = Delivered { request_id: None, ..graph };
        assert!(sent_condition(&without_id).1.contains("(202 Accepted);"), "{:?}", sent_condition(&without_id));
    }

    #[test]
    fn partial_delivery_names_rejected() {
        let s =
            sent(&EmailMessageStatus::default(), &smtp_reply("250 OK", &[("x@y.z", "550 5.1.1 unknown")]), None, ts(1));
        let c = find_condition(&s.conditions, "Sent").unwrap();
        assert_eq!(c.reason, "PartiallyDelivered");
        assert!(c.message.contains("x@y.z (550 5.1.1 unknown)"), "{}", c.message);
    }

    #[test]
    fn retry_then_fail() {
        let s = claimed(&EmailMessageStatus::default(), &claim(1), None, ts(10));
        let s = retrying(&s, "451 4.3.0 later", ts(20), None, ts(11));
        assert_eq!(s.phase, Some(Phase::Pending));
        assert_eq!(s.next_attempt_time, Some(Time(ts(20))));
        assert!(find_condition(&s.conditions, "Sent").unwrap().message.contains("451 4.3.0 later"));
        let f = failed(&s, Reason::SendFailed, "550 5.7.64 TenantAttribution; Relay Access Denied", None, ts(30));
        assert_eq!(f.phase, Some(Phase::Failed));
        assert_eq!(f.next_attempt_time, None);
        assert_eq!(find_condition(&f.conditions, "Failed").unwrap().status, "True");
        assert_eq!(finished_at(&f), Some(ts(30)));
    }

    #[test]
    fn the_next_attempt_read_back_is_never_before_retry_after() {
        use crate::delivery::retry::{self, RetryDecision, RetryPolicy};
        use std::time::Duration;
        let policy = RetryPolicy {
            max_attempts: 8,
            deadline: ts(100_000),
            base_delay: Duration::from_millis(100),
            max_delay: retry::MAX_DELAY,
        };
        let answered = Timestamp::from_millisecond(10_110).unwrap();
        let RetryDecision::RetryAt(at) = retry::next_attempt(&policy, 1, answered, Some(Duration::from_secs(2)), 0.0)
        else {
            panic!("a retry is due");
        };
        let s = retrying(&EmailMessageStatus::default(), "Graph 429", at, None, answered);
        // The status is stored in whole seconds; what the reconciler reads back is what it waits for.
        let stored: EmailMessageStatus = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        let next = stored.next_attempt_time.unwrap().0;
        assert_eq!(next, at);
        assert!(retry::until(answered, next) >= Duration::from_secs(2), "{next}");
    }

    #[test]
    fn long_messages_are_clipped_on_char_boundary() {
        let long = "é".repeat(2000);
        let f = failed(&EmailMessageStatus::default(), Reason::SendFailed, &long, None, ts(1));
        assert!(find_condition(&f.conditions, "Failed").unwrap().message.len() <= MAX_MESSAGE + 3);
    }

    #[test]
    fn already_sent_finishes_without_a_send_of_its_own() {
        let before = waiting(&EmailMessageStatus::default(), Reason::KeyReserved, "held by m1", Some(1), ts(5));
        let s = already_sent(&before, "k", "not sent: already sent by m1", Some("<m1@x>".into()), Some(1), ts(10));
        assert_eq!(s.phase, Some(Phase::Sent));
        assert_eq!((s.sent_time.as_ref(), s.attempts), (None, None), "nothing was sent, no attempt made");
        assert_eq!((s.message_id.as_deref(), s.idempotency_key.as_deref()), (Some("<m1@x>"), Some("k")));
        let c = find_condition(&s.conditions, "Sent").unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "AlreadySent"));
        assert_eq!(find_condition(&s.conditions, "Waiting").unwrap().status, "False");
        assert_eq!(finished_at(&s), Some(ts(10)), "the TTL counts from when it was found sent");
    }

    #[test]
    fn waiting_twice_is_no_change() {
        let a = waiting(&EmailMessageStatus::default(), Reason::ProfileNotFound, "m", None, ts(1));
        let b = waiting(&a, Reason::ProfileNotFound, "m", None, ts(2));
        assert!(!differs(&a, &b));
        let c = waiting(&b, Reason::ProfileNotReady, "m", None, ts(3));
        assert!(differs(&b, &c));
    }
}
