//! Classifying SMTP failures: pure functions from what happened to what the status says.
//!
//! 4xx replies and network trouble are transient, 5xx replies permanent (RFC 5321 section
//! 4.2.1); authentication and TLS failures get a hint at what to change. Reasons quote the
//! server's reply and never contain a password or token.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::auth::AuthError;
use crate::transport::SendError;

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
    pub(super) fn from_lettre(error: &lettre::transport::smtp::Error) -> Failure {
        if let Some(code) = error.status() {
            let text = error.source().map(|s| s.to_string()).unwrap_or_default();
            return Failure::Reply(Reply { code: u16::from(code), text });
        }
        let mut cause: Option<&(dyn StdError + 'static)> = error.source();
        while let Some(current) = cause {
            if let Some(tls) = current.downcast_ref::<rustls::Error>() {
                return Failure::from_rustls(tls);
            }
            if let Some(io_error) = current.downcast_ref::<io::Error>() {
                // io::Error::source() skips the wrapped error, so look inside it here.
                if let Some(tls) = io_error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                    return Failure::from_rustls(tls);
                }
                if io_error.kind() == io::ErrorKind::TimedOut {
                    return Failure::Io { kind: io::ErrorKind::TimedOut, detail: "timed out".to_string() };
                }
                return Failure::Io { kind: io_error.kind(), detail: io_error.to_string() };
            }
            cause = current.source();
        }
        // lettre reports a connection closed before a reply as this response error; it is the
        // same event as an EOF, and says more to a reader as one.
        if error.is_response() && error.source().is_some_and(|s| s.to_string() == "incomplete response") {
            return Failure::Io {
                kind: io::ErrorKind::UnexpectedEof,
                detail: "the server closed the connection".to_string(),
            };
        }
        if error.is_client() {
            Failure::Unsupported(error.source().map_or_else(|| error.to_string(), |s| s.to_string()))
        } else {
            Failure::Protocol(error.to_string())
        }
    }

    /// Reduces an I/O error of a stream mailroom opened itself (a TLS handshake, say).
    pub(super) fn from_io(error: &io::Error) -> Failure {
        if let Some(tls) = error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            return Failure::from_rustls(tls);
        }
        Failure::Io { kind: error.kind(), detail: error.to_string() }
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
        Failure::Timeout(limit) => {
            SendError::transient(format!("{context}: no answer within {}s{doubt}", limit.as_secs()))
        }
        Failure::Io { kind, detail } => {
            let what = match kind {
                io::ErrorKind::ConnectionRefused => "connection refused",
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => "the connection was reset",
                io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe => "the server closed the connection",
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
        Failure::Tls(detail) => SendError::transient(format!("{context}: TLS error: {detail}{doubt}")),
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
        Failure::Reply(reply) if reply.code >= 500 && is_basic_auth_disabled(&reply.text) => {
            SendError::permanent(format!(
                "{server} no longer accepts passwords: {reply}; Microsoft 365 retired basic \
                 authentication for SMTP, so use smtp.auth.oauth2 or the graph transport instead"
            ))
        }
        Failure::Reply(reply) if reply.code == 535 || reply.code == 534 => SendError::permanent(format!(
            "{server} refused the login for user {username:?}: {reply}; check the username and \
                 password in the profile's Secret"
        )),
        Failure::Unsupported(_) => SendError::permanent(format!(
            "{server} offers no AUTH PLAIN or LOGIN on this connection; check the port and tls mode \
             (most servers offer AUTH only after STARTTLS)"
        )),
        other => classify(other, Stage::Auth, server),
    }
}

/// Microsoft 365's replies when basic authentication is off (tenant-wide or for the mailbox).
fn is_basic_auth_disabled(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower.starts_with("5.7.30")
        || lower.starts_with("5.7.139")
        || lower.contains("basic authentication is disabled")
        || lower.contains("basic authentication is not supported")
}

/// Whether an AUTH failure means the token itself was refused.
pub(super) fn is_token_refusal(failure: &Failure) -> bool {
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
pub fn judge_token_refusal(previous: Option<&TokenFingerprint>, this: &TokenFingerprint) -> TokenRefusal {
    match previous {
        Some(previous) if previous != this => TokenRefusal::NewTokenRefused,
        _ => TokenRefusal::MaybeStale,
    }
}

/// The error for a refused XOAUTH2 token.
pub fn classify_token_refusal(failure: &Failure, verdict: TokenRefusal, server: &str, sender: &str) -> SendError {
    let reply = match failure {
        Failure::Reply(reply) => reply.to_string(),
        other => format!("{other:?}"),
    };
    match verdict {
        TokenRefusal::MaybeStale => SendError::transient(format!(
            "{server} refused the XOAUTH2 token for {sender}: {reply}; the next attempt uses a new token"
        )),
        TokenRefusal::NewTokenRefused => SendError::Denied {
            reason: format!(
                "{server} refused XOAUTH2 for {sender} with a newly issued token too: {reply}; the app must be \
                 authorised to send as {sender}, either with the Office 365 Exchange Online application \
                 permission SMTP.SendAsApp (admin consent) and the service principal registered in Exchange \
                 Online with access to the mailbox, or with Exchange Online RBAC for Applications: {}; and \
                 SMTP AUTH must be enabled for the mailbox",
                crate::auth::rbac_remedy(crate::auth::SMTP_SEND_AS_APP)
            ),
        },
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
        Failure::Reply(reply) if reply.code != 421 && (400..600).contains(&reply.code) => Some(reply.clone()),
        _ => None,
    }
}

/// Whether a failure says that the session is closed rather than answering the command: a
/// network error (an idle session the server closed reads as an end of file or a reset), TLS or
/// protocol errors on a stream that ended, or `421`, with which a server closes the channel at
/// any command (RFC 5321 §3.8). Any other reply is the server's answer and stands.
pub fn session_gone(failure: &Failure) -> bool {
    match failure {
        Failure::Reply(reply) => reply.code == 421,
        Failure::Io { .. } | Failure::Tls(_) | Failure::Protocol(_) => true,
        Failure::Timeout(_) | Failure::Certificate(_) | Failure::TlsIncompatible(_) | Failure::Unsupported(_) => false,
    }
}

/// Every recipient refused: permanent when every refusal is 5xx, else worth another attempt.
pub fn every_recipient_refused(refused: &[RecipientRefusal], server: &str) -> SendError {
    let list = refused.iter().map(|r| format!("{}: {}", r.recipient, r.reply)).collect::<Vec<_>>().join("; ");
    let reason = format!("{server} refused every recipient: {list}");
    if !refused.is_empty() && refused.iter().all(|r| r.reply.code >= 500) {
        SendError::permanent(reason)
    } else {
        SendError::transient(reason)
    }
}

/// A token source's error as a send error: unavailable is transient, refused permanent.
pub fn token_error(error: AuthError) -> SendError {
    match error {
        AuthError::Unavailable(reason) => {
            SendError::transient(format!("cannot get a token for SMTP XOAUTH2: {reason}"))
        }
        AuthError::Rejected(reason) | AuthError::Credential(reason) => {
            SendError::permanent(format!("cannot get a token for SMTP XOAUTH2: {reason}"))
        }
    }
}

/// `250 2.0.0 OK`: the code, then the text when there is one.
pub(super) fn join_reply(code: &str, text: &str) -> String {
    let text = text.trim();
    if text.is_empty() { code.to_string() } else { format!("{code} {text}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = "smtp.example.com:587";

    fn reply(code: u16, text: &str) -> Failure {
        Failure::Reply(Reply { code, text: text.to_string() })
    }

    fn reason(e: &SendError) -> &str {
        e.reason()
    }

    #[test]
    fn replies_4xx_transient_5xx_permanent_with_the_reply_quoted() {
        let e = classify(&reply(550, "5.7.64 TenantAttribution; Relay Access Denied"), Stage::MailFrom, SERVER);
        assert!(!e.is_transient());
        assert_eq!(
            reason(&e),
            "smtp.example.com:587 refused the sender: 550 5.7.64 TenantAttribution; Relay Access Denied"
        );
        let e = classify(&reply(451, "4.3.0 Try again later"), Stage::Message, SERVER);
        assert!(e.is_transient());
        assert!(reason(&e).ends_with("451 4.3.0 Try again later"));
        assert!(classify(&reply(421, "4.3.2 Service not available"), Stage::Connect, SERVER).is_transient());
        assert!(!classify(&reply(554, "5.6.0 Message rejected"), Stage::Data, SERVER).is_transient());
        assert!(!classify(&reply(552, "5.3.4 Message too big"), Stage::Message, SERVER).is_transient());
    }

    #[test]
    fn a_closed_session_is_told_from_an_answer() {
        let eof = Failure::Io { kind: io::ErrorKind::UnexpectedEof, detail: "closed".into() };
        let reset = Failure::Io { kind: io::ErrorKind::ConnectionReset, detail: "reset".into() };
        for gone in [eof, reset, reply(421, "4.3.2 Service not available, closing channel")] {
            assert!(session_gone(&gone), "{gone:?}");
        }
        // The server's own answers stand: a refusal on a reused session is not retried elsewhere.
        for answer in [
            reply(451, "4.3.0 Try again later"),
            reply(550, "5.7.60 SMTP; Client does not have permissions to send as this sender"),
            reply(530, "5.7.57 Client not authenticated"),
            Failure::Timeout(Duration::from_secs(30)),
        ] {
            assert!(!session_gone(&answer), "{answer:?}");
        }
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
            let failure = Failure::Io { kind, detail: "x".into() };
            assert!(classify(&failure, Stage::Connect, SERVER).is_transient(), "{kind:?}");
        }
        let e = classify(
            &Failure::Io { kind: io::ErrorKind::ConnectionRefused, detail: "Connection refused (os error 111)".into() },
            Stage::Connect,
            SERVER,
        );
        assert_eq!(reason(&e), "cannot connect to SMTP server smtp.example.com:587: connection refused");
        assert!(classify(&Failure::Timeout(Duration::from_secs(30)), Stage::Data, SERVER).is_transient());
        assert!(classify(&Failure::Tls("handshake interrupted".into()), Stage::StartTls, SERVER).is_transient());
        assert!(classify(&Failure::Protocol("incomplete response".into()), Stage::Data, SERVER).is_transient());
    }

    #[test]
    fn a_drop_during_the_message_says_the_outcome_is_unknown() {
        let e = classify(
            &Failure::Io { kind: io::ErrorKind::UnexpectedEof, detail: String::new() },
            Stage::Message,
            SERVER,
        );
        assert!(e.is_transient());
        assert!(reason(&e).contains("same Message-ID"), "{e}");
        let e = classify(&Failure::Timeout(Duration::from_secs(300)), Stage::Message, SERVER);
        assert!(e.is_transient() && reason(&e).contains("same Message-ID"), "{e}");
        let e = classify(&reply(451, "4.3.0 Try again later"), Stage::Message, SERVER);
        assert!(!reason(&e).contains("same Message-ID"), "a reply is a clear answer: {e}");
    }

    #[test]
    fn certificate_failures_are_permanent_with_a_ca_bundle_hint() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let failure = Failure::from_rustls(&tls);
        assert!(matches!(failure, Failure::Certificate(_)));
        let e = classify(&failure, Stage::StartTls, SERVER);
        assert!(!e.is_transient());
        assert!(reason(&e).contains("caBundle") && reason(&e).contains("--ca-bundle"), "{e}");
        let expired = rustls::Error::InvalidCertificate(rustls::CertificateError::Expired);
        assert!(matches!(Failure::from_rustls(&expired), Failure::Certificate(_)));
        let incompatible = rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered);
        assert!(!classify(&Failure::from_rustls(&incompatible), Stage::Connect, SERVER).is_transient());
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
        let e = classify_password_auth(&reply(535, "5.7.8 Authentication credentials invalid"), SERVER, "mailer");
        assert!(!e.is_transient());
        assert!(reason(&e).contains("535 5.7.8 Authentication credentials invalid"));
        assert!(reason(&e).contains("Secret"));
        assert!(reason(&e).contains("\"mailer\""));
        let e = classify_password_auth(&reply(454, "4.7.0 Temporary authentication failure"), SERVER, "u");
        assert!(e.is_transient());
        let e = classify_password_auth(
            &Failure::Unsupported("No compatible authentication mechanism was found".into()),
            SERVER,
            "u",
        );
        assert!(!e.is_transient() && reason(&e).contains("STARTTLS"));
        // Basic authentication switched off at Microsoft: permanent, quoted, pointing to OAuth2.
        for (code, text) in [
            (535, "5.7.139 Authentication unsuccessful, basic authentication is disabled."),
            (550, "5.7.30 Basic authentication is not supported for Client Submission"),
        ] {
            let e = classify_password_auth(&reply(code, text), SERVER, "u");
            assert!(!e.is_transient());
            assert!(reason(&e).contains(text) && reason(&e).contains("oauth2"), "{e}");
        }
    }

    #[test]
    fn a_refused_token_is_transient_once_then_permanent() {
        let t1 = TokenFingerprint::of("token-1");
        let t2 = TokenFingerprint::of("token-2");
        // First refusal: nothing refused before.
        assert_eq!(judge_token_refusal(None, &t1), TokenRefusal::MaybeStale);
        // The same stale token again (a concurrent send): still transient.
        assert_eq!(judge_token_refusal(Some(&t1), &t1), TokenRefusal::MaybeStale);
        // A new token refused after the first: permanent.
        assert_eq!(judge_token_refusal(Some(&t1), &t2), TokenRefusal::NewTokenRefused);

        let failure = reply(535, "5.7.3 Authentication unsuccessful");
        assert!(is_token_refusal(&failure));
        assert!(!is_token_refusal(&reply(454, "4.7.0 Temporary authentication failure")));
        let e = classify_token_refusal(&failure, TokenRefusal::MaybeStale, SERVER, "alerts@contoso.com");
        assert!(e.is_transient());
        assert!(reason(&e).contains("535 5.7.3 Authentication unsuccessful"));
        let e = classify_token_refusal(&failure, TokenRefusal::NewTokenRefused, SERVER, "alerts@contoso.com");
        assert!(matches!(e, SendError::Denied { .. }), "{e:?}");
        assert!(reason(&e).contains("Application SMTP.SendAsApp") && reason(&e).contains("management scope"));
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
        assert!(!token_error(AuthError::Rejected("AADSTS7000215: Invalid client secret".into())).is_transient());
        assert!(!token_error(AuthError::Credential("Secret graph/x missing".into())).is_transient());
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
            recipient_refusal(&Failure::Io { kind: io::ErrorKind::ConnectionReset, detail: String::new() }).is_none()
        );
    }

    #[test]
    fn every_recipient_refused_is_permanent_only_if_all_5xx() {
        let refusal = |r: &str, code, text: &str| RecipientRefusal {
            recipient: r.into(),
            reply: Reply { code, text: text.into() },
        };
        let all_5xx =
            [refusal("a@example.com", 550, "5.1.1 User unknown"), refusal("b@example.com", 553, "5.1.3 Bad address")];
        let e = every_recipient_refused(&all_5xx, SERVER);
        assert!(!e.is_transient());
        assert_eq!(
            reason(&e),
            "smtp.example.com:587 refused every recipient: a@example.com: 550 5.1.1 User unknown; \
             b@example.com: 553 5.1.3 Bad address"
        );
        let mixed =
            [refusal("a@example.com", 550, "5.1.1 User unknown"), refusal("b@example.com", 450, "4.2.1 Mailbox busy")];
        assert!(every_recipient_refused(&mixed, SERVER).is_transient());
    }

    #[test]
    fn reply_display() {
        let r = Reply { code: 250, text: "2.0.0 OK queued as X".into() };
        assert_eq!(r.to_string(), "250 2.0.0 OK queued as X");
        let r = Reply { code: 250, text: String::new() };
        assert_eq!(r.to_string(), "250");
    }
}
