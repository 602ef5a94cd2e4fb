//! Starts the controllers and the Secret watch that feeds them.

use std::future::Future;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::{info, warn};

use super::context::{Context, OperatorConfig};
use super::registry::ProfileKey;
use super::{cache, message, profile};
use crate::api::{ClusterMailProfile, EmailMessage, MailProfile, Phase};
use crate::delivery::limits::IDLE_EXPIRY;
use crate::error::Error;
use crate::metrics::{ErrorLabels, Metrics};
use crate::server::Health;

/// How often every mailbox queue with room wakes its head, in case a wake went nowhere.
pub const TURN_KICK: std::time::Duration = std::time::Duration::from_secs(30);

/// EmailMessages per page of the initial list.
const MESSAGE_PAGE: u32 = 100;

/// Finished messages deleted at once by each expiry watch's controller.
const EXPIRY_CONCURRENCY: u16 = 4;

/// Runs the operator until `shutdown` completes.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let namespace = config.namespace.clone();
    let (ctx, triggers) = Context::new(client.clone(), config, metrics, health);
    let ctx = Arc::new(ctx);
    let (messages_api, profiles_api, secrets_api): (
        Api<EmailMessage>,
        Api<MailProfile>,
        Api<PartialObjectMeta<Secret>>,
    ) = match &namespace {
        Some(ns) => {
            (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns), Api::all(client.clone()))
        }
        None => (Api::all(client.clone()), Api::all(client.clone()), Api::all(client.clone())),
    };
    let cluster_api: Api<ClusterMailProfile> = Api::all(client.clone());

    let (shutdown_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let signal = shutdown_tx.clone();
    let stopping = ctx.clone();
    tokio::spawn(async move {
        shutdown.await;
        info!("shutting down: no new sends; waiting for the sends in flight");
        stopping.begin_shutdown();
        let _ = signal.send(());
    });
    let stopped = |tx: &tokio::sync::broadcast::Sender<()>| {
        let mut rx = tx.subscribe();
        async move {
            let _ = rx.recv().await;
        }
    };

    let (mp_tx, cmp_tx) = (ctx.wake_profile.clone(), ctx.wake_cluster_profile.clone());
    let (mp_rx, cmp_rx) = (triggers.mail_profiles, triggers.cluster_profiles);

    // The profile controllers own their watches, so that a deletion is seen: kube's Controller
    // never reconciles an object that is gone, and a deleted profile's transport, token caches
    // and limits must not wait for anything else to be freed. The Delete event frees them at once;
    // after a (re)list, profiles the list no longer has are freed too (a deletion the watch missed
    // while it was down). No finalizer: nothing outside this process needs cleaning up, and a
    // profile must stay deletable while the operator is down.
    let (mp_store, mp_writer) = reflector::store();
    let mp_events = {
        let ctx = ctx.clone();
        watcher(profiles_api, watcher::Config::default())
            .default_backoff()
            .reflect(mp_writer)
            .inspect_ok(move |event| profile::observe_mail_profiles(&ctx, event))
            .applied_objects()
    };
    let profiles = Controller::for_stream(mp_events, mp_store)
        .reconcile_on(UnboundedReceiverStream::new(mp_rx))
        .graceful_shutdown_on(stopped(&shutdown_tx));
    let _ = ctx.mail_profiles.set(profiles.store());
    let (cmp_store, cmp_writer) = reflector::store();
    let cmp_events = {
        let ctx = ctx.clone();
        watcher(cluster_api, watcher::Config::default())
            .default_backoff()
            .reflect(cmp_writer)
            .inspect_ok(move |event| profile::observe_cluster_profiles(&ctx, event))
            .applied_objects()
    };
    let cluster_profiles = Controller::for_stream(cmp_events, cmp_store)
        .reconcile_on(UnboundedReceiverStream::new(cmp_rx))
        .graceful_shutdown_on(stopped(&shutdown_tx));
    let _ = ctx.cluster_profiles.set(cluster_profiles.store());
    // The cache keeps messages without their bodies and attachments (see cache.rs); the
    // reconciler reads the whole object when it builds one.
    let (message_store, message_writer) = reflector::store();
    // Listed in pages of 100: a page is parsed whole (bodies and attachments included) before
    // the cache strips it, so the page size bounds what a start over thousands of messages holds.
    // The index of each profile's unfinished messages follows the same events as the cache.
    let message_events = {
        let ctx = ctx.clone();
        watcher(messages_api.clone(), watcher::Config::default().fields(cache::UNFINISHED).page_size(MESSAGE_PAGE))
            .default_backoff()
            .modify(cache::strip_for_cache)
            .reflect(message_writer)
            .inspect_ok(move |event| ctx.unfinished.observe(event))
            .applied_objects()
    };
    // Bounded: a backlog of thousands waits in the scheduler and the mailbox queues, not in
    // thousands of reconciles at once.
    let config = kube::runtime::controller::Config::default().concurrency(ctx.config.concurrency());
    let messages = Controller::for_stream(message_events, message_store)
        .with_config(config)
        .reconcile_on(UnboundedReceiverStream::new(triggers.messages))
        .graceful_shutdown_on(stopped(&shutdown_tx));
    let _ = ctx.messages.set(messages.store());
    // Finished messages that wait for their ttlSecondsAfterFinished, one watch per finished
    // phase: the same reconciler deletes each when it is due. Those without a TTL are dropped on
    // the way in, so a history of finished messages costs a page at a time while it is listed.
    let expiries = [Phase::Sent, Phase::Failed].map(|phase| {
        let (store, writer) = reflector::store();
        let events = watcher(
            messages_api.clone(),
            watcher::Config::default().fields(&cache::finished_in(phase)).page_size(MESSAGE_PAGE),
        )
        .default_backoff()
        .try_filter(|event| std::future::ready(cache::expiring(event)))
        .modify(cache::strip_for_cache)
        .reflect(writer)
        .applied_objects();
        let config = kube::runtime::controller::Config::default().concurrency(EXPIRY_CONCURRENCY);
        Controller::for_stream(events, store).with_config(config).graceful_shutdown_on(stopped(&shutdown_tx))
    });

    // Secrets are watched by metadata only: their data never sits in this process's memory, and a
    // change to one that a profile references re-resolves that profile at once.
    let secret_watch = {
        let (mp_store, cmp_store) = (profiles.store(), cluster_profiles.store());
        let mut stop = shutdown_tx.subscribe();
        async move {
            let stream = watcher(secrets_api, watcher::Config::default()).default_backoff().touched_objects();
            futures::pin_mut!(stream);
            loop {
                tokio::select! {
                    _ = stop.recv() => break,
                    item = stream.next() => match item {
                        Some(Ok(secret)) => notify_profiles(&secret.namespace().unwrap_or_default(), &secret.name_any(), &mp_store, &cmp_store, &mp_tx, &cmp_tx),
                        Some(Err(e)) => warn!(error = %e, "secret watch"),
                        None => break,
                    },
                }
            }
        }
    };

    // Namespaces by metadata, labels only: a message on a ClusterMailProfile is checked against
    // its namespace's labels from this cache instead of a GET per message and per wake.
    let (ns_store, ns_writer) = reflector::store();
    let _ = ctx.namespaces.set(ns_store);
    let namespace_watch = {
        let mut stop = shutdown_tx.subscribe();
        let config = match &namespace {
            Some(ns) => watcher::Config::default().fields(&format!("metadata.name={ns}")),
            None => watcher::Config::default(),
        };
        let api: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
        async move {
            let stream = watcher(api, config)
                .default_backoff()
                .modify(|ns| {
                    ns.metadata.managed_fields = None;
                    ns.metadata.annotations = None;
                })
                .reflect(ns_writer)
                .touched_objects();
            futures::pin_mut!(stream);
            loop {
                tokio::select! {
                    _ = stop.recv() => break,
                    item = stream.next() => match item {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => warn!(error = %e, "namespace watch"),
                        None => break,
                    },
                }
            }
        }
    };

    // Ready once the three caches hold the cluster's state; then count the unfinished messages.
    let readiness = {
        let ctx = ctx.clone();
        let stores = (profiles.store(), cluster_profiles.store(), messages.store());
        let mut stop = shutdown_tx.subscribe();
        async move {
            let synced = async {
                let _ = stores.0.wait_until_ready().await;
                let _ = stores.1.wait_until_ready().await;
                let _ = stores.2.wait_until_ready().await;
            };
            tokio::select! {
                _ = stop.recv() => return,
                _ = synced => ctx.health.set_ready(true),
            }
            info!("caches synced; ready");
            loop {
                ctx.metrics.queue_depth.set(ctx.unfinished.len() as i64);
                ctx.update_gauges();
                tokio::select! {
                    _ = stop.recv() => break,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                }
            }
            ctx.health.set_ready(false);
        }
    };

    // Waiting messages have no timer of their own: their mailbox wakes them (see limits.rs).
    // Mailboxes nobody used for a while are forgotten on the same beat.
    let kicks = {
        let ctx = ctx.clone();
        let mut stop = shutdown_tx.subscribe();
        async move {
            let mut every = tokio::time::interval(TURN_KICK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.recv() => break,
                    _ = every.tick() => {
                        ctx.limits.kick();
                        ctx.budget.kick();
                        if ctx.limits.forget_idle(IDLE_EXPIRY) > 0 {
                            ctx.update_gauges();
                        }
                        super::message::wake_forgotten(&ctx);
                    }
                }
            }
        }
    };

    // Idempotency records past their retention are deleted, so that they stay as many as the keys
    // sent within it (a key found expired is also freed when it is used again).
    let sweeps = {
        let client = client.clone();
        let namespace = namespace.clone();
        let mut stop = shutdown_tx.subscribe();
        let period = ctx.config.send_record_sweep();
        async move {
            let mut every = tokio::time::interval(period);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.recv() => break,
                    _ = every.tick() => {
                        if let Err(e) = message::key::sweep(&client, namespace.as_deref()).await {
                            warn!(error = %e, "could not sweep the idempotency records");
                        }
                    }
                }
            }
        }
    };

    info!(namespace = namespace.as_deref().unwrap_or("(all)"), "mailroom operator running");
    let c1 = ctx.clone();
    let c2 = ctx.clone();
    let c3 = ctx.clone();
    let expiring = futures::future::join_all(
        expiries.map(|c| c.run(message::reconcile, message::error_policy, ctx.clone()).for_each(|_| async {})),
    );
    futures::join!(
        profiles.run(profile::reconcile_namespaced, profile_error, c1).for_each(|_| async {}),
        cluster_profiles.run(profile::reconcile_cluster, profile_error, c2).for_each(|_| async {}),
        messages.run(message::reconcile, message::error_policy, c3).for_each(|_| async {}),
        expiring,
        secret_watch,
        namespace_watch,
        readiness,
        kicks,
        sweeps,
    );
    info!("mailroom operator stopped");
}

fn notify_profiles(
    namespace: &str,
    name: &str,
    mp: &Store<MailProfile>,
    cmp: &Store<ClusterMailProfile>,
    mp_tx: &mpsc::UnboundedSender<ObjectRef<MailProfile>>,
    cmp_tx: &mpsc::UnboundedSender<ObjectRef<ClusterMailProfile>>,
) {
    let wanted = (namespace.to_string(), name.to_string());
    for p in mp.state() {
        let key = ProfileKey::Namespaced { namespace: p.namespace().unwrap_or_default(), name: p.name_any() };
        if profile::referenced_secrets(&key, &p.spec).contains(&wanted) {
            tracing::debug!(secret = %name, profile = %key, "referenced Secret changed");
            let _ = mp_tx.send(ObjectRef::from(p.as_ref()));
        }
    }
    for p in cmp.state() {
        let key = ProfileKey::Cluster { name: p.name_any() };
        if profile::referenced_secrets(&key, &p.spec.settings()).contains(&wanted) {
            let _ = cmp_tx.send(ObjectRef::from(p.as_ref()));
        }
    }
}

fn profile_error<K>(_p: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action {
    warn!(error = %err, "profile reconcile failed");
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels { controller: "profiles".into(), error: err.metric_label().into() })
        .inc();
    Action::requeue(std::time::Duration::from_secs(5))
}
