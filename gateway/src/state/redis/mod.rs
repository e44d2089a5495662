//! Redis state, shared by every replica: a single Redis or a Redis Cluster (`--redis-url`, see
//! [`apollo_runtime::redis`]).
//!
//! Keys (every key of a device carries the hash tag of its slot, so each script and pipeline
//! stays inside one Redis Cluster slot):
//! - `apollo:{s<slot>}:device:<device>` hash: `seen` (last report, ms), `version` (agent
//!   version), `etag` (last served desired ETag);
//! - `apollo:{s<slot>}:observed:<device>` hash: `<namespace>/<name>` -> observed spec hash;
//! - `apollo:{s<slot>}:connected` sorted set: connected devices scored by last report (ms).
//!   Membership *is* the connection state; a known device outside it is disconnected;
//! - `apollo:{s<slot>}:pending` hash: transitions decided but not yet delivered (status patch and
//!   Event), `<decided ms>-<sequence>` -> the transition (see [`Pending::encode`]);
//! - `apollo:{s<slot>}:seq` counter of those ids.
//!
//! A report is one EVALSHA that also records the transitions it decides as pending; a sweep of a
//! slot is one EVALSHA that removes stale members, records each flip as pending and returns them,
//! so each flip is seen by exactly one sweeper and survives whatever happens to that sweeper.
//!
//! # Redis Cluster
//!
//! Every call names keys of one slot only, so in a cluster it goes to that slot's master in one
//! round trip (the client follows `MOVED`/`ASK` and refreshes its slot map after a failover). A
//! sweep iterates the owned slots, each on its own master; nothing here lists keys (no `KEYS` or
//! `SCAN`), and `PING` asks every master.
//!
//! What Redis guarantees across a failover, and what it does not:
//! - a script is atomic on its master, and its effects reach the replica as one unit (a
//!   MULTI/EXEC in the replication stream): a replica holds a decision *and* its pending record,
//!   or neither, never half;
//! - a planned failover (`CLUSTER FAILOVER` on a replica, as an operator or an upgrade does it)
//!   first pauses the master's clients and lets the replica catch up with its replication offset:
//!   nothing acknowledged is lost;
//! - an unplanned failover (the master dies, its replica is promoted after
//!   `cluster-node-timeout`) loses whatever the master acknowledged but had not yet sent to the
//!   replica: replication is asynchronous. `WAIT` narrows that window but is no consensus either
//!   (a replica that acknowledged is not necessarily the one promoted, with several replicas).
//!
//! What the gateway does about it: with `wait-replicas=N` in the URL, every deciding script (a
//! report, a sweep batch) is followed in the same pipeline by `WAIT N <wait-timeout>`, so a
//! decision is acknowledged by N replicas before its transition is delivered, still in one round
//! trip; a short count is logged (see [`RedisStore::unreplicated_writes`]) and the report is
//! served anyway: refusing it would not undo the decision on the master. Should a decision be
//! lost all the same, it is lost together with the state change that made it (the atomicity
//! above), so it is decided again: the device's next report finds the store without it (a
//! reconnect or an observation decided anew), a sweep finds the device still in the connected
//! set, and the slow resync repairs any status that disagrees with the store. A transition the
//! deciding replica delivered before the loss can at worst be decided and delivered twice (a
//! second Event), never not at all.

mod calls;
mod scripts;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use apollo_protocol::shard::{slot, slot_tag};
use apollo_runtime::redis::{Eval, RedisConnection, RedisTarget, Timeouts, WaitReplicas};
use futures::{StreamExt, TryStreamExt};

use self::calls::{bounded, Unreplicated};
use self::scripts::{ADOPT_SCRIPT, REPORT_SCRIPT, SWEEP_SCRIPT};
use super::{
    parse_connection_code, Connection, DeviceRecord, ObservedChange, Pending, ReportInput,
    ReportOutcome, StaleCount, StateStore, RETENTION_SECONDS,
};
use crate::error::Error;
use crate::model::ObjectKey;

/// Bound of every Redis call (plus the `WAIT` timeout on deciding writes).
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Most devices one sweep call flips (the script is called again while it returns this many).
const SWEEP_BATCH: usize = 500;
/// A sweep script running later than this after it was issued flips nothing (see the script).
const SWEEP_LATEST_MS: i64 = 1_000;
/// Slots swept concurrently.
const SWEEP_CONCURRENCY: usize = 16;

/// State in Redis.
#[derive(Clone)]
pub struct RedisStore {
    connection: RedisConnection,
    cluster: bool,
    prefix: String,
    wait: Option<WaitReplicas>,
    report: Arc<Eval>,
    sweep: Arc<Eval>,
    adopt: Arc<Eval>,
    unreplicated: Arc<Unreplicated>,
    /// This process's estimate of Redis' clock (shared with the [`super::Store`]): when a sweep
    /// was issued, to tell a sweep that sat in a paused Redis.
    clock: super::SharedClock,
}

impl RedisStore {
    /// A store for `url` (any form of [`apollo_runtime::redis`]). Connects lazily and reconnects
    /// by itself, so a Redis that is down at start-up (or restarts, or fails over) only fails the
    /// calls made meanwhile.
    pub fn new(url: &str) -> Result<Self, Error> {
        Self::with_prefix(url, "apollo")
    }

    /// A store whose keys start with `prefix` (tests share one redis-server this way).
    pub fn with_prefix(url: &str, prefix: &str) -> Result<Self, Error> {
        let target = RedisTarget::parse(url).map_err(|e| Error::RedisUrl(e.to_string()))?;
        let wait = target.wait_replicas();
        let response = CALL_TIMEOUT + wait.map_or(Duration::ZERO, |w| w.timeout);
        let connection = target
            .connect_lazy(Timeouts {
                connect: CALL_TIMEOUT,
                response,
            })
            .map_err(|e| Error::RedisUrl(e.to_string()))?;
        Ok(Self {
            connection,
            cluster: target.is_cluster(),
            prefix: prefix.to_owned(),
            wait,
            report: Arc::new(Eval::new(REPORT_SCRIPT)),
            sweep: Arc::new(Eval::new(SWEEP_SCRIPT)),
            adopt: Arc::new(Eval::new(ADOPT_SCRIPT)),
            unreplicated: Arc::default(),
            clock: super::SharedClock::default(),
        })
    }

    /// Whether the store is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// Deciding writes that fewer replicas acknowledged within the `wait-timeout` than
    /// `wait-replicas` asked for (0 without `wait-replicas`).
    pub fn unreplicated_writes(&self) -> u64 {
        self.unreplicated.count.get()
    }

    /// Counts short acknowledgements into `counter` (the gateway's metric) from now on.
    pub fn with_unreplicated_counter(
        mut self,
        counter: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        self.unreplicated = Arc::new(Unreplicated {
            count: counter,
            warned_ms: Default::default(),
        });
        self
    }

    fn device_key(&self, device: &str) -> String {
        format!("{}:{}:device:{device}", self.prefix, slot_tag(slot(device)))
    }

    fn observed_key(&self, device: &str) -> String {
        format!(
            "{}:{}:observed:{device}",
            self.prefix,
            slot_tag(slot(device))
        )
    }

    fn connected_key(&self, slot: u16) -> String {
        format!("{}:{}:connected", self.prefix, slot_tag(slot))
    }

    fn pending_key(&self, slot: u16) -> String {
        format!("{}:{}:pending", self.prefix, slot_tag(slot))
    }

    fn seq_key(&self, slot: u16) -> String {
        format!("{}:{}:seq", self.prefix, slot_tag(slot))
    }

    /// The clock shared with the [`super::Store`] holding this backend.
    pub(super) fn clock(&self) -> &super::SharedClock {
        &self.clock
    }

    async fn sweep_slot(
        &self,
        slot: u16,
        cutoff_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<Pending>, Error> {
        let mut flipped = Vec::new();
        loop {
            let mut call = self.sweep.call();
            call.key(self.connected_key(slot))
                .key(self.pending_key(slot))
                .key(self.seq_key(slot))
                .arg(cutoff_ms)
                .arg(SWEEP_BATCH)
                .arg(now_ms)
                .arg(RETENTION_SECONDS)
                .arg(SWEEP_LATEST_MS)
                .arg(self.clock.now_ms());
            let batch: Vec<String> = self.eval("sweep", &call, true).await?;
            if batch.first().is_some_and(|f| f == "late") {
                return Err(Error::RedisLate {
                    op: "sweep",
                    lag_ms: batch.get(1).cloned().unwrap_or_default(),
                });
            }
            let done = batch.len() < 2 * SWEEP_BATCH;
            for pair in batch.chunks(2) {
                if let [id, device] = pair {
                    flipped.push(Pending {
                        id: id.clone(),
                        device: device.clone(),
                        decided_ms: now_ms,
                        kind: super::PendingKind::Disconnected,
                    });
                }
            }
            if done {
                return Ok(flipped);
            }
        }
    }

    async fn stale_count_slot(
        &self,
        slot: u16,
        cutoff_ms: i64,
        quiet_cutoff_ms: i64,
    ) -> Result<StaleCount, Error> {
        let key = self.connected_key(slot);
        let mut pipe = redis::pipe();
        pipe.cmd("ZCOUNT")
            .arg(&key)
            .arg("-inf")
            .arg(cutoff_ms)
            .cmd("ZCOUNT")
            .arg(&key)
            .arg("-inf")
            .arg(quiet_cutoff_ms)
            .cmd("ZCARD")
            .arg(&key);
        let mut connection = self.connection.clone();
        let (stale, quiet, connected): (u64, u64, u64) = bounded(
            "stale_count",
            CALL_TIMEOUT,
            pipe.query_async(&mut connection),
        )
        .await?;
        Ok(StaleCount {
            stale,
            quiet,
            connected,
        })
    }

    async fn pending_slot(&self, slot: u16) -> Result<Vec<Pending>, Error> {
        let mut connection = self.connection.clone();
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.pending_key(slot));
        let entries: HashMap<String, String> =
            bounded("pending", CALL_TIMEOUT, cmd.query_async(&mut connection)).await?;
        let mut out = Vec::with_capacity(entries.len());
        for (id, value) in entries {
            match Pending::decode(&id, &value) {
                Some(p) => out.push(p),
                None => tracing::warn!(slot, %id, %value, "ignoring a malformed pending entry"),
            }
        }
        Ok(out)
    }
}

impl StateStore for RedisStore {
    async fn record_report(&self, input: &ReportInput<'_>) -> Result<ReportOutcome, Error> {
        let slot = slot(input.device);
        let mut call = self.report.call();
        call.key(self.device_key(input.device))
            .key(self.observed_key(input.device))
            .key(self.connected_key(slot))
            .key(self.pending_key(slot))
            .key(self.seq_key(slot))
            .arg(input.device)
            .arg(input.now_ms)
            .arg(input.agent_version)
            .arg(RETENTION_SECONDS)
            .arg(u8::from(input.shown.connected));
        let mut hashes: HashMap<String, (&str, bool)> = HashMap::new();
        for (key, hash) in &input.observations {
            let field = key.to_string();
            let shown = input.shown.observed.contains(key);
            call.arg(&field).arg(hash).arg(u8::from(shown));
            hashes.insert(field, (hash, shown));
        }
        let (prior, changed, connect_id): (String, Vec<String>, String) =
            self.eval("report", &call, true).await?;
        let prior = parse_connection_code(&prior).ok_or_else(|| Error::RedisReply {
            op: "report",
            detail: format!("unknown prior state {prior:?}"),
        })?;
        let mut pending = Vec::new();
        if !connect_id.is_empty() {
            pending.push(Pending {
                id: connect_id,
                device: input.device.to_owned(),
                decided_ms: input.now_ms,
                kind: super::PendingKind::Connected {
                    prior,
                    shown: input.shown.connected,
                },
            });
        }
        let mut changes = Vec::new();
        for triple in changed.chunks(3) {
            let [field, known, id] = triple else {
                return Err(Error::RedisReply {
                    op: "report",
                    detail: "change entries are not triples".into(),
                });
            };
            let (Some(key), Some((hash, shown))) =
                (ObjectKey::parse(field), hashes.get(field.as_str()))
            else {
                return Err(Error::RedisReply {
                    op: "report",
                    detail: format!("unexpected observed field {field:?}"),
                });
            };
            let prior_known = known == "1";
            pending.push(Pending {
                id: id.clone(),
                device: input.device.to_owned(),
                decided_ms: input.now_ms,
                kind: super::PendingKind::Observed {
                    key: key.clone(),
                    hash: (*hash).to_owned(),
                    prior_known,
                    shown: *shown,
                },
            });
            changes.push(ObservedChange {
                key,
                hash: (*hash).to_owned(),
                prior_known,
            });
        }
        Ok(ReportOutcome {
            prior,
            changed: changes,
            pending,
        })
    }

    async fn sweep(
        &self,
        slots: &[u16],
        cutoff_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<Pending>, Error> {
        let per_slot: Vec<Vec<Pending>> = futures::stream::iter(slots.iter().copied())
            .map(|s| self.sweep_slot(s, cutoff_ms, now_ms))
            .buffer_unordered(SWEEP_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(per_slot.into_iter().flatten().collect())
    }

    async fn stale_count(
        &self,
        slots: &[u16],
        cutoff_ms: i64,
        quiet_cutoff_ms: i64,
    ) -> Result<StaleCount, Error> {
        let counts: Vec<StaleCount> = futures::stream::iter(slots.iter().copied())
            .map(|s| self.stale_count_slot(s, cutoff_ms, quiet_cutoff_ms))
            .buffer_unordered(SWEEP_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(counts
            .into_iter()
            .fold(StaleCount::default(), |a, c| StaleCount {
                stale: a.stale + c.stale,
                quiet: a.quiet + c.quiet,
                connected: a.connected + c.connected,
            }))
    }

    async fn pending(&self, slots: &[u16]) -> Result<Vec<Pending>, Error> {
        let per_slot: Vec<Vec<Pending>> = futures::stream::iter(slots.iter().copied())
            .map(|s| self.pending_slot(s))
            .buffer_unordered(SWEEP_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(per_slot.into_iter().flatten().collect())
    }

    async fn clear_pending(&self, delivered: &[Pending]) -> Result<(), Error> {
        let mut by_slot: HashMap<u16, Vec<&str>> = HashMap::new();
        for p in delivered {
            by_slot.entry(p.slot()).or_default().push(&p.id);
        }
        for (slot, ids) in by_slot {
            let mut connection = self.connection.clone();
            let mut cmd = redis::cmd("HDEL");
            cmd.arg(self.pending_key(slot)).arg(ids);
            bounded(
                "clear_pending",
                CALL_TIMEOUT,
                cmd.query_async::<i64>(&mut connection),
            )
            .await?;
        }
        Ok(())
    }

    async fn forget_observed(&self, device: &str, key: &ObjectKey) -> Result<(), Error> {
        let mut connection = self.connection.clone();
        let mut cmd = redis::cmd("HDEL");
        cmd.arg(self.observed_key(device)).arg(key.to_string());
        bounded(
            "forget_observed",
            CALL_TIMEOUT,
            cmd.query_async::<i64>(&mut connection),
        )
        .await?;
        Ok(())
    }

    async fn device(&self, device: &str) -> Result<DeviceRecord, Error> {
        let mut connection = self.connection.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL")
            .arg(self.device_key(device))
            .cmd("ZSCORE")
            .arg(self.connected_key(slot(device)))
            .arg(device)
            .cmd("HGETALL")
            .arg(self.observed_key(device));
        let (fields, score, observed): (
            HashMap<String, String>,
            Option<f64>,
            HashMap<String, String>,
        ) = bounded("device", CALL_TIMEOUT, pipe.query_async(&mut connection)).await?;
        let last_seen_ms = fields.get("seen").and_then(|s| s.parse::<i64>().ok());
        let connection = match (score, last_seen_ms) {
            (Some(_), _) => Connection::Connected,
            (None, Some(_)) => Connection::Disconnected,
            (None, None) => Connection::Unknown,
        };
        Ok(DeviceRecord {
            connection,
            last_seen_ms,
            agent_version: fields.get("version").cloned(),
            observed: observed
                .into_iter()
                .filter_map(|(field, hash)| ObjectKey::parse(&field).map(|k| (k, hash)))
                .collect(),
        })
    }

    async fn adopt_connected(&self, device: &str, now_ms: i64) -> Result<bool, Error> {
        let mut call = self.adopt.call();
        call.key(self.device_key(device))
            .key(self.connected_key(slot(device)))
            .arg(device)
            .arg(now_ms)
            .arg(RETENTION_SECONDS);
        let adopted: i64 = self.eval("adopt", &call, false).await?;
        Ok(adopted == 1)
    }

    async fn record_desired_etag(&self, device: &str, etag: &str) -> Result<(), Error> {
        let key = self.device_key(device);
        let mut connection = self.connection.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(&key)
            .arg("etag")
            .arg(etag)
            .ignore()
            .cmd("EXPIRE")
            .arg(&key)
            .arg(RETENTION_SECONDS)
            .ignore();
        bounded(
            "record_etag",
            CALL_TIMEOUT,
            pipe.query_async::<()>(&mut connection),
        )
        .await
    }

    async fn desired_etag(&self, device: &str) -> Result<Option<String>, Error> {
        let mut connection = self.connection.clone();
        let mut cmd = redis::cmd("HGET");
        cmd.arg(self.device_key(device)).arg("etag");
        bounded(
            "desired_etag",
            CALL_TIMEOUT,
            cmd.query_async(&mut connection),
        )
        .await
    }

    async fn ping(&self) -> Result<(), Error> {
        let mut connection = self.connection.clone();
        let pong: String = bounded(
            "ping",
            CALL_TIMEOUT,
            redis::cmd("PING").query_async(&mut connection),
        )
        .await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(Error::RedisReply {
                op: "ping",
                detail: format!("answered {pong:?}"),
            })
        }
    }
}
