//! One info line per request: method, path, status, duration. Never headers or bodies,
//! which carry tokens and secrets; upload URLs are credentials, so their ids are left out.

use std::time::Instant;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;

/// The path as logged.
pub fn loggable_path(path: &str) -> &str {
    if path.starts_with("/_upload/") { "/_upload/…" } else { path }
}

/// Logs each request once answered.
pub async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = loggable_path(request.uri().path()).to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    tracing::info!(
        %method,
        %path,
        status = response.status().as_u16(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "request"
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_ids_are_not_logged() {
        assert_eq!(loggable_path("/_upload/abc"), "/_upload/…");
        assert_eq!(loggable_path("/v1.0/users/a@b.c/sendMail"), "/v1.0/users/a@b.c/sendMail");
    }
}
