//! At most N requests in flight per sender mailbox, as Graph allows (4 by default).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One semaphore per sender mailbox, shared by every send through one transport.
#[derive(Debug)]
pub struct MailboxLimiter {
    max: usize,
    mailboxes: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl MailboxLimiter {
    /// A limiter admitting `max` (at least 1) concurrent holders per mailbox.
    pub fn new(max: usize) -> Self {
        MailboxLimiter { max: max.max(1), mailboxes: Mutex::new(HashMap::new()) }
    }

    /// The limit per mailbox.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Waits for a slot of `mailbox` (case-insensitive); the slot is freed when the permit drops.
    pub async fn acquire(&self, mailbox: &str) -> OwnedSemaphorePermit {
        let semaphore = self.semaphore(mailbox);
        // The semaphore is never closed, so acquiring can only wait, not fail.
        match semaphore.acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => unreachable!("mailbox semaphores are never closed"),
        }
    }

    fn semaphore(&self, mailbox: &str) -> Arc<Semaphore> {
        let key = mailbox.to_ascii_lowercase();
        // A panic elsewhere cannot leave the map inconsistent: every change is one call.
        let mut mailboxes = self.mailboxes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(semaphore) = mailboxes.get(&key) {
            return semaphore.clone();
        }
        // Forget idle mailboxes (nobody holds or awaits a permit) so wildcard senders
        // cannot grow the map without bound.
        mailboxes.retain(|_, semaphore| Arc::strong_count(semaphore) > 1);
        let semaphore = Arc::new(Semaphore::new(self.max));
        mailboxes.insert(key, semaphore.clone());
        semaphore
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.mailboxes.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn limits_each_mailbox_separately() {
        let limiter = MailboxLimiter::new(2);
        let a1 = limiter.acquire("a@contoso.com").await;
        let _a2 = limiter.acquire("A@Contoso.com").await;
        let third = tokio::time::timeout(Duration::from_millis(50), limiter.acquire("a@contoso.com")).await;
        assert!(third.is_err(), "a third slot for the same mailbox must wait");
        let _b = limiter.acquire("b@contoso.com").await;
        drop(a1);
        let _a3 = limiter.acquire("a@contoso.com").await;
    }

    #[tokio::test]
    async fn idle_mailboxes_are_forgotten() {
        let limiter = MailboxLimiter::new(4);
        drop(limiter.acquire("a@contoso.com").await);
        let _held = limiter.acquire("b@contoso.com").await;
        drop(limiter.acquire("c@contoso.com").await);
        // a was idle when c came; b is held; c is idle now but only pruned on the next insert.
        assert_eq!(limiter.tracked(), 2);
    }

    #[test]
    fn zero_means_one() {
        assert_eq!(MailboxLimiter::new(0).max(), 1);
    }
}
