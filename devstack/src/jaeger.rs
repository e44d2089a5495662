//! A real Jaeger (v2, `cmd/jaeger` of github.com/jaegertracing/jaeger, built by
//! `scripts/lib/go-tools.sh` from tools/jaeger) in its all-in-one shape: OTLP in, traces kept in
//! memory, the UI and HTTP query API out.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use apollo_test_support::{free_port, kube::workspace_root, Proc};

/// Where Jaeger listens.
#[derive(Clone, Copy, Debug)]
pub struct JaegerPorts {
    /// OTLP over gRPC.
    pub otlp_grpc: u16,
    /// OTLP over HTTP (what Apollo's components export to).
    pub otlp_http: u16,
    /// UI and `/api/traces`.
    pub ui: u16,
    /// Health check (`/status`).
    pub health: u16,
}

impl JaegerPorts {
    /// The usual ports (the README's URLs).
    pub fn standard() -> Self {
        Self {
            otlp_grpc: 4317,
            otlp_http: 4318,
            ui: 16686,
            health: 13133,
        }
    }

    /// Free ephemeral ports (tests).
    pub fn ephemeral() -> Self {
        Self {
            otlp_grpc: free_port(),
            otlp_http: free_port(),
            ui: free_port(),
            health: free_port(),
        }
    }
}

/// The running Jaeger; killed on drop.
pub struct Jaeger {
    proc: Proc,
    ports: JaegerPorts,
}

/// The all-in-one configuration with our ports, in-memory storage and no listeners we do not
/// use (Jaeger's own defaults also open Zipkin, Jaeger-thrift, sampling and metrics ports).
fn config(ports: JaegerPorts) -> String {
    format!(
        r#"service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    resource:
      service.name: jaeger
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{ui}
    grpc:
      endpoint: 127.0.0.1:0
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
  healthcheckv2:
    use_v2: true
    http:
      endpoint: 127.0.0.1:{health}
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{grpc}
      http:
        endpoint: 127.0.0.1:{http}
processors:
  batch:
    timeout: 200ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"#,
        ui = ports.ui,
        health = ports.health,
        grpc = ports.otlp_grpc,
        http = ports.otlp_http,
    )
}

/// The `jaeger` binary, built (minutes, once per machine) when missing.
pub async fn binary() -> anyhow::Result<PathBuf> {
    let script = workspace_root().join("scripts/lib/go-tools.sh");
    let out = tokio::process::Command::new("/bin/bash")
        .arg("-c")
        .arg(format!("source {} && jaeger_bin_dir", script.display()))
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .context("run scripts/lib/go-tools.sh")?;
    if !out.status.success() {
        bail!("building Jaeger failed (see the output above)");
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(Path::new(&dir).join("jaeger"))
}

impl Jaeger {
    /// Starts Jaeger with its configuration in `dir` and waits until it answers.
    pub async fn start(dir: &Path, ports: JaegerPorts) -> anyhow::Result<Jaeger> {
        let bin = binary().await?;
        std::fs::create_dir_all(dir)?;
        let config_file = dir.join("jaeger.yaml");
        std::fs::write(&config_file, config(ports)).context("write jaeger.yaml")?;
        let mut proc = Proc::builder(bin)
            .name("jaeger")
            .log_file(dir.join("jaeger.log"))
            .arg("--config")
            .arg(&config_file)
            .spawn();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()?;
        let start = Instant::now();
        let url = format!("http://127.0.0.1:{}/api/services", ports.ui);
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
                bail!("jaeger exited ({status}):\n{}", proc.logs());
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("jaeger did not answer {url} within 30s:\n{}", proc.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Jaeger { proc, ports })
    }

    /// Its ports.
    pub fn ports(&self) -> JaegerPorts {
        self.ports
    }

    /// `http://127.0.0.1:<otlp http>`: the `OTEL_EXPORTER_OTLP_ENDPOINT` of every component.
    pub fn otlp_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.otlp_http)
    }

    /// `http://127.0.0.1:<ui>`: the UI and the query API (`/api/traces/<id>`).
    pub fn ui_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.ui)
    }

    /// Its log.
    pub fn logs(&self) -> String {
        self.proc.logs()
    }
}
