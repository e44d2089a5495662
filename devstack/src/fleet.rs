//! Many devices at once for end-to-end tests: their inventory objects, in-process agents (the real
//! agent library, one connection pool), and probes of what operators look at.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use apollo_agent::{Agent, AgentConfig, AgentMetrics};
use apollo_crds::conditions::{self, AGENT_CONNECTED, SPEC_OBSERVED};
use apollo_crds::{DeviceProcess, DeviceProcessDeployment, NetworkSwitch};
use futures::StreamExt;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::Stack;

/// `n` device names with `prefix`.
pub fn devices(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

/// Creates a NetworkSwitch per device labelled `fleet=<fleet>` and a DeviceProcessDeployment
/// named `<fleet>` selecting them; the controller then creates one DeviceProcess each.
pub async fn install(
    client: &kube::Client,
    ns: &str,
    fleet: &str,
    devices: &[String],
) -> anyhow::Result<()> {
    install_labelled(client, ns, fleet, devices, |_| Vec::new()).await
}

/// [`install`], each switch carrying the extra labels `labels(device)` (e.g. the redundancy
/// `pair` it belongs to, or `canary=true`).
pub async fn install_labelled(
    client: &kube::Client,
    ns: &str,
    fleet: &str,
    devices: &[String],
    labels: impl Fn(&str) -> Vec<(String, String)>,
) -> anyhow::Result<()> {
    let switches: Api<NetworkSwitch> = Api::namespaced(client.clone(), ns);
    let results = futures::stream::iter(devices.iter().map(|d| (d.clone(), labels(d))))
        .map(|(d, extra)| {
            let switches = switches.clone();
            async move {
                let mut pairs = vec![("fleet", fleet)];
                pairs.extend(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                let sw = crate::samples::switch(&d, &pairs);
                switches.create(&PostParams::default(), &sw).await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    for r in results {
        r.context("create NetworkSwitch")?;
    }
    let mut dep = crate::samples::demo_deployment()?;
    dep.metadata.name = Some(fleet.to_owned());
    dep.spec.selector = serde_json::from_value(json!({"matchLabels": {"fleet": fleet}}))?;
    let deps: Api<DeviceProcessDeployment> = Api::namespaced(client.clone(), ns);
    deps.create(&PostParams::default(), &dep).await?;
    Ok(())
}

/// The DeviceProcesses of a fleet, by device name.
pub async fn processes(
    client: &kube::Client,
    ns: &str,
    fleet: &str,
) -> anyhow::Result<BTreeMap<String, DeviceProcess>> {
    let api: Api<DeviceProcess> = Api::namespaced(client.clone(), ns);
    let list = api
        .list(&ListParams::default().labels(&format!("{}={fleet}", apollo_crds::LABEL_DEPLOYMENT)))
        .await?;
    Ok(list
        .items
        .into_iter()
        .map(|dp| (dp.spec.device_ref.name.clone(), dp))
        .collect())
}

/// Whether a DeviceProcess shows AgentConnected=True and SpecObserved=True at its current spec.
pub fn healthy(dp: &DeviceProcess) -> bool {
    dp.status.as_ref().is_some_and(|st| {
        st.observed_spec_hash.as_deref() == Some(apollo_crds::spec_hash(&dp.spec).as_str())
            && conditions::is_true(&st.conditions, AGENT_CONNECTED)
            && conditions::is_true(&st.conditions, SPEC_OBSERVED)
    })
}

/// Whether a DeviceProcess shows AgentConnected=False.
pub fn disconnected(dp: &DeviceProcess) -> bool {
    dp.status.as_ref().is_some_and(|st| {
        conditions::find(&st.conditions, AGENT_CONNECTED)
            .is_some_and(|c| c.status == conditions::FALSE)
    })
}

/// Apollo's Events about DeviceProcesses (events.k8s.io/v1) in `ns`, as `(reason, regarding
/// name)` → count (series included). Events of Kubernetes' own controllers (e.g. the StatefulSet
/// controller creating gateway pods) and the controller's Events about deployments are not
/// counted.
pub async fn event_counts(
    client: &kube::Client,
    ns: &str,
) -> anyhow::Result<HashMap<(String, String), u64>> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let mut out = HashMap::new();
    for e in api.list(&ListParams::default()).await?.items {
        if e.regarding.as_ref().and_then(|r| r.kind.as_deref()) != Some("DeviceProcess") {
            continue;
        }
        let reason = e.reason.unwrap_or_default();
        let name = e.regarding.and_then(|r| r.name).unwrap_or_default();
        let n = e.series.map_or(1, |s| s.count.max(1) as u64);
        *out.entry((reason, name)).or_default() += n;
    }
    Ok(out)
}

/// Which gateway ordinal answers a desired poll of `device` through the router.
pub async fn served_by(http: &reqwest::Client, stack: &Stack, device: &str) -> Option<u32> {
    let resp = http
        .get(format!(
            "{}/v1/devices/{device}/desired",
            stack.router_url()
        ))
        .header(apollo_protocol::DEVICE_TOKEN_HEADER, stack.token(device))
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.headers()
        .get(apollo_protocol::GATEWAY_HEADER)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// In-process agents for many devices, all through the stack's router.
pub struct Agents {
    metrics: Arc<AgentMetrics>,
    running: BTreeMap<String, (CancellationToken, tokio::task::JoinHandle<()>)>,
    http: reqwest::Client,
    router: reqwest::Url,
}

impl Agents {
    /// No agents yet.
    pub fn new(stack: &Stack) -> anyhow::Result<Self> {
        Ok(Self {
            metrics: Arc::new(AgentMetrics::default()),
            running: BTreeMap::new(),
            http: apollo_agent::http_client()?,
            router: stack.router_url().parse()?,
        })
    }

    /// Starts the agent of `device`.
    pub fn start(&mut self, stack: &Stack, device: &str) -> anyhow::Result<()> {
        let mut config = AgentConfig::new(device, self.router.clone());
        config.device_token = Some(stack.token(device));
        config.poll_wait = Duration::from_secs(20);
        config.initial_heartbeat_interval =
            Duration::from_secs(stack.config().heartbeat_interval_seconds);
        let agent = Agent::new(config, self.http.clone(), self.metrics.clone())?;
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move { agent.run(cancel).await }
        });
        if let Some((old, _)) = self.running.insert(device.to_owned(), (cancel, task)) {
            old.cancel();
        }
        Ok(())
    }

    /// Stops the agent of `device` and waits for it to end.
    pub async fn stop(&mut self, device: &str) {
        if let Some((cancel, task)) = self.running.remove(device) {
            cancel.cancel();
            let _ = task.await;
        }
    }

    /// Shared counters of every agent.
    pub fn metrics(&self) -> &AgentMetrics {
        &self.metrics
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for (cancel, task) in self.running.values() {
            cancel.cancel();
            task.abort();
        }
    }
}
