//! The status write queue: one entry per DeviceProcess (later requests for the same object
//! coalesce into its entry), ordered by when the entry is due, bounded, and never handing the
//! same object to two writers at once.

use std::collections::{BTreeSet, HashMap, HashSet};
#[cfg(test)]
use std::sync::Arc;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::metrics::{Metrics, QueueOutcomeLabels};
use crate::model::ObjectKey;
use crate::state::Pending;
use crate::status::projection::{EventSpec, Transition};

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

/// Where the Event of a transition stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventState {
    /// Not decided yet (decided against the status before the write).
    Undecided,
    /// The transition warrants no Event.
    NotDue,
    /// Decided, not published yet.
    Due(EventSpec),
    /// Published.
    Published,
}

/// One transition to deliver to one DeviceProcess: its status write and its Event.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// What happened.
    pub transition: Transition,
    /// The store's record of it, cleared once every DeviceProcess of the transition has it.
    pub pending: Option<Pending>,
    /// Its Event.
    pub event: EventState,
}

impl Delivery {
    /// A transition to deliver, its Event still to be decided.
    pub fn new(transition: Transition, pending: Option<Pending>) -> Self {
        Self {
            transition,
            pending,
            event: EventState::Undecided,
        }
    }
}

/// The work queued for one DeviceProcess.
#[derive(Debug, Clone)]
pub struct Work {
    /// Transitions to deliver, in the order they were decided.
    pub deliveries: Vec<Delivery>,
    /// Why the entry exists.
    pub reason: WriteReason,
    /// Trace of the report (or sweep) that caused the work, so the Kubernetes patch and Events
    /// show up in the same trace.
    pub trace: Option<apollo_telemetry::TraceContext>,
    /// Failed attempts in a row (the object's back-off).
    pub failures: u32,
}

impl Work {
    /// Work for `reason` without transitions.
    pub fn plain(reason: WriteReason) -> Self {
        Self {
            deliveries: Vec::new(),
            reason,
            trace: None,
            failures: 0,
        }
    }

    /// Work delivering one transition.
    pub fn transition(transition: Transition) -> Self {
        Self::deliver(Delivery::new(transition, None))
    }

    /// Work delivering `delivery`.
    pub fn deliver(delivery: Delivery) -> Self {
        Self {
            deliveries: vec![delivery],
            reason: WriteReason::Transition,
            trace: Some(apollo_telemetry::current_context()),
            failures: 0,
        }
    }

    /// Connectivity transitions (AgentConnected/AgentDisconnected) go before everything else,
    /// so a rollout wave of spec writes never delays what an operator is alerted on.
    pub fn priority(&self) -> u8 {
        let connectivity = self.deliveries.iter().any(|d| {
            matches!(
                d.transition,
                Transition::Connected { .. } | Transition::Disconnected
            )
        });
        if connectivity {
            0
        } else {
            1
        }
    }

    fn merge(&mut self, other: Work) {
        self.deliveries.extend(other.deliveries);
        if self.reason != WriteReason::Transition {
            self.reason = other.reason;
        }
        if self.trace.is_none() {
            self.trace = other.trace;
        }
        self.failures = self.failures.max(other.failures);
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
    /// (priority, due, arrival, object): connectivity first, then by due time.
    order: BTreeSet<(u8, Instant, u64, ObjectKey)>,
    in_flight: HashSet<ObjectKey>,
    next_seq: u64,
}

struct Entry {
    priority: u8,
    due: Instant,
    seq: u64,
    work: Work,
}

impl Entry {
    fn order_key(&self, key: &ObjectKey) -> (u8, Instant, u64, ObjectKey) {
        (self.priority, self.due, self.seq, key.clone())
    }
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
            state.order.remove(&entry.order_key(&key));
            entry.work.merge(work);
            entry.due = entry.due.min(due);
            entry.priority = entry.work.priority();
            state.order.insert(entry.order_key(&key));
        } else {
            if state.entries.len() >= self.capacity {
                self.count_dropped();
                return false;
            }
            let seq = state.next_seq;
            state.next_seq += 1;
            let entry = Entry {
                priority: work.priority(),
                due,
                seq,
                work,
            };
            state.order.insert(entry.order_key(&key));
            state.entries.insert(key, entry);
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
        // The first entry of each priority that is not being written decides: a ready one of
        // the higher priority goes first, else a ready one of the lower; otherwise wait for the
        // earlier of their due times.
        let mut earliest_waiting: Option<Instant> = None;
        let mut ready = None;
        let mut seen_priority = None;
        for (priority, due, seq, key) in state.order.iter() {
            if seen_priority == Some(*priority) || state.in_flight.contains(key) {
                continue;
            }
            seen_priority = Some(*priority);
            if *due <= now {
                ready = Some((*priority, *due, *seq, key.clone()));
                break;
            }
            earliest_waiting = Some(earliest_waiting.map_or(*due, |e| e.min(*due)));
        }
        let Some(order_key) = ready else {
            return Next::WaitUntil(earliest_waiting);
        };
        state.order.remove(&order_key);
        let key = order_key.3;
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

/// A token-bucket rate limiter: `rate` operations per second with bursts of `burst`, where urgent
/// callers (connectivity transitions) go before others whenever tokens are scarce: a rollout
/// wave's spec writes waiting for the budget never delay an AgentDisconnected.
pub struct RateLimiter {
    state: Mutex<Bucket>,
    interval: Duration,
    burst: f64,
}

struct Bucket {
    tokens: f64,
    at: Instant,
    urgent_waiting: u32,
}

/// Counts an urgent waiter while it waits (also when its wait is cancelled).
struct UrgentWaiter<'a>(&'a RateLimiter);

impl Drop for UrgentWaiter<'_> {
    fn drop(&mut self) {
        let mut bucket = self.0.lock();
        bucket.urgent_waiting = bucket.urgent_waiting.saturating_sub(1);
    }
}

impl RateLimiter {
    /// `rate` per second (must be positive), bursts of `burst` (at least 1).
    pub fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            state: Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
                urgent_waiting: 0,
            }),
            interval: Duration::from_secs_f64(1.0 / rate),
            burst,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Bucket> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a token at `now`, or says how long to wait before trying again.
    pub fn try_take(&self, now: Instant, urgent: bool) -> Result<(), Duration> {
        let mut bucket = self.lock();
        let refill =
            now.saturating_duration_since(bucket.at).as_secs_f64() / self.interval.as_secs_f64();
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.at = now;
        let yields = !urgent && bucket.urgent_waiting > 0;
        if bucket.tokens >= 1.0 && !yields {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let missing = (1.0 - bucket.tokens).max(0.0);
        let wait = if yields {
            self.interval
        } else {
            self.interval.mul_f64(missing)
        };
        Err(wait.max(Duration::from_millis(1)))
    }

    /// Waits for a token.
    pub async fn acquire(&self) {
        self.acquire_as(false).await;
    }

    /// Waits for a token, before every waiting [`RateLimiter::acquire`].
    pub async fn acquire_urgent(&self) {
        self.acquire_as(true).await;
    }

    async fn acquire_as(&self, urgent: bool) {
        let _waiter = urgent.then(|| {
            self.lock().urgent_waiting += 1;
            UrgentWaiter(self)
        });
        loop {
            match self.try_take(Instant::now(), urgent) {
                Ok(()) => return,
                Err(wait) => tokio::time::sleep(wait).await,
            }
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
                assert_eq!(work.deliveries.len(), 1);
                assert_eq!(work.deliveries[0].transition, Transition::Disconnected);
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

    #[tokio::test]
    async fn connectivity_goes_before_spec_writes_that_were_due_earlier() {
        let q = queue(10);
        let now = Instant::now();
        let earlier = now - Duration::from_secs(10);
        for i in 0..5 {
            q.push(
                key(&format!("rollout-{i}")),
                earlier,
                Work::plain(WriteReason::SpecChanged),
            );
        }
        q.push(
            key("stale"),
            now,
            Work::transition(Transition::Disconnected),
        );
        let Next::Ready(first, _) = q.next(now) else {
            panic!("due")
        };
        assert_eq!(first, key("stale"));
        let Next::Ready(second, _) = q.next(now) else {
            panic!("due")
        };
        assert_eq!(second, key("rollout-0"));
        // A higher-priority entry not yet due does not hold back a due lower one.
        q.push(
            key("later"),
            now + Duration::from_secs(60),
            Work::transition(Transition::Disconnected),
        );
        assert!(matches!(q.next(now), Next::Ready(k, _) if k == key("rollout-1")));
    }

    #[test]
    fn merged_work_keeps_every_delivery_in_order() {
        let mut work = Work::plain(WriteReason::Resync);
        for _ in 0..40 {
            work.merge(Work::transition(Transition::Disconnected));
        }
        assert_eq!(
            work.deliveries.len(),
            40,
            "none dropped: each is a real transition"
        );
        assert_eq!(work.reason, WriteReason::Transition);
        assert_eq!(work.priority(), 0);
    }

    #[test]
    fn rate_limiter_allows_a_burst_then_spaces_tokens() {
        let limiter = RateLimiter::new(10.0, 2);
        let now = Instant::now();
        assert_eq!(limiter.try_take(now, false), Ok(()));
        assert_eq!(limiter.try_take(now, false), Ok(()));
        let wait = limiter.try_take(now, false).expect_err("bucket empty");
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        assert_eq!(
            limiter.try_take(now + Duration::from_millis(100), false),
            Ok(())
        );
        assert!(limiter
            .try_take(now + Duration::from_millis(100), false)
            .is_err());
    }

    #[tokio::test]
    async fn urgent_callers_go_first_when_tokens_are_scarce() {
        let limiter = Arc::new(RateLimiter::new(20.0, 1));
        let now = Instant::now();
        assert_eq!(limiter.try_take(now, false), Ok(()));
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (limiter, order) = (limiter.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                limiter.acquire().await;
                order.lock().expect("lock").push(format!("spec-{i}"));
            }));
        }
        tokio::task::yield_now().await;
        {
            let (limiter, order) = (limiter.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                limiter.acquire_urgent().await;
                order.lock().expect("lock").push("urgent".to_owned());
            }));
        }
        for t in tasks {
            t.await.expect("join");
        }
        let order = order.lock().expect("lock").clone();
        let urgent_at = order
            .iter()
            .position(|o| o == "urgent")
            .expect("urgent ran");
        assert!(
            urgent_at <= 1,
            "the urgent caller waited behind the others: {order:?}"
        );
    }
}
