//! The operator's HTTP endpoints: `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tracing::info;

use crate::exposition;
use crate::metrics::Metrics;

/// Whether the operator's caches are filled and it is working.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    /// Marks the operator ready (or not).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether it is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// OpenMetrics for a scraper that asks for it (Prometheus does), else the Prometheus text format.
async fn metrics(State(m): State<Arc<Metrics>>, headers: HeaderMap) -> impl IntoResponse {
    m.tasks.set(tokio::runtime::Handle::current().metrics().num_alive_tasks() as i64);
    m.sample();
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if exposition::wants_openmetrics(accept) {
        ([(header::CONTENT_TYPE, exposition::OPENMETRICS)], m.encode())
    } else {
        ([(header::CONTENT_TYPE, exposition::PROMETHEUS_TEXT)], exposition::to_prometheus_text(&m.encode()))
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(h): State<Arc<Health>>) -> (StatusCode, &'static str) {
    if h.is_ready() { (StatusCode::OK, "ok") } else { (StatusCode::SERVICE_UNAVAILABLE, "caches not synced") }
}

/// Binds both endpoints (port 0 picks a free port) and serves them in the background.
/// Returns the bound addresses.
pub async fn serve(
    metrics_addr: SocketAddr,
    health_addr: SocketAddr,
    m: Arc<Metrics>,
    h: Arc<Health>,
) -> std::io::Result<(SocketAddr, SocketAddr)> {
    let metrics_listener = TcpListener::bind(metrics_addr).await?;
    let health_listener = TcpListener::bind(health_addr).await?;
    let (ma, ha) = (metrics_listener.local_addr()?, health_listener.local_addr()?);
    let metrics_app = Router::new().route("/metrics", get(metrics)).with_state(m);
    let health_app = Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).with_state(h);
    tokio::spawn(async move { axum::serve(metrics_listener, metrics_app).await });
    tokio::spawn(async move { axum::serve(health_listener, health_app).await });
    info!(metrics = %ma, health = %ha, "serving /metrics, /healthz and /readyz");
    Ok((ma, ha))
}
