//! Exchange Online RBAC for Applications: grants that live in Exchange, not in the token.

use serde_json::{Value, json};

use crate::common::{self, Emu, OUTLOOK_SCOPE, SENDER, TENANT, graph_code, simple_mail};

const OTHER: &str = "ceo@contoso.com";
const USER_OBJECT_ID: &str = "6e5a1f7b-0d2c-4c8e-9a47-2b1f0c3d4e5f";

/// An app with no Entra roles: its summary and a Graph token without a `roles` claim.
async fn app_without_roles(emu: &Emu) -> (Value, String) {
    let app = emu.secret_app_summary("s", &[]).await;
    let token = emu.secret_token(app["clientId"].as_str().expect("clientId"), "s").await;
    (app, token)
}

/// The claims of a JWT, read without verifying it.
fn token_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("payload");
    let bytes = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload).expect("base64");
    serde_json::from_slice(&bytes).expect("claims")
}

fn service_principal(app: &Value) -> &str {
    app["objectId"].as_str().expect("objectId")
}

async fn assign(emu: &Emu, object_id: &str, role: &str, mailboxes: Option<&[&str]>) -> Value {
    let r = emu.assign_role(object_id, role, mailboxes).await;
    assert_eq!(r.status(), 201, "role assignment");
    r.json().await.expect("json")
}

async fn send_status(emu: &Emu, token: &str, sender: &str) -> (u16, String) {
    let r = emu.send_mail(token, sender, simple_mail("rbac")).await;
    let status = r.status().as_u16();
    if status == 202 { (status, String::new()) } else { (status, graph_code(r).await) }
}

#[tokio::test]
async fn an_organization_wide_assignment_lets_an_app_without_roles_send_as_anyone() {
    let emu = common::start().await;
    let (app, token) = app_without_roles(&emu).await;
    assign(&emu, service_principal(&app), "Application Mail.Send", None).await;
    let claims = token_claims(&emu.secret_token(app["clientId"].as_str().expect("clientId"), "s").await);
    assert!(claims.get("roles").is_none(), "the Exchange grant never reaches the token: {claims}");

    assert_eq!(send_status(&emu, &token, SENDER).await.0, 202);
    assert_eq!(send_status(&emu, &token, OTHER).await.0, 202);
    assert_eq!(send_status(&emu, &token, USER_OBJECT_ID).await.0, 202);
    assert_eq!(emu.admin_get("messages").await.as_array().map(Vec::len), Some(3));
}

#[tokio::test]
async fn a_scoped_assignment_covers_only_the_mailboxes_in_its_scope() {
    let emu = common::start().await;
    let (app, token) = app_without_roles(&emu).await;
    let assignment =
        assign(&emu, service_principal(&app), "Application Mail.Send", Some(&["Alerts@Contoso.com"])).await;
    assert_eq!(assignment["mailboxes"], json!([SENDER]));

    assert_eq!(send_status(&emu, &token, SENDER).await.0, 202);
    assert_eq!(send_status(&emu, &token, "ALERTS@contoso.com").await.0, 202);
    assert_eq!(send_status(&emu, &token, OTHER).await, (403, "ErrorAccessDenied".into()));
    // A scope is a recipient filter; a mailbox named by object id matches org-wide grants only.
    assert_eq!(send_status(&emu, &token, USER_OBJECT_ID).await, (403, "ErrorAccessDenied".into()));
    assert_eq!(emu.admin_get("messages").await.as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn without_a_role_or_an_assignment_graph_answers_error_access_denied() {
    let emu = common::start().await;
    let (_, token) = app_without_roles(&emu).await;
    let r = emu.send_mail(&token, SENDER, simple_mail("denied")).await;
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "ErrorAccessDenied");
    assert_eq!(body["error"]["message"], "Access is denied. Check credentials and try again.");
    assert!(emu.admin_get("messages").await.as_array().is_some_and(Vec::is_empty));
}

#[tokio::test]
async fn an_assignment_naming_the_app_registration_object_never_matches() {
    let emu = common::start().await;
    let (app, token) = app_without_roles(&emu).await;
    let registration = app["applicationObjectId"].as_str().expect("applicationObjectId");
    assert_ne!(registration, service_principal(&app));

    // The usual mistake: New-ServicePrincipal -ObjectId <App registrations' Object ID>.
    assign(&emu, registration, "Application Mail.Send", None).await;
    assert_eq!(send_status(&emu, &token, SENDER).await, (403, "ErrorAccessDenied".into()));

    // The same assignment for the Enterprise Application's object id works.
    assign(&emu, service_principal(&app), "Application Mail.Send", None).await;
    assert_eq!(send_status(&emu, &token, SENDER).await.0, 202);
}

#[tokio::test]
async fn entra_roles_and_rbac_assignments_are_additive() {
    let emu = common::start().await;
    let app = emu.secret_app_summary("s", &["Mail.Send"]).await;
    let token = emu.secret_token(app["clientId"].as_str().expect("clientId"), "s").await;
    assign(&emu, service_principal(&app), "Application Mail.Send", Some(&[SENDER])).await;
    // The tenant-wide Entra grant is not narrowed by a scoped Exchange assignment.
    assert_eq!(send_status(&emu, &token, OTHER).await.0, 202);
    assert_eq!(send_status(&emu, &token, SENDER).await.0, 202);

    // An application access policy narrows the Entra grant; the RBAC grant still adds its scope.
    let limited = uuid::Uuid::new_v4().to_string();
    let app = emu
        .register(json!({
            "tenantId": TENANT, "clientId": limited, "secrets": ["s"], "roles": ["Mail.Send"],
            "allowedMailboxes": ["ops@contoso.com"]
        }))
        .await;
    let token = emu.secret_token(&limited, "s").await;
    assign(&emu, service_principal(&app), "Application Mail.Send", Some(&[SENDER])).await;
    assert_eq!(send_status(&emu, &token, "ops@contoso.com").await.0, 202);
    assert_eq!(send_status(&emu, &token, SENDER).await.0, 202);
    assert_eq!(send_status(&emu, &token, OTHER).await, (403, "ErrorSendAsDenied".into()));
}

#[tokio::test]
async fn drafts_need_application_mail_read_write_and_sending_them_mail_send() {
    let emu = common::start().await;
    let (app, token) = app_without_roles(&emu).await;
    let sp = service_principal(&app);
    assign(&emu, sp, "Application Mail.Send", Some(&[SENDER])).await;
    let create = || {
        emu.http
            .post(format!("{}/v1.0/users/{SENDER}/messages", emu.url))
            .bearer_auth(&token)
            .json(&simple_mail("draft")["message"])
            .send()
    };
    let r = create().await.expect("create draft");
    assert_eq!(r.status(), 403);
    assert_eq!(graph_code(r).await, "ErrorAccessDenied");

    assign(&emu, sp, "Application Mail.ReadWrite", Some(&[SENDER])).await;
    let r = create().await.expect("create draft");
    assert_eq!(r.status(), 201);
    let draft: Value = r.json().await.expect("json");
    let id = draft["id"].as_str().expect("id");
    let r = emu
        .http
        .post(format!("{}/v1.0/users/{SENDER}/messages/{id}/send", emu.url))
        .bearer_auth(&token)
        .send()
        .await
        .expect("send draft");
    assert_eq!(r.status(), 202);
    assert_eq!(emu.admin_get("messages").await[0]["mode"], "draft");
}

#[tokio::test]
async fn role_assignments_are_validated_listed_cleared_and_reset() {
    let emu = common::start().await;
    let r = emu.assign_role("sp", "Mail.Send", None).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.expect("json");
    assert!(body["error"].as_str().unwrap_or_default().contains("unknown role 'Mail.Send'"), "{body}");
    let r = emu.admin_post("role-assignments", json!({"tenantId": TENANT, "role": "Application Mail.Send"})).await;
    assert_eq!(r.status(), 400, "servicePrincipalObjectId is required");

    let made = assign(&emu, "SP-1", "application smtp.sendasapp", Some(&["Alerts@Contoso.com"])).await;
    assert!(uuid::Uuid::parse_str(made["id"].as_str().unwrap_or_default()).is_ok(), "{made}");
    assert_eq!(made["tenantId"], TENANT);
    assert_eq!(made["servicePrincipalObjectId"], "sp-1");
    assert_eq!(made["role"], "Application SMTP.SendAsApp");
    assert_eq!(made["mailboxes"], json!([SENDER]));
    let wide = assign(&emu, "sp-2", "Application Mail.ReadWrite", None).await;
    assert!(wide["mailboxes"].is_null());
    assert_eq!(emu.admin_get("role-assignments").await, json!([made, wide]));

    let r = emu.http.delete(format!("{}/_emulator/role-assignments", emu.url)).send().await.expect("delete");
    assert_eq!(r.status(), 204);
    assert_eq!(emu.admin_get("role-assignments").await, json!([]));

    assign(&emu, "sp-3", "Application Mail.Send", None).await;
    emu.admin_post("reset", json!({})).await;
    assert_eq!(emu.admin_get("role-assignments").await, json!([]));
}

#[tokio::test]
async fn introspection_authorizes_smtp_send_as_app_by_role_or_by_assignment() {
    let emu = common::start().await;
    let ask = |token: &str, mailbox: &str| json!({"token": token, "mailbox": mailbox, "permission": "SMTP.SendAsApp"});

    // An Entra grant: any mailbox.
    let with_role = emu.secret_app("s", &["SMTP.SendAsApp"]).await;
    let token = emu.scoped_token(&with_role, "s", OUTLOOK_SCOPE).await;
    let info = emu.introspect(ask(&token, OTHER)).await;
    assert_eq!((info["active"].clone(), info["authorized"].clone()), (json!(true), json!(true)), "{info}");
    assert_eq!(info["aud"], "https://outlook.office365.com");

    // No grant, then a scoped Exchange grant of another role, then of SMTP.SendAsApp.
    let app = emu.secret_app_summary("s", &[]).await;
    let token = emu.scoped_token(app["clientId"].as_str().expect("clientId"), "s", OUTLOOK_SCOPE).await;
    assert_eq!(emu.introspect(ask(&token, SENDER)).await["authorized"], false);
    assign(&emu, service_principal(&app), "Application Mail.Send", None).await;
    assert_eq!(emu.introspect(ask(&token, SENDER)).await["authorized"], false);
    assign(&emu, service_principal(&app), "Application SMTP.SendAsApp", Some(&[SENDER])).await;
    assert_eq!(emu.introspect(ask(&token, "Alerts@Contoso.com")).await["authorized"], true);
    assert_eq!(emu.introspect(ask(&token, OTHER)).await["authorized"], false);

    // Without the question the answer is as before; half a question is refused.
    let plain = emu.introspect(json!({"token": token})).await;
    assert_eq!(plain["active"], true);
    assert!(plain.get("authorized").is_none(), "{plain}");
    let r = emu.admin_post("introspect", json!({"token": token, "mailbox": SENDER})).await;
    assert_eq!(r.status(), 400);

    // A forged token authorizes nothing.
    let forged = format!("{}x", &token[..token.len() - 2]);
    let info = emu.introspect(ask(&forged, SENDER)).await;
    assert_eq!((info["active"].clone(), info["authorized"].clone()), (json!(false), json!(false)));
}

#[tokio::test]
async fn app_summaries_show_both_object_ids() {
    let emu = common::start().await;
    let made = emu.secret_app_summary("s", &[]).await;
    let token = emu.secret_token(made["clientId"].as_str().expect("clientId"), "s").await;
    let listed = &emu.admin_get("apps").await[0];
    assert_eq!(listed["objectId"], made["objectId"]);
    assert_eq!(listed["applicationObjectId"], made["applicationObjectId"]);
    assert_ne!(made["objectId"], made["applicationObjectId"]);
    let claims = token_claims(&token);
    assert_eq!(claims["oid"], made["objectId"], "the token carries the service principal's id");
}
