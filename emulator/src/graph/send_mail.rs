//! `POST /v1.0/users/{sender}/sendMail`, in JSON or MIME, and the record of accepted mail.

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};

use super::auth::{self, Caller, Permission};
use super::errors::{GraphError, RequestIds};
use super::message::{self, MAX_REQUEST_BYTES, ParsedMessage};
use super::mime;
use crate::clock;
use crate::records::{MessageRecord, SendMode};
use crate::state::AppState;

const SEND_MAIL_PARAMETERS: &[&str] = &["message", "saveToSentItems"];

/// sendMail: validates, records, answers 202 with no body.
pub async fn send_mail(
    State(state): State<AppState>,
    Path(sender): Path<String>,
    Extension(caller): Extension<Caller>,
    Extension(ids): Extension<RequestIds>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, GraphError> {
    auth::authorize(&state, &caller, Permission::MailSend, &sender)?;
    let bytes = read_body(&headers, body, MAX_REQUEST_BYTES).await?;
    let is_mime = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.trim().to_ascii_lowercase().starts_with("text/plain"));
    let (parsed, save, mode) = if is_mime {
        (mime::parse_mime(&bytes)?, true, SendMode::Mime)
    } else {
        let (parsed, save) = parse_send_mail_json(&bytes)?;
        (parsed, save, SendMode::Json)
    };
    parsed.require_recipients()?;
    accept(&state, &caller, &ids, &sender, parsed, mode, save);
    Ok(StatusCode::ACCEPTED)
}

/// Reads the sendMail action's JSON parameters.
pub fn parse_send_mail_json(bytes: &[u8]) -> Result<(ParsedMessage, bool), GraphError> {
    let obj = message::json_object(bytes)?;
    for key in obj.keys() {
        if !key.contains('@') && !SEND_MAIL_PARAMETERS.iter().any(|p| p.eq_ignore_ascii_case(key)) {
            return Err(GraphError::bad_request(
                "RequestBodyRead",
                format!(
                    "The parameter '{key}' in the request payload is not a valid parameter for the operation 'sendMail'."
                ),
            ));
        }
    }
    let msg = match message::field(&obj, "message") {
        Some(serde_json::Value::Object(m)) => m,
        Some(_) => {
            return Err(GraphError::bad_request(
                "RequestBodyRead",
                "The parameter 'Message' must be a microsoft.graph.message object.",
            ));
        }
        None => {
            return Err(GraphError::bad_request(
                "ErrorInvalidParameter",
                "The value of the parameter 'Message' is empty.",
            ));
        }
    };
    let save = match message::field(&obj, "saveToSentItems") {
        None => true,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(_) => {
            return Err(GraphError::bad_request(
                "RequestBodyRead",
                "Cannot convert the value of parameter 'SaveToSentItems' to the expected type 'Edm.Boolean'.",
            ));
        }
    };
    Ok((message::parse_message(msg)?, save))
}

/// Reads a request body of at most `limit` bytes, answering 413 beyond it.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, GraphError> {
    let too_large = || {
        GraphError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "ErrorRequestEntityTooLarge",
            format!(
                "The request body exceeds the maximum of {limit} bytes. Attach files of 3 MB or more through an upload session."
            ),
        )
    };
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|_| too_large())
}

/// Records an accepted message.
pub fn accept(
    state: &AppState,
    caller: &Caller,
    ids: &RequestIds,
    sender: &str,
    parsed: ParsedMessage,
    mode: SendMode,
    save_to_sent_items: bool,
) -> MessageRecord {
    let (message_id, from_client) = match parsed.internet_message_id {
        Some(id) => (id, true),
        None => (assigned_message_id(), false),
    };
    let record = MessageRecord {
        request_id: ids.request_id.clone(),
        client_request_id: ids.client_request_id.clone(),
        sender: sender.to_string(),
        from: parsed.from,
        to: parsed.to,
        cc: parsed.cc,
        bcc: parsed.bcc,
        reply_to: parsed.reply_to,
        subject: parsed.subject,
        body_content_type: parsed.body_content_type,
        body_length: parsed.body.len(),
        body: parsed.body,
        importance: parsed.importance,
        headers: parsed.headers,
        attachments: parsed.attachments,
        message_id,
        message_id_from_client: from_client,
        mode,
        save_to_sent_items,
        client_id: caller.claims.appid.clone(),
        tenant_id: caller.claims.tid.clone(),
        received_time: clock::now_rfc3339(),
    };
    tracing::info!(
        sender = %record.sender,
        mode = ?record.mode,
        recipients = record.to.len() + record.cc.len() + record.bcc.len(),
        attachments = record.attachments.len(),
        request_id = %record.request_id,
        "message accepted"
    );
    let mut inner = state.lock();
    inner.stats.messages_accepted += 1;
    inner.messages.push(record.clone());
    record
}

/// A Message-ID in the form Exchange Online assigns when the client gives none.
pub fn assigned_message_id() -> String {
    format!("<{}@emulator.outlook.local>", uuid::Uuid::new_v4().simple().to_string().to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_mail_parameters_are_checked() {
        let (m, save) = parse_send_mail_json(
            br#"{"message":{"toRecipients":[{"emailAddress":{"address":"a@b.co"}}]},"saveToSentItems":false}"#,
        )
        .expect("ok");
        assert!(!save);
        assert_eq!(m.to.len(), 1);
        let err = parse_send_mail_json(br#"{"message":{},"extra":1}"#).err();
        assert_eq!(err.map(|e| e.code), Some("RequestBodyRead".into()));
        let err = parse_send_mail_json(br#"{"saveToSentItems":true}"#).err();
        assert_eq!(err.map(|e| e.code), Some("ErrorInvalidParameter".into()));
    }
}
