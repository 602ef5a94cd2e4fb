//! The receiver's TLS: which way it is served (the flag rules: HTTPS with a certificate Secret
//! unless plain HTTP is asked for by name), and HTTPS over tokio-rustls with the certificate of
//! that Secret, swapped in when the Secret changes (`crate::serving_cert`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::serving_cert::{self, ServingCert};

/// How long a client may take over its TLS handshake, and over a request's headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// The answer to a plain-HTTP request on the HTTPS port (what Go's net/http answers too), so a
/// sender configured with `http://` logs why instead of a bare connection reset.
const PLAIN_HTTP_ANSWER: &[u8] = b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\nthis port serves HTTPS: use an https:// URL that trusts the receiver's CA\n";

/// How the receiver is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReceiverTls {
    /// HTTPS with the certificate of this `kubernetes.io/tls` Secret (`--alerts-tls-secret`).
    Secret {
        /// The Secret's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
    },
    /// Plain HTTP (`--alerts-insecure-http`).
    InsecureHttp,
}

impl ReceiverTls {
    /// The URL scheme senders use.
    pub fn scheme(&self) -> &'static str {
        match self {
            ReceiverTls::Secret { .. } => "https",
            ReceiverTls::InsecureHttp => "http",
        }
    }
}

/// The receiver's flags as given.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReceiverFlags<'a> {
    /// Whether `--alerts-addr` is set.
    pub addr: bool,
    /// `--alerts-tls-secret`.
    pub tls_secret: Option<&'a str>,
    /// `--alerts-insecure-http`.
    pub insecure_http: bool,
    /// `--alerts-url`.
    pub url: Option<&'a str>,
}

/// Why the receiver's flags do not fit together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiverFlagError {
    /// `--alerts-addr` without a word on TLS.
    #[error(
        "--alerts-addr needs --alerts-tls-secret [NAMESPACE/]NAME (a kubernetes.io/tls Secret with tls.crt and tls.key), or --alerts-insecure-http to serve plain HTTP"
    )]
    NoTlsChoice,
    /// Both a Secret and plain HTTP.
    #[error("--alerts-tls-secret and --alerts-insecure-http exclude each other")]
    Both,
    /// A receiver setting without the receiver.
    #[error("{0} is set, but the receiver is off without --alerts-addr")]
    WithoutAddr(&'static str),
    /// Not `[NAMESPACE/]NAME`.
    #[error("--alerts-tls-secret {0:?} is not [NAMESPACE/]NAME")]
    BadSecretName(String),
    /// `--alerts-url` with the other scheme than the receiver serves.
    #[error("--alerts-url {url} must start with {scheme}:// (the receiver serves {what})")]
    UrlScheme {
        /// The URL given.
        url: String,
        /// The scheme it must have.
        scheme: &'static str,
        /// What the receiver serves.
        what: &'static str,
    },
}

/// How the receiver is served, or `None` when it is off: HTTPS when a certificate Secret is
/// named, plain HTTP only when `--alerts-insecure-http` says so, nothing else; `--alerts-url`
/// must carry the scheme served. A Secret without a namespace is in `pod_namespace`.
pub fn receiver_tls(flags: ReceiverFlags<'_>, pod_namespace: &str) -> Result<Option<ReceiverTls>, ReceiverFlagError> {
    if !flags.addr {
        return match (flags.tls_secret, flags.insecure_http, flags.url) {
            (Some(_), _, _) => Err(ReceiverFlagError::WithoutAddr("--alerts-tls-secret")),
            (_, true, _) => Err(ReceiverFlagError::WithoutAddr("--alerts-insecure-http")),
            (_, _, Some(_)) => Err(ReceiverFlagError::WithoutAddr("--alerts-url")),
            (None, false, None) => Ok(None),
        };
    }
    let tls = match (flags.tls_secret, flags.insecure_http) {
        (Some(_), true) => return Err(ReceiverFlagError::Both),
        (None, false) => return Err(ReceiverFlagError::NoTlsChoice),
        (None, true) => ReceiverTls::InsecureHttp,
        (Some(flag), false) => {
            let (namespace, name) = serving_cert::secret_name(flag, pod_namespace)
                .ok_or_else(|| ReceiverFlagError::BadSecretName(flag.to_string()))?;
            ReceiverTls::Secret { namespace, name }
        }
    };
    if let Some(url) = flags.url {
        let scheme = tls.scheme();
        let rest = url.split_once("://").filter(|(s, _)| s.eq_ignore_ascii_case(scheme)).map(|(_, rest)| rest);
        if rest.is_none_or(str::is_empty) {
            let what = if scheme == "https" { "HTTPS" } else { "plain HTTP" };
            return Err(ReceiverFlagError::UrlScheme { url: url.to_string(), scheme, what });
        }
    }
    Ok(Some(tls))
}

/// Whether the first bytes a client sent are a plain HTTP request rather than a TLS handshake
/// (a TLS record starts with its content type, 0x16 for a handshake; a request with its method).
pub fn looks_like_plain_http(first: &[u8]) -> bool {
    first.first().is_some_and(u8::is_ascii_uppercase)
}

/// Serves `app` over TLS on `listener`, presenting whatever certificate `cert` holds at each
/// handshake; a connection that fails its handshake is closed, and one that speaks plain HTTP is
/// answered 400 first. Runs until the process ends.
pub async fn serve_https(listener: TcpListener, app: Router, cert: Arc<ServingCert>) {
    let mut config = (*cert.server_config()).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "notification receiver: accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, app, cert) = (acceptor.clone(), app.clone(), cert.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(stream, peer, acceptor, app).await {
                if cert.is_loaded() {
                    debug!(peer = %peer, error = %e, "notification receiver: connection ended");
                } else {
                    warn!(peer = %peer, "notification receiver: a connection was refused: the certificate Secret has not been read yet");
                }
            }
        });
    }
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    app: Router,
) -> std::io::Result<()> {
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out");
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await.map_err(|_| timed_out())??;
    if looks_like_plain_http(&first[..peeked]) {
        warn!(peer = %peer, "notification receiver: a plain HTTP request on the HTTPS port was refused");
        stream.write_all(PLAIN_HTTP_ANSWER).await?;
        return stream.shutdown().await;
    }
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await.map_err(|_| timed_out())??;
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
        .await
        .map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags<'a>(tls_secret: Option<&'a str>, insecure_http: bool, url: Option<&'a str>) -> ReceiverFlags<'a> {
        ReceiverFlags { addr: true, tls_secret, insecure_http, url }
    }

    fn secret(namespace: &str, name: &str) -> Option<ReceiverTls> {
        Some(ReceiverTls::Secret { namespace: namespace.into(), name: name.into() })
    }

    #[test]
    fn the_receiver_serves_https_with_a_secret_and_plain_http_only_when_asked() {
        let pod = "mailroom-system";
        assert_eq!(receiver_tls(flags(Some("alerts-tls"), false, None), pod), Ok(secret(pod, "alerts-tls")));
        assert_eq!(receiver_tls(flags(Some("monitoring/tls"), false, None), pod), Ok(secret("monitoring", "tls")));
        assert_eq!(receiver_tls(flags(None, true, None), pod), Ok(Some(ReceiverTls::InsecureHttp)));
        // Neither said: no silent fallback to plain HTTP.
        assert_eq!(receiver_tls(flags(None, false, None), pod), Err(ReceiverFlagError::NoTlsChoice));
        assert_eq!(receiver_tls(flags(Some("alerts-tls"), true, None), pod), Err(ReceiverFlagError::Both));
        for bad in ["", "ns/", "/name", "a/b/c"] {
            assert_eq!(
                receiver_tls(flags(Some(bad), false, None), pod),
                Err(ReceiverFlagError::BadSecretName(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_public_url_carries_the_scheme_served() {
        let pod = "mailroom-system";
        let https = "https://mailroom-alerts.mailroom-system.svc:8082";
        let http = "http://mailroom-alerts.mailroom-system.svc:8082";
        assert_eq!(receiver_tls(flags(Some("t"), false, Some(https)), pod), Ok(secret(pod, "t")));
        assert_eq!(receiver_tls(flags(Some("t"), false, Some("HTTPS://a")), pod), Ok(secret(pod, "t")));
        assert_eq!(receiver_tls(flags(None, true, Some(http)), pod), Ok(Some(ReceiverTls::InsecureHttp)));
        for (tls_secret, insecure, url, scheme) in [
            (Some("t"), false, http, "https"),
            (Some("t"), false, "mailroom-alerts:8082", "https"),
            (Some("t"), false, "https://", "https"),
            (None, true, https, "http"),
        ] {
            let got = receiver_tls(flags(tls_secret, insecure, Some(url)), pod);
            assert!(
                matches!(&got, Err(ReceiverFlagError::UrlScheme { url: u, scheme: s, .. }) if u == url && *s == scheme),
                "{url}: {got:?}"
            );
        }
    }

    #[test]
    fn without_an_address_the_receiver_is_off_and_its_settings_are_refused() {
        let off = ReceiverFlags::default();
        assert_eq!(receiver_tls(off, "ns"), Ok(None));
        let refused = |f: ReceiverFlags<'_>| receiver_tls(f, "ns").err();
        assert_eq!(
            refused(ReceiverFlags { tls_secret: Some("t"), ..off }),
            Some(ReceiverFlagError::WithoutAddr("--alerts-tls-secret"))
        );
        assert_eq!(
            refused(ReceiverFlags { insecure_http: true, ..off }),
            Some(ReceiverFlagError::WithoutAddr("--alerts-insecure-http"))
        );
        assert_eq!(
            refused(ReceiverFlags { url: Some("https://a"), ..off }),
            Some(ReceiverFlagError::WithoutAddr("--alerts-url"))
        );
    }

    #[test]
    fn a_plain_request_is_told_from_a_tls_handshake() {
        for method in ["POST /alerts", "GET /", "PUT /"] {
            assert!(looks_like_plain_http(method.as_bytes()), "{method}");
        }
        // A TLS record: handshake (0x16), version 3.1.
        assert!(!looks_like_plain_http(&[0x16, 0x03, 0x01]));
        assert!(!looks_like_plain_http(b""));
        assert!(!looks_like_plain_http(b"\x80\x2b\x01"));
    }
}
