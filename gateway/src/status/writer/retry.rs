//! The back-off of objects whose writes fail: quick jittered retries of one call, and the longer
//! per-object wait before an object is tried again off the queue.

use std::time::Duration;

use rand::Rng;

use crate::error::Error;

/// Delay before an object whose write gave up is tried again (doubled per failure in a row).
pub(super) const REQUEUE_DELAY: Duration = Duration::from_secs(5);
/// Longest wait of an object whose writes keep failing for transient reasons.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(60);
/// Longest wait of an object whose writes the apiserver refuses (403, 422).
pub(super) const MAX_REFUSED_BACKOFF: Duration = Duration::from_secs(300);

/// How long an object waits after a failed write (see [`StatusWriter::requeue`](super::StatusWriter)); `unit` is a
/// draw in `[0, 1)` for the jitter.
pub(super) fn requeue_delay(error: &Error, failures: u32, unit: f64) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    if error.is_invalid() || error.is_forbidden() {
        return (REQUEUE_DELAY * 2u32.saturating_pow(exponent)).min(MAX_REFUSED_BACKOFF);
    }
    let base = (REQUEUE_DELAY * 2u32.saturating_pow(exponent)).min(MAX_RETRY_BACKOFF);
    let jittered = base.mul_f64(0.5 + unit / 2.0);
    match error.retry_after() {
        Some(after) => jittered.max(after),
        None => jittered,
    }
}

/// Exponential backoff with full jitter: up to 100ms x 2^attempt, capped at 2s.
pub(super) fn backoff(attempt: u32) -> Duration {
    let cap_ms = (100u64 << attempt.min(5)).min(2000);
    Duration::from_millis(rand::rng().random_range(cap_ms / 4..=cap_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_grows() {
        for attempt in 0..20 {
            let d = backoff(attempt);
            assert!(d <= Duration::from_secs(2), "{d:?}");
        }
        assert!(backoff(1) <= Duration::from_millis(200));
    }
}
