//! Harness for the controller's integration tests: the real Kubernetes control plane (etcd,
//! kube-apiserver, kube-controller-manager; one per test binary, shared), a namespace of its own
//! per test with Apollo's CRDs and the RBAC of `deploy/rbac/`, the real `apollo-controller` binary
//! running under its own ServiceAccount, and typed helpers for the objects the tests create.
//! Request counts come from the apiserver's audit log.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use apollo_crds::{
    Artifact, Backend, DeviceProcess, DeviceProcessDeployment, DeviceProcessDeploymentSpec,
    DeviceProcessTemplate, Execution, NetworkSwitch, NetworkSwitchSpec, TemplateMetadata,
    WorkloadSpec, LABEL_DEPLOYMENT,
};
use apollo_test_support::{
    events_about, free_addr, metrics, wait_for, wait_until, ApiRequest, Component, ControlPlane,
    ControlPlaneOptions, FaultProxy, Proc, TestNamespace,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};

/// How long the controller may take to converge after an apiserver outage: its watch caches retry
/// with client-go's backoff (800 ms doubling to 30 s, reset after 2 minutes without error), and a
/// restarted apiserver refuses requests (403) until its RBAC caches have synced, so a cache may
/// wait up to 30 s before its next attempt.
pub const WATCH_RECOVERY_DEADLINE: Duration = Duration::from_secs(60);
/// Name of the leader Lease the tests' controllers use.
pub const LEASE: &str = "apollo-controller";
/// Upper bound for anything the controller should do promptly.
pub const DEADLINE: Duration = Duration::from_secs(20);
/// The label that makes a NetworkSwitch a top-of-rack switch, which most tests select on.
pub const ROLE_TOR: (&str, &str) = ("role", "tor");

/// A label (or annotation) map from `pairs`.
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A namespace of the test's own on the shared control plane, plus typed admin APIs on it. The
/// controllers it starts run as the `apollo-controller` ServiceAccount of this namespace, with
/// exactly the RBAC of `deploy/rbac/controller.yaml`, scoped to this namespace (`--namespace`,
/// `--lease-namespace`), so tests running at the same time never see each other.
pub struct Cluster {
    pub ns: TestNamespace,
    /// The admin client (the test's own set-up and reads; never given to the controller).
    pub client: Client,
    pub deployments: Api<DeviceProcessDeployment>,
    pub switches: Api<NetworkSwitch>,
    pub children: Api<DeviceProcess>,
    pub leases: Api<Lease>,
    pub events: Api<Event>,
    /// The controller's kubeconfig: its ServiceAccount token, to the apiserver or the proxy.
    kubeconfig: PathBuf,
    /// Between the controllers and the apiserver, when the test injects faults.
    pub proxy: Option<FaultProxy>,
    /// Declared last: dropped (and, when private, stopped) after everything that uses it.
    plane: Plane,
}

/// The control plane a [`Cluster`] lives on.
enum Plane {
    /// The one every test of this binary shares.
    Shared(&'static ControlPlane),
    /// One of the test's own, stopped when the test ends.
    Private(ControlPlane),
}

impl Cluster {
    /// A fresh namespace; controllers talk to the apiserver directly.
    pub async fn start() -> Self {
        Self::create(false).await
    }

    /// A fresh namespace; controllers talk to the apiserver through a [`FaultProxy`]
    /// (`cluster.proxy`).
    pub async fn start_with_fault_proxy() -> Self {
        Self::create(true).await
    }

    /// A fresh namespace on a control plane of the test's own (for kube-apiserver settings the
    /// other tests must not get).
    pub async fn start_private(options: ControlPlaneOptions) -> Self {
        Self::create_on(
            Plane::Private(ControlPlane::start_with(options).await),
            false,
        )
        .await
    }

    async fn create(with_proxy: bool) -> Self {
        Self::create_on(Plane::Shared(ControlPlane::shared().await), with_proxy).await
    }

    async fn create_on(plane: Plane, with_proxy: bool) -> Self {
        let control_plane = match &plane {
            Plane::Shared(shared) => *shared,
            Plane::Private(private) => private,
        };
        let ns = TestNamespace::create(control_plane, "ctl").await;
        let proxy = if with_proxy {
            Some(FaultProxy::start(control_plane).await)
        } else {
            None
        };
        let kubeconfig = match &proxy {
            Some(proxy) => ns.kubeconfig_via(Component::Controller, proxy).await,
            None => ns.kubeconfig_for(Component::Controller).await,
        };
        let client = ns.client();
        Self {
            deployments: ns.api(),
            switches: ns.api(),
            children: ns.api(),
            leases: ns.api(),
            events: ns.api(),
            client,
            kubeconfig,
            proxy,
            ns,
            plane,
        }
    }

    /// The control plane this cluster lives on.
    pub fn control_plane(&self) -> &ControlPlane {
        match &self.plane {
            Plane::Shared(shared) => shared,
            Plane::Private(private) => private,
        }
    }

    /// The test's namespace.
    pub fn namespace(&self) -> &str {
        self.ns.name()
    }

    /// The fault proxy (panics unless started with [`Cluster::start_with_fault_proxy`]).
    pub fn proxy(&self) -> &FaultProxy {
        self.proxy
            .as_ref()
            .expect("a cluster started with a fault proxy")
    }

    /// A fresh namespace plus one controller, `controller-a`, with the default flags: where most
    /// tests start.
    pub async fn with_controller() -> (Self, Controller) {
        let cluster = Self::start().await;
        let controller = cluster.controller("controller-a").await;
        (cluster, controller)
    }

    /// Start a controller with short lease timings; waits until its caches have synced.
    pub async fn controller(&self, identity: &str) -> Controller {
        self.controller_with(identity, &[]).await
    }

    /// Start a controller with `overrides` replacing the default flags of the same name.
    pub async fn controller_with(&self, identity: &str, overrides: &[(&str, &str)]) -> Controller {
        let admin = free_addr();
        let admin_listen = admin.to_string();
        let mut flags: BTreeMap<&str, &str> = [
            ("--admin-listen", admin_listen.as_str()),
            ("--identity", identity),
            ("--namespace", self.ns.name()),
            ("--lease-namespace", self.ns.name()),
            ("--lease-duration", "2s"),
            ("--lease-renew-deadline", "1500ms"),
            ("--lease-retry-period", "250ms"),
            ("--api-timeout", "1s"),
        ]
        .into_iter()
        .collect();
        flags.extend(overrides.iter().copied());
        let mut builder = Proc::builder(env!("CARGO_BIN_EXE_apollo-controller")).name(identity);
        // Keep whole logs for debugging a run: APOLLO_TEST_LOG_DIR=/some/dir.
        if let Ok(dir) = std::env::var("APOLLO_TEST_LOG_DIR") {
            builder = builder.log_file(format!("{dir}/{identity}-{}.log", admin.port()));
        }
        let proc = builder
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(flags.iter().flat_map(|(flag, value)| [*flag, *value]))
            .env(
                "RUST_LOG",
                std::env::var("APOLLO_TEST_CONTROLLER_LOG")
                    .unwrap_or_else(|_| "info,apollo_controller=debug".to_owned()),
            )
            .env_remove("KUBECONFIG")
            .spawn();
        let controller = Controller {
            proc,
            admin,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("http client"),
        };
        let http = controller.http.clone();
        wait_until(DEADLINE, "controller /readyz answers 200", || {
            let http = http.clone();
            async move {
                http.get(format!("http://{admin}/readyz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == reqwest::StatusCode::OK)
            }
        })
        .await;
        controller
    }

    /// Create the NetworkSwitch `name` with `switch_labels` in the test namespace.
    pub async fn switch(&self, name: &str, switch_labels: &[(&str, &str)]) -> NetworkSwitch {
        self.switches
            .create(&PostParams::default(), &new_switch(name, switch_labels))
            .await
            .expect("create switch")
    }

    /// Create a NetworkSwitch labelled [`ROLE_TOR`] for each of `names`, in that order.
    pub async fn tor_switches(&self, names: &[&str]) {
        for name in names {
            self.switch(name, &[ROLE_TOR]).await;
        }
    }

    /// Create the DeviceProcessDeployment `name` in the test namespace; see [`new_deployment`].
    pub async fn deployment(
        &self,
        name: &str,
        selector: LabelSelector,
        args: &[&str],
    ) -> DeviceProcessDeployment {
        self.deployments
            .create(
                &PostParams::default(),
                &new_deployment(name, selector, args),
            )
            .await
            .expect("create deployment")
    }

    /// The rollout most tests start from: a [`ROLE_TOR`] switch for each of `devices`, then the
    /// deployment `logger` (selector [`tor_selector`], args `["v1"]`); waits until it has
    /// converged on one child per device and returns it as it is then.
    pub async fn roll_out_logger(&self, devices: &[&str]) -> DeviceProcessDeployment {
        self.tor_switches(devices).await;
        self.deployment("logger", tor_selector(), &["v1"]).await;
        let desired = i32::try_from(devices.len()).expect("device count fits in i32");
        self.converged("logger", desired).await
    }

    /// The children labelled as belonging to `deployment`, sorted by name.
    pub async fn children_of(&self, deployment: &str) -> Vec<DeviceProcess> {
        let mut children = self
            .children
            .list(&ListParams::default().labels(&format!("{LABEL_DEPLOYMENT}={deployment}")))
            .await
            .expect("list children")
            .items;
        children.sort_by_key(ResourceExt::name_any);
        children
    }

    /// The names of the children labelled as belonging to `deployment`, sorted.
    pub async fn child_names(&self, deployment: &str) -> Vec<String> {
        self.children_of(deployment)
            .await
            .iter()
            .map(ResourceExt::name_any)
            .collect()
    }

    /// Wait until the deployment `name` can be read and satisfies `done`; returns it as it is
    /// then. `what` describes the wait in the timeout message.
    pub async fn wait_for_deployment(
        &self,
        name: &str,
        what: &str,
        done: impl Fn(&DeviceProcessDeployment) -> bool,
    ) -> DeviceProcessDeployment {
        wait_for(DEADLINE, what, || async {
            let d = self.deployments.get(name).await.ok()?;
            done(&d).then_some(d)
        })
        .await
    }

    /// Wait until the deployment's status reports `desired` children, all current and updated,
    /// for its current generation; returns the deployment as it is then.
    pub async fn converged(&self, name: &str, desired: i32) -> DeviceProcessDeployment {
        self.converged_within(DEADLINE, name, desired).await
    }

    /// [`Cluster::converged`] with a deadline of its own (after an outage: see
    /// [`WATCH_RECOVERY_DEADLINE`]).
    pub async fn converged_within(
        &self,
        deadline: Duration,
        name: &str,
        desired: i32,
    ) -> DeviceProcessDeployment {
        let what = format!("deployment {name} converges on {desired} children");
        wait_for(deadline, &what, || async {
            let d = self.deployments.get(name).await.ok()?;
            d.status
                .as_ref()
                .is_some_and(|status| {
                    status.observed_generation == d.metadata.generation
                        && status.desired_number_scheduled == desired
                        && status.current_number_scheduled == desired
                        && status.updated_number_scheduled == desired
                })
                .then_some(d)
        })
        .await
    }

    /// Wait until kube-controller-manager's garbage collector watches Apollo's kinds; see
    /// [`wait_for_garbage_collector`].
    pub async fn wait_for_garbage_collector(&self) {
        match &self.plane {
            Plane::Shared(shared) => wait_for_garbage_collector(shared).await,
            Plane::Private(_) => {
                panic!("the garbage-collector probe is for the shared control plane")
            }
        }
    }

    /// The `holderIdentity` of the leader Lease, if it exists and is held.
    pub async fn lease_holder(&self) -> Option<String> {
        self.leases
            .get_opt(LEASE)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
    }

    /// Wait until `identity` holds the leader Lease.
    pub async fn wait_for_holder(&self, identity: &str) {
        wait_until(DEADLINE, &format!("{identity} holds the lease"), || async {
            self.lease_holder().await.as_deref() == Some(identity)
        })
        .await;
    }

    /// events.k8s.io/v1 Events about the deployment `name` with `reason`.
    pub async fn events_for(&self, name: &str, reason: &str) -> Vec<Event> {
        events_about(&self.events, name, Some("DeviceProcessDeployment"), reason).await
    }

    /// Every request the apiserver served to this namespace's component identities (here: the
    /// controllers) since the namespace was made or [`Cluster::reset_requests`] last ran, from
    /// its audit log. The test's own admin requests are not among them.
    pub async fn requests(&self) -> Vec<ApiRequest> {
        self.ns.requests().await
    }

    /// Forget the requests counted so far.
    pub async fn reset_requests(&self) {
        self.ns.reset_requests().await;
    }

    /// Requests with `verb` on `resource` (any API group); `subresource` None matches any,
    /// `Some("")` only the main resource.
    pub async fn count(&self, verb: &str, resource: &str, subresource: Option<&str>) -> u64 {
        self.ns.count(verb, resource, subresource).await
    }

    /// Requests with any of `verbs` on `resource` (any API group); `subresource` None matches
    /// any, `Some("")` only the main resource.
    pub async fn count_requests(
        &self,
        verbs: &[&str],
        resource: &str,
        subresource: Option<&str>,
    ) -> u64 {
        self.requests()
            .await
            .iter()
            .filter(|r| verbs.contains(&r.verb.as_str()) && r.resource == resource)
            .filter(|r| subresource.is_none_or(|s| r.subresource == s))
            .count() as u64
    }

    /// Assert that the apiserver served no request with any of `verbs` on any of `resources`
    /// (any subresource) since the namespace was made or its counts were last reset. `why` says
    /// what that shows; the failure message lists every such request.
    pub async fn assert_no_requests(&self, verbs: &[&str], resources: &[&str], why: &str) {
        let made: Vec<ApiRequest> = self
            .requests()
            .await
            .into_iter()
            .filter(|r| {
                verbs.contains(&r.verb.as_str()) && resources.contains(&r.resource.as_str())
            })
            .collect();
        assert!(
            made.is_empty(),
            "expected no {verbs:?} requests on {resources:?} ({why}), the apiserver served {made:#?}"
        );
    }

    /// Assert that exactly `expected` Events with `reason` are about the deployment `name`. An
    /// Event is published right after the write it reports, so a test that saw the write may
    /// look before the Event exists: wait (with the deadline) until there are at least
    /// `expected`, then require exactly that many.
    pub async fn assert_events(&self, name: &str, reason: &str, expected: usize) {
        let events = wait_for(
            DEADLINE,
            &format!("{expected} {reason} Events about deployment {name}"),
            || async {
                let events = self.events_for(name, reason).await;
                (events.len() >= expected).then_some(events)
            },
        )
        .await;
        assert_eq!(
            events.len(),
            expected,
            "{reason} Events about deployment {name}: {events:#?}"
        );
    }

    /// Writes the apiserver served, by verb and resource, excluding Lease renewals.
    pub async fn writes_except_leases(&self) -> BTreeMap<String, u64> {
        let mut writes = BTreeMap::new();
        for r in self.requests().await {
            if r.is_write() && r.resource != "leases" {
                let key = if r.subresource.is_empty() {
                    format!("{} {}", r.verb, r.resource)
                } else {
                    format!("{} {}/{}", r.verb, r.resource, r.subresource)
                };
                *writes.entry(key).or_insert(0) += 1;
            }
        }
        writes
    }
}

/// How long kube-controller-manager's garbage collector may take to start watching a kind whose
/// CRD was just installed: it rediscovers resources every 30 s.
pub const GC_DISCOVERY_DEADLINE: Duration = Duration::from_secs(120);

/// Wait (once per test binary) until kube-controller-manager's garbage collector collects the
/// DeviceProcesses of a deleted DeviceProcessDeployment.
///
/// The collector watches a resource only after its discovery resync (every 30 s) that follows
/// the CRD's installation; until then a DeviceProcess whose owner is deleted stays. The shared
/// control plane is started, and the CRDs installed, by the first test of the binary, so a test
/// that relies on collection proves it works with a probe owner and child in a namespace of
/// their own first.
pub async fn wait_for_garbage_collector(control_plane: &ControlPlane) {
    static COLLECTING: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    COLLECTING
        .get_or_init(|| async {
            let ns = TestNamespace::create(control_plane, "gc-probe").await;
            let owners: Api<DeviceProcessDeployment> = ns.api();
            let children: Api<DeviceProcess> = ns.api();
            let owner = owners
                .create(
                    &PostParams::default(),
                    &new_deployment("probe", match_labels(&[("probe", "none")]), &["x"]),
                )
                .await
                .expect("create the probe owner");
            let mut child = DeviceProcess::new(
                "probe-child",
                template(&["x"]).spec.for_device("probe-device"),
            );
            child.metadata.owner_references = Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    api_version: "azure.com/v1alpha1".into(),
                    kind: "DeviceProcessDeployment".into(),
                    name: "probe".into(),
                    uid: owner.metadata.uid.clone().expect("the owner's uid"),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                },
            ]);
            children
                .create(&PostParams::default(), &child)
                .await
                .expect("create the probe child");
            owners
                .delete("probe", &kube::api::DeleteParams::background())
                .await
                .expect("delete the probe owner");
            wait_until(
                GC_DISCOVERY_DEADLINE,
                "kube-controller-manager's garbage collector collects a probe DeviceProcess",
                || async { matches!(children.get_opt("probe-child").await, Ok(None)) },
            )
            .await;
        })
        .await;
}

/// A NetworkSwitch `name` with `switch_labels` and a default spec, not yet created.
pub fn new_switch(name: &str, switch_labels: &[(&str, &str)]) -> NetworkSwitch {
    let mut switch = NetworkSwitch::new(name, NetworkSwitchSpec::default());
    switch.metadata.labels = Some(labels(switch_labels));
    switch
}

/// A DeviceProcessDeployment `name` selecting `selector` with [`template`]`(args)`, not yet
/// created.
pub fn new_deployment(
    name: &str,
    selector: LabelSelector,
    args: &[&str],
) -> DeviceProcessDeployment {
    DeviceProcessDeployment::new(
        name,
        DeviceProcessDeploymentSpec {
            selector,
            template: template(args),
            paused: false,
            min_ready_seconds: 0,
            progress_deadline_seconds: apollo_crds::DEFAULT_PROGRESS_DEADLINE_SECONDS,
            update_strategy: Default::default(),
        },
    )
}

/// The template the tests deploy: an `alpine` container running `/bin/sh -c` with `args`,
/// labelled `app=logger` and annotated with an owner team.
pub fn template(args: &[&str]) -> DeviceProcessTemplate {
    DeviceProcessTemplate {
        metadata: TemplateMetadata {
            labels: labels(&[("app", "logger")]),
            annotations: labels(&[("apollo.azure.com/owner-team", "netops")]),
        },
        spec: WorkloadSpec {
            artifact: Artifact {
                type_: "oci".into(),
                url: "alpine:3.19".into(),
                digest: None,
            },
            execution: Execution {
                backend: Backend::Container,
                command: vec!["/bin/sh".into(), "-c".into()],
                args: args.iter().map(|a| (*a).to_owned()).collect(),
                env: vec![],
                working_dir: None,
            },
        },
    }
}

/// A selector that matches exactly the labels `pairs`.
pub fn match_labels(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels(pairs)),
        match_expressions: None,
    }
}

/// The selector most tests deploy with: every switch labelled [`ROLE_TOR`].
pub fn tor_selector() -> LabelSelector {
    match_labels(&[ROLE_TOR])
}

/// A running `apollo-controller` process and its admin address. Killed on drop.
pub struct Controller {
    pub proc: Proc,
    pub admin: SocketAddr,
    http: reqwest::Client,
}

impl Controller {
    /// Sum of every sample of `metric` whose labels contain all of `label_filters` (label pairs
    /// such as `result="ok"`), 0 when there is none.
    pub async fn metric(&self, metric: &str, label_filters: &[&str]) -> f64 {
        let url = format!("http://{}/metrics", self.admin);
        metrics::scrape(&self.http, &url, metric, label_filters).await
    }

    /// Kubernetes writes this process made (`apollo_controller_kube_writes_total`) whose labels
    /// contain all of `label_filters`, e.g. `resource="deviceprocesses"`.
    pub async fn kube_writes(&self, label_filters: &[&str]) -> f64 {
        self.metric("apollo_controller_kube_writes_total", label_filters)
            .await
    }

    /// Writes (Events included) this process made to anything but its Lease.
    pub async fn writes_except_leases(&self) -> f64 {
        let all = self.kube_writes(&[]).await;
        let leases = self.kube_writes(&[r#"resource="leases""#]).await;
        let events = self.metric("apollo_controller_events_total", &[]).await;
        all - leases + events
    }
}
