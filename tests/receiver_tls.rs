//! The notification receiver over HTTPS with the real API server and a real SMTP server:
//! Alertmanager's and Flux's notifications posted over TLS (a client trusting the receiver's CA)
//! become emails; a plain HTTP request to the port is refused and creates nothing; a client that
//! does not trust the CA never reaches it; and a replaced certificate Secret is presented to new
//! connections without restarting the operator, while an unusable one leaves the last in place;
//! before its Secret exists the receiver refuses connections, saying why, and serves once it does.

mod common;

use std::time::{Duration, Instant};

use common::receiver::{self, TLS_SECRET};
use common::smtp_peer::SmtpPeer;
use common::{create_yaml, phase};
use kube::Api;
use kube::api::ListParams;
use mailroom::alerts::auth::sign_hex;
use mailroom::api::{AlertRoute, EmailMessage, Phase, find_condition};

const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "tls-route-key-8c41d2e7";
const FIRING: &str = include_str!("fixtures/alertmanager-firing.json");
const FLUX: &str = include_str!("fixtures/flux-event-error.json");
const PUBLIC_URL: &str = "https://mailroom-alerts.mailroom-system.svc:8082";

/// The token Secret and a route `name` of `source` sending through the profile `relay`.
fn route_yaml(name: &str, source: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: {name}-key}}
stringData: {{token: "{TOKEN}"}}
---
apiVersion: mailroom.dev/v1alpha1
kind: AlertRoute
metadata: {{name: {name}}}
spec:
  source: {source}
  profileRef: {{name: relay}}
  to: ["Platform <platform@contoso.com>"]
  tokenSecretRef: {{name: {name}-key, key: token}}
"#
    )
}

/// Posts `body` with `headers` through `client`: the status and answer, or the error's chain.
async fn post(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, String)],
    body: &str,
) -> Result<(u16, String), String> {
    let mut req = client.post(url).header("content-type", "application/json").body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    match req.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            Ok((status, resp.text().await.unwrap_or_default()))
        }
        Err(e) => Err(error_chain(&e)),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn bearer() -> Vec<(&'static str, String)> {
    vec![("Authorization", format!("Bearer {TOKEN}"))]
}

/// The message name in a receiver's answer (`... EmailMessage ns/name`).
fn named(answer: &str, ns: &str) -> String {
    let prefix = format!("EmailMessage {ns}/");
    answer.split(&prefix).nth(1).map(|s| s.trim().to_string()).unwrap_or_else(|| panic!("no name in {answer:?}"))
}

async fn messages(client: &kube::Client, ns: &str) -> Vec<EmailMessage> {
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default()).await.expect("list").items
}

/// Waits until the route's status shows these counts (received, created, rejected) and Ready.
async fn wait_route_counts(client: &kube::Client, ns: &str, name: &str, counts: (i64, i64, i64)) -> AlertRoute {
    let api: Api<AlertRoute> = Api::namespaced(client.clone(), ns);
    common::wait_for(&api, name, WAIT, |r| {
        r.status.as_ref().is_some_and(|s| {
            (s.received, s.created, s.rejected) == counts
                && find_condition(&s.conditions, "Ready").is_some_and(|c| c.status == "True")
        })
    })
    .await
}

#[tokio::test]
async fn notifications_over_https_become_emails_and_plain_http_creates_nothing() {
    let client = common::client().await;
    let ns = common::namespace(&client, "rtls-https", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let (op, base) = receiver::start_operator(&client, "rtls-https", &ns, &["--alerts-url", PUBLIC_URL]).await;
    assert!(base.starts_with("https://127.0.0.1:"), "{base}");
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    create_yaml(&client, &ns, &route_yaml("platform", "alertmanager")).await;
    create_yaml(&client, &ns, &route_yaml("flux", "flux")).await;
    let https = receiver::https();
    let (am_url, flux_url) = (format!("{base}/alerts/{ns}/platform"), format!("{base}/alerts/{ns}/flux"));

    // Alertmanager's webhook with its bearer token, over TLS.
    let (status, answer) = post(&https, &am_url, &bearer(), FIRING).await.expect("an HTTPS answer");
    assert_eq!(status, 201, "{answer}");
    let am_message = named(&answer, &ns);
    // Flux's generic-hmac event, signed, over TLS.
    let flux_headers = vec![
        ("X-Signature", format!("sha256={}", sign_hex(TOKEN.as_bytes(), &[FLUX.as_bytes()]))),
        ("Gotk-Component", "kustomize-controller".to_string()),
    ];
    let (status, answer) = post(&https, &flux_url, &flux_headers, FLUX).await.expect("an HTTPS answer");
    assert_eq!(status, 201, "{answer}");
    let flux_message = named(&answer, &ns);
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    for name in [&am_message, &flux_message] {
        common::wait_for(&api, name, WAIT, |m| phase(m) == Some(Phase::Sent)).await;
    }
    assert_eq!(peer.wait_messages(2, WAIT).await.len(), 2);

    // The same request in plain HTTP on the HTTPS port: refused before any HTTP is read, so
    // nothing is created and the route counts nothing.
    let plain = base.replacen("https://", "http://", 1);
    let answer = post(&common::http(), &format!("{plain}/alerts/{ns}/platform"), &bearer(), FIRING).await;
    match &answer {
        Ok((status, body)) => {
            assert_eq!(*status, 400, "{body}");
            assert!(body.contains("HTTPS"), "the refusal says why: {body}");
        }
        Err(e) => panic!("a plain HTTP request should get the 400 that says to use HTTPS, got {e}"),
    }
    // A client that does not trust the receiver's CA fails its handshake, sending nothing.
    let untrusting = reqwest::Client::builder().build().expect("client");
    let refused = post(&untrusting, &am_url, &bearer(), FIRING).await;
    assert!(refused.is_err(), "a client without the CA was answered: {refused:?}");
    // A retry over HTTPS: the route then shows 2 received (the two HTTPS posts), nothing from the
    // plain request or the untrusting client.
    let (status, answer) = post(&https, &am_url, &bearer(), FIRING).await.expect("an HTTPS answer");
    assert_eq!((status, named(&answer, &ns)), (200, am_message.clone()), "{answer}");
    let route = wait_route_counts(&client, &ns, "platform", (2, 1, 0)).await;
    wait_route_counts(&client, &ns, "flux", (1, 1, 0)).await;
    let url = route.status.and_then(|s| s.url).expect("status.url");
    assert_eq!(url, format!("{PUBLIC_URL}/alerts/{ns}/platform"));
    let names: Vec<_> = messages(&client, &ns).await.into_iter().filter_map(|m| m.metadata.name).collect();
    assert_eq!(names.len(), 2, "one message per HTTPS notification: {names:?}");

    let log = op.log_text();
    assert!(log.contains("plain HTTP request on the HTTPS port was refused"), "{log}");
    for secret in [TOKEN, "BEGIN PRIVATE KEY", "BEGIN EC PRIVATE KEY"] {
        assert!(!log.contains(secret), "the log holds {secret:?}");
    }
}

#[tokio::test]
async fn a_replaced_certificate_is_presented_to_new_connections_without_a_restart() {
    let client = common::client().await;
    let ns = common::namespace(&client, "rtls-reload", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let (mut op, base) = receiver::start_operator(&client, "rtls-reload", &ns, &[]).await;
    let pid = op.pid();
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    create_yaml(&client, &ns, &route_yaml("platform", "alertmanager")).await;
    let url = format!("{base}/alerts/{ns}/platform");
    let dir = tempfile::tempdir().expect("tempdir");
    let (new_ca, new_cert, new_key) = receiver::issue_pair(dir.path(), "mailroom second test CA");
    let old_ca = receiver::test_ca();

    // Before: the committed pair is served; a client trusting only the new CA is refused.
    let (status, answer) =
        post(&receiver::client_trusting(&old_ca), &url, &bearer(), FIRING).await.expect("the old CA is trusted");
    assert_eq!(status, 201, "{answer}");
    let first = named(&answer, &ns);
    let refused = post(&receiver::client_trusting(&new_ca), &url, &bearer(), FIRING).await;
    let why = refused.expect_err("the new CA cannot be trusted yet");
    assert!(why.to_lowercase().contains("certificate"), "a certificate error: {why}");

    // The Secret gets the new pair (as cert-manager renews it): new connections present it.
    receiver::put_cert_secret(&client, &ns, TLS_SECRET, &new_cert, &new_key).await;
    let start = Instant::now();
    let answer = loop {
        match post(&receiver::client_trusting(&new_ca), &url, &bearer(), FIRING).await {
            Ok(answer) => break answer,
            Err(e) => assert!(start.elapsed() < WAIT, "the new certificate was never presented: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(answer.0, 200, "the same notification again: {}", answer.1);
    assert_eq!(named(&answer.1, &ns), first);
    let refused = post(&receiver::client_trusting(&old_ca), &url, &bearer(), FIRING).await;
    let why = refused.expect_err("the old CA no longer verifies the receiver");
    assert!(why.to_lowercase().contains("certificate"), "a certificate error: {why}");

    // A version of the Secret that cannot be served keeps the last certificate in place.
    receiver::put_cert_secret(&client, &ns, TLS_SECRET, b"not a certificate", &new_key).await;
    let start = Instant::now();
    while !op.log_text().contains("the certificate Secret cannot be served") {
        assert!(start.elapsed() < WAIT, "the unusable Secret was not noticed:\n{}", op.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, answer) =
        post(&receiver::client_trusting(&new_ca), &url, &bearer(), FIRING).await.expect("still the new certificate");
    assert_eq!(status, 200, "{answer}");

    // One process throughout, and one message.
    assert_eq!(op.pid(), pid);
    assert!(op.exit_status().is_none(), "the operator exited:\n{}", op.log_text());
    assert_eq!(op.log_text().matches("notification receiver: certificate loaded").count(), 2);
    assert_eq!(messages(&client, &ns).await.len(), 1);
}

#[tokio::test]
async fn until_its_secret_exists_the_receiver_refuses_connections_and_then_serves_it() {
    let client = common::client().await;
    let ns = common::namespace(&client, "rtls-late", &[]).await;
    let secret = format!("{ns}/{TLS_SECRET}");
    let op =
        common::Operator::start("rtls-late", &ns, &["--alerts-addr", "127.0.0.1:0", "--alerts-tls-secret", &secret]);
    let start = Instant::now();
    let base = loop {
        let log = op.log_text();
        if let Some(addr) = log.split("alerts_addr=").nth(1).and_then(|rest| rest.split_whitespace().next()) {
            break format!("https://{addr}");
        }
        assert!(start.elapsed() < WAIT, "the receiver did not start:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let url = format!("{base}/alerts/{ns}/none");
    // No certificate yet: the handshake fails, and the log says why.
    let refused = post(&receiver::https(), &url, &bearer(), FIRING).await;
    assert!(refused.is_err(), "answered without a certificate: {refused:?}");
    let start = Instant::now();
    while !op.log_text().contains("the certificate Secret has not been read yet") {
        assert!(start.elapsed() < WAIT, "the refusal was not logged:\n{}", op.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The Secret appears (cert-manager issued it): served from then on, no restart.
    let read = |f: &str| std::fs::read(receiver::testdata(f)).expect("the test pair");
    receiver::put_cert_secret(&client, &ns, TLS_SECRET, &read("localhost.crt"), &read("localhost.key")).await;
    receiver::wait_listening(&op, 1).await;
    let (status, answer) = post(&receiver::https(), &url, &bearer(), FIRING).await.expect("an HTTPS answer");
    assert_eq!(status, 404, "no such route, over HTTPS: {answer}");
}
