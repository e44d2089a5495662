//! Shared by the `deploy_*` tests of the deployment files: where the repository is, the versions
//! tools/kube builds, command lines with their environment, and (in submodules) the kustomize
//! render of `deploy/`, `docker-compose.yaml` and the RBAC each component needs.
#![allow(dead_code)]

pub mod compose;
pub mod rbac;
pub mod render;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Namespace the kustomization installs into (and the compose stack's RBAC step).
pub const NAMESPACE: &str = "apollo-system";
/// What the downward API would hand a pod in the render (any plausible value will do).
pub const SAMPLE_POD_IP: &str = "10.1.2.3";

pub const GATEWAY: &str = "apollo-gateway";
pub const ROUTER: &str = "apollo-router";
pub const CONTROLLER: &str = "apollo-controller";
pub const AGENT: &str = "apollo-agent";

/// The control plane's programs (scripts/control-plane.sh runs the same three).
pub const ETCD: &str = "etcd";
pub const KUBE_APISERVER: &str = "kube-apiserver";
pub const KUBE_CONTROLLER_MANAGER: &str = "kube-controller-manager";

/// The controllers kube-controller-manager must run for Apollo (DESIGN §9): owner-reference
/// garbage collection, namespace deletion, ServiceAccounts, StatefulSets.
pub const REQUIRED_KCM_CONTROLLERS: [&str; 4] = [
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "statefulset-controller",
];

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// One of Apollo's programs, or "other".
pub fn program_name(p: &str) -> &'static str {
    [GATEWAY, ROUTER, CONTROLLER, AGENT]
        .into_iter()
        .find(|n| *n == p)
        .unwrap_or("other")
}

/// The Kubernetes version tools/kube builds (`KUBE_VERSION` in scripts/lib/go-tools.sh), e.g.
/// `v1.34.4`.
pub fn kube_version() -> String {
    let path = repo_root().join("scripts/lib/go-tools.sh");
    let text = std::fs::read_to_string(&path).expect("read scripts/lib/go-tools.sh");
    text.lines()
        .find_map(|l| l.strip_prefix("KUBE_VERSION="))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .expect("KUBE_VERSION= in scripts/lib/go-tools.sh")
}

/// The etcd version tools/kube builds (its go.mod's `go.etcd.io/etcd/server/v3`), e.g. `3.6.4`.
pub fn etcd_version() -> String {
    let text =
        std::fs::read_to_string(repo_root().join("tools/kube/go.mod")).expect("tools/kube/go.mod");
    text.lines()
        .find_map(|l| {
            let mut words = l
                .split_whitespace()
                .skip_while(|w| *w != "go.etcd.io/etcd/server/v3");
            words.next()?;
            words.next().map(|v| v.trim_start_matches('v').to_owned())
        })
        .expect("go.etcd.io/etcd/server/v3 in tools/kube/go.mod")
}

/// The directory holding the etcd, kube-apiserver and kube-controller-manager that tools/kube
/// builds (`scripts/control-plane.sh build`; built once per machine).
pub fn kube_bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new("/bin/bash")
            .arg(repo_root().join("scripts/control-plane.sh"))
            .arg("build")
            .output()
            .expect("run scripts/control-plane.sh build");
        assert!(
            out.status.success(),
            "building the control plane failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).expect("UTF-8 path");
        let dir = PathBuf::from(stdout.lines().last().expect("a directory").trim());
        assert!(dir.join(KUBE_APISERVER).is_file(), "{}", dir.display());
        dir
    })
}

// ---------------------------------------------------------------------------------------------
// Command lines: argv plus the environment variables that are flags of the same binary.
// ---------------------------------------------------------------------------------------------

/// `command` followed by one `--flag=value` per variable in `env` that is a flag of `cli`, so
/// that values given through the environment go through the same parser as arguments. An
/// `APOLLO_*` variable the binary does not know is an error: it would be silently ignored.
pub fn argv_with_env(
    cli: &clap::Command,
    command: &[String],
    env: &BTreeMap<String, String>,
) -> Result<Vec<String>, String> {
    let mut argv = command.to_vec();
    for (name, value) in env {
        let arg = cli
            .get_arguments()
            .find(|a| a.get_env() == Some(OsStr::new(name)));
        match arg {
            Some(arg) => {
                let long = arg
                    .get_long()
                    .ok_or_else(|| format!("{name} maps to a flag without a long name"))?;
                if arg.get_action().takes_values() {
                    argv.push(format!("--{long}={value}"));
                } else if matches!(value.as_str(), "true" | "1") {
                    argv.push(format!("--{long}"));
                }
            }
            None if name.starts_with("APOLLO_") => {
                return Err(format!(
                    "{name} is not an environment variable of {}",
                    cli.get_name()
                ))
            }
            None => {}
        }
    }
    Ok(argv)
}

/// A secret file with some content, standing in for a path that exists only in a container.
pub fn stand_in_secret(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, "0123456789abcdef").expect("write a stand-in secret");
    path
}

pub fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} has no port"))
}

/// `redis://host:port/` -> (host, port).
pub fn host_port_of_url(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = authority
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{url:?} names no port"));
    (host.to_owned(), port.parse().expect("numeric port"))
}

/// The value of `--flag=value` or `--flag value` in `argv`.
pub fn flag_value(argv: &[String], flag: &str) -> Option<String> {
    let prefix = format!("{flag}=");
    argv.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix(&prefix)
            .map(str::to_owned)
            .or_else(|| (a == flag).then(|| argv.get(i + 1).cloned()).flatten())
    })
}

pub fn assert_exports_traces_to_jaeger(who: &str, env: &BTreeMap<String, String>, jaeger: &str) {
    let endpoint = env
        .get("OTEL_EXPORTER_OTLP_ENDPOINT")
        .unwrap_or_else(|| panic!("{who}: no OTEL_EXPORTER_OTLP_ENDPOINT"));
    // Our exporter speaks OTLP over HTTP (4318); 4317 is gRPC and would silently drop traces.
    assert_eq!(endpoint, &format!("http://{jaeger}:4318"), "{who}");
}

/// Runs a program to completion; panics with its output when it fails.
pub fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
