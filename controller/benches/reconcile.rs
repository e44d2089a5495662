//! The computing part of one reconcile of a deployment with a large fleet, everything but the
//! writes: the desired children from the switches, the plan against the existing children, and
//! the status counts. The controller does this once per full reconcile; during a rollout its
//! children's statuses change many times a second, so this is what its CPU goes to.
//!
//! `cargo bench -p apollo-controller --bench reconcile` (numbers in docs/benchmarks.md).

/// The allocator of the `apollo-controller` binary (see its `main.rs`), so the figures are the
/// controller's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apollo_controller::plan::{desired_children, plan};
use apollo_controller::status::deployment_status;
use apollo_crds::{
    Artifact, Backend, DeviceProcess, DeviceProcessDeployment, DeviceProcessDeploymentSpec,
    DeviceProcessTemplate, Execution, NetworkSwitch, NetworkSwitchSpec, TemplateMetadata,
    UpdateStrategy, WorkloadSpec, DEFAULT_PROGRESS_DEADLINE_SECONDS,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

const NS: &str = "fabric";

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The loadtest's deployment: named like it, selecting `fleet=lt`.
fn deployment() -> DeviceProcessDeployment {
    let mut d = DeviceProcessDeployment::new(
        "lt-fleet",
        DeviceProcessDeploymentSpec {
            selector: LabelSelector {
                match_labels: Some(labels(&[("fleet", "lt")])),
                match_expressions: None,
            },
            template: DeviceProcessTemplate {
                metadata: TemplateMetadata {
                    labels: labels(&[("app", "telemetry")]),
                    annotations: BTreeMap::new(),
                },
                spec: WorkloadSpec {
                    artifact: Artifact {
                        type_: "oci".into(),
                        url: "registry.example/telemetry:1.4.2".into(),
                        digest: None,
                    },
                    execution: Execution {
                        backend: Backend::Container,
                        command: vec!["/usr/bin/telemetry".into()],
                        args: vec!["--interval=10s".into()],
                        env: vec![],
                        working_dir: None,
                    },
                },
            },
            paused: false,
            min_ready_seconds: 0,
            progress_deadline_seconds: DEFAULT_PROGRESS_DEADLINE_SECONDS,
            update_strategy: UpdateStrategy::default(),
        },
    );
    d.metadata.namespace = Some(NS.into());
    d.metadata.uid = Some("uid-lt-fleet".into());
    d.metadata.generation = Some(1);
    d
}

/// Devices named as the loadtest names them.
fn switches(n: usize) -> Vec<NetworkSwitch> {
    (0..n)
        .map(|i| {
            let mut s = NetworkSwitch::new(&format!("lt-{i:06}"), NetworkSwitchSpec::default());
            s.metadata.namespace = Some(NS.into());
            s.metadata.labels = Some(labels(&[("fleet", "lt")]));
            s
        })
        .collect()
}

fn best_of_three(what: &str, n: usize, mut f: impl FnMut() -> usize) {
    black_box(f());
    let best = (0..3)
        .map(|_| {
            let start = Instant::now();
            black_box(f());
            start.elapsed()
        })
        .min()
        .unwrap_or(Duration::ZERO);
    println!(
        "{n:>7} children  {what:<36} {:>9.1} ms",
        best.as_secs_f64() * 1e3
    );
}

fn main() {
    for n in [10_000, 100_000] {
        let d = deployment();
        let switches = switches(n);
        // Every child exists already, as the apiserver returned it.
        let existing: Vec<Arc<DeviceProcess>> = desired_children(&d, &switches, &[])
            .expect("desired")
            .children
            .into_values()
            .enumerate()
            .map(|(i, mut c)| {
                c.metadata.resource_version = Some(format!("{}", 1000 + i));
                c.metadata.uid = Some(format!("uid-{i}"));
                Arc::new(c)
            })
            .collect();
        best_of_three("desired children", n, || {
            desired_children(&d, &switches, &existing)
                .expect("desired")
                .children
                .len()
        });
        let desired = desired_children(&d, &switches, &existing).expect("desired");
        best_of_three("plan", n, || {
            plan("uid-lt-fleet", &desired.children, &existing)
                .unchanged
                .len()
        });
        let children: Vec<&DeviceProcess> = existing.iter().map(AsRef::as_ref).collect();
        best_of_three("status counts", n, || {
            deployment_status(
                &d,
                None,
                &desired.children,
                &children,
                &|_| true,
                None,
                "2026-12-03T00:00:00Z",
            )
            .current_number_scheduled as usize
        });
    }
}
