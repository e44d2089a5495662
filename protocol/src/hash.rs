//! Content hashes of specs.
//!
//! `specHash = "sha256:" + hex(sha256(canonical JSON of the spec))`, where canonical JSON has object
//! keys sorted by their UTF-8 bytes and no insignificant whitespace. The hash depends only on the
//! spec's content, never on field order or on how a client serialised it.

use serde::Serialize;
use sha2::{Digest, Sha256};

/// Prefix of every spec hash.
pub const SPEC_HASH_PREFIX: &str = "sha256:";

/// `sha256:<64 lowercase hex>` of the canonical JSON of `spec`.
pub fn spec_hash<T: Serialize>(spec: &T) -> String {
    // Serialising our own spec types to a Value cannot fail (no non-string map keys).
    let value = serde_json::to_value(spec).unwrap_or(serde_json::Value::Null);
    value_hash(&value)
}

/// Hash of an already-parsed JSON value (see [`spec_hash`]).
pub fn value_hash(value: &serde_json::Value) -> String {
    let mut canonical = String::new();
    write_canonical(value, &mut canonical);
    let digest = Sha256::digest(canonical.as_bytes());
    format!("{SPEC_HASH_PREFIX}{}", hex::encode(digest))
}

/// Whether `s` has the shape of a spec hash: `sha256:` followed by 64 lowercase hex digits.
pub fn is_spec_hash(s: &str) -> bool {
    s.strip_prefix(SPEC_HASH_PREFIX).is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Canonical JSON: sorted keys, no whitespace. Independent of serde_json's map ordering feature.
pub fn canonical_json(value: &serde_json::Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

/// Identifiers of one desired item that the ETag covers.
pub struct EtagItem<'a> {
    /// metadata.namespace.
    pub namespace: &'a str,
    /// metadata.name.
    pub name: &'a str,
    /// metadata.generation.
    pub generation: i64,
    /// specHash of the item.
    pub spec_hash: &'a str,
}

/// Strong, quoted ETag of a desired document, computed from stable identifiers only (never by
/// re-serialising specs): the heartbeat interval plus namespace/name/generation/specHash of each
/// item, in the document's order. Its form is `"<32 lowercase hex>"`.
pub fn desired_etag<'a>(
    heartbeat_interval_seconds: u64,
    items: impl IntoIterator<Item = EtagItem<'a>>,
) -> String {
    let mut h = Sha256::new();
    h.update(b"apollo-desired-v1\n");
    h.update(heartbeat_interval_seconds.to_string().as_bytes());
    for item in items {
        // Newline-separated fields; none of them can contain a newline (Kubernetes names,
        // integers and hex hashes), so the encoding is unambiguous.
        h.update(b"\n");
        h.update(item.namespace.as_bytes());
        h.update(b"\n");
        h.update(item.name.as_bytes());
        h.update(b"\n");
        h.update(item.generation.to_string().as_bytes());
        h.update(b"\n");
        h.update(item.spec_hash.as_bytes());
    }
    let digest = h.finalize();
    format!("\"{}\"", hex::encode(&digest[..16]))
}

/// Whether an `If-None-Match` header value matches `etag` (handles lists, `*` and weak `W/` forms,
/// using the weak comparison RFC 9110 prescribes for If-None-Match).
pub fn if_none_match_matches(header: &str, etag: &str) -> bool {
    let bare = etag.trim_start_matches("W/");
    header
        .split(',')
        .map(str::trim)
        .any(|candidate| candidate == "*" || candidate.trim_start_matches("W/") == bare)
}

fn write_canonical(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (key, val)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                write_canonical(val, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::String(s) => write_string(s, out),
        // Null, Bool and Number have exactly one compact rendering.
        other => out.push_str(&other.to_string()),
    }
}

fn write_string(s: &str, out: &mut String) {
    out.push_str(&serde_json::Value::String(s.to_owned()).to_string());
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_keys_and_drops_whitespace() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{ "b": [1, {"z": null, "a": true}], "a": "x\"y" }"#)
                .expect("parse");
        assert_eq!(
            canonical_json(&v),
            r#"{"a":"x\"y","b":[1,{"a":true,"z":null}]}"#
        );
    }

    #[test]
    fn hash_is_independent_of_field_order() {
        let a: serde_json::Value = serde_json::from_str(
            r#"{"artifact":{"type":"oci","url":"u"},"deviceRef":{"name":"d"}}"#,
        )
        .expect("parse");
        let b: serde_json::Value = serde_json::from_str(
            r#"{"deviceRef":{"name":"d"},"artifact":{"url":"u","type":"oci"}}"#,
        )
        .expect("parse");
        assert_eq!(value_hash(&a), value_hash(&b));
    }

    #[test]
    fn hash_changes_when_any_field_changes() {
        let base = json!({"deviceRef":{"name":"d"},"artifact":{"type":"oci","url":"u"},
                          "execution":{"backend":"container","args":["a"]}});
        let h = value_hash(&base);
        for changed in [
            json!({"deviceRef":{"name":"e"},"artifact":{"type":"oci","url":"u"},"execution":{"backend":"container","args":["a"]}}),
            json!({"deviceRef":{"name":"d"},"artifact":{"type":"http","url":"u"},"execution":{"backend":"container","args":["a"]}}),
            json!({"deviceRef":{"name":"d"},"artifact":{"type":"oci","url":"v"},"execution":{"backend":"container","args":["a"]}}),
            json!({"deviceRef":{"name":"d"},"artifact":{"type":"oci","url":"u"},"execution":{"backend":"systemd","args":["a"]}}),
            json!({"deviceRef":{"name":"d"},"artifact":{"type":"oci","url":"u"},"execution":{"backend":"container","args":["b"]}}),
            json!({"deviceRef":{"name":"d"},"artifact":{"type":"oci","url":"u"},"execution":{"backend":"container","args":["a","a"]}}),
        ] {
            assert_ne!(value_hash(&changed), h, "{changed}");
        }
    }

    #[test]
    fn typed_spec_hash_matches_value_hash_and_has_the_right_shape() {
        #[derive(serde::Serialize)]
        struct Spec {
            url: String,
            args: Vec<String>,
        }
        let spec = Spec {
            url: "alpine".into(),
            args: vec!["a".into()],
        };
        let h = spec_hash(&spec);
        assert!(is_spec_hash(&h), "{h}");
        assert_eq!(h, value_hash(&json!({"args": ["a"], "url": "alpine"})));
    }

    fn item<'a>(name: &'a str, generation: i64, spec_hash: &'a str) -> EtagItem<'a> {
        EtagItem {
            namespace: "default",
            name,
            generation,
            spec_hash,
        }
    }

    #[test]
    fn etag_is_strong_quoted_and_changes_exactly_with_identifiers() {
        let a = desired_etag(15, [item("a", 1, "sha256:1"), item("b", 1, "sha256:2")]);
        assert!(
            a.starts_with('"') && a.ends_with('"') && a.len() == 34,
            "{a}"
        );
        assert_eq!(
            a,
            desired_etag(15, [item("a", 1, "sha256:1"), item("b", 1, "sha256:2")])
        );
        assert_ne!(
            a,
            desired_etag(15, [item("a", 2, "sha256:1"), item("b", 1, "sha256:2")])
        );
        assert_ne!(
            a,
            desired_etag(15, [item("a", 1, "sha256:9"), item("b", 1, "sha256:2")])
        );
        assert_ne!(
            a,
            desired_etag(30, [item("a", 1, "sha256:1"), item("b", 1, "sha256:2")])
        );
        assert_ne!(a, desired_etag(15, [item("a", 1, "sha256:1")]));
        assert_ne!(desired_etag(15, []), desired_etag(15, [item("", 0, "")]));
    }

    #[test]
    fn if_none_match_handles_lists_star_and_weak() {
        let e = "\"abc\"";
        assert!(if_none_match_matches("\"abc\"", e));
        assert!(if_none_match_matches("\"x\", \"abc\"", e));
        assert!(if_none_match_matches("W/\"abc\"", e));
        assert!(if_none_match_matches("*", e));
        assert!(!if_none_match_matches("\"abd\"", e));
        assert!(!if_none_match_matches("abc", e));
    }

    #[test]
    fn spec_hash_shape_check() {
        assert!(is_spec_hash(&format!("sha256:{}", "a".repeat(64))));
        assert!(!is_spec_hash(&format!("sha256:{}", "A".repeat(64))));
        assert!(!is_spec_hash(&format!("sha256:{}", "a".repeat(63))));
        assert!(!is_spec_hash(&format!("md5:{}", "a".repeat(64))));
        assert!(!is_spec_hash(""));
    }
}
