//! The bearer token Alertmanager sends (`http_config.authorization`), checked in constant time.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The credentials of an `Authorization: Bearer <token>` header, if the request has one.
pub fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Whether the presented token is the expected one. Both sides are hashed first, so the
/// comparison takes the same time whatever the lengths and wherever they differ.
pub fn token_matches(presented: &[u8], expected: &[u8]) -> bool {
    if expected.is_empty() {
        return false;
    }
    let (a, b) = (Sha256::digest(presented), Sha256::digest(expected));
    a.as_slice().ct_eq(b.as_slice()).into()
}

/// The token as stored in a Secret: surrounding whitespace (a trailing newline from a file) removed.
pub fn stored_token(data: &[u8]) -> &[u8] {
    data.trim_ascii()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn reads_bearer_credentials_in_any_case_of_the_scheme() {
        assert_eq!(bearer_token(&headers("Bearer s3cret")), Some(&b"s3cret"[..]));
        assert_eq!(bearer_token(&headers("bearer s3cret ")), Some(&b"s3cret"[..]));
        assert_eq!(bearer_token(&headers("BEARER s3cret")), Some(&b"s3cret"[..]));
    }

    #[test]
    fn other_schemes_and_empty_credentials_are_no_token() {
        assert_eq!(bearer_token(&headers("Basic dXNlcjpwYXNz")), None);
        assert_eq!(bearer_token(&headers("Bearer ")), None);
        assert_eq!(bearer_token(&headers("Bearer")), None);
        assert_eq!(bearer_token(&headers("Bearers3cret")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[test]
    fn only_the_exact_token_matches() {
        assert!(token_matches(b"s3cret", b"s3cret"));
        assert!(!token_matches(b"s3cre", b"s3cret"));
        assert!(!token_matches(b"s3cret!", b"s3cret"));
        assert!(!token_matches(b"S3cret", b"s3cret"));
        assert!(!token_matches(b"", b""), "an empty stored token never authenticates");
    }

    #[test]
    fn a_stored_token_loses_its_trailing_newline() {
        assert_eq!(stored_token(b"s3cret\n"), b"s3cret");
        assert_eq!(stored_token(b"  \n"), b"");
    }
}
