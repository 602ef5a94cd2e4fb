//! Claim and send: the message's turn in its sender mailbox, the attachments kept in Secrets and
//! ConfigMaps, the claim, the build, the send. What happened is handed to [`super::record`],
//! which writes it.

use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};

use super::super::context::Context;
use super::super::memory;
use super::super::outgoing::{self, MAX_MESSAGE_BYTES, MAX_SMTP_MESSAGE_BYTES};
use super::super::raw::RawProblem;
use super::super::reason::Reason;
use super::super::registry::ResolvedProfile;
use super::super::status::{self, Claim};
use super::decide::{Go, send_evidence};
use super::key::{self, KeyVerdict};
use super::record;
use crate::api::{EmailMessage, EmailMessageStatus, Phase};
use crate::delivery::idempotency;
use crate::delivery::limits::Turn;
use crate::error::{Error, Result};
use crate::transport::{Address, AttachmentData, Delivered, OutgoingMessage, RawOutgoing, SendError};

/// A message this process is sending: no other reconcile of this process takes it meanwhile.
/// Released when dropped.
pub struct Hold<'a> {
    ctx: &'a Context,
    uid: String,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.ctx.release(&self.uid);
    }
}

/// How far an attempt got.
pub enum Tried {
    /// Not the message's turn in its mailbox, or not yet its share of the memory budget: the
    /// mailbox's (or the budget's) queue wakes it.
    NotItsTurn,
    /// Left alone: the operator is stopping (the next leader takes it), or a send of this
    /// process already holds it.
    Left,
    /// An attachment's source cannot be read (before any claim): the message waits for it, or
    /// fails when waiting cannot help.
    Unreadable {
        /// Whether the source may appear later.
        waits: bool,
        /// The reason.
        reason: Reason,
        /// Why, in words.
        text: String,
    },
    /// Another writer changed or claimed the message first, or it is gone.
    Outrun,
    /// Claimed, and then it could not be built: its own problem, which costs no attempt.
    Unbuildable(Claimed, Reason, String),
    /// Claimed, and then the API server failed us before anything was sent.
    Interrupted(Claimed, Error),
    /// Claimed and built, and not sent: a message with the same idempotency key was.
    AlreadySent(Claimed, AlreadySent),
    /// Claimed and built, and not sent now: another message holds its idempotency key.
    KeyBusy(Claimed, String),
    /// Sent, with the provider's answer.
    Sent(Claimed, Result<Delivered, SendError>, Duration),
}

/// The message that was sent under a key before.
pub struct AlreadySent {
    /// The key.
    pub key: String,
    /// Why, in words: the original, its Message-ID and time.
    pub text: String,
    /// The original's Message-ID.
    pub message_id: Option<String>,
}

/// A claim that landed.
pub struct Claimed {
    /// The message as the claim returned it.
    pub msg: EmailMessage,
    /// Its status before the claim.
    pub before: EmailMessageStatus,
    /// Its status under the claim.
    pub status: EmailMessageStatus,
    /// The claim.
    pub claim: Claim,
    /// The claim resumes an earlier claim of ours whose answer was lost.
    pub resumed: bool,
    /// The idempotency key reserved for the send, to confirm or release with its outcome.
    pub key: Option<Box<key::Held>>,
    /// The warning of a GitOps-managed message with a TTL and no key, when it is news.
    pub warning: Option<String>,
}

/// Takes the message's turn and holds it, then claims, builds and sends it. The [`Hold`] (if
/// any) is kept until its outcome is recorded.
pub async fn claim_and_send<'a>(
    ctx: &'a Context,
    api: &Api<EmailMessage>,
    cached: &EmailMessage,
    go: Go,
) -> Result<(Option<Hold<'a>>, Tried)> {
    // The turn comes before anything large is read: a message waiting for the rate limit holds
    // neither its body nor its attachments, nor a reconcile slot: it waits in its mailbox's queue,
    // which wakes it when its turn comes (see `run::TURN_KICK` for the safety net).
    // So does its share of the memory budget; a turn it cannot take gives the bytes back.
    let Some(mut memory) = memory::reserve(ctx, cached, &go.profile) else {
        return Ok((None, Tried::NotItsTurn));
    };
    let settings = &go.profile.settings;
    let me = ObjectRef::from(cached);
    let limits_key = go.profile.key.to_string();
    let turn = ctx.limits.try_acquire(
        &limits_key,
        &go.from.email,
        settings.messages_per_minute(),
        settings.max_concurrent(),
        &me,
    );
    let Turn::Go(permit) = turn else {
        return Ok((None, Tried::NotItsTurn));
    };
    // Graceful shutdown: a message that has not been claimed is left for the next leader.
    let uid = cached.uid().unwrap_or_default();
    if ctx.is_stopping() || !ctx.hold(&uid) {
        return Ok((None, Tried::Left));
    }
    let hold = Hold { ctx, uid };
    let ns = cached.namespace().unwrap_or_default();
    // What is read before the claim, so that a source that does not exist yet makes the message
    // wait without an attempt: its attachments, or the whole raw message (checked, too).
    let read = match &cached.spec.raw {
        Some(raw) => match read_raw(ctx, &ns, cached, raw, &go).await? {
            Ok(r) => Read::Raw(Box::new(r)),
            Err(p) => {
                return Ok((Some(hold), Tried::Unreadable { waits: p.waits, reason: p.reason, text: p.text }));
            }
        },
        None => match outgoing::load_referenced_attachments(&ctx.client, &ns, &cached.spec).await? {
            Ok(r) => Read::Attachments(r),
            Err(e) => {
                let tried = Tried::Unreadable { waits: e.may_resolve_later(), reason: e.reason(), text: e.to_string() };
                return Ok((Some(hold), tried));
            }
        },
    };
    // An EmailTemplate applied after its messages (GitOps applies in any order) is waited for
    // until the deadline, like a missing attachment source; it is rendered after the claim.
    if let Some(missing) = super::super::template::missing_template(&ctx.client, &ns, &cached.spec).await? {
        let tried = Tried::Unreadable { waits: true, reason: missing.reason(), text: missing.to_string() };
        return Ok((Some(hold), tried));
    }
    let raw = match &read {
        Read::Raw(r) => Some(r.as_ref()),
        Read::Attachments(_) => None,
    };
    let Some(claimed) = claim(ctx, api, cached, &go, raw).await? else {
        return Ok((Some(hold), Tried::Outrun));
    };
    let message_id = claimed.claim.message_id.clone();
    let outgoing = match read {
        Read::Raw(r) => match super::super::raw::check_exclusive(&claimed.msg.spec) {
            Ok(()) => Built::Raw(r),
            Err(p) => return Ok((Some(hold), Tried::Unbuildable(claimed, p.reason, p.text))),
        },
        Read::Attachments(referenced) => {
            match build(ctx, &claimed.msg, referenced, go.from.clone(), message_id, &go.profile).await {
                Ok(Ok(o)) => Built::Message(Box::new(o)),
                Ok(Err((reason, text))) => return Ok((Some(hold), Tried::Unbuildable(claimed, reason, text))),
                Err(e) => return Ok((Some(hold), Tried::Interrupted(claimed, e))),
            }
        }
    };
    // The key is decided on the whole message (a derived key hashes the spec, which the cache
    // does not keep) and reserved after the claim, before the send.
    let mut claimed = claimed;
    let choice = idempotency::choose_key(&claimed.msg);
    match key::reserve_for(&ctx.client, &claimed.msg, &choice, settings).await {
        Ok(KeyVerdict::Send(held)) => {
            claimed.status.idempotency_key = held.as_ref().map(|h| h.key.clone());
            claimed.key = held;
        }
        Ok(KeyVerdict::AlreadySent { key, text, message_id }) => {
            return Ok((Some(hold), Tried::AlreadySent(claimed, AlreadySent { key, text, message_id })));
        }
        Ok(KeyVerdict::Busy(text)) => return Ok((Some(hold), Tried::KeyBusy(claimed, text))),
        Err(e) => return Ok((Some(hold), Tried::Interrupted(claimed, e.into()))),
    }
    if let Some(text) = idempotency::recreation_warning(&claimed.msg, &choice) {
        let news = crate::api::find_condition(&claimed.before.conditions, crate::api::conditions::RECREATION_RISK)
            .is_none_or(|c| c.status != "True");
        status::recreation_risk(&mut claimed.status, &text, claimed.msg.metadata.generation, Timestamp::now());
        claimed.warning = news.then_some(text);
    }
    match &outgoing {
        Built::Message(o) => memory::settle(&mut memory, &go.profile, &claimed.msg, o),
        Built::Raw(r) => memory::settle_raw(&mut memory, &go.profile, &claimed.msg, r),
    }
    let profile_label = super::profile_label(&go.profile.key);
    ctx.metrics.attempts.get_or_create(&crate::metrics::ProfileLabels { profile: profile_label }).inc();
    let started = Instant::now();
    let result = match &outgoing {
        Built::Message(o) => go.transport.send(o).await,
        Built::Raw(r) => go.transport.send_raw(r).await,
    };
    // The slot is the provider's; recording the outcome need not hold it.
    drop(permit);
    drop(outgoing);
    drop(memory);
    if let Some(evidence) = send_evidence(&result, &claimed.claim.from, Timestamp::now()) {
        ctx.note_send_evidence(&go.profile.key, evidence);
    }
    Ok((Some(hold), Tried::Sent(claimed, result, started.elapsed())))
}

/// What was read before the claim.
enum Read {
    /// A built message's attachments from Secrets and ConfigMaps (`None` for inline ones).
    Attachments(Vec<Option<AttachmentData>>),
    /// A raw message, read, checked and prepared.
    Raw(Box<RawOutgoing>),
}

/// What goes to the transport.
enum Built {
    /// A message built from the spec.
    Message(Box<OutgoingMessage>),
    /// A raw message as it is.
    Raw(Box<RawOutgoing>),
}

/// Reads the raw message's Secret, checks it against the profile and prepares its envelope. Its
/// Message-ID is its own, else the one an earlier attempt recorded, else the uid's.
async fn read_raw(
    ctx: &Context,
    ns: &str,
    cached: &EmailMessage,
    raw: &crate::api::RawMessage,
    go: &Go,
) -> Result<Result<RawOutgoing, RawProblem>> {
    let bytes = match super::super::raw::load(&ctx.client, ns, raw).await? {
        Ok(b) => b,
        Err(p) => return Ok(Err(p)),
    };
    let uid = cached.uid().unwrap_or_default();
    let recorded = cached.status.as_ref().and_then(|s| s.message_id.clone());
    let assigned = || recorded.unwrap_or_else(|| outgoing::message_id(&uid, &go.from.email));
    Ok(super::super::raw::prepare(&bytes, &cached.spec, &go.from, assigned, &go.profile))
}

/// Claims the message with the resourceVersion it was decided on, so that of two writers
/// (replicas, or a stale cache) exactly one wins. None: the other won, or the message is gone.
/// A claim whose answer was lost is looked for: if it landed it is ours, and sent under. A raw
/// message's claim records its Message-ID and envelope recipients.
async fn claim(
    ctx: &Context,
    api: &Api<EmailMessage>,
    cached: &EmailMessage,
    go: &Go,
    raw: Option<&RawOutgoing>,
) -> Result<Option<Claimed>> {
    let before = cached.status.clone().unwrap_or_default();
    let uid = cached.uid().unwrap_or_default();
    // A claim of ours that was never sent under is resumed with its attempt number.
    let resumed = before.phase == Some(Phase::Sending) && ctx.take_unsent_claim(before.claim_id.as_deref());
    let attempt = before.attempts.unwrap_or(0) + u32::from(!resumed);
    let message_id = match raw {
        Some(r) => r.message_id.clone(),
        None => before.message_id.clone().unwrap_or_else(|| outgoing::message_id(&uid, &go.from.email)),
    };
    let recipients = raw.map_or(cached.spec.recipient_count(), |r| r.recipients.len());
    let claim = Claim {
        attempt,
        message_id,
        recipients: recipients as u32,
        transport: go.profile.settings.transport_name().to_string(),
        from: go.from.email.clone(),
        id: uuid::Uuid::new_v4().to_string(),
        holder: ctx.config.instance.clone(),
        interruptions: before.interruptions.unwrap_or(0),
    };
    let status = status::claimed(&before, &claim, cached.metadata.generation, Timestamp::now());
    let msg = match record::claim(api, cached, &status).await {
        Ok(m) if m.uid() == cached.uid() => m,
        Ok(_) => return Ok(None),
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => return Ok(None),
        Err(e) if record::write_retryable(&e) => match record::find_claim(api, cached, &claim.id).await {
            // The claim landed and only its answer was lost: it is ours, send under it.
            record::ClaimLookup::Ours(m) => *m,
            record::ClaimLookup::NotOurs => return Err(e.into()),
            record::ClaimLookup::Unknown => {
                // It may have landed: if it did, it is resumed when seen, never taken as in doubt.
                ctx.remember_unsent_claim(&claim.id);
                return Err(e.into());
            }
        },
        Err(e) => return Err(e.into()),
    };
    Ok(Some(Claimed { msg, before, status, claim, resumed, key: None, warning: None }))
}

/// Builds the whole message as the claim returned it (the cache keeps no bodies, so no extra
/// read is needed): inline attachments, template, MIME. Ok(Err): the message's own problem.
async fn build(
    ctx: &Context,
    msg: &EmailMessage,
    referenced: Vec<Option<AttachmentData>>,
    from: Address,
    message_id: String,
    profile: &ResolvedProfile,
) -> Result<Result<OutgoingMessage, (Reason, String)>> {
    let ns = msg.namespace().unwrap_or_default();
    let attachments = match outgoing::with_inline_attachments(&msg.spec, referenced) {
        Ok(a) => a,
        Err(e) => return Ok(Err((e.reason(), e.to_string()))),
    };
    let spec = match super::super::template::render_message(&ctx.client, &ns, &msg.spec).await? {
        Ok(spec) => spec,
        Err(e) => return Ok(Err((e.reason(), e.to_string()))),
    };
    let limit = if profile.settings.graph.is_some() { MAX_MESSAGE_BYTES } else { MAX_SMTP_MESSAGE_BYTES };
    Ok(outgoing::build(&spec, from, attachments, message_id, limit).map_err(|e| (e.reason(), e.to_string())))
}
