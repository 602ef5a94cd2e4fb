//! Parsing RFC 5322 mailboxes.
//!
//! The grammar is lettre's RFC 5322/6532 parser; this module adds what a header-safe mailbox
//! needs on top of it: no control characters at all (so nothing can start a new header line),
//! exactly one mailbox, and the length limits of RFC 5321.

use std::fmt;
use std::str::FromStr;

use lettre::message::Mailbox;

/// Longest accepted input: one header line (RFC 5322 section 2.1.1).
const MAX_INPUT_LEN: usize = 998;
/// Longest address: a 256-octet path minus its angle brackets (RFC 5321 section 4.5.3.1.3).
const MAX_ADDRESS_LEN: usize = 254;
/// Longest local part (RFC 5321 section 4.5.3.1.1).
const MAX_LOCAL_PART_LEN: usize = 64;

/// A mailbox: an optional display name and an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    /// Display name, UTF-8.
    pub name: Option<String>,
    /// `local@domain`.
    pub email: String,
}

/// A mailbox that cannot be parsed, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a valid mailbox: {reason}")]
pub struct AddressError {
    /// The rejected input (printed escaped, so a line break in it cannot forge a line).
    pub input: String,
    /// Why it was rejected.
    pub reason: &'static str,
}

impl AddressError {
    fn new(input: &str, reason: &'static str) -> Self {
        AddressError { input: input.to_string(), reason }
    }
}

/// Parses `user@example.com`, `Name <user@example.com>` or `"Doe, Jane" <jane@example.com>`.
pub fn parse_mailbox(input: &str) -> Result<Address, AddressError> {
    if input.trim().is_empty() {
        return Err(AddressError::new(input, "it is empty"));
    }
    if input.len() > MAX_INPUT_LEN {
        return Err(AddressError::new(input, "it is longer than 998 characters"));
    }
    // CR, LF and NUL could end the header line and start another; no control character has
    // any business in a mailbox, so all of them are refused before the grammar sees the input.
    if input.chars().any(char::is_control) {
        return Err(AddressError::new(input, "it contains a line break or another control character"));
    }
    // Bidi overrides and zero-width characters make an address read as another one
    // ("\u{202E}moc.live@" shown reversed); no mailbox needs them.
    if input.chars().any(is_invisible_format) {
        return Err(AddressError::new(input, "it contains a bidi control or another invisible formatting character"));
    }
    // U+FFFD is what a decoder leaves of bytes that were not UTF-8: the input was mangled.
    if input.contains('\u{FFFD}') {
        return Err(AddressError::new(input, "it contains U+FFFD, the mark of bytes that were not valid UTF-8"));
    }
    if !input.contains('@') {
        return Err(AddressError::new(input, "it has no @"));
    }
    let mailbox = Mailbox::from_str(input).map_err(|_| {
        if looks_like_several(input) {
            AddressError::new(input, "it names more than one mailbox; give one per entry")
        } else {
            AddressError::new(input, "expected 'user@example.com' or 'Name <user@example.com>'")
        }
    })?;
    let email = mailbox.email.to_string();
    check_address(input, &email)?;
    // Runs of whitespace (`a "" b` parses as "a  b") become one space, so that the mailbox
    // renders and parses back to itself: a quoted name's inner runs would not survive that.
    let name = mailbox.name.map(|n| n.split_whitespace().collect::<Vec<_>>().join(" ")).filter(|n| !n.is_empty());
    Ok(Address { name, email })
}

/// Invisible formatting characters (Unicode category Cf, and the line and paragraph separators)
/// that can make text display as something else: bidi embeddings, overrides, isolates and marks,
/// zero-width characters, the byte order mark, the soft hyphen and interlinear annotations.
pub fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
    )
}

/// Whether a failed input holds more than one mailbox, to say so in the error.
fn looks_like_several(input: &str) -> bool {
    input.matches('@').count() > 1 && (input.contains(',') || input.contains(';'))
}

/// Checks an address the grammar accepted against RFC 5321's limits.
fn check_address(input: &str, email: &str) -> Result<(), AddressError> {
    let Some((local, domain)) = email.rsplit_once('@') else {
        return Err(AddressError::new(input, "it has no @"));
    };
    if local.is_empty() {
        return Err(AddressError::new(input, "the part before @ is empty"));
    }
    // A quoted local part ("a b"@example.com) is legal RFC 5322 that no relay needs, and lettre
    // does not render every one back to a form it parses again.
    if local.contains(['"', '\\']) || local.chars().any(char::is_whitespace) {
        return Err(AddressError::new(input, "a quoted part before @ is not supported"));
    }
    if domain.is_empty() {
        return Err(AddressError::new(input, "the domain after @ is empty"));
    }
    if local.len() > MAX_LOCAL_PART_LEN {
        return Err(AddressError::new(input, "the part before @ is longer than 64 octets"));
    }
    if email.len() > MAX_ADDRESS_LEN {
        return Err(AddressError::new(input, "the address is longer than 254 octets"));
    }
    Ok(())
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_mailbox(s)
    }
}

impl Address {
    /// The part after the last `@`, as written (compare case-insensitively).
    pub fn domain(&self) -> &str {
        self.email.rsplit_once('@').map(|(_, domain)| domain).unwrap_or("")
    }

    /// The part before the last `@`.
    pub fn local_part(&self) -> &str {
        self.email.rsplit_once('@').map(|(local, _)| local).unwrap_or(&self.email)
    }

    /// The address alone, as lettre's envelope needs it. Validates again, since the fields
    /// are public and may not have come from [`parse_mailbox`].
    pub fn to_lettre_address(&self) -> Result<lettre::Address, AddressError> {
        if self.email.chars().any(|c| c.is_control() || is_invisible_format(c)) {
            return Err(AddressError::new(&self.email, "it contains a line break or another control character"));
        }
        check_address(&self.email, &self.email)?;
        lettre::Address::from_str(&self.email).map_err(|_| AddressError::new(&self.email, "lettre refuses the address"))
    }

    /// The mailbox as lettre's header types need it (the name is RFC 2047-encoded on output).
    pub fn to_lettre(&self) -> Result<Mailbox, AddressError> {
        if let Some(name) = &self.name
            && name.chars().any(|c| c.is_control() || is_invisible_format(c))
        {
            return Err(AddressError::new(name, "the display name contains a line break or another control character"));
        }
        Ok(Mailbox::new(self.name.clone(), self.to_lettre_address()?))
    }
}

/// `Name <user@example.com>`, quoting the name when RFC 5322 requires it; parses back to the same.
impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name.as_deref().map(str::trim) {
            Some(name) if !name.is_empty() => {
                if name.split(' ').all(is_atom) {
                    write!(f, "{name} <{}>", self.email)
                } else {
                    f.write_str("\"")?;
                    for c in name.chars() {
                        if c == '"' || c == '\\' {
                            f.write_str("\\")?;
                        }
                        write!(f, "{c}")?;
                    }
                    write!(f, "\" <{}>", self.email)
                }
            }
            _ => f.write_str(&self.email),
        }
    }
}

/// An RFC 5322 atom (RFC 6532: non-ASCII allowed), which needs no quotes in a phrase.
fn is_atom(word: &str) -> bool {
    !word.is_empty()
        && word.chars().all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(input: &str) -> Address {
        match parse_mailbox(input) {
            Ok(a) => a,
            Err(e) => panic!("{input:?} should parse: {e}"),
        }
    }

    fn bad(input: &str) -> AddressError {
        match parse_mailbox(input) {
            Ok(a) => panic!("{input:?} should be rejected, got {a:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn bare_address() {
        let a = ok("user@example.com");
        assert_eq!(a.name, None);
        assert_eq!(a.email, "user@example.com");
        assert_eq!(a.domain(), "example.com");
        assert_eq!(a.local_part(), "user");
    }

    #[test]
    fn surrounding_whitespace_is_ignored() {
        assert_eq!(ok("  user@example.com  ").email, "user@example.com");
    }

    #[test]
    fn name_and_address() {
        let a = ok("Ops Team <ops@contoso.com>");
        assert_eq!(a.name.as_deref(), Some("Ops Team"));
        assert_eq!(a.email, "ops@contoso.com");
    }

    #[test]
    fn angle_address_without_name() {
        let a = ok("<ops@contoso.com>");
        assert_eq!(a.name, None);
        assert_eq!(a.email, "ops@contoso.com");
    }

    #[test]
    fn quoted_display_name_with_comma() {
        let a = ok(r#""Doe, Jane" <jane@example.com>"#);
        assert_eq!(a.name.as_deref(), Some("Doe, Jane"));
        assert_eq!(a.email, "jane@example.com");
    }

    #[test]
    fn quoted_display_name_with_escapes() {
        let a = ok(r#""Jane \"JD\" Doe" <jane@example.com>"#);
        assert_eq!(a.name.as_deref(), Some(r#"Jane "JD" Doe"#));
    }

    #[test]
    fn utf8_display_names() {
        assert_eq!(ok("Zoë Çelik <zoe@example.com>").name.as_deref(), Some("Zoë Çelik"));
        assert_eq!(ok("運用チーム <ops@example.jp>").name.as_deref(), Some("運用チーム"));
        assert_eq!(ok("\"Ops 🚀, Night\" <ops@example.com>").name.as_deref(), Some("Ops 🚀, Night"));
    }

    #[test]
    fn plus_and_dots_in_local_part() {
        let a = ok("first.last+alerts@sub.example.co.uk");
        assert_eq!(a.local_part(), "first.last+alerts");
        assert_eq!(a.domain(), "sub.example.co.uk");
    }

    #[test]
    fn rejects_crlf_header_injection() {
        for input in [
            "user@example.com\r\nBcc: victim@example.org",
            "user@example.com\nBcc: victim@example.org",
            "user@example.com\rBcc: victim@example.org",
            "Name\r\nBcc: victim@example.org <user@example.com>",
            "\"Name\r\nX: y\" <user@example.com>",
            "user\r\n@example.com",
            "Name <user@example.com>\r\n",
        ] {
            let e = bad(input);
            assert!(e.reason.contains("control character"), "{input:?}: {e}");
        }
    }

    #[test]
    fn rejects_nul_and_other_controls() {
        for input in [
            "user@example.com\0",
            "Na\0me <user@example.com>",
            "user\u{7f}@example.com",
            "Name\t<user@example.com>",
            "user@exa\u{1b}mple.com",
            "Na\u{85}me <user@example.com>",
        ] {
            bad(input);
        }
    }

    #[test]
    fn rejects_bidi_and_zero_width_characters() {
        for input in [
            "\u{202E}moc.osotnoc <ops@contoso.com>",
            "Ops\u{2066} <ops@contoso.com>",
            "o\u{200B}ps@contoso.com",
            "ops@con\u{200D}toso.com",
            "\u{FEFF}ops@contoso.com",
            "Ops\u{2028}Team <ops@contoso.com>",
            "\"Ops\u{202D}\" <ops@contoso.com>",
        ] {
            let e = bad(input);
            assert!(e.reason.contains("invisible formatting"), "{input:?}: {e}");
        }
        assert!(bad("o\u{FFFD}s@contoso.com").reason.contains("U+FFFD"));
        let forged = Address { name: Some("\u{202E}evil".into()), email: "user@example.com".into() };
        assert!(forged.to_lettre().is_err());
        // Right-to-left letters themselves are fine.
        assert_eq!(ok("فريق العمليات <ops@example.com>").name.as_deref(), Some("فريق العمليات"));
    }

    #[test]
    fn error_display_escapes_the_input() {
        let e = bad("a@b.com\r\nBcc: x@y.com");
        let shown = e.to_string();
        assert!(!shown.contains('\r') && !shown.contains('\n'), "{shown}");
    }

    #[test]
    fn rejects_missing_at_and_empty_parts() {
        assert!(bad("").reason.contains("empty"));
        assert!(bad("   ").reason.contains("empty"));
        assert!(bad("user.example.com").reason.contains("no @"));
        assert!(bad("Name <user>").reason.contains("no @"));
        bad("@example.com");
        bad("user@");
        bad("Name <@example.com>");
        bad("Name <user@>");
        bad("@");
        bad("Name <>");
    }

    #[test]
    fn rejects_several_mailboxes() {
        let e = bad("a@example.com, b@example.com");
        assert!(e.reason.contains("more than one"), "{e}");
        bad("a@example.com; b@example.com");
        bad("A <a@example.com>, B <b@example.com>");
        bad("a@example.com b@example.com");
        bad("Group: a@example.com, b@example.com;");
    }

    #[test]
    fn rejects_malformed_addresses() {
        for input in [
            "user@@example.com",
            "us er@example.com",
            "user@exa mple.com",
            "user@example..com",
            ".user@example.com",
            "user.@example.com",
            "user@-example.com",
            "Name <user@example.com",
            "Name user@example.com>",
            "Name <user@example.com> trailing",
            "<<user@example.com>>",
            "Name <user@example.com> <other@example.com>",
            "\"unterminated <user@example.com>",
            "user@example.com>",
            "user@[not an ip]",
        ] {
            bad(input);
        }
    }

    #[test]
    fn rejects_overlong_parts() {
        let local = "a".repeat(65);
        bad(&format!("{local}@example.com"));
        let label = "a".repeat(60);
        let domain = format!("{label}.{label}.{label}.{label}.{label}.com");
        bad(&format!("user@{domain}"));
        bad(&format!("{} <user@example.com>", "N".repeat(1000)));
        ok(&format!("{}@example.com", "a".repeat(64)));
    }

    #[test]
    fn display_round_trips() {
        for input in [
            "user@example.com",
            "Ops Team <ops@contoso.com>",
            r#""Doe, Jane" <jane@example.com>"#,
            r#""Jane \"JD\" Doe" <jane@example.com>"#,
            "Zoë Çelik <zoe@example.com>",
            r#""a\\b" <ab@example.com>"#,
            "\"J. Doe\" <j@example.com>",
        ] {
            let a = ok(input);
            let shown = a.to_string();
            assert_eq!(ok(&shown), a, "{input:?} displayed as {shown:?}");
        }
        assert_eq!(ok("Ops Team <ops@contoso.com>").to_string(), "Ops Team <ops@contoso.com>");
        assert_eq!(ok(r#""Doe, Jane" <jane@example.com>"#).to_string(), r#""Doe, Jane" <jane@example.com>"#);
    }

    /// Found by the `address` fuzz target: empty quoted strings between words left a double
    /// space in the name, which did not survive rendering and parsing again.
    #[test]
    fn whitespace_runs_in_names_round_trip() {
        for input in [
            r#"a "" b <ab@example.com>"#,
            r#"88  "" " "! <x@example.com>"#,
            "\"a   b\" <ab@example.com>",
            r#" ~뿽8  $ ~뿽8 8 " "!  8 " "%   $  {2 ~ 88  "" " "!   $  {2$  " "b""""""J뿽*=5<"\="@?녅>"#,
        ] {
            let Ok(a) = parse_mailbox(input) else { continue };
            assert!(!a.name.as_deref().unwrap_or_default().contains("  "), "{input:?}: {a:?}");
            let shown = a.to_string();
            assert_eq!(ok(&shown), a, "{input:?} displayed as {shown:?}");
        }
        assert_eq!(ok(r#"a "" b <ab@example.com>"#).name.as_deref(), Some("a b"));
    }

    /// Found by the `address` fuzz target: a quoted local part with escaped quotes rendered to
    /// a form that did not parse again.
    #[test]
    fn quoted_local_parts_are_refused() {
        for input in ["*<\"\\\"\u{77e}@@\\\"\"@?\u{b105}>", "\"a b\"@example.com"] {
            let e = bad(input);
            assert!(e.reason.contains("quoted") || e.reason.contains("expected"), "{input:?}: {e}");
        }
    }

    #[test]
    fn to_lettre_keeps_name_and_address() {
        let m = ok(r#""Doe, Jane" <jane@example.com>"#).to_lettre().unwrap();
        assert_eq!(m.name.as_deref(), Some("Doe, Jane"));
        assert_eq!(m.email.to_string(), "jane@example.com");
        assert_eq!(m.email.domain(), "example.com");
    }

    #[test]
    fn to_lettre_validates_hand_built_addresses() {
        let forged = Address { name: Some("Name\r\nBcc: x@example.org".into()), email: "user@example.com".into() };
        assert!(forged.to_lettre().is_err());
        let forged = Address { name: None, email: "user@example.com\r\nBcc: x@example.org".into() };
        assert!(forged.to_lettre().is_err());
        let forged = Address { name: None, email: "not-an-address".into() };
        assert!(forged.to_lettre().is_err());
    }

    #[test]
    fn from_str_matches_parse_mailbox() {
        let a: Address = "Ops <ops@example.com>".parse().unwrap();
        assert_eq!(a, ok("Ops <ops@example.com>"));
    }
}
