//! What the emulator remembers for inspection: accepted messages, token requests, counters.

use std::collections::BTreeMap;

use serde::Serialize;

/// A recipient or sender as recorded.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RecordedAddress {
    /// The SMTP address.
    pub address: String,
    /// The display name, when one was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A custom internet message header as recorded.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RecordedHeader {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: String,
}

/// An attachment as recorded: never its content, only its size and digest.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RecordedAttachment {
    /// File name.
    pub name: String,
    /// Decoded size in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256 of the decoded content.
    pub sha256: String,
    /// MIME type, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// True for inline attachments.
    pub is_inline: bool,
}

/// How a message reached the emulator.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SendMode {
    /// sendMail with a JSON message.
    Json,
    /// sendMail with a base64 MIME message.
    Mime,
    /// A draft sent with `/messages/{id}/send`.
    Draft,
}

/// An accepted message.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageRecord {
    /// The Graph `request-id` of the accepting request.
    pub request_id: String,
    /// The `client-request-id` the client sent, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_request_id: Option<String>,
    /// The mailbox in the URL.
    pub sender: String,
    /// The `from` of the message, when it names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<RecordedAddress>,
    /// To recipients.
    pub to: Vec<RecordedAddress>,
    /// Cc recipients.
    pub cc: Vec<RecordedAddress>,
    /// Bcc recipients.
    pub bcc: Vec<RecordedAddress>,
    /// Reply-To addresses.
    pub reply_to: Vec<RecordedAddress>,
    /// Subject.
    pub subject: String,
    /// `text` or `html`.
    pub body_content_type: String,
    /// Body length in bytes.
    pub body_length: usize,
    /// The body itself.
    pub body: String,
    /// `low`, `normal` or `high`.
    pub importance: String,
    /// Custom `X-` headers.
    pub headers: Vec<RecordedHeader>,
    /// Attachments.
    pub attachments: Vec<RecordedAttachment>,
    /// The RFC 5322 Message-ID (the client's, or one the emulator assigned).
    pub message_id: String,
    /// True when the client supplied the Message-ID.
    pub message_id_from_client: bool,
    /// json, mime or draft.
    pub mode: SendMode,
    /// saveToSentItems as requested (JSON sendMail only; Graph's default is true).
    pub save_to_sent_items: bool,
    /// The app that sent it.
    pub client_id: String,
    /// The app's tenant.
    pub tenant_id: String,
    /// When it was accepted (RFC 3339).
    pub received_time: String,
}

/// Which credential a token request used.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GrantKind {
    /// A client secret.
    Secret,
    /// A client assertion signed with a registered certificate.
    Certificate,
    /// A federated (workload identity) assertion.
    Federated,
    /// No usable credential was presented.
    None,
}

/// One token request as recorded: never the secret, assertion or token.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRequestRecord {
    /// When it arrived (RFC 3339).
    pub time: String,
    /// The tenant in the URL.
    pub tenant: String,
    /// The client id presented.
    pub client_id: Option<String>,
    /// The credential kind.
    pub grant: GrantKind,
    /// The requested scope.
    pub scope: Option<String>,
    /// `success`, or the AADSTS code (e.g. `AADSTS7000215`), or `fault:503`.
    pub outcome: String,
    /// The HTTP status answered (0: the connection was dropped).
    pub status: u16,
    /// Lifetime of the issued token, on success.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<u64>,
}

/// One access token the emulator issued, for tests that search logs and statuses for it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedToken {
    /// When it was issued (RFC 3339).
    pub time: String,
    /// The tenant in the URL.
    pub tenant: String,
    /// The client it was issued to.
    pub client_id: Option<String>,
    /// The requested scope.
    pub scope: Option<String>,
    /// The token itself.
    pub access_token: String,
}

/// Counters shown by `GET /_emulator/stats`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// Token requests by outcome.
    pub token_requests: BTreeMap<String, u64>,
    /// Graph requests by HTTP status.
    pub graph_requests: BTreeMap<String, u64>,
    /// The most requests seen in flight at once, per mailbox.
    pub max_in_flight_per_mailbox: BTreeMap<String, usize>,
    /// Requests answered 429 because a mailbox had too many in flight.
    pub concurrency_throttled: u64,
    /// Messages accepted.
    pub messages_accepted: u64,
}
