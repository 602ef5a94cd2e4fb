//! Idempotency keys, read and written. A message's key is reserved (a `SendRecord` created in
//! its namespace, named by a hash of the key) after the message is claimed and before it is sent,
//! confirmed once it was sent, and released when it failed. Every write is arbitrated by the API
//! server: a create fails when the record exists, and every change or deletion carries the
//! resourceVersion it was decided on. What each record means is decided in
//! [`crate::delivery::idempotency`].

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use tracing::{debug, info, warn};

use super::record::write_retryable;
use crate::api::{EmailMessage, MailProfileSpec, RecordedMessage, SendRecord, SendRecordSpec, SendRecordState};
use crate::delivery::idempotency::{self, Found, HolderState, KeyChoice};

/// A key this message holds: send under it, then confirm or release it.
#[derive(Clone, Debug)]
pub struct Held {
    /// The key.
    pub key: String,
    /// Its record, as last written or read (its resourceVersion guards the next write).
    pub record: SendRecord,
    /// How long it stays taken once sent.
    pub retention: Duration,
}

/// What the key says of a send.
#[derive(Debug)]
pub enum KeyVerdict {
    /// Send: under this key, or with none.
    Send(Option<Box<Held>>),
    /// Do not send: a message with this key was sent; `text` names it.
    AlreadySent {
        /// The key.
        key: String,
        /// The status and Event text.
        text: String,
        /// The original's Message-ID.
        message_id: Option<String>,
    },
    /// Not now: another message holds the key and is being sent, or the record cannot be written.
    Busy(String),
}

/// Rounds of read-and-write before a record that keeps changing is left for the next look.
const ROUNDS: usize = 5;

/// How long a confirmation is retried while the API server is unreachable.
const CONFIRM_BUDGET: Duration = Duration::from_secs(120);

/// A message, as a record names it.
fn recorded(msg: &EmailMessage) -> RecordedMessage {
    RecordedMessage { name: msg.name_any(), uid: msg.uid().unwrap_or_default() }
}

fn record_object(ns: &str, spec: SendRecordSpec) -> SendRecord {
    let mut r = SendRecord::new(&idempotency::record_name(&spec.key), spec);
    r.metadata = ObjectMeta {
        name: r.metadata.name.take(),
        namespace: Some(ns.to_string()),
        // Only the operator's label: a GitOps tool's tracking label copied here would have the
        // tool prune the record.
        labels: Some([("app.kubernetes.io/managed-by".to_string(), "mailroom".to_string())].into()),
        ..Default::default()
    };
    r
}

/// Decides and reserves the key of `msg` (the whole object, as the claim returned it: a
/// derived key hashes the spec, which the cache does not keep).
pub async fn reserve_for(
    client: &Client,
    msg: &EmailMessage,
    choice: &KeyChoice,
    profile: &MailProfileSpec,
) -> Result<KeyVerdict, kube::Error> {
    let Some(key) = choice.key() else {
        return Ok(KeyVerdict::Send(None));
    };
    let retention = idempotency::retention(&msg.spec, profile);
    reserve(client, msg, key, retention).await
}

/// Reserves `key` for `msg`: creates its record, or judges the one there is.
pub async fn reserve(
    client: &Client,
    msg: &EmailMessage,
    key: &str,
    retention: Duration,
) -> Result<KeyVerdict, kube::Error> {
    let ns = msg.namespace().unwrap_or_default();
    let api: Api<SendRecord> = Api::namespaced(client.clone(), &ns);
    let name = idempotency::record_name(key);
    let me = recorded(msg);
    let held = |record| KeyVerdict::Send(Some(Box::new(Held { key: key.to_string(), record, retention })));
    for _ in 0..ROUNDS {
        let now = Timestamp::now();
        let fresh = record_object(&ns, idempotency::reserved(key, me.clone(), now));
        let error = match api.create(&PostParams::default(), &fresh).await {
            Ok(created) => return Ok(held(created)),
            Err(e) => e,
        };
        match &error {
            kube::Error::Api(e) if e.code == 409 => {}
            kube::Error::Api(e) if e.code == 403 => {
                // A ResourceQuota on SendRecords, or RBAC: the message waits, saying which.
                return Ok(KeyVerdict::Busy(format!("the idempotency key cannot be recorded: {}", e.message)));
            }
            _ => return Err(error),
        }
        let Some(existing) = api.get_opt(&name).await? else {
            continue;
        };
        match idempotency::judge_record(&existing.spec, &me.uid, now) {
            Found::Ours => return Ok(held(existing)),
            Found::Expired => {
                delete_exact(&api, &existing).await?;
                continue;
            }
            Found::AlreadySent => {
                if let Some(longer) = idempotency::extended(&existing.spec, now, retention) {
                    // Best effort: a record changed meanwhile keeps its own expiry.
                    let _ = replace(&api, &existing, longer).await;
                }
                return Ok(already_sent(key, &existing.spec));
            }
            Found::HeldBy(holder) => {
                let messages: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
                let found = messages.get_opt(&holder.name).await?;
                match idempotency::judge_holder(&holder, found.as_ref(), now) {
                    HolderState::Sending => {
                        return Ok(KeyVerdict::Busy(format!(
                            "idempotency key {key:?} is held by EmailMessage {} (uid {}), which is being sent; this message is sent only if that one fails",
                            holder.name, holder.uid
                        )));
                    }
                    HolderState::Sent { message_id, sent_time } => {
                        // Its outcome was written and the record's confirmation was not: confirm it.
                        let spec = idempotency::sent(&existing.spec, message_id, sent_time, retention);
                        if let Some(confirmed) = replace(&api, &existing, spec).await? {
                            return Ok(already_sent(key, &confirmed.spec));
                        }
                    }
                    HolderState::Released => {
                        let spec = idempotency::reserved(key, me.clone(), now);
                        if let Some(taken) = replace(&api, &existing, spec).await? {
                            info!(message = %me.name, previous = %holder.name, "took over an idempotency key its holder released");
                            return Ok(held(taken));
                        }
                    }
                }
            }
        }
    }
    Ok(KeyVerdict::Busy(format!("the record of idempotency key {key:?} kept changing; looking again shortly")))
}

fn already_sent(key: &str, record: &SendRecordSpec) -> KeyVerdict {
    KeyVerdict::AlreadySent {
        key: key.to_string(),
        text: idempotency::already_sent_text(key, record),
        message_id: record.message_id.clone(),
    }
}

/// Replaces `existing` with `spec`, on the condition that it did not change. None: it did (409)
/// or is gone.
async fn replace(
    api: &Api<SendRecord>,
    existing: &SendRecord,
    spec: SendRecordSpec,
) -> Result<Option<SendRecord>, kube::Error> {
    let mut next = existing.clone();
    next.spec = spec;
    match api.replace(&existing.name_any(), &PostParams::default(), &next).await {
        Ok(r) => Ok(Some(r)),
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes exactly this version of a record; a newer one (or none) is left alone.
async fn delete_exact(api: &Api<SendRecord>, record: &SendRecord) -> Result<(), kube::Error> {
    let dp = DeleteParams {
        preconditions: Some(Preconditions { uid: record.uid(), resource_version: record.resource_version() }),
        ..Default::default()
    };
    match api.delete(&record.name_any(), &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Records that the message holding `held` was sent. Retried while the API server is away; a
/// record that another writer changed is re-read and confirmed as long as it is still this
/// message's. Nothing is lost when this fails for good: a later look at the record asks the
/// holder, whose status says Sent, and the message is not deleted by its TTL before its record
/// says so.
pub async fn confirm(client: &Client, ns: &str, mut held: Held, message_id: Option<String>, sent_time: Timestamp) {
    let api: Api<SendRecord> = Api::namespaced(client.clone(), ns);
    let uid = held.record.spec.message.uid.clone();
    let started = std::time::Instant::now();
    loop {
        let spec = idempotency::sent(&held.record.spec, message_id.clone(), sent_time, held.retention);
        let error = match replace(&api, &held.record, spec).await {
            Ok(Some(_)) => return,
            Ok(None) => None,
            Err(e) => Some(e),
        };
        if let Some(e) = error {
            if !(write_retryable(&e) && started.elapsed() < CONFIRM_BUDGET) {
                warn!(key = %held.key, error = %e, "could not confirm the idempotency key; it is confirmed later");
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // Changed or unknown: read it again.
        match api.get_opt(&idempotency::record_name(&held.key)).await {
            Ok(Some(r)) if r.spec.message.uid == uid && r.spec.state == SendRecordState::Reserved => held.record = r,
            Ok(_) => return, // confirmed already, or another message's now
            Err(e) if write_retryable(&e) && started.elapsed() < CONFIRM_BUDGET => {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                warn!(key = %held.key, error = %e, "could not confirm the idempotency key; it is confirmed later");
                return;
            }
        }
    }
}

/// Frees the key of a message that failed: failed messages do not consume their key. A record
/// left behind (the API server was away) is freed by whoever looks next, since its holder failed.
pub async fn release(client: &Client, ns: &str, held: Held) {
    let api: Api<SendRecord> = Api::namespaced(client.clone(), ns);
    let uid = held.record.spec.message.uid.clone();
    let mut record = held.record;
    for _ in 0..ROUNDS {
        if let Err(e) = delete_exact(&api, &record).await {
            warn!(key = %held.key, error = %e, "could not release the idempotency key; it is released later");
            return;
        }
        match api.get_opt(&record.name_any()).await {
            Ok(Some(r)) if r.spec.message.uid == uid && r.spec.state == SendRecordState::Reserved => record = r,
            _ => return,
        }
    }
}

/// Before a finished message with a key is deleted by its TTL: its record must say what
/// happened, since the message will not be there to ask. A record still reserved by it is
/// confirmed (Sent) or released (Failed). An error keeps the message (deleted on a later look).
pub async fn settle_before_delete(client: &Client, cached: &EmailMessage) -> Result<(), kube::Error> {
    let Some(key) = cached.status.as_ref().and_then(|s| s.idempotency_key.clone()) else {
        return Ok(());
    };
    let ns = cached.namespace().unwrap_or_default();
    let api: Api<SendRecord> = Api::namespaced(client.clone(), &ns);
    let Some(record) = api.get_opt(&idempotency::record_name(&key)).await? else {
        return Ok(());
    };
    let uid = cached.uid().unwrap_or_default();
    if record.spec.state != SendRecordState::Reserved || record.spec.message.uid != uid {
        return Ok(());
    }
    // The cache keeps no Message-ID of a finished message: ask for the whole one.
    let messages: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let fresh = messages.get_opt(&cached.name_any()).await?;
    let now = Timestamp::now();
    match idempotency::judge_holder(&record.spec.message, fresh.as_ref(), now) {
        HolderState::Sent { message_id, sent_time } => {
            let retention = record.spec.retention_seconds.map(Duration::from_secs);
            let retention = retention.unwrap_or_else(|| retention_of(fresh.as_ref()));
            let spec = idempotency::sent(&record.spec, message_id, sent_time, retention);
            if replace(&api, &record, spec).await?.is_none() {
                return Err(kube::Error::Service("the idempotency record changed; deleting the message later".into()));
            }
        }
        HolderState::Released => delete_exact(&api, &record).await?,
        HolderState::Sending => {}
    }
    Ok(())
}

/// A message's own retention (its profile's is not at hand here), else the default.
fn retention_of(msg: Option<&EmailMessage>) -> Duration {
    msg.and_then(|m| m.spec.idempotency_retention_seconds)
        .map(Duration::from_secs)
        .unwrap_or(idempotency::DEFAULT_RETENTION)
}

/// How often expired records are deleted.
pub const SWEEP_PERIOD: Duration = Duration::from_secs(600);

/// A reserved record is looked at by the sweep once it is this old: its holder is being sent.
const SWEEP_GRACE: Duration = Duration::from_secs(600);

/// Deletes the records whose retention has passed, and settles reserved ones whose holder
/// finished or is gone, so that the records stay as many as the keys sent within their
/// retention. Runs on the leader only, every [`SWEEP_PERIOD`]; returns how many were deleted.
pub async fn sweep(client: &Client, namespace: Option<&str>) -> Result<usize, kube::Error> {
    let api: Api<SendRecord> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let now = Timestamp::now();
    let mut deleted = 0;
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api.list(&params).await?;
        for record in &page.items {
            let ns = record.namespace().unwrap_or_default();
            let here: Api<SendRecord> = Api::namespaced(client.clone(), &ns);
            let spec = &record.spec;
            match spec.state {
                SendRecordState::Sent => {
                    if spec.expires_at.as_ref().is_some_and(|t| t.0 <= now) {
                        delete_exact(&here, record).await?;
                        deleted += 1;
                    }
                }
                SendRecordState::Reserved => {
                    let age = now.duration_since(spec.reserved_time.0);
                    if age.as_secs() < SWEEP_GRACE.as_secs() as i64 {
                        continue;
                    }
                    let messages: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
                    let found = messages.get_opt(&spec.message.name).await?;
                    match idempotency::judge_holder(&spec.message, found.as_ref(), now) {
                        HolderState::Released => {
                            delete_exact(&here, record).await?;
                            deleted += 1;
                        }
                        HolderState::Sent { message_id, sent_time } => {
                            let retention = retention_of(found.as_ref());
                            let _ = replace(&here, record, idempotency::sent(spec, message_id, sent_time, retention))
                                .await?;
                        }
                        HolderState::Sending => {}
                    }
                }
            }
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    debug!(deleted, "swept idempotency records");
    Ok(deleted)
}
