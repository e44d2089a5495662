//! The watch cache: every DeviceProcess in scope, indexed by `spec.deviceRef.name`, with each
//! device's desired document prebuilt and long-poll waiters woken when it changes.
//!
//! Requests read only from here; nothing on the request path lists or gets from Kubernetes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

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

/// The indexed cache of DeviceProcesses.
pub struct Cache {
    index: RwLock<Index>,
    heartbeat_interval_seconds: u64,
    synced: watch::Sender<bool>,
    metrics: Metrics,
}

#[derive(Default)]
struct Index {
    objects: HashMap<ObjectKey, Arc<CachedProcess>>,
    devices: HashMap<String, DeviceEntry>,
    /// Objects of a re-list in progress (between watcher Init and InitDone).
    relist: Option<HashMap<ObjectKey, CachedProcess>>,
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
        let process = CachedProcess::from_object(obj)?;
        let mut index = self.write();
        self.apply_locked(&mut index, process, false)
    }

    /// Applies the object returned by our own status write, unless the cache already holds a
    /// newer version. Keeps projections made before the watch catches up from using a stale
    /// status.
    pub fn observe_write(&self, obj: &DeviceProcess) {
        if let Some(process) = CachedProcess::from_object(obj) {
            let mut index = self.write();
            self.apply_locked(&mut index, process, true);
        }
    }

    /// Removes a deleted object.
    pub fn delete(&self, obj: &DeviceProcess) {
        let (Some(namespace), Some(name)) = (&obj.metadata.namespace, &obj.metadata.name) else {
            return;
        };
        let key = ObjectKey::new(namespace.as_str(), name.as_str());
        let mut index = self.write();
        self.remove_locked(&mut index, &key);
        self.update_gauges(&index);
    }

    /// Starts a (re-)list: objects arriving until [`Cache::finish_relist`] replace the contents.
    pub fn begin_relist(&self) {
        self.write().relist = Some(HashMap::new());
    }

    /// One object of a re-list.
    pub fn relist_apply(&self, obj: &DeviceProcess) {
        if let Some(process) = CachedProcess::from_object(obj) {
            let mut index = self.write();
            index
                .relist
                .get_or_insert_with(HashMap::new)
                .insert(process.key.clone(), process);
        }
    }

    /// Completes a re-list: applies every listed object, removes objects no longer listed, marks
    /// the cache synced. Returns the keys whose desired part changed (see [`Cache::apply`]).
    pub fn finish_relist(&self) -> Vec<ObjectKey> {
        let mut index = self.write();
        let listed = index.relist.take().unwrap_or_default();
        let gone: Vec<ObjectKey> = index
            .objects
            .keys()
            .filter(|k| !listed.contains_key(*k))
            .cloned()
            .collect();
        for key in &gone {
            self.remove_locked(&mut index, key);
        }
        let mut changed = Vec::new();
        for (_, process) in listed {
            if let Some(key) = self.apply_locked(&mut index, process, false) {
                changed.push(key);
            }
        }
        drop(index);
        self.synced.send_replace(true);
        changed
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
    ) -> Option<ObjectKey> {
        let key = process.key.clone();
        let previous = index.objects.get(&key).cloned();
        if let Some(old) = &previous {
            if process.is_older_than(old) || (only_if_newer && !old.is_older_than(&process)) {
                return None;
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
        entry.processes.insert(key.clone(), process.clone());
        if desired_changed {
            self.rebuild(&process.device, entry);
        }
        self.update_gauges(index);
        desired_changed.then_some(key)
    }

    fn remove_locked(&self, index: &mut Index, key: &ObjectKey) {
        if let Some(old) = index.objects.remove(key) {
            self.detach_locked(index, &old.device, key);
        }
    }

    fn detach_locked(&self, index: &mut Index, device: &str, key: &ObjectKey) {
        if let Some(entry) = index.devices.get_mut(device) {
            entry.processes.remove(key);
            self.rebuild(device, entry);
            if entry.processes.is_empty() && entry.desired.receiver_count() == 0 {
                index.devices.remove(device);
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

    fn update_gauges(&self, index: &Index) {
        self.metrics.cache_objects.set(index.objects.len() as i64);
        self.metrics.cache_devices.set(
            index
                .devices
                .values()
                .filter(|e| !e.processes.is_empty())
                .count() as i64,
        );
    }
}

/// Feeds the cache from a watch of DeviceProcesses (all namespaces, or one). Calls `on_change`
/// with the keys whose desired part changed, except during the first list (the start-up resync
/// covers those). Retries with backoff forever; ends on shutdown.
pub async fn run_watch(
    api: Api<DeviceProcess>,
    cache: Arc<Cache>,
    on_change: impl Fn(Vec<ObjectKey>),
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
                if let Some(key) = cache.apply(&obj) {
                    on_change(vec![key]);
                }
            }
            Ok(Event::Delete(obj)) => cache.delete(&obj),
            Ok(Event::Init) => cache.begin_relist(),
            Ok(Event::InitApply(obj)) => cache.relist_apply(&obj),
            Ok(Event::InitDone) => {
                let first = !cache.is_synced();
                let changed = cache.finish_relist();
                if first {
                    tracing::info!("DeviceProcess cache synced");
                } else if !changed.is_empty() {
                    on_change(changed);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "DeviceProcess watch failed; retrying with backoff")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apollo_crds::DeviceProcessSpec;
    use serde_json::json;

    fn dp(
        ns: &str,
        name: &str,
        device: &str,
        generation: i64,
        rv: u64,
        url: &str,
    ) -> DeviceProcess {
        let spec: DeviceProcessSpec = serde_json::from_value(json!({
            "deviceRef": {"name": device},
            "artifact": {"type": "oci", "url": url},
            "execution": {"backend": "container"}
        }))
        .expect("spec");
        let mut obj = DeviceProcess::new(name, spec);
        obj.metadata.namespace = Some(ns.into());
        obj.metadata.generation = Some(generation);
        obj.metadata.resource_version = Some(rv.to_string());
        obj.metadata.uid = Some(format!("uid-{ns}-{name}"));
        obj
    }

    fn cache() -> Cache {
        Cache::new(15, Metrics::unregistered())
    }

    fn items(cache: &Cache, device: &str) -> Vec<String> {
        let rx = cache.subscribe(device);
        let snap = rx.borrow().clone();
        let doc: serde_json::Value = serde_json::from_slice(&snap.body).expect("json");
        doc["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| {
                format!(
                    "{}/{}",
                    i["namespace"].as_str().unwrap_or(""),
                    i["name"].as_str().unwrap_or("")
                )
            })
            .collect()
    }

    #[test]
    fn index_by_device_sorted_and_moves_between_devices() {
        let c = cache();
        assert!(c.apply(&dp("b", "p", "d1", 1, 1, "u")).is_some());
        assert!(c.apply(&dp("a", "q", "d1", 1, 2, "u")).is_some());
        assert!(c.apply(&dp("a", "r", "d2", 1, 3, "u")).is_some());
        assert_eq!(items(&c, "d1"), ["a/q", "b/p"]);
        assert_eq!(items(&c, "d2"), ["a/r"]);
        // deviceRef changes: the object moves.
        c.apply(&dp("a", "q", "d2", 2, 4, "u"));
        assert_eq!(items(&c, "d1"), ["b/p"]);
        assert_eq!(items(&c, "d2"), ["a/q", "a/r"]);
        c.delete(&dp("a", "r", "d2", 1, 5, "u"));
        assert_eq!(items(&c, "d2"), ["a/q"]);
        assert_eq!(c.keys_for_device("d1"), vec![ObjectKey::new("b", "p")]);
    }

    #[tokio::test]
    async fn waiters_wake_on_spec_change_but_not_on_status_change() {
        let c = cache();
        c.apply(&dp("ns", "p", "d", 1, 1, "u1"));
        let mut rx = c.subscribe("d");
        let before = rx.borrow_and_update().etag.clone();
        let mut status_only = dp("ns", "p", "d", 1, 2, "u1");
        status_only.status = Some(Default::default());
        assert_eq!(
            c.apply(&status_only),
            None,
            "a status change is not a desired change"
        );
        assert!(!rx.has_changed().expect("sender alive"));
        assert_eq!(
            c.apply(&dp("ns", "p", "d", 2, 3, "u2")),
            Some(ObjectKey::new("ns", "p"))
        );
        assert!(rx.has_changed().expect("sender alive"));
        assert_ne!(rx.borrow_and_update().etag, before);
    }

    #[test]
    fn older_versions_and_own_writes_do_not_go_back_in_time() {
        let c = cache();
        c.apply(&dp("ns", "p", "d", 2, 10, "new"));
        assert_eq!(c.apply(&dp("ns", "p", "d", 1, 9, "old")), None);
        assert_eq!(
            c.get(&ObjectKey::new("ns", "p")).map(|p| p.generation),
            Some(2)
        );
        let mut written = dp("ns", "p", "d", 2, 10, "new");
        written.status = Some(Default::default());
        c.observe_write(&written);
        assert!(c
            .get(&ObjectKey::new("ns", "p"))
            .and_then(|p| p.status.clone())
            .is_none());
        written.metadata.resource_version = Some("11".into());
        c.observe_write(&written);
        assert!(c
            .get(&ObjectKey::new("ns", "p"))
            .and_then(|p| p.status.clone())
            .is_some());
    }

    #[test]
    fn relist_replaces_contents_and_reports_changes_after_first_sync() {
        let c = cache();
        assert!(!c.is_synced());
        c.begin_relist();
        c.relist_apply(&dp("ns", "a", "d", 1, 1, "u"));
        c.relist_apply(&dp("ns", "b", "d", 1, 2, "u"));
        assert!(
            c.keys_for_device("d").is_empty(),
            "nothing visible before InitDone"
        );
        assert_eq!(c.finish_relist().len(), 2);
        assert!(c.is_synced());
        c.begin_relist();
        c.relist_apply(&dp("ns", "a", "d", 1, 1, "u"));
        c.relist_apply(&dp("ns", "c", "d", 1, 3, "u"));
        assert_eq!(c.finish_relist(), vec![ObjectKey::new("ns", "c")]);
        assert_eq!(items(&c, "d"), ["ns/a", "ns/c"]);
    }

    #[test]
    fn observations_of_another_device_are_foreign_and_missing_ones_ignored() {
        let c = cache();
        c.apply(&dp("ns", "mine", "d1", 1, 1, "u"));
        c.apply(&dp("ns", "theirs", "d2", 1, 2, "u"));
        let obs = |name: &str| Observation {
            namespace: "ns".into(),
            name: name.into(),
            observed_spec_hash: format!("sha256:{}", "0".repeat(64)),
        };
        assert_eq!(
            c.check_observations("d1", &[obs("mine"), obs("gone")]),
            ObservationCheck::Accepted {
                known: vec![0],
                ignored: vec![ObjectRef {
                    namespace: "ns".into(),
                    name: "gone".into()
                }]
            }
        );
        assert_eq!(
            c.check_observations("d1", &[obs("mine"), obs("theirs")]),
            ObservationCheck::Foreign { index: 1 }
        );
    }

    #[test]
    fn idle_devices_are_pruned_only_without_waiters() {
        let c = cache();
        let rx = c.subscribe("ghost");
        c.prune_idle_devices();
        assert_eq!(c.read().devices.len(), 1);
        drop(rx);
        c.prune_idle_devices();
        assert_eq!(c.read().devices.len(), 0);
        let owned = OwnedSlots::all();
        c.apply(&dp("ns", "p", "d", 1, 1, "u"));
        assert_eq!(c.devices_owned(&owned).len(), 1);
        assert!(c.devices_owned(&OwnedSlots::none()).is_empty());
    }
}
