//! What the controller remembers per deployment between reconciles (when its status was last
//! written, how often its reconcile failed in a row), and forgetting it when the deployment goes.
//!
//! Every entry is keyed by namespace and name. A deleted deployment is forgotten when its watch
//! reports the deletion, and after every (re)list whatever the deployment cache no longer holds is
//! dropped too (a deletion missed while the watch was down), so memory follows the deployments that
//! exist, not every deployment that ever existed.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Namespace and name of a deployment.
pub type Key = (String, String);

/// Per-deployment memory.
#[derive(Default)]
pub struct DeploymentMemory {
    status_written_at: Mutex<HashMap<Key, Instant>>,
    failures: Mutex<HashMap<Key, u32>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl DeploymentMemory {
    /// The status of `key` was just written.
    pub fn status_written(&self, key: &Key) {
        lock(&self.status_written_at).insert(key.clone(), Instant::now());
    }

    /// Time since the status of `key` was last written, if it was.
    pub fn since_status_written(&self, key: &Key) -> Option<Duration> {
        lock(&self.status_written_at).get(key).map(Instant::elapsed)
    }

    /// A reconcile of `key` failed; returns how many have failed in a row.
    pub fn failed(&self, key: &Key) -> u32 {
        let mut failures = lock(&self.failures);
        let n = failures.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// A reconcile of `key` succeeded.
    pub fn succeeded(&self, key: &Key) {
        lock(&self.failures).remove(key);
    }

    /// Forget everything about `key` (the deployment was deleted).
    pub fn forget(&self, key: &Key) {
        lock(&self.status_written_at).remove(key);
        lock(&self.failures).remove(key);
    }

    /// Keep only what is known about `existing` deployments.
    pub fn retain(&self, existing: &BTreeSet<Key>) {
        lock(&self.status_written_at).retain(|k, _| existing.contains(k));
        lock(&self.failures).retain(|k, _| existing.contains(k));
    }

    /// Deployments anything is remembered about.
    pub fn deployments(&self) -> BTreeSet<Key> {
        let mut keys: BTreeSet<Key> = lock(&self.status_written_at).keys().cloned().collect();
        keys.extend(lock(&self.failures).keys().cloned());
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Key {
        ("ns".to_owned(), name.to_owned())
    }

    #[tokio::test]
    async fn deleted_deployments_are_forgotten() {
        let memory = DeploymentMemory::default();
        for name in ["a", "b", "c"] {
            memory.status_written(&key(name));
        }
        assert_eq!(memory.failed(&key("b")), 1);
        assert_eq!(memory.failed(&key("b")), 2);
        assert_eq!(memory.failed(&key("d")), 1);
        assert_eq!(memory.deployments().len(), 4);

        memory.forget(&key("b"));
        assert!(memory.since_status_written(&key("b")).is_none());
        assert_eq!(
            memory.failed(&key("b")),
            1,
            "a new deployment of that name starts over"
        );
        memory.succeeded(&key("b"));
        memory.forget(&key("b"));

        // After a relist: only what still exists.
        memory.retain(&[key("a")].into_iter().collect());
        assert_eq!(memory.deployments(), [key("a")].into_iter().collect());
        assert!(memory.since_status_written(&key("a")).is_some());
    }
}
