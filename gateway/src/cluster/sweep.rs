//! Background work over the slots this replica owns: the stale sweep (connected devices without
//! a report within the stale window flip to disconnected, once) and the slow level-triggered
//! resync (repairs any status that disagrees with the shared state, writes nothing otherwise).

use std::sync::Arc;
use std::time::Duration;

use apollo_crds::conditions::{is_true, AGENT_CONNECTED};
use futures::StreamExt;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::cluster::ownership::Ownership;
use crate::metrics::Metrics;
use crate::model::CachedProcess;
use crate::state::{Connection, StateStore, Store};
use crate::status::projection::{needs_write, project};
use crate::status::{now_rfc3339, StatusWriter};

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
}

impl Background {
    /// Runs the stale sweep every `interval` until shutdown: connected devices whose last report
    /// is older than `stale_window` flip to disconnected.
    pub async fn run_sweeper(
        self,
        stale_window: Duration,
        interval: Duration,
        grace: Duration,
        shutdown: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let window_ms = i64::try_from(stale_window.as_millis()).unwrap_or(i64::MAX);
        // After an outage of every replica, each device's last report is older than the window
        // although its agent is fine and only retrying. Sweeping at once would mark the whole
        // fleet disconnected (a patch and a Warning per DeviceProcess), so the first sweep waits
        // for the grace period (one stale window by default), by which live agents have reported.
        let started = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if started.elapsed() < grace {
                continue;
            }
            let slots = self.ownership.borrow().slots();
            if slots.is_empty() {
                continue;
            }
            match self
                .store
                .sweep(
                    &slots,
                    self.store.clock().now_ms().saturating_sub(window_ms),
                )
                .await
            {
                Ok(stale) if !stale.is_empty() => {
                    tracing::info!(devices = stale.len(), "devices went stale");
                    self.writer.on_stale(&stale);
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "stale sweep failed; retrying next tick");
                    continue;
                }
            }
            self.cache.prune_idle_devices();
            self.metrics.sweeps.inc();
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
        loop {
            let repairs = resync_once(&self.cache, &self.store, &self.writer, &ownership).await;
            self.metrics.resyncs.inc();
            if repairs > 0 {
                tracing::info!(repairs, "resync queued status repairs");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
                changed = ownership.changed(), if !ownership_fixed => {
                    // A closed channel means ownership never changes again.
                    ownership_fixed = changed.is_err();
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
