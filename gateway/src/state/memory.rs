//! In-memory state for a single replica (the default without `--redis-url`). The same semantics
//! as Redis; atomicity comes from one mutex.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use apollo_protocol::shard::{slot, SLOT_COUNT};

use super::{
    Connection, DeviceRecord, ObservedChange, Pending, PendingKind, ReportInput, ReportOutcome,
    StaleCount, StateStore,
};
use crate::error::Error;
use crate::model::ObjectKey;

/// State held in this process.
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<MemoryState>>,
}

#[derive(Default)]
struct MemoryState {
    devices: HashMap<String, MemoryDevice>,
    /// Pending transitions by slot, then id.
    pending: BTreeMap<u16, BTreeMap<String, Pending>>,
    /// Per-slot sequence of pending ids.
    seq: HashMap<u16, u64>,
}

impl MemoryState {
    fn pend(&mut self, device: &str, decided_ms: i64, kind: PendingKind) -> Pending {
        let slot = slot(device);
        let seq = self.seq.entry(slot).or_default();
        *seq += 1;
        let pending = Pending {
            id: format!("{decided_ms}-{seq}"),
            device: device.to_owned(),
            decided_ms,
            kind,
        };
        self.pending
            .entry(slot)
            .or_default()
            .insert(pending.id.clone(), pending.clone());
        pending
    }
}

fn slot_set(slots: &[u16]) -> Vec<bool> {
    let mut wanted = vec![false; usize::from(SLOT_COUNT)];
    for s in slots {
        if let Some(w) = wanted.get_mut(usize::from(*s)) {
            *w = true;
        }
    }
    wanted
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
    fn lock(&self) -> MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl StateStore for MemoryStore {
    async fn record_report(&self, input: &ReportInput<'_>) -> Result<ReportOutcome, Error> {
        let mut state = self.lock();
        let device = state.devices.entry(input.device.to_owned()).or_default();
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
        let mut pending = Vec::new();
        if prior != Connection::Connected {
            pending.push(state.pend(
                input.device,
                input.now_ms,
                PendingKind::Connected {
                    prior,
                    shown: input.shown.connected,
                },
            ));
        }
        for c in &changed {
            pending.push(state.pend(
                input.device,
                input.now_ms,
                PendingKind::Observed {
                    key: c.key.clone(),
                    hash: c.hash.clone(),
                    prior_known: c.prior_known,
                    shown: input.shown.observed.contains(&c.key),
                },
            ));
        }
        Ok(ReportOutcome {
            prior,
            changed,
            pending,
        })
    }

    async fn sweep(
        &self,
        slots: &[u16],
        cutoff_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<Pending>, Error> {
        let wanted = slot_set(slots);
        let mut state = self.lock();
        let mut stale = Vec::new();
        for (name, device) in state.devices.iter_mut() {
            let is_stale = device.connected && device.last_seen_ms.is_some_and(|t| t <= cutoff_ms);
            if is_stale && wanted[usize::from(slot(name))] {
                device.connected = false;
                stale.push(name.clone());
            }
        }
        Ok(stale
            .into_iter()
            .map(|name| state.pend(&name, now_ms, PendingKind::Disconnected))
            .collect())
    }

    async fn stale_count(
        &self,
        slots: &[u16],
        cutoff_ms: i64,
        quiet_cutoff_ms: i64,
    ) -> Result<StaleCount, Error> {
        let wanted = slot_set(slots);
        let mut count = StaleCount::default();
        for (name, device) in &self.lock().devices {
            if device.connected && wanted[usize::from(slot(name))] {
                count.connected += 1;
                if device.last_seen_ms.is_some_and(|t| t <= cutoff_ms) {
                    count.stale += 1;
                }
                if device.last_seen_ms.is_some_and(|t| t <= quiet_cutoff_ms) {
                    count.quiet += 1;
                }
            }
        }
        Ok(count)
    }

    async fn pending(&self, slots: &[u16]) -> Result<Vec<Pending>, Error> {
        let state = self.lock();
        Ok(slots
            .iter()
            .filter_map(|s| state.pending.get(s))
            .flat_map(|m| m.values().cloned())
            .collect())
    }

    async fn clear_pending(&self, delivered: &[Pending]) -> Result<(), Error> {
        let mut state = self.lock();
        for p in delivered {
            if let Some(m) = state.pending.get_mut(&p.slot()) {
                m.remove(&p.id);
            }
        }
        Ok(())
    }

    async fn forget_observed(&self, device: &str, key: &ObjectKey) -> Result<(), Error> {
        if let Some(d) = self.lock().devices.get_mut(device) {
            d.observed.remove(key);
        }
        Ok(())
    }

    async fn device(&self, device: &str) -> Result<DeviceRecord, Error> {
        Ok(match self.lock().devices.get(device) {
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
        let mut state = self.lock();
        let entry = state.devices.entry(device.to_owned()).or_default();
        if entry.last_seen_ms.is_some() {
            return Ok(false);
        }
        entry.last_seen_ms = Some(now_ms);
        entry.connected = true;
        Ok(true)
    }

    async fn record_desired_etag(&self, device: &str, etag: &str) -> Result<(), Error> {
        self.lock()
            .devices
            .entry(device.to_owned())
            .or_default()
            .desired_etag = Some(etag.to_owned());
        Ok(())
    }

    async fn desired_etag(&self, device: &str) -> Result<Option<String>, Error> {
        Ok(self
            .lock()
            .devices
            .get(device)
            .and_then(|d| d.desired_etag.clone()))
    }

    async fn ping(&self) -> Result<(), Error> {
        Ok(())
    }
}
