//! Leader election through a `coordination.k8s.io/v1` Lease.
//!
//! The Lease protocol (client-go's: create, renew, take over only after the record has been seen
//! unchanged for a lease duration on our own clock, `resourceVersion`-guarded writes, release on
//! shutdown) is [`apollo_runtime::lease::LeaseLock`]. This module adds leadership: we consider
//! ourselves leader only until `renew_deadline` after the start of our last successful renewal.
//! `renew_deadline < lease_duration`, so we stop acting before any other replica may conclude the
//! lease expired.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use apollo_runtime::lease::{Attempt, LeaseLock};
use kube::api::Api;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{outcome_of, Metrics};
use crate::Error;

const LEASES: &str = "leases";

/// Timing and identity of the election.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Name of the Lease object.
    pub name: String,
    /// Namespace of the Lease object.
    pub namespace: String,
    /// This replica's identity, written as `holderIdentity`.
    pub identity: String,
    /// How long a holder's record stays valid without renewal.
    pub lease_duration: Duration,
    /// How long the leader keeps acting after the start of its last successful renewal.
    pub renew_deadline: Duration,
    /// Time between attempts to acquire or renew.
    pub retry_period: Duration,
    /// Bound on each API call.
    pub api_timeout: Duration,
}

/// Shared view of whether this replica may write. Cheap to clone.
#[derive(Clone)]
pub struct Leadership {
    valid_until: Arc<Mutex<Option<Instant>>>,
    changes: Arc<watch::Sender<bool>>,
}

impl Default for Leadership {
    fn default() -> Self {
        Self::new()
    }
}

impl Leadership {
    /// Not leading.
    pub fn new() -> Self {
        Self {
            valid_until: Arc::new(Mutex::new(None)),
            changes: Arc::new(watch::channel(false).0),
        }
    }

    /// Whether this replica may write now. Time-checked, so leadership ends on its deadline even
    /// if the elector is stuck.
    pub fn is_leader(&self) -> bool {
        let valid_until = *self
            .valid_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        valid_until.is_some_and(|t| Instant::now() < t)
    }

    /// `Err(NotLeader)` unless this replica may write now.
    pub fn ensure(&self) -> Result<(), Error> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(Error::NotLeader)
        }
    }

    /// Receives `true` when leadership is gained and `false` when it is lost.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.changes.subscribe()
    }

    fn lead_until(&self, deadline: Instant) {
        *self
            .valid_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(deadline);
        self.publish();
    }

    fn step_down(&self) {
        *self
            .valid_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.publish();
    }

    fn publish(&self) {
        let leading = self.is_leader();
        self.changes.send_if_modified(|current| {
            let changed = *current != leading;
            *current = leading;
            changed
        });
    }
}

/// Pause before the next election attempt. The leader renews on the period (its deadline is what
/// matters); a standby waits up to 20% longer at random, so standbys that started together do not
/// hit the API server in lock-step, as client-go's elector does with its jitter factor.
pub fn next_attempt_in(retry_period: Duration, leading: bool) -> Duration {
    if leading {
        retry_period
    } else {
        retry_period.mul_f64(1.0 + 0.2 * rand::random::<f64>())
    }
}

/// Runs the election until `stop` is cancelled, then releases the Lease if held.
pub struct Elector {
    lock: LeaseLock,
    config: LeaseConfig,
    leadership: Leadership,
    metrics: Metrics,
}

impl Elector {
    /// An elector for `config` publishing into `leadership`.
    pub fn new(
        client: kube::Client,
        config: LeaseConfig,
        leadership: Leadership,
        metrics: Metrics,
    ) -> Self {
        let counted = metrics.clone();
        let lock = LeaseLock::new(
            Api::namespaced(client, &config.namespace),
            config.name.clone(),
            config.identity.clone(),
            config.lease_duration,
        )
        .with_call_timeout(config.api_timeout)
        .on_write(Arc::new(move |verb, result| {
            counted.write(LEASES, verb, result.map_or_else(outcome_of, |()| "ok"));
        }));
        Self {
            lock,
            config,
            leadership,
            metrics,
        }
    }

    /// Campaign and renew until `stop`, then step down.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            let attempt_started = Instant::now();
            match self.lock.try_acquire_or_renew().await {
                Ok(Attempt::Held(held)) => {
                    if !self.leadership.is_leader() {
                        tracing::info!(identity = %self.config.identity, lease = %self.config.name, ?held, "became leader");
                    }
                    self.leadership
                        .lead_until(attempt_started + self.config.renew_deadline);
                }
                Ok(Attempt::HeldByOther) => {
                    if self.leadership.is_leader() {
                        tracing::warn!(identity = %self.config.identity, "lost the lease");
                    }
                    self.leadership.step_down();
                }
                Err(error) => {
                    // Keep leading until the deadline: one failed renewal is not a lost lease.
                    tracing::warn!(%error, "lease election attempt failed");
                    self.leadership.publish();
                }
            }
            self.metrics.set_leader(self.leadership.is_leader());
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(next_attempt_in(self.config.retry_period, self.leadership.is_leader())) => {}
            }
        }
        let was_leader = self.leadership.is_leader();
        self.leadership.step_down();
        self.metrics.set_leader(false);
        if was_leader {
            // Clear the holder so a successor need not wait for expiry.
            match self.lock.release().await {
                Ok(_) => tracing::info!(identity = %self.config.identity, "released the lease"),
                Err(error) => tracing::warn!(%error, "could not release the lease; it will expire"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standbys_retry_jittered_and_the_leader_on_the_period() {
        let period = Duration::from_secs(2);
        assert_eq!(next_attempt_in(period, true), period);
        let waits: Vec<Duration> = (0..500).map(|_| next_attempt_in(period, false)).collect();
        assert!(waits
            .iter()
            .all(|w| *w >= period && *w <= period.mul_f64(1.2)));
        assert!(waits.iter().any(|w| *w != waits[0]), "no spread");
    }

    #[tokio::test]
    async fn leadership_expires_on_its_deadline_and_publishes_changes() {
        let leadership = Leadership::new();
        let mut changes = leadership.subscribe();
        assert!(!leadership.is_leader());
        assert!(matches!(leadership.ensure(), Err(Error::NotLeader)));
        leadership.lead_until(Instant::now() + Duration::from_secs(60));
        assert!(leadership.is_leader());
        assert!(changes.has_changed().expect("sender alive"));
        assert!(*changes.borrow_and_update());
        leadership.lead_until(Instant::now() - Duration::from_millis(1));
        assert!(!leadership.is_leader(), "a passed deadline ends leadership");
        assert!(!*changes.borrow_and_update());
        leadership.lead_until(Instant::now() + Duration::from_secs(60));
        leadership.step_down();
        assert!(!leadership.is_leader());
    }
}
