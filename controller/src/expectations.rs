//! Writes this replica made that its watch caches may not show yet.
//!
//! A reconcile triggered right after another one can read a cache that has not yet received the
//! watch events of the first one's writes. Acting on it would repeat the writes: create again
//! (409), patch again, write the same status twice. Like client-go's "expectations", we remember
//! each write together with the resourceVersion the cache held when we made it; while the cache
//! still holds that version, the remembered result stands in for the cached object. As soon as
//! the cache moves on (our write arrived, or anything else changed the object) the memory is
//! dropped and the cache is the truth again. Entries also expire, so a lost event cannot pin a
//! stale view for long.
//!
//! The memory is lowered twice over: by each reconcile, when the cache it reads has moved on, and,
//! as client-go lowers its expectations in the informer's event handlers, by the watch events
//! themselves ([`Expectations::observe`]). The second matters when a child we created is shown
//! and deleted again between two reconciles: the cache never holds it when a reconcile looks, so
//! only the events can tell that the create was seen, and the deletion must not be masked.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use apollo_crds::{DeviceProcess, DeviceProcessDeploymentStatus};
use kube::ResourceExt;
use tokio::time::Instant;

/// How long a remembered write may stand in for the cache.
pub const EXPECTATION_TTL: Duration = Duration::from_secs(60);

/// Namespace and name.
pub type Key = (String, String);

struct ChildWrite {
    /// resourceVersion in the cache when we wrote; None when the object was absent (a create).
    cached_version: Option<String>,
    /// The object as the API server returned it; None after a delete.
    result: Option<DeviceProcess>,
    expires: Instant,
}

struct StatusWrite {
    cached_version: Option<String>,
    status: DeviceProcessDeploymentStatus,
    expires: Instant,
}

/// Remembered writes, keyed by namespace and name.
#[derive(Default)]
pub struct Expectations {
    children: Mutex<HashMap<Key, ChildWrite>>,
    statuses: Mutex<HashMap<Key, StatusWrite>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn key_of(object: &impl ResourceExt) -> Key {
    (object.namespace().unwrap_or_default(), object.name_any())
}

impl Expectations {
    /// Remember that we created `created` (absent from the cache before).
    pub fn created(&self, created: &DeviceProcess) {
        self.remember_child(key_of(created), None, Some(created.clone()));
    }

    /// Remember that we turned `before` (as cached) into `after`.
    pub fn updated(&self, before: &DeviceProcess, after: &DeviceProcess) {
        self.remember_child(
            key_of(before),
            before.resource_version(),
            Some(after.clone()),
        );
    }

    /// Remember that we deleted `before` (as cached).
    pub fn deleted(&self, before: &DeviceProcess) {
        self.remember_child(key_of(before), before.resource_version(), None);
    }

    fn remember_child(
        &self,
        key: Key,
        cached_version: Option<String>,
        result: Option<DeviceProcess>,
    ) {
        let mut children = lock(&self.children);
        // Writing over a stand-in: the cache still holds the version the first write was made
        // over, so that remains the version to wait for.
        let cached_version = match children.get(&key) {
            Some(earlier) => earlier.cached_version.clone(),
            None => cached_version,
        };
        children.insert(
            key,
            ChildWrite {
                cached_version,
                result,
                expires: Instant::now() + EXPECTATION_TTL,
            },
        );
    }

    /// Lower the memory by a watch event of the children's cache (applied to the cache already):
    /// an object shown at another version than the one a write was made over, or deleted, ends
    /// the stand-in for it. A deletion of an older object of the same name (another uid) leaves a
    /// create of a new one standing. Relist events are left to the reconciles, which compare with
    /// the cache once the relist has replaced it.
    pub fn observe(&self, event: &kube::runtime::watcher::Event<DeviceProcess>) {
        use kube::runtime::watcher::Event;
        let mut children = lock(&self.children);
        match event {
            Event::Apply(shown) => {
                let key = key_of(shown);
                if children
                    .get(&key)
                    .is_some_and(|w| w.cached_version != shown.resource_version())
                {
                    children.remove(&key);
                }
            }
            Event::Delete(gone) => {
                let key = key_of(gone);
                let ends = children.get(&key).is_some_and(|w| match &w.result {
                    None => true,
                    Some(written) => written.uid().is_none() || written.uid() == gone.uid(),
                });
                if ends {
                    children.remove(&key);
                }
            }
            Event::Init | Event::InitApply(_) | Event::InitDone => {}
        }
    }

    /// The children of `namespace` as they are after our own writes: `cached` corrected by every
    /// remembered write the cache has not caught up with. `keep` selects which remembered creates
    /// belong to the caller (e.g. those controlled by one deployment).
    pub fn children_view(
        &self,
        namespace: &str,
        cached: Vec<Arc<DeviceProcess>>,
        keep: impl Fn(&DeviceProcess) -> bool,
    ) -> Vec<Arc<DeviceProcess>> {
        let now = Instant::now();
        let mut pending = lock(&self.children);
        pending.retain(|_, w| w.expires > now);
        let mut view = Vec::with_capacity(cached.len());
        let mut in_cache = BTreeSet::new();
        for child in cached {
            let key = key_of(child.as_ref());
            let stands_in = pending
                .get(&key)
                .is_some_and(|w| w.cached_version == child.resource_version());
            if stands_in {
                if let Some(result) = pending.get(&key).and_then(|w| w.result.as_ref()) {
                    view.push(Arc::new(result.clone()));
                }
            } else {
                pending.remove(&key);
                view.push(child);
            }
            in_cache.insert(key);
        }
        for (key, write) in pending.iter() {
            if key.0 == namespace && !in_cache.contains(key) && write.cached_version.is_none() {
                if let Some(created) = write.result.as_ref().filter(|c| keep(c)) {
                    view.push(Arc::new(created.clone()));
                }
            }
        }
        view
    }

    /// Whether a create in `namespace` still stands in for an object the cache has not shown.
    /// While one does, a deletion of that object by someone else would be masked, so the caller
    /// looks again once the expectation has expired.
    pub fn awaiting_creates(&self, namespace: &str) -> bool {
        let now = Instant::now();
        lock(&self.children).iter().any(|(key, w)| {
            key.0 == namespace
                && w.cached_version.is_none()
                && w.result.is_some()
                && w.expires > now
        })
    }

    /// Forget the status written for the deployment `namespace/name` (it was deleted), and every
    /// remembered write that has expired.
    pub fn forget_deployment(&self, namespace: &str, name: &str) {
        lock(&self.statuses).remove(&(namespace.to_owned(), name.to_owned()));
        self.prune_expired();
    }

    /// Drop every remembered write that has expired (they no longer stand in for anything).
    pub fn prune_expired(&self) {
        let now = Instant::now();
        lock(&self.children).retain(|_, w| w.expires > now);
        lock(&self.statuses).retain(|_, w| w.expires > now);
    }

    /// Deployments whose written status is remembered.
    pub fn deployments(&self) -> BTreeSet<Key> {
        lock(&self.statuses).keys().cloned().collect()
    }

    /// Remember that we wrote `status` for the deployment cached at `cached_version`.
    pub fn status_written(
        &self,
        namespace: &str,
        name: &str,
        cached_version: Option<String>,
        status: DeviceProcessDeploymentStatus,
    ) {
        lock(&self.statuses).insert(
            (namespace.to_owned(), name.to_owned()),
            StatusWrite {
                cached_version,
                status,
                expires: Instant::now() + EXPECTATION_TTL,
            },
        );
    }

    /// The status the deployment has after our own writes: the one we wrote if the cache still
    /// shows the version we wrote over, else `cached`.
    pub fn status_view(
        &self,
        namespace: &str,
        name: &str,
        cached_version: Option<&str>,
        cached: Option<&DeviceProcessDeploymentStatus>,
    ) -> Option<DeviceProcessDeploymentStatus> {
        let key = (namespace.to_owned(), name.to_owned());
        let mut statuses = lock(&self.statuses);
        match statuses.get(&key) {
            Some(w)
                if w.expires > Instant::now() && w.cached_version.as_deref() == cached_version =>
            {
                Some(w.status.clone())
            }
            Some(_) => {
                statuses.remove(&key);
                cached.cloned()
            }
            None => cached.cloned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apollo_crds::{DeviceProcessSpec, DeviceRef};

    fn child(name: &str, rv: &str, args: &[&str]) -> DeviceProcess {
        let workload = crate::fixtures::workload("u", &[], args);
        let mut c = DeviceProcess::new(
            name,
            DeviceProcessSpec {
                device_ref: DeviceRef { name: "d".into() },
                artifact: workload.artifact,
                execution: workload.execution,
            },
        );
        c.metadata.namespace = Some("ns".into());
        c.metadata.resource_version = Some(rv.into());
        c
    }

    fn names(view: &[Arc<DeviceProcess>]) -> Vec<(String, String)> {
        view.iter()
            .map(|c| (c.name_any(), c.resource_version().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn a_create_stands_in_until_the_cache_shows_it() {
        let e = Expectations::default();
        e.created(&child("a", "5", &[]));
        assert_eq!(
            names(&e.children_view("ns", vec![], |_| true)),
            [("a".into(), "5".into())]
        );
        assert!(
            e.children_view("ns", vec![], |_| false).is_empty(),
            "not the caller's"
        );
        assert!(e.children_view("other", vec![], |_| true).is_empty());
        assert!(e.awaiting_creates("ns"));
        assert!(!e.awaiting_creates("other"));
        let arrived = Arc::new(child("a", "5", &[]));
        assert_eq!(
            names(&e.children_view("ns", vec![arrived], |_| true)),
            [("a".into(), "5".into())]
        );
        // Forgotten once seen: a later deletion is not masked.
        assert!(!e.awaiting_creates("ns"));
        assert!(e.children_view("ns", vec![], |_| true).is_empty());
    }

    fn with_uid(mut c: DeviceProcess, uid: &str) -> DeviceProcess {
        c.metadata.uid = Some(uid.into());
        c
    }

    #[test]
    fn a_create_shown_and_deleted_between_two_reconciles_no_longer_stands_in() {
        use kube::runtime::watcher::Event;
        let e = Expectations::default();
        let created = with_uid(child("a", "5", &[]), "u1");
        e.created(&created);
        // The watch shows it, then someone deletes it, before any reconcile reads the cache: the
        // cache never holds it when a reconcile looks.
        e.observe(&Event::Apply(created.clone()));
        e.observe(&Event::Delete(created));
        assert!(
            e.children_view("ns", vec![], |_| true).is_empty(),
            "the deletion is not masked by the create"
        );
        assert!(!e.awaiting_creates("ns"));
    }

    #[test]
    fn the_deletion_of_an_older_object_of_the_same_name_leaves_a_create_standing() {
        use kube::runtime::watcher::Event;
        let e = Expectations::default();
        e.created(&with_uid(child("a", "9", &[]), "new"));
        e.observe(&Event::Delete(with_uid(child("a", "5", &[]), "old")));
        assert_eq!(
            names(&e.children_view("ns", vec![], |_| true)),
            [("a".into(), "9".into())]
        );
        // The create's own arrival ends it.
        e.observe(&Event::Apply(with_uid(child("a", "9", &[]), "new")));
        assert!(!e.awaiting_creates("ns"));
    }

    #[test]
    fn watch_events_end_update_and_delete_stand_ins() {
        use kube::runtime::watcher::Event;
        let e = Expectations::default();
        let before = with_uid(child("a", "5", &["old"]), "u1");
        e.updated(&before, &with_uid(child("a", "6", &["new"]), "u1"));
        // A relist showing the version written over changes nothing.
        e.observe(&Event::InitApply(before.clone()));
        e.observe(&Event::Apply(before.clone()));
        let view = e.children_view("ns", vec![Arc::new(before.clone())], |_| true);
        assert_eq!(view[0].spec.execution.args, ["new"]);
        e.observe(&Event::Apply(with_uid(child("a", "6", &["new"]), "u1")));
        let view = e.children_view("ns", vec![Arc::new(before.clone())], |_| true);
        assert_eq!(
            view[0].spec.execution.args,
            ["old"],
            "no longer stood in for"
        );

        let b = with_uid(child("b", "3", &[]), "u2");
        e.deleted(&b);
        assert_eq!(lock(&e.children).len(), 1);
        e.observe(&Event::Delete(b));
        assert!(lock(&e.children).is_empty(), "the delete was seen");
    }

    #[test]
    fn an_update_stands_in_while_the_cache_holds_the_old_version() {
        let e = Expectations::default();
        let before = child("a", "5", &["old"]);
        e.updated(&before, &child("a", "6", &["new"]));
        let view = e.children_view("ns", vec![Arc::new(before.clone())], |_| true);
        assert_eq!(view[0].spec.execution.args, ["new"]);
        let moved_on = Arc::new(child("a", "7", &["other"]));
        let view = e.children_view("ns", vec![moved_on], |_| true);
        assert_eq!(
            view[0].spec.execution.args,
            ["other"],
            "the cache is the truth again"
        );
    }

    #[test]
    fn a_second_write_over_a_stand_in_waits_for_the_original_cached_version() {
        let e = Expectations::default();
        let cached = child("a", "5", &["v1"]);
        let first = child("a", "6", &["v2"]);
        e.updated(&cached, &first);
        e.updated(&first, &child("a", "7", &["v3"]));
        let view = e.children_view("ns", vec![Arc::new(cached)], |_| true);
        assert_eq!(view[0].spec.execution.args, ["v3"]);
    }

    #[test]
    fn a_delete_hides_the_cached_object_until_the_cache_changes() {
        let e = Expectations::default();
        let before = child("a", "5", &[]);
        e.deleted(&before);
        assert!(e
            .children_view("ns", vec![Arc::new(before)], |_| true)
            .is_empty());
        assert!(e.children_view("ns", vec![], |_| true).is_empty());
    }

    #[test]
    fn a_written_status_stands_in_for_the_same_cached_version_only() {
        let e = Expectations::default();
        let written = DeviceProcessDeploymentStatus {
            desired_number_scheduled: 2,
            ..Default::default()
        };
        let stale = DeviceProcessDeploymentStatus::default();
        e.status_written("ns", "d", Some("9".into()), written.clone());
        assert_eq!(
            e.status_view("ns", "d", Some("9"), Some(&stale)),
            Some(written)
        );
        assert_eq!(
            e.status_view("ns", "d", Some("10"), Some(&stale)),
            Some(stale.clone())
        );
        assert_eq!(
            e.status_view("ns", "d", Some("9"), Some(&stale)),
            Some(stale),
            "forgotten"
        );
    }
}

#[cfg(test)]
mod forgetting {
    use super::*;

    #[test]
    fn a_deleted_deployments_status_is_forgotten() {
        let e = Expectations::default();
        e.status_written(
            "ns",
            "gone",
            Some("1".into()),
            DeviceProcessDeploymentStatus::default(),
        );
        e.status_written(
            "ns",
            "kept",
            Some("1".into()),
            DeviceProcessDeploymentStatus::default(),
        );
        e.forget_deployment("ns", "gone");
        assert_eq!(
            e.deployments(),
            [("ns".to_owned(), "kept".to_owned())].into_iter().collect()
        );
    }
}
