//! The reconcilers for messages and profiles, and the context they share.

pub mod cache;
pub mod context;
pub mod index;
pub mod memory;
pub mod message;
pub mod outgoing;
pub mod profile;
pub mod raw;
pub mod reason;
pub mod registry;
pub mod run;
pub mod status;
pub mod steps;
pub mod template;
pub mod wiring;

pub use context::{Context, OperatorConfig};
pub use run::run;
