//! What the reconcilers share.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, Weak};

use k8s_openapi::api::core::v1::Namespace;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use tokio::sync::{OnceCell, mpsc, watch};

use super::index::UnfinishedMessages;
use super::registry::ProfileKey;
use super::registry::ProfileRegistry;
use crate::api::{ClusterMailProfile, EmailMessage, MailProfile};
use crate::auth::{SendEvidence, TokenCache, TokenCacheConfig, TokenCaches};
use crate::delivery::budget::{DEFAULT_MEMORY_BUDGET, MemoryBudget};
use crate::delivery::limits::SendLimits;
use crate::metrics::Metrics;
use crate::server::Health;
use crate::tls::TrustRoots;
use std::sync::Arc;

/// Settings from the command line.
#[derive(Clone, Debug, Default)]
pub struct OperatorConfig {
    /// Watch one namespace only.
    pub namespace: Option<String>,
    /// Accept plain `http://` Graph and authority endpoints (local testing only).
    pub allow_insecure_endpoints: bool,
    /// Accept authority hosts and Graph endpoints other than Microsoft's in MailProfiles.
    pub allow_custom_endpoints: bool,
    /// Roots trusted besides the platform's.
    pub trust: TrustRoots,
    /// This process's name in Events (the pod name).
    pub instance: String,
    /// EmailMessages reconciled at once; 0 means the default.
    pub concurrency: u16,
    /// Bytes the messages being built and sent may hold together; 0 means the default.
    pub memory_budget: u64,
    /// How often expired idempotency records are deleted, in seconds; 0 means the default.
    pub send_record_sweep_seconds: u64,
}

/// EmailMessages reconciled at once unless configured otherwise.
pub const DEFAULT_CONCURRENCY: u16 = 64;

impl OperatorConfig {
    /// Which endpoints profiles may name.
    pub fn endpoint_policy(&self) -> super::profile::EndpointPolicy {
        super::profile::EndpointPolicy {
            allow_insecure: self.allow_insecure_endpoints,
            allow_custom: self.allow_custom_endpoints,
        }
    }

    /// EmailMessages reconciled at once.
    pub fn concurrency(&self) -> u16 {
        if self.concurrency == 0 { DEFAULT_CONCURRENCY } else { self.concurrency }
    }

    /// Bytes the messages being built and sent may hold together.
    pub fn memory_budget(&self) -> u64 {
        if self.memory_budget == 0 { DEFAULT_MEMORY_BUDGET } else { self.memory_budget }
    }

    /// How often expired idempotency records are deleted.
    pub fn send_record_sweep(&self) -> std::time::Duration {
        match self.send_record_sweep_seconds {
            0 => super::message::key::SWEEP_PERIOD,
            s => std::time::Duration::from_secs(s),
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Command line settings.
    pub config: OperatorConfig,
    /// Profiles as resolved by the profile controllers.
    pub profiles: ProfileRegistry,
    /// Rate and concurrency limits per profile and mailbox, and who waits for a turn.
    pub limits: SendLimits<ObjectRef<EmailMessage>>,
    /// The bytes the messages being built and sent may hold, and who waits for them.
    pub budget: MemoryBudget<ObjectRef<EmailMessage>>,
    /// Messages this process has claimed and not yet finished, by uid.
    pub in_flight: Mutex<HashSet<String>>,
    /// Claims (by claim id) this process wrote, whose answer was lost and which it never sent:
    /// found in `Sending`, they are resumed, not taken as in doubt.
    pub unsent_claims: Mutex<HashSet<String>>,
    /// The message controller's cache, once it runs.
    pub messages: Arc<OnceCell<Store<EmailMessage>>>,
    /// The MailProfile cache, once it runs.
    pub mail_profiles: OnceCell<Store<MailProfile>>,
    /// The ClusterMailProfile cache, once it runs.
    pub cluster_profiles: OnceCell<Store<ClusterMailProfile>>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness for /readyz.
    pub health: Arc<Health>,
    /// Wakes messages (a profile became ready).
    pub wake: mpsc::UnboundedSender<ObjectRef<EmailMessage>>,
    /// Re-reconciles a MailProfile (its token changed).
    pub wake_profile: mpsc::UnboundedSender<ObjectRef<MailProfile>>,
    /// Re-reconciles a ClusterMailProfile (its token changed).
    pub wake_cluster_profile: mpsc::UnboundedSender<ObjectRef<ClusterMailProfile>>,
    /// One token cache per profile and scope.
    pub token_caches: TokenCaches,
    /// The task following each profile's token cache (see `profile::follow_token`).
    pub followers: Mutex<HashMap<ProfileKey, TokenFollower>>,
    /// The unfinished messages of each profile, kept from the message watch.
    pub unfinished: UnfinishedMessages,
    /// Namespaces by metadata (their labels, for ClusterMailProfiles' `allowedNamespaces`), once
    /// the watch runs.
    pub namespaces: OnceCell<Store<PartialObjectMeta<Namespace>>>,
    /// True once a graceful shutdown began: from then on no message is claimed.
    pub stopping: watch::Sender<bool>,
    /// What the latest sends told of each profile's authorisation, for `PermissionsVerified`.
    pub send_evidence: Mutex<HashMap<ProfileKey, SendEvidence>>,
}

/// The task that follows one token cache; dropping it stops the task.
pub struct TokenFollower {
    cache: Weak<TokenCache>,
    task: tokio::task::AbortHandle,
}

impl TokenFollower {
    /// Follows `cache` with `task`.
    pub fn new(cache: &Arc<TokenCache>, task: tokio::task::AbortHandle) -> Self {
        TokenFollower { cache: Arc::downgrade(cache), task }
    }

    /// Whether this follows `cache`. The weak reference keeps the allocation, so another cache
    /// can never take the same address while this exists.
    pub fn follows(&self, cache: &Arc<TokenCache>) -> bool {
        std::ptr::eq(self.cache.as_ptr(), Arc::as_ptr(cache))
    }
}

impl Drop for TokenFollower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Wakes a message whose turn came, unless it is gone from the cache or finished.
fn wake_waiting(
    wake: mpsc::UnboundedSender<ObjectRef<EmailMessage>>,
    messages: Arc<OnceCell<Store<EmailMessage>>>,
) -> crate::delivery::limits::Wake<ObjectRef<EmailMessage>> {
    Arc::new(move |r: &ObjectRef<EmailMessage>| {
        let waits = messages.get().is_none_or(|store| store.get(r).is_some_and(|m| !m.is_finished()));
        waits && wake.send(r.clone()).is_ok()
    })
}

/// The extra triggers of the three controllers.
pub struct Triggers {
    /// Messages to reconcile.
    pub messages: mpsc::UnboundedReceiver<ObjectRef<EmailMessage>>,
    /// MailProfiles to reconcile.
    pub mail_profiles: mpsc::UnboundedReceiver<ObjectRef<MailProfile>>,
    /// ClusterMailProfiles to reconcile.
    pub cluster_profiles: mpsc::UnboundedReceiver<ObjectRef<ClusterMailProfile>>,
}

impl Context {
    /// A context; the receiver feeds the message controller's extra triggers.
    pub fn new(client: Client, config: OperatorConfig, metrics: Arc<Metrics>, health: Arc<Health>) -> (Self, Triggers) {
        let (wake, woken) = mpsc::unbounded_channel();
        let (wake_profile, profiles) = mpsc::unbounded_channel();
        let (wake_cluster_profile, cluster_profiles) = mpsc::unbounded_channel();
        let messages: Arc<OnceCell<Store<EmailMessage>>> = Arc::default();
        let limits = SendLimits::new(wake_waiting(wake.clone(), messages.clone()));
        let budget = MemoryBudget::new(config.memory_budget(), wake_waiting(wake.clone(), messages.clone()));
        metrics.set_budget_probe(Box::new(budget.probe()));
        let ctx = Context {
            client,
            config,
            profiles: ProfileRegistry::default(),
            limits,
            budget,
            in_flight: Mutex::new(HashSet::new()),
            unsent_claims: Mutex::new(HashSet::new()),
            messages,
            mail_profiles: OnceCell::new(),
            cluster_profiles: OnceCell::new(),
            metrics,
            health,
            wake,
            wake_profile,
            wake_cluster_profile,
            token_caches: TokenCaches::new(TokenCacheConfig::default()),
            followers: Mutex::new(HashMap::new()),
            unfinished: UnfinishedMessages::default(),
            namespaces: OnceCell::new(),
            stopping: watch::Sender::new(false),
            send_evidence: Mutex::new(HashMap::new()),
        };
        (ctx, Triggers { messages: woken, mail_profiles: profiles, cluster_profiles })
    }

    /// Marks a message as claimed by this process; false when it already was.
    pub fn hold(&self, uid: &str) -> bool {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).insert(uid.to_string())
    }

    /// Releases a claim.
    pub fn release(&self, uid: &str) {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(uid);
    }

    /// Remembers a claim whose answer was lost and under which nothing was sent.
    pub fn remember_unsent_claim(&self, claim_id: &str) {
        self.unsent_claims.lock().unwrap_or_else(|e| e.into_inner()).insert(claim_id.to_string());
    }

    /// Whether `claim_id` is a claim of this process under which nothing was sent.
    pub fn is_unsent_claim(&self, claim_id: Option<&str>) -> bool {
        claim_id.is_some_and(|id| self.unsent_claims.lock().unwrap_or_else(|e| e.into_inner()).contains(id))
    }

    /// Forgets an unsent claim (it is being resumed); true when it was one.
    pub fn take_unsent_claim(&self, claim_id: Option<&str>) -> bool {
        claim_id.is_some_and(|id| self.unsent_claims.lock().unwrap_or_else(|e| e.into_inner()).remove(id))
    }

    /// Whether this process holds a claim on the message.
    pub fn holds(&self, uid: &str) -> bool {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).contains(uid)
    }

    /// Begins a graceful shutdown: sends in flight finish, messages not yet claimed stay for the next leader.
    pub fn begin_shutdown(&self) {
        self.stopping.send_replace(true);
    }

    /// Whether a graceful shutdown began.
    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Records what a send told of a profile's authorisation and, when that is news, has the
    /// profile reconciled so that its `PermissionsVerified` condition shows it.
    pub fn note_send_evidence(&self, key: &ProfileKey, evidence: SendEvidence) {
        let news = {
            let mut known = self.send_evidence.lock().unwrap_or_else(|e| e.into_inner());
            let news = evidence.is_news(known.get(key));
            if news {
                known.insert(key.clone(), evidence);
            }
            news
        };
        if news {
            let _ = match key {
                ProfileKey::Namespaced { namespace, name } => {
                    self.wake_profile.send(ObjectRef::new(name).within(namespace)).is_ok()
                }
                ProfileKey::Cluster { name } => self.wake_cluster_profile.send(ObjectRef::new(name)).is_ok(),
            };
        }
    }

    /// What the latest sends told of a profile's authorisation.
    pub fn send_evidence(&self, key: &ProfileKey) -> Option<SendEvidence> {
        self.send_evidence.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }

    /// Forgets what sends told of a profile (it was deleted, or its app or credential changed).
    pub fn forget_send_evidence(&self, key: &ProfileKey) {
        self.send_evidence.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }

    /// Stops following a profile's token cache (it has none any more, or it is gone).
    pub fn unfollow(&self, key: &ProfileKey) {
        let follower = self.followers.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
        drop(follower);
    }

    /// Every profile this process holds something for: a registry entry, a token follower or
    /// what its sends told.
    pub fn held_profiles(&self) -> HashSet<ProfileKey> {
        let mut held: HashSet<ProfileKey> = self.profiles.keys().into_iter().collect();
        held.extend(self.followers.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned());
        held.extend(self.send_evidence.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned());
        held
    }

    /// A namespace's labels from the metadata cache; `None` when the cache does not have it (not
    /// synced yet, or the namespace was created a moment ago).
    pub fn cached_namespace_labels(&self, name: &str) -> Option<BTreeMap<String, String>> {
        let store = self.namespaces.get()?;
        store.get(&ObjectRef::new(name)).map(|ns| ns.labels().clone())
    }

    /// Sets the gauges of what this process holds: profiles, token caches, rate-limit mailboxes.
    pub fn update_gauges(&self) {
        self.metrics.profiles.set(self.profiles.len() as i64);
        self.metrics.token_caches.set(self.token_caches.len() as i64);
        self.metrics.limit_mailboxes.set(self.limits.len() as i64);
    }

    /// Whether the profile still exists (a deleted profile's resolution may linger in the registry).
    pub fn profile_exists(&self, key: &ProfileKey) -> bool {
        match key {
            ProfileKey::Namespaced { namespace, name } => {
                self.mail_profiles.get().is_none_or(|s| s.get(&ObjectRef::new(name).within(namespace)).is_some())
            }
            ProfileKey::Cluster { name } => {
                self.cluster_profiles.get().is_none_or(|s| s.get(&ObjectRef::new(name)).is_some())
            }
        }
    }
}
