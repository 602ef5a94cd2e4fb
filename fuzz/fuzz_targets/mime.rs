//! MIME building from arbitrary messages: never panics; what it builds has only CRLF line ends
//! in its header block, no header line over 998 octets, and no header that the message did not
//! ask for (so nothing a user wrote can inject one).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mailroom_fuzz_support::{check_built, outgoing};

mod mailroom_fuzz_support {
    include!("../support.rs");
}

#[derive(Arbitrary, Debug)]
struct Spec {
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
}

fuzz_target!(|spec: Spec| {
    let message = outgoing(
        spec.from,
        spec.to,
        spec.cc,
        spec.bcc,
        spec.reply_to,
        spec.subject,
        spec.text,
        spec.html,
        spec.attachments,
        spec.headers,
        spec.importance,
        spec.message_id,
    );
    if let Ok(bytes) = mailroom::transport::mime::build_bytes(&message) {
        check_built(&message, &bytes);
    }
});
