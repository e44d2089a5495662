//! Every write the controller makes for a deployment: children (create, patch, delete), the
//! deployment's status, and Events. Each call is bounded by the API timeout, counted in the
//! metrics and remembered in the expectations.

use std::time::Duration;

use apollo_crds::{
    DeviceProcess, DeviceProcessDeployment, DeviceProcessDeploymentStatus, LABEL_DEPLOYMENT,
};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Resource, ResourceExt};

use crate::availability::{METADATA_FIELD_MANAGER, SPEC_FIELD_MANAGER};
use crate::events::{EventSpec, EventType};
use crate::metrics::outcome_of;
use crate::plan::{adoptable_by_label, is_controlled_by, ChildUpdate};
use crate::reconcile::Context;
use crate::status::{self, ProcessFailure};
use crate::{with_timeout, Error};

/// Field manager recorded on creates and spec updates (see [`crate::availability`]).
pub const FIELD_MANAGER: &str = SPEC_FIELD_MANAGER;

const CHILDREN: &str = "deviceprocesses";
const DEPLOYMENT_STATUS: &str = "deviceprocessdeployments/status";

/// How a create went.
pub enum Created {
    /// Created (possibly under the fallback name).
    Done(Box<DeviceProcess>),
    /// The name exists and is ours (our cache lags) or was just taken: look again shortly.
    Exists,
    /// The apiserver refused the object as invalid (422): its message.
    Invalid(String),
}

/// Create `child`. When its name is held by an object of another owner that our cache does not
/// show (a DeviceProcess without our deployment label), create it under `fallback` instead: the
/// name unique to the pair (see [`crate::names`]), so the 409 does not repeat forever.
pub async fn create_child(
    api: &Api<DeviceProcess>,
    child: &DeviceProcess,
    fallback: Option<String>,
    owner_uid: &str,
    ctx: &Context,
) -> Result<Created, Error> {
    let mut attempt = child.clone();
    let mut fallback = fallback.filter(|f| *f != child.name_any());
    loop {
        let name = attempt.name_any();
        let result = with_timeout(
            "create child",
            ctx.config.api_timeout,
            api.create(&post_params(), &attempt),
        )
        .await?;
        let error = match result {
            Ok(created) => {
                ctx.metrics.write(CHILDREN, "create", "ok");
                ctx.expectations.created(&created);
                return Ok(Created::Done(Box::new(created)));
            }
            Err(error) => error,
        };
        ctx.metrics.write(CHILDREN, "create", outcome_of(&error));
        if let Some(answer) = invalid(&error) {
            return Ok(Created::Invalid(answer.to_owned()));
        }
        if !is_status(&error, 409) {
            return Err(Error::CreateChild {
                name,
                source: error,
            });
        }
        let Some(next) = fallback.take() else {
            tracing::info!(child = %name, "DeviceProcess already exists; re-checking later");
            return Ok(Created::Exists);
        };
        // Who holds the name? Ours (the cache lags) or an orphan we may adopt: look again later.
        let holder = with_timeout("read child", ctx.config.api_timeout, api.get_opt(&name))
            .await?
            .map_err(|source| Error::CreateChild {
                name: name.clone(),
                source,
            })?;
        let ours = |h: &DeviceProcess| {
            is_controlled_by(h, owner_uid)
                || child
                    .labels()
                    .get(LABEL_DEPLOYMENT)
                    .is_some_and(|d| adoptable_by_label(h, d))
        };
        let foreign = holder.is_some_and(|h| !ours(&h));
        if !foreign {
            return Ok(Created::Exists);
        }
        tracing::info!(child = %name, fallback = %next, "another owner holds the name; creating under the name unique to this deployment and device");
        attempt.metadata.name = Some(next);
    }
}

/// Patch one child to the template. `Ok(None)` when our copy was stale (409): nothing was written
/// and the watch will deliver the current object. Spec changes are written by
/// [`FIELD_MANAGER`], metadata-only changes by [`METADATA_FIELD_MANAGER`].
pub async fn update_child(
    api: &Api<DeviceProcess>,
    update: &ChildUpdate,
    ctx: &Context,
) -> Result<Option<DeviceProcess>, Error> {
    let child_name = update.existing.name_any();
    let patch = update.merge_patch().map_err(|source| Error::EncodePatch {
        name: child_name.clone(),
        source,
    })?;
    let manager = if update.changes_spec() {
        FIELD_MANAGER
    } else {
        METADATA_FIELD_MANAGER
    };
    let result = with_timeout(
        "update child",
        ctx.config.api_timeout,
        api.patch(&child_name, &patch_params(manager), &Patch::Merge(&patch)),
    )
    .await?;
    match result {
        Ok(updated) => {
            ctx.metrics.write(CHILDREN, "patch", "ok");
            ctx.expectations.updated(&update.existing, &updated);
            if update.adopts() {
                tracing::info!(child = %child_name, "adopted the orphaned DeviceProcess");
            } else {
                tracing::info!(child = %child_name, spec = update.changes_spec(), "updated DeviceProcess to the template");
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

/// Delete one child (guarded by its uid). `Ok(true)` when deleted, `Ok(false)` when it was gone
/// already; a conflict asks for a look again (`Err` carries every other failure).
pub async fn delete_child(
    api: &Api<DeviceProcess>,
    child: &DeviceProcess,
    ctx: &Context,
) -> Result<Option<bool>, Error> {
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
        api.delete(&child_name, &params),
    )
    .await?;
    match result {
        Ok(_) => {
            ctx.metrics.write(CHILDREN, "delete", "ok");
            ctx.expectations.deleted(child);
            Ok(Some(true))
        }
        Err(error) if is_status(&error, 404) => {
            ctx.metrics.write(CHILDREN, "delete", "not_found");
            Ok(Some(false))
        }
        Err(error) => {
            ctx.metrics.write(CHILDREN, "delete", outcome_of(&error));
            if is_status(&error, 409) {
                Ok(None)
            } else {
                Err(Error::DeleteChild {
                    name: child_name,
                    source: error,
                })
            }
        }
    }
}

/// How a status write went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusWrite {
    /// The status was already as computed.
    Unchanged,
    /// Written.
    Written,
    /// A change of the agent counts alone, held back to pace writes: look again after this.
    Paced(Duration),
    /// The deployment is gone.
    Gone,
}

/// Patch `/status` when, and only when, it differs from the one shown (cache plus our writes).
pub async fn write_status(
    deployment: &DeviceProcessDeployment,
    namespace: &str,
    shown: Option<&DeviceProcessDeploymentStatus>,
    status: DeviceProcessDeploymentStatus,
    ctx: &Context,
) -> Result<StatusWrite, Error> {
    let name = deployment.name_any();
    if !status::status_changed(shown, &status) {
        return Ok(StatusWrite::Unchanged);
    }
    let key = (namespace.to_owned(), name.clone());
    if let Some(current) = shown {
        if status::only_agent_counts_changed(current, &status) {
            if let Some(wait) = ctx
                .memory
                .since_status_written(&key)
                .and_then(|elapsed| ctx.config.agent_count_interval.checked_sub(elapsed))
                .filter(|wait| !wait.is_zero())
            {
                return Ok(StatusWrite::Paced(wait));
            }
        }
    }
    ctx.leadership.ensure()?;
    let api: Api<DeviceProcessDeployment> = Api::namespaced(ctx.client.clone(), namespace);
    let body = serde_json::json!({ "status": &status });
    let result = with_timeout(
        "patch status",
        ctx.config.api_timeout,
        api.patch_status(&name, &patch_params(FIELD_MANAGER), &Patch::Merge(&body)),
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
            ctx.memory.status_written(&key);
            ctx.update_memory_gauge();
            Ok(StatusWrite::Written)
        }
        // Deleted meanwhile: nothing to report on.
        Err(error) if is_status(&error, 404) => {
            ctx.metrics.write(DEPLOYMENT_STATUS, "patch", "not_found");
            ctx.forget(namespace, &name);
            Ok(StatusWrite::Gone)
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
pub async fn publish_child_event(
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
pub async fn emit(ctx: &Context, deployment: &DeviceProcessDeployment, event: &EventSpec) {
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
/// [`emit`].
pub async fn publish_failure(
    ctx: &Context,
    deployment: &DeviceProcessDeployment,
    failure: &ProcessFailure,
) {
    let action = if failure.reason == status::REASON_FAILED_CREATE {
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
pub fn invalid(error: &kube::Error) -> Option<&str> {
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

fn patch_params(manager: &str) -> PatchParams {
    PatchParams {
        field_manager: Some(manager.to_owned()),
        ..PatchParams::default()
    }
}

/// Whether `error` is an answer of the apiserver with `code`.
pub fn is_status(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == code)
}
