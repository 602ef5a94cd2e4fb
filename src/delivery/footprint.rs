//! How many bytes a message holds while it is built and sent: what it asks of the memory budget.
//!
//! What a message holds, in order:
//! - while its Secret and ConfigMap attachments are read, one source at a time: the API server's
//!   JSON answer, the parsed object and the copy of the key's bytes ([`FETCH_WORK`]);
//! - the whole object as the claim returns it (bodies, inline attachments in base64) and, when it
//!   names a template, the rendered copy of its spec;
//! - the attachments' bytes and the bodies in the [`OutgoingMessage`];
//! - the encoding: over SMTP the MIME parts in base64 and the formatted message (each about 4/3
//!   of the content plus line breaks); over Graph the request bodies, which are at most
//!   [`MAX_REQUEST_BYTES`] each (a larger message goes as a draft, one request per attachment,
//!   uploads in chunks), so its encoding costs at most [`GRAPH_WORK`] whatever its size.
//!
//! Before anything is read, only the cache's copy of the message is known (it keeps no bodies and
//! no inline data), so the first estimate takes the most each part can be: [`MAX_SOURCE_BYTES`]
//! per referenced attachment, [`MAX_OBJECT_BYTES`] for the object. Once the message is built the
//! reservation shrinks to what it really holds.

use crate::api::EmailMessageSpec;
use crate::controller::template::MAX_RENDERED_BODY_BYTES;
use crate::transport::OutgoingMessage;
use crate::transport::graph::MAX_REQUEST_BYTES;

const MIB: u64 = 1024 * 1024;

/// The most a Secret's or ConfigMap's data may be: Kubernetes refuses larger ones.
pub const MAX_SOURCE_BYTES: u64 = MIB;
/// The most an EmailMessage may be: kube-apiserver refuses larger request bodies (3 MiB; etcd's
/// own default limit is 1.5 MiB).
pub const MAX_OBJECT_BYTES: u64 = 3 * MIB;
/// Reading one referenced attachment: the JSON answer (base64: 4/3 of the data), the parsed
/// object and the copy of the key's bytes.
pub const FETCH_WORK: u64 = 4 * MAX_SOURCE_BYTES;
/// Encoding for Graph: a request body being serialised (its base64 strings, and the output buffer
/// at up to twice its length while it grows), beside the draft's own body and an upload chunk.
pub const GRAPH_WORK: u64 = 6 * MAX_REQUEST_BYTES as u64;
/// What every message holds besides its content: addresses, headers, status, buffers.
pub const PER_MESSAGE: u64 = 256 * 1024;
/// Metadata of the object besides the spec's bulky fields (names, labels, status).
const OBJECT_OVERHEAD: u64 = 16 * 1024;

/// How a message is encoded on its way out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// One RFC 5322 message over SMTP.
    Smtp,
    /// Microsoft Graph requests.
    Graph,
}

/// The length of `n` bytes in base64 as MIME carries it: 76 characters and CRLF for each 57 bytes.
pub fn mime_base64_len(n: u64) -> u64 {
    n.div_ceil(57) * 78
}

/// The bytes a message holds while sent, from its content (attachments and bodies) and the size of
/// its object as the claim returned it.
pub fn while_sending(encoding: Encoding, content: u64, object: u64) -> u64 {
    let encoded = mime_base64_len(content);
    let work = match encoding {
        // The MIME parts in base64 and the formatted message beside them.
        Encoding::Smtp => 2 * encoded,
        // A message that fits one request: its parts, the message, its base64 and the JSON
        // buffer; a larger one is sent in requests of bounded size.
        Encoding::Graph => (4 * encoded).min(GRAPH_WORK),
    };
    // The object, and the copy of its spec that a template renders into.
    2 * object + content + work + PER_MESSAGE
}

/// The most a message may hold, judged from the cache's copy of it (no bodies, no inline data):
/// what it asks for before it reads anything.
pub fn before_reading(encoding: Encoding, spec: &EmailMessageSpec) -> u64 {
    // Inline data is part of the object (the cache's copy has none of it).
    let referenced =
        spec.attachments.iter().filter(|a| a.secret_ref.is_some() || a.config_map_ref.is_some()).count() as u64;
    let rendered = if spec.template_ref.is_some() { 2 * MAX_RENDERED_BODY_BYTES as u64 } else { 0 };
    // A raw message is one more source: its Secret, at most as large as any.
    let referenced = referenced + u64::from(spec.raw.is_some());
    let fetch = if referenced > 0 { FETCH_WORK } else { 0 };
    let content = referenced * MAX_SOURCE_BYTES + MAX_OBJECT_BYTES + rendered;
    fetch + while_sending(encoding, content, MAX_OBJECT_BYTES)
}

/// What a built message holds: `spec` is the whole object's, `message` what was built from it.
pub fn of_built(encoding: Encoding, spec: &EmailMessageSpec, message: &OutgoingMessage) -> u64 {
    let content = message.attachments.iter().map(|a| a.bytes.len() as u64).sum::<u64>()
        + message.text.as_ref().map_or(0, |t| t.len() as u64)
        + message.html.as_ref().map_or(0, |h| h.len() as u64);
    while_sending(encoding, content, object_bytes(spec))
}

/// What a raw message holds once read and prepared: `raw_bytes` is its size (the bytes to send;
/// the Secret's copy is gone by then, but the parsed and the prepared copy overlap for a while, so
/// it counts twice), encoded as its transport encodes it.
pub fn of_raw(encoding: Encoding, spec: &EmailMessageSpec, raw_bytes: u64) -> u64 {
    raw_bytes + while_sending(encoding, raw_bytes, object_bytes(spec))
}

/// The bulky part of an object: its bodies, inline attachment data and headers, and a margin for
/// the rest.
pub fn object_bytes(spec: &EmailMessageSpec) -> u64 {
    let inline: u64 = spec.attachments.iter().filter_map(|a| a.data.as_ref()).map(|d| d.len() as u64).sum();
    let headers: u64 = spec.headers.iter().map(|(k, v)| (k.len() + v.0.len()) as u64).sum();
    let values = spec.values.as_ref().map_or(0, |v| serde_json::to_string(v).map_or(0, |s| s.len() as u64));
    inline
        + headers
        + values
        + spec.subject.len() as u64
        + spec.body.text.as_ref().map_or(0, |t| t.len() as u64)
        + spec.body.html.as_ref().map_or(0, |h| h.len() as u64)
        + OBJECT_OVERHEAD
}

/// A byte count as given on the command line: a whole number with an optional binary (`Ki`, `Mi`,
/// `Gi`) or decimal (`k`, `M`, `G`) suffix, as Kubernetes writes quantities; at least one byte.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let unit: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        other => return Err(format!("unknown unit {other:?} (use Ki, Mi, Gi, k, M or G)")),
    };
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a byte count such as 512Mi"))?;
    match n.checked_mul(unit) {
        Some(0) => Err("the budget must be at least one byte".into()),
        Some(bytes) => Ok(bytes),
        None => Err(format!("{text} is too large")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{AttachmentData, parse_mailbox};

    fn spec(yaml: &str) -> EmailMessageSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn message(attachments: Vec<usize>) -> OutgoingMessage {
        OutgoingMessage {
            from: parse_mailbox("a@contoso.com").unwrap(),
            to: vec![parse_mailbox("b@contoso.com").unwrap()],
            cc: vec![],
            bcc: vec![],
            reply_to: vec![],
            subject: "report".into(),
            text: Some("see attached".into()),
            html: None,
            attachments: attachments
                .into_iter()
                .enumerate()
                .map(|(i, n)| AttachmentData {
                    name: format!("a{i}.bin"),
                    content_type: "application/octet-stream".into(),
                    // Not ASCII, so that the MIME encoding is base64, its most common and largest.
                    bytes: (0..n).map(|j| (j * 131 % 251) as u8 | 0x80).collect(),
                })
                .collect(),
            headers: vec![],
            importance: Default::default(),
            message_id: "<m@contoso.com>".into(),
        }
    }

    #[test]
    fn mime_base64_counts_the_line_breaks() {
        assert_eq!(mime_base64_len(0), 0);
        assert_eq!(mime_base64_len(57), 78);
        assert_eq!(mime_base64_len(58), 156);
        assert_eq!(mime_base64_len(57 * 1000), 78_000);
    }

    #[test]
    fn the_smtp_estimate_covers_the_formatted_message() {
        // The estimate's encoding term is at least what the MIME builder really produces.
        for sizes in [vec![], vec![1], vec![1000, 5], vec![300_000; 4], vec![1024 * 1024; 3]] {
            let m = message(sizes);
            let content = m.attachments.iter().map(|a| a.bytes.len() as u64).sum::<u64>() + 12;
            let formatted = crate::transport::mime::build_bytes(&m).unwrap().len() as u64;
            let parts = formatted; // lettre keeps each part encoded, about as long as the whole.
            let estimate = while_sending(Encoding::Smtp, content, 0);
            assert!(estimate >= content + formatted + parts, "{estimate} < {content} + 2 x {formatted}");
            // And it is not wildly more: within a quarter of the content plus the fixed part.
            assert!(estimate <= content + 2 * formatted + content / 4 + PER_MESSAGE + 64 * 1024, "{estimate}");
        }
    }

    #[test]
    fn the_graph_estimate_is_bounded_whatever_the_size() {
        let small = while_sending(Encoding::Graph, 100_000, 0);
        assert!(small >= 100_000 + 4 * 133_000, "{small}");
        // A 100 MiB message costs its content and a bounded encoding, not three copies of it.
        let big = while_sending(Encoding::Graph, 100 * MIB, 0);
        assert_eq!(big, 100 * MIB + GRAPH_WORK + PER_MESSAGE);
        let smtp = while_sending(Encoding::Smtp, 100 * MIB, 0);
        assert!(smtp > 3 * 100 * MIB, "{smtp}");
    }

    #[test]
    fn before_reading_takes_the_most_each_part_may_be_and_the_built_message_less() {
        let cached = spec(
            "profileRef: {name: p}\nto: [o@contoso.com]\nsubject: ''\nbody: {}\nattachments:\n\
             - {name: a.csv, secretRef: {name: s, key: k}}\n- {name: b.txt, configMapRef: {name: c, key: k}}\n\
             - {name: c.txt}\n",
        );
        let upfront = before_reading(Encoding::Smtp, &cached);
        // Two referenced sources at their maximum, the object at its maximum, reading one source.
        let content = 2 * MAX_SOURCE_BYTES + MAX_OBJECT_BYTES;
        assert_eq!(upfront, FETCH_WORK + while_sending(Encoding::Smtp, content, MAX_OBJECT_BYTES));
        // The cache's copy has no inline data (c.txt above); the whole object has it.
        let whole = spec(
            "profileRef: {name: p}\nto: [o@contoso.com]\nsubject: report\nbody: {text: see attached}\n\
             attachments:\n- {name: a.csv, secretRef: {name: s, key: k}}\n\
             - {name: b.txt, configMapRef: {name: c, key: k}}\n- {name: c.txt, data: aGVsbG8K}\n",
        );
        let built = message(vec![1024 * 1024, 1024 * 1024, 6]);
        let exact = of_built(Encoding::Smtp, &whole, &built);
        assert!(exact < upfront, "{exact} >= {upfront}");
        assert!(exact > 2 * 1024 * 1024, "{exact}");
        // A template's rendered bodies may be larger than the message's own.
        let templated = spec("profileRef: {name: p}\nto: [o@contoso.com]\ntemplateRef: {name: t}\n");
        assert!(
            before_reading(Encoding::Graph, &templated)
                > before_reading(
                    Encoding::Graph,
                    &spec("profileRef: {name: p}\nto: [o@contoso.com]\nsubject: s\nbody: {text: t}\n")
                )
        );
    }

    #[test]
    fn a_raw_message_counts_its_secret_before_reading_and_its_size_once_read() {
        let plain = spec("profileRef: {name: p}\nto: [o@contoso.com]\nsubject: s\nbody: {text: t}\n");
        let raw = spec("profileRef: {name: p}\nraw: {secretRef: {name: eml}}\n");
        let upfront = before_reading(Encoding::Smtp, &raw);
        assert_eq!(
            upfront,
            FETCH_WORK + while_sending(Encoding::Smtp, MAX_SOURCE_BYTES + MAX_OBJECT_BYTES, MAX_OBJECT_BYTES)
        );
        assert!(upfront > before_reading(Encoding::Smtp, &plain));
        let small = of_raw(Encoding::Smtp, &raw, 2_000);
        let large = of_raw(Encoding::Smtp, &raw, MAX_SOURCE_BYTES);
        assert!(small < upfront && large < upfront, "{small} {large} {upfront}");
        // Its bytes, their encoding and the prepared copy.
        assert!(large > 3 * MAX_SOURCE_BYTES, "{large}");
        assert!(large - small > 3 * (MAX_SOURCE_BYTES - 2_000), "{large} {small}");
    }

    #[test]
    fn a_message_without_attachments_is_small_once_built() {
        let whole = spec("profileRef: {name: p}\nto: [o@contoso.com]\nsubject: hi\nbody: {text: hello}\n");
        let n = of_built(Encoding::Graph, &whole, &message(vec![]));
        assert!(n < 512 * 1024, "{n}");
    }

    #[test]
    fn byte_counts_read_like_kubernetes_quantities() {
        assert_eq!(parse_bytes("512Mi"), Ok(512 * MIB));
        assert_eq!(parse_bytes("1Gi"), Ok(1024 * MIB));
        assert_eq!(parse_bytes("64Ki"), Ok(64 * 1024));
        assert_eq!(parse_bytes("500M"), Ok(500_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("12MB").unwrap_err().contains("unknown unit"));
        assert!(parse_bytes("Mi").is_err());
        assert!(parse_bytes("-1Mi").is_err());
        assert!(parse_bytes("99999999999999Gi").unwrap_err().contains("too large"));
    }
}
