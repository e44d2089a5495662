//! Names of children and label values: pure, deterministic, the same on every replica.
//!
//! # Child names
//! A deployment `D` selecting device `S` owns the DeviceProcess `D-S`. When that name is not a
//! valid object name (longer than 253 characters, or not a DNS-1123 subdomain), the name is
//! `<prefix>-<hash>`: `hash` is the first 10 hex digits of SHA-256 over `D/S` (`/` cannot occur
//! in either name, so distinct pairs never hash the same input), and `prefix` is `D-S` lowercased,
//! with every character outside `[a-z0-9-]` replaced by `-`, cut so the whole name fits in 253
//! characters, with leading and trailing `-` removed. The rule depends only on `D` and `S`, so
//! every controller replica and every restart derives the same name.
//!
//! `D-S` is ambiguous: `bgp` + `leaf-spine-1` and `bgp-leaf` + `spine-1` both give
//! `bgp-leaf-spine-1`. When another owner already holds `D-S`, the child is named with the hashed
//! form instead ([`hashed_child_name`]), which is unique per pair. Which of the two names a child
//! has is remembered by the child itself: the planner keeps whichever of the two exists.
//!
//! # Label values
//! Label values are limited to 63 characters, but device and deployment names may be up to 253.
//! [`label_value`] keeps valid values as they are and otherwise applies the same prefix-plus-hash
//! rule within 63 characters. Readers that need the exact device use `spec.deviceRef.name`.

use sha2::{Digest, Sha256};

/// Longest object name Kubernetes accepts (DNS-1123 subdomain).
pub const MAX_NAME_LEN: usize = 253;
/// Longest label value Kubernetes accepts.
pub const MAX_LABEL_VALUE_LEN: usize = 63;
/// Hex digits of SHA-256 kept in a shortened name (40 bits: collisions are not a practical concern
/// among the children of one namespace).
pub const HASH_HEX_LEN: usize = 10;

/// The preferred name of the DeviceProcess that `deployment` keeps on `device` (see the module
/// docs): `D-S` when valid, else the hashed form.
pub fn child_name(deployment: &str, device: &str) -> String {
    let plain = format!("{deployment}-{device}");
    if plain.len() <= MAX_NAME_LEN && is_dns1123_subdomain(&plain) {
        return plain;
    }
    hashed_child_name(deployment, device)
}

/// The name that is unique to the pair (`deployment`, `device`): a sanitised `D-S` prefix and the
/// hash of `D/S`. Used when `D-S` is invalid or held by another owner.
pub fn hashed_child_name(deployment: &str, device: &str) -> String {
    let hash = short_hash(&format!("{deployment}/{device}"));
    let prefix: String = format!("{deployment}-{device}")
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .take(MAX_NAME_LEN - HASH_HEX_LEN - 1)
        .collect();
    join_prefix_and_hash(prefix.trim_matches('-'), &hash)
}

/// The names a child of (`deployment`, `device`) may have, preferred first (one when the
/// preferred name is already the hashed one).
pub fn candidate_names(deployment: &str, device: &str) -> Vec<String> {
    let preferred = child_name(deployment, device);
    let hashed = hashed_child_name(deployment, device);
    if preferred == hashed {
        vec![preferred]
    } else {
        vec![preferred, hashed]
    }
}

/// `value` if it is a valid label value, otherwise a stable shortened form (see the module docs).
pub fn label_value(value: &str) -> String {
    if is_label_value(value) {
        return value.to_owned();
    }
    let hash = short_hash(value);
    let prefix: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(MAX_LABEL_VALUE_LEN - HASH_HEX_LEN - 1)
        .collect();
    join_prefix_and_hash(
        prefix.trim_matches(|c: char| !c.is_ascii_alphanumeric()),
        &hash,
    )
}

fn join_prefix_and_hash(prefix: &str, hash: &str) -> String {
    if prefix.is_empty() {
        hash.to_owned()
    } else {
        format!("{prefix}-{hash}")
    }
}

/// First [`HASH_HEX_LEN`] hex digits of SHA-256 over `input`.
pub fn short_hash(input: &str) -> String {
    let digest = hex::encode(Sha256::digest(input.as_bytes()));
    digest[..HASH_HEX_LEN].to_owned()
}

/// DNS-1123 subdomain: dot-separated labels of `[a-z0-9-]`, each starting and ending with an
/// alphanumeric, at most 253 characters in all.
pub fn is_dns1123_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.split('.').all(|label| {
            let bytes = label.as_bytes();
            !bytes.is_empty()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
                && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
                && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        })
}

/// Label value: empty, or at most 63 characters of `[A-Za-z0-9-_.]` starting and ending with an
/// alphanumeric.
pub fn is_label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    value.is_empty()
        || (bytes.len() <= MAX_LABEL_VALUE_LEN
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
            && bytes.last().is_some_and(u8::is_ascii_alphanumeric))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_deployment_dash_device() {
        assert_eq!(child_name("logger", "tor1-01"), "logger-tor1-01");
        assert_eq!(child_name("logger", "tor1.sfo"), "logger-tor1.sfo");
    }

    #[test]
    fn overlong_names_get_a_stable_hashed_suffix_within_the_limit() {
        let device = "d".repeat(250);
        let name = child_name("logger", &device);
        assert_eq!(name.len(), MAX_NAME_LEN);
        assert!(is_dns1123_subdomain(&name));
        assert!(name.starts_with("logger-ddd"));
        assert_eq!(name, child_name("logger", &device), "stable");
        let other = child_name("logger", &format!("{}e", "d".repeat(249)));
        assert_ne!(name, other, "different devices, different names");
        assert_eq!(
            &name[name.len() - HASH_HEX_LEN..],
            &short_hash(&format!("logger/{device}"))
        );
        assert_eq!(candidate_names("logger", &device), [name]);
    }

    #[test]
    fn invalid_names_are_sanitised_and_hashed() {
        let name = child_name("logger", "Tor_01");
        assert!(is_dns1123_subdomain(&name), "{name}");
        assert!(name.starts_with("logger-tor-01-"), "{name}");
        assert_eq!(name.len(), "logger-tor-01-".len() + HASH_HEX_LEN);
    }

    #[test]
    fn ambiguous_pairs_share_the_plain_name_but_never_the_hashed_one() {
        assert_eq!(child_name("bgp", "leaf-spine-1"), "bgp-leaf-spine-1");
        assert_eq!(child_name("bgp-leaf", "spine-1"), "bgp-leaf-spine-1");
        let a = hashed_child_name("bgp", "leaf-spine-1");
        let b = hashed_child_name("bgp-leaf", "spine-1");
        assert_ne!(a, b);
        assert!(
            a.starts_with("bgp-leaf-spine-1-") && is_dns1123_subdomain(&a),
            "{a}"
        );
        assert_eq!(
            candidate_names("bgp", "leaf-spine-1"),
            ["bgp-leaf-spine-1".to_owned(), a]
        );
    }

    #[test]
    fn dns_subdomain_rule() {
        assert!(is_dns1123_subdomain("a-b.c1"));
        assert!(!is_dns1123_subdomain("a..b"));
        assert!(!is_dns1123_subdomain("-a"));
        assert!(!is_dns1123_subdomain("a-"));
        assert!(!is_dns1123_subdomain("A"));
        assert!(!is_dns1123_subdomain(""));
        assert!(!is_dns1123_subdomain(&"a".repeat(254)));
    }

    #[test]
    fn long_label_values_are_shortened_stably() {
        assert_eq!(label_value("tor1-01"), "tor1-01");
        let long = "x".repeat(100);
        let v = label_value(&long);
        assert!(is_label_value(&v), "{v}");
        assert_eq!(v.len(), MAX_LABEL_VALUE_LEN);
        assert_eq!(v, label_value(&long));
        assert_ne!(v, label_value(&"x".repeat(101)));
    }
}
