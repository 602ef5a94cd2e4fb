//! Who may send what through which profile.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};

use crate::api::Senders;
use crate::api::message::MAX_RECIPIENTS;

/// A policy violation, in words a person can act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The sender is not among the profile's allowed senders.
    #[error("sender {sender} is not allowed by profile {profile} (allowed: {allowed})")]
    SenderNotAllowed {
        /// The sender asked for.
        sender: String,
        /// The profile.
        profile: String,
        /// What the profile allows.
        allowed: String,
    },
    /// A recipient's domain is not in `recipientDomains`.
    #[error("recipient {recipient} is not in the recipient domains of profile {profile} ({domains})")]
    RecipientDomainNotAllowed {
        /// The recipient.
        recipient: String,
        /// The profile.
        profile: String,
        /// What the profile allows.
        domains: String,
    },
    /// More recipients than Exchange Online takes in one message.
    #[error(
        "the message has {count} recipients in to, cc and bcc together; Exchange Online accepts at most {limit} per message"
    )]
    TooManyRecipients {
        /// Recipients in to, cc and bcc.
        count: usize,
        /// The most allowed.
        limit: usize,
    },
    /// A ClusterMailProfile's `allowedNamespaces` does not admit the namespace.
    #[error("namespace {namespace} is not admitted by ClusterMailProfile {profile} (allowedNamespaces)")]
    NamespaceNotAdmitted {
        /// The message's namespace.
        namespace: String,
        /// The profile.
        profile: String,
    },
    /// The selector itself is invalid.
    #[error("ClusterMailProfile {profile} has an invalid allowedNamespaces selector: {reason}")]
    InvalidSelector {
        /// The profile.
        profile: String,
        /// What is wrong.
        reason: String,
    },
}

/// The addresses or `*@domain` patterns that may send, defaulting to the default sender alone.
pub fn allowed_senders(senders: &Senders) -> Vec<String> {
    match &senders.allowed {
        Some(list) if !list.is_empty() => {
            let mut all = list.clone();
            if !all.iter().any(|a| a.eq_ignore_ascii_case(&senders.default)) {
                all.push(senders.default.clone());
            }
            all
        }
        _ => vec![senders.default.clone()],
    }
}

/// Whether `address` (a bare `user@domain`) matches an allowed entry: the same address, or
/// `*@domain`. Comparison ignores ASCII case.
pub fn sender_matches(allowed: &str, address: &str) -> bool {
    let allowed = allowed.trim();
    match allowed.strip_prefix("*@") {
        Some(domain) => {
            address.rsplit_once('@').is_some_and(|(local, d)| !local.is_empty() && d.eq_ignore_ascii_case(domain))
        }
        None => allowed.eq_ignore_ascii_case(address),
    }
}

/// Checks the sender against the profile.
pub fn check_sender(profile: &str, senders: &Senders, address: &str) -> Result<(), PolicyError> {
    let allowed = allowed_senders(senders);
    if allowed.iter().any(|a| sender_matches(a, address)) {
        Ok(())
    } else {
        Err(PolicyError::SenderNotAllowed {
            sender: address.to_string(),
            profile: profile.to_string(),
            allowed: allowed.join(", "),
        })
    }
}

/// Whether `domain` is one of `allowed` or a subdomain of one (ASCII case ignored).
pub fn domain_allowed(allowed: &[String], domain: &str) -> bool {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    allowed.iter().any(|a| {
        let a = a.trim().trim_start_matches("*.").trim_end_matches('.').to_ascii_lowercase();
        domain == a || domain.ends_with(&format!(".{a}"))
    })
}

/// Checks every recipient (bare addresses) against `recipientDomains`, when set.
pub fn check_recipients<'a>(
    profile: &str,
    recipient_domains: Option<&[String]>,
    recipients: impl IntoIterator<Item = &'a str>,
) -> Result<(), PolicyError> {
    let Some(domains) = recipient_domains.filter(|d| !d.is_empty()) else {
        return Ok(());
    };
    for recipient in recipients {
        let domain = recipient.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        if !domain_allowed(domains, domain) {
            return Err(PolicyError::RecipientDomainNotAllowed {
                recipient: recipient.to_string(),
                profile: profile.to_string(),
                domains: domains.join(", "),
            });
        }
    }
    Ok(())
}

/// Checks the number of recipients in to, cc and bcc against [`MAX_RECIPIENTS`], Exchange
/// Online's recipient limit: "the maximum number of recipients allowed in the To:, Cc:, and Bcc:
/// fields for a single email message", 500
/// (https://learn.microsoft.com/office365/servicedescriptions/exchange-online-service-description/exchange-online-limits#sending-limits).
/// The CRD refuses more at apply; this holds when the schema did not run.
pub fn check_recipient_count(count: usize) -> Result<(), PolicyError> {
    if count > MAX_RECIPIENTS {
        return Err(PolicyError::TooManyRecipients { count, limit: MAX_RECIPIENTS });
    }
    Ok(())
}

/// Whether a ClusterMailProfile's `allowedNamespaces` admits a namespace with these labels.
/// An absent selector admits none; an empty one (`{}`) admits all.
pub fn check_namespace(
    profile: &str,
    selector: Option<&LabelSelector>,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), PolicyError> {
    let denied =
        || PolicyError::NamespaceNotAdmitted { namespace: namespace.to_string(), profile: profile.to_string() };
    let Some(selector) = selector else {
        return Err(denied());
    };
    let selector = Selector::try_from(selector.clone())
        .map_err(|e| PolicyError::InvalidSelector { profile: profile.to_string(), reason: e.to_string() })?;
    let mut labels = labels.clone();
    // Every namespace carries its name as a label; selecting by name is the common case.
    labels.insert("kubernetes.io/metadata.name".to_string(), namespace.to_string());
    if selector.matches(&labels) { Ok(()) } else { Err(denied()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn senders(default: &str, allowed: Option<&[&str]>) -> Senders {
        Senders { default: default.to_string(), allowed: allowed.map(|a| a.iter().map(|s| s.to_string()).collect()) }
    }

    #[test]
    fn default_sender_alone_when_no_allow_list() {
        let s = senders("alerts@contoso.com", None);
        assert!(check_sender("p", &s, "alerts@contoso.com").is_ok());
        assert!(check_sender("p", &s, "ALERTS@contoso.com").is_ok());
        let err = check_sender("p", &s, "ceo@contoso.com").unwrap_err();
        assert_eq!(err.to_string(), "sender ceo@contoso.com is not allowed by profile p (allowed: alerts@contoso.com)");
    }

    #[test]
    fn wildcard_domain_matches_only_that_domain() {
        let s = senders("alerts@contoso.com", Some(&["*@noreply.contoso.com"]));
        assert!(check_sender("p", &s, "build@noreply.contoso.com").is_ok());
        assert!(check_sender("p", &s, "alerts@contoso.com").is_ok(), "default stays allowed");
        assert!(check_sender("p", &s, "x@evil.noreply.contoso.com").is_err());
        assert!(check_sender("p", &s, "@noreply.contoso.com").is_err());
        assert!(check_sender("p", &s, "x@contoso.com").is_err());
    }

    #[test]
    fn recipient_domains_allow_subdomains_only() {
        let d = vec!["contoso.com".to_string()];
        assert!(check_recipients("p", Some(&d), ["a@contoso.com", "b@eu.contoso.com"]).is_ok());
        let err = check_recipients("p", Some(&d), ["a@contoso.com", "b@notcontoso.com"]).unwrap_err();
        assert!(err.to_string().contains("b@notcontoso.com"));
        assert!(check_recipients("p", None, ["x@anything.org"]).is_ok());
        assert!(check_recipients("p", Some(&[]), ["x@anything.org"]).is_ok());
    }

    #[test]
    fn at_most_500_recipients() {
        assert!(check_recipient_count(1).is_ok());
        assert!(check_recipient_count(MAX_RECIPIENTS).is_ok());
        let err = check_recipient_count(MAX_RECIPIENTS + 1).unwrap_err();
        assert_eq!(err, PolicyError::TooManyRecipients { count: 501, limit: 500 });
        assert_eq!(
            err.to_string(),
            "the message has 501 recipients in to, cc and bcc together; Exchange Online accepts at most 500 per message"
        );
    }

    #[test]
    fn namespace_selector() {
        let mut labels = BTreeMap::new();
        labels.insert("mail".to_string(), "allowed".to_string());
        let sel = LabelSelector {
            match_labels: Some([("mail".to_string(), "allowed".to_string())].into()),
            ..Default::default()
        };
        assert!(check_namespace("c", Some(&sel), "team-a", &labels).is_ok());
        assert!(check_namespace("c", Some(&sel), "team-b", &BTreeMap::new()).is_err());
        assert!(check_namespace("c", None, "team-a", &labels).is_err(), "absent admits none");
        assert!(check_namespace("c", Some(&LabelSelector::default()), "x", &BTreeMap::new()).is_ok());
        let by_name = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "kubernetes.io/metadata.name".to_string(),
                operator: "In".to_string(),
                values: Some(vec!["team-a".to_string()]),
            }]),
            ..Default::default()
        };
        assert!(check_namespace("c", Some(&by_name), "team-a", &BTreeMap::new()).is_ok());
        assert!(check_namespace("c", Some(&by_name), "team-b", &BTreeMap::new()).is_err());
    }
}
