//! The protocol through real sockets and TLS, against a backend that records what it accepts.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::reply::Reply;
use super::session::{self, Backend, Envelope, Limits};
use super::{SubmissionConfig, serve};
use crate::serving_cert::{ServingCert, certified_key};

const CERT: &[u8] = include_bytes!("testdata/localhost.crt");
const KEY: &[u8] = include_bytes!("testdata/localhost.key");
const CA: &[u8] = include_bytes!("testdata/ca.crt");

#[derive(Default)]
struct Recorder {
    accepted: Mutex<Vec<(Envelope, Vec<u8>)>>,
    accept_reply: Mutex<Option<Reply>>,
}

#[async_trait::async_trait]
impl Backend for Recorder {
    type Grant = String;

    async fn authenticate(&self, username: &str, password: &[u8]) -> Result<String, Reply> {
        if username == "alice" && password == b"s3cret" {
            Ok(username.to_string())
        } else {
            Err(Reply::new(535, "5.7.8", "authentication credentials invalid"))
        }
    }

    async fn mail_from(&self, _: &String, from: &str) -> Result<(), Reply> {
        if from == "alerts@contoso.com" { Ok(()) } else { Err(Reply::new(550, "5.7.1", "sender not allowed")) }
    }

    fn rcpt_to(&self, _: &String, to: &str) -> Result<(), Reply> {
        if to.ends_with("@contoso.com") { Ok(()) } else { Err(Reply::new(550, "5.7.1", "relaying denied")) }
    }

    async fn accept(&self, _: &String, envelope: &Envelope, data: Vec<u8>) -> Result<String, Reply> {
        if let Some(reply) = self.accept_reply.lock().unwrap().clone() {
            return Err(reply);
        }
        let mut accepted = self.accepted.lock().unwrap();
        accepted.push((envelope.clone(), data));
        Ok(format!("q{}", accepted.len()))
    }
}

fn limits() -> Limits {
    Limits { max_message_bytes: 4096, max_recipients: 3, max_errors: 5, ..Default::default() }
}

async fn listener(max_connections: usize, backend: Arc<Recorder>) -> (u16, u16) {
    crate::tls::install_crypto_provider();
    let cert = Arc::new(ServingCert::default());
    cert.set(certified_key(CERT, KEY).unwrap());
    let config = SubmissionConfig {
        addr: Some("127.0.0.1:0".parse().unwrap()),
        implicit_tls_addr: Some("127.0.0.1:0".parse().unwrap()),
        hostname: "mailroom.test".into(),
        max_connections,
        limits: limits(),
    };
    let l = serve(config, backend, cert).await.unwrap();
    (l.addr.unwrap().port(), l.implicit_tls_addr.unwrap().port())
}

/// A line-at-a-time SMTP client.
struct Client<S> {
    stream: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn new(stream: S) -> Self {
        Client { stream, buf: Vec::new() }
    }

    async fn send(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// One whole reply (all its lines), or None at end of stream.
    async fn reply(&mut self) -> Option<String> {
        let mut lines = String::new();
        loop {
            while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let line = String::from_utf8(line).unwrap();
                let last = line.as_bytes().get(3) != Some(&b'-');
                lines.push_str(&line);
                if last {
                    return Some(lines);
                }
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(20), self.stream.read(&mut chunk))
                .await
                .expect("a reply in time")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn expect(&mut self, code: &str) -> String {
        let r = self.reply().await.unwrap_or_else(|| panic!("expected {code}, got end of stream"));
        assert!(r.starts_with(code), "expected {code}, got {r:?}");
        r
    }

    async fn command(&mut self, line: &str, code: &str) -> String {
        self.send(&format!("{line}\r\n")).await;
        self.expect(code).await
    }
}

async fn tls_client(stream: TcpStream) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &CA[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    connector.connect(ServerName::try_from("localhost").unwrap(), stream).await.expect("TLS handshake")
}

/// Connects, greets, says EHLO, starts TLS and says EHLO again.
async fn secured(port: u16) -> Client<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut c = Client::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    c.expect("220 mailroom.test").await;
    c.command("EHLO client.test", "250").await;
    c.command("STARTTLS", "220").await;
    let mut c = Client::new(tls_client(c.stream).await);
    c.command("EHLO client.test", "250").await;
    c
}

fn plain(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

async fn logged_in(port: u16) -> Client<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut c = secured(port).await;
    c.command(&format!("AUTH PLAIN {}", plain("alice", "s3cret")), "235 2.7.0").await;
    c
}

#[tokio::test]
async fn before_tls_starttls_is_offered_and_auth_and_mail_are_refused() {
    let (port, _) = listener(10, Arc::default()).await;
    let mut c = Client::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    c.expect("220").await;
    let ehlo = c.command("EHLO client.test", "250").await;
    assert!(ehlo.contains("250-STARTTLS") || ehlo.contains("250 STARTTLS"), "{ehlo}");
    assert!(!ehlo.contains("AUTH"), "AUTH must not be offered before TLS: {ehlo}");
    assert!(ehlo.contains("SIZE 4096") && ehlo.contains("8BITMIME") && ehlo.contains("SMTPUTF8"), "{ehlo}");
    assert!(ehlo.contains("PIPELINING"), "{ehlo}");
    c.command(&format!("AUTH PLAIN {}", plain("alice", "s3cret")), "530 5.7.0").await;
    c.command("MAIL FROM:<alerts@contoso.com>", "530 5.7.0").await;

    let mut c = secured(port).await;
    let ehlo = c.command("EHLO again", "250").await;
    assert!(ehlo.contains("AUTH PLAIN LOGIN") && !ehlo.contains("STARTTLS"), "{ehlo}");
    c.command("STARTTLS", "503 5.5.1").await;
}

#[tokio::test]
async fn an_authenticated_client_submits_and_the_data_arrives_unstuffed() {
    let backend = Arc::new(Recorder::default());
    let (port, _) = listener(10, backend.clone()).await;
    let mut c = logged_in(port).await;
    c.command("MAIL FROM:<alerts@contoso.com> BODY=8BITMIME SIZE=100 SMTPUTF8", "250 2.1.0").await;
    c.command("RCPT TO:<ops@contoso.com>", "250 2.1.5").await;
    c.command("RCPT TO:<hidden@contoso.com>", "250 2.1.5").await;
    c.command("DATA", "354").await;
    c.send("Subject: t\r\n\r\n..a line that starts with a dot\r\nlast\r\n.\r\n").await;
    let ok = c.expect("250 2.0.0").await;
    assert!(ok.contains("queued as q1"), "{ok}");
    c.command("QUIT", "221").await;
    let accepted = backend.accepted.lock().unwrap();
    let (envelope, data) = &accepted[0];
    assert_eq!(envelope.from, "alerts@contoso.com");
    assert!(envelope.smtputf8, "MAIL FROM's SMTPUTF8 parameter is recorded");
    assert_eq!(envelope.recipients, ["ops@contoso.com", "hidden@contoso.com"]);
    assert_eq!(data.as_slice(), b"Subject: t\r\n\r\n.a line that starts with a dot\r\nlast\r\n");
}

#[tokio::test]
async fn login_wrong_passwords_and_borrowed_identities_are_refused() {
    let backend = Arc::new(Recorder::default());
    let (port, _) = listener(10, backend.clone()).await;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut c = secured(port).await;
    c.command(&format!("AUTH PLAIN {}", plain("alice", "wrong")), "535 5.7.8").await;
    let other = base64::engine::general_purpose::STANDARD.encode("bob\0alice\0s3cret");
    c.command(&format!("AUTH PLAIN {other}"), "535 5.7.8").await;
    c.command("AUTH CRAM-MD5", "504").await;
    c.command("MAIL FROM:<alerts@contoso.com>", "530 5.7.0").await;
    // PLAIN with the response on its own line, then LOGIN.
    c.command("AUTH PLAIN", "334").await;
    c.command("*", "501").await;
    c.command("AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    c.command(&b64("alice"), "334 UGFzc3dvcmQ6").await;
    c.command(&b64("s3cret"), "235").await;
    c.command(&format!("AUTH PLAIN {}", plain("alice", "s3cret")), "503").await;
    c.command("MAIL FROM:<alerts@contoso.com>", "250").await;
}

#[tokio::test]
async fn policy_refusals_come_back_from_the_backend_and_the_session_goes_on() {
    let backend = Arc::new(Recorder::default());
    let (port, _) = listener(10, backend.clone()).await;
    let mut c = logged_in(port).await;
    c.command("MAIL FROM:<ceo@contoso.com>", "550 5.7.1").await;
    c.command("MAIL FROM:<alerts@contoso.com>", "250").await;
    c.command("RCPT TO:<someone@elsewhere.example>", "550 5.7.1").await;
    c.command("DATA", "554 5.5.1").await;
    c.command("RCPT TO:<a@contoso.com>", "250").await;
    c.command("RCPT TO:<b@contoso.com>", "250").await;
    c.command("RCPT TO:<c@contoso.com>", "250").await;
    c.command("RCPT TO:<d@contoso.com>", "452 4.5.3").await;
    *backend.accept_reply.lock().unwrap() = Some(Reply::new(451, "4.3.0", "API away"));
    c.command("DATA", "354").await;
    c.send("Subject: t\r\n\r\nx\r\n.\r\n").await;
    c.expect("451 4.3.0").await;
    // The transaction is over: a new one starts with MAIL.
    c.command("RCPT TO:<a@contoso.com>", "503").await;
    assert!(backend.accepted.lock().unwrap().is_empty());
}

#[tokio::test]
async fn size_is_enforced_when_declared_and_when_the_data_is_larger() {
    let backend = Arc::new(Recorder::default());
    let (port, _) = listener(10, backend.clone()).await;
    let mut c = logged_in(port).await;
    c.command("MAIL FROM:<alerts@contoso.com> SIZE=4097", "552 5.3.4").await;
    c.command("MAIL FROM:<alerts@contoso.com>", "250").await;
    c.command("RCPT TO:<a@contoso.com>", "250").await;
    c.command("DATA", "354").await;
    let big = "x".repeat(1000);
    let mut data = String::from("Subject: big\r\n\r\n");
    for _ in 0..10 {
        data.push_str(&big);
        data.push_str("\r\n");
    }
    data.push_str(".\r\n");
    c.send(&data).await;
    c.expect("552 5.3.4").await;
    // The rest of the message was read and dropped: the session is in step.
    c.command("NOOP", "250").await;
    assert!(backend.accepted.lock().unwrap().is_empty());
}

#[tokio::test]
async fn pipelined_commands_get_their_replies_in_order() {
    let backend = Arc::new(Recorder::default());
    let (port, _) = listener(10, backend.clone()).await;
    let mut c = logged_in(port).await;
    c.send("MAIL FROM:<alerts@contoso.com>\r\nRCPT TO:<a@contoso.com>\r\nRCPT TO:<x@elsewhere.example>\r\nRCPT TO:<b@contoso.com>\r\nDATA\r\n").await;
    for code in ["250 2.1.0", "250 2.1.5", "550", "250 2.1.5", "354"] {
        c.expect(code).await;
    }
    c.send("Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n").await;
    c.expect("250 2.0.0").await;
    c.expect("221").await;
    assert_eq!(backend.accepted.lock().unwrap()[0].0.recipients, ["a@contoso.com", "b@contoso.com"]);
}

#[tokio::test]
async fn commands_pipelined_after_starttls_in_the_clear_are_dropped() {
    let backend = Arc::new(Recorder::default());
    let (port, _) = listener(10, backend.clone()).await;
    let mut c = Client::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    c.expect("220").await;
    c.command("EHLO x", "250").await;
    // An attacker in the path appends a command to the STARTTLS (CVE-2011-0411).
    c.send("STARTTLS\r\nHELP\r\n").await;
    c.expect("220").await;
    let mut c = Client::new(tls_client(c.stream).await);
    // The first reply inside TLS answers NOOP, not the injected HELP (214).
    c.command("NOOP", "250").await;
}

#[tokio::test]
async fn bad_commands_get_5xx_and_too_many_end_the_session() {
    let (port, _) = listener(10, Arc::default()).await;
    let mut c = logged_in(port).await;
    c.command("FROB", "500 5.5.2").await;
    c.command("MAIL FROM:<unterminated", "501").await;
    c.command("RCPT TO:<a@contoso.com>", "503 5.5.1").await;
    c.command("DATA", "503 5.5.1").await;
    c.command("VRFY alice", "252").await;
    c.command(&format!("NOOP {}", "x".repeat(5000)), "500 5.5.6").await;
    c.command("NOOP", "250").await;
    c.command("EXPN list", "502").await;
    // The fifth error (of FROB, the unterminated MAIL, the long line, EXPN and this) ends it.
    c.command("FROB", "500").await;
    c.expect("421 4.7.0").await;
    assert!(c.reply().await.is_none(), "the session is closed");
}

#[tokio::test]
async fn connections_over_the_limit_are_told_to_come_back() {
    let (port, _) = listener(1, Arc::default()).await;
    let mut first = Client::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    first.expect("220").await;
    let mut second = Client::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    second.expect("421 4.7.0").await;
    first.command("QUIT", "221").await;
    drop(first);
    // The permit is back once the first session ends.
    let mut third = None;
    for _ in 0..50 {
        let mut c = Client::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        if c.reply().await.is_some_and(|r| r.starts_with("220")) {
            third = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(third.is_some(), "a connection is served again after the first one closed");
}

#[tokio::test]
async fn implicit_tls_greets_inside_tls() {
    let backend = Arc::new(Recorder::default());
    let (_, tls_port) = listener(10, backend.clone()).await;
    let stream = tls_client(TcpStream::connect(("127.0.0.1", tls_port)).await.unwrap()).await;
    let mut c = Client::new(stream);
    c.expect("220 mailroom.test").await;
    let ehlo = c.command("EHLO x", "250").await;
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    c.command(&format!("AUTH PLAIN {}", plain("alice", "s3cret")), "235").await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_disconnected_after_the_idle_timeout() {
    let (client, server) = tokio::io::duplex(4096);
    let backend = Recorder::default();
    let limits = Limits { command_timeout: Duration::from_secs(300), ..limits() };
    let task = tokio::spawn(async move {
        session::run(server, "mailroom.test", false, false, &limits, &backend, true).await.map(|_| ())
    });
    let mut c = Client::new(client);
    c.expect("220").await;
    tokio::time::advance(Duration::from_secs(301)).await;
    c.expect("421 4.4.2").await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn without_a_certificate_starttls_is_not_offered_and_says_454() {
    let (client, server) = tokio::io::duplex(4096);
    let backend = Recorder::default();
    let limits = limits();
    tokio::spawn(async move { session::run(server, "m", false, false, &limits, &backend, true).await.map(|_| ()) });
    let mut c = Client::new(client);
    c.expect("220").await;
    let ehlo = c.command("EHLO x", "250").await;
    assert!(!ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"), "{ehlo}");
    c.command("STARTTLS", "454 4.7.0").await;
}

#[test]
fn plain_responses_decode_and_malformed_ones_are_refused() {
    let enc = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    assert_eq!(session::decode_plain(enc(b"\0alice\0pw").as_bytes()).unwrap(), ("alice".into(), b"pw".to_vec()));
    assert_eq!(session::decode_plain(enc(b"alice\0alice\0pw").as_bytes()).unwrap().0, "alice");
    assert_eq!(session::decode_plain(enc(b"bob\0alice\0pw").as_bytes()).unwrap_err().code, 535);
    assert_eq!(session::decode_plain(enc(b"alice-pw").as_bytes()).unwrap_err().code, 501);
    assert_eq!(session::decode_plain(b"not base64!").unwrap_err().code, 501);
    // A password may hold NUL-free bytes of any kind, colons included.
    assert_eq!(session::decode_plain(enc(b"\0a\0p:w\xff").as_bytes()).unwrap().1, b"p:w\xff");
}
