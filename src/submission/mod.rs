//! The SMTP submission listener (`--smtp-addr`, `--smtps-addr`): tools that can only send mail
//! by SMTP with a password submit it here, and each accepted mail becomes an EmailMessage whose
//! raw MIME is kept in a Secret it owns (`spec.raw`), sent like any other message.
//!
//! `session` speaks the protocol; `backend` decides, from `SmtpCredential`s and their profiles,
//! who may submit what, and stores what is accepted; this module listens, bounds connections and
//! wraps them in TLS.

pub mod backend;
pub mod reply;
pub mod session;
pub mod status;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

pub use backend::KubeBackend;
pub use session::{Backend, Limits};

use crate::serving_cert::ServingCert;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// The listener's settings.
#[derive(Clone, Debug)]
pub struct SubmissionConfig {
    /// The submission port with STARTTLS (587).
    pub addr: Option<SocketAddr>,
    /// The port with implicit TLS (465).
    pub implicit_tls_addr: Option<SocketAddr>,
    /// The name in the greeting and the EHLO reply.
    pub hostname: String,
    /// Connections served at once; more are answered `421` and closed.
    pub max_connections: usize,
    /// What one session may take.
    pub limits: Limits,
}

/// The addresses listened on.
#[derive(Clone, Copy, Debug)]
pub struct Listening {
    /// The STARTTLS port's address.
    pub addr: Option<SocketAddr>,
    /// The implicit-TLS port's address.
    pub implicit_tls_addr: Option<SocketAddr>,
}

/// Binds the listeners and serves them in the background.
pub async fn serve<B: Backend + 'static>(
    config: SubmissionConfig,
    backend: Arc<B>,
    cert: Arc<ServingCert>,
) -> std::io::Result<Listening> {
    let shared = Arc::new(Shared {
        acceptor: TlsAcceptor::from(cert.server_config()),
        cert,
        permits: Arc::new(Semaphore::new(config.max_connections)),
        config,
        backend,
    });
    let mut listening = Listening { addr: None, implicit_tls_addr: None };
    for (addr, implicit) in [(shared.config.addr, false), (shared.config.implicit_tls_addr, true)] {
        let Some(addr) = addr else { continue };
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        if implicit {
            listening.implicit_tls_addr = Some(local);
        } else {
            listening.addr = Some(local);
        }
        tracing::info!(addr = %local, implicit_tls = implicit, "SMTP submission listening");
        tokio::spawn(accept_loop(listener, implicit, shared.clone()));
    }
    Ok(listening)
}

struct Shared<B> {
    config: SubmissionConfig,
    backend: Arc<B>,
    cert: Arc<ServingCert>,
    acceptor: TlsAcceptor,
    permits: Arc<Semaphore>,
}

async fn accept_loop<B: Backend + 'static>(listener: TcpListener, implicit: bool, shared: Arc<Shared<B>>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "SMTP submission: accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
                refuse_busy(stream).await;
                return;
            };
            if let Err(e) = connection(stream, implicit, &shared).await {
                tracing::debug!(peer = %peer, error = %e, "SMTP submission: connection ended");
            }
            drop(permit);
        });
    }
}

async fn refuse_busy(mut stream: TcpStream) {
    let _ = stream.write_all(b"421 4.7.0 too many connections; try again later\r\n").await;
    let _ = stream.shutdown().await;
}

async fn connection<B: Backend>(stream: TcpStream, implicit: bool, shared: &Shared<B>) -> std::io::Result<()> {
    let c = &shared.config;
    let backend = shared.backend.as_ref();
    if implicit {
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, shared.acceptor.accept(stream)).await??;
        session::run(tls, &c.hostname, true, true, &c.limits, backend, true).await?;
        return Ok(());
    }
    let tls_available = shared.cert.is_loaded();
    match session::run(stream, &c.hostname, false, tls_available, &c.limits, backend, true).await? {
        session::Ended::Closed => Ok(()),
        session::Ended::StartTls(stream) => {
            let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, shared.acceptor.accept(stream)).await??;
            session::run(tls, &c.hostname, true, true, &c.limits, backend, false).await?;
            Ok(())
        }
    }
}

/// Starts the listener on the Kubernetes API: the certificate from the Secret
/// `cert_namespace/cert_name` (watched), credentials from SmtpCredentials in `namespace` (or all).
pub async fn serve_kube(
    client: Client,
    config: SubmissionConfig,
    namespace: Option<String>,
    cert_namespace: String,
    cert_name: String,
) -> std::io::Result<Listening> {
    let cert = Arc::new(ServingCert::default());
    tokio::spawn(crate::serving_cert::watch(
        client.clone(),
        cert_namespace,
        cert_name,
        cert.clone(),
        "SMTP submission",
    ));
    tokio::spawn(status::run(client.clone(), namespace.clone()));
    let backend = Arc::new(KubeBackend::new(client, namespace));
    serve(config, backend, cert).await
}
