//! mailroom: a Kubernetes operator that sends email from custom resources.

pub mod alerts;
pub mod api;
pub mod auth;
pub mod cli;
pub mod controller;
pub mod delivery;
pub mod error;
pub mod exposition;
pub mod kube_client;
pub mod leader;
pub mod metrics;
pub mod response_body;
pub mod server;
pub mod serving_cert;
pub mod submission;
pub mod text;
pub mod tls;
pub mod transport;

pub use error::{Error, Result};
