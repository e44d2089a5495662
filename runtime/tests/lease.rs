//! The Lease protocol against the real Kubernetes control plane: one winner among contenders,
//! hand-over on release, and no take-over judged by wall clocks. The locks act as the gateway's
//! ServiceAccount, whose only Lease rights are those of `deploy/rbac/gateway.yaml` (Role
//! apollo-gateway-leases: get, create, update), so these tests also show that the LeaseLock needs
//! nothing more.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apollo_runtime::lease::{Attempt, Held, LeaseLock};
use apollo_test_support::{Component, ControlPlane, TestNamespace};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};

const DURATION: Duration = Duration::from_secs(2);

/// A namespace of the test's own on the shared control plane, the Leases API in it as the
/// gateway's ServiceAccount (for the locks), and as the admin (for the test's own set-up and
/// reads).
async fn leases() -> (TestNamespace, Api<Lease>, Api<Lease>) {
    let control_plane = ControlPlane::shared().await;
    let ns = TestNamespace::create(control_plane, "lease").await;
    let as_gateway = Api::namespaced(ns.client_as(Component::Gateway).await, ns.name());
    let admin = ns.api();
    (ns, as_gateway, admin)
}

/// Every request the locks made was a get, create or update of `the-lease` by the gateway's
/// identity that RBAC allowed (lost races answer 409, never 403).
async fn assert_only_allowed_lease_calls(ns: &TestNamespace) {
    let requests = ns.requests().await;
    assert!(
        !requests.is_empty(),
        "the locks' requests are in the audit log"
    );
    let gateway = ns.username(Component::Gateway);
    let unexpected: Vec<_> = requests
        .iter()
        .filter(|r| {
            r.user != gateway
                || r.group != "coordination.k8s.io"
                || r.resource != "leases"
                || r.name != "the-lease"
                || !["get", "create", "update"].contains(&r.verb.as_str())
                || matches!(r.code, 401 | 403)
        })
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:#?}");
}

fn lock(api: &Api<Lease>, identity: &str) -> LeaseLock {
    LeaseLock::new(api.clone(), "the-lease", identity, DURATION)
}

fn holder(lease: &Lease) -> Option<String> {
    lease.spec.as_ref().and_then(|s| s.holder_identity.clone())
}

#[tokio::test]
async fn of_two_contenders_one_holds_and_a_release_hands_over_at_once() {
    let (ns, api, admin) = leases().await;
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
        holder(&admin.get("the-lease").await.expect("get")).as_deref(),
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
    let lease = admin.get("the-lease").await.expect("get");
    assert_eq!(holder(&lease).as_deref(), Some("b"));
    assert!(lease.spec.and_then(|s| s.lease_transitions).unwrap_or(0) >= 1);
    assert!(
        writes.load(Ordering::SeqCst) >= 2,
        "a's writes were observed"
    );
    assert_only_allowed_lease_calls(&ns).await;
}

/// A record written by a holder whose clock is far behind ours (renewTime years ago) looks
/// expired to a wall-clock comparison; it must still be taken only after a whole lease duration
/// without change, and not at all while its holder keeps renewing.
#[tokio::test]
async fn take_over_waits_a_lease_duration_on_our_clock_whatever_renew_time_says() {
    let (ns, api, admin) = leases().await;
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
    admin
        .create(&PostParams::default(), &stale_looking)
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
        let mut lease = admin.get("the-lease").await.expect("get");
        lease.metadata.annotations =
            Some([("renewals".to_owned(), format!("{:?}", Instant::now()))].into());
        admin
            .replace("the-lease", &PostParams::default(), &lease)
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
    let lease = admin.get("the-lease").await.expect("get");
    assert_eq!(holder(&lease).as_deref(), Some("me"));
    assert_eq!(lease.spec.and_then(|s| s.lease_transitions), Some(1));
    assert_only_allowed_lease_calls(&ns).await;
}

/// Take-over and renewal are `update`s carrying the resourceVersion that was read: when two
/// replicas take a released Lease at the same moment, the apiserver lets exactly one of them
/// write (the other gets 409, which is a lost race, not an error).
#[tokio::test]
async fn of_two_replicas_taking_a_released_lease_at_once_exactly_one_wins() {
    let (ns, api, admin) = leases().await;
    let mut a = lock(&api, "a");
    assert_eq!(
        a.try_acquire_or_renew().await.expect("a"),
        Attempt::Held(Held::Created)
    );
    let mut b = lock(&api, "b");
    let mut c = lock(&api, "c");
    // Both read the live lease first, so the released record is new to both.
    assert_eq!(
        b.try_acquire_or_renew().await.expect("b"),
        Attempt::HeldByOther
    );
    assert_eq!(
        c.try_acquire_or_renew().await.expect("c"),
        Attempt::HeldByOther
    );
    assert!(a.release().await.expect("release"));

    let mut winners = Vec::new();
    for _ in 0..20 {
        let (rb, rc) = tokio::join!(b.try_acquire_or_renew(), c.try_acquire_or_renew());
        let (rb, rc) = (rb.expect("b"), rc.expect("c"));
        match (&rb, &rc) {
            (Attempt::Held(_), Attempt::Held(_)) => panic!("both hold the lease: {rb:?} {rc:?}"),
            (Attempt::Held(_), _) => winners.push("b"),
            (_, Attempt::Held(_)) => winners.push("c"),
            _ => panic!("nobody took the released lease: {rb:?} {rc:?}"),
        }
        let lease = admin.get("the-lease").await.expect("get");
        assert_eq!(holder(&lease).as_deref(), winners.last().copied());
        // Hand it back for the next round.
        let winner = if winners.last() == Some(&"b") {
            &mut b
        } else {
            &mut c
        };
        assert!(winner.release().await.expect("release"));
    }
    // Concurrent writes the apiserver refused as conflicts show up in its audit log.
    let conflicts = ns
        .requests()
        .await
        .into_iter()
        .filter(|r| r.verb == "update" && r.code == 409)
        .count();
    assert!(
        conflicts >= 1,
        "in 20 rounds at least one take-over race reached the apiserver as a 409"
    );
    assert_only_allowed_lease_calls(&ns).await;
}
