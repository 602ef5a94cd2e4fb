//! Address parsing: never panics; a parsed mailbox re-renders and re-parses to the same thing,
//! and converts to lettre's types without error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailroom::transport::parse_mailbox;

fuzz_target!(|input: &str| {
    let Ok(address) = parse_mailbox(input) else {
        return;
    };
    let shown = address.to_string();
    let again = parse_mailbox(&shown).unwrap_or_else(|e| panic!("{input:?} rendered as {shown:?} does not parse: {e}"));
    assert_eq!(again, address, "{input:?} rendered as {shown:?}");
    assert!(address.to_lettre().is_ok(), "{input:?} parsed but lettre refuses it");
    assert!(!shown.contains(['\r', '\n', '\0']));
});
