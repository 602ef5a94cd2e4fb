//! Graph's `message` resource as sendMail and drafts accept it, validated as Graph does.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::errors::GraphError;
use crate::apps::hex_lower;
use crate::records::{RecordedAddress, RecordedAttachment, RecordedHeader};

/// Graph's limit on a request body (sendMail JSON or MIME, message creation).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Graph's limit on custom internet message headers per message.
pub const MAX_CUSTOM_HEADERS: usize = 5;

/// The properties of `microsoft.graph.message` a client may send.
const MESSAGE_PROPERTIES: &[&str] = &[
    "attachments",
    "bccRecipients",
    "body",
    "categories",
    "ccRecipients",
    "conversationId",
    "extensions",
    "flag",
    "from",
    "importance",
    "inferenceClassification",
    "internetMessageHeaders",
    "internetMessageId",
    "isDeliveryReceiptRequested",
    "isDraft",
    "isRead",
    "isReadReceiptRequested",
    "mentions",
    "multiValueExtendedProperties",
    "replyTo",
    "sender",
    "singleValueExtendedProperties",
    "subject",
    "toRecipients",
    "uniqueBody",
];

/// A message after validation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedMessage {
    /// Subject.
    pub subject: String,
    /// `text` or `html`.
    pub body_content_type: String,
    /// Body content.
    pub body: String,
    /// From, if set.
    pub from: Option<RecordedAddress>,
    /// To.
    pub to: Vec<RecordedAddress>,
    /// Cc.
    pub cc: Vec<RecordedAddress>,
    /// Bcc.
    pub bcc: Vec<RecordedAddress>,
    /// Reply-To.
    pub reply_to: Vec<RecordedAddress>,
    /// low, normal or high.
    pub importance: String,
    /// Custom headers.
    pub headers: Vec<RecordedHeader>,
    /// internetMessageId, if set.
    pub internet_message_id: Option<String>,
    /// File attachments.
    pub attachments: Vec<RecordedAttachment>,
}

impl ParsedMessage {
    /// Graph refuses to send a message without recipients.
    pub fn require_recipients(&self) -> Result<(), GraphError> {
        if self.to.is_empty() && self.cc.is_empty() && self.bcc.is_empty() {
            return Err(GraphError::bad_request(
                "ErrorInvalidRecipients",
                "At least one recipient is required, but none were found.",
            ));
        }
        Ok(())
    }
}

fn read_error(message: impl Into<String>) -> GraphError {
    GraphError::bad_request("RequestBodyRead", message)
}

/// Parses a JSON request body into an object, with Graph's errors for empty or broken JSON.
pub fn json_object(body: &[u8]) -> Result<Map<String, Value>, GraphError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(GraphError::bad_request("BadRequest", "Empty Payload. JSON content expected."));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(GraphError::bad_request("UnableToDeserializePostBody", "were unable to deserialize ")),
    }
}

/// A property, matched case-insensitively as Graph does; JSON null counts as absent.
pub fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v).filter(|v| !v.is_null())
}

/// Rejects properties the type does not define (annotations such as `@odata.type` pass).
pub fn reject_unknown(obj: &Map<String, Value>, known: &[&str], type_name: &str) -> Result<(), GraphError> {
    for key in obj.keys() {
        if key.contains('@') {
            continue;
        }
        if !known.iter().any(|k| k.eq_ignore_ascii_case(key)) {
            return Err(read_error(format!(
                "The property '{key}' does not exist on type '{type_name}'. Make sure to only use property names that are defined by the type or mark the type as open type."
            )));
        }
    }
    Ok(())
}

fn string_field(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, GraphError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => {
            Err(read_error(format!("Cannot convert the value of property '{name}' to the expected type 'Edm.String'.")))
        }
    }
}

/// Validates a `message` object.
pub fn parse_message(obj: &Map<String, Value>) -> Result<ParsedMessage, GraphError> {
    reject_unknown(obj, MESSAGE_PROPERTIES, "microsoft.graph.message")?;
    let (body_content_type, body) = match field(obj, "body") {
        None => ("text".to_string(), String::new()),
        Some(Value::Object(b)) => {
            reject_unknown(b, &["content", "contentType"], "microsoft.graph.itemBody")?;
            let content_type = enum_field(b, "contentType", &["text", "html"], "microsoft.graph.bodyType")?
                .unwrap_or_else(|| "text".into());
            (content_type, string_field(b, "content")?.unwrap_or_default())
        }
        Some(_) => return Err(read_error("The property 'body' must be a microsoft.graph.itemBody object.")),
    };
    let importance = enum_field(obj, "importance", &["low", "normal", "high"], "microsoft.graph.importance")?
        .unwrap_or_else(|| "normal".into());
    let from = match field(obj, "from") {
        None => None,
        Some(v) => Some(recipient(v)?),
    };
    let internet_message_id = string_field(obj, "internetMessageId")?;
    if let Some(id) = &internet_message_id
        && !is_valid_message_id(id)
    {
        return Err(GraphError::bad_request(
            "ErrorInvalidProperty",
            format!("The value '{id}' of property 'internetMessageId' is not a valid RFC 2822 message identifier."),
        ));
    }
    Ok(ParsedMessage {
        subject: string_field(obj, "subject")?.unwrap_or_default(),
        body_content_type,
        body,
        from,
        to: recipients(obj, "toRecipients")?,
        cc: recipients(obj, "ccRecipients")?,
        bcc: recipients(obj, "bccRecipients")?,
        reply_to: recipients(obj, "replyTo")?,
        importance,
        headers: headers(obj)?,
        internet_message_id,
        attachments: match field(obj, "attachments") {
            None => Vec::new(),
            Some(Value::Array(items)) => items.iter().map(file_attachment).collect::<Result<_, _>>()?,
            Some(_) => return Err(read_error("The property 'attachments' must be a collection.")),
        },
    })
}

fn enum_field(
    obj: &Map<String, Value>,
    name: &str,
    allowed: &[&str],
    type_name: &str,
) -> Result<Option<String>, GraphError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) if allowed.iter().any(|a| a.eq_ignore_ascii_case(s)) => Ok(Some(s.to_ascii_lowercase())),
        Some(v) => Err(read_error(format!(
            "Cannot convert the literal '{}' to the expected type '{type_name}'.",
            v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())
        ))),
    }
}

fn recipients(obj: &Map<String, Value>, name: &str) -> Result<Vec<RecordedAddress>, GraphError> {
    match field(obj, name) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(recipient).collect(),
        Some(_) => Err(read_error(format!("The property '{name}' must be a collection of microsoft.graph.recipient."))),
    }
}

fn invalid_recipient() -> GraphError {
    GraphError::bad_request("ErrorInvalidRecipients", "At least one recipient isn't valid.")
}

fn recipient(v: &Value) -> Result<RecordedAddress, GraphError> {
    let obj = v.as_object().ok_or_else(invalid_recipient)?;
    reject_unknown(obj, &["emailAddress"], "microsoft.graph.recipient")?;
    let email = field(obj, "emailAddress").and_then(Value::as_object).ok_or_else(invalid_recipient)?;
    reject_unknown(email, &["address", "name"], "microsoft.graph.emailAddress")?;
    let address = string_field(email, "address")?.ok_or_else(invalid_recipient)?;
    if !is_valid_address(&address) {
        return Err(invalid_recipient());
    }
    Ok(RecordedAddress { address, name: string_field(email, "name")?.filter(|n| !n.is_empty()) })
}

fn invalid_header(message: String) -> GraphError {
    GraphError::bad_request("InvalidInternetMessageHeader", message)
}

fn headers(obj: &Map<String, Value>) -> Result<Vec<RecordedHeader>, GraphError> {
    let items = match field(obj, "internetMessageHeaders") {
        None => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(read_error("The property 'internetMessageHeaders' must be a collection.")),
    };
    if items.len() > MAX_CUSTOM_HEADERS {
        return Err(invalid_header(format!(
            "Maximum number of headers in one message should be less than or equal to {MAX_CUSTOM_HEADERS}."
        )));
    }
    items
        .iter()
        .map(|item| {
            let h = item.as_object().ok_or_else(|| read_error("An internet message header must be an object."))?;
            reject_unknown(h, &["name", "value"], "microsoft.graph.internetMessageHeader")?;
            let name = string_field(h, "name")?.unwrap_or_default();
            let value = string_field(h, "value")?.unwrap_or_default();
            if !(name.starts_with("X-") || name.starts_with("x-")) {
                return Err(invalid_header(format!(
                    "The internet message header name '{name}' should start with 'x-' or 'X-'."
                )));
            }
            let bad = |s: &str| s.chars().any(|c| c == '\r' || c == '\n' || c == '\0');
            if bad(&name) || bad(&value) || name.contains(':') || name.contains(' ') {
                return Err(invalid_header(format!(
                    "The internet message header '{}' has an invalid name or value.",
                    name.escape_debug()
                )));
            }
            Ok(RecordedHeader { name, value })
        })
        .collect()
}

/// Validates a `#microsoft.graph.fileAttachment` and reduces it to size and digest.
pub fn file_attachment(v: &Value) -> Result<RecordedAttachment, GraphError> {
    let obj = v.as_object().ok_or_else(|| read_error("An attachment must be an object."))?;
    match field(obj, "@odata.type").and_then(Value::as_str) {
        None => return Err(read_error("Cannot create an abstract class.")),
        Some(t) if t.eq_ignore_ascii_case("#microsoft.graph.fileAttachment") => {}
        Some(t) => {
            return Err(GraphError::bad_request(
                "ErrorInvalidAttachmentType",
                format!("The attachment type '{t}' is not supported; use #microsoft.graph.fileAttachment."),
            ));
        }
    }
    reject_unknown(
        obj,
        &[
            "name",
            "contentType",
            "contentBytes",
            "contentId",
            "contentLocation",
            "isInline",
            "size",
            "id",
            "lastModifiedDateTime",
        ],
        "microsoft.graph.fileAttachment",
    )?;
    let name = string_field(obj, "name")?
        .filter(|n| !n.is_empty())
        .ok_or_else(|| GraphError::bad_request("ErrorInvalidParameter", "The attachment name is missing."))?;
    let encoded = string_field(obj, "contentBytes")?.ok_or_else(|| {
        GraphError::bad_request("ErrorInvalidParameter", "The attachment content (contentBytes) is missing.")
    })?;
    let bytes = STANDARD
        .decode(encoded.as_bytes())
        .map_err(|_| read_error("Cannot convert a primitive value to the expected type 'Edm.Binary'. See the inner exception for more details."))?;
    let is_inline = match field(obj, "isInline") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(read_error(
                "Cannot convert the value of property 'isInline' to the expected type 'Edm.Boolean'.",
            ));
        }
    };
    Ok(RecordedAttachment {
        name,
        size: bytes.len() as u64,
        sha256: hex_lower(&Sha256::digest(&bytes)),
        content_type: string_field(obj, "contentType")?,
        is_inline,
    })
}

/// A plausible SMTP address: `local@domain.tld`, no spaces or controls.
pub fn is_valid_address(s: &str) -> bool {
    let Some((local, domain)) = s.rsplit_once('@') else {
        return false;
    };
    let bad_char = |c: char| c.is_whitespace() || c.is_control() || "<>()[],;:\\\"".contains(c);
    !local.is_empty()
        && local.len() <= 64
        && !local.chars().any(|c| c.is_whitespace() || c.is_control() || c == '@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && !domain.chars().any(bad_char)
}

/// `<left@right>` with no spaces.
pub fn is_valid_message_id(id: &str) -> bool {
    id.len() > 4
        && id.starts_with('<')
        && id.ends_with('>')
        && id[1..id.len() - 1].contains('@')
        && !id.chars().any(|c| c.is_whitespace() || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ParsedMessage, GraphError> {
        parse_message(v.as_object().expect("object"))
    }

    fn code(v: Value) -> String {
        parse(v).err().map(|e| e.code).unwrap_or_default()
    }

    #[test]
    fn a_full_message_parses() {
        let m = parse(json!({
            "subject": "Hi", "body": {"contentType": "HTML", "content": "<p>x</p>"},
            "toRecipients": [{"emailAddress": {"address": "a@contoso.com", "name": "A"}}],
            "bccRecipients": [{"emailAddress": {"address": "b@contoso.com"}}],
            "importance": "High",
            "internetMessageHeaders": [{"name": "X-Run", "value": "1"}],
            "internetMessageId": "<1@contoso.com>",
            "attachments": [{"@odata.type": "#microsoft.graph.fileAttachment", "name": "h.txt",
                             "contentType": "text/plain", "contentBytes": "aGVsbG8K"}]
        }))
        .expect("message");
        assert_eq!(m.body_content_type, "html");
        assert_eq!(m.importance, "high");
        assert_eq!(m.to[0].name.as_deref(), Some("A"));
        assert_eq!(m.attachments[0].size, 6);
        assert_eq!(m.attachments[0].sha256, "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03");
        assert!(m.require_recipients().is_ok());
    }

    #[test]
    fn graph_rejects_what_graph_rejects() {
        assert!(parse(json!({"subject": "x"})).expect("ok").require_recipients().is_err());
        assert_eq!(code(json!({"toRecipients": [{"emailAddress": {"address": "nope"}}]})), "ErrorInvalidRecipients");
        assert_eq!(
            code(json!({"internetMessageHeaders": [{"name": "Subject", "value": "x"}]})),
            "InvalidInternetMessageHeader"
        );
        let six: Vec<Value> = (0..6).map(|i| json!({"name": format!("X-{i}"), "value": "v"})).collect();
        assert_eq!(code(json!({"internetMessageHeaders": six})), "InvalidInternetMessageHeader");
        assert_eq!(
            code(json!({"internetMessageHeaders": [{"name": "X-A", "value": "a\r\nBcc: x"}]})),
            "InvalidInternetMessageHeader"
        );
        assert_eq!(code(json!({"toRecipient": []})), "RequestBodyRead");
        assert_eq!(code(json!({"body": {"contentType": "markdown"}})), "RequestBodyRead");
        assert_eq!(code(json!({"attachments": [{"name": "a", "contentBytes": "aGk="}]})), "RequestBodyRead");
        assert_eq!(
            code(
                json!({"attachments": [{"@odata.type": "#microsoft.graph.fileAttachment", "name": "a", "contentBytes": "!!"}]})
            ),
            "RequestBodyRead"
        );
    }

    #[test]
    fn property_names_are_case_insensitive() {
        let m = parse(json!({"ToRecipients": [{"EmailAddress": {"Address": "a@b.co"}}]})).expect("ok");
        assert_eq!(m.to[0].address, "a@b.co");
    }

    #[test]
    fn addresses_and_message_ids() {
        assert!(is_valid_address("ops@contoso.com"));
        assert!(!is_valid_address("ops@contoso"));
        assert!(!is_valid_address("o ps@contoso.com"));
        assert!(!is_valid_address("ops@con toso.com"));
        assert!(is_valid_message_id("<a.b@c>"));
        assert!(!is_valid_message_id("a@b"));
    }

    #[test]
    fn empty_and_broken_bodies() {
        assert_eq!(json_object(b" ").err().map(|e| e.code), Some("BadRequest".into()));
        assert_eq!(json_object(b"{").err().map(|e| e.code), Some("UnableToDeserializePostBody".into()));
    }
}
