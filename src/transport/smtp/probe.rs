//! A look at an SMTP server without sending: its greeting, the AUTH mechanisms its EHLO offers
//! (after STARTTLS when the profile asks for it) and, with credentials, whether it accepts them.
//!
//! lettre reads the greeting and drops it, and knows only the mechanisms it implements; so the
//! probe hands lettre a stream that keeps the greeting's bytes, and asks EHLO once more to read
//! the offered mechanisms itself.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream};
use lettre::transport::smtp::commands::Ehlo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::classify::{Failure, Stage, classify};
use super::{SendError, SmtpConfig, SmtpCredentials, SmtpTransport, TlsMode, close, timed};

/// The most greeting bytes kept; a longer greeting is cut.
const MAX_GREETING: usize = 4096;

/// What a probe saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmtpProbe {
    /// The server's greeting, lines joined by a space: `220 mail.example.com ESMTP`.
    pub greeting: String,
    /// Whether the session was encrypted when EHLO listed the mechanisms.
    pub encrypted: bool,
    /// The AUTH mechanisms offered, as the server spells them.
    pub auth_mechanisms: Vec<String>,
    /// With credentials: whom the server accepted (the login name, or the sender for XOAUTH2).
    pub authenticated_as: Option<String>,
}

impl SmtpTransport {
    /// Connects as a send would (TLS mode, trust roots, timeouts), reads the greeting and the
    /// EHLO reply, and logs in with the configured credentials, as `sender` for XOAUTH2. Sends
    /// no message.
    pub async fn probe(config: SmtpConfig, sender: &str) -> Result<SmtpProbe, SendError> {
        let transport = SmtpTransport::new(config).map_err(|e| SendError::permanent(e.to_string()))?;
        let server = transport.server();
        let greeting = Arc::new(Mutex::new(Vec::new()));
        let stream = transport.open().await.map_err(|f| classify(&f, Stage::Connect, &server))?;
        let peer = stream.peer_addr().map_err(|e| classify(&Failure::from_io(&e), Stage::Connect, &server))?;
        let stream: Box<dyn AsyncTokioStream> =
            Box::new(Recorder { inner: stream, peer, greeting: Arc::clone(&greeting) });
        let mut conn =
            timed(transport.command_timeout, AsyncSmtpConnection::connect_with_transport(stream, &transport.hello))
                .await
                .map_err(|f| classify(&f, Stage::Connect, &server))?;
        let greeting = {
            let bytes = greeting.lock().unwrap_or_else(|e| e.into_inner());
            greeting_text(&bytes)
        };
        if transport.tls_mode == TlsMode::StartTLS {
            let Some(tls) = transport.tls.clone() else {
                return Err(SendError::permanent("STARTTLS parameters are missing"));
            };
            if !conn.can_starttls() {
                close(&mut conn, false, transport.command_timeout).await;
                return Err(SendError::permanent(format!(
                    "{server} does not offer STARTTLS, which tls: StartTLS requires"
                )));
            }
            // A failed handshake leaves lettre's connection without a stream: it is dropped,
            // never closed, as in a send.
            timed(transport.command_timeout, conn.starttls(tls, &transport.hello))
                .await
                .map_err(|f| classify(&f, Stage::StartTls, &server))?;
        }
        let result = transport.inspect(&mut conn, greeting, sender).await;
        close(&mut conn, result.is_ok(), transport.command_timeout).await;
        result
    }

    /// EHLO again for the mechanisms, then AUTH.
    async fn inspect(
        &self,
        conn: &mut AsyncSmtpConnection,
        greeting: String,
        sender: &str,
    ) -> Result<SmtpProbe, SendError> {
        let server = self.server();
        let ehlo = timed(self.command_timeout, conn.command(Ehlo::new(self.hello.clone())))
            .await
            .map_err(|f| classify(&f, Stage::Connect, &server))?;
        let auth_mechanisms = auth_mechanisms(ehlo.message());
        self.authenticate(conn, sender).await?;
        let authenticated_as = match &self.credentials {
            SmtpCredentials::None => None,
            SmtpCredentials::Password { username, .. } => Some(username.clone()),
            SmtpCredentials::XOAuth2(_) => Some(sender.to_string()),
        };
        // lettre does not know about the implicit TLS the probe set up itself.
        let encrypted = conn.is_encrypted() || self.tls_mode == TlsMode::Implicit;
        Ok(SmtpProbe { greeting, encrypted, auth_mechanisms, authenticated_as })
    }
}

/// The mechanisms of the EHLO reply's `AUTH` line (`AUTH PLAIN LOGIN`, or the old `AUTH=...`).
pub fn auth_mechanisms<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in lines {
        let mut words = line.split([' ', '=']).filter(|w| !w.is_empty());
        if words.next().is_some_and(|w| w.eq_ignore_ascii_case("AUTH")) {
            for w in words {
                let w = w.to_ascii_uppercase();
                if !out.contains(&w) {
                    out.push(w);
                }
            }
        }
    }
    out
}

/// The greeting's lines, joined by a space; the kept bytes may run past it into EHLO's reply.
pub fn greeting_text(bytes: &[u8]) -> String {
    let mut lines = Vec::new();
    for line in String::from_utf8_lossy(bytes).split("\r\n") {
        let printable: String = line.chars().filter(|c| !c.is_control()).collect();
        lines.push(printable);
        // The last line of a reply has a space (or nothing) after its code.
        if line.len() < 4 || line.as_bytes()[3] == b' ' {
            break;
        }
    }
    lines.join(" ").trim().to_string()
}

/// Whether the kept bytes hold the whole greeting.
fn greeting_complete(bytes: &[u8]) -> bool {
    bytes.len() >= MAX_GREETING
        || bytes.split(|b| *b == b'\n').any(|line| line.len() >= 4 && line[3] == b' ' && line.ends_with(b"\r"))
}

/// A stream that keeps the first bytes it reads (the greeting) and otherwise passes through.
#[derive(Debug)]
struct Recorder<S> {
    inner: S,
    peer: SocketAddr,
    greeting: Arc<Mutex<Vec<u8>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorder<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let mut kept = self.greeting.lock().unwrap_or_else(|e| e.into_inner());
            if !greeting_complete(&kept) {
                let new = &buf.filled()[before..];
                let room = MAX_GREETING.saturating_sub(kept.len());
                kept.extend_from_slice(&new[..new.len().min(room)]);
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorder<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S> AsyncTokioStream for Recorder<S>
where
    S: AsyncRead + AsyncWrite + Send + Sync + Unpin + std::fmt::Debug,
{
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_lines() {
        assert_eq!(greeting_text(b"220 mail.example.com ESMTP ready\r\n250-mail"), "220 mail.example.com ESMTP ready");
        assert_eq!(greeting_text(b"220-first\r\n220 second\r\n250 ok\r\n"), "220-first 220 second");
        assert_eq!(greeting_text(b"220 evil\x1b[31m\r\n"), "220 evil[31m");
        assert!(greeting_complete(b"220-a\r\n220 b\r\n"));
        assert!(!greeting_complete(b"220-a\r\n220 b"));
        assert!(!greeting_complete(b"220-a\r\n"));
    }

    #[test]
    fn mechanisms_from_ehlo() {
        let lines = ["mail.example.com Hello", "8BITMIME", "AUTH PLAIN LOGIN XOAUTH2", "AUTH=LOGIN", "STARTTLS"];
        assert_eq!(auth_mechanisms(lines.into_iter()), ["PLAIN", "LOGIN", "XOAUTH2"]);
        assert!(auth_mechanisms(["mail.example.com", "SIZE 1000"].into_iter()).is_empty());
        assert!(auth_mechanisms(["AUTHORITY x"].into_iter()).is_empty());
    }
}
