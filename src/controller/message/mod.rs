//! The message reconciler, as named steps, one module each: [`dereference`] reads what the
//! decision needs, [`decide`] says what to do (pure), [`send`] takes the turn, claims, builds and
//! sends, and [`record`] writes the status (the one place that does) with its Event and metric;
//! [`key`] reserves, confirms and releases a message's idempotency key around its send.

mod decide;
mod dereference;
mod event;
pub use event::{MAX_NOTE, message_event};
pub mod key;
mod record;
mod send;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tracing::warn;

use super::context::Context;
use super::reason::Reason;
use super::registry::ProfileKey;
use crate::api::{EmailMessage, Phase};
use crate::error::{Error, Result};
pub use decide::MAX_INTERRUPTIONS;
use decide::Next;
pub use event::REPORTING_CONTROLLER;

/// Reconciles one EmailMessage: dereference, decide, then wait, fail, expire or claim and send,
/// and record.
pub async fn reconcile(msg: Arc<EmailMessage>, ctx: Arc<Context>) -> Result<Action> {
    let ns = msg.namespace().ok_or_else(|| Error::Invalid("EmailMessage without namespace".into()))?;
    msg.uid().ok_or_else(|| Error::Invalid("EmailMessage without uid".into()))?;
    let api: Api<EmailMessage> = Api::namespaced(ctx.client.clone(), &ns);
    let now = Timestamp::now();
    let Some(mut seen) = dereference::dereference(&ctx, &api, msg).await? else {
        return Ok(Action::await_change());
    };
    let decision = decide::decide(&seen, now);
    if let Some(resend) = decision.resend {
        event::event(&ctx, &seen.msg, EventType::Warning, Reason::ResendingInDoubt, &resend.text).await;
        let msg = Arc::make_mut(&mut seen.msg);
        if let Some(s) = msg.status.as_mut() {
            s.interruptions = Some(resend.interruptions);
        }
    }
    let msg = &seen.msg;
    match decision.next {
        Next::Expire => record::expire(&ctx, &api, msg, now).await,
        Next::Nothing => Ok(Action::await_change()),
        Next::Later(after) => Ok(Action::requeue(after)),
        Next::Wait(reason, text) => record::wait(&ctx, &api, msg, reason, &text).await,
        Next::Fail(reason, text) => record::fail(&ctx, &api, msg, reason, &text).await,
        Next::Send(go) => {
            let (_hold, tried) = send::claim_and_send(&ctx, &api, msg, go).await?;
            record::attempt(&ctx, &api, msg, tried).await
        }
    }
}

/// The profile as metrics name it: `namespace/name`, or the cluster profile's name.
pub fn profile_label(key: &ProfileKey) -> String {
    match key {
        ProfileKey::Namespaced { namespace, name } => format!("{namespace}/{name}"),
        ProfileKey::Cluster { name } => name.clone(),
    }
}

/// The profile label of a message's profile.
fn profile_label_of(msg: &EmailMessage) -> String {
    let spec = &msg.spec;
    profile_label(&ProfileKey::for_message(
        &msg.namespace().unwrap_or_default(),
        spec.profile_ref.kind(),
        &spec.profile_ref.name,
    ))
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
