//! A proxy between operator processes and kube-apiserver that loses answers on purpose.
//!
//! The operators speak plain HTTP/1.1 to it (through the kubeconfig [`ApiProxy::write_kubeconfig`]
//! writes); it forwards every request over TLS with the credentials of the real kubeconfig and
//! streams the answer back, watches included. Two faults:
//!
//! - **lost answers on claims**: of the PATCHes of an EmailMessage's status that set
//!   `"phase":"Sending"` (the claims), a seeded random share is forwarded, answered by the API
//!   server (so the claim landed, or was refused), and then the connection is closed instead of
//!   the answer being returned. The operator cannot tell whether its claim was written.
//! - **held answers on message creates**: while [`ApiProxy::hold_message_creates`] is on, a POST
//!   that creates an EmailMessage is forwarded and answered by the API server (the message
//!   exists), and its answer is never returned: the operator waits on it until it dies.
//! - **pause**: while paused, open connections are closed and new ones closed at once, so that no
//!   operator reaches the API server while the harness looks at it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A claim whose answer the proxy withheld.
#[derive(Debug, Clone)]
pub struct LostAnswer {
    /// The EmailMessage's name.
    pub name: String,
    /// The API server's status for the PATCH (200: the claim landed).
    pub status: u16,
}

struct Shared {
    upstream: reqwest::Client,
    upstream_url: String,
    lose_rate: f64,
    rng: Mutex<StdRng>,
    paused: watch::Sender<bool>,
    claims: AtomicU64,
    lost: Mutex<Vec<LostAnswer>>,
    hold_message_creates: std::sync::atomic::AtomicBool,
    held: AtomicU64,
}

/// The running proxy; stops when dropped.
pub struct ApiProxy {
    /// Its loopback port.
    pub port: u16,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

/// The server URL, CA and client credentials of an admin kubeconfig (certificates embedded, as
/// hack/testenv.sh writes them).
fn upstream_from_kubeconfig(path: &Path) -> (String, reqwest::Client) {
    use base64::Engine;
    let text = std::fs::read_to_string(path).expect("kubeconfig");
    let kc: serde_yaml::Value = serde_yaml::from_str(&text).expect("kubeconfig YAML");
    let decode = |v: &serde_yaml::Value| {
        base64::engine::general_purpose::STANDARD.decode(v.as_str().expect("base64 data")).expect("base64")
    };
    let cluster = &kc["clusters"][0]["cluster"];
    let user = &kc["users"][0]["user"];
    let server = cluster["server"].as_str().expect("server").trim_end_matches('/').to_string();
    let ca = reqwest::Certificate::from_pem(&decode(&cluster["certificate-authority-data"])).expect("CA");
    let mut pem = decode(&user["client-certificate-data"]);
    pem.extend_from_slice(b"\n");
    pem.extend_from_slice(&decode(&user["client-key-data"]));
    let identity = reqwest::Identity::from_pem(&pem).expect("client identity");
    mailroom::tls::install_crypto_provider();
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .identity(identity)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("upstream client");
    (server, client)
}

impl ApiProxy {
    /// Starts a proxy in front of the API server of `kubeconfig` that withholds the answer of
    /// each claim with probability `lose_rate` (draws from `seed`).
    pub async fn start(kubeconfig: &Path, lose_rate: f64, seed: u64) -> ApiProxy {
        let (upstream_url, upstream) = upstream_from_kubeconfig(kubeconfig);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let port = listener.local_addr().expect("address").port();
        let shared = Arc::new(Shared {
            upstream,
            upstream_url,
            lose_rate,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            paused: watch::Sender::new(false),
            claims: AtomicU64::new(0),
            lost: Mutex::new(Vec::new()),
            hold_message_creates: std::sync::atomic::AtomicBool::new(false),
            held: AtomicU64::new(0),
        });
        let task = tokio::spawn(accept(listener, Arc::clone(&shared)));
        ApiProxy { port, shared, task }
    }

    /// Writes a kubeconfig that reaches the API server through the proxy (no credentials: the
    /// proxy adds its own).
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: proxy\n  cluster: {{server: \"http://127.0.0.1:{}\"}}\n\
             users:\n- name: proxy\n  user: {{}}\ncontexts:\n- name: proxy\n  context: {{cluster: proxy, user: proxy}}\n\
             current-context: proxy\n",
            self.port
        );
        std::fs::write(path, text).expect("write the proxy kubeconfig");
    }

    /// Closes every connection and refuses new ones until [`ApiProxy::resume`].
    pub fn pause(&self) {
        self.shared.paused.send_replace(true);
    }

    /// Lets connections through again.
    pub fn resume(&self) {
        self.shared.paused.send_replace(false);
    }

    /// Withholds (on) or returns (off) the answers of EmailMessage creates from now on.
    pub fn hold_message_creates(&self, on: bool) {
        self.shared.hold_message_creates.store(on, Ordering::Relaxed);
    }

    /// EmailMessage creates whose answers were withheld.
    pub fn held(&self) -> u64 {
        self.shared.held.load(Ordering::Relaxed)
    }

    /// Claims seen so far.
    pub fn claims(&self) -> u64 {
        self.shared.claims.load(Ordering::Relaxed)
    }

    /// The claims whose answers were withheld, oldest first.
    pub fn lost_answers(&self) -> Vec<LostAnswer> {
        self.shared.lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        self.pause();
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if *shared.paused.borrow() {
            drop(stream);
            continue;
        }
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut paused = shared.paused.subscribe();
            tokio::select! {
                _ = serve(stream, &shared) => {}
                _ = paused.wait_for(|p| *p) => {}
            }
        });
    }
}

/// One request as read from the operator.
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    close: bool,
}

/// Serves one connection, request after request, until either side closes it.
async fn serve(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let Some(request) = read_request(&mut stream, &mut buf).await else {
            return;
        };
        let hold = is_message_create(&request);
        let lose = is_claim(&request) && {
            shared.claims.fetch_add(1, Ordering::Relaxed);
            shared.rng.lock().unwrap_or_else(|e| e.into_inner()).random::<f64>() < shared.lose_rate
        };
        let Ok(method) = reqwest::Method::from_bytes(request.method.as_bytes()) else {
            return;
        };
        let mut upstream = shared.upstream.request(method, format!("{}{}", shared.upstream_url, request.path));
        for (name, value) in &request.headers {
            if !is_hop_by_hop(name) {
                upstream = upstream.header(name.as_str(), value.as_slice());
            }
        }
        let Ok(mut response) = upstream.body(request.body).send().await else {
            return;
        };
        if hold && shared.hold_message_creates.load(Ordering::Relaxed) {
            while let Ok(Some(_)) = response.chunk().await {}
            shared.held.fetch_add(1, Ordering::Relaxed);
            // Answer nothing until the operator goes away.
            let mut rest = [0u8; 1024];
            while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
            return;
        }
        if lose {
            // Wait for the whole answer, so that the write is done, then close without it.
            let status = response.status().as_u16();
            while let Ok(Some(_)) = response.chunk().await {}
            let name = request.path.split('/').rev().nth(1).unwrap_or_default().to_string();
            shared.lost.lock().unwrap_or_else(|e| e.into_inner()).push(LostAnswer { name, status });
            return;
        }
        if write_response(&mut stream, &mut response).await.is_err() || request.close {
            return;
        }
    }
}

/// A PATCH of an EmailMessage's status that sets phase Sending.
fn is_claim(r: &Request) -> bool {
    let path = r.path.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path.split('/').collect();
    // ["", "apis", "mailroom.dev", "v1alpha1", "namespaces", ns, "emailmessages", name, "status"]
    r.method == "PATCH"
        && segments.len() == 9
        && segments[1] == "apis"
        && segments[2] == "mailroom.dev"
        && segments[6] == "emailmessages"
        && segments[8] == "status"
        && String::from_utf8_lossy(&r.body).contains(r#""phase":"Sending""#)
}

/// A POST that creates an EmailMessage.
fn is_message_create(r: &Request) -> bool {
    let path = r.path.split('?').next().unwrap_or_default();
    r.method == "POST"
        && path.starts_with("/apis/mailroom.dev/v1alpha1/namespaces/")
        && path.ends_with("/emailmessages")
}

fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name.to_ascii_lowercase().as_str(),
        "host"
            | "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "content-length"
            | "te"
            | "trailer"
            | "upgrade"
            | "proxy-connection"
            | "proxy-authorization"
    )
}

/// Reads until `buf` holds `n` bytes; false at the end of the stream.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> bool {
    while buf.len() < n {
        let mut chunk = [0u8; 16 * 1024];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    true
}

/// Reads a line ending in CRLF from the front of `buf` (reading more as needed), without it.
async fn take_line(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = buf[..i].to_vec();
            buf.drain(..i + 2);
            return Some(line);
        }
        let have = buf.len();
        if !fill(stream, buf, have + 1).await {
            return None;
        }
    }
}

/// The next request on the connection; `buf` keeps what was read beyond it.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Request> {
    let (head_len, method, path, headers) = loop {
        let mut parsed = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut parsed);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                let headers: Vec<(String, Vec<u8>)> =
                    req.headers.iter().map(|h| (h.name.to_string(), h.value.to_vec())).collect();
                break (n, req.method?.to_string(), req.path?.to_string(), headers);
            }
            Ok(httparse::Status::Partial) => {
                let have = buf.len();
                if !fill(stream, buf, have + 1).await {
                    return None;
                }
            }
            Err(_) => return None,
        }
    };
    buf.drain(..head_len);
    let header = |name: &str| {
        headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| String::from_utf8_lossy(v).to_string())
    };
    let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let body = if header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        let mut body = Vec::new();
        loop {
            let line = take_line(stream, buf).await?;
            let size = String::from_utf8_lossy(&line);
            let size = usize::from_str_radix(size.split(';').next().unwrap_or_default().trim(), 16).ok()?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !take_line(stream, buf).await?.is_empty() {}
                break body;
            }
            if !fill(stream, buf, size + 2).await {
                return None;
            }
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
    } else {
        let len: usize = header("content-length").and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        if !fill(stream, buf, len).await {
            return None;
        }
        buf.drain(..len).collect()
    };
    Some(Request { method, path, headers, body, close })
}

/// Writes the API server's answer: its status and headers, and its body chunked as it arrives.
async fn write_response(stream: &mut TcpStream, response: &mut reqwest::Response) -> std::io::Result<()> {
    let status = response.status();
    let mut head = format!("HTTP/1.1 {} {}\r\n", status.as_u16(), status.canonical_reason().unwrap_or("Unknown"));
    for (name, value) in response.headers() {
        if !is_hop_by_hop(name.as_str()) {
            head.push_str(name.as_str());
            head.push_str(": ");
            head.push_str(&String::from_utf8_lossy(value.as_bytes()));
            head.push_str("\r\n");
        }
    }
    let bodiless = status.is_informational() || status.as_u16() == 204 || status.as_u16() == 304;
    if bodiless {
        head.push_str("\r\n");
        return stream.write_all(head.as_bytes()).await;
    }
    head.push_str("transfer-encoding: chunked\r\n\r\n");
    stream.write_all(head.as_bytes()).await?;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) if chunk.is_empty() => {}
            Ok(Some(chunk)) => {
                let mut out = format!("{:x}\r\n", chunk.len()).into_bytes();
                out.extend_from_slice(&chunk);
                out.extend_from_slice(b"\r\n");
                stream.write_all(&out).await?;
            }
            Ok(None) => return stream.write_all(b"0\r\n\r\n").await,
            // The API server went away in the middle of the answer: so does the operator's.
            Err(e) => return Err(std::io::Error::other(e)),
        }
    }
}
