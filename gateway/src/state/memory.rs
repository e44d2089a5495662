//! In-memory state for a single replica (the default without `--redis-url`). The same semantics
//! as Redis; atomicity comes from one mutex.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use apollo_protocol::shard::{slot, SLOT_COUNT};

use super::{Connection, DeviceRecord, ObservedChange, ReportInput, ReportOutcome, StateStore};
use crate::error::Error;
use crate::model::ObjectKey;

/// State held in this process.
#[derive(Clone, Default)]
pub struct MemoryStore {
    devices: Arc<Mutex<HashMap<String, MemoryDevice>>>,
}

#[derive(Default)]
struct MemoryDevice {
    last_seen_ms: Option<i64>,
    agent_version: Option<String>,
    connected: bool,
    observed: HashMap<ObjectKey, String>,
    desired_etag: Option<String>,
}

impl MemoryDevice {
    fn connection(&self) -> Connection {
        match (self.connected, self.last_seen_ms) {
            (true, _) => Connection::Connected,
            (false, Some(_)) => Connection::Disconnected,
            (false, None) => Connection::Unknown,
        }
    }
}

impl MemoryStore {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, MemoryDevice>> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl StateStore for MemoryStore {
    async fn record_report(&self, input: &ReportInput<'_>) -> Result<ReportOutcome, Error> {
        let mut devices = self.lock();
        let device = devices.entry(input.device.to_owned()).or_default();
        let prior = device.connection();
        device.connected = true;
        device.last_seen_ms = Some(input.now_ms);
        device.agent_version = Some(input.agent_version.to_owned());
        let mut changed = Vec::new();
        for (key, hash) in &input.observations {
            let old = device.observed.insert(key.clone(), hash.clone());
            if old.as_deref() != Some(hash.as_str()) {
                changed.push(ObservedChange {
                    key: key.clone(),
                    hash: hash.clone(),
                    prior_known: old.is_some(),
                });
            }
        }
        Ok(ReportOutcome { prior, changed })
    }

    async fn sweep(&self, slots: &[u16], cutoff_ms: i64) -> Result<Vec<String>, Error> {
        let mut wanted = vec![false; usize::from(SLOT_COUNT)];
        for s in slots {
            if let Some(w) = wanted.get_mut(usize::from(*s)) {
                *w = true;
            }
        }
        let mut flipped = Vec::new();
        for (name, device) in self.lock().iter_mut() {
            let stale = device.connected && device.last_seen_ms.is_some_and(|t| t <= cutoff_ms);
            if stale && wanted[usize::from(slot(name))] {
                device.connected = false;
                flipped.push(name.clone());
            }
        }
        Ok(flipped)
    }

    async fn device(&self, device: &str) -> Result<DeviceRecord, Error> {
        Ok(match self.lock().get(device) {
            None => DeviceRecord::unknown(),
            Some(d) => DeviceRecord {
                connection: d.connection(),
                last_seen_ms: d.last_seen_ms,
                agent_version: d.agent_version.clone(),
                observed: d.observed.clone(),
            },
        })
    }

    async fn adopt_connected(&self, device: &str, now_ms: i64) -> Result<bool, Error> {
        let mut devices = self.lock();
        let entry = devices.entry(device.to_owned()).or_default();
        if entry.last_seen_ms.is_some() {
            return Ok(false);
        }
        entry.last_seen_ms = Some(now_ms);
        entry.connected = true;
        Ok(true)
    }

    async fn record_desired_etag(&self, device: &str, etag: &str) -> Result<(), Error> {
        self.lock()
            .entry(device.to_owned())
            .or_default()
            .desired_etag = Some(etag.to_owned());
        Ok(())
    }

    async fn desired_etag(&self, device: &str) -> Result<Option<String>, Error> {
        Ok(self.lock().get(device).and_then(|d| d.desired_etag.clone()))
    }

    async fn ping(&self) -> Result<(), Error> {
        Ok(())
    }
}
