//! Record: the one place a message's status is written. Every write carries the resourceVersion
//! it was decided on and clears what it drops; what a send did under a claim is retried while
//! the API server is away and is never written over another operator's claim. Each outcome's
//! Event, log line and metric go with its write.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::super::context::Context;
use super::super::reason::Reason;
use super::super::status;
use super::decide::{Verdict, judge_send};
use super::event::event;
use super::key;
use super::send::{Claimed, Tried};
use crate::api::{EmailMessage, EmailMessageStatus, Phase};
use crate::delivery::retry;
use crate::error::Result;
use crate::transport::{Delivered, SendError};

/// A waiting message is looked at again this often even if nothing wakes it.
const WAIT_RECHECK: Duration = Duration::from_secs(60);

/// Writes that the message waits for `reason` (once: the same wait again writes nothing).
pub async fn wait(
    ctx: &Context,
    api: &Api<EmailMessage>,
    msg: &EmailMessage,
    reason: Reason,
    text: &str,
) -> Result<Action> {
    let s = msg.status.clone().unwrap_or_default();
    let next = status::waiting(&s, reason, text, msg.metadata.generation, Timestamp::now());
    if status::differs(&s, &next) {
        match write_status(api, msg, &next, Guard::Decided).await? {
            Written::Done => event(ctx, msg, EventType::Normal, reason, text).await,
            Written::Stale => return Ok(Action::requeue(STALE_RECHECK)),
            Written::Gone => return Ok(Action::await_change()),
        }
    }
    Ok(Action::requeue(WAIT_RECHECK))
}

/// Writes that the message failed for its own problem (no attempt is made or counted).
pub async fn fail(
    ctx: &Context,
    api: &Api<EmailMessage>,
    msg: &EmailMessage,
    reason: Reason,
    text: &str,
) -> Result<Action> {
    let s = msg.status.clone().unwrap_or_default();
    let next = status::failed(&s, reason, text, msg.metadata.generation, Timestamp::now());
    match write_status(api, msg, &next, Guard::Decided).await? {
        Written::Done => failed(ctx, msg, reason, text).await,
        Written::Stale => Ok(Action::requeue(STALE_RECHECK)),
        Written::Gone => Ok(Action::await_change()),
    }
}

/// What follows a Failed status written for the message's own problem: the log, an Event, the metric.
async fn failed(ctx: &Context, msg: &EmailMessage, reason: Reason, text: &str) -> Result<Action> {
    warn!(message = %msg.name_any(), namespace = msg.namespace().unwrap_or_default(), %reason, "failed");
    event(ctx, msg, EventType::Warning, reason, text).await;
    ctx.metrics.outcome(&super::profile_label_of(msg), "none", "failed");
    Ok(expire_after(msg))
}

/// Records how far an attempt on `cached` got.
pub async fn attempt(ctx: &Context, api: &Api<EmailMessage>, cached: &EmailMessage, tried: Tried) -> Result<Action> {
    match tried {
        Tried::NotItsTurn | Tried::Left | Tried::Outrun => Ok(Action::await_change()),
        Tried::Unreadable { waits: true, reason, text } => wait(ctx, api, cached, reason, &text).await,
        Tried::Unreadable { waits: false, reason, text } => fail(ctx, api, cached, reason, &text).await,
        Tried::Unbuildable(c, reason, text) => {
            // The status it had before the claim, Failed: its own problem costs no attempt.
            let next = status::failed(&c.before, reason, &text, c.msg.metadata.generation, Timestamp::now());
            write_status(api, &c.msg, &next, Guard::Claim(&c.claim.id)).await?;
            failed(ctx, &c.msg, reason, &text).await
        }
        Tried::Interrupted(c, error) => {
            // Nothing was sent: the status goes back to what it was and the error policy tries again.
            write_status(api, &c.msg, &c.before, Guard::Claim(&c.claim.id)).await?;
            if c.resumed
                && let Some(id) = c.before.claim_id.as_deref()
            {
                // `before` is the earlier claim of ours, still unsent.
                ctx.remember_unsent_claim(id);
            }
            Err(error)
        }
        Tried::AlreadySent(c, original) => {
            // The status it had before the claim, Sent without a send of its own: no attempt.
            let now = Timestamp::now();
            let generation = c.msg.metadata.generation;
            let next = status::already_sent(
                &c.before,
                &original.key,
                &original.text,
                original.message_id.clone(),
                generation,
                now,
            );
            write_status(api, &c.msg, &next, Guard::Claim(&c.claim.id)).await?;
            info!(message = %c.msg.name_any(), namespace = c.msg.namespace().unwrap_or_default(), key = %original.key, "already sent under its idempotency key; not sent again");
            event(ctx, &c.msg, EventType::Normal, Reason::AlreadySent, &original.text).await;
            ctx.metrics.outcome(&super::profile_label_of(&c.msg), "none", "already_sent");
            Ok(expire_after(&c.msg))
        }
        Tried::KeyBusy(c, text) => {
            // Back to the status it had before the claim, waiting: no attempt is counted.
            let next =
                status::waiting(&c.before, Reason::KeyReserved, &text, c.msg.metadata.generation, Timestamp::now());
            let news = status::differs(&c.before, &next);
            write_status(api, &c.msg, &next, Guard::Claim(&c.claim.id)).await?;
            if news {
                event(ctx, &c.msg, EventType::Normal, Reason::KeyReserved, &text).await;
            }
            Ok(Action::requeue(KEY_RECHECK))
        }
        Tried::Sent(c, result, elapsed) => outcome(ctx, api, c, result, elapsed).await,
    }
}

/// A message whose key another message holds looks again this often.
const KEY_RECHECK: Duration = Duration::from_secs(3);

/// Records a send's answer under its claim.
async fn outcome(
    ctx: &Context,
    api: &Api<EmailMessage>,
    c: Claimed,
    result: std::result::Result<Delivered, SendError>,
    elapsed: Duration,
) -> Result<Action> {
    let now = Timestamp::now();
    let msg = &c.msg;
    let (generation, attempt, transport) = (msg.metadata.generation, c.claim.attempt, c.claim.transport.as_str());
    let profile = super::profile_label_of(msg);
    if let Some(text) = &c.warning {
        event(ctx, msg, EventType::Warning, Reason::RecreationRisk, text).await;
    }
    let ns = msg.namespace().unwrap_or_default();
    match judge_send(msg, attempt, result, now, rand::random::<f64>()) {
        Verdict::Sent(delivered) => {
            let next = status::sent(&c.status, &delivered, generation, now);
            write_status(api, msg, &next, Guard::Claim(&c.claim.id)).await?;
            if let Some(held) = c.key.clone() {
                key::confirm(&ctx.client, &ns, *held, next.message_id.clone(), now).await;
            }
            info!(message = %msg.name_any(), namespace = msg.namespace().unwrap_or_default(), attempt, elapsed_ms = elapsed.as_millis() as u64, "sent");
            // The Event says what the condition says: Graph's 202 is no confirmed delivery.
            let text = format!("attempt {attempt} via {transport}: {}", status::sent_condition(&delivered).1);
            event(ctx, msg, EventType::Normal, Reason::Sent, &text).await;
            ctx.metrics.outcome(&profile, transport, "sent");
            if let Some(created) = &msg.metadata.creation_timestamp {
                ctx.metrics.delivery_seconds.observe(now.duration_since(created.0).as_secs_f64().max(0.0));
            }
            Ok(expire_after(msg))
        }
        Verdict::Failed(reason, text) => {
            let next = status::failed(&c.status, reason, &text, generation, now);
            write_status(api, msg, &next, Guard::Claim(&c.claim.id)).await?;
            // Failed messages do not consume their key.
            if let Some(held) = c.key.clone() {
                key::release(&ctx.client, &ns, *held).await;
            }
            warn!(message = %msg.name_any(), attempt, %reason, error = %text, "failed");
            event(ctx, msg, EventType::Warning, Reason::Failed, &text).await;
            ctx.metrics.outcome(&profile, transport, "failed");
            Ok(expire_after(msg))
        }
        Verdict::Retry(at, error) => {
            let next = status::retrying(&c.status, &error, at, generation, now);
            write_status(api, msg, &next, Guard::Claim(&c.claim.id)).await?;
            warn!(message = %msg.name_any(), attempt, %error, "transient failure, retry scheduled");
            let text = format!("attempt {attempt} failed: {error}");
            event(ctx, msg, EventType::Warning, Reason::RetryScheduled, &text).await;
            // The timer aims at the very instant the status holds (a whole second, so the status
            // keeps it exactly), counted from `now`, which is after the answer arrived: it fires
            // after Retry-After, never before, and the decision's check of nextAttemptTime agrees.
            Ok(Action::requeue(retry::until(now, at)))
        }
    }
}

/// A decision refused because the message changed (409) is made again this soon, from the newer
/// object the watch brings.
const STALE_RECHECK: Duration = Duration::from_secs(1);

/// How long an outcome write is retried while the API server is unreachable.
const OUTCOME_WRITE_BUDGET: Duration = Duration::from_secs(120);

/// What a status write must not overwrite.
#[derive(Clone, Copy, Debug)]
pub enum Guard<'a> {
    /// A decision made on this version of the message: any change since (a newer outcome, a
    /// claim by another replica) refuses the write (409), and the decision is made again.
    Decided,
    /// What this process did under its claim `id`: it must not be lost, so it is retried while
    /// the API server is away and, after a 409, re-based on the newer object as long as that
    /// still carries this claim. A claim another operator took since is not overwritten.
    Claim(&'a str),
}

/// How a status write ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// The status is `next`.
    Done,
    /// Not written: the message changed since the decision (or is no longer this claim's).
    Stale,
    /// The message is gone.
    Gone,
}

/// The one way a message's status is written: a merge patch that carries the resourceVersion of
/// `base` (so that a write decided on a stale object fails rather than undoing a newer one) and
/// nulls every field of `base`'s status that `next` lacks (so that `nextAttemptTime` does not
/// outlive the retry it was for).
pub async fn write_status(
    api: &Api<EmailMessage>,
    base: &EmailMessage,
    next: &EmailMessageStatus,
    guard: Guard<'_>,
) -> std::result::Result<Written, kube::Error> {
    let name = base.name_any();
    let mut base = std::borrow::Cow::Borrowed(base);
    let started = std::time::Instant::now();
    let mut tries = 0;
    loop {
        let patch = status_patch(&base, next);
        let error = match api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => return Ok(Written::Done),
            Err(e) => e,
        };
        match (&error, guard) {
            (kube::Error::Api(e), _) if e.code == 404 => return Ok(Written::Gone),
            (kube::Error::Api(e), Guard::Decided) if e.code == 409 => return Ok(Written::Stale),
            (kube::Error::Api(e), Guard::Claim(id)) if e.code == 409 => match find_claim(api, &base, id).await {
                ClaimLookup::Ours(fresh) => base = std::borrow::Cow::Owned(*fresh),
                ClaimLookup::NotOurs => {
                    warn!(message = %name, "another operator took the message over; its status is not overwritten");
                    return Ok(Written::Stale);
                }
                ClaimLookup::Unknown => return Err(error),
            },
            (e, Guard::Claim(_)) if write_retryable(e) && started.elapsed() < OUTCOME_WRITE_BUDGET => {
                tries += 1;
                warn!(message = %name, error = %e, tries, "could not write the status yet; retrying");
                tokio::time::sleep(outcome_retry_delay(tries)).await;
            }
            _ => return Err(error),
        }
    }
}

/// The merge patch of [`write_status`].
fn status_patch(base: &EmailMessage, next: &EmailMessageStatus) -> serde_json::Value {
    let old = base.status.clone().unwrap_or_default();
    json!({ "metadata": { "resourceVersion": base.resource_version() }, "status": replacing(&old, next) })
}

/// What the API server says of a claim whose answer did not arrive.
pub enum ClaimLookup {
    /// The message carries the claim: it landed. The object is the current one.
    Ours(Box<EmailMessage>),
    /// The message carries another claim, or none, or is gone.
    NotOurs,
    /// The API server could not be asked within the budget.
    Unknown,
}

/// Reads the message (retrying while the API server is away, for up to `OUTCOME_WRITE_BUDGET`)
/// and says whether it carries the claim `claim_id`.
pub async fn find_claim(api: &Api<EmailMessage>, msg: &EmailMessage, claim_id: &str) -> ClaimLookup {
    let started = std::time::Instant::now();
    let mut tries = 0;
    loop {
        match api.get_opt(&msg.name_any()).await {
            Ok(Some(fresh)) if fresh.uid() == msg.uid() && carries_claim(&fresh, claim_id) => {
                return ClaimLookup::Ours(Box::new(fresh));
            }
            Ok(_) => return ClaimLookup::NotOurs,
            Err(e) if write_retryable(&e) && started.elapsed() < OUTCOME_WRITE_BUDGET => {
                tries += 1;
                tokio::time::sleep(outcome_retry_delay(tries)).await;
            }
            Err(_) => return ClaimLookup::Unknown,
        }
    }
}

/// Whether the message is in `Sending` under the claim `claim_id`.
fn carries_claim(msg: &EmailMessage, claim_id: &str) -> bool {
    msg.status.as_ref().is_some_and(|s| s.phase == Some(Phase::Sending) && s.claim_id.as_deref() == Some(claim_id))
}

/// Whether a failed write may succeed later: no answer at all, 429 or a 5xx.
pub fn write_retryable(err: &kube::Error) -> bool {
    match err {
        kube::Error::Api(s) => s.code == 429 || s.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// The wait before the `tries`-th retry of an outcome write: 250 ms doubling up to 4 s.
fn outcome_retry_delay(tries: u32) -> Duration {
    Duration::from_millis(250u64 << tries.saturating_sub(1).min(4))
}

/// The claim: the status with the resourceVersion decided on; returns the whole object. Like
/// every status write it clears what the claimed status lacks (the last retry's time).
pub async fn claim(
    api: &Api<EmailMessage>,
    msg: &EmailMessage,
    claimed: &EmailMessageStatus,
) -> std::result::Result<EmailMessage, kube::Error> {
    api.patch_status(&msg.name_any(), &PatchParams::default(), &Patch::Merge(status_patch(msg, claimed))).await
}

/// A merge patch that turns `old` into `new`: a field `old` has and `new` lacks is set to null
/// (removed); the status is flat, and its one list is replaced whole.
fn replacing(old: &EmailMessageStatus, new: &EmailMessageStatus) -> serde_json::Value {
    let mut patch = serde_json::to_value(new).unwrap_or_else(|_| json!({}));
    if let (Some(p), Ok(serde_json::Value::Object(o))) = (patch.as_object_mut(), serde_json::to_value(old)) {
        for key in o.keys() {
            p.entry(key.clone()).or_insert(serde_json::Value::Null);
        }
        if new.conditions.is_empty() {
            p.insert("conditions".into(), serde_json::Value::Null);
        }
    }
    patch
}

fn expire_after(msg: &EmailMessage) -> Action {
    match msg.spec.ttl_seconds_after_finished {
        Some(ttl) => Action::requeue(Duration::from_secs(ttl.max(0) as u64)),
        None => Action::await_change(),
    }
}

/// Deletes a finished message once `ttlSecondsAfterFinished` has passed, after its idempotency
/// key's record says what became of it (the record outlives the message).
pub async fn expire(ctx: &Context, api: &Api<EmailMessage>, msg: &EmailMessage, now: Timestamp) -> Result<Action> {
    let done = msg.status.as_ref().and_then(status::finished_at);
    let (Some(ttl), Some(done)) = (msg.spec.ttl_seconds_after_finished, done) else {
        return Ok(Action::await_change());
    };
    let at = retry::add(done, Duration::from_secs(ttl.max(0) as u64));
    if at > now {
        return Ok(Action::requeue(retry::until(now, at)));
    }
    key::settle_before_delete(&ctx.client, msg).await?;
    let dp = DeleteParams {
        preconditions: Some(Preconditions { uid: msg.uid(), resource_version: None }),
        ..Default::default()
    };
    match api.delete(&msg.name_any(), &dp).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    info!(message = %msg.name_any(), "deleted after ttlSecondsAfterFinished");
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status { code, ..Default::default() }))
    }

    #[test]
    fn outcome_writes_are_retried_without_an_answer_on_429_and_5xx_only() {
        assert!(write_retryable(&kube::Error::Service("connection refused".into())));
        assert!(write_retryable(&api_error(503)));
        assert!(write_retryable(&api_error(500)));
        assert!(write_retryable(&api_error(429)));
        // Deleted, conflicting or invalid: retrying the same write cannot help.
        assert!(!write_retryable(&api_error(404)));
        assert!(!write_retryable(&api_error(409)));
        assert!(!write_retryable(&api_error(422)));
    }

    #[test]
    fn unclaiming_removes_what_the_claim_added() {
        let before = EmailMessageStatus::default();
        let claim = status::Claim {
            attempt: 1,
            message_id: "<m@contoso.com>".into(),
            recipients: 2,
            transport: "graph".into(),
            from: "a@contoso.com".into(),
            id: "c1".into(),
            holder: "mailroom-0".into(),
            interruptions: 0,
        };
        let now = Timestamp::now();
        let claimed = status::claimed(&before, &claim, Some(1), now);
        let failed = status::failed(&before, Reason::TemplateError, "line 2: undefined value", Some(1), now);
        let patch = replacing(&claimed, &failed);
        // The claim's fields go; the attempt is not counted; the outcome's fields stay.
        for gone in
            ["attempts", "messageId", "recipients", "transport", "from", "lastAttemptTime", "claimId", "claimedBy"]
        {
            assert_eq!(patch[gone], serde_json::Value::Null, "{gone}");
        }
        assert_eq!(patch["phase"], "Failed");
        let reasons: Vec<&str> =
            patch["conditions"].as_array().unwrap().iter().map(|c| c["reason"].as_str().unwrap()).collect();
        assert!(reasons.iter().all(|r| *r == "TemplateError"), "{reasons:?}");
        // Applied as a merge patch to the claimed status, it leaves exactly the failed one.
        let mut applied = serde_json::to_value(&claimed).unwrap();
        merge(&mut applied, &patch);
        assert_eq!(applied, serde_json::to_value(&failed).unwrap());
        // Back to nothing at all: every field the claim wrote is removed.
        let mut applied = serde_json::to_value(&claimed).unwrap();
        merge(&mut applied, &replacing(&claimed, &before));
        assert_eq!(applied, serde_json::json!({}));
    }

    /// RFC 7386 merge patch, as the API server applies it.
    fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
        if let (Some(t), Some(p)) = (target.as_object_mut(), patch.as_object()) {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else if v.is_object() && t.get(k).is_some_and(|x| x.is_object()) {
                    merge(t.get_mut(k).unwrap(), v);
                } else {
                    t.insert(k.clone(), v.clone());
                }
            }
        }
    }

    #[test]
    fn outcome_retry_delays_double_up_to_four_seconds() {
        let delays: Vec<u64> = (1..=7).map(|t| outcome_retry_delay(t).as_millis() as u64).collect();
        assert_eq!(delays, vec![250, 500, 1000, 2000, 4000, 4000, 4000]);
    }

    #[test]
    fn every_status_write_carries_its_version_and_clears_what_it_drops() {
        let mut msg: EmailMessage = serde_json::from_value(serde_json::json!({
            "apiVersion": "mailroom.dev/v1alpha1", "kind": "EmailMessage",
            "metadata": {"name": "m", "namespace": "ns", "uid": "u1", "resourceVersion": "42"},
            "spec": {"profileRef": {"name": "relay"}, "to": ["b@contoso.com"], "subject": "s", "body": {"text": "t"}},
        }))
        .unwrap();
        let retrying = EmailMessageStatus {
            phase: Some(Phase::Pending),
            attempts: Some(1),
            next_attempt_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now())),
            ..Default::default()
        };
        msg.status = Some(retrying.clone());
        let claim = status::Claim {
            attempt: 2,
            message_id: "<m@contoso.com>".into(),
            recipients: 1,
            transport: "smtp-relay".into(),
            from: "a@contoso.com".into(),
            id: "c2".into(),
            holder: "mailroom-0".into(),
            interruptions: 0,
        };
        let claimed = status::claimed(&retrying, &claim, Some(1), Timestamp::now());
        let patch = status_patch(&msg, &claimed);
        assert_eq!(patch["metadata"]["resourceVersion"], "42", "a stale decision must fail with 409");
        assert_eq!(patch["status"]["nextAttemptTime"], serde_json::Value::Null, "the retry time is cleared");
        assert_eq!(patch["status"]["claimId"], "c2");
        assert!(carries_claim(&EmailMessage { status: Some(claimed.clone()), ..msg.clone() }, "c2"));
        assert!(!carries_claim(&EmailMessage { status: Some(claimed), ..msg.clone() }, "c1"));
        assert!(!carries_claim(&msg, "c2"));
    }
}
