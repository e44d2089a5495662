//! `docker-compose.yaml` read as docker compose reads it, checked without a Docker engine: every
//! Apollo command line (environment included) is parsed by the binary's own clap types, each
//! component that talks to Kubernetes uses the kubeconfig of its own ServiceAccount and never the
//! admin's credentials, and the control plane is the one tools/kube builds for the tests (same
//! versions) with flags its own binaries accept and the settings Apollo relies on (RBAC, an audit
//! log, the controllers it needs). The init step: deploy_compose_init.rs; the control plane and
//! the bootstrap steps run for real: deploy_compose_stack.rs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use apollo_agent::config::{
    ENV_BACKOFF_BASE, ENV_BACKOFF_BASE_MS, ENV_BACKOFF_MAX, ENV_BACKOFF_MAX_SECONDS,
    ENV_DEVICE_NAME, ENV_DEVICE_TOKEN, ENV_DEVICE_TOKEN_FILE, ENV_GATEWAY_URL,
    ENV_HEARTBEAT_INTERVAL, ENV_HEARTBEAT_INTERVAL_SECONDS, ENV_MIN_POLL_INTERVAL,
    ENV_MIN_POLL_INTERVAL_MS, ENV_POLL_WAIT, ENV_POLL_WAIT_SECONDS, ENV_REQUEST_TIMEOUT,
    ENV_REQUEST_TIMEOUT_SECONDS,
};
use apollo_agent::{AgentConfig, RawConfig};
use clap::{CommandFactory, Parser};
use serde_json::Value;

use common::compose::{
    apollo_image_user, argv, compose_env, compose_mounts, depends_on, depends_transitively,
    effective_user, mount_of, running, service, services, strings, volume_of,
};
use common::render::service_account_running;
use common::{
    argv_with_env, assert_exports_traces_to_jaeger, etcd_version, flag_value, host_port_of_url,
    kube_bin_dir, kube_version, port_of, program_name, repo_root, stand_in_secret, AGENT,
    CONTROLLER, ETCD, GATEWAY, KUBE_APISERVER, KUBE_CONTROLLER_MANAGER, NAMESPACE,
    REQUIRED_KCM_CONTROLLERS, ROUTER,
};

/// The image our services run, built by exactly one service from deploy/Dockerfile.
fn our_image() -> &'static str {
    let builders: Vec<(&String, &Value)> = services()
        .iter()
        .filter(|(_, s)| !s["build"].is_null())
        .collect();
    assert_eq!(
        builders.len(),
        1,
        "one service builds the image, the others reuse it"
    );
    let (_, builder) = builders[0];
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
    builder["image"].as_str().expect("the built image's tag")
}

/// Named volumes that hold cluster-admin power: the PKI (CA key, admin and controller-manager
/// keys, service-account signing key) and the admin kubeconfig the kubectl steps use.
fn credential_volumes() -> BTreeSet<String> {
    let (_, apiserver) = running(KUBE_APISERVER);
    let ca = flag_value(&argv(apiserver), "--client-ca-file").expect("--client-ca-file");
    let seed = service("seed");
    let admin = compose_env(seed)
        .get("KUBECONFIG")
        .cloned()
        .expect("the seed step's KUBECONFIG");
    [
        volume_of(apiserver, &ca).expect("the CA on a named volume"),
        volume_of(seed, &admin).expect("the admin kubeconfig on a named volume"),
    ]
    .into()
}

/// Everything the compose file says about how Apollo's services reach each other and Kubernetes.
#[test]
fn compose_services_use_flags_our_binaries_accept() {
    let stand_ins = tempfile::tempdir().expect("tempdir");
    let services = services();
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    let our_image = our_image();

    // Identities: the tokens step writes <dir>/<ServiceAccount>/kubeconfig for the accounts of
    // deploy/rbac, which the rbac step applied into the install namespace.
    let tokens = service("tokens");
    let tokens_env = compose_env(tokens);
    let identity_dir = tokens_env["APOLLO_IDENTITY_DIR"].clone();
    let accounts: BTreeSet<&str> = tokens_env["APOLLO_SERVICE_ACCOUNTS"]
        .split_whitespace()
        .collect();
    assert_eq!(tokens_env["APOLLO_NAMESPACE"], NAMESPACE);
    assert_eq!(
        flag_value(&argv(service("rbac")), "--namespace").as_deref(),
        Some(NAMESPACE),
        "the rbac step applies deploy/rbac into the namespace the tokens step asks"
    );
    let credentials = credential_volumes();
    let mut identity_volumes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();

    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut gateway_ordinals = BTreeSet::new();
    let mut agent_devices = BTreeSet::new();
    let mut router_endpoint: Option<(String, u16)> = None;
    let mut agent_urls = Vec::new();
    for (name, svc) in services {
        for dep in depends_on(name).into_keys() {
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
        let argv = argv(svc);
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
        for m in compose_mounts(svc) {
            assert!(
                !credentials.contains(&m.source),
                "{who} mounts volume {}, which holds cluster-admin credentials",
                m.source
            );
        }
        let mut uses_identity = |program: &str, env: &BTreeMap<String, String>| {
            let account = service_account_running(program);
            assert!(
                accounts.contains(account.as_str()),
                "{who}: the tokens step makes no kubeconfig for {account}"
            );
            let kubeconfig = format!("{identity_dir}/{account}/kubeconfig");
            assert_eq!(env.get("KUBECONFIG"), Some(&kubeconfig), "{who}");
            let volume = volume_of(svc, &kubeconfig)
                .unwrap_or_else(|| panic!("{who}: {kubeconfig} is on no volume"));
            assert_eq!(
                Some(&volume),
                volume_of(tokens, &kubeconfig).as_ref(),
                "{who}: not the volume the tokens step writes {account}'s kubeconfig to"
            );
            assert!(
                mount_of(svc, &kubeconfig).is_some_and(|m| m.read_only),
                "{who}: mount its identity read-only"
            );
            assert!(
                depends_transitively(name, "tokens"),
                "{who} must start after the tokens step"
            );
            identity_volumes.entry(volume).or_default().insert(account);
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
                assert_eq!(
                    settings.lease_namespace, NAMESPACE,
                    "{who}: shard Leases where its Role allows them"
                );
                let (redis, _) = host_port_of_url(args.redis_url.as_deref().expect("redis"));
                assert!(
                    names.contains(redis.as_str()),
                    "{who}: Redis {redis} is no service"
                );
                uses_identity(GATEWAY, &env);
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
                assert_eq!(
                    args.lease_namespace.as_deref(),
                    Some(NAMESPACE),
                    "{who}: the leader Lease where its Role allows it"
                );
                assert!(
                    depends_transitively(name, KUBE_CONTROLLER_MANAGER),
                    "{who}: deleting a deployment relies on the garbage collector"
                );
                uses_identity(CONTROLLER, &env);
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
                    ENV_POLL_WAIT,
                    ENV_HEARTBEAT_INTERVAL,
                    ENV_MIN_POLL_INTERVAL,
                    ENV_REQUEST_TIMEOUT,
                    ENV_BACKOFF_BASE,
                    ENV_BACKOFF_MAX,
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
                assert!(
                    !env.contains_key("KUBECONFIG"),
                    "{who}: agents never talk to Kubernetes"
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
                    poll_wait: get(ENV_POLL_WAIT),
                    heartbeat_interval: get(ENV_HEARTBEAT_INTERVAL),
                    min_poll_interval: get(ENV_MIN_POLL_INTERVAL),
                    request_timeout: get(ENV_REQUEST_TIMEOUT),
                    backoff_base: get(ENV_BACKOFF_BASE),
                    backoff_max: get(ENV_BACKOFF_MAX),
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
            _ => unreachable!(),
        }
        *seen.entry(program).or_default() += 1;
    }
    assert_eq!(
        seen,
        BTreeMap::from([(AGENT, 2), (CONTROLLER, 1), (GATEWAY, 3), (ROUTER, 1)]),
        "DESIGN §1: controller, gateway x3, router, agents"
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

    // One identity per volume, and no other Apollo service reads a component's token.
    for (volume, users) in &identity_volumes {
        assert_eq!(users.len(), 1, "volume {volume} holds tokens of {users:?}");
        for (name, svc) in services {
            let program = argv(svc)
                .first()
                .map(|p| program_name(p))
                .unwrap_or("other");
            if compose_mounts(svc).iter().any(|m| &m.source == volume) && program != "other" {
                let account = service_account_running(program);
                assert!(
                    users.contains(&account),
                    "{name} ({account}) mounts {volume}, another component's identity"
                );
            }
        }
    }
    let used: BTreeSet<&str> = identity_volumes
        .values()
        .flatten()
        .map(String::as_str)
        .collect();
    assert_eq!(
        used, accounts,
        "every token the tokens step makes is used by a component"
    );

    // Whoever reads the files init wrote runs as the user init hands them to.
    let init_volumes: BTreeSet<String> = compose_mounts(service("init"))
        .into_iter()
        .filter(|m| m.is_named())
        .map(|m| m.source)
        .collect();
    let owner = apollo_image_user();
    assert_eq!(
        owner, "65532:65532",
        "init.sh's APOLLO_RUNTIME_OWNER default"
    );
    for (name, svc) in services {
        if compose_mounts(svc)
            .iter()
            .any(|m| init_volumes.contains(&m.source))
        {
            let user = effective_user(svc, our_image);
            assert!(
                user.as_deref() == Some(owner.as_str()) || user.as_deref() == Some("0:0"),
                "{name} reads init's files as {user:?}: set `user: \"{owner}\"`"
            );
        }
    }
    let jaeger_images: BTreeSet<String> = common::render::workloads()
        .iter()
        .flat_map(common::render::containers)
        .filter_map(|c| c.image)
        .filter(|i| i.contains("jaeger"))
        .collect();
    assert_eq!(
        jaeger_images,
        BTreeSet::from([service("jaeger")["image"]
            .as_str()
            .expect("image")
            .to_owned()]),
        "the same Jaeger in deploy/ and in compose"
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

/// `program --help` with `args` before it: the program's own flag parser rejects unknown flags
/// and malformed values before it acts on --help. Returns the help text.
fn parse_with_binary(who: &str, program: &str, args: &[String]) -> String {
    let out = Command::new(kube_bin_dir().join(program))
        .args(args)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{who}: {program} rejects {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A file the service reads from a read-only named volume that init writes at the same path.
fn assert_written_by_init(who: &str, svc: &Value, path: &str) {
    let m = mount_of(svc, path).unwrap_or_else(|| panic!("{who}: {path} is on no mount"));
    assert!(m.is_named() && m.read_only, "{who}: {path} on {m:?}");
    let init = mount_of(service("init"), path);
    assert!(
        init.as_ref()
            .is_some_and(|i| i.source == m.source && i.target == m.target),
        "{who}: init does not write {path} (init mounts {init:?})"
    );
}

#[test]
fn compose_control_plane_is_what_tools_kube_builds_with_the_flags_apollo_needs() {
    let kube = kube_version();
    let kubectl_image = format!("registry.k8s.io/kubectl:{kube}");
    for (program, image) in [
        (ETCD, format!("registry.k8s.io/etcd:{}-0", etcd_version())),
        (
            KUBE_APISERVER,
            format!("registry.k8s.io/kube-apiserver:{kube}"),
        ),
        (
            KUBE_CONTROLLER_MANAGER,
            format!("registry.k8s.io/kube-controller-manager:{kube}"),
        ),
    ] {
        let (name, svc) = running(program);
        assert_eq!(svc["image"].as_str(), Some(image.as_str()), "{name}");
        assert_eq!(
            svc["user"].as_str(),
            Some(apollo_image_user().as_str()),
            "{name}: non-root, the owner of init's files"
        );
    }
    let mut kubectl_steps = 0;
    for (name, svc) in services() {
        if strings(&svc["entrypoint"]) == ["kubectl"] {
            assert_eq!(
                svc["image"].as_str(),
                Some(kubectl_image.as_str()),
                "{name}"
            );
            kubectl_steps += 1;
        }
    }
    assert!(kubectl_steps >= 4, "crds, crds-ready, rbac, seed");
    let dockerfile = std::fs::read_to_string(repo_root().join("deploy/Dockerfile")).expect("read");
    assert!(
        dockerfile.contains(&format!("COPY --from={kubectl_image} ")),
        "the dev image's kubectl is the control plane's version"
    );

    // etcd: clients reach it by its service name.
    let (etcd_name, etcd) = running(ETCD);
    let etcd_argv = argv(etcd);
    parse_with_binary(etcd_name, ETCD, &etcd_argv[1..]);
    let data = flag_value(&etcd_argv, "--data-dir").expect("--data-dir");
    assert!(volume_of(etcd, &data).is_some(), "etcd's data on a volume");
    let listen = flag_value(&etcd_argv, "--listen-client-urls").expect("listen");
    let etcd_port = port_of(&listen);
    assert_eq!(listen, format!("http://0.0.0.0:{etcd_port}"));
    let advertised = format!("http://{etcd_name}:{etcd_port}");
    assert_eq!(
        flag_value(&etcd_argv, "--advertise-client-urls").as_deref(),
        Some(advertised.as_str())
    );

    // kube-apiserver: RBAC, an audit log, certificates from init.
    let (api_name, api) = running(KUBE_APISERVER);
    let api_argv = argv(api);
    parse_with_binary(api_name, KUBE_APISERVER, &api_argv[1..]);
    let flag = |f: &str| flag_value(&api_argv, f).unwrap_or_else(|| panic!("{api_name}: no {f}"));
    assert_eq!(flag("--etcd-servers"), advertised);
    let modes: Vec<String> = flag("--authorization-mode")
        .split(',')
        .map(str::to_owned)
        .collect();
    assert!(modes.iter().any(|m| m == "RBAC"), "{modes:?}");
    assert!(!modes.iter().any(|m| m == "AlwaysAllow"), "{modes:?}");
    let audit_log = flag("--audit-log-path");
    assert!(
        mount_of(api, &audit_log).is_some_and(|m| m.is_named() && !m.read_only),
        "{api_name}: the audit log on a writable volume"
    );
    let policy_path = flag("--audit-policy-file");
    let policy = common::compose::deploy_file(api, &policy_path);
    let policy: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(&policy).expect("read")).expect("yaml");
    assert_eq!(policy["apiVersion"], "audit.k8s.io/v1");
    assert_eq!(policy["kind"], "Policy");
    let last_rule = policy["rules"].as_array().and_then(|r| r.last()).cloned();
    assert_eq!(
        last_rule.map(|r| r["level"].clone()),
        Some(Value::from("Metadata")),
        "every other request is logged with who, verb and resource"
    );
    for file in [
        "--tls-cert-file",
        "--tls-private-key-file",
        "--client-ca-file",
        "--service-account-key-file",
        "--service-account-signing-key-file",
    ] {
        assert_written_by_init(api_name, api, &flag(file));
    }
    assert!(flag("--service-account-issuer").starts_with("https://"));
    let secure_port: u16 = flag("--secure-port").parse().expect("--secure-port");
    assert_eq!(
        compose_env(service("init")).get("APOLLO_APISERVER_URL"),
        Some(&format!("https://{api_name}:{secure_port}")),
        "the kubeconfigs init writes name this service and its port"
    );
    assert!(
        strings(&api["ports"]).contains(&format!("127.0.0.1:{secure_port}:{secure_port}")),
        "{api_name}: reachable from the host on 127.0.0.1"
    );
    assert_eq!(
        depends_on(api_name).get(etcd_name).map(String::as_str),
        Some("service_healthy")
    );

    // kube-controller-manager: its own certificate, the controllers Apollo relies on.
    let (kcm_name, kcm) = running(KUBE_CONTROLLER_MANAGER);
    let kcm_argv = argv(kcm);
    let help = parse_with_binary(kcm_name, KUBE_CONTROLLER_MANAGER, &kcm_argv[1..]);
    let known: BTreeSet<&str> = help
        .split("All controllers:")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .expect("the list of controllers in --help")
        .split(',')
        .map(str::trim)
        .collect();
    let flag = |f: &str| flag_value(&kcm_argv, f).unwrap_or_else(|| panic!("{kcm_name}: no {f}"));
    let controllers = flag("--controllers");
    let controllers: BTreeSet<&str> = controllers.split(',').collect();
    for c in &controllers {
        assert!(
            known.contains(c),
            "{kcm_name}: no controller {c} in {known:?}"
        );
    }
    for c in REQUIRED_KCM_CONTROLLERS {
        assert!(controllers.contains(c), "{kcm_name} must run {c}");
    }
    let kubeconfig = flag("--kubeconfig");
    assert_eq!(flag("--authentication-kubeconfig"), kubeconfig);
    assert_eq!(flag("--authorization-kubeconfig"), kubeconfig);
    assert_written_by_init(kcm_name, kcm, &kubeconfig);
    assert_eq!(flag("--use-service-account-credentials"), "true");
    assert_eq!(
        flag("--root-ca-file"),
        flag_value(&api_argv, "--client-ca-file").expect("CA")
    );
    assert_eq!(
        flag("--service-account-private-key-file"),
        flag_value(&api_argv, "--service-account-signing-key-file").expect("signing key")
    );
    assert_written_by_init(kcm_name, kcm, &flag("--root-ca-file"));
    assert!(
        depends_transitively(kcm_name, api_name),
        "{kcm_name} starts after {api_name}"
    );
}
