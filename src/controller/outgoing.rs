//! From an `EmailMessage` spec to an [`OutgoingMessage`]: the sender, the Message-ID, the
//! addresses, and the attachments' bytes.

use base64::Engine;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};

use super::reason::Reason;
use crate::api::{Attachment, EmailMessageSpec};
use crate::transport::mime::{self, MimeError};
use crate::transport::{AttachmentData, OutgoingMessage, parse_mailbox};

/// The largest message, attachments included, that any transport accepts (Graph: 150 MB).
pub const MAX_MESSAGE_BYTES: usize = 150 * 1024 * 1024;
/// The largest message over SMTP (Exchange Online accepts 35 MB after base64 encoding).
pub const MAX_SMTP_MESSAGE_BYTES: usize = 25 * 1024 * 1024;

/// Why a message cannot be built; each ends the message `Failed`, except a missing attachment
/// source, which waits.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// An address could not be parsed.
    #[error("invalid address in {field}: {reason}")]
    Address {
        /// to, cc, bcc, replyTo or from.
        field: &'static str,
        /// The parser's words.
        reason: String,
    },
    /// A header name or value is unsafe.
    #[error("invalid header {name}: {reason}")]
    Header {
        /// The header name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The subject has a line break.
    #[error("subject must not contain CR, LF, NUL or other control characters")]
    Subject,
    /// Inline attachment data is not base64.
    #[error("attachment {name}: data is not valid base64: {reason}")]
    Base64 {
        /// The attachment.
        name: String,
        /// The decoder's words.
        reason: String,
    },
    /// An attachment's content type is not a MIME type (or would break its header).
    #[error("attachment {name}: contentType {content_type:?} is not a MIME type such as text/csv")]
    ContentType {
        /// The attachment.
        name: String,
        /// The rejected content type.
        content_type: String,
    },
    /// An attachment name is unsafe.
    #[error("attachment name {0:?} must be a plain file name (no path separators, control characters or ..)")]
    AttachmentName(String),
    /// The Secret or ConfigMap an attachment names does not exist (yet).
    #[error("attachment {name}: {kind} {source_name} not found in namespace {namespace}")]
    SourceNotFound {
        /// The attachment.
        name: String,
        /// Secret or ConfigMap.
        kind: &'static str,
        /// Its name.
        source_name: String,
        /// The message's namespace.
        namespace: String,
    },
    /// The key is not in the Secret or ConfigMap.
    #[error("attachment {name}: key {key} not found in {kind} {source_name}")]
    KeyNotFound {
        /// The attachment.
        name: String,
        /// Secret or ConfigMap.
        kind: &'static str,
        /// Its name.
        source_name: String,
        /// The missing key.
        key: String,
    },
    /// The message is larger than the transport accepts.
    #[error("message is {size} bytes, over the limit of {limit} bytes for this transport")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

impl BuildError {
    /// A CamelCase reason for conditions and Events.
    pub fn reason(&self) -> Reason {
        match self {
            BuildError::Address { .. } => Reason::InvalidAddress,
            BuildError::Header { .. } => Reason::InvalidHeader,
            BuildError::Subject => Reason::InvalidSubject,
            BuildError::Base64 { .. } => Reason::InvalidAttachment,
            BuildError::ContentType { .. } => Reason::InvalidAttachment,
            BuildError::AttachmentName(_) => Reason::InvalidAttachment,
            BuildError::SourceNotFound { .. } => Reason::AttachmentNotFound,
            BuildError::KeyNotFound { .. } => Reason::AttachmentNotFound,
            BuildError::TooLarge { .. } => Reason::MessageTooLarge,
        }
    }

    /// Whether waiting can help (the source may be created later).
    pub fn may_resolve_later(&self) -> bool {
        matches!(self, BuildError::SourceNotFound { .. } | BuildError::KeyNotFound { .. })
    }
}

/// The bare address of the sender: the spec's `from`, else the profile's default.
pub fn sender(spec: &EmailMessageSpec, default: &str) -> Result<crate::transport::Address, BuildError> {
    let raw = spec.from.as_deref().unwrap_or(default);
    parse_mailbox(raw).map_err(|e| BuildError::Address { field: "from", reason: e.to_string() })
}

/// The stable Message-ID of a message: its uid at the sender's domain.
pub fn message_id(uid: &str, sender_email: &str) -> String {
    let domain = sender_email.rsplit_once('@').map(|(_, d)| d).filter(|d| !d.is_empty()).unwrap_or("mailroom.dev");
    format!("<{uid}.mailroom@{domain}>")
}

/// Whether an attachment name is a plain file name.
pub fn safe_attachment_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.chars().any(|c| c.is_control() || crate::transport::address::is_invisible_format(c))
}

/// The attachment's content type: as given, else guessed from its name.
pub fn content_type(attachment: &Attachment) -> String {
    match &attachment.content_type {
        Some(ct) if !ct.trim().is_empty() => ct.trim().to_string(),
        _ => guessed_content_type(&attachment.name),
    }
}

/// The content type the recipient sees for a file of this name.
pub fn guessed_content_type(name: &str) -> String {
    mime_guess::from_path(name).first_or_octet_stream().essence_str().to_string()
}

/// Decodes inline attachment data (standard base64; whitespace ignored).
pub fn decode_inline(name: &str, data: &str) -> Result<Vec<u8>, BuildError> {
    let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|e| BuildError::Base64 { name: name.to_string(), reason: e.to_string() })
}

/// Builds the message from the spec and the attachment bytes (in spec order).
pub fn build(
    spec: &EmailMessageSpec,
    from: crate::transport::Address,
    attachments: Vec<AttachmentData>,
    message_id: String,
    limit: usize,
) -> Result<OutgoingMessage, BuildError> {
    let parse_all = |field: &'static str, list: &[String]| {
        list.iter()
            .map(|a| parse_mailbox(a).map_err(|e| BuildError::Address { field, reason: e.to_string() }))
            .collect::<Result<Vec<_>, _>>()
    };
    if mime::has_control(&spec.subject) {
        return Err(BuildError::Subject);
    }
    let mut headers = Vec::with_capacity(spec.headers.len());
    for (name, value) in &spec.headers {
        if !header_name_ok(name) {
            return Err(BuildError::Header { name: name.clone(), reason: "names must be X- headers".into() });
        }
        let value = &value.0;
        if mime::has_control(value) {
            return Err(BuildError::Header {
                name: name.clone(),
                reason: "values must not contain CR, LF, NUL or other control characters".into(),
            });
        }
        headers.push((name.clone(), value.clone()));
    }
    // What the transport would refuse after the claim (a duplicate or reserved name) fails here,
    // before an attempt is counted.
    if let Err(e) = mime::custom_headers(&headers) {
        let name = match &e {
            MimeError::HeaderName(n)
            | MimeError::HeaderValue(n)
            | MimeError::ReservedHeader(n)
            | MimeError::DuplicateHeader(n) => n.clone(),
            _ => String::new(),
        };
        return Err(BuildError::Header { name, reason: e.to_string() });
    }
    for a in &attachments {
        if mime::attachment_content_type(&a.name, &a.content_type).is_err() {
            return Err(BuildError::ContentType { name: a.name.clone(), content_type: a.content_type.clone() });
        }
    }
    let size = spec.body.text.as_ref().map_or(0, String::len)
        + spec.body.html.as_ref().map_or(0, String::len)
        + attachments.iter().map(|a| a.bytes.len()).sum::<usize>();
    if size > limit {
        return Err(BuildError::TooLarge { size, limit });
    }
    Ok(OutgoingMessage {
        from,
        to: parse_all("to", &spec.to)?,
        cc: parse_all("cc", &spec.cc)?,
        bcc: parse_all("bcc", &spec.bcc)?,
        reply_to: parse_all("replyTo", &spec.reply_to)?,
        subject: spec.subject.clone(),
        text: spec.body.text.clone(),
        html: spec.body.html.clone(),
        attachments,
        headers,
        importance: spec.importance.unwrap_or_default().into(),
        message_id,
    })
}

fn header_name_ok(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("X-").or_else(|| name.strip_prefix("x-")) else {
        return false;
    };
    !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+.^_`|~-".contains(&b))
}

/// The attachments read from Secrets and ConfigMaps, in order, with `None` for an inline one:
/// its data comes with the whole object (the cache keeps none). Read before the claim, so that a
/// source that does not exist yet makes the message wait without an attempt.
pub async fn load_referenced_attachments(
    client: &Client,
    namespace: &str,
    spec: &EmailMessageSpec,
) -> Result<Result<Vec<Option<AttachmentData>>, BuildError>, kube::Error> {
    let mut out = Vec::with_capacity(spec.attachments.len());
    for a in &spec.attachments {
        if !safe_attachment_name(&a.name) {
            return Ok(Err(BuildError::AttachmentName(a.name.clone())));
        }
        let bytes = if let Some(r) = &a.secret_ref {
            let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
            let Some(secret) = api.get_opt(&r.name).await? else {
                return Ok(Err(not_found(a, "Secret", &r.name, namespace)));
            };
            // The API server returns `data` only; `stringData` is write-only.
            match secret.data.as_ref().and_then(|d| d.get(&r.key)) {
                Some(v) => v.0.clone(),
                None => return Ok(Err(key_missing(a, "Secret", &r.name, &r.key))),
            }
        } else if let Some(r) = &a.config_map_ref {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
            let Some(cm) = api.get_opt(&r.name).await? else {
                return Ok(Err(not_found(a, "ConfigMap", &r.name, namespace)));
            };
            if let Some(v) = cm.data.as_ref().and_then(|d| d.get(&r.key)) {
                v.clone().into_bytes()
            } else if let Some(v) = cm.binary_data.as_ref().and_then(|d| d.get(&r.key)) {
                v.0.clone()
            } else {
                return Ok(Err(key_missing(a, "ConfigMap", &r.name, &r.key)));
            }
        } else {
            out.push(None);
            continue;
        };
        out.push(Some(AttachmentData { name: a.name.clone(), content_type: content_type(a), bytes }));
    }
    Ok(Ok(out))
}

/// Every attachment, in order: those `referenced` already read, the inline ones decoded from the
/// whole object's `spec`.
pub fn with_inline_attachments(
    spec: &EmailMessageSpec,
    referenced: Vec<Option<AttachmentData>>,
) -> Result<Vec<AttachmentData>, BuildError> {
    if referenced.len() != spec.attachments.len() {
        return Err(BuildError::Base64 { name: String::new(), reason: "the attachments changed".into() });
    }
    spec.attachments
        .iter()
        .zip(referenced)
        .map(|(a, loaded)| match (loaded, &a.data) {
            (Some(loaded), _) => Ok(loaded),
            (None, Some(data)) => Ok(AttachmentData {
                name: a.name.clone(),
                content_type: content_type(a),
                bytes: decode_inline(&a.name, data)?,
            }),
            (None, None) => Err(BuildError::Base64 { name: a.name.clone(), reason: "no source given".into() }),
        })
        .collect()
}

fn not_found(a: &Attachment, kind: &'static str, source: &str, namespace: &str) -> BuildError {
    BuildError::SourceNotFound {
        name: a.name.clone(),
        kind,
        source_name: source.to_string(),
        namespace: namespace.to_string(),
    }
}

fn key_missing(a: &Attachment, kind: &'static str, source: &str, key: &str) -> BuildError {
    BuildError::KeyNotFound { name: a.name.clone(), kind, source_name: source.to_string(), key: key.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_uses_sender_domain() {
        assert_eq!(message_id("1234-ab", "alerts@contoso.com"), "<1234-ab.mailroom@contoso.com>");
        assert_eq!(message_id("x", "broken"), "<x.mailroom@mailroom.dev>");
    }

    #[test]
    fn attachment_names_must_be_plain() {
        assert!(safe_attachment_name("report.csv"));
        assert!(safe_attachment_name("résumé 2026.pdf"));
        for bad in ["", "..", "../etc/passwd", "a/b", "a\\b", "a\nb", "a\0b", "invoice\u{202E}fdp.exe", "a\u{200B}b"] {
            assert!(!safe_attachment_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn content_type_guessed_from_name() {
        let a = |name: &str, ct: Option<&str>| Attachment {
            name: name.into(),
            content_type: ct.map(Into::into),
            secret_ref: None,
            config_map_ref: None,
            data: Some(String::new()),
        };
        assert_eq!(content_type(&a("report.csv", None)), "text/csv");
        assert_eq!(content_type(&a("x.unknownext", None)), "application/octet-stream");
        assert_eq!(content_type(&a("x.csv", Some("text/plain"))), "text/plain");
    }

    #[test]
    fn inline_base64() {
        assert_eq!(decode_inline("h", "aGVsbG8K").unwrap(), b"hello\n");
        assert_eq!(decode_inline("h", "aGVs\nbG8K").unwrap(), b"hello\n");
        assert_eq!(decode_inline("h", "***").unwrap_err().reason(), "InvalidAttachment");
    }

    fn spec(yaml: &str) -> EmailMessageSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn try_build(spec: &EmailMessageSpec, attachments: Vec<AttachmentData>) -> Result<OutgoingMessage, BuildError> {
        let from = parse_mailbox("a@contoso.com").unwrap();
        build(spec, from, attachments, "<x@contoso.com>".into(), MAX_MESSAGE_BYTES)
    }

    #[test]
    fn build_refuses_before_the_claim_what_the_transport_would_refuse() {
        let base = "profileRef: {name: p}\nto: [o@contoso.com]\nbody: {text: hi}\n";
        let s = spec(&format!("{base}subject: \"a\\u001b[2Jb\"\n"));
        assert_eq!(try_build(&s, vec![]).unwrap_err(), BuildError::Subject);
        let s = spec(&format!("{base}headers: {{X-Run: \"a\\u0085b\"}}\n"));
        assert_eq!(try_build(&s, vec![]).unwrap_err().reason(), "InvalidHeader");
        let s = spec(&format!("{base}headers: {{X-Run: \"1\", x-run: \"2\"}}\n"));
        let e = try_build(&s, vec![]).unwrap_err();
        assert_eq!(e.reason(), "InvalidHeader");
        assert!(e.to_string().contains("more than once"), "{e}");
        let s = spec(&format!("{base}headers: {{X-Priority: \"1\"}}\n"));
        assert_eq!(try_build(&s, vec![]).unwrap_err().reason(), "InvalidHeader");
        let s = spec(base);
        let bad = AttachmentData {
            name: "a.txt".into(),
            content_type: "text/plain\r\nBcc: x@evil.example".into(),
            bytes: vec![],
        };
        let e = try_build(&s, vec![bad]).unwrap_err();
        assert_eq!(e.reason(), "InvalidAttachment");
        assert!(e.to_string().contains("contentType"), "{e}");
        let good = AttachmentData { name: "a.txt".into(), content_type: "text/plain".into(), bytes: vec![] };
        assert!(try_build(&s, vec![good]).is_ok());
    }

    #[test]
    fn header_names() {
        assert!(header_name_ok("X-Pipeline-Run"));
        assert!(header_name_ok("x-a.b_c"));
        assert!(!header_name_ok("Subject"));
        assert!(!header_name_ok("X-"));
        assert!(!header_name_ok("X-a:b"));
        assert!(!header_name_ok("X-a b"));
    }
}
