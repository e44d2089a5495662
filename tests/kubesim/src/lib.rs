//! kubesim: a Kubernetes API emulator over real HTTP for tests and the local stack (not shipped).
//!
//! It implements the slice of the Kubernetes API that Apollo, kube-rs and `kubectl` use, with the
//! apiserver's semantics: one global resourceVersion, 409 on stale writes, watch streams with
//! bookmarks and in-stream 410 Expired, status and scale subresources, generation on spec changes
//! only, no-op writes that bump nothing, label and field selectors, finalizers and owner-reference
//! garbage collection, Events (core/v1 and events.k8s.io/v1 over one store), Leases, StatefulSets,
//! CRD registration with discovery and server-side printing, server-side apply with field
//! ownership, JSON patch and strategic merge patch.
//!
//! # Starting it
//! - In-process: [`KubeSim::start`] binds `127.0.0.1:0` (by default) and returns the address, a
//!   kubeconfig path and [`KubeSim::client`] for a `kube::Client`.
//! - As a process: `kubesim --listen 127.0.0.1:PORT --kubeconfig-out PATH` prints
//!   `kubesim listening on http://ADDR` once bound; poll `GET /healthz` for readiness.
//!
//! `/version` reports `v1.32.4` because `/usr/bin/kubectl` on these machines picks the kubectl
//! matching the server's minor version.
//!
//! # `kubectl apply` and validation
//! kubesim serves a minimal `/openapi/v3`: one document per group/version with a PATCH operation
//! per kind that declares the `fieldValidation` query parameter. That is what `kubectl`'s
//! field-validation check looks for, so `kubectl apply` works with its default `--validate=strict`
//! and sends `fieldValidation=Strict` instead of validating client-side. kubesim honours it the
//! way the apiserver does for custom resources: unknown fields are a 400 `strict decoding error`
//! under `Strict` and are pruned otherwise; schema `default`s are applied; types, `enum` and
//! `required` are validated (422). Built-in kinds are stored as sent. The PATCH operations do not list
//! strategic merge patch, so `kubectl apply` builds strategic merge patches for built-in kinds from
//! its compiled-in types and JSON merge patches for custom resources, exactly as with a real
//! server whose OpenAPI it cannot use. `/openapi/v2` is not served (404).
//!
//! # Test endpoints
//! - `GET /kubesim/requests` returns `{"requests":[{"verb","group","resource","subresource","count"}]}`
//!   counting every API request; verbs are named as audit logs name them (`get`, `list`, `watch`,
//!   `create`, `update`, `patch`, `delete`, `deletecollection`). `DELETE /kubesim/requests` resets.
//! - `POST /kubesim/faults` adds one fault rule; `DELETE /kubesim/faults` removes them all. The
//!   body is a JSON object; every field is optional:
//!
//!   | field | meaning |
//!   |---|---|
//!   | `verb`, `group`, `resource`, `subresource`, `namespace`, `name` | what to match; absent matches anything; `"subresource": ""` matches only the main resource |
//!   | `code` | answer with this status and a real `Status` body: 409 (reason `Conflict`), 429, 500, 503, 504, 404; on a `watch`, `410` is delivered as the apiserver does, a 200 stream whose only event is `ERROR` 410 Expired |
//!   | `retryAfterSeconds` | sent as `Retry-After` with `code` |
//!   | `latencyMs` | delay before handling the request |
//!   | `times` | how many matching requests the rule affects, then it is removed; absent means until cleared |
//!   | `dropWatches` | `true` closes every open watch stream now (a one-shot action, not a rule) |
//!
//!   For example, three conflicts on status patches of DeviceProcesses:
//!   `{"verb":"patch","resource":"deviceprocesses","subresource":"status","code":409,"times":3}`;
//!   a forced relist of every kube-rs watcher: `{"verb":"watch","code":410,"times":1}` followed by
//!   `{"dropWatches":true}`. Rules are checked in the order they were added; the first live match
//!   applies. The reply lists the active rules.
//!
//! # Differences from a real apiserver (known and deliberate)
//! - Lists ignore `limit`/`continue` and return everything in one page (clients accept this);
//!   `resourceVersionMatch` is ignored and lists always reflect the latest state.
//! - A watch from a resourceVersion newer than the server's does not wait or fail; it just
//!   streams later changes.
//! - Garbage collection and namespace termination run synchronously inside the write that
//!   triggers them (the real controllers are asynchronous): dependents are gone by the time the
//!   owner's DELETE returns. A dependent is only collected when an owner it names was deleted here,
//!   not when it names an owner that never existed.
//! - Built-in kinds are stored as sent (no defaulting or validation beyond Events); only custom
//!   resources are checked against their schema. No authentication or authorization.
//! - managedFields of Events use the stored core/v1 field names in both views.
//! - Discovery is legacy JSON only (no aggregated discovery, no protobuf).
//! - kube's client retries 429, 503 and 504 by itself (honouring `Retry-After`), so an injected
//!   503 with `times: 1` is invisible to kube-rs callers except in the request counts; use 500 to
//!   surface an error.
#![forbid(unsafe_code)]

pub mod discovery;
pub mod error;
pub mod faults;
pub mod kinds;
pub mod managed;
pub mod patch;
pub mod schema;
pub mod selectors;
pub mod server;
pub mod store;
pub mod table;
pub mod views;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use error::{ApiError, KubeSimError};
pub use faults::FaultRule;
use server::Sim;

/// The Kubernetes version kubesim claims to be.
pub const SERVER_GIT_VERSION: &str = "v1.32.4";
/// Minor version reported by `/version` (the kubectl dispatcher keys on it).
pub const SERVER_MINOR_VERSION: &str = "32";

/// How to start a kubesim.
#[derive(Debug, Clone)]
pub struct Options {
    /// Address to bind; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Where to write the kubeconfig; `None` writes one under the system temp directory that is
    /// removed when the [`KubeSim`] is dropped.
    pub kubeconfig_path: Option<PathBuf>,
    /// Watch events kept per resource; a watch resuming from further back gets 410 Expired.
    pub history_window: usize,
    /// How often watches that allow bookmarks get one.
    pub bookmark_interval: Duration,
    /// Server URL written into the kubeconfig when clients reach kubesim under another name
    /// than its bind address (e.g. `http://kubesim:8001` in docker compose).
    pub advertise_url: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            kubeconfig_path: None,
            history_window: 1000,
            bookmark_interval: Duration::from_secs(5),
            advertise_url: None,
        }
    }
}

/// A running kubesim. Dropping it stops the server.
pub struct KubeSim {
    addr: SocketAddr,
    kubeconfig_path: PathBuf,
    remove_kubeconfig_on_drop: bool,
    shutdown: CancellationToken,
    server: Option<JoinHandle<Result<(), KubeSimError>>>,
    sim: Arc<Sim>,
}

/// A kubeconfig for a plain-HTTP server, with `default` as the namespace.
pub fn kubeconfig_yaml(server_url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kubesim\n  cluster:\n    server: {server_url}\ncontexts:\n- name: kubesim\n  context:\n    cluster: kubesim\n    user: kubesim\n    namespace: default\ncurrent-context: kubesim\nusers:\n- name: kubesim\n  user: {{}}\npreferences: {{}}\n"
    )
}

impl KubeSim {
    /// Binds, writes the kubeconfig and starts serving.
    pub async fn start(options: Options) -> Result<Self, KubeSimError> {
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .map_err(|source| KubeSimError::Bind {
                addr: options.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(KubeSimError::LocalAddr)?;
        let url = options
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"));
        let (kubeconfig_path, remove_kubeconfig_on_drop) = match options.kubeconfig_path {
            Some(path) => (path, false),
            None => {
                let path = std::env::temp_dir().join(format!(
                    "kubesim-{}-{}.kubeconfig",
                    std::process::id(),
                    addr.port()
                ));
                (path, true)
            }
        };
        if let Some(parent) = kubeconfig_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(KubeSimError::TempDir)?;
        }
        std::fs::write(&kubeconfig_path, kubeconfig_yaml(&url)).map_err(|source| {
            KubeSimError::WriteKubeconfig {
                path: kubeconfig_path.clone(),
                source,
            }
        })?;
        let shutdown = CancellationToken::new();
        let sim = Arc::new(Sim::new(
            options.history_window,
            options.bookmark_interval,
            shutdown.clone(),
        ));
        sim.set_server_address(addr.to_string());
        let router = axum::Router::new()
            .fallback(server::handle)
            .with_state(sim.clone());
        let stop = shutdown.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .map_err(KubeSimError::Serve)
        });
        tracing::info!(%addr, "kubesim listening");
        Ok(Self {
            addr,
            kubeconfig_path,
            remove_kubeconfig_on_drop,
            shutdown,
            server: Some(server),
            sim,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// A kube client for this server, with `default` as its namespace.
    pub fn client(&self) -> Result<kube::Client, KubeSimError> {
        let mut config = kube::Config::new(self.url().parse()?);
        config.default_namespace = "default".into();
        config.read_timeout = Some(Duration::from_secs(300));
        Ok(kube::Client::try_from(config)?)
    }

    /// Adds a fault rule in-process (same as `POST /kubesim/faults`).
    pub fn inject(&self, rule: FaultRule) {
        self.sim.add_fault(rule);
    }

    /// Removes every fault rule.
    pub fn clear_faults(&self) {
        self.sim.clear_faults();
    }

    /// Request counts (same body as `GET /kubesim/requests`).
    pub fn request_counts(&self) -> serde_json::Value {
        self.sim.request_counts()
    }

    /// Forgets every resource's watch history, so watches resuming from older versions get 410.
    pub fn compact_history(&self) {
        self.sim.with_state(|state| state.compact());
    }

    /// Stops serving, ends open watches and waits for the server task.
    pub async fn shutdown(mut self) -> Result<(), KubeSimError> {
        self.shutdown.cancel();
        match self.server.take() {
            Some(server) => server.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }

    /// Resolves when the server stops on its own (an accept error) or after [`KubeSim::shutdown`].
    pub async fn stopped(&mut self) -> Result<(), KubeSimError> {
        match self.server.take() {
            Some(server) => server.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }

    /// The token whose cancellation stops this server.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

impl Drop for KubeSim {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if self.remove_kubeconfig_on_drop {
            let _ = std::fs::remove_file(&self.kubeconfig_path);
        }
    }
}
