//! Drafts: `POST /users/{sender}/messages`, small attachments, and `/messages/{id}/send`.

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::auth::{self, Caller, Permission};
use super::errors::{GraphError, RequestIds};
use super::message::{self, MAX_REQUEST_BYTES, ParsedMessage};
use super::send_mail::{accept, read_body};
use crate::clock;
use crate::origin::request_origin;
use crate::records::SendMode;
use crate::state::AppState;

/// A draft in a mailbox's Drafts folder.
#[derive(Debug, Clone)]
pub struct Draft {
    /// Message id.
    pub id: String,
    /// The mailbox, lower case.
    pub mailbox: String,
    /// The message so far (attachments grow as they are added).
    pub message: ParsedMessage,
    /// When it was created (RFC 3339).
    pub created: String,
}

/// A new message id, shaped like Exchange's opaque ids.
fn new_message_id() -> String {
    format!("AAMkAGE{}AAA=", uuid::Uuid::new_v4().simple())
}

/// The draft `id` in `mailbox`, or 404 as Graph answers for another mailbox's item.
fn find_draft(state: &AppState, mailbox: &str, id: &str) -> Result<Draft, GraphError> {
    state
        .lock()
        .drafts
        .get(id)
        .filter(|d| d.mailbox.eq_ignore_ascii_case(mailbox))
        .cloned()
        .ok_or_else(GraphError::item_not_found)
}

/// Creates a draft: 201 with the message.
pub async fn create(
    State(state): State<AppState>,
    Path(sender): Path<String>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Result<Response, GraphError> {
    auth::authorize(&state, &caller, Permission::MailReadWrite, &sender)?;
    let bytes = read_body(&headers, body, MAX_REQUEST_BYTES).await?;
    let parsed = message::parse_message(&message::json_object(&bytes)?)?;
    let draft = Draft {
        id: new_message_id(),
        mailbox: sender.to_ascii_lowercase(),
        message: parsed,
        created: clock::now_rfc3339(),
    };
    let origin = request_origin(&headers, &uri, &state.settings.base_url);
    let body = draft_json(&draft, &origin);
    state.lock().drafts.insert(draft.id.clone(), draft);
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

fn draft_json(draft: &Draft, origin: &str) -> serde_json::Value {
    let m = &draft.message;
    let recipients = |list: &[crate::records::RecordedAddress]| -> Vec<serde_json::Value> {
        list.iter()
            .map(|a| serde_json::json!({"emailAddress": {"address": a.address, "name": a.name.clone().unwrap_or_else(|| a.address.clone())}}))
            .collect()
    };
    serde_json::json!({
        "@odata.context": format!("{origin}/v1.0/$metadata#users('{}')/messages/$entity", draft.mailbox),
        "id": draft.id,
        "createdDateTime": draft.created,
        "lastModifiedDateTime": draft.created,
        "isDraft": true,
        "subject": m.subject,
        "importance": m.importance,
        "hasAttachments": !m.attachments.is_empty(),
        "internetMessageId": m.internet_message_id,
        "body": {"contentType": m.body_content_type, "content": m.body},
        "toRecipients": recipients(&m.to),
        "ccRecipients": recipients(&m.cc),
        "bccRecipients": recipients(&m.bcc),
        "replyTo": recipients(&m.reply_to),
    })
}

/// Adds a small file attachment to a draft: 201 with the attachment.
pub async fn add_attachment(
    State(state): State<AppState>,
    Path((sender, id)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GraphError> {
    auth::authorize(&state, &caller, Permission::MailReadWrite, &sender)?;
    find_draft(&state, &sender, &id)?;
    let bytes = read_body(&headers, body, MAX_REQUEST_BYTES).await?;
    let attachment = message::file_attachment(&serde_json::Value::Object(message::json_object(&bytes)?))?;
    let attachment_id = format!("AAMkAGE{}=", uuid::Uuid::new_v4().simple());
    let json = serde_json::json!({
        "@odata.type": "#microsoft.graph.fileAttachment",
        "id": attachment_id,
        "name": attachment.name,
        "contentType": attachment.content_type,
        "size": attachment.size,
        "isInline": attachment.is_inline,
    });
    let mut inner = state.lock();
    let draft = inner.drafts.get_mut(&id).ok_or_else(GraphError::item_not_found)?;
    draft.message.attachments.push(attachment);
    Ok((StatusCode::CREATED, axum::Json(json)).into_response())
}

/// Sends a draft: 202, and the draft leaves the Drafts folder.
pub async fn send(
    State(state): State<AppState>,
    Path((sender, id)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
    Extension(ids): Extension<RequestIds>,
) -> Result<StatusCode, GraphError> {
    auth::authorize(&state, &caller, Permission::MailSend, &sender)?;
    let draft = find_draft(&state, &sender, &id)?;
    draft.message.require_recipients()?;
    {
        let mut inner = state.lock();
        if inner.drafts.remove(&id).is_none() {
            // Sent by a concurrent request in the meantime.
            return Err(GraphError::item_not_found());
        }
        inner.uploads.retain(|_, s| s.draft_id != id);
    }
    accept(&state, &caller, &ids, &sender, draft.message, SendMode::Draft, true);
    Ok(StatusCode::ACCEPTED)
}
