//! Monitoring as shipped in deploy/monitoring, checked against the real parts:
//! - offline: the PrometheusRule is alerts.yaml wrapped, every alert has a severity, a runbook and a
//!   promtool test that fires it; the compose scrape configuration names every Apollo service on
//!   its admin port; the kustomize Component's PodMonitor selects every Apollo pod by a port it has
//!   (the promtool runs themselves are deploy/monitoring/check.sh, a step of scripts/test.sh);
//! - live: the local stack with its real Prometheus (tools/prometheus) scrapes every component,
//!   evaluates every alert rule without error and every dashboard query without error or unknown
//!   metric name, and a stopped agent's disconnection is in Prometheus within a scrape interval.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use apollo_dev::prometheus::Prometheus;
use apollo_dev::{fleet, samples::SAMPLE_DEPLOYMENT, Stack, StackConfig};
use apollo_test_support::{binary, metrics, wait_for, wait_until};
use serde_json::Value;

use common::compose;

fn monitoring() -> PathBuf {
    common::repo_root().join("deploy/monitoring")
}

fn yaml(name: &str) -> Value {
    let path = monitoring().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// `(alert name, rule)` of every alerting rule of alerts.yaml.
fn alerts() -> Vec<(String, Value)> {
    list(&yaml("alerts.yaml")["groups"])
        .iter()
        .flat_map(|g| list(&g["rules"]).to_vec())
        .filter_map(|r| Some((r["alert"].as_str()?.to_owned(), r)))
        .collect()
}

#[test]
fn the_prometheus_rule_is_the_rules_file_wrapped() {
    let rule = yaml("prometheusrule.yaml");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(rule["metadata"]["namespace"], "apollo-system");
    assert_eq!(
        rule["spec"],
        yaml("alerts.yaml"),
        "prometheusrule.yaml drifted from alerts.yaml: run deploy/monitoring/check.sh --write"
    );
}

#[test]
fn every_alert_has_a_severity_a_runbook_and_a_promtool_test_that_fires_it() {
    let alerts = alerts();
    assert!(alerts.len() >= 15, "{} alerts", alerts.len());
    let tests = yaml("alerts_test.yaml");
    assert_eq!(
        tests["rule_files"],
        serde_json::json!(["alerts.yaml"]),
        "the tests test alerts.yaml"
    );
    // Alert name -> how many test cases expect it to fire, and how many expect silence.
    let mut fired: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for t in list(&tests["tests"]) {
        for case in list(&t["alert_rule_test"]) {
            let name = case["alertname"].as_str().unwrap_or_default().to_owned();
            let entry = fired.entry(name).or_default();
            if list(&case["exp_alerts"]).is_empty() {
                entry.1 += 1;
            } else {
                entry.0 += 1;
            }
        }
    }
    let names: BTreeSet<&str> = alerts.iter().map(|(n, _)| n.as_str()).collect();
    for (name, rule) in &alerts {
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["warning", "critical"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        for annotation in ["summary", "runbook"] {
            assert!(
                rule["annotations"][annotation]
                    .as_str()
                    .is_some_and(|s| s.len() > 20),
                "{name}: no {annotation} annotation"
            );
        }
        let (fires, silent) = fired.get(name).copied().unwrap_or_default();
        assert!(fires > 0, "{name}: no promtool test expects it to fire");
        assert!(
            silent > 0,
            "{name}: no promtool test expects it to stay silent"
        );
    }
    for tested in fired.keys() {
        assert!(
            names.contains(tested.as_str()),
            "alerts_test.yaml tests {tested}, which alerts.yaml does not have"
        );
    }
}

#[test]
fn the_compose_scrape_config_scrapes_every_apollo_service_on_its_admin_port() {
    // What compose runs: service -> (job, admin port).
    let mut expected: BTreeMap<String, (String, String)> = BTreeMap::new();
    for (name, service) in compose::services() {
        let argv = compose::argv(service);
        let Some(program) = argv.first().filter(|p| {
            ["apollo-gateway", "apollo-router", "apollo-controller"].contains(&p.as_str())
        }) else {
            continue;
        };
        let port = argv
            .iter()
            .find_map(|a| a.strip_prefix("--admin-listen="))
            .and_then(|addr| addr.rsplit(':').next())
            .unwrap_or_else(|| panic!("compose service {name}: no --admin-listen"))
            .to_owned();
        expected.insert(name.clone(), (program.clone(), port));
    }
    assert!(expected.len() >= 5, "{expected:?}");
    let config = yaml("prometheus.yaml");
    let mut scraped: BTreeMap<String, (String, String)> = BTreeMap::new();
    for job in list(&config["scrape_configs"]) {
        let job_name = job["job_name"].as_str().unwrap_or_default();
        for group in list(&job["static_configs"]) {
            for target in list(&group["targets"]) {
                let target = target.as_str().unwrap_or_default();
                let (host, port) = target.rsplit_once(':').expect("host:port");
                assert_eq!(
                    group["labels"]["pod"], host,
                    "{target}: the pod label names the service"
                );
                scraped.insert(host.to_owned(), (job_name.to_owned(), port.to_owned()));
            }
        }
    }
    assert_eq!(
        scraped, expected,
        "prometheus.yaml targets vs docker-compose.yaml"
    );
    assert_eq!(
        config["rule_files"],
        serde_json::json!(["/etc/prometheus/alerts.yaml"])
    );
    // And the override file mounts exactly these two files there.
    let override_file = yaml("compose.yaml");
    let volumes = list(&override_file["services"]["prometheus"]["volumes"]);
    for mount in [
        "./deploy/monitoring/prometheus.yaml:/etc/prometheus/prometheus.yaml:ro",
        "./deploy/monitoring/alerts.yaml:/etc/prometheus/alerts.yaml:ro",
    ] {
        assert!(volumes.iter().any(|v| v == mount), "compose.yaml: {mount}");
    }
}

#[test]
fn the_component_renders_a_pod_monitor_that_selects_every_apollo_pod_by_its_admin_port() {
    // An overlay as the Component's header describes it: deploy/ plus the Component (kustomize
    // takes relative paths only).
    let overlay = tempfile::tempdir().expect("tempdir");
    let up = "../".repeat(overlay.path().components().count() - 1);
    let relative = |p: PathBuf| format!("{up}{}", p.display().to_string().trim_start_matches('/'));
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [{}]\ncomponents: [{}]\n",
            relative(common::repo_root().join("deploy")),
            relative(monitoring())
        ),
    )
    .expect("write the overlay");
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(overlay.path())
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objects: Vec<Value> =
        serde_saphyr::from_multiple(&String::from_utf8_lossy(&out.stdout)).expect("parse");
    let find = |kind: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in the render"))
    };
    let monitor = find("PodMonitor");
    assert_eq!(monitor["metadata"]["namespace"], "apollo-system");
    assert_eq!(find("PrometheusRule")["spec"], yaml("alerts.yaml"));
    let selected: BTreeSet<String> = list(&monitor["spec"]["selector"]["matchExpressions"])
        .iter()
        .filter(|e| e["key"] == "app.kubernetes.io/name" && e["operator"] == "In")
        .flat_map(|e| list(&e["values"]).to_vec())
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .expect("an endpoint port");
    // Every workload of ours: its pods carry a selected name and expose the scraped port.
    let mut workloads = BTreeSet::new();
    for o in &objects {
        if !["Deployment", "StatefulSet"].contains(&o["kind"].as_str().unwrap_or_default()) {
            continue;
        }
        let template = &o["spec"]["template"];
        let name = template["metadata"]["labels"]["app.kubernetes.io/name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let ours = list(&template["spec"]["containers"]).iter().any(|c| {
            c["image"]
                .as_str()
                .is_some_and(|i| i.split(':').next() == Some("apollo"))
        });
        if !ours {
            continue;
        }
        assert!(
            selected.contains(&name),
            "PodMonitor does not select {name}"
        );
        let has_port = list(&template["spec"]["containers"])
            .iter()
            .any(|c| list(&c["ports"]).iter().any(|p| p["name"] == port));
        assert!(has_port, "{name}: no container port named {port}");
        workloads.insert(name);
    }
    assert_eq!(
        workloads, selected,
        "the PodMonitor selects exactly Apollo's workloads"
    );
}

// ---------------------------------------------------------------------------------------------
// Live: the local stack with Prometheus.

/// How often the test stack's Prometheus scrapes.
const SCRAPE: Duration = Duration::from_secs(2);

/// Every metric name `expr` selects, from Prometheus' own parser (`/api/v1/parse_query`).
async fn selected_names(prometheus: &Prometheus, expr: &str) -> BTreeSet<String> {
    fn walk(node: &Value, out: &mut BTreeSet<String>) {
        match node {
            Value::Object(map) => {
                if map.get("type").and_then(Value::as_str) == Some("vectorSelector") {
                    let name = map.get("name").and_then(Value::as_str).unwrap_or_default();
                    if !name.is_empty() {
                        out.insert(name.to_owned());
                    }
                }
                map.values().for_each(|v| walk(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let ast = prometheus
        .api("parse_query", &[("query", expr)])
        .await
        .unwrap_or_else(|e| panic!("{expr}: {e}"));
    let mut out = BTreeSet::new();
    walk(&ast, &mut out);
    out
}

/// Sample names of families the scraped targets describe (`# TYPE`), with or without a sample
/// yet: a labelled family is exported before its first observation, its series only after.
async fn described_names(prometheus: &Prometheus) -> BTreeSet<String> {
    let data = prometheus.api("metadata", &[]).await.expect("metadata");
    let mut out = BTreeSet::new();
    for (family, entries) in data.as_object().into_iter().flatten() {
        for e in list(entries) {
            let suffixes: &[&str] = match e["type"].as_str().unwrap_or_default() {
                "counter" => &["_total", ""],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            for s in suffixes {
                out.insert(format!("{family}{s}"));
            }
        }
    }
    out
}

/// The dashboard's queries as `(panel title, expr)`, Grafana's variables replaced.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = monitoring().join("dashboard.json");
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard.json"))
            .expect("json");
    let mut out = Vec::new();
    for panel in list(&dash["panels"]) {
        for target in list(&panel["targets"]) {
            let expr = target["expr"].as_str().expect("expr");
            assert!(
                !expr.contains('$') || expr.contains("$__rate_interval"),
                "{expr}: only $__rate_interval is supported"
            );
            out.push((
                panel["title"].as_str().unwrap_or_default().to_owned(),
                expr.replace("$__rate_interval", "30s"),
            ));
        }
    }
    out
}

async fn gateway_disconnections(stack: &Stack) -> f64 {
    let http = reqwest::Client::new();
    let mut total = 0.0;
    for o in stack.gateways().ordinals() {
        if let Some(admin) = stack.gateways().admin_addr(o) {
            let text = metrics::fetch(&http, &format!("http://{admin}/metrics"))
                .await
                .unwrap_or_default();
            total += metrics::value(
                &text,
                "apollo_gateway_transitions_total",
                &[r#"kind="disconnected""#],
            )
            .unwrap_or(0.0);
        }
    }
    total
}

/// `sum(apollo_gateway_transitions_total{kind="disconnected"})` in Prometheus, None while no
/// such series exists.
async fn prometheus_disconnections(prometheus: &Prometheus) -> Option<f64> {
    let result = prometheus
        .query(r#"sum(apollo_gateway_transitions_total{kind="disconnected"})"#)
        .await
        .expect("query");
    result[0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test]
async fn prometheus_scrapes_the_stack_evaluates_every_rule_and_dashboard_query_and_sees_a_stopped_agent_within_a_scrape(
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin_dir = binary("apollo-gateway")
        .parent()
        .expect("dir")
        .to_path_buf();
    let mut cfg = StackConfig::test(dir.path().to_path_buf(), bin_dir);
    cfg.gateways = 2;
    cfg.devices = vec!["mon-01".into(), "mon-02".into()];
    cfg.install_samples = true;
    cfg.run_agents = true;
    cfg.heartbeat_interval_seconds = 1;
    cfg.stale_multiplier = 3;
    cfg.sweep_interval_seconds = 1;
    cfg.agent_poll_wait_seconds = 1;
    cfg.prometheus = Some(SCRAPE);
    let stack = Stack::start(cfg).await.expect("start the stack");
    let prometheus = stack.prometheus().expect("the stack runs Prometheus");
    let client = stack.client();
    let ns = stack.namespace().to_owned();
    wait_until(Duration::from_secs(60), "both devices healthy", || async {
        fleet::processes(&client, &ns, SAMPLE_DEPLOYMENT)
            .await
            .is_ok_and(|dps| dps.len() == 2 && dps.values().all(fleet::healthy))
    })
    .await;

    // Every component is a target, up, with the labels the PodMonitor gives it in a cluster.
    let system = stack.system().name().to_owned();
    wait_until(Duration::from_secs(30), "every target up", || async {
        let mut up: Vec<(String, String)> = prometheus
            .targets()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, _, health)| health == "up")
            .map(|(job, pod, _)| (job, pod))
            .collect();
        up.sort();
        up == [
            ("apollo-controller".into(), "apollo-controller".into()),
            ("apollo-gateway".into(), "apollo-gateway-0".into()),
            ("apollo-gateway".into(), "apollo-gateway-1".into()),
            ("apollo-router".into(), "apollo-router".into()),
        ]
    })
    .await;
    let with_ns = prometheus
        .query(&format!(r#"count(up{{namespace="{system}"}})"#))
        .await
        .expect("query");
    assert_eq!(
        with_ns[0]["value"][1], "4",
        "namespace label on every target"
    );

    // The series the dashboard is about exist once the fleet reported and was written.
    let needed = [
        "apollo_gateway_http_requests_total",
        "apollo_gateway_http_request_duration_seconds_bucket",
        "apollo_gateway_kube_writes_total",
        "apollo_gateway_state_store_duration_seconds_bucket",
        "apollo_gateway_transitions_total",
        "apollo_controller_kube_writes_total",
        "apollo_controller_reconciles_total",
        "apollo_router_replicas",
    ];
    wait_until(
        Duration::from_secs(30),
        "the fleet's series in Prometheus",
        || async {
            let names = prometheus.metric_names().await.unwrap_or_default();
            needed.iter().all(|n| names.iter().any(|m| m == n))
        },
    )
    .await;

    // The core panels show data once a few scrapes of the reporting fleet are in.
    let queries = dashboard_queries();
    let core = [
        "Reports / s by replica",
        "Desired: 200 vs 304",
        "Kubernetes writes by reason",
        "Fleet connectivity",
    ];
    wait_until(
        Duration::from_secs(60),
        "the core panels show data",
        || async {
            for (panel, expr) in queries.iter().filter(|(p, _)| core.contains(&p.as_str())) {
                let result = prometheus.query(expr).await.unwrap_or_default();
                if list(&result).is_empty() {
                    eprintln!("waiting: panel {panel:?} has no data yet: {expr}");
                    return false;
                }
            }
            true
        },
    )
    .await;

    // Every dashboard query evaluates, and every metric it names is one Prometheus knows: a
    // series of it exists, or a scraped target describes its family (labelled families have no
    // series before their first observation, e.g. Redis errors on a healthy stack).
    let with_series: BTreeSet<String> = prometheus
        .metric_names()
        .await
        .expect("names")
        .into_iter()
        .collect();
    let described = described_names(prometheus).await;
    let mut empty = Vec::new();
    let mut only_described = BTreeSet::new();
    for (panel, expr) in queries {
        let result = prometheus
            .query(&expr)
            .await
            .unwrap_or_else(|e| panic!("panel {panel:?}: {expr}: {e}"));
        for name in selected_names(prometheus, &expr).await {
            if with_series.contains(&name) {
                continue;
            }
            assert!(
                described.contains(&name),
                "panel {panel:?} queries {name}, which Prometheus does not know (no series, no \
                 target describes it): {expr}"
            );
            only_described.insert(name);
        }
        if list(&result).is_empty() {
            empty.push(panel);
        }
    }
    eprintln!("dashboard: panels with an empty query now: {empty:?}; metrics described but without a series yet: {only_described:?}");
    // Every alert rule evaluates on real series without error, and a healthy stack fires none
    // (pending is allowed: a start-up's 503s, say, are in the rate window for a while).
    wait_until(
        Duration::from_secs(30),
        "every rule evaluated at least once",
        || async {
            let groups = prometheus.api("rules", &[]).await.expect("rules");
            let rules: Vec<&Value> = list(&groups["groups"])
                .iter()
                .flat_map(|g| list(&g["rules"]))
                .collect();
            rules.len() == alerts().len()
                && rules.iter().all(|r| {
                    r["lastEvaluation"]
                        .as_str()
                        .is_some_and(|t| !t.starts_with("0001"))
                })
        },
    )
    .await;
    let groups = prometheus.api("rules", &[]).await.expect("rules");
    for rule in list(&groups["groups"])
        .iter()
        .flat_map(|g| list(&g["rules"]))
    {
        assert_eq!(
            rule["health"], "ok",
            "{}: {}",
            rule["name"], rule["lastError"]
        );
        assert_ne!(
            rule["state"], "firing",
            "{} on a healthy stack: {}",
            rule["name"], rule["alerts"]
        );
        // An alert on a metric nobody exports would never fire: every name it selects is known
        // (`up` is Prometheus' own; apollo_dpd_* and kube_pod_* come from kube-state-metrics in
        // a cluster).
        let expr = rule["query"].as_str().expect("query");
        for name in selected_names(prometheus, expr).await {
            assert!(
                name == "up"
                    || name.starts_with("apollo_dpd_")
                    || name.starts_with("kube_pod_")
                    || with_series.contains(&name)
                    || described.contains(&name),
                "alert {} selects {name}, which no component exports: {expr}",
                rule["name"]
            );
        }
    }

    // Stop an agent: once a gateway decides the disconnection, the series shows it in Prometheus
    // within one scrape interval. (The gateways export the series from start-up, at 0.)
    assert_eq!(
        prometheus_disconnections(prometheus).await,
        Some(0.0),
        "the disconnected series is there, at 0, before the agent stops"
    );
    let before = gateway_disconnections(&stack).await;
    assert!(stack.stop_agent("mon-02").await, "mon-02 was running");
    let stopped = Instant::now();
    wait_until(
        Duration::from_secs(20),
        "a gateway decides mon-02 is disconnected",
        || async { gateway_disconnections(&stack).await > before },
    )
    .await;
    let decided = Instant::now();
    let seen = wait_for(
        SCRAPE + Duration::from_secs(1),
        "Prometheus shows the disconnection within a scrape interval",
        || async {
            prometheus_disconnections(prometheus)
                .await
                .filter(|v| *v >= 1.0)
        },
    )
    .await;
    eprintln!(
        "agent stopped; disconnection decided after {:?}, in Prometheus {:?} later (scrape interval {SCRAPE:?}); value {seen}",
        decided - stopped,
        decided.elapsed()
    );
    // The README's query answers per replica.
    let per_pod = prometheus
        .query(r#"sum by (pod) (apollo_gateway_transitions_total{kind="disconnected"})"#)
        .await
        .expect("query");
    assert!(
        list(&per_pod).iter().any(|s| s["metric"]["pod"]
            .as_str()
            .is_some_and(|p| p.starts_with("apollo-gateway-"))),
        "{per_pod}"
    );
    stack.shutdown().await;
}
