//! Pure request building: the JSON (or MIME) Graph receives, and how a message is split
//! between one `sendMail` request and a draft with attachments added one by one.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Serialize;

use crate::transport::Importance;
use crate::transport::{Address, AttachmentData, OutgoingMessage, SendError, mime};

/// Graph takes at most this many `internetMessageHeaders`.
pub const MAX_JSON_HEADERS: usize = 5;
/// Graph refuses requests larger than 4 MB.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Attachments from this size on go through an upload session.
pub const MAX_INLINE_ATTACHMENT: usize = 3 * 1024 * 1024;
/// The largest attachment an upload session takes.
pub const MAX_ATTACHMENT: usize = 150 * 1024 * 1024;

/// `Content-Type` of JSON requests.
pub const JSON: &str = "application/json";
/// `Content-Type` of a base64 MIME message.
pub const MIME: &str = "text/plain";

/// Characters escaped in a path segment: all but RFC 3986's unreserved ones and `@`.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~').remove(b'@');

/// A value (mailbox, message id) as one URL path segment.
pub fn segment(value: &str) -> String {
    utf8_percent_encode(value, SEGMENT).to_string()
}

/// `sendMail`'s body.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SendMail<'a> {
    /// The message.
    pub message: Message<'a>,
    /// Whether Graph keeps a copy in the sender's Sent Items.
    pub save_to_sent_items: bool,
}

/// Graph's `message` resource, as much of it as a send needs.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Message<'a> {
    /// The sender with its display name (the mailbox in the URL sends it).
    from: Recipient<'a>,
    subject: &'a str,
    body: ItemBody<'a>,
    to_recipients: Vec<Recipient<'a>>,
    cc_recipients: Vec<Recipient<'a>>,
    bcc_recipients: Vec<Recipient<'a>>,
    reply_to: Vec<Recipient<'a>>,
    importance: &'static str,
    internet_message_id: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    internet_message_headers: Vec<Header<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    attachments: Vec<FileAttachment<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ItemBody<'a> {
    content_type: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Recipient<'a> {
    email_address: EmailAddress<'a>,
}

#[derive(Serialize)]
struct EmailAddress<'a> {
    address: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

#[derive(Serialize)]
struct Header<'a> {
    name: &'a str,
    value: &'a str,
}

/// A `fileAttachment` with its bytes in base64.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FileAttachment<'a> {
    #[serde(rename = "@odata.type")]
    odata_type: &'static str,
    name: &'a str,
    content_type: Cow<'a, str>,
    content_bytes: String,
}

impl<'a> FileAttachment<'a> {
    /// The attachment, encoded.
    pub fn new(attachment: &'a AttachmentData) -> Self {
        FileAttachment {
            odata_type: "#microsoft.graph.fileAttachment",
            name: &attachment.name,
            content_type: content_type(attachment),
            content_bytes: BASE64.encode(&attachment.bytes),
        }
    }
}

/// The content type Graph is given for an attachment: the one the MIME message would carry, so
/// that UTF-8 text says so whichever way the message goes (JSON, MIME, draft or upload session).
/// `contentType` is a plain string there, parameters included
/// (https://learn.microsoft.com/graph/api/resources/fileattachment).
fn content_type(attachment: &AttachmentData) -> Cow<'_, str> {
    mime::labelled_content_type(&attachment.content_type, &attachment.bytes)
}

/// The body of `createUploadSession`.
#[derive(Serialize)]
pub struct UploadSession<'a> {
    #[serde(rename = "AttachmentItem")]
    attachment_item: AttachmentItem<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AttachmentItem<'a> {
    attachment_type: &'static str,
    name: &'a str,
    size: usize,
    content_type: Cow<'a, str>,
}

impl<'a> UploadSession<'a> {
    /// The session request for one attachment.
    pub fn new(attachment: &'a AttachmentData) -> Self {
        UploadSession {
            attachment_item: AttachmentItem {
                attachment_type: "file",
                name: &attachment.name,
                size: attachment.bytes.len(),
                content_type: content_type(attachment),
            },
        }
    }
}

/// Whether Graph's JSON can carry the custom headers: at most 5, each named `X-`.
/// Otherwise the message goes as MIME, which takes any header.
pub fn needs_mime(message: &OutgoingMessage) -> bool {
    message.headers.len() > MAX_JSON_HEADERS
        || !message.headers.iter().all(|(name, _)| name.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("x-")))
}

/// The message as Graph's JSON, with these attachments inline.
pub fn message<'a>(message: &'a OutgoingMessage, attachments: &[&'a AttachmentData]) -> Message<'a> {
    let body = match (&message.html, &message.text) {
        (Some(html), _) => ItemBody { content_type: "HTML", content: html },
        (None, text) => ItemBody { content_type: "Text", content: text.as_deref().unwrap_or_default() },
    };
    Message {
        from: Recipient {
            email_address: EmailAddress { address: &message.from.email, name: message.from.name.as_deref() },
        },
        subject: &message.subject,
        body,
        to_recipients: recipients(&message.to),
        cc_recipients: recipients(&message.cc),
        bcc_recipients: recipients(&message.bcc),
        reply_to: recipients(&message.reply_to),
        importance: match message.importance {
            Importance::Low => "low",
            Importance::Normal => "normal",
            Importance::High => "high",
        },
        internet_message_id: &message.message_id,
        internet_message_headers: message.headers.iter().map(|(name, value)| Header { name, value }).collect(),
        attachments: attachments.iter().map(|a| FileAttachment::new(a)).collect(),
    }
}

fn recipients(addresses: &[Address]) -> Vec<Recipient<'_>> {
    addresses
        .iter()
        .map(|a| Recipient { email_address: EmailAddress { address: &a.email, name: a.name.as_deref() } })
        .collect()
}

/// How one message is sent.
#[derive(Debug)]
pub enum Plan<'a> {
    /// One `sendMail` request.
    SendMail {
        /// [`JSON`] or [`MIME`].
        content_type: &'static str,
        /// The request body.
        body: Bytes,
    },
    /// A draft, its remaining attachments, then `send`.
    Draft(Draft<'a>),
}

/// A message too large for one request.
#[derive(Debug)]
pub struct Draft<'a> {
    /// [`JSON`] or [`MIME`] for the draft's creation.
    pub content_type: &'static str,
    /// The draft with the attachments that fit.
    pub body: Bytes,
    /// Attachments added afterwards one request each.
    pub attach: Vec<&'a AttachmentData>,
    /// Attachments uploaded afterwards through upload sessions.
    pub upload: Vec<&'a AttachmentData>,
}

/// Decides how to send `message` and builds the first request.
pub fn plan(message: &OutgoingMessage, save_to_sent_items: bool) -> Result<Plan<'_>, SendError> {
    if let Some(big) = message.attachments.iter().find(|a| a.bytes.len() > MAX_ATTACHMENT) {
        return Err(SendError::permanent(format!(
            "attachment {:?} has {} bytes; Graph accepts at most {MAX_ATTACHMENT} (150 MiB)",
            big.name,
            big.bytes.len()
        )));
    }
    if needs_mime(message) { plan_mime(message) } else { plan_json(message, save_to_sent_items) }
}

fn plan_json(message: &OutgoingMessage, save_to_sent_items: bool) -> Result<Plan<'_>, SendError> {
    let (small, upload): (Vec<&AttachmentData>, Vec<&AttachmentData>) =
        message.attachments.iter().partition(|a| fits_alone(a));
    let request = |attachments: &[&AttachmentData]| {
        to_json(&SendMail { message: self::message(message, attachments), save_to_sent_items })
    };
    let bare = request(&[])?.len();
    // A lower bound of the whole request's length, known without encoding a byte: a message that
    // cannot fit is never encoded whole only to be thrown away (three copies of its attachments).
    let at_least = bare + small.iter().map(|a| attachment_json_len(a) + 1).sum::<usize>();
    if upload.is_empty() && at_least <= MAX_REQUEST_BYTES {
        let body = request(&small)?;
        if body.len() <= MAX_REQUEST_BYTES {
            return Ok(Plan::SendMail { content_type: JSON, body });
        }
    }
    // Inline what fits, in order; add the rest to the draft one request each.
    let mut budget = MAX_REQUEST_BYTES.saturating_sub(bare);
    let (mut inline, mut attach) = (Vec::new(), Vec::new());
    for attachment in small {
        // Each inline attachment also costs a comma between array elements.
        let cost = attachment_json_len(attachment) + 1;
        if cost <= budget {
            budget -= cost;
            inline.push(attachment);
        } else {
            attach.push(attachment);
        }
    }
    Ok(Plan::Draft(Draft { content_type: JSON, body: to_json(&self::message(message, &inline))?, attach, upload }))
}

fn plan_mime(message: &OutgoingMessage) -> Result<Plan<'_>, SendError> {
    // The request is base64 of a MIME message that holds every attachment's bytes at least once:
    // longer than 4/3 of them. One over the limit for that alone is not encoded whole.
    let attached: usize = message.attachments.iter().map(|a| a.bytes.len()).sum();
    if attached.div_ceil(3) * 4 <= MAX_REQUEST_BYTES {
        let body = mime_base64(message)?;
        if body.len() <= MAX_REQUEST_BYTES {
            return Ok(Plan::SendMail { content_type: MIME, body });
        }
    }
    // The MIME draft carries no attachment; they follow as in JSON mode.
    let bare = OutgoingMessage { attachments: Vec::new(), ..message.clone() };
    let (attach, upload) = message.attachments.iter().partition(|a| fits_alone(a));
    Ok(Plan::Draft(Draft { content_type: MIME, body: mime_base64(&bare)?, attach, upload }))
}

/// Whether an attachment goes in a JSON request rather than an upload session.
fn fits_alone(attachment: &AttachmentData) -> bool {
    attachment.bytes.len() < MAX_INLINE_ATTACHMENT && attachment_json_len(attachment) <= MAX_REQUEST_BYTES
}

/// The length of an attachment's JSON, without encoding its bytes.
fn attachment_json_len(attachment: &AttachmentData) -> usize {
    let meta = serde_json::json!({
        "@odata.type": "#microsoft.graph.fileAttachment",
        "name": attachment.name,
        "contentType": content_type(attachment),
        "contentBytes": "",
    });
    meta.to_string().len() + attachment.bytes.len().div_ceil(3) * 4
}

/// A request body as JSON.
pub fn to_json<T: Serialize>(value: &T) -> Result<Bytes, SendError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| SendError::permanent(format!("cannot encode the Graph request: {e}")))
}

/// The RFC 5322 message in base64, as Graph's MIME mode takes it.
fn mime_base64(message: &OutgoingMessage) -> Result<Bytes, SendError> {
    let bytes =
        mime::build_bytes(message).map_err(|e| SendError::permanent(format!("cannot build the MIME message: {e}")))?;
    let bytes = with_bcc_header(bytes, &message.bcc);
    Ok(Bytes::from(BASE64.encode(bytes)))
}

/// Adds a `Bcc:` header when the MIME lacks one: Graph takes the recipients of a MIME
/// message from its headers (and strips `Bcc:` before delivery).
pub fn with_bcc_header(mime: Vec<u8>, bcc: &[Address]) -> Vec<u8> {
    if bcc.is_empty() || has_header(&mime, "bcc") {
        return mime;
    }
    let addresses: Vec<&str> = bcc.iter().map(|a| a.email.as_str()).collect();
    // One address per line keeps every line far below RFC 5322's 998 characters.
    let header = format!("Bcc: {}\r\n", addresses.join(",\r\n "));
    let mut out = header.into_bytes();
    out.extend_from_slice(&mime);
    out
}

/// Whether the header section of `mime` has a field called `name` (lowercase).
fn has_header(mime: &[u8], name: &str) -> bool {
    mime.split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .take_while(|line| !line.is_empty())
        .any(|line| {
            line.len() > name.len()
                && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
                && line[name.len()] == b':'
        })
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn address(email: &str, name: Option<&str>) -> Address {
        Address { name: name.map(str::to_string), email: email.to_string() }
    }

    fn sample() -> OutgoingMessage {
        OutgoingMessage {
            from: address("alerts@contoso.com", None),
            to: vec![address("ops@contoso.com", Some("Ops Team"))],
            cc: vec![address("cc@contoso.com", None)],
            bcc: vec![address("audit@contoso.com", None)],
            reply_to: vec![address("reply@contoso.com", Some("Reply"))],
            subject: "Deploy finished ✅".into(),
            text: Some("Version 1.4.2 is live.".into()),
            html: None,
            attachments: vec![AttachmentData {
                name: "hello.txt".into(),
                content_type: "text/plain".into(),
                bytes: b"hello\n".to_vec(),
            }],
            headers: vec![("X-Pipeline-Run".into(), "1234".into())],
            importance: Importance::High,
            message_id: "<abc@mailroom.dev>".into(),
        }
    }

    fn attachment(name: &str, len: usize) -> AttachmentData {
        AttachmentData { name: name.into(), content_type: "application/octet-stream".into(), bytes: vec![7; len] }
    }

    fn parse(body: &Bytes) -> Value {
        serde_json::from_slice(body).unwrap()
    }

    fn send_mail_json(message: &OutgoingMessage, save: bool) -> Value {
        match plan(message, save).unwrap() {
            Plan::SendMail { content_type, body } => {
                assert_eq!(content_type, JSON);
                parse(&body)
            }
            other => panic!("expected one sendMail, got {other:?}"),
        }
    }

    #[test]
    fn json_request_field_by_field() {
        let got = send_mail_json(&sample(), true);
        assert_eq!(got["saveToSentItems"], json!(true));
        let m = &got["message"];
        assert_eq!(m["subject"], json!("Deploy finished ✅"));
        assert_eq!(m["from"], json!({"emailAddress": {"address": "alerts@contoso.com"}}));
        assert_eq!(m["body"], json!({"contentType": "Text", "content": "Version 1.4.2 is live."}));
        assert_eq!(m["toRecipients"], json!([{"emailAddress": {"address": "ops@contoso.com", "name": "Ops Team"}}]));
        assert_eq!(m["ccRecipients"], json!([{"emailAddress": {"address": "cc@contoso.com"}}]));
        assert_eq!(m["bccRecipients"], json!([{"emailAddress": {"address": "audit@contoso.com"}}]));
        assert_eq!(m["replyTo"], json!([{"emailAddress": {"address": "reply@contoso.com", "name": "Reply"}}]));
        assert_eq!(m["importance"], json!("high"));
        assert_eq!(m["internetMessageId"], json!("<abc@mailroom.dev>"));
        assert_eq!(m["internetMessageHeaders"], json!([{"name": "X-Pipeline-Run", "value": "1234"}]));
        assert_eq!(
            m["attachments"],
            json!([{
                "@odata.type": "#microsoft.graph.fileAttachment",
                "name": "hello.txt",
                "contentType": "text/plain; charset=utf-8",
                "contentBytes": "aGVsbG8K",
            }])
        );
        let fields: Vec<&String> = m.as_object().unwrap().keys().collect();
        assert_eq!(fields.len(), 11, "no field beyond the ones checked: {fields:?}");
    }

    #[test]
    fn html_wins_over_text() {
        let mut message = sample();
        message.html = Some("<p>live</p>".into());
        let got = send_mail_json(&message, false);
        assert_eq!(got["message"]["body"], json!({"contentType": "HTML", "content": "<p>live</p>"}));
        assert_eq!(got["saveToSentItems"], json!(false));
    }

    #[test]
    fn importance_words() {
        for (importance, word) in [(Importance::Low, "low"), (Importance::Normal, "normal"), (Importance::High, "high")]
        {
            let message = OutgoingMessage { importance, ..sample() };
            assert_eq!(send_mail_json(&message, false)["message"]["importance"], word);
        }
    }

    #[test]
    fn no_headers_no_attachments_leave_the_fields_out() {
        let message = OutgoingMessage { headers: vec![], attachments: vec![], ..sample() };
        let got = send_mail_json(&message, false);
        assert!(got["message"].get("internetMessageHeaders").is_none());
        assert!(got["message"].get("attachments").is_none());
    }

    fn headers(n: usize) -> Vec<(String, String)> {
        (0..n).map(|i| (format!("X-Custom-{i}"), i.to_string())).collect()
    }

    #[test]
    fn five_headers_stay_json_six_switch_to_mime() {
        let five = OutgoingMessage { headers: headers(5), ..sample() };
        assert!(!needs_mime(&five));
        assert_eq!(send_mail_json(&five, false)["message"]["internetMessageHeaders"].as_array().unwrap().len(), 5);

        let six = OutgoingMessage { headers: headers(6), ..sample() };
        assert!(needs_mime(&six));
        match plan(&six, false).unwrap() {
            Plan::SendMail { content_type, body } => {
                assert_eq!(content_type, MIME);
                let decoded = BASE64.decode(&body).expect("base64");
                assert!(decoded.starts_with(b"Bcc: audit@contoso.com\r\n"));
                let parsed = mail_parser::MessageParser::default().parse(&decoded).expect("RFC 5322");
                assert_eq!(parsed.message_id(), Some("abc@mailroom.dev"));
                assert_eq!(parsed.header_raw("X-Custom-5").map(str::trim), Some("5"));
            }
            other => panic!("expected one MIME sendMail, got {other:?}"),
        }
    }

    #[test]
    fn a_header_not_named_x_switches_to_mime() {
        let message =
            OutgoingMessage { headers: vec![("List-Unsubscribe".into(), "<mailto:u@contoso.com>".into())], ..sample() };
        assert!(needs_mime(&message));
        let lower = OutgoingMessage { headers: vec![("x-lower".into(), "1".into())], ..sample() };
        assert!(!needs_mime(&lower));
    }

    #[test]
    fn bcc_header_added_once_before_the_others() {
        let bcc = [address("a@contoso.com", None), address("b@contoso.com", None)];
        let mime = b"Subject: hi\r\n\r\nbody Bcc: no\r\n".to_vec();
        let got = with_bcc_header(mime.clone(), &bcc);
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "Bcc: a@contoso.com,\r\n b@contoso.com\r\nSubject: hi\r\n\r\nbody Bcc: no\r\n"
        );
        let already = b"Subject: hi\r\nBCC: a@contoso.com\r\n\r\nbody".to_vec();
        assert_eq!(with_bcc_header(already.clone(), &bcc), already);
        assert_eq!(with_bcc_header(mime.clone(), &[]), mime);
    }

    #[test]
    fn large_attachment_goes_to_an_upload_session_small_ones_stay_inline() {
        let message = OutgoingMessage {
            attachments: vec![attachment("small.bin", 1000), attachment("big.bin", 5 * 1024 * 1024)],
            ..sample()
        };
        let Plan::Draft(draft) = plan(&message, true).unwrap() else {
            panic!("a 5 MiB attachment needs a draft");
        };
        assert_eq!(draft.content_type, JSON);
        assert!(draft.attach.is_empty());
        assert_eq!(draft.upload.len(), 1);
        assert_eq!(draft.upload[0].name, "big.bin");
        let body = parse(&draft.body);
        // A draft is the message itself, without sendMail's wrapper.
        assert!(body.get("saveToSentItems").is_none());
        assert_eq!(body["internetMessageId"], json!("<abc@mailroom.dev>"));
        let names: Vec<&Value> = body["attachments"].as_array().unwrap().iter().map(|a| &a["name"]).collect();
        assert_eq!(names, [&json!("small.bin")]);
    }

    #[test]
    fn three_megabytes_inline_three_mebibytes_uploaded() {
        assert!(fits_alone(&attachment("a", 3_000_000)));
        assert!(!fits_alone(&attachment("a", MAX_INLINE_ATTACHMENT)));
        // Under 3 MiB, but its base64 alone would not fit in one request.
        assert!(!fits_alone(&attachment("a", MAX_INLINE_ATTACHMENT - 1)));
    }

    #[test]
    fn small_attachments_over_4_mb_together_use_a_draft() {
        let message = OutgoingMessage {
            attachments: vec![attachment("one.bin", 2 * 1024 * 1024), attachment("two.bin", 2 * 1024 * 1024)],
            ..sample()
        };
        let Plan::Draft(draft) = plan(&message, false).unwrap() else {
            panic!("4 MiB of attachments exceed one request");
        };
        assert!(draft.body.len() <= MAX_REQUEST_BYTES);
        assert_eq!(parse(&draft.body)["attachments"][0]["name"], "one.bin");
        assert_eq!(draft.attach.len(), 1);
        assert_eq!(draft.attach[0].name, "two.bin");
        assert!(draft.upload.is_empty());
    }

    #[test]
    fn estimated_attachment_size_is_exact() {
        for len in [0, 1, 2, 3, 4, 1000] {
            let a = AttachmentData {
                name: "ä \"quoted\".txt".into(),
                content_type: "text/plain".into(),
                bytes: vec![1; len],
            };
            let real = serde_json::to_vec(&FileAttachment::new(&a)).unwrap().len();
            assert_eq!(attachment_json_len(&a), real, "{len} bytes");
        }
    }

    #[test]
    fn utf8_text_attachments_carry_the_charset_in_every_request() {
        let text =
            AttachmentData {
                name: "greeting.txt".into(), content_type: "text/plain".into(), bytes: "Grüße ✅".into()
            };
        assert_eq!(
            serde_json::to_value(FileAttachment::new(&text)).unwrap()["contentType"],
            "text/plain; charset=utf-8"
        );
        assert_eq!(
            serde_json::to_value(UploadSession::new(&text)).unwrap()["AttachmentItem"]["contentType"],
            "text/plain; charset=utf-8"
        );
        let latin1 = AttachmentData { bytes: b"Gr\xfc\xdfe".to_vec(), ..text.clone() };
        assert_eq!(serde_json::to_value(FileAttachment::new(&latin1)).unwrap()["contentType"], "text/plain");
        let explicit = AttachmentData { content_type: "text/plain; charset=windows-1252".into(), ..text };
        assert_eq!(
            serde_json::to_value(FileAttachment::new(&explicit)).unwrap()["contentType"],
            "text/plain; charset=windows-1252"
        );
    }

    #[test]
    fn over_150_mib_is_refused() {
        let message = OutgoingMessage { attachments: vec![attachment("huge.bin", MAX_ATTACHMENT + 1)], ..sample() };
        let err = plan(&message, false).unwrap_err();
        assert!(!err.is_transient());
        assert!(err.to_string().contains("huge.bin"));
    }

    #[test]
    fn upload_session_body() {
        let a = attachment("big.bin", 5);
        assert_eq!(
            serde_json::to_value(UploadSession::new(&a)).unwrap(),
            json!({"AttachmentItem": {
                "attachmentType": "file",
                "name": "big.bin",
                "size": 5,
                "contentType": "application/octet-stream",
            }})
        );
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(segment("alerts@contoso.com"), "alerts@contoso.com");
        assert_eq!(segment("a+b/c?d#e f@x.com"), "a%2Bb%2Fc%3Fd%23e%20f@x.com");
        assert_eq!(segment("AAMk=="), "AAMk%3D%3D");
    }
}
