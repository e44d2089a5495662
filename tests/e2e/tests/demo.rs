//! The seed demo (shared/seeds/004) end to end against the local stack, driven with the real
//! kubectl: what `scripts/dev.sh` gives a person (its own control plane, Apollo in apollo-system,
//! the samples in default, Jaeger), proved by a test.

use std::time::{Duration, Instant};

use apollo_crds::conditions::{self, AGENT_CONNECTED};
use apollo_crds::DeviceProcess;
use apollo_dev::{fleet, Ports, Stack, StackConfig, SYSTEM_NAMESPACE};
use apollo_test_support::{binary, wait_until};

const DEP: &str = "demo-logger";

async fn kubectl(stack: &Stack, args: &[&str]) -> String {
    let out = stack.kubectl(args).await;
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn dps(stack: &Stack) -> Vec<DeviceProcess> {
    let json = kubectl(stack, &["get", "dp", "-o", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&json).expect("kubectl json");
    serde_json::from_value(v["items"].clone()).expect("DeviceProcess list")
}

fn connected(dp: &DeviceProcess) -> Option<String> {
    let st = dp.status.as_ref()?;
    conditions::find(&st.conditions, AGENT_CONNECTED).map(|c| c.status.clone())
}

/// Sum of the gateways' desired-poll answers by code.
async fn desired_codes(stack: &Stack) -> (u64, u64) {
    let http = reqwest::Client::new();
    let (mut ok, mut not_modified) = (0, 0);
    for o in stack.gateways().ordinals() {
        let Some(admin) = stack.gateways().admin_addr(o) else {
            continue;
        };
        let text = http
            .get(format!("http://{admin}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        for line in text
            .lines()
            .filter(|l| l.starts_with("apollo_gateway_http_requests_total{"))
        {
            if !line.contains("desired") {
                continue;
            }
            let n: f64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            if line.contains("code=\"304\"") {
                not_modified += n as u64;
            } else if line.contains("code=\"200\"") {
                ok += n as u64;
            }
        }
    }
    (ok, not_modified)
}

#[tokio::test]
async fn the_seed_demo_runs_end_to_end_with_kubectl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin_dir = binary("apollo-dev")
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let mut cfg = StackConfig::demo(dir.path().to_path_buf(), bin_dir);
    cfg.ports = Ports::ephemeral();
    cfg.heartbeat_interval_seconds = 2;
    cfg.sweep_interval_seconds = 1;
    cfg.gateway_extra_args = vec!["--shard-lease=3s".into()];
    cfg.agent_poll_wait_seconds = 1;
    let stack = Stack::start(cfg).await.expect("start the stack");
    let client = stack.client();

    // Two DeviceProcesses with stable names, then status within 5 s.
    wait_until(Duration::from_secs(10), "two DeviceProcesses", || async {
        dps(&stack).await.len() == 2
    })
    .await;
    let appeared = Instant::now();
    wait_until(
        Duration::from_secs(5),
        "Pending, connected and observed",
        || async {
            let items = dps(&stack).await;
            items.len() == 2
                && items.iter().all(|dp| {
                    fleet::healthy(dp)
                        && dp.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending")
                })
        },
    )
    .await;
    assert!(appeared.elapsed() < Duration::from_secs(5));
    let names: Vec<String> = dps(&stack)
        .await
        .iter()
        .filter_map(|d| d.metadata.name.clone())
        .collect();
    assert_eq!(names, ["demo-logger-tor1-01", "demo-logger-tor1-02"]);

    // What an operator sees.
    let table = kubectl(&stack, &["get", "dp"]).await;
    assert!(
        table.contains("DEVICE") && table.contains("CONNECTED") && table.contains("SPECOBSERVED"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .filter(|l| l.contains("Pending") && l.matches("True").count() == 2)
            .count()
            == 2,
        "{table}"
    );
    let describe = kubectl(&stack, &["describe", "dp", "demo-logger-tor1-01"]).await;
    assert!(
        describe.contains("AgentConnected") && describe.contains("SpecObserved"),
        "{describe}"
    );

    // ETags at work: once every agent has its document, polls are answered 304.
    wait_until(
        Duration::from_secs(30),
        "304s dominate the desired polls",
        || async {
            let (ok, nm) = desired_codes(&stack).await;
            nm >= 4 && nm > ok
        },
    )
    .await;

    // Template change: a new hash, observed by both agents.
    kubectl(
        &stack,
        &[
            "patch",
            "dpd",
            DEP,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"template":{"spec":{"execution":{"args":["echo","updated"]}}}}}"#,
        ],
    )
    .await;
    wait_until(
        Duration::from_secs(10),
        "the new spec is observed",
        || async {
            let items = dps(&stack).await;
            items.len() == 2
                && items
                    .iter()
                    .all(|dp| dp.spec.execution.args == ["echo", "updated"] && fleet::healthy(dp))
        },
    )
    .await;

    // Stop one agent: disconnected after the stale window, exactly one Warning.
    let before = fleet::event_counts(&client, "default")
        .await
        .expect("events");
    let key = (
        "AgentDisconnected".to_owned(),
        "demo-logger-tor1-02".to_owned(),
    );
    assert!(stack.stop_agent("tor1-02").await);
    wait_until(Duration::from_secs(20), "tor1-02 disconnected", || async {
        dps(&stack).await.iter().any(|dp| {
            dp.spec.device_ref.name == "tor1-02" && connected(dp).as_deref() == Some("False")
        })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await; // a few more sweeps must not repeat it
    let after = fleet::event_counts(&client, "default")
        .await
        .expect("events");
    assert_eq!(
        after.get(&key).copied().unwrap_or(0) - before.get(&key).copied().unwrap_or(0),
        1
    );
    let describe = kubectl(&stack, &["describe", "dp", "demo-logger-tor1-02"]).await;
    assert!(
        describe.contains("Warning") && describe.contains("AgentDisconnected"),
        "{describe}"
    );

    // Restart it without any desired change: connected again.
    stack.start_agent("tor1-02").expect("restart agent");
    wait_until(
        Duration::from_secs(10),
        "tor1-02 connected again",
        || async { dps(&stack).await.iter().all(fleet::healthy) },
    )
    .await;

    // Scale 3 -> 5 -> 2: every live device stays connected and no Event is written.
    let before = fleet::event_counts(&client, "default")
        .await
        .expect("events");
    for n in [5u32, 2] {
        kubectl(
            &stack,
            &[
                "-n",
                SYSTEM_NAMESPACE,
                "scale",
                "statefulset",
                "apollo-gateway",
                &format!("--replicas={n}"),
            ],
        )
        .await;
        stack
            .wait_gateways_ready(n, Duration::from_secs(30))
            .await
            .expect("gateways ready");
        wait_until(
            Duration::from_secs(10),
            "kubectl shows the StatefulSet ready",
            || async {
                let ready = kubectl(
                    &stack,
                    &[
                        "-n",
                        SYSTEM_NAMESPACE,
                        "get",
                        "statefulset",
                        "apollo-gateway",
                        "-o",
                        "jsonpath={.status.readyReplicas}",
                    ],
                )
                .await;
                ready.trim() == n.to_string()
            },
        )
        .await;
        // `kubectl get pods` tells which gateways run: exactly the StatefulSet's ordinals.
        let pods = kubectl(
            &stack,
            &[
                "-n",
                SYSTEM_NAMESPACE,
                "get",
                "pods",
                "-o",
                "jsonpath={.items[*].metadata.name}",
            ],
        )
        .await;
        let expected: Vec<String> = (0..n).map(|o| format!("apollo-gateway-{o}")).collect();
        assert_eq!(pods.split_whitespace().collect::<Vec<_>>(), expected);
        tokio::time::sleep(Duration::from_secs(2 * 2 * 3)).await; // two stale windows of reporting
        assert!(
            dps(&stack).await.iter().all(fleet::healthy),
            "a device lost its health at {n} replicas"
        );
    }
    assert_eq!(
        fleet::event_counts(&client, "default")
            .await
            .expect("events"),
        before
    );
    stack.shutdown().await;
}
