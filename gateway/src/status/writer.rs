//! The status writer: takes DeviceProcesses off the [`WriteQueue`], recomputes their projection
//! from the cache and the shared state at that moment (so a transition undone before its turn
//! costs nothing), patches `/status` with optimistic locking, and publishes the Events of the
//! transitions that caused the write. Runs off the request path, rate limited, every call bounded
//! by a timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use apollo_crds::{DeviceProcess, DeviceProcessStatus};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rand::Rng;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::Cache;
use crate::cluster::ownership::Ownership;
use crate::error::Error;
use crate::metrics::{KubeWriteLabels, Metrics, QueueOutcomeLabels, TransitionLabels};
use crate::model::{CachedProcess, ObjectKey};
use crate::state::{Pending, PendingKind, ReportOutcome, StateStore, Store};
use crate::status::projection::{event_for, needs_write, project, transitions_of, EventSpec};
use crate::status::queue::{Delivery, EventState, Next, RateLimiter, Work, WriteQueue, WriteReason};

/// Field manager of every status patch.
pub const FIELD_MANAGER: &str = "apollo-gateway";
/// `reportingController` of every Event.
pub const REPORTING_CONTROLLER: &str = "apollo.azure.com/gateway";
/// Attempts of one status write (the first plus retries after 409 or errors).
const PATCH_ATTEMPTS: u32 = 6;
/// Attempts of one Event creation.
const EVENT_ATTEMPTS: u32 = 4;
/// Delay before an object whose write gave up is tried again (doubled per failure in a row).
const REQUEUE_DELAY: Duration = Duration::from_secs(5);
/// Longest wait of an object whose writes keep failing for transient reasons.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(60);
/// Longest wait of an object whose writes the apiserver refuses (403, 422).
const MAX_REFUSED_BACKOFF: Duration = Duration::from_secs(300);
/// How long pending writes may still be flushed after shutdown was requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Settings of the writer.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Delay of spec-change writes (see `--status-debounce-seconds`).
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
}

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
            pending
                .iter()
                .filter(|p| !delivering.contains_key(&(p.slot(), p.id.clone())))
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
        self.lock_delivering()
            .contains_key(&(pending.slot(), pending.id.clone()))
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
        if !self.queue.push(key.clone(), Instant::now() + delay, work.clone()) {
            // Dropped (the queue is full): the pending transitions stay in the store and are
            // replayed once nobody here tracks them.
            for delivery in &work.deliveries {
                if let Some(p) = &delivery.pending {
                    self.lock_delivering().remove(&(p.slot(), p.id.clone()));
                }
            }
        }
    }

    async fn write_status(
        &self,
        mut process: Arc<CachedProcess>,
        reason: &'static str,
        urgent: bool,
    ) -> WriteResult {
        // Already right (a transition undone before its turn): no write, no budget spent.
        match self.projection(&process).await {
            Ok(None) => return WriteResult::Unchanged,
            Ok(Some(_)) => {}
            Err(error) => return WriteResult::Failed(error),
        }
        let mut attempt = 0;
        loop {
            self.acquire(urgent).await;
            // The shared state is read again after the wait and before every attempt: a report
            // recorded meanwhile (by any replica) must not be overwritten by what was read before.
            let desired = match self.projection(&process).await {
                Ok(None) => return WriteResult::Unchanged,
                Ok(Some(desired)) => desired,
                Err(error) => return WriteResult::Failed(error),
            };
            let error = match self.patch_status(&process, &desired).await {
                Ok(written) => {
                    self.count_kube("status_patch", reason, "ok");
                    self.cache.observe_write(&written);
                    return WriteResult::Written;
                }
                Err(error) if error.is_not_found() => {
                    self.count_kube("status_patch", reason, "not_found");
                    return WriteResult::Gone;
                }
                Err(error) => error,
            };
            let conflict = error.is_conflict();
            self.count_kube("status_patch", reason, outcome_label(&error));
            attempt += 1;
            // Only a conflict is worth another immediate try; a refusal or throttling goes back
            // to the queue with the object's own back-off.
            if !conflict || attempt >= PATCH_ATTEMPTS {
                return WriteResult::Failed(error);
            }
            tokio::time::sleep(backoff(attempt)).await;
            // Someone else wrote the object: re-read it and project again.
            match self.get(&process.key).await {
                Ok(fresh) => {
                    self.cache.observe_write(&fresh);
                    match CachedProcess::from_object(&fresh) {
                        Some(fresh) if fresh.device == process.device => process = Arc::new(fresh),
                        // Rebound to another device: its record is not the one we read.
                        _ => return WriteResult::Failed(error),
                    }
                }
                Err(e) if e.is_not_found() => return WriteResult::Gone,
                Err(e) => tracing::debug!(error = %e, "re-read after conflict failed"),
            }
        }
    }

    async fn acquire(&self, urgent: bool) {
        if urgent {
            self.limiter.acquire_urgent().await;
        } else {
            self.limiter.acquire().await;
        }
    }

    /// The status `process` should show now, from the shared state; None when it already does.
    async fn projection(
        &self,
        process: &CachedProcess,
    ) -> Result<Option<DeviceProcessStatus>, Error> {
        let record = self.store.device(&process.device).await?;
        let observed = record.observed.get(&process.key).map(String::as_str);
        let desired = project(process, record.connection, observed, &now_rfc3339());
        Ok(needs_write(process.status.as_ref(), &desired).then_some(desired))
    }

    fn count_kube(&self, kind: &'static str, reason: &'static str, outcome: &'static str) {
        self.metrics
            .kube_writes
            .get_or_create(&KubeWriteLabels {
                kind,
                reason,
                outcome,
            })
            .inc();
    }

    async fn patch_status(
        &self,
        process: &CachedProcess,
        status: &DeviceProcessStatus,
    ) -> Result<DeviceProcess, Error> {
        let api: Api<DeviceProcess> = Api::namespaced(self.client.clone(), &process.key.namespace);
        let mut body = serde_json::json!({ "status": status });
        if let Some(rv) = &process.resource_version {
            // A merge patch carrying resourceVersion is an optimistic lock: 409 if it moved.
            body["metadata"] = serde_json::json!({ "resourceVersion": rv });
        }
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        self.bounded(
            "patch status",
            &process.key,
            api.patch_status(&process.key.name, &params, &Patch::Merge(&body)),
        )
        .await
    }

    async fn get(&self, key: &ObjectKey) -> Result<DeviceProcess, Error> {
        let api: Api<DeviceProcess> = Api::namespaced(self.client.clone(), &key.namespace);
        self.bounded("get", key, api.get(&key.name)).await
    }

    async fn bounded<T>(
        &self,
        op: &'static str,
        key: &ObjectKey,
        call: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, Error> {
        let span = tracing::info_span!("kube.request", otel.kind = "client", op, object = %key);
        match tokio::time::timeout(self.config.call_timeout, call)
            .instrument(span)
            .await
        {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(Error::KubeCall {
                op,
                object: key.to_string(),
                source: Box::new(source),
            }),
            Err(_) => Err(Error::KubeTimeout {
                op,
                object: key.to_string(),
            }),
        }
    }

    /// Publishes one Event, retrying transient failures a few times. An Event that already
    /// exists (409: a replay, or an earlier attempt that timed out on our side) counts as
    /// published; one the apiserver refuses (400/422, or 403) is given up with a warning, since
    /// sending it again cannot succeed and must not hold the status back.
    async fn publish_event(
        &self,
        process: &CachedProcess,
        spec: &EventSpec,
        unique_suffix: Option<&str>,
        urgent: bool,
    ) -> Result<(), Error> {
        let key = &process.key;
        let event = build_event(process, spec, &self.config.instance, unique_suffix);
        let api: Api<Event> = Api::namespaced(self.client.clone(), &key.namespace);
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.acquire(urgent).await;
            let error = match self
                .bounded(
                    "create event",
                    key,
                    api.create(&PostParams::default(), &event),
                )
                .await
            {
                Ok(_) => {
                    self.count_kube("event", spec.reason, "ok");
                    return Ok(());
                }
                Err(error) if error.is_conflict() => {
                    self.count_kube("event", spec.reason, "exists");
                    return Ok(());
                }
                Err(error) => error,
            };
            self.count_kube("event", spec.reason, outcome_label(&error));
            if error.is_invalid() || error.is_forbidden() {
                tracing::warn!(object = %key, reason = spec.reason, %error, "Event refused; not published");
                return Ok(());
            }
            if attempt >= EVENT_ATTEMPTS || error.is_throttled() {
                return Err(error);
            }
            tokio::time::sleep(backoff(attempt)).await;
        }
    }
}

/// How long an object waits after a failed write (see [`StatusWriter::requeue`]); `unit` is a
/// draw in `[0, 1)` for the jitter.
fn requeue_delay(error: &Error, failures: u32, unit: f64) -> Duration {
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

fn pending_kind_label(kind: &PendingKind) -> &'static str {
    match kind {
        PendingKind::Connected { .. } => "connected",
        PendingKind::Disconnected => "disconnected",
        PendingKind::Observed { .. } => "spec_observed",
    }
}

fn outcome_label(error: &Error) -> &'static str {
    match error {
        e if e.is_conflict() => "conflict",
        e if e.is_not_found() => "not_found",
        e if e.is_invalid() => "invalid",
        Error::KubeTimeout { .. } => "timeout",
        _ => "error",
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Exponential backoff with full jitter: up to 100ms x 2^attempt, capped at 2s.
fn backoff(attempt: u32) -> Duration {
    let cap_ms = (100u64 << attempt.min(5)).min(2000);
    Duration::from_millis(rand::rng().random_range(cap_ms / 4..=cap_ms))
}

/// Now as RFC 3339 with whole seconds (the precision of metav1.Time).
pub fn now_rfc3339() -> String {
    let now = jiff::Timestamp::now();
    jiff::Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}

static EVENT_SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// Longest object name Kubernetes accepts for an Event (a DNS subdomain).
const MAX_EVENT_NAME_LEN: usize = 253;

/// `<object name>.<suffix>`, the object name shortened when needed so the whole stays a valid
/// DNS subdomain of at most 253 characters (events.k8s.io/v1 validates Event names; an object
/// named with 253 characters would otherwise get no Event at all).
fn event_name(object: &str, suffix: &str) -> String {
    let room = MAX_EVENT_NAME_LEN.saturating_sub(suffix.len() + 1);
    let mut end = 0;
    for (i, c) in object.char_indices() {
        if i + c.len_utf8() > room {
            break;
        }
        end = i + c.len_utf8();
    }
    // A DNS subdomain's labels start and end with an alphanumeric character.
    let prefix = object[..end].trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    let prefix = if prefix.is_empty() {
        "deviceprocess"
    } else {
        prefix
    };
    format!("{prefix}.{suffix}")
}

/// An events.k8s.io/v1 Event about `process`.
///
/// Built by hand rather than with kube's `Recorder` because the Recorder does not fit how the
/// gateway writes: it names Events `<object>.<hex time>`, which the apiserver refuses (422) for
/// DeviceProcess names near the 253-character limit (see [`event_name`]); it deduplicates repeats
/// into a `series` with PATCH requests from a per-process cache (one more verb in the RBAC, and a
/// cache that other replicas do not share — here the state store already decides that each
/// transition is published once, by one replica); and its calls would bypass this writer's rate
/// limit, per-call timeout, metrics and the report's trace, which every Kubernetes write of the
/// gateway goes through.
pub fn build_event(
    process: &CachedProcess,
    spec: &EventSpec,
    instance: &str,
    unique_suffix: Option<&str>,
) -> Event {
    let now = k8s_openapi::jiff::Timestamp::now();
    let suffix = match unique_suffix {
        Some(s) => s.to_owned(),
        None => {
            let sequence = EVENT_SEQUENCE.fetch_add(1, Ordering::Relaxed);
            format!("{:x}{:04x}", now.as_nanosecond(), sequence & 0xffff)
        }
    };
    Event {
        metadata: ObjectMeta {
            name: Some(event_name(&process.key.name, &suffix)),
            namespace: Some(process.key.namespace.clone()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        action: Some(spec.action.to_owned()),
        reason: Some(spec.reason.to_owned()),
        note: Some(spec.note.clone()),
        type_: Some(spec.type_.as_str().to_owned()),
        regarding: Some(ObjectReference {
            api_version: Some(format!("{}/{}", apollo_crds::GROUP, apollo_crds::VERSION)),
            kind: Some("DeviceProcess".to_owned()),
            name: Some(process.key.name.clone()),
            namespace: Some(process.key.namespace.clone()),
            uid: Some(process.uid.clone()).filter(|u| !u.is_empty()),
            ..ObjectReference::default()
        }),
        reporting_controller: Some(REPORTING_CONTROLLER.to_owned()),
        reporting_instance: Some(instance.to_owned()),
        ..Event::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::projection::EventType;

    #[test]
    fn backoff_is_bounded_and_grows() {
        for attempt in 0..20 {
            let d = backoff(attempt);
            assert!(d <= Duration::from_secs(2), "{d:?}");
        }
        assert!(backoff(1) <= Duration::from_millis(200));
    }

    #[test]
    fn now_has_whole_seconds() {
        let now = now_rfc3339();
        assert!(now.ends_with('Z') && !now.contains('.'), "{now}");
    }

    #[test]
    fn events_regard_the_device_process() {
        let process = CachedProcess {
            key: ObjectKey::new("ns", "p"),
            uid: "u-1".into(),
            device: "d".into(),
            generation: 1,
            resource_version: None,
            spec: serde_json::json!({}),
            spec_hash: String::new(),
            status: None,
        };
        let spec = EventSpec {
            type_: EventType::Warning,
            reason: "AgentDisconnected",
            action: "StaleSweep",
            note: "n".into(),
        };
        let a = build_event(&process, &spec, "apollo-gateway-0", None);
        let b = build_event(&process, &spec, "apollo-gateway-0", None);
        assert_ne!(a.metadata.name, b.metadata.name);
        assert_eq!(a.type_.as_deref(), Some("Warning"));
        let regarding = a.regarding.expect("regarding");
        assert_eq!(regarding.kind.as_deref(), Some("DeviceProcess"));
        assert_eq!(regarding.api_version.as_deref(), Some("azure.com/v1alpha1"));
        assert_eq!(regarding.uid.as_deref(), Some("u-1"));
    }

    #[test]
    fn event_names_stay_valid_dns_subdomains_for_the_longest_object_names() {
        assert_eq!(
            event_name("p", "18edb3b8482ec9a80000"),
            "p.18edb3b8482ec9a80000"
        );
        let longest = format!("{}.{}", "a".repeat(126), "b".repeat(126));
        let name = event_name(&longest, "18edb3b8482ec9a80000");
        assert_eq!(name.len(), 253, "{name}");
        assert!(name.starts_with(&longest[..200]));
        assert!(name.ends_with(".18edb3b8482ec9a80000"));
        // Cut right after a '.' or '-': the label must not end with one.
        let dotted = format!("{}.-{}", "a".repeat(230), "b".repeat(20));
        let name = event_name(&dotted, "18edb3b8482ec9a80000");
        assert!(name.len() <= 253, "{name}");
        assert!(!name.contains(".-") && !name.contains(".."), "{name}");
        assert!(name.starts_with(&"a".repeat(230)));
    }
}
