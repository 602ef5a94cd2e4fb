//! Cutting text to a size in bytes without splitting a character.

/// The longest start of `s` that is at most `max` bytes and ends on a character boundary.
pub fn prefix(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `s` when it fits in `max` bytes; otherwise its start within `max` bytes followed by `…`, so
/// that a reader sees it was cut (the ellipsis adds 3 bytes).
pub fn clip(s: &str, max: usize) -> String {
    if s.len() <= max { s.to_string() } else { format!("{}…", prefix(s, max)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_end_on_character_boundaries() {
        assert_eq!(prefix("", 0), "");
        assert_eq!(prefix("", 5), "");
        assert_eq!(prefix("abc", 3), "abc");
        assert_eq!(prefix("abcd", 3), "abc");
        assert_eq!(prefix("abc", 0), "");
        // "é" is two bytes, "€" three, "😀" four: a cut inside one leaves it out whole.
        assert_eq!(prefix("aé", 2), "a");
        assert_eq!(prefix("aé", 3), "aé");
        assert_eq!(prefix("€€", 4), "€");
        assert_eq!(prefix("€€", 5), "€");
        assert_eq!(prefix("€€", 6), "€€");
        assert_eq!(prefix("😀x", 3), "");
        assert_eq!(prefix("😀x", 4), "😀");
    }

    #[test]
    fn clipped_text_says_it_was_cut() {
        assert_eq!(clip("short", 5), "short");
        assert_eq!(clip("longer", 5), "longe…");
        assert_eq!(clip("ééé", 3), "é…");
        assert_eq!(clip("", 0), "");
        let long = "ü".repeat(1000);
        let cut = clip(&long, 1024);
        assert!(cut.len() <= 1024 + '…'.len_utf8(), "{}", cut.len());
        assert!(cut.ends_with('…'));
    }
}
