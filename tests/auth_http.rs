//! The token provider and cache against a loopback mock of the Entra ID token endpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use mailroom::auth::{
    AssertionClaims, AuthError, Credential, EntraApp, EntraTokenProvider, GRAPH_SCOPE, TOKEN_ANSWER_LIMIT, TokenCache,
    TokenCacheConfig, TokenIssuer, TokenSource, token_url,
};
use mailroom::tls::TrustRoots;
use serde_json::json;
use sha2::{Digest, Sha256};
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

#[path = "common/streamed_body.rs"]
mod streamed_body;

const TENANT: &str = "00000000-0000-0000-0000-000000000000";
const CLIENT: &str = "11111111-1111-1111-1111-111111111111";
const TOKEN_PATH: &str = "/00000000-0000-0000-0000-000000000000/oauth2/v2.0/token";
const CERT: &str = include_str!("../src/auth/testdata/cert.pem");
const KEY: &str = include_str!("../src/auth/testdata/key-pkcs8.pem");
const PUBLIC: &str = include_str!("../src/auth/testdata/public.pem");

fn app(server: &MockServer, credential: Credential) -> EntraApp {
    EntraApp {
        authority_host: format!("{}/", server.uri()),
        tenant_id: TENANT.into(),
        client_id: CLIENT.into(),
        credential,
    }
}

fn secret(value: &str) -> Credential {
    Credential::ClientSecret(value.into())
}

fn provider() -> Arc<EntraTokenProvider> {
    Arc::new(EntraTokenProvider::from_trust_roots(&TrustRoots::default(), true).expect("client"))
}

/// A JWT-shaped token named `name`, carrying the Mail.Send role.
fn access_token(name: &str) -> String {
    let payload = URL_SAFE_NO_PAD.encode(json!({"roles": ["Mail.Send"], "name": name}).to_string());
    format!("eyJhbGciOiJSUzI1NiJ9.{payload}.{name}")
}

fn token_body(name: &str, expires_in: u64) -> serde_json::Value {
    json!({
        "token_type": "Bearer",
        "expires_in": expires_in,
        "ext_expires_in": expires_in,
        "access_token": access_token(name),
    })
}

/// Answers each request with a new token (`token-1`, `token-2`, ...).
fn numbered_tokens(expires_in: u64, delay: Duration) -> impl Fn(&Request) -> ResponseTemplate {
    let count = AtomicUsize::new(0);
    move |_: &Request| {
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        ResponseTemplate::new(200).set_body_json(token_body(&format!("token-{n}"), expires_in)).set_delay(delay)
    }
}

fn entra_error(status: u16, error: &str, code: u64, description: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(json!({
        "error": error,
        "error_description": format!(
            "AADSTS{code}: {description}\r\nTrace ID: 5c1b0000-0000-4000-8000-000000000000\r\n\
             Correlation ID: 9a0e0000-0000-4000-8000-000000000000\r\nTimestamp: 2025-10-01 10:00:00Z"
        ),
        "error_codes": [code],
        "timestamp": "2025-10-01 10:00:00Z",
        "trace_id": "5c1b0000-0000-4000-8000-000000000000",
        "correlation_id": "9a0e0000-0000-4000-8000-000000000000",
    }))
}

fn form(request: &Request) -> Vec<(String, String)> {
    let body = String::from_utf8_lossy(&request.body);
    reqwest::Url::parse(&format!("http://form/?{body}"))
        .expect("form")
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn field(request: &Request, name: &str) -> Option<String> {
    form(request).into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

fn quick_config() -> TokenCacheConfig {
    TokenCacheConfig {
        refresh_before: Duration::from_secs(1),
        expiry_margin: Duration::ZERO,
        retry_min: Duration::from_millis(100),
        retry_max: Duration::from_millis(200),
        ..TokenCacheConfig::default()
    }
}

fn name_of(token: &mailroom::auth::AccessToken) -> &str {
    token.secret.rsplit('.').next().unwrap_or_default()
}

#[tokio::test]
async fn secret_request_sends_the_client_credentials_form() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body("t", 3599)))
        .expect(1)
        .mount(&server)
        .await;
    let issued = provider().request_token(&app(&server, secret("s3cret")), GRAPH_SCOPE).await.expect("token");
    assert_eq!(issued.lifetime, Duration::from_secs(3599));
    let requests = server.received_requests().await.expect("recorded");
    let request = &requests[0];
    assert_eq!(
        request.headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/x-www-form-urlencoded"[..])
    );
    let mut fields = form(request);
    fields.sort();
    assert_eq!(
        fields,
        [
            ("client_id".to_owned(), CLIENT.to_owned()),
            ("client_secret".to_owned(), "s3cret".to_owned()),
            ("grant_type".to_owned(), "client_credentials".to_owned()),
            ("scope".to_owned(), GRAPH_SCOPE.to_owned()),
        ]
    );
}

#[tokio::test]
async fn fifty_concurrent_callers_cause_one_request() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(numbered_tokens(3600, Duration::from_millis(300)))
        .expect(1)
        .mount(&server)
        .await;
    let config = TokenCacheConfig { prefetch: false, ..TokenCacheConfig::default() };
    let cache = Arc::new(TokenCache::new(app(&server, secret("s")), GRAPH_SCOPE, provider(), config));
    let calls = (0..50).map(|_| {
        let cache = cache.clone();
        tokio::spawn(async move { cache.token().await })
    });
    for call in futures::future::join_all(calls).await {
        let token = call.expect("task").expect("token");
        assert_eq!(name_of(&token), "token-1");
    }
    let state = cache.snapshot();
    assert_eq!(state.refreshes, 1);
    assert_eq!(state.roles, ["Mail.Send"]);
    server.verify().await;
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_in_the_background_before_expiry() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(numbered_tokens(3, Duration::from_millis(300)))
        .mount(&server)
        .await;
    let cache = TokenCache::new(app(&server, secret("s")), GRAPH_SCOPE, provider(), quick_config());
    let first = cache.token().await.expect("first");
    assert_eq!(name_of(&first), "token-1");
    // Callers keep getting a token at once while the refresh happens behind them.
    let mut slowest = Duration::ZERO;
    let deadline = Instant::now() + Duration::from_secs(6);
    while cache.snapshot().refreshes < 2 {
        assert!(Instant::now() < deadline, "no background refresh");
        let asked = Instant::now();
        let token = cache.token().await.expect("token");
        slowest = slowest.max(asked.elapsed());
        assert!(name_of(&token) == "token-1" || name_of(&token) == "token-2", "{}", name_of(&token));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A caller that waited for the refresh would have taken the endpoint's 300 ms.
    assert!(slowest < Duration::from_millis(100), "a caller waited {slowest:?}");
    let state = cache.snapshot();
    let refreshed = state.last_refresh_time.expect("refreshed");
    assert!(refreshed < first.expires_at, "refreshed after expiry");
    assert_eq!(name_of(&cache.token().await.expect("new")), "token-2");
}

#[tokio::test]
async fn failed_refresh_keeps_the_old_token_and_retries() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body("token-1", 3)))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).set_body_string("busy"))
        .up_to_n_times(2)
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body("token-2", 3600)))
        .with_priority(3)
        .mount(&server)
        .await;
    let cache = TokenCache::new(app(&server, secret("s")), GRAPH_SCOPE, provider(), quick_config());
    assert_eq!(name_of(&cache.token().await.expect("first")), "token-1");
    let mut status = cache.subscribe();
    let failed = status.wait_for(|s| s.failures >= 1).await.expect("failure").clone();
    assert!(matches!(&failed.last_error, Some(AuthError::Unavailable(m)) if m.contains("503")), "{failed:?}");
    assert_eq!(name_of(&cache.token().await.expect("old")), "token-1");
    tokio::time::timeout(Duration::from_secs(5), status.wait_for(|s| s.refreshes == 2))
        .await
        .expect("retried in time")
        .expect("recovered");
    let state = cache.snapshot();
    assert_eq!((state.failures, state.last_error), (2, None));
    assert_eq!(name_of(&cache.token().await.expect("new")), "token-2");
    assert_eq!(server.received_requests().await.expect("recorded").len(), 4);
}

#[tokio::test]
async fn replace_credential_requests_with_the_new_secret() {
    let server = MockServer::start().await;
    Mock::given(body_string_contains("client_secret=old-secret"))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body("old", 3600)))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(body_string_contains("client_secret=new-secret"))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body("new", 3600)))
        .expect(1)
        .mount(&server)
        .await;
    let cache =
        TokenCache::new(app(&server, secret("old-secret")), GRAPH_SCOPE, provider(), TokenCacheConfig::default());
    assert_eq!(name_of(&cache.token().await.expect("old")), "old");
    cache.replace_credential(app(&server, secret("new-secret")));
    assert_eq!(name_of(&cache.token().await.expect("new")), "new");
    assert_eq!(name_of(&cache.token().await.expect("cached")), "new");
    server.verify().await;
}

#[tokio::test]
async fn invalid_client_secret_is_rejected_with_the_aadsts_code() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(entra_error(
            401,
            "invalid_client",
            7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request is the \
             client secret value, not the client secret ID, for a secret added to app \
             '11111111-1111-1111-1111-111111111111'.",
        ))
        .mount(&server)
        .await;
    let error =
        provider().request_token(&app(&server, secret("wrong-value")), GRAPH_SCOPE).await.expect_err("rejected");
    let AuthError::Rejected(message) = &error else {
        panic!("expected Rejected, got {error:?}");
    };
    assert!(message.starts_with("AADSTS7000215: invalid client secret"), "{message}");
    assert!(!message.contains("wrong-value") && !message.contains("Trace ID"));

    // Through a cache: the failure is in the status, the token request is not repeated per call.
    let cache =
        TokenCache::new(app(&server, secret("wrong-value")), GRAPH_SCOPE, provider(), TokenCacheConfig::default());
    assert_eq!(cache.token().await, Err(error.clone()));
    assert_eq!(cache.token().await, Err(error.clone()));
    assert_eq!(cache.snapshot().last_error, Some(error));
    assert_eq!(server.received_requests().await.expect("recorded").len(), 2);
}

#[tokio::test]
async fn service_unavailable_is_retryable() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).set_body_string("<html>unavailable</html>"))
        .mount(&server)
        .await;
    let error = provider().request_token(&app(&server, secret("s")), GRAPH_SCOPE).await.expect_err("unavailable");
    assert!(matches!(&error, AuthError::Unavailable(m) if m.contains("503") && !m.contains("html")), "{error:?}");
}

#[tokio::test]
async fn a_token_answer_over_the_cap_is_refused_unread() {
    // 50 MiB streamed without Content-Length: the provider must stop at the cap, not buffer it.
    let (endpoint, server) = streamed_body::serve("200 OK", streamed_body::FIFTY_MIB).await;
    let app = EntraApp {
        authority_host: format!("{endpoint}/"),
        tenant_id: TENANT.into(),
        client_id: CLIENT.into(),
        credential: secret("never-shown"),
    };

    let error = provider().request_token(&app, GRAPH_SCOPE).await.expect_err("no token in 50 MiB");

    let cap = format!("over {TOKEN_ANSWER_LIMIT} bytes and was not read");
    assert!(
        matches!(&error, AuthError::Unavailable(m) if m.contains(&cap) && m.contains("no token response")),
        "{error:?}"
    );
    let written = tokio::time::timeout(Duration::from_secs(60), server).await.expect("hung up").expect("server");
    assert!(written < streamed_body::FIFTY_MIB, "{written}");
}

#[tokio::test]
async fn an_error_answer_over_the_cap_is_judged_by_its_status() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).set_body_bytes(vec![b'x'; 2 * TOKEN_ANSWER_LIMIT]))
        .mount(&server)
        .await;
    let error = provider().request_token(&app(&server, secret("s")), GRAPH_SCOPE).await.expect_err("unavailable");
    assert!(matches!(&error, AuthError::Unavailable(m) if m.contains("503") && m.contains("not read")), "{error:?}");
}

#[tokio::test]
async fn unreachable_endpoint_is_retryable() {
    // Bind and drop a listener so the port is (almost certainly) closed.
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|listener| listener.local_addr()).expect("port").port();
    let app = EntraApp {
        authority_host: format!("http://127.0.0.1:{port}"),
        tenant_id: TENANT.into(),
        client_id: CLIENT.into(),
        credential: secret("never-shown"),
    };
    let error = provider().request_token(&app, GRAPH_SCOPE).await.expect_err("unreachable");
    assert!(
        matches!(&error, AuthError::Unavailable(m) if m.contains("unreachable") && !m.contains("never-shown")),
        "{error:?}"
    );
}

#[tokio::test]
async fn plain_http_is_refused_unless_allowed() {
    let server = MockServer::start().await;
    let strict = EntraTokenProvider::from_trust_roots(&TrustRoots::default(), false).expect("client");
    let error = strict.request_token(&app(&server, secret("s")), GRAPH_SCOPE).await.expect_err("refused");
    assert!(matches!(&error, AuthError::Credential(m) if m.contains("--allow-insecure-endpoints")), "{error:?}");
    assert!(server.received_requests().await.expect("recorded").is_empty());
}

#[tokio::test]
async fn federated_token_file_is_read_for_every_request() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(numbered_tokens(3600, Duration::ZERO)).mount(&server).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("azure-identity-token");
    std::fs::write(&file, "eyJ.first-projected-token.sig\n").expect("write");
    let provider = provider();
    let app = app(&server, Credential::FederatedTokenFile(file.clone()));
    provider.issue(&app, GRAPH_SCOPE).await.expect("first token");
    // The kubelet rotates the file.
    std::fs::write(&file, "eyJ.second-projected-token.sig").expect("rewrite");
    provider.issue(&app, GRAPH_SCOPE).await.expect("second token");
    let requests = server.received_requests().await.expect("recorded");
    let assertions: Vec<_> = requests
        .iter()
        .map(|r| {
            (field(r, "client_assertion_type").unwrap_or_default(), field(r, "client_assertion").unwrap_or_default())
        })
        .collect();
    let jwt_bearer = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_owned();
    assert_eq!(
        assertions,
        [
            (jwt_bearer.clone(), "eyJ.first-projected-token.sig".to_owned()),
            (jwt_bearer, "eyJ.second-projected-token.sig".to_owned()),
        ]
    );

    std::fs::remove_file(&file).expect("remove");
    let error = provider.issue(&app, GRAPH_SCOPE).await.expect_err("missing file");
    assert!(matches!(&error, AuthError::Credential(m) if m.contains("federated token file")), "{error:?}");
}

/// Verifies a certificate assertion as Entra ID does: signature with the registered
/// certificate's key, `x5t#S256` naming that certificate, audience, issuer and subject.
fn verify_assertion(expected_aud: String) -> impl Fn(&Request) -> ResponseTemplate {
    let cert_der = rustls_pemfile::certs(&mut CERT.as_bytes()).next().expect("cert").expect("pem");
    let thumbprint = URL_SAFE_NO_PAD.encode(Sha256::digest(cert_der.as_ref()));
    let key = DecodingKey::from_rsa_pem(PUBLIC.as_bytes()).expect("public key");
    move |request: &Request| {
        let refuse = |why: &str| entra_error(401, "invalid_client", 700027, why);
        if field(request, "client_assertion_type").as_deref()
            != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        {
            return refuse("Client assertion type missing.");
        }
        let Some(assertion) = field(request, "client_assertion") else {
            return refuse("Client assertion missing.");
        };
        let Ok(header) = jsonwebtoken::decode_header(&assertion) else {
            return refuse("Client assertion is not a JWT.");
        };
        if header.x5t_s256.as_deref() != Some(thumbprint.as_str()) {
            return refuse("Client assertion names an unknown certificate.");
        }
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[expected_aud.as_str()]);
        validation.set_issuer(&[CLIENT]);
        validation.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub", "jti"]);
        match jsonwebtoken::decode::<AssertionClaims>(&assertion, &key, &validation) {
            Ok(data) if data.claims.sub == CLIENT && data.claims.exp - data.claims.nbf <= 600 => {
                ResponseTemplate::new(200).set_body_json(token_body("cert-token", 3600))
            }
            Ok(_) => refuse("Client assertion claims are wrong."),
            Err(_) => refuse("Client assertion failed signature validation."),
        }
    }
}

#[tokio::test]
async fn certificate_assertion_is_accepted_by_a_verifying_endpoint() {
    let server = MockServer::start().await;
    let expected_aud = token_url(&server.uri(), TENANT);
    Mock::given(method("POST")).and(path(TOKEN_PATH)).respond_with(verify_assertion(expected_aud)).mount(&server).await;
    let certificate = Credential::Certificate { cert_pem: CERT.as_bytes().to_vec(), key_pem: KEY.as_bytes().to_vec() };
    let cache = TokenCache::new(app(&server, certificate), GRAPH_SCOPE, provider(), TokenCacheConfig::default());
    let token = cache.token().await.expect("accepted");
    assert_eq!(name_of(&token), "cert-token");

    // The same endpoint refuses a forged assertion with Microsoft's code.
    let forged = TrustRoots::default()
        .http_client()
        .expect("client")
        .post(format!("{}{TOKEN_PATH}", server.uri()))
        .form(&[
            ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
            ("client_assertion", "eyJhbGciOiJSUzI1NiJ9.e30.AAAA"),
        ])
        .send()
        .await
        .expect("answer");
    assert_eq!(forged.status(), 401);
}
