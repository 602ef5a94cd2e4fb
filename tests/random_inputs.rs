//! A bounded random-input run of the fuzz targets' invariants on stable `cargo test`, for
//! machines where `make fuzz` cannot build (it needs cargo-fuzz and a C++ compiler for libFuzzer).
//! Not coverage-guided: inputs come from an alphabet biased towards what breaks headers (CR, LF,
//! NUL, quotes, brackets, `@`, separators, encoded words, bidi and zero-width characters).
//! Each property runs for `FUZZ_SECONDS` (default 2) and prints how many inputs it tried.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod support {
    include!("../fuzz/support.rs");
}

const PIECES: &[&str] = &[
    "a",
    "Z",
    "0",
    ".",
    "-",
    "_",
    "+",
    " ",
    "\t",
    "\r",
    "\n",
    "\r\n",
    "\0",
    "\"",
    "\\",
    "<",
    ">",
    "@",
    ",",
    ";",
    ":",
    "(",
    ")",
    "[",
    "]",
    "=?utf-8?b?",
    "?=",
    "Bcc: ",
    "x@evil.example",
    "é",
    "ü",
    "運",
    "🚀",
    "\u{202E}",
    "\u{200B}",
    "\u{85}",
    "\u{2028}",
    "\u{1b}",
    "\u{7f}",
    "\u{FFFD}",
    "xn--",
    "contoso.com",
    "X-",
    "/",
    "..",
];

fn text(rng: &mut StdRng, max: usize) -> String {
    let n = rng.random_range(0..=max);
    let mut s = String::new();
    for _ in 0..n {
        if rng.random_bool(0.1) {
            s.push_str(&"a".repeat(rng.random_range(1..200)));
        } else {
            s.push_str(PIECES[rng.random_range(0..PIECES.len())]);
        }
    }
    s
}

fn mailbox(rng: &mut StdRng) -> String {
    match rng.random_range(0..4) {
        0 => text(rng, 12),
        1 => format!("{}@{}", text(rng, 4), text(rng, 4)),
        2 => format!("{} <{}@contoso.com>", text(rng, 5), text(rng, 3)),
        _ => format!("\"{}\" <ops@{}>", text(rng, 5), text(rng, 3)),
    }
}

fn budget() -> Duration {
    Duration::from_secs(std::env::var("FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2))
}

fn seed() -> u64 {
    let seed = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("seed {seed} (rerun one with FUZZ_SEED)");
    seed
}

/// Mostly plain text, sometimes hostile: so that most inputs get past the first check.
fn mostly(rng: &mut StdRng, plain: &str, max: usize) -> String {
    if rng.random_bool(0.3) { text(rng, max) } else { plain.to_string() }
}

#[test]
fn random_addresses_round_trip() {
    let mut rng = StdRng::seed_from_u64(seed());
    let (start, mut runs, mut parsed) = (Instant::now(), 0u64, 0u64);
    while start.elapsed() < budget() {
        let input = mailbox(&mut rng);
        runs += 1;
        let Ok(address) = mailroom::transport::parse_mailbox(&input) else { continue };
        parsed += 1;
        let shown = address.to_string();
        let again = mailroom::transport::parse_mailbox(&shown)
            .unwrap_or_else(|e| panic!("{input:?} rendered as {shown:?} does not parse: {e}"));
        assert_eq!(again, address, "{input:?} rendered as {shown:?}");
        assert!(address.to_lettre().is_ok(), "{input:?}");
    }
    println!("address: {runs} inputs, {parsed} parsed, in {:?}", start.elapsed());
}

#[test]
fn random_messages_build_safe_mime() {
    let mut rng = StdRng::seed_from_u64(seed());
    let (start, mut runs, mut built) = (Instant::now(), 0u64, 0u64);
    let pair = |rng: &mut StdRng| {
        let name = rng.random_bool(0.5).then(|| mostly(rng, "Ops Team", 6));
        (name, if rng.random_bool(0.9) { format!("{}@contoso.com", mostly(rng, "ops", 2)) } else { text(rng, 6) })
    };
    while start.elapsed() < budget() {
        let list = |rng: &mut StdRng| (0..rng.random_range(0..3)).map(|_| pair(rng)).collect::<Vec<_>>();
        let headers = (0..rng.random_range(0..3))
            .map(|_| {
                (
                    if rng.random_bool(0.5) { format!("X-{}", text(&mut rng, 2)) } else { text(&mut rng, 3) },
                    text(&mut rng, 8),
                )
            })
            .collect();
        let attachments = (0..rng.random_range(0..2))
            .map(|_| {
                (
                    text(&mut rng, 4),
                    if rng.random_bool(0.5) { "text/plain".into() } else { text(&mut rng, 3) },
                    vec![0u8, 13, 10],
                )
            })
            .collect();
        let message = support::outgoing(
            pair(&mut rng),
            list(&mut rng),
            list(&mut rng),
            list(&mut rng),
            list(&mut rng),
            mostly(&mut rng, "Deploy finished ✅", 20),
            rng.random_bool(0.7).then(|| text(&mut rng, 10)),
            rng.random_bool(0.3).then(|| text(&mut rng, 10)),
            attachments,
            headers,
            rng.random(),
            if rng.random_bool(0.8) { "<id@contoso.com>".into() } else { text(&mut rng, 4) },
        );
        runs += 1;
        if let Ok(bytes) = mailroom::transport::mime::build_bytes(&message) {
            built += 1;
            support::check_built(&message, &bytes);
        }
    }
    println!("mime: {runs} inputs, {built} built, in {:?}", start.elapsed());
}

#[test]
fn random_headers_accepted_before_the_claim_build() {
    let mut rng = StdRng::seed_from_u64(seed());
    let (start, mut runs, mut accepted) = (Instant::now(), 0u64, 0u64);
    let Ok(from) = mailroom::transport::parse_mailbox("alerts@contoso.com") else { panic!("sender") };
    while start.elapsed() < budget() {
        let mut spec: mailroom::api::EmailMessageSpec =
            serde_yaml::from_str("profileRef: {name: p}\nto: [ops@contoso.com]\nbody: {text: hello}\n").expect("spec");
        spec.subject = mostly(&mut rng, "Deploy finished ✅", 20);
        for _ in 0..rng.random_range(0..4) {
            let name =
                if rng.random_bool(0.8) { format!("X-{}", mostly(&mut rng, "Run", 2)) } else { text(&mut rng, 3) };
            spec.headers.insert(name, mailroom::api::HeaderValue(mostly(&mut rng, "1234 é", 10)));
        }
        runs += 1;
        let Ok(message) =
            mailroom::controller::outgoing::build(&spec, from.clone(), vec![], "<id@contoso.com>".into(), 1 << 20)
        else {
            continue;
        };
        accepted += 1;
        let bytes = mailroom::transport::mime::build_bytes(&message)
            .unwrap_or_else(|e| panic!("accepted before the claim, refused by the MIME builder: {e}: {spec:?}"));
        support::check_built(&message, &bytes);
    }
    println!("headers: {runs} inputs, {accepted} accepted, in {:?}", start.elapsed());
}
