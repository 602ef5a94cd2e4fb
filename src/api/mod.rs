//! The custom resources: `MailProfile`, `ClusterMailProfile`, `EmailMessage`.

pub mod common;
pub mod crd;
pub mod message;
pub mod profile;

pub use common::*;
pub use message::*;
pub use profile::*;
