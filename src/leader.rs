//! Leader election on a `coordination.k8s.io/v1` Lease: of several replicas only the holder runs
//! the controllers, so one process sends.
//!
//! The Lease protocol is kube-lease-manager's: it creates the Lease when it is missing, takes a
//! free or expired one with a server-side apply (two replicas racing for it conflict, one wins)
//! and renews it. Around it this module adds what sending email needs:
//! - a renew deadline: the holder confirms its Lease on its own schedule and declares it lost once
//!   its last renewal is older than [`RENEW_DEADLINE`], before any other replica may take it over
//!   (the crate retries failed renewals without bound and reports nothing while it does);
//! - prompt takeover: a waiting replica reads the Lease afresh every [`RETRY_PERIOD`] (the crate
//!   sleeps until the expiry it last saw), so a released Lease is taken within about that time;
//! - a release guarded by the resourceVersion, which clears `holderIdentity` only while this process
//!   still holds it (the crate's release writes without a precondition).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use kube_lease_manager::{LeaseCreateMode, LeaseManager, LeaseManagerError, LeaseParams};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// The Lease's name.
pub const LEASE_NAME: &str = "mailroom-leader";
/// The Lease's namespace when neither the flag nor `POD_NAMESPACE` names one.
pub const DEFAULT_NAMESPACE: &str = "mailroom-system";
/// How long a Lease stays valid after its last renewal; another replica takes it over after that.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews.
pub const RENEW_PERIOD: Duration = Duration::from_secs(5);
/// The holder gives up this long after its last renewal: 5 s before the Lease expires for the
/// others, a margin for clock skew and for writes still on their way.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often a waiting replica looks at the Lease.
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);
/// How often the holder confirms that the Lease is still its own.
const CHECK_PERIOD: Duration = Duration::from_secs(1);
/// Field manager of the release.
const FIELD_MANAGER: &str = "mailroom-leader-election";

/// Leader election failed in a way that retrying does not fix.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The Lease's namespace does not exist (nothing is created but the Lease itself).
    #[error(
        "the leader election namespace {0} does not exist; set --leader-election-namespace (or POD_NAMESPACE) to an existing namespace"
    )]
    NamespaceMissing(String),
    /// The Lease could not be read or written.
    #[error("Lease {lease}: {source}")]
    Lease {
        /// `namespace/name`.
        lease: String,
        /// What failed.
        #[source]
        source: LeaseManagerError,
    },
    /// A call to the Kubernetes API failed.
    #[error("Lease {lease}: Kubernetes API: {source}")]
    Kube {
        /// `namespace/name`.
        lease: String,
        /// What failed.
        #[source]
        source: kube::Error,
    },
    /// The durations contradict each other.
    #[error("leader election timing: {0}")]
    Timing(String),
}

/// Where the Lease is, who this process is, and the timing.
#[derive(Clone, Debug)]
pub struct ElectionConfig {
    /// The Lease's namespace (must exist).
    pub namespace: String,
    /// The Lease's name.
    pub lease_name: String,
    /// This process's `holderIdentity`.
    pub identity: String,
    /// Validity of the Lease after a renewal (whole seconds).
    pub lease_duration: Duration,
    /// Time between renewals (whole seconds).
    pub renew_period: Duration,
    /// The holder gives up when its last renewal is older than this.
    pub renew_deadline: Duration,
    /// Time between a waiting replica's looks at the Lease.
    pub retry_period: Duration,
}

impl ElectionConfig {
    /// The `mailroom-leader` Lease in `namespace` with the default timing.
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        ElectionConfig {
            namespace: namespace.into(),
            lease_name: LEASE_NAME.to_string(),
            identity: identity.into(),
            lease_duration: LEASE_DURATION,
            renew_period: RENEW_PERIOD,
            renew_deadline: RENEW_DEADLINE,
            retry_period: RETRY_PERIOD,
        }
    }

    fn lease(&self) -> String {
        format!("{}/{}", self.namespace, self.lease_name)
    }
}

/// The Lease's namespace: the flag, else the pod's namespace, else `mailroom-system`.
pub fn election_namespace(flag: Option<&str>, pod_namespace: Option<&str>) -> String {
    [flag, pod_namespace]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|s| !s.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
        .to_string()
}

/// This process's `holderIdentity`: the pod name (else the host name) and the process id, so two
/// processes on one host, or a restarted container, never share one.
pub fn identity(pod_name: Option<&str>, hostname: Option<&str>, pid: u32) -> String {
    let base = [pod_name, hostname].into_iter().flatten().map(str::trim).find(|s| !s.is_empty()).unwrap_or("mailroom");
    format!("{base}_{pid}")
}

/// The Lease duration and the crate's "grace" (renew this long before expiry) in whole seconds,
/// checked so that renewals come before the renew deadline and the deadline before expiry.
pub fn lease_timing(config: &ElectionConfig) -> Result<(u64, u64), LeaderError> {
    let (duration, renew) = (config.lease_duration.as_secs(), config.renew_period.as_secs());
    if renew == 0 || duration <= renew {
        return Err(LeaderError::Timing(format!(
            "the renew period ({renew} s) must be at least 1 s and shorter than the lease duration ({duration} s)"
        )));
    }
    if config.renew_deadline <= config.renew_period || config.renew_deadline >= config.lease_duration {
        return Err(LeaderError::Timing(format!(
            "the renew deadline ({:?}) must lie between the renew period ({renew} s) and the lease duration ({duration} s)",
            config.renew_deadline
        )));
    }
    Ok((duration, duration - renew))
}

/// What a read of the Lease says about a holder: the time of its last renewal, or why it no
/// longer holds the Lease.
pub fn holder_renewal(lease: Option<&LeaseSpec>, identity: &str) -> Result<Option<Timestamp>, String> {
    let Some(spec) = lease else {
        return Err("the Lease was deleted".into());
    };
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == identity => Ok(spec.renew_time.as_ref().map(|t| t.0)),
        Some(other) => Err(format!("the Lease is now held by {other}")),
        None => Err("the Lease was released by another process".into()),
    }
}

/// Why a holder must stop: its last renewal is older than the renew deadline.
pub fn overdue(last_renewal: Timestamp, now: Timestamp, deadline: Duration) -> Option<String> {
    let age = now.duration_since(last_renewal);
    let deadline =
        k8s_openapi::jiff::SignedDuration::try_from(deadline).unwrap_or(k8s_openapi::jiff::SignedDuration::MAX);
    (age > deadline).then(|| format!("the Lease was not renewed for {:.1} s", age.as_secs_f64()))
}

/// Competes for the Lease.
pub struct Election {
    client: Client,
    config: ElectionConfig,
    params: LeaseParams,
}

impl Election {
    /// An election for `config`'s Lease; fails only on contradictory timing.
    pub fn new(client: Client, config: ElectionConfig) -> Result<Self, LeaderError> {
        let (duration, grace) = lease_timing(&config)?;
        let params = LeaseParams::new(config.identity.clone(), duration, grace);
        Ok(Election { client, config, params })
    }

    /// Waits until this process holds the Lease. Errors other than a missing namespace are
    /// logged and retried.
    pub async fn acquire(&self) -> Result<Leadership, LeaderError> {
        info!(lease = %self.config.lease(), identity = %self.config.identity, "waiting to become the leader");
        loop {
            let started = Timestamp::now();
            match self.try_acquire().await {
                Ok(Some(manager)) => {
                    info!(lease = %self.config.lease(), identity = %self.config.identity, "became the leader");
                    return Ok(self.lead(manager, started));
                }
                Ok(None) => {}
                Err(e @ LeaderError::NamespaceMissing(_)) => return Err(e),
                Err(e) => {
                    warn!(error = %e, "leader election failed; trying again");
                    tokio::time::sleep(self.config.retry_period).await;
                }
            }
        }
    }

    /// One look at the Lease with a fresh manager (so a fresh read): takes it when it is free,
    /// expired or already ours; gives up after one retry period when another replica holds it.
    async fn try_acquire(&self) -> Result<Option<LeaseManager>, LeaderError> {
        let manager = LeaseManager::new(
            self.client.clone(),
            &self.config.lease_name,
            &self.config.namespace,
            self.params.clone(),
            LeaseCreateMode::AutoCreate,
        )
        .await
        .map_err(|e| match e {
            // Creating the Lease in a namespace that does not exist.
            LeaseManagerError::KubeError(kube::Error::Api(s)) if s.code == 404 => {
                LeaderError::NamespaceMissing(self.config.namespace.clone())
            }
            source => self.error(source),
        })?;
        // Dropping `changed()` at the timeout is safe: if the Lease was taken just before, the
        // next look finds it held by this identity and reports it as ours.
        match tokio::time::timeout(self.config.retry_period, manager.changed()).await {
            Ok(Ok(true)) => Ok(Some(manager)),
            Ok(Ok(false)) | Err(_) => Ok(None),
            Ok(Err(source)) => Err(self.error(source)),
        }
    }

    fn error(&self, source: LeaseManagerError) -> LeaderError {
        LeaderError::Lease { lease: self.config.lease(), source }
    }

    fn lead(&self, manager: LeaseManager, acquired_no_earlier_than: Timestamp) -> Leadership {
        let (lost_tx, lost) = watch::channel(None);
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.config.namespace);
        let renewal = tokio::spawn(renew(manager, lost_tx.clone()));
        let confirmation = tokio::spawn(confirm(api.clone(), self.config.clone(), acquired_no_earlier_than, lost_tx));
        Leadership { api, config: self.config.clone(), renewal, confirmation, lost }
    }
}

/// This process holds the Lease: it renews it in the background until released or lost.
pub struct Leadership {
    api: Api<Lease>,
    config: ElectionConfig,
    renewal: JoinHandle<()>,
    confirmation: JoinHandle<()>,
    lost: watch::Receiver<Option<String>>,
}

impl Leadership {
    /// This process's `holderIdentity`.
    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    /// Completes, with the reason, once this process may no longer act as the leader.
    pub async fn lost(&self) -> String {
        let mut rx = self.lost.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the Lease is no longer renewed".into(),
        }
    }

    /// Stops renewing and clears `holderIdentity` (only while it is still this process's), so
    /// that a waiting replica takes over at once instead of waiting for the Lease to expire.
    pub async fn release(self) -> Result<(), LeaderError> {
        self.renewal.abort();
        self.confirmation.abort();
        let _ = self.renewal.await;
        let _ = self.confirmation.await;
        let lease = self.config.lease();
        let kube_err = |source| LeaderError::Kube { lease: lease.clone(), source };
        for _ in 0..3 {
            let Some(current) = self.api.get_opt(&self.config.lease_name).await.map_err(kube_err)? else {
                return Ok(());
            };
            if current.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) != Some(self.config.identity.as_str()) {
                return Ok(());
            }
            let patch = json!({
                "metadata": { "resourceVersion": current.resource_version() },
                "spec": { "holderIdentity": null, "acquireTime": null, "renewTime": null, "leaseDurationSeconds": null },
            });
            let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
            match self.api.patch(&self.config.lease_name, &params, &Patch::Merge(patch)).await {
                Ok(_) => return Ok(()),
                // Changed since the read (a renewal that was still on its way): read again.
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(kube_err(e)),
            }
        }
        Ok(())
    }
}

fn mark_lost(lost: &watch::Sender<Option<String>>, reason: String) {
    lost.send_if_modified(|v| {
        if v.is_none() {
            *v = Some(reason);
            true
        } else {
            false
        }
    });
}

/// Keeps the crate's renewal going; `changed()` returns only when the Lease changed hands or a
/// renewal failed (retried here; the confirmation enforces the deadline).
async fn renew(manager: LeaseManager, lost: watch::Sender<Option<String>>) {
    loop {
        match manager.changed().await {
            Ok(true) => {}
            Ok(false) => {
                mark_lost(&lost, "another replica took the Lease".into());
                return;
            }
            Err(e) => {
                warn!(error = %e, "could not renew the leader Lease; trying again");
                tokio::time::sleep(CHECK_PERIOD).await;
            }
        }
    }
}

/// Reads the Lease every second (each read bounded by a timeout, so a hanging API server cannot
/// delay the verdict) and declares it lost when another holds it or the last renewal is overdue.
async fn confirm(
    api: Api<Lease>,
    config: ElectionConfig,
    mut last_renewal: Timestamp,
    lost: watch::Sender<Option<String>>,
) {
    let mut tick = tokio::time::interval(CHECK_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        match tokio::time::timeout(CHECK_PERIOD, api.get_opt(&config.lease_name)).await {
            Ok(Ok(lease)) => match holder_renewal(lease.as_ref().and_then(|l| l.spec.as_ref()), &config.identity) {
                Ok(renewed) => last_renewal = renewed.map_or(last_renewal, |r| r.max(last_renewal)),
                Err(reason) => {
                    mark_lost(&lost, reason);
                    return;
                }
            },
            Ok(Err(e)) => debug!(error = %e, "could not read the leader Lease"),
            Err(_) => debug!("reading the leader Lease timed out"),
        }
        if let Some(reason) = overdue(last_renewal, Timestamp::now(), config.renew_deadline) {
            mark_lost(&lost, reason);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn spec(holder: Option<&str>, renewed: Option<Timestamp>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            renew_time: renewed.map(MicroTime),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }
    }

    #[test]
    fn namespace_from_flag_then_pod_then_default() {
        assert_eq!(election_namespace(Some("ops"), Some("mailroom")), "ops");
        assert_eq!(election_namespace(None, Some("mailroom")), "mailroom");
        assert_eq!(election_namespace(Some(" "), Some("mailroom")), "mailroom");
        assert_eq!(election_namespace(None, None), "mailroom-system");
        assert_eq!(election_namespace(None, Some("")), "mailroom-system");
    }

    #[test]
    fn identity_is_pod_or_host_and_pid() {
        assert_eq!(identity(Some("mailroom-7d9f-x2"), Some("node-1"), 1), "mailroom-7d9f-x2_1");
        assert_eq!(identity(None, Some("laptop"), 4242), "laptop_4242");
        assert_eq!(identity(Some(""), Some("laptop"), 7), "laptop_7");
        assert_eq!(identity(None, None, 7), "mailroom_7");
    }

    #[test]
    fn default_timing_renews_every_five_seconds_of_fifteen() {
        let config = ElectionConfig::new("ns", "me");
        assert_eq!(lease_timing(&config).unwrap(), (15, 10));
    }

    #[test]
    fn contradictory_timing_is_refused() {
        let mut c = ElectionConfig::new("ns", "me");
        c.renew_period = Duration::from_secs(15);
        assert!(lease_timing(&c).is_err());
        let mut c = ElectionConfig::new("ns", "me");
        c.renew_deadline = Duration::from_secs(15);
        assert!(lease_timing(&c).is_err(), "the deadline must come before the expiry");
        let mut c = ElectionConfig::new("ns", "me");
        c.renew_deadline = Duration::from_secs(4);
        assert!(lease_timing(&c).is_err(), "the deadline must leave room for a renewal");
        let mut c = ElectionConfig::new("ns", "me");
        c.renew_period = Duration::from_millis(500);
        assert!(lease_timing(&c).is_err());
    }

    #[test]
    fn the_holder_reads_its_renewal() {
        assert_eq!(holder_renewal(Some(&spec(Some("me"), Some(at(3)))), "me"), Ok(Some(at(3))));
        assert_eq!(holder_renewal(Some(&spec(Some("me"), None)), "me"), Ok(None));
    }

    #[test]
    fn another_holder_or_no_holder_means_lost() {
        let other = holder_renewal(Some(&spec(Some("them"), Some(at(3)))), "me").unwrap_err();
        assert!(other.contains("held by them"), "{other}");
        assert!(holder_renewal(Some(&spec(None, None)), "me").unwrap_err().contains("released"));
        assert!(holder_renewal(None, "me").unwrap_err().contains("deleted"));
    }

    #[test]
    fn a_renewal_older_than_the_deadline_is_overdue() {
        let deadline = Duration::from_secs(10);
        assert_eq!(overdue(at(0), at(10), deadline), None);
        assert_eq!(overdue(at(0), at(4), deadline), None);
        let why = overdue(at(0), at(11), deadline).unwrap();
        assert!(why.contains("11.0 s"), "{why}");
        // A clock that went backwards is not overdue.
        assert_eq!(overdue(at(5), at(0), deadline), None);
    }
}
