//! The admin API and the command line.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{self, GRAPH_SCOPE, TENANT, aad_code};

#[tokio::test]
async fn introspection_tells_active_from_forged() {
    let emu = common::start().await;
    let token = emu.sender_token().await;
    let info: Value = emu.admin_post("introspect", json!({"token": token})).await.json().await.expect("json");
    assert_eq!(info["active"], true);
    assert!(info["exp"].as_i64().is_some());
    assert_eq!(info["roles"], json!(["Mail.Send", "Mail.ReadWrite"]));

    let forged = format!("{}x", &token[..token.len() - 2]);
    let info: Value = emu.admin_post("introspect", json!({"token": forged})).await.json().await.expect("json");
    assert_eq!(info["active"], false);
}

#[tokio::test]
async fn reset_forgets_apps_and_records() {
    let emu = common::start().await;
    let client = emu.secret_app("s", &["Mail.Send"]).await;
    emu.secret_token(&client, "s").await;
    let stats = emu.admin_get("stats").await;
    assert_eq!(stats["tokenRequests"]["success"], 1);

    let r = emu.admin_post("reset", json!({})).await;
    assert_eq!(r.status(), 200);
    assert!(emu.admin_get("token-requests").await.as_array().is_some_and(Vec::is_empty));
    assert!(emu.admin_get("apps").await.as_array().is_some_and(Vec::is_empty));
    let r = emu
        .token_request(
            TENANT,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &client),
                ("client_secret", "s"),
                ("scope", GRAPH_SCOPE),
            ],
        )
        .await;
    assert_eq!(aad_code(r).await.2, 90002);
    emu.running.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn the_binary_writes_ca_and_url_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("signing-key.pem");
    std::fs::write(&key, common::shared_signer().to_pkcs8_pem().expect("pem")).expect("key");
    let mut child = Command::new(env!("CARGO_BIN_EXE_m365-emulator"))
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.path())
        .arg("--signing-key")
        .arg(&key)
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
    assert!(url.starts_with("https://127.0.0.1:") && !url.ends_with('/'));
    let ca = std::fs::read_to_string(dir.path().join("ca.pem")).expect("ca.pem");
    let http = common::client_trusting(&ca);
    let health: Value =
        http.get(format!("{url}/_emulator/health")).send().await.expect("health").json().await.expect("json");
    assert_eq!(health["status"], "ok");

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("wait") {
            break exit;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "emulator did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "exit status {exit}");
    assert!(!url_file.exists(), "url file left behind");
    let mut log = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut log).expect("log");
    assert!(log.contains("/_emulator/health"), "{log}");
}

#[tokio::test]
async fn issued_tokens_lists_every_token_and_only_issued_ones() {
    let emu = common::start().await;
    let client = emu.secret_app("s", &["Mail.Send"]).await;
    let first = emu.secret_token(&client, "s").await;
    let second = emu.secret_token(&client, "s").await;
    let refused = emu
        .token_request(
            TENANT,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &client),
                ("client_secret", "wrong"),
                ("scope", GRAPH_SCOPE),
            ],
        )
        .await;
    assert_eq!(aad_code(refused).await.2, 7000215);
    let issued = emu.admin_get("issued-tokens").await;
    let tokens: Vec<&str> =
        issued.as_array().expect("array").iter().filter_map(|t| t["accessToken"].as_str()).collect();
    assert_eq!(tokens, vec![first.as_str(), second.as_str()]);
    assert_eq!(issued[0]["clientId"], client.as_str());
    assert_eq!(issued[0]["tenant"], TENANT);
    assert_eq!(issued[0]["scope"], GRAPH_SCOPE);
    emu.admin_post("reset", json!({})).await;
    assert!(emu.admin_get("issued-tokens").await.as_array().is_some_and(Vec::is_empty));
}
