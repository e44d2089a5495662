//! `deploy/` as `kubectl apply -k deploy/` would install it, read offline: the real kubectl renders
//! the kustomization, every container command line of ours (environment included) is parsed by the
//! binary's own clap types, probes, ports and Services line up, and every generated CRD is listed.
//! (RBAC: deploy_rbac.rs; the render against the real apiserver: deploy_apply.rs.)

mod common;

use std::collections::{BTreeMap, BTreeSet};

use clap::{CommandFactory, Parser};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use serde_json::Value;

use common::render::{
    assert_probes_hit_admin, assert_redis_is_the_rendered_service, assert_secret_mounted,
    command_line, container_env, containers, named_port, objects, rendered, service, workloads,
    Workload,
};
use common::{
    argv_with_env, assert_exports_traces_to_jaeger, program_name, repo_root, stand_in_secret,
    CONTROLLER, GATEWAY, NAMESPACE, ROUTER, SAMPLE_POD_IP,
};

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
                    assert_probes_hit_admin(&w, &c, args.admin.listen.port());
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
                    assert_probes_hit_admin(&w, &c, args.admin.listen.port());
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
                    assert_probes_hit_admin(&w, &c, args.admin.listen.port());
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
