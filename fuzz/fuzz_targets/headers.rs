//! Header validation: whatever the operator's checks accept before the claim (subject and custom
//! headers) the MIME builder accepts too, and the result carries each header exactly as one
//! well-formed line, with nothing injected.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mailroom_fuzz_support::check_built;

mod mailroom_fuzz_support {
    include!("../support.rs");
}

#[derive(Arbitrary, Debug)]
struct Input {
    subject: String,
    headers: Vec<(String, String)>,
}

fuzz_target!(|input: Input| {
    let spec = mailroom::api::EmailMessageSpec {
        profile_ref: mailroom::api::ProfileRef { kind: None, name: "p".into() },
        from: None,
        to: vec!["ops@contoso.com".into()],
        cc: vec![],
        bcc: vec![],
        reply_to: vec![],
        subject: input.subject,
        body: mailroom::api::Body { text: Some("hello".into()), html: None },
        attachments: vec![],
        headers: input.headers.into_iter().map(|(k, v)| (k, mailroom::api::HeaderValue(v))).collect(),
        importance: None,
        delivery: None,
        ttl_seconds_after_finished: None,
    };
    let Ok(from) = mailroom::transport::parse_mailbox("alerts@contoso.com") else {
        return;
    };
    let Ok(message) = mailroom::controller::outgoing::build(&spec, from, vec![], "<id@contoso.com>".into(), 1 << 20)
    else {
        return;
    };
    let bytes = mailroom::transport::mime::build_bytes(&message)
        .unwrap_or_else(|e| panic!("accepted before the claim but refused by the MIME builder: {e}"));
    check_built(&message, &bytes);
});
