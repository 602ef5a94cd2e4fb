//! The admin API and the command line.

use std::io::Read;
use std::process::Command;

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
    let mut binary = common::Binary::spawn(&[]).await;
    let url = binary.url.clone();
    assert!(url.starts_with("https://127.0.0.1:") && !url.ends_with('/'));
    let health: Value =
        binary.http.get(format!("{url}/_emulator/health")).send().await.expect("health").json().await.expect("json");
    assert_eq!(health["status"], "ok");

    let exit = binary.stop().await;
    assert!(exit.success(), "exit status {exit}");
    assert!(!binary.dir.path().join("url").exists(), "url file left behind");
    let mut log = String::new();
    binary.child.stderr.take().expect("stderr").read_to_string(&mut log).expect("log");
    assert!(log.contains("/_emulator/health"), "{log}");
    assert!(log.contains("cloud=Public"), "{log}");
}

#[tokio::test]
async fn the_binary_plays_the_cloud_given_by_flag() {
    let mut binary = common::Binary::spawn(&["--cloud", "USGovernmentDoD"]).await;
    let client = uuid::Uuid::new_v4().to_string();
    let r = binary
        .http
        .post(format!("{}/_emulator/apps", binary.url))
        .json(&json!({"tenantId": TENANT, "clientId": client, "secrets": ["s"], "roles": ["Mail.Send"]}))
        .send()
        .await
        .expect("register");
    assert_eq!(r.status(), 201);
    let token = |scope: &'static str| {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", client.as_str()),
            ("client_secret", "s"),
            ("scope", scope),
        ];
        binary.http.post(format!("{}/{TENANT}/oauth2/v2.0/token", binary.url)).form(&form).send()
    };
    let ok: Value = token("https://dod-graph.microsoft.us/.default").await.expect("token").json().await.expect("json");
    let info: Value = binary
        .http
        .post(format!("{}/_emulator/introspect", binary.url))
        .json(&json!({"token": ok["access_token"]}))
        .send()
        .await
        .expect("introspect")
        .json()
        .await
        .expect("json");
    assert_eq!(info["aud"], "https://dod-graph.microsoft.us");
    let refused = token("https://graph.microsoft.us/.default").await.expect("token");
    assert_eq!(aad_code(refused).await, (400, "invalid_resource".to_string(), 500011));
    assert!(binary.stop().await.success());
}

#[test]
fn the_binary_refuses_an_unknown_cloud() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_m365-emulator"))
        .args(["--cloud", "Germany", "--state-dir"])
        .arg(dir.path())
        .output()
        .expect("run emulator");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown cloud 'Germany'"), "{stderr}");
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
