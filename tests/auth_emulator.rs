//! Tokens from the Microsoft 365 emulator over HTTPS: a client secret and a certificate.
//! `make test` builds the emulator and sets `MAILROOM_EMULATOR_BIN`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailroom::auth::{
    AuthError, Credential, EntraApp, EntraTokenProvider, GRAPH_SCOPE, TokenCache, TokenCacheConfig, TokenSource,
};
use mailroom::tls::TrustRoots;
use serde_json::{Value, json};

const TENANT: &str = "6f1c0d4e-0000-4000-8000-00000000aaaa";
const CLIENT: &str = "0b9e0000-0000-4000-8000-00000000bbbb";
const SECRET: &str = "emulator-test-secret";
const CERT: &str = include_str!("../src/auth/testdata/cert.pem");
const KEY: &str = include_str!("../src/auth/testdata/key-pkcs1.pem");

/// A running emulator, stopped on drop.
struct Emulator {
    child: Child,
    url: String,
    roots: TrustRoots,
    _state: tempfile::TempDir,
}

impl Emulator {
    fn start() -> Emulator {
        let bin = std::env::var("MAILROOM_EMULATOR_BIN")
            .unwrap_or_else(|_| panic!("MAILROOM_EMULATOR_BIN is not set: integration tests run through `make test`"));
        let state = tempfile::tempdir().expect("state dir");
        let child = Command::new(&bin)
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let url = wait_for_file(&state.path().join("url"), Duration::from_secs(30));
        let ca = std::fs::read(state.path().join("ca.pem")).expect("ca.pem");
        Emulator {
            child,
            url: url.trim().to_owned(),
            roots: TrustRoots::from_pem(&ca).expect("emulator CA"),
            _state: state,
        }
    }

    async fn admin(&self, path: &str, body: Value) -> Value {
        let response = self
            .roots
            .http_client()
            .expect("client")
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .expect("admin API");
        assert!(response.status().is_success(), "{path}: {}", response.status());
        response.json().await.unwrap_or(Value::Null)
    }

    fn app(&self, credential: Credential) -> EntraApp {
        EntraApp { authority_host: self.url.clone(), tenant_id: TENANT.into(), client_id: CLIENT.into(), credential }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_file(path: &Path, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && !text.trim().is_empty()
        {
            return text;
        }
        assert!(Instant::now() < deadline, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn tokens_for_a_secret_and_a_certificate() {
    let emulator = Emulator::start();
    emulator
        .admin(
            "/_emulator/apps",
            json!({
                "tenantId": TENANT,
                "clientId": CLIENT,
                "secrets": [SECRET],
                "certificates": [CERT],
                "roles": ["Mail.Send"],
                "tokenLifetimeSeconds": 3600,
            }),
        )
        .await;
    // HTTPS with the emulator's CA; plain http stays refused.
    let provider = Arc::new(EntraTokenProvider::from_trust_roots(&emulator.roots, false).expect("provider"));

    let certificate = Credential::Certificate { cert_pem: CERT.as_bytes().to_vec(), key_pem: KEY.as_bytes().to_vec() };
    for credential in [Credential::ClientSecret(SECRET.into()), certificate] {
        let kind = credential.kind();
        let cache =
            TokenCache::new(emulator.app(credential), GRAPH_SCOPE, provider.clone(), TokenCacheConfig::default());
        let token = cache.token().await.unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(cache.snapshot().roles, ["Mail.Send"], "{kind}");
        let seconds_left = token.expires_at.as_second() - k8s_openapi::jiff::Timestamp::now().as_second();
        assert!((3000..=3600).contains(&seconds_left), "{kind}: {seconds_left}");
        let introspected = emulator.admin("/_emulator/introspect", json!({"token": token.secret})).await;
        assert_eq!(introspected["active"], true, "{kind}");
        assert_eq!(introspected["clientId"], CLIENT, "{kind}");
        assert_eq!(introspected["tenantId"], TENANT, "{kind}");
    }

    let wrong = provider
        .request_token(&emulator.app(Credential::ClientSecret("not-the-secret".into())), GRAPH_SCOPE)
        .await
        .expect_err("wrong secret");
    assert!(
        matches!(&wrong, AuthError::Rejected(m) if m.starts_with("AADSTS7000215: invalid client secret")),
        "{wrong:?}"
    );
}
