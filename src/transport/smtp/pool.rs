//! Sessions kept open between messages.
//!
//! A session whose transaction ended with the server taking the message is kept, and the next
//! message for the same login goes over it: MAIL, RCPT and DATA only, without the connect, the
//! greeting, EHLO, STARTTLS and AUTH again (RFC 5321 §3.3: after the end of the data the
//! server is ready for a new MAIL). A session is used again only while it is young and was idle
//! briefly ([`reusable`]); idle ones are closed with QUIT once they are not.
//!
//! A session is opened only when none of its login is idle, so the sessions of one login never
//! outnumber that login's messages in flight at once, which the profile's `maxConcurrent` bounds
//! per mailbox. Exchange Online allows three concurrent connections per mailbox for SMTP AUTH
//! ([Message storage and concurrent connection throttling for SMTP Authenticated
//! Submission](https://learn.microsoft.com/exchange/troubleshoot/send-emails/smtp-submission-improvements)),
//! which keeping sessions open therefore never exceeds when `maxConcurrent` does not.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use lettre::transport::smtp::client::AsyncSmtpConnection;
use tokio::time::Instant;

/// How long a session may have been idle and still carry the next message, by default: well under
/// the idle timeouts servers apply (RFC 5321 §4.5.3.2.7 asks servers to wait 5 minutes for a
/// command).
pub const IDLE_FOR: Duration = Duration::from_secs(10);
/// How long after it was opened a session stops taking messages. An XOAUTH2 login is checked
/// once, at AUTH, so sessions are opened again, and a token presented again, this often: sooner
/// than the token presented may expire, since the token cache hands out tokens five minutes or
/// more before their expiry (`auth::schedule`, `refresh_before`).
pub const MAX_AGE: Duration = Duration::from_secs(240);
/// Messages one session carries at most.
pub const MAX_TRANSACTIONS: u32 = 100;
/// Idle sessions one transport keeps at most.
pub const MAX_IDLE: usize = 32;

/// Whom a session is logged in as; a message goes only over a session of its own login.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Login {
    /// No AUTH (a relay), or the transport's one password login.
    Transport,
    /// XOAUTH2 as this mailbox (lowercase): each sender logs in as itself.
    Mailbox(String),
}

/// A session and what decides whether it may carry another message.
pub struct Session {
    pub conn: Box<AsyncSmtpConnection>,
    pub login: Login,
    opened: Instant,
    transactions: u32,
}

impl Session {
    /// A session just opened and logged in.
    pub fn opened(conn: AsyncSmtpConnection, login: Login) -> Session {
        Session { conn: Box::new(conn), login, opened: Instant::now(), transactions: 0 }
    }
}

/// Whether a session opened at `opened`, idle since `idle_since`, that carried `transactions`
/// messages may carry one more at `now`, when sessions may be idle for `idle_for`.
pub fn reusable(opened: Instant, idle_since: Instant, transactions: u32, now: Instant, idle_for: Duration) -> bool {
    now.saturating_duration_since(idle_since) < idle_for
        && now.saturating_duration_since(opened) < MAX_AGE
        && transactions < MAX_TRANSACTIONS
}

struct Idle {
    session: Session,
    since: Instant,
}

#[derive(Default)]
struct Inner {
    idle: Vec<Idle>,
    /// Whether a task is closing idle sessions as they expire.
    reaping: bool,
}

/// The idle sessions of one transport.
pub struct Pool {
    inner: Mutex<Inner>,
    idle_for: Duration,
}

impl Pool {
    /// A pool whose sessions may be idle for `idle_for`; zero keeps none.
    pub fn new(idle_for: Duration) -> Pool {
        Pool { inner: Mutex::default(), idle_for }
    }

    fn reusable(&self, session: &Session, idle_since: Instant, now: Instant) -> bool {
        reusable(session.opened, idle_since, session.transactions, now, self.idle_for)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle session of `login` that may still carry a message, the most recently used first.
    /// Idle sessions that may not are closed here and now (without QUIT), before the caller opens
    /// a new one: the sessions of a login never outnumber its messages in flight.
    pub fn take(&self, login: &Login) -> Option<Session> {
        let now = Instant::now();
        let (taken, expired) = {
            let mut inner = self.lock();
            let (keep, expired): (Vec<Idle>, Vec<Idle>) =
                std::mem::take(&mut inner.idle).into_iter().partition(|i| self.reusable(&i.session, i.since, now));
            inner.idle = keep;
            let i = inner.idle.iter().rposition(|i| i.session.login == *login);
            (i.map(|i| inner.idle.swap_remove(i).session), expired)
        };
        // Closed outside the lock.
        drop(expired);
        taken
    }

    /// Keeps a session whose transaction succeeded for the next message; gives it back when it
    /// may not carry another or the pool is full (the caller ends it).
    pub fn put(self: &Arc<Self>, mut session: Session) -> Result<(), Session> {
        session.transactions += 1;
        let now = Instant::now();
        let start_reaper = {
            let mut inner = self.lock();
            if inner.idle.len() >= MAX_IDLE || !self.reusable(&session, now, now) {
                return Err(session);
            }
            inner.idle.push(Idle { session, since: now });
            !std::mem::replace(&mut inner.reaping, true)
        };
        if start_reaper {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(reap(Arc::downgrade(self), self.idle_for))),
                // Without a runtime nothing would close it: keep none.
                Err(_) => {
                    let mut inner = self.lock();
                    inner.reaping = false;
                    return Err(inner.idle.pop().expect("the session just kept").session);
                }
            }
        }
        Ok(())
    }

    /// Takes out the idle sessions that may no longer carry a message; with none left idle, the
    /// reaper stops (`true`).
    fn expire(&self, now: Instant) -> (Vec<Session>, bool) {
        let mut inner = self.lock();
        let (keep, expired): (Vec<Idle>, Vec<Idle>) =
            std::mem::take(&mut inner.idle).into_iter().partition(|i| self.reusable(&i.session, i.since, now));
        inner.idle = keep;
        let done = inner.idle.is_empty();
        if done {
            inner.reaping = false;
        }
        (expired.into_iter().map(|i| i.session).collect(), done)
    }
}

/// Closes idle sessions as they expire, while the transport exists and any are idle.
async fn reap(pool: Weak<Pool>, idle_for: Duration) {
    loop {
        tokio::time::sleep(idle_for / 2).await;
        let Some(alive) = pool.upgrade() else { return };
        let (expired, done) = alive.expire(Instant::now());
        drop(alive);
        for mut session in expired {
            super::close(&mut session.conn, true, QUIT_WAIT).await;
        }
        if done {
            return;
        }
    }
}

/// How long an expired session's QUIT may take.
const QUIT_WAIT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_reused_while_young_briefly_idle_and_not_worn() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let reusable = |opened, since, transactions, now| reusable(opened, since, transactions, now, IDLE_FOR);
        assert!(reusable(t0, t0, 1, t0));
        assert!(reusable(t0, t0, 1, t0 + s(9)));
        assert!(!reusable(t0, t0, 1, t0 + IDLE_FOR), "idle too long");
        // Busy all along (idle a moment before each message), but opened too long ago.
        assert!(reusable(t0, t0 + s(239), 50, t0 + s(239)));
        assert!(!reusable(t0, t0 + MAX_AGE, 50, t0 + MAX_AGE), "too old");
        assert!(reusable(t0, t0, MAX_TRANSACTIONS - 1, t0));
        assert!(!reusable(t0, t0, MAX_TRANSACTIONS, t0), "carried its share");
        // A stamp taken a moment after `now` (on another thread) counts as no time.
        assert!(reusable(t0 + s(1), t0 + s(1), 1, t0));
        // Zero keeps none.
        assert!(!super::reusable(t0, t0, 0, t0, Duration::ZERO));
    }

    #[test]
    fn logins_are_kept_apart() {
        assert_ne!(Login::Mailbox("a@contoso.com".into()), Login::Mailbox("b@contoso.com".into()));
        assert_ne!(Login::Transport, Login::Mailbox("a@contoso.com".into()));
    }
}
