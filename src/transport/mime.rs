//! TODO
//!
//! TEMPORARY STUB for the graph branch only, so `transport::graph` compiles before the MIME
//! builder lands: on merge, take the real `mime.rs` whole and drop this file.
//! It writes a bare text/plain message and escapes nothing; do not use it to send mail.

use super::OutgoingMessage;

/// Why a message cannot be written as MIME (stub).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MimeError(pub String);

/// The RFC 5322 bytes of a message (stub: a few headers and the text body only).
pub fn build_bytes(msg: &OutgoingMessage) -> Result<Vec<u8>, MimeError> {
    let mut out = format!(
        "From: {}\r\nSubject: {}\r\nMessage-ID: {}\r\n",
        msg.from.email, msg.subject, msg.message_id
    );
    for (field, list) in [("To", &msg.to), ("Cc", &msg.cc)] {
        if !list.is_empty() {
            let emails: Vec<&str> = list.iter().map(|a| a.email.as_str()).collect();
            out.push_str(&format!("{field}: {}\r\n", emails.join(", ")));
        }
    }
    for (name, value) in &msg.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("Content-Type: text/plain; charset=utf-8\r\n\r\n");
    out.push_str(msg.text.as_deref().unwrap_or_default());
    Ok(out.into_bytes())
}
