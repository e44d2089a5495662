//! Reconcile one DeviceProcessDeployment: compute the desired children from the caches, write the
//! difference, and publish the status. Reads come from watch caches only; a reconcile with nothing
//! to do makes no API call at all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apollo_crds::{DeviceProcess, DeviceProcessDeployment, NetworkSwitch};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use tokio::time::Instant;

use crate::desired::{self, ChildUpdate, DesiredError};
use crate::events::{EventRecorder, EventSpec, EventType};
use crate::expectations::{Expectations, EXPECTATION_TTL};
use crate::lease::Leadership;
use crate::metrics::{outcome_of, Metrics};
use crate::{with_timeout, Error};

/// Field manager recorded on every write.
pub const FIELD_MANAGER: &str = "apollo-controller";

const CHILDREN: &str = "deviceprocesses";
const DEPLOYMENT_STATUS: &str = "deviceprocessdeployments/status";

/// Timing of reconciles.
#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    /// Level-triggered resync of every deployment, repairing anything a missed event left behind.
    pub resync_period: Duration,
    /// First retry delay after a failed reconcile; doubled per consecutive failure.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Bound on each API call.
    pub api_timeout: Duration,
    /// Shortest time between two status writes of one deployment that only move the agent
    /// counts; rollout progress (generation, desired, current, updated) is written at once.
    pub agent_count_interval: Duration,
}

/// Everything a reconcile needs, shared by all reconciles.
pub struct Context {
    /// Client for writes.
    pub client: kube::Client,
    /// Cache of NetworkSwitches (the controller's scope).
    pub switches: Store<NetworkSwitch>,
    /// Cache of the DeviceProcesses this controller created (label-filtered).
    pub children: Store<DeviceProcess>,
    /// Whether this replica may write.
    pub leadership: Leadership,
    /// Events on deployments.
    pub recorder: EventRecorder,
    /// Metrics.
    pub metrics: Metrics,
    /// Timing.
    pub config: ReconcileConfig,
    /// Our writes the caches have not shown yet.
    expectations: Expectations,
    /// When each deployment's status was last written, to pace agent-count-only writes.
    status_written_at: Mutex<HashMap<(String, String), Instant>>,
    /// Consecutive failures per deployment, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<DeviceProcessDeployment>, u32>>,
}

impl Context {
    /// A context over the given caches.
    pub fn new(
        client: kube::Client,
        switches: Store<NetworkSwitch>,
        children: Store<DeviceProcess>,
        leadership: Leadership,
        recorder: EventRecorder,
        metrics: Metrics,
        config: ReconcileConfig,
    ) -> Self {
        Self {
            client,
            switches,
            children,
            leadership,
            recorder,
            metrics,
            config,
            expectations: Expectations::default(),
            status_written_at: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn status_written_at(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Instant>> {
        self.status_written_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn failures(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<DeviceProcessDeployment>, u32>> {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Ceiling for retry number `attempt` (1-based): `base * 2^(attempt-1)`, capped at `max`.
pub fn backoff_delay(attempt: u32, base: Duration, max: Duration) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
    base.saturating_mul(factor).min(max)
}

/// "Equal jitter": a uniform draw in `[ceiling/2, ceiling]`. Deployments that failed together
/// (an API server outage fails all of them at once) retry spread over half the window instead of
/// in one burst, and the delay still grows with every attempt.
pub fn jittered(ceiling: Duration, rng: &mut impl rand::Rng) -> Duration {
    let half = ceiling / 2;
    half + ceiling.saturating_sub(half).mul_f64(rng.random::<f64>())
}

/// Reconcile entry point for `kube::runtime::Controller`.
pub async fn reconcile(
    deployment: Arc<DeviceProcessDeployment>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    if !ctx.leadership.is_leader() {
        // A standby keeps its caches warm; gaining leadership re-queues every deployment.
        ctx.metrics
            .reconciled("standby", started.elapsed().as_secs_f64());
        return Ok(Action::await_change());
    }
    let result = reconcile_deployment(&deployment, &ctx).await;
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconciled(label, started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.failures()
            .remove(&ObjectRef::from_obj(deployment.as_ref()));
    }
    result
}

/// Error policy for `kube::runtime::Controller`: exponential backoff per deployment.
pub fn error_policy(
    deployment: Arc<DeviceProcessDeployment>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    if matches!(error, Error::NotLeader) {
        // Leadership was lost mid-reconcile; gaining it again re-queues everything.
        return Action::await_change();
    }
    let attempt = {
        let mut failures = ctx.failures();
        let n = failures
            .entry(ObjectRef::from_obj(deployment.as_ref()))
            .or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = jittered(
        backoff_delay(attempt, ctx.config.backoff_base, ctx.config.backoff_max),
        &mut rand::rng(),
    );
    tracing::warn!(
        deployment = %deployment.name_any(),
        namespace = deployment.namespace().unwrap_or_default(),
        %error,
        attempt,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

async fn reconcile_deployment(
    deployment: &DeviceProcessDeployment,
    ctx: &Context,
) -> Result<Action, Error> {
    if deployment.metadata.deletion_timestamp.is_some() {
        // Children go with their owner through garbage collection.
        return Ok(Action::await_change());
    }
    let name = deployment.name_any();
    let namespace = deployment.namespace().ok_or(Error::Desired(
        name.clone(),
        DesiredError::MissingField("metadata.namespace"),
    ))?;
    let uid = deployment.uid().ok_or(Error::Desired(
        name.clone(),
        DesiredError::MissingField("metadata.uid"),
    ))?;
    let now = jiff::Timestamp::now().to_string();
    let shown_status = ctx.expectations.status_view(
        &namespace,
        &name,
        deployment.metadata.resource_version.as_deref(),
        deployment.status.as_ref(),
    );

    let switches = ctx
        .switches
        .state_filter(|s| s.metadata.namespace.as_deref() == Some(namespace.as_str()));
    let desired = match desired::desired_children(deployment, switches.iter().map(AsRef::as_ref)) {
        Ok(desired) => desired,
        Err(DesiredError::InvalidSelector(problem)) => {
            // Touch no child: an unreadable selector must not delete the fleet's processes.
            let existing: Vec<Arc<DeviceProcess>> = owned_children(ctx, &namespace, &uid);
            let problem = problem.to_string();
            let mut status = desired::deployment_status(
                deployment,
                shown_status.as_ref(),
                &Default::default(),
                &existing.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
                Some(&problem),
                &now,
            );
            desired::set_process_failure(
                &mut status,
                desired::recorded_failure(deployment, shown_status.as_ref()).as_ref(),
                deployment.metadata.generation,
                &now,
            );
            let paced =
                write_status(deployment, &namespace, shown_status.as_ref(), status, ctx).await?;
            return Ok(paced.map_or_else(Action::await_change, Action::requeue));
        }
        Err(other) => return Err(Error::Desired(name, other)),
    };

    // Our children, and orphans the plan may adopt.
    let existing = children_or_orphans(ctx, &namespace, &uid);
    let plan = desired::plan(&uid, &desired, &existing);
    let children_api: Api<DeviceProcess> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut requeue_soon = false;
    // Children as they are once this reconcile's writes are done (shared, not copied: a
    // deployment may have a child per device of a large fleet).
    let mut after: Vec<Arc<DeviceProcess>> = plan.unchanged.clone();
    // The apiserver refused a child made from this generation's template as invalid: every
    // create or update from it would be refused the same way, so none is attempted until the
    // deployment changes. Deletes do not depend on the template and go ahead.
    let mut failure = desired::recorded_failure(deployment, shown_status.as_ref());
    let refused_before = failure.is_some();

    for child in &plan.create {
        if failure.is_some() {
            break;
        }
        ctx.leadership.ensure()?;
        let child_name = child.name_any();
        let result = with_timeout(
            "create child",
            ctx.config.api_timeout,
            children_api.create(&post_params(), child),
        )
        .await?;
        match result {
            Ok(created) => {
                ctx.metrics.write(CHILDREN, "create", "ok");
                ctx.expectations.created(&created);
                tracing::info!(deployment = %name, %namespace, child = %child_name, "created DeviceProcess");
                publish(ctx, deployment, "SuccessfulCreate", "Create", &created).await;
                after.push(Arc::new(created));
            }
            Err(error) => {
                ctx.metrics.write(CHILDREN, "create", outcome_of(&error));
                if is_status(&error, 409) {
                    // Our cache has not seen it yet, or another object holds the name: the watch
                    // brings the truth; look again shortly.
                    tracing::info!(child = %child_name, "DeviceProcess already exists; re-checking later");
                    requeue_soon = true;
                } else if let Some(answer) = invalid(&error) {
                    tracing::warn!(deployment = %name, %namespace, child = %child_name, %answer, "the apiserver refused the DeviceProcess made from the template");
                    failure = Some(desired::ProcessFailure::new(
                        desired::REASON_FAILED_CREATE,
                        &child_name,
                        answer,
                    ));
                } else {
                    return Err(Error::CreateChild {
                        name: child_name,
                        source: error,
                    });
                }
            }
        }
    }

    for update in &plan.update {
        if failure.is_some() {
            after.push(Arc::clone(&update.existing));
            continue;
        }
        ctx.leadership.ensure()?;
        match update_child(&children_api, update, ctx).await {
            Ok(Some(updated)) => after.push(Arc::new(updated)),
            Ok(None) => {
                requeue_soon = true;
                after.push(Arc::clone(&update.existing));
            }
            Err(Error::UpdateChild {
                name: child,
                source,
            }) if invalid(&source).is_some() => {
                let answer = invalid(&source).unwrap_or_default();
                tracing::warn!(deployment = %name, %namespace, %child, %answer, "the apiserver refused the template's update of the DeviceProcess");
                failure = Some(desired::ProcessFailure::new(
                    desired::REASON_FAILED_UPDATE,
                    &child,
                    answer,
                ));
                after.push(Arc::clone(&update.existing));
            }
            Err(other) => return Err(other),
        }
    }
    if let Some(failure) = failure.as_ref().filter(|_| !refused_before) {
        publish_failure(ctx, deployment, failure).await;
    }

    for child in &plan.delete {
        ctx.leadership.ensure()?;
        let child_name = child.name_any();
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: child.uid(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let result = with_timeout(
            "delete child",
            ctx.config.api_timeout,
            children_api.delete(&child_name, &params),
        )
        .await?;
        match result {
            Ok(_) => {
                ctx.metrics.write(CHILDREN, "delete", "ok");
                ctx.expectations.deleted(child);
                tracing::info!(deployment = %name, %namespace, child = %child_name, "deleted DeviceProcess");
                publish(ctx, deployment, "SuccessfulDelete", "Delete", child).await;
            }
            Err(error) if is_status(&error, 404) => {
                ctx.metrics.write(CHILDREN, "delete", "not_found");
            }
            Err(error) => {
                ctx.metrics.write(CHILDREN, "delete", outcome_of(&error));
                if is_status(&error, 409) {
                    requeue_soon = true;
                } else {
                    return Err(Error::DeleteChild {
                        name: child_name,
                        source: error,
                    });
                }
            }
        }
    }

    let mut status = desired::deployment_status(
        deployment,
        shown_status.as_ref(),
        &desired,
        &after.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
        None,
        &now,
    );
    desired::set_process_failure(
        &mut status,
        failure.as_ref(),
        deployment.metadata.generation,
        &now,
    );
    let paced = write_status(deployment, &namespace, shown_status.as_ref(), status, ctx).await?;

    let next = if requeue_soon {
        ctx.config.backoff_base
    } else if ctx.expectations.awaiting_creates(&namespace) {
        ctx.config.resync_period.min(EXPECTATION_TTL)
    } else {
        ctx.config.resync_period
    };
    Ok(Action::requeue(paced.map_or(next, |wait| wait.min(next))))
}

/// Children controlled by the deployment with `uid`, as they are after our own writes.
fn owned_children(ctx: &Context, namespace: &str, uid: &str) -> Vec<Arc<DeviceProcess>> {
    let cached = ctx.children.state_filter(|c| {
        c.metadata.namespace.as_deref() == Some(namespace) && desired::is_controlled_by(c, uid)
    });
    ctx.expectations
        .children_view(namespace, cached, |c| desired::is_controlled_by(c, uid))
}

/// Children controlled by the deployment with `uid` or by no one, as they are after our own
/// writes.
fn children_or_orphans(ctx: &Context, namespace: &str, uid: &str) -> Vec<Arc<DeviceProcess>> {
    let ours_or_nobodys =
        |c: &DeviceProcess| desired::is_controlled_by(c, uid) || desired::is_orphan(c);
    let cached = ctx
        .children
        .state_filter(|c| c.metadata.namespace.as_deref() == Some(namespace) && ours_or_nobodys(c));
    ctx.expectations
        .children_view(namespace, cached, ours_or_nobodys)
}

/// Patch one child to the template. `Ok(None)` when our copy was stale (409): nothing was written
/// and the watch will deliver the current object.
async fn update_child(
    api: &Api<DeviceProcess>,
    update: &ChildUpdate,
    ctx: &Context,
) -> Result<Option<DeviceProcess>, Error> {
    let child_name = update.existing.name_any();
    let patch = update.merge_patch().map_err(|source| Error::EncodePatch {
        name: child_name.clone(),
        source,
    })?;
    let result = with_timeout(
        "update child",
        ctx.config.api_timeout,
        api.patch(&child_name, &patch_params(), &Patch::Merge(&patch)),
    )
    .await?;
    match result {
        Ok(updated) => {
            ctx.metrics.write(CHILDREN, "patch", "ok");
            ctx.expectations.updated(&update.existing, &updated);
            if update.adopts() {
                tracing::info!(child = %child_name, "adopted the orphaned DeviceProcess");
            } else {
                tracing::info!(child = %child_name, "updated DeviceProcess to the template");
            }
            Ok(Some(updated))
        }
        Err(error) => {
            ctx.metrics.write(CHILDREN, "patch", outcome_of(&error));
            if is_status(&error, 409) || is_status(&error, 404) {
                Ok(None)
            } else {
                Err(Error::UpdateChild {
                    name: child_name,
                    source: error,
                })
            }
        }
    }
}

/// Patch `/status` when, and only when, it differs from the one shown (cache plus our writes).
/// Returns `Some(wait)` when a change of the agent counts alone was held back to pace writes; the
/// caller re-runs the reconcile after `wait`.
async fn write_status(
    deployment: &DeviceProcessDeployment,
    namespace: &str,
    shown: Option<&apollo_crds::DeviceProcessDeploymentStatus>,
    status: apollo_crds::DeviceProcessDeploymentStatus,
    ctx: &Context,
) -> Result<Option<Duration>, Error> {
    let name = deployment.name_any();
    if !desired::status_changed(shown, &status) {
        return Ok(None);
    }
    let key = (namespace.to_owned(), name.clone());
    if let Some(current) = shown {
        if desired::only_agent_counts_changed(current, &status) {
            let since_last = ctx.status_written_at().get(&key).map(|at| at.elapsed());
            if let Some(wait) = since_last
                .and_then(|elapsed| ctx.config.agent_count_interval.checked_sub(elapsed))
                .filter(|wait| !wait.is_zero())
            {
                return Ok(Some(wait));
            }
        }
    }
    ctx.leadership.ensure()?;
    let api: Api<DeviceProcessDeployment> = Api::namespaced(ctx.client.clone(), namespace);
    let body = serde_json::json!({ "status": &status });
    let result = with_timeout(
        "patch status",
        ctx.config.api_timeout,
        api.patch_status(&name, &patch_params(), &Patch::Merge(&body)),
    )
    .await?;
    match result {
        Ok(_) => {
            ctx.metrics.write(DEPLOYMENT_STATUS, "patch", "ok");
            ctx.expectations.status_written(
                namespace,
                &name,
                deployment.metadata.resource_version.clone(),
                status,
            );
            ctx.status_written_at().insert(key, Instant::now());
            Ok(None)
        }
        // Deleted meanwhile: nothing to report on.
        Err(error) if is_status(&error, 404) => {
            ctx.metrics.write(DEPLOYMENT_STATUS, "patch", "not_found");
            ctx.status_written_at().remove(&key);
            Ok(None)
        }
        Err(error) => {
            ctx.metrics
                .write(DEPLOYMENT_STATUS, "patch", outcome_of(&error));
            Err(Error::PatchStatus {
                name,
                source: error,
            })
        }
    }
}

/// Publish a Normal Event on the deployment about `child`. Events are best effort: a failure is
/// logged and counted, never fails the reconcile.
async fn publish(
    ctx: &Context,
    deployment: &DeviceProcessDeployment,
    reason: &str,
    action: &str,
    child: &DeviceProcess,
) {
    let verb = if action == "Create" {
        "Created"
    } else {
        "Deleted"
    };
    let event = EventSpec {
        type_: EventType::Normal,
        reason: reason.to_owned(),
        note: format!("{verb} DeviceProcess: {}", child.name_any()),
        action: action.to_owned(),
        // Distinct per child (it carries the child's uid).
        related: Some(child.object_ref(&())),
    };
    emit(ctx, deployment, &event).await;
}

/// Publish `event` on the deployment, counting the outcome; a failure is logged, never fails the
/// reconcile.
async fn emit(ctx: &Context, deployment: &DeviceProcessDeployment, event: &EventSpec) {
    let outcome = with_timeout(
        "publish event",
        ctx.config.api_timeout,
        ctx.recorder.publish(event, &deployment.object_ref(&())),
    )
    .await;
    match outcome {
        Ok(Ok(())) => ctx.metrics.event("ok"),
        Ok(Err(error)) => {
            ctx.metrics.event("error");
            tracing::warn!(%error, reason = %event.reason, "could not publish event");
        }
        Err(error) => {
            ctx.metrics.event("error");
            tracing::warn!(%error, reason = %event.reason, "could not publish event");
        }
    }
}

/// Publish a Warning Event on the deployment: the apiserver refused a child made from its
/// template. Once per refused generation (the condition remembers it); best effort like
/// [`publish`].
async fn publish_failure(
    ctx: &Context,
    deployment: &DeviceProcessDeployment,
    failure: &desired::ProcessFailure,
) {
    let action = if failure.reason == desired::REASON_FAILED_CREATE {
        "Create"
    } else {
        "Update"
    };
    let event = EventSpec {
        type_: EventType::Warning,
        reason: failure.reason.clone(),
        note: failure.message.clone(),
        action: action.to_owned(),
        related: None,
    };
    emit(ctx, deployment, &event).await;
}

/// The apiserver's message when it refused a write as invalid (422).
fn invalid(error: &kube::Error) -> Option<&str> {
    match error {
        kube::Error::Api(status) if status.code == 422 => Some(status.message.as_str()),
        _ => None,
    }
}

fn post_params() -> PostParams {
    PostParams {
        dry_run: false,
        field_manager: Some(FIELD_MANAGER.to_owned()),
    }
}

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    }
}

fn is_status(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_spreads_over_the_upper_half() {
        let mut rng = rand::rng();
        let ceiling = Duration::from_secs(8);
        let draws: Vec<Duration> = (0..2000).map(|_| jittered(ceiling, &mut rng)).collect();
        assert!(draws
            .iter()
            .all(|d| *d >= Duration::from_secs(4) && *d <= ceiling));
        // Spread, not a constant: both quarters of the range are hit.
        assert!(draws.iter().any(|d| *d < Duration::from_secs(5)));
        assert!(draws.iter().any(|d| *d > Duration::from_secs(7)));
        assert_eq!(jittered(Duration::ZERO, &mut rng), Duration::ZERO);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let base = Duration::from_millis(500);
        let max = Duration::from_secs(60);
        assert_eq!(backoff_delay(1, base, max), base);
        assert_eq!(backoff_delay(2, base, max), Duration::from_secs(1));
        assert_eq!(backoff_delay(4, base, max), Duration::from_secs(4));
        assert_eq!(backoff_delay(30, base, max), max);
        assert_eq!(backoff_delay(u32::MAX, base, max), max);
    }
}
