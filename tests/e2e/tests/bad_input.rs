//! Bad input against every endpoint of the real router and gateway (issue 13): the whole stack on
//! the real control plane (apollo-dev's Stack: redis-server, controller, one gateway as the
//! StatefulSet's pod, the router), and raw client sockets that send what agents never should.
//!
//! For each case: a clear 4xx (with the JSON error envelope where the device API promises one)
//! or, for a slow client, the connection closed; nothing recorded (the per-device Redis keys are
//! byte-for-byte unchanged and the audit log shows no DeviceProcess or Event write); and the
//! router's connection to the gateway unharmed (afterwards a legitimate device gets 304 and 200
//! through the same router over the very same upstream TCP connection, within a deadline, with no
//! upstream error counted).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use apollo_dev::fleet;
use apollo_dev::{Stack, StackConfig};
use apollo_protocol::DEVICE_TOKEN_HEADER;
use apollo_test_support::{binary, metrics, wait_for, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where a case is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Router,
    Gateway,
    RouterAdmin,
    GatewayAdmin,
}

/// What a case must get.
#[derive(Clone, Debug)]
enum Expect {
    /// This status; with the device API's JSON envelope naming this error code when `Some`.
    Status(u16, Option<&'static str>),
    /// One of these statuses (a 4xx either way), no body requirement.
    AnyOf(&'static [u16]),
    /// The server closes the connection (a slow client), within the deadline.
    Closed,
}

struct Case {
    class: &'static str,
    target: Target,
    /// Bytes sent at once.
    request: Vec<u8>,
    /// Bytes then sent one at a time, 100 ms apart, until the server closes (slowloris).
    trickle: Vec<u8>,
    expect: Expect,
}

fn case(class: &'static str, target: Target, request: impl Into<Vec<u8>>, expect: Expect) -> Case {
    Case {
        class,
        target,
        request: request.into(),
        trickle: Vec::new(),
        expect,
    }
}

/// A request head (HTTP/1.1, `Connection: close`) with `headers` and `body`.
fn http(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: apollo\r\nConnection: close\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// What came back on one connection.
#[derive(Debug)]
struct Answer {
    status: Option<u16>,
    text: String,
    closed: bool,
}

async fn send(addr: SocketAddr, case: &Case, deadline: Duration) -> Answer {
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    let _ = conn.write_all(&case.request).await;
    let start = Instant::now();
    for b in &case.trickle {
        if conn.write_all(&[*b]).await.is_err() || start.elapsed() > deadline {
            break;
        }
        // A closed connection shows as a readable EOF: stop trickling then.
        let mut probe = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(100), conn.peek(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            _ => {}
        }
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let mut closed = false;
    loop {
        let left = deadline.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, conn.read(&mut buf)).await {
            Err(_) => break,
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok());
    Answer {
        status,
        text,
        closed,
    }
}

fn judge(case: &Case, answer: &Answer) -> Result<(), String> {
    match &case.expect {
        Expect::Status(code, error) => {
            if answer.status != Some(*code) {
                return Err(format!("expected {code}"));
            }
            if let Some(error) = error {
                let needle = format!("\"code\":\"{error}\"");
                if !answer.text.contains(&needle) {
                    return Err(format!("expected a JSON error {needle}"));
                }
            }
            Ok(())
        }
        Expect::AnyOf(codes) => match answer.status {
            Some(s) if codes.contains(&s) => Ok(()),
            _ => Err(format!("expected one of {codes:?}")),
        },
        Expect::Closed => {
            if answer.closed && answer.status.is_none_or(|s| (400..500).contains(&s)) {
                Ok(())
            } else {
                Err("expected the connection closed (or a 4xx then closed)".into())
            }
        }
    }
}

/// Values of the per-device Redis keys (everything under `apollo:{s...}:`), for "nothing
/// recorded". The membership, Leases and clock keys move on their own and are left out.
fn redis_state(stack: &mut Stack) -> BTreeMap<String, String> {
    let redis = stack.redis();
    let keys = bulk_strings(&redis.command(&["KEYS", "apollo:{s*"]).unwrap_or_default());
    let mut out = BTreeMap::new();
    for key in keys {
        let kind = redis.command(&["TYPE", &key]).unwrap_or_default();
        let value = match kind.trim() {
            "+hash" => redis.command(&["HGETALL", &key]),
            "+zset" => redis.command(&["ZRANGE", &key, "0", "-1", "WITHSCORES"]),
            "+set" => redis.command(&["SMEMBERS", &key]),
            "+list" => redis.command(&["LRANGE", &key, "0", "-1"]),
            _ => redis.command(&["GET", &key]),
        };
        out.insert(key, value.unwrap_or_default());
    }
    out
}

/// The bulk strings of a RESP array reply.
fn bulk_strings(reply: &str) -> Vec<String> {
    let mut lines = reply.split("\r\n");
    let mut out = Vec::new();
    while let Some(line) = lines.next() {
        if line.starts_with('$') && line != "$-1" {
            if let Some(value) = lines.next() {
                out.push(value.to_owned());
            }
        }
    }
    out
}

/// Writes that would mean something was recorded: DeviceProcess status and Events.
async fn recorded_writes(stack: &Stack) -> u64 {
    stack.system().writes(Some("deviceprocesses")).await
        + stack.system().writes(Some("events")).await
}

/// Client ports of the established connections into the gateway's device port: the router's
/// upstream connection(s) when no test client is connected.
fn connections_into(port: u16) -> BTreeSet<u16> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(cols.get(1)?.rsplit(':').next()?, 16).ok()?;
            let remote_port = u16::from_str_radix(cols.get(2)?.rsplit(':').next()?, 16).ok()?;
            (local_port == port && *cols.get(3)? == "01").then_some(remote_port)
        })
        .collect()
}

fn addr_of(text: &str) -> SocketAddr {
    let hostport = text.trim_start_matches("http://").trim_end_matches('/');
    hostport.parse().expect("a loopback address")
}

/// The stack with two devices installed; the first ("me") has reported once and shows connected,
/// and the Kubernetes writes that caused have settled.
struct Fixture {
    stack: Stack,
    _dir: tempfile::TempDir,
    me: String,
    ns: String,
    my_dp: String,
    other_dp: String,
    my_hash: String,
    token: String,
    other_token: String,
    etag: String,
    http: reqwest::Client,
    writes: u64,
}

impl Fixture {
    fn report(&self, timestamp: &str) -> String {
        serde_json::json!({
            "agentVersion": "apollo-agent/test",
            "timestamp": timestamp,
            "heartbeat": true,
            "observations": [
                {"namespace": self.ns, "name": self.my_dp, "observedSpecHash": self.my_hash}
            ],
        })
        .to_string()
    }
}

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin_dir = binary("apollo-gateway")
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let mut cfg = StackConfig::test(dir.path().to_path_buf(), bin_dir);
    cfg.gateways = 1;
    // Nothing goes stale while the cases run: every change in Redis or Kubernetes is theirs.
    cfg.heartbeat_interval_seconds = 60;
    cfg.stale_multiplier = 5;
    cfg.sweep_interval_seconds = 1;
    // The router's slow-client limits, short so the slowloris cases end quickly.
    cfg.server_env = vec![
        ("APOLLO_HEADER_READ_TIMEOUT".into(), "1s".into()),
        ("APOLLO_BODY_READ_TIMEOUT".into(), "1s".into()),
        // Above the gateway's 16 KiB HTTP/2 header-list limit, to show a head between the two is
        // refused by the gateway without harm to the shared connection.
        ("APOLLO_MAX_HEADER_BYTES".into(), "32768".into()),
    ];
    let stack = Stack::start(cfg).await.expect("start the stack");
    let client = stack.client();
    let ns = stack.namespace().to_owned();
    let devices = fleet::devices("bad", 2);
    fleet::install(&client, &ns, "bad", &devices)
        .await
        .expect("install");
    let (me, other) = (devices[0].as_str(), devices[1].as_str());
    let processes = wait_for(Duration::from_secs(30), "both DeviceProcesses", || async {
        fleet::processes(&client, &ns, "bad")
            .await
            .ok()
            .filter(|p| p.len() == 2)
    })
    .await;
    let other_dp = processes[other].metadata.name.clone().expect("name");
    let my_dp = processes[me].metadata.name.clone().expect("name");
    let token = stack.token(me);
    let other_token = stack.token(other);

    // The legitimate device: its document (and ETag) through the router, one report, connected.
    let http_client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let router = stack.router_url();
    let desired_url = format!("{router}/v1/devices/{me}/desired");
    let resp = http_client
        .get(&desired_url)
        .header(DEVICE_TOKEN_HEADER, &token)
        .send()
        .await
        .expect("desired");
    assert_eq!(resp.status(), 200);
    let etag = resp.headers()["etag"].to_str().expect("etag").to_owned();
    let doc: serde_json::Value = resp.json().await.expect("json");
    let my_hash = doc["items"][0]["specHash"]
        .as_str()
        .expect("hash")
        .to_owned();
    let mut fixture = Fixture {
        stack,
        _dir: dir,
        me: me.to_owned(),
        ns: ns.clone(),
        my_dp,
        other_dp,
        my_hash,
        token,
        other_token,
        etag,
        http: http_client,
        writes: 0,
    };
    let report_url = format!("{router}/v1/devices/{me}/report");
    let resp = fixture
        .http
        .post(&report_url)
        .header(DEVICE_TOKEN_HEADER, &fixture.token)
        .header("content-type", "application/json")
        .body(fixture.report(&now()))
        .send()
        .await
        .expect("report");
    assert_eq!(resp.status(), 200);
    wait_until(
        Duration::from_secs(20),
        "the device shown connected",
        || async {
            fleet::processes(&client, &ns, "bad")
                .await
                .is_ok_and(|p| p.get(me).is_some_and(fleet::healthy))
        },
    )
    .await;
    // Quiet: the Events of that connect are written and nothing else is pending (the count
    // holds still for two seconds).
    let settle = Instant::now();
    let mut writes = recorded_writes(&fixture.stack).await;
    let mut still_since = Instant::now();
    while still_since.elapsed() < Duration::from_secs(2) {
        assert!(
            settle.elapsed() < Duration::from_secs(30),
            "writes never settled"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = recorded_writes(&fixture.stack).await;
        if now != writes {
            writes = now;
            still_since = Instant::now();
        }
    }
    fixture.writes = writes;
    fixture
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_records_nothing_and_leaves_the_upstream_connection_alone() {
    let mut f = fixture().await;
    let router = f.stack.router_url();
    let (me, token, etag) = (f.me.clone(), f.token.clone(), f.etag.clone());
    let desired_url = format!("{router}/v1/devices/{me}/desired");
    let report_url = format!("{router}/v1/devices/{me}/report");
    let http_client = f.http.clone();
    let writes = f.writes;

    let gateway_addr = addr_of(&f.stack.gateways().addr(0).expect("gateway 0"));
    let gateway_admin = addr_of(&f.stack.gateways().admin_addr(0).expect("gateway 0 admin"));
    let router_addr = addr_of(&router);
    let router_admin = addr_of(&f.stack.router_admin_url());
    let upstream_before = connections_into(gateway_addr.port());
    assert!(
        !upstream_before.is_empty(),
        "the router holds a connection to the gateway"
    );
    let router_metrics = format!("{}/metrics", f.stack.router_admin_url());
    let upstream_errors = || async {
        metrics::fetch(&http_client, &router_metrics)
            .await
            .ok()
            .and_then(|t| metrics::value(&t, "apollo_router_upstream_errors_total", &[]))
            .unwrap_or(0.0)
    };
    let errors_before = upstream_errors().await;
    let redis_before = redis_state(&mut f.stack);
    assert!(!redis_before.is_empty(), "the device's state is in Redis");

    let cases = cases(&f);
    let mut failures = Vec::new();
    let mut table = String::new();
    let mut classes = BTreeSet::new();
    for case in &cases {
        let addr = match case.target {
            Target::Router => router_addr,
            Target::Gateway => gateway_addr,
            Target::RouterAdmin => router_admin,
            Target::GatewayAdmin => gateway_admin,
        };
        let answer = send(addr, case, Duration::from_secs(5)).await;
        let verdict = judge(case, &answer);
        table.push_str(&format!(
            "{:<28} {:<12} -> {:>4} {}{}\n",
            case.class,
            format!("{:?}", case.target),
            answer.status.map_or("-".into(), |s| s.to_string()),
            if answer.closed { "closed" } else { "open" },
            match &verdict {
                Ok(()) => String::new(),
                Err(e) => format!("  FAIL: {e}"),
            }
        ));
        classes.insert(case.class);
        if let Err(why) = verdict {
            let first_line = answer.text.lines().next().unwrap_or_default().to_owned();
            let body = answer.text.split("\r\n\r\n").nth(1).unwrap_or_default();
            failures.push(format!(
                "{} via {:?}: {why}; got {first_line:?} {body:.200}",
                case.class, case.target
            ));
        }
    }
    eprintln!("{table}");
    assert!(classes.len() >= 15, "{} classes", classes.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Nothing recorded.
    assert_eq!(
        redis_state(&mut f.stack),
        redis_before,
        "bad input changed the device state in Redis"
    );
    assert_eq!(
        recorded_writes(&f.stack).await,
        writes,
        "bad input wrote to Kubernetes: {:?}",
        f.stack.system().requests().await
    );

    // The pool unharmed: the legitimate device, through the same router and the same upstream
    // connection, at once.
    let start = Instant::now();
    let resp = http_client
        .get(&desired_url)
        .header(DEVICE_TOKEN_HEADER, &token)
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("desired");
    assert_eq!(resp.status(), 304);
    let resp = http_client
        .post(&report_url)
        .header(DEVICE_TOKEN_HEADER, &token)
        .header("content-type", "application/json")
        .body(f.report(&now()))
        .send()
        .await
        .expect("report");
    assert_eq!(resp.status(), 200);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let upstream_after = connections_into(gateway_addr.port());
    assert!(
        upstream_before.is_subset(&upstream_after),
        "the router's upstream connection was replaced: {upstream_before:?} -> {upstream_after:?}"
    );
    assert_eq!(upstream_errors().await, errors_before, "upstream errors");
    f.stack.shutdown().await;
}

/// The table: every class against every endpoint it applies to.
fn cases(i: &Fixture) -> Vec<Case> {
    use Expect::{AnyOf, Closed, Status};
    use Target::{Gateway, GatewayAdmin, Router, RouterAdmin};
    let me = i.me.as_str();
    let desired = format!("/v1/devices/{me}/desired");
    let report = format!("/v1/devices/{me}/report");
    let connect = format!("/v1/devices/{me}/connect");
    let auth = [
        (DEVICE_TOKEN_HEADER, i.token.as_str()),
        ("Content-Type", "application/json"),
    ];
    let now = jiff::Timestamp::now().to_string();
    let good = i.report(&now);
    let mut out = Vec::new();
    for target in [Router, Gateway] {
        // 1. Malformed JSON, on both writes.
        for path in [&report, &connect] {
            out.push(case(
                "malformed JSON",
                target,
                http("POST", path, &auth, b"{\"agentVersion\":"),
                Status(400, Some("invalid_field")),
            ));
        }
        out.push(case(
            "not JSON at all",
            target,
            http("POST", &report, &auth, b"\x00\xff\xfe garbage"),
            Status(400, Some("invalid_field")),
        ));
        // 2. Wrong types.
        out.push(case(
            "wrong types",
            target,
            http(
                "POST",
                &report,
                &auth,
                br#"{"agentVersion":1,"timestamp":"2026-01-01T00:00:00Z"}"#,
            ),
            Status(400, Some("invalid_field")),
        ));
        out.push(case("wrong types", target, http("POST", &report, &auth, br#"{"agentVersion":"a","timestamp":"2026-01-01T00:00:00Z","observations":{"a":1}}"#), Status(400, Some("invalid_field"))));
        out.push(case(
            "wrong types",
            target,
            http(
                "POST",
                &report,
                &auth,
                br#"{"agentVersion":"a","timestamp":"2026-01-01T00:00:00Z","heartbeat":"yes"}"#,
            ),
            Status(400, Some("invalid_field")),
        ));
        out.push(case("bad hash format", target, http("POST", &report, &auth, format!(r#"{{"agentVersion":"a","timestamp":"{now}","observations":[{{"namespace":"{}","name":"{}","observedSpecHash":"md5:x"}}]}}"#, i.ns, i.my_dp).as_bytes()), Status(400, Some("invalid_field"))));
        out.push(case(
            "bad timestamp",
            target,
            http(
                "POST",
                &report,
                &auth,
                br#"{"agentVersion":"a","timestamp":"yesterday"}"#,
            ),
            Status(400, Some("invalid_field")),
        ));
        // 3. Oversized body: declared, and sent.
        let big = vec![b' '; 70 * 1024];
        out.push(case(
            "oversized body",
            target,
            http("POST", &report, &auth, &big),
            Status(413, Some("payload_too_large")),
        ));
        out.push(case(
            "oversized agentVersion",
            target,
            http(
                "POST",
                &report,
                &auth,
                format!(
                    r#"{{"agentVersion":"{}","timestamp":"{now}"}}"#,
                    "v".repeat(200)
                )
                .as_bytes(),
            ),
            Status(400, Some("invalid_field")),
        ));
        // 4. Bad names and encodings.
        out.push(case(
            "bad device name",
            target,
            http("GET", "/v1/devices/bad%20name/desired", &auth, b""),
            AnyOf(&[400, 404]),
        ));
        out.push(case(
            "bad device name",
            target,
            http("POST", "/v1/devices/a$b/report", &auth, good.as_bytes()),
            AnyOf(&[400, 404]),
        ));
        out.push(case(
            "bad device name",
            target,
            http(
                "GET",
                &format!("/v1/devices/{}/desired", "x".repeat(300)),
                &auth,
                b"",
            ),
            AnyOf(&[400, 404]),
        ));
        out.push(case(
            "bad percent-encoding",
            target,
            http("GET", "/v1/devices/%zz/desired", &auth, b""),
            AnyOf(&[400, 404]),
        ));
        out.push(case(
            "bad percent-encoding",
            target,
            http("POST", "/v1/devices/%FF%FE/report", &auth, good.as_bytes()),
            AnyOf(&[400, 404]),
        ));
        out.push(case(
            "path traversal",
            target,
            http(
                "GET",
                &format!("/v1/devices/../devices/{me}/desired"),
                &auth,
                b"",
            ),
            AnyOf(&[400, 404]),
        ));
        // 5. Tokens: missing, wrong, another device's.
        out.push(case(
            "missing token",
            target,
            http("GET", &desired, &[], b""),
            Status(401, Some("unauthenticated")),
        ));
        out.push(case(
            "missing token",
            target,
            http(
                "POST",
                &report,
                &[("Content-Type", "application/json")],
                good.as_bytes(),
            ),
            Status(401, Some("unauthenticated")),
        ));
        out.push(case(
            "wrong token",
            target,
            http(
                "POST",
                &report,
                &[
                    (DEVICE_TOKEN_HEADER, "00000000"),
                    ("Content-Type", "application/json"),
                ],
                good.as_bytes(),
            ),
            AnyOf(&[401, 403]),
        ));
        out.push(case(
            "wrong token",
            target,
            http(
                "POST",
                &connect,
                &[(DEVICE_TOKEN_HEADER, "")],
                br#"{"agentVersion":"a"}"#,
            ),
            AnyOf(&[401, 403]),
        ));
        out.push(case(
            "another device's token",
            target,
            http(
                "POST",
                &report,
                &[
                    (DEVICE_TOKEN_HEADER, i.other_token.as_str()),
                    ("Content-Type", "application/json"),
                ],
                good.as_bytes(),
            ),
            AnyOf(&[401, 403]),
        ));
        out.push(case(
            "another device's token",
            target,
            http(
                "GET",
                &desired,
                &[(DEVICE_TOKEN_HEADER, i.other_token.as_str())],
                b"",
            ),
            AnyOf(&[401, 403]),
        ));
        // 6. Another device's DeviceProcess in an authenticated report: 403, nothing recorded.
        out.push(case("another device's object", target, http("POST", &report, &auth, format!(r#"{{"agentVersion":"a","timestamp":"{now}","observations":[{{"namespace":"{}","name":"{}","observedSpecHash":"{}"}}]}}"#, i.ns, i.other_dp, i.my_hash).as_bytes()), Status(403, Some("forbidden"))));
        // 7. Unknown methods.
        out.push(case(
            "unknown method",
            target,
            http("DELETE", &desired, &auth, b""),
            Status(405, None),
        ));
        out.push(case(
            "unknown method",
            target,
            http("PUT", &report, &auth, good.as_bytes()),
            Status(405, None),
        ));
        out.push(case(
            "unknown method",
            target,
            http("BREW", &desired, &auth, b""),
            AnyOf(&[400, 405]),
        ));
        // 8. Bad query.
        out.push(case(
            "bad waitSeconds",
            target,
            http("GET", &format!("{desired}?waitSeconds=soon"), &auth, b""),
            Status(400, Some("invalid_field")),
        ));
        // 9. Huge headers. (The gateway's own HTTP/1.1 limit is hyper's default read buffer,
        //    ~400 KiB; behind the router it sees at most 16 KiB, its HTTP/2 header-list limit.)
        let huge = "h".repeat(512 * 1024);
        out.push(case(
            "huge header",
            target,
            http(
                "GET",
                &desired,
                &[(DEVICE_TOKEN_HEADER, i.token.as_str()), ("X-Huge", &huge)],
                b"",
            ),
            AnyOf(&[400, 431]),
        ));
        // 10. HTTP/1.0 quirks: chunked is not HTTP/1.0; no Host and no token.
        out.push(case("HTTP/1.0 chunked", target, format!("POST {report} HTTP/1.0\r\n{DEVICE_TOKEN_HEADER}: {}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", i.token), AnyOf(&[400, 411, 501])));
        out.push(case(
            "HTTP/1.0 no host",
            target,
            format!("GET {desired} HTTP/1.0\r\n\r\n"),
            Status(401, Some("unauthenticated")),
        ));
        // 11. Pipelined garbage after a refused request.
        let mut pipelined = http("GET", &desired, &[], b"");
        pipelined.extend_from_slice(b"\x16\x03\x01\x00\xa5GARBAGE / HTTP/9.9\r\n\r\n");
        out.push(case(
            "pipelined garbage",
            target,
            pipelined,
            Status(401, Some("unauthenticated")),
        ));
        out.push(case(
            "garbage request line",
            target,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS hello\r\n\r\n".to_vec(),
            Status(400, None),
        ));
        // 12. Conflicting lengths (request smuggling).
        out.push(case("conflicting Content-Length", target, format!("POST {report} HTTP/1.1\r\nHost: a\r\n{DEVICE_TOKEN_HEADER}: {}\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{{}}", i.token), Status(400, None)));
        out.push(case("CL and TE together", target, format!("POST {report} HTTP/1.1\r\nHost: a\r\n{DEVICE_TOKEN_HEADER}: {}\r\nContent-Type: application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", i.token), AnyOf(&[400])));
        // 13. Invalid header bytes.
        out.push(case(
            "invalid header bytes",
            target,
            format!("GET {desired} HTTP/1.1\r\nHost: a\r\nX-Bad\x01: x\r\n\r\n"),
            Status(400, None),
        ));
    }
    // A head the router lets through (its --max-header-bytes is 32 KiB here) but larger than the
    // gateway's HTTP/2 header-list limit (16 KiB): refused, and the replica not held down for it.
    out.push(case(
        "large header under the router's limit",
        Router,
        http(
            "GET",
            &desired,
            &[
                (DEVICE_TOKEN_HEADER, i.token.as_str()),
                ("X-Large", &"l".repeat(24 * 1024)),
            ],
            b"",
        ),
        AnyOf(&[400, 431]),
    ));
    // 14. A body where none belongs: the router refuses it itself (the gateway never sees it).
    out.push(case(
        "body on GET",
        Router,
        http("GET", &desired, &auth, b"{\"x\":1}"),
        Status(400, Some("body_not_allowed")),
    ));
    out.push(case(
        "body on HEAD",
        Router,
        http("HEAD", &desired, &auth, b"{}"),
        Status(400, None),
    ));
    // 15. Slow clients (slowloris): the router closes a head or body that does not arrive within
    //     its limits (1 s here).
    let mut slow_head = case("slow headers", Router, b"GET /v1/devices/".to_vec(), Closed);
    slow_head.trickle = format!(
        "{me}/desired HTTP/1.1\r\nHost: a\r\nX-Slow: {}",
        "s".repeat(100)
    )
    .into_bytes();
    out.push(slow_head);
    out.push(case(
        "half a request line",
        Router,
        b"GET /v1/dev".to_vec(),
        Closed,
    ));
    out.push(case("stalled body", Router, format!("POST {report} HTTP/1.1\r\nHost: a\r\n{DEVICE_TOKEN_HEADER}: {}\r\nContent-Length: 500\r\n\r\n{{\"agentVersion\":", i.token), Status(408, Some("request_timeout"))));
    // 16. The router serves device routes only; the admin ports refuse writes and junk.
    out.push(case(
        "not a device route",
        Router,
        http("GET", "/metrics", &[], b""),
        Status(404, Some("not_found")),
    ));
    out.push(case(
        "not a device route",
        Router,
        http("GET", &format!("/v1/devices/{me}"), &auth, b""),
        Status(404, Some("not_found")),
    ));
    for admin in [RouterAdmin, GatewayAdmin] {
        out.push(case(
            "unknown method",
            admin,
            http("POST", "/metrics", &[], b"x=1"),
            Status(405, None),
        ));
        out.push(case(
            "unknown method",
            admin,
            http("DELETE", "/readyz", &[], b""),
            Status(405, None),
        ));
        out.push(case(
            "unknown path",
            admin,
            http("GET", "/debug/pprof", &[], b""),
            Status(404, None),
        ));
        out.push(case(
            "huge header",
            admin,
            http(
                "GET",
                "/healthz",
                &[("X-Huge", &"h".repeat(512 * 1024))],
                b"",
            ),
            AnyOf(&[400, 431]),
        ));
        out.push(case(
            "garbage request line",
            admin,
            b"\x00\x01\x02 GARBAGE\r\n\r\n".to_vec(),
            Status(400, None),
        ));
    }
    out
}

/// Classes this table found the gateway accepting (issue 13), refused since: a report dated
/// decades ahead or replayed from years ago (beyond `--max-report-clock-skew`, 24 h), and a body
/// not declared `application/json`. Each case is sent with the device's own valid token, so
/// "nothing recorded" means the gateway refused it.
#[tokio::test]
async fn reports_dated_far_from_now_or_not_declared_json_are_refused() {
    let mut f = fixture().await;
    let router = f.stack.router_url();
    let report_url = format!("{router}/v1/devices/{}/report", f.me);
    let redis_before = redis_state(&mut f.stack);
    let mut failures = Vec::new();
    for (class, content_type, timestamp) in [
        (
            "far-future timestamp",
            "application/json",
            "2999-01-01T00:00:00Z".to_owned(),
        ),
        (
            "replayed old timestamp",
            "application/json",
            "2020-01-01T00:00:00Z".to_owned(),
        ),
        ("wrong content-type", "text/plain", now()),
    ] {
        let resp = f
            .http
            .post(&report_url)
            .header(DEVICE_TOKEN_HEADER, &f.token)
            .header("content-type", content_type)
            .body(f.report(&timestamp))
            .send()
            .await
            .expect("report");
        if !resp.status().is_client_error() {
            failures.push(format!("{class}: {}", resp.status()));
        }
    }
    assert!(failures.is_empty(), "accepted: {failures:?}");
    assert_eq!(redis_state(&mut f.stack), redis_before);
    f.stack.shutdown().await;
}
