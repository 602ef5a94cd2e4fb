//! Which unfinished messages name each profile, kept from the message watch.
//!
//! A profile that becomes ready (or is deleted, or changes why it is not) wakes the messages that
//! wait for it. Looking them up here costs the number of those messages, not a scan of every
//! message in the cache: with thousands of messages and hundreds of profiles, a scan per profile
//! change was most of the operator's work between sends.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::Event;

use super::registry::ProfileKey;
use crate::api::EmailMessage;

type ByProfile = HashMap<ProfileKey, HashSet<ObjectRef<EmailMessage>>>;

/// The unfinished messages of each profile, as the message watch last reported them.
#[derive(Default)]
pub struct UnfinishedMessages {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    current: ByProfile,
    /// Filled while the watch (re)lists, and swapped in once the list is complete, as the
    /// reflector swaps its store: a message deleted while the watch was down is then gone too.
    listing: Option<ByProfile>,
}

/// The profile a message names and how the index refers to the message; `None` without a
/// namespace (the API server always sets one).
fn entry(m: &EmailMessage) -> Option<(ProfileKey, ObjectRef<EmailMessage>)> {
    let ns = m.namespace()?;
    let key = ProfileKey::for_message(&ns, m.spec.profile_ref.kind(), &m.spec.profile_ref.name);
    // Name and namespace only: a reference is all a wake needs, and the index holds no more.
    Some((key, ObjectRef::new(&m.name_any()).within(&ns)))
}

/// Records `m` in `map` while it is unfinished, and drops it once it is finished or `deleted`.
fn record(map: &mut ByProfile, m: &EmailMessage, deleted: bool) {
    let Some((key, r)) = entry(m) else {
        return;
    };
    if !deleted && !m.is_finished() {
        map.entry(key).or_default().insert(r);
    } else if let Some(set) = map.get_mut(&key) {
        set.remove(&r);
        if set.is_empty() {
            map.remove(&key);
        }
    }
}

impl UnfinishedMessages {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows one event of the message watch (after the cache's stripping: the profile
    /// reference and the phase are kept).
    pub fn observe(&self, event: &Event<EmailMessage>) {
        let mut inner = self.lock();
        match event {
            Event::Apply(m) => record(&mut inner.current, m, false),
            Event::Delete(m) => record(&mut inner.current, m, true),
            Event::Init => inner.listing = Some(ByProfile::new()),
            Event::InitApply(m) => {
                let listing = inner.listing.get_or_insert_with(ByProfile::new);
                record(listing, m, false);
            }
            Event::InitDone => {
                if let Some(listed) = inner.listing.take() {
                    inner.current = listed;
                }
            }
        }
    }

    /// The unfinished messages that name `profile`.
    pub fn of(&self, profile: &ProfileKey) -> Vec<ObjectRef<EmailMessage>> {
        self.lock().current.get(profile).map(|set| set.iter().cloned().collect()).unwrap_or_default()
    }

    /// How many messages are unfinished, over all profiles.
    pub fn len(&self) -> usize {
        self.lock().current.values().map(HashSet::len).sum()
    }

    /// Whether no message is unfinished.
    pub fn is_empty(&self) -> bool {
        self.lock().current.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(ns: &str, name: &str, profile: serde_json::Value, phase: Option<&str>) -> EmailMessage {
        let mut m = serde_json::json!({
            "apiVersion": "mailroom.dev/v1alpha1", "kind": "EmailMessage",
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
            "spec": {"profileRef": profile, "to": ["b@contoso.com"], "subject": "s", "body": {"text": "t"}},
        });
        if let Some(phase) = phase {
            m["status"] = serde_json::json!({"phase": phase});
        }
        serde_json::from_value(m).expect("EmailMessage")
    }

    fn relay(ns: &str) -> ProfileKey {
        ProfileKey::Namespaced { namespace: ns.into(), name: "relay".into() }
    }

    fn names(index: &UnfinishedMessages, key: &ProfileKey) -> Vec<String> {
        let mut names: Vec<String> = index.of(key).into_iter().map(|r| r.name).collect();
        names.sort();
        names
    }

    #[test]
    fn unfinished_messages_are_found_by_their_profile() {
        let index = UnfinishedMessages::default();
        let mp = serde_json::json!({"name": "relay"});
        let cmp = serde_json::json!({"kind": "ClusterMailProfile", "name": "relay"});
        index.observe(&Event::Apply(message("a", "m1", mp.clone(), None)));
        index.observe(&Event::Apply(message("a", "m2", mp.clone(), Some("Pending"))));
        index.observe(&Event::Apply(message("a", "m3", mp.clone(), Some("Sending"))));
        index.observe(&Event::Apply(message("b", "m1", mp.clone(), None)));
        index.observe(&Event::Apply(message("a", "c1", cmp.clone(), None)));
        index.observe(&Event::Apply(message("b", "c2", cmp.clone(), None)));
        index.observe(&Event::Apply(message("a", "done", mp.clone(), Some("Sent"))));

        assert_eq!(names(&index, &relay("a")), ["m1", "m2", "m3"]);
        assert_eq!(names(&index, &relay("b")), ["m1"], "a MailProfile serves its own namespace");
        assert_eq!(names(&index, &ProfileKey::Cluster { name: "relay".into() }), ["c1", "c2"]);
        assert_eq!(index.len(), 6, "the Sent one is not waiting for anything");
        let r = index.of(&relay("b")).pop().expect("one");
        assert_eq!(r.namespace.as_deref(), Some("b"));

        // An update to a message seen before does not count it twice.
        index.observe(&Event::Apply(message("a", "m1", mp.clone(), Some("Pending"))));
        assert_eq!(index.len(), 6);
    }

    #[test]
    fn finished_and_deleted_messages_leave_the_index() {
        let index = UnfinishedMessages::default();
        let mp = serde_json::json!({"name": "relay"});
        index.observe(&Event::Apply(message("a", "m1", mp.clone(), None)));
        index.observe(&Event::Apply(message("a", "m2", mp.clone(), None)));
        index.observe(&Event::Apply(message("a", "m1", mp.clone(), Some("Sent"))));
        index.observe(&Event::Delete(message("a", "m2", mp.clone(), Some("Pending"))));
        assert!(index.of(&relay("a")).is_empty());
        assert!(index.is_empty(), "no empty set is kept for a profile");
        // Failed is finished too; deleting one never seen is nothing.
        index.observe(&Event::Apply(message("a", "m3", mp.clone(), Some("Failed"))));
        index.observe(&Event::Delete(message("a", "m4", mp, None)));
        assert_eq!(index.len(), 0);
    }

    #[test]
    fn a_relist_replaces_the_index_once_it_is_complete() {
        let index = UnfinishedMessages::default();
        let mp = serde_json::json!({"name": "relay"});
        index.observe(&Event::Apply(message("a", "kept", mp.clone(), None)));
        index.observe(&Event::Apply(message("a", "deleted-meanwhile", mp.clone(), None)));
        index.observe(&Event::Init);
        index.observe(&Event::InitApply(message("a", "kept", mp.clone(), Some("Pending"))));
        index.observe(&Event::InitApply(message("a", "new", mp.clone(), None)));
        index.observe(&Event::InitApply(message("a", "sent-meanwhile", mp, Some("Sent"))));
        // Until the list is complete, wakes go to what was known.
        assert_eq!(names(&index, &relay("a")), ["deleted-meanwhile", "kept"]);
        index.observe(&Event::InitDone);
        assert_eq!(names(&index, &relay("a")), ["kept", "new"]);
    }
}
