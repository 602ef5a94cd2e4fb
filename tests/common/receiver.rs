//! The notification receiver as senders reach it: over HTTPS, with its certificate in a
//! `kubernetes.io/tls` Secret of the test's namespace (the test pair in src/submission/testdata,
//! or one made with openssl), and clients that trust only the CA they are given.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use super::Operator;

/// The receiver's certificate Secret in each test's namespace.
pub const TLS_SECRET: &str = "alerts-tls";

/// A file of the committed test pair (localhost.crt, localhost.key, ca.crt).
pub fn testdata(file: &str) -> PathBuf {
    super::repo_root().join("src/submission/testdata").join(file)
}

/// The committed test CA.
pub fn test_ca() -> Vec<u8> {
    std::fs::read(testdata("ca.crt")).expect("the test CA")
}

/// Writes the Secret `name` (type kubernetes.io/tls) with this certificate chain and key,
/// creating or replacing it.
pub async fn put_cert_secret(client: &Client, ns: &str, name: &str, cert_pem: &[u8], key_pem: &[u8]) {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let data = [("tls.crt", cert_pem), ("tls.key", key_pem)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
        .collect();
    let mut secret = Secret {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    };
    match api.get_opt(name).await.expect("read the certificate Secret") {
        Some(existing) => {
            secret.metadata.resource_version = existing.metadata.resource_version;
            api.replace(name, &PostParams::default(), &secret).await.expect("replace the certificate Secret");
        }
        None => {
            api.create(&PostParams::default(), &secret).await.expect("create the certificate Secret");
        }
    }
}

/// A new client (so a new connection) that trusts only `ca_pem`.
pub fn client_trusting(ca_pem: &[u8]) -> reqwest::Client {
    mailroom::tls::install_crypto_provider();
    let ca = reqwest::Certificate::from_pem(ca_pem).expect("a PEM CA");
    reqwest::Client::builder().tls_certs_only([ca]).pool_max_idle_per_host(0).build().expect("an HTTPS client")
}

/// A client for the receiver started by [`start_operator`]: it trusts only the test CA.
pub fn https() -> reqwest::Client {
    client_trusting(&test_ca())
}

/// Starts the operator watching `ns` with the receiver on a free loopback port over HTTPS (the
/// test pair, in the Secret [`TLS_SECRET`] of `ns`, created here), and waits until the
/// certificate is loaded. Returns the operator and the receiver's base URL (`https://127.0.0.1:PORT`;
/// the test certificate names 127.0.0.1).
pub async fn start_operator(client: &Client, test: &str, ns: &str, extra: &[&str]) -> (Operator, String) {
    let cert = std::fs::read(testdata("localhost.crt")).expect("the test certificate");
    let key = std::fs::read(testdata("localhost.key")).expect("the test key");
    put_cert_secret(client, ns, TLS_SECRET, &cert, &key).await;
    let secret = format!("{ns}/{TLS_SECRET}");
    let mut args = vec!["--alerts-addr", "127.0.0.1:0", "--alerts-tls-secret", &secret];
    args.extend_from_slice(extra);
    let op = Operator::start(test, ns, &args);
    let base = wait_listening(&op, 1).await;
    (op, base)
}

/// Waits until the operator's receiver listens and has loaded its certificate `loads` times;
/// returns its base URL.
pub async fn wait_listening(op: &Operator, loads: usize) -> String {
    let start = Instant::now();
    loop {
        let log = op.log_text();
        let addr = log.split("alerts_addr=").nth(1).and_then(|rest| rest.split_whitespace().next());
        if let Some(addr) = addr
            && log.matches("notification receiver: certificate loaded").count() >= loads
        {
            return format!("https://{addr}");
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the receiver did not start serving HTTPS:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A CA and a certificate it signed for localhost and 127.0.0.1, made with openssl in `dir`:
/// (CA, certificate, key), PEM.
pub fn issue_pair(dir: &Path, ca_name: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let openssl = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl on PATH");
        assert!(status.success(), "openssl {args:?} failed");
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let subject = format!("/CN={ca_name}");
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", &subject, "-keyout", "ca.key", "-out", "ca.crt"];
    ca.extend_from_slice(&ec);
    ca.extend_from_slice(&["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"]);
    openssl(&ca);
    let mut csr = vec!["req", "-subj", "/CN=localhost", "-keyout", "tls.key", "-out", "tls.csr"];
    csr.extend_from_slice(&ec);
    openssl(&csr);
    std::fs::write(
        dir.join("leaf.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("write the extensions");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "tls.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
        "-out",
        "tls.crt",
    ]);
    let read = |f: &str| std::fs::read(dir.join(f)).expect("openssl output");
    (read("ca.crt"), read("tls.crt"), read("tls.key"))
}
