//! Profiles as the profile controllers resolved them: settings, readiness, and a transport.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::api::{MailProfileSpec, ProfileKind};
use crate::transport::Transport;

/// Identifies a profile.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProfileKey {
    /// A MailProfile.
    Namespaced {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// A ClusterMailProfile.
    Cluster {
        /// Its name.
        name: String,
    },
}

impl ProfileKey {
    /// The key a message's `profileRef` names.
    pub fn for_message(namespace: &str, kind: ProfileKind, name: &str) -> Self {
        match kind {
            ProfileKind::MailProfile => ProfileKey::Namespaced { namespace: namespace.into(), name: name.into() },
            ProfileKind::ClusterMailProfile => ProfileKey::Cluster { name: name.into() },
        }
    }

    /// The profile's name.
    pub fn name(&self) -> &str {
        match self {
            ProfileKey::Namespaced { name, .. } | ProfileKey::Cluster { name } => name,
        }
    }
}

impl fmt::Display for ProfileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProfileKey::Namespaced { namespace, name } => {
                write!(f, "MailProfile {namespace}/{name}")
            }
            ProfileKey::Cluster { name } => write!(f, "ClusterMailProfile {name}"),
        }
    }
}

/// Why a profile cannot send now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotReady {
    /// A CamelCase reason (SecretNotFound, KeyNotFound, InvalidSettings, TokenRequestFailed...).
    pub reason: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// A profile the controllers have seen.
pub struct ResolvedProfile {
    /// Which profile.
    pub key: ProfileKey,
    /// Its sending settings.
    pub settings: MailProfileSpec,
    /// ClusterMailProfile only: which namespaces may use it.
    pub allowed_namespaces: Option<LabelSelector>,
    /// The transport when ready, or why not.
    pub state: Result<Arc<dyn Transport>, NotReady>,
    /// The token cache behind the transport (OAuth profiles).
    pub tokens: Option<Arc<crate::auth::TokenCache>>,
    /// A digest of what the transport was built from; the same digest reuses the transport.
    pub fingerprint: u64,
}

/// All resolved profiles.
#[derive(Default)]
pub struct ProfileRegistry {
    map: RwLock<HashMap<ProfileKey, Arc<ResolvedProfile>>>,
}

impl ProfileRegistry {
    /// The profile, if the controllers have resolved it.
    pub fn get(&self, key: &ProfileKey) -> Option<Arc<ResolvedProfile>> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }

    /// Records a profile's resolution.
    pub fn put(&self, profile: ResolvedProfile) {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        map.insert(profile.key.clone(), Arc::new(profile));
    }

    /// Forgets a deleted profile; returns what it was resolved to.
    pub fn remove(&self, key: &ProfileKey) -> Option<Arc<ResolvedProfile>> {
        self.map.write().unwrap_or_else(|e| e.into_inner()).remove(key)
    }

    /// The profiles resolved.
    pub fn keys(&self) -> Vec<ProfileKey> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }

    /// How many profiles are resolved.
    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
