//! The origin (`https://host:port`) a client used to reach the emulator.

use axum::http::{HeaderMap, Uri, header};

/// The origin the request was addressed to (HTTP/1.1 `Host`, or the HTTP/2 authority),
/// or `fallback` when neither is present.
pub fn request_origin(headers: &HeaderMap, uri: &Uri, fallback: &str) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| uri.authority().map(|a| a.to_string()));
    match host {
        Some(host) if !host.is_empty() => format!("https://{host}"),
        _ => fallback.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_wins_then_authority_then_fallback() {
        let mut headers = HeaderMap::new();
        let uri: Uri = "https://127.0.0.1:9/x".parse().expect("uri");
        assert_eq!(request_origin(&headers, &uri, "https://f"), "https://127.0.0.1:9");
        headers.insert(header::HOST, "localhost:9".parse().expect("host"));
        assert_eq!(request_origin(&headers, &uri, "https://f"), "https://localhost:9");
        let bare: Uri = "/x".parse().expect("uri");
        assert_eq!(request_origin(&HeaderMap::new(), &bare, "https://f"), "https://f");
    }
}
