//! A stateful emulator of Microsoft Entra ID's token endpoint and Microsoft Graph's mail
//! sending, served over loopback HTTPS for tests and demos.

pub mod admin;
pub mod apps;
pub mod clock;
pub mod cloud;
pub mod faults;
pub mod graph;
pub mod logging;
pub mod origin;
pub mod rbac;
pub mod records;
pub mod server;
pub mod signing;
pub mod state;
pub mod throttle;
pub mod tls;
pub mod tokens;

pub use cloud::Cloud;
pub use server::{Config, RunningEmulator, StartError, start};
pub use signing::TokenSigner;
