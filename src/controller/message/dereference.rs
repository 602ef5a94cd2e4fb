//! Dereference: everything the decision needs, read once. The message as the API server has it
//! when the cache says it is being sent, its profile from the registry, and the labels of its
//! namespace when a ClusterMailProfile has to admit it.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Namespace;
use kube::{Api, ResourceExt};

use super::super::context::Context;
use super::super::registry::{ProfileKey, ResolvedProfile};
use crate::api::{EmailMessage, Phase};
use crate::delivery::policy;
use crate::error::Result;

/// What the reconcile knows of a message before deciding.
pub struct Observed {
    /// The message: the cached object, or the API server's when it was found in `Sending`.
    pub msg: Arc<EmailMessage>,
    /// A send of this process holds it.
    pub held: bool,
    /// It is in `Sending` under a claim of this process whose answer was lost before anything
    /// was sent.
    pub unsent_claim: bool,
    /// Its profile, when it exists and this process resolved it.
    pub profile: Option<Arc<ResolvedProfile>>,
    /// The labels of its namespace, when a ClusterMailProfile has to admit it.
    pub namespace_labels: Option<BTreeMap<String, String>>,
}

/// Reads what [`super::decide::decide`] needs. None: nothing to decide (a message found in
/// `Sending` is no longer, or is gone).
pub async fn dereference(ctx: &Context, api: &Api<EmailMessage>, msg: Arc<EmailMessage>) -> Result<Option<Observed>> {
    let phase = msg.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
    let held = msg.uid().is_some_and(|uid| ctx.holds(&uid));
    let mut seen = Observed { msg, held, unsent_claim: false, profile: None, namespace_labels: None };
    if phase.is_finished() || held {
        return Ok(Some(seen));
    }
    if phase == Phase::Sending {
        // The cache may lag behind our own outcome write: only the API server can say it is in doubt.
        let Some(fresh) = api.get_opt(&seen.msg.name_any()).await? else {
            return Ok(None);
        };
        let claim = fresh.status.as_ref().filter(|s| s.phase == Some(Phase::Sending)).map(|s| s.claim_id.clone());
        let Some(claim) = claim else {
            return Ok(None);
        };
        seen.unsent_claim = ctx.is_unsent_claim(claim.as_deref());
        seen.msg = Arc::new(fresh);
    }
    let ns = seen.msg.namespace().unwrap_or_default();
    let spec = &seen.msg.spec;
    let key = ProfileKey::for_message(&ns, spec.profile_ref.kind(), &spec.profile_ref.name);
    seen.profile = ctx.profiles.get(&key).filter(|_| ctx.profile_exists(&key));
    if let Some(profile) = seen.profile.as_deref().filter(|p| p.state.is_ok()) {
        seen.namespace_labels = namespace_labels(ctx, &ns, profile).await?;
    }
    Ok(Some(seen))
}

/// The labels of `ns` for a ClusterMailProfile to judge. The metadata cache answers when it
/// admits the namespace. A namespace it does not have yet, or does not admit, is asked of the API
/// server before the message fails for it: a label just added may not have reached the cache.
async fn namespace_labels(
    ctx: &Context,
    ns: &str,
    profile: &ResolvedProfile,
) -> Result<Option<BTreeMap<String, String>>> {
    if !matches!(profile.key, ProfileKey::Cluster { .. }) {
        return Ok(None);
    }
    let name = profile.key.to_string();
    if let Some(labels) = ctx.cached_namespace_labels(ns)
        && policy::check_namespace(&name, profile.allowed_namespaces.as_ref(), ns, &labels).is_ok()
    {
        return Ok(Some(labels));
    }
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    Ok(Some(namespaces.get_metadata_opt(ns).await?.map(|n| n.labels().clone()).unwrap_or_default()))
}
