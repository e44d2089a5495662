//! Splitting one report into requests the gateway accepts: at most
//! [`MAX_OBSERVATIONS`] observations and at most [`MAX_REPORT_BYTES`] of JSON each (the gateway,
//! and the router in front of it, answer 413 above that). Counting observations alone is not
//! enough: 200 DeviceProcesses with long names encode to more than 64 KiB.

use std::ops::Range;

use apollo_protocol::wire::{Observation, Report, MAX_OBSERVATIONS};
use apollo_protocol::MAX_REPORT_BYTES;

/// Ranges of `observations` such that `base` carrying each range encodes to at most `max_bytes`
/// and holds at most `max_count` observations. Always at least one range (empty for none), so a
/// heartbeat without observations is still sent. An observation too large on its own gets a
/// request of its own (the gateway will refuse it; nothing else is held back by it).
pub fn split_ranges(
    base: &Report,
    observations: &[Observation],
    max_bytes: usize,
    max_count: usize,
) -> Vec<Range<usize>> {
    let mut empty = base.clone();
    empty.observations.clear();
    let base_len = encoded_len(&empty);
    let mut ranges = Vec::new();
    let mut start = 0;
    let mut len = base_len;
    for (i, o) in observations.iter().enumerate() {
        let one = encoded_len(o);
        // A comma separates it from the previous observation of the same request.
        let added = if i > start { one + 1 } else { one };
        if i > start && (len + added > max_bytes || i - start >= max_count) {
            ranges.push(start..i);
            start = i;
            len = base_len + one;
        } else {
            len += added;
        }
    }
    ranges.push(start..observations.len());
    ranges
}

/// [`split_ranges`] with the gateway's limits.
pub fn report_ranges(base: &Report, observations: &[Observation]) -> Vec<Range<usize>> {
    split_ranges(base, observations, MAX_REPORT_BYTES, MAX_OBSERVATIONS)
}

fn encoded_len<T: serde::Serialize>(value: &T) -> usize {
    serde_json::to_vec(value).map_or(0, |v| v.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Report {
        Report {
            agent_version: "apollo-agent/0.1.0".into(),
            timestamp: "2026-12-03T12:00:00.123456789Z".into(),
            heartbeat: true,
            observations: vec![],
        }
    }

    fn observation(i: usize, name_len: usize) -> Observation {
        let mut name = format!("p{i}-");
        name.extend(std::iter::repeat_n(
            'x',
            name_len.saturating_sub(name.len()),
        ));
        Observation {
            namespace: "fleet-production-east".into(),
            name,
            observed_spec_hash: format!("sha256:{}", "a".repeat(64)),
        }
    }

    fn encoded(observations: &[Observation]) -> usize {
        let mut report = base();
        report.observations = observations.to_vec();
        encoded_len(&report)
    }

    #[test]
    fn two_hundred_long_names_fit_under_the_byte_limit_and_cover_everything_in_order() {
        let observations: Vec<_> = (0..200).map(|i| observation(i, 250)).collect();
        assert!(
            encoded(&observations) > MAX_REPORT_BYTES,
            "the case the count-only split got wrong"
        );
        let ranges = report_ranges(&base(), &observations);
        assert!(ranges.len() >= 2, "{ranges:?}");
        let mut next = 0;
        for r in &ranges {
            assert_eq!(r.start, next, "contiguous, in order");
            next = r.end;
            let bytes = encoded(&observations[r.clone()]);
            assert!(bytes <= MAX_REPORT_BYTES, "{r:?}: {bytes}");
            assert!(r.len() <= MAX_OBSERVATIONS);
        }
        assert_eq!(next, observations.len());
        // Greedy: each request but the last is full enough that the next observation would not fit.
        for pair in ranges.windows(2) {
            let grown = encoded(&observations[pair[0].start..=pair[0].end]);
            assert!(grown > MAX_REPORT_BYTES, "{pair:?}");
        }
    }

    #[test]
    fn the_count_limit_still_applies_to_short_names() {
        let observations: Vec<_> = (0..600).map(|i| observation(i, 5)).collect();
        let ranges = report_ranges(&base(), &observations);
        let lens: Vec<_> = ranges.iter().map(|r| r.len()).collect();
        assert_eq!(lens, [256, 256, 88]);
    }

    #[test]
    fn the_byte_count_is_exact_at_the_boundary() {
        let observations: Vec<_> = (0..10).map(|i| observation(i, 40)).collect();
        let exact = encoded(&observations[..4]);
        let ranges = split_ranges(&base(), &observations, exact, 100);
        assert_eq!(ranges[0], 0..4, "four fit exactly");
        let ranges = split_ranges(&base(), &observations, exact - 1, 100);
        assert_eq!(ranges[0], 0..3, "one byte less and only three do");
    }

    #[test]
    fn no_observations_is_one_empty_request_and_an_oversized_one_goes_alone() {
        let none = report_ranges(&base(), &[]);
        assert_eq!(none.len(), 1);
        assert!(none[0].is_empty());
        let observations = vec![observation(0, 10), observation(1, 500), observation(2, 10)];
        let limit = encoded(&observations[..1]) + 50;
        assert_eq!(
            split_ranges(&base(), &observations, limit, 100),
            [0..1, 1..2, 2..3]
        );
    }
}
