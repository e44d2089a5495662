//! The agent's retry waits (the shared exponential policy, full jitter, `Retry-After` honoured),
//! `Retry-After` parsing and heartbeat spacing.
//!
//! Full jitter (a uniform draw between zero and the exponential ceiling) spreads the retries of
//! thousands of agents that failed together, so a recovering gateway is not hit by synchronized
//! waves. A small floor keeps an unlucky draw of zero from turning into a hot loop.

use std::time::Duration;

pub use apollo_runtime::backoff::{BackoffPolicy, Jitter};
use rand::Rng;

/// The agent's default retry waits: ceilings 500ms, 1s, 2s, ... up to 30s, full jitter, at least
/// 50ms.
pub const DEFAULT_POLICY: BackoffPolicy = BackoffPolicy::new(
    Duration::from_millis(500),
    Duration::from_secs(30),
    Jitter::Full,
)
.with_floor(Duration::from_millis(50));

/// Longest `Retry-After` honoured; a larger one (or a bogus date far ahead) is cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Wait after `failures` consecutive failures for a `draw` uniform in `[0, 1]`: the policy's
/// wait, and at least the (capped) `Retry-After` when the server sent one.
pub fn retry_delay(
    policy: &BackoffPolicy,
    failures: u32,
    retry_after: Option<Duration>,
    draw: f64,
) -> Duration {
    let jittered = policy.delay(failures, draw);
    match retry_after {
        Some(asked) => jittered.max(asked.min(MAX_RETRY_AFTER)),
        None => jittered,
    }
}

/// Consecutive-failure counter driving a [`BackoffPolicy`].
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    failures: u32,
}

impl Backoff {
    /// A counter with no failures yet.
    pub fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            failures: 0,
        }
    }

    /// Record a failure and return how long to wait before the next attempt.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        self.failures = self.failures.saturating_add(1);
        retry_delay(
            &self.policy,
            self.failures,
            retry_after,
            rand::rng().random(),
        )
    }

    /// Record a success; returns whether the counter was in a failing streak.
    pub fn reset(&mut self) -> bool {
        std::mem::replace(&mut self.failures, 0) > 0
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// Parse a `Retry-After` value: delay-seconds or an HTTP-date (relative to `now`).
/// A date in the past means "now"; anything unparseable is ignored.
pub fn parse_retry_after(value: &str, now: jiff::Timestamp) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = jiff::fmt::rfc2822::DateTimeParser::new()
        .parse_timestamp(value)
        .ok()?;
    let until = at.duration_since(now);
    Some(Duration::try_from(until).unwrap_or(Duration::ZERO))
}

/// Wait until the next heartbeat: between 90% and 100% of the interval. Reporting a little early
/// never risks the stale window, and the spread keeps agents started together from reporting in
/// lockstep forever.
pub fn heartbeat_delay(interval: Duration, rng: &mut impl Rng) -> Duration {
    let micros = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX);
    let earliest = micros - micros / 10;
    Duration::from_micros(rng.random_range(earliest..=micros))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn policy() -> BackoffPolicy {
        BackoffPolicy::new(
            Duration::from_millis(100),
            Duration::from_secs(2),
            Jitter::Full,
        )
        .with_floor(Duration::from_millis(10))
    }

    #[test]
    fn the_default_policy_is_full_jitter_from_half_a_second_to_thirty() {
        assert_eq!(DEFAULT_POLICY.ceiling(1), Duration::from_millis(500));
        assert_eq!(DEFAULT_POLICY.ceiling(20), Duration::from_secs(30));
        assert_eq!(DEFAULT_POLICY.delay(1, 0.0), Duration::from_millis(50));
        let mut rng = StdRng::seed_from_u64(7);
        let draws: Vec<Duration> = (0..500)
            .map(|_| retry_delay(&DEFAULT_POLICY, 3, None, rng.random()))
            .collect();
        assert!(draws.iter().all(|d| *d >= Duration::from_millis(50)));
        assert!(draws.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(draws.iter().any(|d| *d < Duration::from_millis(500)));
        assert!(draws.iter().any(|d| *d > Duration::from_millis(1500)));
    }

    #[test]
    fn retry_after_lengthens_the_wait_but_is_capped() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            let mut delay = |failures, asked| retry_delay(&p, failures, asked, rng.random());
            assert!(delay(1, Some(Duration::from_secs(5))) >= Duration::from_secs(5));
            assert_eq!(delay(1, Some(Duration::from_secs(3600))), MAX_RETRY_AFTER);
            // A Retry-After shorter than the backoff does not shorten it below the floor.
            assert!(delay(3, Some(Duration::ZERO)) >= p.floor);
        }
    }

    #[test]
    fn backoff_counts_failures_and_resets() {
        let mut b = Backoff::new(policy());
        assert!(!b.reset());
        for _ in 0..3 {
            assert!(b.next_delay(None) <= Duration::from_millis(400));
        }
        assert_eq!(b.failures(), 3);
        assert!(b.reset());
        assert_eq!(b.failures(), 0);
        assert!(b.next_delay(None) <= Duration::from_millis(100));
    }

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        let now: jiff::Timestamp = "2026-01-10T10:00:00Z".parse().expect("timestamp");
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sat, 10 Jan 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Sat, 10 Jan 2026 09:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }

    #[test]
    fn heartbeat_delay_is_between_ninety_and_hundred_percent() {
        let mut rng = StdRng::seed_from_u64(3);
        let interval = Duration::from_secs(15);
        for _ in 0..1000 {
            let d = heartbeat_delay(interval, &mut rng);
            assert!(d >= Duration::from_millis(13_500) && d <= interval, "{d:?}");
        }
        assert_eq!(heartbeat_delay(Duration::ZERO, &mut rng), Duration::ZERO);
    }
}
