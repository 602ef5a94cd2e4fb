//! Graph's error shape: `{"error":{"code","message","innerError":{...}}}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::clock;

/// The ids every Graph response carries.
#[derive(Debug, Clone)]
pub struct RequestIds {
    /// The emulator's `request-id`.
    pub request_id: String,
    /// The client's `client-request-id`, echoed.
    pub client_request_id: Option<String>,
}

/// A Graph error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphError {
    /// HTTP status.
    pub status: StatusCode,
    /// `error.code`.
    pub code: String,
    /// `error.message`.
    pub message: String,
    /// `Retry-After` seconds.
    pub retry_after: Option<u64>,
}

impl GraphError {
    /// Any error.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self { status, code: code.to_string(), message: message.into(), retry_after: None }
    }

    /// 400 with the given code.
    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401 InvalidAuthenticationToken.
    pub fn invalid_token(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken", message)
    }

    /// 403 ErrorAccessDenied: the token lacks the permission.
    pub fn access_denied() -> Self {
        Self::new(StatusCode::FORBIDDEN, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
    }

    /// 403 ErrorSendAsDenied: the app may not act for this mailbox.
    pub fn send_as_denied() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "ErrorSendAsDenied",
            "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account., Cannot submit message.",
        )
    }

    /// 404 ErrorItemNotFound.
    pub fn item_not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "ErrorItemNotFound", "The specified object was not found in the store.")
    }

    /// 429 for a mailbox over its concurrency limit.
    pub fn mailbox_concurrency(retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "ApplicationThrottled",
                "Application is over its MailboxConcurrency limit.",
            )
        }
    }

    /// An injected fault with Graph's usual code for the status.
    pub fn fault(status: u16, retry_after: Option<u64>, code: Option<String>, message: Option<String>) -> Self {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let (default_code, default_message) = match status.as_u16() {
            429 => ("TooManyRequests", "Too many requests. Retry after the interval given in Retry-After."),
            500 => ("InternalServerError", "An internal server error occurred."),
            502 => ("BadGateway", "Bad gateway."),
            503 => (
                "ServiceUnavailable",
                "The service is temporarily unavailable. Retry after the interval given in Retry-After.",
            ),
            504 => ("GatewayTimeout", "The gateway timed out."),
            401 => ("InvalidAuthenticationToken", "Access token validation failure."),
            403 => ("ErrorAccessDenied", "Access is denied. Check credentials and try again."),
            _ => ("UnknownError", "An error was injected."),
        };
        Self {
            status,
            code: code.unwrap_or_else(|| default_code.to_string()),
            message: message.unwrap_or_else(|| default_message.to_string()),
            retry_after,
        }
    }

    /// Renders the error with its request ids.
    pub fn render(&self, ids: &RequestIds, authority: &str) -> Response {
        let body = serde_json::json!({
            "error": {
                "code": self.code,
                "message": self.message,
                "innerError": {
                    "date": clock::graph_date(clock::now_unix()),
                    "request-id": ids.request_id,
                    "client-request-id": ids.client_request_id.as_deref().unwrap_or(&ids.request_id),
                }
            }
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            let challenge = format!(
                "Bearer realm=\"\", authorization_uri=\"{authority}/common/oauth2/authorize\", client_id=\"00000003-0000-0000-c000-000000000000\""
            );
            if let Ok(v) = HeaderValue::from_str(&challenge) {
                headers.insert(header::WWW_AUTHENTICATE, v);
            }
        }
        response
    }
}

/// A handler's error: an empty response carrying the error, which the Graph gate renders
/// once it knows the request ids.
impl IntoResponse for GraphError {
    fn into_response(self) -> Response {
        let mut response = self.status.into_response();
        response.extensions_mut().insert(self);
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_errors_have_graph_shape_and_headers() {
        let ids = RequestIds { request_id: "r".into(), client_request_id: None };
        let r = GraphError::mailbox_concurrency(3).render(&ids, "https://x");
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()), Some("3"));
        let r = GraphError::invalid_token("Access token is empty.").render(&ids, "https://x");
        assert!(r.headers().contains_key(header::WWW_AUTHENTICATE));
    }

    #[test]
    fn faults_pick_the_usual_code() {
        assert_eq!(GraphError::fault(503, None, None, None).code, "ServiceUnavailable");
        assert_eq!(GraphError::fault(504, None, Some("X".into()), None).code, "X");
    }
}
