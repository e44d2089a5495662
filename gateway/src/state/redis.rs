//! Redis state, shared by every replica.
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

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use apollo_protocol::shard::{slot, slot_tag};
use futures::{StreamExt, TryStreamExt};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::{
    parse_connection_code, Connection, DeviceRecord, ObservedChange, Pending, ReportInput,
    ReportOutcome, StaleCount, StateStore, RETENTION_SECONDS,
};
use crate::error::Error;
use crate::model::ObjectKey;

/// Bound of every Redis call.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Most devices one sweep call flips (the script is called again while it returns this many).
const SWEEP_BATCH: usize = 500;
/// Slots swept concurrently.
const SWEEP_CONCURRENCY: usize = 16;

const REPORT_SCRIPT: &str = r"
-- KEYS: device hash, observed hash, connected zset, pending hash, sequence (one slot)
-- ARGV: device, now ms, agent version, retention seconds, connection shown (0/1),
--       then (field, hash, hash shown (0/1)) triples
local prior = 'u'
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  prior = 'c'
elseif redis.call('HEXISTS', KEYS[1], 'seen') == 1 then
  prior = 'd'
end
redis.call('HSET', KEYS[1], 'seen', ARGV[2], 'version', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
local function pend(value)
  local id = ARGV[2] .. '-' .. redis.call('INCR', KEYS[5])
  redis.call('HSET', KEYS[4], id, value)
  redis.call('EXPIRE', KEYS[4], ARGV[4])
  return id
end
local connect_id = ''
if prior ~= 'c' then
  connect_id = pend('c|' .. ARGV[1] .. '|' .. prior .. '|' .. ARGV[5])
end
local changed = {}
for i = 6, #ARGV, 3 do
  local old = redis.call('HGET', KEYS[2], ARGV[i])
  if old ~= ARGV[i + 1] then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    local known = old and '1' or '0'
    changed[#changed + 1] = ARGV[i]
    changed[#changed + 1] = known
    changed[#changed + 1] = pend('o|' .. ARGV[1] .. '|' .. ARGV[i] .. '|' .. ARGV[i + 1] .. '|' .. known .. '|' .. ARGV[i + 2])
  end
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {prior, changed, connect_id}
";

const SWEEP_SCRIPT: &str = r"
-- KEYS: connected zset, pending hash, sequence (one slot)
-- ARGV: cutoff ms, batch size, now ms, retention seconds
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
if #stale > 0 then
  redis.call('ZREM', KEYS[1], unpack(stale))
  for _, device in ipairs(stale) do
    local id = ARGV[3] .. '-' .. redis.call('INCR', KEYS[3])
    redis.call('HSET', KEYS[2], id, 'd|' .. device)
    out[#out + 1] = id
    out[#out + 1] = device
  end
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return out
";

const ADOPT_SCRIPT: &str = r"
-- KEYS: device hash, connected zset; ARGV: device, now ms, retention seconds
if redis.call('HEXISTS', KEYS[1], 'seen') == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'seen', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
";

/// State in Redis.
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    prefix: String,
    report: Script,
    sweep: Script,
    adopt: Script,
}

impl RedisStore {
    /// A store for `url`. Connects lazily and reconnects by itself, so a Redis that is down at
    /// start-up (or restarts) only fails the calls made meanwhile.
    pub fn new(url: &str) -> Result<Self, Error> {
        Self::with_prefix(url, "apollo")
    }

    /// A store whose keys start with `prefix` (tests share one redis-server this way).
    pub fn with_prefix(url: &str, prefix: &str) -> Result<Self, Error> {
        let client = redis::Client::open(url).map_err(Error::RedisUrl)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CALL_TIMEOUT))
            .set_response_timeout(Some(CALL_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let connection =
            ConnectionManager::new_lazy_with_config(client, config).map_err(Error::RedisUrl)?;
        Ok(Self {
            connection,
            prefix: prefix.to_owned(),
            report: Script::new(REPORT_SCRIPT),
            sweep: Script::new(SWEEP_SCRIPT),
            adopt: Script::new(ADOPT_SCRIPT),
        })
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

    async fn sweep_slot(&self, slot: u16, cutoff_ms: i64, now_ms: i64) -> Result<Vec<Pending>, Error> {
        let mut flipped = Vec::new();
        loop {
            let mut connection = self.connection.clone();
            let mut call = self.sweep.key(self.connected_key(slot));
            call.key(self.pending_key(slot))
                .key(self.seq_key(slot))
                .arg(cutoff_ms)
                .arg(SWEEP_BATCH)
                .arg(now_ms)
                .arg(RETENTION_SECONDS);
            let batch: Vec<String> = bounded("sweep", call.invoke_async(&mut connection)).await?;
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
        let (stale, quiet, connected): (u64, u64, u64) =
            bounded("stale_count", pipe.query_async(&mut connection)).await?;
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
            bounded("pending", cmd.query_async(&mut connection)).await?;
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

async fn bounded<T>(
    op: &'static str,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, Error> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(Error::RedisCommand { op, source }),
        Err(_) => Err(Error::RedisTimeout { op }),
    }
}

impl StateStore for RedisStore {
    async fn record_report(&self, input: &ReportInput<'_>) -> Result<ReportOutcome, Error> {
        let slot = slot(input.device);
        let mut call = self.report.key(self.device_key(input.device));
        call.key(self.observed_key(input.device))
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
        let mut connection = self.connection.clone();
        let (prior, changed, connect_id): (String, Vec<String>, String) =
            bounded("report", call.invoke_async(&mut connection)).await?;
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
        Ok(counts.into_iter().fold(StaleCount::default(), |a, c| StaleCount {
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
            bounded("clear_pending", cmd.query_async::<i64>(&mut connection)).await?;
        }
        Ok(())
    }

    async fn forget_observed(&self, device: &str, key: &ObjectKey) -> Result<(), Error> {
        let mut connection = self.connection.clone();
        let mut cmd = redis::cmd("HDEL");
        cmd.arg(self.observed_key(device)).arg(key.to_string());
        bounded("forget_observed", cmd.query_async::<i64>(&mut connection)).await?;
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
        ) = bounded("device", pipe.query_async(&mut connection)).await?;
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
        let mut call = self.adopt.key(self.device_key(device));
        call.key(self.connected_key(slot(device)))
            .arg(device)
            .arg(now_ms)
            .arg(RETENTION_SECONDS);
        let mut connection = self.connection.clone();
        let adopted: i64 = bounded("adopt", call.invoke_async(&mut connection)).await?;
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
        bounded("record_etag", pipe.query_async::<()>(&mut connection)).await
    }

    async fn desired_etag(&self, device: &str) -> Result<Option<String>, Error> {
        let mut connection = self.connection.clone();
        let mut cmd = redis::cmd("HGET");
        cmd.arg(self.device_key(device)).arg("etag");
        bounded("desired_etag", cmd.query_async(&mut connection)).await
    }

    async fn ping(&self) -> Result<(), Error> {
        let mut connection = self.connection.clone();
        let pong: String = bounded("ping", redis::cmd("PING").query_async(&mut connection)).await?;
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
