//! One SMTP submission session (RFC 5321, RFC 6409): commands parsed by `smtp-proto`, replies
//! pipelined (RFC 2920), STARTTLS (RFC 3207), AUTH PLAIN and LOGIN after TLS only (RFC 4954),
//! SIZE (RFC 1870), 8BITMIME (RFC 6152) and SMTPUTF8 (RFC 6531). What is accepted, and from whom,
//! is the [`Backend`]'s decision; this module only speaks the protocol.

use std::time::Duration;

use base64::Engine;
use smtp_proto::request::receiver::{DataReceiver, DummyDataReceiver};
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN, MAIL_BODY_BINARYMIME, MAIL_SMTPUTF8, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::reply::Reply;

/// The longest command line, and the longest AUTH response line, read (RFC 5321 asks for 512 at
/// least; an AUTH PLAIN response with a long password is longer).
pub const MAX_LINE: usize = 4096;

/// What a session may take.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The largest message (`SIZE`); larger ones get `552`.
    pub max_message_bytes: usize,
    /// Recipients of one message; more get `452`.
    pub max_recipients: usize,
    /// How long the client may stay silent between commands (RFC 5321 §4.5.3.2.7: 5 minutes).
    pub command_timeout: Duration,
    /// How long a message's data may take in all (RFC 5321 §4.5.3.2.6: 10 minutes).
    pub data_timeout: Duration,
    /// Bad commands and failed logins before the session is closed with `421`.
    pub max_errors: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 1024 * 1024,
            max_recipients: 500,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            max_errors: 10,
        }
    }
}

/// The envelope of one message, as the client gave it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Envelope {
    /// `MAIL FROM` (a bare address).
    pub from: String,
    /// `RCPT TO`, in order (bare addresses).
    pub recipients: Vec<String>,
    /// `MAIL FROM ... SMTPUTF8`.
    pub smtputf8: bool,
}

/// What decides who may submit what, and stores what is accepted.
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    /// Who a successful login is.
    type Grant: Send + Sync;

    /// Checks a username and password; `Err` is the reply (`535`, or `454` when it cannot tell).
    async fn authenticate(&self, username: &str, password: &[u8]) -> Result<Self::Grant, Reply>;

    /// Checks the envelope sender (policy, rate limit).
    async fn mail_from(&self, grant: &Self::Grant, from: &str) -> Result<(), Reply>;

    /// Checks one recipient (policy).
    fn rcpt_to(&self, grant: &Self::Grant, to: &str) -> Result<(), Reply>;

    /// Stores an accepted message durably; `Ok` is the queue id named in the `250`. Only what
    /// is stored may be answered `250`.
    async fn accept(&self, grant: &Self::Grant, envelope: &Envelope, data: Vec<u8>) -> Result<String, Reply>;
}

/// How a session ended.
pub enum Ended<S> {
    /// The client quit, went away, or was sent away.
    Closed,
    /// The client asked for TLS and was told to start it: the caller wraps the stream and runs a
    /// new session on it (RFC 3207: everything known before is forgotten).
    StartTls(S),
}

/// Runs a session on `stream` until it ends. `tls`: the stream is already encrypted;
/// `tls_available`: STARTTLS may be offered.
pub async fn run<S, B>(
    stream: S,
    hostname: &str,
    tls: bool,
    tls_available: bool,
    limits: &Limits,
    backend: &B,
    greet: bool,
) -> std::io::Result<Ended<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: Backend,
{
    let mut session = Session { conn: Conn::new(stream), hostname, tls, tls_available, limits, backend };
    if greet {
        session.conn.queue(&Reply::new(220, "", format!("{hostname} ESMTP mailroom")));
    }
    session.run().await
}

struct Session<'a, S, B: Backend> {
    conn: Conn<S>,
    hostname: &'a str,
    tls: bool,
    tls_available: bool,
    limits: &'a Limits,
    backend: &'a B,
}

impl<S: AsyncRead + AsyncWrite + Unpin, B: Backend> Session<'_, S, B> {
    async fn run(mut self) -> std::io::Result<Ended<S>> {
        let mut greeted = false;
        let mut grant: Option<B::Grant> = None;
        // The mail transaction in progress: its envelope once MAIL was accepted.
        let mut transaction: Option<Envelope> = None;
        let mut errors = 0u32;
        loop {
            if errors >= self.limits.max_errors {
                self.conn.queue(&Reply::new(421, "4.7.0", "too many errors; closing the connection"));
                self.conn.flush().await?;
                return Ok(Ended::Closed);
            }
            let line = match self.conn.read_line(self.limits.command_timeout).await {
                Ok(line) => line,
                Err(ReadError::Eof) => return Ok(Ended::Closed),
                Err(ReadError::Timeout) => {
                    self.conn.queue(&Reply::new(421, "4.4.2", "timed out waiting for a command; closing"));
                    let _ = self.conn.flush().await;
                    return Ok(Ended::Closed);
                }
                Err(ReadError::TooLong) => {
                    self.conn.queue(&Reply::new(500, "5.5.6", format!("line too long (at most {MAX_LINE} bytes)")));
                    errors += 1;
                    continue;
                }
                Err(ReadError::Io(e)) => return Err(e),
            };
            let request = match Request::parse(&mut line.iter()) {
                Ok(r) => r.into_owned(),
                Err(e) => {
                    self.conn.queue(&parse_error_reply(&e));
                    errors += 1;
                    continue;
                }
            };
            let reply = match request {
                Request::Ehlo { .. } => {
                    greeted = true;
                    transaction = None;
                    self.conn.queue_raw(&self.ehlo());
                    continue;
                }
                Request::Helo { .. } => {
                    greeted = true;
                    transaction = None;
                    Reply::new(250, "", self.hostname.to_string())
                }
                Request::StartTls if self.tls => Reply::new(503, "5.5.1", "TLS is already active"),
                Request::StartTls if !self.tls_available => {
                    Reply::new(454, "4.7.0", "TLS not available now; try again later")
                }
                Request::StartTls => {
                    self.conn.queue(&Reply::new(220, "2.0.0", "ready to start TLS"));
                    self.conn.flush().await?;
                    // Anything the client sent after STARTTLS in the clear is dropped with the
                    // buffer (a client must not pipeline past it; CVE-2011-0411).
                    return Ok(Ended::StartTls(self.conn.stream));
                }
                Request::Auth { mechanism, initial_response } => {
                    if !self.tls {
                        Reply::new(530, "5.7.0", "must issue a STARTTLS command first")
                    } else if !greeted {
                        Reply::new(503, "5.5.1", "send EHLO first")
                    } else if grant.is_some() {
                        Reply::new(503, "5.5.1", "already authenticated")
                    } else if transaction.is_some() {
                        Reply::new(503, "5.5.1", "AUTH is not permitted during a mail transaction")
                    } else {
                        match self.auth(mechanism, &initial_response).await? {
                            Ok(g) => {
                                grant = Some(g);
                                Reply::new(235, "2.7.0", "authentication succeeded")
                            }
                            Err(reply) => {
                                errors += 1;
                                reply
                            }
                        }
                    }
                }
                Request::Mail { from } => {
                    if !greeted {
                        Reply::new(503, "5.5.1", "send EHLO first")
                    } else if !self.tls {
                        Reply::new(530, "5.7.0", "must issue a STARTTLS command first")
                    } else if transaction.is_some() {
                        Reply::new(503, "5.5.1", "a mail transaction is already in progress; send RSET first")
                    } else if let Some(g) = &grant {
                        if from.size > self.limits.max_message_bytes {
                            Reply::new(552, "5.3.4", self.too_large())
                        } else if from.flags & MAIL_BODY_BINARYMIME != 0 {
                            Reply::new(555, "5.5.4", "BODY=BINARYMIME is not supported")
                        } else if from.address.is_empty() {
                            Reply::new(550, "5.7.1", "a null sender (<>) cannot submit mail")
                        } else {
                            match self.backend.mail_from(g, &from.address).await {
                                Ok(()) => {
                                    let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
                                    transaction =
                                        Some(Envelope { from: from.address, recipients: Vec::new(), smtputf8 });
                                    Reply::new(250, "2.1.0", "sender ok")
                                }
                                Err(reply) => reply,
                            }
                        }
                    } else {
                        Reply::new(530, "5.7.0", "authentication required")
                    }
                }
                Request::Rcpt { to } => match (&grant, transaction.as_mut()) {
                    (Some(g), Some(envelope)) => {
                        if envelope.recipients.len() >= self.limits.max_recipients {
                            Reply::new(
                                452,
                                "4.5.3",
                                format!("too many recipients (at most {})", self.limits.max_recipients),
                            )
                        } else {
                            match self.backend.rcpt_to(g, &to.address) {
                                Ok(()) => {
                                    envelope.recipients.push(to.address);
                                    Reply::new(250, "2.1.5", "recipient ok")
                                }
                                Err(reply) => reply,
                            }
                        }
                    }
                    _ => Reply::new(503, "5.5.1", "send MAIL first"),
                },
                Request::Data => match (&grant, transaction.take()) {
                    (Some(g), Some(envelope)) if !envelope.recipients.is_empty() => {
                        self.conn.queue(&Reply::new(354, "", "end data with <CR><LF>.<CR><LF>"));
                        match self.conn.read_data(self.limits.max_message_bytes, self.limits.data_timeout).await {
                            Ok(Some(data)) => match self.backend.accept(g, &envelope, data).await {
                                Ok(id) => Reply::new(250, "2.0.0", format!("ok: queued as {id}")),
                                Err(reply) => reply,
                            },
                            Ok(None) => Reply::new(552, "5.3.4", self.too_large()),
                            Err(ReadError::Timeout) => {
                                self.conn.queue(&Reply::new(421, "4.4.2", "timed out receiving the message; closing"));
                                let _ = self.conn.flush().await;
                                return Ok(Ended::Closed);
                            }
                            Err(ReadError::Eof | ReadError::TooLong) => return Ok(Ended::Closed),
                            Err(ReadError::Io(e)) => return Err(e),
                        }
                    }
                    (Some(_), Some(envelope)) => {
                        transaction = Some(envelope);
                        Reply::new(554, "5.5.1", "no valid recipients")
                    }
                    _ => Reply::new(503, "5.5.1", "send MAIL and RCPT first"),
                },
                Request::Rset => {
                    transaction = None;
                    Reply::new(250, "2.0.0", "ok")
                }
                Request::Noop { .. } => Reply::new(250, "2.0.0", "ok"),
                Request::Quit => {
                    self.conn.queue(&Reply::new(221, "2.0.0", "bye"));
                    let _ = self.conn.flush().await;
                    return Ok(Ended::Closed);
                }
                Request::Vrfy { .. } => Reply::new(252, "2.5.0", "cannot VRFY a user; send the message"),
                Request::Help { .. } => Reply::new(214, "2.0.0", "mailroom SMTP submission: see RFC 6409"),
                Request::Bdat { .. } => {
                    // CHUNKING is not offered, and the chunk that follows cannot be told from
                    // commands: end the session.
                    self.conn.queue(&Reply::new(
                        502,
                        "5.5.1",
                        "BDAT is not supported (CHUNKING is not offered); closing",
                    ));
                    let _ = self.conn.flush().await;
                    return Ok(Ended::Closed);
                }
                Request::Lhlo { .. }
                | Request::Expn { .. }
                | Request::Etrn { .. }
                | Request::Atrn { .. }
                | Request::Burl { .. } => {
                    errors += 1;
                    Reply::new(502, "5.5.1", "command not implemented")
                }
            };
            self.conn.queue(&reply);
        }
    }

    /// The EHLO reply: STARTTLS before TLS, AUTH after it.
    fn ehlo(&self) -> Vec<u8> {
        let mut lines = vec![self.hostname.to_string()];
        lines.push(format!("SIZE {}", self.limits.max_message_bytes));
        lines.extend(["8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES"].map(String::from));
        if self.tls {
            lines.push("AUTH PLAIN LOGIN".into());
        } else if self.tls_available {
            lines.push("STARTTLS".into());
        }
        let last = lines.len() - 1;
        let mut out = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            out.extend_from_slice(format!("250{}{l}\r\n", if i == last { ' ' } else { '-' }).as_bytes());
        }
        out
    }

    fn too_large(&self) -> String {
        format!("message larger than the limit of {} bytes", self.limits.max_message_bytes)
    }

    /// The AUTH exchange; the outer `Err` is the connection's, the inner the login's.
    async fn auth(&mut self, mechanism: u64, initial: &str) -> std::io::Result<Result<B::Grant, Reply>> {
        let credentials = if mechanism == AUTH_PLAIN {
            let response = if initial.is_empty() {
                match self.challenge("").await? {
                    Ok(r) => r,
                    Err(reply) => return Ok(Err(reply)),
                }
            } else {
                initial.as_bytes().to_vec()
            };
            decode_plain(&response)
        } else if mechanism == AUTH_LOGIN {
            let user = if initial.is_empty() {
                match self.challenge("VXNlcm5hbWU6").await? {
                    Ok(r) => r,
                    Err(reply) => return Ok(Err(reply)),
                }
            } else {
                initial.as_bytes().to_vec()
            };
            let user = match decode_base64(&user).and_then(utf8) {
                Ok(u) => u,
                Err(reply) => return Ok(Err(reply)),
            };
            let password = match self.challenge("UGFzc3dvcmQ6").await? {
                Ok(r) => r,
                Err(reply) => return Ok(Err(reply)),
            };
            decode_base64(&password).map(|p| (user, p))
        } else {
            return Ok(Err(Reply::new(504, "5.5.4", "unrecognized authentication type; use PLAIN or LOGIN")));
        };
        Ok(match credentials {
            Ok((user, password)) => self.backend.authenticate(&user, &password).await,
            Err(reply) => Err(reply),
        })
    }

    /// Sends a `334` challenge and reads the client's answer line (without its line end).
    async fn challenge(&mut self, text: &str) -> std::io::Result<Result<Vec<u8>, Reply>> {
        self.conn.queue(&Reply::new(334, "", text.to_string()));
        match self.conn.read_line(self.limits.command_timeout).await {
            Ok(mut line) => {
                trim_line_end(&mut line);
                if line == b"*" {
                    return Ok(Err(Reply::new(501, "5.7.0", "authentication cancelled")));
                }
                Ok(Ok(line))
            }
            Err(ReadError::Io(e)) => Err(e),
            Err(ReadError::TooLong) => Ok(Err(Reply::new(500, "5.5.6", "authentication line too long"))),
            Err(ReadError::Eof | ReadError::Timeout) => {
                Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the client left during AUTH"))
            }
        }
    }
}

/// The reply to a command `smtp-proto` could not parse.
fn parse_error_reply(e: &smtp_proto::Error) -> Reply {
    use smtp_proto::Error as E;
    match e {
        E::UnknownCommand => Reply::new(500, "5.5.2", "command unrecognized"),
        E::InvalidSenderAddress => Reply::new(501, "5.1.7", "bad sender address syntax"),
        E::InvalidRecipientAddress => Reply::new(501, "5.1.3", "bad recipient address syntax"),
        E::SyntaxError { syntax } => Reply::new(501, "5.5.4", format!("syntax: {syntax}")),
        E::InvalidParameter { param } => Reply::new(501, "5.5.4", format!("invalid parameter {param}")),
        E::UnsupportedParameter { param } => {
            Reply::new(555, "5.5.4", format!("unsupported parameter {}", param.escape_debug()))
        }
        E::ResponseTooLong => Reply::new(500, "5.5.6", "line too long"),
        E::NeedsMoreData { .. } | E::InvalidResponse { .. } => Reply::new(500, "5.5.2", "command unrecognized"),
    }
}

fn trim_line_end(line: &mut Vec<u8>) {
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
}

fn decode_base64(text: &[u8]) -> Result<Vec<u8>, Reply> {
    let text: Vec<u8> = text.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
    if text == b"=" {
        return Ok(Vec::new());
    }
    base64::engine::general_purpose::STANDARD
        .decode(&text)
        .map_err(|_| Reply::new(501, "5.5.2", "cannot decode the response (base64 expected)"))
}

fn utf8(bytes: Vec<u8>) -> Result<String, Reply> {
    String::from_utf8(bytes).map_err(|_| Reply::new(501, "5.5.2", "the username is not UTF-8"))
}

/// An AUTH PLAIN response (RFC 4616): `authzid NUL authcid NUL passwd`, base64. An authorization
/// identity other than the user itself is refused: nobody submits as someone else.
pub fn decode_plain(response: &[u8]) -> Result<(String, Vec<u8>), Reply> {
    let bytes = decode_base64(response)?;
    let mut parts = bytes.splitn(3, |b| *b == 0);
    let (Some(authz), Some(user), Some(password)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(Reply::new(501, "5.5.2", "malformed PLAIN response"));
    };
    let user = utf8(user.to_vec())?;
    if !authz.is_empty() && authz != user.as_bytes() {
        return Err(Reply::new(535, "5.7.8", "authentication credentials invalid"));
    }
    Ok((user, password.to_vec()))
}

enum ReadError {
    Eof,
    Timeout,
    TooLong,
    Io(std::io::Error),
}

/// The stream with its read-ahead and the replies not yet written (pipelining: replies are
/// written when the client's input is used up, before waiting for more).
struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
    start: usize,
    out: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(stream: S) -> Self {
        Conn { stream, buf: Vec::with_capacity(1024), start: 0, out: Vec::with_capacity(512) }
    }

    fn queue(&mut self, reply: &Reply) {
        reply.write(&mut self.out);
    }

    fn queue_raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.stream.flush().await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Reads more input, writing the pending replies first. `Ok(false)`: end of input.
    async fn fill(&mut self, deadline: tokio::time::Instant) -> Result<bool, ReadError> {
        self.flush().await.map_err(ReadError::Io)?;
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
            Err(_) => Err(ReadError::Timeout),
            Ok(Err(e)) => Err(ReadError::Io(e)),
            Ok(Ok(0)) => Ok(false),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
        }
    }

    /// The next line, with its line end; a line over [`MAX_LINE`] is skipped whole and reported.
    async fn read_line(&mut self, timeout: Duration) -> Result<Vec<u8>, ReadError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut skipping = false;
        loop {
            let pending = &self.buf[self.start..];
            if let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let line = pending[..=i].to_vec();
                self.start += i + 1;
                if skipping || line.len() > MAX_LINE {
                    return Err(ReadError::TooLong);
                }
                return Ok(line);
            }
            if pending.len() > MAX_LINE {
                skipping = true;
                self.start = self.buf.len();
            }
            if !self.fill(deadline).await? {
                return Err(ReadError::Eof);
            }
        }
    }

    /// A message's data after `354`, dot-unstuffed, without the final `.` line. `Ok(None)`: it
    /// was larger than `max` (the rest is read and dropped, so the session can go on).
    async fn read_data(&mut self, max: usize, timeout: Duration) -> Result<Option<Vec<u8>>, ReadError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut receiver = DataReceiver::new();
        let mut data = Vec::new();
        loop {
            let pending = &self.buf[self.start..];
            let mut iter = pending.iter();
            let done = receiver.ingest(&mut iter, &mut data);
            self.start += pending.len() - iter.as_slice().len();
            if done {
                return Ok(Some(data));
            }
            if data.len() > max {
                break;
            }
            if !self.fill(deadline).await? {
                return Err(ReadError::Eof);
            }
        }
        drop(data);
        let mut rest = DummyDataReceiver::new_data(&receiver);
        loop {
            let pending = &self.buf[self.start..];
            let mut iter = pending.iter();
            let done = rest.ingest(&mut iter);
            self.start += pending.len() - iter.as_slice().len();
            if done {
                return Ok(None);
            }
            if !self.fill(deadline).await? {
                return Err(ReadError::Eof);
            }
        }
    }
}
