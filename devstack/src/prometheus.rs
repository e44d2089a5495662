//! A real Prometheus (`cmd/prometheus` of github.com/prometheus/prometheus, built by
//! `scripts/lib/go-tools.sh` from tools/prometheus) scraping every component of the stack: the
//! controller, the router and each gateway replica, with Apollo's alert rules
//! (deploy/monitoring/alerts.yaml) loaded, so what the stack does shows up as it would for an
//! operator, and the rules and the dashboard's queries run against real series.
//!
//! Gateway replicas come and go with `kubectl scale`: their targets are a `file_sd` file the stack
//! rewrites whenever the running replicas change. Targets carry the labels the PodMonitor of
//! deploy/monitoring gives them in a cluster: `job` (apollo-gateway, apollo-router,
//! apollo-controller), `namespace` and `pod`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use apollo_test_support::{kube::workspace_root, Proc};
use serde_json::{json, Value};

use crate::node::Gateways;

/// The rules file every Prometheus of ours loads (the one source of deploy/monitoring).
pub fn alert_rules_file() -> PathBuf {
    workspace_root().join("deploy/monitoring/alerts.yaml")
}

/// The directory holding `prometheus` and `promtool`, built (minutes, once per machine) when
/// missing.
pub async fn bin_dir() -> anyhow::Result<PathBuf> {
    let script = workspace_root().join("scripts/lib/go-tools.sh");
    let out = tokio::process::Command::new("/bin/bash")
        .arg("-c")
        .arg(format!("source {} && prometheus_bin_dir", script.display()))
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .context("run scripts/lib/go-tools.sh")?;
    if !out.status.success() {
        bail!("building Prometheus failed (see the output above)");
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// What Prometheus scrapes and how often.
#[derive(Clone)]
pub struct Scrape {
    /// Scrape and rule-evaluation interval.
    pub interval: Duration,
    /// Namespace label of every target (where Apollo's components run).
    pub namespace: String,
    /// `host:port` of the controller's admin endpoint.
    pub controller: String,
    /// `host:port` of the router's admin endpoint.
    pub router: String,
    /// The gateway replicas; their admin endpoints are followed as they come and go.
    pub gateways: Arc<Gateways>,
}

/// The running Prometheus; killed on drop (with the task that keeps its gateway targets).
pub struct Prometheus {
    proc: Proc,
    port: u16,
    interval: Duration,
    targets: tokio::task::JoinHandle<()>,
}

fn config(scrape: &Scrape, gateway_targets: &Path) -> String {
    let interval = format!("{}ms", scrape.interval.as_millis());
    // A scrape may take at most the interval.
    let timeout = format!("{}ms", scrape.interval.as_millis().min(10_000));
    let ns = &scrape.namespace;
    format!(
        r#"global:
  scrape_interval: {interval}
  scrape_timeout: {timeout}
  evaluation_interval: {interval}
rule_files:
  - {rules}
scrape_configs:
  - job_name: apollo-controller
    static_configs:
      - targets: ["{controller}"]
        labels: {{namespace: "{ns}", pod: apollo-controller}}
  - job_name: apollo-router
    static_configs:
      - targets: ["{router}"]
        labels: {{namespace: "{ns}", pod: apollo-router}}
  - job_name: apollo-gateway
    file_sd_configs:
      - files: ["{gateways}"]
        refresh_interval: 5s
"#,
        rules = alert_rules_file().display(),
        controller = scrape.controller,
        router = scrape.router,
        gateways = gateway_targets.display(),
    )
}

/// The file_sd document of the running gateway replicas.
fn gateway_targets(gateways: &Gateways, namespace: &str) -> Value {
    let groups: Vec<Value> = gateways
        .ordinals()
        .into_iter()
        .filter_map(|o| {
            gateways.admin_addr(o).map(|admin| {
                json!({
                    "targets": [admin],
                    "labels": {"namespace": namespace, "pod": format!("apollo-gateway-{o}")},
                })
            })
        })
        .collect();
    Value::Array(groups)
}

/// Writes `doc` to `path` atomically (Prometheus watches the file and must never read half of it).
fn write_atomically(path: &Path, doc: &Value) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(doc).unwrap_or_default())?;
    std::fs::rename(&tmp, path)
}

impl Prometheus {
    /// Starts Prometheus with its configuration and data in `dir`, listening on
    /// `127.0.0.1:<port>`, and waits until it is ready.
    pub async fn start(dir: &Path, port: u16, scrape: Scrape) -> anyhow::Result<Prometheus> {
        let bin = bin_dir().await?.join("prometheus");
        // Fresh data every start: the series of an earlier stack would only confuse.
        let _ = std::fs::remove_dir_all(dir.join("data"));
        std::fs::create_dir_all(dir)?;
        let targets_file = dir.join("gateways.json");
        let mut current = gateway_targets(&scrape.gateways, &scrape.namespace);
        write_atomically(&targets_file, &current).context("write gateways.json")?;
        let config_file = dir.join("prometheus.yaml");
        std::fs::write(&config_file, config(&scrape, &targets_file))
            .context("write prometheus.yaml")?;
        let mut proc = Proc::builder(bin)
            .name("prometheus")
            .log_file(dir.join("prometheus.log"))
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg("--storage.tsdb.retention.time=1d")
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .spawn();

        // Follow the gateway replicas as they come and go.
        let gateways = scrape.gateways.clone();
        let namespace = scrape.namespace.clone();
        let file = targets_file.clone();
        let targets = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let now = gateway_targets(&gateways, &namespace);
                if now != current {
                    if let Err(error) = write_atomically(&file, &now) {
                        eprintln!("apollo-dev: cannot write {}: {error}", file.display());
                        continue;
                    }
                    current = now;
                }
            }
        });

        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()?;
        let url = format!("http://127.0.0.1:{port}/-/ready");
        let start = Instant::now();
        loop {
            if http
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            if let Some(status) = proc.try_wait() {
                targets.abort();
                bail!("prometheus exited ({status}):\n{}", proc.logs());
            }
            if start.elapsed() > Duration::from_secs(60) {
                targets.abort();
                bail!("prometheus not ready within 60s ({url}):\n{}", proc.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Prometheus {
            proc,
            port,
            interval: scrape.interval,
            targets,
        })
    }

    /// `http://127.0.0.1:<port>`: the HTTP API (`/api/v1/query`, `/api/v1/targets`, ...).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The scrape (and rule evaluation) interval.
    pub fn scrape_interval(&self) -> Duration {
        self.interval
    }

    /// Its log.
    pub fn logs(&self) -> String {
        self.proc.logs()
    }

    /// `GET /api/v1/<path>` with `params`: the `data` of a `success` answer, else an error
    /// carrying Prometheus' `errorType` and `error`.
    pub async fn api(&self, path: &str, params: &[(&str, &str)]) -> anyhow::Result<Value> {
        let url = format!("{}/api/v1/{path}", self.url());
        let body: Value = reqwest::Client::new()
            .get(&url)
            .query(params)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .with_context(|| format!("GET {url}"))?
            .json()
            .await
            .with_context(|| format!("GET {url}: not JSON"))?;
        if body["status"] != "success" {
            bail!(
                "GET {url} {params:?}: {} {}",
                body["errorType"].as_str().unwrap_or("?"),
                body["error"].as_str().unwrap_or("?")
            );
        }
        Ok(body["data"].clone())
    }

    /// An instant query: the `result` vector (or scalar) of `expr` now.
    pub async fn query(&self, expr: &str) -> anyhow::Result<Value> {
        let mut data = self.api("query", &[("query", expr)]).await?;
        Ok(data["result"].take())
    }

    /// Every metric name Prometheus holds a series of.
    pub async fn metric_names(&self) -> anyhow::Result<Vec<String>> {
        let data = self.api("label/__name__/values", &[]).await?;
        Ok(data
            .as_array()
            .map(|names| {
                names
                    .iter()
                    .filter_map(|n| n.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The active targets as `(job, pod, health)`.
    pub async fn targets(&self) -> anyhow::Result<Vec<(String, String, String)>> {
        let data = self.api("targets", &[("state", "active")]).await?;
        let empty = Vec::new();
        Ok(data["activeTargets"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .map(|t| {
                let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
                (
                    s(&t["labels"]["job"]),
                    s(&t["labels"]["pod"]),
                    s(&t["health"]),
                )
            })
            .collect())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.targets.abort();
    }
}
