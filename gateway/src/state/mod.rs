//! State shared by every gateway replica: per device lastSeen, connection state, agent version,
//! observed hash per DeviceProcess and the last served desired ETag.
//!
//! Transitions are decided atomically inside the store, so that of all replicas exactly one sees
//! "this report connected the device" and exactly one sweep sees "this device went stale"; only
//! that one writes the status change and the Event. Two backends implement [`StateStore`] and
//! pass one shared test suite: Redis, single or Cluster (any number of replicas), and memory (a
//! single replica).

mod memory;
mod reception;
mod redis;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

pub use self::memory::MemoryStore;
pub use self::reception::Reception;
pub use self::redis::RedisStore;

use crate::error::Error;
use crate::metrics::{Metrics, StoreLabels};
use crate::model::ObjectKey;

/// How long the state of a device that stopped reporting is kept.
pub const RETENTION_SECONDS: u64 = 30 * 24 * 3600;

/// The connection state of a device as the store knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    /// The store has no record of the device (never reported, or the store lost its state).
    Unknown,
    /// The device was connected and the sweep found it stale.
    Disconnected,
    /// The device reported within the stale window.
    Connected,
}

/// One report (or connect) to record.
#[derive(Debug, Clone)]
pub struct ReportInput<'a> {
    /// The reporting device.
    pub device: &'a str,
    /// Receive time, milliseconds since the Unix epoch.
    pub now_ms: i64,
    /// The agent's version string.
    pub agent_version: &'a str,
    /// Observed spec hash per DeviceProcess (already checked to belong to the device).
    pub observations: Vec<(ObjectKey, String)>,
    /// What the statuses showed before this report (from the cache): kept with the
    /// transitions it decides, so that whoever delivers them, now or in a replay, decides
    /// their Events against the same evidence (see [`crate::status::projection::event_for`]).
    pub shown: ShownBefore,
}

/// What a device's statuses showed before a report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShownBefore {
    /// Every DeviceProcess of the device showed AgentConnected=True.
    pub connected: bool,
    /// DeviceProcesses whose status already showed the hash now reported.
    pub observed: Vec<ObjectKey>,
}

/// What a report changed, decided atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportOutcome {
    /// The connection state before this report. Anything but Connected means this report
    /// connected the device and this caller alone acts on it.
    pub prior: Connection,
    /// Observations whose hash differs from the stored one.
    pub changed: Vec<ObservedChange>,
    /// The transitions above, as the store recorded them until they are delivered.
    pub pending: Vec<Pending>,
}

/// What a pending transition is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PendingKind {
    /// A report connected the device; `prior` is Disconnected or Unknown.
    Connected {
        /// What the store held before.
        prior: Connection,
        /// The statuses already showed the device connected.
        shown: bool,
    },
    /// The sweep found the device stale.
    Disconnected,
    /// A report changed the observed hash of one DeviceProcess.
    Observed {
        /// The DeviceProcess.
        key: ObjectKey,
        /// The new hash.
        hash: String,
        /// Whether the store held an earlier hash.
        prior_known: bool,
        /// The status already showed this hash.
        shown: bool,
    },
}

/// A transition decided by the store and kept there, in the device's slot, until it has been
/// delivered (status patch and Event): the same script that decides a transition records it, so
/// a replica that dies, times out or gives up after the decision loses nothing; the shard's
/// owner replays what is pending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Unique within the slot: `<decided ms>-<per-slot sequence>`.
    pub id: String,
    /// The device.
    pub device: String,
    /// When the store decided it (shared clock, ms since the Unix epoch).
    pub decided_ms: i64,
    /// What happened.
    pub kind: PendingKind,
}

impl Pending {
    /// The slot the transition is kept in (its device's).
    pub fn slot(&self) -> u16 {
        apollo_protocol::shard::slot(&self.device)
    }

    /// A name fragment unique to this transition across slots and store restarts (Event names
    /// are derived from it, so a replayed Event is refused as a duplicate, never published
    /// twice).
    pub fn unique_suffix(&self) -> String {
        format!("{}-{:x}", self.id, self.slot())
    }

    /// The stored value (`|`-separated; device names and object keys never contain `|`).
    pub fn encode(&self) -> String {
        match &self.kind {
            PendingKind::Connected { prior, shown } => format!(
                "c|{}|{}|{}",
                self.device,
                connection_code(*prior),
                u8::from(*shown)
            ),
            PendingKind::Disconnected => format!("d|{}", self.device),
            PendingKind::Observed {
                key,
                hash,
                prior_known,
                shown,
            } => format!(
                "o|{}|{key}|{hash}|{}|{}",
                self.device,
                u8::from(*prior_known),
                u8::from(*shown)
            ),
        }
    }

    /// Parses a stored field (`id`) and value; None for anything malformed.
    pub fn decode(id: &str, value: &str) -> Option<Pending> {
        let decided_ms = id.split_once('-')?.0.parse().ok()?;
        let parts: Vec<&str> = value.split('|').collect();
        let (device, kind) = match parts.as_slice() {
            ["c", device, prior, shown] => (
                *device,
                PendingKind::Connected {
                    prior: parse_connection_code(prior)?,
                    shown: *shown == "1",
                },
            ),
            ["d", device] => (*device, PendingKind::Disconnected),
            ["o", device, key, hash, known, shown] => (
                *device,
                PendingKind::Observed {
                    key: ObjectKey::parse(key)?,
                    hash: (*hash).to_owned(),
                    prior_known: *known == "1",
                    shown: *shown == "1",
                },
            ),
            _ => return None,
        };
        Some(Pending {
            id: id.to_owned(),
            device: device.to_owned(),
            decided_ms,
            kind,
        })
    }
}

/// The one-letter code of a connection state in the store (`c`, `d`, `u`).
pub fn connection_code(connection: Connection) -> &'static str {
    match connection {
        Connection::Connected => "c",
        Connection::Disconnected => "d",
        Connection::Unknown => "u",
    }
}

/// See [`connection_code`].
pub fn parse_connection_code(code: &str) -> Option<Connection> {
    match code {
        "c" => Some(Connection::Connected),
        "d" => Some(Connection::Disconnected),
        "u" => Some(Connection::Unknown),
        _ => None,
    }
}

/// How many connected devices of some slots are stale, how many have been quiet for a while,
/// and how many are connected at all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StaleCount {
    /// Connected devices whose last report is at or before the stale cutoff.
    pub stale: u64,
    /// Connected devices whose last report is at or before the (later) quiet cutoff: stale, or
    /// about to be. Devices of a partition go quiet together but cross the stale cutoff spread
    /// over a heartbeat interval; this sees them all at once.
    pub quiet: u64,
    /// Connected devices.
    pub connected: u64,
}

/// An observed hash that changed with a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedChange {
    /// The DeviceProcess.
    pub key: ObjectKey,
    /// The newly observed hash.
    pub hash: String,
    /// Whether the store held an earlier hash (false after the store lost its state).
    pub prior_known: bool,
}

/// Everything the store holds about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// Connection state.
    pub connection: Connection,
    /// Last report, milliseconds since the Unix epoch.
    pub last_seen_ms: Option<i64>,
    /// The agent's version string from the last report.
    pub agent_version: Option<String>,
    /// Last observed hash per DeviceProcess.
    pub observed: HashMap<ObjectKey, String>,
}

impl DeviceRecord {
    /// A device the store knows nothing about.
    pub fn unknown() -> Self {
        Self {
            connection: Connection::Unknown,
            last_seen_ms: None,
            agent_version: None,
            observed: HashMap::new(),
        }
    }
}

/// The operations of the shared state.
pub trait StateStore: Send + Sync + 'static {
    /// Records a report in one round trip and decides its transitions.
    fn record_report(
        &self,
        input: &ReportInput<'_>,
    ) -> impl Future<Output = Result<ReportOutcome, Error>> + Send;

    /// Flips every connected device of `slots` whose last report is at or before `cutoff_ms` to
    /// disconnected, recording each flip as pending (decided at `now_ms`), and returns those. Each flip is returned to
    /// exactly one caller; a flip whose answer is lost (a slot failing after others succeeded, a
    /// timeout after the script ran) stays pending and is replayed.
    fn sweep(
        &self,
        slots: &[u16],
        cutoff_ms: i64,
        now_ms: i64,
    ) -> impl Future<Output = Result<Vec<Pending>, Error>> + Send;

    /// How many connected devices of `slots` a sweep at `cutoff_ms` would flip, how many have
    /// not reported since `quiet_cutoff_ms`, and how many are connected (the mass-staleness
    /// breaker's evidence).
    fn stale_count(
        &self,
        slots: &[u16],
        cutoff_ms: i64,
        quiet_cutoff_ms: i64,
    ) -> impl Future<Output = Result<StaleCount, Error>> + Send;

    /// Every transition still pending in `slots`.
    fn pending(&self, slots: &[u16]) -> impl Future<Output = Result<Vec<Pending>, Error>> + Send;

    /// Forgets delivered transitions.
    fn clear_pending(
        &self,
        delivered: &[Pending],
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Forgets the observed hash of a DeviceProcess that was deleted (so a new object of the
    /// same name does not inherit it).
    fn forget_observed(
        &self,
        device: &str,
        key: &ObjectKey,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Everything the store holds about `device`.
    fn device(&self, device: &str) -> impl Future<Output = Result<DeviceRecord, Error>> + Send;

    /// When the store has no record of `device` (it lost its state) but its status says
    /// connected: records it as connected as of `now_ms`, so that the sweep marks it stale if it
    /// does not report within the window. Returns whether it did.
    fn adopt_connected(
        &self,
        device: &str,
        now_ms: i64,
    ) -> impl Future<Output = Result<bool, Error>> + Send;

    /// Records the desired ETag last served to `device`.
    fn record_desired_etag(
        &self,
        device: &str,
        etag: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// The desired ETag last served to `device` by any replica.
    fn desired_etag(
        &self,
        device: &str,
    ) -> impl Future<Output = Result<Option<String>, Error>> + Send;

    /// Checks that the store answers.
    fn ping(&self) -> impl Future<Output = Result<(), Error>> + Send;
}

/// The store the gateway runs with: one of the backends, timed into the metrics.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    metrics: Metrics,
    clock: SharedClock,
    reception: Reception,
}

#[derive(Clone)]
enum Backend {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl Store {
    /// The in-memory backend.
    pub fn memory(metrics: Metrics) -> Self {
        Self {
            backend: Backend::Memory(MemoryStore::default()),
            metrics,
            clock: SharedClock::default(),
            reception: Reception::default(),
        }
    }

    /// The Redis backend.
    pub fn redis(store: RedisStore, metrics: Metrics) -> Self {
        let store = store.with_unreplicated_counter(metrics.store_unreplicated.clone());
        Self {
            clock: store.clock().clone(),
            backend: Backend::Redis(store),
            metrics,
            reception: Reception::default(),
        }
    }

    /// The clock lastSeen and sweep cutoffs are taken on (see [`SharedClock`]).
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// When the store was last unreachable (see [`Reception`]).
    pub fn reception(&self) -> &Reception {
        &self.reception
    }

    /// Pings the store every [`Reception::probe_interval`] until `shutdown`, so that
    /// [`Reception`] sees an answer at least that often while the store answers at all.
    pub async fn run_prober(self, shutdown: tokio_util::sync::CancellationToken) {
        let mut ticker = tokio::time::interval(self.reception.probe_interval());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            // A failure is recorded by `timed`; the readiness endpoint reports it.
            let _ = self.ping().await;
        }
    }

    /// Name of the backend, for logs.
    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backend::Memory(_) => "memory",
            Backend::Redis(r) if r.is_cluster() => "redis-cluster",
            Backend::Redis(_) => "redis",
        }
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let start = Instant::now();
        // A span only inside a traced operation (a request or a status write): background sweeps
        // would otherwise start a trace of their own every few seconds.
        let result = if tracing::Span::current().is_none() {
            call.await
        } else {
            let span = tracing::info_span!("state_store", otel.kind = "client", db.operation = op);
            tracing::Instrument::instrument(call, span).await
        };
        let labels = StoreLabels { op };
        self.metrics
            .store_seconds
            .get_or_create(&labels)
            .observe(start.elapsed().as_secs_f64());
        let now = Instant::now();
        if let Err(error) = &result {
            self.reception
                .failed_at(now, error.is_store_connection_lost());
            self.metrics.store_errors.get_or_create(&labels).inc();
        } else {
            self.reception.answered_at(start, now);
        }
        result
    }
}

macro_rules! dispatch {
    ($self:ident, $op:literal, $store:ident => $call:expr) => {
        match &$self.backend {
            Backend::Memory($store) => $self.timed($op, $call).await,
            Backend::Redis($store) => $self.timed($op, $call).await,
        }
    };
}

impl StateStore for Store {
    async fn record_report(&self, input: &ReportInput<'_>) -> Result<ReportOutcome, Error> {
        dispatch!(self, "report", s => s.record_report(input))
    }

    async fn sweep(
        &self,
        slots: &[u16],
        cutoff_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<Pending>, Error> {
        dispatch!(self, "sweep", s => s.sweep(slots, cutoff_ms, now_ms))
    }

    async fn stale_count(
        &self,
        slots: &[u16],
        cutoff_ms: i64,
        quiet_cutoff_ms: i64,
    ) -> Result<StaleCount, Error> {
        dispatch!(self, "stale_count", s => s.stale_count(slots, cutoff_ms, quiet_cutoff_ms))
    }

    async fn pending(&self, slots: &[u16]) -> Result<Vec<Pending>, Error> {
        dispatch!(self, "pending", s => s.pending(slots))
    }

    async fn clear_pending(&self, delivered: &[Pending]) -> Result<(), Error> {
        dispatch!(self, "clear_pending", s => s.clear_pending(delivered))
    }

    async fn forget_observed(&self, device: &str, key: &ObjectKey) -> Result<(), Error> {
        dispatch!(self, "forget_observed", s => s.forget_observed(device, key))
    }

    async fn device(&self, device: &str) -> Result<DeviceRecord, Error> {
        dispatch!(self, "device", s => s.device(device))
    }

    async fn adopt_connected(&self, device: &str, now_ms: i64) -> Result<bool, Error> {
        dispatch!(self, "adopt", s => s.adopt_connected(device, now_ms))
    }

    async fn record_desired_etag(&self, device: &str, etag: &str) -> Result<(), Error> {
        dispatch!(self, "record_etag", s => s.record_desired_etag(device, etag))
    }

    async fn desired_etag(&self, device: &str) -> Result<Option<String>, Error> {
        dispatch!(self, "desired_etag", s => s.desired_etag(device))
    }

    async fn ping(&self) -> Result<(), Error> {
        dispatch!(self, "ping", s => s.ping())
    }
}

/// The clock every replica shares: this machine's wall clock corrected by how far Redis' `TIME`
/// is ahead of it (measured by the cluster task on every membership heartbeat; 0 without Redis).
///
/// lastSeen is written by whichever replica took a report and compared against a cutoff by
/// whichever replica sweeps the shard; after a fail-over or a scale change those differ. Were
/// each to use its own wall clock, a replica whose clock runs ahead by more than the stale window
/// would mark every device another replica recorded disconnected. So times are taken on Redis'
/// clock. A handle, cloned into the store and the cluster task (no process-wide state).
#[derive(Clone, Debug, Default)]
pub struct SharedClock {
    offset_ms: std::sync::Arc<AtomicI64>,
}

impl SharedClock {
    /// Milliseconds since the Unix epoch, now, on the shared clock.
    pub fn now_ms(&self) -> i64 {
        wall_clock_ms() + self.offset_ms.load(Ordering::Relaxed)
    }

    /// Sets how far the shared clock is ahead of this machine's.
    pub fn set_offset_ms(&self, offset_ms: i64) {
        self.offset_ms.store(offset_ms, Ordering::Relaxed);
    }

    /// The offset last set.
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }
}

/// This machine's wall clock, milliseconds since the Unix epoch.
pub fn wall_clock_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// The offset one clock reading implies: the shared clock read `shared_ms` somewhere between our
/// readings `sent_ms` and `received_ms`; the midpoint is the best estimate, good to half the round
/// trip. `None` when the round trip is too long for the reading to be worth taking.
pub fn offset_from_reading(sent_ms: i64, shared_ms: i64, received_ms: i64) -> Option<i64> {
    /// Readings with a longer round trip are ignored (the error is up to half of it).
    const MAX_ROUND_TRIP_MS: i64 = 200;
    let round_trip = received_ms - sent_ms;
    (0..=MAX_ROUND_TRIP_MS)
        .contains(&round_trip)
        .then(|| shared_ms - (sent_ms + round_trip / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_gives_the_offset_at_the_midpoint_of_the_round_trip() {
        // Sent at 1000, answered at 1010 by a clock reading 31005: it is 30 s ahead.
        assert_eq!(offset_from_reading(1_000, 31_005, 1_010), Some(30_000));
        // A clock behind ours.
        assert_eq!(offset_from_reading(50_000, 20_001, 50_002), Some(-30_000));
        // Too slow a round trip, or a clock that went backwards meanwhile: no reading.
        assert_eq!(offset_from_reading(1_000, 5_000, 1_500), None);
        assert_eq!(offset_from_reading(1_000, 5_000, 990), None);
    }
}
