//! `DeviceProcessDeployment`: one DeviceProcess per selected NetworkSwitch (DaemonSet semantics),
//! rolled out under an update strategy.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::conditions::{self, Condition};
use crate::process::DeviceProcessTemplate;

/// Condition type on a deployment: how its rollout is going (reasons [`REASON_ROLLING_UPDATE`],
/// [`REASON_COMPLETE`], [`REASON_PAUSED`], [`REASON_PROGRESS_DEADLINE_EXCEEDED`],
/// [`REASON_FAILURE_BUDGET_EXCEEDED`]).
pub const PROGRESSING: &str = "Progressing";
/// Condition type on a deployment: at most `maxUnavailable` of its DeviceProcesses are unavailable.
pub const AVAILABLE: &str = "Available";
/// Progressing=True: DeviceProcesses are being brought to the template under the strategy.
pub const REASON_ROLLING_UPDATE: &str = "RollingUpdate";
/// Progressing=True: every DeviceProcess has the template and has been available.
pub const REASON_COMPLETE: &str = "Complete";
/// Progressing=Unknown: `spec.paused` holds every update back.
pub const REASON_PAUSED: &str = "Paused";
/// Progressing=False: an updated DeviceProcess was not available within
/// `progressDeadlineSeconds` (`maxFailed` 0); the rollout is halted.
pub const REASON_PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";
/// Progressing=False: more updated DeviceProcesses than `maxFailed` missed their deadline; the
/// rollout is halted.
pub const REASON_FAILURE_BUDGET_EXCEEDED: &str = "FailureBudgetExceeded";
/// Available=True.
pub const REASON_MINIMUM_DEVICES_AVAILABLE: &str = "MinimumDevicesAvailable";
/// Available=False.
pub const REASON_MINIMUM_DEVICES_UNAVAILABLE: &str = "MinimumDevicesUnavailable";

/// Default of `progressDeadlineSeconds`.
pub const DEFAULT_PROGRESS_DEADLINE_SECONDS: i32 = 600;
/// Default of `updateStrategy.rollingUpdate.maxUnavailable`.
pub const DEFAULT_MAX_UNAVAILABLE: &str = "25%";

/// Runs one DeviceProcess on every NetworkSwitch its selector matches (DaemonSet semantics).
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "azure.com",
    version = "v1alpha1",
    kind = "DeviceProcessDeployment",
    plural = "deviceprocessdeployments",
    shortname = "dpd",
    category = "apollo",
    namespaced,
    status = "DeviceProcessDeploymentStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Desired","type":"integer","description":"Devices selected","jsonPath":".status.desiredNumberScheduled"}"#,
    printcolumn = r#"{"name":"Current","type":"integer","description":"DeviceProcesses that exist","jsonPath":".status.currentNumberScheduled"}"#,
    printcolumn = r#"{"name":"Up-to-date","type":"integer","description":"DeviceProcesses with the current template","jsonPath":".status.updatedNumberScheduled"}"#,
    printcolumn = r#"{"name":"Available","type":"integer","description":"DeviceProcesses available (connected, current spec observed, held for minReadySeconds)","jsonPath":".status.numberAvailable"}"#,
    printcolumn = r#"{"name":"Connected","type":"integer","priority":1,"description":"DeviceProcesses whose agent is connected","jsonPath":".status.numberAgentConnected"}"#,
    printcolumn = r#"{"name":"Observed","type":"integer","priority":1,"description":"DeviceProcesses whose agent observed the current spec","jsonPath":".status.numberSpecObserved"}"#,
    printcolumn = r#"{"name":"Progressing","type":"string","description":"Reason of the Progressing condition","jsonPath":".status.conditions[?(@.type==\"Progressing\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceProcessDeploymentSpec {
    /// Selects NetworkSwitch objects in this namespace by label. Must not be empty (as for a
    /// DaemonSet): an empty selector would select every device of the namespace.
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)",
        "message": "empty selector is invalid for a DeviceProcessDeployment (it would select every NetworkSwitch)"
    }]))]
    pub selector: LabelSelector,
    /// The DeviceProcess stamped out for each selected device.
    pub template: DeviceProcessTemplate,
    /// While true no DeviceProcess gets a new spec (new devices still get one, gone devices lose
    /// theirs).
    #[serde(default)]
    pub paused: bool,
    /// How long a DeviceProcess must stay available (AgentConnected=True and SpecObserved=True
    /// for its current generation) before it counts as available.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub min_ready_seconds: i32,
    /// An updated DeviceProcess not available within this many seconds counts as failed.
    #[serde(default = "default_progress_deadline_seconds")]
    #[schemars(range(min = 1))]
    pub progress_deadline_seconds: i32,
    /// How a template change reaches the DeviceProcesses.
    #[serde(default)]
    pub update_strategy: UpdateStrategy,
}

fn default_progress_deadline_seconds() -> i32 {
    DEFAULT_PROGRESS_DEADLINE_SECONDS
}

/// How a template change reaches the DeviceProcesses.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpdateStrategy {
    /// `RollingUpdate` (default): as many at a time as the budgets allow, canaries first.
    /// `AllAtOnce`: every DeviceProcess at once.
    #[serde(rename = "type", default)]
    pub type_: UpdateStrategyType,
    /// Budgets of a `RollingUpdate`.
    #[serde(default)]
    pub rolling_update: RollingUpdate,
}

/// Kind of update strategy.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
pub enum UpdateStrategyType {
    /// As many DeviceProcesses at a time as `rollingUpdate` allows.
    #[default]
    RollingUpdate,
    /// Every DeviceProcess gets the new spec at once.
    AllAtOnce,
}

/// Budgets of a rolling update.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RollingUpdate {
    /// The most DeviceProcesses of the deployment unavailable at any moment during a rollout: a
    /// number, or a percentage of the selected devices (rounded up), at least 1.
    #[serde(default = "default_max_unavailable")]
    #[schemars(schema_with = "max_unavailable_schema")]
    pub max_unavailable: IntOrString,
    /// Never more than `maxUnavailable` unavailable among the devices that share the value of the
    /// NetworkSwitch label `topologyKey` (e.g. both switches of a redundancy pair).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable_per_group: Option<GroupBudget>,
    /// Devices updated first; the rest waits until every canary is available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
    /// When more updated DeviceProcesses than this have failed (missed `progressDeadlineSeconds`),
    /// the rollout halts until the spec changes again (a new template, or `paused` toggled).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub max_failed: i32,
}

fn default_max_unavailable() -> IntOrString {
    IntOrString::String(DEFAULT_MAX_UNAVAILABLE.to_owned())
}

/// An int-or-string that is never null, defaults to 25% and is validated by the apiserver (CEL).
fn max_unavailable_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "The most DeviceProcesses of the deployment unavailable at any moment during a rollout: a number, or a percentage of the selected devices (rounded up), at least 1.",
        "x-kubernetes-int-or-string": true,
        // Not optional: kube marks int-or-strings that are not required nullable; a null here
        // would be stored as is instead of defaulted.
        "nullable": false,
        "default": DEFAULT_MAX_UNAVAILABLE,
        "x-kubernetes-validations": [{
            "rule": "type(self) == string ? self.matches('^(100|[1-9][0-9]?)%$') : self >= 1",
            "message": "must be an integer of at least 1 or a percentage from 1% to 100%"
        }]
    })
}

impl Default for RollingUpdate {
    fn default() -> Self {
        Self {
            max_unavailable: default_max_unavailable(),
            max_unavailable_per_group: None,
            canary: None,
            max_failed: 0,
        }
    }
}

/// An unavailability budget per group of devices.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupBudget {
    /// NetworkSwitch label whose value names the group (e.g. `pair`, `rack`). Devices without
    /// the label are in no group.
    #[schemars(length(min = 1))]
    pub topology_key: String,
    /// The most DeviceProcesses of one group unavailable at any moment.
    #[schemars(range(min = 1))]
    pub max_unavailable: i32,
}

/// Devices updated before all others.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
pub struct Canary {
    /// Selects the canary NetworkSwitches (among those the deployment selects).
    pub selector: LabelSelector,
}

/// DaemonSet-style counts and rollout state of a deployment, written by the controller.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceProcessDeploymentStatus {
    /// metadata.generation the controller last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of devices the selector matches.
    #[serde(default)]
    pub desired_number_scheduled: i32,
    /// Number of DeviceProcesses that exist for selected devices.
    #[serde(default)]
    pub current_number_scheduled: i32,
    /// Number of DeviceProcesses whose spec matches the current template.
    #[serde(default)]
    pub updated_number_scheduled: i32,
    /// Number of DeviceProcesses with AgentConnected=True.
    #[serde(default)]
    pub number_agent_connected: i32,
    /// Number of DeviceProcesses with SpecObserved=True.
    #[serde(default)]
    pub number_spec_observed: i32,
    /// Number of DeviceProcesses available: AgentConnected=True and SpecObserved=True for their
    /// current generation, held for minReadySeconds.
    #[serde(default)]
    pub number_available: i32,
    /// Selected devices whose DeviceProcess is not available (or does not exist yet).
    #[serde(default)]
    pub number_unavailable: i32,
    /// Updated DeviceProcesses that missed progressDeadlineSeconds without taking their spec.
    #[serde(default)]
    pub number_failed: i32,
    /// DeviceProcesses waiting for the new spec because the strategy holds them back (budgets,
    /// canaries first, paused, halted).
    #[serde(default)]
    pub number_held_by_strategy: i32,
    /// When the controller last started or resumed rolling out (RFC 3339); deadlines of
    /// DeviceProcesses updated earlier count from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_start_time: Option<String>,
    /// Conditions of the deployment, keyed by type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions::conditions_schema")]
    pub conditions: Vec<Condition>,
}
