//! Delivery decisions: retries, policy, and the limits that keep a profile under its provider's.

pub mod budget;
pub mod footprint;
pub mod idempotency;
pub mod limits;
pub mod policy;
pub mod retry;
