//! Delivery with OAuth: the operator, the real API server, the Microsoft 365 emulator for Entra ID
//! and Graph, and the SMTP test server for XOAUTH2.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::emulator::{Emulator, concat_pems, rsa_certificate};
use common::smtp_peer::SmtpPeer;
use common::{Operator, message_condition, phase};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use mailroom::api::{EmailMessage, MailProfile, Phase, find_condition};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const TENANT: &str = "7e3b1c2d-0000-4000-8000-00000000e2e0";
const CLIENT: &str = "9a1f0c3e-1111-4111-8111-00000000e2e1";
const SENDER: &str = "alerts@contoso.com";
const SECRET_NAME: &str = "graph-credentials";
const SECRET_KEY: &str = "client-secret";
const WAIT: Duration = Duration::from_secs(60);

/// One test's world: a namespace, an emulator, and (once started) the operator.
struct World {
    client: Client,
    ns: String,
    emu: Emulator,
    test: &'static str,
}

impl World {
    async fn new(test: &'static str) -> World {
        let client = common::client().await;
        let ns = common::namespace(&client, test, &[]).await;
        let emu = Emulator::start(test).await;
        World { client, ns, emu, test }
    }

    /// Starts the operator trusting the emulator's CA and `more` CAs.
    fn operator(&self, more: &[PathBuf]) -> Operator {
        let bundle = self.emu.dir.path().join("operator-ca-bundle.pem");
        let mut cas = vec![self.emu.ca_pem()];
        cas.extend_from_slice(more);
        concat_pems(&bundle, &cas);
        let bundle = bundle.display().to_string();
        Operator::start(self.test, &self.ns, &["--ca-bundle", &bundle, "--allow-custom-endpoints"])
    }

    fn messages(&self) -> Api<EmailMessage> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn profiles(&self) -> Api<MailProfile> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn register(&self, app: Value) {
        self.emu.register_app(app).await;
    }

    /// A Secret with string data, of `type_` (Opaque when None).
    async fn secret(&self, name: &str, type_: Option<&str>, data: Value) {
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name}, "type": type_.unwrap_or("Opaque"), "stringData": data,
        }))
        .expect("Secret");
        self.secrets().create(&PostParams::default(), &secret).await.expect("create Secret");
    }

    /// Changes one key of a Secret.
    async fn set_secret(&self, name: &str, key: &str, value: &str) {
        let patch = json!({"stringData": {key: value}});
        self.secrets().patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch Secret");
    }

    /// A Graph profile with `credential` (clientSecretRef, certificateRef or workloadIdentity)
    /// pointing at the emulator, with `extra` merged into the spec.
    async fn graph_profile(&self, name: &str, client_id: &str, credential: Value, extra: Value) {
        let mut graph = json!({
            "tenantId": TENANT, "clientId": client_id,
            "authorityHost": self.emu.url, "endpoint": self.emu.url,
        });
        merge(&mut graph, credential);
        let mut spec = json!({"senders": {"default": SENDER}, "graph": graph});
        merge(&mut spec, extra);
        self.profile(name, spec).await;
    }

    async fn profile(&self, name: &str, spec: Value) {
        let profile: MailProfile = serde_json::from_value(json!({
            "apiVersion": "mailroom.dev/v1alpha1", "kind": "MailProfile",
            "metadata": {"name": name}, "spec": spec,
        }))
        .expect("MailProfile");
        self.profiles().create(&PostParams::default(), &profile).await.expect("create MailProfile");
    }

    /// Creates a message to ops@contoso.com through `profile`, with `extra` merged into the spec.
    async fn send(&self, name: &str, profile: &str, extra: Value) {
        create_message(&self.messages(), name, profile, extra).await;
    }

    /// Waits for the profile's Ready condition to have `status`, and returns the profile.
    async fn wait_ready(&self, name: &str, status: &str) -> MailProfile {
        common::wait_for(&self.profiles(), name, WAIT, |p| ready(p).is_some_and(|c| c.status == status)).await
    }

    /// An SMTP test server with STARTTLS that checks XOAUTH2 tokens through this world's emulator.
    fn xoauth2_peer(&self) -> SmtpPeer {
        self.xoauth2_peer_with(&[])
    }

    /// The same with more of the server's flags.
    fn xoauth2_peer_with(&self, more: &[&str]) -> SmtpPeer {
        let emu_ca = self.emu.ca_pem().display().to_string();
        let introspect = self.emu.introspect_url();
        let mut args =
            vec!["--self-signed", "--require-starttls", "--xoauth2-introspect", &introspect, "--xoauth2-ca", &emu_ca];
        args.extend_from_slice(more);
        SmtpPeer::start(&args)
    }

    async fn wait_sent(&self, name: &str) -> EmailMessage {
        wait_phase(&self.messages(), name, Phase::Sent).await
    }
}

/// Merges the keys of `extra` (an object) into `into`.
fn merge(into: &mut Value, extra: Value) {
    if let (Some(into), Value::Object(extra)) = (into.as_object_mut(), extra) {
        into.extend(extra);
    }
}

fn secret_ref() -> Value {
    json!({"clientSecretRef": {"name": SECRET_NAME, "key": SECRET_KEY}})
}

/// The app registration of the usual client, with `extra` merged in.
fn app(secrets: &[&str], extra: Value) -> Value {
    let mut app = json!({"tenantId": TENANT, "clientId": CLIENT, "secrets": secrets, "roles": ["Mail.Send"]});
    merge(&mut app, extra);
    app
}

async fn create_message(api: &Api<EmailMessage>, name: &str, profile: &str, extra: Value) {
    let mut spec = json!({
        "profileRef": {"name": profile},
        "to": ["Ops Team <ops@contoso.com>"],
        "subject": format!("OAuth delivery {name}"),
        "body": {"text": "Version 1.4.2 is live."},
    });
    merge(&mut spec, extra);
    let message: EmailMessage = serde_json::from_value(json!({
        "apiVersion": "mailroom.dev/v1alpha1", "kind": "EmailMessage",
        "metadata": {"name": name}, "spec": spec,
    }))
    .expect("EmailMessage");
    api.create(&PostParams::default(), &message).await.unwrap_or_else(|e| panic!("create {name}: {e}"));
}

fn ready(p: &MailProfile) -> Option<&Condition> {
    profile_condition(p, "Ready")
}

fn profile_condition<'a>(p: &'a MailProfile, type_: &str) -> Option<&'a Condition> {
    p.status.as_ref().and_then(|s| find_condition(&s.conditions, type_))
}

/// Waits for `want`; a message that ends otherwise fails the test at once, with its status.
async fn wait_phase(api: &Api<EmailMessage>, name: &str, want: Phase) -> EmailMessage {
    common::wait_for(api, name, WAIT, |m| {
        let now = phase(m);
        if now != Some(want) && now.is_some_and(Phase::is_finished) {
            panic!("{name} ended {now:?} instead of {want:?}: {:#?}", m.status);
        }
        now == Some(want)
    })
    .await
}

/// Waits until all `count` messages of the namespace are Sent; any Failed one fails the test.
async fn wait_all_sent(api: &Api<EmailMessage>, count: usize, timeout: Duration) -> Vec<EmailMessage> {
    let start = Instant::now();
    loop {
        let all = api.list(&Default::default()).await.expect("list messages").items;
        if let Some(failed) = all.iter().find(|m| phase(m) == Some(Phase::Failed)) {
            panic!("{:?} failed: {:#?}", failed.metadata.name, failed.status);
        }
        let sent = all.iter().filter(|m| phase(m) == Some(Phase::Sent)).count();
        if all.len() == count && sent == count {
            return all;
        }
        assert!(start.elapsed() < timeout, "{sent} of {count} messages sent within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn status_of(m: &EmailMessage) -> mailroom::api::EmailMessageStatus {
    m.status.clone().unwrap_or_default()
}

fn time(v: &Value) -> Timestamp {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not a timestamp: {v}"))
}

/// 200 messages through one Graph profile: one token request, every message accepted once.
#[tokio::test]
async fn many_messages_share_one_token() {
    const COUNT: usize = 200;
    let w = World::new("oauth-volume").await;
    w.register(app(&["volume-secret-1"], json!({}))).await;
    w.secret(SECRET_NAME, None, json!({SECRET_KEY: "volume-secret-1"})).await;
    let _op = w.operator(&[]);
    w.graph_profile("m365", CLIENT, secret_ref(), json!({"limits": {"messagesPerMinute": 100000, "maxConcurrent": 4}}))
        .await;
    w.wait_ready("m365", "True").await;

    let api = w.messages();
    futures::stream::iter(0..COUNT)
        .map(|i| {
            let api = api.clone();
            async move { create_message(&api, &format!("bulk-{i:03}"), "m365", json!({})).await }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
    let sent = wait_all_sent(&api, COUNT, Duration::from_secs(150)).await;

    let accepted = w.emu.messages().await;
    assert_eq!(accepted.len(), COUNT, "each message is accepted exactly once");
    let accepted_ids: BTreeSet<&str> = accepted.iter().filter_map(|m| m["messageId"].as_str()).collect();
    let accepted_requests: BTreeSet<&str> = accepted.iter().filter_map(|m| m["requestId"].as_str()).collect();
    let mut status_ids = BTreeSet::new();
    for m in &sent {
        let s = status_of(m);
        let id = s.message_id.clone().expect("messageId in the status");
        let request = s.request_id.clone().unwrap_or_else(|| panic!("no Graph request-id: {s:#?}"));
        assert!(accepted_ids.contains(id.as_str()), "{id} not among the accepted Message-IDs");
        assert!(accepted_requests.contains(request.as_str()), "request-id {request} not among the accepted");
        // Graph's 202 is accepted for delivery, not delivered: the condition says no more.
        let cond = message_condition(m, "Sent").expect("Sent condition");
        assert_eq!((cond.status.as_str(), cond.reason.as_str()), ("True", "Accepted"), "{cond:?}");
        assert!(cond.message.contains(&request) && cond.message.contains("not confirmed"), "{cond:?}");
        status_ids.insert(id);
    }
    assert_eq!(status_ids.len(), COUNT, "Message-IDs are distinct");
    assert!(accepted.iter().all(|m| m["messageIdFromClient"] == true), "the operator's Message-ID is used");

    let tokens = w.emu.token_requests().await;
    assert_eq!(tokens.len(), 1, "one token request for {COUNT} messages: {tokens:#?}");
    assert_eq!((tokens[0]["outcome"].as_str(), tokens[0]["grant"].as_str()), (Some("success"), Some("secret")));
    // Kept under Graph's limits: no request was throttled or sent with a stale token.
    let stats = w.emu.stats().await;
    assert_eq!(stats["graphRequests"], json!({"202": COUNT}), "{stats}");
}

/// Tokens that expire during the run are refreshed in the background: no message waits for a
/// token, fails on one, or is retried; the profile's token status moves forward.
#[tokio::test]
async fn short_lived_tokens_are_refreshed_in_the_background() {
    const LIFETIME: u64 = 20;
    const RUN: Duration = Duration::from_secs(45);
    let w = World::new("oauth-refresh").await;
    w.register(app(&["refresh-secret-1"], json!({"tokenLifetimeSeconds": LIFETIME}))).await;
    w.secret(SECRET_NAME, None, json!({SECRET_KEY: "refresh-secret-1"})).await;
    let _op = w.operator(&[]);
    w.graph_profile("m365", CLIENT, secret_ref(), json!({"limits": {"messagesPerMinute": 100000}})).await;
    let first = w.wait_ready("m365", "True").await;
    let first_token = first.status.clone().and_then(|s| s.token).expect("status.token");
    let (expires_0, refreshed_0) = (
        first_token.expires_at.clone().expect("expiresAt").0,
        first_token.last_refresh_time.expect("lastRefreshTime").0,
    );

    let start = Instant::now();
    let mut count = 0;
    while start.elapsed() < RUN {
        w.send(&format!("tick-{count:02}"), "m365", json!({})).await;
        count += 1;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let sent = wait_all_sent(&w.messages(), count, WAIT).await;
    for m in &sent {
        assert_eq!(status_of(m).attempts, Some(1), "{:?} was retried: {:#?}", m.metadata.name, m.status);
    }
    assert_eq!(w.emu.messages().await.len(), count);

    let tokens = w.emu.token_requests().await;
    assert!(tokens.iter().all(|t| t["outcome"] == "success"), "{tokens:#?}");
    // Refreshed about every half lifetime: several times over the run, never per message.
    let most = (start.elapsed().as_secs() / (LIFETIME / 2)) as usize + 2;
    assert!((3..=most).contains(&tokens.len()), "{} token requests for {count} messages in {:?}", tokens.len(), RUN);
    let stats = w.emu.stats().await;
    assert_eq!(stats["graphRequests"].get("401"), None, "a request went out with an expired token: {stats}");

    let profile = w.wait_ready("m365", "True").await;
    let token = profile.status.and_then(|s| s.token).expect("status.token");
    assert!(token.expires_at.expect("expiresAt").0 > expires_0, "expiresAt did not advance");
    assert!(token.last_refresh_time.expect("lastRefreshTime").0 > refreshed_0, "lastRefreshTime did not advance");
}

/// A rotated client secret: the Secret's change drops the token at once, the next token comes
/// from the new secret, and the old one is never presented again.
#[tokio::test]
async fn a_rotated_secret_is_used_for_the_next_token() {
    let w = World::new("oauth-rotate").await;
    w.register(app(&["rotate-secret-A"], json!({}))).await;
    w.secret(SECRET_NAME, None, json!({SECRET_KEY: "rotate-secret-A"})).await;
    let _op = w.operator(&[]);
    w.graph_profile("m365", CLIENT, secret_ref(), json!({})).await;
    w.wait_ready("m365", "True").await;
    w.send("before", "m365", json!({})).await;
    w.wait_sent("before").await;
    assert_eq!(w.emu.token_requests().await.len(), 1);

    // Entra ID now knows only secret B; the cached token (from A) would stay valid for an hour.
    w.register(app(&["rotate-secret-B"], json!({}))).await;
    let changed = Timestamp::now();
    w.set_secret(SECRET_NAME, SECRET_KEY, "rotate-secret-B").await;
    let tokens = w.emu.wait_token_requests(Duration::from_secs(10), |t| t.len() >= 2).await;
    let second = time(&tokens[1]["time"]);
    assert!(second.as_second() >= changed.as_second(), "the second token request came before the Secret changed");
    assert_eq!(tokens[1]["outcome"], "success", "{tokens:#?}");

    w.send("after", "m365", json!({})).await;
    let after = w.wait_sent("after").await;
    assert_eq!(status_of(&after).attempts, Some(1));
    assert_eq!(w.emu.messages().await.len(), 2);
    let tokens = w.emu.token_requests().await;
    assert_eq!(tokens.len(), 2, "{tokens:#?}");
    assert!(tokens.iter().all(|t| t["outcome"] == "success"), "the old secret was presented again: {tokens:#?}");
}

/// A wrong secret: the profile says why (AADSTS7000215), messages wait, and go out once the
/// Secret is fixed. No secret value shows up in status, Events or the operator's log.
#[tokio::test]
async fn a_wrong_secret_holds_messages_until_it_is_fixed() {
    const RIGHT: &str = "right-Secret-value-7f3c9a51";
    const WRONG: &str = "wrong-Secret-value-2b81d4e6";
    let w = World::new("oauth-wrong").await;
    w.register(app(&[RIGHT], json!({}))).await;
    w.secret(SECRET_NAME, None, json!({SECRET_KEY: WRONG})).await;
    let op = w.operator(&[]);
    w.graph_profile("m365", CLIENT, secret_ref(), json!({})).await;
    let profile = w.wait_ready("m365", "False").await;
    let cond = ready(&profile).expect("Ready").clone();
    assert_eq!(cond.reason, "TokenRequestFailed", "{cond:?}");
    assert!(cond.message.contains("AADSTS7000215"), "{cond:?}");

    w.send("held", "m365", json!({})).await;
    let held = common::wait_for(&w.messages(), "held", WAIT, |m| {
        message_condition(m, "Waiting").is_some_and(|c| c.status == "True" && c.reason == "ProfileNotReady")
    })
    .await;
    let waiting = message_condition(&held, "Waiting").expect("Waiting");
    assert!(waiting.message.contains("AADSTS7000215"), "{waiting:?}");
    assert_eq!(status_of(&held).attempts, None, "nothing was sent");

    w.set_secret(SECRET_NAME, SECRET_KEY, RIGHT).await;
    let profile = w.wait_ready("m365", "True").await;
    let sent = w.wait_sent("held").await;
    assert_eq!(status_of(&sent).attempts, Some(1));
    assert_eq!(w.emu.messages().await.len(), 1);

    let tokens = w.emu.token_requests().await;
    assert!(tokens.iter().any(|t| t["outcome"] == "AADSTS7000215"), "{tokens:#?}");
    assert_eq!(tokens.last().map(|t| t["outcome"].clone()), Some(json!("success")));
    let events: Vec<String> = {
        use k8s_openapi::api::events::v1::Event;
        let api: Api<Event> = Api::namespaced(w.client.clone(), &w.ns);
        let list = api.list(&Default::default()).await.expect("list events").items;
        list.into_iter().map(|e| serde_json::to_string(&e).expect("JSON")).collect()
    };
    let shown = [
        serde_json::to_string(&profile.status).expect("JSON"),
        serde_json::to_string(&sent.status).expect("JSON"),
        events.join("\n"),
        op.log_text(),
    ];
    for (what, text) in ["profile status", "message status", "events", "operator log"].iter().zip(&shown) {
        for secret in [RIGHT, WRONG] {
            assert!(!text.contains(secret), "the {what} contains a client secret");
        }
    }
    assert!(!op.log_text().is_empty(), "the operator logged nothing: the check above proves little");
}

/// Exchange Online RBAC for Applications: the app holds no Entra role, so its token carries no
/// `roles`; a scoped `Application Mail.Send` assignment lets it send as the mailboxes of its
/// management scope. The profile is Ready and says what it sees; a sender in scope goes out, a
/// sender outside it fails at once with Graph's 403 and what to grant, and the profile shows both.
#[tokio::test]
async fn rbac_for_applications_sends_from_its_scope_only() {
    let w = World::new("oauth-rbac").await;
    let registered = w.emu.register_app(app(&["rbac-secret-1"], json!({"roles": []}))).await;
    let sp = registered["objectId"].as_str().expect("service principal object id").to_string();
    w.emu
        .assign_role(json!({"tenantId": TENANT, "servicePrincipalObjectId": sp, "role": "Application Mail.Send", "mailboxes": [SENDER]}))
        .await;
    w.secret(SECRET_NAME, None, json!({SECRET_KEY: "rbac-secret-1"})).await;
    let _op = w.operator(&[]);
    let senders = json!({"senders": {"default": SENDER, "allowed": [SENDER, "ceo@contoso.com"]}});
    w.graph_profile("m365", CLIENT, secret_ref(), senders).await;
    let profile = w.wait_ready("m365", "True").await;
    assert!(profile.status.as_ref().and_then(|s| s.token.as_ref()).is_some_and(|t| t.roles.is_empty()));
    let advice = profile_condition(&profile, "PermissionsVerified").expect("PermissionsVerified");
    assert_eq!((advice.status.as_str(), advice.reason.as_str()), ("False", "RoleNotInToken"), "{advice:?}");
    assert!(advice.message.contains("Application Mail.Send"), "{advice:?}");

    w.send("in-scope", "m365", json!({})).await;
    let sent = w.wait_sent("in-scope").await;
    assert_eq!(status_of(&sent).attempts, Some(1));
    let verified = common::wait_for(&w.profiles(), "m365", WAIT, |p| {
        profile_condition(p, "PermissionsVerified").is_some_and(|c| c.reason == "AuthorizedByExchange")
    })
    .await;
    assert_eq!(profile_condition(&verified, "PermissionsVerified").map(|c| c.status.as_str()), Some("True"));

    w.send("out-of-scope", "m365", json!({"from": "ceo@contoso.com"})).await;
    let failed = wait_phase(&w.messages(), "out-of-scope", Phase::Failed).await;
    assert_eq!(status_of(&failed).attempts, Some(1), "a denial is not retried");
    let cond = message_condition(&failed, "Failed").expect("Failed condition");
    assert!(cond.message.contains("Graph 403 ErrorAccessDenied"), "{cond:?}");
    assert!(cond.message.contains("management scope") && cond.message.contains("Application Mail.Send"), "{cond:?}");
    let denied = common::wait_for(&w.profiles(), "m365", WAIT, |p| {
        profile_condition(p, "PermissionsVerified").is_some_and(|c| c.reason == "SendDenied")
    })
    .await;
    let shown = profile_condition(&denied, "PermissionsVerified").expect("PermissionsVerified");
    assert!(shown.status == "False" && shown.message.contains("ceo@contoso.com"), "{shown:?}");
    assert_eq!(
        ready(&denied).map(|c| c.status.as_str()),
        Some("True"),
        "one mailbox's denial does not stop the profile"
    );
    let accepted = w.emu.messages().await;
    assert_eq!(accepted.len(), 1, "{accepted:#?}");
    assert_eq!(accepted[0]["sender"], SENDER);
}

/// The gotcha of `New-ServicePrincipal`: registered with the app registration's object id instead
/// of the Enterprise Application's, the role assignment never matches the app's token, and Graph
/// refuses every send with 403 ErrorAccessDenied, which the message and the profile say.
#[tokio::test]
async fn a_role_assigned_to_the_wrong_object_id_is_denied() {
    let w = World::new("oauth-wrong-sp").await;
    let registered = w.emu.register_app(app(&["wrongsp-secret-1"], json!({"roles": []}))).await;
    let wrong = registered["applicationObjectId"].as_str().expect("app registration object id").to_string();
    w.emu
        .assign_role(json!({"tenantId": TENANT, "servicePrincipalObjectId": wrong, "role": "Application Mail.Send", "mailboxes": null}))
        .await;
    w.secret(SECRET_NAME, None, json!({SECRET_KEY: "wrongsp-secret-1"})).await;
    let _op = w.operator(&[]);
    w.graph_profile("m365", CLIENT, secret_ref(), json!({})).await;
    w.wait_ready("m365", "True").await;
    w.send("denied", "m365", json!({})).await;
    let failed = wait_phase(&w.messages(), "denied", Phase::Failed).await;
    let cond = message_condition(&failed, "Failed").expect("Failed condition");
    assert!(
        cond.message.contains("ErrorAccessDenied") && cond.message.contains("Enterprise Application's object id"),
        "{cond:?}"
    );
    common::wait_for(&w.profiles(), "m365", WAIT, |p| {
        profile_condition(p, "PermissionsVerified").is_some_and(|c| c.status == "False" && c.reason == "SendDenied")
    })
    .await;
    assert!(w.emu.messages().await.is_empty());
}

/// A national cloud: with `cloud: USGovernment` the token is asked for the US Graph's scope,
/// which that cloud's Entra issues; a profile left on the Public cloud asks for the commercial
/// scope and is refused with Entra's AADSTS500011, shown in its Ready condition.
#[tokio::test]
async fn a_national_cloud_profile_asks_for_its_own_scope() {
    let test = "oauth-cloud";
    let client = common::client().await;
    let ns = common::namespace(&client, test, &[]).await;
    let w = World { client, ns, emu: Emulator::start_in_cloud(test, "USGovernment").await, test };
    w.register(app(&["gov-secret-1"], json!({}))).await;
    w.secret(SECRET_NAME, None, json!({SECRET_KEY: "gov-secret-1"})).await;
    let _op = w.operator(&[]);
    w.graph_profile("gcc-high", CLIENT, secret_ref(), json!({})).await;
    let profiles = w.profiles();
    let mut spec = profiles.get("gcc-high").await.expect("profile").spec;
    if let Some(g) = spec.graph.as_mut() {
        g.credentials.cloud = Some(mailroom::api::Cloud::USGovernment);
    }
    let patch = json!({"spec": spec});
    profiles.patch("gcc-high", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("set the cloud");
    w.graph_profile("commercial", CLIENT, secret_ref(), json!({})).await;

    let refused = w.wait_ready("commercial", "False").await;
    let cond = ready(&refused).expect("Ready");
    assert_eq!(cond.reason, "TokenRequestFailed", "{cond:?}");
    assert!(cond.message.contains("AADSTS500011"), "{cond:?}");
    common::wait_for(&profiles, "gcc-high", WAIT, |p| {
        ready(p).is_some_and(|c| c.status == "True")
            && p.status.as_ref().and_then(|s| s.observed_generation) == p.metadata.generation
    })
    .await;
    w.send("gov", "gcc-high", json!({})).await;
    w.wait_sent("gov").await;
    let scopes: BTreeSet<String> = w
        .emu
        .token_requests()
        .await
        .iter()
        .filter(|t| t["outcome"] == "success")
        .filter_map(|t| t["scope"].as_str().map(String::from))
        .collect();
    assert_eq!(scopes, BTreeSet::from(["https://graph.microsoft.us/.default".to_string()]));
}

/// A MailProfile may only name Microsoft's cloud endpoints: one pointing at another URL is
/// refused (`Ready=False InvalidSettings`) and nothing is contacted, while a ClusterMailProfile,
/// which a cluster administrator writes, may name it.
#[tokio::test]
async fn a_mailprofile_cannot_point_the_operator_at_other_urls() {
    let w = World::new("oauth-ssrf").await;
    w.register(app(&["ssrf-secret-1"], json!({}))).await;
    w.secret(SECRET_NAME, None, json!({SECRET_KEY: "ssrf-secret-1"})).await;
    let bundle = w.emu.dir.path().join("strict-ca-bundle.pem");
    concat_pems(&bundle, &[w.emu.ca_pem()]);
    let bundle = bundle.display().to_string();
    // Watching its own namespace only: an operator without --allow-custom-endpoints over all
    // namespaces would refuse the other tests' MailProfiles, which point at their emulators.
    let _op = Operator::start(w.test, &w.ns, &["--ca-bundle", &bundle]);
    w.graph_profile("internal", CLIENT, secret_ref(), json!({})).await;
    let refused = w.wait_ready("internal", "False").await;
    let cond = ready(&refused).expect("Ready");
    assert_eq!(cond.reason, "InvalidSettings", "{cond:?}");
    assert!(cond.message.contains("not one of Microsoft's") && cond.message.contains("ClusterMailProfile"), "{cond:?}");
    assert!(w.emu.token_requests().await.is_empty(), "the refused MailProfile contacted its endpoint");

    let name = format!("{}-shared", w.ns);
    let cluster: mailroom::api::ClusterMailProfile = serde_json::from_value(json!({
        "apiVersion": "mailroom.dev/v1alpha1", "kind": "ClusterMailProfile", "metadata": {"name": name},
        "spec": {
            "allowedNamespaces": {},
            "senders": {"default": SENDER},
            "graph": {
                "tenantId": TENANT, "clientId": CLIENT, "authorityHost": w.emu.url, "endpoint": w.emu.url,
                "clientSecretRef": {"name": SECRET_NAME, "key": SECRET_KEY, "namespace": w.ns},
            },
        },
    }))
    .expect("ClusterMailProfile");
    let clusters: Api<mailroom::api::ClusterMailProfile> = Api::all(w.client.clone());
    clusters.create(&PostParams::default(), &cluster).await.expect("create ClusterMailProfile");
    let ok = common::wait_for(&clusters, &name, WAIT, |p| {
        p.status.as_ref().and_then(|s| find_condition(&s.conditions, "Ready")).is_some_and(|c| c.status == "True")
    })
    .await;
    clusters.delete(&name, &Default::default()).await.expect("delete ClusterMailProfile");
    assert!(ok.status.is_some());
    let requests = w.emu.token_requests().await;
    assert!(requests.iter().any(|t| t["outcome"] == "success"), "the ClusterMailProfile got its token: {requests:#?}");
}

/// A deleted profile's token stops being refreshed (at most the refresh already due happens).
#[tokio::test]
async fn a_deleted_profile_stops_requesting_tokens() {
    const LIFETIME: u64 = 4;
    let w = World::new("oauth-deleted").await;
    w.register(app(&["deleted-secret-1"], json!({"tokenLifetimeSeconds": LIFETIME}))).await;
    w.secret(SECRET_NAME, None, json!({SECRET_KEY: "deleted-secret-1"})).await;
    let op = w.operator(&[]);
    w.graph_profile("m365", CLIENT, secret_ref(), json!({})).await;
    w.wait_ready("m365", "True").await;
    w.emu.wait_token_requests(WAIT, |t| t.len() >= 2).await;
    w.profiles().delete("m365", &Default::default()).await.expect("delete the profile");

    // Operators of tests running beside this one log the same line for their own profiles.
    let stopped_line = format!("its token refreshes stopped profile=MailProfile {}/m365", w.ns);
    let start = Instant::now();
    while !op.log_text().contains(&stopped_line) {
        assert!(start.elapsed() < WAIT, "the operator did not stop the deleted profile's token refreshes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stopped = w.emu.token_requests().await.len();
    // Over two more refresh intervals, nothing.
    tokio::time::sleep(Duration::from_secs(LIFETIME + 1)).await;
    assert_eq!(w.emu.token_requests().await.len(), stopped, "tokens requested for a deleted profile");
}

/// A certificate credential and a workload identity (federated token file) both get tokens and send.
#[tokio::test]
async fn certificate_and_workload_identity_profiles_send() {
    const CERT_CLIENT: &str = "5c0ffee0-2222-4222-8222-00000000e2e2";
    const WI_CLIENT: &str = "5c0ffee0-3333-4333-8333-00000000e2e3";
    const ISSUER: &str = "https://oidc.mailroom.test/cluster-e2e";
    const SUBJECT: &str = "system:serviceaccount:mail-system:mailroom";
    let w = World::new("oauth-cert-wi").await;
    let dir = tempfile::tempdir().expect("temp dir");

    let (cert_pem, key_pem) = rsa_certificate(dir.path(), "mail-sender-app");
    w.register(
        json!({"tenantId": TENANT, "clientId": CERT_CLIENT, "certificates": [cert_pem], "roles": ["Mail.Send"]}),
    )
    .await;
    w.secret("graph-cert", Some("kubernetes.io/tls"), json!({"tls.crt": cert_pem, "tls.key": key_pem})).await;

    // The projected service account token, as the kubelet would write it: signed by the cluster's
    // issuer, whose key the app's federated credential names.
    let (issuer_cert, issuer_key) = rsa_certificate(dir.path(), "cluster-issuer");
    w.register(json!({
        "tenantId": TENANT, "clientId": WI_CLIENT, "roles": ["Mail.Send"],
        "federated": [{"issuer": ISSUER, "subject": SUBJECT, "audience": "api://AzureADTokenExchange",
                       "jwksPem": issuer_cert}],
    }))
    .await;
    let now = Timestamp::now().as_second();
    let claims = json!({"iss": ISSUER, "sub": SUBJECT, "aud": ["api://AzureADTokenExchange"],
                        "iat": now, "nbf": now, "exp": now + 3600});
    let jwt = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(issuer_key.as_bytes()).expect("issuer key"),
    )
    .expect("sign the service account token");
    let token_file = dir.path().join("azure-identity-token");
    std::fs::write(&token_file, jwt).expect("token file");

    let _op = w.operator(&[]);
    w.graph_profile("by-cert", CERT_CLIENT, json!({"certificateRef": {"name": "graph-cert"}}), json!({})).await;
    w.graph_profile(
        "by-wi",
        WI_CLIENT,
        json!({"workloadIdentity": {"tokenFile": token_file.display().to_string()}}),
        json!({}),
    )
    .await;
    w.send("via-cert", "by-cert", json!({})).await;
    w.send("via-wi", "by-wi", json!({})).await;
    let via_cert = w.wait_sent("via-cert").await;
    let via_wi = w.wait_sent("via-wi").await;

    let accepted = w.emu.messages().await;
    let sender_of = |m: &EmailMessage| {
        let id = status_of(m).message_id.expect("messageId");
        accepted.iter().find(|a| a["messageId"] == id.as_str()).map(|a| a["clientId"].clone())
    };
    assert_eq!(sender_of(&via_cert), Some(json!(CERT_CLIENT)));
    assert_eq!(sender_of(&via_wi), Some(json!(WI_CLIENT)));
    let tokens = w.emu.token_requests().await;
    let grant = |client: &str| {
        tokens.iter().filter(|t| t["clientId"] == client).map(|t| (t["grant"].clone(), t["outcome"].clone())).collect()
    };
    let cert_grants: Vec<_> = grant(CERT_CLIENT);
    let wi_grants: Vec<_> = grant(WI_CLIENT);
    assert_eq!(cert_grants, [(json!("certificate"), json!("success"))], "{tokens:#?}");
    assert_eq!(wi_grants, [(json!("federated"), json!("success"))], "{tokens:#?}");
    for p in ["by-cert", "by-wi"] {
        let profile = w.wait_ready(p, "True").await;
        let roles = profile.status.and_then(|s| s.token).map(|t| t.roles).unwrap_or_default();
        assert_eq!(roles, ["Mail.Send"], "{p}");
    }
}

/// Graph throttles (429 with Retry-After): every message is sent exactly once, and no retry
/// starts before the Retry-After has passed.
#[tokio::test]
async fn throttled_messages_wait_for_retry_after() {
    const COUNT: usize = 10;
    const THROTTLED: u64 = 5;
    const RETRY_AFTER: i64 = 3;
    let w = World::new("oauth-429").await;
    w.register(app(&["throttle-secret-1"], json!({}))).await;
    w.secret(SECRET_NAME, None, json!({SECRET_KEY: "throttle-secret-1"})).await;
    let _op = w.operator(&[]);
    w.graph_profile("m365", CLIENT, secret_ref(), json!({"limits": {"messagesPerMinute": 100000}})).await;
    w.wait_ready("m365", "True").await;
    w.emu.fault(json!({"target": "graph", "status": 429, "count": THROTTLED, "retryAfterSeconds": RETRY_AFTER})).await;

    // Every status each message passes through, to see each retry's schedule.
    let seen: Arc<Mutex<Vec<EmailMessage>>> = Arc::default();
    let watch = tokio::spawn({
        let (api, seen) = (w.messages(), seen.clone());
        async move {
            let stream = watcher(api, watcher::Config::default()).applied_objects();
            futures::pin_mut!(stream);
            while let Ok(Some(m)) = stream.try_next().await {
                seen.lock().expect("lock").push(m);
            }
        }
    });
    for i in 0..COUNT {
        w.send(&format!("storm-{i}"), "m365", json!({})).await;
    }
    let sent = wait_all_sent(&w.messages(), COUNT, WAIT).await;
    watch.abort();

    let accepted = w.emu.messages().await;
    assert_eq!(accepted.len(), COUNT, "each message accepted exactly once");
    let ids: BTreeSet<&str> = accepted.iter().filter_map(|m| m["messageId"].as_str()).collect();
    assert_eq!(ids.len(), COUNT);
    let stats = w.emu.stats().await;
    assert_eq!(stats["graphRequests"]["429"], json!(THROTTLED), "{stats}");
    let retries: u32 = sent.iter().map(|m| status_of(m).attempts.unwrap_or(0) - 1).sum();
    assert_eq!(retries as u64, THROTTLED, "one retry per 429");

    let seen = seen.lock().expect("lock").clone();
    let mut checked = 0;
    for m in &sent {
        let name = m.metadata.name.clone().unwrap_or_default();
        let last = status_of(m).last_attempt_time.expect("lastAttemptTime").0;
        // Each scheduled retry, as (attempt, when that attempt started, when the next may start).
        let scheduled: BTreeMap<u32, (Timestamp, Timestamp)> = seen
            .iter()
            .filter(|s| s.metadata.name.as_deref() == Some(&name))
            .map(status_of)
            .filter(|s| s.phase == Some(Phase::Pending) && s.next_attempt_time.is_some())
            .filter_map(|s| Some((s.attempts?, (s.last_attempt_time?.0, s.next_attempt_time?.0))))
            .collect();
        let retried = status_of(m).attempts.unwrap_or(0) > 1;
        assert_eq!(!scheduled.is_empty(), retried, "{name}: retries seen {scheduled:?}");
        for (attempt, (started, next)) in &scheduled {
            let wait = next.as_second() - started.as_second();
            assert!(wait >= RETRY_AFTER, "{name}: attempt {attempt} scheduled its retry {wait} s after it started");
            assert!(last >= *next, "{name}: the retry started at {last}, before {next}");
            checked += 1;
        }
    }
    assert_eq!(checked as u64, THROTTLED, "every retry's schedule was observed");
}

/// Graph refuses the sender (403 ErrorSendAsDenied): the message fails at once, saying so.
#[tokio::test]
async fn send_as_denied_fails_without_retry() {
    let w = World::new("oauth-403").await;
    w.register(app(&["denied-secret-1"], json!({"allowedMailboxes": ["someone-else@contoso.com"]}))).await;
    w.secret(SECRET_NAME, None, json!({SECRET_KEY: "denied-secret-1"})).await;
    let _op = w.operator(&[]);
    w.graph_profile("m365", CLIENT, secret_ref(), json!({})).await;
    w.send("denied", "m365", json!({})).await;
    let failed = wait_phase(&w.messages(), "denied", Phase::Failed).await;
    assert_eq!(status_of(&failed).attempts, Some(1));
    let cond = message_condition(&failed, "Failed").expect("Failed condition");
    assert!(cond.message.contains("ErrorSendAsDenied") && cond.message.contains("403"), "{cond:?}");
    assert!(w.emu.messages().await.is_empty());
}

/// A message over Graph's 4 MB request limit goes as a draft with its attachments added one by
/// one, each arriving intact. (A single attachment of 3 MB or more, which would need an upload
/// session, cannot come through the API server: Secrets and ConfigMaps hold at most 1 MiB and
/// etcd refuses larger objects; the transport's tests cover upload sessions.)
#[tokio::test]
async fn a_large_message_goes_as_a_draft() {
    const PARTS: usize = 5;
    const SIZE: usize = 1_000_000;
    let w = World::new("oauth-draft").await;
    w.register(app(&["draft-secret-1"], json!({"roles": ["Mail.Send", "Mail.ReadWrite"]}))).await;
    w.secret(SECRET_NAME, None, json!({SECRET_KEY: "draft-secret-1"})).await;
    let _op = w.operator(&[]);
    w.graph_profile("m365", CLIENT, secret_ref(), json!({})).await;

    let mut digests = BTreeMap::new();
    let mut attachments = Vec::new();
    for i in 0..PARTS {
        let bytes: Vec<u8> = (0..SIZE).map(|_| rand::random::<u8>()).collect();
        let name = format!("part-{i}.bin");
        digests.insert(name.clone(), hex(&Sha256::digest(&bytes)));
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("part-{i}")},
            "data": {"data": base64_encode(&bytes)},
        }))
        .expect("Secret");
        w.secrets().create(&PostParams::default(), &secret).await.expect("create Secret");
        attachments.push(json!({"name": name, "contentType": "application/octet-stream",
                                "secretRef": {"name": format!("part-{i}"), "key": "data"}}));
    }
    w.send("big", "m365", json!({"attachments": attachments})).await;
    let sent = w.wait_sent("big").await;
    assert_eq!(status_of(&sent).attempts, Some(1));

    let accepted = w.emu.messages().await;
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0]["mode"], "draft", "{:#}", accepted[0]);
    let got: BTreeMap<String, String> = accepted[0]["attachments"]
        .as_array()
        .expect("attachments")
        .iter()
        .map(|a| {
            assert_eq!(a["size"], json!(SIZE), "{a}");
            (a["name"].as_str().unwrap_or_default().to_string(), a["sha256"].as_str().unwrap_or_default().to_string())
        })
        .collect();
    assert_eq!(got, digests);
    assert_eq!(w.emu.stats().await["drafts"], json!(0), "the draft was sent, not left behind");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// SMTP with XOAUTH2: a token for Exchange Online from the emulator, checked by the SMTP server
/// through the emulator's introspection.
#[tokio::test]
async fn smtp_xoauth2_sends_with_an_outlook_token() {
    let w = World::new("oauth-xoauth2").await;
    let peer = w.xoauth2_peer();
    w.register(app(&["smtp-secret-1"], json!({"roles": ["SMTP.SendAsApp"]}))).await;
    w.secret(SECRET_NAME, None, json!({SECRET_KEY: "smtp-secret-1"})).await;
    let _op = w.operator(&[peer.ca_pem()]);
    let mut oauth2 = json!({"tenantId": TENANT, "clientId": CLIENT, "authorityHost": w.emu.url});
    merge(&mut oauth2, secret_ref());
    w.profile(
        "exo",
        json!({
            "senders": {"default": SENDER},
            "smtp": {"host": "127.0.0.1", "port": peer.smtp_port, "tls": "StartTLS", "auth": {"oauth2": oauth2}},
        }),
    )
    .await;
    w.send("over-smtp", "exo", json!({})).await;
    let sent = w.wait_sent("over-smtp").await;
    assert_eq!(status_of(&sent).attempts, Some(1));

    let envelopes = peer.wait_messages(1, WAIT).await;
    assert_eq!(envelopes[0]["auth_mechanism"], "XOAUTH2", "{:#}", envelopes[0]);
    assert_eq!(envelopes[0]["auth_client_id"], CLIENT);
    assert_eq!(envelopes[0]["tls"], true);
    assert_eq!(envelopes[0]["message_id"].as_str(), status_of(&sent).message_id.as_deref());
    let tokens = w.emu.token_requests().await;
    assert_eq!(tokens.len(), 1, "{tokens:#?}");
    assert_eq!(tokens[0]["scope"], "https://outlook.office365.com/.default");
    assert_eq!(tokens[0]["outcome"], "success");
}

/// Exchange Online allows three concurrent SMTP AUTH connections per mailbox and answers each
/// connection over that with `432 4.3.2` (the server here does the same). An XOAUTH2 profile's
/// default `maxConcurrent` (3), with its sessions kept between messages, stays within it: a burst
/// through one mailbox is Sent at the first attempt over at most three sessions. The same burst
/// with `maxConcurrent: 4` goes over the limit, so the limit is real and the default is what
/// keeps the first profile under it.
#[tokio::test]
async fn smtp_auth_stays_within_three_connections_per_mailbox() {
    const COUNT: usize = 12;
    let w = World::new("oauth-smtp-sessions").await;
    let peer = w.xoauth2_peer_with(&["--max-sessions-per-login", "3"]);
    let wide = w.xoauth2_peer_with(&["--max-sessions-per-login", "3"]);
    // Each message takes a moment at the server, so that the burst's sends overlap.
    for p in [&peer, &wide] {
        p.script(json!({"latency_ms": 200})).await;
    }
    w.register(app(&["smtp-secret-1"], json!({"roles": ["SMTP.SendAsApp"]}))).await;
    w.secret(SECRET_NAME, None, json!({SECRET_KEY: "smtp-secret-1"})).await;
    let _op = w.operator(&[peer.ca_pem(), wide.ca_pem()]);
    let profile = |port: u16, limits: Value| {
        let mut oauth2 = json!({"tenantId": TENANT, "clientId": CLIENT, "authorityHost": w.emu.url});
        merge(&mut oauth2, secret_ref());
        json!({
            "senders": {"default": SENDER},
            "limits": limits,
            "smtp": {"host": "127.0.0.1", "port": port, "tls": "StartTLS", "auth": {"oauth2": oauth2}},
        })
    };
    w.profile("exo", profile(peer.smtp_port, json!({"messagesPerMinute": 6000}))).await;
    for i in 0..COUNT {
        w.send(&format!("burst-{i:02}"), "exo", json!({})).await;
    }
    let sent = wait_all_sent(&w.messages(), COUNT, WAIT).await;
    for m in &sent {
        assert_eq!(status_of(m).attempts, Some(1), "{:?}: {:#?}", m.metadata.name, m.status);
    }
    let stats = peer.stats().await;
    assert_eq!(stats["over_session_limit"], 0, "{stats:#}");
    assert_eq!(stats["accepted"], COUNT, "{stats:#}");
    let sessions = stats["connections"].as_u64().expect("connections");
    assert!((1..=3).contains(&sessions), "{COUNT} messages over {sessions} sessions: {stats:#}");

    w.profile("exo-wide", profile(wide.smtp_port, json!({"messagesPerMinute": 6000, "maxConcurrent": 4}))).await;
    for i in 0..COUNT {
        w.send(&format!("wide-{i:02}"), "exo-wide", json!({})).await;
    }
    let start = Instant::now();
    while wide.stats().await["over_session_limit"].as_u64().unwrap_or(0) == 0 {
        assert!(start.elapsed() < WAIT, "four sessions at once never went over the limit: {:#}", wide.stats().await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SMTP with XOAUTH2 onboarded through Exchange Online App RBAC (`Application SMTP.SendAsApp`
/// scoped to one mailbox, no Entra role): the token has no roles, the mailbox in scope sends, and
/// another mailbox is refused with 535 even with a new token, failing with what to grant.
#[tokio::test]
async fn smtp_xoauth2_through_app_rbac() {
    let w = World::new("oauth-xoauth2-rbac").await;
    let peer = w.xoauth2_peer();
    let registered = w.emu.register_app(app(&["smtp-rbac-1"], json!({"roles": []}))).await;
    let sp = registered["objectId"].as_str().expect("service principal object id").to_string();
    w.emu
        .assign_role(json!({"tenantId": TENANT, "servicePrincipalObjectId": sp, "role": "Application SMTP.SendAsApp", "mailboxes": [SENDER]}))
        .await;
    w.secret(SECRET_NAME, None, json!({SECRET_KEY: "smtp-rbac-1"})).await;
    let _op = w.operator(&[peer.ca_pem()]);
    let mut oauth2 = json!({"tenantId": TENANT, "clientId": CLIENT, "authorityHost": w.emu.url});
    merge(&mut oauth2, secret_ref());
    w.profile(
        "exo",
        json!({
            "senders": {"default": SENDER, "allowed": [SENDER, "other@contoso.com"]},
            "smtp": {"host": "127.0.0.1", "port": peer.smtp_port, "tls": "StartTLS", "auth": {"oauth2": oauth2}},
        }),
    )
    .await;
    let profile = w.wait_ready("exo", "True").await;
    let advice = profile_condition(&profile, "PermissionsVerified").expect("PermissionsVerified");
    assert_eq!(advice.reason, "RoleNotInToken", "{advice:?}");
    assert!(advice.message.contains("Application SMTP.SendAsApp"), "{advice:?}");
    w.send("in-scope", "exo", json!({})).await;
    w.wait_sent("in-scope").await;
    assert_eq!(peer.wait_messages(1, WAIT).await[0]["auth_mechanism"], "XOAUTH2");

    w.send("out-of-scope", "exo", json!({"from": "other@contoso.com"})).await;
    let failed = wait_phase(&w.messages(), "out-of-scope", Phase::Failed).await;
    let cond = message_condition(&failed, "Failed").expect("Failed condition");
    assert!(cond.message.contains("535 5.7.3") && cond.message.contains("Application SMTP.SendAsApp"), "{cond:?}");
    assert_eq!(status_of(&failed).attempts, Some(2), "one retry with a new token, then the denial is final");
    common::wait_for(&w.profiles(), "exo", WAIT, |p| {
        profile_condition(p, "PermissionsVerified").is_some_and(|c| c.reason == "SendDenied")
    })
    .await;
    assert_eq!(peer.messages().await.len(), 1, "nothing went out for the mailbox outside the scope");
}
