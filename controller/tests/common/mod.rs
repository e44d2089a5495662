//! Harness for the controller's integration tests: kubesim over HTTP with Apollo's CRDs, the real
//! `apollo-controller` binary, and typed helpers for the objects the tests create.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use apollo_crds::{
    Artifact, Backend, DeviceProcess, DeviceProcessDeployment, DeviceProcessDeploymentSpec,
    DeviceProcessTemplate, Execution, NetworkSwitch, NetworkSwitchSpec, TemplateMetadata,
    WorkloadSpec, LABEL_DEPLOYMENT,
};
use apollo_test_support::{free_addr, wait_for, wait_until, KubeSimProc, Proc};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, CustomResourceExt, ResourceExt};

/// Namespace every test object lives in.
pub const NS: &str = "default";
/// Name of the leader Lease the tests' controllers use.
pub const LEASE: &str = "apollo-controller";
/// Upper bound for anything the controller should do promptly.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// kubesim with Apollo's CRDs installed, plus typed APIs on the test namespace.
pub struct Cluster {
    pub sim: KubeSimProc,
    pub client: Client,
    pub deployments: Api<DeviceProcessDeployment>,
    pub switches: Api<NetworkSwitch>,
    pub children: Api<DeviceProcess>,
    pub leases: Api<Lease>,
    pub events: Api<Event>,
}

impl Cluster {
    pub async fn start() -> Self {
        let sim = KubeSimProc::start().await;
        let client = sim.client().await;
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in [
            DeviceProcess::crd(),
            DeviceProcessDeployment::crd(),
            NetworkSwitch::crd(),
        ] {
            crds.create(&PostParams::default(), &crd)
                .await
                .expect("install CRD");
        }
        let switches: Api<NetworkSwitch> = Api::namespaced(client.clone(), NS);
        wait_until(DEADLINE, "CRDs are served", || {
            let switches = switches.clone();
            async move { switches.list(&ListParams::default()).await.is_ok() }
        })
        .await;
        Self {
            deployments: Api::namespaced(client.clone(), NS),
            children: Api::namespaced(client.clone(), NS),
            leases: Api::namespaced(client.clone(), NS),
            events: Api::namespaced(client.clone(), NS),
            switches,
            client,
            sim,
        }
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
            ("--lease-namespace", NS),
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
            .arg(self.sim.kubeconfig())
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

    pub async fn switch(&self, name: &str, switch_labels: &[(&str, &str)]) -> NetworkSwitch {
        let mut switch = NetworkSwitch::new(name, NetworkSwitchSpec::default());
        switch.metadata.labels = Some(labels(switch_labels));
        self.switches
            .create(&PostParams::default(), &switch)
            .await
            .expect("create switch")
    }

    pub async fn deployment(
        &self,
        name: &str,
        selector: LabelSelector,
        args: &[&str],
    ) -> DeviceProcessDeployment {
        let deployment = DeviceProcessDeployment::new(
            name,
            DeviceProcessDeploymentSpec {
                selector,
                template: template(args),
            },
        );
        self.deployments
            .create(&PostParams::default(), &deployment)
            .await
            .expect("create deployment")
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

    /// Wait until the deployment's status reports `desired` children, all current and updated,
    /// for its current generation; returns the deployment as it is then.
    pub async fn converged(&self, name: &str, desired: i32) -> DeviceProcessDeployment {
        let deployments = self.deployments.clone();
        wait_for(
            DEADLINE,
            &format!("deployment {name} converges on {desired} children"),
            || {
                let deployments = deployments.clone();
                async move {
                    let d = deployments.get(name).await.ok()?;
                    let status = d.status.as_ref()?;
                    let done = status.observed_generation == d.metadata.generation
                        && status.desired_number_scheduled == desired
                        && status.current_number_scheduled == desired
                        && status.updated_number_scheduled == desired;
                    done.then_some(d)
                }
            },
        )
        .await
    }

    pub async fn lease_holder(&self) -> Option<String> {
        self.leases
            .get_opt(LEASE)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
    }

    pub async fn wait_for_holder(&self, identity: &str) {
        wait_until(DEADLINE, &format!("{identity} holds the lease"), || async {
            self.lease_holder().await.as_deref() == Some(identity)
        })
        .await;
    }

    /// events.k8s.io/v1 Events about the deployment `name` with `reason`.
    pub async fn events_for(&self, name: &str, reason: &str) -> Vec<Event> {
        self.events
            .list(&ListParams::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .filter(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                    && e.regarding.as_ref().and_then(|r| r.kind.as_deref())
                        == Some("DeviceProcessDeployment")
            })
            .collect()
    }

    /// Writes kubesim counted, by resource, excluding Lease renewals.
    pub async fn writes_except_leases(&self) -> BTreeMap<String, u64> {
        let mut writes = BTreeMap::new();
        for r in self.sim.requests().await {
            let is_write = matches!(
                r.verb.as_str(),
                "create" | "update" | "patch" | "delete" | "deletecollection"
            );
            if is_write && r.resource != "leases" && r.count > 0 {
                let key = if r.subresource.is_empty() {
                    format!("{} {}", r.verb, r.resource)
                } else {
                    format!("{} {}/{}", r.verb, r.resource, r.subresource)
                };
                *writes.entry(key).or_insert(0) += r.count;
            }
        }
        writes
    }
}

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

pub fn match_labels(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels(pairs)),
        match_expressions: None,
    }
}

/// A running `apollo-controller` process and its admin address. Killed on drop.
pub struct Controller {
    pub proc: Proc,
    pub admin: SocketAddr,
    http: reqwest::Client,
}

impl Controller {
    /// Sum of every sample of `metric` whose labels contain all of `label_filters`.
    pub async fn metric(&self, metric: &str, label_filters: &[&str]) -> f64 {
        let text = self
            .http
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body");
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .filter(|line| {
                line.split(['{', ' ']).next() == Some(metric)
                    && label_filters.iter().all(|f| line.contains(f))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Writes (Events included) this process made to anything but its Lease.
    pub async fn writes_except_leases(&self) -> f64 {
        let all = self
            .metric("apollo_controller_kube_writes_total", &[])
            .await;
        let leases = self
            .metric(
                "apollo_controller_kube_writes_total",
                &[r#"resource="leases""#],
            )
            .await;
        let events = self.metric("apollo_controller_events_total", &[]).await;
        all - leases + events
    }
}
