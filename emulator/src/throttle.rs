//! Graph's per-mailbox concurrency limit: at most N requests in flight, the next one gets 429.

use crate::state::AppState;

/// Counts one request in flight for a mailbox until dropped.
pub struct InFlightGuard {
    state: AppState,
    mailbox: String,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut inner = self.state.lock();
        if let Some(count) = inner.in_flight.get_mut(&self.mailbox) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                inner.in_flight.remove(&self.mailbox);
            }
        }
    }
}

/// Whether one more request may start when `current` are in flight.
pub fn admits(current: usize, limit: usize) -> bool {
    current < limit
}

/// Admits a request for `mailbox`, or returns `None` when the mailbox is at its limit.
pub fn enter(state: &AppState, mailbox: &str) -> Option<InFlightGuard> {
    let mailbox = mailbox.to_ascii_lowercase();
    let limit = state.settings.mailbox_concurrency;
    let mut inner = state.lock();
    let current = inner.in_flight.get(&mailbox).copied().unwrap_or(0);
    if !admits(current, limit) {
        inner.stats.concurrency_throttled += 1;
        return None;
    }
    inner.in_flight.insert(mailbox.clone(), current + 1);
    let max = inner.stats.max_in_flight_per_mailbox.entry(mailbox.clone()).or_insert(0);
    *max = (*max).max(current + 1);
    drop(inner);
    Some(InFlightGuard { state: state.clone(), mailbox })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fifth_concurrent_request_is_refused() {
        assert!(admits(3, 4));
        assert!(!admits(4, 4));
    }
}
