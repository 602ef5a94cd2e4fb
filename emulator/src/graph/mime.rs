//! sendMail in MIME format: a base64-encoded RFC 5322 message in a `text/plain` body.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use mail_parser::{Address, MessageParser, MimeHeaders};
use sha2::{Digest, Sha256};

use super::errors::GraphError;
use super::message::ParsedMessage;
use crate::apps::hex_lower;
use crate::records::{RecordedAddress, RecordedAttachment, RecordedHeader};

/// Graph's answer to MIME content that is malformed or missing: one code and message for all of
/// it, base64 or MIME. "If the request body includes malformed MIME content, this method returns
/// 400 Bad request and the following error message: "Invalid base64 string for MIME content.""
/// with `"code": "ErrorMimeContentInvalidBase64String"`
/// (https://learn.microsoft.com/graph/api/user-sendmail, example 4), and "MIME content
/// malformed, missing | POST, PUT | 400 | Invalid base64 string for MIME content."
/// (https://learn.microsoft.com/graph/outlook-send-mime-message, Error conditions and messages).
fn malformed() -> GraphError {
    GraphError::bad_request("ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.")
}

/// Decodes and reads a MIME sendMail body.
pub fn parse_mime(body: &[u8]) -> Result<ParsedMessage, GraphError> {
    let compact: Vec<u8> = body.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
    if compact.is_empty() {
        return Err(malformed());
    }
    let raw = STANDARD.decode(&compact).map_err(|_| malformed())?;
    // Decoded, it must be a message: a header section whose first line is a field.
    if !starts_with_field(&raw) {
        return Err(malformed());
    }
    let message = MessageParser::default().parse(&raw).filter(|m| !m.headers().is_empty()).ok_or_else(malformed)?;

    let (body_content_type, body) = match message.body_html(0) {
        Some(html) if message.html_body_count() > 0 && message.text_body_count() == 0 => {
            ("html".to_string(), html.into_owned())
        }
        _ => ("text".to_string(), message.body_text(0).map(|t| t.into_owned()).unwrap_or_default()),
    };
    let headers = message
        .headers_raw()
        .filter(|(name, _)| name.starts_with("X-") || name.starts_with("x-"))
        .map(|(name, value)| RecordedHeader { name: name.to_string(), value: unfold(value) })
        .collect();
    let importance = message
        .header_raw("Importance")
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| ["low", "normal", "high"].contains(&v.as_str()))
        .unwrap_or_else(|| "normal".into());
    let attachments = message
        .attachments()
        .map(|part| {
            let contents = part.contents();
            RecordedAttachment {
                name: part.attachment_name().unwrap_or("attachment").to_string(),
                size: contents.len() as u64,
                sha256: hex_lower(&Sha256::digest(contents)),
                content_type: part.content_type().map(|ct| match ct.subtype() {
                    Some(sub) => format!("{}/{}", ct.ctype(), sub),
                    None => ct.ctype().to_string(),
                }),
                is_inline: part.content_disposition().is_some_and(|d| d.ctype().eq_ignore_ascii_case("inline")),
            }
        })
        .collect();
    Ok(ParsedMessage {
        subject: message.subject().unwrap_or_default().to_string(),
        body_content_type,
        body,
        from: message.from().and_then(|a| addresses(Some(a)).into_iter().next()),
        to: addresses(message.to()),
        cc: addresses(message.cc()),
        bcc: addresses(message.bcc()),
        reply_to: addresses(message.reply_to()),
        importance,
        headers,
        internet_message_id: message.message_id().map(|id| format!("<{id}>")),
        attachments,
    })
}

/// Whether the content begins with a header field: a name of printable ASCII and a colon.
fn starts_with_field(raw: &[u8]) -> bool {
    let line = raw.split(|&b| b == b'\n').next().unwrap_or_default();
    match line.iter().position(|&b| b == b':') {
        Some(colon) => colon > 0 && line[..colon].iter().all(|&b| (33..=126).contains(&b)),
        None => false,
    }
}

fn addresses(list: Option<&Address<'_>>) -> Vec<RecordedAddress> {
    list.map(|a| {
        a.iter()
            .filter_map(|addr| {
                Some(RecordedAddress { address: addr.address()?.to_string(), name: addr.name().map(str::to_string) })
            })
            .collect()
    })
    .unwrap_or_default()
}

/// Undoes header folding.
fn unfold(value: &str) -> String {
    value
        .split("\r\n")
        .flat_map(|l| l.split('\n'))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIME: &str = "From: Alerts <alerts@contoso.com>\r\nTo: Ops <ops@contoso.com>\r\nBcc: audit@contoso.com\r\nSubject: Deploy\r\nMessage-ID: <abc@mailroom.dev>\r\nX-Pipeline-Run: 1234\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nHello\r\n--b\r\nContent-Type: text/csv\r\nContent-Disposition: attachment; filename=r.csv\r\nContent-Transfer-Encoding: base64\r\n\r\naGVsbG8K\r\n--b--\r\n";

    #[test]
    fn a_mime_message_is_read() {
        let m = parse_mime(STANDARD.encode(MIME).as_bytes()).expect("mime");
        assert_eq!(m.subject, "Deploy");
        assert_eq!(m.to[0].address, "ops@contoso.com");
        assert_eq!(m.bcc[0].address, "audit@contoso.com");
        assert_eq!(m.internet_message_id.as_deref(), Some("<abc@mailroom.dev>"));
        assert_eq!(m.headers[0].name, "X-Pipeline-Run");
        assert_eq!(m.headers[0].value, "1234");
        assert_eq!(m.attachments[0].name, "r.csv");
        assert_eq!(m.attachments[0].size, 6);
        assert_eq!(m.body.trim(), "Hello");
    }

    #[test]
    fn bad_base64_is_refused() {
        assert_eq!(
            parse_mime(b"not base64!").err().map(|e| e.code),
            Some("ErrorMimeContentInvalidBase64String".into())
        );
    }

    #[test]
    fn base64_of_something_that_is_no_message_is_refused_with_the_same_code() {
        for content in ["just some text, no header\r\n", "\r\nbody only\r\n", ": no name\r\n\r\nx"] {
            let e = parse_mime(STANDARD.encode(content).as_bytes()).err();
            assert_eq!(e.map(|e| e.code), Some("ErrorMimeContentInvalidBase64String".into()), "{content:?}");
        }
    }
}
