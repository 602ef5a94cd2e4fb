//! Transports: how a resolved message leaves the cluster.
//!
//! The controller resolves an `EmailMessage` (profile, sender, attachments) into an
//! [`OutgoingMessage`] and hands it to the profile's [`Transport`].

use std::time::Duration;

use async_trait::async_trait;

pub mod address;
pub mod graph;
pub mod mime;
pub mod offload;
pub mod raw;
pub mod smtp;

pub use address::{Address, AddressError, parse_mailbox};
pub use raw::{RawError, RawOutgoing};

/// How important a message is: its `Importance` and `X-Priority` headers, Graph's `importance`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Importance {
    /// Low.
    Low,
    /// Normal.
    #[default]
    Normal,
    /// High.
    High,
}

/// A message with everything resolved: addresses parsed, attachments loaded.
#[derive(Clone, Debug, PartialEq)]
pub struct OutgoingMessage {
    /// The sender mailbox.
    pub from: Address,
    /// Recipients.
    pub to: Vec<Address>,
    /// Copy recipients.
    pub cc: Vec<Address>,
    /// Blind copy recipients: on the envelope, never in a header.
    pub bcc: Vec<Address>,
    /// Reply-To.
    pub reply_to: Vec<Address>,
    /// The subject, UTF-8, no line breaks.
    pub subject: String,
    /// Plain text body.
    pub text: Option<String>,
    /// HTML body.
    pub html: Option<String>,
    /// Attachments with their bytes.
    pub attachments: Vec<AttachmentData>,
    /// Custom `X-` headers, in order.
    pub headers: Vec<(String, String)>,
    /// The Importance header.
    pub importance: Importance,
    /// The Message-ID with its angle brackets, stable across attempts: `<...@mailroom.dev>`.
    pub message_id: String,
}

impl OutgoingMessage {
    /// Every envelope recipient: to, cc and bcc.
    pub fn envelope_recipients(&self) -> impl Iterator<Item = &Address> {
        self.to.iter().chain(&self.cc).chain(&self.bcc)
    }
}

/// An attachment's name, type and bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachmentData {
    /// The file name the recipient sees.
    pub name: String,
    /// Its MIME type.
    pub content_type: String,
    /// Its content.
    pub bytes: Vec<u8>,
}

/// The provider accepted the message.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Delivered {
    /// What the provider's acceptance promises.
    pub acceptance: Acceptance,
    /// The provider's answer: the SMTP reply to DATA, or `202 Accepted`.
    pub response: String,
    /// Graph's `request-id`.
    pub request_id: Option<String>,
    /// Recipients that the server rejected while others were accepted, with its reply.
    pub rejected: Vec<(String, String)>,
}

/// How far a provider's "yes" goes: the two transports promise different things.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Acceptance {
    /// Accepted for delivery, and delivery itself not confirmed: Graph's `202 Accepted` means
    /// "the request has been accepted; however, it does not indicate that the request processing
    /// has completed" (https://learn.microsoft.com/graph/api/user-sendmail, and the same 202 for
    /// a draft's send: https://learn.microsoft.com/graph/api/message-send). The weaker promise is
    /// the default.
    #[default]
    AcceptedForDelivery,
    /// An SMTP server answered the message data with 250: it has taken responsibility for
    /// delivering or relaying it (RFC 5321 section 6.1), so a failure later comes back as a
    /// bounce to the sender rather than as an answer here.
    ResponsibilityTaken,
}

/// Why a send did not succeed, and whether trying again can help.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Worth retrying: network errors, SMTP 4xx, Graph 429/5xx, token endpoint unavailable.
    #[error("{reason}")]
    Transient {
        /// What happened, in words a person can act on.
        reason: String,
        /// The provider's `Retry-After`, when it gave one.
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help: SMTP 5xx, Graph 400/403, bad credentials.
    #[error("{reason}")]
    Permanent {
        /// What happened, in words a person can act on (the server's reply included).
        reason: String,
    },
    /// The provider refused the app for this sender mailbox (Graph 403 access denied, XOAUTH2
    /// refused with a newly issued token): permanent for the message, and what the profile's
    /// `PermissionsVerified` condition reports.
    #[error("{reason}")]
    Denied {
        /// The provider's answer and what to grant.
        reason: String,
    },
}

impl SendError {
    /// A transient error without Retry-After.
    pub fn transient(reason: impl Into<String>) -> Self {
        SendError::Transient { reason: reason.into(), retry_after: None }
    }

    /// A permanent error.
    pub fn permanent(reason: impl Into<String>) -> Self {
        SendError::Permanent { reason: reason.into() }
    }

    /// What happened, whatever the kind.
    pub fn reason(&self) -> &str {
        match self {
            SendError::Transient { reason, .. } | SendError::Permanent { reason } | SendError::Denied { reason } => {
                reason
            }
        }
    }

    /// Whether a retry can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, SendError::Transient { .. })
    }
}

/// Sends resolved messages through one profile's transport.
#[async_trait]
pub trait Transport: Send + Sync {
    /// Sends one message. Must not log or return any secret or token.
    async fn send(&self, message: &OutgoingMessage) -> Result<Delivered, SendError>;

    /// Sends a ready-made message with its envelope. Must not log or return any secret, token
    /// or the message's content. A transport that cannot refuses it for good.
    async fn send_raw(&self, message: &RawOutgoing) -> Result<Delivered, SendError> {
        let _ = message;
        Err(SendError::permanent("this transport does not send raw messages"))
    }
}
