//! SMTP replies: a code, an enhanced status code (RFC 3463) and one line of text.

/// One reply line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The reply code (RFC 5321 §4.2).
    pub code: u16,
    /// The enhanced status code, such as `5.7.8`; empty for replies that carry none (220, 334, 354).
    pub status: &'static str,
    /// The text, on one line.
    pub text: String,
}

impl Reply {
    /// A reply; line breaks in the text become spaces.
    pub fn new(code: u16, status: &'static str, text: impl Into<String>) -> Self {
        let text = text.into().replace(['\r', '\n'], " ");
        Reply { code, status, text }
    }

    /// Whether the client should try again later (4xx).
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// Appends the reply's line to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        let line = match (self.status.is_empty(), self.text.is_empty()) {
            (true, true) => format!("{} \r\n", self.code),
            (true, false) => format!("{} {}\r\n", self.code, self.text),
            (false, _) => format!("{} {} {}\r\n", self.code, self.status, self.text),
        };
        out.extend_from_slice(line.as_bytes());
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.code, self.status, self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_one_line_with_its_enhanced_code() {
        let mut out = Vec::new();
        Reply::new(535, "5.7.8", "bad\r\ncredentials").write(&mut out);
        Reply::new(334, "", "").write(&mut out);
        Reply::new(354, "", "go ahead").write(&mut out);
        assert_eq!(out, b"535 5.7.8 bad  credentials\r\n334 \r\n354 go ahead\r\n");
        assert!(Reply::new(451, "4.3.0", "later").is_transient());
        assert!(!Reply::new(550, "5.7.1", "no").is_transient());
    }
}
