//! The profile reconciler: validate → dereference Secrets → build the transport → status.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::context::{Context, TokenFollower};
use super::registry::{NotReady, ProfileKey, ResolvedProfile};
use super::wiring::{self, Built, CredentialMaterial, TransportInputs};
use crate::api::{
    Cloud, ClusterMailProfile, EntraCredentials, MailProfile, MailProfileSpec, MailProfileStatus, SecretKeySelector,
    SecretReference, TokenStatus, condition, conditions, set_condition,
};
use crate::auth::{
    MAIL_SEND, PermissionVerdict, SMTP_SEND_AS_APP, SendEvidence, TokenCache, TokenState, verify_permissions,
};
use crate::error::{Error, Result};
use crate::metrics::ProfileLabels;
use crate::tls::TrustRoots;

/// Re-checks a profile this often even without changes (Secrets rotated outside a watch, etc.).
const RESYNC: Duration = Duration::from_secs(300);
/// Env var naming the federated token file (Azure Workload Identity).
pub const FEDERATED_TOKEN_ENV: &str = "AZURE_FEDERATED_TOKEN_FILE";

/// Reconciles a MailProfile.
pub async fn reconcile_namespaced(p: Arc<MailProfile>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = p.namespace().ok_or_else(|| Error::Invalid("MailProfile without namespace".into()))?;
    let key = ProfileKey::Namespaced { namespace: namespace.clone(), name: p.name_any() };
    let api: Api<MailProfile> = Api::namespaced(ctx.client.clone(), &namespace);
    let status = p.status.clone().unwrap_or_default();
    reconcile(&ctx, key, p.metadata.generation, &p.spec, None, &status, |patch| {
        let api = api.clone();
        let name = p.name_any();
        async move { api.patch_status(&name, &PatchParams::default(), &Patch::Merge(patch)).await.map(|_| ()) }
    })
    .await
}

/// Reconciles a ClusterMailProfile.
pub async fn reconcile_cluster(p: Arc<ClusterMailProfile>, ctx: Arc<Context>) -> Result<Action> {
    let key = ProfileKey::Cluster { name: p.name_any() };
    let api: Api<ClusterMailProfile> = Api::all(ctx.client.clone());
    let status = p.status.clone().unwrap_or_default();
    let settings = p.spec.settings();
    reconcile(&ctx, key, p.metadata.generation, &settings, p.spec.allowed_namespaces.clone(), &status, |patch| {
        let api = api.clone();
        let name = p.name_any();
        async move { api.patch_status(&name, &PatchParams::default(), &Patch::Merge(patch)).await.map(|_| ()) }
    })
    .await
}

async fn reconcile<F, Fut>(
    ctx: &Arc<Context>,
    key: ProfileKey,
    generation: Option<i64>,
    settings: &MailProfileSpec,
    allowed_namespaces: Option<LabelSelector>,
    status: &MailProfileStatus,
    write_status: F,
) -> Result<Action>
where
    F: FnOnce(serde_json::Value) -> Fut,
    Fut: std::future::Future<Output = Result<(), kube::Error>>,
{
    let (built, fingerprint) = resolve(ctx, &key, settings).await?;
    let now = Timestamp::now();
    let mut next = status.clone();
    next.observed_generation = generation;
    next.transport = Some(settings.transport_name().to_string());
    let tokens = built.as_ref().ok().and_then(|b| b.tokens.clone());
    // The token cache this build uses is the profile's only one: a cache for a scope it no longer
    // asks for (another cloud or tokenScope, Graph to SMTP, a profile that cannot be built) would
    // otherwise refresh forever.
    ctx.token_caches.retain_only(&key.to_string(), tokens.as_ref().map(|c| c.scope()));
    match &tokens {
        Some(cache) => follow_token(ctx, &key, cache),
        None => {
            ctx.unfollow(&key);
            ctx.metrics.forget_token_series(&super::message::profile_label(&key));
        }
    }
    if let Some(cache) = &tokens {
        let first = cache.snapshot();
        if first.expires_at.is_none() && first.last_error.is_none() {
            // The first token is on its way: wait for it briefly, so Ready says whether the
            // credential works before any message is sent.
            let _ = tokio::time::timeout(FIRST_TOKEN_WAIT, crate::auth::TokenSource::token(cache.as_ref())).await;
        }
    }
    let evidence = ctx.send_evidence(&key);
    let judged = judge(
        built.map(|b| b.transport),
        tokens.as_ref().map(|c| c.snapshot()),
        required_role(settings),
        evidence.as_ref(),
        now,
    );
    next.token = judged.token;
    match &judged.permissions {
        Some(v) => {
            let c = condition(
                &status.conditions,
                conditions::PERMISSIONS_VERIFIED,
                v.verified,
                v.reason,
                v.message.clone(),
                generation,
                Time(now),
            );
            set_condition(&mut next.conditions, c);
        }
        None => next.conditions.retain(|c| c.type_ != conditions::PERMISSIONS_VERIFIED),
    }
    let ready = match &judged.condition {
        Ok(message) => {
            condition(&status.conditions, conditions::READY, true, "Ready", message.clone(), generation, Time(now))
        }
        Err(nr) => condition(
            &status.conditions,
            conditions::READY,
            false,
            &nr.reason,
            nr.message.clone(),
            generation,
            Time(now),
        ),
    };
    set_condition(&mut next.conditions, ready);
    let resolved = ResolvedProfile {
        key: key.clone(),
        settings: settings.clone(),
        allowed_namespaces,
        state: judged.state,
        tokens,
        fingerprint,
    };
    let before = ctx.profiles.get(&key);
    let wake = wakes_messages(before.as_deref(), &resolved);
    drop(before);
    ctx.profiles.put(resolved);
    if !ctx.profile_exists(&key) {
        // Deleted while this reconcile ran: its Delete event may have been handled before the
        // entry above was made, so what the entry holds is freed here.
        forget(ctx, &key);
        return Ok(Action::await_change());
    }
    ctx.update_gauges();
    if differs(status, &next) {
        write_status(status_patch(status, &next)).await?;
    }
    if wake {
        wake_messages(ctx, &key);
    }
    Ok(Action::requeue(RESYNC))
}

/// Whether a profile's resolution is news to the messages that wait for it: the profile is new
/// to this process, it became ready, it is not ready for another reason (their `Waiting`
/// condition names it), or its settings or credential changed (another sender list, limits,
/// transport). A resync or a token refresh that finds it as it was wakes nobody: its waiting
/// messages are in their mailbox's queue, which wakes them itself.
pub fn wakes_messages(before: Option<&ResolvedProfile>, after: &ResolvedProfile) -> bool {
    let Some(before) = before else {
        return true;
    };
    let seen = |p: &ResolvedProfile| p.state.as_ref().map(|_| ()).map_err(Clone::clone);
    seen(before) != seen(after)
        || before.fingerprint != after.fingerprint
        || before.settings != after.settings
        || before.allowed_namespaces != after.allowed_namespaces
}

/// How long a reconcile waits for a new profile's first token.
const FIRST_TOKEN_WAIT: Duration = Duration::from_secs(15);

/// What a profile's status and registry entry say, given its transport and token state.
pub struct Judgement {
    /// The transport for messages, or why they must wait.
    pub state: Result<Arc<dyn crate::transport::Transport>, NotReady>,
    /// The Ready condition: Ok(message) or the reason it is not ready.
    pub condition: Result<String, NotReady>,
    /// `status.token`.
    pub token: Option<TokenStatus>,
    /// The `PermissionsVerified` condition of a profile with a token.
    pub permissions: Option<PermissionVerdict>,
}

/// Decides readiness from the transport and the token cache's state. A failed refresh while the
/// current token is still valid keeps messages flowing but shows `Ready=False`, so people see it
/// before the token runs out. The token's roles never hold messages back: an app authorised
/// through Exchange Online RBAC for Applications gets tokens without them
/// ([`crate::auth::verify_permissions`]); they only inform `PermissionsVerified`.
pub fn judge(
    transport: Result<Arc<dyn crate::transport::Transport>, NotReady>,
    token: Option<TokenState>,
    required_role: Option<&str>,
    evidence: Option<&SendEvidence>,
    now: Timestamp,
) -> Judgement {
    let transport = match transport {
        Ok(t) => t,
        Err(nr) => return Judgement { state: Err(nr.clone()), condition: Err(nr), token: None, permissions: None },
    };
    let Some(token) = token else {
        return Judgement {
            state: Ok(transport),
            condition: Ok("profile can send".into()),
            token: None,
            permissions: None,
        };
    };
    let status = TokenStatus {
        expires_at: token.expires_at.map(Time),
        last_refresh_time: token.last_refresh_time.map(Time),
        roles: token.roles.clone(),
    };
    let valid = token.expires_at.is_some_and(|e| e > now);
    let permissions = (valid || token.last_refresh_time.is_some())
        .then(|| required_role.map(|role| verify_permissions(role, &token.roles, evidence)))
        .flatten();
    let (state, condition) = match (&token.last_error, valid) {
        (Some(err), true) => (
            Ok(transport),
            Err(NotReady {
                reason: "TokenRefreshFailed".into(),
                message: format!("{err}; the current token stays in use until it expires"),
            }),
        ),
        (Some(err), false) => {
            let nr = NotReady { reason: "TokenRequestFailed".into(), message: err.to_string() };
            (Err(nr.clone()), Err(nr))
        }
        (None, true) => (Ok(transport), Ok("token acquired; profile can send".into())),
        (None, false) => {
            let nr = NotReady {
                reason: "TokenPending".into(),
                message: "waiting for the first token from Microsoft Entra ID".into(),
            };
            (Err(nr.clone()), Err(nr))
        }
    };
    Judgement { state, condition, token: Some(status), permissions }
}

/// The application role a profile's app needs to send: `Mail.Send` for Graph,
/// `SMTP.SendAsApp` for SMTP with OAuth 2.0.
pub fn required_role(settings: &MailProfileSpec) -> Option<&'static str> {
    if settings.graph.is_some() {
        return Some(MAIL_SEND);
    }
    settings.smtp.as_ref().and_then(|s| s.oauth2()).map(|_| SMTP_SEND_AS_APP)
}

/// Re-reconciles the profile whenever its token cache refreshes or fails, and keeps the token
/// metrics. One follower per profile, for the cache its transport uses; it is stopped when the
/// profile is forgotten or no longer has that cache.
fn follow_token(ctx: &Arc<Context>, key: &ProfileKey, cache: &Arc<TokenCache>) {
    let mut followers = ctx.followers.lock().unwrap_or_else(|e| e.into_inner());
    if followers.get(key).is_some_and(|f| f.follows(cache)) {
        return;
    }
    let mut rx = cache.subscribe();
    let label = ProfileLabels { profile: super::message::profile_label(key) };
    let metrics = Arc::clone(&ctx.metrics);
    let (mp, cmp) = (ctx.wake_profile.clone(), ctx.wake_cluster_profile.clone());
    let target = key.clone();
    let task = tokio::spawn(async move {
        let (mut refreshes, mut failures) = (0u64, 0u64);
        loop {
            let state = rx.borrow_and_update().clone();
            metrics.token_refreshes.get_or_create(&label).inc_by(state.refreshes.saturating_sub(refreshes));
            metrics.token_failures.get_or_create(&label).inc_by(state.failures.saturating_sub(failures));
            (refreshes, failures) = (state.refreshes, state.failures);
            if let Some(exp) = state.expires_at {
                metrics.token_expiry(&label.profile, exp, Timestamp::now());
            }
            let sent = match &target {
                ProfileKey::Namespaced { namespace, name } => mp.send(ObjectRef::new(name).within(namespace)).is_ok(),
                ProfileKey::Cluster { name } => cmp.send(ObjectRef::new(name)).is_ok(),
            };
            // The cache is gone (its last holder dropped it), or the controller stopped.
            if !sent || rx.changed().await.is_err() {
                break;
            }
        }
    });
    // Replacing the old follower (of the cache for another scope) stops it.
    followers.insert(key.clone(), TokenFollower::new(cache, task.abort_handle()));
}

/// The profiles to forget after an event of a profile watch: the one deleted, or, once a
/// (re)list is complete, each profile of this kind that this process holds (`held`) and the
/// list does not have (`listed`): a deletion the watch missed while it was down.
pub fn departed<K: kube::Resource>(
    event: &watcher::Event<K>,
    key_of: impl Fn(&K) -> Option<ProfileKey>,
    held: impl IntoIterator<Item = ProfileKey>,
    listed: impl Fn(&ProfileKey) -> bool,
) -> Vec<ProfileKey> {
    match event {
        watcher::Event::Delete(p) => key_of(p).into_iter().collect(),
        watcher::Event::InitDone => {
            let mut gone: Vec<ProfileKey> = held.into_iter().filter(|k| !listed(k)).collect();
            gone.sort();
            gone
        }
        watcher::Event::Apply(_) | watcher::Event::Init | watcher::Event::InitApply(_) => Vec::new(),
    }
}

/// Follows the MailProfile watch (after its store): frees what deleted MailProfiles held.
pub fn observe_mail_profiles(ctx: &Context, event: &watcher::Event<MailProfile>) {
    let key_of = |p: &MailProfile| Some(ProfileKey::Namespaced { namespace: p.namespace()?, name: p.name_any() });
    let held = ctx.held_profiles().into_iter().filter(|k| matches!(k, ProfileKey::Namespaced { .. }));
    for key in departed(event, key_of, held, |k| ctx.profile_exists(k)) {
        forget(ctx, &key);
    }
}

/// Follows the ClusterMailProfile watch (after its store): frees what deleted ones held.
pub fn observe_cluster_profiles(ctx: &Context, event: &watcher::Event<ClusterMailProfile>) {
    let key_of = |p: &ClusterMailProfile| Some(ProfileKey::Cluster { name: p.name_any() });
    let held = ctx.held_profiles().into_iter().filter(|k| matches!(k, ProfileKey::Cluster { .. }));
    for key in departed(event, key_of, held, |k| ctx.profile_exists(k)) {
        forget(ctx, &key);
    }
}

/// Forgets a deleted profile, all at once: its registry entry (and with it the transport), its
/// token caches and their follower, its mailboxes' limits and queues, what its sends told, and
/// its token metrics; then wakes its unfinished messages, which now wait for the profile.
pub fn forget(ctx: &Context, key: &ProfileKey) {
    let name = key.to_string();
    let resolved = ctx.profiles.remove(key).is_some();
    let caches = ctx.token_caches.retain_only(&name, None);
    ctx.unfollow(key);
    ctx.limits.forget_profile(&name);
    ctx.forget_send_evidence(key);
    ctx.metrics.forget_token_series(&super::message::profile_label(key));
    ctx.update_gauges();
    if caches > 0 {
        tracing::info!(profile = %key, "profile deleted: its token refreshes stopped");
    } else if resolved {
        tracing::info!(profile = %key, "profile deleted: its transport and limits freed");
    }
    // Its messages waiting for a turn were in the queues just dropped: they now wait for the profile.
    wake_messages(ctx, key);
}

/// The merge patch from `before` to `next`: a profile that no longer has a token (Graph to an
/// SMTP relay) loses `status.token`, which leaving the field out would keep.
fn status_patch(before: &MailProfileStatus, next: &MailProfileStatus) -> serde_json::Value {
    let mut patch = json!({ "status": next });
    if before.token.is_some() && next.token.is_none() {
        patch["status"]["token"] = serde_json::Value::Null;
    }
    patch
}

fn differs(a: &MailProfileStatus, b: &MailProfileStatus) -> bool {
    crate::api::differs_beyond_transition_times(a, b, |s| &mut s.conditions)
}

/// Wakes the unfinished messages that name this profile (from the index: no scan of the cache).
pub fn wake_messages(ctx: &Context, key: &ProfileKey) {
    let waiting = ctx.unfinished.of(key);
    tracing::debug!(profile = %key, messages = waiting.len(), "waking the profile's unfinished messages");
    for m in waiting {
        let _ = ctx.wake.send(m);
    }
}

type Resolution = (Result<Built, NotReady>, u64);

/// The profile's transport, or why it cannot have one, and the digest of its inputs. API errors
/// are returned as errors. An unchanged profile keeps its transport (and what it has learned).
async fn resolve(ctx: &Context, key: &ProfileKey, settings: &MailProfileSpec) -> Result<Resolution> {
    let policy = ctx.config.endpoint_policy();
    let live = || ctx.profile_exists(key);
    let inputs = match transport_inputs(&ctx.client, key, settings, &ctx.config.trust, policy).await? {
        Ok(inputs) => TransportInputs { live: &live, ..inputs },
        Err(nr) => return Ok((Err(nr), 0)),
    };
    let fingerprint = {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let mut h = DefaultHasher::new();
        serde_json::to_string(settings).unwrap_or_default().hash(&mut h);
        inputs.credential.hash(&mut h);
        h.finish()
    };
    if let Some(existing) = ctx.profiles.get(key) {
        if existing.fingerprint == fingerprint
            && let Ok(transport) = &existing.state
        {
            return Ok((Ok(Built { transport: Arc::clone(transport), tokens: existing.tokens.clone() }), fingerprint));
        }
        if existing.fingerprint != fingerprint {
            // Another app, credential or endpoint: what sends told of the old one no longer holds.
            ctx.forget_send_evidence(key);
        }
    }
    Ok((wiring::build_transport(inputs, &ctx.token_caches).await, fingerprint))
}

/// What a profile's transport is built from: its settings checked against the endpoint policy,
/// its credential read from its Secret (or file), and its trust roots (`base` plus its
/// caBundle); or why it cannot have one. API errors are returned as errors. The controller and
/// `mailroom profile check` both take this step.
pub async fn transport_inputs<'a>(
    client: &Client,
    key: &ProfileKey,
    settings: &'a MailProfileSpec,
    base: &TrustRoots,
    policy: EndpointPolicy,
) -> Result<Result<TransportInputs<'a>, NotReady>> {
    if let Err(nr) = validate(key, settings, policy) {
        return Ok(Err(nr));
    }
    let credential = match read_credential(client, key, settings).await? {
        Ok(c) => c,
        Err(nr) => return Ok(Err(nr)),
    };
    let trust = match profile_trust(base, settings) {
        Ok(trust) => trust,
        Err(nr) => return Ok(Err(nr)),
    };
    Ok(Ok(TransportInputs {
        profile: key.to_string(),
        settings,
        credential,
        trust,
        allow_insecure: policy.allow_insecure,
        live: &|| true,
    }))
}

/// The roots a profile's endpoints are checked against: `base` (the operator's) plus its caBundle.
fn profile_trust(base: &TrustRoots, settings: &MailProfileSpec) -> Result<TrustRoots, NotReady> {
    match &settings.ca_bundle {
        Some(pem) => TrustRoots::from_pem(pem.as_bytes())
            .map(|extra| base.with(&extra))
            .map_err(|e| invalid(format!("caBundle: {e}"))),
        None => Ok(base.clone()),
    }
}

fn invalid(message: String) -> NotReady {
    NotReady { reason: "InvalidSettings".into(), message }
}

/// Which endpoints a profile may name besides Microsoft's cloud endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// Plain `http://` endpoints (the operator's `--allow-insecure-endpoints`; local testing only).
    /// Such an endpoint is never Microsoft's, so this admits custom endpoints as well.
    pub allow_insecure: bool,
    /// Authority hosts and Graph endpoints other than Microsoft's in namespaced MailProfiles
    /// (the operator's `--allow-custom-endpoints`).
    pub allow_custom: bool,
}

impl EndpointPolicy {
    /// Whether the profile `key` may name an endpoint that is not one of Microsoft's. A
    /// ClusterMailProfile is written by a cluster administrator; a MailProfile by a namespace's
    /// users, who must not point the operator at arbitrary internal URLs.
    fn custom_allowed(&self, key: &ProfileKey) -> bool {
        self.allow_custom || self.allow_insecure || matches!(key, ProfileKey::Cluster { .. })
    }
}

/// Checks what the CRD schema cannot: endpoints, the SMTP server, the token scope, and which
/// namespaces Secret references name.
fn validate(key: &ProfileKey, settings: &MailProfileSpec, policy: EndpointPolicy) -> Result<(), NotReady> {
    let check_url = |field: &str, url: &str, microsoft: fn(&str) -> bool, known: &str| -> Result<(), NotReady> {
        if url.starts_with("http://") && !policy.allow_insecure {
            return Err(invalid(format!(
                "{field} {url} is plain http; only https is allowed (the operator's --allow-insecure-endpoints is for local testing)"
            )));
        }
        if !url.starts_with("https://") && !url.starts_with("http://") {
            return Err(invalid(format!("{field} {url} must be an https:// URL")));
        }
        if !microsoft(url) && !policy.custom_allowed(key) {
            return Err(invalid(format!(
                "{field} {url} is not one of Microsoft's ({known}); a MailProfile may only use Microsoft's cloud endpoints (set cloud instead), custom endpoints need a ClusterMailProfile or the operator's --allow-custom-endpoints"
            )));
        }
        Ok(())
    };
    let entra = |prefix: &str, c: &EntraCredentials| -> Result<(), NotReady> {
        check_url(
            &format!("{prefix}.authorityHost"),
            c.authority_host(),
            Cloud::is_authority_host,
            &known_authorities(),
        )?;
        if let Some(scope) = &c.token_scope
            && (scope.trim().is_empty() || scope.trim().contains(char::is_whitespace))
        {
            return Err(invalid(format!("{prefix}.tokenScope {scope:?} must be one scope, without spaces")));
        }
        let count = [c.client_secret_ref.is_some(), c.certificate_ref.is_some(), c.workload_identity.is_some()]
            .iter()
            .filter(|x| **x)
            .count();
        if count != 1 {
            return Err(invalid(format!(
                "{prefix}: set exactly one of clientSecretRef, certificateRef, workloadIdentity"
            )));
        }
        if let Some(r) = &c.client_secret_ref {
            check_ref_namespace(key, &format!("{prefix}.clientSecretRef"), r.namespace.as_deref())?;
        }
        if let Some(r) = &c.certificate_ref {
            check_ref_namespace(key, &format!("{prefix}.certificateRef"), r.namespace.as_deref())?;
        }
        Ok(())
    };
    match (&settings.graph, &settings.smtp) {
        (Some(g), None) => {
            check_url("graph.endpoint", g.endpoint(), |u| Cloud::of_graph_endpoint(u).is_some(), &known_graph())?;
            entra("graph", &g.credentials)?;
        }
        (None, Some(s)) => {
            if s.server().is_none() {
                let cloud = s.oauth2().map(|o| o.cloud()).unwrap_or_default();
                return Err(invalid(format!(
                    "smtp.host is not set, and Microsoft publishes no SMTP AUTH host for the {cloud:?} cloud: set smtp.host"
                )));
            }
            if let Some(auth) = &s.auth {
                match (&auth.password, &auth.oauth2) {
                    (Some(p), None) => {
                        check_ref_namespace(key, "smtp.auth.password.secretRef", p.secret_ref.namespace.as_deref())?
                    }
                    (None, Some(o)) => entra("smtp.auth.oauth2", o)?,
                    _ => {
                        return Err(invalid("smtp.auth needs exactly one of password or oauth2".into()));
                    }
                }
            }
        }
        _ => {
            return Err(invalid("a profile needs exactly one transport: graph or smtp".into()));
        }
    }
    Ok(())
}

fn known_authorities() -> String {
    let mut hosts: Vec<&str> = Cloud::ALL.iter().map(|c| c.endpoints().authority_host).collect();
    hosts.dedup();
    hosts.join(", ")
}

fn known_graph() -> String {
    Cloud::ALL.iter().map(|c| c.endpoints().graph_endpoint).collect::<Vec<_>>().join(", ")
}

fn check_ref_namespace(key: &ProfileKey, field: &str, namespace: Option<&str>) -> Result<(), NotReady> {
    match (key, namespace) {
        (ProfileKey::Namespaced { namespace: own, .. }, Some(ns)) if ns != own => Err(invalid(format!(
            "{field} names namespace {ns}; a MailProfile may only use Secrets in its own namespace {own}"
        ))),
        (ProfileKey::Cluster { .. }, None) => {
            Err(invalid(format!("{field} needs a namespace: a ClusterMailProfile's Secret references carry one")))
        }
        _ => Ok(()),
    }
}

fn secret_namespace(key: &ProfileKey, explicit: Option<&str>) -> String {
    match key {
        ProfileKey::Namespaced { namespace, .. } => namespace.clone(),
        ProfileKey::Cluster { .. } => explicit.unwrap_or_default().to_string(),
    }
}

/// Reads the credential a profile's Secrets (or token file) hold; Err(NotReady) says what is
/// missing in the words of the Ready condition, an outer error is an API failure.
async fn read_credential(
    client: &Client,
    key: &ProfileKey,
    settings: &MailProfileSpec,
) -> Result<Result<CredentialMaterial, NotReady>> {
    let entra = match (&settings.graph, &settings.smtp) {
        (Some(g), _) => Some(&g.credentials),
        (None, Some(s)) => match &s.auth {
            None => return Ok(Ok(CredentialMaterial::None)),
            Some(a) => match (&a.password, &a.oauth2) {
                (Some(p), _) => return read_password(client, key, &p.secret_ref).await,
                (None, Some(o)) => Some(o),
                (None, None) => None,
            },
        },
        (None, None) => None,
    };
    let Some(c) = entra else {
        return Ok(Err(invalid("no transport".into())));
    };
    if let Some(r) = &c.client_secret_ref {
        return Ok(read_key(client, key, r)
            .await?
            .map(|v| CredentialMaterial::ClientSecret(String::from_utf8_lossy(&v).trim().to_string())));
    }
    if let Some(r) = &c.certificate_ref {
        return read_certificate(client, key, r).await;
    }
    if let Some(w) = &c.workload_identity {
        let path = w.token_file.clone().or_else(|| std::env::var(FEDERATED_TOKEN_ENV).ok());
        return Ok(match path {
            Some(p) if !p.is_empty() => Ok(CredentialMaterial::FederatedTokenFile(PathBuf::from(p))),
            _ => Err(NotReady {
                reason: "FederatedTokenMissing".into(),
                message: format!(
                    "workloadIdentity: no tokenFile given and {FEDERATED_TOKEN_ENV} is not set (is the azure.workload.identity/use label on the operator's pod?)"
                ),
            }),
        });
    }
    Ok(Err(invalid("no credential".into())))
}

async fn get_secret(client: &Client, namespace: &str, name: &str) -> Result<Result<Secret, NotReady>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    Ok(match api.get_opt(name).await? {
        Some(s) => Ok(s),
        None => {
            Err(NotReady { reason: "SecretNotFound".into(), message: format!("Secret {namespace}/{name} not found") })
        }
    })
}

/// A key of a Secret read from the API server, which returns `data` only (`stringData` is
/// write-only: the API server merges it into `data`).
fn secret_value(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    secret.data.as_ref().and_then(|d| d.get(key)).map(|v| v.0.clone())
}

fn key_missing(namespace: &str, name: &str, key: &str) -> NotReady {
    NotReady { reason: "KeyNotFound".into(), message: format!("Secret {namespace}/{name} has no key {key}") }
}

async fn read_key(client: &Client, key: &ProfileKey, r: &SecretKeySelector) -> Result<Result<Vec<u8>, NotReady>> {
    let ns = secret_namespace(key, r.namespace.as_deref());
    let secret = match get_secret(client, &ns, &r.name).await? {
        Ok(s) => s,
        Err(nr) => return Ok(Err(nr)),
    };
    Ok(secret_value(&secret, &r.key).filter(|v| !v.is_empty()).ok_or_else(|| key_missing(&ns, &r.name, &r.key)))
}

/// Two keys of one Secret (a login, or a certificate and its key).
async fn read_two_keys(
    client: &Client,
    key: &ProfileKey,
    r: &SecretReference,
    names: [&str; 2],
) -> Result<Result<[Vec<u8>; 2], NotReady>> {
    let ns = secret_namespace(key, r.namespace.as_deref());
    let secret = match get_secret(client, &ns, &r.name).await? {
        Ok(s) => s,
        Err(nr) => return Ok(Err(nr)),
    };
    let mut values = [Vec::new(), Vec::new()];
    for (value, name) in values.iter_mut().zip(names) {
        match secret_value(&secret, name) {
            Some(v) => *value = v,
            None => return Ok(Err(key_missing(&ns, &r.name, name))),
        }
    }
    Ok(Ok(values))
}

async fn read_password(
    client: &Client,
    key: &ProfileKey,
    r: &SecretReference,
) -> Result<Result<CredentialMaterial, NotReady>> {
    Ok(read_two_keys(client, key, r, ["username", "password"]).await?.map(|[user, pass]| {
        CredentialMaterial::Password {
            username: String::from_utf8_lossy(&user).trim().to_string(),
            password: String::from_utf8_lossy(&pass).to_string(),
        }
    }))
}

async fn read_certificate(
    client: &Client,
    key: &ProfileKey,
    r: &SecretReference,
) -> Result<Result<CredentialMaterial, NotReady>> {
    Ok(read_two_keys(client, key, r, ["tls.crt", "tls.key"])
        .await?
        .map(|[cert_pem, key_pem]| CredentialMaterial::Certificate { cert_pem, key_pem }))
}

/// The Secrets (namespace, name) a profile references, for the Secret watch.
pub fn referenced_secrets(key: &ProfileKey, settings: &MailProfileSpec) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut entra = |c: &EntraCredentials| {
        if let Some(r) = &c.client_secret_ref {
            out.push((secret_namespace(key, r.namespace.as_deref()), r.name.clone()));
        }
        if let Some(r) = &c.certificate_ref {
            out.push((secret_namespace(key, r.namespace.as_deref()), r.name.clone()));
        }
    };
    if let Some(g) = &settings.graph {
        entra(&g.credentials);
    }
    if let Some(auth) = settings.smtp.as_ref().and_then(|s| s.auth.as_ref()) {
        if let Some(o) = &auth.oauth2 {
            entra(o);
        }
        if let Some(p) = &auth.password {
            out.push((secret_namespace(key, p.secret_ref.namespace.as_deref()), p.secret_ref.name.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{GraphTransport, Senders, SmtpTransport, WorkloadIdentity};

    fn graph(endpoint: &str, secret_ns: Option<&str>) -> MailProfileSpec {
        MailProfileSpec {
            senders: Senders { default: "a@contoso.com".into(), allowed: None },
            graph: Some(GraphTransport {
                credentials: EntraCredentials {
                    tenant_id: "t".into(),
                    client_id: "c".into(),
                    client_secret_ref: Some(SecretKeySelector {
                        name: "s".into(),
                        key: "k".into(),
                        namespace: secret_ns.map(Into::into),
                    }),
                    certificate_ref: None,
                    workload_identity: None,
                    cloud: None,
                    authority_host: None,
                    token_scope: None,
                },
                save_to_sent_items: None,
                endpoint: Some(endpoint.into()),
            }),
            smtp: None,
            limits: None,
            recipient_domains: None,
            ca_bundle: None,
            idempotency_retention_seconds: None,
        }
    }

    fn ns_key() -> ProfileKey {
        ProfileKey::Namespaced { namespace: "team-a".into(), name: "p".into() }
    }

    struct NoTransport;

    #[async_trait::async_trait]
    impl crate::transport::Transport for NoTransport {
        async fn send(
            &self,
            _: &crate::transport::OutgoingMessage,
        ) -> Result<crate::transport::Delivered, crate::transport::SendError> {
            Err(crate::transport::SendError::permanent("not used"))
        }
    }

    fn token(roles: &[&str], error: Option<&str>, expires_in: i64) -> TokenState {
        TokenState {
            expires_at: Some(Timestamp::from_second(1_000 + expires_in).unwrap()),
            last_refresh_time: Some(Timestamp::from_second(900).unwrap()),
            last_error: error.map(|e| crate::auth::AuthError::Rejected(e.into())),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            refreshes: 1,
            failures: 0,
        }
    }

    fn judged(t: TokenState, role: Option<&str>) -> Judgement {
        judge(Ok(Arc::new(NoTransport)), Some(t), role, None, Timestamp::from_second(1_000).unwrap())
    }

    const STRICT: EndpointPolicy = EndpointPolicy { allow_insecure: false, allow_custom: false };
    const CUSTOM: EndpointPolicy = EndpointPolicy { allow_insecure: false, allow_custom: true };
    const INSECURE: EndpointPolicy = EndpointPolicy { allow_insecure: true, allow_custom: false };
    const GRAPH: &str = "https://graph.microsoft.com";

    fn resolved(state: Result<(), (&str, &str)>, fingerprint: u64) -> ResolvedProfile {
        ResolvedProfile {
            key: ns_key(),
            settings: graph(GRAPH, None),
            allowed_namespaces: None,
            state: state
                .map(|()| Arc::new(NoTransport) as Arc<dyn crate::transport::Transport>)
                .map_err(|(reason, message)| NotReady { reason: reason.into(), message: message.into() }),
            tokens: None,
            fingerprint,
        }
    }

    #[test]
    fn messages_are_woken_when_what_they_see_of_the_profile_changes() {
        let ready = resolved(Ok(()), 7);
        let pending = resolved(Err(("TokenPending", "waiting for the first token")), 7);
        let failing = resolved(Err(("TokenRequestFailed", "AADSTS7000215: invalid client secret")), 7);
        // New to this process; ready now; not ready for another reason; ready again.
        assert!(wakes_messages(None, &pending));
        assert!(wakes_messages(Some(&pending), &ready));
        assert!(wakes_messages(Some(&pending), &failing));
        assert!(wakes_messages(Some(&ready), &failing));
        // A resync or token refresh that finds the profile as it was: nobody is woken.
        assert!(!wakes_messages(Some(&ready), &resolved(Ok(()), 7)));
        assert!(!wakes_messages(Some(&failing), &failing));
        // Changed settings or credential (new limits, senders, a rotated Secret).
        assert!(wakes_messages(Some(&ready), &resolved(Ok(()), 8)));
        let mut more_senders = resolved(Ok(()), 7);
        more_senders.settings.senders.allowed = Some(vec!["*@contoso.com".into()]);
        assert!(wakes_messages(Some(&ready), &more_senders));
        let mut admitting = resolved(Ok(()), 7);
        admitting.allowed_namespaces = Some(LabelSelector::default());
        assert!(wakes_messages(Some(&ready), &admitting));
    }

    fn mail_profile(ns: &str, name: &str) -> MailProfile {
        serde_json::from_value(json!({
            "apiVersion": "mailroom.dev/v1alpha1", "kind": "MailProfile",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"senders": {"default": "a@contoso.com"}, "smtp": {"host": "relay"}},
        }))
        .expect("MailProfile")
    }

    #[test]
    fn a_profile_without_a_token_any_more_loses_its_token_status() {
        let with_token = MailProfileStatus {
            token: Some(TokenStatus { expires_at: None, last_refresh_time: None, roles: vec!["Mail.Send".into()] }),
            ..MailProfileStatus::default()
        };
        let relay = MailProfileStatus { transport: Some("smtp-relay".into()), ..MailProfileStatus::default() };
        let patch = status_patch(&with_token, &relay);
        assert_eq!(patch["status"]["token"], serde_json::Value::Null);
        assert_eq!(patch["status"]["transport"], "smtp-relay");
        assert!(status_patch(&relay, &relay)["status"].get("token").is_none(), "nothing to remove");
        assert!(status_patch(&with_token, &with_token)["status"]["token"].is_object());
    }

    #[test]
    fn deleted_and_unlisted_profiles_are_departed() {
        let key = |ns: &str, name: &str| ProfileKey::Namespaced { namespace: ns.into(), name: name.into() };
        let key_of = |p: &MailProfile| Some(key(&p.namespace()?, &p.name_any()));
        let held = vec![key("a", "kept"), key("a", "deleted-meanwhile"), key("b", "gone-too")];
        let listed = |k: &ProfileKey| k == &key("a", "kept");

        let deleted = watcher::Event::Delete(mail_profile("a", "p"));
        assert_eq!(departed(&deleted, key_of, held.clone(), listed), vec![key("a", "p")]);
        // A relist frees what it no longer has, once it is complete.
        let none: Vec<ProfileKey> = Vec::new();
        for event in [watcher::Event::Init, watcher::Event::InitApply(mail_profile("a", "kept"))] {
            assert_eq!(departed(&event, key_of, held.clone(), listed), none);
        }
        assert_eq!(
            departed(&watcher::Event::InitDone, key_of, held.clone(), listed),
            vec![key("a", "deleted-meanwhile"), key("b", "gone-too")]
        );
        // An update frees nothing.
        assert_eq!(departed(&watcher::Event::Apply(mail_profile("a", "kept")), key_of, held, listed), none);
    }

    #[test]
    fn readiness_follows_the_token() {
        let ok = judged(token(&["Mail.Send"], None, 3600), Some("Mail.Send"));
        assert!(ok.state.is_ok() && ok.condition.is_ok());
        assert_eq!(ok.token.unwrap().roles, ["Mail.Send"]);
        assert_eq!(ok.permissions.map(|p| (p.verified, p.reason)), Some((true, "RoleInToken")));

        let failing =
            judged(token(&["Mail.Send"], Some("AADSTS7000215: invalid client secret"), 60), Some("Mail.Send"));
        assert!(failing.state.is_ok(), "the still-valid token keeps messages flowing");
        assert_eq!(failing.condition.unwrap_err().reason, "TokenRefreshFailed");

        let expired =
            judged(token(&["Mail.Send"], Some("AADSTS7000215: invalid client secret"), -1), Some("Mail.Send"));
        assert_eq!(expired.state.err().map(|nr| nr.reason).as_deref(), Some("TokenRequestFailed"));
    }

    #[test]
    fn a_token_without_the_role_still_sends() {
        // Exchange Online RBAC for Applications: the grant is not in the token.
        for role in ["Mail.Send", "SMTP.SendAsApp"] {
            let rbac = judged(token(&[], None, 3600), Some(role));
            assert!(rbac.state.is_ok(), "{role}: messages go out; the provider's answer decides");
            assert_eq!(rbac.condition.as_deref().ok(), Some("token acquired; profile can send"));
            let advice = rbac.permissions.expect("a PermissionsVerified condition");
            assert_eq!((advice.verified, advice.reason), (false, "RoleNotInToken"));
            assert!(advice.message.contains(&format!("Application {role}")), "{}", advice.message);
        }
        let accepted =
            SendEvidence::Accepted { sender: "a@contoso.com".into(), at: Timestamp::from_second(999).unwrap() };
        let seen = judge(
            Ok(Arc::new(NoTransport)),
            Some(token(&[], None, 3600)),
            Some("Mail.Send"),
            Some(&accepted),
            Timestamp::from_second(1_000).unwrap(),
        );
        assert_eq!(seen.permissions.map(|p| (p.verified, p.reason)), Some((true, "AuthorizedByExchange")));
        let relay = judged(token(&[], None, 3600), None);
        assert!(relay.permissions.is_none(), "no app, no permission to verify");
    }

    #[test]
    fn required_roles_follow_the_transport() {
        assert_eq!(required_role(&graph(GRAPH, None)), Some("Mail.Send"));
        let relay = MailProfileSpec {
            smtp: Some(SmtpTransport { host: Some("relay".into()), port: Some(25), tls: None, auth: None }),
            graph: None,
            ..graph(GRAPH, None)
        };
        assert_eq!(required_role(&relay), None);
        assert_eq!(required_role(&xoauth2(None, None)), Some("SMTP.SendAsApp"));
    }

    fn credentials(spec: &MailProfileSpec) -> EntraCredentials {
        spec.graph.as_ref().map(|g| g.credentials.clone()).expect("graph")
    }

    fn xoauth2(host: Option<&str>, cloud: Option<Cloud>) -> MailProfileSpec {
        let mut oauth2 = credentials(&graph(GRAPH, None));
        oauth2.cloud = cloud;
        MailProfileSpec {
            smtp: Some(SmtpTransport {
                host: host.map(Into::into),
                port: None,
                tls: None,
                auth: Some(crate::api::SmtpAuth { password: None, oauth2: Some(oauth2) }),
            }),
            graph: None,
            ..graph(GRAPH, None)
        }
    }

    #[test]
    fn plain_http_needs_the_flag() {
        let err = validate(&ns_key(), &graph("http://127.0.0.1:1", None), CUSTOM).unwrap_err();
        assert!(err.message.contains("plain http"), "{}", err.message);
        assert!(validate(&ns_key(), &graph("http://127.0.0.1:1", None), INSECURE).is_ok());
        assert!(validate(&ns_key(), &graph(GRAPH, None), STRICT).is_ok());
        assert!(validate(&ns_key(), &graph("ftp://x", None), INSECURE).is_err());
    }

    #[test]
    fn a_mailprofile_may_only_name_microsofts_endpoints() {
        for url in ["https://10.0.0.1", "https://graph.microsoft.com.attacker.example", "https://169.254.169.254"] {
            let err = validate(&ns_key(), &graph(url, None), STRICT).unwrap_err();
            assert_eq!(err.reason, "InvalidSettings");
            assert!(
                err.message.contains("graph.endpoint") && err.message.contains("ClusterMailProfile"),
                "{}",
                err.message
            );
            assert!(validate(&ns_key(), &graph(url, None), CUSTOM).is_ok(), "{url} with --allow-custom-endpoints");
            let cluster = ProfileKey::Cluster { name: "c".into() };
            assert!(validate(&cluster, &graph(url, Some("mail")), STRICT).is_ok(), "{url} in a ClusterMailProfile");
        }
        let mut spec = graph(GRAPH, None);
        if let Some(g) = spec.graph.as_mut() {
            g.credentials.authority_host = Some("https://login.attacker.example".into());
        }
        let err = validate(&ns_key(), &spec, STRICT).unwrap_err();
        assert!(err.message.contains("graph.authorityHost"), "{}", err.message);
        for cloud in Cloud::ALL {
            let mut national = graph(cloud.endpoints().graph_endpoint, None);
            if let Some(g) = national.graph.as_mut() {
                g.credentials.authority_host = Some(cloud.endpoints().authority_host.into());
            }
            assert!(validate(&ns_key(), &national, STRICT).is_ok(), "{cloud:?}");
        }
        let mut xo = xoauth2(Some("smtp.office365.com"), None);
        if let Some(o) = xo.smtp.as_mut().and_then(|s| s.auth.as_mut()).and_then(|a| a.oauth2.as_mut()) {
            o.authority_host = Some("https://127.0.0.1:9".into());
        }
        assert!(validate(&ns_key(), &xo, STRICT).unwrap_err().message.contains("smtp.auth.oauth2.authorityHost"));
    }

    #[test]
    fn the_cloud_sets_endpoints_and_scopes() {
        let mut us = graph(GRAPH, None);
        if let Some(g) = us.graph.as_mut() {
            g.endpoint = None;
            g.credentials.cloud = Some(Cloud::USGovernment);
        }
        let g = us.graph.as_ref().expect("graph");
        assert_eq!(g.endpoint(), "https://graph.microsoft.us");
        assert_eq!(g.credentials.authority_host(), "https://login.microsoftonline.us");
        assert_eq!(g.token_scope(), "https://graph.microsoft.us/.default");
        // The scope follows the endpoint actually used, cloud or not.
        let china = graph("https://microsoftgraph.chinacloudapi.cn/", None);
        assert_eq!(
            china.graph.as_ref().map(|g| g.token_scope()).as_deref(),
            Some("https://microsoftgraph.chinacloudapi.cn/.default")
        );
        // A proxy in front of a cloud's Graph: the cloud's scope, unless set explicitly.
        let mut proxy = graph("https://graph-proxy.internal", None);
        if let Some(g) = proxy.graph.as_mut() {
            g.credentials.cloud = Some(Cloud::USGovernmentDoD);
        }
        assert_eq!(
            proxy.graph.as_ref().map(|g| g.token_scope()).as_deref(),
            Some("https://dod-graph.microsoft.us/.default")
        );
        if let Some(g) = proxy.graph.as_mut() {
            g.credentials.token_scope = Some("api://proxy/.default".into());
        }
        assert_eq!(proxy.graph.as_ref().map(|g| g.token_scope()).as_deref(), Some("api://proxy/.default"));

        let smtp = |spec: &MailProfileSpec| spec.smtp.clone().expect("smtp");
        let public = smtp(&xoauth2(None, None));
        assert_eq!((public.server(), public.port()), (Some("smtp.office365.com"), 587));
        assert_eq!(public.token_scope().as_deref(), Some("https://outlook.office365.com/.default"));
        let gcc_high = smtp(&xoauth2(None, Some(Cloud::USGovernment)));
        assert_eq!(gcc_high.server(), Some("smtp.office365.us"));
        assert_eq!(gcc_high.token_scope().as_deref(), Some("https://outlook.office365.us/.default"));
        // The host names the cloud when the field does not.
        let by_host = smtp(&xoauth2(Some("smtp.office365.us"), None));
        assert_eq!(by_host.token_scope().as_deref(), Some("https://outlook.office365.us/.default"));
        let china = smtp(&xoauth2(None, Some(Cloud::China)));
        assert_eq!(china.server(), Some("smtp.partner.outlook.cn"));
        assert_eq!(china.token_scope().as_deref(), Some("https://partner.outlook.cn/.default"));
        // DoD publishes no SMTP AUTH host: the profile must name one.
        let err = validate(&ns_key(), &xoauth2(None, Some(Cloud::USGovernmentDoD)), STRICT).unwrap_err();
        assert!(err.message.contains("smtp.host"), "{}", err.message);
        assert!(validate(&ns_key(), &xoauth2(Some("smtp.example.mil"), Some(Cloud::USGovernmentDoD)), STRICT).is_ok());
        let mut bad_scope = graph(GRAPH, None);
        if let Some(g) = bad_scope.graph.as_mut() {
            g.credentials.token_scope = Some("a/.default b/.default".into());
        }
        assert!(validate(&ns_key(), &bad_scope, STRICT).unwrap_err().message.contains("tokenScope"));
    }

    #[test]
    fn namespaced_profile_cannot_reach_other_namespaces() {
        let err = validate(&ns_key(), &graph(GRAPH, Some("kube-system")), STRICT).unwrap_err();
        assert!(err.message.contains("only use Secrets in its own namespace"), "{}", err.message);
        assert!(validate(&ns_key(), &graph(GRAPH, Some("team-a")), STRICT).is_ok());
    }

    #[test]
    fn cluster_profile_refs_need_namespace() {
        let key = ProfileKey::Cluster { name: "c".into() };
        assert!(validate(&key, &graph(GRAPH, None), STRICT).is_err());
        assert!(validate(&key, &graph(GRAPH, Some("mail-system")), STRICT).is_ok());
        assert_eq!(
            referenced_secrets(&key, &graph(GRAPH, Some("mail-system"))),
            vec![("mail-system".into(), "s".into())]
        );
    }

    #[test]
    fn relay_needs_nothing() {
        let spec = MailProfileSpec {
            smtp: Some(SmtpTransport { host: Some("relay".into()), port: Some(25), tls: None, auth: None }),
            graph: None,
            ..graph(GRAPH, None)
        };
        assert!(validate(&ns_key(), &spec, STRICT).is_ok());
        assert!(referenced_secrets(&ns_key(), &spec).is_empty());
        let mut wi = graph(GRAPH, None);
        if let Some(g) = wi.graph.as_mut() {
            g.credentials.client_secret_ref = None;
            g.credentials.workload_identity = Some(WorkloadIdentity::default());
        }
        assert!(validate(&ns_key(), &wi, STRICT).is_ok());
        let hostless =
            MailProfileSpec { smtp: Some(SmtpTransport { host: None, port: Some(25), tls: None, auth: None }), ..spec };
        assert!(validate(&ns_key(), &hostless, STRICT).unwrap_err().message.contains("smtp.host"));
    }
}
