//! The token caches of all profiles, keyed by profile and scope.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::cache::TokenCache;
use super::credential::EntraApp;
use super::provider::TokenIssuer;
use super::schedule::TokenCacheConfig;

/// Every profile's [`TokenCache`], one per (profile key, scope). The profile key is the
/// controller's choice, e.g. `MailProfile/team-a/m365-graph`.
pub struct TokenCaches {
    config: TokenCacheConfig,
    caches: Mutex<HashMap<(String, String), Arc<TokenCache>>>,
}

impl TokenCaches {
    /// An empty registry whose caches use `config`.
    pub fn new(config: TokenCacheConfig) -> Self {
        TokenCaches { config, caches: Mutex::new(HashMap::new()) }
    }

    /// The cache of `profile` for `scope`, created for `app` if there is none. An existing
    /// cache asks `issuer` from now on (its trust roots may have changed) and keeps its token,
    /// unless `app` differs (a referenced Secret changed): then the credential is replaced and
    /// the token dropped at once.
    pub fn get_or_create(
        &self,
        profile: &str,
        scope: &str,
        app: EntraApp,
        issuer: Arc<dyn TokenIssuer>,
    ) -> Arc<TokenCache> {
        self.get_or_create_if(profile, scope, app, issuer, &|| true).expect("always live")
    }

    /// [`TokenCaches::get_or_create`], but no new cache when `live` says the profile is gone:
    /// `live` is asked under the registry's lock, the one [`TokenCaches::retain_only`] takes to
    /// stop a deleted profile's caches. A reconcile that began before its profile's deletion and
    /// gets here after the caches were stopped finds the profile gone (the watch's store drops
    /// it before the deletion is handled) and starts no refreshes the deletion would not stop.
    pub fn get_or_create_if(
        &self,
        profile: &str,
        scope: &str,
        app: EntraApp,
        issuer: Arc<dyn TokenIssuer>,
        live: &dyn Fn() -> bool,
    ) -> Option<Arc<TokenCache>> {
        let mut caches = self.lock();
        let key = (profile.to_owned(), scope.to_owned());
        if let Some(cache) = caches.get(&key) {
            cache.set_issuer(issuer);
            if *cache.app() != app {
                cache.replace_credential(app);
            }
            return Some(cache.clone());
        }
        if !live() {
            return None;
        }
        let cache = Arc::new(TokenCache::new(app, scope, issuer, self.config.clone()));
        caches.insert(key, cache.clone());
        Some(cache)
    }

    /// Removes every cache of `profile` (deleted, or no longer using OAuth) and stops them.
    pub fn remove_profile(&self, profile: &str) {
        self.lock().retain(|(key, _), cache| {
            let keep = key != profile;
            if !keep {
                cache.shutdown();
            }
            keep
        });
    }

    /// Removes and stops every cache of `profile` but the one for `scope` (none when `None`): the
    /// profile's transport or token scope changed, and a cache for a scope no longer used would
    /// otherwise refresh forever. Returns how many were removed.
    pub fn retain_only(&self, profile: &str, scope: Option<&str>) -> usize {
        let mut caches = self.lock();
        let before = caches.len();
        caches.retain(|(key, cached_scope), cache| {
            let keep = key != profile || Some(cached_scope.as_str()) == scope;
            if !keep {
                cache.shutdown();
            }
            keep
        });
        before - caches.len()
    }

    /// How many caches there are.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(String, String), Arc<TokenCache>>> {
        self.caches.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for TokenCaches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCaches").field("caches", &self.lock().len()).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_trait::async_trait;

    use super::*;
    use crate::auth::response::IssuedToken;
    use crate::auth::{AuthError, Credential, GRAPH_SCOPE, OUTLOOK_SCOPE, TokenSource};

    struct EchoIssuer;

    #[async_trait]
    impl TokenIssuer for EchoIssuer {
        async fn issue(&self, app: &EntraApp, scope: &str) -> Result<IssuedToken, AuthError> {
            let Credential::ClientSecret(secret) = &app.credential else {
                return Err(AuthError::Credential("secret only".into()));
            };
            Ok(IssuedToken { secret: format!("{secret}@{scope}"), lifetime: Duration::from_secs(3600) })
        }
    }

    fn app(secret: &str) -> EntraApp {
        EntraApp {
            authority_host: "https://login.example".into(),
            tenant_id: "t".into(),
            client_id: "c".into(),
            credential: Credential::ClientSecret(secret.into()),
        }
    }

    #[tokio::test]
    async fn one_cache_per_profile_and_scope() {
        let caches = TokenCaches::new(TokenCacheConfig::default());
        let issuer: Arc<dyn TokenIssuer> = Arc::new(EchoIssuer);
        let get = |profile: &str, scope: &str, secret: &str| {
            caches.get_or_create(profile, scope, app(secret), issuer.clone())
        };
        let graph = get("MailProfile/a/p", GRAPH_SCOPE, "s1");
        assert_eq!(graph.token().await.expect("token").secret, format!("s1@{GRAPH_SCOPE}"));
        let again = get("MailProfile/a/p", GRAPH_SCOPE, "s1");
        assert!(Arc::ptr_eq(&graph, &again));
        assert!(again.snapshot().expires_at.is_some(), "token kept");
        let outlook = get("MailProfile/a/p", OUTLOOK_SCOPE, "s1");
        assert!(!Arc::ptr_eq(&graph, &outlook));
        assert_eq!(outlook.scope(), OUTLOOK_SCOPE);
        assert_eq!(caches.len(), 2);

        // A changed Secret replaces the credential of the same cache.
        let changed = get("MailProfile/a/p", GRAPH_SCOPE, "s2");
        assert!(Arc::ptr_eq(&graph, &changed));
        assert_eq!(changed.token().await.expect("token").secret, format!("s2@{GRAPH_SCOPE}"));

        get("MailProfile/b/q", GRAPH_SCOPE, "s3");
        caches.remove_profile("MailProfile/a/p");
        assert!(cached(&caches, "MailProfile/a/p", GRAPH_SCOPE).is_none());
        assert!(cached(&caches, "MailProfile/a/p", OUTLOOK_SCOPE).is_none());
        assert!(cached(&caches, "MailProfile/b/q", GRAPH_SCOPE).is_some());
        assert_eq!(caches.len(), 1);
    }

    /// The cache of `profile` for `scope`, if there is one.
    fn cached(caches: &TokenCaches, profile: &str, scope: &str) -> Option<Arc<TokenCache>> {
        caches.lock().get(&(profile.to_owned(), scope.to_owned())).cloned()
    }

    /// Answers with short-lived tokens and counts the requests for each scope.
    #[derive(Default)]
    struct CountingIssuer {
        scopes: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl TokenIssuer for CountingIssuer {
        async fn issue(&self, _app: &EntraApp, scope: &str) -> Result<IssuedToken, AuthError> {
            self.scopes.lock().expect("lock").push(scope.to_string());
            Ok(IssuedToken { secret: format!("token@{scope}"), lifetime: Duration::from_secs(10) })
        }
    }

    impl CountingIssuer {
        fn count(&self, scope: &str) -> usize {
            self.scopes.lock().expect("lock").iter().filter(|s| *s == scope).count()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_scope_stops_the_old_cache() {
        let caches = TokenCaches::new(TokenCacheConfig::default());
        let (mine, theirs) = (Arc::new(CountingIssuer::default()), Arc::new(CountingIssuer::default()));
        let old = caches.get_or_create("MailProfile/a/p", GRAPH_SCOPE, app("s"), mine.clone());
        caches.get_or_create("MailProfile/b/q", GRAPH_SCOPE, app("s"), theirs.clone());
        old.token().await.expect("token");

        // The profile now asks for another scope (a national cloud, a tokenScope): only that cache stays.
        let new = caches.get_or_create("MailProfile/a/p", OUTLOOK_SCOPE, app("s"), mine.clone());
        assert_eq!(caches.retain_only("MailProfile/a/p", Some(OUTLOOK_SCOPE)), 1);
        assert!(cached(&caches, "MailProfile/a/p", GRAPH_SCOPE).is_none());
        assert!(Arc::ptr_eq(&cached(&caches, "MailProfile/a/p", OUTLOOK_SCOPE).expect("kept"), &new));
        assert!(cached(&caches, "MailProfile/b/q", GRAPH_SCOPE).is_some(), "another profile's cache is not touched");
        assert_eq!(caches.len(), 2);

        // The old cache no longer refreshes, though something may still hold it; the others do
        // (10 s tokens are refreshed every 5 s).
        let (old_scope, other) = (mine.count(GRAPH_SCOPE), theirs.count(GRAPH_SCOPE));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(mine.count(GRAPH_SCOPE), old_scope, "the old scope's cache refreshed");
        assert!(theirs.count(GRAPH_SCOPE) >= other + 10, "{}", theirs.count(GRAPH_SCOPE));
        assert!(mine.count(OUTLOOK_SCOPE) >= 10, "{}", mine.count(OUTLOOK_SCOPE));
        drop(old);

        // Graph to an SMTP relay: no scope at all.
        assert_eq!(caches.retain_only("MailProfile/a/p", None), 1);
        assert_eq!(caches.len(), 1);
        assert_eq!(caches.retain_only("MailProfile/a/p", None), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_profile_gone_gets_no_new_cache() {
        let caches = TokenCaches::new(TokenCacheConfig::default());
        let issuer = Arc::new(CountingIssuer::default());
        let kept = caches.get_or_create("MailProfile/a/p", GRAPH_SCOPE, app("s"), issuer.clone());
        // An existing cache is still handed out (the deletion that stops it has not run yet) ...
        let again = caches.get_or_create_if("MailProfile/a/p", GRAPH_SCOPE, app("s"), issuer.clone(), &|| false);
        assert!(again.is_some_and(|c| Arc::ptr_eq(&c, &kept)));
        // ... but once the deletion stopped it, a late reconcile creates none, and asks nothing.
        assert_eq!(caches.retain_only("MailProfile/a/p", None), 1);
        let late = caches.get_or_create_if("MailProfile/a/p", GRAPH_SCOPE, app("s"), issuer.clone(), &|| false);
        assert!(late.is_none());
        assert!(caches.is_empty());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let asked = issuer.count(GRAPH_SCOPE);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(issuer.count(GRAPH_SCOPE), asked);
        // A profile that exists again gets its cache.
        let live = caches.get_or_create_if("MailProfile/a/p", GRAPH_SCOPE, app("s"), issuer, &|| true);
        assert!(live.is_some());
        assert_eq!(caches.len(), 1);
    }
}
