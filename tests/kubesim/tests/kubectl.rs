//! Fidelity against the real `/usr/bin/kubectl`: apply of the generated CRDs and of Apollo objects
//! (default validation), printer columns, `-o json`, `get -w`, `describe` with Events,
//! `patch --type merge`, `scale statefulset` and `delete` waiting for DELETED.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use apollo_crds::{DeviceProcess, NetworkSwitch};
use common::*;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::Api;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use kubesim::KubeSim;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// kubectl against one kubesim, with its own discovery cache (kubectl caches discovery per host).
struct Kubectl {
    kubeconfig: PathBuf,
    cache: tempfile::TempDir,
}

impl Kubectl {
    fn new(kubeconfig: &Path) -> Self {
        Self {
            kubeconfig: kubeconfig.to_path_buf(),
            cache: tempfile::tempdir().expect("cache dir"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("/usr/bin/kubectl");
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.cache.path())
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Starts kubectl with stdout piped, for commands that keep running (watches, waits).
    fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn")
    }

    /// Runs kubectl to completion and returns stdout; panics with stderr if it fails.
    async fn run(&self, args: &[&str]) -> String {
        let output = within(self.command(args).output())
            .await
            .expect("kubectl runs");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "kubectl {args:?} failed: {stderr}\n{stdout}"
        );
        stdout
    }

    /// Runs kubectl expecting failure and returns stderr.
    async fn fail(&self, args: &[&str]) -> String {
        let output = within(self.command(args).output())
            .await
            .expect("kubectl runs");
        assert!(
            !output.status.success(),
            "kubectl {args:?} should have failed"
        );
        String::from_utf8_lossy(&output.stderr).into_owned()
    }
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

const OBJECTS: &str = r#"
apiVersion: azure.com/v1alpha1
kind: NetworkSwitch
metadata:
  name: tor1-01
  labels: {site: sfo, role: tor}
spec:
  site: sfo
  role: tor
  managementAddress: 10.0.0.1
---
apiVersion: azure.com/v1alpha1
kind: DeviceProcessDeployment
metadata:
  name: demo-logger
spec:
  selector:
    matchLabels: {site: sfo}
  template:
    metadata:
      labels: {app: logger}
    spec:
      artifact: {type: oci, url: "alpine:3.19"}
      execution:
        backend: container
        args: ["sleep", "3600"]
"#;

/// Applies the generated CRDs and the sample objects with kubectl's default validation.
async fn apply_everything(kubectl: &Kubectl, dir: &Path) {
    let crds = repo_file("deploy/crds");
    let applied = kubectl
        .run(&["apply", "-f", crds.to_str().expect("utf-8 path")])
        .await;
    assert_eq!(applied.matches(" created").count(), 3, "{applied}");
    let objects = dir.join("objects.yaml");
    std::fs::write(&objects, OBJECTS).expect("write objects");
    let applied = kubectl
        .run(&["apply", "-f", objects.to_str().expect("utf-8 path")])
        .await;
    assert!(
        applied.contains("networkswitch.azure.com/tor1-01 created"),
        "{applied}"
    );
    assert!(
        applied.contains("deviceprocessdeployment.azure.com/demo-logger created"),
        "{applied}"
    );
}

/// A kubesim with the CRDs and sample objects applied by kubectl, plus the directory the
/// manifests were written to. Keep the `KubeSim` alive for the whole test.
async fn start_with_everything_applied() -> (KubeSim, Client, Kubectl, TempDir) {
    let (sim, client) = start().await;
    let kubectl = Kubectl::new(sim.kubeconfig_path());
    let dir = tempfile::tempdir().expect("tempdir");
    apply_everything(&kubectl, dir.path()).await;
    (sim, client, kubectl, dir)
}

fn columns(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_crds_and_objects_then_get_with_printer_columns_and_json() {
    let (_sim, client, kubectl, dir) = start_with_everything_applied().await;
    assert_eq!(
        request_count(&client, "create", "networkswitches", "").await,
        1
    );
    // kubectl validates through the server (fieldValidation=Strict), so unknown fields are refused.
    let bogus = dir.path().join("bogus.yaml");
    std::fs::write(&bogus, "apiVersion: azure.com/v1alpha1\nkind: NetworkSwitch\nmetadata:\n  name: bogus\nspec:\n  site: sfo\n  bogus: 1\n").expect("write");
    let refused = kubectl
        .fail(&["apply", "-f", bogus.to_str().expect("path")])
        .await;
    assert!(
        refused.contains("strict decoding error: unknown field \"spec.bogus\""),
        "{refused}"
    );

    let unchanged = kubectl
        .run(&[
            "apply",
            "-f",
            dir.path().join("objects.yaml").to_str().expect("path"),
        ])
        .await;
    assert!(
        unchanged.contains("networkswitch.azure.com/tor1-01 unchanged"),
        "{unchanged}"
    );
    let changed = OBJECTS.replace("10.0.0.1", "10.0.0.2");
    std::fs::write(dir.path().join("changed.yaml"), changed).expect("write");
    let configured = kubectl
        .run(&[
            "apply",
            "-f",
            dir.path().join("changed.yaml").to_str().expect("path"),
        ])
        .await;
    assert!(
        configured.contains("networkswitch.azure.com/tor1-01 configured"),
        "{configured}"
    );
    assert!(
        configured.contains("deviceprocessdeployment.azure.com/demo-logger unchanged"),
        "{configured}"
    );

    let switches = kubectl.run(&["get", "networkswitches"]).await;
    let lines: Vec<&str> = switches.lines().collect();
    assert_eq!(
        columns(lines[0]),
        vec!["NAME", "SITE", "ROLE", "ADDRESS", "AGE"],
        "{switches}"
    );
    assert_eq!(
        columns(lines[1])[..4],
        ["tor1-01", "sfo", "tor", "10.0.0.2"],
        "{switches}"
    );
    assert!(
        columns(lines[1])[4].ends_with('s'),
        "age is rendered as a duration: {switches}"
    );

    // A DeviceProcess whose status carries conditions: the Connected column uses a JSONPath filter.
    let processes: Api<DeviceProcess> = Api::default_namespaced(client.clone());
    create_process(&processes, "demo-logger-tor1-01", "tor1-01").await;
    let status = json!({"status": {"phase": "Pending", "conditions": [
        {"type": "SpecObserved", "status": "False", "reason": "SpecChanged", "message": "m", "lastTransitionTime": "2024-05-01T10:00:00Z"},
        {"type": "AgentConnected", "status": "True", "reason": "AgentConnected", "message": "m", "lastTransitionTime": "2024-05-01T10:00:00Z"},
    ]}});
    merge_patch_status(&processes, "demo-logger-tor1-01", status)
        .await
        .expect("status");
    let table = kubectl.run(&["get", "dp"]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        columns(lines[0]),
        vec![
            "NAME",
            "DEVICE",
            "PHASE",
            "CONNECTED",
            "SPECOBSERVED",
            "AGE"
        ],
        "{table}"
    );
    assert_eq!(
        columns(lines[1])[..5],
        ["demo-logger-tor1-01", "tor1-01", "Pending", "True", "False"],
        "{table}"
    );
    let all_namespaces = kubectl.run(&["get", "dpd", "-A"]).await;
    assert!(
        all_namespaces
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("default ")),
        "{all_namespaces}"
    );

    let json_output: Value =
        serde_json::from_str(&kubectl.run(&["get", "nsw", "tor1-01", "-o", "json"]).await)
            .expect("json");
    assert_eq!(json_output["apiVersion"], "azure.com/v1alpha1");
    assert_eq!(json_output["spec"]["managementAddress"], "10.0.0.2");
    assert_eq!(json_output["metadata"]["generation"], 2);
    assert!(json_output["metadata"]["annotations"]
        ["kubectl.kubernetes.io/last-applied-configuration"]
        .is_string());
    let switch: NetworkSwitch = serde_json::from_value(json_output).expect("a NetworkSwitch");
    assert_eq!(switch.spec.site.as_deref(), Some("sfo"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_watch_receives_a_change() {
    let (_sim, client, kubectl, _dir) = start_with_everything_applied().await;

    let mut single = kubectl.spawn(&["get", "nsw", "tor1-01", "-w"]);
    let mut collection = kubectl.spawn(&["get", "nsw", "-w"]);
    let mut single_lines = BufReader::new(single.stdout.take().expect("stdout")).lines();
    let mut collection_lines = BufReader::new(collection.stdout.take().expect("stdout")).lines();
    for lines in [&mut single_lines, &mut collection_lines] {
        let header = within(lines.next_line())
            .await
            .expect("read")
            .expect("header");
        assert!(header.starts_with("NAME"), "{header}");
        let row = within(lines.next_line()).await.expect("read").expect("row");
        assert_eq!(columns(&row)[1], "sfo", "{row}");
    }
    // Both watches must be established before the change, or kubectl would see it in its list.
    eventually("both watches", || async {
        (request_count(&client, "watch", "networkswitches", "").await >= 2).then_some(())
    })
    .await;

    let switches: Api<NetworkSwitch> = Api::default_namespaced(client.clone());
    merge_patch(&switches, "tor1-01", json!({"spec": {"site": "lax"}}))
        .await
        .expect("patch");
    for lines in [&mut single_lines, &mut collection_lines] {
        let row = within(lines.next_line())
            .await
            .expect("read")
            .expect("a watched row");
        assert_eq!(columns(&row)[..3], ["tor1-01", "lax", "tor"], "{row}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_shows_events_published_by_the_kube_recorder() {
    let (_sim, client, kubectl, _dir) = start_with_everything_applied().await;
    let quiet = kubectl.run(&["describe", "nsw", "tor1-01"]).await;
    assert!(
        quiet.contains("Events:") && quiet.contains("<none>"),
        "{quiet}"
    );

    let switches: Api<NetworkSwitch> = Api::default_namespaced(client.clone());
    let switch = switches.get("tor1-01").await.expect("get");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "apollo-gateway".into(),
            instance: Some("gw-0".into()),
        },
    );
    let event = Event {
        type_: EventType::Warning,
        reason: "AgentDisconnected".into(),
        note: Some("no report within the stale window".into()),
        action: "Observe".into(),
        secondary: None,
    };
    let reference = switch.object_ref(&());
    recorder
        .publish(&event, &reference)
        .await
        .expect("first publish");
    recorder
        .publish(&event, &reference)
        .await
        .expect("repeat publish");
    assert_eq!(request_count(&client, "create", "events", "").await, 1);
    assert_eq!(
        request_count(&client, "patch", "events", "").await,
        1,
        "the repeat is a series patch"
    );

    let described = kubectl.run(&["describe", "nsw", "tor1-01"]).await;
    let events = described
        .split("Events:")
        .nth(1)
        .expect("an Events section");
    let row = events
        .lines()
        .find(|l| l.contains("AgentDisconnected"))
        .unwrap_or_else(|| panic!("event row missing: {described}"));
    assert!(
        row.contains("Warning")
            && row.contains("apollo-gateway")
            && row.contains("no report within the stale window"),
        "{row}"
    );
    assert!(row.contains("(x2 over"), "series count is shown: {row}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_scale_and_delete() {
    let (_sim, client, kubectl, dir) = start_with_everything_applied().await;

    let patched = kubectl
        .run(&[
            "patch",
            "nsw",
            "tor1-01",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"role":"spine"}}"#,
        ])
        .await;
    assert!(patched.contains("patched"), "{patched}");
    let switches: Api<NetworkSwitch> = Api::default_namespaced(client.clone());
    assert_eq!(
        switches
            .get("tor1-01")
            .await
            .expect("get")
            .spec
            .role
            .as_deref(),
        Some("spine")
    );

    let statefulset = dir.path().join("sts.yaml");
    std::fs::write(&statefulset, "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: web\nspec:\n  replicas: 1\n  serviceName: web\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: web}\n    spec:\n      containers:\n      - name: c\n        image: nginx\n").expect("write");
    kubectl
        .run(&["apply", "-f", statefulset.to_str().expect("path")])
        .await;
    let scaled = kubectl
        .run(&["scale", "statefulset", "web", "--replicas=3"])
        .await;
    assert!(scaled.contains("statefulset.apps/web scaled"), "{scaled}");
    let sets: Api<StatefulSet> = Api::default_namespaced(client.clone());
    assert_eq!(
        sets.get("web")
            .await
            .expect("get")
            .spec
            .and_then(|s| s.replicas),
        Some(3)
    );
    assert_eq!(
        request_count(&client, "patch", "statefulsets", "scale").await,
        1
    );

    // A finalizer holds the object, so `kubectl delete` has to wait for the DELETED event.
    merge_patch(
        &switches,
        "tor1-01",
        json!({"metadata": {"finalizers": ["apollo.azure.com/test"]}}),
    )
    .await
    .expect("add finalizer");
    let delete = kubectl.spawn(&["delete", "nsw", "tor1-01"]);
    eventually("kubectl to watch for the deletion", || async {
        (request_count(&client, "watch", "networkswitches", "").await >= 1).then_some(())
    })
    .await;
    let terminating = switches.get("tor1-01").await.expect("still there");
    assert!(terminating.metadata.deletion_timestamp.is_some());
    merge_patch(
        &switches,
        "tor1-01",
        json!({"metadata": {"finalizers": null}}),
    )
    .await
    .expect("remove finalizer");
    let output = within(delete.wait_with_output())
        .await
        .expect("kubectl delete returns");
    assert!(output.status.success());
    let deleted = String::from_utf8_lossy(&output.stdout);
    assert!(
        deleted.contains("networkswitch.azure.com \"tor1-01\" deleted"),
        "{deleted}"
    );
    assert!(switches.get_opt("tor1-01").await.expect("get").is_none());
    let remaining = kubectl.run(&["get", "nsw", "-o", "json"]).await;
    let remaining: Value = serde_json::from_str(&remaining).expect("json");
    assert_eq!(remaining["items"].as_array().map(Vec::len), Some(0));
}
