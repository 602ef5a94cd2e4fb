//! Starting and stopping the emulator: TLS, the listener, and the routes.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum_server::Handle;
use axum_server::tls_rustls::RustlsConfig;
use tokio::task::JoinHandle;

use crate::cloud::Cloud;
use crate::signing::{SignerError, TokenSigner};
use crate::state::{AppState, RuntimeSettings, SharedState};
use crate::{admin, graph, logging, tls, tokens};

/// How an emulator is started.
#[derive(Debug, Clone)]
pub struct Config {
    /// Loopback address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Also allow a private (RFC 1918) IPv4 address: the address a local cluster's Pods reach the
    /// host on, which the test environment creates for itself.
    pub allow_private: bool,
    /// Token lifetime for apps that do not set one.
    pub default_token_lifetime: u64,
    /// The token-signing key; a fresh one is generated when absent.
    pub signer: Option<Arc<TokenSigner>>,
    /// Requests allowed in flight per mailbox (Graph: 4).
    pub mailbox_concurrency: usize,
    /// `Retry-After` seconds on a concurrency 429.
    pub throttle_retry_after: u64,
    /// The cloud the emulator plays: its Graph and Outlook resources and token audiences.
    pub cloud: Cloud,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            allow_private: false,
            default_token_lifetime: 3600,
            signer: None,
            mailbox_concurrency: 4,
            throttle_retry_after: 1,
            cloud: Cloud::Public,
        }
    }
}

/// Why the emulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The admin API has no authentication, so only loopback (and, when asked, a private
    /// address) is allowed.
    #[error("refusing to listen on {0}: only loopback addresses (and private ones with --allow-private) are allowed")]
    NotLoopback(SocketAddr),
    /// Binding failed.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// TLS material could not be made.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The signing key could not be made.
    #[error(transparent)]
    Signer(#[from] SignerError),
    /// Key generation was interrupted.
    #[error("key generation failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// A running emulator.
pub struct RunningEmulator {
    url: String,
    ca_pem: String,
    handle: Handle<SocketAddr>,
    task: JoinHandle<std::io::Result<()>>,
}

impl RunningEmulator {
    /// `https://127.0.0.1:PORT`, no trailing slash.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The CA certificate (PEM) that signed the server certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Stops accepting, lets requests in progress finish (up to 5 s), and waits.
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.handle.graceful_shutdown(Some(Duration::from_secs(5)));
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

/// Loopback always; a private IPv4 address (10/8, 172.16/12, 192.168/16) only when allowed.
fn listen_allowed(ip: IpAddr, allow_private: bool) -> bool {
    match ip {
        _ if ip.is_loopback() => true,
        IpAddr::V4(v4) => allow_private && v4.is_private(),
        IpAddr::V6(_) => false,
    }
}

/// Starts an emulator and returns once it accepts connections.
pub async fn start(config: Config) -> Result<RunningEmulator, StartError> {
    if !listen_allowed(config.listen.ip(), config.allow_private) {
        return Err(StartError::NotLoopback(config.listen));
    }
    let signer = match config.signer {
        Some(signer) => signer,
        None => Arc::new(tokio::task::spawn_blocking(TokenSigner::generate).await??),
    };
    let tls = tls::generate(config.listen.ip())?;
    let bind = |source| StartError::Bind { addr: config.listen, source };
    let listener = TcpListener::bind(config.listen).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    let local = listener.local_addr().map_err(bind)?;
    let url = match local {
        SocketAddr::V4(a) => format!("https://{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("https://[{}]:{}", a.ip(), a.port()),
    };

    let state: AppState = Arc::new(SharedState::new(
        RuntimeSettings {
            base_url: url.clone(),
            listen_ip: local.ip(),
            default_token_lifetime: config.default_token_lifetime,
            mailbox_concurrency: config.mailbox_concurrency.max(1),
            throttle_retry_after: config.throttle_retry_after,
            cloud: config.cloud,
        },
        signer,
    ));
    let app = Router::new()
        .merge(tokens::router())
        .merge(graph::router(state.clone()))
        .merge(admin::router(state.clone()))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(logging::log_request))
        .with_state(state);

    let handle = Handle::new();
    let server = axum_server::from_tcp_rustls(listener, RustlsConfig::from_config(tls.config))
        .map_err(bind)?
        .handle(handle.clone());
    let task = tokio::spawn(server.serve(app.into_make_service_with_connect_info::<SocketAddr>()));
    handle.listening().await;
    tracing::info!(%url, cloud = %config.cloud, "m365 emulator listening");
    Ok(RunningEmulator { url, ca_pem: tls.ca_pem, handle, task })
}

async fn not_found(uri: Uri) -> Response {
    if uri.path().starts_with("/v1.0/me/") || uri.path() == "/v1.0/me" {
        // App-only tokens cannot use /me; Graph says so plainly.
        let body = serde_json::json!({
            "error": {
                "code": "BadRequest",
                "message": "/me request is only valid with delegated authentication flow.",
            }
        });
        return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
    }
    let body = serde_json::json!({
        "error": {
            "code": "BadRequest",
            "message": format!("Resource not found for the segment '{}'.", uri.path().rsplit('/').next().unwrap_or_default()),
        }
    });
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::listen_allowed;

    #[test]
    fn listens_on_loopback_and_on_private_addresses_only_when_allowed() {
        let ip = |s: &str| s.parse().expect("ip");
        assert!(listen_allowed(ip("127.0.0.1"), false));
        assert!(listen_allowed(ip("::1"), false));
        assert!(!listen_allowed(ip("10.213.0.1"), false));
        assert!(listen_allowed(ip("10.213.0.1"), true));
        assert!(listen_allowed(ip("192.168.7.1"), true));
        for public in ["192.0.2.2", "8.8.8.8", "0.0.0.0", "::", "fd00::1"] {
            assert!(!listen_allowed(ip(public), true), "{public}");
        }
    }
}
