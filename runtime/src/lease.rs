//! One `coordination.k8s.io/v1` Lease held by one identity: the protocol client-go's leader
//! election follows, shared by the controller's leader election and the gateway's shard leases.
//!
//! - Read the Lease. If it does not exist, create it naming ourselves; of racing creators the API
//!   server lets exactly one succeed (the others get 409).
//! - If we hold it, renew it (`renewTime`).
//! - If someone else holds it, take over only once its record has not changed for a whole lease
//!   duration *as observed on our own monotonic clock*, never by comparing its `renewTime` with
//!   our wall clock: a replica whose clock runs ahead must not steal a live lease. A record with
//!   no holder (released) is free at once.
//! - Renewal and take-over are `replace` calls carrying the `resourceVersion` we read, so of two
//!   replicas racing for the same record one wins and the other gets 409 (reported as
//!   [`Attempt::HeldByOther`]).
//! - Release clears the holder (again under the `resourceVersion` we read, so a lease someone else
//!   already took is left alone), so a successor need not wait for expiry.
//!
//! How long the holder may *act* on the lease is the caller's business: it should stop acting
//! before `duration` has passed since the start of its last successful attempt.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::time::Instant;

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

/// Decides from the Lease record. `unchanged_for` is how long the record has been observed
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

/// How an attempt that left us holding the lease got it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// There was no Lease; we created it.
    Created,
    /// It was ours; we renewed it.
    Renewed,
    /// It was free, released or expired; we took it from `previous` (empty when released).
    TookOver {
        /// The holder before us.
        previous: String,
    },
}

/// The result of [`LeaseLock::try_acquire_or_renew`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// We hold the lease for `duration` from the start of this attempt.
    Held(Held),
    /// Someone else holds a live lease, or won the race for it.
    HeldByOther,
}

/// A Lease call that failed. A lost race is not an error (see [`Attempt::HeldByOther`]).
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The API server answered with an error.
    #[error("{verb} lease {name}: {source}")]
    Api {
        /// get, create or update.
        verb: &'static str,
        /// The Lease.
        name: String,
        /// Cause.
        source: kube::Error,
    },
    /// The call did not finish in time.
    #[error("{verb} lease {name}: timed out after {after:?}")]
    Timeout {
        /// get, create or update.
        verb: &'static str,
        /// The Lease.
        name: String,
        /// The bound that was exceeded.
        after: Duration,
    },
}

/// Told of every write (`create` or `update`) and its outcome, e.g. to count writes in metrics.
pub type WriteObserver = Arc<dyn Fn(&'static str, Result<(), &kube::Error>) + Send + Sync>;

/// One Lease, contended for by one identity. Keeps what it last observed of the record, so it
/// must be kept across attempts (one per Lease and identity).
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    call_timeout: Duration,
    labels: BTreeMap<String, String>,
    on_write: Option<WriteObserver>,
    /// resourceVersion of the record last read or written, and when it was first seen.
    observed: Option<(String, Instant)>,
}

impl fmt::Debug for LeaseLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseLock")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .field("duration", &self.duration)
            .finish_non_exhaustive()
    }
}

impl LeaseLock {
    /// The Lease `name` in `api`'s namespace, held for `duration` at a time by `identity`.
    pub fn new(
        api: Api<Lease>,
        name: impl Into<String>,
        identity: impl Into<String>,
        duration: Duration,
    ) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            duration,
            call_timeout: Duration::from_secs(5),
            labels: BTreeMap::new(),
            on_write: None,
            observed: None,
        }
    }

    /// Bound on each API call (default 5 s).
    #[must_use]
    pub fn with_call_timeout(mut self, after: Duration) -> Self {
        self.call_timeout = after;
        self
    }

    /// Labels set on the Lease when this lock creates it.
    #[must_use]
    pub fn with_labels(mut self, labels: BTreeMap<String, String>) -> Self {
        self.labels = labels;
        self
    }

    /// Calls `observer` after every write.
    #[must_use]
    pub fn on_write(mut self, observer: WriteObserver) -> Self {
        self.on_write = Some(observer);
        self
    }

    /// The Lease's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Who we are in `holderIdentity`.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One election step: create, renew or take over the Lease if we may.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, LeaseError> {
        let current = self.get().await?;
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
            &self.identity,
            unchanged_for,
            self.duration,
        );
        let wall_now = MicroTime(jiff::Timestamp::now());
        let duration_seconds =
            i32::try_from(self.duration.as_secs_f64().ceil() as u64).unwrap_or(i32::MAX);
        match (decision, current) {
            (Decision::Wait, _) => Ok(Attempt::HeldByOther),
            (Decision::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        labels: (!self.labels.is_empty()).then(|| self.labels.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(duration_seconds),
                        acquire_time: Some(wall_now.clone()),
                        renew_time: Some(wall_now),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                let written = self
                    .call("create", self.api.create(&PostParams::default(), &lease))
                    .await;
                self.written("create", written, Held::Created)
            }
            (decision, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                let held = if decision == Decision::TakeOver {
                    let previous = spec.holder_identity.clone().unwrap_or_default();
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(wall_now.clone());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                    Held::TookOver { previous }
                } else {
                    Held::Renewed
                };
                spec.renew_time = Some(wall_now);
                spec.lease_duration_seconds = Some(duration_seconds);
                let written = self
                    .call(
                        "update",
                        self.api.replace(&self.name, &PostParams::default(), &lease),
                    )
                    .await;
                self.written("update", written, held)
            }
        }
    }

    /// Clears the holder if it is us. Returns whether we released a lease we held.
    pub async fn release(&mut self) -> Result<bool, LeaseError> {
        let Some(mut lease) = self.get().await? else {
            return Ok(false);
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(false);
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        let written = self
            .call(
                "update",
                self.api.replace(&self.name, &PostParams::default(), &lease),
            )
            .await;
        Ok(matches!(
            self.written("update", written, Held::Renewed)?,
            Attempt::Held(_)
        ))
    }

    /// Reads the Lease.
    async fn get(&self) -> Result<Option<Lease>, LeaseError> {
        self.call("get", self.api.get_opt(&self.name))
            .await?
            .map_err(|source| LeaseError::Api {
                verb: "get",
                name: self.name.clone(),
                source,
            })
    }

    /// Runs one API call under the call timeout.
    async fn call<T>(
        &self,
        verb: &'static str,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<Result<T, kube::Error>, LeaseError> {
        tokio::time::timeout(self.call_timeout, call)
            .await
            .map_err(|_| LeaseError::Timeout {
                verb,
                name: self.name.clone(),
                after: self.call_timeout,
            })
    }

    /// Turns a write's result into held (remembering the record we wrote, so our own renewal does
    /// not look like someone else's), lost (409) or an error.
    fn written(
        &mut self,
        verb: &'static str,
        result: Result<Result<Lease, kube::Error>, LeaseError>,
        held: Held,
    ) -> Result<Attempt, LeaseError> {
        let result = result?;
        if let Some(observer) = &self.on_write {
            observer(verb, result.as_ref().map(|_| ()));
        }
        match result {
            Ok(lease) => {
                self.observed = lease
                    .metadata
                    .resource_version
                    .map(|rv| (rv, Instant::now()));
                Ok(Attempt::Held(held))
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::HeldByOther),
            Err(source) => Err(LeaseError::Api {
                verb,
                name: self.name.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "replica-a";
    const LEASE: Duration = Duration::from_secs(15);

    fn held_by(holder: Option<&str>, seconds: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: seconds,
            ..LeaseSpec::default()
        }
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
        let spec = held_by(Some("replica-b"), Some(15));
        assert_eq!(
            decide(Some(&spec), ME, Duration::from_secs(14), LEASE),
            Decision::Wait
        );
        assert_eq!(decide(Some(&spec), ME, LEASE, LEASE), Decision::TakeOver);
    }

    #[test]
    fn the_longer_of_our_and_the_recorded_duration_applies() {
        let spec = held_by(Some("replica-b"), Some(60));
        assert_eq!(
            decide(Some(&spec), ME, Duration::from_secs(30), LEASE),
            Decision::Wait
        );
        assert_eq!(
            decide(Some(&spec), ME, Duration::from_secs(60), LEASE),
            Decision::TakeOver
        );
    }
}
