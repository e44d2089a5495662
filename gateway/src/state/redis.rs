//! Redis state, shared by every replica.
//!
//! Keys (every key of a device carries the hash tag of its slot, so each script and pipeline
//! stays inside one Redis Cluster slot):
//! - `apollo:{s<slot>}:device:<device>` hash: `seen` (last report, ms), `version` (agent
//!   version), `etag` (last served desired ETag);
//! - `apollo:{s<slot>}:observed:<device>` hash: `<namespace>/<name>` -> observed spec hash;
//! - `apollo:{s<slot>}:connected` sorted set: connected devices scored by last report (ms).
//!   Membership *is* the connection state; a known device outside it is disconnected.
//!
//! A report is one EVALSHA; a sweep of a slot is one EVALSHA that removes stale members and
//! returns them, so each flip is seen by exactly one sweeper.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use apollo_protocol::shard::{slot, slot_tag};
use futures::{StreamExt, TryStreamExt};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::{
    Connection, DeviceRecord, ObservedChange, ReportInput, ReportOutcome, StateStore,
    RETENTION_SECONDS,
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
-- KEYS: device hash, observed hash, connected zset (one slot)
-- ARGV: device, now ms, agent version, retention seconds, then (field, hash) pairs
local prior = 'u'
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  prior = 'c'
elseif redis.call('HEXISTS', KEYS[1], 'seen') == 1 then
  prior = 'd'
end
redis.call('HSET', KEYS[1], 'seen', ARGV[2], 'version', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
local changed = {}
for i = 5, #ARGV, 2 do
  local old = redis.call('HGET', KEYS[2], ARGV[i])
  if old ~= ARGV[i + 1] then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    changed[#changed + 1] = ARGV[i]
    changed[#changed + 1] = old and '1' or '0'
  end
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {prior, changed}
";

const SWEEP_SCRIPT: &str = r"
-- KEYS: connected zset of one slot; ARGV: cutoff ms, batch size
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #stale > 0 then
  redis.call('ZREM', KEYS[1], unpack(stale))
end
return stale
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

    async fn sweep_slot(&self, slot: u16, cutoff_ms: i64) -> Result<Vec<String>, Error> {
        let key = self.connected_key(slot);
        let mut flipped = Vec::new();
        loop {
            let mut connection = self.connection.clone();
            let mut call = self.sweep.key(&key);
            call.arg(cutoff_ms).arg(SWEEP_BATCH);
            let batch: Vec<String> = bounded("sweep", call.invoke_async(&mut connection)).await?;
            let done = batch.len() < SWEEP_BATCH;
            flipped.extend(batch);
            if done {
                return Ok(flipped);
            }
        }
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

fn parse_connection(prior: &str) -> Result<Connection, Error> {
    match prior {
        "c" => Ok(Connection::Connected),
        "d" => Ok(Connection::Disconnected),
        "u" => Ok(Connection::Unknown),
        other => Err(Error::RedisReply {
            op: "report",
            detail: format!("unknown prior state {other:?}"),
        }),
    }
}

impl StateStore for RedisStore {
    async fn record_report(&self, input: &ReportInput<'_>) -> Result<ReportOutcome, Error> {
        let mut call = self.report.key(self.device_key(input.device));
        call.key(self.observed_key(input.device))
            .key(self.connected_key(slot(input.device)))
            .arg(input.device)
            .arg(input.now_ms)
            .arg(input.agent_version)
            .arg(RETENTION_SECONDS);
        let mut hashes: HashMap<String, &str> = HashMap::new();
        for (key, hash) in &input.observations {
            let field = key.to_string();
            call.arg(&field).arg(hash);
            hashes.insert(field, hash);
        }
        let mut connection = self.connection.clone();
        let (prior, changed): (String, Vec<String>) =
            bounded("report", call.invoke_async(&mut connection)).await?;
        let prior = parse_connection(&prior)?;
        let changed = changed
            .chunks(2)
            .map(|pair| match pair {
                [field, known] => {
                    let key = ObjectKey::parse(field);
                    let hash = hashes.get(field.as_str());
                    match (key, hash) {
                        (Some(key), Some(hash)) => Ok(ObservedChange {
                            key,
                            hash: (*hash).to_owned(),
                            prior_known: known == "1",
                        }),
                        _ => Err(Error::RedisReply {
                            op: "report",
                            detail: format!("unexpected observed field {field:?}"),
                        }),
                    }
                }
                _ => Err(Error::RedisReply {
                    op: "report",
                    detail: "odd number of change entries".into(),
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ReportOutcome { prior, changed })
    }

    async fn sweep(&self, slots: &[u16], cutoff_ms: i64) -> Result<Vec<String>, Error> {
        let per_slot: Vec<Vec<String>> = futures::stream::iter(slots.iter().copied())
            .map(|s| self.sweep_slot(s, cutoff_ms))
            .buffer_unordered(SWEEP_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(per_slot.into_iter().flatten().collect())
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
