//! Building the RFC 5322 message of an [`OutgoingMessage`].
//!
//! The structure is fixed: text only is `text/plain`, HTML only is `text/html`, both are
//! `multipart/alternative` (text first, so clients that prefer the last part show HTML), and
//! attachments wrap that body in `multipart/mixed`. lettre does the encoding: RFC 2047 for
//! UTF-8 subjects and display names, RFC 2231 for non-ASCII file names, quoted-printable or
//! base64 for bodies. Everything a user wrote into a header is validated again here, because
//! the transport must not depend on the CRD schema having run.

use std::borrow::Cow;
use std::collections::HashSet;

use lettre::Message;
use lettre::address::Envelope;
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Attachment, MultiPart, SinglePart};

use super::Importance;
use super::address::is_invisible_format;
use super::{AddressError, OutgoingMessage};

/// Header names mailroom sets itself; a custom header may not replace them.
const RESERVED_HEADERS: &[&str] = &["X-Priority"];
/// lettre's limit on a header name.
const MAX_HEADER_NAME_LEN: usize = 76;

/// Why a message cannot be turned into MIME. Retrying cannot help: the input must change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MimeError {
    /// A sender or recipient mailbox is not valid.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The message has neither a text nor an HTML body.
    #[error("the message has no body: set body.text, body.html or both")]
    NoBody,
    /// No recipient in to, cc or bcc.
    #[error("the message has no recipients: set at least one of to, cc or bcc")]
    NoRecipients,
    /// The subject would break the header block.
    #[error("the subject contains a line break, NUL or another control character")]
    Subject,
    /// A custom header name is not an `X-` header of RFC 5322 field-name characters.
    #[error(
        "header name {0:?} is not allowed: custom headers are X- headers made of letters, digits and -, such as X-Pipeline-Run"
    )]
    HeaderName(String),
    /// A custom header value would break the header block.
    #[error("the value of header {0} contains a line break, NUL or another control character")]
    HeaderValue(String),
    /// A custom header that mailroom sets itself.
    #[error("header {0} is set from spec.importance; set importance: low, normal or high instead")]
    ReservedHeader(String),
    /// The same custom header twice (names compare case-insensitively).
    #[error("header {0} is given more than once (header names are case-insensitive)")]
    DuplicateHeader(String),
    /// The Message-ID is not `<id@domain>`.
    #[error("Message-ID {0:?} is not of the form <id@domain>")]
    MessageId(String),
    /// An attachment's file name would break its header.
    #[error("attachment name {0:?} is empty or contains a control or invisible formatting character")]
    AttachmentName(String),
    /// An attachment's content type is not a MIME type.
    #[error("attachment {name:?}: content type {content_type:?} is not a MIME type such as text/csv")]
    ContentType {
        /// The attachment's file name.
        name: String,
        /// The rejected content type.
        content_type: String,
    },
    /// lettre refused the message.
    #[error("the message cannot be built: {0}")]
    Build(String),
}

/// Builds the message: headers, body structure and the SMTP envelope (from; to + cc + bcc).
/// Bcc recipients are on the envelope only, in no header.
pub fn build(msg: &OutgoingMessage) -> Result<Message, MimeError> {
    let body = body_part(msg)?;
    let mut builder = Message::builder()
        .from(msg.from.to_lettre()?)
        .subject(checked_subject(&msg.subject)?)
        .message_id(Some(checked_message_id(&msg.message_id)?))
        .date_now()
        .envelope(envelope(msg)?);
    for to in &msg.to {
        builder = builder.to(to.to_lettre()?);
    }
    for cc in &msg.cc {
        builder = builder.cc(cc.to_lettre()?);
    }
    for reply_to in &msg.reply_to {
        builder = builder.reply_to(reply_to.to_lettre()?);
    }
    for header in custom_headers(&msg.headers)? {
        builder = builder.raw_header(header);
    }
    for header in importance_headers(msg.importance) {
        builder = builder.raw_header(header);
    }
    let message = match body {
        Body::Single(part) => builder.singlepart(part),
        Body::Multi(part) => builder.multipart(part),
    };
    message.map_err(|e| MimeError::Build(e.to_string()))
}

/// The formatted RFC 5322 bytes of [`build`]'s message (CRLF line endings, 7-bit safe).
pub fn build_bytes(msg: &OutgoingMessage) -> Result<Vec<u8>, MimeError> {
    Ok(build(msg)?.formatted())
}

/// The SMTP envelope: the sender, and every recipient once (to, cc, bcc, in that order).
pub fn envelope(msg: &OutgoingMessage) -> Result<Envelope, MimeError> {
    let mut seen = HashSet::new();
    let mut recipients = Vec::new();
    for address in msg.envelope_recipients() {
        if seen.insert(address.email.to_ascii_lowercase()) {
            recipients.push(address.to_lettre_address()?);
        }
    }
    if recipients.is_empty() {
        return Err(MimeError::NoRecipients);
    }
    Envelope::new(Some(msg.from.to_lettre_address()?), recipients).map_err(|e| MimeError::Build(e.to_string()))
}

enum Body {
    Single(SinglePart),
    Multi(MultiPart),
}

/// The body structure this message needs.
fn body_part(msg: &OutgoingMessage) -> Result<Body, MimeError> {
    let content = match (&msg.text, &msg.html) {
        (Some(text), None) => Body::Single(SinglePart::plain(text.clone())),
        (None, Some(html)) => Body::Single(SinglePart::html(html.clone())),
        (Some(text), Some(html)) => Body::Multi(MultiPart::alternative_plain_html(text.clone(), html.clone())),
        (None, None) => return Err(MimeError::NoBody),
    };
    if msg.attachments.is_empty() {
        return Ok(content);
    }
    let mut mixed = match content {
        Body::Single(part) => MultiPart::mixed().singlepart(part),
        Body::Multi(part) => MultiPart::mixed().multipart(part),
    };
    for attachment in &msg.attachments {
        let name = &attachment.name;
        if name.trim().is_empty() || name.chars().any(|c| c.is_control() || is_invisible_format(c)) {
            return Err(MimeError::AttachmentName(name.clone()));
        }
        let labelled = labelled_content_type(&attachment.content_type, &attachment.bytes);
        let content_type = attachment_content_type(name, &labelled)?;
        mixed = mixed.singlepart(Attachment::new(name.clone()).body(attachment.bytes.clone(), content_type));
    }
    Ok(Body::Multi(mixed))
}

/// The content type an attachment goes out with: a `text/*` type without a `charset` parameter
/// gets `charset=utf-8` when its bytes are UTF-8 (text from a ConfigMap, a Secret or inline
/// data usually is). Without a charset a reader assumes US-ASCII (RFC 2046 section 4.1.2) and
/// shows every non-ASCII character as garbage. An explicit charset is kept, and bytes that are
/// not UTF-8 are not labelled as such; anything that does not parse is left for
/// [`attachment_content_type`] to refuse.
pub fn labelled_content_type<'a>(content_type: &'a str, bytes: &[u8]) -> Cow<'a, str> {
    let given = content_type.trim();
    let Ok(parsed) = given.parse::<mime_guess::mime::Mime>() else {
        return Cow::Borrowed(content_type);
    };
    if parsed.type_() != mime_guess::mime::TEXT
        || parsed.get_param(mime_guess::mime::CHARSET).is_some()
        || std::str::from_utf8(bytes).is_err()
    {
        return Cow::Borrowed(content_type);
    }
    let base = given.trim_end_matches(|c: char| c == ';' || c.is_ascii_whitespace());
    let labelled = format!("{base}; charset=utf-8");
    match labelled.parse::<mime_guess::mime::Mime>() {
        Ok(_) => Cow::Owned(labelled),
        Err(_) => Cow::Borrowed(content_type),
    }
}

/// Parses an attachment's content type; empty means `application/octet-stream`.
pub fn attachment_content_type(name: &str, value: &str) -> Result<ContentType, MimeError> {
    let value = value.trim();
    let value = if value.is_empty() { "application/octet-stream" } else { value };
    let invalid = || MimeError::ContentType { name: name.to_string(), content_type: value.to_string() };
    if has_control(value) || !value.is_ascii() {
        return Err(invalid());
    }
    ContentType::parse(value).map_err(|_| invalid())
}

fn checked_subject(subject: &str) -> Result<String, MimeError> {
    if has_control(subject) {
        return Err(MimeError::Subject);
    }
    Ok(subject.to_string())
}

/// Accepts `<left@right>` with printable ASCII and no spaces, brackets or second `@` inside.
fn checked_message_id(id: &str) -> Result<String, MimeError> {
    let invalid = || MimeError::MessageId(id.to_string());
    let inner = id.strip_prefix('<').and_then(|s| s.strip_suffix('>')).ok_or_else(invalid)?;
    let (left, right) = inner.split_once('@').ok_or_else(invalid)?;
    let printable = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && !b"<>@\"\\[]".contains(&b));
    if printable(left) && printable(right) && id.len() <= 250 { Ok(id.to_string()) } else { Err(invalid()) }
}

/// Validates the custom headers and encodes their values (RFC 2047 for non-ASCII), in order.
pub fn custom_headers(headers: &[(String, String)]) -> Result<Vec<HeaderValue>, MimeError> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        if !is_custom_header_name(name) {
            return Err(MimeError::HeaderName(name.clone()));
        }
        if RESERVED_HEADERS.iter().any(|reserved| reserved.eq_ignore_ascii_case(name)) {
            return Err(MimeError::ReservedHeader(name.clone()));
        }
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err(MimeError::DuplicateHeader(name.clone()));
        }
        if has_control(value) {
            return Err(MimeError::HeaderValue(name.clone()));
        }
        let header_name = HeaderName::new_from_ascii(name.clone()).map_err(|_| MimeError::HeaderName(name.clone()))?;
        out.push(HeaderValue::new(header_name, value.clone()));
    }
    Ok(out)
}

/// `^[Xx]-[A-Za-z0-9!#$%&'*+.^_`|~-]+$`, at most 76 characters (lettre's limit).
pub fn is_custom_header_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("X-").or_else(|| name.strip_prefix("x-")) else {
        return false;
    };
    name.len() <= MAX_HEADER_NAME_LEN
        && !rest.is_empty()
        && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+.^_`|~-".contains(&b))
}

/// `Importance` (RFC 2156, read by Outlook) and `X-Priority` (read by most other clients).
pub fn importance_headers(importance: Importance) -> [HeaderValue; 2] {
    let (word, priority) = match importance {
        Importance::Low => ("low", "5"),
        Importance::Normal => ("normal", "3"),
        Importance::High => ("high", "1"),
    };
    [
        HeaderValue::new(HeaderName::new_from_ascii_str("Importance"), word.to_string()),
        HeaderValue::new(HeaderName::new_from_ascii_str("X-Priority"), priority.to_string()),
    ]
}

/// CR, LF and NUL could start a new header line; no other control character (tab aside) is
/// allowed in an unstructured header by RFC 5322, and U+2028/U+2029 are line breaks to some readers.
pub fn has_control(s: &str) -> bool {
    s.chars().any(|c| (c.is_control() && c != '\t') || c == '\u{2028}' || c == '\u{2029}')
}

#[cfg(test)]
mod tests {
    use mail_parser::{MessageParser, MimeHeaders};

    use super::*;
    use crate::transport::{Address, AttachmentData, parse_mailbox};

    fn addr(s: &str) -> Address {
        parse_mailbox(s).unwrap()
    }

    fn message() -> OutgoingMessage {
        OutgoingMessage {
            from: addr("Alerts Bot <alerts@contoso.com>"),
            to: vec![addr("Ops Team <ops@contoso.com>"), addr("dev@contoso.com")],
            cc: vec![addr(r#""Doe, Jane" <jane@contoso.com>"#)],
            bcc: vec![addr("audit@contoso.com")],
            reply_to: vec![addr("Zoë Çelik <zoe@contoso.com>")],
            subject: "Deploy finished ✅ — café déjà vu".into(),
            text: Some("Version 1.4.2 is live.\nNaïve café ☕\n".into()),
            html: Some("<p>Version <b>1.4.2</b> is live. Crème brûlée 🍮</p>".into()),
            attachments: vec![],
            headers: vec![
                ("X-Pipeline-Run".into(), "1234".into()),
                ("x-team".into(), "Équipe Ops".into()),
                ("X-A".into(), "first".into()),
            ],
            importance: Importance::High,
            message_id: "<3f1c0b9e-uid@mailroom.dev>".into(),
        }
    }

    fn parse(bytes: &[u8]) -> mail_parser::Message<'_> {
        MessageParser::default().parse(bytes).expect("the built message parses")
    }

    fn emails(list: Option<&mail_parser::Address<'_>>) -> Vec<String> {
        list.map(|a| a.iter().filter_map(|a| a.address().map(str::to_string)).collect()).unwrap_or_default()
    }

    fn header_block(bytes: &[u8]) -> String {
        let text = String::from_utf8_lossy(bytes);
        text.split("\r\n\r\n").next().unwrap_or_default().to_string()
    }

    #[test]
    fn headers_recipients_and_no_bcc() {
        let bytes = build_bytes(&message()).unwrap();
        assert!(bytes.is_ascii(), "lettre encodes everything to 7-bit");
        let parsed = parse(&bytes);

        let from = parsed.from().and_then(|a| a.first()).unwrap();
        assert_eq!(from.address(), Some("alerts@contoso.com"));
        assert_eq!(from.name(), Some("Alerts Bot"));
        assert_eq!(emails(parsed.to()), vec!["ops@contoso.com", "dev@contoso.com"]);
        let to_names: Vec<_> = parsed.to().unwrap().iter().map(|a| a.name().map(str::to_string)).collect();
        assert_eq!(to_names, vec![Some("Ops Team".to_string()), None]);
        let cc = parsed.cc().and_then(|a| a.first()).unwrap();
        assert_eq!(cc.address(), Some("jane@contoso.com"));
        assert_eq!(cc.name(), Some("Doe, Jane"));
        let reply_to = parsed.reply_to().and_then(|a| a.first()).unwrap();
        assert_eq!(reply_to.address(), Some("zoe@contoso.com"));
        assert_eq!(reply_to.name(), Some("Zoë Çelik"));

        assert!(parsed.bcc().is_none());
        let headers = header_block(&bytes);
        assert!(!headers.to_ascii_lowercase().contains("bcc"), "{headers}");
        assert!(!headers.contains("audit@contoso.com"), "{headers}");
        assert!(parsed.date().is_some());
        assert_eq!(parsed.header_raw("MIME-Version").map(str::trim), Some("1.0"));
    }

    #[test]
    fn envelope_has_every_recipient_once() {
        let mut msg = message();
        msg.bcc.push(addr("OPS@contoso.com"));
        let built = build(&msg).unwrap();
        let envelope = built.envelope();
        assert_eq!(envelope.from().map(|a| a.to_string()).as_deref(), Some("alerts@contoso.com"));
        let to: Vec<String> = envelope.to().iter().map(|a| a.to_string()).collect();
        assert_eq!(to, vec!["ops@contoso.com", "dev@contoso.com", "jane@contoso.com", "audit@contoso.com"]);
    }

    #[test]
    fn bcc_only_message_builds_without_recipient_headers() {
        let mut msg = message();
        msg.to.clear();
        msg.cc.clear();
        let bytes = build_bytes(&msg).unwrap();
        let headers = header_block(&bytes);
        assert!(!headers.contains("audit@contoso.com"), "{headers}");
        assert_eq!(build(&msg).unwrap().envelope().to()[0].to_string(), "audit@contoso.com");
    }

    #[test]
    fn utf8_subject_and_names_are_encoded_and_decode_back() {
        let bytes = build_bytes(&message()).unwrap();
        let headers = header_block(&bytes);
        assert!(headers.contains("=?utf-8?"), "{headers}");
        // Unknown headers stay raw unless the parser is told to decode them as text; naming one
        // header replaces mail-parser's defaults, so the standard ones are named as well.
        let parsed = MessageParser::new().with_minimal_headers().header_text("X-Team").parse(&bytes).unwrap();
        assert_eq!(parsed.subject(), Some("Deploy finished ✅ — café déjà vu"));
        assert_eq!(parsed.header("X-Team").and_then(|h| h.as_text()), Some("Équipe Ops"));
    }

    #[test]
    fn message_id_is_exact() {
        let parsed_bytes = build_bytes(&message()).unwrap();
        let parsed = parse(&parsed_bytes);
        assert_eq!(parsed.message_id(), Some("3f1c0b9e-uid@mailroom.dev"));
        assert!(header_block(&parsed_bytes).contains("Message-ID: <3f1c0b9e-uid@mailroom.dev>"));
    }

    #[test]
    fn custom_headers_in_order() {
        let bytes = build_bytes(&message()).unwrap();
        let parsed = parse(&bytes);
        assert_eq!(parsed.header_raw("X-Pipeline-Run").map(str::trim), Some("1234"));
        assert_eq!(parsed.header_raw("X-A").map(str::trim), Some("first"));
        let names: Vec<&str> =
            parsed.headers().iter().map(|h| h.name()).filter(|n| n.starts_with("X-") || n.starts_with("x-")).collect();
        assert_eq!(names, vec!["X-Pipeline-Run", "x-team", "X-A", "X-Priority"]);
    }

    #[test]
    fn importance_headers_for_each_level() {
        for (importance, word, priority) in
            [(Importance::Low, "low", "5"), (Importance::Normal, "normal", "3"), (Importance::High, "high", "1")]
        {
            let mut msg = message();
            msg.importance = importance;
            let bytes = build_bytes(&msg).unwrap();
            let parsed = parse(&bytes);
            assert_eq!(parsed.header_raw("Importance").map(str::trim), Some(word));
            assert_eq!(parsed.header_raw("X-Priority").map(str::trim), Some(priority));
        }
    }

    #[test]
    fn text_only_is_text_plain() {
        let mut msg = message();
        msg.html = None;
        let bytes = build_bytes(&msg).unwrap();
        let parsed = parse(&bytes);
        let ct = parsed.root_part().content_type().unwrap();
        assert_eq!((ct.ctype(), ct.subtype()), ("text", Some("plain")));
        assert_eq!(ct.attribute("charset"), Some("utf-8"));
        assert_eq!(single_body(parsed.body_text(0)).as_deref(), Some("Version 1.4.2 is live.\r\nNaïve café ☕\r\n"));
        assert_eq!(parsed.html_body_count(), 1, "mail-parser derives HTML from text");
        assert_eq!(parsed.attachment_count(), 0);
    }

    /// A single-part body as mail-parser returns it: with the CRLF that ends the message.
    fn single_body(body: Option<std::borrow::Cow<'_, str>>) -> Option<String> {
        body.map(|b| b.strip_suffix("\r\n").unwrap_or(&b).to_string())
    }

    #[test]
    fn html_only_is_text_html() {
        let mut msg = message();
        msg.text = None;
        let bytes = build_bytes(&msg).unwrap();
        let parsed = parse(&bytes);
        let ct = parsed.root_part().content_type().unwrap();
        assert_eq!((ct.ctype(), ct.subtype()), ("text", Some("html")));
        assert_eq!(
            single_body(parsed.body_html(0)).as_deref(),
            Some("<p>Version <b>1.4.2</b> is live. Crème brûlée 🍮</p>")
        );
    }

    #[test]
    fn both_bodies_are_alternative_text_first() {
        let bytes = build_bytes(&message()).unwrap();
        let parsed = parse(&bytes);
        let ct = parsed.root_part().content_type().unwrap();
        assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("alternative")));
        let subtypes: Vec<_> = parsed
            .parts
            .iter()
            .skip(1)
            .filter_map(|p| p.content_type())
            .map(|c| format!("{}/{}", c.ctype(), c.subtype().unwrap_or_default()))
            .collect();
        assert_eq!(subtypes, vec!["text/plain", "text/html"]);
        assert_eq!(parsed.body_text(0).as_deref(), Some("Version 1.4.2 is live.\r\nNaïve café ☕\r\n"));
        assert_eq!(parsed.body_html(0).as_deref(), Some("<p>Version <b>1.4.2</b> is live. Crème brûlée 🍮</p>"));
    }

    #[test]
    fn attachments_wrap_the_body_in_mixed() {
        let pdf: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let mut msg = message();
        msg.attachments = vec![
            AttachmentData {
                name: "report.csv".into(),
                content_type: "text/csv".into(),
                bytes: b"a,b\n1,2\n".to_vec(),
            },
            AttachmentData { name: "résumé.pdf".into(), content_type: "application/pdf".into(), bytes: pdf.clone() },
            AttachmentData {
                name: "a very long file name that does not fit on one header line at all.txt".into(),
                content_type: String::new(),
                bytes: b"hello\n".to_vec(),
            },
        ];
        let bytes = build_bytes(&msg).unwrap();
        assert!(bytes.is_ascii());
        let parsed = parse(&bytes);
        let ct = parsed.root_part().content_type().unwrap();
        assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("mixed")));
        assert_eq!(parsed.body_text(0).as_deref(), Some("Version 1.4.2 is live.\r\nNaïve café ☕\r\n"));
        assert_eq!(parsed.body_html(0).as_deref(), Some("<p>Version <b>1.4.2</b> is live. Crème brûlée 🍮</p>"));

        let attachments: Vec<_> = parsed.attachments().collect();
        assert_eq!(attachments.len(), 3);
        let names: Vec<_> = attachments.iter().map(|a| a.attachment_name()).collect();
        assert_eq!(
            names,
            vec![
                Some("report.csv"),
                Some("résumé.pdf"),
                Some("a very long file name that does not fit on one header line at all.txt")
            ]
        );
        assert_eq!(attachments[0].contents(), b"a,b\n1,2\n");
        assert_eq!(attachments[1].contents(), pdf.as_slice());
        let types: Vec<_> = attachments
            .iter()
            .map(|a| {
                let c = a.content_type().unwrap();
                format!("{}/{}", c.ctype(), c.subtype().unwrap_or_default())
            })
            .collect();
        assert_eq!(types, vec!["text/csv", "application/pdf", "application/octet-stream"]);
        for a in &attachments {
            let disposition = a.content_disposition().unwrap();
            assert_eq!(disposition.ctype(), "attachment");
        }
        assert!(
            String::from_utf8_lossy(&bytes).contains("filename*0*=utf-8''r%C3%A9sum%C3%A9.pdf"),
            "RFC 2231 encoding of the non-ASCII name"
        );
    }

    #[test]
    fn utf8_text_attachments_say_so_and_decode_back() {
        let text = "Grüße ✅\nZeile 2\n";
        let latin1: Vec<u8> = b"Gr\xfc\xdfe\n".to_vec();
        let mut msg = message();
        msg.attachments = vec![
            AttachmentData { name: "greeting.txt".into(), content_type: "text/plain".into(), bytes: text.into() },
            AttachmentData {
                name: "legacy.csv".into(),
                content_type: "text/csv; charset=iso-8859-1".into(),
                bytes: latin1.clone(),
            },
            AttachmentData { name: "unknown.txt".into(), content_type: "text/plain".into(), bytes: latin1.clone() },
        ];
        let bytes = build_bytes(&msg).unwrap();
        let parsed = parse(&bytes);
        let attachments: Vec<_> = parsed.attachments().collect();
        assert_eq!(attachments.len(), 3);

        let greeting = attachments[0];
        assert_eq!(greeting.content_type().and_then(|c| c.attribute("charset")), Some("utf-8"));
        assert_eq!(greeting.text_contents(), Some(text));

        // An explicit charset stays as given, and so do bytes that are not UTF-8.
        assert_eq!(attachments[1].content_type().and_then(|c| c.attribute("charset")), Some("iso-8859-1"));
        assert_eq!(attachments[2].content_type().and_then(|c| c.attribute("charset")), None);
    }

    #[test]
    fn only_unlabelled_utf8_text_gets_a_charset() {
        let utf8 = "Grüße ✅".as_bytes();
        assert_eq!(labelled_content_type("text/plain", utf8), "text/plain; charset=utf-8");
        assert_eq!(labelled_content_type(" text/csv ", b"a,b\n"), "text/csv; charset=utf-8");
        assert_eq!(labelled_content_type("text/plain;", utf8), "text/plain; charset=utf-8");
        assert_eq!(labelled_content_type("text/html; name=\"x;y\"", utf8), "text/html; name=\"x;y\"; charset=utf-8");
        assert_eq!(labelled_content_type("TEXT/Plain", utf8), "TEXT/Plain; charset=utf-8");
        for kept in
            ["text/plain; charset=iso-8859-1", "text/plain; Charset=\"UTF-8\"", "application/json", "image/png", ""]
        {
            assert_eq!(labelled_content_type(kept, utf8), kept, "{kept:?}");
        }
        assert_eq!(labelled_content_type("text/plain", b"Gr\xfc\xdfe"), "text/plain");
        assert_eq!(labelled_content_type("not a type", utf8), "not a type");
    }

    #[test]
    fn rejects_header_injection_in_custom_headers() {
        let mut msg = message();
        msg.headers = vec![("X-Run".into(), "1\r\nBcc: victim@example.org".into())];
        assert_eq!(build(&msg).unwrap_err(), MimeError::HeaderValue("X-Run".into()));
        msg.headers = vec![("X-Run".into(), "1\nBcc: victim@example.org".into())];
        assert!(matches!(build(&msg), Err(MimeError::HeaderValue(_))));
        msg.headers = vec![("X-Run".into(), "1\0".into())];
        assert!(matches!(build(&msg), Err(MimeError::HeaderValue(_))));
        for name in [
            "Subject",
            "Bcc",
            "X-",
            "X-Run: 1\r\nBcc",
            "X-Run:",
            "X Run",
            "X-Rün",
            "X-(run)",
            "Y-Run",
            "",
            &format!("X-{}", "a".repeat(80)),
        ] {
            msg.headers = vec![(name.to_string(), "v".into())];
            assert!(matches!(build(&msg), Err(MimeError::HeaderName(_))), "{name:?}");
        }
    }

    #[test]
    fn header_name_rule() {
        for good in ["X-Pipeline-Run", "x-a", "X-a.b_c", "X-!#$%&'*+.^_`|~-"] {
            assert!(is_custom_header_name(good), "{good}");
        }
        for bad in ["X-", "x-", "Xa", "X-a b", "X-a:b", "X-ä", "-X-a", "X_-a"] {
            assert!(!is_custom_header_name(bad), "{bad}");
        }
    }

    #[test]
    fn rejects_other_control_characters_in_headers() {
        for bad in ["a\u{1b}[31mred", "a\u{0b}b", "a\u{85}b", "a\u{2028}b", "a\u{7f}"] {
            let mut msg = message();
            msg.subject = bad.into();
            assert_eq!(build(&msg).unwrap_err(), MimeError::Subject, "{bad:?}");
            let mut msg = message();
            msg.headers = vec![("X-Run".into(), bad.into())];
            assert!(matches!(build(&msg), Err(MimeError::HeaderValue(_))), "{bad:?}");
        }
        let mut msg = message();
        msg.subject = "tab\tis fine".into();
        assert!(build(&msg).is_ok());
        for name in ["invoice\u{202E}fdp.exe", "a\u{200B}.txt", "a\u{1b}.txt"] {
            let mut msg = message();
            msg.attachments = vec![AttachmentData { name: name.into(), content_type: String::new(), bytes: vec![] }];
            assert!(matches!(build(&msg), Err(MimeError::AttachmentName(_))), "{name:?}");
        }
    }

    #[test]
    fn rejects_reserved_and_duplicate_headers() {
        let mut msg = message();
        msg.headers = vec![("x-priority".into(), "1".into())];
        assert!(matches!(build(&msg), Err(MimeError::ReservedHeader(_))));
        msg.headers = vec![("X-Run".into(), "1".into()), ("x-run".into(), "2".into())];
        assert!(matches!(build(&msg), Err(MimeError::DuplicateHeader(_))));
    }

    #[test]
    fn rejects_bad_subject_body_and_message_id() {
        let mut msg = message();
        msg.subject = "Hi\r\nBcc: victim@example.org".into();
        assert_eq!(build(&msg).unwrap_err(), MimeError::Subject);

        let mut msg = message();
        msg.text = None;
        msg.html = None;
        assert_eq!(build(&msg).unwrap_err(), MimeError::NoBody);

        for id in ["no-brackets@mailroom.dev", "<no-at>", "<a@b>\r\nBcc: x@y", "<a b@c>", "<@c>", "<a@>", "<a@b@c>", ""]
        {
            let mut msg = message();
            msg.message_id = id.into();
            assert!(matches!(build(&msg), Err(MimeError::MessageId(_))), "{id:?}");
        }
    }

    #[test]
    fn rejects_no_recipients_and_hand_built_bad_addresses() {
        let mut msg = message();
        msg.to.clear();
        msg.cc.clear();
        msg.bcc.clear();
        assert_eq!(build(&msg).unwrap_err(), MimeError::NoRecipients);

        let mut msg = message();
        msg.to.push(Address { name: Some("Evil\r\nBcc: victim@example.org".into()), email: "evil@example.org".into() });
        assert!(matches!(build(&msg), Err(MimeError::Address(_))));
    }

    #[test]
    fn rejects_bad_attachment_metadata() {
        let mut msg = message();
        msg.attachments = vec![AttachmentData {
            name: "a\r\nContent-Type: text/html".into(),
            content_type: "text/plain".into(),
            bytes: vec![],
        }];
        assert!(matches!(build(&msg), Err(MimeError::AttachmentName(_))));
        for ct in ["not a type", "text/plain\r\nX: y", "tëxt/plain"] {
            msg.attachments = vec![AttachmentData { name: "a.txt".into(), content_type: ct.into(), bytes: vec![] }];
            assert!(matches!(build(&msg), Err(MimeError::ContentType { .. })), "{ct:?}");
        }
    }

    #[test]
    fn dangerous_file_names_stay_inside_the_parameter() {
        let mut msg = message();
        msg.attachments = vec![AttachmentData {
            name: "evil\"; filename=\"other.exe".into(),
            content_type: "application/octet-stream".into(),
            bytes: b"x".to_vec(),
        }];
        let bytes = build_bytes(&msg).unwrap();
        let parsed = parse(&bytes);
        let names: Vec<_> = parsed.attachments().map(|a| a.attachment_name()).collect();
        assert_eq!(names, vec![Some("evil\"; filename=\"other.exe")]);
    }
}
