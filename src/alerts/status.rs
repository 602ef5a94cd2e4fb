//! The routes' status: what each replica received is tallied in memory and added to the route's
//! counts every few seconds with a conditional write (the resourceVersion it read), so replicas
//! never lose each other's counts and a burst of notifications costs one write per route per
//! interval; Ready and the URL are checked on a slower schedule and written only when they change.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tracing::{debug, warn};

use crate::api::{
    AlertRoute, AlertRouteStatus, ClusterMailProfile, MailProfile, ProfileKind, ProfileRef, condition, conditions,
    differs_beyond_transition_times,
};

/// How often the tallies are added to the routes' counts.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(3);
/// How often Ready and the URL are checked.
pub const READY_INTERVAL: Duration = Duration::from_secs(10);
/// The longest `lastOutcome`.
const MAX_OUTCOME: usize = 512;

/// What became of one notification, for the route's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A message was created.
    Created(String),
    /// A retry: its message exists.
    AlreadyCreated(String),
    /// Refused with this HTTP status and reason.
    Rejected(u16, String),
}

impl Outcome {
    fn describe(&self) -> String {
        let s = match self {
            Outcome::Created(m) => format!("Created {m}"),
            Outcome::AlreadyCreated(m) => format!("AlreadyCreated {m}"),
            Outcome::Rejected(code, why) => format!("Rejected {code}: {why}"),
        };
        crate::text::prefix(&s, MAX_OUTCOME).to_string()
    }
}

/// The notifications of one route not yet written to its status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Received.
    pub received: i64,
    /// Created a message.
    pub created: i64,
    /// Refused.
    pub rejected: i64,
    /// The last one's time and outcome.
    pub last: Option<(Timestamp, String)>,
}

impl Tally {
    /// Counts one notification.
    pub fn record(&mut self, outcome: &Outcome, at: Timestamp) {
        self.received += 1;
        match outcome {
            Outcome::Created(_) => self.created += 1,
            Outcome::AlreadyCreated(_) => {}
            Outcome::Rejected(..) => self.rejected += 1,
        }
        if self.last.as_ref().is_none_or(|(t, _)| *t <= at) {
            self.last = Some((at, outcome.describe()));
        }
    }

    /// Adds a tally that could not be written back into this newer one.
    pub fn merge(&mut self, older: Tally) {
        self.received += older.received;
        self.created += older.created;
        self.rejected += older.rejected;
        if let Some((t, o)) = older.last
            && self.last.as_ref().is_none_or(|(mine, _)| *mine < t)
        {
            self.last = Some((t, o));
        }
    }
}

/// The status with a tally added to its counts (a later notification replaces the last one).
pub fn add(status: &AlertRouteStatus, t: &Tally) -> AlertRouteStatus {
    let mut next = status.clone();
    next.received += t.received;
    next.created += t.created;
    next.rejected += t.rejected;
    if let Some((at, outcome)) = &t.last
        && next.last_notification_time.as_ref().is_none_or(|old| old.0 <= *at)
    {
        next.last_notification_time = Some(Time(*at));
        next.last_outcome = Some(outcome.clone());
    }
    next
}

/// What a route's readiness depends on, as read from the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dependency {
    /// Present and usable.
    Ok,
    /// Missing or unusable: why.
    Missing(&'static str, String),
}

/// The Ready condition's status, reason and message, from the profile's and the Secret's state.
pub fn readiness(profile: &Dependency, token: &Dependency) -> (bool, &'static str, String) {
    match (profile, token) {
        (Dependency::Ok, Dependency::Ok) => {
            (true, "Ready", "the profile resolves and the token Secret is present".into())
        }
        (Dependency::Missing(reason, why), _) => {
            (false, reason, format!("{why}; notifications still create messages, which wait for it"))
        }
        (_, Dependency::Missing(reason, why)) => (false, reason, format!("{why}; notifications are answered 500")),
    }
}

/// The URL to configure in the sender.
pub fn route_url(base: Option<&str>, ns: &str, name: &str) -> String {
    let path = format!("/alerts/{ns}/{name}");
    match base {
        Some(b) => format!("{}{path}", b.trim_end_matches('/')),
        None => path,
    }
}

/// The tallies of this replica, by route.
#[derive(Default)]
pub struct Tallies(Mutex<HashMap<(String, String), Tally>>);

impl Tallies {
    /// Counts one notification for a route.
    pub fn record(&self, ns: &str, name: &str, outcome: &Outcome) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((ns.to_string(), name.to_string())).or_default().record(outcome, Timestamp::now());
    }

    fn take(&self) -> HashMap<(String, String), Tally> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn put_back(&self, key: (String, String), t: Tally) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key).or_default().merge(t);
    }
}

/// Writes the tallies and the routes' readiness, forever.
pub async fn run(client: Client, namespace: Option<String>, base_url: Option<String>, tallies: Arc<Tallies>) {
    let mut flush = tokio::time::interval(FLUSH_INTERVAL);
    let mut ready = tokio::time::interval(READY_INTERVAL);
    loop {
        tokio::select! {
            _ = flush.tick() => flush_tallies(&client, &tallies).await,
            _ = ready.tick() => check_routes(&client, namespace.as_deref(), base_url.as_deref()).await,
        }
    }
}

async fn flush_tallies(client: &Client, tallies: &Tallies) {
    for ((ns, name), tally) in tallies.take() {
        let routes: Api<AlertRoute> = Api::namespaced(client.clone(), &ns);
        let route = match routes.get_opt(&name).await {
            Ok(Some(r)) => r,
            Ok(None) => continue, // no such route (a caller guessing names): nothing to count
            Err(e) => {
                debug!(route = %format!("{ns}/{name}"), error = %e, "could not read the route; counting later");
                tallies.put_back((ns, name), tally);
                continue;
            }
        };
        let next = add(&route.status.clone().unwrap_or_default(), &tally);
        // The resourceVersion makes the write conditional: another replica's counts written in
        // between make it fail with 409, and this tally is added on the next round.
        let patch = json!({
            "metadata": {"resourceVersion": route.resource_version()},
            "status": {
                "received": next.received,
                "created": next.created,
                "rejected": next.rejected,
                "lastNotificationTime": next.last_notification_time,
                "lastOutcome": next.last_outcome,
            }
        });
        match routes.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                debug!(route = %format!("{ns}/{name}"), error = %e, "route counts not written; retrying");
                tallies.put_back((ns, name), tally);
            }
        }
    }
}

async fn check_routes(client: &Client, namespace: Option<&str>, base_url: Option<&str>) {
    let routes: Api<AlertRoute> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let list = match routes.list(&ListParams::default()).await {
        Ok(l) => l.items,
        Err(e) => {
            warn!(error = %e, "cannot list AlertRoutes to check their readiness");
            return;
        }
    };
    for route in list {
        let ns = route.namespace().unwrap_or_default();
        let name = route.name_any();
        let (profile, token) =
            match (profile_state(client, &ns, &route.spec.profile_ref).await, token_state(client, &ns, &route).await) {
                (Ok(p), Ok(t)) => (p, t),
                (Err(e), _) | (_, Err(e)) => {
                    debug!(route = %format!("{ns}/{name}"), error = %e, "cannot check the route's readiness now");
                    continue;
                }
            };
        let before = route.status.clone().unwrap_or_default();
        let (ok, reason, message) = readiness(&profile, &token);
        let generation = route.metadata.generation;
        let ready =
            condition(&before.conditions, conditions::READY, ok, reason, message, generation, Time(Timestamp::now()));
        let mut after = before.clone();
        crate::api::set_condition(&mut after.conditions, ready);
        after.source = Some(route.spec.source().as_str().to_string());
        after.url = Some(route_url(base_url, &ns, &name));
        after.observed_generation = generation;
        if !differs_beyond_transition_times(&before, &after, |s| &mut s.conditions) {
            continue;
        }
        // Only these fields: the counts belong to the conditional writes above.
        let patch = json!({"status": {
            "conditions": after.conditions,
            "source": after.source,
            "url": after.url,
            "observedGeneration": after.observed_generation,
        }});
        let api: Api<AlertRoute> = Api::namespaced(client.clone(), &ns);
        if let Err(e) = api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            debug!(route = %format!("{ns}/{name}"), error = %e, "route readiness not written; retrying");
        }
    }
}

/// Whether a profile that an object in `ns` names exists and admits the namespace.
pub async fn profile_state(client: &Client, ns: &str, r: &ProfileRef) -> Result<Dependency, kube::Error> {
    match r.kind() {
        ProfileKind::MailProfile => {
            let api: Api<MailProfile> = Api::namespaced(client.clone(), ns);
            Ok(match api.get_opt(&r.name).await? {
                Some(_) => Dependency::Ok,
                None => Dependency::Missing("ProfileNotFound", format!("MailProfile {ns}/{} not found", r.name)),
            })
        }
        ProfileKind::ClusterMailProfile => {
            let api: Api<ClusterMailProfile> = Api::all(client.clone());
            let Some(p) = api.get_opt(&r.name).await? else {
                return Ok(Dependency::Missing("ProfileNotFound", format!("ClusterMailProfile {} not found", r.name)));
            };
            let namespaces: Api<Namespace> = Api::all(client.clone());
            let labels: BTreeMap<String, String> =
                namespaces.get_opt(ns).await?.map(|n| n.labels().clone()).unwrap_or_default();
            let name = format!("ClusterMailProfile {}", r.name);
            Ok(match crate::delivery::policy::check_namespace(&name, p.spec.allowed_namespaces.as_ref(), ns, &labels) {
                Ok(()) => Dependency::Ok,
                Err(e) => Dependency::Missing("NamespaceNotAdmitted", e.to_string()),
            })
        }
    }
}

/// Whether the token Secret holds a non-empty key.
async fn token_state(client: &Client, ns: &str, route: &AlertRoute) -> Result<Dependency, kube::Error> {
    let sel = &route.spec.token_secret_ref;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let Some(secret) = secrets.get_opt(&sel.name).await? else {
        return Ok(Dependency::Missing("SecretNotFound", format!("Secret {ns}/{} not found", sel.name)));
    };
    let value = secret.data.as_ref().and_then(|d| d.get(&sel.key));
    Ok(match value {
        Some(v) if !super::auth::stored_token(&v.0).is_empty() => Dependency::Ok,
        Some(_) => Dependency::Missing("KeyEmpty", format!("key {} of Secret {ns}/{} is empty", sel.key, sel.name)),
        None => Dependency::Missing("KeyNotFound", format!("Secret {ns}/{} has no key {}", sel.name, sel.key)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_760_000_000 + s).unwrap()
    }

    #[test]
    fn a_tally_counts_each_outcome_and_keeps_the_last() {
        let mut t = Tally::default();
        t.record(&Outcome::Created("a".into()), at(0));
        t.record(&Outcome::AlreadyCreated("a".into()), at(1));
        t.record(&Outcome::Rejected(401, "unauthorized".into()), at(2));
        assert_eq!((t.received, t.created, t.rejected), (3, 1, 1));
        assert_eq!(t.last, Some((at(2), "Rejected 401: unauthorized".into())));
    }

    #[test]
    fn counts_add_up_and_an_older_last_never_replaces_a_newer_one() {
        let status = AlertRouteStatus {
            received: 10,
            created: 7,
            rejected: 1,
            last_notification_time: Some(Time(at(100))),
            last_outcome: Some("Created b".into()),
            ..Default::default()
        };
        let mut t = Tally::default();
        t.record(&Outcome::Created("a".into()), at(50));
        let next = add(&status, &t);
        assert_eq!((next.received, next.created, next.rejected), (11, 8, 1));
        assert_eq!(next.last_outcome.as_deref(), Some("Created b"), "another replica's later notification stays");
        t.record(&Outcome::Created("c".into()), at(200));
        assert_eq!(add(&status, &t).last_outcome.as_deref(), Some("Created c"));
    }

    #[test]
    fn a_tally_put_back_merges_with_the_newer_one() {
        let mut older = Tally::default();
        older.record(&Outcome::Created("a".into()), at(0));
        let mut newer = Tally::default();
        newer.record(&Outcome::Rejected(400, "x".into()), at(5));
        newer.merge(older);
        assert_eq!((newer.received, newer.created, newer.rejected), (2, 1, 1));
        assert_eq!(newer.last.unwrap().0, at(5));
    }

    #[test]
    fn ready_needs_the_profile_and_the_token() {
        assert!(readiness(&Dependency::Ok, &Dependency::Ok).0);
        let missing = Dependency::Missing("ProfileNotFound", "MailProfile a/relay not found".into());
        let (ok, reason, message) = readiness(&missing, &Dependency::Ok);
        assert!(!ok);
        assert_eq!(reason, "ProfileNotFound");
        assert!(message.contains("still create messages"), "{message}");
        let (_, reason, _) = readiness(&Dependency::Ok, &Dependency::Missing("SecretNotFound", "x".into()));
        assert_eq!(reason, "SecretNotFound");
    }

    #[test]
    fn the_url_is_the_base_and_the_path() {
        assert_eq!(route_url(None, "a", "r"), "/alerts/a/r");
        assert_eq!(route_url(Some("https://mailroom.example/"), "a", "r"), "https://mailroom.example/alerts/a/r");
    }
}
