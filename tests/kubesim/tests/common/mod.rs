//! Helpers shared by kubesim's integration tests.
#![allow(dead_code)]

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use apollo_crds::{DeviceProcess, DeviceProcessDeployment, NetworkSwitch};
use futures::{Stream, TryStreamExt};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams, WatchEvent};
use kube::core::Status;
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, CustomResourceExt};
use kubesim::{KubeSim, Options};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

pub const DEADLINE: Duration = Duration::from_secs(10);

pub async fn start() -> (KubeSim, Client) {
    start_with(Options::default()).await
}

pub async fn start_with(options: Options) -> (KubeSim, Client) {
    let sim = KubeSim::start(options).await.expect("kubesim starts");
    let client = sim.client().expect("client");
    (sim, client)
}

/// Starts a kubesim with Apollo's CRDs registered and Established.
pub async fn start_with_crds() -> (KubeSim, Client) {
    let (sim, client) = start().await;
    install_crds(&client).await;
    (sim, client)
}

/// Registers Apollo's CRDs and waits until each is Established.
pub async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [
        DeviceProcess::crd(),
        DeviceProcessDeployment::crd(),
        NetworkSwitch::crd(),
    ] {
        let name = crd.metadata.name.clone().expect("crd name");
        crds.create(&PostParams::default(), &crd)
            .await
            .expect("crd created");
        within(await_condition(
            crds.clone(),
            &name,
            conditions::is_crd_established(),
        ))
        .await
        .expect("crd established");
    }
}

/// Runs `future` with the test deadline.
pub async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(DEADLINE, future)
        .await
        .expect("finished before the deadline")
}

async fn raw(client: &Client, method: &str, path: &str, body: Option<Value>) -> Value {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(body.map(|b| b.to_string().into_bytes()).unwrap_or_default())
        .expect("request");
    let text = within(client.request_text(request))
        .await
        .expect("kubesim answers");
    serde_json::from_str(&text).expect("json reply")
}

pub async fn inject(client: &Client, rule: Value) {
    raw(client, "POST", "/kubesim/faults", Some(rule)).await;
}

pub async fn clear_faults(client: &Client) {
    raw(client, "DELETE", "/kubesim/faults", None).await;
}

pub async fn reset_requests(client: &Client) {
    raw(client, "DELETE", "/kubesim/requests", None).await;
}

/// How many requests kubesim counted for this verb, resource and subresource.
pub async fn request_count(client: &Client, verb: &str, resource: &str, subresource: &str) -> u64 {
    let counts = raw(client, "GET", "/kubesim/requests", None).await;
    counts["requests"]
        .as_array()
        .expect("requests array")
        .iter()
        .filter(|r| {
            r["verb"] == verb && r["resource"] == resource && r["subresource"] == subresource
        })
        .map(|r| r["count"].as_u64().expect("count"))
        .sum()
}

pub fn device_process(name: &str, device: &str) -> DeviceProcess {
    serde_json::from_value(json!({
        "apiVersion": "azure.com/v1alpha1",
        "kind": "DeviceProcess",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "logger", "device": device}},
        "spec": {
            "deviceRef": {"name": device},
            "artifact": {"type": "oci", "url": "alpine:3.19"},
            "execution": {"backend": "container", "args": ["sleep", "3600"]},
        },
    }))
    .expect("valid DeviceProcess")
}

/// Polls `check` until it returns Some, or panics at the deadline.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates `device_process(name, device)` through `processes`, panicking if the create fails.
pub async fn create_process(
    processes: &Api<DeviceProcess>,
    name: &str,
    device: &str,
) -> DeviceProcess {
    processes
        .create(&PostParams::default(), &device_process(name, device))
        .await
        .expect("create")
}

/// The apiserver `Status` inside an API error; panics on any other kind of error.
pub fn api_error(error: kube::Error) -> Status {
    match error {
        kube::Error::Api(status) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Merge-patches object `name` with default patch parameters.
pub async fn merge_patch<K>(api: &Api<K>, name: &str, patch: Value) -> kube::Result<K>
where
    K: Clone + DeserializeOwned + Debug,
{
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
}

/// Merge-patches the status subresource of object `name` with default patch parameters.
pub async fn merge_patch_status<K>(api: &Api<K>, name: &str, patch: Value) -> kube::Result<K>
where
    K: Clone + DeserializeOwned + Debug,
{
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
}

/// The next event of a watch stream, within the test deadline; panics on errors or stream end.
pub async fn next_event<K, S>(events: &mut S) -> WatchEvent<K>
where
    S: Stream<Item = kube::Result<WatchEvent<K>>> + Unpin,
{
    within(events.try_next()).await.expect("ok").expect("event")
}

/// Polls until object `name` no longer exists, or panics at the deadline waiting for `what`.
pub async fn eventually_gone<K>(what: &str, api: &Api<K>, name: &str)
where
    K: Clone + DeserializeOwned + Debug,
{
    eventually(what, || async {
        api.get_opt(name)
            .await
            .expect("get")
            .is_none()
            .then_some(())
    })
    .await;
}
