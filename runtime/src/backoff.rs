//! One retry policy for every component: exponential, jittered, bounded.
//!
//! The ceiling doubles with every consecutive failure from `base` up to `cap`; the wait is a draw
//! below it. Jitter matters because failures come together: an API server or gateway outage fails
//! every agent, deployment or status write at once, and without jitter they would all retry in
//! the same instant, again and again.
//!
//! Pure and dependency-free (the agent links it): the caller passes the random draw, so tests
//! pass fixed ones.

use std::time::Duration;

/// How far below the ceiling a wait may fall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Uniform over `[0, ceiling]` ("full jitter"): spreads a fleet that failed together the
    /// most; pair it with a floor so an unlucky draw of zero is not a hot loop.
    Full,
    /// Uniform over `[ceiling / 2, ceiling]` ("equal jitter"): spread, yet every wait is still
    /// longer than half the one before the last failure.
    Equal,
    /// Uniform over `[ceiling × percent / 100, ceiling]`.
    AtLeastPercent(u8),
}

impl Jitter {
    /// The share of the ceiling always waited.
    fn fixed_share(self) -> f64 {
        match self {
            Jitter::Full => 0.0,
            Jitter::Equal => 0.5,
            Jitter::AtLeastPercent(percent) => f64::from(percent.min(100)) / 100.0,
        }
    }
}

/// Shape of the waits between retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// Ceiling of the wait after the first failure; each further failure doubles it.
    pub base: Duration,
    /// Largest ceiling.
    pub cap: Duration,
    /// How far below the ceiling a wait may fall.
    pub jitter: Jitter,
    /// Shortest wait whatever the draw (never above the ceiling).
    pub floor: Duration,
}

impl BackoffPolicy {
    /// Doubling from `base` up to `cap`, with `jitter` and no floor.
    pub const fn new(base: Duration, cap: Duration, jitter: Jitter) -> Self {
        Self {
            base,
            cap,
            jitter,
            floor: Duration::ZERO,
        }
    }

    /// The same policy with a floor.
    pub const fn with_floor(mut self, floor: Duration) -> Self {
        self.floor = floor;
        self
    }

    /// Upper bound of the wait after `failures` consecutive failures (1 = the first; 0 is
    /// treated as 1): `base × 2^(failures-1)`, at most `cap`.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.base.saturating_mul(1u32 << doublings).min(self.cap)
    }

    /// The wait after `failures` consecutive failures, for a `draw` uniform in `[0, 1]` (values
    /// outside are clamped): the jitter's share of the ceiling plus the draw's part of the rest,
    /// at least the floor.
    pub fn delay(&self, failures: u32, draw: f64) -> Duration {
        let ceiling = self.ceiling(failures);
        let draw = if draw.is_nan() {
            0.0
        } else {
            draw.clamp(0.0, 1.0)
        };
        let share = self.jitter.fixed_share();
        let drawn = ceiling.mul_f64(share + (1.0 - share) * draw).min(ceiling);
        drawn.max(self.floor.min(ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws() -> impl Iterator<Item = f64> {
        (0..=1000).map(|i| f64::from(i) / 1000.0)
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let p = BackoffPolicy::new(
            Duration::from_millis(100),
            Duration::from_secs(2),
            Jitter::Full,
        );
        let ms: Vec<u128> = (1..=7).map(|n| p.ceiling(n).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(2));
        assert_eq!(p.ceiling(0), Duration::from_millis(100));
        // The controller's defaults.
        let p = BackoffPolicy::new(
            Duration::from_millis(500),
            Duration::from_secs(60),
            Jitter::Equal,
        );
        assert_eq!(p.ceiling(1), Duration::from_millis(500));
        assert_eq!(p.ceiling(2), Duration::from_secs(1));
        assert_eq!(p.ceiling(4), Duration::from_secs(4));
        assert_eq!(p.ceiling(30), Duration::from_secs(60));
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn full_jitter_spans_floor_to_ceiling() {
        let p = BackoffPolicy::new(
            Duration::from_millis(100),
            Duration::from_secs(2),
            Jitter::Full,
        )
        .with_floor(Duration::from_millis(10));
        for failures in 1..=10 {
            let ceiling = p.ceiling(failures);
            assert_eq!(p.delay(failures, 0.0), Duration::from_millis(10));
            assert_eq!(p.delay(failures, 1.0), ceiling);
            assert!(draws().all(|d| {
                let wait = p.delay(failures, d);
                wait >= p.floor && wait <= ceiling
            }));
            assert!(p.delay(failures, 0.2) < ceiling / 4, "{failures}");
            assert!(p.delay(failures, 0.8) > ceiling * 3 / 4, "{failures}");
        }
    }

    #[test]
    fn equal_jitter_spreads_over_the_upper_half() {
        let p = BackoffPolicy::new(
            Duration::from_millis(500),
            Duration::from_secs(300),
            Jitter::Equal,
        );
        let ceiling = p.ceiling(4);
        assert_eq!(ceiling, Duration::from_secs(4));
        assert_eq!(p.delay(4, 0.0), ceiling / 2);
        assert_eq!(p.delay(4, 1.0), ceiling);
        assert!(draws().all(|d| {
            let wait = p.delay(4, d);
            wait >= ceiling / 2 && wait <= ceiling
        }));
        let zero = BackoffPolicy::new(Duration::ZERO, Duration::ZERO, Jitter::Equal);
        assert_eq!(zero.delay(1, 0.7), Duration::ZERO);
    }

    #[test]
    fn a_percent_floor_and_out_of_range_draws() {
        let p = BackoffPolicy::new(
            Duration::from_millis(100),
            Duration::from_secs(2),
            Jitter::AtLeastPercent(25),
        );
        assert_eq!(p.delay(3, 0.0), Duration::from_millis(100));
        assert_eq!(p.delay(3, 1.0), Duration::from_millis(400));
        assert_eq!(p.delay(3, 7.0), Duration::from_millis(400));
        assert_eq!(p.delay(3, -1.0), Duration::from_millis(100));
        assert_eq!(p.delay(3, f64::NAN), Duration::from_millis(100));
        let all = BackoffPolicy::new(
            Duration::from_secs(1),
            Duration::from_secs(1),
            Jitter::AtLeastPercent(250),
        );
        assert_eq!(all.delay(1, 0.0), Duration::from_secs(1));
    }
}
