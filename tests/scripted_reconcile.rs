//! The message reconciler against a scripted Kubernetes API: the branches a real API server
//! rarely takes on cue (a claim whose answer is lost, a 409 on an outcome write, a decision made
//! on a stale cache, a claim taken over by another operator), each answered exactly as the API
//! server would, and the unclaim of a claim that sent nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use mailroom::api::{EmailMessage, MailProfileSpec, Senders, SmtpTransport};
use mailroom::controller::context::{Context, OperatorConfig};
use mailroom::controller::message::reconcile;
use mailroom::controller::registry::{ProfileKey, ResolvedProfile};
use mailroom::transport::{Delivered, OutgoingMessage, SendError, Transport};
use serde_json::{Value, json};
use tower_test::mock::{Handle, SendResponse};

const NS: &str = "team-a";
const NAME: &str = "m";
const STATUS_PATH: &str = "/apis/mailroom.dev/v1alpha1/namespaces/team-a/emailmessages/m/status";
const OBJECT_PATH: &str = "/apis/mailroom.dev/v1alpha1/namespaces/team-a/emailmessages/m";

/// Counts what it is asked to send, and accepts it.
#[derive(Default)]
struct CountingTransport {
    sends: AtomicUsize,
}

#[async_trait::async_trait]
impl Transport for CountingTransport {
    async fn send(&self, _: &OutgoingMessage) -> Result<Delivered, SendError> {
        self.sends.fetch_add(1, Ordering::SeqCst);
        Ok(Delivered { response: "250 2.0.0 queued".into(), ..Default::default() })
    }
}

fn message(resource_version: &str, status: Value) -> Value {
    json!({
        "apiVersion": "mailroom.dev/v1alpha1", "kind": "EmailMessage",
        "metadata": {
            "name": NAME, "namespace": NS, "uid": "uid-1", "resourceVersion": resource_version,
            "generation": 1, "creationTimestamp": k8s_openapi::jiff::Timestamp::now().to_string(),
        },
        "spec": {"profileRef": {"name": "relay"}, "to": ["ops@contoso.com"], "subject": "s", "body": {"text": "t"}},
        "status": status,
    })
}

/// A context whose client is the scripted API, with the relay profile resolved to `transport`.
fn context(transport: Arc<CountingTransport>) -> (Arc<Context>, Handle<Request<Body>, Response<Body>>) {
    mailroom::tls::install_crypto_provider();
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, NS);
    let config = OperatorConfig { instance: "mailroom-test".into(), ..Default::default() };
    let (ctx, _triggers) = Context::new(client, config, Arc::default(), Arc::default());
    ctx.profiles.put(ResolvedProfile {
        key: ProfileKey::Namespaced { namespace: NS.into(), name: "relay".into() },
        settings: MailProfileSpec {
            senders: Senders { default: "alerts@contoso.com".into(), allowed: None },
            graph: None,
            smtp: Some(SmtpTransport { host: Some("relay.contoso.com".into()), port: None, tls: None, auth: None }),
            limits: None,
            recipient_domains: None,
            ca_bundle: None,
            idempotency_retention_seconds: None,
        },
        allowed_namespaces: None,
        state: Ok(transport as Arc<dyn Transport>),
        tokens: None,
        fingerprint: 0,
    });
    (Arc::new(ctx), handle)
}

/// One request the scripted API received.
struct Seen {
    method: Method,
    path: String,
    body: Value,
}

async fn next(handle: &mut Handle<Request<Body>, Response<Body>>) -> (Seen, SendResponse<Response<Body>>) {
    let (request, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .expect("the reconciler made no further request")
        .expect("the client is gone");
    let (parts, body) = request.into_parts();
    let bytes = body.collect_bytes().await.expect("request body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (Seen { method: parts.method, path: parts.uri.path().to_string(), body }, send)
}

fn answer(send: SendResponse<Response<Body>>, status: StatusCode, body: &Value) {
    let response =
        Response::builder().status(status).body(Body::from(serde_json::to_vec(body).expect("JSON"))).expect("response");
    send.send_response(response);
}

fn conflict(send: SendResponse<Response<Body>>) {
    answer(
        send,
        StatusCode::CONFLICT,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
                "message": "the object has been modified; please apply your changes to the latest version and try again"}),
    );
}

/// The status a merge patch leaves on `status` (RFC 7386, as the API server applies it).
fn merged(mut status: Value, patch: &Value) -> Value {
    if let (Some(t), Some(p)) = (status.as_object_mut(), patch.as_object()) {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                t.insert(k.clone(), v.clone());
            }
        }
    }
    status
}

/// Answers Event creation until the reconcile ends; returns the reasons of the Events.
async fn events_until_done(
    handle: &mut Handle<Request<Body>, Response<Body>>,
    done: tokio::task::JoinHandle<mailroom::error::Result<Action>>,
) -> (Vec<String>, Action) {
    let mut reasons = Vec::new();
    tokio::pin!(done);
    loop {
        tokio::select! {
            result = &mut done => return (reasons, result.expect("reconcile task").expect("reconcile")),
            request = handle.next_request() => {
                let (request, send) = request.expect("client");
                assert!(request.uri().path().ends_with("/events"), "unexpected request {} {}", request.method(), request.uri());
                let bytes = request.into_body().collect_bytes().await.expect("body");
                let ev: Value = serde_json::from_slice(&bytes).expect("Event");
                reasons.push(ev["reason"].as_str().unwrap_or_default().to_string());
                answer(send, StatusCode::CREATED, &ev);
            }
        }
    }
}

fn spawn(ctx: &Arc<Context>, msg: Value) -> tokio::task::JoinHandle<mailroom::error::Result<Action>> {
    let msg: EmailMessage = serde_json::from_value(msg).expect("EmailMessage");
    tokio::spawn(reconcile(Arc::new(msg), Arc::clone(ctx)))
}

/// The claim landed, but its answer was lost (the connection dropped). The operator reads the
/// message, recognises its own claim, and sends under it: once, never "in doubt".
#[tokio::test]
async fn a_claim_whose_answer_was_lost_is_resumed() {
    let transport = Arc::new(CountingTransport::default());
    let (ctx, mut api) = context(Arc::clone(&transport));
    let done = spawn(&ctx, message("1", json!({})));

    let (claim, send) = next(&mut api).await;
    assert_eq!((claim.method.as_str(), claim.path.as_str()), ("PATCH", STATUS_PATH));
    assert_eq!(claim.body["metadata"]["resourceVersion"], "1", "the claim is conditional");
    assert_eq!(claim.body["status"]["phase"], "Sending");
    let claim_id = claim.body["status"]["claimId"].as_str().expect("a claim id").to_string();
    assert_eq!(claim.body["status"]["claimedBy"], "mailroom-test");
    send.send_error(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset by peer"));

    let (read, send) = next(&mut api).await;
    assert_eq!((read.method.as_str(), read.path.as_str()), ("GET", OBJECT_PATH));
    let landed = merged(json!({}), &claim.body["status"]);
    answer(send, StatusCode::OK, &message("2", landed.clone()));

    let (outcome, send) = next(&mut api).await;
    assert_eq!((outcome.method.as_str(), outcome.path.as_str()), ("PATCH", STATUS_PATH));
    assert_eq!(outcome.body["metadata"]["resourceVersion"], "2", "the outcome is based on the claim that landed");
    assert_eq!(outcome.body["status"]["phase"], "Sent");
    assert_eq!(outcome.body["status"]["attempts"], 1, "the lost answer cost no attempt");
    answer(send, StatusCode::OK, &message("3", merged(landed, &outcome.body["status"])));
    let (events, _) = events_until_done(&mut api, done).await;
    assert_eq!(transport.sends.load(Ordering::SeqCst), 1, "sent exactly once");
    assert_eq!(events, ["Sent"]);
    assert!(!ctx.is_unsent_claim(Some(&claim_id)));
}

/// The claim's answer was lost and the message shows no claim of ours: it did not land, nothing
/// is sent, and the error policy tries again later.
#[tokio::test]
async fn a_claim_that_did_not_land_sends_nothing() {
    let transport = Arc::new(CountingTransport::default());
    let (ctx, mut api) = context(Arc::clone(&transport));
    let done = spawn(&ctx, message("1", json!({})));
    let (_, send) = next(&mut api).await;
    send.send_error(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset by peer"));
    let (read, send) = next(&mut api).await;
    assert_eq!(read.method, Method::GET);
    answer(send, StatusCode::OK, &message("1", json!({})));
    let result = done.await.expect("reconcile task");
    assert!(result.is_err(), "the error policy retries");
    assert_eq!(transport.sends.load(Ordering::SeqCst), 0);
}

/// After the send, the outcome write meets a 409 (the message changed, say a label was added)
/// while it still carries this claim: the outcome is written on the newer version, not lost.
#[tokio::test]
async fn an_outcome_write_refused_with_409_is_rebased_on_the_newer_claim() {
    let transport = Arc::new(CountingTransport::default());
    let (ctx, mut api) = context(Arc::clone(&transport));
    let done = spawn(&ctx, message("1", json!({})));
    let (claim, send) = next(&mut api).await;
    let landed = merged(json!({}), &claim.body["status"]);
    answer(send, StatusCode::OK, &message("2", landed.clone()));
    let (first, send) = next(&mut api).await;
    assert_eq!(first.body["metadata"]["resourceVersion"], "2");
    conflict(send);
    let (read, send) = next(&mut api).await;
    assert_eq!(read.method, Method::GET);
    answer(send, StatusCode::OK, &message("5", landed.clone()));
    let (second, send) = next(&mut api).await;
    assert_eq!(second.body["metadata"]["resourceVersion"], "5");
    assert_eq!(second.body["status"]["phase"], "Sent");
    answer(send, StatusCode::OK, &message("6", merged(landed, &second.body["status"])));
    let (events, _) = events_until_done(&mut api, done).await;
    assert_eq!(events, ["Sent"]);
    assert_eq!(transport.sends.load(Ordering::SeqCst), 1);
}

/// After the send, the message carries another operator's claim (this one was taken for in
/// doubt): the outcome is not written over it.
#[tokio::test]
async fn an_outcome_never_overwrites_another_operators_claim() {
    let transport = Arc::new(CountingTransport::default());
    let (ctx, mut api) = context(Arc::clone(&transport));
    let done = spawn(&ctx, message("1", json!({})));
    let (claim, send) = next(&mut api).await;
    let landed = merged(json!({}), &claim.body["status"]);
    answer(send, StatusCode::OK, &message("2", landed.clone()));
    let (_, send) = next(&mut api).await;
    conflict(send);
    let (_, send) = next(&mut api).await;
    let mut theirs = landed;
    theirs["claimId"] = json!("someone-else");
    theirs["attempts"] = json!(2);
    answer(send, StatusCode::OK, &message("7", theirs));
    let (events, _) = events_until_done(&mut api, done).await;
    assert!(!events.is_empty(), "the send itself is still recorded as an Event");
    assert_eq!(transport.sends.load(Ordering::SeqCst), 1);
}

/// A decision made on a stale cache (the profile is missing, so the message would wait) meets a
/// 409: nothing is overwritten, no Event is published, and the message is looked at again soon.
#[tokio::test]
async fn a_stale_decision_is_refused_and_made_again() {
    let transport = Arc::new(CountingTransport::default());
    let (ctx, mut api) = context(Arc::clone(&transport));
    let mut msg = message("1", json!({}));
    msg["spec"]["profileRef"]["name"] = json!("absent");
    let done = spawn(&ctx, msg);
    let (wait, send) = next(&mut api).await;
    assert_eq!(wait.body["metadata"]["resourceVersion"], "1");
    assert_eq!(wait.body["status"]["phase"], "Pending");
    conflict(send);
    let (events, action) = events_until_done(&mut api, done).await;
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(action, Action::requeue(Duration::from_secs(1)));
}

/// A message found in Sending under a claim this process lost the answer of (and never sent
/// under) is resumed with the same attempt number, not declared in doubt.
#[tokio::test]
async fn an_unsent_claim_of_ours_is_resumed_not_in_doubt() {
    let transport = Arc::new(CountingTransport::default());
    let (ctx, mut api) = context(Arc::clone(&transport));
    ctx.remember_unsent_claim("lost-1");
    let sending = json!({"phase": "Sending", "attempts": 1, "claimId": "lost-1", "claimedBy": "mailroom-test",
                         "messageId": "<uid-1@contoso.com>"});
    let done = spawn(&ctx, message("4", sending.clone()));
    let (read, send) = next(&mut api).await;
    assert_eq!(read.method, Method::GET, "Sending is checked against the API server");
    answer(send, StatusCode::OK, &message("4", sending.clone()));
    let (claim, send) = next(&mut api).await;
    assert_eq!(claim.body["status"]["attempts"], 1, "the resumed claim keeps its attempt number");
    assert_ne!(claim.body["status"]["claimId"], "lost-1");
    let landed = merged(sending, &claim.body["status"]);
    answer(send, StatusCode::OK, &message("5", landed.clone()));
    let (outcome, send) = next(&mut api).await;
    assert_eq!(outcome.body["status"]["phase"], "Sent");
    answer(send, StatusCode::OK, &message("6", merged(landed, &outcome.body["status"])));
    let (events, _) = events_until_done(&mut api, done).await;
    assert!(!events.iter().any(|e| e == "ResendingInDoubt" || e == "DeliveryUncertain"), "{events:?}");
    assert_eq!(transport.sends.load(Ordering::SeqCst), 1);
}

/// A message with `templateRef`, claimed and then found to name no EmailTemplate.
fn templated(resource_version: &str, status: Value) -> Value {
    let mut m = message(resource_version, status);
    m["spec"]["templateRef"] = json!({"name": "deploy"});
    let spec = m["spec"].as_object_mut().expect("spec");
    spec.remove("body");
    spec.remove("subject");
    m
}

const TEMPLATE_PATH: &str = "/apis/mailroom.dev/v1alpha1/namespaces/team-a/emailtemplates/deploy";

/// Answers the check before the claim: the template exists (a missing one makes the message wait).
async fn template_exists(api: &mut Handle<Request<Body>, Response<Body>>) {
    let (check, send) = next(api).await;
    assert_eq!((check.method.as_str(), check.path.as_str()), ("GET", TEMPLATE_PATH));
    answer(
        send,
        StatusCode::OK,
        &json!({"apiVersion": "mailroom.dev/v1alpha1", "kind": "EmailTemplate",
                "metadata": {"name": "deploy", "namespace": "team-a"}, "spec": {"subject": "s", "text": "t"}}),
    );
}

/// A template that does not exist yet (applied after its messages): the message waits, unclaimed,
/// with the reason, and nothing is attempted.
#[tokio::test]
async fn a_message_whose_template_is_not_there_yet_waits_unclaimed() {
    let transport = Arc::new(CountingTransport::default());
    let (ctx, mut api) = context(Arc::clone(&transport));
    let done = spawn(&ctx, templated("1", json!({})));
    let (read, send) = next(&mut api).await;
    assert_eq!((read.method.as_str(), read.path.as_str()), ("GET", TEMPLATE_PATH));
    answer(
        send,
        StatusCode::NOT_FOUND,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
                "message": "emailtemplates.mailroom.dev \"deploy\" not found"}),
    );
    let (write, send) = next(&mut api).await;
    assert_eq!((write.method.as_str(), write.path.as_str()), ("PATCH", STATUS_PATH));
    let after = merged(json!({}), &write.body["status"]);
    assert_eq!(after["phase"], "Pending", "{after}");
    assert!(after.get("attempts").is_none() && after.get("claimId").is_none(), "no claim: {after}");
    let waiting = after["conditions"].as_array().expect("conditions").iter().find(|c| c["type"] == "Waiting");
    let waiting = waiting.expect("a Waiting condition");
    assert_eq!((waiting["status"].as_str(), waiting["reason"].as_str()), (Some("True"), Some("TemplateNotFound")));
    assert!(waiting["message"].as_str().unwrap_or_default().contains("EmailTemplate deploy not found"), "{waiting}");
    answer(send, StatusCode::OK, &templated("2", after));
    let (events, _) = events_until_done(&mut api, done).await;
    assert_eq!(events, ["TemplateNotFound"]);
    assert_eq!(transport.sends.load(Ordering::SeqCst), 0, "nothing is sent");
}

/// Claimed, then it cannot be built (its template, present a moment before, was deleted): its
/// own problem, so the claim is taken back, the status is what it was before the claim but
/// Failed, and no attempt counts.
#[tokio::test]
async fn a_claimed_message_that_cannot_be_built_is_unclaimed_and_failed() {
    let transport = Arc::new(CountingTransport::default());
    let (ctx, mut api) = context(Arc::clone(&transport));
    let done = spawn(&ctx, templated("1", json!({})));
    template_exists(&mut api).await;
    let (claim, send) = next(&mut api).await;
    assert_eq!(claim.body["status"]["phase"], "Sending");
    let claimed = merged(json!({}), &claim.body["status"]);
    answer(send, StatusCode::OK, &templated("2", claimed.clone()));

    let (read, send) = next(&mut api).await;
    assert_eq!((read.method.as_str(), read.path.as_str()), ("GET", TEMPLATE_PATH));
    answer(
        send,
        StatusCode::NOT_FOUND,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
                "message": "emailtemplates.mailroom.dev \"deploy\" not found"}),
    );

    let (unclaim, send) = next(&mut api).await;
    assert_eq!((unclaim.method.as_str(), unclaim.path.as_str()), ("PATCH", STATUS_PATH));
    assert_eq!(unclaim.body["metadata"]["resourceVersion"], "2", "written under the claim that landed");
    let after = merged(claimed.clone(), &unclaim.body["status"]);
    assert_eq!(after["phase"], "Failed");
    for gone in ["attempts", "claimId", "claimedBy", "messageId", "transport", "lastAttemptTime"] {
        assert!(after.get(gone).is_none(), "{gone} outlived the claim: {after}");
    }
    let reasons: Vec<&str> =
        after["conditions"].as_array().expect("conditions").iter().filter_map(|c| c["reason"].as_str()).collect();
    assert!(reasons.contains(&"TemplateNotFound"), "{reasons:?}");
    answer(send, StatusCode::OK, &templated("3", after));
    let (events, _) = events_until_done(&mut api, done).await;
    assert_eq!(events, ["TemplateNotFound"]);
    assert_eq!(transport.sends.load(Ordering::SeqCst), 0, "nothing is sent");
}

/// Claimed, then the API server fails the template read: nothing was sent, so the status goes
/// back to exactly what it was, and the error policy tries again later.
#[tokio::test]
async fn a_claim_interrupted_by_the_api_server_is_given_back() {
    let transport = Arc::new(CountingTransport::default());
    let (ctx, mut api) = context(Arc::clone(&transport));
    let done = spawn(&ctx, templated("1", json!({})));
    template_exists(&mut api).await;
    let (claim, send) = next(&mut api).await;
    let claimed = merged(json!({}), &claim.body["status"]);
    answer(send, StatusCode::OK, &templated("2", claimed.clone()));

    let (read, send) = next(&mut api).await;
    assert_eq!(read.path, TEMPLATE_PATH);
    answer(
        send,
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "ServiceUnavailable", "code": 503,
                "message": "the server is currently unable to handle the request"}),
    );

    let (unclaim, send) = next(&mut api).await;
    assert_eq!((unclaim.method.as_str(), unclaim.path.as_str()), ("PATCH", STATUS_PATH));
    let after = merged(claimed, &unclaim.body["status"]);
    assert!(after.as_object().is_none_or(|o| o.is_empty()), "the status before the claim was empty: {after}");
    answer(send, StatusCode::OK, &templated("3", json!({})));
    let result = done.await.expect("reconcile task");
    assert!(result.is_err(), "the error policy retries");
    assert_eq!(transport.sends.load(Ordering::SeqCst), 0, "nothing is sent");
}
