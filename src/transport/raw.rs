//! Ready-made RFC 5322 messages (`spec.raw`): checked, their envelope derived, and sent as they
//! are, with two changes only: a `Message-ID:` is inserted when the message has none, and the
//! `Bcc:` field is taken out of what recipients receive.
//!
//! The structure (header section, field lines, line lengths, 8-bit bytes) is checked here by hand,
//! strictly, because mail-parser is lenient by design: it reads almost anything as some message.
//! The address lists (groups, comments, quoted and RFC 2047-encoded display names) are read with
//! mail-parser, which does that well.

use std::fmt;

use mail_parser::MessageParser;

use super::address::{Address, parse_mailbox};

/// The longest line RFC 5322 allows (section 2.1.1) and SMTP carries (RFC 5321 section
/// 4.5.3.1.6), without its CRLF.
pub const MAX_LINE: usize = 998;

/// Why a raw message cannot be sent. The words name the line or field, never its content.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RawError {
    /// Empty, or no header section.
    #[error("the message is empty or has no header section")]
    NoHeaders,
    /// No empty line between the header section and the body.
    #[error("no empty line separates the header section from the body")]
    NoSeparator,
    /// A CR not followed by LF.
    #[error("line {0} has a CR that is not followed by LF")]
    BareCr(usize),
    /// A NUL byte.
    #[error("line {0} has a NUL byte")]
    Nul(usize),
    /// A line over 998 octets.
    #[error("line {0} is longer than 998 octets, the most RFC 5322 and SMTP allow")]
    LongLine(usize),
    /// A header line that is neither a field nor a continuation.
    #[error("line {0} is not a header field (a name of printable ASCII characters, a colon, a value)")]
    BadHeaderLine(usize),
    /// The first line is a continuation.
    #[error("line 1 starts with white space, a continuation of no header field")]
    LeadingContinuation,
    /// 8-bit bytes in the header section that are not UTF-8.
    #[error(
        "line {0} of the header section has 8-bit bytes that are not UTF-8 (RFC 6532 allows UTF-8 only, and only with SMTPUTF8)"
    )]
    EightBitHeader(usize),
    /// Not exactly one field that must be there once.
    #[error("the message has {count} {name}: fields; RFC 5322 requires {wanted}")]
    FieldCount {
        /// The field.
        name: &'static str,
        /// How many there are.
        count: usize,
        /// What is required, in words.
        wanted: &'static str,
    },
    /// An address field that does not hold mailboxes.
    #[error("the {0}: field has an entry that is not an address such as user@example.com")]
    BadAddress(&'static str),
    /// The Message-ID is not `<left@right>`.
    #[error("the Message-ID: field is not one <left@right> identifier")]
    BadMessageId,
    /// Nobody to send it to.
    #[error("no recipients: to, cc and bcc are empty and the message has no To:, Cc: or Bcc: address")]
    NoRecipients,
    /// Over Graph a header recipient cannot be left out of the envelope.
    #[error(
        "{0} is in the message's To: or Cc: field and not in to, cc or bcc; Microsoft Graph takes the recipients of a MIME message from its header fields, so it would receive it: add it to to, cc or bcc, or leave them all out"
    )]
    HeaderRecipientOutsideEnvelope(String),
}

/// A field of the header section.
#[derive(Clone, Debug)]
struct Field {
    /// Its name, as written.
    name: String,
    /// Where its first line starts.
    start: usize,
    /// Where its value starts (after the colon).
    value: usize,
    /// Just past the CRLF of its last line.
    end: usize,
}

/// A raw message that passed the checks: its bytes with CRLF line endings, and what its header
/// fields say.
#[derive(Clone, PartialEq, Eq)]
pub struct ParsedRaw {
    bytes: Vec<u8>,
    /// The mailboxes of `From:`.
    pub from: Vec<Address>,
    /// The mailbox of `Sender:`, if any.
    pub sender: Option<Address>,
    /// `To:` addresses.
    pub to: Vec<Address>,
    /// `Cc:` addresses.
    pub cc: Vec<Address>,
    /// `Bcc:` addresses.
    pub bcc: Vec<Address>,
    /// Its `Message-ID:` with the angle brackets, if it has one.
    pub message_id: Option<String>,
    /// Where the `Bcc:` fields are, to take them out.
    bcc_fields: Vec<(usize, usize)>,
    /// The header section has UTF-8 (RFC 6532): it needs SMTPUTF8.
    pub utf8_headers: bool,
}

/// Never shows the message.
impl fmt::Debug for ParsedRaw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedRaw").field("bytes", &self.bytes.len()).finish_non_exhaustive()
    }
}

impl ParsedRaw {
    /// The size of the message, CRLF line endings.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the message is empty (a parsed one never is).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// What a transport sends: the envelope and the message.
#[derive(Clone, PartialEq, Eq)]
pub struct RawOutgoing {
    /// The envelope sender (`MAIL FROM`; Graph's mailbox in the URL).
    pub envelope_from: Address,
    /// The envelope recipients (`RCPT TO`), each once.
    pub recipients: Vec<Address>,
    /// The envelope recipients that neither `To:` nor `Cc:` names: Graph's `Bcc:`.
    pub hidden: Vec<Address>,
    /// The message without `Bcc:`, with its `Message-ID:`.
    pub bytes: Vec<u8>,
    /// The Message-ID with its angle brackets.
    pub message_id: String,
    /// The header section has UTF-8: over SMTP it needs SMTPUTF8.
    pub utf8_headers: bool,
}

/// Never shows the message.
impl fmt::Debug for RawOutgoing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawOutgoing")
            .field("envelope_from", &self.envelope_from.email)
            .field("recipients", &self.recipients.len())
            .field("bytes", &self.bytes.len())
            .field("message_id", &self.message_id)
            .finish_non_exhaustive()
    }
}

impl RawOutgoing {
    /// The message as Graph's MIME `sendMail` takes it: Graph reads the recipients from the
    /// header fields, `Bcc:` included, so the hidden recipients go into a `Bcc:` field
    /// (https://learn.microsoft.com/graph/api/user-post-messages: "the MIME content with the
    /// applicable Internet message headers ("To", "CC", "BCC", "Subject")";
    /// https://learn.microsoft.com/graph/outlook-send-mime-message).
    pub fn for_graph(&self) -> Vec<u8> {
        super::graph::with_bcc_header(self.bytes.clone(), &self.hidden)
    }
}

/// Checks `raw` and reads its header fields. LF line endings become CRLF (SMTP's).
pub fn parse(raw: &[u8]) -> Result<ParsedRaw, RawError> {
    let bytes = crlf(raw)?;
    let (fields, header_end, utf8_headers) = scan_headers(&bytes)?;
    check_body(&bytes, header_end)?;
    let count = |name: &str| fields.iter().filter(|f| f.name.eq_ignore_ascii_case(name)).count();
    for (name, max) in [("From", 1), ("Sender", 1), ("To", 1), ("Cc", 1), ("Bcc", 1), ("Message-ID", 1)] {
        let n = count(name);
        let wanted = if name == "From" { "exactly one" } else { "at most one" };
        if n > max || (name == "From" && n == 0) {
            return Err(RawError::FieldCount { name: static_name(name), count: n, wanted });
        }
    }
    let message = MessageParser::default().parse_headers(&bytes[..header_end]).ok_or(RawError::NoHeaders)?;
    let from = addresses("From", message.from())?;
    if from.is_empty() {
        return Err(RawError::BadAddress("From"));
    }
    let sender = match message.sender() {
        Some(list) => addresses("Sender", Some(list))?.into_iter().next(),
        None if count("Sender") > 0 => return Err(RawError::BadAddress("Sender")),
        None => None,
    };
    let message_id = match fields.iter().find(|f| f.name.eq_ignore_ascii_case("Message-ID")) {
        Some(f) => Some(message_id(&bytes[f.value..f.end])?),
        None => None,
    };
    let bcc_fields = fields.iter().filter(|f| f.name.eq_ignore_ascii_case("Bcc")).map(|f| (f.start, f.end)).collect();
    Ok(ParsedRaw {
        from,
        sender,
        to: addresses("To", message.to())?,
        cc: addresses("Cc", message.cc())?,
        bcc: addresses("Bcc", message.bcc())?,
        message_id,
        bcc_fields,
        utf8_headers,
        bytes,
    })
}

/// The envelope and the bytes to send. `envelope` is the spec's to, cc and bcc (empty: the
/// header fields' addresses); `message_id` is used when the message has none; `graph` refuses
/// what Graph cannot do: leave a header recipient out.
pub fn prepare(
    parsed: ParsedRaw,
    envelope_from: Address,
    envelope: Vec<Address>,
    message_id: String,
    graph: bool,
) -> Result<RawOutgoing, RawError> {
    let visible: Vec<&Address> = parsed.to.iter().chain(&parsed.cc).collect();
    let from_spec = !envelope.is_empty();
    let candidates =
        if from_spec { envelope } else { parsed.to.iter().chain(&parsed.cc).chain(&parsed.bcc).cloned().collect() };
    let mut recipients: Vec<Address> = Vec::with_capacity(candidates.len());
    for a in candidates {
        if !recipients.iter().any(|r| r.email.eq_ignore_ascii_case(&a.email)) {
            recipients.push(a);
        }
    }
    if recipients.is_empty() {
        return Err(RawError::NoRecipients);
    }
    if graph
        && from_spec
        && let Some(outside) =
            visible.iter().find(|v| !recipients.iter().any(|r| r.email.eq_ignore_ascii_case(&v.email)))
    {
        return Err(RawError::HeaderRecipientOutsideEnvelope(outside.email.clone()));
    }
    let hidden = recipients
        .iter()
        .filter(|r| !visible.iter().any(|v| v.email.eq_ignore_ascii_case(&r.email)))
        .cloned()
        .collect();
    let (bytes, message_id) = match parsed.message_id.clone() {
        Some(id) => (without(&parsed.bytes, &parsed.bcc_fields), id),
        None => {
            let mut out = format!("Message-ID: {message_id}\r\n").into_bytes();
            out.extend_from_slice(&without(&parsed.bytes, &parsed.bcc_fields));
            (out, message_id)
        }
    };
    Ok(RawOutgoing { envelope_from, recipients, hidden, bytes, message_id, utf8_headers: parsed.utf8_headers })
}

/// The byte ranges of `fields` taken out of `bytes`.
fn without(bytes: &[u8], fields: &[(usize, usize)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    for &(start, end) in fields {
        out.extend_from_slice(&bytes[at..start]);
        at = end;
    }
    out.extend_from_slice(&bytes[at..]);
    out
}

fn static_name(name: &str) -> &'static str {
    match name {
        "From" => "From",
        "Sender" => "Sender",
        "To" => "To",
        "Cc" => "Cc",
        "Bcc" => "Bcc",
        _ => "Message-ID",
    }
}

/// CRLF line endings: a bare LF becomes CRLF, a bare CR is refused, as is NUL.
fn crlf(raw: &[u8]) -> Result<Vec<u8>, RawError> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 32);
    let mut line = 1;
    for (i, &b) in raw.iter().enumerate() {
        match b {
            b'\r' if raw.get(i + 1) != Some(&b'\n') => return Err(RawError::BareCr(line)),
            b'\n' => {
                if out.last() != Some(&b'\r') {
                    out.push(b'\r');
                }
                out.push(b'\n');
                line += 1;
            }
            0 => return Err(RawError::Nul(line)),
            _ => out.push(b),
        }
    }
    Ok(out)
}

/// The fields of the header section, where it ends (just past its last CRLF, before the empty
/// line), and whether it has UTF-8.
fn scan_headers(bytes: &[u8]) -> Result<(Vec<Field>, usize, bool), RawError> {
    if bytes.is_empty() || bytes.starts_with(b"\r\n") {
        return Err(RawError::NoHeaders);
    }
    let mut fields: Vec<Field> = Vec::new();
    let mut utf8 = false;
    let mut at = 0;
    let mut number = 0;
    loop {
        number += 1;
        let Some(len) = bytes[at..].windows(2).position(|w| w == b"\r\n") else {
            return Err(RawError::NoSeparator);
        };
        let line = &bytes[at..at + len];
        let next = at + len + 2;
        if line.is_empty() {
            return Ok((fields, at, utf8));
        }
        if line.len() > MAX_LINE {
            return Err(RawError::LongLine(number));
        }
        if !line.is_ascii() {
            if std::str::from_utf8(line).is_err() {
                return Err(RawError::EightBitHeader(number));
            }
            utf8 = true;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            match fields.last_mut() {
                Some(f) => f.end = next,
                None => return Err(RawError::LeadingContinuation),
            }
        } else {
            let colon = line.iter().position(|&b| b == b':').ok_or(RawError::BadHeaderLine(number))?;
            let name = &line[..colon];
            if name.is_empty() || !name.iter().all(|&b| (33..=126).contains(&b)) {
                return Err(RawError::BadHeaderLine(number));
            }
            fields.push(Field {
                name: String::from_utf8_lossy(name).into_owned(),
                start: at,
                value: at + colon + 1,
                end: next,
            });
        }
        at = next;
    }
}

/// The body's lines must fit SMTP.
fn check_body(bytes: &[u8], header_end: usize) -> Result<(), RawError> {
    let header_lines = bytes[..header_end].windows(2).filter(|w| w == b"\r\n").count();
    // The empty line after the header section is line header_lines + 1.
    let body = &bytes[header_end + 2..];
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > MAX_LINE {
            return Err(RawError::LongLine(header_lines + 2 + i));
        }
    }
    Ok(())
}

/// The addresses of an address field, each checked as a mailbox.
fn addresses(field: &'static str, list: Option<&mail_parser::Address<'_>>) -> Result<Vec<Address>, RawError> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for addr in list.iter() {
        let email = addr.address().ok_or(RawError::BadAddress(field))?;
        let mut mailbox = parse_mailbox(email.trim()).map_err(|_| RawError::BadAddress(field))?;
        // The display name as decoded, for what the status and Graph show; the bytes keep theirs.
        mailbox.name = addr.name().map(str::trim).filter(|n| !n.is_empty()).map(str::to_string);
        out.push(mailbox);
    }
    Ok(out)
}

/// The `<left@right>` of a Message-ID field's value (folded or not).
fn message_id(value: &[u8]) -> Result<String, RawError> {
    let text = std::str::from_utf8(value).map_err(|_| RawError::BadMessageId)?;
    let id = text.split_whitespace().collect::<Vec<_>>();
    let [id] = id.as_slice() else {
        return Err(RawError::BadMessageId);
    };
    let inner = id.strip_prefix('<').and_then(|s| s.strip_suffix('>')).ok_or(RawError::BadMessageId)?;
    let ok = inner.split_once('@').is_some_and(|(l, r)| !l.is_empty() && !r.is_empty())
        && inner.is_ascii()
        && !inner.contains(['<', '>', '"', '\\'])
        && !inner.chars().any(|c| c.is_ascii_control());
    if ok { Ok((*id).to_string()) } else { Err(RawError::BadMessageId) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &str = "From: Alerts <alerts@contoso.com>\r\nTo: Ops <ops@contoso.com>, dev@contoso.com\r\n\
                       Cc: lead@contoso.com\r\nBcc: audit@contoso.com,\r\n secret-audit@contoso.com\r\n\
                       Subject: Deploy\r\nX-Run: 1\r\n\r\nHello\r\n";

    fn mailbox(s: &str) -> Address {
        parse_mailbox(s).unwrap()
    }

    fn emails(list: &[Address]) -> Vec<&str> {
        list.iter().map(|a| a.email.as_str()).collect()
    }

    #[test]
    fn a_message_is_read() {
        let p = parse(MSG.as_bytes()).unwrap();
        assert_eq!(emails(&p.from), ["alerts@contoso.com"]);
        assert_eq!(p.from[0].name.as_deref(), Some("Alerts"));
        assert_eq!(emails(&p.to), ["ops@contoso.com", "dev@contoso.com"]);
        assert_eq!(emails(&p.cc), ["lead@contoso.com"]);
        assert_eq!(emails(&p.bcc), ["audit@contoso.com", "secret-audit@contoso.com"]);
        assert_eq!(p.message_id, None);
        assert!(!p.utf8_headers);
        assert_eq!(p.len(), MSG.len());
    }

    #[test]
    fn lf_line_endings_become_crlf() {
        let lf = MSG.replace("\r\n", "\n");
        let p = parse(lf.as_bytes()).unwrap();
        assert_eq!(p.bytes, MSG.as_bytes());
    }

    #[test]
    fn malformed_messages_are_refused_naming_the_line_not_the_content() {
        let cases: &[(&str, RawError)] = &[
            ("", RawError::NoHeaders),
            ("\r\nbody\r\n", RawError::NoHeaders),
            ("From: a@contoso.com\r\nTo: b@contoso.com\r\n", RawError::NoSeparator),
            ("From: a@contoso.com\r\nTo: b@contoso.com", RawError::NoSeparator),
            ("From: a@contoso.com\r\nnot a header\r\n\r\nx\r\n", RawError::BadHeaderLine(2)),
            ("From: a@contoso.com\r\nBad Name: x\r\n\r\nx\r\n", RawError::BadHeaderLine(2)),
            ("From: a@contoso.com\r\n: x\r\n\r\nx\r\n", RawError::BadHeaderLine(2)),
            (" folded: x\r\nFrom: a@contoso.com\r\n\r\nx\r\n", RawError::LeadingContinuation),
            ("From: a@contoso.com\rTo: b@contoso.com\r\n\r\nx\r\n", RawError::BareCr(1)),
            ("From: a@contoso.com\r\nX: \0\r\n\r\nx\r\n", RawError::Nul(2)),
            ("To: b@contoso.com\r\n\r\nx\r\n", RawError::FieldCount { name: "From", count: 0, wanted: "exactly one" }),
            (
                "From: a@contoso.com\r\nFrom: c@contoso.com\r\n\r\nx\r\n",
                RawError::FieldCount { name: "From", count: 2, wanted: "exactly one" },
            ),
            ("From: nobody\r\nTo: b@contoso.com\r\n\r\nx\r\n", RawError::BadAddress("From")),
            ("From: a@contoso.com\r\nTo: b@@contoso\r\n\r\nx\r\n", RawError::BadAddress("To")),
            ("From: a@contoso.com\r\nMessage-ID: no-brackets@x\r\n\r\nx\r\n", RawError::BadMessageId),
            ("From: a@contoso.com\r\nMessage-ID: <a@x> <b@x>\r\n\r\nx\r\n", RawError::BadMessageId),
        ];
        for (raw, want) in cases {
            assert_eq!(parse(raw.as_bytes()).err().as_ref(), Some(want), "{raw:?}");
        }
        let long = format!("From: a@contoso.com\r\nX-Long: {}\r\n\r\nx\r\n", "a".repeat(MAX_LINE));
        assert_eq!(parse(long.as_bytes()).err(), Some(RawError::LongLine(2)));
        let long_body = format!("From: a@contoso.com\r\n\r\nok\r\n{}\r\n", "b".repeat(MAX_LINE + 1));
        assert_eq!(parse(long_body.as_bytes()).err(), Some(RawError::LongLine(4)));
        let latin1 = b"From: a@contoso.com\r\nSubject: caf\xe9\r\n\r\nx\r\n";
        assert_eq!(parse(latin1).err(), Some(RawError::EightBitHeader(2)));
        // No error message repeats what the line held.
        let e = parse(b"From: a@contoso.com\r\nsecret-token-value\r\n\r\nx\r\n").unwrap_err();
        assert!(!e.to_string().contains("secret-token-value"), "{e}");
    }

    #[test]
    fn utf8_headers_are_accepted_and_need_smtputf8() {
        let p = parse("From: Zoë <a@contoso.com>\r\nSubject: Café\r\n\r\nx\r\n".as_bytes()).unwrap();
        assert!(p.utf8_headers);
        // 8-bit bodies are the transport's business (8BITMIME), not a parse error.
        assert!(!parse("From: a@contoso.com\r\n\r\ncafé\r\n".as_bytes()).unwrap().utf8_headers);
    }

    #[test]
    fn groups_and_encoded_names_are_read() {
        let p = parse(
            "From: =?utf-8?q?Zo=C3=AB?= <a@contoso.com>\r\nTo: undisclosed-recipients:;\r\n\
             Cc: Team: x@contoso.com, \"Doe, J\" <y@contoso.com>;\r\n\r\nx\r\n"
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(p.from[0].name.as_deref(), Some("Zoë"));
        assert!(p.to.is_empty());
        assert_eq!(emails(&p.cc), ["x@contoso.com", "y@contoso.com"]);
    }

    #[test]
    fn the_envelope_comes_from_the_spec_else_from_the_headers() {
        let from = mailbox("alerts@contoso.com");
        let p = parse(MSG.as_bytes()).unwrap();
        let out = prepare(p.clone(), from.clone(), vec![], "<id@contoso.com>".into(), false).unwrap();
        assert_eq!(
            emails(&out.recipients),
            ["ops@contoso.com", "dev@contoso.com", "lead@contoso.com", "audit@contoso.com", "secret-audit@contoso.com"]
        );
        assert_eq!(emails(&out.hidden), ["audit@contoso.com", "secret-audit@contoso.com"]);
        let spec = vec![mailbox("only@contoso.com"), mailbox("ONLY@contoso.com"), mailbox("ops@contoso.com")];
        let out = prepare(p.clone(), from.clone(), spec.clone(), "<id@contoso.com>".into(), false).unwrap();
        assert_eq!(emails(&out.recipients), ["only@contoso.com", "ops@contoso.com"], "each once");
        assert_eq!(emails(&out.hidden), ["only@contoso.com"]);
        // Graph delivers to the header recipients whatever the envelope says.
        let e = prepare(p, from.clone(), spec, "<id@contoso.com>".into(), true).unwrap_err();
        assert_eq!(e, RawError::HeaderRecipientOutsideEnvelope("dev@contoso.com".into()));
        let none = parse(b"From: a@contoso.com\r\nSubject: x\r\n\r\nx\r\n").unwrap();
        assert_eq!(prepare(none, from, vec![], "<i@x>".into(), false).unwrap_err(), RawError::NoRecipients);
    }

    #[test]
    fn bcc_is_taken_out_and_graph_gets_the_hidden_recipients_back() {
        let from = mailbox("alerts@contoso.com");
        let out = prepare(parse(MSG.as_bytes()).unwrap(), from, vec![], "<id@contoso.com>".into(), false).unwrap();
        let text = String::from_utf8(out.bytes.clone()).unwrap();
        assert!(!text.to_ascii_lowercase().contains("bcc"), "{text}");
        assert!(!text.contains("audit@"), "{text}");
        // Everything else is as it was, after the inserted Message-ID.
        let expected = MSG.replace("Bcc: audit@contoso.com,\r\n secret-audit@contoso.com\r\n", "");
        assert_eq!(text, format!("Message-ID: <id@contoso.com>\r\n{expected}"));
        let graph = String::from_utf8(out.for_graph()).unwrap();
        let parsed = MessageParser::default().parse(graph.as_bytes()).unwrap();
        let bcc: Vec<_> = parsed.bcc().unwrap().iter().filter_map(|a| a.address()).collect();
        assert_eq!(bcc, ["audit@contoso.com", "secret-audit@contoso.com"]);
    }

    #[test]
    fn a_message_id_is_kept_when_present_and_inserted_when_missing() {
        let from = mailbox("alerts@contoso.com");
        let with = format!("Message-ID:\r\n <own.1@build.contoso.com>\r\n{MSG}");
        let p = parse(with.as_bytes()).unwrap();
        assert_eq!(p.message_id.as_deref(), Some("<own.1@build.contoso.com>"));
        let out = prepare(p, from.clone(), vec![], "<assigned@contoso.com>".into(), false).unwrap();
        assert_eq!(out.message_id, "<own.1@build.contoso.com>");
        assert!(out.bytes.starts_with(b"Message-ID:\r\n <own.1@build.contoso.com>\r\nFrom:"));
        assert_eq!(out.bytes.windows(11).filter(|w| w.eq_ignore_ascii_case(b"message-id:")).count(), 1);
        let out =
            prepare(parse(MSG.as_bytes()).unwrap(), from, vec![], "<assigned@contoso.com>".into(), false).unwrap();
        assert_eq!(out.message_id, "<assigned@contoso.com>");
        assert!(out.bytes.starts_with(b"Message-ID: <assigned@contoso.com>\r\nFrom: Alerts"));
    }

    #[test]
    fn debug_output_never_shows_the_message() {
        let p = parse(MSG.as_bytes()).unwrap();
        assert!(!format!("{p:?}").contains("Deploy"));
        let out = prepare(p, mailbox("a@contoso.com"), vec![], "<i@x>".into(), false).unwrap();
        assert!(!format!("{out:?}").contains("Hello"));
    }
}
