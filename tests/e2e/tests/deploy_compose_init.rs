//! docker-compose.yaml's `init` step, run here as compose runs it (deploy/dev/init.sh with the
//! openssl CLI, its container paths mapped onto temp directories): the device HMAC key and tokens
//! the gateways and agents use, and the control plane's CA, certificates and kubeconfigs, checked
//! with openssl against what the control plane's flags and the kubectl steps expect. That the
//! control plane really runs with them: deploy_compose_stack.rs.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use apollo_agent::config::{ENV_DEVICE_NAME, ENV_DEVICE_TOKEN_FILE};
use apollo_protocol::token::{key_from_secret_file, verify_device_token};
use serde_json::Value;

use common::compose::{
    argv, compose_env, host_path, mount_of, run_init, running, service, services, strings,
};
use common::{flag_value, run_ok, AGENT, KUBE_APISERVER, KUBE_CONTROLLER_MANAGER};

/// The init step writes the key the gateways read and tokens that key accepts, at the paths the
/// gateways and agents are configured with.
#[test]
fn compose_init_writes_the_key_gateways_read_and_tokens_they_accept() {
    let volumes = tempfile::tempdir().expect("tempdir");
    let services = services();
    run_init(volumes.path());

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
    run_init(volumes.path());
    assert_eq!(std::fs::read(&key_file).expect("key"), key_bytes);
}

fn openssl(args: &[&str]) -> String {
    run_ok(
        Command::new("openssl").args(args),
        &format!("openssl {args:?}"),
    )
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `base64 -d` of a kubeconfig's `*-data` field, written to `dir/name`.
fn decode_to(dir: &Path, name: &str, data: &Value) -> PathBuf {
    let data = data.as_str().unwrap_or_else(|| panic!("{name}: no data"));
    let mut child = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run base64");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), data.as_bytes())
        .expect("feed base64");
    let out = child.wait_with_output().expect("base64");
    assert!(out.status.success(), "{name}: not base64");
    let path = dir.join(name);
    std::fs::write(&path, out.stdout).expect("write decoded data");
    path
}

/// A kubeconfig init wrote: names `server`, trusts exactly `ca` and carries a client certificate
/// signed by it whose subject contains `subject`, with its private key.
fn assert_kubeconfig(path: &Path, server: &str, ca: &Path, subject: &str, scratch: &Path) {
    let who = path.display();
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{who}: {e}"));
    let config: Value = serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{who}: {e}"));
    let cluster = &config["clusters"][0]["cluster"];
    assert_eq!(cluster["server"], server, "{who}");
    let their_ca = decode_to(scratch, "ca", &cluster["certificate-authority-data"]);
    assert_eq!(
        std::fs::read(their_ca).expect("ca"),
        std::fs::read(ca).expect("ca"),
        "{who} trusts the control plane's CA"
    );
    let user = &config["users"][0]["user"];
    assert!(user.get("token").is_none(), "{who}: a certificate identity");
    let cert = decode_to(scratch, "cert", &user["client-certificate-data"]);
    let key = decode_to(scratch, "key", &user["client-key-data"]);
    let cert = path_str(&cert);
    assert!(openssl(&["verify", "-CAfile", path_str(ca), cert]).contains(": OK"));
    let subject_line = openssl(&["x509", "-in", cert, "-noout", "-subject"]);
    assert!(subject_line.contains(subject), "{who}: {subject_line}");
    assert_eq!(
        openssl(&["x509", "-in", cert, "-noout", "-pubkey"]),
        openssl(&["pkey", "-in", path_str(&key), "-pubout"]),
        "{who}: the key of its certificate"
    );
}

/// Every file the control plane reads from init's volumes exists and is private; the serving
/// certificate names the service and 127.0.0.1; the admin is in system:masters and the
/// controller-manager is system:kube-controller-manager; the service-account keys are a pair.
#[test]
fn compose_init_writes_the_control_planes_certificates_and_kubeconfigs() {
    let volumes = tempfile::tempdir().expect("tempdir");
    let scratch = tempfile::tempdir().expect("tempdir");
    run_init(volumes.path());
    let v = volumes.path();
    let (api_name, api) = running(KUBE_APISERVER);
    let (_, kcm) = running(KUBE_CONTROLLER_MANAGER);
    let file = |svc: &Value, flag: &str| {
        let argv = argv(svc);
        let path = flag_value(&argv, flag).unwrap_or_else(|| panic!("no {flag}"));
        host_path(svc, &path, v).unwrap_or_else(|| panic!("{flag}={path} is on no volume"))
    };

    for svc in [api, kcm] {
        for arg in argv(svc) {
            let Some((flag, path)) = arg.split_once("=/") else {
                continue;
            };
            let path = format!("/{path}");
            let from_init = mount_of(svc, &path).is_some_and(|m| m.is_named() && m.read_only);
            if !from_init {
                continue;
            }
            let host = host_path(svc, &path, v).expect("mapped");
            let meta = std::fs::metadata(&host)
                .unwrap_or_else(|e| panic!("{flag}={path}: init did not write it: {e}"));
            assert!(meta.len() > 0, "{flag}={path} is empty");
            assert_eq!(
                meta.permissions().mode() & 0o077,
                0,
                "{flag}={path} must be private to its owner"
            );
        }
    }

    let ca = file(api, "--client-ca-file");
    assert_eq!(file(kcm, "--root-ca-file"), ca);
    let serving = file(api, "--tls-cert-file");
    assert!(openssl(&["verify", "-CAfile", path_str(&ca), path_str(&serving)]).contains(": OK"));
    let names = openssl(&[
        "x509",
        "-in",
        path_str(&serving),
        "-noout",
        "-ext",
        "subjectAltName",
    ]);
    for name in [format!("DNS:{api_name}"), "IP Address:127.0.0.1".to_owned()] {
        assert!(
            names.contains(&name),
            "the serving certificate lacks {name}: {names}"
        );
    }
    assert_eq!(
        openssl(&["x509", "-in", path_str(&serving), "-noout", "-pubkey"]),
        openssl(&[
            "pkey",
            "-in",
            path_str(&file(api, "--tls-private-key-file")),
            "-pubout"
        ]),
        "the serving certificate's key"
    );
    let signing = file(api, "--service-account-signing-key-file");
    assert_eq!(file(kcm, "--service-account-private-key-file"), signing);
    assert_eq!(
        openssl(&["pkey", "-in", path_str(&signing), "-pubout"]),
        std::fs::read_to_string(file(api, "--service-account-key-file")).expect("sa.pub"),
        "tokens signed with the signing key verify with the public key"
    );

    let server = compose_env(service("init"))["APOLLO_APISERVER_URL"].clone();
    assert_kubeconfig(
        &file(kcm, "--kubeconfig"),
        &server,
        &ca,
        "CN = system:kube-controller-manager",
        scratch.path(),
    );
    let seed = service("seed");
    let admin = host_path(seed, &compose_env(seed)["KUBECONFIG"], v).expect("admin kubeconfig");
    assert_kubeconfig(&admin, &server, &ca, "O = system:masters", scratch.path());

    // A second `docker compose up` keeps the CA (etcd keeps what it signed).
    let before = std::fs::read(&ca).expect("ca");
    run_init(v);
    assert_eq!(std::fs::read(&ca).expect("ca"), before);
}
