//! When to try again, and when to stop.

use std::time::Duration;

use k8s_openapi::jiff::{RoundMode, SignedDuration, Timestamp, TimestampRound, Unit};

/// The first retry waits about this long.
pub const BASE_DELAY: Duration = Duration::from_secs(2);
/// No retry waits longer than this (unless the provider's Retry-After says so).
pub const MAX_DELAY: Duration = Duration::from_secs(300);

/// The retry limits of one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts allowed in all.
    pub max_attempts: u32,
    /// No attempt starts after this instant.
    pub deadline: Timestamp,
    /// The delay before the first retry.
    pub base_delay: Duration,
    /// The longest delay between attempts.
    pub max_delay: Duration,
}

/// What to do after a transient failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again at this instant.
    RetryAt(Timestamp),
    /// Stop: the reason says which limit was reached.
    GiveUp(String),
}

/// The exponential delay before retry number `attempt` (1 = the first retry), before jitter.
pub fn exponential_delay(attempt: u32, base: Duration, max: Duration) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(30));
    base.saturating_mul(factor).min(max)
}

/// Decides the next attempt after `attempts_made` attempts failed transiently.
///
/// `jitter` is a number in [0, 1) that spreads retries ("equal jitter": half the delay is fixed,
/// half random), so that many messages failing together do not retry together. A provider's
/// `Retry-After` is a floor: no attempt starts sooner. Graph asks a client to wait the number of
/// seconds its `Retry-After` names (https://learn.microsoft.com/graph/throttling).
///
/// The instant is rounded up to a whole second: `nextAttemptTime` is written in whole seconds
/// (RFC 3339, the fraction dropped) and the reconciler waits for what it reads back, so an instant
/// with a fraction would be read as the second before it and the retry would come early (a
/// `Retry-After: 2` answered at 10.110 s would be retried at 12 s, 1.89 s later).
pub fn next_attempt(
    policy: &RetryPolicy,
    attempts_made: u32,
    now: Timestamp,
    retry_after: Option<Duration>,
    jitter: f64,
) -> RetryDecision {
    if attempts_made >= policy.max_attempts {
        return RetryDecision::GiveUp(format!("gave up after {attempts_made} attempts (delivery.maxAttempts)"));
    }
    let delay = exponential_delay(attempts_made, policy.base_delay, policy.max_delay);
    let jitter = jitter.clamp(0.0, 1.0);
    let delay = delay / 2 + delay.mul_f64(jitter / 2.0);
    let delay = match retry_after {
        Some(floor) if floor > delay => floor,
        _ => delay,
    };
    let at = ceil_to_second(add(now, delay));
    if at > policy.deadline {
        return RetryDecision::GiveUp(format!(
            "gave up: the next attempt would start after the deadline {} (delivery.deadlineSeconds)",
            policy.deadline
        ));
    }
    RetryDecision::RetryAt(at)
}

/// `t` rounded up to the next whole second, when it has a fraction of one.
pub fn ceil_to_second(t: Timestamp) -> Timestamp {
    // Only the last representable second has no whole second after it; it is past any deadline.
    t.round(TimestampRound::new().smallest(Unit::Second).mode(RoundMode::Ceil)).unwrap_or(t)
}

/// `t + d`, saturating.
pub fn add(t: Timestamp, d: Duration) -> Timestamp {
    let d = SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX);
    t.saturating_add(d).unwrap_or(Timestamp::MAX)
}

/// How long from `now` until `t` (zero when it has passed).
pub fn until(now: Timestamp, t: Timestamp) -> Duration {
    let d = t.duration_since(now);
    Duration::try_from(d).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn policy(max_attempts: u32, deadline: i64) -> RetryPolicy {
        RetryPolicy { max_attempts, deadline: ts(deadline), base_delay: BASE_DELAY, max_delay: MAX_DELAY }
    }

    #[test]
    fn delay_doubles_and_caps() {
        let d = |n| exponential_delay(n, Duration::from_secs(2), Duration::from_secs(300));
        assert_eq!(d(1), Duration::from_secs(2));
        assert_eq!(d(2), Duration::from_secs(4));
        assert_eq!(d(5), Duration::from_secs(32));
        assert_eq!(d(20), Duration::from_secs(300));
        assert_eq!(d(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn jitter_keeps_half_the_delay() {
        let p = policy(8, 100_000);
        assert_eq!(next_attempt(&p, 3, ts(1000), None, 0.0), RetryDecision::RetryAt(ts(1004)));
        // 7.999996 s of backoff: the attempt is at the whole second after it.
        assert_eq!(next_attempt(&p, 3, ts(1000), None, 0.999_999), RetryDecision::RetryAt(ts(1008)));
    }

    fn at_millis(millis: i64) -> Timestamp {
        Timestamp::from_millisecond(millis).unwrap()
    }

    #[test]
    fn retry_after_counts_from_the_answer_in_whole_seconds() {
        let p = RetryPolicy { base_delay: Duration::from_millis(100), ..policy(8, 100_000) };
        // Answered at 10.110 s with Retry-After: 2: 12.110 s is the earliest instant, so 13 s, never 12 s.
        let now = at_millis(10_110);
        let got = next_attempt(&p, 1, now, Some(Duration::from_secs(2)), 0.0);
        assert_eq!(got, RetryDecision::RetryAt(ts(13)));
        let RetryDecision::RetryAt(at) = got else { unreachable!() };
        assert!(until(now, at) >= Duration::from_secs(2));
        // What the status keeps (whole seconds) is the instant itself.
        assert_eq!(at.subsec_nanosecond(), 0);
        // An answer on a whole second needs no rounding.
        assert_eq!(next_attempt(&p, 1, ts(10), Some(Duration::from_secs(2)), 0.0), RetryDecision::RetryAt(ts(12)));
    }

    #[test]
    fn whole_seconds_round_up_only_with_a_fraction() {
        assert_eq!(ceil_to_second(ts(12)), ts(12));
        assert_eq!(ceil_to_second(at_millis(12_001)), ts(13));
        assert_eq!(ceil_to_second(at_millis(12_999)), ts(13));
        assert_eq!(ceil_to_second(at_millis(-1_500)), ts(-1));
        assert_eq!(ceil_to_second(Timestamp::MAX), Timestamp::MAX);
    }

    #[test]
    fn the_rounded_attempt_still_respects_the_deadline() {
        // 1000.5 s + 2 s = 1002.5 s, rounded to 1003 s: past a deadline of 1002 s.
        let p = policy(8, 1002);
        match next_attempt(&p, 1, at_millis(1_000_500), Some(Duration::from_secs(2)), 0.0) {
            RetryDecision::GiveUp(reason) => assert!(reason.contains("deadline"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_after_is_a_floor() {
        let p = policy(8, 100_000);
        let got = next_attempt(&p, 1, ts(1000), Some(Duration::from_secs(30)), 0.5);
        assert_eq!(got, RetryDecision::RetryAt(ts(1030)));
        // A Retry-After shorter than the backoff does not shorten it.
        let got = next_attempt(&p, 6, ts(1000), Some(Duration::from_secs(1)), 0.0);
        assert_eq!(got, RetryDecision::RetryAt(ts(1032)));
    }

    #[test]
    fn gives_up_at_max_attempts() {
        let p = policy(3, 100_000);
        assert!(matches!(next_attempt(&p, 2, ts(0), None, 0.0), RetryDecision::RetryAt(_)));
        match next_attempt(&p, 3, ts(0), None, 0.0) {
            RetryDecision::GiveUp(reason) => assert!(reason.contains("3 attempts"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn gives_up_past_deadline() {
        let p = policy(8, 1010);
        match next_attempt(&p, 1, ts(1000), Some(Duration::from_secs(60)), 0.0) {
            RetryDecision::GiveUp(reason) => assert!(reason.contains("deadline"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn until_is_zero_in_the_past() {
        assert_eq!(until(ts(10), ts(5)), Duration::ZERO);
        assert_eq!(until(ts(10), ts(15)), Duration::from_secs(5));
    }
}
