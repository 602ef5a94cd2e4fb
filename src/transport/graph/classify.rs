//! What a Graph error answer means: retry or give up, and in which words.

use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::transport::SendError;

/// The `error` object of Graph's error answers: `{"error":{"code","message"}}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct GraphApiError {
    /// Graph's error code, such as `ErrorSendAsDenied`.
    #[serde(default)]
    pub code: String,
    /// Graph's words.
    #[serde(default)]
    pub message: String,
}

#[derive(Deserialize)]
struct Envelope {
    error: GraphApiError,
}

/// Longest piece of a non-Graph error body (a proxy's HTML page) kept in a reason.
const MAX_FOREIGN_BODY: usize = 200;

impl GraphApiError {
    /// Reads an error body: Graph's shape, or else the start of whatever text came back.
    pub fn from_body(body: &[u8]) -> Self {
        if let Ok(envelope) = serde_json::from_slice::<Envelope>(body) {
            return envelope.error;
        }
        let text = String::from_utf8_lossy(body);
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        GraphApiError { code: String::new(), message: text.chars().take(MAX_FOREIGN_BODY).collect() }
    }
}

/// Decides whether a failed Graph request is worth retrying, and says why it failed.
///
/// 429 and 5xx are transient (with the server's `Retry-After`); other statuses are permanent.
/// A 401 reaches here only after one retry with a fresh token has failed as well.
pub fn classify(
    status: u16,
    error: &GraphApiError,
    request_id: Option<&str>,
    retry_after: Option<Duration>,
) -> SendError {
    let reason = reason(status, error, request_id);
    match status {
        408 | 429 | 500..=599 => SendError::Transient { reason, retry_after },
        403 if is_access_denial(&error.code) => SendError::Denied { reason },
        _ => SendError::Permanent { reason },
    }
}

/// The 403 codes that say the app may not act for the mailbox (as opposed to, say, a
/// mailbox quota): Graph answers `ErrorAccessDenied` to an app without Mail.Send and to a
/// mailbox outside its RBAC for Applications scope, `ErrorSendAsDenied` outside an
/// application access policy.
fn is_access_denial(code: &str) -> bool {
    ["ErrorAccessDenied", "AccessDenied", "ErrorSendAsDenied", "Authorization_RequestDenied"]
        .iter()
        .any(|c| c.eq_ignore_ascii_case(code))
}

/// `Graph 403 ErrorSendAsDenied: <message> (<hint>; request-id <id>)`.
fn reason(status: u16, error: &GraphApiError, request_id: Option<&str>) -> String {
    let code = match (status, error.code.trim()) {
        (401, "") => "InvalidAuthenticationToken",
        (_, code) => code,
    };
    let mut reason = format!("Graph {status}");
    if !code.is_empty() {
        reason.push(' ');
        reason.push_str(code);
    }
    let message = error.message.trim();
    if !message.is_empty() {
        reason.push_str(": ");
        reason.push_str(message);
    }
    let extras: Vec<String> = hint(status, code)
        .map(str::to_string)
        .into_iter()
        .chain(request_id.map(|id| format!("request-id {id}")))
        .collect();
    if !extras.is_empty() {
        reason.push_str(&format!(" ({})", extras.join("; ")));
    }
    reason
}

/// What a person can do about the common failures.
fn hint(status: u16, code: &str) -> Option<&'static str> {
    let code = code.to_ascii_lowercase();
    Some(match code.as_str() {
        "errorsendasdenied" => "the app may not send as this mailbox: check the application access policy",
        "erroraccessdenied" | "accessdenied" | "authorization_requestdenied" => {
            "the app is not authorised to send as this mailbox: with Exchange Online RBAC for Applications, \
             put the mailbox in the management scope of the app's \"Application Mail.Send\" role assignment \
             (New-ManagementRoleAssignment -CustomResourceScope; the service principal is registered with the \
             Enterprise Application's object id); or grant the Microsoft Graph application permission \
             Mail.Send with admin consent (tenant-wide)"
        }
        "mailboxnotenabledforrestapi" => {
            "the sender has no Exchange Online mailbox (or it is on premises, inactive or soft-deleted)"
        }
        "errormailboxnotfound" | "errorinvaliduser" => "no mailbox in the tenant has the sender's address",
        "errorinvalidrecipients" => "check the recipient addresses",
        "errorinvalidinternetmessageheader" => "custom headers must be named X-...",
        "errormessagesizeexceeded" => "the message is larger than the mailbox accepts",
        "invalidauthenticationtoken" => {
            "a fresh token was refused too: check the tenant, the cloud (a national cloud's Graph needs its own token scope) and the app's Mail.Send permission"
        }
        _ if status == 413 => "the message is larger than Graph accepts",
        _ => return None,
    })
}

/// Parses `Retry-After`: delay seconds, or an HTTP date (a date in the past means now).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(code: &str, message: &str) -> GraphApiError {
        GraphApiError { code: code.into(), message: message.into() }
    }

    #[test]
    fn classification_table() {
        let wait = Some(Duration::from_secs(7));
        let cases: &[(u16, &str, bool)] = &[
            (400, "ErrorInvalidRecipients", false),
            (400, "ErrorInvalidInternetMessageHeader", false),
            (400, "RequestBodyRead", false),
            (401, "InvalidAuthenticationToken", false),
            (403, "ErrorSendAsDenied", false),
            (403, "ErrorAccessDenied", false),
            (403, "MailboxNotEnabledForRESTAPI", false),
            (404, "MailboxNotEnabledForRESTAPI", false),
            (404, "ErrorMailboxNotFound", false),
            (413, "", false),
            (408, "", true),
            (429, "ApplicationThrottled", true),
            (500, "InternalServerError", true),
            (502, "", true),
            (503, "ServiceUnavailable", true),
            (504, "GatewayTimeout", true),
        ];
        for &(status, code, transient) in cases {
            let got = classify(status, &error(code, "words"), None, wait);
            assert_eq!(got.is_transient(), transient, "{status} {code}");
            if let SendError::Transient { retry_after, .. } = got {
                assert_eq!(retry_after, wait, "{status} keeps Retry-After");
            }
        }
    }

    #[test]
    fn reason_names_status_code_message_hint_and_request_id() {
        let got = classify(403, &error("ErrorSendAsDenied", "Access is denied."), Some("abc-123"), None);
        assert_eq!(
            got,
            SendError::Denied {
                reason: "Graph 403 ErrorSendAsDenied: Access is denied. (the app may not send as this \
                 mailbox: check the application access policy; request-id abc-123)"
                    .into()
            }
        );
        let got = classify(403, &error("ErrorAccessDenied", "Access is denied."), None, None);
        assert!(matches!(got, SendError::Denied { .. }), "{got:?}");
        for remedy in ["management scope", "Application Mail.Send", "Mail.Send with admin consent"] {
            assert!(got.to_string().contains(remedy), "{got}");
        }
        let quota = classify(403, &error("ErrorQuotaExceeded", "quota"), None, None);
        assert!(matches!(quota, SendError::Permanent { .. }), "other 403s are no statement on permissions");
    }

    #[test]
    fn reason_without_code_or_hint_stays_short() {
        let got = classify(502, &GraphApiError::default(), None, None);
        assert_eq!(got, SendError::transient("Graph 502"));
        let got = classify(400, &error("RequestBodyRead", "bad json"), None, None);
        assert_eq!(got.to_string(), "Graph 400 RequestBodyRead: bad json");
    }

    #[test]
    fn second_401_names_invalid_authentication_token() {
        let got = classify(401, &GraphApiError::default(), None, None);
        assert!(!got.is_transient());
        assert!(got.to_string().starts_with("Graph 401 InvalidAuthenticationToken"));
    }

    #[test]
    fn error_body_in_graph_shape() {
        let body = br#"{"error":{"code":"ErrorSendAsDenied","message":"no","innerError":{"request-id":"x"}}}"#;
        assert_eq!(GraphApiError::from_body(body), error("ErrorSendAsDenied", "no"));
    }

    #[test]
    fn error_body_not_from_graph_is_cut_short() {
        let body = format!("<html>\n<body>{}</body></html>", "x".repeat(1000));
        let got = GraphApiError::from_body(body.as_bytes());
        assert_eq!(got.code, "");
        assert!(got.message.starts_with("<html> <body>xxx"));
        assert_eq!(got.message.chars().count(), MAX_FOREIGN_BODY);
    }

    #[test]
    fn retry_after_seconds() {
        let now = SystemTime::now();
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_http_date() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now), Some(Duration::from_secs(30)));
        // The obsolete RFC 850 form, which HTTP still asks recipients to accept.
        assert_eq!(parse_retry_after("Sunday, 06-Nov-94 08:49:47 GMT", now), Some(Duration::from_secs(10)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_garbage() {
        let now = SystemTime::now();
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }
}
