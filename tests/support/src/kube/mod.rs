//! The real Kubernetes control plane for tests: etcd, kube-apiserver and kube-controller-manager
//! started through `scripts/control-plane.sh run DIR` (built from tools/kube), namespaces with
//! Apollo's CRDs and the RBAC of `deploy/rbac/`, ServiceAccount identities for the components,
//! request counts from the apiserver's audit log, and a fault proxy.
//!
//! One control plane is shared by the tests of a test binary ([`ControlPlane::shared`]); each test
//! works in its own namespace ([`TestNamespace`]). Tests that restart or pause the control plane
//! start a private one ([`ControlPlane::start`]).

mod audit;
mod proxy;
mod rbac;

pub use audit::{ApiRequest, AuditLog, WRITE_VERBS};
pub use proxy::{Fault, FaultProxy};
pub use rbac::Component;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use nix::sys::signal::Signal;

use crate::process::Proc;

/// Field manager of everything the harness applies.
pub const TEST_FIELD_MANAGER: &str = "apollo-tests";

/// The components of the control plane (names of their logs, pid files and hold files).
pub const ETCD: &str = "etcd";
/// kube-apiserver.
pub const KUBE_APISERVER: &str = "kube-apiserver";
/// kube-controller-manager.
pub const KUBE_CONTROLLER_MANAGER: &str = "kube-controller-manager";

const READY_DEADLINE: Duration = Duration::from_secs(180);

/// The workspace root (tests/support/../..).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

fn script() -> PathBuf {
    workspace_root().join("scripts/control-plane.sh")
}

/// Extra settings of a private control plane.
#[derive(Clone, Debug, Default)]
pub struct ControlPlaneOptions {
    /// Appended to kube-apiserver's flags (e.g. `--max-requests-inflight=5`).
    pub apiserver_args: Vec<String>,
    /// kube-controller-manager's `--controllers` (default: garbage collector, namespace and
    /// service-account and StatefulSet controllers).
    pub controllers: Option<String>,
}

/// A running control plane: `scripts/control-plane.sh run DIR` as a child of this process. The
/// script supervises the three components (restarting one that exits) and every process carries
/// a parent-death signal, so nothing outlives the test process.
pub struct ControlPlane {
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    run: std::sync::Mutex<Proc>,
    apiserver_url: String,
    audit_log: PathBuf,
}

static SHARED: tokio::sync::OnceCell<ControlPlane> = tokio::sync::OnceCell::const_new();

impl ControlPlane {
    /// The control plane shared by every test of this test binary, started on first use.
    pub async fn shared() -> &'static ControlPlane {
        SHARED
            .get_or_init(|| Self::start_with(ControlPlaneOptions::default()))
            .await
    }

    /// A private control plane for this test (stopped on drop).
    pub async fn start() -> ControlPlane {
        Self::start_with(ControlPlaneOptions::default()).await
    }

    /// A private control plane with extra settings.
    pub async fn start_with(options: ControlPlaneOptions) -> ControlPlane {
        remove_abandoned_dirs();
        let tmp = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .expect("create a control-plane dir");
        let dir = tmp.path().to_owned();
        Self::start_in(dir, Some(tmp), options).await
    }

    /// Starts a control plane whose files live in `dir` (kept afterwards; for the local stack).
    pub async fn start_in_dir(dir: &Path) -> ControlPlane {
        std::fs::create_dir_all(dir).expect("create the control-plane dir");
        Self::start_in(dir.to_owned(), None, ControlPlaneOptions::default()).await
    }

    async fn start_in(
        dir: PathBuf,
        tmp: Option<tempfile::TempDir>,
        options: ControlPlaneOptions,
    ) -> ControlPlane {
        ensure_built().await;
        let _ = std::fs::remove_file(dir.join("ready"));
        let mut builder = Proc::builder("/bin/bash")
            .name("control-plane")
            .arg(script())
            .arg("run")
            .arg(&dir)
            .log_file(dir.join("control-plane.log"));
        if !options.apiserver_args.is_empty() {
            builder = builder.env(
                "APOLLO_APISERVER_EXTRA_ARGS",
                options.apiserver_args.join(" "),
            );
        }
        if let Some(controllers) = &options.controllers {
            builder = builder.env("APOLLO_KCM_CONTROLLERS", controllers);
        }
        let mut run = builder.spawn();
        let start = Instant::now();
        while !dir.join("ready").is_file() {
            if let Some(status) = run.try_wait() {
                panic!(
                    "the control plane exited ({status}) before it was ready:\n{}",
                    run.logs()
                );
            }
            assert!(
                start.elapsed() < READY_DEADLINE,
                "the control plane was not ready within {READY_DEADLINE:?}:\n{}",
                run.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let env = read_env(&dir.join("env"));
        let apiserver_url = env
            .iter()
            .find(|(k, _)| k == "APISERVER_URL")
            .map(|(_, v)| v.clone())
            .expect("APISERVER_URL in the control plane's env file");
        ControlPlane {
            audit_log: dir.join("audit.log"),
            dir,
            _tmp: tmp,
            run: std::sync::Mutex::new(run),
            apiserver_url,
        }
    }

    /// The directory holding pki/, logs/, admin.kubeconfig and audit.log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `https://127.0.0.1:<port>`.
    pub fn apiserver_url(&self) -> &str {
        &self.apiserver_url
    }

    /// The CA that signed the apiserver's serving certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("pki/ca.crt")
    }

    /// A kubeconfig of `apollo-admin` (group `system:masters`).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// The apiserver's audit log (one JSON event per line).
    pub fn audit_log_path(&self) -> &Path {
        &self.audit_log
    }

    /// A client acting as the cluster admin (for setting tests up and reading results; never
    /// given to an Apollo component).
    pub async fn admin_client(&self) -> kube::Client {
        client_from_kubeconfig(&self.admin_kubeconfig()).await
    }

    /// Pid of a running component (etcd, kube-apiserver, kube-controller-manager).
    pub fn pid(&self, component: &str) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("pids").join(component))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Sends `signal` to a component (e.g. SIGSTOP/SIGCONT to pause etcd).
    pub fn signal(&self, component: &str, signal: Signal) {
        let pid = self
            .pid(component)
            .unwrap_or_else(|| panic!("{component} is not running"));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
            .unwrap_or_else(|e| panic!("signal {component}: {e}"));
    }

    /// Keeps a component down once it exits (until [`ControlPlane::release`]).
    pub fn hold(&self, component: &str) {
        let dir = self.dir.join("hold");
        std::fs::create_dir_all(&dir).expect("create hold dir");
        std::fs::write(dir.join(component), b"").expect("write hold file");
    }

    /// Lets a held component start again.
    pub fn release(&self, component: &str) {
        let _ = std::fs::remove_file(self.dir.join("hold").join(component));
    }

    /// Kills a component with SIGKILL; the supervisor starts it again unless it is held.
    pub fn kill(&self, component: &str) {
        self.signal(component, Signal::SIGKILL);
    }

    /// Kills kube-apiserver (SIGKILL: every watch and connection drops) and waits until a new
    /// one answers `/readyz`.
    pub async fn restart_apiserver(&self) {
        let old = self.pid(KUBE_APISERVER);
        self.kill(KUBE_APISERVER);
        crate::wait_until(READY_DEADLINE, "a new kube-apiserver pid", || async {
            self.pid(KUBE_APISERVER).is_some_and(|p| Some(p) != old)
        })
        .await;
        self.wait_ready().await;
    }

    /// Whether `/readyz` answers 200 right now.
    pub async fn is_ready(&self) -> bool {
        let Ok(ca) = std::fs::read(self.ca_file()) else {
            return false;
        };
        let Ok(cert) = reqwest::Certificate::from_pem(&ca) else {
            return false;
        };
        let Ok(http) = reqwest::Client::builder()
            .add_root_certificate(cert)
            .tls_built_in_root_certs(false)
            .timeout(Duration::from_secs(2))
            .build()
        else {
            return false;
        };
        http.get(format!("{}/readyz", self.apiserver_url))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        crate::wait_until(READY_DEADLINE, "kube-apiserver /readyz", || self.is_ready()).await;
    }

    /// The last lines of a component's log.
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("logs").join(format!("{component}.log")))
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Runs the real kubectl as the admin.
    pub async fn kubectl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        kubectl(
            &self.admin_kubeconfig(),
            &self.dir.join("kubectl-cache"),
            args,
        )
        .await
    }

    /// Stops the control plane now (also done on drop).
    pub fn stop(&self) {
        let mut run = self.run.lock().unwrap_or_else(|e| e.into_inner());
        run.signal(Signal::SIGTERM);
        let start = Instant::now();
        while run.try_wait().is_none() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        run.kill();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

const DIR_PREFIX: &str = "apollo-cp-";

/// Removes the directories (etcd data, logs: ~100 MB each) of control planes whose processes are
/// gone. The control plane shared by a test binary lives in a static that is never dropped: it
/// ends with the process (parent-death signal) and leaves its directory behind, so each start
/// collects what earlier test processes left.
fn remove_abandoned_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let named = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(DIR_PREFIX));
        // A directory being set up has no pid file yet: leave young ones alone.
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(120));
        if !named || !old {
            continue;
        }
        let alive = std::fs::read_to_string(path.join("pids/run"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .is_some_and(|pid| {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            });
        if !alive {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Builds the control plane's binaries when the cache lacks them (minutes, once per machine).
async fn ensure_built() {
    static BUILT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    BUILT
        .get_or_init(|| async {
            let out = tokio::process::Command::new("/bin/bash")
                .arg(script())
                .arg("build")
                .kill_on_drop(true)
                .output()
                .await
                .expect("run scripts/control-plane.sh build");
            assert!(
                out.status.success(),
                "building the control plane failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        })
        .await;
}

fn read_env(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A kube client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .unwrap_or_else(|e| panic!("read kubeconfig {}: {e}", path.display()));
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap_or_else(|e| panic!("kube config from {}: {e}", path.display()));
    kube::Client::try_from(config).expect("build a kube client")
}

/// A namespace of its own for one test, on a (usually shared) control plane: Apollo's CRDs are
/// installed (from `deploy/crds/`), and the RBAC of `deploy/rbac/` is applied for this namespace,
/// so each component can run under its own ServiceAccount with exactly those rules.
pub struct TestNamespace {
    name: String,
    apiserver_url: String,
    ca_file: PathBuf,
    admin_kubeconfig: PathBuf,
    client: kube::Client,
    audit: AuditLog,
    dir: NamespaceDir,
}

enum NamespaceDir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl NamespaceDir {
    fn path(&self) -> &Path {
        match self {
            NamespaceDir::Temp(t) => t.path(),
            NamespaceDir::Kept(p) => p,
        }
    }
}

impl TestNamespace {
    /// Creates `<prefix>-<random>` on `control_plane`.
    pub async fn create(control_plane: &ControlPlane, prefix: &str) -> TestNamespace {
        let name = format!("{prefix}-{}", random_suffix());
        let dir = tempfile::Builder::new()
            .prefix("apollo-ns-")
            .tempdir()
            .expect("create a namespace dir");
        Self::make(control_plane, name, true, NamespaceDir::Temp(dir)).await
    }

    /// Apollo's own namespace on a control plane it has to itself (the local stack): `name` is
    /// created if missing and the RBAC of `deploy/rbac/` is applied as `kubectl apply -k deploy/`
    /// would (cluster-scoped objects keep their names); component kubeconfigs are written to
    /// `dir`.
    pub async fn system(control_plane: &ControlPlane, name: &str, dir: &Path) -> TestNamespace {
        std::fs::create_dir_all(dir).expect("create the kubeconfig dir");
        Self::make(
            control_plane,
            name.to_owned(),
            false,
            NamespaceDir::Kept(dir.to_owned()),
        )
        .await
    }

    async fn make(
        control_plane: &ControlPlane,
        name: String,
        suffix_cluster_objects: bool,
        dir: NamespaceDir,
    ) -> TestNamespace {
        let client = control_plane.admin_client().await;
        install_crds(&client).await;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        match namespaces.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 && !suffix_cluster_objects => {}
            Err(e) => panic!("create namespace {name}: {e}"),
        }
        rbac::apply(&client, &name, suffix_cluster_objects).await;
        TestNamespace {
            audit: AuditLog::from_end(control_plane.audit_log_path()),
            apiserver_url: control_plane.apiserver_url().to_owned(),
            ca_file: control_plane.ca_file(),
            admin_kubeconfig: control_plane.admin_kubeconfig(),
            client,
            name,
            dir,
        }
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// An admin client (for the test's own reads and writes).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// `Api<K>` of this namespace as the admin.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// The admin kubeconfig of the control plane.
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// The audit-log username of `component` in this namespace.
    pub fn username(&self, component: Component) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.name,
            component.service_account()
        )
    }

    /// A kubeconfig that authenticates as `component`'s ServiceAccount in this namespace (a
    /// token from the TokenRequest API), talking to the apiserver directly.
    pub async fn kubeconfig_for(&self, component: Component) -> PathBuf {
        let server = self.apiserver_url.clone();
        self.write_kubeconfig(component, &server, "direct").await
    }

    /// Like [`TestNamespace::kubeconfig_for`], but through `proxy` (plain HTTP to the proxy,
    /// which forwards to the apiserver with the same token).
    pub async fn kubeconfig_via(&self, component: Component, proxy: &FaultProxy) -> PathBuf {
        self.write_kubeconfig(component, &proxy.url(), "proxy")
            .await
    }

    /// A client acting as `component` (e.g. to show what its RBAC refuses).
    pub async fn client_as(&self, component: Component) -> kube::Client {
        client_from_kubeconfig(&self.kubeconfig_for(component).await).await
    }

    async fn write_kubeconfig(&self, component: Component, server: &str, tag: &str) -> PathBuf {
        let token = self.token(component).await;
        let path = self
            .dir
            .path()
            .join(format!("{}-{tag}.kubeconfig", component.service_account()));
        let cluster = if server.starts_with("https://") {
            format!(
                "    server: {server}\n    certificate-authority: {}\n",
                self.ca_file.display()
            )
        } else {
            format!("    server: {server}\n")
        };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: apollo\n  cluster:\n{cluster}\
             users:\n- name: {user}\n  user:\n    token: {token}\n\
             contexts:\n- name: apollo\n  context:\n    cluster: apollo\n    user: {user}\n    namespace: {ns}\n\
             current-context: apollo\n",
            user = component.service_account(),
            ns = self.name,
        );
        std::fs::write(&path, text).expect("write a component kubeconfig");
        path
    }

    async fn token(&self, component: Component) -> String {
        let accounts: Api<ServiceAccount> = self.api();
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: Vec::new(),
                expiration_seconds: Some(365 * 24 * 3600),
                bound_object_ref: None,
            },
            ..TokenRequest::default()
        };
        let answer: TokenRequest = accounts
            .create_subresource(
                "token",
                component.service_account(),
                &PostParams::default(),
                &request,
            )
            .await
            .unwrap_or_else(|e| panic!("TokenRequest for {}: {e}", component.service_account()));
        answer
            .status
            .map(|s| s.token)
            .expect("TokenRequest answered a token")
    }

    /// Waits until the audit log holds every request the apiserver answered before this call.
    /// The apiserver writes a request's event after its response has gone out, so a test can
    /// see a request's effect (a watch event, a status) before the request is in the log (seen
    /// in CI: a deployment's status patch counted 0 right after the status showed it). A unique
    /// request is made and the log read until it shows: the events of requests answered before
    /// it are written by then.
    async fn audit_barrier(&self) {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let name = format!(
            "audit-barrier-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let configmaps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.name);
        let _ = configmaps.get_opt(&name).await;
        crate::wait_until(
            Duration::from_secs(10),
            "the audit log to catch up",
            || async { self.audit.requests().iter().any(|r| r.name == name) },
        )
        .await;
    }

    /// Every request the apiserver served to this namespace's component identities since the
    /// namespace was made or [`TestNamespace::reset_requests`] last ran (from the audit log).
    pub async fn requests(&self) -> Vec<ApiRequest> {
        self.audit_barrier().await;
        let prefix = format!("system:serviceaccount:{}:", self.name);
        self.audit
            .requests()
            .into_iter()
            .filter(|r| r.user.starts_with(&prefix))
            .collect()
    }

    /// Requests by `component` only.
    pub async fn requests_by(&self, component: Component) -> Vec<ApiRequest> {
        self.audit_barrier().await;
        let user = self.username(component);
        self.audit
            .requests()
            .into_iter()
            .filter(|r| r.user == user)
            .collect()
    }

    /// Requests with `verb` on `resource` (any group); `subresource` None matches any, `Some("")`
    /// only the main resource.
    pub async fn count(&self, verb: &str, resource: &str, subresource: Option<&str>) -> u64 {
        self.requests()
            .await
            .iter()
            .filter(|r| r.verb == verb && r.resource == resource)
            .filter(|r| subresource.is_none_or(|s| r.subresource == s))
            .count() as u64
    }

    /// Write requests on `resource`, or on every resource when None.
    pub async fn writes(&self, resource: Option<&str>) -> u64 {
        self.requests()
            .await
            .iter()
            .filter(|r| r.is_write())
            .filter(|r| resource.is_none_or(|res| r.resource == res))
            .count() as u64
    }

    /// Forgets the requests counted so far.
    pub async fn reset_requests(&self) {
        // Requests answered before the reset must not be logged, and counted, after it.
        self.audit_barrier().await;
        self.audit.reset();
    }

    /// Runs the real kubectl as the admin, in this namespace unless `args` name another.
    pub async fn kubectl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all: Vec<std::ffi::OsString> = vec!["-n".into(), self.name.clone().into()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        kubectl(
            &self.admin_kubeconfig,
            &self.dir.path().join("kubectl-cache"),
            all,
        )
        .await
    }
}

fn random_suffix() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..6)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

/// Applies Apollo's CRDs from `deploy/crds/` (server-side apply: a no-op when unchanged) and
/// waits until each is Established.
pub async fn install_crds(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let dir = workspace_root().join("deploy/crds");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path).expect("read CRD yaml");
        let crd: CustomResourceDefinition = serde_saphyr::from_str(&text)
            .unwrap_or_else(|e| panic!("parse {}: {e}", path.display()));
        let name = crd.metadata.name.clone().expect("CRD name");
        crds.patch(
            &name,
            &PatchParams::apply(TEST_FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("apply CRD {name}: {e}"));
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .unwrap_or_else(|_| panic!("CRD {name} not Established within 30s"))
        .unwrap_or_else(|e| panic!("await CRD {name}: {e}"));
    }
}

/// The kubectl the tests run: `APOLLO_KUBECTL` if set, else `/usr/bin/kubectl`.
///
/// `/usr/bin/kubectl` on these machines is a dispatcher that runs the installed kubectl whose
/// minor version matches the server's (1.27 to 1.33 are installed) and falls back to 1.32 for a
/// server it has none for. Kubernetes supports one minor of skew, so for our v1.34 apiserver we
/// run the dispatcher's own kubectl 1.33 when it is there.
pub fn kubectl_program() -> PathBuf {
    if let Some(p) = std::env::var_os("APOLLO_KUBECTL") {
        return PathBuf::from(p);
    }
    let dispatcher = Path::new("/usr/bin/kubectl");
    if let Ok(real) = dispatcher.canonicalize() {
        let sibling = real.with_file_name("kubectl.1.33");
        if sibling.is_file() {
            return sibling;
        }
    }
    if dispatcher.is_file() {
        dispatcher.to_owned()
    } else {
        PathBuf::from("kubectl")
    }
}

/// Runs the kubectl of [`kubectl_program`] with `--kubeconfig` and `--cache-dir` set.
pub async fn kubectl<I, S>(kubeconfig: &Path, cache_dir: &Path, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let fut = tokio::process::Command::new(kubectl_program())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache_dir)
        .args(args)
        .env_remove("KUBECONFIG")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .expect("kubectl did not finish within 60s")
        .expect("run kubectl")
}
