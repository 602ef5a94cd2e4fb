//! Why a message is where it is: every `reason` its conditions and Events carry, in one enum, so
//! that the set a person (or an alert) can see is written down once.

use std::fmt;

/// A CamelCase reason of a message's conditions and Events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    // Waiting for something outside the message.
    /// Its profile does not exist (yet).
    ProfileNotFound,
    /// Its profile exists and is not ready.
    ProfileNotReady,
    /// A Secret or ConfigMap (or its key) an attachment names does not exist (yet).
    AttachmentNotFound,
    /// The Secret (or its key) that `raw` names does not exist (yet).
    RawMessageNotFound,

    // Failed for its own problem, before any attempt.
    /// `delivery.deadlineSeconds` passed before it could be sent.
    DeadlineExceeded,
    /// A ClusterMailProfile that does not admit the message's namespace.
    NamespaceNotAdmitted,
    /// The sender is not one the profile allows.
    SenderNotAllowed,
    /// More recipients than a message may have.
    TooManyRecipients,
    /// A recipient outside the profile's `recipientDomains`.
    RecipientDomainNotAllowed,
    /// An address that does not parse.
    InvalidAddress,
    /// A header name or value that cannot be sent.
    InvalidHeader,
    /// A subject with a line break or too long.
    InvalidSubject,
    /// An attachment with a bad name, content type or inline data.
    InvalidAttachment,
    /// Larger than the transport accepts.
    MessageTooLarge,
    /// A raw message that is not an RFC 5322 message mailroom can send.
    InvalidRawMessage,
    /// The EmailTemplate it names does not exist.
    TemplateNotFound,
    /// Its template did not render.
    TemplateError,
    /// The template and the message both set what only one may.
    TemplateConflict,
    /// Neither the message nor its template has a body.
    MissingBody,

    // The attempts.
    /// Claimed: an attempt is in progress.
    Sending,
    /// The `Waiting` condition's reason once a message is claimed.
    Claimed,
    /// The provider took the message (the Event; the condition says how far).
    Sent,
    /// Graph accepted the message for delivery (202).
    Accepted,
    /// The SMTP server took responsibility for delivering it.
    Delivered,
    /// The SMTP server accepted some recipients and refused others.
    PartiallyDelivered,
    /// An attempt failed transiently; another is scheduled.
    RetryScheduled,
    /// The provider refused the message for good.
    SendFailed,
    /// The Event of a message that failed for good.
    Failed,
    /// No attempt is left (`delivery.maxAttempts` or the deadline).
    RetriesExhausted,
    /// Found in doubt, and `delivery.onUncertain` is Fail.
    DeliveryUncertain,
    /// Found in doubt too many times in a row: it is not sent again.
    RepeatedlyInterrupted,
    /// Found in doubt, and sent again with the same Message-ID (an Event).
    ResendingInDoubt,

    // Idempotency keys.
    /// Not sent: a message with the same idempotency key was sent within its retention.
    AlreadySent,
    /// Waiting: another message holds the idempotency key and is being sent.
    KeyReserved,
    /// A GitOps-managed message with a TTL and no idempotency key: it is re-created and sent again
    /// after every TTL (the condition and the Warning Event).
    RecreationRisk,
    /// The reason of the `RecreationRisk` condition.
    TTLWithoutIdempotencyKey,
}

impl Reason {
    /// The reason as conditions and Events spell it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::ProfileNotFound => "ProfileNotFound",
            Reason::ProfileNotReady => "ProfileNotReady",
            Reason::AttachmentNotFound => "AttachmentNotFound",
            Reason::RawMessageNotFound => "RawMessageNotFound",
            Reason::DeadlineExceeded => "DeadlineExceeded",
            Reason::NamespaceNotAdmitted => "NamespaceNotAdmitted",
            Reason::SenderNotAllowed => "SenderNotAllowed",
            Reason::TooManyRecipients => "TooManyRecipients",
            Reason::RecipientDomainNotAllowed => "RecipientDomainNotAllowed",
            Reason::InvalidAddress => "InvalidAddress",
            Reason::InvalidHeader => "InvalidHeader",
            Reason::InvalidSubject => "InvalidSubject",
            Reason::InvalidAttachment => "InvalidAttachment",
            Reason::MessageTooLarge => "MessageTooLarge",
            Reason::InvalidRawMessage => "InvalidRawMessage",
            Reason::TemplateNotFound => "TemplateNotFound",
            Reason::TemplateError => "TemplateError",
            Reason::TemplateConflict => "TemplateConflict",
            Reason::MissingBody => "MissingBody",
            Reason::Sending => "Sending",
            Reason::Claimed => "Claimed",
            Reason::Sent => "Sent",
            Reason::Accepted => "Accepted",
            Reason::Delivered => "Delivered",
            Reason::PartiallyDelivered => "PartiallyDelivered",
            Reason::RetryScheduled => "RetryScheduled",
            Reason::SendFailed => "SendFailed",
            Reason::Failed => "Failed",
            Reason::RetriesExhausted => "RetriesExhausted",
            Reason::DeliveryUncertain => "DeliveryUncertain",
            Reason::RepeatedlyInterrupted => "RepeatedlyInterrupted",
            Reason::ResendingInDoubt => "ResendingInDoubt",
            Reason::AlreadySent => "AlreadySent",
            Reason::KeyReserved => "KeyReserved",
            Reason::RecreationRisk => "RecreationRisk",
            Reason::TTLWithoutIdempotencyKey => "TTLWithoutIdempotencyKey",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_camel_case_words() {
        for r in [Reason::ProfileNotFound, Reason::RepeatedlyInterrupted, Reason::Sent, Reason::InvalidAttachment] {
            let s = r.as_str();
            assert!(s.chars().next().is_some_and(|c| c.is_ascii_uppercase()), "{s}");
            assert!(s.chars().all(|c| c.is_ascii_alphanumeric()), "{s}");
            assert_eq!(format!("{r}"), s);
            assert_eq!(format!("{r:?}"), s, "the variant is named as it is spelled");
        }
    }
}
