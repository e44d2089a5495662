//! Leader election through a `coordination.k8s.io/v1` Lease.
//!
//! Protocol (the same one client-go's leader election follows):
//! - Read the Lease. If it does not exist, create it naming ourselves; of racing creators the API
//!   server lets exactly one succeed (the others get 409).
//! - If we hold it, renew it (`renewTime`) every retry period.
//! - If someone else holds it, take over only once its record has not changed for a whole lease
//!   duration *as observed on our own monotonic clock* (so wall-clock skew between replicas does not
//!   matter). Take-over and renewal are `replace` calls carrying the `resourceVersion` we read, so
//!   of two replicas racing for the same record one wins and the other gets 409.
//! - We consider ourselves leader only until `renew_deadline` after the start of our last
//!   successful renewal. `renew_deadline < lease_duration`, so we stop acting before any other
//!   replica may conclude the lease expired.
//! - On shutdown the leader releases the Lease (clears the holder), so a successor starts at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{outcome_of, Metrics};
use crate::{with_timeout, Error};

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

/// What to do with the Lease as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No Lease exists: create it.
    Create,
    /// We hold it: renew.
    Renew,
    /// It is free or expired: take it over.
    TakeOver,
    /// Someone else holds a live lease: wait.
    Wait,
}

/// Decide from the Lease record. `unchanged_for` is how long the record has been observed
/// unchanged on our clock; the record's own `leaseDurationSeconds` is honoured when longer than
/// ours.
pub fn decide(
    record: Option<&LeaseSpec>,
    identity: &str,
    unchanged_for: Duration,
    lease_duration: Duration,
) -> Decision {
    let Some(spec) = record else {
        return Decision::Create;
    };
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == identity => Decision::Renew,
        None | Some("") => Decision::TakeOver,
        Some(_) => {
            let recorded = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or_default();
            if unchanged_for >= lease_duration.max(recorded) {
                Decision::TakeOver
            } else {
                Decision::Wait
            }
        }
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
    api: Api<Lease>,
    config: LeaseConfig,
    leadership: Leadership,
    metrics: Metrics,
    /// resourceVersion of the record last read, and when it was first seen.
    observed: Option<(String, Instant)>,
}

impl Elector {
    /// An elector for `config` publishing into `leadership`.
    pub fn new(
        client: kube::Client,
        config: LeaseConfig,
        leadership: Leadership,
        metrics: Metrics,
    ) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            leadership,
            metrics,
            observed: None,
        }
    }

    /// Campaign and renew until `stop`, then step down.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            let attempt_started = Instant::now();
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    if !self.leadership.is_leader() {
                        tracing::info!(identity = %self.config.identity, lease = %self.config.name, "became leader");
                    }
                    self.leadership
                        .lead_until(attempt_started + self.config.renew_deadline);
                }
                Ok(false) => {
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
            match self.release().await {
                Ok(()) => tracing::info!(identity = %self.config.identity, "released the lease"),
                Err(error) => tracing::warn!(%error, "could not release the lease; it will expire"),
            }
        }
    }

    async fn try_acquire_or_renew(&mut self) -> Result<bool, Error> {
        let timeout = self.config.api_timeout;
        let current = with_timeout("get lease", timeout, self.api.get_opt(&self.config.name))
            .await?
            .map_err(Error::GetLease)?;
        let now = Instant::now();
        let unchanged_for = match &current {
            Some(lease) => {
                let rv = lease.metadata.resource_version.clone().unwrap_or_default();
                match &self.observed {
                    Some((seen, since)) if *seen == rv => now.duration_since(*since),
                    _ => {
                        self.observed = Some((rv, now));
                        Duration::ZERO
                    }
                }
            }
            None => Duration::ZERO,
        };
        let decision = decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.config.identity,
            unchanged_for,
            self.config.lease_duration,
        );
        let wall_now = MicroTime(jiff::Timestamp::now());
        let duration_seconds =
            i32::try_from(self.config.lease_duration.as_secs_f64().ceil() as u64)
                .unwrap_or(i32::MAX);
        match (decision, current) {
            (Decision::Wait, _) => Ok(false),
            (Decision::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.config.identity.clone()),
                        lease_duration_seconds: Some(duration_seconds),
                        acquire_time: Some(wall_now.clone()),
                        renew_time: Some(wall_now),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                let result = with_timeout(
                    "create lease",
                    timeout,
                    self.api.create(&PostParams::default(), &lease),
                )
                .await?;
                self.record("create", result).map_err(Error::CreateLease)
            }
            (decision, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if decision == Decision::TakeOver {
                    tracing::info!(
                        previous = spec.holder_identity.as_deref().unwrap_or(""),
                        identity = %self.config.identity,
                        "taking over the lease"
                    );
                    spec.holder_identity = Some(self.config.identity.clone());
                    spec.acquire_time = Some(wall_now.clone());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.renew_time = Some(wall_now);
                spec.lease_duration_seconds = Some(duration_seconds);
                let result = with_timeout(
                    "replace lease",
                    timeout,
                    self.api
                        .replace(&self.config.name, &PostParams::default(), &lease),
                )
                .await?;
                self.record("update", result).map_err(Error::ReplaceLease)
            }
        }
    }

    /// Turn a write result into "we hold it" (true), "someone else won" (false on 409) or an error,
    /// remembering the record we wrote so our own renewal does not look like someone else's.
    fn record(
        &mut self,
        verb: &'static str,
        result: Result<Lease, kube::Error>,
    ) -> Result<bool, kube::Error> {
        match result {
            Ok(lease) => {
                self.metrics.write(LEASES, verb, "ok");
                self.observed = lease
                    .metadata
                    .resource_version
                    .map(|rv| (rv, Instant::now()));
                Ok(true)
            }
            Err(error) => {
                self.metrics.write(LEASES, verb, outcome_of(&error));
                match &error {
                    kube::Error::Api(status) if status.code == 409 => Ok(false),
                    _ => Err(error),
                }
            }
        }
    }

    /// Clear the holder so a successor need not wait for expiry. Done with the resourceVersion we
    /// read, so a lease someone else already took is left alone.
    async fn release(&mut self) -> Result<(), Error> {
        let timeout = self.config.api_timeout;
        let Some(mut lease) =
            with_timeout("get lease", timeout, self.api.get_opt(&self.config.name))
                .await?
                .map_err(Error::GetLease)?
        else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        let result = with_timeout(
            "release lease",
            timeout,
            self.api
                .replace(&self.config.name, &PostParams::default(), &lease),
        )
        .await?;
        self.record("update", result)
            .map(|_| ())
            .map_err(Error::ReplaceLease)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "controller-a";
    const LEASE: Duration = Duration::from_secs(15);

    fn held_by(holder: Option<&str>, seconds: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: seconds,
            ..LeaseSpec::default()
        }
    }

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

    #[test]
    fn missing_lease_is_created() {
        assert_eq!(decide(None, ME, Duration::ZERO, LEASE), Decision::Create);
    }

    #[test]
    fn own_lease_is_renewed_however_old() {
        let spec = held_by(Some(ME), Some(15));
        assert_eq!(
            decide(Some(&spec), ME, Duration::from_secs(999), LEASE),
            Decision::Renew
        );
    }

    #[test]
    fn released_lease_is_taken_at_once() {
        for holder in [None, Some("")] {
            let spec = held_by(holder, Some(1));
            assert_eq!(
                decide(Some(&spec), ME, Duration::ZERO, LEASE),
                Decision::TakeOver
            );
        }
    }

    #[test]
    fn live_lease_of_another_replica_is_respected_until_unchanged_for_a_full_duration() {
        let spec = held_by(Some("controller-b"), Some(15));
        assert_eq!(
            decide(Some(&spec), ME, Duration::from_secs(14), LEASE),
            Decision::Wait
        );
        assert_eq!(decide(Some(&spec), ME, LEASE, LEASE), Decision::TakeOver);
    }

    #[test]
    fn the_longer_of_our_and_the_recorded_duration_applies() {
        let spec = held_by(Some("controller-b"), Some(60));
        assert_eq!(
            decide(Some(&spec), ME, Duration::from_secs(30), LEASE),
            Decision::Wait
        );
        assert_eq!(
            decide(Some(&spec), ME, Duration::from_secs(60), LEASE),
            Decision::TakeOver
        );
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
