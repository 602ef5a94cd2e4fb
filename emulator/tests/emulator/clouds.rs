//! National clouds: one emulator is one cloud, with its own Graph and Outlook resources.

use m365_emulator::{Cloud, Config};
use serde_json::{Value, json};

use crate::common::{self, Emu, GRAPH_SCOPE, OUTLOOK_SCOPE, SENDER, TENANT, aad_code, graph_code, simple_mail};

const US_GRAPH_SCOPE: &str = "https://graph.microsoft.us/.default";
const US_OUTLOOK_SCOPE: &str = "https://outlook.office365.us/.default";

async fn start_in(cloud: Cloud) -> Emu {
    common::start_with(Config { cloud, ..Config::default() }).await
}

async fn token_answer(emu: &Emu, client: &str, scope: &str) -> reqwest::Response {
    emu.token_request(
        TENANT,
        &[("grant_type", "client_credentials"), ("client_id", client), ("client_secret", "s"), ("scope", scope)],
    )
    .await
}

#[tokio::test]
async fn us_government_graph_tokens_carry_its_audience_and_graph_accepts_them() {
    let emu = start_in(Cloud::USGovernment).await;
    let client = emu.secret_app("s", &["Mail.Send"]).await;
    let token = emu.scoped_token(&client, "s", US_GRAPH_SCOPE).await;
    let info = emu.introspect(json!({"token": token})).await;
    assert_eq!(info["aud"], "https://graph.microsoft.us");
    assert_eq!(info["active"], true);
    assert_eq!(emu.send_mail(&token, SENDER, simple_mail("gcc high")).await.status(), 202);
}

#[tokio::test]
async fn us_government_refuses_commercial_scopes_with_aadsts500011() {
    let emu = start_in(Cloud::USGovernment).await;
    let client = emu.secret_app("s", &["Mail.Send"]).await;
    for (scope, resource) in
        [(GRAPH_SCOPE, "https://graph.microsoft.com"), (OUTLOOK_SCOPE, "https://outlook.office365.com")]
    {
        let r = token_answer(&emu, &client, scope).await;
        assert_eq!(r.status(), 400, "{scope}");
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["error"], "invalid_resource");
        assert_eq!(body["error_codes"], json!([500011]));
        let description = body["error_description"].as_str().unwrap_or_default();
        let expected = format!(
            "AADSTS500011: The resource principal named {resource} was not found in the tenant named {TENANT}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant."
        );
        assert!(description.starts_with(&expected), "{description}");
    }
    let records = emu.admin_get("token-requests").await;
    assert_eq!(records[0]["outcome"], "AADSTS500011");
}

#[tokio::test]
async fn graph_refuses_tokens_of_another_audience_with_401() {
    let us = start_in(Cloud::USGovernment).await;
    let client = us.secret_app("s", &["Mail.Send"]).await;
    let outlook = us.scoped_token(&client, "s", US_OUTLOOK_SCOPE).await;
    let r = us.send_mail(&outlook, SENDER, simple_mail("x")).await;
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "InvalidAuthenticationToken");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("Invalid audience"), "{body}");

    // A commercial Graph token, signed by the same key, is still not for this cloud's Graph.
    let public = common::start().await;
    let public_client = public.secret_app("s", &["Mail.Send"]).await;
    let commercial = public.secret_token(&public_client, "s").await;
    let r = us.send_mail(&commercial, SENDER, simple_mail("x")).await;
    assert_eq!(r.status(), 401);
    assert_eq!(graph_code(r).await, "InvalidAuthenticationToken");
    // And the reverse.
    let us_graph = us.scoped_token(&client, "s", US_GRAPH_SCOPE).await;
    assert_eq!(public.send_mail(&us_graph, SENDER, simple_mail("x")).await.status(), 401);
}

#[tokio::test]
async fn the_us_government_outlook_scope_gives_an_smtp_token() {
    let emu = start_in(Cloud::USGovernment).await;
    let client = emu.secret_app("s", &["SMTP.SendAsApp"]).await;
    let token = emu.scoped_token(&client, "s", US_OUTLOOK_SCOPE).await;
    let info = emu.introspect(json!({"token": token, "mailbox": SENDER, "permission": "SMTP.SendAsApp"})).await;
    assert_eq!(info["aud"], "https://outlook.office365.us");
    assert_eq!(info["authorized"], true);
    // outlook.office.com is a name of the global service only.
    let r = token_answer(&emu, &client, "https://outlook.office.com/.default").await;
    assert_eq!(aad_code(r).await, (400, "invalid_resource".to_string(), 500011));
}

#[tokio::test]
async fn every_cloud_issues_tokens_for_its_own_resources_only() {
    for cloud in Cloud::ALL {
        let emu = start_in(cloud).await;
        let client = emu.secret_app("s", &["Mail.Send"]).await;
        for resource in [cloud.graph_resource(), cloud.outlook_resource()] {
            let token = emu.scoped_token(&client, "s", &format!("{resource}/.default")).await;
            assert_eq!(emu.introspect(json!({"token": token})).await["aud"], resource, "{cloud}");
        }
        let graph = emu.scoped_token(&client, "s", &format!("{}/.default", cloud.graph_resource())).await;
        assert_eq!(emu.send_mail(&graph, SENDER, simple_mail("x")).await.status(), 202, "{cloud}");
        for other in Cloud::ALL.into_iter().filter(|o| *o != cloud) {
            let r = token_answer(&emu, &client, &format!("{}/.default", other.graph_resource())).await;
            assert_eq!(aad_code(r).await.2, 500011, "{other} Graph scope in {cloud}");
        }
        emu.running.shutdown().await.expect("shutdown");
    }
}
