//! The agent library against a scripted gateway on a real 127.0.0.1 socket.

mod common;

use std::time::{Duration, Instant};

use apollo_agent::trace::is_valid_traceparent;
use apollo_test_support::wait_until;
use common::{config, hash, Behaviour, FakeGateway, RunningAgent, TOKEN};

#[tokio::test]
async fn a_304_without_etag_keeps_the_stored_etag() {
    let gw = FakeGateway::start(
        Behaviour {
            long_poll: false,
            etag_on_304: false,
            ..Behaviour::default()
        },
        &[("a", 'a')],
    )
    .await;
    let agent = RunningAgent::start(config(&gw.url));

    wait_until(Duration::from_secs(5), "five desired polls", || async {
        gw.seen_kind("desired").len() >= 5
    })
    .await;
    let polls = gw.seen_kind("desired");
    assert_eq!(
        polls[0].if_none_match, None,
        "first poll has nothing to match"
    );
    assert_eq!(polls[0].status, 200);
    let etag = polls[1]
        .if_none_match
        .clone()
        .expect("second poll sends If-None-Match");
    for (i, poll) in polls.iter().enumerate().skip(1) {
        assert_eq!(
            poll.if_none_match.as_deref(),
            Some(etag.as_str()),
            "poll {i}"
        );
        assert_eq!(poll.status, 304, "poll {i}");
        assert_eq!(poll.token.as_deref(), Some(TOKEN));
    }
    let s = agent.metrics.snapshot();
    assert_eq!(s.desired.ok, 1);
    assert!(s.desired.not_modified >= 4, "{s:?}");
    assert_eq!(s.new_documents, 1);
    agent.stop().await;
}

#[tokio::test]
async fn polls_answered_early_are_spaced_not_hot_looped() {
    let gw = FakeGateway::start(
        Behaviour {
            long_poll: false,
            ..Behaviour::default()
        },
        &[],
    )
    .await;
    let mut cfg = config(&gw.url);
    cfg.min_poll_interval = Duration::from_millis(200);
    let agent = RunningAgent::start(cfg);
    wait_until(Duration::from_secs(5), "six desired polls", || async {
        gw.seen_kind("desired").len() >= 6
    })
    .await;
    let polls = gw.seen_kind("desired");
    assert_eq!(polls[0].status, 200);
    // After the first document every answer is an immediate 304: each must wait out the
    // minimum interval instead of re-polling at once.
    for pair in polls[1..].windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_millis(190),
            "unchanged polls {gap:?} apart"
        );
    }
    agent.stop().await;
}

#[tokio::test]
async fn a_new_document_is_reported_at_once_with_only_the_changed_hashes() {
    let gw = FakeGateway::start(Behaviour::default(), &[("a", 'a'), ("b", 'b')]).await;
    let agent = RunningAgent::start(config(&gw.url));

    wait_until(
        Duration::from_secs(5),
        "first report and a held long poll",
        || async { gw.seen_kind("report").len() == 1 && gw.held_polls() == 1 },
    )
    .await;
    let first = &gw.seen_kind("report")[0];
    assert_eq!(
        first.observed(),
        [("a".to_owned(), hash('a')), ("b".to_owned(), hash('b'))]
    );
    let connect = &gw.seen_kind("connect")[0];
    assert!(connect.at <= first.at, "connect comes first");
    let held = gw
        .seen_kind("desired")
        .into_iter()
        .find(|p| p.status == common::HELD)
        .expect("held poll");
    assert_eq!(held.wait_seconds, Some(30));
    assert!(held.if_none_match.is_some());

    let changed_at = Instant::now();
    gw.set_items(&[("a", 'a'), ("b", 'c'), ("n", 'd')]);
    wait_until(
        Duration::from_secs(1),
        "report of the changed hashes",
        || async { gw.seen_kind("report").len() == 2 },
    )
    .await;
    let second = &gw.seen_kind("report")[1];
    assert!(second.at - changed_at < Duration::from_secs(1));
    assert_eq!(
        second.observed(),
        [("b".to_owned(), hash('c')), ("n".to_owned(), hash('d'))]
    );
    assert!(!second.heartbeat(), "a change report is not the heartbeat");
    for report in gw.seen_kind("report") {
        let tp = report.traceparent.expect("traceparent on every report");
        assert!(is_valid_traceparent(&tp), "{tp}");
        assert_eq!(report.token.as_deref(), Some(TOKEN));
        let body = report.body.expect("body");
        assert!(body["timestamp"]
            .as_str()
            .is_some_and(|t| t.parse::<jiff::Timestamp>().is_ok()));
        assert!(body["agentVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("apollo-agent/")));
    }
    let traces: std::collections::HashSet<_> = gw
        .seen()
        .into_iter()
        .filter_map(|s| s.traceparent.map(|t| t[3..35].to_owned()))
        .collect();
    assert_eq!(
        traces.len(),
        3,
        "connect and each report start their own trace"
    );

    // The same document again (a new generation but unchanged hashes) reports nothing new.
    gw.set_items(&[("a", 'a'), ("b", 'c'), ("n", 'd')]);
    wait_until(Duration::from_secs(2), "the re-served document", || async {
        agent.metrics.snapshot().new_documents == 3
    })
    .await;
    assert_eq!(gw.seen_kind("report").len(), 2);
    agent.stop().await;
}

/// The ack's `ignored` (issue 13, defect 11): an observation the gateway did not record is not
/// delivered, so the next report carries it again; once the gateway records it, it is not sent
/// again with an unrelated change.
#[tokio::test]
async fn observations_the_gateway_ignored_stay_unacknowledged_and_go_again() {
    let gw = FakeGateway::start(Behaviour::default(), &[("a", 'a'), ("b", 'b')]).await;
    gw.update(|b| b.ignore = vec!["b".into()]);
    let agent = RunningAgent::start(config(&gw.url));
    wait_until(
        Duration::from_secs(5),
        "first report and a held long poll",
        || async { gw.seen_kind("report").len() == 1 && gw.held_polls() == 1 },
    )
    .await;
    assert_eq!(
        gw.seen_kind("report")[0].observed(),
        [("a".to_owned(), hash('a')), ("b".to_owned(), hash('b'))]
    );

    // Only `a` changes: `b` was never recorded, so it goes again beside it.
    gw.update(|b| b.ignore.clear());
    gw.set_items(&[("a", 'c'), ("b", 'b')]);
    wait_until(Duration::from_secs(2), "the second report", || async {
        gw.seen_kind("report").len() == 2
    })
    .await;
    assert_eq!(
        gw.seen_kind("report")[1].observed(),
        [("a".to_owned(), hash('c')), ("b".to_owned(), hash('b'))],
        "the ignored observation must be sent again"
    );

    // Now recorded: a change of `a` alone carries `a` alone.
    gw.set_items(&[("a", 'd'), ("b", 'b')]);
    wait_until(Duration::from_secs(2), "the third report", || async {
        gw.seen_kind("report").len() == 3
    })
    .await;
    assert_eq!(
        gw.seen_kind("report")[2].observed(),
        [("a".to_owned(), hash('d'))]
    );
    agent.stop().await;
}

#[tokio::test]
async fn heartbeats_run_on_their_own_timer_during_a_long_poll() {
    let gw = FakeGateway::start(
        Behaviour {
            heartbeat_interval_seconds: 1,
            ..Behaviour::default()
        },
        &[("a", 'a')],
    )
    .await;
    let agent = RunningAgent::start(config(&gw.url));
    wait_until(Duration::from_secs(5), "three heartbeats", || async {
        gw.seen_kind("report")
            .iter()
            .filter(|r| r.heartbeat())
            .count()
            >= 3
    })
    .await;
    // One poll fetched the document, the next one is still held: heartbeats did not wait for it.
    let polls = gw.seen_kind("desired");
    assert_eq!(polls.len(), 2, "{polls:?}");
    assert_eq!(gw.held_polls(), 1);
    // Heartbeats carry every current observation and are about a second apart (90-100% jitter).
    let beats: Vec<_> = gw
        .seen_kind("report")
        .into_iter()
        .filter(|r| r.heartbeat())
        .collect();
    for beat in &beats {
        assert_eq!(beat.observed(), [("a".to_owned(), hash('a'))]);
    }
    for pair in beats.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_millis(850) && gap < Duration::from_millis(1500),
            "{gap:?}"
        );
    }
    agent.stop().await;
}

#[tokio::test]
async fn a_failing_gateway_costs_a_bounded_number_of_requests_and_the_agent_recovers() {
    let failing_for = Duration::from_secs(3);
    let gw = FakeGateway::start(
        Behaviour {
            fail_until: Some(Instant::now() + failing_for),
            ..Behaviour::default()
        },
        &[("a", 'a')],
    )
    .await;
    let agent = RunningAgent::start(config(&gw.url));
    wait_until(
        Duration::from_secs(8),
        "recovery: a report of the document",
        || async {
            gw.seen_kind("report")
                .iter()
                .any(|r| r.status == 200 && !r.observed().is_empty())
        },
    )
    .await;
    let failed: Vec<_> = gw.seen().into_iter().filter(|s| s.status == 503).collect();
    // Backoff 100 ms doubling to 1 s with full jitter: about 9 attempts per loop in 3 s, two
    // loops. A hot loop would make thousands.
    assert!(
        failed.len() >= 4 && failed.len() <= 40,
        "{} failed requests in {failing_for:?}",
        failed.len()
    );
    let s = agent.metrics.snapshot();
    assert_eq!(s.backoffs as usize, failed.len());
    assert_eq!(s.connect.ok, 1);
    assert_eq!(
        s.connect.http_error + s.desired.http_error + s.report.http_error,
        failed.len() as u64
    );
    // The poll loop recovered too and is long-polling again.
    wait_until(Duration::from_secs(2), "a held long poll", || async {
        gw.held_polls() == 1
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn an_unreachable_gateway_is_retried_with_backoff() {
    // Bind then drop a listener: connections to that port are refused.
    let port = apollo_test_support::free_port();
    let agent = RunningAgent::start(config(&format!("http://127.0.0.1:{port}")));
    wait_until(Duration::from_secs(5), "some failed attempts", || async {
        agent.metrics.snapshot().backoffs >= 4
    })
    .await;
    let before = agent.metrics.snapshot();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = agent.metrics.snapshot();
    assert!(after.connect.transport_error > 0 && after.desired.transport_error > 0);
    // Ceilings are at 1 s by now: at most ~2/s per loop on average, with a 50 ms floor as worst case.
    let attempts = after.total_requests() - before.total_requests();
    assert!(attempts <= 16, "{attempts} attempts in 2 s");
    assert_eq!(after.connect.ok + after.desired.ok + after.report.ok, 0);
    agent.stop().await;
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let gw = FakeGateway::start(
        Behaviour {
            fail_next: 1,
            retry_after: Some("2".into()),
            ..Behaviour::default()
        },
        &[],
    )
    .await;
    let mut cfg = config(&gw.url);
    cfg.backoff.cap = Duration::from_millis(200);
    // Only the report loop talks first (connect); keep the poll loop out of the script.
    cfg.poll_wait = Duration::from_secs(30);
    let agent = RunningAgent::start(cfg);
    wait_until(
        Duration::from_secs(6),
        "a successful request after the 503",
        || async { gw.seen().iter().filter(|s| s.status != 503).count() >= 2 },
    )
    .await;
    let seen = gw.seen();
    let failed = seen.iter().find(|s| s.status == 503).expect("one failure");
    let retry = seen
        .iter()
        .find(|s| s.kind == failed.kind && s.at > failed.at)
        .expect("a retry");
    let gap = retry.at - failed.at;
    assert!(
        gap >= Duration::from_secs(2) && gap < Duration::from_secs(3),
        "{} retried after {gap:?}",
        failed.kind
    );
    assert_eq!(agent.metrics.snapshot().retry_after_honoured, 1);
    agent.stop().await;
}

#[tokio::test]
async fn cancellation_ends_long_polls_and_backoff_waits_at_once() {
    let gw = FakeGateway::start(Behaviour::default(), &[("a", 'a')]).await;
    let agent = RunningAgent::start(config(&gw.url));
    wait_until(Duration::from_secs(5), "a held long poll", || async {
        gw.held_polls() == 1
    })
    .await;
    let took = agent.stop().await;
    assert!(took < Duration::from_millis(500), "stopping took {took:?}");

    let gw = FakeGateway::start(
        Behaviour {
            fail_next: 100,
            retry_after: Some("60".into()),
            ..Behaviour::default()
        },
        &[],
    )
    .await;
    let agent = RunningAgent::start(config(&gw.url));
    wait_until(Duration::from_secs(5), "both loops backing off", || async {
        agent.metrics.snapshot().retry_after_honoured == 2
    })
    .await;
    let took = agent.stop().await;
    assert!(took < Duration::from_millis(500), "stopping took {took:?}");
}
