//! Shared test helpers: an in-process emulator, an HTTPS client trusting its CA, and app,
//! token and key fixtures.

use std::sync::{Arc, OnceLock};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use m365_emulator::{Config, RunningEmulator, TokenSigner};
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const TENANT: &str = "00000000-0000-0000-0000-0000000000aa";
pub const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";
pub const OUTLOOK_SCOPE: &str = "https://outlook.office365.com/.default";
pub const SENDER: &str = "alerts@contoso.com";

/// One signing key for every emulator of this test run: RSA generation is slow in debug.
pub fn shared_signer() -> Arc<TokenSigner> {
    static SIGNER: OnceLock<Arc<TokenSigner>> = OnceLock::new();
    SIGNER.get_or_init(|| Arc::new(TokenSigner::generate().expect("signing key"))).clone()
}

/// A client certificate and its RSA key, made once.
pub struct ClientCert {
    pub key_pem: String,
    pub cert_pem: String,
    pub thumbprint_s256: String,
}

pub fn client_cert() -> &'static ClientCert {
    static CERT: OnceLock<ClientCert> = OnceLock::new();
    CERT.get_or_init(|| {
        let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("rsa key");
        let key_pem = key.to_pkcs8_pem(LineEnding::LF).expect("pem").to_string();
        let pair = rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(&key_pem, &rcgen::PKCS_RSA_SHA256).expect("key pair");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, "mail sender app");
        let cert = params.self_signed(&pair).expect("certificate");
        ClientCert {
            key_pem,
            cert_pem: cert.pem(),
            thumbprint_s256: URL_SAFE_NO_PAD.encode(Sha256::digest(cert.der())),
        }
    })
}

/// A running emulator and a client that trusts it.
pub struct Emu {
    pub running: RunningEmulator,
    pub url: String,
    pub http: reqwest::Client,
}

pub async fn start() -> Emu {
    start_with(Config::default()).await
}

pub async fn start_with(mut config: Config) -> Emu {
    config.signer = Some(shared_signer());
    let running = m365_emulator::start(config).await.expect("emulator starts");
    let url = running.url().to_string();
    let http = client_trusting(running.ca_pem());
    Emu { running, url, http }
}

/// A reqwest client on rustls/ring that trusts `ca_pem`.
pub fn client_trusting(ca_pem: &str) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder().tls_backend_preconfigured(tls).build().expect("client")
}

impl Emu {
    pub fn token_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/token", self.url)
    }

    /// Registers an app; panics unless 201.
    pub async fn register(&self, app: Value) -> Value {
        let r = self.admin_post("apps", app).await;
        assert_eq!(r.status(), 201, "register app");
        r.json().await.expect("json")
    }

    /// Registers a secret-credential app with `roles` and returns its client id.
    pub async fn secret_app(&self, secret: &str, roles: &[&str]) -> String {
        self.secret_app_summary(secret, roles).await["clientId"].as_str().expect("clientId").to_string()
    }

    /// Registers a secret-credential app with `roles` and returns its summary (`clientId`,
    /// `objectId` of the service principal, `applicationObjectId` of the registration).
    pub async fn secret_app_summary(&self, secret: &str, roles: &[&str]) -> Value {
        let client = uuid::Uuid::new_v4().to_string();
        self.register(json!({
            "tenantId": TENANT, "clientId": client, "secrets": [secret], "roles": roles
        }))
        .await
    }

    /// `POST /_emulator/role-assignments` in TENANT: `mailboxes` None is organization-wide.
    pub async fn assign_role(&self, object_id: &str, role: &str, mailboxes: Option<&[&str]>) -> reqwest::Response {
        self.admin_post(
            "role-assignments",
            json!({
                "tenantId": TENANT, "servicePrincipalObjectId": object_id, "role": role, "mailboxes": mailboxes
            }),
        )
        .await
    }

    /// `POST /_emulator/introspect` with `body`.
    pub async fn introspect(&self, body: Value) -> Value {
        self.admin_post("introspect", body).await.json().await.expect("json")
    }

    pub async fn admin_post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http.post(format!("{}/_emulator/{path}", self.url)).json(&body).send().await.expect("admin request")
    }

    pub async fn admin_get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}/_emulator/{path}", self.url))
            .send()
            .await
            .expect("admin request")
            .json()
            .await
            .expect("json")
    }

    pub async fn token_request(&self, tenant: &str, form: &[(&str, &str)]) -> reqwest::Response {
        self.http.post(self.token_url(tenant)).form(form).send().await.expect("token request")
    }

    /// A Graph token for a secret app.
    pub async fn secret_token(&self, client: &str, secret: &str) -> String {
        self.scoped_token(client, secret, GRAPH_SCOPE).await
    }

    /// A token for `scope` for a secret app; panics unless 200.
    pub async fn scoped_token(&self, client: &str, secret: &str, scope: &str) -> String {
        let r = self
            .token_request(
                TENANT,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", client),
                    ("client_secret", secret),
                    ("scope", scope),
                ],
            )
            .await;
        assert_eq!(r.status(), 200, "token for {scope}");
        let body: Value = r.json().await.expect("json");
        body["access_token"].as_str().expect("token").to_string()
    }

    /// An app with Mail.Send and a token for it.
    pub async fn sender_token(&self) -> String {
        let client = self.secret_app("s", &["Mail.Send", "Mail.ReadWrite"]).await;
        self.secret_token(&client, "s").await
    }

    pub async fn send_mail(&self, token: &str, sender: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1.0/users/{sender}/sendMail", self.url))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("sendMail")
    }
}

/// A minimal valid sendMail body.
pub fn simple_mail(subject: &str) -> Value {
    json!({
        "message": {
            "subject": subject,
            "body": {"contentType": "Text", "content": "Version 1.4.2 is live."},
            "toRecipients": [{"emailAddress": {"address": "ops@contoso.com", "name": "Ops"}}]
        },
        "saveToSentItems": false
    })
}

/// Graph's error code from an error response.
pub async fn graph_code(r: reqwest::Response) -> String {
    let body: Value = r.json().await.expect("json error");
    body["error"]["code"].as_str().unwrap_or_default().to_string()
}

/// AADSTS code from a token error response.
pub async fn aad_code(r: reqwest::Response) -> (u16, String, u64) {
    let status = r.status().as_u16();
    let body: Value = r.json().await.expect("json error");
    (
        status,
        body["error"].as_str().unwrap_or_default().to_string(),
        body["error_codes"][0].as_u64().unwrap_or_default(),
    )
}

/// The `m365-emulator` binary, started with the shared signing key and `extra` arguments.
pub struct Binary {
    pub child: std::process::Child,
    pub dir: tempfile::TempDir,
    pub url: String,
    pub http: reqwest::Client,
}

impl Binary {
    /// Starts the binary and waits until it has written `url` (and so `ca.pem`).
    pub async fn spawn(extra: &[&str]) -> Binary {
        use std::process::{Command, Stdio};
        use std::time::{Duration, Instant};

        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("signing-key.pem");
        std::fs::write(&key, shared_signer().to_pkcs8_pem().expect("pem")).expect("key");
        let child = Command::new(env!("CARGO_BIN_EXE_m365-emulator"))
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir.path())
            .arg("--signing-key")
            .arg(&key)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn emulator");
        let url_file = dir.path().join("url");
        let started = Instant::now();
        while !url_file.exists() {
            assert!(started.elapsed() < Duration::from_secs(60), "no url file");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let url = std::fs::read_to_string(&url_file).expect("url");
        let ca = std::fs::read_to_string(dir.path().join("ca.pem")).expect("ca.pem");
        let http = client_trusting(&ca);
        Binary { child, dir, url, http }
    }

    /// Sends SIGTERM and waits (at most 20 s) for the exit status.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        use std::time::{Duration, Instant};

        let status =
            std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success());
        let started = Instant::now();
        loop {
            if let Some(exit) = self.child.try_wait().expect("wait") {
                return exit;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "emulator did not stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
