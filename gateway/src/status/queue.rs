//! The status write queue: one entry per DeviceProcess (later requests for the same object
//! coalesce into its entry), ordered by when the entry is due, bounded, and never handing the
//! same object to two writers at once.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::metrics::{Metrics, QueueOutcomeLabels};
use crate::model::ObjectKey;
use crate::status::projection::{EventSpec, Transition};

/// Most Events an entry carries; a device flapping faster than writes drain keeps the latest.
const MAX_EVENTS_PER_ENTRY: usize = 16;

/// Why an entry was queued (the metrics' `reason`, when no transition says more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteReason {
    /// A transition decided by the state store.
    Transition,
    /// The spec changed (new object, new generation).
    SpecChanged,
    /// The resync found the status wrong.
    Resync,
    /// An earlier write failed.
    Retry,
}

impl WriteReason {
    /// Label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            WriteReason::Transition => "transition",
            WriteReason::SpecChanged => "spec_changed",
            WriteReason::Resync => "resync",
            WriteReason::Retry => "retry",
        }
    }
}

/// The work queued for one DeviceProcess.
#[derive(Debug, Clone)]
pub struct Work {
    /// Transitions whose Events are still to be decided (against the status before the write).
    pub transitions: Vec<Transition>,
    /// Events already decided by an earlier attempt.
    pub events: Vec<EventSpec>,
    /// Why the entry exists.
    pub reason: WriteReason,
    /// Trace of the report (or sweep) that caused the work, so the Kubernetes patch and Events
    /// show up in the same trace.
    pub trace: Option<apollo_telemetry::TraceContext>,
}

impl Work {
    /// Work for `reason` without Events.
    pub fn plain(reason: WriteReason) -> Self {
        Self {
            transitions: Vec::new(),
            events: Vec::new(),
            reason,
            trace: None,
        }
    }

    /// Work for one transition.
    pub fn transition(transition: Transition) -> Self {
        Self {
            transitions: vec![transition],
            events: Vec::new(),
            reason: WriteReason::Transition,
            trace: Some(apollo_telemetry::current_context()),
        }
    }

    fn merge(&mut self, other: Work) {
        self.transitions.extend(other.transitions);
        self.events.extend(other.events);
        let excess =
            (self.transitions.len() + self.events.len()).saturating_sub(MAX_EVENTS_PER_ENTRY);
        let from_events = excess.min(self.events.len());
        self.events.drain(..from_events);
        self.transitions
            .drain(..(excess - from_events).min(self.transitions.len()));
        if self.reason != WriteReason::Transition {
            self.reason = other.reason;
        }
        if self.trace.is_none() {
            self.trace = other.trace;
        }
    }
}

/// What the dispatcher should do next.
#[derive(Debug)]
pub enum Next {
    /// Write this object now.
    Ready(ObjectKey, Work),
    /// Nothing due; the earliest entry is due then (None: nothing queued but in-flight objects).
    WaitUntil(Option<Instant>),
    /// Nothing queued at all.
    Empty,
}

/// The queue.
pub struct WriteQueue {
    state: Mutex<QueueState>,
    notify: Notify,
    capacity: usize,
    metrics: Metrics,
}

#[derive(Default)]
struct QueueState {
    entries: HashMap<ObjectKey, Entry>,
    order: BTreeSet<(Instant, u64, ObjectKey)>,
    in_flight: HashSet<ObjectKey>,
    next_seq: u64,
}

struct Entry {
    due: Instant,
    seq: u64,
    work: Work,
}

impl WriteQueue {
    /// An empty queue holding at most `capacity` objects.
    pub fn new(capacity: usize, metrics: Metrics) -> Self {
        Self {
            state: Mutex::new(QueueState::default()),
            notify: Notify::new(),
            capacity,
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `work` for `key`, due at `due`; coalesces with an entry already queued (which then
    /// becomes due at the earlier of both times). Returns false when the queue is full (the
    /// resync repairs the status later; decided Events of a dropped entry are lost).
    pub fn push(&self, key: ObjectKey, due: Instant, work: Work) -> bool {
        let mut state = self.lock();
        let state = &mut *state;
        if let Some(entry) = state.entries.get_mut(&key) {
            entry.work.merge(work);
            if due < entry.due {
                state.order.remove(&(entry.due, entry.seq, key.clone()));
                entry.due = due;
                state.order.insert((due, entry.seq, key));
            }
        } else {
            if state.entries.len() >= self.capacity {
                self.count_dropped();
                return false;
            }
            let seq = state.next_seq;
            state.next_seq += 1;
            state.order.insert((due, seq, key.clone()));
            state.entries.insert(key, Entry { due, seq, work });
        }
        self.metrics.queue_depth.set(state.entries.len() as i64);
        self.notify.notify_one();
        true
    }

    fn count_dropped(&self) {
        self.metrics
            .queue_outcomes
            .get_or_create(&QueueOutcomeLabels {
                outcome: "dropped_full",
            })
            .inc();
    }

    /// Takes the earliest entry due at or before `now` whose object is not being written.
    pub fn next(&self, now: Instant) -> Next {
        let mut state = self.lock();
        let state = &mut *state;
        if state.entries.is_empty() {
            return Next::Empty;
        }
        let mut earliest_waiting = None;
        let mut ready = None;
        for (due, seq, key) in state.order.iter() {
            if state.in_flight.contains(key) {
                continue;
            }
            if *due <= now {
                ready = Some((*due, *seq, key.clone()));
            } else {
                earliest_waiting = Some(*due);
            }
            break;
        }
        let Some((due, seq, key)) = ready else {
            return Next::WaitUntil(earliest_waiting);
        };
        state.order.remove(&(due, seq, key.clone()));
        let Some(entry) = state.entries.remove(&key) else {
            return Next::WaitUntil(earliest_waiting);
        };
        state.in_flight.insert(key.clone());
        self.metrics.queue_depth.set(state.entries.len() as i64);
        Next::Ready(key, entry.work)
    }

    /// Marks the write of `key` finished, so its next entry (if any) can go.
    pub fn done(&self, key: &ObjectKey) {
        self.lock().in_flight.remove(key);
        self.notify.notify_one();
    }

    /// Resolves when something was pushed or finished since the last call.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }

    /// Objects queued (not counting those being written).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A GCRA rate limiter: `rate` operations per second with bursts of `burst`.
pub struct RateLimiter {
    theoretical_arrival: Mutex<Instant>,
    interval: Duration,
    tolerance: Duration,
}

impl RateLimiter {
    /// `rate` per second (must be positive), bursts of `burst` (at least 1).
    pub fn new(rate: f64, burst: u32) -> Self {
        let interval = Duration::from_secs_f64(1.0 / rate);
        Self {
            theoretical_arrival: Mutex::new(Instant::now()),
            interval,
            tolerance: interval * burst.saturating_sub(1),
        }
    }

    /// Reserves the next slot and returns how long to wait for it.
    pub fn reserve(&self, now: Instant) -> Duration {
        let mut tat = self
            .theoretical_arrival
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let start = (*tat).max(now);
        let allowed_at = start.checked_sub(self.tolerance).unwrap_or(now);
        *tat = start + self.interval;
        allowed_at.saturating_duration_since(now)
    }

    /// Waits for the next slot.
    pub async fn acquire(&self) {
        let wait = self.reserve(Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> ObjectKey {
        ObjectKey::new("ns", n)
    }

    fn queue(capacity: usize) -> WriteQueue {
        WriteQueue::new(capacity, Metrics::unregistered())
    }

    #[tokio::test]
    async fn entries_coalesce_per_object_and_take_the_earlier_due_time() {
        let q = queue(10);
        let now = Instant::now();
        let later = now + Duration::from_secs(5);
        assert!(q.push(key("a"), later, Work::plain(WriteReason::SpecChanged)));
        assert!(q.push(key("a"), now, Work::transition(Transition::Disconnected)));
        assert_eq!(q.len(), 1);
        match q.next(now) {
            Next::Ready(k, work) => {
                assert_eq!(k, key("a"));
                assert_eq!(work.transitions, vec![Transition::Disconnected]);
                assert_eq!(work.reason, WriteReason::Transition);
            }
            other => panic!("expected ready, got {other:?}"),
        }
        assert!(matches!(q.next(now), Next::Empty));
    }

    #[tokio::test]
    async fn debounced_entries_wait_and_in_flight_objects_are_not_handed_out_twice() {
        let q = queue(10);
        let now = Instant::now();
        let later = now + Duration::from_secs(2);
        q.push(key("a"), later, Work::plain(WriteReason::SpecChanged));
        assert!(matches!(q.next(now), Next::WaitUntil(Some(t)) if t == later));
        let Next::Ready(k, _) = q.next(later) else {
            panic!("due")
        };
        q.push(k.clone(), now, Work::transition(Transition::Disconnected));
        assert!(
            matches!(q.next(later), Next::WaitUntil(None)),
            "a is in flight"
        );
        q.done(&k);
        assert!(matches!(q.next(later), Next::Ready(..)));
    }

    #[tokio::test]
    async fn full_queue_refuses_new_objects_but_still_coalesces() {
        let q = queue(1);
        let now = Instant::now();
        assert!(q.push(key("a"), now, Work::plain(WriteReason::Resync)));
        assert!(!q.push(key("b"), now, Work::plain(WriteReason::Resync)));
        assert!(q.push(key("a"), now, Work::transition(Transition::Disconnected)));
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn events_per_entry_are_capped_keeping_the_latest() {
        let mut work = Work::plain(WriteReason::Resync);
        for _ in 0..40 {
            work.merge(Work::transition(Transition::Disconnected));
        }
        assert_eq!(work.transitions.len(), MAX_EVENTS_PER_ENTRY);
        assert_eq!(work.reason, WriteReason::Transition);
    }

    #[test]
    fn rate_limiter_allows_a_burst_then_spaces_slots() {
        let limiter = RateLimiter::new(10.0, 2);
        let now = Instant::now();
        assert_eq!(limiter.reserve(now), Duration::ZERO);
        assert_eq!(limiter.reserve(now), Duration::ZERO);
        let third = limiter.reserve(now);
        assert!(
            third > Duration::from_millis(90) && third <= Duration::from_millis(100),
            "{third:?}"
        );
        let fourth = limiter.reserve(now);
        assert!(
            fourth > Duration::from_millis(190) && fourth <= Duration::from_millis(200),
            "{fourth:?}"
        );
    }
}
