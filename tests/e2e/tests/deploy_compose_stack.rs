//! docker-compose.yaml's control plane and bootstrap run for real, without a Docker engine: the
//! init step writes the certificates, etcd, kube-apiserver and kube-controller-manager start from
//! the compose command lines (the binaries tools/kube builds, the versions of the compose images)
//! and the one-shot steps (apiserver-ready, crds, crds-ready, rbac, tokens, seed) run in the order
//! compose runs them: kubectl steps with the real kubectl and the admin kubeconfig init wrote,
//! script steps with sh. Then the identities are checked against the real apiserver: the admin is
//! in system:masters, kube-controller-manager works under its own certificate, and each
//! component's kubeconfig from the tokens step authenticates as its own ServiceAccount with the
//! RBAC it needs and no more; the audit log records them.
//!
//! What Docker would do is emulated on loopback: container paths map onto temp directories (one
//! per named volume) and the repository (bind mounts); `<service>:<port>` and wildcard listen
//! addresses become 127.0.0.1 on free ports; a kubeconfig naming `https://kube-apiserver:6443`
//! dials 127.0.0.1 with `tls-server-name: kube-apiserver`, so TLS still checks the certificate
//! for the service name, as in the compose network.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use apollo_test_support::{free_port, kubectl, kubectl_program, wait_for, wait_until, Proc};
use serde_json::Value;

use common::compose::{
    argv, compose_env, depends_on, host_path, map_paths, run_init, running, service, services,
    step_chain, strings,
};
use common::rbac::{
    Need, CONTROLLER_CLUSTER_NEEDS, CONTROLLER_LEASE_NEEDS, GATEWAY_CLUSTER_NEEDS,
    GATEWAY_LEASE_NEEDS,
};
use common::render::service_account_running;
use common::{
    flag_value, kube_bin_dir, port_of, program_name, CONTROLLER, ETCD, GATEWAY, KUBE_APISERVER,
    KUBE_CONTROLLER_MANAGER, NAMESPACE,
};

const STEP_DEADLINE: Duration = Duration::from_secs(180);

/// Docker's networking and volumes, emulated on this machine.
struct Emulation {
    volumes: tempfile::TempDir,
    scratch: tempfile::TempDir,
    /// `host:port` as containers write it -> `127.0.0.1:<free port>`.
    addresses: Vec<(String, String)>,
    /// (service, container port) -> free port, for `--secure-port=<n>`.
    ports: BTreeMap<(String, u16), u16>,
    /// The apiserver's service name and its port on this machine.
    apiserver: (String, u16),
}

impl Emulation {
    fn new() -> Emulation {
        let mut addresses = Vec::new();
        let mut ports = BTreeMap::new();
        let mut expose = |service: &str, port: u16, also: &[&str]| {
            let local = free_port();
            for host in [service].iter().chain(also) {
                addresses.push((format!("{host}:{port}"), format!("127.0.0.1:{local}")));
            }
            ports.insert((service.to_owned(), port), local);
            local
        };
        let (etcd, etcd_svc) = running(ETCD);
        let etcd_argv = argv(etcd_svc);
        for flag in ["--listen-client-urls", "--listen-peer-urls"] {
            let port = port_of(&flag_value(&etcd_argv, flag).expect(flag));
            expose(etcd, port, &["0.0.0.0", "127.0.0.1"]);
        }
        let mut secure_port = |program: &str| {
            let (name, svc) = running(program);
            let port = flag_value(&argv(svc), "--secure-port").expect("--secure-port");
            expose(name, port.parse().expect("port"), &[])
        };
        let api_local = secure_port(KUBE_APISERVER);
        secure_port(KUBE_CONTROLLER_MANAGER);
        let (api_name, _) = running(KUBE_APISERVER);
        Emulation {
            volumes: tempfile::tempdir().expect("tempdir"),
            scratch: tempfile::tempdir().expect("tempdir"),
            addresses,
            ports,
            apiserver: (api_name.to_owned(), api_local),
        }
    }

    fn volumes(&self) -> &Path {
        self.volumes.path()
    }

    /// A copy of a kubeconfig naming the apiserver service that dials it on this machine, still
    /// checking its certificate for the service name.
    fn kubeconfig(&self, path: &Path) -> PathBuf {
        self.kubeconfig_checking(path, Some(&self.apiserver.0))
    }

    /// Like [`Emulation::kubeconfig`]; with `server_name` None the certificate is checked for
    /// 127.0.0.1, as a kubectl on the Docker host dialing the published port does.
    fn kubeconfig_checking(&self, path: &Path, server_name: Option<&str>) -> PathBuf {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{e}"));
        let port = self.apiserver.1;
        let mut out = String::new();
        let mut rewritten = 0;
        for line in text.lines() {
            match line.split_once("server: https://") {
                Some((indent, _)) => {
                    out.push_str(&format!("{indent}server: https://127.0.0.1:{port}\n"));
                    if let Some(name) = server_name {
                        out.push_str(&format!("{indent}tls-server-name: {name}\n"));
                    }
                    rewritten += 1;
                }
                None => out.push_str(&format!("{line}\n")),
            }
        }
        assert_eq!(rewritten, 1, "{}: one server", path.display());
        let local = self.scratch.path().join(format!(
            "{}-{}-{}",
            rewritten_name(path),
            server_name.unwrap_or("loopback"),
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("kubeconfig")
        ));
        std::fs::write(&local, out).expect("write a local kubeconfig");
        local
    }

    /// One argument of a control-plane command line, as it has to read on this machine.
    fn arg(&self, service_name: &str, svc: &Value, arg: &str) -> String {
        let mut arg = arg.to_owned();
        for (from, to) in &self.addresses {
            arg = arg.replace(from, to);
        }
        if arg == "--bind-address=0.0.0.0" {
            return "--bind-address=127.0.0.1".to_owned();
        }
        if let Some(port) = arg.strip_prefix("--secure-port=") {
            let key = (service_name.to_owned(), port.parse().expect("port"));
            return format!("--secure-port={}", self.ports[&key]);
        }
        match arg.split_once('=') {
            Some((flag, path)) if path.starts_with('/') => {
                let host = host_path(svc, path, self.volumes())
                    .unwrap_or_else(|| panic!("{service_name}: {arg} is on no volume"));
                let host = if flag.ends_with("kubeconfig") {
                    self.kubeconfig(&host)
                } else {
                    host
                };
                format!("{flag}={}", host.display())
            }
            _ => arg,
        }
    }
}

fn rewritten_name(path: &Path) -> String {
    path.parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("local")
        .to_owned()
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `kubectl auth can-i` as the identity of `kubeconfig`.
async fn can_i(
    kubeconfig: &Path,
    cache: &Path,
    verb: &str,
    resource: &str,
    ns: Option<&str>,
) -> bool {
    let (resource, sub) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s)),
        None => (resource, None),
    };
    let mut args = vec![
        "auth".to_owned(),
        "can-i".into(),
        verb.into(),
        resource.into(),
    ];
    if let Some(sub) = sub {
        args.push(format!("--subresource={sub}"));
    }
    match ns {
        Some(ns) => args.extend(["-n".to_owned(), ns.to_owned()]),
        None => args.push("--all-namespaces".to_owned()),
    }
    let out = kubectl(kubeconfig, cache, &args).await;
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        answer == "yes" || answer == "no",
        "kubectl {args:?}: {}",
        output_text(&out)
    );
    answer == "yes"
}

fn qualified(group: &str, resource: &str) -> String {
    match resource.split_once('/') {
        Some((r, sub)) => format!("{r}.{group}/{sub}"),
        None => format!("{resource}.{group}"),
    }
}

async fn assert_can(kubeconfig: &Path, cache: &Path, who: &str, needs: &[Need], ns: Option<&str>) {
    for (group, resource, verbs) in needs {
        for verb in *verbs {
            assert!(
                can_i(kubeconfig, cache, verb, &qualified(group, resource), ns).await,
                "{who} cannot {verb} {group}/{resource} in {ns:?}"
            );
        }
    }
}

#[tokio::test]
async fn compose_control_plane_and_bootstrap_steps_run_on_the_real_binaries() {
    let chain = step_chain("seed");
    assert_eq!(
        chain,
        [
            "apiserver-ready",
            "crds",
            "crds-ready",
            "rbac",
            "tokens",
            "seed"
        ],
        "the bootstrap steps, one after another"
    );
    let env = Emulation::new();
    run_init(env.volumes());

    let seed = service("seed");
    let admin_path = compose_env(seed)["KUBECONFIG"].clone();
    let admin = env.kubeconfig(&host_path(seed, &admin_path, env.volumes()).expect("admin"));
    let cache = env.scratch.path().join("kubectl-cache");
    let home = env.scratch.path().join("home");
    let bin = env.scratch.path().join("bin");
    std::fs::create_dir_all(&home).expect("home");
    std::fs::create_dir_all(&bin).expect("bin");
    std::os::unix::fs::symlink(kubectl_program(), bin.join("kubectl")).expect("symlink kubectl");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    // The control plane and the steps, in dependency order.
    let control_plane: BTreeSet<&str> = [ETCD, KUBE_APISERVER, KUBE_CONTROLLER_MANAGER]
        .into_iter()
        .map(|p| running(p).0)
        .collect();
    let mut todo: Vec<&str> = control_plane.iter().copied().collect();
    todo.extend(chain.iter().map(String::as_str));
    let mut done: BTreeSet<&str> = BTreeSet::from(["init"]);
    let mut procs: Vec<Proc> = Vec::new();
    while !todo.is_empty() {
        let ready = *todo
            .iter()
            .find(|name| {
                depends_on(name)
                    .keys()
                    .all(|d| done.contains(d.as_str()) || !services().contains_key(d))
            })
            .unwrap_or_else(|| panic!("no service of {todo:?} can start"));
        todo.retain(|n| *n != ready);
        let svc = service(ready);
        let argv = argv(svc);
        if control_plane.contains(ready) {
            let program = kube_bin_dir().join(&argv[0]);
            let args: Vec<String> = argv[1..].iter().map(|a| env.arg(ready, svc, a)).collect();
            procs.push(Proc::builder(program).name(ready).args(args).spawn());
        } else {
            let step_env = compose_env(svc);
            assert_eq!(
                step_env.get("KUBECONFIG"),
                Some(&admin_path),
                "{ready}: the steps act as the admin"
            );
            let out = if argv.first().map(String::as_str) == Some("kubectl") {
                let args: Vec<String> = argv[1..]
                    .iter()
                    .map(|a| match host_path(svc, a, Path::new("/nonexistent")) {
                        Some(p) if a.starts_with('/') => p.to_string_lossy().into_owned(),
                        _ => a.clone(),
                    })
                    .collect();
                kubectl(&admin, &cache, &args).await
            } else {
                assert_eq!(argv.first().map(String::as_str), Some("sh"), "{ready}");
                let script = host_path(svc, &argv[1], env.volumes()).expect("script mounted");
                let mut cmd = tokio::process::Command::new("sh");
                cmd.arg(script).kill_on_drop(true).env_clear();
                for (k, v) in &step_env {
                    let v = match k.as_str() {
                        "KUBECONFIG" => admin.to_string_lossy().into_owned(),
                        "HOME" => continue,
                        _ => map_paths(ready, k, v, env.volumes()),
                    };
                    cmd.env(k, v);
                }
                cmd.env("HOME", &home).env("PATH", &path);
                tokio::time::timeout(STEP_DEADLINE, cmd.output())
                    .await
                    .unwrap_or_else(|_| panic!("{ready} did not finish within {STEP_DEADLINE:?}"))
                    .expect("run the step's script")
            };
            assert!(
                out.status.success(),
                "step {ready} failed: {}",
                output_text(&out)
            );
        }
        done.insert(ready);
    }
    for p in &mut procs {
        assert!(p.is_running(), "{} exited:\n{}", p.name(), p.logs());
    }

    // The admin of the compose stack, over TLS checked for the service name ...
    let json = |out: Output| -> Value {
        assert!(out.status.success(), "{}", output_text(&out));
        serde_json::from_slice(&out.stdout).expect("kubectl json")
    };
    let me = json(kubectl(&admin, &cache, ["auth", "whoami", "-o", "json"]).await);
    let groups = me["status"]["userInfo"]["groups"].to_string();
    assert!(groups.contains("system:masters"), "the admin: {me}");
    // ... and from the host on 127.0.0.1, as the compose file's comment tells people to.
    let admin_file = host_path(seed, &admin_path, env.volumes()).expect("admin");
    let from_host = env.kubeconfig_checking(&admin_file, None);
    let out = kubectl(&from_host, &cache, ["get", "--raw=/readyz"]).await;
    assert!(out.status.success(), "127.0.0.1: {}", output_text(&out));

    // kube-controller-manager works under its own certificate: its ServiceAccount controller
    // gives the install namespace its `default` account.
    wait_until(
        STEP_DEADLINE,
        "the default ServiceAccount of the install namespace",
        || async {
            kubectl(
                &admin,
                &cache,
                ["-n", NAMESPACE, "get", "serviceaccount", "default"],
            )
            .await
            .status
            .success()
        },
    )
    .await;

    // The demo's deployment selects both seeded switches.
    let dpd = json(kubectl(&admin, &cache, ["get", "dpd", "demo-logger", "-o", "json"]).await);
    let selector: Vec<String> = dpd["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    let selected = json(
        kubectl(
            &admin,
            &cache,
            ["get", "nsw", "-l", &selector.join(","), "-o", "json"],
        )
        .await,
    );
    let names: BTreeSet<&str> = selected["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["tor1-01", "tor1-02"]),
        "the demo selects both switches"
    );
    let tools = strings(&service("kubectl")["command"]);
    let out = kubectl(&admin, &cache, &tools).await;
    assert!(
        out.status.success(),
        "the kubectl tool: {}",
        output_text(&out)
    );

    // Each component's own identity, from the kubeconfig the tokens step wrote for it.
    let mut checked = BTreeSet::new();
    for (name, svc) in services() {
        let program = argv(svc)
            .first()
            .map(|p| program_name(p))
            .unwrap_or("other");
        let Some(kubeconfig) = compose_env(svc).get("KUBECONFIG").cloned() else {
            continue;
        };
        if program == "other" || !checked.insert(program) {
            continue;
        }
        let kubeconfig = host_path(svc, &kubeconfig, env.volumes()).expect("identity volume");
        assert!(
            kubeconfig.is_file(),
            "{name}: the tokens step wrote no {}",
            kubeconfig.display()
        );
        let account = service_account_running(program);
        let me = json(kubectl(&kubeconfig, &cache, ["auth", "whoami", "-o", "json"]).await);
        assert_eq!(
            me["status"]["userInfo"]["username"],
            format!("system:serviceaccount:{NAMESPACE}:{account}"),
            "{name}"
        );
        let (cluster, leases): (&[Need], &[Need]) = match program {
            GATEWAY => (GATEWAY_CLUSTER_NEEDS, GATEWAY_LEASE_NEEDS),
            CONTROLLER => (CONTROLLER_CLUSTER_NEEDS, CONTROLLER_LEASE_NEEDS),
            other => panic!("{name}: {other} has a kubeconfig"),
        };
        assert_can(&kubeconfig, &cache, name, cluster, None).await;
        assert_can(&kubeconfig, &cache, name, leases, Some(NAMESPACE)).await;
        for (verb, resource) in [
            ("get", "secrets"),
            ("create", "serviceaccounts/token"),
            ("delete", "leases.coordination.k8s.io"),
        ] {
            assert!(
                !can_i(&kubeconfig, &cache, verb, resource, Some(NAMESPACE)).await,
                "{name} may {verb} {resource}"
            );
        }
        let forbidden = match program {
            GATEWAY => ("create", "deviceprocesses.azure.com"),
            _ => ("patch", "deviceprocesses.azure.com/status"),
        };
        assert!(
            !can_i(&kubeconfig, &cache, forbidden.0, forbidden.1, None).await,
            "{name} may {forbidden:?}"
        );
    }
    assert_eq!(checked, BTreeSet::from([CONTROLLER, GATEWAY]));

    // The audit log names each identity.
    let (_, api) = running(KUBE_APISERVER);
    let audit = flag_value(&argv(api), "--audit-log-path").expect("audit log");
    let audit = host_path(api, &audit, env.volumes()).expect("audit volume");
    for account in [
        service_account_running(GATEWAY),
        service_account_running(CONTROLLER),
    ] {
        let user = format!("\"username\":\"system:serviceaccount:{NAMESPACE}:{account}\"");
        wait_for(
            Duration::from_secs(10),
            &format!("{user} in the audit log"),
            || async {
                std::fs::read_to_string(&audit)
                    .ok()
                    .filter(|t| t.contains(&user))
            },
        )
        .await;
    }
}
