//! The watch cache: every DeviceProcess in scope, indexed by `spec.deviceRef.name`, with each
//! device's desired document prebuilt and long-poll waiters woken when it changes.
//!
//! Requests read only from here; nothing on the request path lists or gets from Kubernetes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use apollo_crds::DeviceProcess;
use apollo_protocol::wire::{ObjectRef, Observation};
use futures::StreamExt;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::api::document::{build_snapshot, DesiredSnapshot};
use crate::cluster::ownership::OwnedSlots;
use crate::metrics::Metrics;
use crate::model::{CachedProcess, ObjectKey};
use crate::status::projection::Shown;

/// Objects a re-list applies per hold of the index's write lock: request handlers wait at most
/// one batch (well under a millisecond), never a whole re-list of 100,000 objects.
const RELIST_BATCH: usize = 256;

/// The indexed cache of DeviceProcesses.
pub struct Cache {
    index: RwLock<Index>,
    /// Objects of a re-list in progress (between watcher Init and InitDone), kept apart from the
    /// index so that collecting them never blocks a reader.
    relist: Mutex<Option<HashMap<ObjectKey, CachedProcess>>>,
    heartbeat_interval_seconds: u64,
    synced: watch::Sender<bool>,
    metrics: Metrics,
}

#[derive(Default)]
struct Index {
    objects: HashMap<ObjectKey, Arc<CachedProcess>>,
    devices: HashMap<String, DeviceEntry>,
    /// Devices with at least one DeviceProcess (kept as entries change: the gauge is O(1)).
    live_devices: usize,
}

/// What a watch event (or a whole re-list) changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Objects whose desired part changed (new object, new generation or spec): a reason to
    /// write their status.
    pub desired: Vec<ObjectKey>,
    /// Objects that are gone — deleted, or replaced by a new object of the same name (another
    /// uid, as when a re-list collapses a delete and a create) — with the device they were
    /// bound to: what the store remembers of them must be forgotten.
    pub gone: Vec<(String, ObjectKey)>,
}

struct DeviceEntry {
    processes: BTreeMap<ObjectKey, Arc<CachedProcess>>,
    desired: watch::Sender<Arc<DesiredSnapshot>>,
}

/// How the observations of a report relate to the cache.
#[derive(Debug, PartialEq, Eq)]
pub enum ObservationCheck {
    /// Every observation names a DeviceProcess of this device or one that does not exist.
    Accepted {
        /// Indexes (into the report's observations) of objects bound to this device.
        known: Vec<usize>,
        /// Objects that do not exist (ignored).
        ignored: Vec<ObjectRef>,
    },
    /// Observation `index` names a DeviceProcess bound to another device.
    Foreign {
        /// Index into the report's observations.
        index: usize,
    },
}

impl Cache {
    /// An empty, unsynced cache.
    pub fn new(heartbeat_interval_seconds: u64, metrics: Metrics) -> Self {
        Self {
            index: RwLock::new(Index::default()),
            relist: Mutex::new(None),
            heartbeat_interval_seconds,
            synced: watch::channel(false).0,
            metrics,
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Index> {
        // A panic while holding the lock cannot leave the index half-updated in a way that
        // matters more than stopping to serve; keep serving.
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the first full list has been applied.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Resolves once the first full list has been applied.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        // The sender lives in self, so wait_for only ends with Ok.
        let _ = rx.wait_for(|synced| *synced).await;
    }

    /// A receiver of `device`'s desired document; its current value is the document now.
    pub fn subscribe(&self, device: &str) -> watch::Receiver<Arc<DesiredSnapshot>> {
        if let Some(entry) = self.read().devices.get(device) {
            return entry.desired.subscribe();
        }
        let mut index = self.write();
        let heartbeat = self.heartbeat_interval_seconds;
        index
            .devices
            .entry(device.to_owned())
            .or_insert_with(|| {
                self.metrics.documents_built.inc();
                DeviceEntry {
                    processes: BTreeMap::new(),
                    desired: watch::channel(Arc::new(build_snapshot(device, heartbeat, []))).0,
                }
            })
            .desired
            .subscribe()
    }

    /// The cached DeviceProcess `key`.
    pub fn get(&self, key: &ObjectKey) -> Option<Arc<CachedProcess>> {
        self.read().objects.get(key).cloned()
    }

    /// Keys of every DeviceProcess bound to `device`.
    pub fn keys_for_device(&self, device: &str) -> Vec<ObjectKey> {
        self.read()
            .devices
            .get(device)
            .map(|e| e.processes.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// What the status of each of `device`'s DeviceProcesses shows now.
    pub fn shown_for_device(&self, device: &str) -> HashMap<ObjectKey, Shown> {
        self.read()
            .devices
            .get(device)
            .map(|e| {
                e.processes
                    .iter()
                    .map(|(k, p)| (k.clone(), Shown::of(p.status.as_ref())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every device with DeviceProcesses whose slot is in `owned`, with those processes.
    pub fn devices_owned(&self, owned: &OwnedSlots) -> Vec<(String, Vec<Arc<CachedProcess>>)> {
        self.read()
            .devices
            .iter()
            .filter(|(device, entry)| !entry.processes.is_empty() && owned.owns_device(device))
            .map(|(device, entry)| (device.clone(), entry.processes.values().cloned().collect()))
            .collect()
    }

    /// Sorts the observations of `device`'s report into accepted and ignored, or finds the first
    /// one naming another device's DeviceProcess.
    pub fn check_observations(
        &self,
        device: &str,
        observations: &[Observation],
    ) -> ObservationCheck {
        let index = self.read();
        let mut known = Vec::new();
        let mut ignored = Vec::new();
        for (i, o) in observations.iter().enumerate() {
            let key = ObjectKey::new(o.namespace.as_str(), o.name.as_str());
            match index.objects.get(&key) {
                Some(p) if p.device != device => return ObservationCheck::Foreign { index: i },
                Some(_) => known.push(i),
                None => ignored.push(ObjectRef {
                    namespace: o.namespace.clone(),
                    name: o.name.clone(),
                }),
            }
        }
        ObservationCheck::Accepted { known, ignored }
    }

    /// Applies an added or modified object. Returns its key when what the agent sees changed
    /// (new object, new generation or spec), which is a reason to write its status.
    pub fn apply(&self, obj: &DeviceProcess) -> Option<ObjectKey> {
        self.apply_changes(obj).desired.pop()
    }

    /// Like [`Cache::apply`], and says whether an older object of the same name (another uid)
    /// is gone.
    pub fn apply_changes(&self, obj: &DeviceProcess) -> Changes {
        let mut changes = Changes::default();
        if let Some(process) = CachedProcess::from_object(obj) {
            let mut index = self.write();
            self.apply_locked(&mut index, process, false, &mut changes);
        }
        self.update_gauges();
        changes
    }

    /// Applies the object returned by our own status write, unless the cache already holds a
    /// newer version. Keeps projections made before the watch catches up from using a stale
    /// status.
    pub fn observe_write(&self, obj: &DeviceProcess) {
        if let Some(process) = CachedProcess::from_object(obj) {
            let mut index = self.write();
            self.apply_locked(&mut index, process, true, &mut Changes::default());
        }
    }

    /// Removes a deleted object; returns it as gone (with its device) if the cache held it.
    pub fn delete(&self, obj: &DeviceProcess) -> Changes {
        let mut changes = Changes::default();
        let (Some(namespace), Some(name)) = (&obj.metadata.namespace, &obj.metadata.name) else {
            return changes;
        };
        let key = ObjectKey::new(namespace.as_str(), name.as_str());
        if let Some(device) = self.remove_locked(&mut self.write(), &key) {
            changes.gone.push((device, key));
        }
        self.update_gauges();
        changes
    }

    fn relist_buffer(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<HashMap<ObjectKey, CachedProcess>>> {
        self.relist.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a (re-)list: objects arriving until [`Cache::finish_relist`] replace the contents.
    pub fn begin_relist(&self) {
        *self.relist_buffer() = Some(HashMap::new());
    }

    /// One object of a re-list.
    pub fn relist_apply(&self, obj: &DeviceProcess) {
        if let Some(process) = CachedProcess::from_object(obj) {
            self.relist_buffer()
                .get_or_insert_with(HashMap::new)
                .insert(process.key.clone(), process);
        }
    }

    /// Completes a re-list: removes objects no longer listed, applies every listed object (a
    /// batch per hold of the write lock, yielding between batches, so requests are served
    /// throughout), marks the cache synced. Returns what changed (see [`Cache::apply_changes`]).
    pub async fn finish_relist(&self) -> Changes {
        let listed = self.relist_buffer().take().unwrap_or_default();
        let gone: Vec<ObjectKey> = self
            .read()
            .objects
            .keys()
            .filter(|k| !listed.contains_key(*k))
            .cloned()
            .collect();
        let mut changes = Changes::default();
        for batch in gone.chunks(RELIST_BATCH) {
            {
                let mut index = self.write();
                for key in batch {
                    if let Some(device) = self.remove_locked(&mut index, key) {
                        changes.gone.push((device, key.clone()));
                    }
                }
            }
            tokio::task::yield_now().await;
        }
        let mut listed = listed.into_values().peekable();
        while listed.peek().is_some() {
            {
                let mut index = self.write();
                for process in listed.by_ref().take(RELIST_BATCH) {
                    self.apply_locked(&mut index, process, false, &mut changes);
                }
            }
            tokio::task::yield_now().await;
        }
        self.update_gauges();
        self.synced.send_replace(true);
        changes
    }

    /// Forgets devices that have no DeviceProcess and nobody waiting on their document.
    pub fn prune_idle_devices(&self) {
        let mut index = self.write();
        index
            .devices
            .retain(|_, e| !e.processes.is_empty() || e.desired.receiver_count() > 0);
    }

    fn apply_locked(
        &self,
        index: &mut Index,
        process: CachedProcess,
        only_if_newer: bool,
        changes: &mut Changes,
    ) {
        let key = process.key.clone();
        let previous = index.objects.get(&key).cloned();
        if let Some(old) = &previous {
            if process.is_older_than(old) || (only_if_newer && !old.is_older_than(&process)) {
                return;
            }
            if !old.uid.is_empty() && old.uid != process.uid {
                // Deleted and created again under the same name (the watch did not show the
                // delete): the old object is gone.
                changes.gone.push((old.device.clone(), key.clone()));
            }
        }
        let desired_changed = previous
            .as_ref()
            .is_none_or(|old| process.desired_differs(old));
        let process = Arc::new(process);
        index.objects.insert(key.clone(), process.clone());
        if let Some(old) = &previous {
            if old.device != process.device {
                self.detach_locked(index, &old.device, &key);
            }
        }
        let heartbeat = self.heartbeat_interval_seconds;
        let entry = index
            .devices
            .entry(process.device.clone())
            .or_insert_with(|| DeviceEntry {
                processes: BTreeMap::new(),
                desired: watch::channel(Arc::new(build_snapshot(&process.device, heartbeat, []))).0,
            });
        let was_empty = entry.processes.is_empty();
        entry.processes.insert(key.clone(), process.clone());
        if desired_changed {
            self.rebuild(&process.device, entry);
        }
        if was_empty {
            index.live_devices += 1;
        }
        if desired_changed {
            changes.desired.push(key);
        }
    }

    /// Removes `key`; returns the device it was bound to.
    fn remove_locked(&self, index: &mut Index, key: &ObjectKey) -> Option<String> {
        let old = index.objects.remove(key)?;
        self.detach_locked(index, &old.device, key);
        Some(old.device.clone())
    }

    fn detach_locked(&self, index: &mut Index, device: &str, key: &ObjectKey) {
        if let Some(entry) = index.devices.get_mut(device) {
            if entry.processes.remove(key).is_none() {
                return;
            }
            self.rebuild(device, entry);
            if entry.processes.is_empty() {
                index.live_devices -= 1;
                if entry.desired.receiver_count() == 0 {
                    index.devices.remove(device);
                }
            }
        }
    }

    fn rebuild(&self, device: &str, entry: &mut DeviceEntry) {
        let snapshot = build_snapshot(
            device,
            self.heartbeat_interval_seconds,
            entry.processes.values().map(Arc::as_ref),
        );
        self.metrics.documents_built.inc();
        // Waiters wake only when the ETag (what the agent compares) changes.
        entry.desired.send_if_modified(|current| {
            if current.etag == snapshot.etag {
                false
            } else {
                *current = Arc::new(snapshot);
                true
            }
        });
    }

    /// O(1): the index keeps its counts as entries change.
    fn update_gauges(&self) {
        let index = self.read();
        self.metrics.cache_objects.set(index.objects.len() as i64);
        self.metrics.cache_devices.set(index.live_devices as i64);
    }
}

/// Feeds the cache from a watch of DeviceProcesses (all namespaces, or one). Calls `on_change`
/// with what changed — except desired changes during the first list (the start-up resync covers
/// those). Retries with backoff forever; ends on shutdown.
pub async fn run_watch(
    api: Api<DeviceProcess>,
    cache: Arc<Cache>,
    on_change: impl Fn(Changes),
    shutdown: CancellationToken,
) {
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = stream.next() => event,
        };
        let Some(event) = event else {
            tracing::error!("DeviceProcess watch ended");
            return;
        };
        match event {
            Ok(Event::Apply(obj)) => {
                let changes = cache.apply_changes(&obj);
                if changes != Changes::default() {
                    on_change(changes);
                }
            }
            Ok(Event::Delete(obj)) => {
                let changes = cache.delete(&obj);
                if changes != Changes::default() {
                    on_change(changes);
                }
            }
            Ok(Event::Init) => cache.begin_relist(),
            Ok(Event::InitApply(obj)) => cache.relist_apply(&obj),
            Ok(Event::InitDone) => {
                let first = !cache.is_synced();
                let started = std::time::Instant::now();
                let mut changes = cache.finish_relist().await;
                if first {
                    tracing::info!(took = ?started.elapsed(), "DeviceProcess cache synced");
                    changes.desired.clear();
                }
                if changes != Changes::default() {
                    on_change(changes);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "DeviceProcess watch failed; retrying with backoff")
            }
        }
    }
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
