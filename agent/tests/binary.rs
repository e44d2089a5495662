//! The `apollo-agent` binary: configuration errors and signal handling.

mod common;

use std::time::{Duration, Instant};

use apollo_test_support::{free_port, wait_until, Proc, ProcBuilder};
use common::{Behaviour, FakeGateway, DEVICE, TOKEN};
use nix::sys::signal::Signal;

const VARIABLES: &[&str] = &[
    "APOLLO_DEVICE_NAME",
    "APOLLO_GATEWAY_URL",
    "APOLLO_DEVICE_TOKEN",
    "APOLLO_DEVICE_TOKEN_FILE",
    "APOLLO_POLL_WAIT_SECONDS",
    "APOLLO_HEARTBEAT_INTERVAL_SECONDS",
    "APOLLO_MIN_POLL_INTERVAL_MS",
    "APOLLO_REQUEST_TIMEOUT_SECONDS",
    "APOLLO_BACKOFF_BASE_MS",
    "APOLLO_BACKOFF_MAX_SECONDS",
    "APOLLO_POLL_WAIT",
    "APOLLO_HEARTBEAT_INTERVAL",
    "APOLLO_MIN_POLL_INTERVAL",
    "APOLLO_REQUEST_TIMEOUT",
    "APOLLO_BACKOFF_BASE",
    "APOLLO_BACKOFF_MAX",
    "APOLLO_LOG_FORMAT",
];

/// The agent binary with none of our variables inherited from the test's environment.
fn agent() -> ProcBuilder {
    VARIABLES
        .iter()
        .fold(Proc::builder(env!("CARGO_BIN_EXE_apollo-agent")), |b, v| {
            b.env_remove(v)
        })
}

async fn exits_with_config_error(builder: ProcBuilder, variable: &str) {
    let mut proc = builder.spawn();
    let status = proc
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("exits on bad configuration");
    assert_eq!(status.code(), Some(2), "{}", proc.logs());
    let output = proc.logs();
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {output}");
    assert!(
        lines[0].starts_with(&format!(
            "apollo-agent: invalid configuration: {variable}: "
        )),
        "{output}"
    );
}

#[tokio::test]
async fn missing_device_name_exits_2_naming_the_variable() {
    exits_with_config_error(agent(), "APOLLO_DEVICE_NAME").await;
}

#[tokio::test]
async fn invalid_values_exit_2_naming_the_variable() {
    for (variable, invalid) in [
        ("APOLLO_POLL_WAIT_SECONDS", "ninety"),
        ("APOLLO_GATEWAY_URL", "gateway:8080"),
        ("APOLLO_DEVICE_TOKEN_FILE", "/nonexistent/apollo/token"),
    ] {
        exits_with_config_error(
            agent()
                .env("APOLLO_DEVICE_NAME", DEVICE)
                .env(variable, invalid),
            variable,
        )
        .await;
    }
}

#[tokio::test]
async fn an_unknown_log_format_is_a_usage_error_naming_the_accepted_ones() {
    let mut proc = agent()
        .env("APOLLO_DEVICE_NAME", DEVICE)
        .args(["--log-format", "bogus"])
        .spawn();
    let status = proc
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("exits on a bad flag");
    assert_eq!(status.code(), Some(2), "{}", proc.logs());
    assert!(
        proc.logs().contains("[possible values: text, json]"),
        "{}",
        proc.logs()
    );
}

#[tokio::test]
async fn old_and_new_duration_spellings_both_configure_the_binary() {
    let gw = FakeGateway::start(Behaviour::default(), &[("a", 'a')]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write token");
    // APOLLO_POLL_WAIT_SECONDS keeps its meaning (a bare number of seconds) beside the new
    // syntax of APOLLO_REQUEST_TIMEOUT.
    let mut proc = agent()
        .env("APOLLO_DEVICE_NAME", DEVICE)
        .env("APOLLO_GATEWAY_URL", &gw.url)
        .env("APOLLO_DEVICE_TOKEN_FILE", &token_file)
        .env("APOLLO_POLL_WAIT_SECONDS", "7")
        .env("APOLLO_REQUEST_TIMEOUT", "2s")
        .spawn();
    wait_until(
        Duration::from_secs(10),
        "a long poll asking to wait 7 s",
        || async {
            gw.seen_kind("desired")
                .iter()
                .any(|s| s.wait_seconds == Some(7))
        },
    )
    .await;
    stops_within_a_second(&mut proc, Signal::SIGTERM).await;

    // Both spellings at once is a configuration error naming both.
    let both = agent()
        .env("APOLLO_DEVICE_NAME", DEVICE)
        .env("APOLLO_POLL_WAIT", "5s")
        .env("APOLLO_POLL_WAIT_SECONDS", "5");
    exits_with_config_error(both, "APOLLO_POLL_WAIT").await;
}

async fn stops_within_a_second(proc: &mut Proc, signal: Signal) {
    let sent = Instant::now();
    proc.signal(signal);
    let status = proc
        .wait_exit(Duration::from_secs(1))
        .await
        .unwrap_or_else(|| panic!("no exit within 1 s of {signal}: {}", proc.logs()));
    assert!(sent.elapsed() < Duration::from_secs(1));
    assert!(status.success(), "{status}: {}", proc.logs());
}

#[tokio::test]
async fn sigterm_during_a_long_poll_exits_within_a_second() {
    let gw = FakeGateway::start(Behaviour::default(), &[("a", 'a')]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write token");
    let mut proc = agent()
        .env("APOLLO_DEVICE_NAME", DEVICE)
        .env("APOLLO_GATEWAY_URL", &gw.url)
        .env("APOLLO_DEVICE_TOKEN_FILE", &token_file)
        .spawn();
    wait_until(
        Duration::from_secs(10),
        "a report and a held long poll",
        || async { gw.seen_kind("report").len() == 1 && gw.held_polls() == 1 },
    )
    .await;
    assert!(gw.seen().iter().all(|s| s.token.as_deref() == Some(TOKEN)));
    stops_within_a_second(&mut proc, Signal::SIGTERM).await;
    let logs = proc.logs();
    assert_eq!(logs.matches("connected to gateway").count(), 1, "{logs}");
    assert_eq!(logs.matches("new desired document").count(), 1, "{logs}");
}

#[tokio::test]
async fn sigint_while_backing_off_exits_within_a_second() {
    let mut proc = agent()
        .env("APOLLO_DEVICE_NAME", DEVICE)
        .env(
            "APOLLO_GATEWAY_URL",
            format!("http://127.0.0.1:{}", free_port()),
        )
        .env("APOLLO_BACKOFF_BASE_MS", "5000")
        .spawn();
    proc.wait_for_log("backing off", Duration::from_secs(10))
        .await;
    stops_within_a_second(&mut proc, Signal::SIGINT).await;
    // One line when each loop starts failing, not one per retry.
    assert_eq!(
        proc.logs().matches("backing off").count(),
        2,
        "{}",
        proc.logs()
    );
}
