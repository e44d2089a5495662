//! The status writer: takes DeviceProcesses off the [`WriteQueue`], recomputes their projection
//! from the cache and the shared state at that moment (so a transition undone before its turn
//! costs nothing), patches `/status` with optimistic locking, and publishes the Events of the
//! transitions that caused the write. Runs off the request path, rate limited, every call bounded
//! by a timeout.
//!
//! Split by concern: `calls` holds one object's Kubernetes calls (the status patch with its 409
//! retries, Event creation, each bounded by the call timeout and the write budget), `event`
//! builds the Events, `retry` is the back-off of objects whose writes fail.

mod calls;
mod event;
mod retry;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use kube::Client;
use rand::Rng;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::Cache;
use crate::cluster::ownership::Ownership;
use crate::error::Error;
use crate::metrics::{Metrics, QueueOutcomeLabels, TransitionLabels};
use crate::model::ObjectKey;
use crate::state::{Pending, PendingKind, ReportOutcome, StateStore, Store};
use crate::status::projection::{event_for, transitions_of};
use crate::status::queue::{
    Delivery, EventState, Next, RateLimiter, Work, WriteQueue, WriteReason,
};

pub use event::{build_event, REPORTING_CONTROLLER};
use retry::requeue_delay;
#[cfg(doc)]
use retry::{MAX_REFUSED_BACKOFF, REQUEUE_DELAY};

/// Field manager of every status patch.
pub const FIELD_MANAGER: &str = "apollo-gateway";
/// How long pending writes may still be flushed after shutdown was requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Settings of the writer.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Delay of spec-change writes (see `--status-debounce`).
    pub debounce: Duration,
    /// Timeout of each Kubernetes call.
    pub call_timeout: Duration,
    /// Writes in flight at once.
    pub concurrency: usize,
    /// Kubernetes writes per second.
    pub writes_per_second: f64,
    /// Objects the queue holds.
    pub queue_capacity: usize,
    /// `reportingInstance` of Events.
    pub instance: String,
}

/// The status writer of one replica.
pub struct StatusWriter {
    cache: Arc<Cache>,
    store: Store,
    client: Client,
    queue: WriteQueue,
    limiter: RateLimiter,
    ownership: Ownership,
    config: WriterConfig,
    metrics: Metrics,
    /// Transitions this replica is delivering: the objects each still has to reach. A pending
    /// transition tracked here is not replayed; once its last object has it (status and Event),
    /// it is cleared from the store.
    delivering: std::sync::Mutex<HashMap<(u16, String), Tracked>>,
    /// Transitions this replica delivered, with when: not replayed while their record is being
    /// cleared from the store, nor by a replay pass that read the record before the clear.
    delivered_recently: std::sync::Mutex<HashMap<(u16, String), Instant>>,
}

/// How long a delivered transition is remembered (several replay passes; far more than a clear).
const REMEMBER_DELIVERED: Duration = Duration::from_secs(60);

struct Tracked {
    pending: Pending,
    /// Objects that have not got it yet.
    remaining: std::collections::HashSet<ObjectKey>,
    /// Deliveries not yet queued (the queue was full).
    unqueued: Vec<(ObjectKey, crate::status::projection::Transition)>,
}

enum WriteResult {
    Written,
    Unchanged,
    Gone,
    Failed(Error),
}

impl StatusWriter {
    /// A writer with an empty queue.
    pub fn new(
        cache: Arc<Cache>,
        store: Store,
        client: Client,
        ownership: Ownership,
        config: WriterConfig,
        metrics: Metrics,
    ) -> Self {
        let burst = config.writes_per_second.ceil().clamp(1.0, 1000.0) as u32;
        Self {
            queue: WriteQueue::new(config.queue_capacity, metrics.clone()),
            limiter: RateLimiter::new(config.writes_per_second, burst),
            cache,
            store,
            client,
            ownership,
            config,
            metrics,
            delivering: std::sync::Mutex::new(HashMap::new()),
            delivered_recently: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The queue (for tests and metrics).
    pub fn queue(&self) -> &WriteQueue {
        &self.queue
    }

    fn count_transition(&self, kind: &'static str) {
        self.metrics
            .transitions
            .get_or_create(&TransitionLabels { kind })
            .inc();
    }

    /// Queues the deliveries of the transitions a report decided. The replica that recorded the
    /// report delivers its transitions whether or not it owns the device's shard: it knows
    /// first. The store keeps them pending until delivered, so the shard's owner replays them if
    /// this replica cannot ([`StatusWriter::replay`]).
    pub fn on_report(&self, outcome: &ReportOutcome) {
        self.deliver(&outcome.pending, true);
    }

    /// Queues the deliveries of the devices the sweep found stale.
    pub fn on_stale(&self, flips: &[Pending]) {
        self.deliver(flips, true);
    }

    /// Queues the deliveries of pending transitions nobody delivered (the replica that decided
    /// them died, gave up, was shut down, or found its queue full). Transitions this replica is
    /// delivering already are skipped. Returns how many it took on.
    pub fn replay(&self, pending: &[Pending]) -> usize {
        let fresh: Vec<Pending> = {
            let delivering = self.lock_delivering();
            let recent = self.lock_recent();
            pending
                .iter()
                .filter(|p| {
                    let id = (p.slot(), p.id.clone());
                    !delivering.contains_key(&id) && !recent.contains_key(&id)
                })
                .cloned()
                .collect()
        };
        if !fresh.is_empty() {
            tracing::info!(transitions = fresh.len(), "replaying pending transitions");
            self.metrics.pending_replayed.inc_by(fresh.len() as u64);
        }
        self.deliver(&fresh, false);
        fresh.len()
    }

    /// Whether this replica is delivering `pending`.
    pub fn is_delivering(&self, pending: &Pending) -> bool {
        let id = (pending.slot(), pending.id.clone());
        self.lock_delivering().contains_key(&id) || self.lock_recent().contains_key(&id)
    }

    fn lock_recent(&self) -> std::sync::MutexGuard<'_, HashMap<(u16, String), Instant>> {
        self.delivered_recently
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers `done` as delivered (see `delivered_recently`), forgetting old entries.
    fn remember_delivered(&self, done: &[Pending]) {
        let now = Instant::now();
        let mut recent = self.lock_recent();
        recent.retain(|_, at| now.duration_since(*at) < REMEMBER_DELIVERED);
        for p in done {
            recent.insert((p.slot(), p.id.clone()), now);
        }
    }

    fn lock_delivering(&self) -> std::sync::MutexGuard<'_, HashMap<(u16, String), Tracked>> {
        self.delivering.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn deliver(&self, pending: &[Pending], count: bool) {
        let mut nothing_to_do = Vec::new();
        for p in pending {
            if count {
                self.count_transition(pending_kind_label(&p.kind));
            }
            let keys: Vec<ObjectKey> = match &p.kind {
                PendingKind::Observed { key, .. } => self
                    .cache
                    .get(key)
                    .filter(|process| process.device == p.device)
                    .map(|_| vec![key.clone()])
                    .unwrap_or_default(),
                _ => self.cache.keys_for_device(&p.device),
            };
            let deliveries = transitions_of(p, &keys);
            if deliveries.is_empty() {
                nothing_to_do.push(p.clone());
                continue;
            }
            self.lock_delivering().insert(
                (p.slot(), p.id.clone()),
                Tracked {
                    pending: p.clone(),
                    remaining: deliveries.iter().map(|(k, _)| k.clone()).collect(),
                    unqueued: deliveries,
                },
            );
        }
        self.queue_unqueued();
        if !nothing_to_do.is_empty() {
            self.spawn_clear(nothing_to_do);
        }
    }

    /// Queues the deliveries the queue had no room for yet (called after new deliveries and
    /// periodically): a full queue delays them, never loses them.
    pub fn queue_unqueued(&self) {
        let now = Instant::now();
        let mut delivering = self.lock_delivering();
        for tracked in delivering.values_mut() {
            while let Some((key, transition)) = tracked.unqueued.first().cloned() {
                let work = Work::deliver(Delivery::new(transition, Some(tracked.pending.clone())));
                if !self.queue.push(key, now, work) {
                    return;
                }
                tracked.unqueued.remove(0);
            }
        }
    }

    /// `key` has `pending` (status and Event); clears the transition once every object has it.
    fn delivered(&self, pending: &Pending, key: &ObjectKey) {
        let done = {
            let mut delivering = self.lock_delivering();
            let id = (pending.slot(), pending.id.clone());
            match delivering.get_mut(&id) {
                Some(tracked) => {
                    tracked.remaining.remove(key);
                    if tracked.remaining.is_empty() {
                        delivering.remove(&id).map(|t| t.pending)
                    } else {
                        None
                    }
                }
                None => None,
            }
        };
        if let Some(done) = done {
            self.spawn_clear(vec![done]);
        }
    }

    fn spawn_clear(&self, delivered: Vec<Pending>) {
        self.remember_delivered(&delivered);
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(error) = store.clear_pending(&delivered).await {
                // Replayed later: statuses are idempotent and Events deduplicated by name.
                tracing::warn!(%error, "clearing delivered transitions failed");
            }
        });
    }

    /// Queues debounced writes for objects whose spec changed, when their device is ours.
    pub fn on_spec_change(&self, keys: Vec<ObjectKey>) {
        let due = Instant::now() + self.config.debounce;
        let owned = self.ownership.borrow().clone();
        for key in keys {
            if let Some(process) = self.cache.get(&key) {
                if owned.owns_device(&process.device) {
                    self.queue
                        .push(key, due, Work::plain(WriteReason::SpecChanged));
                }
            }
        }
    }

    /// Queues a repair found by the resync.
    pub fn on_resync(&self, key: ObjectKey) {
        self.queue
            .push(key, Instant::now(), Work::plain(WriteReason::Resync));
    }

    /// Takes objects off the queue until shutdown, then flushes what is queued for a short grace
    /// period (debounce ignored).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let permits = Arc::new(Semaphore::new(self.config.concurrency));
        let tasks = TaskTracker::new();
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let changed = self.queue.changed();
            let now = Instant::now();
            if shutdown.is_cancelled() && drain_deadline.is_none() {
                drain_deadline = Some(now + SHUTDOWN_GRACE);
            }
            if drain_deadline.is_some_and(|d| now >= d) {
                break;
            }
            let horizon = if drain_deadline.is_some() {
                now + Duration::from_secs(3600 * 24)
            } else {
                now
            };
            match self.queue.next(horizon) {
                Next::Ready(key, work) => {
                    let permit = tokio::select! {
                        permit = permits.clone().acquire_owned() => permit,
                        _ = sleep_until_opt(drain_deadline) => break,
                    };
                    let Ok(permit) = permit else { break };
                    let this = self.clone();
                    let span =
                        tracing::info_span!("status.write", object = %key, reason = ?work.reason);
                    if let Some(cx) = &work.trace {
                        apollo_telemetry::set_parent(&span, cx);
                    }
                    tasks.spawn(async move {
                        this.write(&key, work).instrument(span).await;
                        this.queue.done(&key);
                        drop(permit);
                    });
                }
                Next::Empty if drain_deadline.is_some() => break,
                Next::Empty | Next::WaitUntil(None) => {
                    tokio::select! {
                        _ = changed => {}
                        _ = sleep_until_opt(drain_deadline) => {}
                        _ = shutdown.cancelled(), if drain_deadline.is_none() => {}
                    }
                }
                Next::WaitUntil(Some(due)) => {
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep_until(due) => {}
                        _ = shutdown.cancelled(), if drain_deadline.is_none() => {}
                    }
                }
            }
        }
        tasks.close();
        let remaining = drain_deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(SHUTDOWN_GRACE);
        if tokio::time::timeout(remaining, tasks.wait()).await.is_err() {
            tracing::warn!("status writes still in flight at shutdown were abandoned");
        }
        if !self.queue.is_empty() {
            tracing::warn!(
                queued = self.queue.len(),
                "status writes still queued at shutdown; the next resync repairs them"
            );
        }
    }

    fn count_queue(&self, outcome: &'static str) {
        self.metrics
            .queue_outcomes
            .get_or_create(&QueueOutcomeLabels { outcome })
            .inc();
    }

    /// Writes one object: decides the Events of its transitions, publishes them (under names
    /// derived from the pending transitions, so a replay can never publish one twice), then
    /// projects and patches the status (retrying 409s after re-reading). Failures requeue the
    /// object with a back-off of its own; what was delivered is cleared from the store.
    async fn write(&self, key: &ObjectKey, mut work: Work) {
        let Some(process) = self.cache.get(key) else {
            self.count_queue("gone");
            self.finish(key, &work);
            return;
        };
        let reason = work
            .deliveries
            .first()
            .map(|d| d.transition.kind())
            .unwrap_or(work.reason.label());
        // Connectivity goes first, in the queue and at the write budget.
        let urgent = work.priority() == 0;
        for delivery in &mut work.deliveries {
            if delivery.event == EventState::Undecided {
                delivery.event = match event_for(&delivery.transition, &process.device) {
                    Some(spec) => EventState::Due(spec),
                    None => EventState::NotDue,
                };
            }
        }
        // Events first: a replica that dies between an Event and the status leaves the
        // transition pending, and its replay finds the Event already there (409) instead of
        // deciding against a status that already shows the transition that no Event is due.
        for i in 0..work.deliveries.len() {
            let EventState::Due(spec) = work.deliveries[i].event.clone() else {
                continue;
            };
            let suffix = work.deliveries[i]
                .pending
                .as_ref()
                .map(Pending::unique_suffix);
            match self
                .publish_event(&process, &spec, suffix.as_deref(), urgent)
                .await
            {
                Ok(()) => work.deliveries[i].event = EventState::Published,
                Err(error) => {
                    self.requeue(key, work, &error);
                    return;
                }
            }
        }
        match self.write_status(process, reason, urgent).await {
            WriteResult::Written => self.count_queue("written"),
            WriteResult::Unchanged => self.count_queue("unchanged"),
            WriteResult::Gone => self.count_queue("gone"),
            WriteResult::Failed(error) => {
                self.requeue(key, work, &error);
                return;
            }
        }
        self.finish(key, &work);
    }

    /// Every delivery of `work` reached `key`.
    fn finish(&self, key: &ObjectKey, work: &Work) {
        for delivery in &work.deliveries {
            if let Some(pending) = &delivery.pending {
                self.delivered(pending, key);
            }
        }
    }

    /// Puts `work` back after `error`, due after the object's own back-off: refusals (403, 422)
    /// double up to [`MAX_REFUSED_BACKOFF`], throttling (429) waits at least the apiserver's
    /// Retry-After, anything else retries after [`REQUEUE_DELAY`] with jitter. One object being
    /// refused never spends the write budget of the others.
    fn requeue(&self, key: &ObjectKey, mut work: Work, error: &Error) {
        self.count_queue("retried");
        work.failures = work.failures.saturating_add(1);
        work.reason = WriteReason::Retry;
        work.trace = None;
        let delay = requeue_delay(error, work.failures, rand::rng().random_range(0.0..1.0));
        tracing::warn!(object = %key, %error, failures = work.failures, retry_in = ?delay, "status write failed; will retry");
        if !self
            .queue
            .push(key.clone(), Instant::now() + delay, work.clone())
        {
            // Dropped (the queue is full): the pending transitions stay in the store and are
            // replayed once nobody here tracks them.
            for delivery in &work.deliveries {
                if let Some(p) = &delivery.pending {
                    self.lock_delivering().remove(&(p.slot(), p.id.clone()));
                }
            }
        }
    }
}

fn pending_kind_label(kind: &PendingKind) -> &'static str {
    match kind {
        PendingKind::Connected { .. } => "connected",
        PendingKind::Disconnected => "disconnected",
        PendingKind::Observed { .. } => "spec_observed",
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Now as RFC 3339 with whole seconds (the precision of metav1.Time).
pub fn now_rfc3339() -> String {
    let now = jiff::Timestamp::now();
    jiff::Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_has_whole_seconds() {
        let now = now_rfc3339();
        assert!(now.ends_with('Z') && !now.contains('.'), "{now}");
    }
}
