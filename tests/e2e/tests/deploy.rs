//! The deployment files against the real binaries: every command line in the kustomize render of
//! `deploy/` (the real kubectl, offline) and in `docker-compose.yaml` is parsed by the binary's own
//! clap types, RBAC is checked against what each component calls, and the compose stack's init and
//! seed steps are run for real (the init script with the openssl CLI, the seed's kubectl commands
//! against kubesim). No Docker and no network: what a broken flag or a missing CRD would cost a
//! person at `kubectl apply -k deploy/` or `docker compose up` fails here first.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use apollo_agent::config::{
    ENV_BACKOFF_BASE_MS, ENV_BACKOFF_MAX_SECONDS, ENV_DEVICE_NAME, ENV_DEVICE_TOKEN,
    ENV_DEVICE_TOKEN_FILE, ENV_GATEWAY_URL, ENV_HEARTBEAT_INTERVAL_SECONDS,
    ENV_MIN_POLL_INTERVAL_MS, ENV_POLL_WAIT_SECONDS, ENV_REQUEST_TIMEOUT_SECONDS,
};
use apollo_agent::{AgentConfig, RawConfig};
use apollo_protocol::token::{key_from_secret_file, verify_device_token};
use apollo_test_support::{binary, KubeSimProc};
use clap::{CommandFactory, Parser};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Container, PodTemplateSpec, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use serde_json::Value;

/// Namespace the kustomization installs into.
const NAMESPACE: &str = "apollo-system";
/// What the downward API would hand a pod in the render (any plausible value will do).
const SAMPLE_POD_IP: &str = "10.1.2.3";

const GATEWAY: &str = "apollo-gateway";
const ROUTER: &str = "apollo-router";
const CONTROLLER: &str = "apollo-controller";
const AGENT: &str = "apollo-agent";
const KUBESIM: &str = "kubesim";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

fn kubectl_program() -> PathBuf {
    if Path::new("/usr/bin/kubectl").is_file() {
        PathBuf::from("/usr/bin/kubectl")
    } else {
        PathBuf::from("kubectl")
    }
}

// ---------------------------------------------------------------------------------------------
// Command lines: argv plus the environment variables that are flags of the same binary.
// ---------------------------------------------------------------------------------------------

/// `command` followed by one `--flag=value` per variable in `env` that is a flag of `cli`, so
/// that values given through the environment go through the same parser as arguments. An
/// `APOLLO_*` variable the binary does not know is an error: it would be silently ignored.
fn argv_with_env(
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
fn stand_in_secret(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, "0123456789abcdef").expect("write a stand-in secret");
    path
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} has no port"))
}

/// `redis://host:port/` -> (host, port).
fn host_port_of_url(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = authority
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{url:?} names no port"));
    (host.to_owned(), port.parse().expect("numeric port"))
}

// ---------------------------------------------------------------------------------------------
// The kustomize render.
// ---------------------------------------------------------------------------------------------

fn rendered() -> &'static [Value] {
    static RENDERED: OnceLock<Vec<Value>> = OnceLock::new();
    RENDERED.get_or_init(|| {
        let out = Command::new(kubectl_program())
            .arg("kustomize")
            .arg(repo_root().join("deploy"))
            .output()
            .expect("run kubectl kustomize");
        assert!(
            out.status.success(),
            "kubectl kustomize deploy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).expect("UTF-8 render");
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("parse the render");
        docs.into_iter().filter(|d| !d.is_null()).collect()
    })
}

fn objects<K: serde::de::DeserializeOwned>(kind: &str) -> Vec<K> {
    rendered()
        .iter()
        .filter(|d| d["kind"] == kind)
        .map(|d| serde_json::from_value(d.clone()).unwrap_or_else(|e| panic!("{kind}: {e}")))
        .collect()
}

/// A pod-running object of the render: its name, what its pods would be called, and their template.
struct Workload {
    kind: &'static str,
    name: String,
    pod_name: String,
    template: PodTemplateSpec,
}

fn workloads() -> Vec<Workload> {
    let mut out = Vec::new();
    for d in objects::<Deployment>("Deployment") {
        let name = d.metadata.name.clone().unwrap_or_default();
        out.push(Workload {
            kind: "Deployment",
            pod_name: format!("{name}-5d9c7b8f4-x2k9q"),
            name,
            template: d.spec.expect("deployment spec").template,
        });
    }
    for s in objects::<StatefulSet>("StatefulSet") {
        let name = s.metadata.name.clone().unwrap_or_default();
        out.push(Workload {
            kind: "StatefulSet",
            pod_name: format!("{name}-0"),
            name,
            template: s.spec.expect("statefulset spec").template,
        });
    }
    assert!(
        rendered()
            .iter()
            .all(|d| !matches!(d["kind"].as_str(), Some("DaemonSet" | "Job" | "CronJob"))),
        "a new kind of workload: teach this test to read it"
    );
    out
}

fn containers(w: &Workload) -> Vec<Container> {
    let spec = w.template.spec.clone().expect("pod spec");
    spec.init_containers
        .unwrap_or_default()
        .into_iter()
        .chain(spec.containers)
        .collect()
}

/// The container's environment as its process would see it; downward-API values get what the
/// kubelet would fill in for the first pod of `w`.
fn container_env(w: &Workload, c: &Container) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for var in c.env.clone().unwrap_or_default() {
        let value = match (var.value, var.value_from) {
            (Some(v), None) => v,
            (None, Some(from)) => {
                let field = from
                    .field_ref
                    .unwrap_or_else(|| panic!("{}: env {} is not a fieldRef", w.name, var.name))
                    .field_path;
                match field.as_str() {
                    "metadata.name" => w.pod_name.clone(),
                    "metadata.namespace" => NAMESPACE.to_owned(),
                    "status.podIP" => SAMPLE_POD_IP.to_owned(),
                    other => panic!("{}: env {} uses fieldRef {other}", w.name, var.name),
                }
            }
            _ => panic!(
                "{}: env {} has neither value nor valueFrom",
                w.name, var.name
            ),
        };
        env.insert(var.name, value);
    }
    env
}

fn command_line(c: &Container) -> Vec<String> {
    let mut argv = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    argv
}

fn named_port(c: &Container, name: &str) -> Option<u16> {
    c.ports
        .as_ref()?
        .iter()
        .find(|p| p.name.as_deref() == Some(name))
        .map(|p| p.container_port as u16)
}

fn service(name: &str) -> Service {
    objects::<Service>("Service")
        .into_iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no Service {name} in the render"))
}

fn service_has_port(name: &str, port: u16) -> bool {
    service(name)
        .spec
        .and_then(|s| s.ports)
        .unwrap_or_default()
        .iter()
        .any(|p| p.port == i32::from(port))
}

/// The Redis URL names a Service of the render, on a port that Service exposes.
fn assert_redis_is_the_rendered_service(who: &str, url: &str) {
    let (host, port) = host_port_of_url(url);
    assert!(
        service_has_port(&host, port),
        "{who}: --redis-url {url} is not a Service port of the render"
    );
}

fn assert_probes_hit_admin(w: &Workload, c: &Container, admin_port: u16) {
    assert_eq!(
        named_port(c, "admin"),
        Some(admin_port),
        "{}: container port `admin` must be the --admin-listen port",
        w.name
    );
    for (what, probe) in [
        ("readiness", c.readiness_probe.as_ref()),
        ("liveness", c.liveness_probe.as_ref()),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{}: no HTTP {what} probe", w.name));
        let expected = if what == "readiness" {
            "/readyz"
        } else {
            "/healthz"
        };
        assert_eq!(
            get.path.as_deref(),
            Some(expected),
            "{}: {what} path",
            w.name
        );
        assert_eq!(
            serde_json::to_value(&get.port).expect("port"),
            Value::from("admin"),
            "{}: {what} probe port",
            w.name
        );
    }
}

fn assert_exports_traces_to_jaeger(who: &str, env: &BTreeMap<String, String>, jaeger: &str) {
    let endpoint = env
        .get("OTEL_EXPORTER_OTLP_ENDPOINT")
        .unwrap_or_else(|| panic!("{who}: no OTEL_EXPORTER_OTLP_ENDPOINT"));
    // Our exporter speaks OTLP over HTTP (4318); 4317 is gRPC and would silently drop traces.
    assert_eq!(endpoint, &format!("http://{jaeger}:4318"), "{who}");
}

#[test]
fn every_rendered_container_of_ours_parses_with_the_binary_cli() {
    let secrets = tempfile::tempdir().expect("tempdir");
    let mut parsed: BTreeMap<&str, usize> = BTreeMap::new();
    for w in workloads() {
        for c in containers(&w) {
            let argv = command_line(&c);
            let env = container_env(&w, &c);
            let image = c.image.clone().unwrap_or_default();
            let ours = image.split(':').next() == Some("apollo");
            let Some(program) = argv.first().filter(|_| ours) else {
                assert!(
                    !argv.first().is_some_and(|p| p.starts_with("apollo-")),
                    "{}: runs {argv:?} from image {image}, not the apollo image",
                    w.name
                );
                continue;
            };
            let program = program.as_str();
            let who = format!("{} {}/{}", w.kind, w.name, c.name);
            match program {
                GATEWAY => {
                    let argv = argv_with_env(&apollo_gateway::Args::command(), &argv, &env)
                        .unwrap_or_else(|e| panic!("{who}: {e}"));
                    let mut args = apollo_gateway::Args::try_parse_from(&argv)
                        .unwrap_or_else(|e| panic!("{who}: {argv:?}\n{e}"));
                    let secret = args
                        .auth_secret_file
                        .clone()
                        .unwrap_or_else(|| panic!("{who}: no --auth-secret-file"));
                    assert_secret_mounted(&w, &c, &secret);
                    args.auth_secret_file = Some(stand_in_secret(secrets.path(), "gateway-key"));
                    let settings = apollo_gateway::Settings::from_args(&args)
                        .unwrap_or_else(|e| panic!("{who}: {e}"));
                    assert_eq!(
                        settings.ordinal, 0,
                        "{who}: ordinal from pod {}",
                        w.pod_name
                    );
                    assert_eq!(
                        settings.advertise_addr,
                        format!("{SAMPLE_POD_IP}:{}", args.listen.port()),
                        "{who}: routers must dial the pod IP on the device API port"
                    );
                    assert_eq!(settings.lease_namespace, NAMESPACE, "{who}");
                    assert_eq!(named_port(&c, "http"), Some(args.listen.port()), "{who}");
                    assert_probes_hit_admin(&w, &c, args.admin_listen.port());
                    let url = args.redis_url.as_deref().expect("gateways share Redis");
                    assert_redis_is_the_rendered_service(&who, url);
                    assert_exports_traces_to_jaeger(&who, &env, "apollo-jaeger");
                }
                ROUTER => {
                    let argv = argv_with_env(&apollo_router::Args::command(), &argv, &env)
                        .unwrap_or_else(|e| panic!("{who}: {e}"));
                    let args = apollo_router::Args::try_parse_from(&argv)
                        .unwrap_or_else(|e| panic!("{who}: {argv:?}\n{e}"));
                    assert_eq!(named_port(&c, "http"), Some(args.listen.port()), "{who}");
                    assert_probes_hit_admin(&w, &c, args.admin_listen.port());
                    assert_redis_is_the_rendered_service(&who, &args.redis_url);
                    assert_exports_traces_to_jaeger(&who, &env, "apollo-jaeger");
                }
                CONTROLLER => {
                    let argv = argv_with_env(&apollo_controller::Args::command(), &argv, &env)
                        .unwrap_or_else(|e| panic!("{who}: {e}"));
                    let args = apollo_controller::Args::try_parse_from(&argv)
                        .unwrap_or_else(|e| panic!("{who}: {argv:?}\n{e}"));
                    args.validate().unwrap_or_else(|e| panic!("{who}: {e}"));
                    assert_eq!(args.lease_namespace.as_deref(), Some(NAMESPACE), "{who}");
                    assert_probes_hit_admin(&w, &c, args.admin_listen.port());
                    assert_exports_traces_to_jaeger(&who, &env, "apollo-jaeger");
                }
                other => panic!("{who}: runs {other}, which this test does not know"),
            }
            *parsed.entry(program_name(program)).or_default() += 1;
        }
    }
    assert_eq!(
        parsed,
        BTreeMap::from([(CONTROLLER, 1), (GATEWAY, 1), (ROUTER, 1)]),
        "one workload per component"
    );
}

fn program_name(p: &str) -> &'static str {
    [GATEWAY, ROUTER, CONTROLLER, AGENT, KUBESIM]
        .into_iter()
        .find(|n| *n == p)
        .unwrap_or("other")
}

/// The directory of `file` is mounted from a Secret volume.
fn assert_secret_mounted(w: &Workload, c: &Container, file: &Path) {
    let dir = file.parent().expect("secret file in a directory");
    let mount = c
        .volume_mounts
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|m| Path::new(&m.mount_path) == dir)
        .unwrap_or_else(|| panic!("{}: nothing mounted at {}", w.name, dir.display()));
    let volumes = w
        .template
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    let volume = volumes
        .iter()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("{}: no volume {}", w.name, mount.name));
    assert!(
        volume.secret.is_some(),
        "{}: {} must come from a Secret",
        w.name,
        dir.display()
    );
}

#[test]
fn services_select_a_workload_and_name_its_ports() {
    let workloads = workloads();
    let services = objects::<Service>("Service");
    assert!(services.len() >= 4, "gateway, router, redis and jaeger");
    for svc in services {
        let name = svc.metadata.name.clone().unwrap_or_default();
        let spec = svc.spec.expect("service spec");
        let selector = spec.selector.clone().unwrap_or_default();
        assert!(!selector.is_empty(), "Service {name} selects nothing");
        let selected: Vec<&Workload> = workloads
            .iter()
            .filter(|w| {
                let labels = w
                    .template
                    .metadata
                    .as_ref()
                    .and_then(|m| m.labels.clone())
                    .unwrap_or_default();
                selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .collect();
        assert_eq!(
            selected.len(),
            1,
            "Service {name} must select exactly one workload"
        );
        let w = selected[0];
        let container_ports: BTreeMap<String, i32> = containers(w)
            .iter()
            .flat_map(|c| c.ports.clone().unwrap_or_default())
            .map(|p| (p.name.unwrap_or_default(), p.container_port))
            .collect();
        for port in spec.ports.unwrap_or_default() {
            match serde_json::to_value(&port.target_port).expect("targetPort") {
                Value::String(named) => assert!(
                    container_ports.contains_key(&named),
                    "Service {name}: targetPort {named} is not a port of {}",
                    w.name
                ),
                Value::Null => assert!(
                    container_ports.values().any(|p| *p == port.port),
                    "Service {name}: port {} is not a container port of {}",
                    port.port,
                    w.name
                ),
                Value::Number(n) => assert!(
                    container_ports
                        .values()
                        .any(|p| Some(i64::from(*p)) == n.as_i64()),
                    "Service {name}: targetPort {n} is not a container port of {}",
                    w.name
                ),
                other => panic!("Service {name}: targetPort {other}"),
            }
        }
    }
    // The gateway StatefulSet's pods get stable DNS names from a headless Service.
    let sts = objects::<StatefulSet>("StatefulSet");
    let gateway = sts
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(GATEWAY))
        .expect("gateway StatefulSet");
    let governing = gateway.spec.as_ref().expect("spec").service_name.clone();
    let governing = governing.expect("serviceName");
    assert_eq!(
        service(&governing)
            .spec
            .and_then(|s| s.cluster_ip)
            .as_deref(),
        Some("None"),
        "the gateway's governing Service must be headless"
    );
}

// ---------------------------------------------------------------------------------------------
// RBAC.
// ---------------------------------------------------------------------------------------------

/// Where a rule applies: every namespace, or one.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    Cluster,
    Namespace(String),
}

#[derive(Debug)]
struct Grant {
    scope: Scope,
    rule: PolicyRule,
}

/// The rules bound to service account `sa` of the install namespace.
fn grants_of(sa: &str) -> Vec<Grant> {
    let cluster_roles = objects::<ClusterRole>("ClusterRole");
    let roles = objects::<Role>("Role");
    let binds_sa = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount" && s.name == sa && s.namespace.as_deref() == Some(NAMESPACE)
        })
    };
    let cluster_role_rules = |name: &str| -> Vec<PolicyRule> {
        cluster_roles
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("a binding names the missing ClusterRole {name}"))
            .rules
            .clone()
            .unwrap_or_default()
    };
    let mut grants = Vec::new();
    for b in objects::<ClusterRoleBinding>("ClusterRoleBinding") {
        if binds_sa(&b.subjects) {
            assert_eq!(b.role_ref.kind, "ClusterRole");
            for rule in cluster_role_rules(&b.role_ref.name) {
                grants.push(Grant {
                    scope: Scope::Cluster,
                    rule,
                });
            }
        }
    }
    for b in objects::<RoleBinding>("RoleBinding") {
        if !binds_sa(&b.subjects) {
            continue;
        }
        let ns = b.metadata.namespace.clone().expect("RoleBinding namespace");
        let rules = match b.role_ref.kind.as_str() {
            "ClusterRole" => cluster_role_rules(&b.role_ref.name),
            "Role" => roles
                .iter()
                .find(|r| {
                    r.metadata.name.as_deref() == Some(b.role_ref.name.as_str())
                        && r.metadata.namespace.as_deref() == Some(ns.as_str())
                })
                .unwrap_or_else(|| {
                    panic!("a binding names the missing Role {ns}/{}", b.role_ref.name)
                })
                .rules
                .clone()
                .unwrap_or_default(),
            other => panic!("roleRef kind {other}"),
        };
        for rule in rules {
            grants.push(Grant {
                scope: Scope::Namespace(ns.clone()),
                rule,
            });
        }
    }
    grants
}

/// Whether `grants` allow `verb` on `group`/`resource` everywhere `scope` covers.
fn allows(grants: &[Grant], group: &str, resource: &str, verb: &str, scope: &Scope) -> bool {
    grants.iter().any(|g| {
        let covers = g.scope == Scope::Cluster || &g.scope == scope;
        let r = &g.rule;
        covers
            && r.resource_names.is_none()
            && r.api_groups
                .iter()
                .flatten()
                .any(|x| x == group || x == "*")
            && r.resources
                .iter()
                .flatten()
                .any(|x| x == resource || x == "*")
            && r.verbs.iter().any(|x| x == verb || x == "*")
    })
}

type Need = (&'static str, &'static str, &'static [&'static str]);

fn assert_needs(sa: &str, grants: &[Grant], needs: &[Need], scope: &Scope) {
    for (group, resource, verbs) in needs {
        for verb in *verbs {
            assert!(
                allows(grants, group, resource, verb, scope),
                "{sa} cannot {verb} {group}/{resource} in {scope:?}"
            );
        }
    }
}

/// DeviceProcesses and the deployments live in any namespace, so these grants are cluster-wide.
const GATEWAY_CLUSTER_NEEDS: &[Need] = &[
    ("azure.com", "deviceprocesses", &["get", "list", "watch"]),
    ("azure.com", "deviceprocesses/status", &["patch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
];
/// Shard Leases: only in the gateway's own namespace.
const GATEWAY_LEASE_NEEDS: &[Need] = &[(
    "coordination.k8s.io",
    "leases",
    &["get", "create", "update"],
)];
const CONTROLLER_CLUSTER_NEEDS: &[Need] = &[
    (
        "azure.com",
        "deviceprocessdeployments",
        &["get", "list", "watch"],
    ),
    ("azure.com", "deviceprocessdeployments/status", &["patch"]),
    (
        "azure.com",
        "deviceprocesses",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    ("azure.com", "networkswitches", &["get", "list", "watch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
];
const CONTROLLER_LEASE_NEEDS: &[Need] = &[(
    "coordination.k8s.io",
    "leases",
    &["get", "create", "update"],
)];

#[test]
fn rbac_grants_each_component_what_it_calls_and_the_router_nothing() {
    let own = Scope::Namespace(NAMESPACE.to_owned());

    let gateway = grants_of(GATEWAY);
    assert_needs(GATEWAY, &gateway, GATEWAY_CLUSTER_NEEDS, &Scope::Cluster);
    assert_needs(GATEWAY, &gateway, GATEWAY_LEASE_NEEDS, &own);
    // The gateway projects status; the spec belongs to the controller and to operators.
    for verb in ["create", "update", "patch", "delete"] {
        assert!(
            !allows(&gateway, "azure.com", "deviceprocesses", verb, &own),
            "the gateway must not {verb} DeviceProcesses"
        );
    }
    for (group, resource) in [
        ("azure.com", "deviceprocessdeployments"),
        ("azure.com", "networkswitches"),
        ("", "secrets"),
    ] {
        assert!(
            !allows(&gateway, group, resource, "get", &own),
            "the gateway has no business reading {resource}"
        );
    }
    assert!(
        !allows(
            &gateway,
            "coordination.k8s.io",
            "leases",
            "get",
            &Scope::Namespace("kube-system".into())
        ),
        "shard Leases are namespaced to the install namespace"
    );

    let controller = grants_of(CONTROLLER);
    assert_needs(
        CONTROLLER,
        &controller,
        CONTROLLER_CLUSTER_NEEDS,
        &Scope::Cluster,
    );
    assert_needs(CONTROLLER, &controller, CONTROLLER_LEASE_NEEDS, &own);
    assert!(
        !allows(
            &controller,
            "azure.com",
            "deviceprocesses/status",
            "patch",
            &own
        ),
        "DeviceProcess status is the gateway's to write"
    );

    // The router reads membership from Redis and never talks to Kubernetes.
    assert!(
        grants_of(ROUTER).is_empty(),
        "the router must have no RBAC grants"
    );
    let router_sa = objects::<ServiceAccount>("ServiceAccount")
        .into_iter()
        .find(|s| s.metadata.name.as_deref() == Some(ROUTER))
        .expect("router ServiceAccount");
    assert_eq!(router_sa.automount_service_account_token, Some(false));
    let router_pods = workloads()
        .into_iter()
        .find(|w| w.name == ROUTER)
        .expect("router workload");
    let spec = router_pods.template.spec.expect("pod spec");
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(spec.service_account_name.as_deref(), Some(ROUTER));

    // Every workload runs as a ServiceAccount of the render, and no rule uses a wildcard.
    let accounts: BTreeSet<String> = objects::<ServiceAccount>("ServiceAccount")
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
    for w in workloads() {
        if let Some(sa) = w
            .template
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
        {
            assert!(
                accounts.contains(&sa),
                "{} runs as missing ServiceAccount {sa}",
                w.name
            );
        }
    }
    let rules = objects::<ClusterRole>("ClusterRole")
        .into_iter()
        .flat_map(|r| r.rules.unwrap_or_default())
        .chain(
            objects::<Role>("Role")
                .into_iter()
                .flat_map(|r| r.rules.unwrap_or_default()),
        );
    for rule in rules {
        let all = rule
            .verbs
            .iter()
            .chain(rule.resources.iter().flatten())
            .chain(rule.api_groups.iter().flatten());
        assert!(all.into_iter().all(|x| x != "*"), "wildcard in {rule:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The kustomization and the generated CRDs.
// ---------------------------------------------------------------------------------------------

#[test]
fn kustomization_lists_every_generated_crd() {
    let deploy = repo_root().join("deploy");
    let text = std::fs::read_to_string(deploy.join("kustomization.yaml")).expect("kustomization");
    let k: Value = serde_saphyr::from_str(&text).expect("parse kustomization.yaml");
    let resources: BTreeSet<String> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("resource path").to_owned())
        .collect();
    for r in &resources {
        assert!(deploy.join(r).is_file(), "kustomization lists missing {r}");
    }
    let crd_files: BTreeSet<String> = std::fs::read_dir(deploy.join("crds"))
        .expect("deploy/crds")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .map(|n| format!("crds/{n}"))
        .collect();
    assert_eq!(
        crd_files.len(),
        apollo_crds::all_crds().len(),
        "crdgen output in deploy/crds"
    );
    let missing: Vec<&String> = crd_files.difference(&resources).collect();
    assert!(
        missing.is_empty(),
        "kustomization.yaml does not list {missing:?}"
    );
    let rendered_crds = rendered()
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .count();
    assert_eq!(rendered_crds, crd_files.len());
}

// ---------------------------------------------------------------------------------------------
// docker-compose.yaml.
// ---------------------------------------------------------------------------------------------

fn compose() -> &'static Value {
    static COMPOSE: OnceLock<Value> = OnceLock::new();
    COMPOSE.get_or_init(|| {
        let text = std::fs::read_to_string(repo_root().join("docker-compose.yaml"))
            .expect("docker-compose.yaml");
        // Anchors and `<<` merge keys are expanded here as docker compose expands them.
        serde_saphyr::from_str(&text).expect("parse docker-compose.yaml")
    })
}

fn services() -> &'static serde_json::Map<String, Value> {
    compose()["services"].as_object().expect("services")
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Null => Vec::new(),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        other => panic!("expected a list (exec form), got {other}"),
    }
}

fn compose_env(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Null => BTreeMap::new(),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect(),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                let s = i.as_str().expect("KEY=VALUE");
                let (k, v) = s.split_once('=').unwrap_or((s, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        other => panic!("environment: {other}"),
    }
}

/// `(source, target)` of each short-syntax volume entry (`src:target[:mode]`).
fn compose_mounts(service: &Value) -> Vec<(String, String)> {
    strings(&service["volumes"])
        .into_iter()
        .map(|v| {
            let mut parts = v.splitn(3, ':');
            let src = parts.next().unwrap_or_default().to_owned();
            let target = parts
                .next()
                .unwrap_or_else(|| panic!("volume {v}"))
                .to_owned();
            (src, target)
        })
        .collect()
}

/// Where `container_path` of `service` lives on this machine: bind mounts resolve against the
/// repository, named volumes against `volumes` (one directory per volume name).
fn host_path(service: &Value, container_path: &str, volumes: &Path) -> Option<PathBuf> {
    let mounts = compose_mounts(service);
    let (src, target) = mounts
        .iter()
        .filter(|(_, t)| {
            container_path == t.as_str() || container_path.starts_with(&format!("{t}/"))
        })
        .max_by_key(|(_, t)| t.len())?;
    let rest = container_path[target.len()..].trim_start_matches('/');
    let base = if src.starts_with("./") || src.starts_with('/') {
        repo_root().join(src)
    } else {
        volumes.join(src)
    };
    Some(if rest.is_empty() {
        base
    } else {
        base.join(rest)
    })
}

/// The named volume that holds `container_path` in `service`.
fn volume_of(service: &Value, container_path: &str) -> Option<String> {
    compose_mounts(service)
        .into_iter()
        .filter(|(src, t)| {
            !src.starts_with('.')
                && !src.starts_with('/')
                && container_path.starts_with(&format!("{t}/"))
        })
        .max_by_key(|(_, t)| t.len())
        .map(|(src, _)| src)
}

fn flag_value(argv: &[String], flag: &str) -> Option<String> {
    let prefix = format!("{flag}=");
    argv.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix(&prefix)
            .map(str::to_owned)
            .or_else(|| (a == flag).then(|| argv.get(i + 1).cloned()).flatten())
    })
}

/// Everything the compose file says about how its services reach each other.
#[test]
fn compose_services_use_flags_our_binaries_accept() {
    let stand_ins = tempfile::tempdir().expect("tempdir");
    let services = services();
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();

    // The image our services run is built here, from deploy/Dockerfile's dev target.
    let builders: Vec<(&String, &Value)> = services
        .iter()
        .filter(|(_, s)| !s["build"].is_null())
        .collect();
    assert_eq!(
        builders.len(),
        1,
        "one service builds the image, the others reuse it"
    );
    let (_, builder) = builders[0];
    let our_image = builder["image"].as_str().expect("the built image's tag");
    let dockerfile = repo_root().join(builder["build"]["dockerfile"].as_str().expect("dockerfile"));
    let dockerfile_text = std::fs::read_to_string(&dockerfile).expect("read the Dockerfile");
    let target = builder["build"]["target"].as_str().expect("build target");
    assert!(
        dockerfile_text
            .lines()
            .any(|l| l.starts_with("FROM ") && l.ends_with(&format!(" AS {target}"))),
        "{} has no stage {target}",
        dockerfile.display()
    );

    let kubesim = &services[KUBESIM];
    let kubesim_argv = strings(&kubesim["command"]);
    let kubeconfig = flag_value(&kubesim_argv, "--kubeconfig-out").expect("--kubeconfig-out");
    let kubeconfig_volume = volume_of(kubesim, &kubeconfig).expect("kubeconfig on a named volume");

    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut gateway_ordinals = BTreeSet::new();
    let mut agent_devices = BTreeSet::new();
    let mut router_endpoint: Option<(String, u16)> = None;
    let mut agent_urls = Vec::new();
    for (name, svc) in services {
        for dep in svc["depends_on"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.keys())
        {
            assert!(
                names.contains(dep.as_str()),
                "{name} depends on unknown service {dep}"
            );
        }
        for port in strings(&svc["ports"]) {
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name} publishes {port} beyond loopback"
            );
        }
        let argv = strings(&svc["command"]);
        let Some(program) = argv
            .first()
            .map(|p| program_name(p))
            .filter(|p| *p != "other")
        else {
            continue;
        };
        assert_eq!(
            svc["image"].as_str(),
            Some(our_image),
            "{name} runs {program}"
        );
        let env = compose_env(svc);
        let who = format!("compose service {name}");
        let uses_kubeconfig = |env: &BTreeMap<String, String>| {
            assert_eq!(
                env.get("KUBECONFIG"),
                Some(&kubeconfig),
                "{who}: KUBECONFIG"
            );
            assert_eq!(
                volume_of(svc, &kubeconfig).as_deref(),
                Some(kubeconfig_volume.as_str()),
                "{who}: kubesim's kubeconfig volume is not mounted"
            );
        };
        match program {
            GATEWAY => {
                let argv = argv_with_env(&apollo_gateway::Args::command(), &argv, &env)
                    .unwrap_or_else(|e| panic!("{who}: {e}"));
                let mut args = apollo_gateway::Args::try_parse_from(&argv)
                    .unwrap_or_else(|e| panic!("{who}: {argv:?}\n{e}"));
                let secret = args.auth_secret_file.clone().expect("--auth-secret-file");
                assert!(
                    volume_of(svc, &secret.to_string_lossy()).is_some(),
                    "{who}: the HMAC key is not on a mounted volume"
                );
                args.auth_secret_file = Some(stand_in_secret(stand_ins.path(), "key"));
                let settings = apollo_gateway::Settings::from_args(&args)
                    .unwrap_or_else(|e| panic!("{who}: {e}"));
                assert!(
                    gateway_ordinals.insert(settings.ordinal),
                    "{who}: ordinal taken twice"
                );
                assert_eq!(
                    settings.advertise_addr,
                    format!("{name}:{}", args.listen.port()),
                    "{who}: routers must dial this service's name on the device API port"
                );
                let (redis, _) = host_port_of_url(args.redis_url.as_deref().expect("redis"));
                assert!(
                    names.contains(redis.as_str()),
                    "{who}: Redis {redis} is no service"
                );
                uses_kubeconfig(&env);
                assert_exports_traces_to_jaeger(&who, &env, "jaeger");
            }
            ROUTER => {
                let argv = argv_with_env(&apollo_router::Args::command(), &argv, &env)
                    .unwrap_or_else(|e| panic!("{who}: {e}"));
                let args = apollo_router::Args::try_parse_from(&argv)
                    .unwrap_or_else(|e| panic!("{who}: {argv:?}\n{e}"));
                let (redis, _) = host_port_of_url(&args.redis_url);
                assert!(
                    names.contains(redis.as_str()),
                    "{who}: Redis {redis} is no service"
                );
                assert!(
                    !env.contains_key("KUBECONFIG"),
                    "{who}: the router never talks to Kubernetes"
                );
                assert_exports_traces_to_jaeger(&who, &env, "jaeger");
                router_endpoint = Some((name.clone(), args.listen.port()));
            }
            CONTROLLER => {
                let argv = argv_with_env(&apollo_controller::Args::command(), &argv, &env)
                    .unwrap_or_else(|e| panic!("{who}: {e}"));
                let args = apollo_controller::Args::try_parse_from(&argv)
                    .unwrap_or_else(|e| panic!("{who}: {argv:?}\n{e}"));
                args.validate().unwrap_or_else(|e| panic!("{who}: {e}"));
                uses_kubeconfig(&env);
                assert_exports_traces_to_jaeger(&who, &env, "jaeger");
            }
            AGENT => {
                assert_eq!(
                    argv.len(),
                    1,
                    "{who}: the agent is configured by its environment"
                );
                let known = [
                    ENV_DEVICE_NAME,
                    ENV_GATEWAY_URL,
                    ENV_DEVICE_TOKEN,
                    ENV_DEVICE_TOKEN_FILE,
                    ENV_POLL_WAIT_SECONDS,
                    ENV_HEARTBEAT_INTERVAL_SECONDS,
                    ENV_MIN_POLL_INTERVAL_MS,
                    ENV_REQUEST_TIMEOUT_SECONDS,
                    ENV_BACKOFF_BASE_MS,
                    ENV_BACKOFF_MAX_SECONDS,
                ];
                for var in env.keys().filter(|k| k.starts_with("APOLLO_")) {
                    assert!(
                        known.contains(&var.as_str()),
                        "{who}: the agent ignores {var}"
                    );
                }
                assert!(
                    !env.contains_key(ENV_DEVICE_TOKEN),
                    "{who}: tokens come from a file"
                );
                let token_file = env.get(ENV_DEVICE_TOKEN_FILE).expect("token file");
                assert!(
                    volume_of(svc, token_file).is_some(),
                    "{who}: the token file is not on a mounted volume"
                );
                let stand_in = stand_in_secret(stand_ins.path(), name);
                let get = |k: &str| env.get(k).cloned();
                let raw = RawConfig {
                    device_name: get(ENV_DEVICE_NAME),
                    gateway_url: get(ENV_GATEWAY_URL),
                    device_token: None,
                    device_token_file: Some(stand_in.to_string_lossy().into_owned()),
                    poll_wait_seconds: get(ENV_POLL_WAIT_SECONDS),
                    heartbeat_interval_seconds: get(ENV_HEARTBEAT_INTERVAL_SECONDS),
                    min_poll_interval_ms: get(ENV_MIN_POLL_INTERVAL_MS),
                    request_timeout_seconds: get(ENV_REQUEST_TIMEOUT_SECONDS),
                    backoff_base_ms: get(ENV_BACKOFF_BASE_MS),
                    backoff_max_seconds: get(ENV_BACKOFF_MAX_SECONDS),
                };
                let config = AgentConfig::from_raw(&raw).unwrap_or_else(|e| panic!("{who}: {e}"));
                let url = &config.gateway_url;
                agent_urls.push((
                    name.clone(),
                    url.host_str().unwrap_or_default().to_owned(),
                    url.port_or_known_default().unwrap_or_default(),
                ));
                agent_devices.insert(config.device_name.clone());
            }
            KUBESIM => {
                // kubesim's Args are private to its binary: let the binary parse them. clap
                // rejects unknown flags and bad values before it acts on --help.
                let mut cmd = Command::new(binary(KUBESIM));
                cmd.args(&argv[1..]).arg("--help");
                let out = cmd.output().expect("run kubesim --help");
                assert!(
                    out.status.success(),
                    "{who}: kubesim rejects {argv:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let listen = flag_value(&argv, "--listen").expect("--listen");
                let advertised = flag_value(&argv, "--advertise-url").expect("--advertise-url");
                assert_eq!(
                    advertised,
                    format!("http://{name}:{}", port_of(&listen)),
                    "{who}: the kubeconfig must name this service and its port"
                );
            }
            _ => unreachable!(),
        }
        *seen.entry(program).or_default() += 1;
    }
    assert_eq!(
        seen,
        BTreeMap::from([
            (AGENT, 2),
            (CONTROLLER, 1),
            (GATEWAY, 3),
            (KUBESIM, 1),
            (ROUTER, 1)
        ]),
        "DESIGN §1: kubesim, controller, gateway x3, router, agents"
    );
    assert_eq!(gateway_ordinals, BTreeSet::from([0, 1, 2]));
    let (router, router_port) = router_endpoint.expect("router");
    for (agent, host, port) in agent_urls {
        assert_eq!(
            (host.as_str(), port),
            (router.as_str(), router_port),
            "{agent} must use the router"
        );
    }
    assert_eq!(
        agent_devices,
        BTreeSet::from(["tor1-01".to_owned(), "tor1-02".to_owned()]),
        "one agent per seeded switch"
    );
    for (svc, needed) in [("redis", None), ("jaeger", Some("127.0.0.1:16686:16686"))] {
        let s = services
            .get(svc)
            .unwrap_or_else(|| panic!("no {svc} service"));
        if let Some(port) = needed {
            assert!(
                strings(&s["ports"]).iter().any(|p| p == port),
                "{svc} must publish {port}"
            );
        }
    }
}

/// The init step's script, run here as compose runs it (its container paths mapped onto temp
/// directories), writes the key the gateways read and tokens that key accepts, at the paths the
/// gateways and agents are configured with.
#[test]
fn compose_init_writes_the_key_gateways_read_and_tokens_they_accept() {
    let openssl = Command::new("openssl").arg("version").output();
    assert!(
        openssl.is_ok_and(|o| o.status.success()),
        "the init step computes tokens with the openssl CLI (in the image through ca-certificates); \
         install Debian's openssl package to run this test"
    );
    let volumes = tempfile::tempdir().expect("tempdir");
    let services = services();
    let init = &services["init"];
    let argv = strings(&init["command"]);
    assert_eq!(
        argv.first().map(String::as_str),
        Some("sh"),
        "init runs a shell script"
    );
    let script = host_path(init, &argv[1], volumes.path()).expect("the script is bind-mounted");
    assert!(script.is_file(), "{} missing", script.display());
    let env = compose_env(init);
    let run_init = || {
        let mut cmd = Command::new("sh");
        cmd.arg(&script);
        for (k, v) in &env {
            // Container paths become their host directories; other values pass unchanged.
            let value = if v.starts_with('/') {
                host_path(init, v, volumes.path())
                    .unwrap_or_else(|| panic!("init's {k}={v} is on no volume"))
                    .to_string_lossy()
                    .into_owned()
            } else {
                v.clone()
            };
            cmd.env(k, value);
        }
        // As a non-root test user the script skips its chown; as root it hands the files to 65532.
        let out = cmd.output().expect("run the init script");
        assert!(
            out.status.success(),
            "init failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run_init();

    let gateway = &services["gateway-0"];
    let key_path =
        flag_value(&strings(&gateway["command"]), "--auth-secret-file").expect("key flag");
    let key_file = host_path(gateway, &key_path, volumes.path()).expect("key on a volume");
    let key_bytes = std::fs::read(&key_file).expect("init wrote the key the gateway reads");
    let key = key_from_secret_file(&key_bytes);
    assert!(key.len() >= 32, "a real key, not a placeholder");

    let mut checked = 0;
    for (name, svc) in services {
        if strings(&svc["command"]).first().map(String::as_str) != Some(AGENT) {
            continue;
        }
        let env = compose_env(svc);
        let device = &env[ENV_DEVICE_NAME];
        let token_file = host_path(svc, &env[ENV_DEVICE_TOKEN_FILE], volumes.path())
            .unwrap_or_else(|| panic!("{name}: token file on no volume"));
        let token = std::fs::read_to_string(&token_file).unwrap_or_else(|e| {
            panic!(
                "{name}: init wrote no token at {}: {e}",
                token_file.display()
            )
        });
        assert!(
            verify_device_token(&key, device, &token),
            "{name}: token refused"
        );
        assert!(
            !verify_device_token(&key, "some-other-device", &token),
            "{name}: a token is bound to one device"
        );
        checked += 1;
    }
    assert_eq!(checked, 2, "both agents");

    // A second `docker compose up` keeps the key, so running agents keep working.
    run_init();
    assert_eq!(std::fs::read(&key_file).expect("key"), key_bytes);
}

/// The seed steps (kubectl services, in dependency order) against kubesim with the real kubectl:
/// the CRDs install and become Established, and the demo objects pass schema validation.
#[tokio::test]
async fn compose_seed_steps_apply_to_kubesim_with_real_kubectl() {
    let volumes = tempfile::tempdir().expect("tempdir");
    let services = services();
    let seed_chain = {
        let mut chain = vec!["seed".to_owned()];
        loop {
            let last = &services[chain.last().expect("non-empty").as_str()];
            let image = last["image"].as_str().unwrap_or_default();
            let deps: Vec<&String> = last["depends_on"]
                .as_object()
                .into_iter()
                .flat_map(|m| m.keys())
                .filter(|d| services[d.as_str()]["image"].as_str() == Some(image))
                .collect();
            match deps.as_slice() {
                [] => break,
                [one] => chain.push((*one).clone()),
                many => panic!("kubectl steps fan in: {many:?}"),
            }
        }
        chain.reverse();
        chain
    };
    assert_eq!(seed_chain, ["crds", "crds-ready", "seed"]);

    let sim = KubeSimProc::start().await;
    let mut steps = seed_chain.clone();
    steps.push("kubectl".to_owned());
    for step in &steps {
        let svc = &services[step.as_str()];
        assert_eq!(strings(&svc["entrypoint"]), ["kubectl"], "{step}");
        let args: Vec<String> = strings(&svc["command"])
            .into_iter()
            .map(|a| match host_path(svc, &a, volumes.path()) {
                Some(p) if a.starts_with('/') => p.to_string_lossy().into_owned(),
                _ => a,
            })
            .collect();
        let out = sim.kubectl(&args).await;
        assert!(
            out.status.success(),
            "step {step}: kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let json = |out: std::process::Output| -> Value {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("kubectl json")
    };
    let dpd = json(
        sim.kubectl(["get", "dpd", "demo-logger", "-o", "json"])
            .await,
    );
    let selector: Vec<String> = dpd["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    let selected = json(
        sim.kubectl(["get", "nsw", "-l", &selector.join(","), "-o", "json"])
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
}
