//! Background work over the slots this replica owns: the stale sweep (connected devices without
//! a report within the stale window flip to disconnected, once), the replay of transitions
//! decided but never delivered, and the slow level-triggered resync (repairs any status that
//! disagrees with the shared state, writes nothing otherwise).
//!
//! The sweep only judges staleness over time in which reports could be heard (see
//! [`crate::state::Reception`]), and a mass-staleness breaker holds the flips back when a large
//! share of a shard goes quiet at once — a partition or a broken path, not dead devices — until
//! the evidence changes: devices report again (then nothing was ever flipped), or the condition
//! persists for another stale window (then they are flipped).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use apollo_crds::conditions::{is_true, AGENT_CONNECTED};
use futures::StreamExt;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::cluster::ownership::Ownership;
use crate::metrics::{Metrics, SkipLabels};
use crate::model::CachedProcess;
use crate::state::{Connection, StaleCount, StateStore, Store};
use crate::status::projection::{needs_write, project};
use crate::status::{now_rfc3339, StatusWriter};

/// The shortest time between resync passes started by the store's recoveries.
const RECOVERY_RESYNC_GAP: Duration = Duration::from_secs(5);

/// Devices whose state the resync reads concurrently.
const RESYNC_CONCURRENCY: usize = 16;

/// What the sweep and the resync work with.
#[derive(Clone)]
pub struct Background {
    /// Metrics (sweep and resync counters).
    pub metrics: Metrics,
    /// The watch cache.
    pub cache: Arc<Cache>,
    /// The shared state.
    pub store: Store,
    /// Where repairs and stale transitions go.
    pub writer: Arc<StatusWriter>,
    /// The slots this replica sweeps and resyncs.
    pub ownership: Ownership,
    /// Where the breaker's Warning goes.
    pub alerts: BreakerAlerts,
}

/// The mass-staleness breaker's settings.
#[derive(Debug, Clone, Copy)]
pub struct Breaker {
    /// Share of a shard's connected devices that may go stale in one sweep (0..=1).
    pub share: f64,
    /// The breaker never opens for fewer stale devices than this.
    pub min_devices: u64,
}

/// What the breaker decides for one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerDecision {
    /// Flip the stale devices (the breaker is or stays closed).
    Sweep,
    /// Too many at once: hold the flips.
    Hold,
    /// Held for a whole second window: the condition persists; flip them now.
    Release,
}

/// The breaker's decision for a shard whose count is `count`, open since `opened` (None when
/// closed) at `now`: it opens when the devices quiet for half a stale window or more are too
/// many (a partition silences them together, although they cross the stale cutoff spread over a
/// heartbeat interval). Pure.
pub fn breaker_decision(
    breaker: Breaker,
    count: StaleCount,
    opened: Option<tokio::time::Instant>,
    now: tokio::time::Instant,
    window: Duration,
) -> BreakerDecision {
    let too_many = count.quiet >= breaker.min_devices.max(1)
        && count.connected > 0
        && (count.quiet as f64) > breaker.share * count.connected as f64;
    match (too_many, opened) {
        (false, _) => BreakerDecision::Sweep,
        (true, Some(at)) if now.saturating_duration_since(at) >= window => BreakerDecision::Release,
        (true, _) => BreakerDecision::Hold,
    }
}

/// Publishes the breaker's Warning Event, once per opening, about the shard's Lease object
/// (`apollo-gateway-shard-<i>` in the Lease namespace).
#[derive(Clone)]
pub struct BreakerAlerts {
    /// Kubernetes client (the gateway's identity).
    pub client: Option<kube::Client>,
    /// Namespace of the shard Leases.
    pub lease_namespace: String,
    /// `reportingInstance` of the Event.
    pub instance: String,
}

impl BreakerAlerts {
    async fn opened(&self, shard: u32, count: StaleCount, window: Duration) {
        tracing::warn!(
            shard,
            stale = count.stale,
            connected = count.connected,
            "mass-staleness breaker open: too many devices of the shard went quiet at once; \
             holding their disconnection for one more stale window"
        );
        let Some(client) = &self.client else { return };
        let lease = format!("{}{shard}", crate::cluster::SHARD_LEASE_PREFIX);
        let note = format!(
            "{} of {} connected devices of shard {shard} stopped reporting at once; their \
             disconnection is held for {}s (a partition or a broken path rather than dead \
             devices); devices that report again are not affected",
            count.stale,
            count.connected,
            window.as_secs()
        );
        // An explicit name: the apiserver refuses a generateName ending in '.' (kube's
        // Recorder style), and the time makes it unique per opening.
        let now = k8s_openapi::jiff::Timestamp::now();
        let event = k8s_openapi::api::events::v1::Event {
            metadata: kube::api::ObjectMeta {
                name: Some(format!("{lease}.{:x}", now.as_nanosecond())),
                namespace: Some(self.lease_namespace.clone()),
                ..Default::default()
            },
            event_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                now,
            )),
            action: Some("StaleSweep".into()),
            reason: Some("MassStaleness".into()),
            note: Some(note),
            type_: Some("Warning".into()),
            regarding: Some(k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("coordination.k8s.io/v1".into()),
                kind: Some("Lease".into()),
                name: Some(lease),
                namespace: Some(self.lease_namespace.clone()),
                ..Default::default()
            }),
            reporting_controller: Some(crate::status::writer::REPORTING_CONTROLLER.into()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        };
        let api: kube::Api<k8s_openapi::api::events::v1::Event> =
            kube::Api::namespaced(client.clone(), &self.lease_namespace);
        let params = kube::api::PostParams::default();
        let create = api.create(&params, &event);
        match tokio::time::timeout(Duration::from_secs(10), create).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(%error, "could not publish the breaker's Warning"),
            Err(_) => tracing::warn!("publishing the breaker's Warning timed out"),
        }
    }
}

impl Background {
    /// Runs the stale sweep every `interval` until shutdown: connected devices whose last report
    /// is older than `stale_window` flip to disconnected — but only once reports have been heard
    /// for `reception_window` since they last could not be (agents in back-off included).
    pub async fn run_sweeper(
        self,
        stale_window: Duration,
        reception_window: Duration,
        interval: Duration,
        grace: Duration,
        breaker: Breaker,
        shutdown: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let window_ms = i64::try_from(stale_window.as_millis()).unwrap_or(i64::MAX);
        let quiet_ms = window_ms / 2;
        // After an outage of every replica, each device's last report is older than the window
        // although its agent is fine and only retrying. Sweeping at once would mark the whole
        // fleet disconnected (a patch and a Warning per DeviceProcess), so the first sweep waits
        // for the grace period (one stale window by default), by which live agents have reported.
        let started = tokio::time::Instant::now();
        let mut opened: HashMap<u32, tokio::time::Instant> = HashMap::new();
        loop {
            let waiting_since = tokio::time::Instant::now();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if waiting_since.elapsed() > interval + Duration::from_secs(2) {
                // This process did not run (SIGSTOP, a frozen VM, a long pause): no report
                // could be heard meanwhile, so the lastSeen values say nothing about agents.
                tracing::warn!(
                    paused = ?waiting_since.elapsed(),
                    "the sweeper woke up late; judging staleness only after another stale window"
                );
                self.store.reception().outage();
            }
            if started.elapsed() < grace {
                self.skipped("grace");
                continue;
            }
            if !self.cache.is_synced() {
                // Reports are refused until the cache has synced (once synced it stays so: a
                // re-list keeps serving the old contents). The start-up grace, one stale window
                // by default, is what covers the devices unheard meanwhile; `--sweep-grace 0`
                // asks to sweep as soon as the cache is there.
                self.skipped("cache");
                continue;
            }
            if self
                .store
                .reception()
                .heard_for()
                .is_some_and(|heard| heard < reception_window)
            {
                self.skipped("reception");
                continue;
            }
            let owned = self.ownership.borrow().clone();
            if owned.by_shard().iter().all(|(_, slots)| slots.is_empty()) {
                // No shard held (not yet joined, or refused its Lease): nothing to sweep.
                self.skipped("no_shard");
                continue;
            }
            let now_ms = self.store.clock().now_ms();
            let cutoff_ms = now_ms.saturating_sub(window_ms);
            let mut held = 0;
            let mut failed = false;
            for (shard, slots) in owned.by_shard() {
                if slots.is_empty() {
                    continue;
                }
                let quiet_cutoff_ms = now_ms.saturating_sub(quiet_ms);
                let count = match self
                    .store
                    .stale_count(&slots, cutoff_ms, quiet_cutoff_ms)
                    .await
                {
                    Ok(count) => count,
                    Err(error) => {
                        tracing::warn!(%error, "stale count failed; retrying next tick");
                        failed = true;
                        break;
                    }
                };
                if count.stale == 0 {
                    opened.remove(&shard);
                    continue;
                }
                let now = tokio::time::Instant::now();
                match breaker_decision(
                    breaker,
                    count,
                    opened.get(&shard).copied(),
                    now,
                    stale_window,
                ) {
                    BreakerDecision::Hold => {
                        if let std::collections::hash_map::Entry::Vacant(entry) =
                            opened.entry(shard)
                        {
                            entry.insert(now);
                            self.alerts.opened(shard, count, stale_window).await;
                        }
                        held += count.stale;
                        self.skipped("breaker");
                        continue;
                    }
                    BreakerDecision::Release => {
                        tracing::warn!(
                            shard,
                            stale = count.stale,
                            "mass-staleness breaker: the devices stayed quiet for another stale \
                             window; marking them disconnected"
                        );
                        opened.remove(&shard);
                    }
                    BreakerDecision::Sweep => {
                        if opened.remove(&shard).is_some() {
                            tracing::info!(
                                shard,
                                "mass-staleness breaker closed: devices report again"
                            );
                        }
                    }
                }
                // The count may have waited on a store that stopped answering: judge reception
                // again, and the cutoff from now, right before flipping anything.
                if self
                    .store
                    .reception()
                    .heard_for()
                    .is_some_and(|heard| heard < reception_window)
                {
                    self.skipped("reception");
                    failed = true;
                    break;
                }
                let now_ms = self.store.clock().now_ms();
                let cutoff_ms = now_ms.saturating_sub(window_ms);
                match self.store.sweep(&slots, cutoff_ms, now_ms).await {
                    Ok(stale) if !stale.is_empty() => {
                        tracing::info!(shard, devices = stale.len(), "devices went stale");
                        self.writer.on_stale(&stale);
                    }
                    Ok(_) => {}
                    Err(error) => {
                        // Flips made before the failure are pending in the store: replayed.
                        tracing::warn!(%error, "stale sweep failed; retrying next tick");
                        failed = true;
                        break;
                    }
                }
            }
            opened.retain(|shard, _| owned.by_shard().iter().any(|(s, _)| s == shard));
            self.metrics.stale_held.set(held as i64);
            self.metrics
                .stale_breaker_open
                .set(i64::from(!opened.is_empty()));
            if failed {
                continue;
            }
            self.cache.prune_idle_devices();
            self.metrics.sweeps.inc();
        }
    }

    fn skipped(&self, reason: &'static str) {
        self.metrics
            .sweeps_skipped
            .get_or_create(&SkipLabels { reason })
            .inc();
    }

    /// Replays, every `interval`, the transitions pending in the owned slots that nobody is
    /// delivering and that were decided at least `grace` ago (the replica that decided one had
    /// that long to deliver it), until shutdown.
    pub async fn run_replay(
        self,
        grace: Duration,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = self.cache.wait_synced() => {}
        }
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let slots = self.ownership.borrow().slots();
            let pending = match self.store.pending(&slots).await {
                Ok(pending) => pending,
                Err(error) => {
                    tracing::warn!(%error, "reading pending transitions failed; retrying next tick");
                    continue;
                }
            };
            let now_ms = self.store.clock().now_ms();
            let oldest = pending.iter().map(|p| p.decided_ms).min();
            self.metrics.pending_transitions.set(pending.len() as i64);
            self.metrics
                .pending_oldest_seconds
                .set(oldest.map_or(0.0, |t| (now_ms.saturating_sub(t)).max(0) as f64 / 1000.0));
            self.writer.queue_unqueued();
            let mut due: Vec<_> = pending
                .into_iter()
                .filter(|p| now_ms.saturating_sub(p.decided_ms) >= grace_ms)
                .filter(|p| !self.writer.is_delivering(p))
                .collect();
            // In the order they were decided.
            due.sort_by(|a, b| (a.decided_ms, &a.id).cmp(&(b.decided_ms, &b.id)));
            if !due.is_empty() {
                self.writer.replay(&due);
            }
        }
    }

    /// Runs the resync once the cache has synced, then every `interval` and whenever ownership
    /// changes, until shutdown.
    pub async fn run_resync(self, interval: Duration, shutdown: CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = self.cache.wait_synced() => {}
        }
        let mut ownership = self.ownership.clone();
        let mut ownership_fixed = false;
        let mut recoveries = self.store.reception().recoveries();
        loop {
            let repairs = resync_once(&self.cache, &self.store, &self.writer, &ownership).await;
            self.metrics.resyncs.inc();
            if repairs > 0 {
                tracing::info!(repairs, "resync queued status repairs");
            }
            let passed = tokio::time::Instant::now();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
                changed = ownership.changed(), if !ownership_fixed => {
                    // A closed channel means ownership never changes again.
                    ownership_fixed = changed.is_err();
                }
                _ = recoveries.changed() => {
                    // A store that flaps would otherwise have every owned device read again at
                    // each recovery: at most one such pass per RECOVERY_RESYNC_GAP.
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep_until(passed + RECOVERY_RESYNC_GAP) => {}
                    }
                    recoveries.mark_unchanged();
                    tracing::info!(
                        "the state store answers again after its connections were lost (restarted empty?): resync now"
                    );
                }
            }
        }
    }
}

/// Compares every owned DeviceProcess with the shared state; queues a write for each one whose
/// status is wrong. Returns how many it queued.
pub async fn resync_once(
    cache: &Cache,
    store: &Store,
    writer: &StatusWriter,
    ownership: &Ownership,
) -> usize {
    let owned = ownership.borrow().clone();
    let devices = cache.devices_owned(&owned);
    futures::stream::iter(devices)
        .map(|(device, processes)| resync_device(store, writer, device, processes))
        .buffer_unordered(RESYNC_CONCURRENCY)
        .fold(0, |total, n| async move { total + n })
        .await
}

async fn resync_device(
    store: &Store,
    writer: &StatusWriter,
    device: String,
    processes: Vec<Arc<CachedProcess>>,
) -> usize {
    let record = match store.device(&device).await {
        Ok(record) => record,
        Err(error) => {
            tracing::warn!(%device, %error, "resync could not read device state");
            return 0;
        }
    };
    let shown_connected = processes.iter().any(|p| {
        p.status
            .as_ref()
            .is_some_and(|s| is_true(&s.conditions, AGENT_CONNECTED))
    });
    if record.connection == Connection::Unknown && shown_connected {
        // The store lost this device (e.g. Redis restarted empty) while its status says
        // connected: track it again so the sweep marks it stale if it stays silent.
        match store.adopt_connected(&device, store.clock().now_ms()).await {
            Ok(true) => {
                tracing::info!(%device, "re-tracking a connected device the store had lost")
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(%device, %error, "could not re-track device"),
        }
    }
    let now = now_rfc3339();
    let mut repairs = 0;
    for process in processes {
        let observed = record.observed.get(&process.key).map(String::as_str);
        let desired = project(&process, record.connection, observed, &now);
        if needs_write(process.status.as_ref(), &desired) {
            writer.on_resync(process.key.clone());
            repairs += 1;
        }
    }
    repairs
}
