//! Pure decisions of the desired-state loop: which ETag to keep, which hashes to report, how long
//! to wait before the next poll, which heartbeat interval to use.

use std::collections::HashMap;
use std::time::Duration;

use apollo_protocol::wire::{DesiredDocument, Observation};

/// Shortest heartbeat interval the agent accepts from a gateway; protects against a zero.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Longest heartbeat interval the agent accepts from a gateway.
pub const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3600);
/// Spacing between polls after a changed document: a burst of spec edits costs a handful of
/// requests, not a request per edit as fast as the network allows.
pub const MIN_SPACING_AFTER_CHANGE: Duration = Duration::from_millis(100);

/// The ETag to send as `If-None-Match` next time. The stored tag is never cleared: a response
/// without an ETag (a 304 from a gateway or proxy that drops it) keeps the old one, otherwise the
/// agent would fall back to fetching the full document on every poll.
pub fn retained_etag(stored: Option<String>, received: Option<&str>) -> Option<String> {
    match received.map(str::trim) {
        Some(tag) if !tag.is_empty() => Some(tag.to_owned()),
        _ => stored,
    }
}

/// A DeviceProcess, by namespace and name.
pub type ObjectKey = (String, String);

/// Hashes the gateway has acknowledged, per DeviceProcess.
pub type Acknowledged = HashMap<ObjectKey, String>;

fn observation_of(item: &apollo_protocol::wire::DesiredItem) -> Observation {
    Observation {
        namespace: item.namespace.clone(),
        name: item.name.clone(),
        observed_spec_hash: item.spec_hash.clone(),
    }
}

/// Every item of the document as an observation (what a heartbeat carries, so a gateway that lost
/// its state is repaired by the next heartbeat).
pub fn all_observations(doc: Option<&DesiredDocument>) -> Vec<Observation> {
    doc.map(|d| d.items.iter().map(observation_of).collect())
        .unwrap_or_default()
}

/// Items whose hash the gateway has not acknowledged yet: new DeviceProcesses and changed specs.
pub fn changed_observations(
    doc: Option<&DesiredDocument>,
    acknowledged: &Acknowledged,
) -> Vec<Observation> {
    let Some(doc) = doc else {
        return Vec::new();
    };
    doc.items
        .iter()
        .filter(|item| {
            acknowledged
                .get(&(item.namespace.clone(), item.name.clone()))
                .is_none_or(|hash| *hash != item.spec_hash)
        })
        .map(observation_of)
        .collect()
}

/// Record what an acknowledged report carried, and forget DeviceProcesses that left the document
/// (so one that comes back is reported again).
pub fn record_acknowledged(
    acknowledged: &mut Acknowledged,
    sent: &[Observation],
    doc: Option<&DesiredDocument>,
) {
    for o in sent {
        acknowledged.insert(
            (o.namespace.clone(), o.name.clone()),
            o.observed_spec_hash.clone(),
        );
    }
    acknowledged.retain(|(namespace, name), _| {
        doc.is_some_and(|d| {
            d.items
                .iter()
                .any(|i| i.namespace == *namespace && i.name == *name)
        })
    });
}

/// What a finished poll brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollResult {
    /// A document different from the one held.
    Changed,
    /// A 304, or a 200 carrying the document already held.
    Unchanged,
}

/// How long to wait before the next poll, given how long ago the finished one started. A long
/// poll that was held for its full wait is followed at once; one answered early (a gateway without
/// long poll, a shutting-down replica, a proxy) is spaced so the agent never hot-loops.
pub fn next_poll_delay(
    result: PollResult,
    since_poll_started: Duration,
    min_poll_interval: Duration,
) -> Duration {
    let spacing = match result {
        PollResult::Changed => MIN_SPACING_AFTER_CHANGE.min(min_poll_interval),
        PollResult::Unchanged => min_poll_interval,
    };
    spacing.saturating_sub(since_poll_started)
}

/// The heartbeat interval to use after the gateway announced `seconds`: zero means the gateway
/// expressed no preference (the current interval stays), anything else is kept within sane bounds.
pub fn heartbeat_interval_from_gateway(seconds: u64, current: Duration) -> Duration {
    if seconds == 0 {
        return current;
    }
    Duration::from_secs(seconds).clamp(MIN_HEARTBEAT_INTERVAL, MAX_HEARTBEAT_INTERVAL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use apollo_protocol::wire::DesiredItem;

    fn hash(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn doc(items: &[(&str, char)]) -> DesiredDocument {
        DesiredDocument {
            device_name: "tor1-01".into(),
            heartbeat_interval_seconds: 15,
            items: items
                .iter()
                .map(|(name, h)| DesiredItem {
                    uid: format!("uid-{name}"),
                    namespace: "default".into(),
                    name: (*name).into(),
                    generation: 1,
                    spec: serde_json::json!({}),
                    spec_hash: hash(*h),
                })
                .collect(),
        }
    }

    fn names(obs: &[Observation]) -> Vec<&str> {
        obs.iter().map(|o| o.name.as_str()).collect()
    }

    #[test]
    fn etag_is_replaced_by_a_new_one_and_never_cleared() {
        let stored = Some("\"a\"".to_owned());
        assert_eq!(
            retained_etag(stored.clone(), Some("\"b\"")),
            Some("\"b\"".into())
        );
        assert_eq!(retained_etag(stored.clone(), None), stored);
        assert_eq!(retained_etag(stored.clone(), Some("")), stored);
        assert_eq!(retained_etag(stored.clone(), Some("  ")), stored);
        assert_eq!(retained_etag(None, None), None);
        assert_eq!(retained_etag(None, Some("\"c\"")), Some("\"c\"".into()));
    }

    #[test]
    fn first_document_reports_everything() {
        let d = doc(&[("a", 'a'), ("b", 'b')]);
        assert_eq!(
            names(&changed_observations(Some(&d), &Acknowledged::new())),
            ["a", "b"]
        );
        assert!(changed_observations(None, &Acknowledged::new()).is_empty());
    }

    #[test]
    fn only_new_and_changed_hashes_are_reported() {
        let mut acked = Acknowledged::new();
        let first = doc(&[("a", 'a'), ("b", 'b')]);
        record_acknowledged(&mut acked, &all_observations(Some(&first)), Some(&first));
        assert!(changed_observations(Some(&first), &acked).is_empty());

        let second = doc(&[("a", 'a'), ("b", 'c'), ("c", 'd')]);
        let changed = changed_observations(Some(&second), &acked);
        assert_eq!(names(&changed), ["b", "c"]);
        assert_eq!(changed[0].observed_spec_hash, hash('c'));
        // A heartbeat still carries every item.
        assert_eq!(names(&all_observations(Some(&second))), ["a", "b", "c"]);
    }

    #[test]
    fn unacknowledged_changes_stay_pending_and_removed_items_are_forgotten() {
        let mut acked = Acknowledged::new();
        let first = doc(&[("a", 'a'), ("b", 'b')]);
        // Only "a" made it into an acknowledged report.
        record_acknowledged(
            &mut acked,
            &all_observations(Some(&first))[..1],
            Some(&first),
        );
        assert_eq!(names(&changed_observations(Some(&first), &acked)), ["b"]);

        // "a" leaves the document, then comes back with the same hash: it is reported again.
        let without_a = doc(&[("b", 'b')]);
        record_acknowledged(&mut acked, &[], Some(&without_a));
        assert!(!acked.contains_key(&("default".into(), "a".into())));
        assert_eq!(
            names(&changed_observations(Some(&first), &acked)),
            ["a", "b"]
        );
    }

    #[test]
    fn poll_spacing_prevents_hot_loops_but_not_long_polls() {
        let min = Duration::from_secs(1);
        // A 304 that came back at once waits out the rest of the minimum interval.
        assert_eq!(
            next_poll_delay(PollResult::Unchanged, Duration::from_millis(10), min),
            Duration::from_millis(990)
        );
        // A long poll held for its wait is followed immediately.
        assert_eq!(
            next_poll_delay(PollResult::Unchanged, Duration::from_secs(30), min),
            Duration::ZERO
        );
        // A change is followed quickly, but never in a tight loop.
        assert_eq!(
            next_poll_delay(PollResult::Changed, Duration::ZERO, min),
            MIN_SPACING_AFTER_CHANGE
        );
        assert_eq!(
            next_poll_delay(PollResult::Changed, Duration::from_millis(500), min),
            Duration::ZERO
        );
    }

    #[test]
    fn heartbeat_interval_follows_the_gateway_within_bounds() {
        let current = Duration::from_secs(7);
        assert_eq!(heartbeat_interval_from_gateway(0, current), current);
        assert_eq!(
            heartbeat_interval_from_gateway(15, current),
            Duration::from_secs(15)
        );
        assert_eq!(
            heartbeat_interval_from_gateway(u64::MAX, current),
            MAX_HEARTBEAT_INTERVAL
        );
    }
}
