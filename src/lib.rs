//! mailroom: a Kubernetes operator that sends email from custom resources.

pub mod api;
pub mod auth;
pub mod tls;
pub mod transport;
