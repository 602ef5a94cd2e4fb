//! Per profile and sender mailbox: a token bucket (messages per minute) and a concurrency limit.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The limits of one mailbox.
struct MailboxLimit {
    per_minute: u32,
    concurrent: u32,
    bucket: Arc<DefaultDirectRateLimiter>,
    slots: Arc<Semaphore>,
}

/// Limits for every (profile, mailbox) pair, created on first use.
#[derive(Default)]
pub struct SendLimits {
    mailboxes: Mutex<HashMap<(String, String), Arc<MailboxLimit>>>,
}

/// Held while a send is in flight; dropping it frees the slot.
pub struct SendPermit {
    _slot: OwnedSemaphorePermit,
}

impl SendLimits {
    /// Waits until the mailbox may send one more message now, then holds a concurrency slot.
    /// Changing a profile's limits takes effect for the next message.
    pub async fn acquire(&self, profile: &str, mailbox: &str, per_minute: u32, concurrent: u32) -> SendPermit {
        let limit = self.limit(profile, mailbox, per_minute, concurrent);
        let slot = Arc::clone(&limit.slots).acquire_owned().await.expect("semaphore is never closed");
        limit.bucket.until_ready().await;
        SendPermit { _slot: slot }
    }

    /// Forgets a profile's mailboxes (the profile was deleted).
    pub fn forget_profile(&self, profile: &str) {
        if let Ok(mut map) = self.mailboxes.lock() {
            map.retain(|(p, _), _| p != profile);
        }
    }

    fn limit(&self, profile: &str, mailbox: &str, per_minute: u32, concurrent: u32) -> Arc<MailboxLimit> {
        let mut map = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
        let key = (profile.to_string(), mailbox.to_ascii_lowercase());
        if let Some(existing) = map.get(&key)
            && existing.per_minute == per_minute
            && existing.concurrent == concurrent
        {
            return Arc::clone(existing);
        }
        let limit = Arc::new(MailboxLimit {
            per_minute,
            concurrent,
            bucket: Arc::new(RateLimiter::direct(quota(per_minute))),
            slots: Arc::new(Semaphore::new(concurrent.max(1) as usize)),
        });
        map.insert(key, Arc::clone(&limit));
        limit
    }
}

/// `per_minute` messages a minute, with a burst of at most that many (and at least one).
pub fn quota(per_minute: u32) -> Quota {
    let n = NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::per_minute(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn concurrency_is_bounded_per_mailbox() {
        let limits = Arc::new(SendLimits::default());
        let in_flight = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let peak = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..12 {
            let (limits, in_flight, peak) = (limits.clone(), in_flight.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = limits.acquire("ns/p", "a@contoso.com", 100_000, 3).await;
                let now = in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                peak.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(peak.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn bucket_allows_burst_then_waits() {
        let limits = SendLimits::default();
        let start = Instant::now();
        // 120 a minute = one every 500 ms after a burst of 120: the burst passes at once.
        for _ in 0..5 {
            drop(limits.acquire("ns/p", "a@contoso.com", 120, 4).await);
        }
        assert!(start.elapsed() < Duration::from_millis(400));
        // A different mailbox has its own bucket; 1 a minute lets exactly one through at once.
        drop(limits.acquire("ns/p", "b@contoso.com", 1, 4).await);
        let second =
            tokio::time::timeout(Duration::from_millis(200), limits.acquire("ns/p", "b@contoso.com", 1, 4)).await;
        assert!(second.is_err(), "second message within the minute must wait");
    }
}
