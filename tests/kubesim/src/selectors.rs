//! Label and field selectors, parsed from query strings and matched against stored objects.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::error::ApiError;

#[derive(Debug, Clone, PartialEq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed `labelSelector`: every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

/// Splits on commas that are not inside parentheses (`a in (x,y),b`).
fn split_top_level(input: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in input.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&input[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse_set(raw: &str, selector: &str) -> Result<BTreeSet<String>, ApiError> {
    let inner = raw
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "unable to parse requirement: found '{raw}', expected: '(' in \"{selector}\""
            ))
        })?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    pub fn parse(selector: &str) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        for part in split_top_level(selector) {
            let requirement = if let Some(key) = part.strip_prefix('!') {
                LabelRequirement::DoesNotExist(key.trim().to_string())
            } else if let Some((key, value)) = part.split_once("!=") {
                LabelRequirement::NotEquals(key.trim().into(), value.trim().into())
            } else if let Some((key, value)) = part.split_once("==") {
                LabelRequirement::Equals(key.trim().into(), value.trim().into())
            } else if let Some((key, value)) = part.split_once('=') {
                LabelRequirement::Equals(key.trim().into(), value.trim().into())
            } else if let Some((key, set)) = part.split_once(" notin ") {
                LabelRequirement::NotIn(key.trim().into(), parse_set(set, selector)?)
            } else if let Some((key, set)) = part.split_once(" in ") {
                LabelRequirement::In(key.trim().into(), parse_set(set, selector)?)
            } else if part.contains(' ') || part.contains('(') {
                return Err(ApiError::bad_request(format!(
                    "unable to parse requirement: {part:?} in label selector {selector:?}"
                )));
            } else {
                LabelRequirement::Exists(part.to_string())
            };
            requirements.push(requirement);
        }
        Ok(Self { requirements })
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let label = |key: &str| labels.get(key).and_then(Value::as_str);
        self.requirements.iter().all(|r| match r {
            LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelRequirement::In(k, set) => label(k).is_some_and(|l| set.contains(l)),
            LabelRequirement::NotIn(k, set) => label(k).is_none_or(|l| !set.contains(l)),
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::DoesNotExist(k) => label(k).is_none(),
        })
    }
}

/// A parsed `fieldSelector` (`=`, `==`, `!=`, comma-separated).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector {
    requirements: Vec<(String, bool, String)>,
}

/// Field selector fields core/v1 Events support beyond `metadata.*`.
const EVENT_FIELDS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
];

/// Field selector fields events.k8s.io/v1 supports, mapped to the stored core/v1 form.
fn events_v1_field(field: &str) -> Option<String> {
    if let Some(rest) = field.strip_prefix("regarding.") {
        return Some(format!("involvedObject.{rest}"));
    }
    match field {
        "reason" | "type" => Some(field.to_string()),
        "reportingController" => Some("reportingComponent".into()),
        _ => None,
    }
}

impl FieldSelector {
    /// Parses a selector for `kind` and rejects fields the kind does not index (400, like the apiserver).
    /// `plural` and `group` pick the supported field set; field names are mapped to the stored form.
    pub fn parse(selector: &str, group: &str, plural: &str) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        for part in selector.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{selector}'; can't understand '{part}'"
                )));
            };
            let field = field.trim();
            let stored_field = match (group, plural, field) {
                (_, _, "metadata.name" | "metadata.namespace") => field.to_string(),
                ("", "events", f) if EVENT_FIELDS.contains(&f) => f.to_string(),
                ("events.k8s.io", "events", f) => {
                    events_v1_field(f).ok_or_else(|| unsupported(f))?
                }
                ("", "namespaces", "status.phase") => field.to_string(),
                _ => return Err(unsupported(field)),
            };
            requirements.push((stored_field, equal, value.trim().to_string()));
        }
        Ok(Self { requirements })
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.requirements.iter().all(|(field, equal, expected)| {
            let actual = field_value(object, field);
            (actual == *expected) == *equal
        })
    }
}

fn unsupported(field: &str) -> ApiError {
    ApiError::bad_request(format!("field label not supported: {field}"))
}

/// A field's value as the apiserver's field set renders it: missing fields read as "".
fn field_value(object: &Value, field: &str) -> String {
    let path: Vec<&str> = if field == "source" {
        vec!["source", "component"]
    } else {
        field.split('.').collect()
    };
    let mut current = object;
    for key in path {
        current = &current[key];
    }
    match current {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}})
    }

    #[test]
    fn label_selector_supports_every_operator() {
        let o = object(json!({"app": "web", "tier": "front"}));
        let cases = [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app in (web, db)", true),
            ("app notin (web,db)", false),
            ("app notin (db)", true),
            ("tier", true),
            ("!tier", false),
            ("!missing", true),
            ("missing notin (x)", true),
            ("app=web,tier=back", false),
            ("app in (web),tier", true),
            ("", true),
        ];
        for (selector, expected) in cases {
            let parsed = LabelSelector::parse(selector).expect(selector);
            assert_eq!(parsed.matches(&o), expected, "{selector}");
        }
    }

    #[test]
    fn label_selector_rejects_garbage() {
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("a b").is_err());
    }

    #[test]
    fn field_selector_rejects_unsupported_fields_with_400() {
        let error = FieldSelector::parse("spec.foo=bar", "azure.com", "deviceprocesses")
            .expect_err("must fail");
        assert_eq!(error.code, 400);
        assert_eq!(error.message, "field label not supported: spec.foo");
    }

    #[test]
    fn field_selector_matches_names_and_event_fields() {
        let o = object(json!({}));
        let s = FieldSelector::parse("metadata.name=a,metadata.namespace!=other", "", "pods")
            .expect("parse");
        assert!(s.matches(&o));
        let event = json!({"metadata": {"name": "e"}, "involvedObject": {"kind": "Foo", "name": "x", "namespace": ""}, "source": {"component": "c"}});
        let s = FieldSelector::parse(
            "involvedObject.kind=Foo,involvedObject.name=x,involvedObject.namespace=,source=c",
            "",
            "events",
        )
        .expect("parse");
        assert!(s.matches(&event));
        let s = FieldSelector::parse("regarding.name=x", "events.k8s.io", "events").expect("parse");
        assert!(s.matches(&event));
    }
}
