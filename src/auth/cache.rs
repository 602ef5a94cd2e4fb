//! One profile's token for one scope: shared by all senders, refreshed in the background.

use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use backon::ExponentialBackoff;
use k8s_openapi::jiff::Timestamp;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::credential::EntraApp;
use super::provider::TokenIssuer;
use super::response::token_roles;
use super::schedule::{TokenCacheConfig, refresh_delay, retry_backoff, usable_for};
use super::{AccessToken, AuthError, TokenSource};

/// What the profile's status and the metrics show of a cache; never the token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenState {
    /// When the current token expires; `None` without one.
    pub expires_at: Option<Timestamp>,
    /// When a token was last obtained.
    pub last_refresh_time: Option<Timestamp>,
    /// Why the last request failed; `None` once one succeeds.
    pub last_error: Option<AuthError>,
    /// The `roles` claim of the current token (e.g. `Mail.Send`).
    pub roles: Vec<String>,
    /// Tokens obtained.
    pub refreshes: u64,
    /// Requests that failed.
    pub failures: u64,
}

/// A token for one profile and scope. Concurrent callers share one request; a background task
/// refreshes the token ahead of expiry and retries failures with backoff, so `token()` normally
/// answers from memory. Dropping the cache (or [`TokenCache::shutdown`]) stops the task.
pub struct TokenCache {
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    scope: String,
    config: TokenCacheConfig,
    state: Mutex<State>,
    /// Held for the whole of a request, so there is one at a time.
    flight: tokio::sync::Mutex<()>,
    /// Wakes the background task when the schedule changes.
    wake: Notify,
    status: watch::Sender<TokenState>,
}

struct State {
    app: Arc<EntraApp>,
    issuer: Arc<dyn TokenIssuer>,
    /// Bumped when the credential changes; a request begun before is discarded.
    generation: u64,
    /// Completed requests; a caller that waited for another's request takes its outcome.
    attempts: u64,
    cached: Option<Cached>,
    failure: Option<Failure>,
}

struct Cached {
    token: AccessToken,
    usable_until: Instant,
    refresh_at: Instant,
}

struct Failure {
    error: AuthError,
    retry_at: Instant,
    backoff: ExponentialBackoff,
}

/// The outcome of one request.
enum Attempt {
    Done(Result<AccessToken, AuthError>),
    /// The credential changed while the request was under way; its answer is void.
    Superseded,
}

impl State {
    fn usable(&self, now: Instant) -> Option<&AccessToken> {
        self.cached.as_ref().filter(|cached| now < cached.usable_until).map(|cached| &cached.token)
    }

    /// The last error while its retry is not yet due: callers get it without a new request, so
    /// a failing endpoint is asked at the backoff's pace, not once per message.
    fn pending_failure(&self, now: Instant) -> Option<&AuthError> {
        self.failure.as_ref().filter(|failure| now < failure.retry_at).map(|failure| &failure.error)
    }

    /// When the background task should next request a token; `None`: when woken.
    fn next_due(&self, prefetch: bool, now: Instant) -> Option<Instant> {
        match (&self.failure, &self.cached) {
            (Some(failure), _) => Some(failure.retry_at),
            (None, Some(cached)) => Some(cached.refresh_at),
            (None, None) if prefetch => Some(now),
            (None, None) => None,
        }
    }
}

impl TokenCache {
    /// A cache for `app` and `scope` asking `issuer`. Within a Tokio runtime it starts its
    /// background task (and, with `config.prefetch`, requests the first token at once);
    /// outside one it only requests tokens when asked.
    pub fn new(
        app: EntraApp,
        scope: impl Into<String>,
        issuer: Arc<dyn TokenIssuer>,
        config: TokenCacheConfig,
    ) -> Self {
        let shared = Arc::new(Shared {
            scope: scope.into(),
            config,
            state: Mutex::new(State {
                app: Arc::new(app),
                issuer,
                generation: 0,
                attempts: 0,
                cached: None,
                failure: None,
            }),
            flight: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            status: watch::Sender::new(TokenState::default()),
        });
        let task = tokio::runtime::Handle::try_current()
            .ok()
            .map(|runtime| runtime.spawn(refresh_in_background(shared.clone())));
        TokenCache { shared, task: Mutex::new(task) }
    }

    /// The scope tokens are requested for.
    pub fn scope(&self) -> &str {
        &self.shared.scope
    }

    /// The application and credential in use.
    pub fn app(&self) -> Arc<EntraApp> {
        self.shared.lock().app.clone()
    }

    /// Asks `issuer` from now on (e.g. built with a profile's changed CA bundle); the token is
    /// kept, since where it came from does not change whether it is valid.
    pub fn set_issuer(&self, issuer: Arc<dyn TokenIssuer>) {
        self.shared.lock().issuer = issuer;
    }

    /// Switches to a new credential (a referenced Secret changed): drops the token at once, and
    /// the next token comes from `app`. A request under way with the old one is discarded.
    pub fn replace_credential(&self, app: EntraApp) {
        {
            let mut state = self.shared.lock();
            state.app = Arc::new(app);
            state.generation += 1;
            state.cached = None;
            state.failure = None;
        }
        self.shared.status.send_modify(|status| {
            status.expires_at = None;
            status.roles.clear();
            status.last_error = None;
        });
        self.shared.wake.notify_one();
    }

    /// The current state, without the token.
    pub fn snapshot(&self) -> TokenState {
        self.shared.status.borrow().clone()
    }

    /// A receiver that sees every refresh and failure. Clone what you need out of `borrow()`
    /// rather than holding it across calls into the cache.
    pub fn subscribe(&self) -> watch::Receiver<TokenState> {
        self.shared.status.subscribe()
    }

    /// Stops the background refresh; tokens are then only requested when asked for.
    pub fn shutdown(&self) {
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            task.abort();
        }
    }

    /// Drops the token, and forgets a pending failure so the next caller asks at once.
    fn drop_token(&self, only: Option<&AccessToken>) {
        {
            let mut state = self.shared.lock();
            let matches = match (only, &state.cached) {
                (Some(token), Some(cached)) => cached.token.secret == token.secret,
                (Some(_), None) => false,
                (None, _) => true,
            };
            if !matches {
                return;
            }
            state.cached = None;
            state.failure = None;
        }
        self.shared.status.send_modify(|status| {
            status.expires_at = None;
        });
        self.shared.wake.notify_one();
    }
}

impl Drop for TokenCache {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("scope", &self.shared.scope)
            .field("state", &self.snapshot())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl TokenSource for TokenCache {
    async fn token(&self) -> Result<AccessToken, AuthError> {
        loop {
            let seen = {
                let state = self.shared.lock();
                let now = Instant::now();
                if let Some(token) = state.usable(now) {
                    return Ok(token.clone());
                }
                if let Some(error) = state.pending_failure(now) {
                    return Err(error.clone());
                }
                state.attempts
            };
            let flight = self.shared.flight.lock().await;
            {
                let state = self.shared.lock();
                if state.attempts != seen {
                    // Someone else's request finished while we waited: share its outcome.
                    if let Some(token) = state.usable(Instant::now()) {
                        return Ok(token.clone());
                    }
                    if let Some(failure) = &state.failure {
                        return Err(failure.error.clone());
                    }
                    continue;
                }
            }
            let attempt = self.shared.attempt().await;
            drop(flight);
            match attempt {
                Attempt::Done(outcome) => return outcome,
                Attempt::Superseded => continue,
            }
        }
    }

    fn invalidate(&self) {
        self.drop_token(None);
    }

    fn invalidate_token(&self, token: &AccessToken) {
        self.drop_token(Some(token));
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every await-free step, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One request to the issuer. The caller holds `flight`.
    async fn attempt(&self) -> Attempt {
        let (app, issuer, generation) = {
            let state = self.lock();
            (state.app.clone(), state.issuer.clone(), state.generation)
        };
        let started = Instant::now();
        let started_wall = Timestamp::now();
        let result = issuer.issue(&app, &self.scope).await;
        let now = Instant::now();

        let mut state = self.lock();
        if state.generation != generation {
            return Attempt::Superseded;
        }
        state.attempts += 1;
        let outcome = match result {
            Ok(issued) => {
                let token = AccessToken {
                    expires_at: started_wall.checked_add(issued.lifetime).unwrap_or(Timestamp::MAX),
                    secret: issued.secret,
                };
                state.cached = Some(Cached {
                    token: token.clone(),
                    usable_until: started + usable_for(issued.lifetime, &self.config),
                    refresh_at: started + refresh_delay(issued.lifetime, &self.config),
                });
                state.failure = None;
                let roles = token_roles(&token.secret);
                tracing::debug!(
                    client_id = %app.client_id,
                    scope = %self.scope,
                    expires_at = %token.expires_at,
                    "token obtained"
                );
                self.status.send_modify(|status| {
                    status.expires_at = Some(token.expires_at);
                    status.last_refresh_time = Some(Timestamp::now());
                    status.last_error = None;
                    status.roles = roles;
                    status.refreshes += 1;
                });
                Ok(token)
            }
            Err(error) => {
                let mut backoff = match state.failure.take() {
                    Some(failure) => failure.backoff,
                    None => retry_backoff(&self.config),
                };
                let delay = backoff.next().unwrap_or(self.config.retry_max);
                let mut retry_at = now + delay;
                // Try once more just before a still-valid old token stops being handed out.
                if let Some(cached) = state.cached.as_ref().filter(|c| c.usable_until > now) {
                    retry_at = retry_at.min(cached.usable_until);
                }
                state.failure = Some(Failure { error: error.clone(), retry_at, backoff });
                tracing::warn!(
                    client_id = %app.client_id,
                    scope = %self.scope,
                    retry_in = ?retry_at.saturating_duration_since(now),
                    error = %error,
                    "token request failed"
                );
                self.status.send_modify(|status| {
                    status.last_error = Some(error.clone());
                    status.failures += 1;
                });
                Err(error)
            }
        };
        drop(state);
        self.wake.notify_one();
        Attempt::Done(outcome)
    }
}

/// Requests a token whenever one is due: ahead of expiry, after a failure's backoff, and (with
/// prefetch) whenever there is none.
async fn refresh_in_background(shared: Arc<Shared>) {
    loop {
        let due = shared.lock().next_due(shared.config.prefetch, Instant::now());
        let woken = shared.wake.notified();
        match due {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = woken => continue,
                }
            }
            None => {
                woken.await;
                continue;
            }
        }
        let _flight = shared.flight.lock().await;
        // A caller may have requested a token while we waited for the flight.
        let now = Instant::now();
        let still_due = shared.lock().next_due(shared.config.prefetch, now).is_some_and(|at| at <= now);
        if still_due {
            shared.attempt().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::auth::Credential;
    use crate::auth::response::IssuedToken;

    /// Answers from a script; each answer is a lifetime (a token named after the request) or
    /// an error. Records the secret each request used.
    struct ScriptedIssuer {
        answers: Mutex<Vec<Result<u64, AuthError>>>,
        requests: AtomicUsize,
        secrets: Mutex<Vec<String>>,
        latency: Duration,
    }

    impl ScriptedIssuer {
        fn new(answers: Vec<Result<u64, AuthError>>) -> Arc<Self> {
            Arc::new(ScriptedIssuer {
                answers: Mutex::new(answers),
                requests: AtomicUsize::new(0),
                secrets: Mutex::new(Vec::new()),
                latency: Duration::from_millis(100),
            })
        }
        fn requests(&self) -> usize {
            self.requests.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl TokenIssuer for ScriptedIssuer {
        async fn issue(&self, app: &EntraApp, _scope: &str) -> Result<IssuedToken, AuthError> {
            let n = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
            if let Credential::ClientSecret(secret) = &app.credential {
                self.secrets.lock().expect("lock").push(secret.clone());
            }
            tokio::time::sleep(self.latency).await;
            let answer = {
                let mut answers = self.answers.lock().expect("lock");
                if answers.len() > 1 { answers.remove(0) } else { answers[0].clone() }
            };
            answer.map(|seconds| IssuedToken { secret: format!("token-{n}"), lifetime: Duration::from_secs(seconds) })
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

    fn cache(issuer: &Arc<ScriptedIssuer>, prefetch: bool) -> TokenCache {
        let config = TokenCacheConfig { prefetch, ..TokenCacheConfig::default() };
        TokenCache::new(app("one"), "scope", issuer.clone(), config)
    }

    /// How long until the background task requests a token.
    fn due_in(cache: &TokenCache) -> Option<Duration> {
        let now = Instant::now();
        cache.shared.lock().next_due(cache.shared.config.prefetch, now).map(|at| at.saturating_duration_since(now))
    }

    fn unavailable() -> AuthError {
        AuthError::Unavailable("token endpoint answered 503".into())
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_request() {
        let issuer = ScriptedIssuer::new(vec![Ok(3600)]);
        let cache = Arc::new(cache(&issuer, false));
        let calls = (0..50).map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.token().await })
        });
        for call in futures::future::join_all(calls).await {
            assert_eq!(call.expect("task").expect("token").secret, "token-1");
        }
        assert_eq!(issuer.requests(), 1);
        assert_eq!(cache.snapshot().refreshes, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_failure() {
        let issuer = ScriptedIssuer::new(vec![Err(unavailable())]);
        let cache = Arc::new(cache(&issuer, false));
        let calls = (0..20).map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.token().await })
        });
        for call in futures::future::join_all(calls).await {
            assert_eq!(call.expect("task"), Err(unavailable()));
        }
        assert_eq!(issuer.requests(), 1);
        // Within the backoff, callers get the error without a request.
        assert_eq!(cache.token().await, Err(unavailable()));
        assert_eq!(issuer.requests(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn prefetch_and_refresh_ahead_of_expiry() {
        let issuer = ScriptedIssuer::new(vec![Ok(3600)]);
        let cache = cache(&issuer, true);
        let mut status = cache.subscribe();
        status.changed().await.expect("first token");
        assert_eq!(issuer.requests(), 1);
        assert_eq!(due_in(&cache), Some(Duration::from_secs(2880) - Duration::from_millis(100)));
        // Just before the refresh point nothing happens; after it, one new token.
        tokio::time::sleep(Duration::from_secs(2879)).await;
        assert_eq!(issuer.requests(), 1);
        assert_eq!(cache.token().await.expect("cached").secret, "token-1");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(issuer.requests(), 2);
        assert_eq!(cache.token().await.expect("refreshed").secret, "token-2");
        assert_eq!(cache.snapshot().refreshes, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_refresh_keeps_the_old_token_and_retries_with_backoff() {
        let issuer = ScriptedIssuer::new(vec![Ok(600), Err(unavailable()), Err(unavailable()), Ok(600)]);
        let cache = cache(&issuer, true);
        assert_eq!(cache.token().await.expect("first").secret, "token-1");
        let mut status = cache.subscribe();
        // Refresh due at 300 s fails; the old token is still served.
        status.wait_for(|s| s.failures == 1).await.expect("first failure");
        assert_eq!(cache.token().await.expect("old").secret, "token-1");
        let failed = cache.snapshot();
        assert_eq!(failed.last_error, Some(unavailable()));
        assert!(failed.expires_at.is_some());
        // Retries within seconds (1 s, then 2 s, with jitter), then succeeds.
        let waited = Instant::now();
        status.wait_for(|s| s.refreshes == 2).await.expect("recovered");
        assert!(waited.elapsed() < Duration::from_secs(10), "{:?}", waited.elapsed());
        assert_eq!(issuer.requests(), 4);
        assert_eq!(cache.snapshot().last_error, None);
        assert_eq!(cache.snapshot().failures, 2);
        assert_eq!(cache.token().await.expect("new").secret, "token-4");
    }

    #[tokio::test(start_paused = true)]
    async fn replace_credential_drops_the_token_and_uses_the_new_secret() {
        let issuer = ScriptedIssuer::new(vec![Ok(3600)]);
        let cache = cache(&issuer, false);
        assert_eq!(cache.token().await.expect("first").secret, "token-1");
        cache.replace_credential(app("two"));
        assert_eq!(cache.snapshot().expires_at, None);
        assert_eq!(cache.token().await.expect("second").secret, "token-2");
        assert_eq!(*issuer.secrets.lock().expect("lock"), ["one", "two"]);
        assert_eq!(*cache.app(), app("two"));
    }

    #[tokio::test(start_paused = true)]
    async fn replace_credential_during_a_request_discards_its_answer() {
        let issuer = ScriptedIssuer::new(vec![Ok(3600)]);
        let cache = Arc::new(cache(&issuer, false));
        let first = tokio::spawn({
            let cache = cache.clone();
            async move { cache.token().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        cache.replace_credential(app("two"));
        let token = first.await.expect("task").expect("token");
        assert_eq!(token.secret, "token-2", "the old credential's token is void");
        assert_eq!(*issuer.secrets.lock().expect("lock"), ["one", "two"]);
    }

    #[tokio::test(start_paused = true)]
    async fn invalidate_drops_the_token() {
        let issuer = ScriptedIssuer::new(vec![Ok(3600)]);
        let cache = cache(&issuer, false);
        let first = cache.token().await.expect("first");
        cache.invalidate();
        assert_eq!(cache.token().await.expect("second").secret, "token-2");
        // Invalidating a token that was already replaced keeps the current one.
        cache.invalidate_token(&first);
        assert_eq!(cache.token().await.expect("kept").secret, "token-2");
        assert_eq!(issuer.requests(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_without_a_token_is_retried_in_the_background() {
        let rejected = AuthError::Rejected("AADSTS7000215: invalid client secret".into());
        let issuer = ScriptedIssuer::new(vec![Err(rejected.clone()), Ok(3600)]);
        let cache = cache(&issuer, true);
        let mut status = cache.subscribe();
        let failed = status.wait_for(|s| s.failures == 1).await.expect("fails").clone();
        assert_eq!(failed.last_error, Some(rejected.clone()));
        assert_eq!(cache.token().await, Err(rejected));
        status.wait_for(|s| s.refreshes == 1).await.expect("recovers");
        assert_eq!(cache.token().await.expect("token").secret, "token-2");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_the_background_task() {
        let issuer = ScriptedIssuer::new(vec![Ok(10)]);
        let cache = cache(&issuer, true);
        cache.token().await.expect("first");
        cache.shutdown();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(issuer.requests(), 1);
        // Still answers on demand.
        assert_eq!(cache.token().await.expect("on demand").secret, "token-2");
        drop(cache);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(issuer.requests(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_cache_stops_refreshing() {
        let issuer = ScriptedIssuer::new(vec![Ok(10)]);
        let cache = cache(&issuer, true);
        cache.token().await.expect("first");
        drop(cache);
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(issuer.requests(), 1);
        assert_eq!(Arc::strong_count(&issuer), 1, "the task released the issuer");
    }
}
