// Shared by the fuzz targets (included, so each target stays one binary without a library).

use mailroom::transport::Importance;
use mailroom::transport::{Address, AttachmentData, OutgoingMessage};

/// Builds an OutgoingMessage from raw parts; addresses are taken as given, unvalidated, as a
/// transport must not trust its caller.
#[allow(clippy::too_many_arguments, dead_code)]
pub fn outgoing(
    from: (Option<String>, String),
    to: Vec<(Option<String>, String)>,
    cc: Vec<(Option<String>, String)>,
    bcc: Vec<(Option<String>, String)>,
    reply_to: Vec<(Option<String>, String)>,
    subject: String,
    text: Option<String>,
    html: Option<String>,
    attachments: Vec<(String, String, Vec<u8>)>,
    headers: Vec<(String, String)>,
    importance: u8,
    message_id: String,
) -> OutgoingMessage {
    let address = |(name, email): (Option<String>, String)| Address { name, email };
    OutgoingMessage {
        from: address(from),
        to: to.into_iter().map(address).collect(),
        cc: cc.into_iter().map(address).collect(),
        bcc: bcc.into_iter().map(address).collect(),
        reply_to: reply_to.into_iter().map(address).collect(),
        subject,
        text,
        html,
        attachments: attachments
            .into_iter()
            .map(|(name, content_type, bytes)| AttachmentData { name, content_type, bytes })
            .collect(),
        headers,
        importance: match importance % 3 {
            0 => Importance::Low,
            1 => Importance::Normal,
            _ => Importance::High,
        },
        message_id,
    }
}

/// Header names a built message may carry at its top level.
const STANDARD: &[&str] = &[
    "from",
    "to",
    "cc",
    "reply-to",
    "subject",
    "message-id",
    "date",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "importance",
    "x-priority",
];

/// The invariants of a built message's header block.
pub fn check_built(message: &OutgoingMessage, bytes: &[u8]) {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block ends with an empty line");
    let block = &bytes[..end + 2];
    let mut names = Vec::new();
    let mut rest = block;
    while !rest.is_empty() {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").expect("every header line ends with CRLF");
        let line = &rest[..line_end];
        assert!(!line.contains(&b'\r') && !line.contains(&b'\n'), "bare CR or LF in a header line: {line:?}");
        assert!(line.len() <= 998, "a header line of {} octets", line.len());
        if !line.starts_with(b" ") && !line.starts_with(b"\t") {
            let colon = line.iter().position(|b| *b == b':').expect("a header line has a name");
            names.push(String::from_utf8_lossy(&line[..colon]).to_ascii_lowercase());
        }
        rest = &rest[line_end + 2..];
    }
    let custom: Vec<String> = message.headers.iter().map(|(n, _)| n.to_ascii_lowercase()).collect();
    for name in &names {
        assert!(STANDARD.contains(&name.as_str()) || custom.contains(name), "injected header {name:?} in {:?}", String::from_utf8_lossy(block));
    }
    assert!(!names.iter().any(|n| n == "bcc"), "a Bcc header");
    for (name, _) in &message.headers {
        assert_eq!(names.iter().filter(|n| **n == name.to_ascii_lowercase()).count(), 1, "custom header {name} once");
    }
}
