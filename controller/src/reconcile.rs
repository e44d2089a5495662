//! Reconcile one DeviceProcessDeployment: compute the desired children from the caches, take the
//! rollout step, write the difference it allows, and publish the status. Reads come from watch
//! caches only; a reconcile with nothing to do makes no API call at all.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use apollo_crds::{DeviceProcess, DeviceProcessDeployment, NetworkSwitch};
use apollo_runtime::backoff::{BackoffPolicy, Jitter};
use jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::ResourceExt;
use tokio::time::Instant;

use crate::availability::{readiness, Readiness, State};
use crate::events::{EventRecorder, EventSpec, EventType};
use crate::expectations::{Expectations, EXPECTATION_TTL};
use crate::lease::Leadership;
use crate::memory::{DeploymentMemory, Key};
use crate::metrics::Metrics;
use crate::plan::{self, ChildUpdate, DesiredError};
use crate::rollout::{self, Member, MemberState, Policy, Step};
use crate::status::{self, ProcessFailure};
use crate::writes::{self, Created, StatusWrite};
use crate::Error;

pub use crate::writes::FIELD_MANAGER;

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
    pub(crate) expectations: Expectations,
    /// Per-deployment memory (status pacing, failure counts).
    pub(crate) memory: DeploymentMemory,
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
            memory: DeploymentMemory::default(),
        }
    }

    /// Forget everything remembered about the deployment `namespace/name` (it was deleted).
    pub fn forget(&self, namespace: &str, name: &str) {
        self.memory.forget(&(namespace.to_owned(), name.to_owned()));
        self.expectations.forget_deployment(namespace, name);
        self.update_memory_gauge();
    }

    /// Keep memory only of the `existing` deployments (after a relist of the deployments).
    pub fn retain(&self, existing: &BTreeSet<Key>) {
        self.memory.retain(existing);
        for key in self.expectations.deployments() {
            if !existing.contains(&key) {
                self.expectations.forget_deployment(&key.0, &key.1);
            }
        }
        self.expectations.prune_expired();
        self.update_memory_gauge();
    }

    /// Deployments anything is remembered about.
    pub fn remembered_deployments(&self) -> BTreeSet<Key> {
        let mut keys = self.memory.deployments();
        keys.extend(self.expectations.deployments());
        keys
    }

    /// Publish [`Context::remembered_deployments`] as a gauge.
    pub fn update_memory_gauge(&self) {
        self.metrics
            .set_remembered_deployments(self.remembered_deployments().len());
    }
}

fn key_of(deployment: &DeviceProcessDeployment) -> Key {
    (
        deployment.namespace().unwrap_or_default(),
        deployment.name_any(),
    )
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
    let key = key_of(&deployment);
    if let Some(wait) = ctx.memory.deferred(&key, deployment.metadata.generation) {
        // A full reconcile ran moments ago for this spec; see `memory::PACE_FACTOR`. Requeueing
        // keeps the trigger: the reconcile runs once the spacing is over.
        ctx.metrics
            .reconciled("deferred", started.elapsed().as_secs_f64());
        return Ok(Action::requeue(wait));
    }
    let result = reconcile_deployment(&deployment, &ctx).await;
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconciled(label, started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.memory.succeeded(&key);
    }
    result
}

/// Retries of a failed reconcile: `--backoff-base` doubling to `--backoff-max`, with "equal
/// jitter" (a draw in the upper half of the window). Deployments that failed together (an API
/// server outage fails all of them at once) retry spread over half the window instead of in one
/// burst, and the delay still grows with every attempt.
fn retry_policy(base: Duration, max: Duration) -> BackoffPolicy {
    BackoffPolicy::new(base, max, Jitter::Equal)
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
    let attempt = ctx.memory.failed(&key_of(&deployment));
    ctx.update_memory_gauge();
    let delay = retry_policy(ctx.config.backoff_base, ctx.config.backoff_max)
        .delay(attempt, rand::random());
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

/// The rollout members of `desired`, judged from the children as they are before this reconcile's
/// writes, and the earliest moment a settling child becomes available.
fn members(
    desired: &plan::Desired,
    plan: &plan::Plan,
    policy: &Policy,
    now: Timestamp,
) -> (Vec<Member>, Option<Timestamp>) {
    let mut existing: BTreeMap<String, (&DeviceProcess, bool)> = BTreeMap::new();
    for child in &plan.unchanged {
        existing.insert(child.name_any(), (child.as_ref(), false));
    }
    for update in &plan.update {
        existing.insert(
            update.existing.name_any(),
            (update.existing.as_ref(), update.changes_spec()),
        );
    }
    let mut settles_at: Option<Timestamp> = None;
    let members = desired
        .children
        .keys()
        .map(|name| {
            let labels = desired.device_labels.get(name).cloned().unwrap_or_default();
            let state = match existing.get(name) {
                None => MemberState::Missing,
                Some((child, outdated)) => {
                    let Readiness {
                        state,
                        observed,
                        updated_at,
                    } = readiness(child, policy.min_ready, now);
                    if let State::Settling { ready_at } = state {
                        settles_at = Some(settles_at.map_or(ready_at, |t| t.min(ready_at)));
                    }
                    if *outdated {
                        MemberState::Outdated {
                            available: state.is_available(),
                        }
                    } else {
                        MemberState::Current {
                            available: state.is_available(),
                            observed,
                            updated_at,
                        }
                    }
                }
            };
            Member {
                name: name.clone(),
                canary: policy.is_canary(&labels),
                group: policy.group_of(&labels),
                state,
            }
        })
        .collect();
    (members, settles_at)
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
    // CPU spent computing (the writes' waits excluded), for the spacing of the next reconcile.
    let computing = Instant::now();
    let now_ts = Timestamp::now();
    let now = now_ts.to_string();
    let generation = deployment.metadata.generation;
    let shown_status = ctx.expectations.status_view(
        &namespace,
        &name,
        deployment.metadata.resource_version.as_deref(),
        deployment.status.as_ref(),
    );

    let switches = ctx
        .switches
        .state_filter(|s| s.metadata.namespace.as_deref() == Some(namespace.as_str()));
    // Every DeviceProcess of the namespace (any owner), as it is after our own writes.
    let in_namespace = namespace_children(ctx, &namespace);
    let desired = match plan::desired_children(
        deployment,
        switches.iter().map(AsRef::as_ref),
        &in_namespace,
    ) {
        Ok(desired) => desired,
        Err(DesiredError::InvalidSelector(problem)) => {
            // Touch no child: an unreadable selector must not delete the fleet's processes.
            let existing: Vec<&DeviceProcess> = in_namespace
                .iter()
                .map(AsRef::as_ref)
                .filter(|c| plan::is_controlled_by(c, &uid))
                .collect();
            let mut status = status::deployment_status(
                deployment,
                shown_status.as_ref(),
                &Default::default(),
                &existing,
                &|_| false,
                Some(&problem.to_string()),
                &now,
            );
            status::set_process_failure(
                &mut status,
                status::recorded_failure(deployment, shown_status.as_ref()).as_ref(),
                generation,
                &now,
            );
            let written =
                writes::write_status(deployment, &namespace, shown_status.as_ref(), status, ctx)
                    .await?;
            return Ok(match written {
                StatusWrite::Paced(wait) => Action::requeue(wait),
                _ => Action::await_change(),
            });
        }
        Err(other) => return Err(Error::Desired(name, other)),
    };

    // Our children, and orphans the plan may adopt.
    let existing: Vec<Arc<DeviceProcess>> = in_namespace
        .iter()
        .filter(|c| plan::is_controlled_by(c, &uid) || plan::is_orphan(c))
        .cloned()
        .collect();
    let plan = plan::plan(&uid, &desired.children, &existing);

    // The rollout step decides which spec changes go out now. An invalid canary selector holds
    // every spec change (and says why); creates and deletes go on.
    let (policy, canary_problem) = match Policy::of(&deployment.spec, desired.children.len()) {
        Ok(policy) => (policy, None),
        Err(problem) => {
            let mut spec = deployment.spec.clone();
            spec.update_strategy.rolling_update.canary = None;
            let policy = Policy::of(&spec, desired.children.len())
                .map_err(|e| Error::Desired(name.clone(), DesiredError::InvalidSelector(e)))?;
            let problem = format!("updateStrategy.rollingUpdate.canary.selector: {problem}");
            (policy, Some(problem))
        }
    };
    let (members, settles_at) = members(&desired, &plan, &policy, now_ts);
    let previous = status::previous_rollout(shown_status.as_ref());
    let mut step = rollout::step(&policy, &members, &previous, generation, now_ts);
    if canary_problem.is_some() {
        step.held += step.update.len();
        step.update.clear();
    }
    let go: BTreeSet<&str> = step.update.iter().map(String::as_str).collect();
    let updates: Vec<ChildUpdate> = plan
        .update
        .iter()
        .filter_map(|u| {
            if !u.changes_spec() || go.contains(u.existing.name_any().as_str()) {
                Some(u.clone())
            } else if u.adopts() {
                // Held: adopt it now (so its name is ours), give it the spec on its turn.
                Some(u.metadata_only())
            } else {
                // Held: labels and annotations go with the spec, in one write.
                None
            }
        })
        .collect();

    let mut cost = computing.elapsed();
    let children_api: Api<DeviceProcess> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut requeue_soon = false;
    // Children as they are once this reconcile's writes are done (shared, not copied: a
    // deployment may have a child per device of a large fleet).
    let mut after: Vec<Arc<DeviceProcess>> = plan.unchanged.clone();
    // The apiserver refused a child made from this generation's template as invalid: every
    // create or update from it would be refused the same way, so none is attempted until the
    // deployment changes. Deletes do not depend on the template and go ahead.
    let mut failure = status::recorded_failure(deployment, shown_status.as_ref());
    let refused_before = failure.is_some();

    for child in &plan.create {
        if failure.is_some() {
            break;
        }
        ctx.leadership.ensure()?;
        let child_name = child.name_any();
        let device = child.spec.device_ref.name.as_str();
        let fallback = Some(crate::names::hashed_child_name(&name, device));
        match writes::create_child(&children_api, child, fallback, &uid, ctx).await? {
            Created::Done(created) => {
                tracing::info!(deployment = %name, %namespace, child = %created.name_any(), "created DeviceProcess");
                writes::publish_child_event(
                    ctx,
                    deployment,
                    "SuccessfulCreate",
                    "Create",
                    &created,
                )
                .await;
                after.push(Arc::new(*created));
            }
            // Our cache has not seen it yet, or another object holds the name: the watch brings
            // the truth; look again shortly.
            Created::Exists => requeue_soon = true,
            Created::Invalid(answer) => {
                tracing::warn!(deployment = %name, %namespace, child = %child_name, %answer, "the apiserver refused the DeviceProcess made from the template");
                failure = Some(ProcessFailure::new(
                    status::REASON_FAILED_CREATE,
                    &child_name,
                    &answer,
                ));
            }
        }
    }

    let attempted: BTreeSet<String> = updates.iter().map(|u| u.existing.name_any()).collect();
    for update in &updates {
        if failure.is_some() {
            after.push(Arc::clone(&update.existing));
            continue;
        }
        ctx.leadership.ensure()?;
        match writes::update_child(&children_api, update, ctx).await {
            Ok(Some(updated)) => after.push(Arc::new(updated)),
            Ok(None) => {
                requeue_soon = true;
                after.push(Arc::clone(&update.existing));
            }
            Err(Error::UpdateChild {
                name: child,
                source,
            }) if writes::invalid(&source).is_some() => {
                let answer = writes::invalid(&source).unwrap_or_default();
                tracing::warn!(deployment = %name, %namespace, %child, %answer, "the apiserver refused the template's update of the DeviceProcess");
                failure = Some(ProcessFailure::new(
                    status::REASON_FAILED_UPDATE,
                    &child,
                    answer,
                ));
                after.push(Arc::clone(&update.existing));
            }
            Err(other) => return Err(other),
        }
    }
    // Held back entirely: as they are.
    for update in &plan.update {
        if !attempted.contains(&update.existing.name_any()) {
            after.push(Arc::clone(&update.existing));
        }
    }
    if let Some(failure) = failure.as_ref().filter(|_| !refused_before) {
        writes::publish_failure(ctx, deployment, failure).await;
    }

    for child in &plan.delete {
        ctx.leadership.ensure()?;
        match writes::delete_child(&children_api, child, ctx).await? {
            Some(true) => {
                tracing::info!(deployment = %name, %namespace, child = %child.name_any(), "deleted DeviceProcess");
                writes::publish_child_event(ctx, deployment, "SuccessfulDelete", "Delete", child)
                    .await;
            }
            Some(false) => {}
            None => requeue_soon = true,
        }
    }

    let computing = Instant::now();
    let available = |c: &DeviceProcess| readiness(c, policy.min_ready, now_ts).state.is_available();
    let mut status = status::deployment_status(
        deployment,
        shown_status.as_ref(),
        &desired.children,
        &after.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
        &available,
        canary_problem.as_deref(),
        &now,
    );
    status::apply_rollout(&mut status, &step, policy.max_unavailable, generation, &now);
    status::set_process_failure(&mut status, failure.as_ref(), generation, &now);
    cost += computing.elapsed();
    let written =
        writes::write_status(deployment, &namespace, shown_status.as_ref(), status, ctx).await?;
    ctx.memory
        .reconciled(&(namespace.clone(), name.clone()), generation, cost);
    if written == StatusWrite::Written {
        publish_rollout_event(ctx, deployment, previous.reason.as_deref(), &step, &desired).await;
    }

    let mut next = if requeue_soon {
        ctx.config.backoff_base
    } else if ctx.expectations.awaiting_creates(&namespace) {
        ctx.config.resync_period.min(EXPECTATION_TTL)
    } else {
        ctx.config.resync_period
    };
    if let StatusWrite::Paced(wait) = written {
        next = next.min(wait);
    }
    // A settling child becomes available, or a deadline passes, without any event: look then.
    for moment in [settles_at, step.next_deadline].into_iter().flatten() {
        let wait = Duration::try_from(moment.duration_since(now_ts)).unwrap_or(Duration::ZERO);
        next = next.min(wait + Duration::from_millis(50));
    }
    Ok(Action::requeue(next))
}

/// One Event when the Progressing reason changes (start, pause, resume, halt, completion); none
/// per device. Best effort, published once the status that records the change is written.
async fn publish_rollout_event(
    ctx: &Context,
    deployment: &DeviceProcessDeployment,
    previous: Option<&str>,
    step: &Step,
    desired: &plan::Desired,
) {
    let Some(event) = rollout::transition_event(previous, step.reason) else {
        return;
    };
    let total = desired.children.len();
    let note = match event.reason {
        "RolloutStarted" | "RolloutResumed" => format!(
            "rolling out to {total} DeviceProcesses, {} of them on an older spec ({})",
            step.update.len() + step.held,
            step.message
        ),
        "RolloutPaused" => format!("{} DeviceProcesses held: {}", step.held, step.message),
        _ => step.message.clone(),
    };
    let spec = EventSpec {
        type_: if event.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: event.reason.to_owned(),
        note,
        action: event.action.to_owned(),
        related: None,
    };
    writes::emit(ctx, deployment, &spec).await;
}

/// Every DeviceProcess of `namespace` in the cache (any owner), as it is after our own writes.
fn namespace_children(ctx: &Context, namespace: &str) -> Vec<Arc<DeviceProcess>> {
    let cached = ctx
        .children
        .state_filter(|c| c.metadata.namespace.as_deref() == Some(namespace));
    ctx.expectations.children_view(namespace, cached, |_| true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_reconciles_retry_in_the_upper_half_of_a_doubling_window() {
        let policy = retry_policy(Duration::from_millis(500), Duration::from_secs(60));
        assert_eq!(policy.ceiling(1), Duration::from_millis(500));
        assert_eq!(policy.ceiling(4), Duration::from_secs(4));
        assert_eq!(policy.ceiling(u32::MAX), Duration::from_secs(60));
        assert_eq!(policy.delay(4, 0.0), Duration::from_secs(2));
        assert_eq!(policy.delay(4, 1.0), Duration::from_secs(4));
    }
}
