//! What the controller remembers per deployment between reconciles (when its status was last
//! written, how often its reconcile failed in a row, when its next full reconcile may run), and
//! forgetting it when the deployment goes.
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

/// A deployment's full reconciles are spaced by this many times the CPU time the last one took,
/// so that they use at most a tenth of a core however often its children change. A reconcile
/// reads every child of the deployment: with 100,000 children that is a few hundred
/// milliseconds, and during a rollout the children's status changes arrive faster than that, so
/// without spacing the controller would reconcile back to back on a whole core.
pub const PACE_FACTOR: u32 = 9;

/// Longest a full reconcile is deferred, whatever it costs.
pub const MAX_PACE: Duration = Duration::from_secs(2);

/// When the next full reconcile of a deployment may run, and for which generation.
struct Paced {
    not_before: Instant,
    generation: Option<i64>,
}

/// Per-deployment memory.
#[derive(Default)]
pub struct DeploymentMemory {
    status_written_at: Mutex<HashMap<Key, Instant>>,
    failures: Mutex<HashMap<Key, u32>>,
    paced: Mutex<HashMap<Key, Paced>>,
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

    /// A full reconcile of `key` at `generation` just finished, having spent `cost` computing
    /// (the writes' waits not included): the next one waits [`PACE_FACTOR`] times that, at most
    /// [`MAX_PACE`].
    pub fn reconciled(&self, key: &Key, generation: Option<i64>, cost: Duration) {
        let spacing = cost.saturating_mul(PACE_FACTOR).min(MAX_PACE);
        lock(&self.paced).insert(
            key.clone(),
            Paced {
                not_before: Instant::now() + spacing,
                generation,
            },
        );
    }

    /// How long the next full reconcile of `key` must wait, if at all. A new generation (the
    /// spec changed) is reconciled at once.
    pub fn deferred(&self, key: &Key, generation: Option<i64>) -> Option<Duration> {
        let paced = lock(&self.paced);
        let entry = paced.get(key).filter(|p| p.generation == generation)?;
        let wait = entry.not_before.saturating_duration_since(Instant::now());
        (!wait.is_zero()).then_some(wait)
    }

    /// Forget everything about `key` (the deployment was deleted).
    pub fn forget(&self, key: &Key) {
        lock(&self.status_written_at).remove(key);
        lock(&self.failures).remove(key);
        lock(&self.paced).remove(key);
    }

    /// Keep only what is known about `existing` deployments.
    pub fn retain(&self, existing: &BTreeSet<Key>) {
        lock(&self.status_written_at).retain(|k, _| existing.contains(k));
        lock(&self.failures).retain(|k, _| existing.contains(k));
        lock(&self.paced).retain(|k, _| existing.contains(k));
    }

    /// Deployments anything is remembered about.
    pub fn deployments(&self) -> BTreeSet<Key> {
        let mut keys: BTreeSet<Key> = lock(&self.status_written_at).keys().cloned().collect();
        keys.extend(lock(&self.failures).keys().cloned());
        keys.extend(lock(&self.paced).keys().cloned());
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
    async fn full_reconciles_are_spaced_by_their_cost_until_the_spec_changes() {
        let memory = DeploymentMemory::default();
        assert_eq!(
            memory.deferred(&key("a"), Some(1)),
            None,
            "never reconciled"
        );
        memory.reconciled(&key("a"), Some(1), Duration::from_millis(30));
        let wait = memory.deferred(&key("a"), Some(1)).expect("deferred");
        assert!(
            wait <= Duration::from_millis(270) && wait > Duration::from_millis(200),
            "{wait:?}"
        );
        assert_eq!(memory.deferred(&key("a"), Some(2)), None, "a new spec");

        memory.reconciled(&key("big"), Some(1), Duration::from_secs(1));
        let wait = memory.deferred(&key("big"), Some(1)).expect("deferred");
        assert!(wait <= MAX_PACE && wait > MAX_PACE / 2, "capped: {wait:?}");
        memory.reconciled(&key("tiny"), Some(1), Duration::ZERO);
        assert_eq!(memory.deferred(&key("tiny"), Some(1)), None);

        memory.forget(&key("big"));
        assert_eq!(memory.deferred(&key("big"), Some(1)), None);
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
