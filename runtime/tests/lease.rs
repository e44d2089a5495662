//! The Lease protocol against kubesim over real HTTP: one winner among contenders, hand-over on
//! release, and no take-over judged by wall clocks.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apollo_runtime::lease::{Attempt, Held, LeaseLock};
use apollo_test_support::KubeSimProc;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};

const DURATION: Duration = Duration::from_secs(2);

async fn leases() -> (KubeSimProc, Api<Lease>) {
    let sim = KubeSimProc::start().await;
    let api = Api::namespaced(sim.client().await, "default");
    (sim, api)
}

fn lock(api: &Api<Lease>, identity: &str) -> LeaseLock {
    LeaseLock::new(api.clone(), "the-lease", identity, DURATION)
}

fn holder(lease: &Lease) -> Option<String> {
    lease.spec.as_ref().and_then(|s| s.holder_identity.clone())
}

#[tokio::test]
async fn of_two_contenders_one_holds_and_a_release_hands_over_at_once() {
    let (_sim, api) = leases().await;
    let writes = Arc::new(AtomicUsize::new(0));
    let counted = writes.clone();
    let mut a = lock(&api, "a").on_write(Arc::new(move |_, _| {
        counted.fetch_add(1, Ordering::SeqCst);
    }));
    let mut b = lock(&api, "b");

    let (ra, rb) = tokio::join!(a.try_acquire_or_renew(), b.try_acquire_or_renew());
    let outcomes = [ra.expect("a"), rb.expect("b")];
    let held = outcomes
        .iter()
        .filter(|o| matches!(o, Attempt::Held(_)))
        .count();
    assert_eq!(held, 1, "exactly one creator wins: {outcomes:?}");
    // Make `a` the holder whatever the race said, by releasing b's if b won.
    if matches!(outcomes[1], Attempt::Held(_)) {
        assert!(b.release().await.expect("release"));
        assert_eq!(
            a.try_acquire_or_renew().await.expect("a"),
            Attempt::Held(Held::TookOver {
                previous: String::new()
            })
        );
    }
    assert_eq!(
        a.try_acquire_or_renew().await.expect("renew"),
        Attempt::Held(Held::Renewed)
    );
    assert_eq!(
        holder(&api.get("the-lease").await.expect("get")).as_deref(),
        Some("a")
    );
    // A live lease is not taken, and releasing what one does not hold does nothing.
    assert_eq!(
        b.try_acquire_or_renew().await.expect("b"),
        Attempt::HeldByOther
    );
    assert!(!b.release().await.expect("release"));

    // Released: the other takes it on its next attempt, without waiting for expiry.
    assert!(a.release().await.expect("release"));
    assert_eq!(
        b.try_acquire_or_renew().await.expect("b"),
        Attempt::Held(Held::TookOver {
            previous: String::new()
        })
    );
    let lease = api.get("the-lease").await.expect("get");
    assert_eq!(holder(&lease).as_deref(), Some("b"));
    assert!(lease.spec.and_then(|s| s.lease_transitions).unwrap_or(0) >= 1);
    assert!(
        writes.load(Ordering::SeqCst) >= 2,
        "a's writes were observed"
    );
}

/// A record written by a holder whose clock is far behind ours (renewTime years ago) looks
/// expired to a wall-clock comparison; it must still be taken only after a whole lease duration
/// without change, and not at all while its holder keeps renewing.
#[tokio::test]
async fn take_over_waits_a_lease_duration_on_our_clock_whatever_renew_time_says() {
    let (_sim, api) = leases().await;
    let stale_looking: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "the-lease"},
        "spec": {
            "holderIdentity": "skewed",
            "leaseDurationSeconds": 2,
            "acquireTime": "2020-01-01T00:00:00.000000Z",
            "renewTime": "2020-01-01T00:00:00.000000Z",
            "leaseTransitions": 0
        }
    }))
    .expect("lease");
    api.create(&PostParams::default(), &stale_looking)
        .await
        .expect("create");
    let mut me = lock(&api, "me");

    // The holder keeps renewing (with its skewed clock): never ours.
    let renewing_until = Instant::now() + 2 * DURATION;
    while Instant::now() < renewing_until {
        assert_eq!(
            me.try_acquire_or_renew().await.expect("attempt"),
            Attempt::HeldByOther
        );
        // The holder renews: any write bumps the resourceVersion, which is all we go by.
        let mut lease = api.get("the-lease").await.expect("get");
        lease.metadata.annotations =
            Some([("renewals".to_owned(), format!("{:?}", Instant::now()))].into());
        api.replace("the-lease", &PostParams::default(), &lease)
            .await
            .expect("renew");
        tokio::time::sleep(DURATION / 4).await;
    }

    // It stops renewing: ours only once we have seen it unchanged for a whole duration.
    let stopped = Instant::now();
    assert_eq!(
        me.try_acquire_or_renew().await.expect("attempt"),
        Attempt::HeldByOther
    );
    let deadline = stopped + 5 * DURATION;
    loop {
        match me.try_acquire_or_renew().await.expect("attempt") {
            Attempt::Held(held) => {
                assert_eq!(
                    held,
                    Held::TookOver {
                        previous: "skewed".into()
                    }
                );
                break;
            }
            Attempt::HeldByOther => {
                assert!(Instant::now() < deadline, "never taken over");
                tokio::time::sleep(DURATION / 10).await;
            }
        }
    }
    assert!(
        stopped.elapsed() >= DURATION,
        "taken after {:?}, before a whole lease duration",
        stopped.elapsed()
    );
}
