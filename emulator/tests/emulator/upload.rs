//! Drafts and upload sessions for large attachments.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::{self, Emu, SENDER, graph_code};

const CHUNK: usize = 10 * 320 * 1024;

async fn create_draft(emu: &Emu, token: &str) -> String {
    let r = emu
        .http
        .post(format!("{}/v1.0/users/{SENDER}/messages", emu.url))
        .bearer_auth(token)
        .json(&json!({
            "subject": "Quarterly report",
            "body": {"contentType": "HTML", "content": "<p>Attached.</p>"},
            "toRecipients": [{"emailAddress": {"address": "ops@contoso.com"}}]
        }))
        .send()
        .await
        .expect("create draft");
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["isDraft"], true);
    body["id"].as_str().expect("id").to_string()
}

async fn create_session(emu: &Emu, token: &str, draft: &str, size: usize) -> reqwest::Response {
    emu.http
        .post(format!("{}/v1.0/users/{SENDER}/messages/{draft}/attachments/createUploadSession", emu.url))
        .bearer_auth(token)
        .json(&json!({"AttachmentItem": {
            "attachmentType": "file", "name": "report.pdf", "size": size,
            "contentType": "application/pdf"
        }}))
        .send()
        .await
        .expect("createUploadSession")
}

async fn put_range(emu: &Emu, url: &str, data: &[u8], first: usize, total: usize) -> reqwest::Response {
    emu.http
        .put(url)
        .header("content-range", format!("bytes {first}-{}/{total}", first + data.len() - 1))
        .body(data.to_vec())
        .send()
        .await
        .expect("PUT fragment")
}

#[tokio::test]
async fn a_5_mb_attachment_uploads_in_320_kib_multiples_and_sends() {
    let emu = common::start().await;
    let token = emu.sender_token().await;
    let draft = create_draft(&emu, &token).await;

    let size = 5 * 1024 * 1024;
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let r = create_session(&emu, &token, &draft, size).await;
    assert_eq!(r.status(), 201);
    let session: Value = r.json().await.expect("json");
    assert_eq!(session["nextExpectedRanges"], json!(["0-"]));
    let upload_url = session["uploadUrl"].as_str().expect("uploadUrl").to_string();
    assert!(upload_url.starts_with(&format!("{}/_upload/", emu.url)));

    // A fragment that is not a multiple of 320 KiB (and not the last) is refused.
    let r = put_range(&emu, &upload_url, &data[..1000], 0, size).await;
    assert_eq!(r.status(), 400);

    let r = put_range(&emu, &upload_url, &data[..CHUNK], 0, size).await;
    assert_eq!(r.status(), 200);
    let progress: Value = r.json().await.expect("json");
    assert_eq!(progress["nextExpectedRanges"], json!([format!("{CHUNK}-")]));

    // Out of order.
    let r = put_range(&emu, &upload_url, &data[..CHUNK], 0, size).await;
    assert_eq!(r.status(), 416);

    let r = put_range(&emu, &upload_url, &data[CHUNK..], CHUNK, size).await;
    assert_eq!(r.status(), 201);
    assert!(r.headers().contains_key("location"));

    let r = emu
        .http
        .post(format!("{}/v1.0/users/{SENDER}/messages/{draft}/send", emu.url))
        .bearer_auth(&token)
        .send()
        .await
        .expect("send draft");
    assert_eq!(r.status(), 202);

    let m = &emu.admin_get("messages").await[0];
    assert_eq!(m["mode"], "draft");
    assert_eq!(m["bodyContentType"], "html");
    let attachment = &m["attachments"][0];
    assert_eq!(attachment["name"], "report.pdf");
    assert_eq!(attachment["size"], size);
    let digest: String = Sha256::digest(&data).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(attachment["sha256"], digest.as_str());

    // The draft left the Drafts folder.
    let again = emu
        .http
        .post(format!("{}/v1.0/users/{SENDER}/messages/{draft}/send", emu.url))
        .bearer_auth(&token)
        .send()
        .await
        .expect("send again");
    assert_eq!(again.status(), 404);
}

#[tokio::test]
async fn sessions_refuse_small_attachments_and_apps_without_mail_readwrite() {
    let emu = common::start().await;
    let token = emu.sender_token().await;
    let draft = create_draft(&emu, &token).await;
    let r = create_session(&emu, &token, &draft, 1024 * 1024).await;
    assert_eq!(r.status(), 400);
    assert_eq!(graph_code(r).await, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize");

    let client = emu.secret_app("s", &["Mail.Send"]).await;
    let send_only = emu.secret_token(&client, "s").await;
    let r = create_session(&emu, &send_only, &draft, 4 * 1024 * 1024).await;
    assert_eq!(r.status(), 403);
    assert_eq!(graph_code(r).await, "ErrorAccessDenied");
}
