//! Request budgets (issue 13, defect 7): one device token holding long polls, `If-None-Match: *`
//! included, cannot take the replica's budget and starve other devices' reports. The real
//! gateway binary over real sockets, Redis and the control plane.

mod common;

use std::time::Duration;

use apollo_test_support::wait_until;
use common::*;

/// Opens a long poll of `device` presenting `etag`; the task ends with its status code.
fn hold(stack: &Stack, device: &str, etag: &str) -> tokio::task::JoinHandle<u16> {
    let request = stack
        .http
        .get(format!("{}?waitSeconds=30", stack.desired_url(device)))
        .header("x-device-token", stack.token(device))
        .header("if-none-match", etag);
    tokio::spawn(async move {
        request
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    })
}

#[tokio::test]
async fn one_device_s_long_polls_cannot_starve_other_devices_reports() {
    // A budget of 4 requests: before the fix, long polls counted against it.
    let stack = Stack::start_with(Options {
        extra: vec!["--max-concurrent-requests".into(), "4".into()],
        ..Options::default()
    })
    .await;
    stack.create("dp-hog", "dev-hog", "alpine:1").await;
    stack.create("dp-victim", "dev-victim", "alpine:1").await;
    let hog_etag = stack.wait_for_items("dev-hog", 1).await;
    stack.wait_for_items("dev-victim", 1).await;

    // The hog opens eight long polls at once: each is either held or answered at once.
    let polls: Vec<_> = (0..8).map(|_| hold(&stack, "dev-hog", &hog_etag)).collect();
    wait_until(
        DEADLINE,
        "every long poll of the hog held or answered",
        || async {
            let answered = polls.iter().filter(|p| p.is_finished()).count();
            let held = stack.metric("apollo_gateway_long_poll_waiters", &[]).await as usize;
            answered + held == polls.len()
        },
    )
    .await;
    // Other devices report and fetch as usual, several times over the request budget's size.
    for _ in 0..10 {
        assert_eq!(stack.report("dev-victim", &[]).await.status(), 200);
        assert_eq!(stack.desired("dev-victim", None, None).await.status(), 200);
    }
    // Because the hog holds only two: the other six were refused with 429.
    assert_eq!(
        stack.metric("apollo_gateway_long_poll_waiters", &[]).await,
        2.0
    );
    assert_eq!(
        stack
            .metric(
                "apollo_gateway_requests_shed_total",
                &["budget=\"device_long_polls\""],
            )
            .await,
        6.0
    );
    // `If-None-Match: *` (matches any document, so it waits too) counts the same.
    let star = hold(&stack, "dev-hog", "*").await.expect("join");
    assert_eq!(star, 429);

    let mut codes = Vec::new();
    stack.change_spec("dp-hog", "alpine:2").await;
    for poll in polls {
        codes.push(
            tokio::time::timeout(Duration::from_secs(20), poll)
                .await
                .expect("every long poll ends")
                .expect("join"),
        );
    }
    codes.sort_unstable();
    assert_eq!(codes, [200, 200, 429, 429, 429, 429, 429, 429]);
}
