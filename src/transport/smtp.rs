//! The SMTP transport: a relay, a password login, or SASL XOAUTH2 with an Entra ID token.
//!
//! Each send opens one connection and runs the transaction itself (MAIL, one RCPT per
//! recipient, DATA) on lettre's `AsyncSmtpConnection` rather than `AsyncSmtpTransport::send`,
//! for two reasons: a recipient refused at RCPT must not stop delivery to the others, and the
//! XOAUTH2 credentials change with every token, while lettre's transport fixes them.
//!
//! How a failure is classified (transient or permanent, and the words that go into the status)
//! is decided by the pure functions at the end of this file, from a [`Failure`] that keeps only
//! what the decision needs.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Auth, Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use sha2::{Digest, Sha256};

use super::{Delivered, OutgoingMessage, SendError, Transport, mime};
use crate::api::TlsMode;
use crate::auth::{AuthError, TokenSource};
use crate::tls::TrustRoots;

/// Default time to open the TCP connection (and finish an implicit TLS handshake).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time to wait for the reply to one command.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time to transmit the message and get the reply to its final dot.
pub const DEFAULT_DATA_TIMEOUT: Duration = Duration::from_secs(300);

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
            SmtpCredentials::Password { username, .. } => f
                .debug_struct("Password")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
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
        }
    }

    /// A configuration from a profile's `smtp` section (host, port and TLS mode defaulted).
    pub fn from_spec(
        spec: &crate::api::SmtpTransport,
        roots: TrustRoots,
        credentials: SmtpCredentials,
    ) -> Self {
        SmtpConfig::new(
            spec.host.clone(),
            spec.port(),
            spec.tls(),
            roots,
            credentials,
        )
    }
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

/// Sends messages over SMTP, one connection per message.
pub struct SmtpTransport {
    host: String,
    port: u16,
    tls_mode: TlsMode,
    tls: Option<TlsParameters>,
    hello: ClientId,
    credentials: SmtpCredentials,
    connect_timeout: Duration,
    command_timeout: Duration,
    data_timeout: Duration,
    /// Fingerprint of the last token the server refused, cleared by a successful XOAUTH2 login.
    refused_token: Mutex<Option<TokenFingerprint>>,
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
            hello,
            credentials: config.credentials,
            connect_timeout: config.connect_timeout,
            command_timeout: config.command_timeout,
            data_timeout: config.data_timeout,
            refused_token: Mutex::new(None),
        })
    }

    /// `host:port`, as messages name the server.
    fn server(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Connects, reads the greeting, says EHLO and, for StartTLS, upgrades the connection.
    async fn connect(&self) -> Result<AsyncSmtpConnection, SendError> {
        let server = self.server();
        let implicit = match self.tls_mode {
            TlsMode::Implicit => self.tls.clone(),
            TlsMode::StartTLS | TlsMode::None => None,
        };
        let mut conn = timed(
            self.connect_timeout + self.command_timeout,
            AsyncSmtpConnection::connect_tokio1(
                (self.host.as_str(), self.port),
                Some(self.connect_timeout),
                &self.hello,
                implicit,
                None,
            ),
        )
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
    async fn authenticate(
        &self,
        conn: &mut AsyncSmtpConnection,
        sender: &str,
    ) -> Result<(), SendError> {
        let server = self.server();
        match &self.credentials {
            SmtpCredentials::None => Ok(()),
            SmtpCredentials::Password { username, password } => {
                // Built per send and dropped after AUTH; lettre's Credentials never prints the password.
                let credentials = Credentials::new(username.clone(), password.clone());
                timed(
                    self.command_timeout,
                    conn.auth(&[Mechanism::Plain, Mechanism::Login], &credentials),
                )
                .await
                .map(drop)
                .map_err(|f| classify_password_auth(&f, &server, username))
            }
            SmtpCredentials::XOAuth2(tokens) => {
                if !conn
                    .server_info()
                    .supports_auth_mechanism(Mechanism::Xoauth2)
                {
                    return Err(SendError::permanent(format!(
                        "{server} does not offer AUTH XOAUTH2 on this connection; Exchange Online offers it \
                         on smtp.office365.com:587 after STARTTLS"
                    )));
                }
                let token = tokens.token().await.map_err(token_error)?;
                let fingerprint = TokenFingerprint::of(&token.secret);
                let result = timed(
                    self.command_timeout,
                    xoauth2(conn, sender, token.secret.clone()),
                )
                .await;
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
    ) -> Result<Delivered, SendError> {
        let server = self.server();
        let info = conn.server_info();
        let mut parameters = Vec::new();
        let sender_ascii = envelope.from().is_none_or(|a| a.to_string().is_ascii());
        let recipients_ascii = envelope.to().iter().all(|a| a.to_string().is_ascii());
        if !(sender_ascii && recipients_ascii) {
            if !info.supports_feature(Extension::SmtpUtfEight) {
                return Err(SendError::permanent(format!(
                    "the message has addresses with non-ASCII characters, which need SMTPUTF8, \
                     and {server} does not offer it"
                )));
            }
            parameters.push(MailParameter::SmtpUtfEight);
        }
        if !bytes.is_ascii() {
            if !info.supports_feature(Extension::EightBitMime) {
                return Err(SendError::permanent(format!(
                    "the message is not 7-bit and {server} does not offer 8BITMIME"
                )));
            }
            parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }

        timed(
            self.command_timeout,
            conn.command(Mail::new(envelope.from().cloned(), parameters)),
        )
        .await
        .map_err(|f| classify(&f, Stage::MailFrom, &server))?;

        let mut accepted = 0usize;
        let mut refused = Vec::new();
        for recipient in envelope.to() {
            match timed(
                self.command_timeout,
                conn.command(Rcpt::new(recipient.clone(), vec![])),
            )
            .await
            {
                Ok(_) => accepted += 1,
                Err(failure) => match recipient_refusal(&failure) {
                    Some(reply) => refused.push(RecipientRefusal {
                        recipient: recipient.to_string(),
                        reply,
                    }),
                    None => return Err(classify(&failure, Stage::Rcpt, &server)),
                },
            }
        }
        if accepted == 0 {
            return Err(every_recipient_refused(&refused, &server));
        }

        timed(self.command_timeout, conn.command(Data))
            .await
            .map_err(|f| classify(&f, Stage::Data, &server))?;
        let reply = timed(self.data_timeout, conn.message(bytes))
            .await
            .map_err(|f| classify(&f, Stage::Message, &server))?;
        Ok(Delivered {
            response: format_response(&reply),
            request_id: None,
            rejected: refused
                .into_iter()
                .map(|r| (r.recipient, r.reply.to_string()))
                .collect(),
        })
    }
}

#[async_trait]
impl Transport for SmtpTransport {
    async fn send(&self, message: &OutgoingMessage) -> Result<Delivered, SendError> {
        let built = mime::build(message)
            .map_err(|e| SendError::permanent(format!("the message cannot be built: {e}")))?;
        let bytes = built.formatted();
        let mut conn = self.connect().await?;
        let result = match self.authenticate(&mut conn, &message.from.email).await {
            Ok(()) => self.transaction(&mut conn, built.envelope(), &bytes).await,
            Err(e) => Err(e),
        };
        // The outcome is settled; QUIT is a courtesy whose failure changes nothing.
        close(&mut conn, result.is_ok(), self.command_timeout).await;
        result
    }
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
    let tls_error = |reason: String| SmtpConfigError::Tls {
        host: host.to_string(),
        reason,
    };
    let mut builder = TlsParameters::builder(host.to_string());
    for der in roots.extra() {
        let certificate =
            Certificate::from_der(der.to_vec()).map_err(|e| tls_error(e.to_string()))?;
        builder = builder.add_root_certificate(certificate);
    }
    builder.build_rustls().map_err(|e| tls_error(e.to_string()))
}

/// This host's name for EHLO, or `[127.0.0.1]` when it has none usable.
fn default_hello_name() -> ClientId {
    match ClientId::default() {
        ClientId::Domain(name) if !is_hello_name(&name) => {
            ClientId::Ipv4(std::net::Ipv4Addr::LOCALHOST)
        }
        other => other,
    }
}

/// A name EHLO can carry: letters, digits, `-` and `.`.
fn is_hello_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
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

/// A token source's error as a send error.
fn token_error(error: AuthError) -> SendError {
    match error {
        AuthError::Unavailable(reason) => {
            SendError::transient(format!("cannot get a token for SMTP XOAUTH2: {reason}"))
        }
        AuthError::Rejected(reason) | AuthError::Credential(reason) => {
            SendError::permanent(format!("cannot get a token for SMTP XOAUTH2: {reason}"))
        }
    }
}

/// The SMTP reply as the status shows it: `250 2.0.0 OK queued as X`.
fn format_response(response: &Response) -> String {
    let code = response.code().to_string();
    let text = response.message().collect::<Vec<_>>().join(" ");
    join_reply(&code, &text)
}

fn join_reply(code: &str, text: &str) -> String {
    let text = text.trim();
    if text.is_empty() {
        code.to_string()
    } else {
        format!("{code} {text}")
    }
}

// ---------------------------------------------------------------------------------------------
// Classification: pure functions from what happened to what the status says.

/// Where in the session something failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// TCP connect, (implicit TLS,) greeting, EHLO.
    Connect,
    /// STARTTLS and the TLS handshake.
    StartTls,
    /// AUTH.
    Auth,
    /// MAIL FROM.
    MailFrom,
    /// RCPT TO, outside a single recipient's refusal.
    Rcpt,
    /// The DATA command.
    Data,
    /// The message content and the reply to its final dot.
    Message,
}

impl Stage {
    /// What the session was doing, in words that lead the reason.
    fn describe(self, server: &str) -> String {
        match self {
            Stage::Connect => format!("cannot connect to SMTP server {server}"),
            Stage::StartTls => format!("STARTTLS with {server} failed"),
            Stage::Auth => format!("{server} refused authentication"),
            Stage::MailFrom => format!("{server} refused the sender"),
            Stage::Rcpt => format!("{server} failed while taking the recipients"),
            Stage::Data => format!("{server} refused the message"),
            Stage::Message => format!("{server} did not accept the message"),
        }
    }
}

/// What went wrong, reduced to what the classification needs (no lettre types, so it is testable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// A negative SMTP reply.
    Reply(Reply),
    /// No answer in time.
    Timeout(Duration),
    /// A network error.
    Io {
        /// Its kind (refused, reset, ...).
        kind: io::ErrorKind,
        /// Its text.
        detail: String,
    },
    /// The server's certificate could not be verified.
    Certificate(String),
    /// Client and server share no TLS version or cipher suite.
    TlsIncompatible(String),
    /// Another TLS failure (an alert, an interrupted handshake).
    Tls(String),
    /// The server offers no way to do what the configuration asks (an AUTH mechanism, say).
    Unsupported(String),
    /// A reply that could not be parsed, or another protocol error.
    Protocol(String),
}

/// An SMTP reply: its code and its text (lines joined by spaces).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    /// The text after the code.
    pub text: String,
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&join_reply(&self.code.to_string(), &self.text))
    }
}

impl Failure {
    /// Reduces a lettre error, looking through its causes for I/O and rustls errors.
    fn from_lettre(error: &lettre::transport::smtp::Error) -> Failure {
        if let Some(code) = error.status() {
            let text = error.source().map(|s| s.to_string()).unwrap_or_default();
            return Failure::Reply(Reply {
                code: u16::from(code),
                text,
            });
        }
        let mut cause: Option<&(dyn StdError + 'static)> = error.source();
        while let Some(current) = cause {
            if let Some(tls) = current.downcast_ref::<rustls::Error>() {
                return Failure::from_rustls(tls);
            }
            if let Some(io_error) = current.downcast_ref::<io::Error>() {
                // io::Error::source() skips the wrapped error, so look inside it here.
                if let Some(tls) = io_error
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                {
                    return Failure::from_rustls(tls);
                }
                if io_error.kind() == io::ErrorKind::TimedOut {
                    return Failure::Io {
                        kind: io::ErrorKind::TimedOut,
                        detail: "timed out".to_string(),
                    };
                }
                return Failure::Io {
                    kind: io_error.kind(),
                    detail: io_error.to_string(),
                };
            }
            cause = current.source();
        }
        // lettre reports a connection closed before a reply as this response error; it is the
        // same event as an EOF, and says more to a reader as one.
        if error.is_response()
            && error
                .source()
                .is_some_and(|s| s.to_string() == "incomplete response")
        {
            return Failure::Io {
                kind: io::ErrorKind::UnexpectedEof,
                detail: "the server closed the connection".to_string(),
            };
        }
        if error.is_client() {
            Failure::Unsupported(
                error
                    .source()
                    .map_or_else(|| error.to_string(), |s| s.to_string()),
            )
        } else {
            Failure::Protocol(error.to_string())
        }
    }

    /// Sorts a rustls error into certificate, incompatibility, or other TLS failure.
    fn from_rustls(error: &rustls::Error) -> Failure {
        match error {
            rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::UnsupportedNameType => Failure::Certificate(error.to_string()),
            rustls::Error::PeerIncompatible(_) => Failure::TlsIncompatible(error.to_string()),
            _ => Failure::Tls(error.to_string()),
        }
    }
}

/// Classifies a failure at a stage of the session.
pub fn classify(failure: &Failure, stage: Stage, server: &str) -> SendError {
    let context = stage.describe(server);
    // Without a reply to the final dot nobody knows whether the server took the message.
    let doubt = if stage == Stage::Message {
        "; it is unknown whether the server accepted the message, so it will be sent again with the same Message-ID"
    } else {
        ""
    };
    match failure {
        Failure::Reply(reply) => classify_reply(reply, &context),
        Failure::Timeout(limit) => SendError::transient(format!(
            "{context}: no answer within {}s{doubt}",
            limit.as_secs()
        )),
        Failure::Io { kind, detail } => {
            let what = match kind {
                io::ErrorKind::ConnectionRefused => "connection refused",
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
                    "the connection was reset"
                }
                io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe => {
                    "the server closed the connection"
                }
                io::ErrorKind::TimedOut => "timed out",
                _ => detail.as_str(),
            };
            SendError::transient(format!("{context}: {what}{doubt}"))
        }
        Failure::Certificate(detail) => SendError::permanent(format!(
            "the TLS certificate of {server} is not trusted ({detail}); if the server uses a private \
             CA, add the CA certificate to the profile's caBundle or to the operator's --ca-bundle"
        )),
        Failure::TlsIncompatible(detail) => SendError::permanent(format!(
            "TLS with {server} is not possible: {detail}; the server needs TLS 1.2 or newer"
        )),
        Failure::Tls(detail) => {
            SendError::transient(format!("{context}: TLS error: {detail}{doubt}"))
        }
        Failure::Unsupported(detail) => SendError::permanent(format!("{context}: {detail}")),
        Failure::Protocol(detail) => SendError::transient(format!("{context}: {detail}{doubt}")),
    }
}

/// 4xx is transient and 5xx permanent (RFC 5321 section 4.2.1); the reply is quoted whole.
pub fn classify_reply(reply: &Reply, context: &str) -> SendError {
    let reason = format!("{context}: {reply}");
    match reply.code {
        500..=599 => SendError::permanent(reason),
        _ => SendError::transient(reason),
    }
}

/// Password AUTH: a refused login is permanent (it will not get better by itself), with a hint.
pub fn classify_password_auth(failure: &Failure, server: &str, username: &str) -> SendError {
    match failure {
        Failure::Reply(reply) if reply.code == 535 || reply.code == 534 => {
            SendError::permanent(format!(
                "{server} refused the login for user {username:?}: {reply}; check the username and \
                 password in the profile's Secret"
            ))
        }
        Failure::Unsupported(_) => SendError::permanent(format!(
            "{server} offers no AUTH PLAIN or LOGIN on this connection; check the port and tls mode \
             (most servers offer AUTH only after STARTTLS)"
        )),
        other => classify(other, Stage::Auth, server),
    }
}

/// Whether an AUTH failure means the token itself was refused.
fn is_token_refusal(failure: &Failure) -> bool {
    matches!(failure, Failure::Reply(reply) if reply.code == 535)
}

/// A SHA-256 of a token, to recognise it again without keeping it.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenFingerprint([u8; 32]);

impl TokenFingerprint {
    /// The fingerprint of a token.
    pub fn of(token: &str) -> Self {
        TokenFingerprint(Sha256::digest(token.as_bytes()).into())
    }
}

impl fmt::Debug for TokenFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenFingerprint(..)")
    }
}

/// What an XOAUTH2 refusal means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenRefusal {
    /// The first refusal of a token (or the same token again): maybe stale, worth one more try.
    MaybeStale,
    /// A token fetched after an earlier refusal was refused too: the app lacks the right.
    NewTokenRefused,
}

/// Judges a refusal from the fingerprint of the previously refused token (cleared on success).
pub fn judge_token_refusal(
    previous: Option<&TokenFingerprint>,
    this: &TokenFingerprint,
) -> TokenRefusal {
    match previous {
        Some(previous) if previous != this => TokenRefusal::NewTokenRefused,
        _ => TokenRefusal::MaybeStale,
    }
}

/// The error for a refused XOAUTH2 token.
pub fn classify_token_refusal(
    failure: &Failure,
    verdict: TokenRefusal,
    server: &str,
    sender: &str,
) -> SendError {
    let reply = match failure {
        Failure::Reply(reply) => reply.to_string(),
        other => format!("{other:?}"),
    };
    match verdict {
        TokenRefusal::MaybeStale => SendError::transient(format!(
            "{server} refused the XOAUTH2 token for {sender}: {reply}; the next attempt uses a new token"
        )),
        TokenRefusal::NewTokenRefused => SendError::permanent(format!(
            "{server} refused XOAUTH2 for {sender} with a newly issued token too: {reply}; check that \
             the app has the SMTP.SendAsApp permission with admin consent, that its service principal \
             is registered in Exchange Online with access to the mailbox {sender}, and that SMTP AUTH \
             is enabled for that mailbox"
        )),
    }
}

/// One recipient the server refused at RCPT, with its reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipientRefusal {
    /// The address.
    pub recipient: String,
    /// The server's reply.
    pub reply: Reply,
}

/// The reply when a RCPT failure concerns this recipient alone; `None` when the session failed
/// (network error, or 421: the server is closing the connection).
pub fn recipient_refusal(failure: &Failure) -> Option<Reply> {
    match failure {
        Failure::Reply(reply) if reply.code != 421 && (400..600).contains(&reply.code) => {
            Some(reply.clone())
        }
        _ => None,
    }
}

/// Every recipient refused: permanent when every refusal is 5xx, else worth another attempt.
pub fn every_recipient_refused(refused: &[RecipientRefusal], server: &str) -> SendError {
    let list = refused
        .iter()
        .map(|r| format!("{}: {}", r.recipient, r.reply))
        .collect::<Vec<_>>()
        .join("; ");
    let reason = format!("{server} refused every recipient: {list}");
    if !refused.is_empty() && refused.iter().all(|r| r.reply.code >= 500) {
        SendError::permanent(reason)
    } else {
        SendError::transient(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = "smtp.example.com:587";

    fn reply(code: u16, text: &str) -> Failure {
        Failure::Reply(Reply {
            code,
            text: text.to_string(),
        })
    }

    fn reason(e: &SendError) -> &str {
        match e {
            SendError::Transient { reason, .. } | SendError::Permanent { reason } => reason,
        }
    }

    #[test]
    fn replies_4xx_transient_5xx_permanent_with_the_reply_quoted() {
        let e = classify(
            &reply(550, "5.7.64 TenantAttribution; Relay Access Denied"),
            Stage::MailFrom,
            SERVER,
        );
        assert!(!e.is_transient());
        assert_eq!(
            reason(&e),
            "smtp.example.com:587 refused the sender: 550 5.7.64 TenantAttribution; Relay Access Denied"
        );
        let e = classify(&reply(451, "4.3.0 Try again later"), Stage::Message, SERVER);
        assert!(e.is_transient());
        assert!(reason(&e).ends_with("451 4.3.0 Try again later"));
        assert!(
            classify(
                &reply(421, "4.3.2 Service not available"),
                Stage::Connect,
                SERVER
            )
            .is_transient()
        );
        assert!(
            !classify(&reply(554, "5.6.0 Message rejected"), Stage::Data, SERVER).is_transient()
        );
        assert!(
            !classify(&reply(552, "5.3.4 Message too big"), Stage::Message, SERVER).is_transient()
        );
    }

    #[test]
    fn network_failures_are_transient() {
        for kind in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::UnexpectedEof,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::TimedOut,
            io::ErrorKind::Other,
        ] {
            let failure = Failure::Io {
                kind,
                detail: "x".into(),
            };
            assert!(
                classify(&failure, Stage::Connect, SERVER).is_transient(),
                "{kind:?}"
            );
        }
        let e = classify(
            &Failure::Io {
                kind: io::ErrorKind::ConnectionRefused,
                detail: "Connection refused (os error 111)".into(),
            },
            Stage::Connect,
            SERVER,
        );
        assert_eq!(
            reason(&e),
            "cannot connect to SMTP server smtp.example.com:587: connection refused"
        );
        assert!(
            classify(
                &Failure::Timeout(Duration::from_secs(30)),
                Stage::Data,
                SERVER
            )
            .is_transient()
        );
        assert!(
            classify(
                &Failure::Tls("handshake interrupted".into()),
                Stage::StartTls,
                SERVER
            )
            .is_transient()
        );
        assert!(
            classify(
                &Failure::Protocol("incomplete response".into()),
                Stage::Data,
                SERVER
            )
            .is_transient()
        );
    }

    #[test]
    fn a_drop_during_the_message_says_the_outcome_is_unknown() {
        let e = classify(
            &Failure::Io {
                kind: io::ErrorKind::UnexpectedEof,
                detail: String::new(),
            },
            Stage::Message,
            SERVER,
        );
        assert!(e.is_transient());
        assert!(reason(&e).contains("same Message-ID"), "{e}");
        let e = classify(
            &Failure::Timeout(Duration::from_secs(300)),
            Stage::Message,
            SERVER,
        );
        assert!(
            e.is_transient() && reason(&e).contains("same Message-ID"),
            "{e}"
        );
        let e = classify(&reply(451, "4.3.0 Try again later"), Stage::Message, SERVER);
        assert!(
            !reason(&e).contains("same Message-ID"),
            "a reply is a clear answer: {e}"
        );
    }

    #[test]
    fn certificate_failures_are_permanent_with_a_ca_bundle_hint() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let failure = Failure::from_rustls(&tls);
        assert!(matches!(failure, Failure::Certificate(_)));
        let e = classify(&failure, Stage::StartTls, SERVER);
        assert!(!e.is_transient());
        assert!(
            reason(&e).contains("caBundle") && reason(&e).contains("--ca-bundle"),
            "{e}"
        );
        let expired = rustls::Error::InvalidCertificate(rustls::CertificateError::Expired);
        assert!(matches!(
            Failure::from_rustls(&expired),
            Failure::Certificate(_)
        ));
        let incompatible =
            rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered);
        assert!(
            !classify(&Failure::from_rustls(&incompatible), Stage::Connect, SERVER).is_transient()
        );
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::InternalError);
        assert!(classify(&Failure::from_rustls(&alert), Stage::Connect, SERVER).is_transient());
    }

    #[test]
    fn unsupported_features_are_permanent() {
        let e = classify(
            &Failure::Unsupported("No compatible authentication mechanism was found".into()),
            Stage::Auth,
            SERVER,
        );
        assert!(!e.is_transient());
    }

    #[test]
    fn password_refusal_is_permanent_with_a_hint_and_no_secret() {
        let e = classify_password_auth(
            &reply(535, "5.7.8 Authentication credentials invalid"),
            SERVER,
            "mailer",
        );
        assert!(!e.is_transient());
        assert!(reason(&e).contains("535 5.7.8 Authentication credentials invalid"));
        assert!(reason(&e).contains("Secret"));
        assert!(reason(&e).contains("\"mailer\""));
        let e = classify_password_auth(
            &reply(454, "4.7.0 Temporary authentication failure"),
            SERVER,
            "u",
        );
        assert!(e.is_transient());
        let e = classify_password_auth(
            &Failure::Unsupported("No compatible authentication mechanism was found".into()),
            SERVER,
            "u",
        );
        assert!(!e.is_transient() && reason(&e).contains("STARTTLS"));
        // Basic authentication switched off at Microsoft: permanent, quoted.
        let e = classify_password_auth(
            &reply(
                535,
                "5.7.139 Authentication unsuccessful, basic authentication is disabled.",
            ),
            SERVER,
            "u",
        );
        assert!(!e.is_transient() && reason(&e).contains("5.7.139"));
    }

    #[test]
    fn a_refused_token_is_transient_once_then_permanent() {
        let t1 = TokenFingerprint::of("token-1");
        let t2 = TokenFingerprint::of("token-2");
        // First refusal: nothing refused before.
        assert_eq!(judge_token_refusal(None, &t1), TokenRefusal::MaybeStale);
        // The same stale token again (a concurrent send): still transient.
        assert_eq!(
            judge_token_refusal(Some(&t1), &t1),
            TokenRefusal::MaybeStale
        );
        // A new token refused after the first: permanent.
        assert_eq!(
            judge_token_refusal(Some(&t1), &t2),
            TokenRefusal::NewTokenRefused
        );

        let failure = reply(535, "5.7.3 Authentication unsuccessful");
        assert!(is_token_refusal(&failure));
        assert!(!is_token_refusal(&reply(
            454,
            "4.7.0 Temporary authentication failure"
        )));
        let e = classify_token_refusal(
            &failure,
            TokenRefusal::MaybeStale,
            SERVER,
            "alerts@contoso.com",
        );
        assert!(e.is_transient());
        assert!(reason(&e).contains("535 5.7.3 Authentication unsuccessful"));
        let e = classify_token_refusal(
            &failure,
            TokenRefusal::NewTokenRefused,
            SERVER,
            "alerts@contoso.com",
        );
        assert!(!e.is_transient());
        assert!(reason(&e).contains("SMTP.SendAsApp"));
    }

    #[test]
    fn fingerprints_do_not_show_the_token() {
        let shown = format!("{:?}", TokenFingerprint::of("secret-token"));
        assert!(!shown.contains("secret"));
    }

    #[test]
    fn token_source_errors() {
        assert!(token_error(AuthError::Unavailable("503".into())).is_transient());
        assert!(
            !token_error(AuthError::Rejected(
                "AADSTS7000215: Invalid client secret".into()
            ))
            .is_transient()
        );
        assert!(
            !token_error(AuthError::Credential("Secret graph/x missing".into())).is_transient()
        );
    }

    #[test]
    fn recipient_refusals_versus_session_failures() {
        assert_eq!(
            recipient_refusal(&reply(550, "5.1.1 User unknown")).map(|r| r.to_string()),
            Some("550 5.1.1 User unknown".to_string())
        );
        assert!(recipient_refusal(&reply(452, "4.5.3 Too many recipients")).is_some());
        assert!(recipient_refusal(&reply(421, "4.3.2 Closing")).is_none());
        assert!(recipient_refusal(&Failure::Timeout(Duration::from_secs(1))).is_none());
        assert!(
            recipient_refusal(&Failure::Io {
                kind: io::ErrorKind::ConnectionReset,
                detail: String::new()
            })
            .is_none()
        );
    }

    #[test]
    fn every_recipient_refused_is_permanent_only_if_all_5xx() {
        let refusal = |r: &str, code, text: &str| RecipientRefusal {
            recipient: r.into(),
            reply: Reply {
                code,
                text: text.into(),
            },
        };
        let all_5xx = [
            refusal("a@example.com", 550, "5.1.1 User unknown"),
            refusal("b@example.com", 553, "5.1.3 Bad address"),
        ];
        let e = every_recipient_refused(&all_5xx, SERVER);
        assert!(!e.is_transient());
        assert_eq!(
            reason(&e),
            "smtp.example.com:587 refused every recipient: a@example.com: 550 5.1.1 User unknown; \
             b@example.com: 553 5.1.3 Bad address"
        );
        let mixed = [
            refusal("a@example.com", 550, "5.1.1 User unknown"),
            refusal("b@example.com", 450, "4.2.1 Mailbox busy"),
        ];
        assert!(every_recipient_refused(&mixed, SERVER).is_transient());
    }

    #[test]
    fn reply_display() {
        let r = Reply {
            code: 250,
            text: "2.0.0 OK queued as X".into(),
        };
        assert_eq!(r.to_string(), "250 2.0.0 OK queued as X");
        let r = Reply {
            code: 250,
            text: String::new(),
        };
        assert_eq!(r.to_string(), "250");
    }

    #[test]
    fn credentials_debug_hides_the_password() {
        let c = SmtpCredentials::Password {
            username: "mailer".into(),
            password: "hunter2-secret".into(),
        };
        let shown = format!("{c:?}");
        assert!(
            shown.contains("mailer") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn hello_names() {
        assert!(is_hello_name("mailroom-7d9f8-abcde"));
        assert!(is_hello_name("mail.example.com"));
        assert!(!is_hello_name(""));
        assert!(!is_hello_name("bad name"));
        assert!(!is_hello_name("bad\r\nname"));
        let hello = default_hello_name().to_string();
        assert!(
            !hello.is_empty() && !hello.contains(['\r', '\n', ' ']),
            "{hello}"
        );
    }

    #[test]
    fn config_checks_host_and_builds_tls() {
        crate::tls::install_crypto_provider();
        let config = SmtpConfig::new(
            "smtp.example.com",
            587,
            TlsMode::StartTLS,
            TrustRoots::default(),
            SmtpCredentials::None,
        );
        let transport = SmtpTransport::new(config.clone()).unwrap();
        assert!(transport.tls.is_some());
        assert_eq!(transport.server(), "smtp.example.com:587");
        let mut bad = config.clone();
        bad.host = "smtp.example.com\r\nX".into();
        assert!(matches!(
            SmtpTransport::new(bad),
            Err(SmtpConfigError::Host(_))
        ));
        let mut plain = config;
        plain.tls = TlsMode::None;
        assert!(SmtpTransport::new(plain).unwrap().tls.is_none());
    }
}
