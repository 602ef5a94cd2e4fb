//! The steps the controller takes to resolve a profile and build a message, as one public
//! surface. The command line (`mailroom profile check`, `mailroom send`) takes the same steps,
//! so that what it reports is what the operator would do.

pub use super::outgoing::{guessed_content_type, message_id, safe_attachment_name};
pub use super::profile::{EndpointPolicy, judge, required_role, transport_inputs};
pub use super::registry::{NotReady, ProfileKey};
pub use super::wiring::{Built, build_transport, smtp_config};
