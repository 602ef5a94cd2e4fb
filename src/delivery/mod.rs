//! Delivery decisions: retries, policy, and the limits that keep a profile under its provider's.

pub mod limits;
pub mod policy;
pub mod retry;
