//! Secret hygiene: deliveries with known client secrets, a certificate's private key, a federated
//! token, an SMTP password and XOAUTH2, and the access tokens the emulator issued, with the
//! operator logging at debug level everywhere (kube and reqwest included). Then every form of
//! every secret is searched for in the operator's complete output, every mailroom resource and
//! every Event: none may appear. The search first proves it finds a planted value in each.

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use common::emulator::{Emulator, concat_pems, rsa_certificate};
use common::smtp_peer::SmtpPeer;
use common::{Operator, phase};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use mailroom::api::{ClusterMailProfile, EmailMessage, MailProfile, Phase, find_condition};
use serde_json::{Value, json};

const TENANT: &str = "7e3b1c2d-0000-4000-8000-0000000051e0";
const SECRET_CLIENT: &str = "51e00000-1111-4111-8111-0000000051e1";
const CERT_CLIENT: &str = "51e00000-2222-4222-8222-0000000051e2";
const WI_CLIENT: &str = "51e00000-3333-4333-8333-0000000051e3";
const SMTP_CLIENT: &str = "51e00000-4444-4444-8444-0000000051e4";
const ISSUER: &str = "https://oidc.mailroom.test/hygiene";
const SUBJECT: &str = "system:serviceaccount:mail-system:mailroom";
const SENDER: &str = "alerts@contoso.com";
const WAIT: Duration = Duration::from_secs(60);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// The forms in which a secret could leak: as is, base64 (standard and URL-safe), and distinctive
/// pieces of it (the middle of a long value, each line of a PEM body, a JWT's signature).
fn forms(secret: &str) -> Vec<String> {
    let mut out = vec![secret.to_string(), STANDARD.encode(secret), URL_SAFE_NO_PAD.encode(secret)];
    if secret.contains("-----BEGIN") {
        out.extend(
            secret.lines().filter(|l| !l.starts_with("-----") && l.len() >= 40).map(|l| l[8..l.len() - 8].to_string()),
        );
    } else if secret.len() >= 48 {
        let mid = secret.len() / 2;
        out.push(secret[mid - 12..mid + 12].to_string());
    }
    if secret.matches('.').count() == 2
        && let Some(signature) = secret.rsplit('.').next()
        && signature.len() >= 32
    {
        out.push(signature.to_string());
        out.push(signature[signature.len() / 2 - 12..signature.len() / 2 + 12].to_string());
    }
    out
}

/// Where each known form appears: (label, corpus) pairs that contain it.
fn find(corpora: &[(&str, &str)], secret: &str) -> Vec<String> {
    let mut hits = Vec::new();
    for form in forms(secret) {
        for (label, text) in corpora {
            if text.contains(&form) {
                hits.push(format!("{label} contains {:?}", &form[..form.len().min(16)]));
            }
        }
    }
    hits
}

async fn create<K>(api: &Api<K>, value: Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).expect("object");
    api.create(&PostParams::default(), &object).await.expect("create");
}

async fn message(client: &Client, ns: &str, name: &str, profile: &str) {
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), ns);
    create(
        &api,
        json!({"apiVersion": "mailroom.dev/v1alpha1", "kind": "EmailMessage", "metadata": {"name": name},
               "spec": {"profileRef": {"name": profile}, "to": ["ops@contoso.com"],
                        "subject": format!("hygiene {name}"), "body": {"text": "hello"}}}),
    )
    .await;
}

#[tokio::test]
async fn no_secret_or_token_appears_in_logs_status_or_events() {
    let client = common::client().await;
    let ns = common::namespace(&client, "hygiene", &[]).await;
    let emu = Emulator::start("hygiene").await;
    let dir = tempfile::tempdir().expect("temp dir");

    // The secrets.
    let client_secret = unique("client-secret");
    let wrong_secret = unique("wrong-client-secret");
    let smtp_client_secret = unique("xoauth2-client-secret");
    let smtp_user = "mailer";
    let smtp_password = unique("smtp-password");
    let (cert_pem, key_pem) = rsa_certificate(dir.path(), "hygiene-app");
    let (issuer_cert, issuer_key) = rsa_certificate(dir.path(), "hygiene-issuer");
    let now = Timestamp::now().as_second();
    let federated = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &json!({"iss": ISSUER, "sub": SUBJECT, "aud": ["api://AzureADTokenExchange"], "iat": now, "nbf": now, "exp": now + 3600}),
        &jsonwebtoken::EncodingKey::from_rsa_pem(issuer_key.as_bytes()).expect("issuer key"),
    )
    .expect("sign the federated token");
    let token_file = dir.path().join("azure-identity-token");
    std::fs::write(&token_file, &federated).expect("token file");

    // The peers.
    let app = |client_id: &str, extra: Value| {
        let mut app = json!({"tenantId": TENANT, "clientId": client_id, "roles": ["Mail.Send", "SMTP.SendAsApp"]});
        if let (Some(a), Value::Object(e)) = (app.as_object_mut(), extra) {
            a.extend(e);
        }
        app
    };
    emu.register_app(app(SECRET_CLIENT, json!({"secrets": [client_secret]}))).await;
    emu.register_app(app(CERT_CLIENT, json!({"certificates": [cert_pem]}))).await;
    emu.register_app(app(
        WI_CLIENT,
        json!({"federated": [{"issuer": ISSUER, "subject": SUBJECT, "audience": "api://AzureADTokenExchange", "jwksPem": issuer_cert}]}),
    ))
    .await;
    emu.register_app(app(SMTP_CLIENT, json!({"secrets": [smtp_client_secret]}))).await;
    let emu_ca = emu.ca_pem().display().to_string();
    let xoauth2_peer =
        SmtpPeer::start(&["--self-signed", "--xoauth2-introspect", &emu.introspect_url(), "--xoauth2-ca", &emu_ca]);
    let password_peer = SmtpPeer::start(&["--self-signed", "--auth-user", smtp_user, "--auth-pass", &smtp_password]);

    // The Secrets and profiles.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    for (name, type_, data) in [
        ("graph-secret", "Opaque", json!({"client-secret": client_secret})),
        ("graph-wrong", "Opaque", json!({"client-secret": wrong_secret})),
        ("graph-cert", "kubernetes.io/tls", json!({"tls.crt": cert_pem, "tls.key": key_pem})),
        ("smtp-oauth", "Opaque", json!({"client-secret": smtp_client_secret})),
        ("smtp-login", "Opaque", json!({"username": smtp_user, "password": smtp_password})),
    ] {
        create(&secrets, json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": type_, "stringData": data}))
            .await;
    }
    let profiles: Api<MailProfile> = Api::namespaced(client.clone(), &ns);
    let graph = |client_id: &str, credential: Value| {
        let mut g = json!({"tenantId": TENANT, "clientId": client_id, "authorityHost": emu.url, "endpoint": emu.url});
        if let (Some(g), Value::Object(c)) = (g.as_object_mut(), credential) {
            g.extend(c);
        }
        json!({"senders": {"default": SENDER}, "graph": g})
    };
    let specs = [
        (
            "by-secret",
            graph(SECRET_CLIENT, json!({"clientSecretRef": {"name": "graph-secret", "key": "client-secret"}})),
        ),
        (
            "by-wrong-secret",
            graph(SECRET_CLIENT, json!({"clientSecretRef": {"name": "graph-wrong", "key": "client-secret"}})),
        ),
        ("by-cert", graph(CERT_CLIENT, json!({"certificateRef": {"name": "graph-cert"}}))),
        ("by-wi", graph(WI_CLIENT, json!({"workloadIdentity": {"tokenFile": token_file.display().to_string()}}))),
        (
            "by-xoauth2",
            json!({"senders": {"default": SENDER}, "smtp": {"host": "127.0.0.1", "port": xoauth2_peer.smtp_port, "tls": "StartTLS",
                   "auth": {"oauth2": {"tenantId": TENANT, "clientId": SMTP_CLIENT, "authorityHost": emu.url,
                                       "clientSecretRef": {"name": "smtp-oauth", "key": "client-secret"}}}}}),
        ),
        (
            "by-password",
            json!({"senders": {"default": SENDER}, "smtp": {"host": "127.0.0.1", "port": password_peer.smtp_port, "tls": "StartTLS",
                   "auth": {"password": {"secretRef": {"name": "smtp-login"}}}}}),
        ),
    ];
    for (name, spec) in &specs {
        create(&profiles, json!({"apiVersion": "mailroom.dev/v1alpha1", "kind": "MailProfile", "metadata": {"name": name}, "spec": spec}))
            .await;
    }

    // The operator at debug level for every crate, trusting the peers' CAs.
    let bundle = dir.path().join("ca-bundle.pem");
    concat_pems(&bundle, &[emu.ca_pem(), xoauth2_peer.ca_pem(), password_peer.ca_pem()]);
    let bundle = bundle.display().to_string();
    let op = Operator::start_with_env(
        "hygiene",
        &ns,
        &["--ca-bundle", &bundle, "--allow-custom-endpoints"],
        &[("RUST_LOG", "debug")],
    );

    let planted = unique("planted");
    message(&client, &ns, &planted, "by-secret").await;
    for (name, _) in &specs {
        if *name != "by-wrong-secret" {
            message(&client, &ns, &format!("via-{name}"), name).await;
        }
    }
    message(&client, &ns, "via-by-wrong-secret", "by-wrong-secret").await;
    let messages: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    for (name, _) in &specs {
        if *name == "by-wrong-secret" {
            continue;
        }
        let m = common::wait_for(&messages, &format!("via-{name}"), WAIT, |m| phase(m).is_some_and(Phase::is_finished))
            .await;
        assert_eq!(phase(&m), Some(Phase::Sent), "via-{name}: {:?}", m.status);
    }
    common::wait_for(&messages, &planted, WAIT, |m| phase(m) == Some(Phase::Sent)).await;
    // The wrong secret: the profile says why, and its message waits.
    let wrong = common::wait_for(&profiles, "by-wrong-secret", WAIT, |p| {
        p.status.as_ref().and_then(|s| find_condition(&s.conditions, "Ready")).is_some_and(|c| c.status == "False")
    })
    .await;
    let ready = wrong.status.as_ref().and_then(|s| find_condition(&s.conditions, "Ready")).cloned().expect("Ready");
    assert!(ready.message.contains("AADSTS7000215"), "{ready:?}");
    common::wait_for(&messages, "via-by-wrong-secret", WAIT, |m| {
        m.status
            .as_ref()
            .and_then(|s| find_condition(&s.conditions, "Waiting"))
            .is_some_and(|c| c.reason == "ProfileNotReady")
    })
    .await;
    assert_eq!(xoauth2_peer.messages().await.len(), 1);
    assert_eq!(password_peer.messages().await.len(), 1);

    // The access tokens the emulator issued, and the SASL forms that carried them.
    let issued = emu.get_issued_tokens().await;
    let tokens: Vec<String> = issued.iter().filter_map(|t| t["accessToken"].as_str().map(str::to_string)).collect();
    assert!(tokens.len() >= 4, "tokens for secret, certificate, federated and XOAUTH2 profiles: {issued:#?}");
    let mut secrets_to_find: Vec<(String, String)> = vec![
        ("client secret".into(), client_secret.clone()),
        ("wrong client secret".into(), wrong_secret.clone()),
        ("XOAUTH2 client secret".into(), smtp_client_secret.clone()),
        ("SMTP password".into(), smtp_password.clone()),
        ("AUTH PLAIN".into(), format!("\0{smtp_user}\0{smtp_password}")),
        ("private key".into(), key_pem.clone()),
        ("federated token".into(), federated.clone()),
    ];
    for (i, token) in tokens.iter().enumerate() {
        secrets_to_find.push((format!("access token {i}"), token.clone()));
        secrets_to_find.push((format!("XOAUTH2 string {i}"), format!("user={SENDER}\x01auth=Bearer {token}\x01\x01")));
    }

    // Let the operator log a little more (token refresh schedules, watch events), then collect.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = op.log_text();
    let resources = {
        let mut all = Vec::new();
        all.push(
            serde_json::to_string(&messages.list(&Default::default()).await.expect("messages").items).expect("JSON"),
        );
        all.push(
            serde_json::to_string(&profiles.list(&Default::default()).await.expect("profiles").items).expect("JSON"),
        );
        let cluster: Api<ClusterMailProfile> = Api::all(client.clone());
        all.push(
            serde_json::to_string(&cluster.list(&Default::default()).await.expect("cluster profiles").items)
                .expect("JSON"),
        );
        all.join("\n")
    };
    let events = {
        let core: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), &ns);
        let v1: Api<Event> = Api::namespaced(client.clone(), &ns);
        let a = serde_json::to_string(&core.list(&Default::default()).await.expect("events").items).expect("JSON");
        let b = serde_json::to_string(&v1.list(&Default::default()).await.expect("events").items).expect("JSON");
        format!("{a}\n{b}")
    };
    let corpora = [("operator output", log.as_str()), ("resources", resources.as_str()), ("events", events.as_str())];

    // The search works: the planted message name is in each place, and debug logs are complete.
    for (label, text) in &corpora {
        assert!(!find(&[(label, text)], &planted).is_empty(), "the search cannot see {label}");
    }
    assert!(log.contains("DEBUG"), "the operator logged at debug level");
    for target in ["kube_runtime::", "reqwest::", "hyper_util::", "rustls::"] {
        // A line is `<time> DEBUG [<span>: ]<target>: ...`: inside a reconcile, the span comes first.
        let debug_of = |l: &&str| {
            l.contains(" DEBUG ") && (l.contains(&format!(" {target}")) || l.contains(&format!(": {target}")))
        };
        assert!(log.lines().any(|l| debug_of(&l)), "{target} debug logs are in the output");
    }
    // A planted secret in the same forms is found (base64 and middle pieces included).
    let probe = format!("{log}\n{}", STANDARD.encode(&key_pem));
    assert!(!find(&[("probe", probe.as_str())], &key_pem).is_empty(), "the search finds a base64-encoded key");

    let mut leaks = Vec::new();
    for (what, secret) in &secrets_to_find {
        for hit in find(&corpora, secret) {
            leaks.push(format!("{what}: {hit}"));
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    println!(
        "searched {} bytes of output, {} of resources, {} of events for {} secrets",
        log.len(),
        resources.len(),
        events.len(),
        secrets_to_find.len()
    );
}
