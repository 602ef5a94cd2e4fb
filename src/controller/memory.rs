//! The memory budget in a message's reconcile: how much it asks for before it reads anything,
//! and how much it keeps once it is built (see `delivery/budget.rs` and `delivery/footprint.rs`).

use kube::runtime::reflector::ObjectRef;

use super::context::Context;
use super::registry::ResolvedProfile;
use crate::api::EmailMessage;
use crate::delivery::budget::{Grant, Reservation};
use crate::delivery::footprint::{self, Encoding};
use crate::transport::{OutgoingMessage, RawOutgoing};

/// The bytes one message holds in the budget.
pub type MessageMemory = Reservation<ObjectRef<EmailMessage>>;

/// How the profile's transport encodes a message.
pub fn encoding(profile: &ResolvedProfile) -> Encoding {
    if profile.settings.graph.is_some() { Encoding::Graph } else { Encoding::Smtp }
}

/// The most `cached` (the cache's copy) may hold while it is read, built and sent; `None` when
/// the budget has not got it now: the message is queued and woken when it has.
pub fn reserve(ctx: &Context, cached: &EmailMessage, profile: &ResolvedProfile) -> Option<MessageMemory> {
    let bytes = footprint::before_reading(encoding(profile), &cached.spec);
    let me = ObjectRef::from(cached);
    match ctx.budget.try_reserve(&me, bytes) {
        Grant::Go(memory) => Some(memory),
        Grant::Wait => {
            tracing::debug!(message = %me.name, bytes, "waiting for memory");
            None
        }
    }
}

/// Keeps of `memory` what the built message really holds: `whole` is the object the claim
/// returned, `message` what was built from it.
pub fn settle(memory: &mut MessageMemory, profile: &ResolvedProfile, whole: &EmailMessage, message: &OutgoingMessage) {
    memory.shrink_to(footprint::of_built(encoding(profile), &whole.spec, message));
}

/// Keeps of `memory` what a prepared raw message holds.
pub fn settle_raw(memory: &mut MessageMemory, profile: &ResolvedProfile, whole: &EmailMessage, message: &RawOutgoing) {
    memory.shrink_to(footprint::of_raw(encoding(profile), &whole.spec, message.bytes.len() as u64));
}
