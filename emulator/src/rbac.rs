//! Exchange Online RBAC for Applications: role assignments made in Exchange, not in Entra.
//!
//! The admin points Exchange at the app's service principal (`New-ServicePrincipal -AppId
//! <client id> -ObjectId <object id of the Enterprise Application>`), optionally defines a
//! management scope (`New-ManagementScope -RecipientRestrictionFilter …`), then assigns an
//! application role (`New-ManagementRoleAssignment -App <sp> -Role "Application Mail.Send"
//! -CustomResourceScope <scope>`). These grants are independent of, and additive to, the
//! tenant-wide permissions consented in Entra; they never appear in the token's `roles`:
//! Exchange matches the token's `tid`/`oid` against its assignments on every request.
//! An assignment made with the app registration's object id (instead of the service
//! principal's) therefore matches no token, which is the usual reason a correctly scoped app
//! still gets `ErrorAccessDenied`.
//!
//! Sources:
//! - <https://learn.microsoft.com/en-us/exchange/permissions-exo/application-rbac>
//! - <https://learn.microsoft.com/graph/auth-limit-mailbox-access>
//! - SMTP AUTH with `SMTP.SendAsApp` granted through RBAC for Applications (Message Center
//!   MC1158911):
//!   <https://learn.microsoft.com/en-us/exchange/client-developer/legacy-protocols/how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth>

use serde::{Deserialize, Serialize};

/// The application roles the emulator models (Exchange has more; these are the ones mail
/// sending needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ApplicationRole {
    /// `Application Mail.Send`: Graph sendMail and draft send.
    #[serde(rename = "Application Mail.Send")]
    MailSend,
    /// `Application Mail.ReadWrite`: drafts, attachments, upload sessions.
    #[serde(rename = "Application Mail.ReadWrite")]
    MailReadWrite,
    /// `Application SMTP.SendAsApp`: SMTP AUTH XOAUTH2 with an app-only token.
    #[serde(rename = "Application SMTP.SendAsApp")]
    SmtpSendAsApp,
}

impl ApplicationRole {
    /// Every modelled role.
    pub const ALL: [ApplicationRole; 3] = [Self::MailSend, Self::MailReadWrite, Self::SmtpSendAsApp];

    /// The Exchange role name, e.g. `Application Mail.Send`.
    pub fn name(self) -> &'static str {
        match self {
            Self::MailSend => "Application Mail.Send",
            Self::MailReadWrite => "Application Mail.ReadWrite",
            Self::SmtpSendAsApp => "Application SMTP.SendAsApp",
        }
    }

    /// The permission it grants, named as in a token's `roles` (e.g. `Mail.Send`).
    pub fn permission(self) -> &'static str {
        match self {
            Self::MailSend => "Mail.Send",
            Self::MailReadWrite => "Mail.ReadWrite",
            Self::SmtpSendAsApp => "SMTP.SendAsApp",
        }
    }

    /// The role of that name; Exchange role names ignore case.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name().eq_ignore_ascii_case(name.trim()))
    }
}

/// What `POST /_emulator/role-assignments` accepts.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoleAssignmentSpec {
    /// The tenant of the service principal.
    pub tenant_id: String,
    /// The object id given to `New-ServicePrincipal -ObjectId`: it must be the service
    /// principal's (the token's `oid`) to ever match.
    pub service_principal_object_id: String,
    /// An application role name, e.g. `Application Mail.Send`.
    pub role: String,
    /// The management scope's mailboxes; absent or null for an organization-wide assignment.
    #[serde(default)]
    pub mailboxes: Option<Vec<String>>,
}

/// Why a role assignment was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleAssignmentError {
    /// tenantId or servicePrincipalObjectId empty.
    #[error("tenantId and servicePrincipalObjectId must not be empty")]
    MissingId,
    /// The role is none of the modelled application roles.
    #[error(
        "unknown role '{0}': expected Application Mail.Send, Application Mail.ReadWrite or Application SMTP.SendAsApp"
    )]
    UnknownRole(String),
    /// A scope entry is empty.
    #[error("mailboxes[{0}] is empty")]
    EmptyMailbox(usize),
}

/// One role assignment, as stored and listed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RoleAssignment {
    /// An id for the assignment.
    pub id: String,
    /// Tenant, lower case.
    pub tenant_id: String,
    /// Service principal object id, lower case.
    pub service_principal_object_id: String,
    /// The role.
    pub role: ApplicationRole,
    /// The scope's mailboxes (lower case); `None` for the whole organization.
    pub mailboxes: Option<Vec<String>>,
}

impl RoleAssignment {
    /// Validates a spec and gives the assignment a fresh id.
    pub fn from_spec(spec: RoleAssignmentSpec) -> Result<Self, RoleAssignmentError> {
        let tenant_id = spec.tenant_id.trim().to_ascii_lowercase();
        let service_principal_object_id = spec.service_principal_object_id.trim().to_ascii_lowercase();
        if tenant_id.is_empty() || service_principal_object_id.is_empty() {
            return Err(RoleAssignmentError::MissingId);
        }
        let role = ApplicationRole::from_name(&spec.role).ok_or(RoleAssignmentError::UnknownRole(spec.role))?;
        let mailboxes = spec.mailboxes.map(normalise_mailboxes).transpose()?;
        Ok(Self { id: uuid::Uuid::new_v4().to_string(), tenant_id, service_principal_object_id, role, mailboxes })
    }

    /// Whether this assignment grants `permission` on `mailbox` to the service principal
    /// `oid` of tenant `tid`.
    pub fn grants(&self, tid: &str, oid: &str, permission: &str, mailbox: &str) -> bool {
        self.tenant_id.eq_ignore_ascii_case(tid)
            && self.service_principal_object_id.eq_ignore_ascii_case(oid)
            && self.role.permission().eq_ignore_ascii_case(permission)
            && self.covers(mailbox)
    }

    /// Whether the assignment's scope includes `mailbox`. A scope's filter is evaluated
    /// against the recipient; the emulator knows recipients by address only, so a mailbox
    /// named by object id is covered by an organization-wide assignment alone.
    fn covers(&self, mailbox: &str) -> bool {
        match &self.mailboxes {
            None => true,
            Some(scope) => mailbox.contains('@') && scope.iter().any(|m| m.eq_ignore_ascii_case(mailbox.trim())),
        }
    }
}

fn normalise_mailboxes(list: Vec<String>) -> Result<Vec<String>, RoleAssignmentError> {
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let m = m.trim().to_ascii_lowercase();
            if m.is_empty() { Err(RoleAssignmentError::EmptyMailbox(i)) } else { Ok(m) }
        })
        .collect()
}

/// Whether any of `assignments` grants `permission` on `mailbox` to (`tid`, `oid`).
pub fn any_grants(assignments: &[RoleAssignment], tid: &str, oid: &str, permission: &str, mailbox: &str) -> bool {
    assignments.iter().any(|a| a.grants(tid, oid, permission, mailbox))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(role: &str, mailboxes: Option<Vec<&str>>) -> Result<RoleAssignment, RoleAssignmentError> {
        RoleAssignment::from_spec(RoleAssignmentSpec {
            tenant_id: "T1".into(),
            service_principal_object_id: "SP-1".into(),
            role: role.into(),
            mailboxes: mailboxes.map(|l| l.into_iter().map(String::from).collect()),
        })
    }

    #[test]
    fn an_organization_wide_assignment_covers_every_mailbox_of_its_principal() {
        let a = assignment("Application Mail.Send", None).expect("assignment");
        assert!(a.grants("t1", "sp-1", "Mail.Send", "anyone@contoso.com"));
        assert!(a.grants("t1", "sp-1", "mail.send", "11111111-1111-1111-1111-111111111111"));
        assert!(!a.grants("t1", "sp-1", "Mail.ReadWrite", "anyone@contoso.com"));
        assert!(!a.grants("t1", "other-sp", "Mail.Send", "anyone@contoso.com"));
        assert!(!a.grants("t2", "sp-1", "Mail.Send", "anyone@contoso.com"));
    }

    #[test]
    fn a_scoped_assignment_covers_its_mailboxes_only() {
        let a = assignment("application smtp.sendasapp", Some(vec![" Alerts@Contoso.com "])).expect("assignment");
        assert_eq!(a.role, ApplicationRole::SmtpSendAsApp);
        assert_eq!(a.mailboxes, Some(vec!["alerts@contoso.com".to_string()]));
        assert!(a.grants("t1", "sp-1", "SMTP.SendAsApp", "ALERTS@contoso.com"));
        assert!(!a.grants("t1", "sp-1", "SMTP.SendAsApp", "ceo@contoso.com"));
        // A scope never matches a mailbox named by object id.
        assert!(!a.grants("t1", "sp-1", "SMTP.SendAsApp", "11111111-1111-1111-1111-111111111111"));
    }

    #[test]
    fn bad_specs_are_refused() {
        assert_eq!(assignment("Mail.Send", None).err(), Some(RoleAssignmentError::UnknownRole("Mail.Send".into())));
        assert_eq!(
            assignment("Application Mail.Send", Some(vec!["a@b.c", " "])).err(),
            Some(RoleAssignmentError::EmptyMailbox(1))
        );
        let missing = RoleAssignment::from_spec(RoleAssignmentSpec {
            tenant_id: "t".into(),
            service_principal_object_id: " ".into(),
            role: "Application Mail.Send".into(),
            mailboxes: None,
        });
        assert_eq!(missing.err(), Some(RoleAssignmentError::MissingId));
    }

    #[test]
    fn roles_serialise_as_exchange_names() {
        let a = assignment("Application Mail.ReadWrite", None).expect("assignment");
        let json = serde_json::to_value(&a).expect("json");
        assert_eq!(json["role"], "Application Mail.ReadWrite");
        assert_eq!(json["servicePrincipalObjectId"], "sp-1");
        assert!(json["mailboxes"].is_null());
    }
}
