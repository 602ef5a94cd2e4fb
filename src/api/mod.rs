//! The custom resources: `MailProfile`, `ClusterMailProfile`, `EmailMessage`, `EmailTemplate`,
//! `AlertRoute`, `SmtpCredential`, and the operator's own `SendRecord`.

pub mod alert_route;
pub mod cloud;
pub mod common;
pub mod crd;
pub mod message;
pub mod profile;
pub mod send_record;
pub mod smtp_credential;
pub mod template;

pub use alert_route::*;
pub use cloud::{Cloud, CloudEndpoints, default_scope};
pub use common::*;
pub use message::*;
pub use profile::*;
pub use send_record::*;
pub use smtp_credential::*;
pub use template::*;
