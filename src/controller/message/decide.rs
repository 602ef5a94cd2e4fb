//! Decide: what to do with a message, from what [`super::dereference`] read, and what a send's
//! answer makes of it. Pure functions, no I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::super::outgoing::{self, BuildError};
use super::super::reason::Reason;
use super::super::registry::{ProfileKey, ResolvedProfile};
use super::dereference::Observed;
use crate::api::{EmailMessage, EmailMessageStatus, OnUncertain, Phase};
use crate::auth::SendEvidence;
use crate::delivery::policy;
use crate::delivery::retry::{self, RetryDecision, RetryPolicy};
use crate::transport::{Address, Delivered, SendError, Transport};

/// What the reconcile is to do.
pub struct Decision {
    /// The message was found in doubt and is to be sent again: said first (an Event), and its
    /// status counts the interruption.
    pub resend: Option<Resend>,
    /// Then this.
    pub next: Next,
}

/// A message in doubt sent again.
#[derive(Debug, PartialEq, Eq)]
pub struct Resend {
    /// Interrupted attempts in a row, this one included.
    pub interruptions: u32,
    /// The Event's text.
    pub text: String,
}

/// The step that follows the decision.
pub enum Next {
    /// Finished: delete it once its TTL has passed.
    Expire,
    /// Nothing: a send of this process holds it.
    Nothing,
    /// Not due yet: look again then.
    Later(Duration),
    /// It waits for something outside it.
    Wait(Reason, String),
    /// It fails for its own problem.
    Fail(Reason, String),
    /// Send it, from this sender, through this profile's transport.
    Send(Go),
}

/// What a send needs that the decision found.
pub struct Go {
    /// The sender.
    pub from: Address,
    /// The profile.
    pub profile: Arc<ResolvedProfile>,
    /// Its transport.
    pub transport: Arc<dyn Transport>,
}

impl fmt::Debug for Next {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Next::Expire => f.write_str("Expire"),
            Next::Nothing => f.write_str("Nothing"),
            Next::Later(d) => write!(f, "Later({d:?})"),
            Next::Wait(r, t) => write!(f, "Wait({r}, {t:?})"),
            Next::Fail(r, t) => write!(f, "Fail({r}, {t:?})"),
            Next::Send(go) => write!(f, "Send(from {}, {})", go.from.email, go.profile.key),
        }
    }
}

impl From<Next> for Decision {
    fn from(next: Next) -> Self {
        Decision { resend: None, next }
    }
}

/// Decides what to do with a message: finished ones expire; one in doubt (in `Sending`, held by
/// nobody, not a claim of ours that sent nothing) fails or is sent again by
/// `delivery.onUncertain`; then the next attempt time, the deadline, the profile and the
/// profile's policy each may stop it before it is sent.
pub fn decide(seen: &Observed, now: Timestamp) -> Decision {
    let status = seen.msg.status.as_ref();
    let phase = status.and_then(|s| s.phase).unwrap_or_default();
    if phase.is_finished() {
        return Next::Expire.into();
    }
    if seen.held {
        return Next::Nothing.into();
    }
    let mut resend = None;
    if phase == Phase::Sending && !seen.unsent_claim {
        let spec = &seen.msg.spec;
        match in_doubt(status.unwrap_or(&EmailMessageStatus::default()), spec.on_uncertain(), spec.max_attempts()) {
            Doubt::Fail { reason, text } => return Next::Fail(reason, text).into(),
            Doubt::Resend { interruptions, text } => resend = Some(Resend { interruptions, text }),
        }
    }
    Decision { resend, next: when_due(seen, now) }
}

/// The decision for a message that is not finished, held or in doubt.
fn when_due(seen: &Observed, now: Timestamp) -> Next {
    let msg = &seen.msg;
    if let Some(next) = msg.status.as_ref().and_then(|s| s.next_attempt_time.as_ref())
        && next.0 > now
    {
        return Next::Later(retry::until(now, next.0));
    }
    let deadline = deadline(msg, now);
    if now > deadline {
        let text =
            format!("the deadline passed ({deadline}, delivery.deadlineSeconds) before the message could be sent");
        return Next::Fail(Reason::DeadlineExceeded, text);
    }
    let ns = msg.namespace().unwrap_or_default();
    let key = ProfileKey::for_message(&ns, msg.spec.profile_ref.kind(), &msg.spec.profile_ref.name);
    let Some(profile) = &seen.profile else {
        return Next::Wait(
            Reason::ProfileNotFound,
            format!("{key} not found; the message is sent when it exists and is ready"),
        );
    };
    let transport = match &profile.state {
        Ok(t) => Arc::clone(t),
        Err(nr) => {
            return Next::Wait(Reason::ProfileNotReady, format!("{key} is not ready ({}): {}", nr.reason, nr.message));
        }
    };
    match check_policy(&ns, msg, profile, seen.namespace_labels.as_ref()) {
        Ok(from) => Next::Send(Go { from, profile: Arc::clone(profile), transport }),
        Err((reason, text)) => Next::Fail(reason, text),
    }
}

/// No attempt starts after this: creation plus `delivery.deadlineSeconds`.
pub fn deadline(msg: &EmailMessage, now: Timestamp) -> Timestamp {
    let created = msg.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(now);
    retry::add(created, Duration::from_secs(msg.spec.deadline_seconds()))
}

/// Checks the namespace (for a ClusterMailProfile, by its labels), sender and recipients (their
/// number, their addresses and domains) against the profile and returns the sender.
pub fn check_policy(
    ns: &str,
    msg: &EmailMessage,
    profile: &ResolvedProfile,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> Result<Address, (Reason, String)> {
    let name = profile.key.to_string();
    if let ProfileKey::Cluster { .. } = profile.key {
        let none = BTreeMap::new();
        let labels = namespace_labels.unwrap_or(&none);
        policy::check_namespace(&name, profile.allowed_namespaces.as_ref(), ns, labels)
            .map_err(|e| (Reason::NamespaceNotAdmitted, e.to_string()))?;
    }
    let from =
        outgoing::sender(&msg.spec, &profile.settings.senders.default).map_err(|e| (e.reason(), e.to_string()))?;
    policy::check_sender(&name, &profile.settings.senders, &from.email)
        .map_err(|e| (Reason::SenderNotAllowed, e.to_string()))?;
    // Counted before any address is parsed: a list far over the limit costs no parsing.
    policy::check_recipient_count(msg.spec.recipient_count())
        .map_err(|e| (Reason::TooManyRecipients, e.to_string()))?;
    let mut bare = Vec::new();
    for (field, list) in [("to", &msg.spec.to), ("cc", &msg.spec.cc), ("bcc", &msg.spec.bcc)] {
        for a in list {
            let m = crate::transport::parse_mailbox(a).map_err(|e| {
                let e = BuildError::Address { field, reason: e.to_string() };
                (e.reason(), e.to_string())
            })?;
            bare.push(m.email);
        }
    }
    policy::check_recipients(&name, profile.settings.recipient_domains.as_deref(), bare.iter().map(String::as_str))
        .map_err(|e| (Reason::RecipientDomainNotAllowed, e.to_string()))?;
    Ok(from)
}

/// What to do with a message found in `Sending` that nobody holds (its operator stopped while
/// sending).
#[derive(Debug, PartialEq, Eq)]
pub enum Doubt {
    /// Fail it, for this reason.
    Fail {
        /// The condition's reason.
        reason: Reason,
        /// Why, in words.
        text: String,
    },
    /// Send it again with the same Message-ID; `interruptions` in a row so far.
    Resend {
        /// Interrupted attempts in a row, this one included.
        interruptions: u32,
        /// The Event's text.
        text: String,
    },
}

/// Interrupted attempts in a row after which a message fails: one that keeps crashing the
/// operator (running it out of memory, say) must not crash-loop it until its deadline.
pub const MAX_INTERRUPTIONS: u32 = 3;

/// Decides what to do with a message left in doubt. The interrupted attempt counts against
/// `delivery.maxAttempts`, and [`MAX_INTERRUPTIONS`] in a row fail it whatever `onUncertain` says.
pub fn in_doubt(s: &EmailMessageStatus, on_uncertain: OnUncertain, max_attempts: u32) -> Doubt {
    let attempt = s.attempts.unwrap_or(0);
    let holder = s.claimed_by.as_deref().map(|h| format!(" (claimed by {h})")).unwrap_or_default();
    let interruptions = s.interruptions.unwrap_or(0) + 1;
    if on_uncertain == OnUncertain::Fail {
        return Doubt::Fail {
            reason: Reason::DeliveryUncertain,
            text: format!(
                "attempt {attempt}{holder} was interrupted (the operator stopped while sending); it may or may not have been delivered, and delivery.onUncertain is Fail"
            ),
        };
    }
    if interruptions >= MAX_INTERRUPTIONS {
        return Doubt::Fail {
            reason: Reason::RepeatedlyInterrupted,
            text: format!(
                "the operator stopped while sending this message {interruptions} times in a row (attempt {attempt}{holder} was the last); it is not sent again, so that it cannot keep the operator from working. It may or may not have been delivered"
            ),
        };
    }
    if attempt >= max_attempts {
        return Doubt::Fail {
            reason: Reason::RetriesExhausted,
            text: format!(
                "attempt {attempt}{holder} was interrupted and was the last that delivery.maxAttempts allows; it may or may not have been delivered"
            ),
        };
    }
    Doubt::Resend {
        interruptions,
        text: format!(
            "attempt {attempt}{holder} was interrupted; sending again with the same Message-ID (delivery.onUncertain is Resend)"
        ),
    }
}

/// What a send's answer makes of the message.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Sent: the provider took it.
    Sent(Delivered),
    /// Failed for good.
    Failed(Reason, String),
    /// Failed for now: try again at this instant; the provider's answer.
    Retry(Timestamp, String),
}

/// Judges attempt `attempt`'s answer: a transient failure is retried while `delivery.maxAttempts`
/// and the deadline allow (never before the provider's Retry-After); `jitter` in [0, 1).
pub fn judge_send(
    msg: &EmailMessage,
    attempt: u32,
    result: Result<Delivered, SendError>,
    now: Timestamp,
    jitter: f64,
) -> Verdict {
    match result {
        Ok(delivered) => Verdict::Sent(delivered),
        Err(SendError::Permanent { reason }) | Err(SendError::Denied { reason }) => {
            Verdict::Failed(Reason::SendFailed, reason)
        }
        Err(SendError::Transient { reason, retry_after }) => {
            let policy = RetryPolicy {
                max_attempts: msg.spec.max_attempts(),
                deadline: deadline(msg, now),
                base_delay: retry::BASE_DELAY,
                max_delay: retry::MAX_DELAY,
            };
            match retry::next_attempt(&policy, attempt, now, retry_after, jitter) {
                RetryDecision::RetryAt(at) => Verdict::Retry(at, reason),
                RetryDecision::GiveUp(why) => {
                    Verdict::Failed(Reason::RetriesExhausted, format!("{why}; last error: {reason}"))
                }
            }
        }
    }
}

/// What a send's outcome tells of the app's authorisation for the sender mailbox: an accepted
/// message proves it, a denial disproves it, anything else (network, throttling) says nothing.
pub fn send_evidence(result: &Result<Delivered, SendError>, sender: &str, now: Timestamp) -> Option<SendEvidence> {
    match result {
        Ok(_) => Some(SendEvidence::Accepted { sender: sender.to_string(), at: now }),
        Err(SendError::Denied { reason }) => {
            Some(SendEvidence::Denied { sender: sender.to_string(), reason: reason.clone(), at: now })
        }
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{MailProfileSpec, Senders, SmtpTransport};
    use crate::controller::registry::NotReady;
    use crate::transport::OutgoingMessage;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    struct Never;

    #[async_trait::async_trait]
    impl Transport for Never {
        async fn send(&self, _: &OutgoingMessage) -> Result<Delivered, SendError> {
            unreachable!("decisions send nothing")
        }
    }

    fn message(extra: serde_json::Value) -> EmailMessage {
        let mut doc = serde_json::json!({
            "apiVersion": "mailroom.dev/v1alpha1", "kind": "EmailMessage",
            "metadata": {"name": "m", "namespace": "team-a", "uid": "u1", "creationTimestamp": "2027-01-15T08:00:00Z"},
            "spec": {"profileRef": {"name": "relay"}, "to": ["b@contoso.com"], "subject": "s", "body": {"text": "t"}},
        });
        if let (Some(d), Some(e)) = (doc["spec"].as_object_mut(), extra.as_object()) {
            d.extend(e.clone());
        }
        serde_json::from_value(doc).expect("message")
    }

    fn profile(key: ProfileKey, ready: bool) -> Arc<ResolvedProfile> {
        Arc::new(ResolvedProfile {
            key,
            settings: MailProfileSpec {
                senders: Senders { default: "alerts@contoso.com".into(), allowed: None },
                graph: None,
                smtp: Some(SmtpTransport { host: Some("relay.contoso.com".into()), port: None, tls: None, auth: None }),
                limits: None,
                recipient_domains: Some(vec!["contoso.com".into()]),
                ca_bundle: None,
                idempotency_retention_seconds: None,
            },
            allowed_namespaces: None,
            state: if ready {
                Ok(Arc::new(Never) as Arc<dyn Transport>)
            } else {
                Err(NotReady { reason: "SecretNotFound".into(), message: "no Secret relay-auth".into() })
            },
            tokens: None,
            fingerprint: 1,
        })
    }

    fn relay() -> ProfileKey {
        ProfileKey::Namespaced { namespace: "team-a".into(), name: "relay".into() }
    }

    fn seen(msg: EmailMessage, profile: Option<Arc<ResolvedProfile>>) -> Observed {
        Observed { msg: Arc::new(msg), held: false, unsent_claim: false, profile, namespace_labels: None }
    }

    fn created() -> Timestamp {
        "2027-01-15T08:00:00Z".parse().expect("time")
    }

    #[test]
    fn a_message_goes_out_when_its_profile_is_ready_and_it_breaks_no_rule() {
        let d = decide(&seen(message(serde_json::json!({})), Some(profile(relay(), true))), created());
        assert!(d.resend.is_none());
        match d.next {
            Next::Send(go) => assert_eq!((go.from.email.as_str(), &go.profile.key), ("alerts@contoso.com", &relay())),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn it_waits_for_a_missing_or_unready_profile() {
        let d = decide(&seen(message(serde_json::json!({})), None), created());
        assert!(
            matches!(&d.next, Next::Wait(Reason::ProfileNotFound, t) if t.contains("team-a/relay")),
            "{:?}",
            d.next
        );
        let d = decide(&seen(message(serde_json::json!({})), Some(profile(relay(), false))), created());
        assert!(
            matches!(&d.next, Next::Wait(Reason::ProfileNotReady, t) if t.contains("SecretNotFound") && t.contains("no Secret relay-auth")),
            "{:?}",
            d.next
        );
    }

    #[test]
    fn the_profile_policy_fails_it_with_its_own_reason() {
        let ready = || Some(profile(relay(), true));
        let outside = message(serde_json::json!({"to": ["b@fabrikam.com"]}));
        assert!(matches!(
            decide(&seen(outside, ready()), created()).next,
            Next::Fail(Reason::RecipientDomainNotAllowed, _)
        ));
        let sender = message(serde_json::json!({"from": "ceo@contoso.com"}));
        assert!(matches!(decide(&seen(sender, ready()), created()).next, Next::Fail(Reason::SenderNotAllowed, _)));
        let bad = message(serde_json::json!({"cc": ["not an address"]}));
        assert!(matches!(decide(&seen(bad, ready()), created()).next, Next::Fail(Reason::InvalidAddress, _)));
        let many: Vec<String> = (0..501).map(|i| format!("r{i}@contoso.com")).collect();
        let many = message(serde_json::json!({"to": many}));
        assert!(matches!(decide(&seen(many, ready()), created()).next, Next::Fail(Reason::TooManyRecipients, _)));
    }

    #[test]
    fn a_cluster_profile_admits_by_the_namespace_labels_read() {
        let mut p = profile(ProfileKey::Cluster { name: "shared".into() }, true);
        Arc::get_mut(&mut p).expect("one owner").allowed_namespaces =
            Some(serde_json::from_value(serde_json::json!({"matchLabels": {"mail": "yes"}})).expect("selector"));
        let msg = message(serde_json::json!({"profileRef": {"name": "shared", "kind": "ClusterMailProfile"}}));
        let mut s = seen(msg, Some(p));
        s.namespace_labels = Some([("mail".to_string(), "no".to_string())].into());
        assert!(matches!(decide(&s, created()).next, Next::Fail(Reason::NamespaceNotAdmitted, _)));
        s.namespace_labels = Some([("mail".to_string(), "yes".to_string())].into());
        assert!(matches!(decide(&s, created()).next, Next::Send(_)));
    }

    #[test]
    fn time_comes_first_retry_time_then_deadline() {
        let mut msg = message(serde_json::json!({"delivery": {"deadlineSeconds": 600}}));
        msg.status = Some(EmailMessageStatus {
            phase: Some(Phase::Pending),
            next_attempt_time: Some(Time(created() + std::time::Duration::from_secs(30))),
            ..Default::default()
        });
        // Not due: look again when it is, whatever the profile says.
        let d = decide(&seen(msg.clone(), None), created());
        assert!(matches!(d.next, Next::Later(after) if after == Duration::from_secs(30)), "{:?}", d.next);
        let late = created() + std::time::Duration::from_secs(601);
        let d = decide(&seen(msg, Some(profile(relay(), true))), late);
        assert!(
            matches!(&d.next, Next::Fail(Reason::DeadlineExceeded, t) if t.contains("deadlineSeconds")),
            "{:?}",
            d.next
        );
    }

    #[test]
    fn finished_held_and_in_doubt_messages() {
        let mut sent = message(serde_json::json!({}));
        sent.status = Some(EmailMessageStatus { phase: Some(Phase::Sent), ..Default::default() });
        assert!(matches!(decide(&seen(sent, None), created()).next, Next::Expire));
        let mut held = seen(message(serde_json::json!({})), Some(profile(relay(), true)));
        held.held = true;
        assert!(matches!(decide(&held, created()).next, Next::Nothing));

        let mut doubtful = message(serde_json::json!({}));
        doubtful.status = Some(sending(1, None));
        // Resend (the default): announced, then decided like any other message.
        let d = decide(&seen(doubtful.clone(), None), created());
        assert_eq!(d.resend.as_ref().map(|r| r.interruptions), Some(1));
        assert!(matches!(d.next, Next::Wait(Reason::ProfileNotFound, _)), "{:?}", d.next);
        // A claim of ours that sent nothing is no doubt: it is resumed.
        let mut ours = seen(doubtful.clone(), Some(profile(relay(), true)));
        ours.unsent_claim = true;
        let d = decide(&ours, created());
        assert!(d.resend.is_none() && matches!(d.next, Next::Send(_)));
        // onUncertain: Fail.
        let mut strict = message(serde_json::json!({"delivery": {"onUncertain": "Fail"}}));
        strict.status = Some(sending(1, None));
        let d = decide(&seen(strict, Some(profile(relay(), true))), created());
        assert!(matches!(d.next, Next::Fail(Reason::DeliveryUncertain, _)), "{:?}", d.next);
    }

    #[test]
    fn a_send_answer_is_judged_by_its_kind_and_the_retry_limits() {
        let msg = message(serde_json::json!({"delivery": {"maxAttempts": 2}}));
        let now = created();
        let ok = Delivered { response: "250 OK".into(), ..Default::default() };
        assert!(matches!(judge_send(&msg, 1, Ok(ok), now, 0.5), Verdict::Sent(_)));
        assert_eq!(
            judge_send(&msg, 1, Err(SendError::permanent("550 5.1.1 no such user")), now, 0.5),
            Verdict::Failed(Reason::SendFailed, "550 5.1.1 no such user".into())
        );
        let denied = Err(SendError::Denied { reason: "Graph 403 ErrorAccessDenied".into() });
        assert!(matches!(judge_send(&msg, 1, denied, now, 0.5), Verdict::Failed(Reason::SendFailed, _)));
        let later = SendError::Transient { reason: "Graph 429".into(), retry_after: Some(Duration::from_secs(90)) };
        match judge_send(&msg, 1, Err(later.clone()), now, 0.5) {
            Verdict::Retry(at, why) => {
                assert!(at >= now + std::time::Duration::from_secs(90), "never before Retry-After");
                assert_eq!(why, "Graph 429");
            }
            other => panic!("{other:?}"),
        }
        match judge_send(&msg, 2, Err(later), now, 0.5) {
            Verdict::Failed(Reason::RetriesExhausted, text) => {
                assert!(text.ends_with("last error: Graph 429"), "{text}")
            }
            other => panic!("{other:?}"),
        }
    }
    #[test]
    fn only_acceptance_and_denial_are_evidence() {
        let now = Timestamp::from_second(1_800_000_000).expect("time");
        let ok: Result<crate::transport::Delivered, SendError> =
            Ok(crate::transport::Delivered { response: "202 Accepted".into(), ..Default::default() });
        assert_eq!(
            send_evidence(&ok, "a@contoso.com", now),
            Some(SendEvidence::Accepted { sender: "a@contoso.com".into(), at: now })
        );
        let denied = Err(SendError::Denied { reason: "Graph 403 ErrorAccessDenied".into() });
        assert!(matches!(send_evidence(&denied, "a@contoso.com", now), Some(SendEvidence::Denied { .. })));
        assert_eq!(send_evidence(&Err(SendError::permanent("550 no such user")), "a@contoso.com", now), None);
        assert_eq!(send_evidence(&Err(SendError::transient("Graph 429")), "a@contoso.com", now), None);
    }

    fn sending(attempt: u32, interruptions: Option<u32>) -> EmailMessageStatus {
        EmailMessageStatus {
            phase: Some(Phase::Sending),
            attempts: Some(attempt),
            claim_id: Some("c1".into()),
            claimed_by: Some("mailroom-7f9c".into()),
            interruptions,
            ..Default::default()
        }
    }

    #[test]
    fn a_message_in_doubt_is_resent_within_its_limits() {
        match in_doubt(&sending(1, None), OnUncertain::Resend, 8) {
            Doubt::Resend { interruptions, text } => {
                assert_eq!(interruptions, 1);
                assert!(text.contains("claimed by mailroom-7f9c"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        let fail = in_doubt(&sending(1, None), OnUncertain::Fail, 8);
        assert!(matches!(fail, Doubt::Fail { reason: Reason::DeliveryUncertain, .. }), "{fail:?}");
    }

    #[test]
    fn an_interrupted_attempt_counts_against_max_attempts() {
        let last = in_doubt(&sending(3, None), OnUncertain::Resend, 3);
        assert!(matches!(last, Doubt::Fail { reason: Reason::RetriesExhausted, .. }), "{last:?}");
        assert!(matches!(in_doubt(&sending(2, None), OnUncertain::Resend, 3), Doubt::Resend { .. }));
    }

    #[test]
    fn repeated_interruptions_fail_the_message() {
        assert!(matches!(
            in_doubt(&sending(2, Some(1)), OnUncertain::Resend, 8),
            Doubt::Resend { interruptions: 2, .. }
        ));
        let poison = in_doubt(&sending(3, Some(MAX_INTERRUPTIONS - 1)), OnUncertain::Resend, 8);
        match poison {
            Doubt::Fail { reason, text } => {
                assert_eq!(reason, Reason::RepeatedlyInterrupted);
                assert!(text.contains(&format!("{MAX_INTERRUPTIONS} times in a row")), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }
}
