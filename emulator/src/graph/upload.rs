//! Upload sessions for attachments of 3 MB to 150 MB: `createUploadSession`, then PUTs of
//! byte ranges to the session URL (which needs no Authorization header).

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::auth::{self, Caller, Permission};
use super::errors::GraphError;
use super::message::{self, MAX_REQUEST_BYTES};
use super::send_mail::read_body;
use crate::apps::hex_lower;
use crate::clock;
use crate::origin::request_origin;
use crate::records::RecordedAttachment;
use crate::state::AppState;

/// Smallest attachment an upload session takes (smaller ones are POSTed whole).
pub const MIN_ATTACHMENT_BYTES: u64 = 3 * 1024 * 1024;
/// Largest attachment an upload session takes.
pub const MAX_ATTACHMENT_BYTES: u64 = 150 * 1024 * 1024;
/// Largest byte range one PUT may carry (Outlook attachments: up to 4 MB per request).
pub const MAX_FRAGMENT_BYTES: u64 = 4 * 1024 * 1024;
/// Every fragment but the last is a multiple of this.
pub const FRAGMENT_UNIT_BYTES: u64 = 320 * 1024;
/// How long a session stays valid after its last use.
const SESSION_LIFETIME_SECONDS: i64 = 3600;

/// An upload in progress. Only a running digest is kept, never the bytes.
#[derive(Debug, Clone)]
pub struct UploadSession {
    /// Session id (the capability in the upload URL).
    pub id: String,
    /// The draft the attachment goes to.
    pub draft_id: String,
    /// The draft's mailbox, lower case.
    pub mailbox: String,
    /// File name.
    pub name: String,
    /// MIME type.
    pub content_type: Option<String>,
    /// Inline attachment.
    pub is_inline: bool,
    /// Declared size.
    pub size: u64,
    /// Bytes received so far.
    pub received: u64,
    /// Digest of the bytes received so far.
    pub hasher: Sha256,
    /// Expiry (Unix time).
    pub expires: i64,
}

/// A parsed `Content-Range: bytes first-last/total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    /// First byte offset.
    pub first: u64,
    /// Last byte offset (inclusive).
    pub last: u64,
    /// Total size.
    pub total: u64,
}

/// Reads a `Content-Range` header value.
pub fn parse_content_range(value: &str) -> Option<ContentRange> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let range = ContentRange {
        first: first.trim().parse().ok()?,
        last: last.trim().parse().ok()?,
        total: total.trim().parse().ok()?,
    };
    (range.first <= range.last && range.last < range.total).then_some(range)
}

fn range_error(message: impl Into<String>) -> GraphError {
    GraphError::bad_request("InvalidContentRange", message)
}

/// Checks one fragment against the session's size and progress.
pub fn check_fragment(range: ContentRange, content_length: u64, size: u64, received: u64) -> Result<(), GraphError> {
    let len = range.last - range.first + 1;
    if range.total != size {
        return Err(range_error(format!(
            "The total size {} in Content-Range does not match the attachment size {size} of the upload session.",
            range.total
        )));
    }
    if range.first != received {
        return Err(GraphError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "InvalidRange",
            format!("The fragment starts at byte {} but the next expected range is '{received}-'.", range.first),
        ));
    }
    if content_length != len {
        return Err(range_error(format!(
            "Content-Length {content_length} does not match the {len} bytes of Content-Range."
        )));
    }
    if len > MAX_FRAGMENT_BYTES {
        return Err(GraphError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "ErrorRequestEntityTooLarge",
            format!("A fragment may carry at most {MAX_FRAGMENT_BYTES} bytes; this one has {len}."),
        ));
    }
    let is_last = range.last + 1 == size;
    if !is_last && !len.is_multiple_of(FRAGMENT_UNIT_BYTES) {
        return Err(range_error(format!(
            "Every fragment but the last must be a multiple of {FRAGMENT_UNIT_BYTES} bytes (320 KiB); this one has {len}."
        )));
    }
    Ok(())
}

/// createUploadSession: 201 with the upload URL.
pub async fn create_session(
    State(state): State<AppState>,
    Path((sender, draft_id)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Result<Response, GraphError> {
    auth::authorize(&state, &caller, Permission::MailReadWrite, &sender)?;
    let mailbox = sender.to_ascii_lowercase();
    let exists = state.lock().drafts.get(&draft_id).is_some_and(|d| d.mailbox == mailbox);
    if !exists {
        return Err(GraphError::item_not_found());
    }
    let bytes = read_body(&headers, body, MAX_REQUEST_BYTES).await?;
    let obj = message::json_object(&bytes)?;
    let item = match message::field(&obj, "AttachmentItem") {
        Some(Value::Object(item)) => item,
        _ => {
            return Err(GraphError::bad_request(
                "ErrorInvalidParameter",
                "The value of the parameter 'AttachmentItem' is empty.",
            ));
        }
    };
    message::reject_unknown(
        item,
        &["attachmentType", "name", "size", "contentType", "isInline", "contentId"],
        "microsoft.graph.attachmentItem",
    )?;
    let kind = message::field(item, "attachmentType").and_then(Value::as_str);
    if !kind.is_some_and(|k| k.eq_ignore_ascii_case("file")) {
        return Err(GraphError::bad_request(
            "ErrorInvalidParameter",
            "Only attachmentType 'file' can be uploaded in a session.",
        ));
    }
    let name = message::field(item, "name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| GraphError::bad_request("ErrorInvalidParameter", "The attachment name is missing."))?;
    let size = message::field(item, "size")
        .and_then(Value::as_u64)
        .ok_or_else(|| GraphError::bad_request("ErrorInvalidParameter", "The attachment size is missing."))?;
    if size < MIN_ATTACHMENT_BYTES {
        return Err(GraphError::bad_request(
            "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
            "Attachment size must be greater than the minimum size.",
        ));
    }
    if size > MAX_ATTACHMENT_BYTES {
        return Err(GraphError::bad_request(
            "ErrorAttachmentSizeLimitExceeded",
            format!("The attachment size {size} exceeds the maximum of {MAX_ATTACHMENT_BYTES} bytes."),
        ));
    }
    let session = UploadSession {
        id: uuid::Uuid::new_v4().simple().to_string(),
        draft_id,
        mailbox,
        name: name.to_string(),
        content_type: message::field(item, "contentType").and_then(Value::as_str).map(str::to_string),
        is_inline: message::field(item, "isInline").and_then(Value::as_bool).unwrap_or(false),
        size,
        received: 0,
        hasher: Sha256::new(),
        expires: clock::now_unix() + SESSION_LIFETIME_SECONDS,
    };
    let origin = request_origin(&headers, &uri, &state.settings.base_url);
    let body = serde_json::json!({
        "@odata.context": format!("{origin}/v1.0/$metadata#microsoft.graph.uploadSession"),
        "uploadUrl": format!("{origin}/_upload/{}", session.id),
        "expirationDateTime": clock::rfc3339(session.expires),
        "nextExpectedRanges": ["0-"],
    });
    state.lock().uploads.insert(session.id.clone(), session);
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

fn session_not_found() -> GraphError {
    GraphError::new(StatusCode::NOT_FOUND, "ErrorItemNotFound", "The upload session was not found or has expired.")
}

/// Takes a live session, dropping it if it has expired.
fn live_session(state: &AppState, id: &str, now: i64) -> Result<UploadSession, GraphError> {
    let mut inner = state.lock();
    match inner.uploads.get(id) {
        Some(s) if s.expires >= now => Ok(s.clone()),
        Some(_) => {
            inner.uploads.remove(id);
            Err(session_not_found())
        }
        None => Err(session_not_found()),
    }
}

/// PUT of one byte range: 200 with the next expected range, or 201 when complete.
pub async fn put_fragment(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Result<Response, GraphError> {
    let now = clock::now_unix();
    let session = live_session(&state, &id, now)?;
    let range = headers
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_content_range)
        .ok_or_else(|| range_error("A valid 'Content-Range: bytes first-last/total' header is required."))?;
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| {
            GraphError::new(StatusCode::LENGTH_REQUIRED, "LengthRequired", "A Content-Length header is required.")
        })?;
    check_fragment(range, content_length, session.size, session.received)?;
    let limit = usize::try_from(content_length).unwrap_or(usize::MAX);
    let bytes = read_body(&headers, body, limit).await?;
    if bytes.len() as u64 != content_length {
        return Err(range_error("The body is shorter than Content-Length."));
    }

    let mut inner = state.lock();
    let session = inner.uploads.get_mut(&id).ok_or_else(session_not_found)?;
    // Another PUT for the same range may have finished while this body was read.
    check_fragment(range, content_length, session.size, session.received)?;
    session.hasher.update(&bytes);
    session.received += content_length;
    session.expires = now + SESSION_LIFETIME_SECONDS;
    if session.received < session.size {
        let body = serde_json::json!({
            "expirationDateTime": clock::rfc3339(session.expires),
            "nextExpectedRanges": [format!("{}-", session.received)],
        });
        return Ok((StatusCode::OK, axum::Json(body)).into_response());
    }

    let Some(session) = inner.uploads.remove(&id) else {
        return Err(session_not_found());
    };
    let draft = inner.drafts.get_mut(&session.draft_id).ok_or_else(GraphError::item_not_found)?;
    draft.message.attachments.push(RecordedAttachment {
        name: session.name.clone(),
        size: session.size,
        sha256: hex_lower(&session.hasher.finalize()),
        content_type: session.content_type.clone(),
        is_inline: session.is_inline,
    });
    drop(inner);
    let origin = request_origin(&headers, &uri, &state.settings.base_url);
    let location = format!(
        "{origin}/v1.0/users('{}')/messages('{}')/attachments('{}')",
        session.mailbox,
        session.draft_id,
        uuid::Uuid::new_v4().simple()
    );
    let mut response = StatusCode::CREATED.into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

/// DELETE of the upload URL cancels the session.
pub async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, GraphError> {
    match state.lock().uploads.remove(&id) {
        Some(_) => Ok(StatusCode::NO_CONTENT),
        None => Err(session_not_found()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_parse() {
        assert_eq!(
            parse_content_range("bytes 0-327679/5000000"),
            Some(ContentRange { first: 0, last: 327_679, total: 5_000_000 })
        );
        assert_eq!(parse_content_range("bytes 10-5/20"), None);
        assert_eq!(parse_content_range("bytes 0-20/20"), None);
        assert_eq!(parse_content_range("0-1/2"), None);
    }

    #[test]
    fn fragments_follow_the_rules() {
        let size = 5_000_000;
        let unit = FRAGMENT_UNIT_BYTES;
        let r = |first: u64, last: u64| ContentRange { first, last, total: size };
        assert!(check_fragment(r(0, 10 * unit - 1), 10 * unit, size, 0).is_ok());
        assert!(check_fragment(r(10 * unit, size - 1), size - 10 * unit, size, 10 * unit).is_ok());
        let code = |res: Result<(), GraphError>| res.err().map(|e| e.status.as_u16());
        assert_eq!(code(check_fragment(r(0, 1000), 1001, size, 0)), Some(400));
        assert_eq!(code(check_fragment(r(unit, 2 * unit - 1), unit, size, 0)), Some(416));
        assert_eq!(code(check_fragment(r(0, 13 * unit - 1), 13 * unit, size, 0)), Some(413));
        assert_eq!(code(check_fragment(r(0, unit - 1), unit + 1, size, 0)), Some(400));
        let other_total = ContentRange { first: 0, last: unit - 1, total: size + 1 };
        assert_eq!(code(check_fragment(other_total, unit, size, 0)), Some(400));
    }
}
