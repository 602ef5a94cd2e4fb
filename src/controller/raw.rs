//! Raw messages (`spec.raw`) in the reconcile: the Secret read before the claim (a missing one
//! waits, as a missing attachment source does), the message checked, the profile's policy applied
//! to what its header fields say, and its envelope derived. Only [`load`] does I/O.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use super::outgoing;
use super::reason::Reason;
use super::registry::ResolvedProfile;
use crate::api::{EmailMessageSpec, RawMessage};
use crate::delivery::policy;
use crate::transport::raw::{self, ParsedRaw, RawError};
use crate::transport::{Address, RawOutgoing, parse_mailbox};

/// Why a raw message cannot go now: it waits (its Secret or key is missing), or fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawProblem {
    /// Whether the Secret may appear later.
    pub waits: bool,
    /// The condition's reason.
    pub reason: Reason,
    /// Why, in words: never the message's content.
    pub text: String,
}

impl RawProblem {
    fn fails(reason: Reason, text: impl Into<String>) -> Self {
        RawProblem { waits: false, reason, text: text.into() }
    }

    fn invalid(e: &RawError) -> Self {
        Self::fails(Reason::InvalidRawMessage, format!("raw message: {e}"))
    }
}

/// Reads the raw message's bytes from its Secret (a GET by name, as for attachments).
pub async fn load(
    client: &Client,
    namespace: &str,
    raw: &RawMessage,
) -> Result<Result<Vec<u8>, RawProblem>, kube::Error> {
    let r = &raw.secret_ref;
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let Some(secret) = api.get_opt(&r.name).await? else {
        return Ok(Err(not_found(format!("Secret {} not found in namespace {namespace}", r.name))));
    };
    // The API server returns `data` only; `stringData` is write-only.
    match secret.data.and_then(|mut d| d.remove(r.key())) {
        Some(v) => Ok(Ok(v.0)),
        None => Ok(Err(not_found(format!("key {} not found in Secret {}", r.key(), r.name)))),
    }
}

fn not_found(what: String) -> RawProblem {
    RawProblem {
        waits: true,
        reason: Reason::RawMessageNotFound,
        text: format!("raw message: {what}; the message is sent when it exists"),
    }
}

/// Everything a raw message must pass before it is claimed: it parses, its From (and Sender)
/// are senders the profile allows, its envelope recipients are within the profile's
/// `recipientDomains` and number at most 500, and Graph can deliver to exactly them. `from` is
/// the envelope sender (already checked against the profile); `message_id` is used when the
/// message has none.
pub fn prepare(
    bytes: &[u8],
    spec: &EmailMessageSpec,
    from: &Address,
    message_id: impl FnOnce() -> String,
    profile: &ResolvedProfile,
) -> Result<RawOutgoing, RawProblem> {
    let parsed = raw::parse(bytes).map_err(|e| RawProblem::invalid(&e))?;
    check_header_senders(&parsed, profile)?;
    let mut envelope = Vec::new();
    for (field, list) in [("to", &spec.to), ("cc", &spec.cc), ("bcc", &spec.bcc)] {
        for a in list {
            let m = parse_mailbox(a).map_err(|e| {
                let e = outgoing::BuildError::Address { field, reason: e.to_string() };
                RawProblem::fails(e.reason(), e.to_string())
            })?;
            envelope.push(m);
        }
    }
    let id = parsed.message_id.clone().unwrap_or_else(message_id);
    let graph = profile.settings.graph.is_some();
    let out = raw::prepare(parsed, from.clone(), envelope, id, graph).map_err(|e| RawProblem::invalid(&e))?;
    let name = profile.key.to_string();
    policy::check_recipient_count(out.recipients.len())
        .map_err(|e| RawProblem::fails(Reason::TooManyRecipients, e.to_string()))?;
    policy::check_recipients(
        &name,
        profile.settings.recipient_domains.as_deref(),
        out.recipients.iter().map(|r| r.email.as_str()),
    )
    .map_err(|e| RawProblem::fails(Reason::RecipientDomainNotAllowed, e.to_string()))?;
    Ok(out)
}

/// The profile's sender policy on the message's own From (every mailbox) and Sender: a raw
/// message must not claim a sender that `from` could not.
fn check_header_senders(parsed: &ParsedRaw, profile: &ResolvedProfile) -> Result<(), RawProblem> {
    let name = profile.key.to_string();
    let named = parsed.from.iter().map(|a| ("From", a)).chain(parsed.sender.iter().map(|a| ("Sender", a)));
    for (field, a) in named {
        policy::check_sender(&name, &profile.settings.senders, &a.email)
            .map_err(|e| RawProblem::fails(Reason::SenderNotAllowed, format!("the message's {field}: field: {e}")))?;
    }
    Ok(())
}

/// The fields a raw message leaves out, checked again on the whole object (the CRD refuses them at
/// apply; the cache's copy has no subject, body or headers).
pub fn check_exclusive(spec: &EmailMessageSpec) -> Result<(), RawProblem> {
    let set = [
        ("subject", !spec.subject.is_empty()),
        ("body", !spec.body.is_empty()),
        ("templateRef", spec.template_ref.is_some()),
        ("values", spec.values.is_some()),
        ("attachments", !spec.attachments.is_empty()),
        ("headers", !spec.headers.is_empty()),
        ("replyTo", !spec.reply_to.is_empty()),
        ("importance", spec.importance.is_some()),
    ];
    let given: Vec<&str> = set.iter().filter(|(_, on)| *on).map(|(name, _)| *name).collect();
    if given.is_empty() {
        return Ok(());
    }
    Err(RawProblem::fails(
        Reason::InvalidRawMessage,
        format!("raw is the whole message; leave out {}", given.join(", ")),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::registry::{NotReady, ProfileKey};

    fn profile(graph: bool, domains: Option<Vec<&str>>) -> ResolvedProfile {
        let transport = if graph {
            "graph: {tenantId: t, clientId: c, clientSecretRef: {name: s, key: k}}"
        } else {
            "smtp: {host: relay.contoso.com, port: 25}"
        };
        let mut settings: crate::api::MailProfileSpec = serde_yaml::from_str(&format!(
            "senders: {{default: alerts@contoso.com, allowed: ['*@noreply.contoso.com']}}\n{transport}\n"
        ))
        .unwrap();
        settings.recipient_domains = domains.map(|d| d.into_iter().map(String::from).collect());
        ResolvedProfile {
            key: ProfileKey::Namespaced { namespace: "team-a".into(), name: "p".into() },
            settings,
            allowed_namespaces: None,
            state: Err(NotReady { reason: "Test".into(), message: String::new() }),
            tokens: None,
            fingerprint: 0,
        }
    }

    fn spec(extra: &str) -> EmailMessageSpec {
        serde_yaml::from_str(&format!("profileRef: {{name: p}}\nraw: {{secretRef: {{name: eml}}}}\n{extra}")).unwrap()
    }

    const MSG: &[u8] = b"From: Build <build@noreply.contoso.com>\r\nTo: ops@contoso.com\r\nBcc: audit@fabrikam.com\r\nSubject: s\r\n\r\nbody\r\n";

    fn from() -> Address {
        parse_mailbox("alerts@contoso.com").unwrap()
    }

    #[test]
    fn the_secret_key_defaults_to_message_eml() {
        assert_eq!(spec("").raw.unwrap().secret_ref.key(), "message.eml");
    }

    #[test]
    fn a_valid_message_is_prepared_with_the_assigned_message_id() {
        let out =
            prepare(MSG, &spec(""), &from(), || "<uid.mailroom@contoso.com>".into(), &profile(false, None)).unwrap();
        assert_eq!(out.message_id, "<uid.mailroom@contoso.com>");
        assert_eq!(out.recipients.len(), 2);
        assert_eq!(out.envelope_from.email, "alerts@contoso.com");
    }

    #[test]
    fn the_sender_policy_applies_to_the_from_and_sender_fields() {
        let bad = b"From: ceo@contoso.com\r\nTo: ops@contoso.com\r\n\r\nx\r\n";
        let e = prepare(bad, &spec(""), &from(), || "<i@x>".into(), &profile(false, None)).unwrap_err();
        assert_eq!(e.reason, Reason::SenderNotAllowed);
        assert!(!e.waits);
        assert!(e.text.contains("From: field") && e.text.contains("ceo@contoso.com"), "{}", e.text);
        let sender = b"From: alerts@contoso.com\r\nSender: x@evil.example\r\nTo: ops@contoso.com\r\n\r\nx\r\n";
        let e = prepare(sender, &spec(""), &from(), || "<i@x>".into(), &profile(false, None)).unwrap_err();
        assert_eq!(e.reason, Reason::SenderNotAllowed);
        assert!(e.text.contains("Sender: field"), "{}", e.text);
    }

    #[test]
    fn recipient_domains_apply_to_every_envelope_recipient() {
        // The Bcc of the header fields is an envelope recipient when the spec names none.
        let e = prepare(MSG, &spec(""), &from(), || "<i@x>".into(), &profile(false, Some(vec!["contoso.com"])))
            .unwrap_err();
        assert_eq!(e.reason, Reason::RecipientDomainNotAllowed);
        assert!(e.text.contains("audit@fabrikam.com"), "{}", e.text);
        // With the spec's recipients, the header fields' do not count.
        let s = spec("to: [ops@contoso.com]");
        assert!(prepare(MSG, &s, &from(), || "<i@x>".into(), &profile(false, Some(vec!["contoso.com"]))).is_ok());
        let s = spec("bcc: [x@fabrikam.com]\nto: [ops@contoso.com]");
        let e = prepare(MSG, &s, &from(), || "<i@x>".into(), &profile(false, Some(vec!["contoso.com"]))).unwrap_err();
        assert_eq!(e.reason, Reason::RecipientDomainNotAllowed);
    }

    #[test]
    fn invalid_messages_fail_with_invalid_raw_message() {
        let e = prepare(b"no header here", &spec(""), &from(), || "<i@x>".into(), &profile(false, None)).unwrap_err();
        assert_eq!(e.reason, Reason::InvalidRawMessage);
        assert!(!e.waits);
        assert!(e.text.starts_with("raw message: "), "{}", e.text);
        // Over Graph a To: recipient outside the spec's envelope cannot be left out.
        let s = spec("to: [other@contoso.com]");
        let e = prepare(MSG, &s, &from(), || "<i@x>".into(), &profile(true, None)).unwrap_err();
        assert_eq!(e.reason, Reason::InvalidRawMessage);
        assert!(prepare(MSG, &s, &from(), || "<i@x>".into(), &profile(false, None)).is_ok());
    }

    #[test]
    fn raw_excludes_the_fields_of_a_built_message() {
        assert!(check_exclusive(&spec("")).is_ok());
        let e = check_exclusive(&spec("subject: hi\nheaders: {X-A: b}\nimportance: high")).unwrap_err();
        assert_eq!(e.reason, Reason::InvalidRawMessage);
        assert!(e.text.ends_with("leave out subject, headers, importance"), "{}", e.text);
    }
}
