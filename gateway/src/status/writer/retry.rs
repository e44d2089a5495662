//! The back-off of objects whose writes fail: quick jittered retries of one call, and the longer
//! per-object wait before an object is tried again off the queue. Both are the runtime's one
//! retry policy ([`apollo_runtime::backoff`], shared with agent and controller).

use std::time::Duration;

use apollo_runtime::backoff::{BackoffPolicy, Jitter};
use rand::Rng;

use crate::error::Error;

/// Delay before an object whose write gave up is tried again (doubled per failure in a row).
pub(super) const REQUEUE_DELAY: Duration = Duration::from_secs(5);
/// Longest wait of an object whose writes keep failing for transient reasons.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(60);
/// Longest wait of an object whose writes the apiserver refuses (403, 422).
pub(super) const MAX_REFUSED_BACKOFF: Duration = Duration::from_secs(300);

/// Objects whose writes fail for transient reasons: equal jitter, so objects that failed together
/// spread out, and each wait is at least half its ceiling.
const TRANSIENT: BackoffPolicy =
    BackoffPolicy::new(REQUEUE_DELAY, MAX_RETRY_BACKOFF, Jitter::Equal);
/// Objects the apiserver refuses: no jitter, the whole ceiling (sending it sooner cannot help).
const REFUSED: BackoffPolicy = BackoffPolicy::new(
    REQUEUE_DELAY,
    MAX_REFUSED_BACKOFF,
    Jitter::AtLeastPercent(100),
);
/// Retries of one call: 200 ms doubling to 2 s, each wait at least a quarter of its ceiling.
const CALL: BackoffPolicy = BackoffPolicy::new(
    Duration::from_millis(200),
    Duration::from_secs(2),
    Jitter::AtLeastPercent(25),
);

/// How long an object waits after a failed write (see
/// [`StatusWriter::requeue`](super::StatusWriter)); `unit` is a draw in `[0, 1)` for the jitter.
/// Throttling (429) waits at least the apiserver's Retry-After.
pub(super) fn requeue_delay(error: &Error, failures: u32, unit: f64) -> Duration {
    if error.is_invalid() || error.is_forbidden() {
        return REFUSED.delay(failures, unit);
    }
    let jittered = TRANSIENT.delay(failures, unit);
    match error.retry_after() {
        Some(after) => jittered.max(after),
        None => jittered,
    }
}

/// The wait before retrying one call after its `attempt`-th failure (1 = the first).
pub(super) fn backoff(attempt: u32) -> Duration {
    CALL.delay(attempt, rand::rng().random_range(0.0..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_backoff_is_bounded_and_grows() {
        for attempt in 1..20 {
            let d = backoff(attempt);
            assert!(d <= Duration::from_secs(2), "{d:?}");
            assert!(d >= CALL.ceiling(attempt) / 4, "{d:?}");
        }
        assert!(backoff(1) <= Duration::from_millis(200));
        assert!(backoff(1) >= Duration::from_millis(50));
        assert_eq!(CALL.ceiling(5), Duration::from_secs(2));
    }

    #[test]
    fn refused_objects_wait_the_whole_doubling_ceiling_up_to_five_minutes() {
        assert_eq!(REFUSED.delay(1, 0.0), Duration::from_secs(5));
        assert_eq!(REFUSED.delay(2, 0.3), Duration::from_secs(10));
        assert_eq!(REFUSED.delay(10, 0.9), MAX_REFUSED_BACKOFF);
    }

    #[test]
    fn transient_failures_wait_between_half_and_the_whole_ceiling() {
        // Not a refusal, no Retry-After: the transient policy alone.
        let error = Error::InvalidConfig(String::new());
        assert_eq!(requeue_delay(&error, 1, 0.0), Duration::from_millis(2500));
        assert_eq!(requeue_delay(&error, 1, 1.0), Duration::from_secs(5));
        assert_eq!(requeue_delay(&error, 2, 0.5), Duration::from_millis(7500));
        assert_eq!(requeue_delay(&error, 30, 1.0), MAX_RETRY_BACKOFF);
    }
}
