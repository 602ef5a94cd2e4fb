//! sendMail: acceptance and inspection, authentication and authorization, validation, MIME.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use crate::common::{self, SENDER, TENANT, graph_code, simple_mail};

#[tokio::test]
async fn an_accepted_message_is_listed_for_inspection() {
    let emu = common::start().await;
    let token = emu.sender_token().await;
    let mut mail = simple_mail("Deploy finished ✅");
    mail["message"]["internetMessageHeaders"] = json!([{"name": "X-Pipeline-Run", "value": "1234"}]);
    mail["message"]["internetMessageId"] = json!("<em-123@mailroom.dev>");
    mail["message"]["bccRecipients"] = json!([{"emailAddress": {"address": "audit@contoso.com"}}]);
    mail["message"]["attachments"] = json!([{
        "@odata.type": "#microsoft.graph.fileAttachment", "name": "hello.txt",
        "contentType": "text/plain", "contentBytes": "aGVsbG8K"
    }]);
    let r = emu
        .http
        .post(format!("{}/v1.0/users/{SENDER}/sendMail", emu.url))
        .bearer_auth(&token)
        .header("client-request-id", "c0ffee00-0000-0000-0000-000000000001")
        .json(&mail)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 202);
    let request_id = r.headers()["request-id"].to_str().expect("id").to_string();
    assert!(uuid::Uuid::parse_str(&request_id).is_ok());
    assert_eq!(r.headers()["client-request-id"], "c0ffee00-0000-0000-0000-000000000001");
    assert!(r.bytes().await.expect("body").is_empty());

    let messages = emu.admin_get("messages").await;
    let m = &messages[0];
    assert_eq!(m["requestId"], request_id.as_str());
    assert_eq!(m["sender"], SENDER);
    assert_eq!(m["subject"], "Deploy finished ✅");
    assert_eq!(m["to"], json!([{"address": "ops@contoso.com", "name": "Ops"}]));
    assert_eq!(m["bcc"][0]["address"], "audit@contoso.com");
    assert_eq!(m["bodyContentType"], "text");
    assert_eq!(m["bodyLength"], 22);
    assert_eq!(m["headers"], json!([{"name": "X-Pipeline-Run", "value": "1234"}]));
    assert_eq!(m["messageId"], "<em-123@mailroom.dev>");
    assert_eq!(m["mode"], "json");
    assert_eq!(m["saveToSentItems"], false);
    assert_eq!(m["tenantId"], TENANT);
    assert_eq!(m["attachments"][0]["size"], 6);
    assert_eq!(m["attachments"][0]["sha256"], "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03");
}

#[tokio::test]
async fn an_expired_token_gets_401_invalid_authentication_token() {
    let emu = common::start().await;
    let client = uuid::Uuid::new_v4().to_string();
    emu.register(json!({
        "tenantId": TENANT, "clientId": client, "secrets": ["s"], "roles": ["Mail.Send"],
        "tokenLifetimeSeconds": 1
    }))
    .await;
    let token = emu.secret_token(&client, "s").await;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let r = emu.send_mail(&token, SENDER, simple_mail("late")).await;
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"].to_str().unwrap_or_default().starts_with("Bearer"));
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "InvalidAuthenticationToken");
    assert!(body["error"]["innerError"]["request-id"].is_string());

    let no_token = emu
        .http
        .post(format!("{}/v1.0/users/{SENDER}/sendMail", emu.url))
        .json(&simple_mail("x"))
        .send()
        .await
        .expect("send");
    assert_eq!(no_token.status(), 401);
}

#[tokio::test]
async fn permissions_and_mailbox_policies_are_enforced() {
    let emu = common::start().await;
    let client = emu.secret_app("s", &["User.Read.All"]).await;
    let no_role = emu.secret_token(&client, "s").await;
    let r = emu.send_mail(&no_role, SENDER, simple_mail("x")).await;
    assert_eq!(r.status(), 403);
    assert_eq!(graph_code(r).await, "ErrorAccessDenied");

    let limited = uuid::Uuid::new_v4().to_string();
    emu.register(json!({
        "tenantId": TENANT, "clientId": limited, "secrets": ["s"], "roles": ["Mail.Send"],
        "allowedMailboxes": [SENDER]
    }))
    .await;
    let token = emu.secret_token(&limited, "s").await;
    assert_eq!(emu.send_mail(&token, SENDER, simple_mail("ok")).await.status(), 202);
    let r = emu.send_mail(&token, "ceo@contoso.com", simple_mail("no")).await;
    assert_eq!(r.status(), 403);
    assert_eq!(graph_code(r).await, "ErrorSendAsDenied");

    let r = emu.admin_post("mailboxes", json!({"address": SENDER, "enabledForRest": false})).await;
    assert_eq!(r.status(), 200);
    let r = emu.send_mail(&token, SENDER, simple_mail("x")).await;
    assert_eq!(r.status(), 404);
    assert_eq!(graph_code(r).await, "MailboxNotEnabledForRESTAPI");
}

#[tokio::test]
async fn graph_validation_errors() {
    let emu = common::start().await;
    let token = emu.sender_token().await;
    let mut none = simple_mail("x");
    none["message"]["toRecipients"] = json!([]);
    let r = emu.send_mail(&token, SENDER, none).await;
    assert_eq!(r.status(), 400);
    assert_eq!(graph_code(r).await, "ErrorInvalidRecipients");

    let mut header = simple_mail("x");
    header["message"]["internetMessageHeaders"] = json!([{"name": "Reply-To", "value": "x@y.z"}]);
    let r = emu.send_mail(&token, SENDER, header).await;
    assert_eq!(r.status(), 400);
    assert_eq!(graph_code(r).await, "InvalidInternetMessageHeader");

    let mut big = simple_mail("x");
    big["message"]["attachments"] = json!([{
        "@odata.type": "#microsoft.graph.fileAttachment", "name": "big.bin",
        "contentBytes": STANDARD.encode(vec![7u8; 3_500_000])
    }]);
    let r = emu.send_mail(&token, SENDER, big).await;
    assert_eq!(r.status(), 413);

    assert!(emu.admin_get("messages").await.as_array().is_some_and(Vec::is_empty));
}

#[tokio::test]
async fn a_mime_message_is_accepted() {
    let emu = common::start().await;
    let token = emu.sender_token().await;
    let mime = "From: alerts@contoso.com\r\nTo: Ops <ops@contoso.com>\r\nSubject: MIME hello\r\nMessage-ID: <mime-1@mailroom.dev>\r\nX-Pipeline-Run: 77\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello from MIME\r\n";
    let r = emu
        .http
        .post(format!("{}/v1.0/users/{SENDER}/sendMail", emu.url))
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .body(STANDARD.encode(mime))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 202);
    let m = &emu.admin_get("messages").await[0];
    assert_eq!(m["mode"], "mime");
    assert_eq!(m["messageId"], "<mime-1@mailroom.dev>");
    assert_eq!(m["subject"], "MIME hello");
    assert_eq!(m["to"][0]["address"], "ops@contoso.com");
    assert_eq!(m["headers"][0]["value"], "77");
}

async fn send_mime(emu: &common::Emu, token: &str, body: String) -> reqwest::Response {
    emu.http
        .post(format!("{}/v1.0/users/{SENDER}/sendMail", emu.url))
        .bearer_auth(token)
        .header("content-type", "text/plain")
        .body(body)
        .send()
        .await
        .expect("send")
}

#[tokio::test]
async fn a_mime_message_takes_its_recipients_bcc_included_from_its_header_fields() {
    let emu = common::start().await;
    let token = emu.sender_token().await;
    let mime = "From: Alerts <alerts@contoso.com>\r\nTo: ops@contoso.com\r\nCc: lead@contoso.com\r\nBcc: audit@contoso.com,\r\n archive@contoso.com\r\nSubject: Raw\r\nMessage-ID: <raw-1@build.contoso.com>\r\n\r\nbody\r\n";
    let r = send_mime(&emu, &token, STANDARD.encode(mime)).await;
    assert_eq!(r.status(), 202);
    let m = &emu.admin_get("messages").await[0];
    assert_eq!(m["mode"], "mime");
    assert_eq!(m["from"]["address"], "alerts@contoso.com");
    assert_eq!(m["cc"][0]["address"], "lead@contoso.com");
    let bcc: Vec<&str> = m["bcc"].as_array().unwrap().iter().filter_map(|a| a["address"].as_str()).collect();
    assert_eq!(bcc, ["audit@contoso.com", "archive@contoso.com"]);
    assert_eq!(m["messageId"], "<raw-1@build.contoso.com>");
    assert_eq!(m["messageIdFromClient"], true);
    // A MIME message is always saved to Sent Items.
    assert_eq!(m["saveToSentItems"], true);
    // No recipient in any header field: nothing to send to.
    let none = "From: alerts@contoso.com\r\nSubject: nobody\r\n\r\nbody\r\n";
    let r = send_mime(&emu, &token, STANDARD.encode(none)).await;
    assert_eq!(r.status(), 400);
    assert_eq!(emu.admin_get("messages").await.as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn malformed_base64_and_malformed_mime_get_the_documented_400() {
    let emu = common::start().await;
    let token = emu.sender_token().await;
    let not_mime = STANDARD.encode("this is no MIME message at all\r\n");
    for body in ["!!! not base64 !!!".to_string(), String::new(), not_mime] {
        let r = send_mime(&emu, &token, body.clone()).await;
        assert_eq!(r.status(), 400, "{body:?}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["error"]["code"], "ErrorMimeContentInvalidBase64String", "{body:?}");
        assert_eq!(v["error"]["message"], "Invalid base64 string for MIME content.");
    }
    assert!(emu.admin_get("messages").await.as_array().is_some_and(Vec::is_empty));
}

#[tokio::test]
async fn an_outlook_token_is_refused_by_graph() {
    let emu = common::start().await;
    let client = emu.secret_app("s", &["Mail.Send"]).await;
    let r = emu
        .token_request(
            TENANT,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &client),
                ("client_secret", "s"),
                ("scope", "https://outlook.office365.com/.default"),
            ],
        )
        .await;
    let token: Value = r.json().await.expect("json");
    let r = emu.send_mail(token["access_token"].as_str().unwrap_or_default(), SENDER, simple_mail("x")).await;
    assert_eq!(r.status(), 401);
    assert_eq!(graph_code(r).await, "InvalidAuthenticationToken");
}
