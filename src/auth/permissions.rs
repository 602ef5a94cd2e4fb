//! Whether a profile's app may send: the two ways Microsoft 365 authorises an app, and what the
//! token and the provider's answers say about them.
//!
//! An app may be authorised in Microsoft Entra ID (an application permission with admin
//! consent: tenant-wide, and carried in the token's `roles` claim), or in Exchange Online with
//! RBAC for Applications (a management role assignment such as `Application Mail.Send`, usually
//! limited to a management scope of mailboxes). The second is Microsoft's recommended
//! least-privilege setup and it replaces Application Access Policies; its grants live in Exchange
//! Online, so the token carries no role for them
//! (<https://learn.microsoft.com/exchange/permissions-exo/application-rbac>,
//! <https://learn.microsoft.com/graph/auth-limit-mailbox-access>; for SMTP, `Application
//! SMTP.SendAsApp`: Message Center MC1158911 and
//! <https://learn.microsoft.com/exchange/client-developer/legacy-protocols/how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth>).
//! The grants are additive. So a missing role is advice, never a reason to hold messages back:
//! only the provider's answer (Graph 403, XOAUTH2 535) fails a message.

use k8s_openapi::jiff::Timestamp;

/// The Graph application role that sending needs.
pub const MAIL_SEND: &str = "Mail.Send";
/// The Exchange Online application role that SMTP XOAUTH2 needs.
pub const SMTP_SEND_AS_APP: &str = "SMTP.SendAsApp";

/// What a send told about the app's authorisation for a sender mailbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendEvidence {
    /// The provider accepted a message from this mailbox.
    Accepted {
        /// The sender mailbox.
        sender: String,
        /// When.
        at: Timestamp,
    },
    /// The provider refused the app for this mailbox.
    Denied {
        /// The sender mailbox.
        sender: String,
        /// The provider's answer, with the hint.
        reason: String,
        /// When.
        at: Timestamp,
    },
}

impl SendEvidence {
    /// Whether `self` tells more than `known` does: a change between accepted and denied, or a
    /// denial of another mailbox. Repeats of what is known are not worth a status write.
    pub fn is_news(&self, known: Option<&SendEvidence>) -> bool {
        match (known, self) {
            (None, _) => true,
            (Some(SendEvidence::Accepted { .. }), SendEvidence::Accepted { .. }) => false,
            (Some(SendEvidence::Denied { sender: a, .. }), SendEvidence::Denied { sender: b, .. }) => a != b,
            _ => true,
        }
    }
}

/// Which way the app is seen to be authorised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthorizationPath {
    /// The token carries the role: an Entra application permission, tenant-wide.
    EntraPermission,
    /// No role in the token, and the provider accepted a send: Exchange Online RBAC for Applications.
    ExchangeRbac,
    /// No role in the token and no send yet: either RBAC for Applications or no grant at all.
    Unknown,
}

/// The `PermissionsVerified` condition of a profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PermissionVerdict {
    /// The condition's status.
    pub verified: bool,
    /// The condition's reason.
    pub reason: &'static str,
    /// The condition's message.
    pub message: String,
    /// The path it sees.
    pub path: AuthorizationPath,
}

/// What the token's roles and the latest send say about the app's permission `role`.
pub fn verify_permissions(role: &str, token_roles: &[String], evidence: Option<&SendEvidence>) -> PermissionVerdict {
    let in_token = token_roles.iter().any(|r| r.eq_ignore_ascii_case(role));
    let path = match (in_token, evidence) {
        (true, _) => AuthorizationPath::EntraPermission,
        (false, Some(SendEvidence::Accepted { .. })) => AuthorizationPath::ExchangeRbac,
        (false, _) => AuthorizationPath::Unknown,
    };
    if let Some(SendEvidence::Denied { sender, reason, at }) = evidence {
        return PermissionVerdict {
            verified: false,
            reason: "SendDenied",
            message: format!("the last send as {sender} ({at}) was refused: {reason}"),
            path,
        };
    }
    let accepted = match evidence {
        Some(SendEvidence::Accepted { sender, at }) => format!("; a message from {sender} was accepted at {at}"),
        _ => String::new(),
    };
    match path {
        AuthorizationPath::EntraPermission => PermissionVerdict {
            verified: true,
            reason: "RoleInToken",
            message: format!(
                "the token carries the {role} application role (a Microsoft Entra application permission, tenant-wide){accepted}"
            ),
            path,
        },
        AuthorizationPath::ExchangeRbac => PermissionVerdict {
            verified: true,
            reason: "AuthorizedByExchange",
            message: format!(
                "the token carries no {role} role, yet Exchange Online accepted the app's messages: it is authorised through Exchange Online RBAC for Applications{accepted}"
            ),
            path,
        },
        AuthorizationPath::Unknown => PermissionVerdict {
            verified: false,
            reason: "RoleNotInToken",
            message: format!(
                "the token carries no {role} application role; messages are still sent and the provider's answer decides. This is expected when the app is authorised through Exchange Online RBAC for Applications ({}), whose grants are not in the token; otherwise {}",
                rbac_remedy(role),
                entra_remedy(role)
            ),
            path,
        },
    }
}

/// How to grant `role` in Microsoft Entra ID.
pub fn entra_remedy(role: &str) -> String {
    let api = if role == SMTP_SEND_AS_APP { "Office 365 Exchange Online" } else { "Microsoft Graph" };
    format!("add the {api} application permission {role} to the app registration and grant admin consent")
}

/// How to grant `role` with Exchange Online RBAC for Applications.
pub fn rbac_remedy(role: &str) -> String {
    format!(
        "New-ServicePrincipal with the Enterprise Application's object id, then New-ManagementRoleAssignment -Role \"Application {role}\" -CustomResourceScope <a management scope that includes the sender mailbox>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> Timestamp {
        Timestamp::from_second(1_800_000_000).expect("time")
    }

    fn roles(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_role_in_the_token_is_the_entra_path() {
        let v = verify_permissions(MAIL_SEND, &roles(&["mail.send"]), None);
        assert!(v.verified);
        assert_eq!((v.reason, v.path), ("RoleInToken", AuthorizationPath::EntraPermission));
    }

    #[test]
    fn no_role_is_advice_naming_both_remedies() {
        let v = verify_permissions(MAIL_SEND, &[], None);
        assert!(!v.verified);
        assert_eq!((v.reason, v.path), ("RoleNotInToken", AuthorizationPath::Unknown));
        assert!(v.message.contains("Application Mail.Send") && v.message.contains("management scope"), "{}", v.message);
        assert!(v.message.contains("admin consent") && v.message.contains("Microsoft Graph"), "{}", v.message);
        assert!(v.message.contains("still sent"), "{}", v.message);
        let smtp = verify_permissions(SMTP_SEND_AS_APP, &roles(&["Mail.Send"]), None);
        assert!(
            smtp.message.contains("Office 365 Exchange Online") && smtp.message.contains("Application SMTP.SendAsApp")
        );
    }

    #[test]
    fn an_accepted_send_without_a_role_is_exchange_rbac() {
        let ok = SendEvidence::Accepted { sender: "alerts@contoso.com".into(), at: at() };
        let v = verify_permissions(MAIL_SEND, &[], Some(&ok));
        assert!(v.verified);
        assert_eq!((v.reason, v.path), ("AuthorizedByExchange", AuthorizationPath::ExchangeRbac));
        assert!(v.message.contains("alerts@contoso.com"), "{}", v.message);
    }

    #[test]
    fn a_denial_is_shown_whatever_the_token_says() {
        let denied = SendEvidence::Denied {
            sender: "ceo@contoso.com".into(),
            reason: "Graph 403 ErrorAccessDenied: Access is denied.".into(),
            at: at(),
        };
        for r in [roles(&["Mail.Send"]), vec![]] {
            let v = verify_permissions(MAIL_SEND, &r, Some(&denied));
            assert!(!v.verified);
            assert_eq!(v.reason, "SendDenied");
            assert!(v.message.contains("ceo@contoso.com") && v.message.contains("ErrorAccessDenied"), "{}", v.message);
        }
    }

    #[test]
    fn only_changes_are_news() {
        let ok = |s: &str| SendEvidence::Accepted { sender: s.into(), at: at() };
        let no = |s: &str| SendEvidence::Denied { sender: s.into(), reason: "403".into(), at: at() };
        assert!(ok("a@x").is_news(None));
        assert!(!ok("b@x").is_news(Some(&ok("a@x"))));
        assert!(no("a@x").is_news(Some(&ok("a@x"))));
        assert!(!no("a@x").is_news(Some(&no("a@x"))));
        assert!(no("b@x").is_news(Some(&no("a@x"))));
        assert!(ok("a@x").is_news(Some(&no("a@x"))));
    }
}
