//! When reports could be heard: the evidence the stale sweep needs before it may call an agent
//! disconnected (issue 13, defect 2).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// When reports last could not be heard. Staleness is judged only over time in which reports
/// could be heard: after the state store was unreachable, or the watch cache was not synced
/// (reports refused), no device is marked stale until a whole stale window of working reception
/// has passed; its agents were fine, only unheard.
///
/// The store counts as unreachable:
/// - at any failed call (the report path's included);
/// - at a call slower than [`Reception::set_slow_call`] (a paused Redis answers nothing until it
///   resumes, and a call in flight has not failed yet);
/// - at the first answer after a gap longer than that in which the store answered nothing. A
///   prober keeps a call going (`Store::ping`, a few per slow-call period), so such a gap means
///   the store, or this process, was not answering; judging only by calls that fail or are slow
///   leaves a hole: a call issued late in a pause returns quickly when the store resumes, and the
///   pause's last failure can lie most of a window before the resume (seen in CI: Redis paused
///   6 s, a 2 s window, the last failure 2 s before the resume, a running agent marked
///   disconnected 0.2 s after it).
#[derive(Clone, Debug)]
pub struct Reception {
    base: Instant,
    last_outage: Arc<Mutex<Option<Instant>>>,
    /// Microseconds after `base` of the latest answer (0: none yet).
    last_answer_us: Arc<AtomicU64>,
    slow_call_ms: Arc<AtomicU64>,
    /// A store call lost its connection since the last answer: the store may come back empty.
    failing: Arc<AtomicBool>,
    /// Counts answers that came right after lost connections (see [`Reception::recoveries`]).
    recoveries: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for Reception {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            last_outage: Default::default(),
            last_answer_us: Default::default(),
            slow_call_ms: Arc::new(AtomicU64::new(1_000)),
            failing: Default::default(),
            recoveries: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }
}

impl Reception {
    /// A store call slower than `slow`, or a gap as long without any answer, counts as an
    /// outage (default 1 s). The gateway sets half the stale window: an agent heartbeating every
    /// window/m (m >= 2) whose report is held up for less than that is still heard within the
    /// window, so only longer stalls can make a live agent look stale — and load-induced
    /// slowness below it must not stop sweeps.
    pub fn set_slow_call(&self, slow: Duration) {
        let ms = u64::try_from(slow.as_millis()).unwrap_or(u64::MAX);
        self.slow_call_ms.store(ms, Ordering::Relaxed);
    }

    /// How often the prober should call the store so that a quiet store is never mistaken for
    /// an unreachable one: a quarter of the slow-call period, at most a second.
    pub fn probe_interval(&self) -> Duration {
        (self.slow() / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    fn slow(&self) -> Duration {
        Duration::from_millis(self.slow_call_ms.load(Ordering::Relaxed))
    }

    /// Reports cannot be heard right now.
    pub fn outage(&self) {
        self.outage_at(Instant::now());
    }

    fn outage_at(&self, now: Instant) {
        let mut last = self.last_outage.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t < now) {
            *last = Some(now);
        }
    }

    /// A store call failed at `now`: an outage; with `connection_lost` (refused, reset: not a
    /// timeout) perhaps a store that restarts empty.
    pub(super) fn failed_at(&self, now: Instant, connection_lost: bool) {
        self.outage_at(now);
        if connection_lost {
            self.failing.store(true, Ordering::Relaxed);
        }
    }

    /// A store call issued at `issued` was answered at `now`. Slow, or the first answer after a
    /// gap longer than the slow-call period, it marks an outage at `now`; the first answer after
    /// lost connections counts as a recovery.
    pub(super) fn answered_at(&self, issued: Instant, now: Instant) {
        let slow = self.slow();
        let us = u64::try_from(now.saturating_duration_since(self.base).as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let previous = self.last_answer_us.fetch_max(us, Ordering::Relaxed);
        let gap = Duration::from_micros(us.saturating_sub(previous));
        if now.saturating_duration_since(issued) > slow || (previous != 0 && gap > slow) {
            // It answered, but reports sent meanwhile were not heard in time either.
            self.outage_at(now);
        }
        // A load first: the report path calls this on every request, and only the first
        // success after a failure needs the write.
        if self.failing.load(Ordering::Relaxed) && self.failing.swap(false, Ordering::Relaxed) {
            self.recoveries.send_modify(|n| *n += 1);
        }
    }

    /// Changes each time the store answers again after its connections were lost. A store that
    /// dropped or refused connections may have restarted empty and forgotten which devices were
    /// connected: the resync re-tracks them at once (the stopped ones are then marked stale once
    /// reception allows), instead of at its next periodic pass (`--resync-interval`, 5 min by
    /// default; 234 s measured under load in docs/faults.md). Timeouts do not count: a paused or
    /// overloaded store keeps its state, and reading every device then would add load where
    /// there is too much already.
    pub fn recoveries(&self) -> tokio::sync::watch::Receiver<u64> {
        self.recoveries.subscribe()
    }

    /// How long reports have been heard since the last outage; None if there was none.
    pub fn heard_for(&self) -> Option<Duration> {
        self.heard_for_at(Instant::now())
    }

    fn heard_for_at(&self, now: Instant) -> Option<Duration> {
        self.last_outage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| now.saturating_duration_since(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// The shape CI met (window 2 s, so slow 1 s): answers every 250 ms, Redis paused at 1 s,
    /// calls time out 2 s after they were issued (3 s, 5 s), the next one is issued at 5.6 s and
    /// answered 0.4 s later when Redis resumes at 6 s. Reception restarts at the resume, not at
    /// the last failure.
    #[test]
    fn the_first_answer_after_a_silent_gap_ends_the_outage() {
        let r = Reception::default();
        let t0 = r.base;
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        for ms in (0..=1000).step_by(250) {
            r.answered_at(at(ms), at(ms + 1));
        }
        assert_eq!(r.heard_for_at(at(1001)), None);
        r.failed_at(at(3000), false);
        r.failed_at(at(5000), false);
        r.answered_at(at(5600), at(6000));
        assert_eq!(r.heard_for_at(at(6200)), Some(200 * MS));
    }

    #[test]
    fn a_slow_answer_is_an_outage_and_a_steady_store_is_none() {
        let r = Reception::default();
        let at = |ms: u64| r.base + Duration::from_millis(ms);
        for ms in (0..5000).step_by(900) {
            r.answered_at(at(ms), at(ms + 5));
        }
        assert_eq!(
            r.heard_for_at(at(5000)),
            None,
            "answers 900 ms apart are no gap"
        );
        r.answered_at(at(5000), at(6100));
        assert_eq!(r.heard_for_at(at(6100)), Some(Duration::ZERO));
    }

    #[tokio::test]
    async fn the_first_answer_after_lost_connections_is_a_recovery() {
        let r = Reception::default();
        let mut recoveries = r.recoveries();
        let at = |ms: u64| r.base + Duration::from_millis(ms);
        r.answered_at(at(0), at(1));
        r.failed_at(at(50), false);
        r.answered_at(at(60), at(61));
        assert!(!recoveries.has_changed().expect("open"), "timeouts only");
        r.failed_at(at(100), true);
        r.failed_at(at(200), false);
        r.answered_at(at(300), at(301));
        r.answered_at(at(400), at(401));
        assert!(recoveries.has_changed().expect("open"));
        assert_eq!(*recoveries.borrow_and_update(), 1);
        // An outage is never moved back by a late report of an earlier one.
        r.failed_at(at(900), false);
        r.outage_at(at(800));
        assert_eq!(r.heard_for_at(at(1000)), Some(100 * MS));
    }
}
