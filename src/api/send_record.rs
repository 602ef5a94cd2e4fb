//! `SendRecord`: the operator's record that a message with an idempotency key was sent (or is
//! being sent). One object per namespace and key, named by a hash of the key, so that the API
//! server arbitrates between two messages with the same key (create fails for the second) and the
//! record outlives the messages themselves (it has no owner).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Written by the operator only: which message holds an idempotency key, and whether it was sent.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "mailroom.dev",
    version = "v1alpha1",
    kind = "SendRecord",
    namespaced,
    printcolumn = r#"{"name":"Key","type":"string","jsonPath":".spec.key"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".spec.state"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".spec.message.name"}"#,
    printcolumn = r#"{"name":"Expires","type":"date","jsonPath":".spec.expiresAt"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SendRecordSpec {
    /// The idempotency key, as the message gave it or as it was derived.
    #[schemars(length(max = 512))]
    pub key: String,
    /// Reserved (a message is being sent under the key) or Sent.
    pub state: SendRecordState,
    /// The message that reserved the key, and, once Sent, the one that sent it.
    pub message: RecordedMessage,
    /// When the key was reserved.
    pub reserved_time: Time,
    /// When the provider accepted the message (Sent only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_time: Option<Time>,
    /// The Message-ID of the mail sent (Sent only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 998))]
    pub message_id: Option<String>,
    /// After this the key may be sent again and the record is deleted (Sent only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// The retention the key was sent with, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_seconds: Option<u64>,
}

/// Where a key is.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SendRecordState {
    /// A message holds the key and is being sent; it is released if the message fails.
    Reserved,
    /// A message with the key was sent.
    Sent,
}

/// A message, by name and uid (the name alone may be re-created).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecordedMessage {
    /// The message's name.
    #[schemars(length(max = 253))]
    pub name: String,
    /// The message's uid.
    #[schemars(length(max = 64))]
    pub uid: String,
}
