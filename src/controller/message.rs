//! The message reconciler: check → resolve profile and policy → build → claim → send → record.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::context::Context;
use super::memory::{self, MessageMemory};
use super::outgoing::{self, BuildError, MAX_MESSAGE_BYTES, MAX_SMTP_MESSAGE_BYTES};
use super::registry::{ProfileKey, ResolvedProfile};
use super::status::{self, Claim};
use crate::api::{EmailMessage, EmailMessageStatus, OnUncertain, Phase};
use crate::auth::SendEvidence;
use crate::delivery::limits::{SendPermit, Turn};
use crate::delivery::policy;
use crate::delivery::retry::{self, RetryDecision, RetryPolicy};
use crate::error::{Error, Result};
use crate::transport::{Address, OutgoingMessage, SendError};

/// The `reportingController` of the operator's Events.
pub const REPORTING_CONTROLLER: &str = "mailroom";

/// A waiting message is looked at again this often even if nothing wakes it.
const WAIT_RECHECK: Duration = Duration::from_secs(60);

/// Reconciles one EmailMessage.
pub async fn reconcile(msg: Arc<EmailMessage>, ctx: Arc<Context>) -> Result<Action> {
    let ns = msg.namespace().ok_or_else(|| Error::Invalid("EmailMessage without namespace".into()))?;
    let uid = msg.uid().ok_or_else(|| Error::Invalid("EmailMessage without uid".into()))?;
    let api: Api<EmailMessage> = Api::namespaced(ctx.client.clone(), &ns);
    let status = msg.status.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or_default();
    let now = Timestamp::now();

    if phase.is_finished() {
        return expire(&api, &msg, &status, now).await;
    }
    if ctx.holds(&uid) {
        return Ok(Action::await_change());
    }
    let mut msg = msg;
    if phase == Phase::Sending {
        // The cache may lag behind our own outcome write: only the API server can say it is in doubt.
        let Some(fresh) = api.get_opt(&msg.name_any()).await? else {
            return Ok(Action::await_change());
        };
        if fresh.status.as_ref().and_then(|s| s.phase) != Some(Phase::Sending) {
            return Ok(Action::await_change());
        }
        let s = fresh.status.clone().unwrap_or_default();
        if !ctx.is_unsent_claim(s.claim_id.as_deref()) {
            // Nobody holds it: the operator that claimed it stopped while sending.
            match in_doubt(&s, fresh.spec.on_uncertain(), fresh.spec.max_attempts()) {
                Doubt::Fail { reason, text } => {
                    let next = status::failed(&s, reason, &text, fresh.metadata.generation, now);
                    if write_status(&api, &fresh, &next, Guard::Decided).await? == Written::Done {
                        event(&ctx, &fresh, EventType::Warning, reason, &text).await;
                    }
                    return Ok(Action::await_change());
                }
                Doubt::Resend { interruptions, text } => {
                    event(&ctx, &fresh, EventType::Warning, "ResendingInDoubt", &text).await;
                    let mut fresh = fresh;
                    if let Some(s) = fresh.status.as_mut() {
                        s.interruptions = Some(interruptions);
                    }
                    msg = Arc::new(fresh);
                }
            }
        } else {
            // This process's own claim, whose answer was lost before anything was sent.
            msg = Arc::new(fresh);
        }
    }
    let status = msg.status.clone().unwrap_or_default();
    if let Some(next) = &status.next_attempt_time
        && next.0 > now
    {
        return Ok(Action::requeue(retry::until(now, next.0)));
    }
    let created = msg.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(now);
    let deadline = retry::add(created, Duration::from_secs(msg.spec.deadline_seconds()));
    if now > deadline {
        let text =
            format!("the deadline passed ({deadline}, delivery.deadlineSeconds) before the message could be sent");
        return fail(&ctx, &api, &msg, "DeadlineExceeded", &text).await;
    }

    let key = ProfileKey::for_message(&ns, msg.spec.profile_ref.kind(), &msg.spec.profile_ref.name);
    let Some(profile) = ctx.profiles.get(&key).filter(|_| ctx.profile_exists(&key)) else {
        let text = format!("{key} not found; the message is sent when it exists and is ready");
        return wait(&ctx, &api, &msg, "ProfileNotFound", &text).await;
    };
    let transport = match &profile.state {
        Ok(t) => Arc::clone(t),
        Err(nr) => {
            let text = format!("{key} is not ready ({}): {}", nr.reason, nr.message);
            return wait(&ctx, &api, &msg, "ProfileNotReady", &text).await;
        }
    };
    let from = match check_policy(&ctx, &ns, &msg, &profile).await? {
        Ok(from) => from,
        Err((reason, text)) => return fail(&ctx, &api, &msg, reason, &text).await,
    };

    // The turn comes before anything large is read: a message waiting for the rate limit holds
    // neither its body nor its attachments, nor a reconcile slot: it waits in its mailbox's queue,
    // which wakes it when its turn comes (see `run::TURN_KICK` for the safety net).
    let me = ObjectRef::from(msg.as_ref());
    // So does its share of the memory budget; a turn it cannot take gives the bytes back.
    let Some(memory) = memory::reserve(&ctx, &msg, &profile) else {
        return Ok(Action::await_change());
    };
    let limits_key = key.to_string();
    let permit = match ctx.limits.try_acquire(
        &limits_key,
        &from.email,
        profile.settings.messages_per_minute(),
        profile.settings.max_concurrent(),
        &me,
    ) {
        Turn::Go(permit) => permit,
        // Woken by the mailbox: no timer per waiting message.
        Turn::Wait => return Ok(Action::await_change()),
    };
    // Graceful shutdown: a message that has not been claimed is left for the next leader.
    if ctx.is_stopping() || !ctx.hold(&uid) {
        return Ok(Action::await_change());
    }
    let result = claim_and_send(&ctx, &api, &msg, from, &profile, transport.as_ref(), (permit, memory)).await;
    ctx.release(&uid);
    result
}

/// Builds the whole message as the claim returned it: inline attachments, template, MIME. An
/// error is the message's own problem, as (reason, text).
async fn build(
    ctx: &Context,
    msg: &EmailMessage,
    referenced: Vec<Option<crate::transport::AttachmentData>>,
    from: Address,
    message_id: String,
    profile: &ResolvedProfile,
) -> Result<Result<OutgoingMessage, (&'static str, String)>> {
    let ns = msg.namespace().unwrap_or_default();
    let attachments = match outgoing::with_inline_attachments(&msg.spec, referenced) {
        Ok(a) => a,
        Err(e) => return Ok(Err((e.reason(), e.to_string()))),
    };
    let spec = match super::template::render_message(&ctx.client, &ns, &msg.spec).await? {
        Ok(spec) => spec,
        Err(e) => return Ok(Err((e.reason(), e.to_string()))),
    };
    let limit = if profile.settings.graph.is_some() { MAX_MESSAGE_BYTES } else { MAX_SMTP_MESSAGE_BYTES };
    Ok(outgoing::build(&spec, from, attachments, message_id, limit).map_err(|e| (e.reason(), e.to_string())))
}

/// Reads the attachments kept in Secrets and ConfigMaps; claims the message with the
/// resourceVersion it was decided on; builds it from the whole object the claim returns (the
/// cache keeps no bodies, so no extra read is needed); sends it and records the outcome. A
/// message that cannot be built gets the status it had before the claim, Failed with the reason:
/// its own problem never costs an attempt.
async fn claim_and_send(
    ctx: &Context,
    api: &Api<EmailMessage>,
    cached: &EmailMessage,
    from: Address,
    profile: &ResolvedProfile,
    transport: &dyn crate::transport::Transport,
    // The mailbox's turn and the message's share of the memory budget, both held until the send ends.
    (permit, mut memory): (SendPermit<ObjectRef<EmailMessage>>, MessageMemory),
) -> Result<Action> {
    let ns = cached.namespace().unwrap_or_default();
    let referenced = match outgoing::load_referenced_attachments(&ctx.client, &ns, &cached.spec).await? {
        Ok(r) => r,
        Err(e) if e.may_resolve_later() => {
            drop(permit);
            return wait(ctx, api, cached, e.reason(), &e.to_string()).await;
        }
        Err(e) => {
            drop(permit);
            return fail(ctx, api, cached, e.reason(), &e.to_string()).await;
        }
    };
    let before = cached.status.clone().unwrap_or_default();
    let uid = cached.uid().unwrap_or_default();
    // A claim of ours that was never sent under is resumed with its attempt number.
    let resumed = before.phase == Some(Phase::Sending) && ctx.take_unsent_claim(before.claim_id.as_deref());
    let attempt = before.attempts.unwrap_or(0) + u32::from(!resumed);
    let message_id = before.message_id.clone().unwrap_or_else(|| outgoing::message_id(&uid, &from.email));
    let claim = Claim {
        attempt,
        message_id: message_id.clone(),
        recipients: cached.spec.recipient_count() as u32,
        transport: profile.settings.transport_name().to_string(),
        from: from.email.clone(),
        id: uuid::Uuid::new_v4().to_string(),
        holder: ctx.config.instance.clone(),
        interruptions: before.interruptions.unwrap_or(0),
    };
    let claimed = status::claimed(&before, &claim, cached.metadata.generation, Timestamp::now());
    // Optimistic concurrency: the claim carries the resourceVersion we decided on, so of two
    // writers (replicas, or a stale cache) exactly one wins; the loser waits for the next change.
    let msg = match claim_status(api, cached, &claimed).await {
        Ok(m) if m.uid() == cached.uid() => m,
        Ok(_) => return Ok(Action::await_change()),
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => return Ok(Action::await_change()),
        Err(e) if write_retryable(&e) => match find_claim(api, cached, &claim.id).await {
            // The claim landed and only its answer was lost: it is ours, send under it.
            ClaimLookup::Ours(m) => *m,
            ClaimLookup::NotOurs => return Err(e.into()),
            ClaimLookup::Unknown => {
                // It may have landed: if it did, it is resumed when seen, never taken as in doubt.
                ctx.remember_unsent_claim(&claim.id);
                return Err(e.into());
            }
        },
        Err(e) => return Err(e.into()),
    };
    let outgoing = match build(ctx, &msg, referenced, from, message_id, profile).await {
        Ok(Ok(o)) => o,
        Ok(Err((reason, text))) => {
            drop(permit);
            let next = status::failed(&before, reason, &text, msg.metadata.generation, Timestamp::now());
            unclaim(api, &msg, &claim.id, &next).await?;
            return failed(ctx, &msg, reason, &text).await;
        }
        Err(e) => {
            // The API server failed us (reading the template): nothing was sent, so the status
            // goes back to what it was and the error policy tries again.
            drop(permit);
            unclaim(api, &msg, &claim.id, &before).await?;
            if resumed {
                // `before` is the earlier claim of ours, still unsent.
                if let Some(id) = before.claim_id.as_deref() {
                    ctx.remember_unsent_claim(id);
                }
            }
            return Err(e);
        }
    };
    memory::settle(&mut memory, profile, &msg, &outgoing);
    let profile_label = profile_label(&profile.key);
    ctx.metrics.attempts.get_or_create(&crate::metrics::ProfileLabels { profile: profile_label.clone() }).inc();
    let started = std::time::Instant::now();
    let result = transport.send(&outgoing).await;
    // The slot is the provider's; recording the outcome need not hold it.
    drop(permit);
    drop(outgoing);
    drop(memory);
    let msg = &msg;
    let now = Timestamp::now();
    let gen_ = msg.metadata.generation;
    if let Some(evidence) = send_evidence(&result, &claim.from, now) {
        ctx.note_send_evidence(&profile.key, evidence);
    }
    match result {
        Ok(delivered) => {
            let next = status::sent(&claimed, &delivered, gen_, now);
            record_outcome(api, msg, &claim.id, &next).await?;
            info!(message = %msg.name_any(), namespace = msg.namespace().unwrap_or_default(), attempt, elapsed_ms = started.elapsed().as_millis() as u64, "sent");
            // The Event says what the condition says: Graph's 202 is no confirmed delivery.
            let text = format!("attempt {attempt} via {}: {}", claim.transport, status::sent_condition(&delivered).1);
            event(ctx, msg, EventType::Normal, "Sent", &text).await;
            ctx.metrics.outcome(&profile_label, &claim.transport, "sent");
            if let Some(created) = &msg.metadata.creation_timestamp {
                ctx.metrics.delivery_seconds.observe(now.duration_since(created.0).as_secs_f64().max(0.0));
            }
            Ok(expire_after(msg))
        }
        Err(SendError::Permanent { reason }) | Err(SendError::Denied { reason }) => {
            let next = status::failed(&claimed, "SendFailed", &reason, gen_, now);
            record_outcome(api, msg, &claim.id, &next).await?;
            warn!(message = %msg.name_any(), attempt, %reason, "failed");
            event(ctx, msg, EventType::Warning, "Failed", &reason).await;
            ctx.metrics.outcome(&profile_label, &claim.transport, "failed");
            Ok(expire_after(msg))
        }
        Err(SendError::Transient { reason, retry_after }) => {
            let created = msg.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(now);
            let policy = RetryPolicy {
                max_attempts: msg.spec.max_attempts(),
                deadline: retry::add(created, Duration::from_secs(msg.spec.deadline_seconds())),
                base_delay: retry::BASE_DELAY,
                max_delay: retry::MAX_DELAY,
            };
            match retry::next_attempt(&policy, attempt, now, retry_after, rand::random::<f64>()) {
                RetryDecision::RetryAt(at) => {
                    let next = status::retrying(&claimed, &reason, at, gen_, now);
                    record_outcome(api, msg, &claim.id, &next).await?;
                    warn!(message = %msg.name_any(), attempt, %reason, "transient failure, retry scheduled");
                    event(
                        ctx,
                        msg,
                        EventType::Warning,
                        "RetryScheduled",
                        &format!("attempt {attempt} failed: {reason}"),
                    )
                    .await;
                    // The timer aims at the very instant the status holds (a whole second, so the
                    // status keeps it exactly), counted from `now`, which is after the answer
                    // arrived: it fires after Retry-After, never before, and the check of
                    // nextAttemptTime at the top of `reconcile` agrees with it.
                    Ok(Action::requeue(retry::until(now, at)))
                }
                RetryDecision::GiveUp(why) => {
                    let text = format!("{why}; last error: {reason}");
                    let next = status::failed(&claimed, "RetriesExhausted", &text, gen_, now);
                    record_outcome(api, msg, &claim.id, &next).await?;
                    event(ctx, msg, EventType::Warning, "Failed", &text).await;
                    ctx.metrics.outcome(&profile_label, &claim.transport, "failed");
                    Ok(expire_after(msg))
                }
            }
        }
    }
}

/// Checks the namespace, sender and recipients (their number, their addresses and domains)
/// against the profile and returns the sender.
/// Ok(Err((reason, text))) is a violation that fails the message.
async fn check_policy(
    ctx: &Context,
    ns: &str,
    msg: &EmailMessage,
    profile: &ResolvedProfile,
) -> Result<Result<Address, (&'static str, String)>> {
    let name = profile.key.to_string();
    if let ProfileKey::Cluster { .. } = profile.key {
        let admits = |labels: &_| policy::check_namespace(&name, profile.allowed_namespaces.as_ref(), ns, labels);
        // The metadata cache decides when it admits the namespace. A namespace it does not have
        // yet, or does not admit, is asked of the API server before the message fails for it: a
        // label just added may not have reached the cache.
        let cached = ctx.cached_namespace_labels(ns).map(|labels| admits(&labels));
        if !matches!(cached, Some(Ok(()))) {
            let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
            let labels = namespaces.get_metadata_opt(ns).await?.map(|n| n.labels().clone()).unwrap_or_default();
            if let Err(e) = admits(&labels) {
                return Ok(Err(("NamespaceNotAdmitted", e.to_string())));
            }
        }
    }
    let from = match outgoing::sender(&msg.spec, &profile.settings.senders.default) {
        Ok(f) => f,
        Err(e) => return Ok(Err((e.reason(), e.to_string()))),
    };
    if let Err(e) = policy::check_sender(&name, &profile.settings.senders, &from.email) {
        return Ok(Err(("SenderNotAllowed", e.to_string())));
    }
    // Counted before any address is parsed: a list far over the limit costs no parsing.
    if let Err(e) = policy::check_recipient_count(msg.spec.recipient_count()) {
        return Ok(Err(("TooManyRecipients", e.to_string())));
    }
    let mut bare = Vec::new();
    for (field, list) in [("to", &msg.spec.to), ("cc", &msg.spec.cc), ("bcc", &msg.spec.bcc)] {
        for a in list {
            match crate::transport::parse_mailbox(a) {
                Ok(m) => bare.push(m.email),
                Err(e) => {
                    let e = BuildError::Address { field, reason: e.to_string() };
                    return Ok(Err((e.reason(), e.to_string())));
                }
            }
        }
    }
    if let Err(e) =
        policy::check_recipients(&name, profile.settings.recipient_domains.as_deref(), bare.iter().map(String::as_str))
    {
        return Ok(Err(("RecipientDomainNotAllowed", e.to_string())));
    }
    Ok(Ok(from))
}

/// The profile as metrics name it: `namespace/name`, or the cluster profile's name.
pub fn profile_label(key: &ProfileKey) -> String {
    match key {
        ProfileKey::Namespaced { namespace, name } => format!("{namespace}/{name}"),
        ProfileKey::Cluster { name } => name.clone(),
    }
}

async fn fail(ctx: &Context, api: &Api<EmailMessage>, msg: &EmailMessage, reason: &str, text: &str) -> Result<Action> {
    let s = msg.status.clone().unwrap_or_default();
    let next = status::failed(&s, reason, text, msg.metadata.generation, Timestamp::now());
    match write_status(api, msg, &next, Guard::Decided).await? {
        Written::Done => failed(ctx, msg, reason, text).await,
        Written::Stale => Ok(Action::requeue(STALE_RECHECK)),
        Written::Gone => Ok(Action::await_change()),
    }
}

/// What follows a Failed status written for the message's own problem: the log, an Event, the metric.
async fn failed(ctx: &Context, msg: &EmailMessage, reason: &str, text: &str) -> Result<Action> {
    warn!(message = %msg.name_any(), namespace = msg.namespace().unwrap_or_default(), reason, "failed");
    event(ctx, msg, EventType::Warning, reason, text).await;
    let key = ProfileKey::for_message(
        &msg.namespace().unwrap_or_default(),
        msg.spec.profile_ref.kind(),
        &msg.spec.profile_ref.name,
    );
    ctx.metrics.outcome(&profile_label(&key), "none", "failed");
    Ok(expire_after(msg))
}

async fn wait(ctx: &Context, api: &Api<EmailMessage>, msg: &EmailMessage, reason: &str, text: &str) -> Result<Action> {
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

/// A decision refused because the message changed (409) is made again this soon, from the newer
/// object the watch brings.
const STALE_RECHECK: Duration = Duration::from_secs(1);

/// How long an outcome write is retried while the API server is unreachable.
const OUTCOME_WRITE_BUDGET: Duration = Duration::from_secs(120);

/// What a status write must not overwrite.
#[derive(Clone, Copy, Debug)]
enum Guard<'a> {
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
enum Written {
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
async fn write_status(
    api: &Api<EmailMessage>,
    base: &EmailMessage,
    next: &EmailMessageStatus,
    guard: Guard<'_>,
) -> Result<Written, kube::Error> {
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

/// Writes the status that records a send's outcome under the claim `claim_id`. The send
/// happened, so giving up on the first error would leave the message in Sending and make the
/// next reconcile treat it as in doubt (sent again, or failed as DeliveryUncertain) although this
/// process knows the outcome: while the API server is away the write is retried.
async fn record_outcome(
    api: &Api<EmailMessage>,
    msg: &EmailMessage,
    claim_id: &str,
    next: &EmailMessageStatus,
) -> Result<(), kube::Error> {
    write_status(api, msg, next, Guard::Claim(claim_id)).await.map(|_| ())
}

/// What the API server says of a claim whose answer did not arrive.
enum ClaimLookup {
    /// The message carries the claim: it landed. The object is the current one.
    Ours(Box<EmailMessage>),
    /// The message carries another claim, or none, or is gone.
    NotOurs,
    /// The API server could not be asked within the budget.
    Unknown,
}

/// Reads the message (retrying while the API server is away, for up to `OUTCOME_WRITE_BUDGET`)
/// and says whether it carries the claim `claim_id`.
async fn find_claim(api: &Api<EmailMessage>, msg: &EmailMessage, claim_id: &str) -> ClaimLookup {
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
fn write_retryable(err: &kube::Error) -> bool {
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
async fn claim_status(
    api: &Api<EmailMessage>,
    msg: &EmailMessage,
    claimed: &EmailMessageStatus,
) -> Result<EmailMessage, kube::Error> {
    api.patch_status(&msg.name_any(), &PatchParams::default(), &Patch::Merge(status_patch(msg, claimed))).await
}

/// Replaces the status of a claim that sent nothing by `next`, which descends from the status
/// before the claim. Like an outcome it must not be lost: a message left in Sending would be
/// taken as in doubt.
async fn unclaim(
    api: &Api<EmailMessage>,
    msg: &EmailMessage,
    claim_id: &str,
    next: &EmailMessageStatus,
) -> Result<(), kube::Error> {
    write_status(api, msg, next, Guard::Claim(claim_id)).await.map(|_| ())
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

/// What to do with a message found in `Sending` that nobody holds (its operator stopped while
/// sending).
#[derive(Debug, PartialEq, Eq)]
enum Doubt {
    /// Fail it, for this reason.
    Fail {
        /// The condition's reason.
        reason: &'static str,
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
fn in_doubt(s: &EmailMessageStatus, on_uncertain: OnUncertain, max_attempts: u32) -> Doubt {
    let attempt = s.attempts.unwrap_or(0);
    let holder = s.claimed_by.as_deref().map(|h| format!(" (claimed by {h})")).unwrap_or_default();
    let interruptions = s.interruptions.unwrap_or(0) + 1;
    if on_uncertain == OnUncertain::Fail {
        return Doubt::Fail {
            reason: "DeliveryUncertain",
            text: format!(
                "attempt {attempt}{holder} was interrupted (the operator stopped while sending); it may or may not have been delivered, and delivery.onUncertain is Fail"
            ),
        };
    }
    if interruptions >= MAX_INTERRUPTIONS {
        return Doubt::Fail {
            reason: "RepeatedlyInterrupted",
            text: format!(
                "the operator stopped while sending this message {interruptions} times in a row (attempt {attempt}{holder} was the last); it is not sent again, so that it cannot keep the operator from working. It may or may not have been delivered"
            ),
        };
    }
    if attempt >= max_attempts {
        return Doubt::Fail {
            reason: "RetriesExhausted",
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

fn expire_after(msg: &EmailMessage) -> Action {
    match msg.spec.ttl_seconds_after_finished {
        Some(ttl) => Action::requeue(Duration::from_secs(ttl.max(0) as u64)),
        None => Action::await_change(),
    }
}

/// Deletes a finished message once `ttlSecondsAfterFinished` has passed.
async fn expire(
    api: &Api<EmailMessage>,
    msg: &EmailMessage,
    status: &EmailMessageStatus,
    now: Timestamp,
) -> Result<Action> {
    let (Some(ttl), Some(done)) = (msg.spec.ttl_seconds_after_finished, status::finished_at(status)) else {
        return Ok(Action::await_change());
    };
    let at = retry::add(done, Duration::from_secs(ttl.max(0) as u64));
    if at > now {
        return Ok(Action::requeue(retry::until(now, at)));
    }
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

/// Publishes an Event on the message; a failure to publish is logged, never fatal.
///
/// Events are created directly rather than through kube's `Recorder`, which keeps every Event it
/// published for six minutes (to count repeats as a series) and scans that cache under a lock on
/// every publish: with thousands of messages, each with an Event or two and hardly any repeats,
/// that cache was the largest part of the operator's memory and a CPU cost growing with the run.
async fn event(ctx: &Context, msg: &EmailMessage, type_: EventType, reason: &str, note: &str) {
    let ev = message_event(msg, type_, reason, note, &ctx.config.instance, Timestamp::now());
    let ns = msg.namespace().unwrap_or_default();
    let api: Api<K8sEvent> = Api::namespaced(ctx.client.clone(), &ns);
    if let Err(e) = api.create(&PostParams::default(), &ev).await {
        warn!(message = %msg.name_any(), error = %e, "could not publish event");
    }
}

/// The events.k8s.io/v1 Event about a message, named like kube's Recorder names them.
fn message_event(
    msg: &EmailMessage,
    type_: EventType,
    reason: &str,
    note: &str,
    instance: &str,
    now: Timestamp,
) -> K8sEvent {
    let mut note = note.to_string();
    if note.len() > 1000 {
        let mut end = 1000;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
    }
    let name = msg.name_any();
    K8sEvent {
        metadata: ObjectMeta {
            namespace: msg.namespace(),
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            ..Default::default()
        },
        action: Some("Send".into()),
        reason: Some(reason.to_string()),
        note: Some(note),
        type_: Some(match type_ {
            EventType::Normal => "Normal".into(),
            EventType::Warning => "Warning".into(),
        }),
        event_time: Some(MicroTime(now)),
        regarding: Some(msg.object_ref(&())),
        reporting_controller: Some(REPORTING_CONTROLLER.into()),
        reporting_instance: Some(instance.to_string()),
        ..Default::default()
    }
}

/// Backoff for reconcile errors (API unavailable and the like).
pub fn error_policy(_msg: Arc<EmailMessage>, err: &Error, ctx: Arc<Context>) -> Action {
    warn!(error = %err, "reconcile failed");
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ErrorLabels { controller: "messages".into(), error: err.metric_label().into() })
        .inc();
    Action::requeue(Duration::from_secs(5))
}

/// Wakes the messages that are due and that nothing will wake: not finished, not in Sending,
/// past their next attempt time, held by no send of this process and by no mailbox queue. The
/// safety net for a wake that went nowhere (a message the queues dropped while its reconcile was
/// delayed, say around an API server restart): a message must never wait for nothing. It reads
/// the cache only; a message that waits for its profile is looked at again, which costs no request.
pub fn wake_forgotten(ctx: &Context) {
    let Some(store) = ctx.messages.get() else {
        return;
    };
    let now = Timestamp::now();
    for m in store.state() {
        let status = m.status.as_ref();
        let due = status.and_then(|s| s.next_attempt_time.as_ref()).is_none_or(|t| t.0 <= now);
        let idle = status.and_then(|s| s.phase).is_none_or(|p| p == Phase::Pending);
        if !due || !idle || m.uid().is_some_and(|uid| ctx.holds(&uid)) {
            continue;
        }
        let me = ObjectRef::from(m.as_ref());
        if !ctx.limits.holds_place_for(&me) && !ctx.budget.holds_place_for(&me) {
            tracing::debug!(message = %m.name_any(), "waking a due message that nothing else would wake");
            let _ = ctx.wake.send(me);
        }
    }
}

/// What a send's outcome tells of the app's authorisation for the sender mailbox: an accepted
/// message proves it, a denial disproves it, anything else (network, throttling) says nothing.
fn send_evidence(
    result: &Result<crate::transport::Delivered, SendError>,
    sender: &str,
    now: Timestamp,
) -> Option<SendEvidence> {
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
    fn events_name_the_message_and_the_instance_and_clip_the_note() {
        let msg: EmailMessage = serde_json::from_value(serde_json::json!({
            "apiVersion": "mailroom.dev/v1alpha1", "kind": "EmailMessage",
            "metadata": {"name": "m", "namespace": "ns", "uid": "u1"},
            "spec": {"profileRef": {"name": "p"}, "to": ["b@contoso.com"], "subject": "s", "body": {"text": "t"}},
        }))
        .unwrap();
        let now: Timestamp = "2026-11-28T12:00:00Z".parse().unwrap();
        let long = "é".repeat(600);
        let ev = message_event(&msg, EventType::Warning, "Failed", &long, "mailroom-0", now);
        assert_eq!(ev.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(ev.metadata.name, Some(format!("m.{:x}", now.as_nanosecond())));
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        assert_eq!(ev.reason.as_deref(), Some("Failed"));
        assert_eq!(ev.action.as_deref(), Some("Send"));
        assert_eq!(ev.reporting_controller.as_deref(), Some("mailroom"));
        assert_eq!(ev.reporting_instance.as_deref(), Some("mailroom-0"));
        let regarding = ev.regarding.unwrap();
        assert_eq!((regarding.kind.as_deref(), regarding.uid.as_deref()), (Some("EmailMessage"), Some("u1")));
        let note = ev.note.unwrap();
        assert!(note.len() <= 1000 && note.chars().all(|c| c == 'é'), "{}", note.len());
    }

    #[test]
    fn unclaiming_removes_what_the_claim_added() {
        let before = EmailMessageStatus::default();
        let claim = Claim {
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
        let failed = status::failed(&before, "TemplateError", "line 2: undefined value", Some(1), now);
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
        assert!(matches!(fail, Doubt::Fail { reason: "DeliveryUncertain", .. }), "{fail:?}");
    }

    #[test]
    fn an_interrupted_attempt_counts_against_max_attempts() {
        let last = in_doubt(&sending(3, None), OnUncertain::Resend, 3);
        assert!(matches!(last, Doubt::Fail { reason: "RetriesExhausted", .. }), "{last:?}");
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
                assert_eq!(reason, "RepeatedlyInterrupted");
                assert!(text.contains(&format!("{MAX_INTERRUPTIONS} times in a row")), "{text}");
            }
            other => panic!("{other:?}"),
        }
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
        let claim = Claim {
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
