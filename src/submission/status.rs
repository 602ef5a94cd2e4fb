//! The SmtpCredentials' status: whether each can log in (its Secret holds a username and a
//! password, no other credential claims the username, its profile resolves), and its username.
//! Checked every [`CHECK_INTERVAL`] by each replica that listens, written only when it changes.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tracing::{debug, warn};

use crate::alerts::status::{Dependency, profile_state};
use crate::api::{SmtpCredential, condition, conditions, differs_beyond_transition_times, set_condition};

/// How often the credentials are checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// What a credential's Secret holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretState {
    /// A username and a non-empty password.
    Login(String),
    /// Why it cannot log in: a reason and a message.
    Unusable(&'static str, String),
}

/// The Ready condition's status, reason and message. `others`: the other credentials that claim
/// the same username (`namespace/name`).
pub fn readiness(secret: &SecretState, others: &[String], profile: &Dependency) -> (bool, &'static str, String) {
    match (secret, profile) {
        (SecretState::Unusable(reason, why), _) => (false, reason, format!("{why}; logins are refused")),
        (SecretState::Login(user), _) if !others.is_empty() => (
            false,
            "UsernameConflict",
            format!("the username {user} is also claimed by {}; it logs in as none of them", others.join(", ")),
        ),
        (SecretState::Login(_), Dependency::Missing(reason, why)) => {
            (false, reason, format!("{why}; mail gets 451 (try again later) until it resolves"))
        }
        (SecretState::Login(user), Dependency::Ok) => {
            (true, "Ready", format!("{user} may submit mail, sent with the profile"))
        }
    }
}

/// The key of a credential's Secret that is missing or empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissingKey {
    /// `username`.
    Username,
    /// `password`.
    Password,
}

/// The username and password a credential's Secret holds (the username without trailing white
/// space, the password without a trailing newline), or which of them is missing or empty. The
/// listener logs in with exactly this, and the status reports it.
pub fn login_of(secret: &Secret) -> Result<(&str, &[u8]), MissingKey> {
    let data = secret.data.as_ref();
    let get = |k: &str| data.and_then(|d| d.get(k)).map(|v| v.0.as_slice());
    let username = get("username").and_then(|u| std::str::from_utf8(u).ok()).map(str::trim_end).unwrap_or("");
    let password = get("password").map(crate::alerts::auth::stored_token).unwrap_or(b"");
    match (username.is_empty(), password.is_empty()) {
        (true, _) => Err(MissingKey::Username),
        (_, true) => Err(MissingKey::Password),
        _ => Ok((username, password)),
    }
}

/// The state of a credential's Secret, as the listener reads it.
pub fn secret_state(ns: &str, name: &str, secret: Option<&Secret>) -> SecretState {
    let Some(secret) = secret else {
        return SecretState::Unusable("SecretNotFound", format!("Secret {ns}/{name} not found"));
    };
    match login_of(secret) {
        Ok((username, _)) => SecretState::Login(username.to_string()),
        Err(MissingKey::Username) => {
            SecretState::Unusable("UsernameMissing", format!("Secret {ns}/{name} has no username"))
        }
        Err(MissingKey::Password) => {
            SecretState::Unusable("PasswordMissing", format!("Secret {ns}/{name} has no password"))
        }
    }
}

/// Checks and writes the credentials' status, forever.
pub async fn run(client: Client, namespace: Option<String>) {
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    loop {
        tick.tick().await;
        check(&client, namespace.as_deref()).await;
    }
}

async fn check(client: &Client, namespace: Option<&str>) {
    let api: Api<SmtpCredential> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let credentials = match api.list(&ListParams::default()).await {
        Ok(l) => l.items,
        Err(e) => {
            warn!(error = %e, "cannot list SmtpCredentials to check them");
            return;
        }
    };
    let mut states = Vec::with_capacity(credentials.len());
    for c in &credentials {
        let ns = c.namespace().unwrap_or_default();
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let secret = match secrets.get_opt(&c.spec.secret_ref.name).await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "cannot read an SmtpCredential's Secret now");
                return;
            }
        };
        states.push(secret_state(&ns, &c.spec.secret_ref.name, secret.as_ref()));
    }
    let mut claims: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (c, s) in credentials.iter().zip(&states) {
        if let SecretState::Login(user) = s {
            claims.entry(user).or_default().push(format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any()));
        }
    }
    for (c, state) in credentials.iter().zip(&states) {
        let ns = c.namespace().unwrap_or_default();
        let me = format!("{ns}/{}", c.name_any());
        let others: Vec<String> = match state {
            SecretState::Login(user) => {
                claims.get(user.as_str()).into_iter().flatten().filter(|o| **o != me).cloned().collect()
            }
            SecretState::Unusable(..) => Vec::new(),
        };
        let profile = match profile_state(client, &ns, &c.spec.profile_ref).await {
            Ok(p) => p,
            Err(e) => {
                debug!(credential = %me, error = %e, "cannot check the credential's profile now");
                continue;
            }
        };
        let (ok, reason, message) = readiness(state, &others, &profile);
        let before = c.status.clone().unwrap_or_default();
        let mut after = before.clone();
        let generation = c.metadata.generation;
        set_condition(
            &mut after.conditions,
            condition(&before.conditions, conditions::READY, ok, reason, message, generation, Time(Timestamp::now())),
        );
        after.username = match state {
            SecretState::Login(user) => Some(user.clone()),
            SecretState::Unusable(..) => None,
        };
        after.observed_generation = generation;
        if !differs_beyond_transition_times(&before, &after, |s| &mut s.conditions) {
            continue;
        }
        let patch = json!({"status": {
            "conditions": after.conditions,
            "username": after.username,
            "observedGeneration": after.observed_generation,
        }});
        let api: Api<SmtpCredential> = Api::namespaced(client.clone(), &ns);
        if let Err(e) = api.patch_status(&c.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
            debug!(credential = %me, error = %e, "credential status not written; retrying");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(pairs: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(pairs.iter().map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec()))).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn a_secret_needs_both_a_username_and_a_password() {
        assert_eq!(
            secret_state("t", "s", None),
            SecretState::Unusable("SecretNotFound", "Secret t/s not found".into())
        );
        let only_user = secret(&[("username", "u")]);
        assert!(matches!(secret_state("t", "s", Some(&only_user)), SecretState::Unusable("PasswordMissing", _)));
        let empty_pw = secret(&[("username", "u"), ("password", "\n")]);
        assert!(matches!(secret_state("t", "s", Some(&empty_pw)), SecretState::Unusable("PasswordMissing", _)));
        let no_user = secret(&[("password", "p")]);
        assert!(matches!(secret_state("t", "s", Some(&no_user)), SecretState::Unusable("UsernameMissing", _)));
        let ok = secret(&[("username", "grafana@team\n"), ("password", "p")]);
        assert_eq!(secret_state("t", "s", Some(&ok)), SecretState::Login("grafana@team".into()));
    }

    #[test]
    fn ready_needs_a_login_of_its_own_and_a_profile() {
        let login = SecretState::Login("u".into());
        let (ok, reason, _) = readiness(&login, &[], &Dependency::Ok);
        assert!(ok && reason == "Ready");
        let (ok, reason, message) = readiness(&login, &["b/other".into()], &Dependency::Ok);
        assert!(!ok && reason == "UsernameConflict" && message.contains("b/other"), "{message}");
        let missing = Dependency::Missing("ProfileNotFound", "MailProfile t/m not found".into());
        let (ok, reason, message) = readiness(&login, &[], &missing);
        assert!(!ok && reason == "ProfileNotFound" && message.contains("451"), "{message}");
        let unusable = SecretState::Unusable("SecretNotFound", "Secret t/s not found".into());
        let (ok, reason, _) = readiness(&unusable, &[], &Dependency::Ok);
        assert!(!ok && reason == "SecretNotFound");
    }
}
