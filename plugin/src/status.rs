//! `rollout status`: follow a deployment's status until its rollout completes or halts, like
//! `kubectl rollout status`. Only the deployment is watched: its status (written by the controller)
//! says everything, and the Progressing condition is trusted only once it speaks of the current
//! generation.

use std::io::Write;
use std::process::ExitCode;

use apollo_controller::rollout::is_halt;
use apollo_crds::conditions;
use apollo_crds::deployment::{PROGRESSING, REASON_COMPLETE, REASON_PAUSED};
use apollo_crds::DeviceProcessDeployment;
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::watcher;

use crate::args::StatusArgs;
use crate::Error;

/// Where a rollout stands, as `rollout status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Still going; the line to print.
    Waiting(String),
    /// Done; the line to print.
    Complete(String),
    /// Halted: the Progressing condition's reason and message.
    Halted {
        /// Reason.
        reason: String,
        /// Message.
        message: String,
    },
}

/// Where the rollout of `deployment` stands.
pub fn progress(deployment: &DeviceProcessDeployment) -> Progress {
    let name = deployment.metadata.name.clone().unwrap_or_default();
    let generation = deployment.metadata.generation;
    let observed = |s: &apollo_crds::DeviceProcessDeploymentStatus| {
        s.observed_generation.is_some() && s.observed_generation >= generation
    };
    let Some(status) = deployment.status.as_ref().filter(|s| observed(s)) else {
        return Progress::Waiting(format!(
            "Waiting for deviceprocessdeployment {name:?} spec update to be observed..."
        ));
    };
    let Some(condition) = conditions::find(&status.conditions, PROGRESSING)
        .filter(|c| c.observed_generation.is_some() && c.observed_generation >= generation)
    else {
        return Progress::Waiting(format!(
            "Waiting for deviceprocessdeployment {name:?} rollout to start..."
        ));
    };
    let counts = format!(
        "{} of {} updated, {} available",
        status.updated_number_scheduled, status.desired_number_scheduled, status.number_available
    );
    match condition.reason.as_str() {
        REASON_COMPLETE => Progress::Complete(format!(
            "deviceprocessdeployment {name:?} successfully rolled out"
        )),
        reason if is_halt(reason) => Progress::Halted {
            reason: reason.to_owned(),
            message: condition.message.clone(),
        },
        REASON_PAUSED => Progress::Waiting(format!(
            "Waiting for deviceprocessdeployment {name:?} rollout: paused with {counts}, {} held (kubectl apollo rollout resume dpd/{name})",
            status.number_held_by_strategy
        )),
        _ => Progress::Waiting(format!(
            "Waiting for deviceprocessdeployment {name:?} rollout to finish: {counts}, {} held by the strategy, {} failed...",
            status.number_held_by_strategy, status.number_failed
        )),
    }
}

/// Follow `name` (or look once, with `--watch=false`).
pub async fn follow(
    client: kube::Client,
    namespace: &str,
    name: &str,
    args: &StatusArgs,
) -> Result<ExitCode, Error> {
    let api: Api<DeviceProcessDeployment> = Api::namespaced(client, namespace);
    if !args.watch {
        let deployment = api
            .get_opt(name)
            .await
            .map_err(|source| Error::Read {
                what: format!("deviceprocessdeployment {name:?}"),
                source,
            })?
            .ok_or_else(|| Error::NotFound(name.to_owned()))?;
        return report(name, &progress(&deployment), &mut None).map(|_| ExitCode::SUCCESS);
    }
    let following = watch_until_done(api, name);
    if args.timeout.is_zero() {
        following.await
    } else {
        tokio::time::timeout(args.timeout, following)
            .await
            .map_err(|_| Error::Timeout(name.to_owned()))?
    }
}

async fn watch_until_done(
    api: Api<DeviceProcessDeployment>,
    name: &str,
) -> Result<ExitCode, Error> {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).boxed();
    let mut last = None;
    let mut seen = false;
    while let Some(event) = events.next().await {
        let event = event.map_err(|source| Error::Watch {
            what: format!("deviceprocessdeployment {name:?}"),
            source,
        })?;
        match event {
            watcher::Event::Apply(d) | watcher::Event::InitApply(d) => {
                seen = true;
                if report(name, &progress(&d), &mut last)? {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            watcher::Event::Delete(_) => return Err(Error::NotFound(name.to_owned())),
            watcher::Event::InitDone if !seen => return Err(Error::NotFound(name.to_owned())),
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }
    Err(Error::NotFound(name.to_owned()))
}

/// Print `progress` unless it repeats `last`; `Ok(true)` when complete, `Err` when halted.
fn report(name: &str, progress: &Progress, last: &mut Option<Progress>) -> Result<bool, Error> {
    if last.as_ref() == Some(progress) {
        return Ok(false);
    }
    *last = Some(progress.clone());
    let mut out = std::io::stdout();
    match progress {
        Progress::Waiting(line) => {
            writeln!(out, "{line}")?;
            Ok(false)
        }
        Progress::Complete(line) => {
            writeln!(out, "{line}")?;
            Ok(true)
        }
        Progress::Halted { reason, message } => Err(Error::Halted {
            name: name.to_owned(),
            reason: reason.clone(),
            message: message.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apollo_crds::conditions::Condition;
    use apollo_crds::deployment::REASON_PROGRESS_DEADLINE_EXCEEDED;
    use apollo_crds::DeviceProcessDeploymentStatus;

    fn deployment(
        generation: i64,
        observed: i64,
        reason: Option<(&str, i64)>,
    ) -> DeviceProcessDeployment {
        let mut d: DeviceProcessDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "azure.com/v1alpha1",
            "kind": "DeviceProcessDeployment",
            "metadata": {"name": "bgp", "generation": generation},
            "spec": {
                "selector": {"matchLabels": {"role": "tor"}},
                "template": {"spec": {"artifact": {"type": "oci", "url": "u"},
                                      "execution": {"backend": "container"}}}
            }
        }))
        .expect("deployment");
        d.status = Some(DeviceProcessDeploymentStatus {
            observed_generation: Some(observed),
            desired_number_scheduled: 20,
            updated_number_scheduled: 7,
            number_available: 17,
            number_held_by_strategy: 13,
            conditions: reason
                .map(|(r, g)| {
                    vec![
                        Condition::new(PROGRESSING, "True", r, "msg", "2026-01-01T00:00:00Z")
                            .with_generation(Some(g)),
                    ]
                })
                .unwrap_or_default(),
            ..Default::default()
        });
        d
    }

    #[test]
    fn a_status_of_an_older_generation_is_not_trusted() {
        assert!(matches!(
            progress(&deployment(3, 2, Some((REASON_COMPLETE, 2)))),
            Progress::Waiting(line) if line.contains("spec update to be observed")
        ));
        assert!(matches!(
            progress(&deployment(3, 3, Some((REASON_COMPLETE, 2)))),
            Progress::Waiting(line) if line.contains("to start")
        ));
    }

    #[test]
    fn complete_halted_paused_and_rolling_read_as_kubectl_would_print_them() {
        assert_eq!(
            progress(&deployment(3, 3, Some((REASON_COMPLETE, 3)))),
            Progress::Complete(r#"deviceprocessdeployment "bgp" successfully rolled out"#.into())
        );
        assert_eq!(
            progress(&deployment(
                3,
                3,
                Some((REASON_PROGRESS_DEADLINE_EXCEEDED, 3))
            )),
            Progress::Halted {
                reason: REASON_PROGRESS_DEADLINE_EXCEEDED.into(),
                message: "msg".into()
            }
        );
        assert_eq!(
            progress(&deployment(3, 3, Some(("RollingUpdate", 3)))),
            Progress::Waiting(
                r#"Waiting for deviceprocessdeployment "bgp" rollout to finish: 7 of 20 updated, 17 available, 13 held by the strategy, 0 failed..."#
                    .into()
            )
        );
        assert!(matches!(
            progress(&deployment(3, 3, Some((REASON_PAUSED, 3)))),
            Progress::Waiting(line) if line.contains("paused") && line.contains("rollout resume dpd/bgp")
        ));
    }
}
