//! Reading the token endpoint's answers: the token, Microsoft's errors, and the token's roles.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use serde::Deserialize;

use super::AuthError;

/// Longest part of Microsoft's description kept in an error (descriptions end in trace IDs).
const MAX_SENTENCE: usize = 240;

/// A token as the endpoint issued it. `Debug` hides the token.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The bearer token.
    pub secret: String,
    /// `expires_in`: how long it is valid from the request.
    pub lifetime: Duration,
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken").field("secret", &"<redacted>").field("lifetime", &self.lifetime).finish()
    }
}

#[derive(Deserialize)]
struct SuccessBody {
    access_token: String,
    // Entra ID sends a number; older endpoints (ADFS, v1) sent a string.
    expires_in: serde_json::Value,
}

/// Parses a 200 answer: `{"access_token", "expires_in", ...}`.
pub fn parse_token_response(body: &str) -> Result<IssuedToken, AuthError> {
    let unusable = |what: &str| {
        AuthError::Unavailable(format!(
            "token endpoint answered 200 but {what}; is authorityHost an Entra ID endpoint?"
        ))
    };
    let parsed: SuccessBody = serde_json::from_str(body).map_err(|_| unusable("not with a token response"))?;
    if parsed.access_token.is_empty() {
        return Err(unusable("with an empty access_token"));
    }
    let seconds = match &parsed.expires_in {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| unusable("without a valid expires_in"))?;
    Ok(IssuedToken { secret: parsed.access_token, lifetime: Duration::from_secs(seconds) })
}

/// Microsoft's error answer, e.g. `{"error":"invalid_client","error_description":"AADSTS7000215: ...",
/// "error_codes":[7000215],"trace_id":"..."}`.
#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
    #[serde(default)]
    error_codes: Vec<u64>,
}

/// OAuth errors that mean the request or the credentials are wrong, not the service.
const REJECTING_ERRORS: &[&str] =
    &["invalid_client", "unauthorized_client", "invalid_grant", "invalid_request", "invalid_scope"];

/// What a person should check for well-known AADSTS codes.
pub fn aadsts_hint(code: u64) -> Option<&'static str> {
    Some(match code {
        7000215 => "invalid client secret",
        7000222 => "client secret expired",
        700016 => "application not found in the tenant",
        90002 => "tenant not found",
        700027 | 7000274 => "certificate or client assertion not accepted",
        700024 => "client assertion outside its validity period (clock skew?)",
        70021 => "no matching federated identity",
        700211 => "no federated identity credential matches the token's issuer",
        700212 => "no federated identity credential matches the token's audience",
        700213 => "no federated identity credential matches the service account",
        7000112 => "application is disabled",
        70011 => "invalid scope",
        _ => return None,
    })
}

/// The error for a non-200 answer of the token endpoint: 400/401 with Microsoft's client errors
/// are `Rejected` (the AADSTS code, a hint, and the first sentence of Microsoft's description,
/// without trace IDs); 5xx, 408 and 429 are `Unavailable` (worth retrying).
pub fn describe_token_error(status: StatusCode, body: &str) -> AuthError {
    let parsed: Option<ErrorBody> = serde_json::from_str(body).ok();
    let summary = parsed.as_ref().and_then(summarize);
    let with_summary = |prefix: String| match &summary {
        Some(summary) => format!("{prefix}: {summary}"),
        None => prefix,
    };
    let oauth_error = parsed.as_ref().map(|p| p.error.as_str()).unwrap_or("");

    let retryable = status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || oauth_error == "temporarily_unavailable";
    if retryable {
        return AuthError::Unavailable(with_summary(format!("token endpoint answered {status}")));
    }
    let client_error =
        matches!(status, StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED) && REJECTING_ERRORS.contains(&oauth_error);
    match summary {
        Some(summary) if client_error => AuthError::Rejected(summary),
        _ if status.is_client_error() => AuthError::Rejected(with_summary(format!(
            "token endpoint answered {status}; check authorityHost, tenantId and clientId"
        ))),
        _ => AuthError::Unavailable(with_summary(format!("token endpoint answered {status} unexpectedly"))),
    }
}

/// The error for an answer whose body passed the cap (`limit` bytes) and was not read. A 200
/// that large is no token answer: like any 200 without a token it is `Unavailable` (a
/// misdirected authorityHost or a proxy in between, worth retrying with backoff, and no fault
/// of the credentials); any other status is judged by the status alone.
pub fn describe_oversized_answer(status: StatusCode, limit: usize) -> AuthError {
    let note = format!("its body is over {limit} bytes and was not read");
    if status == StatusCode::OK {
        return AuthError::Unavailable(format!(
            "token endpoint answered 200 but {note}, which is no token response; is authorityHost an Entra ID endpoint?"
        ));
    }
    match describe_token_error(status, "") {
        AuthError::Rejected(words) => AuthError::Rejected(format!("{words} ({note})")),
        AuthError::Unavailable(words) => AuthError::Unavailable(format!("{words} ({note})")),
        AuthError::Credential(words) => AuthError::Credential(format!("{words} ({note})")),
    }
}

/// `AADSTSnnnn: hint (first sentence)`, or the OAuth error and sentence when there is no code.
fn summarize(body: &ErrorBody) -> Option<String> {
    let (code, rest) = split_aadsts(&body.error_description);
    let code = code.or_else(|| body.error_codes.first().copied());
    let sentence = first_sentence(rest);
    let summary = match (code, code.and_then(aadsts_hint), sentence.is_empty()) {
        (Some(code), Some(hint), false) => format!("AADSTS{code}: {hint} ({sentence})"),
        (Some(code), Some(hint), true) => format!("AADSTS{code}: {hint}"),
        (Some(code), None, false) => format!("AADSTS{code}: {sentence}"),
        (Some(code), None, true) if !body.error.is_empty() => {
            format!("AADSTS{code}: {}", body.error)
        }
        (Some(code), None, true) => format!("AADSTS{code}"),
        (None, _, false) if !body.error.is_empty() => format!("{}: {sentence}", body.error),
        (None, _, false) => sentence,
        (None, _, true) if !body.error.is_empty() => body.error.clone(),
        (None, _, true) => return None,
    };
    Some(summary)
}

/// Splits `AADSTS7000215: rest` into the code and the rest.
fn split_aadsts(description: &str) -> (Option<u64>, &str) {
    let trimmed = description.trim_start();
    let Some(after) = trimmed.strip_prefix("AADSTS") else {
        return (None, trimmed);
    };
    let digits = after.bytes().take_while(u8::is_ascii_digit).count();
    let code = after[..digits].parse().ok();
    let rest = after[digits..].trim_start_matches(':').trim_start();
    (code, if code.is_some() { rest } else { trimmed })
}

/// The first sentence: up to the first line break or ". ", at most [`MAX_SENTENCE`] bytes.
fn first_sentence(text: &str) -> String {
    let line = text.lines().next().unwrap_or("").trim();
    let sentence = match line.find(". ") {
        Some(end) => &line[..=end],
        None => line,
    };
    crate::text::clip(sentence, MAX_SENTENCE)
}

/// The `roles` claim of an access token (its payload decoded without verification), for
/// permission diagnostics; empty when absent or unreadable.
pub fn token_roles(access_token: &str) -> Vec<String> {
    #[derive(Deserialize)]
    struct Claims {
        #[serde(default)]
        roles: Vec<String>,
    }
    let Some(payload) = access_token.split('.').nth(1) else {
        return Vec::new();
    };
    URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()
        .and_then(|json| serde_json::from_slice::<Claims>(&json).ok())
        .map(|claims| claims.roles)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entra_error(error: &str, code: u64, description: &str) -> String {
        serde_json::json!({
            "error": error,
            "error_description": format!(
                "AADSTS{code}: {description}\r\nTrace ID: 0f3c1a2b-0000-4000-8000-000000000001\r\n\
                 Correlation ID: 7d1e0000-0000-4000-8000-000000000002\r\nTimestamp: 2025-10-01 10:00:00Z"
            ),
            "error_codes": [code],
            "timestamp": "2025-10-01 10:00:00Z",
            "trace_id": "0f3c1a2b-0000-4000-8000-000000000001",
            "correlation_id": "7d1e0000-0000-4000-8000-000000000002",
        })
        .to_string()
    }

    fn rejected(status: u16, body: &str) -> String {
        match describe_token_error(StatusCode::from_u16(status).expect("status"), body) {
            AuthError::Rejected(message) => message,
            other => panic!("expected Rejected, got {other:?}"),
        }
    }

    #[test]
    fn well_known_codes_get_a_hint_and_the_first_sentence() {
        let cases = [
            (
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is \
                 the client secret value, not the client secret ID, for a secret added to app \
                 '11111111-1111-1111-1111-111111111111'.",
                "AADSTS7000215: invalid client secret (Invalid client secret provided.)",
            ),
            (
                401,
                "invalid_client",
                7000222,
                "The provided client secret keys for app '1111' are expired. Visit the Azure portal.",
                "AADSTS7000222: client secret expired (The provided client secret keys for app \
                 '1111' are expired.)",
            ),
            (
                400,
                "unauthorized_client",
                700016,
                "Application with identifier '1111' was not found in the directory 'contoso.com'. \
                 This can happen if the application has not been installed.",
                "AADSTS700016: application not found in the tenant (Application with identifier \
                 '1111' was not found in the directory 'contoso.com'.)",
            ),
            (
                400,
                "invalid_request",
                90002,
                "Tenant 'nope' not found. Check to make sure you have the correct tenant ID.",
                "AADSTS90002: tenant not found (Tenant 'nope' not found.)",
            ),
            (
                401,
                "invalid_client",
                700027,
                "Client assertion failed signature validation. Trace follows.",
                "AADSTS700027: certificate or client assertion not accepted (Client assertion \
                 failed signature validation.)",
            ),
            (
                401,
                "invalid_client",
                7000274,
                "Key was found, but use of the key to verify the signature failed.",
                "AADSTS7000274: certificate or client assertion not accepted (Key was found, but \
                 use of the key to verify the signature failed.)",
            ),
            (
                400,
                "invalid_request",
                70021,
                "No matching federated identity record found for presented assertion. Assertion \
                 Issuer: 'https://oidc.example'.",
                "AADSTS70021: no matching federated identity (No matching federated identity \
                 record found for presented assertion.)",
            ),
        ];
        for (status, error, code, description, expected) in cases {
            let message = rejected(status, &entra_error(error, code, description));
            assert_eq!(message, expected);
            assert!(!message.contains("Trace ID") && !message.contains("0f3c1a2b"));
        }
    }

    #[test]
    fn unknown_codes_keep_microsofts_sentence() {
        let body = entra_error("invalid_scope", 1002012, "The provided value for scope x is not valid. More text.");
        assert_eq!(rejected(400, &body), "AADSTS1002012: The provided value for scope x is not valid.");
    }

    #[test]
    fn code_from_error_codes_when_the_description_has_none() {
        let body = r#"{"error":"invalid_client","error_description":"Bad secret.","error_codes":[7000215]}"#;
        assert_eq!(rejected(401, body), "AADSTS7000215: invalid client secret (Bad secret.)");
        let bare = r#"{"error":"invalid_grant","error_description":"Nope. More."}"#;
        assert_eq!(rejected(400, bare), "invalid_grant: Nope.");
    }

    #[test]
    fn server_errors_and_throttling_are_retryable() {
        for status in [500, 502, 503, 504, 429, 408] {
            let error = describe_token_error(StatusCode::from_u16(status).expect("status"), "<html>busy</html>");
            assert!(matches!(&error, AuthError::Unavailable(m) if m.contains(&status.to_string())), "{error:?}");
        }
        let body = entra_error("temporarily_unavailable", 50001, "The service is temporarily unavailable. Retry.");
        assert!(matches!(
            describe_token_error(StatusCode::BAD_REQUEST, &body),
            AuthError::Unavailable(m) if m.contains("AADSTS50001")
        ));
    }

    #[test]
    fn other_client_errors_are_permanent_and_say_what_to_check() {
        let message = rejected(404, "<html>not found</html>");
        assert!(message.contains("404") && message.contains("authorityHost"));
        assert!(!message.contains("html"));
    }

    #[test]
    fn oversized_answers_are_judged_by_their_status() {
        let ok = describe_oversized_answer(StatusCode::OK, 65_536);
        assert!(
            matches!(&ok, AuthError::Unavailable(m) if m.contains("over 65536 bytes") && m.contains("no token response")),
            "{ok:?}"
        );
        let busy = describe_oversized_answer(StatusCode::SERVICE_UNAVAILABLE, 65_536);
        assert!(
            matches!(&busy, AuthError::Unavailable(m) if m.contains("503") && m.contains("over 65536")),
            "{busy:?}"
        );
        let refused = describe_oversized_answer(StatusCode::NOT_FOUND, 65_536);
        assert!(
            matches!(&refused, AuthError::Rejected(m) if m.contains("404") && m.contains("over 65536")),
            "{refused:?}"
        );
    }

    #[test]
    fn long_sentences_are_cut() {
        let long = "x".repeat(1000);
        let message = rejected(400, &entra_error("invalid_request", 50000, &long));
        assert!(message.len() < 300, "{}", message.len());
    }

    #[test]
    fn success_body() {
        let token = parse_token_response(
            r#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"abc"}"#,
        )
        .expect("parses");
        assert_eq!(token.secret, "abc");
        assert_eq!(token.lifetime, Duration::from_secs(3599));
        let legacy = parse_token_response(r#"{"expires_in":"60","access_token":"abc"}"#);
        assert_eq!(legacy.expect("parses").lifetime, Duration::from_secs(60));
        assert!(!format!("{token:?}").contains("abc"));
        for bad in [
            "",
            "{}",
            r#"{"access_token":"","expires_in":1}"#,
            r#"{"access_token":"a"}"#,
            r#"{"access_token":"a","expires_in":-1}"#,
        ] {
            assert!(matches!(parse_token_response(bad), Err(AuthError::Unavailable(_))), "{bad}");
        }
    }

    #[test]
    fn roles_are_read_from_the_payload() {
        let payload = URL_SAFE_NO_PAD.encode(r#"{"aud":"x","roles":["Mail.Send","SMTP.SendAsApp"]}"#);
        let token = format!("eyJhbGciOiJSUzI1NiJ9.{payload}.sig");
        assert_eq!(token_roles(&token), ["Mail.Send", "SMTP.SendAsApp"]);
        let no_roles = format!("h.{}.s", URL_SAFE_NO_PAD.encode(r#"{"aud":"x"}"#));
        assert!(token_roles(&no_roles).is_empty());
        assert!(token_roles("opaque-token").is_empty());
        assert!(token_roles("a.!!!.c").is_empty());
        let padded = format!("h.{}==.s", URL_SAFE_NO_PAD.encode(r#"{"roles":["A"]}"#));
        assert_eq!(token_roles(&padded), ["A"]);
    }
}
