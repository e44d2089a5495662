//! `rollout pause` / `rollout resume`: set `spec.paused`, as `kubectl rollout pause` does for a
//! Deployment (and refuse when it is already so).

use std::io::Write;
use std::process::ExitCode;

use apollo_crds::DeviceProcessDeployment;
use kube::api::{Api, Patch, PatchParams};

use crate::Error;

/// Field manager of the plugin's writes.
pub const FIELD_MANAGER: &str = "kubectl-apollo";

/// Set `spec.paused` of `name` to `paused`.
pub async fn set_paused(
    client: kube::Client,
    namespace: &str,
    name: &str,
    paused: bool,
) -> Result<ExitCode, Error> {
    let api: Api<DeviceProcessDeployment> = Api::namespaced(client, namespace);
    let what = format!("deviceprocessdeployment {name:?}");
    let current = api
        .get_opt(name)
        .await
        .map_err(|source| Error::Read {
            what: what.clone(),
            source,
        })?
        .ok_or_else(|| Error::NotFound(name.to_owned()))?;
    let state = if paused { "paused" } else { "resumed" };
    if current.spec.paused == paused {
        return Err(Error::Already {
            name: name.to_owned(),
            state,
        });
    }
    // Guarded by the resourceVersion read, so a concurrent toggle is not silently undone.
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": current.metadata.resource_version},
        "spec": {"paused": paused},
    });
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    api.patch(name, &params, &Patch::Merge(&patch))
        .await
        .map_err(|source| Error::Write { what, source })?;
    writeln!(
        std::io::stdout(),
        "deviceprocessdeployment.azure.com/{name} {state}"
    )?;
    Ok(ExitCode::SUCCESS)
}
