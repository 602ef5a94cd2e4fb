//! The SMTP transport: a relay, a password login, or SASL XOAUTH2 with an Entra ID token.
//!
//! Each send runs the transaction itself (MAIL, one RCPT per recipient, DATA) on lettre's
//! `AsyncSmtpConnection` rather than `AsyncSmtpTransport::send`, for two reasons: a recipient
//! refused at RCPT must not stop delivery to the others, and the XOAUTH2 credentials change with
//! every token and every sender, while lettre's transport fixes them. A session whose message
//! the server took carries the next message of the same login ([`pool`]).
//!
//! How a failure is classified (transient or permanent, and the words that go into the status)
//! is decided by the pure functions of [`classify`], from a [`Failure`] that keeps only what
//! the decision needs.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Auth, Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use tokio::net::TcpStream;

use super::{Acceptance, Delivered, OutgoingMessage, RawOutgoing, SendError, Transport, mime, offload};
use crate::auth::TokenSource;
use crate::tls::TrustRoots;

mod bounded;
pub mod classify;
mod pool;
pub mod probe;

use bounded::Bounded;
pub use bounded::MAX_UNANSWERED_BYTES;
pub use pool::IDLE_FOR as DEFAULT_IDLE_SESSION;
use pool::{Login, Pool, Session};

use classify::{
    Failure, RecipientRefusal, Stage, TokenFingerprint, classify, classify_password_auth, classify_token_refusal,
    every_recipient_refused, is_token_refusal, join_reply, judge_token_refusal, recipient_refusal, session_gone,
    token_error,
};

/// Default time to open the TCP connection (and finish an implicit TLS handshake).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time to wait for the reply to one command.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time to transmit the message and get the reply to its final dot.
pub const DEFAULT_DATA_TIMEOUT: Duration = Duration::from_secs(300);
/// The message data is written in pieces of this size.
const DATA_CHUNK: usize = 64 * 1024;

/// How the transport authenticates.
#[derive(Clone, Default)]
pub enum SmtpCredentials {
    /// No AUTH: an IP-authenticated relay connector.
    #[default]
    None,
    /// AUTH PLAIN or LOGIN (whichever the server offers, PLAIN first).
    Password {
        /// The login name.
        username: String,
        /// The password.
        password: String,
    },
    /// AUTH XOAUTH2 as the message's sender, with the current token of this source.
    XOAuth2(Arc<dyn TokenSource>),
}

/// Never shows the password.
impl fmt::Debug for SmtpCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SmtpCredentials::None => f.write_str("None"),
            SmtpCredentials::Password { username, .. } => {
                f.debug_struct("Password").field("username", username).field("password", &"<redacted>").finish()
            }
            SmtpCredentials::XOAuth2(_) => f.write_str("XOAuth2(<token source>)"),
        }
    }
}

/// Everything the SMTP transport needs: where, how secured, trusting what, as whom.
#[derive(Clone, Debug)]
pub struct SmtpConfig {
    /// Server host name (also the name its certificate must carry).
    pub host: String,
    /// Server port.
    pub port: u16,
    /// StartTLS (required), Implicit, or None.
    pub tls: TlsMode,
    /// Roots trusted besides the web PKI roots (`--ca-bundle`, the profile's `caBundle`).
    pub roots: TrustRoots,
    /// How to authenticate.
    pub credentials: SmtpCredentials,
    /// The EHLO name; default: this host's name.
    pub hello_name: Option<String>,
    /// Time to connect (TCP, and the TLS handshake for Implicit).
    pub connect_timeout: Duration,
    /// Time to wait for each command's reply.
    pub command_timeout: Duration,
    /// Time to send the message and get the reply to DATA.
    pub data_timeout: Duration,
    /// How long a session may wait idle for the next message of its login; zero opens a
    /// session per message.
    pub idle_session: Duration,
}

impl SmtpConfig {
    /// A configuration with the default hello name and timeouts.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        tls: TlsMode,
        roots: TrustRoots,
        credentials: SmtpCredentials,
    ) -> Self {
        SmtpConfig {
            host: host.into(),
            port,
            tls,
            roots,
            credentials,
            hello_name: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            data_timeout: DEFAULT_DATA_TIMEOUT,
            idle_session: DEFAULT_IDLE_SESSION,
        }
    }
}

/// How the connection to the SMTP server is secured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// A plain connection upgraded with STARTTLS, which the server must offer.
    #[default]
    StartTLS,
    /// TLS from the first byte (port 465).
    Implicit,
    /// No TLS at all (local relays only).
    None,
}

/// A configuration that cannot work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SmtpConfigError {
    /// The trust roots or the host name cannot be used for TLS.
    #[error("cannot set up TLS for SMTP server {host}: {reason}")]
    Tls {
        /// The server.
        host: String,
        /// What is wrong.
        reason: String,
    },
    /// The host is empty or not a host name.
    #[error("{0:?} is not a valid SMTP server host name")]
    Host(String),
}

/// Sends messages over SMTP, keeping sessions open for the next message of the same login.
pub struct SmtpTransport {
    host: String,
    port: u16,
    tls_mode: TlsMode,
    tls: Option<TlsParameters>,
    /// The TLS client for `Implicit`, which lettre's connection is handed already encrypted.
    implicit: Option<Arc<rustls::ClientConfig>>,
    hello: ClientId,
    credentials: SmtpCredentials,
    connect_timeout: Duration,
    command_timeout: Duration,
    data_timeout: Duration,
    /// Fingerprint of the last token the server refused, cleared by a successful XOAUTH2 login.
    refused_token: Mutex<Option<TokenFingerprint>>,
    /// Sessions waiting for the next message.
    sessions: Arc<Pool>,
}

impl fmt::Debug for SmtpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpTransport")
            .field("server", &self.server())
            .field("tls", &self.tls_mode)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl SmtpTransport {
    /// Prepares the transport; no connection is made until the first send.
    pub fn new(config: SmtpConfig) -> Result<Self, SmtpConfigError> {
        let host = config.host.trim().to_string();
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(SmtpConfigError::Host(config.host));
        }
        let tls = match config.tls {
            TlsMode::None => None,
            TlsMode::StartTLS | TlsMode::Implicit => Some(tls_parameters(&host, &config.roots)?),
        };
        let implicit = match config.tls {
            TlsMode::Implicit => Some(Arc::new(
                config
                    .roots
                    .client_config()
                    .map_err(|e| SmtpConfigError::Tls { host: host.clone(), reason: e.to_string() })?,
            )),
            TlsMode::StartTLS | TlsMode::None => None,
        };
        let hello = config
            .hello_name
            .as_deref()
            .filter(|name| is_hello_name(name))
            .map(|name| ClientId::Domain(name.to_string()))
            .unwrap_or_else(default_hello_name);
        Ok(SmtpTransport {
            host,
            port: config.port,
            tls_mode: config.tls,
            tls,
            implicit,
            hello,
            credentials: config.credentials,
            connect_timeout: config.connect_timeout,
            command_timeout: config.command_timeout,
            data_timeout: config.data_timeout,
            refused_token: Mutex::new(None),
            sessions: Arc::new(Pool::new(config.idle_session)),
        })
    }

    /// `host:port`, as messages name the server.
    fn server(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The TCP connection to the server, with Nagle's algorithm off. lettre writes a command, and
    /// the end of the data, in more than one write: with Nagle's algorithm a small write waits for
    /// the ACK of the one before, which the server delays (by up to 40 ms on Linux), at every step
    /// of a transaction.
    async fn connect_tcp(&self) -> Result<TcpStream, Failure> {
        let stream = timed_io(self.connect_timeout, TcpStream::connect((self.host.as_str(), self.port))).await?;
        stream.set_nodelay(true).map_err(|e| Failure::from_io(&e))?;
        Ok(stream)
    }

    /// Opens the connection lettre talks over: TCP, and TLS from the first byte for `Implicit`,
    /// with every read bounded ([`bounded`]). STARTTLS upgrades it later, inside lettre.
    pub(crate) async fn open(&self) -> Result<Box<dyn AsyncTokioStream>, Failure> {
        let stream = self.connect_tcp().await?;
        let peer = stream.peer_addr().map_err(|e| Failure::from_io(&e))?;
        let Some(config) = self.implicit.clone() else {
            return Ok(Box::new(Bounded::new(stream, peer)));
        };
        let name = rustls::pki_types::ServerName::try_from(self.host.clone())
            .map_err(|e| Failure::Tls(format!("{}: {e}", self.host)))?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let tls = match tokio::time::timeout(self.connect_timeout, connector.connect(name, stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => return Err(Failure::from_io(&error)),
            Err(_) => return Err(Failure::Timeout(self.connect_timeout)),
        };
        Ok(Box::new(Bounded::new(tls, peer)))
    }

    /// Connects, reads the greeting, says EHLO and, for StartTLS, upgrades the connection.
    async fn connect(&self) -> Result<AsyncSmtpConnection, SendError> {
        let server = self.server();
        let stream = self.open().await.map_err(|f| classify(&f, Stage::Connect, &server))?;
        let mut conn = timed(self.command_timeout, AsyncSmtpConnection::connect_with_transport(stream, &self.hello))
            .await
            .map_err(|f| classify(&f, Stage::Connect, &server))?;

        if self.tls_mode == TlsMode::StartTLS {
            let Some(tls) = self.tls.clone() else {
                return Err(SendError::permanent("STARTTLS parameters are missing"));
            };
            if !conn.can_starttls() {
                close(&mut conn, false, self.command_timeout).await;
                return Err(SendError::permanent(format!(
                    "{server} does not offer STARTTLS, which tls: StartTLS requires; use tls: Implicit \
                     for a TLS port such as 465, or tls: None only for a trusted relay"
                )));
            }
            timed(self.command_timeout, conn.starttls(tls, &self.hello))
                .await
                .map_err(|f| classify(&f, Stage::StartTls, &server))?;
        }
        Ok(conn)
    }

    /// Logs in with the configured credentials, if any.
    async fn authenticate(&self, conn: &mut AsyncSmtpConnection, sender: &str) -> Result<(), SendError> {
        let server = self.server();
        match &self.credentials {
            SmtpCredentials::None => Ok(()),
            SmtpCredentials::Password { username, password } => {
                // Built per send and dropped after AUTH; lettre's Credentials never prints the password.
                let credentials = Credentials::new(username.clone(), password.clone());
                timed(self.command_timeout, conn.auth(&[Mechanism::Plain, Mechanism::Login], &credentials))
                    .await
                    .map(drop)
                    .map_err(|f| classify_password_auth(&f, &server, username))
            }
            SmtpCredentials::XOAuth2(tokens) => {
                if !conn.server_info().supports_auth_mechanism(Mechanism::Xoauth2) {
                    return Err(SendError::permanent(format!(
                        "{server} does not offer AUTH XOAUTH2 on this connection; Exchange Online offers it \
                         on smtp.office365.com:587 after STARTTLS"
                    )));
                }
                let token = tokens.token().await.map_err(token_error)?;
                let fingerprint = TokenFingerprint::of(&token.secret);
                let result = timed(self.command_timeout, xoauth2(conn, sender, token.secret.clone())).await;
                drop(token);
                match result {
                    Ok(()) => {
                        self.remember_refused(None);
                        Ok(())
                    }
                    Err(failure) if is_token_refusal(&failure) => {
                        // The token may have been revoked or gone stale: drop it so the next
                        // attempt fetches a new one. A new token refused as well is permanent.
                        tokens.invalidate();
                        let previous = self.remember_refused(Some(fingerprint.clone()));
                        let verdict = judge_token_refusal(previous.as_ref(), &fingerprint);
                        Err(classify_token_refusal(&failure, verdict, &server, sender))
                    }
                    Err(failure) => Err(classify(&failure, Stage::Auth, &server)),
                }
            }
        }
    }

    /// Stores the fingerprint of the last refused token and returns the one before.
    fn remember_refused(&self, fingerprint: Option<TokenFingerprint>) -> Option<TokenFingerprint> {
        match self.refused_token.lock() {
            Ok(mut last) => std::mem::replace(&mut *last, fingerprint),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), fingerprint),
        }
    }

    /// MAIL, RCPT for each recipient, DATA. Refused recipients are collected, not fatal.
    async fn transaction(
        &self,
        conn: &mut AsyncSmtpConnection,
        envelope: &Envelope,
        bytes: &[u8],
    ) -> Result<Delivered, Unsent> {
        let server = self.server();
        let refused = self.envelope(conn, envelope, bytes).await?;
        let reply =
            // In chunks: dot-stuffing the whole message at once would copy all of it again.
            timed(self.data_timeout, conn.message_iter(bytes.chunks(DATA_CHUNK)))
                .await
                .map_err(|f| Unsent::Failed(classify(&f, Stage::Message, &server)))?;
        Ok(Delivered {
            acceptance: Acceptance::ResponsibilityTaken,
            response: format_response(&reply),
            request_id: None,
            rejected: refused.into_iter().map(|r| (r.recipient, r.reply.to_string())).collect(),
        })
    }

    /// MAIL, RCPT for each recipient and the DATA command, up to the server's go-ahead for the
    /// data: nothing of the message has been sent when this fails. Refused recipients are
    /// collected, not fatal.
    async fn envelope(
        &self,
        conn: &mut AsyncSmtpConnection,
        envelope: &Envelope,
        bytes: &[u8],
    ) -> Result<Vec<RecipientRefusal>, Unsent> {
        let server = self.server();
        let failed = |f: Failure, stage: Stage| {
            let error = classify(&f, stage, &server);
            if session_gone(&f) { Unsent::SessionGone(error) } else { Unsent::Failed(error) }
        };
        let info = conn.server_info();
        let mut parameters = Vec::new();
        let sender_ascii = envelope.from().is_none_or(|a| a.to_string().is_ascii());
        let recipients_ascii = envelope.to().iter().all(|a| a.to_string().is_ascii());
        // A built message's header fields are always ASCII (RFC 2047); a raw one's may be UTF-8
        // (RFC 6532), which needs SMTPUTF8 as non-ASCII addresses do.
        let headers_ascii = header_section(bytes).is_ascii();
        if !(sender_ascii && recipients_ascii && headers_ascii) {
            if !info.supports_feature(Extension::SmtpUtfEight) {
                return Err(Unsent::Failed(SendError::permanent(format!(
                    "the message has addresses or header fields with non-ASCII characters, which need \
                     SMTPUTF8, and {server} does not offer it"
                ))));
            }
            parameters.push(MailParameter::SmtpUtfEight);
        }
        if !bytes.is_ascii() {
            if !info.supports_feature(Extension::EightBitMime) {
                return Err(Unsent::Failed(SendError::permanent(format!(
                    "the message is not 7-bit and {server} does not offer 8BITMIME"
                ))));
            }
            parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }

        timed(self.command_timeout, conn.command(Mail::new(envelope.from().cloned(), parameters)))
            .await
            .map_err(|f| failed(f, Stage::MailFrom))?;

        let mut accepted = 0usize;
        let mut refused = Vec::new();
        for recipient in envelope.to() {
            match timed(self.command_timeout, conn.command(Rcpt::new(recipient.clone(), vec![]))).await {
                Ok(_) => accepted += 1,
                Err(failure) => match recipient_refusal(&failure) {
                    Some(reply) => refused.push(RecipientRefusal { recipient: recipient.to_string(), reply }),
                    None => return Err(failed(failure, Stage::Rcpt)),
                },
            }
        }
        if accepted == 0 {
            return Err(Unsent::Failed(every_recipient_refused(&refused, &server)));
        }

        timed(self.command_timeout, conn.command(Data)).await.map_err(|f| failed(f, Stage::Data))?;
        Ok(refused)
    }

    /// Whom a message from `sender` logs in as.
    fn login(&self, sender: &str) -> Login {
        match self.credentials {
            SmtpCredentials::XOAuth2(_) => Login::Mailbox(sender.to_ascii_lowercase()),
            SmtpCredentials::None | SmtpCredentials::Password { .. } => Login::Transport,
        }
    }

    /// Delivers one message: over an idle session of its login if there is one, otherwise (or
    /// when that session turns out to have been closed before the data went) over a new one.
    /// A session whose message the server took is kept for the next; any other is ended.
    async fn deliver(&self, sender: &str, envelope: &Envelope, bytes: &[u8]) -> Result<Delivered, SendError> {
        let login = self.login(sender);
        if let Some(mut session) = self.sessions.take(&login) {
            match self.transaction(&mut session.conn, envelope, bytes).await {
                Ok(delivered) => {
                    self.keep(session).await;
                    return Ok(delivered);
                }
                // The server closed it while it was idle: nothing of this message went, so it
                // goes over a new session, whose answer stands.
                Err(Unsent::SessionGone(error)) => {
                    tracing::debug!(server = %self.server(), %error, "an idle SMTP session was closed; opening another");
                    close(&mut session.conn, false, self.command_timeout).await;
                }
                Err(Unsent::Failed(error)) => {
                    close(&mut session.conn, false, self.command_timeout).await;
                    return Err(error);
                }
            }
        }
        let mut conn = self.connect().await?;
        if let Err(error) = self.authenticate(&mut conn, sender).await {
            close(&mut conn, false, self.command_timeout).await;
            return Err(error);
        }
        let mut session = Session::opened(conn, login);
        match self.transaction(&mut session.conn, envelope, bytes).await {
            Ok(delivered) => {
                self.keep(session).await;
                Ok(delivered)
            }
            Err(Unsent::SessionGone(error) | Unsent::Failed(error)) => {
                close(&mut session.conn, false, self.command_timeout).await;
                Err(error)
            }
        }
    }

    /// Keeps a session for the next message, or ends it with QUIT, a courtesy whose failure
    /// changes nothing (the outcome is settled).
    async fn keep(&self, session: Session) {
        if let Err(mut session) = self.sessions.put(session) {
            close(&mut session.conn, true, self.command_timeout).await;
        }
    }
}

/// Why a transaction did not end with the server taking the message.
enum Unsent {
    /// The session was found closed before the server's go-ahead for the data
    /// ([`session_gone`]): nothing of the message was sent.
    SessionGone(SendError),
    /// Any other failure: an answer of the server's, or one while the data went.
    Failed(SendError),
}

#[async_trait]
impl Transport for SmtpTransport {
    async fn send(&self, message: &OutgoingMessage) -> Result<Delivered, SendError> {
        // Only the formatted message is kept: its parts, as long again, go once it is formatted.
        let (envelope, bytes) =
            offload::encode(|| mime::build(message).map(|built| (built.envelope().clone(), built.formatted())))
                .map_err(|e| SendError::permanent(format!("the message cannot be built: {e}")))?;
        self.deliver(&message.from.email, &envelope, &bytes).await
    }

    /// The bytes as they are (the controller took `Bcc:` out and made sure of the Message-ID),
    /// with the envelope beside them: lettre's raw send, run as this transport's own transaction.
    async fn send_raw(&self, message: &RawOutgoing) -> Result<Delivered, SendError> {
        let envelope = raw_envelope(message)?;
        // lettre ends the data with CRLF "." CRLF whatever it ends with: the message's own final
        // CRLF is left to it, so that no empty line is added.
        let bytes = message.bytes.strip_suffix(b"\r\n").unwrap_or(&message.bytes);
        self.deliver(&message.envelope_from.email, &envelope, bytes).await
    }
}

/// The SMTP envelope of a raw message.
fn raw_envelope(message: &RawOutgoing) -> Result<Envelope, SendError> {
    let invalid = |e: super::AddressError| SendError::permanent(format!("the envelope cannot be built: {e}"));
    let from = message.envelope_from.to_lettre_address().map_err(invalid)?;
    let to =
        message.recipients.iter().map(|r| r.to_lettre_address()).collect::<Result<Vec<_>, _>>().map_err(invalid)?;
    Envelope::new(Some(from), to).map_err(|e| SendError::permanent(format!("the envelope cannot be built: {e}")))
}

/// The header section of a formatted message: up to its first empty line.
fn header_section(bytes: &[u8]) -> &[u8] {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(bytes.len());
    &bytes[..end]
}

/// Ends the session: QUIT after success, otherwise QUIT if possible and close.
async fn close(conn: &mut AsyncSmtpConnection, polite: bool, limit: Duration) {
    let _ = if polite {
        tokio::time::timeout(limit, async {
            let _ = conn.quit().await;
        })
        .await
    } else {
        tokio::time::timeout(limit, conn.abort()).await
    };
}

/// SASL XOAUTH2 with lettre's encoding of the initial response. A server that answers with a
/// 334 challenge (details of the failure, as Gmail does) gets the empty line that asks for the
/// final reply.
async fn xoauth2(
    conn: &mut AsyncSmtpConnection,
    user: &str,
    token: String,
) -> Result<(), lettre::transport::smtp::Error> {
    let credentials = Credentials::new(user.to_string(), token);
    let command = Auth::new(Mechanism::Xoauth2, credentials, None)?;
    let reply = conn.command(command).await?;
    if reply.has_code(334) {
        conn.command(EmptyLine).await?;
    }
    Ok(())
}

/// The empty client response that ends a SASL exchange the server wants to fail.
struct EmptyLine;

impl fmt::Display for EmptyLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\r\n")
    }
}

/// Builds lettre's rustls parameters: web PKI roots plus the extra ones, on ring.
fn tls_parameters(host: &str, roots: &TrustRoots) -> Result<TlsParameters, SmtpConfigError> {
    let tls_error = |reason: String| SmtpConfigError::Tls { host: host.to_string(), reason };
    let mut builder = TlsParameters::builder(host.to_string());
    for der in roots.extra() {
        let certificate = Certificate::from_der(der.to_vec()).map_err(|e| tls_error(e.to_string()))?;
        builder = builder.add_root_certificate(certificate);
    }
    builder.build_rustls().map_err(|e| tls_error(e.to_string()))
}

/// This host's name for EHLO, or `[127.0.0.1]` when it has none usable.
fn default_hello_name() -> ClientId {
    match ClientId::default() {
        ClientId::Domain(name) if !is_hello_name(&name) => ClientId::Ipv4(std::net::Ipv4Addr::LOCALHOST),
        other => other,
    }
}

/// A name EHLO can carry: letters, digits, `-` and `.`.
fn is_hello_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 253 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Awaits an I/O future for at most `limit`.
async fn timed_io<T>(limit: Duration, future: impl Future<Output = std::io::Result<T>>) -> Result<T, Failure> {
    match tokio::time::timeout(limit, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(Failure::from_io(&error)),
        Err(_) => Err(Failure::Timeout(limit)),
    }
}

/// Awaits a lettre future for at most `limit`.
async fn timed<T>(
    limit: Duration,
    future: impl Future<Output = Result<T, lettre::transport::smtp::Error>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(limit, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(Failure::from_lettre(&error)),
        Err(_) => Err(Failure::Timeout(limit)),
    }
}

/// The SMTP reply as the status shows it: `250 2.0.0 OK queued as X`.
fn format_response(response: &Response) -> String {
    let code = response.code().to_string();
    let text = response.message().collect::<Vec<_>>().join(" ");
    join_reply(&code, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_are_opened_without_nagles_algorithm() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let config = SmtpConfig::new("127.0.0.1", port, TlsMode::None, TrustRoots::default(), SmtpCredentials::None);
        let transport = SmtpTransport::new(config).expect("transport");
        let stream = transport.connect_tcp().await.expect("connected");
        assert!(stream.nodelay().expect("TCP_NODELAY"), "Nagle's algorithm is on");
    }

    #[test]
    fn credentials_debug_hides_the_password() {
        let c = SmtpCredentials::Password { username: "mailer".into(), password: "hunter2-secret".into() };
        let shown = format!("{c:?}");
        assert!(shown.contains("mailer") && !shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn hello_names() {
        assert!(is_hello_name("mailroom-7d9f8-abcde"));
        assert!(is_hello_name("mail.example.com"));
        assert!(!is_hello_name(""));
        assert!(!is_hello_name("bad name"));
        assert!(!is_hello_name("bad\r\nname"));
        let hello = default_hello_name().to_string();
        assert!(!hello.is_empty() && !hello.contains(['\r', '\n', ' ']), "{hello}");
    }

    #[test]
    fn config_checks_host_and_builds_tls() {
        crate::tls::install_crypto_provider();
        let config =
            SmtpConfig::new("smtp.example.com", 587, TlsMode::StartTLS, TrustRoots::default(), SmtpCredentials::None);
        let transport = SmtpTransport::new(config.clone()).unwrap();
        assert!(transport.tls.is_some());
        assert_eq!(transport.server(), "smtp.example.com:587");
        let mut bad = config.clone();
        bad.host = "smtp.example.com\r\nX".into();
        assert!(matches!(SmtpTransport::new(bad), Err(SmtpConfigError::Host(_))));
        let mut plain = config;
        plain.tls = TlsMode::None;
        assert!(SmtpTransport::new(plain).unwrap().tls.is_none());
    }
}
