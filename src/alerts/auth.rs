//! How a sender shows it holds the route's credential, checked in constant time: a bearer token
//! (Alertmanager's `http_config.authorization`, an Argo CD webhook header, Grafana's
//! Authorization header, a Flux `generic` Provider's headers), or an HMAC-SHA256 signature of the
//! body keyed with it (Flux `generic-hmac`, Grafana's HMAC signature).

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use hmac::{Hmac, Mac};
use k8s_openapi::jiff::Timestamp;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The header of Flux's `generic-hmac` Provider: `X-Signature: sha256=<hex HMAC-SHA256 of the
/// body>`, keyed with the Provider Secret's `token`
/// (https://fluxcd.io/flux/components/notification/providers/#generic-webhook-with-hmac).
pub const FLUX_SIGNATURE_HEADER: &str = "X-Signature";
/// Grafana's default signature header: hex HMAC-SHA256 of the body, or of `timestamp:body` when
/// the contact point names a timestamp header
/// (https://grafana.com/docs/grafana/latest/alerting/configure-notifications/manage-contact-points/integrations/webhook-notifier/#hmac-signature).
pub const GRAFANA_SIGNATURE_HEADER: &str = "X-Grafana-Alerting-Signature";
/// How far a signed timestamp may be from the receiver's clock.
pub const MAX_TIMESTAMP_SKEW_SECONDS: i64 = 300;

/// Why a signature was not accepted (each is a 401; the words go to the sender, never the key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The value is not of the expected form.
    #[error("the {0} header is not a hex HMAC-SHA256 signature")]
    Malformed(String),
    /// It is well-formed, but not the body's under the route's key.
    #[error("the {0} header does not match the body under the AlertRoute's key")]
    Mismatch(String),
    /// The timestamp header is missing, not a Unix time, or too far from now.
    #[error("the {0} timestamp is missing, not a Unix time, or more than 5 minutes from now")]
    Timestamp(String),
}

/// The HMAC-SHA256 of `parts` (concatenated) under `key`.
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return Vec::new(),
    };
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

/// Decodes lowercase or uppercase hex.
fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Whether `presented` (raw bytes) is the HMAC of `parts` under `key`, compared in constant time.
fn mac_matches(key: &[u8], parts: &[&[u8]], presented: &[u8]) -> bool {
    if key.is_empty() {
        return false;
    }
    let expected = hmac_sha256(key, parts);
    expected.len() == presented.len() && bool::from(expected.as_slice().ct_eq(presented))
}

/// Checks Flux's `X-Signature: sha256=<hex>` over the body.
pub fn verify_flux(value: &str, body: &[u8], key: &[u8]) -> Result<(), SignatureError> {
    let name = FLUX_SIGNATURE_HEADER.to_string();
    let hex = value.trim().strip_prefix("sha256=").ok_or_else(|| SignatureError::Malformed(name.clone()))?;
    let presented = from_hex(hex).ok_or_else(|| SignatureError::Malformed(name.clone()))?;
    if mac_matches(key, &[body], &presented) { Ok(()) } else { Err(SignatureError::Mismatch(name)) }
}

/// Checks Grafana's hex signature over the body, or over `timestamp:body` when a timestamp is
/// signed; the timestamp must be within [`MAX_TIMESTAMP_SKEW_SECONDS`] of `now`.
pub fn verify_grafana(
    header: &str,
    value: &str,
    timestamp: Option<(&str, Option<&str>)>,
    body: &[u8],
    key: &[u8],
    now: Timestamp,
) -> Result<(), SignatureError> {
    let presented = from_hex(value.trim()).ok_or_else(|| SignatureError::Malformed(header.to_string()))?;
    let ok = match timestamp {
        None => mac_matches(key, &[body], &presented),
        Some((name, ts)) => {
            let ts = ts.map(str::trim).unwrap_or_default();
            let secs: i64 = ts.parse().map_err(|_| SignatureError::Timestamp(name.to_string()))?;
            if (now.as_second() - secs).abs() > MAX_TIMESTAMP_SKEW_SECONDS {
                return Err(SignatureError::Timestamp(name.to_string()));
            }
            mac_matches(key, &[ts.as_bytes(), b":", body], &presented)
        }
    };
    if ok { Ok(()) } else { Err(SignatureError::Mismatch(header.to_string())) }
}

/// The lowercase hex HMAC-SHA256 of `parts` under `key` (for senders in tests and examples).
pub fn sign_hex(key: &[u8], parts: &[&[u8]]) -> String {
    hmac_sha256(key, parts).iter().map(|b| format!("{b:02x}")).collect()
}

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

    /// RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
    const RFC4231_2: &str = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";

    #[test]
    fn the_hmac_is_rfc_4231s() {
        assert_eq!(sign_hex(b"Jefe", &[b"what do ya want for nothing?"]), RFC4231_2);
    }

    #[test]
    fn flux_signatures_are_checked_over_the_exact_body() {
        let body = b"what do ya want for nothing?";
        assert_eq!(verify_flux(&format!("sha256={RFC4231_2}"), body, b"Jefe"), Ok(()));
        assert_eq!(verify_flux(&format!("sha256={}", RFC4231_2.to_uppercase()), body, b"Jefe"), Ok(()));
        let mismatch = Err(SignatureError::Mismatch("X-Signature".into()));
        assert_eq!(verify_flux(&format!("sha256={RFC4231_2}"), b"what do ya want for nothing!", b"Jefe"), mismatch);
        assert_eq!(verify_flux(&format!("sha256={RFC4231_2}"), body, b"jefe"), mismatch);
        assert_eq!(verify_flux(&format!("sha256={}", &RFC4231_2[..62]), body, b"Jefe"), mismatch);
        assert_eq!(verify_flux(&format!("sha256={RFC4231_2}"), body, b""), mismatch, "an empty key never verifies");
        for malformed in [RFC4231_2.to_string(), format!("sha1={RFC4231_2}"), "sha256=xyz".into(), "sha256=abc".into()]
        {
            assert!(matches!(verify_flux(&malformed, body, b"Jefe"), Err(SignatureError::Malformed(_))), "{malformed}");
        }
    }

    #[test]
    fn grafana_signs_the_body_or_the_timestamp_and_body() {
        let now = Timestamp::from_second(1_760_000_000).unwrap();
        let body = br#"{"status":"firing"}"#;
        let plain = sign_hex(b"k", &[body]);
        let h = GRAFANA_SIGNATURE_HEADER;
        assert_eq!(verify_grafana(h, &plain, None, body, b"k", now), Ok(()));
        assert!(matches!(verify_grafana(h, &plain, None, b"{}", b"k", now), Err(SignatureError::Mismatch(_))));
        let ts = "1760000010";
        let timed = sign_hex(b"k", &[ts.as_bytes(), b":", body]);
        let with = |t: Option<&'static str>| Some(("X-Ts", t));
        assert_eq!(verify_grafana(h, &timed, with(Some(ts)), body, b"k", now), Ok(()));
        assert!(matches!(verify_grafana(h, &plain, with(Some(ts)), body, b"k", now), Err(SignatureError::Mismatch(_))));
        assert!(matches!(verify_grafana(h, &timed, with(None), body, b"k", now), Err(SignatureError::Timestamp(_))));
        assert!(matches!(
            verify_grafana(h, &timed, with(Some("soon")), body, b"k", now),
            Err(SignatureError::Timestamp(_))
        ));
        let old = "1759999000";
        let stale = sign_hex(b"k", &[old.as_bytes(), b":", body]);
        assert!(matches!(
            verify_grafana(h, &stale, with(Some(old)), body, b"k", now),
            Err(SignatureError::Timestamp(_))
        ));
    }

    #[test]
    fn a_stored_token_loses_its_trailing_newline() {
        assert_eq!(stored_token(b"s3cret\n"), b"s3cret");
        assert_eq!(stored_token(b"  \n"), b"");
    }
}
