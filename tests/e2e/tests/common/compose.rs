//! `docker-compose.yaml`, parsed as docker compose reads it (anchors and `<<` merge keys expanded),
//! and its container paths mapped onto this machine.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

use super::repo_root;

pub fn compose() -> &'static Value {
    static COMPOSE: OnceLock<Value> = OnceLock::new();
    COMPOSE.get_or_init(|| {
        let text = std::fs::read_to_string(repo_root().join("docker-compose.yaml"))
            .expect("docker-compose.yaml");
        // Anchors and `<<` merge keys are expanded here as docker compose expands them.
        serde_saphyr::from_str(&text).expect("parse docker-compose.yaml")
    })
}

pub fn services() -> &'static serde_json::Map<String, Value> {
    compose()["services"].as_object().expect("services")
}

pub fn service(name: &str) -> &'static Value {
    services()
        .get(name)
        .unwrap_or_else(|| panic!("no compose service {name}"))
}

pub fn strings(v: &Value) -> Vec<String> {
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

/// What the container runs: `entrypoint` followed by `command` (exec form only). Services without
/// an entrypoint run the apollo image's empty ENTRYPOINT, i.e. their command.
pub fn argv(service: &Value) -> Vec<String> {
    let mut argv = strings(&service["entrypoint"]);
    argv.extend(strings(&service["command"]));
    argv
}

pub fn compose_env(service: &Value) -> BTreeMap<String, String> {
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

/// One short-syntax volume entry (`src:target[:mode]`).
#[derive(Debug, Clone)]
pub struct Mount {
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

impl Mount {
    /// A named volume (not a bind mount of a host path).
    pub fn is_named(&self) -> bool {
        !self.source.starts_with('.') && !self.source.starts_with('/')
    }
}

pub fn compose_mounts(service: &Value) -> Vec<Mount> {
    strings(&service["volumes"])
        .into_iter()
        .map(|v| {
            let mut parts = v.splitn(3, ':');
            let source = parts.next().unwrap_or_default().to_owned();
            let target = parts
                .next()
                .unwrap_or_else(|| panic!("volume {v}"))
                .to_owned();
            let read_only = parts.next() == Some("ro");
            Mount {
                source,
                target,
                read_only,
            }
        })
        .collect()
}

/// The mount of `service` that holds `container_path` (the deepest one).
pub fn mount_of(service: &Value, container_path: &str) -> Option<Mount> {
    compose_mounts(service)
        .into_iter()
        .filter(|m| {
            container_path == m.target || container_path.starts_with(&format!("{}/", m.target))
        })
        .max_by_key(|m| m.target.len())
}

/// Where `container_path` of `service` lives on this machine: bind mounts resolve against the
/// repository, named volumes against `volumes` (one directory per volume name).
pub fn host_path(service: &Value, container_path: &str, volumes: &Path) -> Option<PathBuf> {
    let m = mount_of(service, container_path)?;
    let rest = container_path[m.target.len()..].trim_start_matches('/');
    let base = if m.is_named() {
        volumes.join(&m.source)
    } else {
        repo_root().join(&m.source)
    };
    Some(if rest.is_empty() {
        base
    } else {
        base.join(rest)
    })
}

/// The named volume that holds `container_path` in `service`.
pub fn volume_of(service: &Value, container_path: &str) -> Option<String> {
    mount_of(service, container_path)
        .filter(Mount::is_named)
        .map(|m| m.source)
}

/// The services `name` depends on, with their conditions.
pub fn depends_on(name: &str) -> BTreeMap<String, String> {
    let deps = &service(name)["depends_on"];
    match deps {
        Value::Null => BTreeMap::new(),
        Value::Array(names) => names
            .iter()
            .map(|n| {
                (
                    n.as_str().expect("name").to_owned(),
                    "service_started".into(),
                )
            })
            .collect(),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                let condition = v["condition"].as_str().unwrap_or("service_started");
                (k.clone(), condition.to_owned())
            })
            .collect(),
        other => panic!("{name}: depends_on {other}"),
    }
}

/// Whether `from` waits for `to`, directly or through other services.
pub fn depends_transitively(from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.to_owned()];
    while let Some(s) = todo.pop() {
        for dep in depends_on(&s).into_keys() {
            if dep == to {
                return true;
            }
            if seen.insert(dep.clone()) {
                todo.push(dep);
            }
        }
    }
    false
}

/// One-shot steps: the services another one waits for with `service_completed_successfully`.
pub fn steps() -> BTreeSet<String> {
    services()
        .keys()
        .flat_map(|name| depends_on(name))
        .filter(|(_, condition)| condition == "service_completed_successfully")
        .map(|(dep, _)| dep)
        .collect()
}

/// The steps that lead to `last`, in the order compose runs them: from `last` back through the
/// steps it waits for, which must form one chain (no fan-in).
pub fn step_chain(last: &str) -> Vec<String> {
    let steps = steps();
    let mut chain = vec![last.to_owned()];
    loop {
        let current = chain.last().expect("non-empty").clone();
        let deps: Vec<String> = depends_on(&current)
            .into_keys()
            .filter(|d| steps.contains(d) && d != "init")
            .collect();
        match deps.as_slice() {
            [] => break,
            [one] => chain.push(one.clone()),
            many => panic!("steps fan in at {current}: {many:?}"),
        }
    }
    chain.reverse();
    chain
}

/// The one service running `program` (first word of entrypoint + command): its name and itself.
pub fn running(program: &str) -> (&'static str, &'static Value) {
    let found: Vec<(&String, &Value)> = services()
        .iter()
        .filter(|(_, s)| argv(s).first().map(String::as_str) == Some(program))
        .collect();
    assert_eq!(found.len(), 1, "one compose service runs {program}");
    (found[0].0.as_str(), found[0].1)
}

/// The apollo image's user (the last `USER` of deploy/Dockerfile's runtime stage).
pub fn apollo_image_user() -> String {
    let text =
        std::fs::read_to_string(repo_root().join("deploy/Dockerfile")).expect("deploy/Dockerfile");
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .map(|u| u.trim().to_owned())
        .expect("a USER in deploy/Dockerfile")
}

/// The user a service runs as: its `user`, else the apollo image's, else unknown (None).
pub fn effective_user(service: &Value, our_image: &str) -> Option<String> {
    match service["user"].as_str() {
        Some(u) => Some(u.to_owned()),
        None if service["image"].as_str() == Some(our_image) => Some(apollo_image_user()),
        None => None,
    }
}

/// Runs the compose `init` step's script as compose runs it, its container paths mapped onto
/// `volumes` (one directory per named volume). As root the script hands the files to uid 65532,
/// as another user it skips that.
pub fn run_init(volumes: &Path) {
    let openssl = Command::new("openssl").arg("version").output();
    assert!(
        openssl.is_ok_and(|o| o.status.success()),
        "the init step computes tokens and certificates with the openssl CLI (in the image \
         through ca-certificates); install Debian's openssl package to run this test"
    );
    let init = service("init");
    let argv = strings(&init["command"]);
    assert_eq!(
        argv.first().map(String::as_str),
        Some("sh"),
        "init runs a shell script"
    );
    let script = host_path(init, &argv[1], volumes).expect("the script is bind-mounted");
    assert!(script.is_file(), "{} missing", script.display());
    let mut cmd = Command::new("sh");
    cmd.arg(&script);
    for (k, v) in compose_env(init) {
        cmd.env(&k, map_paths("init", &k, &v, volumes));
    }
    let out = cmd.output().expect("run the init script");
    assert!(
        out.status.success(),
        "init failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An environment value of service `name` with every container path in it (space-separated
/// words starting with `/`) replaced by its host path; other words pass unchanged. A directory
/// that is no mount itself but holds mounts (e.g. `/var/lib/apollo/identity` above one volume
/// per component) becomes a directory of `volumes/.root-<name>` with those mounts linked in, as
/// the container sees it.
pub fn map_paths(name: &str, key: &str, value: &str, volumes: &Path) -> String {
    let svc = service(name);
    value
        .split(' ')
        .map(|word| {
            if !word.starts_with('/') {
                return word.to_owned();
            }
            if let Some(host) = host_path(svc, word, volumes) {
                return host.to_string_lossy().into_owned();
            }
            let below: Vec<Mount> = compose_mounts(svc)
                .into_iter()
                .filter(|m| m.target.starts_with(&format!("{word}/")))
                .collect();
            assert!(
                !below.is_empty(),
                "{name}: {key}={value}: {word} is on no volume"
            );
            let root = volumes.join(format!(".root-{name}"));
            for m in below {
                let source = host_path(svc, &m.target, volumes).expect("a mount");
                std::fs::create_dir_all(&source).expect("create the volume's directory");
                let link = root.join(m.target.trim_start_matches('/'));
                std::fs::create_dir_all(link.parent().expect("parent")).expect("create dirs");
                if !link.exists() {
                    std::os::unix::fs::symlink(&source, &link).expect("link a mount");
                }
            }
            root.join(word.trim_start_matches('/'))
                .to_string_lossy()
                .into_owned()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Host path of a file the kubectl steps name (their bind mounts of deploy/).
pub fn deploy_file(service: &Value, container_path: &str) -> PathBuf {
    let m = mount_of(service, container_path)
        .unwrap_or_else(|| panic!("{container_path} is on no mount"));
    assert!(
        !m.is_named(),
        "{container_path} is not a file of the repository"
    );
    let path = host_path(service, container_path, Path::new("/nonexistent")).expect("mounted");
    assert!(path.exists(), "{} does not exist", path.display());
    path
}
