//! Exponential backoff with full jitter, `Retry-After` parsing and heartbeat spacing.
//!
//! Full jitter (a uniform draw between zero and the exponential ceiling) spreads the retries of
//! thousands of agents that failed together, so a recovering gateway is not hit by synchronized
//! waves. A small floor keeps an unlucky draw of zero from turning into a hot loop.

use std::time::Duration;

use rand::Rng;

/// Shape of the retry waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// Ceiling of the first wait; each further failure doubles it.
    pub base: Duration,
    /// Largest ceiling.
    pub cap: Duration,
    /// Shortest wait ever taken, whatever the draw.
    pub floor: Duration,
    /// Longest `Retry-After` honoured; a larger one (or a bogus date far ahead) is cut to this.
    pub max_retry_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
            floor: Duration::from_millis(50),
            max_retry_after: Duration::from_secs(300),
        }
    }
}

impl BackoffPolicy {
    /// Upper bound of the wait after `failures` consecutive failures (1 = the first failure).
    pub fn ceiling(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.base.saturating_mul(1u32 << doublings).min(self.cap)
    }

    /// Wait after `failures` consecutive failures: uniform in `[0, ceiling]`, at least the floor,
    /// and at least the (capped) `Retry-After` when the server sent one.
    pub fn delay(
        &self,
        failures: u32,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Duration {
        let ceiling = self.ceiling(failures);
        let ceiling_micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
        let drawn = Duration::from_micros(rng.random_range(0..=ceiling_micros));
        let jittered = drawn.max(self.floor.min(ceiling));
        match retry_after {
            Some(asked) => jittered.max(asked.min(self.max_retry_after)),
            None => jittered,
        }
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
        self.policy
            .delay(self.failures, retry_after, &mut rand::rng())
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
        BackoffPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            floor: Duration::from_millis(10),
            max_retry_after: Duration::from_secs(60),
        }
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let p = policy();
        let ms: Vec<u128> = (1..=7).map(|n| p.ceiling(n).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(2));
        assert_eq!(p.ceiling(0), Duration::from_millis(100));
    }

    #[test]
    fn full_jitter_stays_within_floor_and_ceiling_and_spreads() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(7);
        for failures in 1..=10 {
            let ceiling = p.ceiling(failures);
            let draws: Vec<Duration> = (0..500)
                .map(|_| p.delay(failures, None, &mut rng))
                .collect();
            assert!(draws.iter().all(|d| *d >= p.floor && *d <= ceiling));
            // Full jitter covers the whole range: some draws in the lower and upper quarters.
            assert!(draws.iter().any(|d| *d < ceiling / 4), "{failures}");
            assert!(draws.iter().any(|d| *d > ceiling * 3 / 4), "{failures}");
        }
    }

    #[test]
    fn retry_after_lengthens_the_wait_but_is_capped() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            assert!(p.delay(1, Some(Duration::from_secs(5)), &mut rng) >= Duration::from_secs(5));
            assert_eq!(
                p.delay(1, Some(Duration::from_secs(3600)), &mut rng),
                Duration::from_secs(60)
            );
            // A Retry-After shorter than the backoff does not shorten it below the floor.
            assert!(p.delay(3, Some(Duration::ZERO), &mut rng) >= p.floor);
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
