//! The token endpoint: secrets, certificate assertions, federated assertions, errors.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::common::{self, Emu, GRAPH_SCOPE, TENANT, aad_code};

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64
}

async fn assertion_request(emu: &Emu, client: &str, assertion: &str, scope: &str) -> reqwest::Response {
    emu.token_request(
        TENANT,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", client),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion),
            ("scope", scope),
        ],
    )
    .await
}

fn certificate_assertion(emu: &Emu, client: &str, thumbprint: &str) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.x5t_s256 = Some(thumbprint.to_string());
    let claims = json!({
        "aud": emu.token_url(TENANT), "iss": client, "sub": client,
        "jti": uuid::Uuid::new_v4().to_string(), "nbf": now(), "exp": now() + 600, "iat": now()
    });
    let key = EncodingKey::from_rsa_pem(common::client_cert().key_pem.as_bytes()).expect("key");
    jsonwebtoken::encode(&header, &claims, &key).expect("assertion")
}

#[tokio::test]
async fn client_secret_grants_a_graph_token() {
    let emu = common::start().await;
    let client = emu.secret_app("s3cret-value", &["Mail.Send"]).await;
    let r = emu
        .token_request(
            TENANT,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &client),
                ("client_secret", "s3cret-value"),
                ("scope", GRAPH_SCOPE),
            ],
        )
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["ext_expires_in"], 3600);
    let token = body["access_token"].as_str().expect("token");
    assert_eq!(token.split('.').count(), 3);

    let info: Value = emu.admin_post("introspect", json!({ "token": token })).await.json().await.expect("json");
    assert_eq!(info["active"], true);
    assert_eq!(info["clientId"], client.as_str());
    assert_eq!(info["tenantId"], TENANT);
    assert_eq!(info["roles"], json!(["Mail.Send"]));
    assert_eq!(info["aud"], "https://graph.microsoft.com");
}

#[tokio::test]
async fn a_wrong_secret_is_aadsts7000215_and_is_never_recorded() {
    let emu = common::start().await;
    let client = emu.secret_app("right-secret", &["Mail.Send"]).await;
    let r = emu
        .token_request(
            TENANT,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &client),
                ("client_secret", "wrong-secret-value"),
                ("scope", GRAPH_SCOPE),
            ],
        )
        .await;
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(body["error_codes"], json!([7000215]));
    let description = body["error_description"].as_str().unwrap_or_default();
    assert!(description.starts_with("AADSTS7000215: Invalid client secret provided."), "{description}");
    for field in ["timestamp", "trace_id", "correlation_id"] {
        assert!(body[field].is_string(), "{field}");
    }

    let records = emu.admin_get("token-requests").await;
    let text = records.to_string();
    assert!(!text.contains("wrong-secret-value") && !text.contains("right-secret"));
    assert_eq!(records[0]["outcome"], "AADSTS7000215");
    assert_eq!(records[0]["grant"], "secret");
    assert_eq!(records[0]["clientId"], client.as_str());
}

#[tokio::test]
async fn request_errors_carry_entra_codes() {
    let emu = common::start().await;
    let client = emu.secret_app("s", &[]).await;
    let emu = &emu;
    let form = |tenant: &'static str, client: String, scope: &'static str, secret: bool| async move {
        let mut fields =
            vec![("grant_type", "client_credentials".to_string()), ("client_id", client), ("scope", scope.to_string())];
        if secret {
            fields.push(("client_secret", "s".to_string()));
        }
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        aad_code(emu.token_request(tenant, &fields).await).await
    };
    assert_eq!(
        form("11111111-2222-3333-4444-555555555555", client.clone(), GRAPH_SCOPE, true).await,
        (400, "invalid_request".into(), 90002)
    );
    assert_eq!(
        form(TENANT, "not-registered".into(), GRAPH_SCOPE, true).await,
        (400, "unauthorized_client".into(), 700016)
    );
    assert_eq!(
        form(TENANT, client.clone(), "https://graph.microsoft.com/Mail.Send", true).await,
        (400, "invalid_scope".into(), 1002012)
    );
    assert_eq!(form(TENANT, client.clone(), GRAPH_SCOPE, false).await, (401, "invalid_client".into(), 7000216));
}

#[tokio::test]
async fn a_certificate_assertion_grants_a_token_once() {
    let emu = common::start().await;
    let client = uuid::Uuid::new_v4().to_string();
    let cert = common::client_cert();
    let summary = emu
        .register(json!({
            "tenantId": TENANT, "clientId": client, "certificates": [cert.cert_pem],
            "roles": ["Mail.Send"]
        }))
        .await;
    assert_eq!(summary["certificates"][0]["thumbprintS256"], cert.thumbprint_s256.as_str());

    let assertion = certificate_assertion(&emu, &client, &cert.thumbprint_s256);
    let r = assertion_request(&emu, &client, &assertion, "https://outlook.office365.com/.default").await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    let info: Value =
        emu.admin_post("introspect", json!({ "token": body["access_token"] })).await.json().await.expect("json");
    assert_eq!(info["aud"], "https://outlook.office365.com");
    assert_eq!(info["appidacr"], "2");

    // The same assertion (same jti) again.
    let replay = assertion_request(&emu, &client, &assertion, GRAPH_SCOPE).await;
    assert_eq!(aad_code(replay).await.0, 401);

    let records = emu.admin_get("token-requests").await;
    assert_eq!(records[0]["grant"], "certificate");
    assert!(!records.to_string().contains(&assertion));
}

#[tokio::test]
async fn an_unregistered_thumbprint_is_aadsts700027() {
    let emu = common::start().await;
    let client = uuid::Uuid::new_v4().to_string();
    emu.register(json!({
        "tenantId": TENANT, "clientId": client, "certificates": [common::client_cert().cert_pem]
    }))
    .await;
    let assertion = certificate_assertion(&emu, &client, "bm90LXRoZS1yZWdpc3RlcmVkLXRodW1icHJpbnQtMzI");
    let (status, error, code) = aad_code(assertion_request(&emu, &client, &assertion, GRAPH_SCOPE).await).await;
    assert_eq!((status, error.as_str(), code), (401, "invalid_client", 700027));
}

#[tokio::test]
async fn federated_tokens_match_issuer_subject_and_audience() {
    let emu = common::start().await;
    let client = uuid::Uuid::new_v4().to_string();
    emu.register(json!({
        "tenantId": TENANT, "clientId": client, "roles": ["Mail.Send"],
        "federated": [{
            "issuer": "https://oidc.cluster.test", "subject": "system:serviceaccount:mail:mailroom",
            "audience": "api://AzureADTokenExchange"
        }]
    }))
    .await;
    let federated = |sub: &str| {
        let claims = json!({
            "iss": "https://oidc.cluster.test", "sub": sub, "aud": ["api://AzureADTokenExchange"],
            "iat": now(), "exp": now() + 3600
        });
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"cluster signing key stand-in"),
        )
        .expect("jwt")
    };
    let ok = assertion_request(&emu, &client, &federated("system:serviceaccount:mail:mailroom"), GRAPH_SCOPE).await;
    assert_eq!(ok.status(), 200);
    // A projected token is reused until kubelet rotates it: no replay check applies.
    let again = assertion_request(&emu, &client, &federated("system:serviceaccount:mail:mailroom"), GRAPH_SCOPE).await;
    assert_eq!(again.status(), 200);

    let wrong = assertion_request(&emu, &client, &federated("system:serviceaccount:mail:other"), GRAPH_SCOPE).await;
    let (status, error, code) = aad_code(wrong).await;
    assert_eq!((status, error.as_str(), code), (400, "invalid_request", 70021));
    let records = emu.admin_get("token-requests").await;
    assert_eq!(records[2]["grant"], "federated");
    assert_eq!(records[2]["outcome"], "AADSTS70021");
}

#[tokio::test]
async fn an_injected_token_fault_answers_then_clears() {
    let emu = common::start().await;
    let client = emu.secret_app("s", &["Mail.Send"]).await;
    let r =
        emu.admin_post("faults", json!({"target": "token", "status": 503, "count": 1, "retryAfterSeconds": 2})).await;
    assert_eq!(r.status(), 201);
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", client.as_str()),
        ("client_secret", "s"),
        ("scope", GRAPH_SCOPE),
    ];
    let faulted = emu.token_request(TENANT, &form).await;
    assert_eq!(faulted.status(), 503);
    assert_eq!(faulted.headers()["retry-after"], "2");
    assert_eq!(aad_code(faulted).await.1, "temporarily_unavailable");
    assert_eq!(emu.token_request(TENANT, &form).await.status(), 200);
}

#[tokio::test]
async fn a_dropped_connection_fault_gives_no_answer_then_clears() {
    let emu = common::start().await;
    let client = emu.secret_app("s", &["Mail.Send"]).await;
    let r = emu.admin_post("faults", json!({"target": "token", "dropConnection": true, "count": 1})).await;
    assert_eq!(r.status(), 201);
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", client.as_str()),
        ("client_secret", "s"),
        ("scope", GRAPH_SCOPE),
    ];
    // The connection ends without a complete answer: an error at the head or at the body.
    let dropped = match emu.http.post(emu.token_url(TENANT)).form(&form).send().await {
        Ok(r) => r.bytes().await.err().map(|e| e.to_string()),
        Err(e) => Some(e.to_string()),
    };
    assert!(dropped.is_some(), "a dropped connection gave a complete answer");
    assert_eq!(emu.token_request(TENANT, &form).await.status(), 200);
    let records = emu.admin_get("token-requests").await;
    assert_eq!(records[0]["outcome"], "fault:dropped");
    assert_eq!(records[1]["outcome"], "success");
}
