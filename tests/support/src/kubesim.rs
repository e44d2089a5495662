use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::http::send_ok;
use crate::process::{binary, Proc};

/// One row of kubesim's request counters (`GET /kubesim/requests`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RequestCount {
    /// Audit-log verb: get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: String,
    /// API group ("" for core).
    #[serde(default)]
    pub group: String,
    /// Resource plural.
    #[serde(default)]
    pub resource: String,
    /// Subresource ("" for the main resource).
    #[serde(default)]
    pub subresource: String,
    /// Number of requests.
    pub count: u64,
}

#[derive(Deserialize)]
struct RequestCounts {
    requests: Vec<RequestCount>,
}

const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

/// The `kubesim` binary serving on an ephemeral 127.0.0.1 port. Killed on drop.
pub struct KubeSimProc {
    proc: Proc,
    base_url: String,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl KubeSimProc {
    /// Starts kubesim and waits until `/healthz` answers.
    pub async fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("apollo-kubesim-")
            .tempdir()
            .expect("create a kubesim dir");
        let kubeconfig = dir.path().join("kubeconfig");
        let port = crate::free_port();
        let mut proc = Proc::builder(binary("kubesim"))
            .name(format!("kubesim-{port}"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--kubeconfig-out")
            .arg(&kubeconfig)
            .spawn();
        let base_url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("build an HTTP client");
        let start = Instant::now();
        loop {
            let healthy = http
                .get(format!("{base_url}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if healthy && kubeconfig.is_file() {
                break;
            }
            if let Some(status) = proc.try_wait() {
                panic!("kubesim exited ({status}):\n{}", proc.logs());
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "kubesim did not become healthy within 15s:\n{}",
                proc.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            proc,
            base_url,
            kubeconfig,
            dir,
            http,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Path of the kubeconfig kubesim wrote (use as KUBECONFIG for product binaries).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The kubesim process (logs, kill).
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// A kube client for this kubesim, built from its kubeconfig.
    pub async fn client(&self) -> kube::Client {
        let kubeconfig =
            kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("read kubesim kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("kube config from kubesim kubeconfig");
        kube::Client::try_from(config).expect("kube client for kubesim")
    }

    /// Every request counter.
    pub async fn requests(&self) -> Vec<RequestCount> {
        let request = self.http.get(self.api_url("requests"));
        send_ok(request, "GET /kubesim/requests")
            .await
            .json::<RequestCounts>()
            .await
            .expect("parse /kubesim/requests")
            .requests
    }

    /// Requests with `verb` on `resource` (any group); `subresource` None matches any,
    /// `Some("")` only the main resource.
    pub async fn count(&self, verb: &str, resource: &str, subresource: Option<&str>) -> u64 {
        self.requests()
            .await
            .iter()
            .filter(|r| r.verb == verb && r.resource == resource)
            .filter(|r| subresource.is_none_or(|s| r.subresource == s))
            .map(|r| r.count)
            .sum()
    }

    /// Write requests (create, update, patch, delete, deletecollection) on `resource`, or on every
    /// resource when None.
    pub async fn writes(&self, resource: Option<&str>) -> u64 {
        self.requests()
            .await
            .iter()
            .filter(|r| WRITE_VERBS.contains(&r.verb.as_str()))
            .filter(|r| resource.is_none_or(|res| r.resource == res))
            .map(|r| r.count)
            .sum()
    }

    /// Resets every request counter.
    pub async fn reset_requests(&self) {
        let request = self.http.delete(self.api_url("requests"));
        send_ok(request, "DELETE /kubesim/requests").await;
    }

    /// Installs faults (`POST /kubesim/faults`; format documented in the kubesim crate).
    pub async fn set_faults(&self, faults: serde_json::Value) {
        let request = self.http.post(self.api_url("faults")).json(&faults);
        send_ok(request, "POST /kubesim/faults").await;
    }

    /// Clears every fault.
    pub async fn clear_faults(&self) {
        let request = self.http.delete(self.api_url("faults"));
        send_ok(request, "DELETE /kubesim/faults").await;
    }

    /// URL of kubesim's own API endpoint `/kubesim/<what>`.
    fn api_url(&self, what: &str) -> String {
        format!("{}/kubesim/{what}", self.base_url)
    }

    /// Runs the real kubectl against this kubesim (private discovery cache).
    pub async fn kubectl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        crate::kube::kubectl(
            &self.kubeconfig,
            &self.dir.path().join("kubectl-cache"),
            args,
        )
        .await
    }
}
