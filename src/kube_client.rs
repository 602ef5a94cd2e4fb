//! The operator's Kubernetes client: kube's own stack with a bounded connection pool.
//!
//! kube's default client keeps every idle HTTP/1.1 connection to the API server for 90 s, with
//! no limit per host. A burst of concurrent reconciles (1,000 profiles created at once) opens
//! hundreds of connections, and each idle one keeps its TLS state, buffers and dispatch channel:
//! a heap profile of an operator idle after such a burst showed these connections as most of
//! what it still held; and as kube's pool has no timer, idle connections are only ever evicted
//! when one is checked out, so they stay. This client keeps at most [`Pool::OPERATOR`]'s count
//! idle and closes them after its timeout, on a timer; a burst still gets as many connections as
//! it needs while it lasts.

use std::time::Duration;

use hyper_timeout::TimeoutConnector;
use hyper_util::client::legacy::Builder;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::ConfigExt;
use kube::client::retry::RetryPolicy;
use kube::{Client, Config};
use tower::retry::RetryLayer;
use tower::{BoxError, ServiceBuilder};

/// How many idle connections to the API server are kept, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool {
    /// Idle connections kept at most.
    pub idle: usize,
    /// How long an idle connection is kept.
    pub timeout: Duration,
}

impl Pool {
    /// The operator's: 16 idle connections serve the reconciles between bursts (the watches hold
    /// their own), for 30 s.
    pub const OPERATOR: Pool = Pool { idle: 16, timeout: Duration::from_secs(30) };
}

/// A client for `config`: the layers of kube's `ClientBuilder` (base URI, retries when the
/// config asks for them, authentication, extra headers, connect/read/write timeouts) over the
/// operator's pool. A config with a proxy gets kube's own client, which knows proxies.
pub fn client(config: Config) -> Result<Client, kube::Error> {
    client_with_pool(config, Pool::OPERATOR)
}

/// [`client`] with another pool.
pub fn client_with_pool(config: Config, pool: Pool) -> Result<Client, kube::Error> {
    if config.proxy_url.is_some() {
        return Client::try_from(config);
    }
    let default_namespace = config.default_namespace.clone();
    let mut connector = TimeoutConnector::new(config.rustls_https_connector()?);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let http = Builder::new(TokioExecutor::new())
        .pool_max_idle_per_host(pool.idle)
        .pool_idle_timeout(pool.timeout)
        .pool_timer(TokioTimer::new())
        .build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.default_retry.then(|| RetryLayer::new(RetryPolicy::server_retry())))
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(http);
    Ok(Client::new(service, default_namespace))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn config(url: &str) -> Config {
        Config::new(url.parse().expect("url"))
    }

    #[tokio::test]
    async fn builds_for_an_https_server_without_a_proxy() {
        let client = client(config("https://127.0.0.1:6443")).expect("client");
        assert_eq!(client.default_namespace(), "default");
    }

    /// A keep-alive HTTP/1.1 server answering every request with /version's body after
    /// `delay`; counts the connections open.
    async fn version_server(delay: Duration) -> (String, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let open = Arc::new(AtomicUsize::new(0));
        let counter = open.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let open = counter.clone();
                open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let body = r#"{"major":"1","minor":"35","gitVersion":"v1.35.0","gitCommit":"","gitTreeState":"","buildDate":"","goVersion":"","compiler":"","platform":"linux/amd64"}"#;
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            assert!(buf.starts_with(b"GET /version "), "{}", String::from_utf8_lossy(&buf));
                            buf.drain(..end + 4);
                            tokio::time::sleep(delay).await;
                            if stream.write_all(reply.as_bytes()).await.is_err() {
                                break;
                            }
                        }
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        (url, open)
    }

    async fn burst(client: &Client, n: usize) {
        let versions = futures::future::join_all((0..n).map(|_| client.apiserver_version())).await;
        for v in versions {
            assert_eq!(v.expect("version").git_version, "v1.35.0");
        }
    }

    async fn open_after(open: &AtomicUsize, wait: Duration) -> usize {
        tokio::time::sleep(wait).await;
        open.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn a_burst_leaves_at_most_the_pools_idle_connections_and_they_close() {
        let (url, open) = version_server(Duration::from_millis(200)).await;
        let pool = Pool { idle: 1, timeout: Duration::from_millis(300) };
        let client = client_with_pool(config(&url), pool).expect("client");
        burst(&client, 6).await;
        assert_eq!(open_after(&open, Duration::from_millis(100)).await, 1, "one idle connection kept");
        assert_eq!(open_after(&open, Duration::from_millis(1500)).await, 0, "closed after the idle timeout");
        // Still usable afterwards.
        burst(&client, 1).await;
    }

    #[tokio::test]
    async fn kubes_default_client_keeps_every_connection_of_a_burst() {
        // What the pool above fixes: kube's client keeps all six (no limit, no timer).
        let (url, open) = version_server(Duration::from_millis(200)).await;
        let client = Client::try_from(config(&url)).expect("client");
        burst(&client, 6).await;
        assert_eq!(open_after(&open, Duration::from_millis(1500)).await, 6);
    }
}
