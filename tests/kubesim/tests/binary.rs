//! The `kubesim` binary: the contract other crates' tests rely on (flags, the ready line,
//! /healthz, the kubeconfig, a clear failure on a taken port, clean exit on SIGTERM).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the child when the test ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn spawn(port: u16, kubeconfig: &std::path::Path) -> KillOnDrop {
    let child = Command::new(env!("CARGO_BIN_EXE_kubesim"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--kubeconfig-out"])
        .arg(kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubesim spawns");
    KillOnDrop(child)
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

fn wait_for_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "kubesim did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn binary_serves_writes_kubeconfig_refuses_taken_port_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    let port = free_port();
    let mut sim = spawn(port, &kubeconfig);

    let mut stdout = BufReader::new(sim.0.stdout.take().expect("stdout"));
    let mut ready = String::new();
    stdout.read_line(&mut ready).expect("ready line");
    assert_eq!(
        ready.trim_end(),
        format!("kubesim listening on http://127.0.0.1:{port}")
    );
    let health = http_get(port, "/healthz").expect("healthz answers");
    assert!(
        health.starts_with("HTTP/1.1 200") && health.ends_with("ok"),
        "{health}"
    );
    let version = http_get(port, "/version").expect("version answers");
    assert!(version.contains("\"minor\":\"32\""), "{version}");
    let written = std::fs::read_to_string(&kubeconfig).expect("kubeconfig written");
    assert!(
        written.contains(&format!("server: http://127.0.0.1:{port}")),
        "{written}"
    );

    let mut taken = spawn(port, &dir.path().join("other"));
    let status = wait_for_exit(&mut taken.0);
    assert!(!status.success());
    let mut stderr = String::new();
    taken
        .0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    assert!(
        stderr.contains(&format!("kubesim could not start on 127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(
        stderr.to_lowercase().contains("address already in use"),
        "{stderr}"
    );

    let killed = Command::new("kill")
        .args(["-TERM", &sim.0.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    assert!(
        wait_for_exit(&mut sim.0).success(),
        "SIGTERM is a clean shutdown"
    );
}

#[tokio::test]
async fn kube_client_from_the_written_kubeconfig() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    let port = free_port();
    let mut sim = spawn(port, &kubeconfig);
    let mut ready = String::new();
    BufReader::new(sim.0.stdout.take().expect("stdout"))
        .read_line(&mut ready)
        .expect("ready line");

    let config = kube::config::Kubeconfig::read_from(&kubeconfig).expect("parse kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
        .await
        .expect("config");
    let client = kube::Client::try_from(config).expect("client");
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client);
    let names: Vec<String> = namespaces
        .list(&Default::default())
        .await
        .expect("list namespaces")
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert_eq!(
        names,
        vec!["default", "kube-node-lease", "kube-public", "kube-system"]
    );
}
