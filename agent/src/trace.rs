//! W3C Trace Context `traceparent` for reports, so one report can be followed through router,
//! gateway, Redis and the Kubernetes patch it causes.

use rand::Rng;

/// Header name (lowercase, as HTTP/2 requires).
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// A fresh, sampled root `traceparent`: `00-<32 hex trace id>-<16 hex span id>-01`.
/// Ids are random and never all zero (an all-zero id is invalid and would be dropped).
pub fn new_traceparent(rng: &mut impl Rng) -> String {
    let trace_id: u128 = rng.random_range(1..=u128::MAX);
    let span_id: u64 = rng.random_range(1..=u64::MAX);
    format!("00-{trace_id:032x}-{span_id:016x}-01")
}

/// Whether `value` is a well-formed version-00 `traceparent`.
pub fn is_valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let lower_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    matches!(parts.as_slice(), [version, trace, span, flags]
        if *version == "00"
            && lower_hex(trace, 32)
            && lower_hex(span, 16)
            && lower_hex(flags, 2)
            && trace.bytes().any(|b| b != b'0')
            && span.bytes().any(|b| b != b'0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_traceparents_are_valid_and_distinct() {
        let mut rng = rand::rng();
        let a = new_traceparent(&mut rng);
        let b = new_traceparent(&mut rng);
        assert!(is_valid_traceparent(&a), "{a}");
        assert!(is_valid_traceparent(&b), "{b}");
        assert_ne!(a[3..35], b[3..35]);
        assert_eq!(a.len(), 55);
    }

    #[test]
    fn validator_rejects_malformed_values() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(is_valid_traceparent(ok));
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "",
        ] {
            assert!(!is_valid_traceparent(bad), "{bad}");
        }
    }
}
