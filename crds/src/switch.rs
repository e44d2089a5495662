//! `NetworkSwitch`: the device inventory. Deployments select devices by this object's labels.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A network device in the inventory. Deployments select devices by this object's labels.
#[derive(
    CustomResource, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema,
)]
#[kube(
    group = "azure.com",
    version = "v1alpha1",
    kind = "NetworkSwitch",
    plural = "networkswitches",
    shortname = "nsw",
    category = "apollo",
    namespaced,
    derive = "PartialEq",
    printcolumn = r#"{"name":"Site","type":"string","description":"Site of the device","jsonPath":".spec.site"}"#,
    printcolumn = r#"{"name":"Role","type":"string","description":"Role of the device","jsonPath":".spec.role"}"#,
    printcolumn = r#"{"name":"Address","type":"string","description":"Management address","jsonPath":".spec.managementAddress"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSwitchSpec {
    /// Site (data centre, PoP) the device lives in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Role of the device in the network, e.g. `tor`, `spine`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Management address (IP or DNS name) of the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management_address: Option<String>,
}
