//! What the stack installs besides the CRDs and RBAC: two switches, the seed demo's
//! DeviceProcessDeployment and the gateway StatefulSet.

use std::collections::BTreeMap;

use anyhow::Context;
use apollo_crds::{DeviceProcessDeployment, NetworkSwitch};
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Api, PostParams};
use kube::Client;
use serde_json::json;

/// Name of the gateway StatefulSet (`kubectl scale statefulset apollo-gateway ...`).
pub const GATEWAY_STATEFULSET: &str = "apollo-gateway";
/// Name of the sample deployment (seed 004's demo).
pub const SAMPLE_DEPLOYMENT: &str = "demo-logger";

/// Creates `obj` unless it already exists (a restarted stack against a real cluster keeps it).
async fn create_if_missing<K>(api: &Api<K>, obj: &K) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A NetworkSwitch with the seed demo's labels.
pub fn switch(name: &str, labels: &[(&str, &str)]) -> NetworkSwitch {
    let mut sw: NetworkSwitch = serde_json::from_value(json!({
        "apiVersion": "azure.com/v1alpha1",
        "kind": "NetworkSwitch",
        "metadata": {"name": name},
        "spec": {"site": "sfo", "role": "tor"}
    }))
    .unwrap_or_else(|_| NetworkSwitch::new(name, Default::default()));
    sw.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
    );
    sw
}

/// The seed demo's DeviceProcessDeployment: every switch with site=sfo, role=tor.
pub fn demo_deployment() -> anyhow::Result<DeviceProcessDeployment> {
    serde_json::from_value(json!({
        "apiVersion": "azure.com/v1alpha1",
        "kind": "DeviceProcessDeployment",
        "metadata": {"name": SAMPLE_DEPLOYMENT},
        "spec": {
            "selector": {"matchLabels": {"site": "sfo", "role": "tor"}},
            "template": {
                "metadata": {"labels": {"app": "logger"}},
                "spec": {
                    "artifact": {"type": "oci", "url": "alpine:3.19"},
                    "execution": {
                        "backend": "container",
                        "command": ["/bin/sh", "-c"],
                        "args": ["echo hello from ${APOLLO_DEVICE_NAME}; sleep 3600"],
                        "env": [{"name": "APOLLO_DEVICE_NAME", "value": "${APOLLO_DEVICE_NAME}"}]
                    }
                }
            }
        }
    }))
    .context("build the sample DeviceProcessDeployment")
}

/// Installs the sample switches (tor1-01, tor1-02 and any extra devices) and the deployment.
pub async fn install_samples(client: &Client, ns: &str, devices: &[String]) -> anyhow::Result<()> {
    let switches: Api<NetworkSwitch> = Api::namespaced(client.clone(), ns);
    for device in devices {
        let sw = switch(device, &[("site", "sfo"), ("role", "tor"), ("rack", "r1")]);
        create_if_missing(&switches, &sw).await?;
    }
    let deployments: Api<DeviceProcessDeployment> = Api::namespaced(client.clone(), ns);
    create_if_missing(&deployments, &demo_deployment()?).await
}

/// The gateway StatefulSet. kube-controller-manager's StatefulSet controller creates its pods;
/// the template binds them to the local node (`nodeName`, so no scheduler is needed), where
/// [`crate::node`] runs one gateway process per pod. Like `deploy/base/gateway.yaml`: Parallel pod
/// management, the gateway's ServiceAccount, the pod name as the ordinal.
pub fn gateway_statefulset(replicas: u32) -> anyhow::Result<StatefulSet> {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": GATEWAY_STATEFULSET, "labels": {"app.kubernetes.io/name": "apollo-gateway"}},
        "spec": {
            "replicas": replicas,
            "serviceName": GATEWAY_STATEFULSET,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app.kubernetes.io/name": "apollo-gateway"}},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "apollo-gateway"}},
                "spec": {
                    "nodeName": crate::node::NODE_NAME,
                    "serviceAccountName": "apollo-gateway",
                    "automountServiceAccountToken": false,
                    "terminationGracePeriodSeconds": 15,
                    "containers": [{
                        "name": "gateway",
                        "image": crate::node::IMAGE,
                        "command": ["apollo-gateway"],
                        "env": [{"name": "APOLLO_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
                    }]
                }
            }
        }
    }))
    .context("build the gateway StatefulSet")
}

/// Creates the gateway StatefulSet if missing.
pub async fn install_gateway_statefulset(
    client: &Client,
    ns: &str,
    replicas: u32,
) -> anyhow::Result<()> {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    create_if_missing(&api, &gateway_statefulset(replicas)?).await
}
