//! When a cached token is refreshed, when it stops being handed out, and how failed requests
//! back off: pure functions of the token's lifetime and the cache's configuration.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// A refresh never comes sooner than this after the previous token was issued, so a
/// zero-lifetime token cannot drive a request loop.
const MIN_REFRESH_DELAY: Duration = Duration::from_secs(1);

/// How a [`TokenCache`](super::TokenCache) schedules refreshes and retries.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenCacheConfig {
    /// Refresh at the latest this long before expiry.
    pub refresh_before: Duration,
    /// Or at this fraction of the lifetime, when that is earlier (short-lived tokens).
    pub refresh_fraction: f64,
    /// A token is no longer handed out this close to expiry (at most a tenth of its lifetime),
    /// so a request does not start with a token that expires on the way.
    pub expiry_margin: Duration,
    /// The first retry delay after a failed request; it doubles, with jitter, up to `retry_max`.
    pub retry_min: Duration,
    /// The longest retry delay before jitter (jitter adds up to as much again).
    pub retry_max: Duration,
    /// Request the first token as soon as the cache exists, so the profile's status shows at
    /// once whether the credential works and the first message does not wait.
    pub prefetch: bool,
}

impl Default for TokenCacheConfig {
    fn default() -> Self {
        TokenCacheConfig {
            refresh_before: Duration::from_secs(5 * 60),
            refresh_fraction: 0.8,
            expiry_margin: Duration::from_secs(30),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            prefetch: true,
        }
    }
}

/// How long after issue a token of `lifetime` is refreshed: `refresh_before` ahead of expiry or
/// at `refresh_fraction` of the lifetime, whichever is earlier, but not before half the
/// lifetime (a token shorter-lived than the lead would otherwise be refreshed at once, forever).
pub fn refresh_delay(lifetime: Duration, config: &TokenCacheConfig) -> Duration {
    let by_lead = lifetime.saturating_sub(config.refresh_before);
    let by_fraction = lifetime.mul_f64(config.refresh_fraction.clamp(0.0, 1.0));
    by_lead.min(by_fraction).max(lifetime / 2).max(MIN_REFRESH_DELAY)
}

/// How long after issue a token of `lifetime` is still handed out.
pub fn usable_for(lifetime: Duration, config: &TokenCacheConfig) -> Duration {
    lifetime.saturating_sub(config.expiry_margin.min(lifetime / 10))
}

/// The delays between retries of failing requests: exponential from `retry_min`, capped at
/// `retry_max`, with jitter so that many profiles do not retry in step.
pub fn retry_backoff(config: &TokenCacheConfig) -> ExponentialBackoff {
    ExponentialBuilder::new()
        .with_min_delay(config.retry_min)
        .with_max_delay(config.retry_max.max(config.retry_min))
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60;

    #[test]
    fn hour_tokens_refresh_at_eighty_percent() {
        let config = TokenCacheConfig::default();
        let delay = refresh_delay(Duration::from_secs(3600), &config);
        assert_eq!(delay, Duration::from_secs(48 * MIN));
        // At the latest five minutes before expiry.
        assert!(Duration::from_secs(3600) - delay >= config.refresh_before);
        assert_eq!(refresh_delay(Duration::from_secs(90 * MIN), &config), Duration::from_secs(72 * MIN));
    }

    #[test]
    fn ten_minute_tokens_refresh_five_minutes_before_expiry() {
        let config = TokenCacheConfig::default();
        assert_eq!(refresh_delay(Duration::from_secs(10 * MIN), &config), Duration::from_secs(5 * MIN));
    }

    #[test]
    fn short_tokens_refresh_no_sooner_than_half_their_lifetime() {
        let config = TokenCacheConfig::default();
        assert_eq!(refresh_delay(Duration::from_secs(6 * MIN), &config), Duration::from_secs(3 * MIN));
        assert_eq!(refresh_delay(Duration::from_secs(3), &config), Duration::from_millis(1500));
        assert_eq!(refresh_delay(Duration::ZERO, &config), MIN_REFRESH_DELAY);
        let quick = TokenCacheConfig { refresh_before: Duration::from_secs(1), ..TokenCacheConfig::default() };
        assert_eq!(refresh_delay(Duration::from_secs(3), &quick), Duration::from_secs(2));
    }

    #[test]
    fn tokens_stop_being_handed_out_shortly_before_expiry() {
        let config = TokenCacheConfig::default();
        assert_eq!(usable_for(Duration::from_secs(3600), &config), Duration::from_secs(3570));
        assert_eq!(usable_for(Duration::from_secs(10), &config), Duration::from_secs(9));
        assert_eq!(usable_for(Duration::ZERO, &config), Duration::ZERO);
    }

    #[test]
    fn retries_back_off_exponentially_with_bounded_jitter() {
        let config = TokenCacheConfig::default();
        let delays: Vec<Duration> = retry_backoff(&config).take(10).collect();
        assert_eq!(delays.len(), 10, "never gives up");
        for (n, delay) in delays.iter().enumerate() {
            let base = (config.retry_min * 2u32.pow(n as u32)).min(config.retry_max);
            assert!(*delay >= base && *delay <= base * 2, "{n}: {delay:?}");
        }
    }
}
