//! `EmailMessage`: one email and the outcome of sending it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::alert_route::LocalReference;
use super::common::LocalKeySelector;

/// Default `delivery.maxAttempts`.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 8;
/// Default `delivery.deadlineSeconds`.
pub const DEFAULT_DEADLINE_SECONDS: u64 = 3600;
/// Most recipients in to, cc and bcc together.
pub const MAX_RECIPIENTS: usize = 500;

/// RE2 pattern of an RFC 5322 mailbox: `user@example.com` or `Name <user@example.com>`.
/// No CR, LF, NUL, angle brackets or quotes in the display name; no spaces or separators in the address.
pub const MAILBOX_PATTERN: &str = r#"^([^<>"\r\n\x00]*<[^<>()\[\]\\,;:@"\s\x00]+@[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?>|[^<>()\[\]\\,;:@"\s\x00]+@[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)$"#;

/// RE2 pattern of a custom header name: `X-` then RFC 5322 field-name characters.
pub const HEADER_NAME_PATTERN: &str = r"^[Xx]-[A-Za-z0-9!#$%&'*+.^_`|~-]+$";

/// Most top-level keys in `spec.values`.
pub const MAX_VALUES: usize = 100;

/// One email; `spec.profileRef` picks how it is sent. The spec is immutable once created.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailroom.dev",
    version = "v1alpha1",
    kind = "EmailMessage",
    namespaced,
    status = "EmailMessageStatus",
    shortname = "em",
    shortname = "email",
    category = "mailroom",
    // The operator watches unfinished messages only (`status.phase!=Sent,status.phase!=Failed`),
    // so that a long history of finished ones costs it neither memory nor start-up time.
    selectable = ".status.phase",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Profile","type":"string","jsonPath":".spec.profileRef.name"}"#,
    printcolumn = r#"{"name":"Recipients","type":"integer","jsonPath":".status.recipients"}"#,
    printcolumn = r#"{"name":"Attempts","type":"integer","jsonPath":".status.attempts"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable once created; to send again, create a new EmailMessage (generateName works)"))]
#[x_kube(validation = Rule::new("has(self.raw) || (has(self.to) ? size(self.to) : 0) + (has(self.cc) ? size(self.cc) : 0) + (has(self.bcc) ? size(self.bcc) : 0) > 0").message("at least one recipient is required in to, cc or bcc (a raw message may take them from its own headers)"))]
#[x_kube(validation = Rule::new("(has(self.to) ? size(self.to) : 0) + (has(self.cc) ? size(self.cc) : 0) + (has(self.bcc) ? size(self.bcc) : 0) <= 500").message("at most 500 recipients in to, cc and bcc together"))]
#[x_kube(validation = Rule::new("has(self.body) || has(self.templateRef) || has(self.raw)").message("body is required (text, html, or both), unless templateRef names an EmailTemplate or raw a ready-made message"))]
#[x_kube(validation = Rule::new("!has(self.raw) || (!has(self.body) && !has(self.templateRef) && !has(self.attachments) && !has(self.headers) && !has(self.replyTo) && !has(self.importance) && (!has(self.subject) || self.subject == ''))").message("raw is the whole message: leave subject, body, templateRef, values, attachments, headers, replyTo and importance out (to, cc and bcc, when given, are its envelope recipients)"))]
#[x_kube(validation = Rule::new("!has(self.templateRef) || (!has(self.body) && (!has(self.subject) || self.subject == ''))").message("with templateRef the EmailTemplate supplies the subject and body: leave subject and body out of the message and pass what varies in values"))]
#[x_kube(validation = Rule::new("!has(self.values) || has(self.templateRef)").message("values are only used with templateRef"))]
pub struct EmailMessageSpec {
    /// The profile that sends this message.
    pub profile_ref: ProfileRef,
    /// The sender; default: the profile's default sender. Must be allowed by the profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(mailbox_rule("self")).message("from must be an RFC 5322 mailbox such as 'Name <user@example.com>' or 'user@example.com'"))]
    #[schemars(length(max = 320))]
    pub from: Option<String>,
    /// Recipients.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new(mailbox_list_rule()).message("every address in to must be an RFC 5322 mailbox such as 'Name <user@example.com>' or 'user@example.com'"))]
    #[schemars(length(max = 500), inner(length(max = 320)))]
    pub to: Vec<String>,
    /// Copy recipients.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new(mailbox_list_rule()).message("every address in cc must be an RFC 5322 mailbox such as 'Name <user@example.com>' or 'user@example.com'"))]
    #[schemars(length(max = 500), inner(length(max = 320)))]
    pub cc: Vec<String>,
    /// Blind copy recipients: they receive the mail and appear in no header.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new(mailbox_list_rule()).message("every address in bcc must be an RFC 5322 mailbox such as 'Name <user@example.com>' or 'user@example.com'"))]
    #[schemars(length(max = 500), inner(length(max = 320)))]
    pub bcc: Vec<String>,
    /// Where replies go.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new(mailbox_list_rule()).message("every address in replyTo must be an RFC 5322 mailbox such as 'Name <user@example.com>' or 'user@example.com'"))]
    #[schemars(length(max = 50), inner(length(max = 320)))]
    pub reply_to: Vec<String>,
    /// The subject (UTF-8; no line breaks).
    #[serde(default)]
    #[x_kube(validation = Rule::new(r"!self.contains('\r') && !self.contains('\n')").message("subject must not contain CR or LF"))]
    #[schemars(length(max = 998))]
    pub subject: String,
    /// The body: text, HTML, or both. Required unless `templateRef` is given.
    #[serde(default, skip_serializing_if = "Body::is_empty")]
    pub body: Body,
    /// An EmailTemplate in the same namespace that renders the subject and body from `values`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_ref: Option<LocalReference>,
    /// What the template sees: any JSON object (`{{ app }}`, `{{ build.url }}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "values_schema")]
    pub values: Option<serde_json::Map<String, serde_json::Value>>,
    /// Files attached to the message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub attachments: Vec<Attachment>,
    /// A ready-made RFC 5322 message in a Secret, sent as it is instead of one built from the
    /// fields above: excludes subject, body, templateRef, values, attachments, headers, replyTo
    /// and importance. The envelope sender is `from` (else the profile's default sender); the
    /// envelope recipients are to, cc and bcc when given, else the message's To, Cc and Bcc. The
    /// profile's sender policy applies to the envelope sender and to the message's From (and
    /// Sender), its recipient domains to every envelope recipient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<RawMessage>,
    /// Custom `X-` headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new(header_name_rule()).message("header names must be X- headers made of letters, digits and -, such as X-Pipeline-Run"))]
    #[x_kube(validation = Rule::new(r"self.all(k, !self[k].contains('\r') && !self[k].contains('\n'))").message("header values must not contain CR or LF"))]
    #[schemars(extend("maxProperties" = 30))]
    pub headers: BTreeMap<String, HeaderValue>,
    /// low, normal (default) or high.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub importance: Option<Importance>,
    /// Retries and their limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
    /// Delete the message this many seconds after it is Sent or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,
    /// Sends at most once per namespace and key within the retention: a message whose key was
    /// already sent is not sent again (phase Sent, reason AlreadySent). Empty: no key, not even
    /// the one derived for a message managed by Argo CD or Flux.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(r"!self.contains('\r') && !self.contains('\n')").message("idempotencyKey must be one line"))]
    #[schemars(length(max = 256))]
    pub idempotency_key: Option<String>,
    /// How long the key stays taken after the message is sent, in seconds; default: the
    /// profile's `idempotencyRetentionSeconds`, else 30 days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 31_622_400))]
    pub idempotency_retention_seconds: Option<u64>,
}

pub(crate) fn mailbox_rule(var: &str) -> String {
    format!("{var}.matches('{}')", MAILBOX_PATTERN.replace('\\', "\\\\").replace('\'', "\\'"))
}

pub(crate) fn mailbox_list_rule() -> String {
    format!("self.all(a, {})", mailbox_rule("a"))
}

fn header_name_rule() -> String {
    format!("self.all(k, k.matches('{}'))", HEADER_NAME_PATTERN.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A free-form object, kept as written (`x-kubernetes-preserve-unknown-fields`), bounded at the top
/// level; the spec's immutability rule still compares it whole.
fn values_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": MAX_VALUES,
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// A custom header's value (one line, at most 998 characters as RFC 5322 allows).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct HeaderValue(#[schemars(length(max = 998))] pub String);

/// Which profile sends the message.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProfileRef {
    /// MailProfile (default, same namespace) or ClusterMailProfile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ProfileKind>,
    /// Name of the profile.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

impl ProfileRef {
    /// The kind, defaulted.
    pub fn kind(&self) -> ProfileKind {
        self.kind.unwrap_or_default()
    }
}

/// The kinds of profile.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ProfileKind {
    /// A profile in the message's namespace.
    #[default]
    MailProfile,
    /// A cluster-scoped profile.
    ClusterMailProfile,
}

/// The body of a message.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.text) || has(self.html)").message("body needs text, html, or both"))]
pub struct Body {
    /// Plain text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// HTML.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
}

impl Body {
    /// Neither text nor HTML: the body is left out of the manifest.
    pub fn is_empty(&self) -> bool {
        self.text.is_none() && self.html.is_none()
    }
}

/// A file attached to a message, from exactly one source.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.secretRef), has(self.configMapRef), has(self.data)].filter(x, x).size() == 1").message("an attachment needs exactly one of secretRef, configMapRef or data"))]
pub struct Attachment {
    /// The file name the recipient sees.
    #[schemars(length(min = 1, max = 255))]
    pub name: String,
    /// MIME type; default: guessed from the name, else application/octet-stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub content_type: Option<String>,
    /// A key of a Secret in the message's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<LocalKeySelector>,
    /// A key of a ConfigMap in the message's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<LocalKeySelector>,
    /// The content, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

/// The default key of `raw.secretRef`.
pub const DEFAULT_RAW_KEY: &str = "message.eml";

/// A ready-made RFC 5322 message (an `.eml` file), kept in a Secret of the message's namespace. A
/// Secret holds at most 1 MiB of data, so that is the largest raw message.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RawMessage {
    /// The Secret and key holding the message's bytes (CRLF or LF line endings).
    pub secret_ref: RawSecretRef,
}

/// A Secret key holding a raw message.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RawSecretRef {
    /// Name of the Secret, in the message's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in its data; default `message.eml`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[-._a-zA-Z0-9]+$')").message("raw.secretRef.key must be a Secret key: letters, digits, '-', '_' and '.'"))]
    #[schemars(length(min = 1, max = 253))]
    pub key: Option<String>,
}

impl RawSecretRef {
    /// The key, defaulted.
    pub fn key(&self) -> &str {
        self.key.as_deref().unwrap_or(DEFAULT_RAW_KEY)
    }
}

/// The Importance header.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Importance {
    /// Low.
    Low,
    /// Normal.
    #[default]
    Normal,
    /// High.
    High,
}

/// What to do with a message found in `Sending` after a crash.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum OnUncertain {
    /// Send again with the same Message-ID (at-least-once).
    #[default]
    Resend,
    /// Fail it (at-most-once).
    Fail,
}

/// Retries and their limits.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// Attempts before giving up; default 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: Option<u32>,
    /// Seconds after creation after which no attempt starts; default 3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub deadline_seconds: Option<u64>,
    /// Resend (default) or Fail a message left in Sending by a crash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_uncertain: Option<OnUncertain>,
}

impl EmailMessageSpec {
    /// `delivery.maxAttempts`, defaulted.
    pub fn max_attempts(&self) -> u32 {
        self.delivery.as_ref().and_then(|d| d.max_attempts).unwrap_or(DEFAULT_MAX_ATTEMPTS)
    }

    /// `delivery.deadlineSeconds`, defaulted.
    pub fn deadline_seconds(&self) -> u64 {
        self.delivery.as_ref().and_then(|d| d.deadline_seconds).unwrap_or(DEFAULT_DEADLINE_SECONDS)
    }

    /// `delivery.onUncertain`, defaulted.
    pub fn on_uncertain(&self) -> OnUncertain {
        self.delivery.as_ref().and_then(|d| d.on_uncertain).unwrap_or_default()
    }

    /// Whether the message is a ready-made one (`raw`).
    pub fn is_raw(&self) -> bool {
        self.raw.is_some()
    }

    /// The number of recipients in to, cc and bcc.
    pub fn recipient_count(&self) -> usize {
        self.to.len() + self.cc.len() + self.bcc.len()
    }
}

/// Where a message is in its life.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Phase {
    /// Accepted, not yet being sent (waiting, or between attempts).
    #[default]
    Pending,
    /// Claimed by the operator; an attempt is in progress.
    Sending,
    /// Accepted by the provider; the `Sent` condition's reason says how far that goes.
    Sent,
    /// Will not be sent; see the conditions.
    Failed,
}

impl Phase {
    /// Sent or Failed.
    pub fn is_finished(self) -> bool {
        matches!(self, Phase::Sent | Phase::Failed)
    }
}

impl EmailMessage {
    /// The phase in the status, if any.
    pub fn phase(&self) -> Option<Phase> {
        self.status.as_ref().and_then(|s| s.phase)
    }

    /// Whether the message is Sent or Failed.
    pub fn is_finished(&self) -> bool {
        self.phase().is_some_and(Phase::is_finished)
    }
}

/// Observed state of a message.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmailMessageStatus {
    /// Pending, Sending, Sent or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Sent, Failed and Waiting, with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Recipients in to, cc and bcc.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients: Option<u32>,
    /// Attempts started so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// When the last attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt_time: Option<Time>,
    /// When the next attempt may start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_time: Option<Time>,
    /// When the provider accepted the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_time: Option<Time>,
    /// The RFC 5322 Message-ID, stable across attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The transport used: graph, smtp-relay, smtp-password, smtp-oauth2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// The sender used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The provider's answer: the SMTP reply, or Graph's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    /// Graph's `request-id` of the accepted request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The current claim's id: the operator that wrote it recognises it after its answer was
    /// lost, and resumes or releases the claim instead of treating the message as in doubt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_id: Option<String>,
    /// The operator instance (pod) that made the current claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
    /// The idempotency key the message was sent (or found already sent) under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Attempts in a row that an operator left in `Sending` (it stopped while sending); reset by
    /// any outcome. Too many in a row fail the message, so that it cannot crash-loop the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interruptions: Option<u32>,
}

/// The Secret of the message `name` holding `data` (its large attachments, or its raw MIME),
/// labelled as mailroom's and with `label` naming the message. Its ownerReference is set once the
/// message exists ([`EmailMessage::owner_reference`]), so deleting the message deletes it.
pub fn message_secret(
    name: String,
    namespace: &str,
    label: &str,
    data: BTreeMap<String, k8s_openapi::ByteString>,
) -> k8s_openapi::api::core::v1::Secret {
    use kube::api::ObjectMeta;
    k8s_openapi::api::core::v1::Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/managed-by".to_string(), "mailroom".to_string()),
                (label.to_string(), name),
            ])),
            ..Default::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

impl EmailMessage {
    /// The reference that makes this (created) message own a Secret; none before it has a uid.
    pub fn owner_reference(&self) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
        use kube::Resource;
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: EmailMessage::api_version(&()).into_owned(),
            kind: EmailMessage::kind(&()).into_owned(),
            name: self.metadata.name.clone()?,
            uid: self.metadata.uid.clone()?,
            controller: Some(true),
            block_owner_deletion: None,
        })
    }
}
