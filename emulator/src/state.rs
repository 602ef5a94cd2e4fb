//! The emulator's shared state: registrations, pending faults, drafts, records and counters.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::apps::App;
use crate::cloud::Cloud;
use crate::faults::FaultQueue;
use crate::graph::drafts::Draft;
use crate::graph::upload::UploadSession;
use crate::rbac::{self, RoleAssignment};
use crate::records::{IssuedToken, MessageRecord, Stats, TokenRequestRecord};
use crate::signing::TokenSigner;

/// Settings fixed for the life of one emulator.
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    /// `https://127.0.0.1:PORT`, no trailing slash.
    pub base_url: String,
    /// The address listened on. Besides loopback peers, the admin API answers this one: the host
    /// itself, when the emulator listens on a private address for a local cluster's Pods.
    pub listen_ip: std::net::IpAddr,
    /// Token lifetime when an app does not set one.
    pub default_token_lifetime: u64,
    /// Requests allowed in flight per mailbox before 429 (Graph: 4).
    pub mailbox_concurrency: usize,
    /// `Retry-After` seconds on a concurrency 429.
    pub throttle_retry_after: u64,
    /// The cloud this emulator plays.
    pub cloud: Cloud,
}

/// Everything that changes, behind one lock (never held across an await).
#[derive(Default)]
pub struct Inner {
    /// Apps by (tenant, client), both lower case.
    pub apps: HashMap<(String, String), Arc<App>>,
    /// Pending faults.
    pub faults: FaultQueue,
    /// Accepted messages, oldest first.
    pub messages: Vec<MessageRecord>,
    /// Token requests, oldest first.
    pub token_requests: Vec<TokenRequestRecord>,
    /// Access tokens issued, oldest first (a test peer's record; the emulator never logs them).
    pub issued_tokens: Vec<IssuedToken>,
    /// Client assertion `jti`s already used, keyed by client id and jti, with their expiry.
    pub used_jtis: HashMap<(String, String), i64>,
    /// Drafts by id.
    pub drafts: HashMap<String, Draft>,
    /// Upload sessions by id.
    pub uploads: HashMap<String, UploadSession>,
    /// Exchange RBAC for Applications role assignments, oldest first.
    pub role_assignments: Vec<RoleAssignment>,
    /// Mailboxes (lower case) that answer MailboxNotEnabledForRESTAPI.
    pub disabled_mailboxes: BTreeSet<String>,
    /// Requests in flight per mailbox (lower case).
    pub in_flight: HashMap<String, usize>,
    /// Counters.
    pub stats: Stats,
}

impl Inner {
    /// Forgets everything but the requests still in flight.
    pub fn reset(&mut self) {
        let in_flight = std::mem::take(&mut self.in_flight);
        *self = Self { in_flight, ..Self::default() };
    }

    /// Whether any registered app belongs to `tenant`.
    pub fn tenant_exists(&self, tenant: &str) -> bool {
        self.apps.keys().any(|(t, _)| t == tenant)
    }

    /// The app registered as (`tenant`, `client`), ids compared case-insensitively.
    pub fn app(&self, tenant: &str, client: &str) -> Option<Arc<App>> {
        self.apps.get(&(tenant.to_ascii_lowercase(), client.to_ascii_lowercase())).cloned()
    }

    /// Whether an Exchange role assignment grants `permission` on `mailbox` to the service
    /// principal `oid` of tenant `tid`.
    pub fn rbac_grants(&self, tid: &str, oid: &str, permission: &str, mailbox: &str) -> bool {
        rbac::any_grants(&self.role_assignments, tid, oid, permission, mailbox)
    }

    /// Records a `jti` as used; false if it already was. Expired entries are dropped.
    pub fn use_jti(&mut self, client: &str, jti: &str, exp: i64, now: i64) -> bool {
        self.used_jtis.retain(|_, e| *e >= now);
        self.used_jtis.insert((client.to_string(), jti.to_string()), exp).is_none()
    }
}

/// The state shared by every handler.
pub struct SharedState {
    /// Fixed settings.
    pub settings: RuntimeSettings,
    /// The token-signing key.
    pub signer: Arc<TokenSigner>,
    inner: Mutex<Inner>,
}

impl SharedState {
    /// New, empty state.
    pub fn new(settings: RuntimeSettings, signer: Arc<TokenSigner>) -> Self {
        Self { settings, signer, inner: Mutex::new(Inner::default()) }
    }

    /// Locks the mutable state. A panic elsewhere must not wedge the emulator, so a poisoned
    /// lock is taken over as is.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The handle handlers receive.
pub type AppState = Arc<SharedState>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jti_is_accepted_once_until_it_expires() {
        let mut inner = Inner::default();
        assert!(inner.use_jti("c", "j", 100, 50));
        assert!(!inner.use_jti("c", "j", 100, 60));
        assert!(inner.use_jti("other", "j", 100, 60));
        // Once expired the entry is forgotten; an expired assertion is refused earlier anyway.
        assert!(inner.use_jti("c", "j", 300, 200));
    }

    #[test]
    fn reset_keeps_in_flight_counts() {
        let mut inner = Inner::default();
        inner.in_flight.insert("a@x".into(), 2);
        inner.disabled_mailboxes.insert("b@x".into());
        let spec = rbac::RoleAssignmentSpec {
            tenant_id: "t".into(),
            service_principal_object_id: "sp".into(),
            role: "Application Mail.Send".into(),
            mailboxes: None,
        };
        inner.role_assignments.push(RoleAssignment::from_spec(spec).expect("assignment"));
        assert!(inner.rbac_grants("t", "sp", "Mail.Send", "b@x"));
        inner.reset();
        assert_eq!(inner.in_flight.get("a@x"), Some(&2));
        assert!(inner.disabled_mailboxes.is_empty());
        assert!(!inner.rbac_grants("t", "sp", "Mail.Send", "b@x"));
    }
}
