//! `SmtpCredential`: who may submit mail to the SMTP submission listener, and with which profile
//! the mail is sent.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::alert_route::LocalReference;
use super::message::{Delivery, ProfileRef};

/// Default `messagesPerMinute` of a credential.
pub const DEFAULT_SUBMISSIONS_PER_MINUTE: u32 = 60;

/// Default `ttlSecondsAfterFinished` of the messages a credential submits: a week.
pub const DEFAULT_SUBMISSION_TTL_SECONDS: i64 = 7 * 24 * 3600;

/// A username and password that may submit mail to mailroom's SMTP listener (`--smtp-addr`), and
/// the profile the mail is sent with. Each accepted mail becomes an EmailMessage (`spec.raw`) in
/// the credential's namespace, owned by nobody and named after what was submitted.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailroom.dev",
    version = "v1alpha1",
    kind = "SmtpCredential",
    namespaced,
    status = "SmtpCredentialStatus",
    shortname = "smtpcred",
    category = "mailroom",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Username","type":"string","jsonPath":".status.username"}"#,
    printcolumn = r#"{"name":"Profile","type":"string","jsonPath":".spec.profileRef.name"}"#,
    printcolumn = r#"{"name":"Per-Minute","type":"integer","jsonPath":".spec.messagesPerMinute"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("size(self.metadata.name) <= 63").message("an SmtpCredential's name is at most 63 characters: it labels the messages submitted with it")
)]
#[serde(rename_all = "camelCase")]
pub struct SmtpCredentialSpec {
    /// A Secret in the credential's namespace with the keys `username` and `password` (the
    /// `kubernetes.io/basic-auth` type has exactly these). Usernames are unique across the
    /// listener: a username two credentials claim authenticates neither.
    pub secret_ref: LocalReference,
    /// The profile that sends the mail (as an EmailMessage names it). Its sender policy applies to
    /// the envelope sender and to the message's From, its `recipientDomains` to every recipient.
    pub profile_ref: ProfileRef,
    /// Mails accepted per minute with this credential (a token bucket whose burst is the same
    /// number); more get `451 4.7.1` and are retried by the client. Default 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 60000))]
    pub messages_per_minute: Option<u32>,
    /// Retries and their limits of the messages created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
    /// Delete the messages this many seconds after they are Sent or Failed; default a week.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,
}

/// Whether the credential can log in, and as whom.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SmtpCredentialStatus {
    /// `Ready`: the Secret holds a username and a password, the username is this credential's
    /// alone, and the profile resolves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The username to log in with (from the Secret; usernames are not secret, passwords are
    /// never shown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl SmtpCredentialSpec {
    /// `messagesPerMinute`, defaulted.
    pub fn messages_per_minute(&self) -> u32 {
        self.messages_per_minute.unwrap_or(DEFAULT_SUBMISSIONS_PER_MINUTE).max(1)
    }

    /// `ttlSecondsAfterFinished`, defaulted.
    pub fn ttl_seconds_after_finished(&self) -> i64 {
        self.ttl_seconds_after_finished.unwrap_or(DEFAULT_SUBMISSION_TTL_SECONDS)
    }
}
