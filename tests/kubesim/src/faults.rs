//! Test observability and fault injection: request counters and injected failures.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What a request was, in audit-log terms.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct RequestKey {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
}

/// Counts of API requests by verb, group, resource and subresource.
#[derive(Debug, Default)]
pub struct RequestCounts {
    counts: BTreeMap<RequestKey, u64>,
}

impl RequestCounts {
    pub fn record(&mut self, key: RequestKey) {
        *self.counts.entry(key).or_default() += 1;
    }

    pub fn reset(&mut self) {
        self.counts.clear();
    }

    /// `{"requests":[{"verb","group","resource","subresource","count"}]}`.
    pub fn render(&self) -> Value {
        let requests: Vec<Value> = self
            .counts
            .iter()
            .map(|(key, count)| {
                json!({"verb": key.verb, "group": key.group, "resource": key.resource, "subresource": key.subresource, "count": count})
            })
            .collect();
        json!({"requests": requests})
    }
}

/// One `POST /kubesim/faults` body. Every match field is optional and matches anything when absent;
/// `subresource: ""` matches only the main resource.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verb: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subresource: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Answer with this HTTP status (409 Conflict, 429, 500, 503, ...). On a watch, 410 is sent
    /// the way the apiserver sends it: a 200 stream whose only event is an ERROR 410 Expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    /// Sent as the `Retry-After` header (and `details.retryAfterSeconds`) with `code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
    /// Delay before the request is handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// How many matching requests the rule affects; absent means until `DELETE /kubesim/faults`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<u64>,
    /// Close every open watch stream now (clients see the stream end and re-watch).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drop_watches: bool,
}

/// The request a fault rule is matched against.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    pub resource: &'a str,
    pub subresource: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
}

/// What fault injection decided for one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultAction {
    pub latency_ms: u64,
    pub code: Option<u16>,
    pub retry_after_seconds: Option<u64>,
}

impl FaultRule {
    fn matches(&self, facts: &RequestFacts<'_>) -> bool {
        let field =
            |wanted: &Option<String>, actual: &str| wanted.as_deref().is_none_or(|w| w == actual);
        field(&self.verb, facts.verb)
            && field(&self.group, facts.group)
            && field(&self.resource, facts.resource)
            && field(&self.subresource, facts.subresource)
            && field(&self.namespace, facts.namespace)
            && field(&self.name, facts.name)
    }

    /// Whether the rule does anything beyond the one-shot `dropWatches`.
    pub fn is_persistent(&self) -> bool {
        self.code.is_some() || self.latency_ms.is_some()
    }
}

/// Active fault rules, consulted on every API request.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Vec<FaultRule>,
}

impl Faults {
    pub fn add(&mut self, rule: FaultRule) {
        self.rules.push(rule);
    }

    pub fn clear(&mut self) {
        self.rules.clear();
    }

    pub fn render(&self) -> Value {
        json!({"faults": self.rules})
    }

    /// Finds the first live matching rule, uses up one of its `times`, and says what to do.
    pub fn decide(&mut self, facts: &RequestFacts<'_>) -> Option<FaultAction> {
        let index = self
            .rules
            .iter()
            .position(|rule| rule.times != Some(0) && rule.matches(facts))?;
        let rule = &mut self.rules[index];
        if let Some(times) = rule.times.as_mut() {
            *times -= 1;
        }
        let action = FaultAction {
            latency_ms: rule.latency_ms.unwrap_or(0),
            code: rule.code,
            retry_after_seconds: rule.retry_after_seconds,
        };
        self.rules.retain(|rule| rule.times != Some(0));
        Some(action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(verb: &'a str, subresource: &'a str) -> RequestFacts<'a> {
        RequestFacts {
            verb,
            group: "azure.com",
            resource: "deviceprocesses",
            subresource,
            namespace: "default",
            name: "x",
        }
    }

    #[test]
    fn counted_rules_expire_and_subresource_empty_means_main_only() {
        let mut faults = Faults::default();
        let rule: FaultRule = serde_json::from_value(json!({"verb": "patch", "resource": "deviceprocesses", "subresource": "", "code": 409, "times": 2})).expect("rule");
        faults.add(rule);
        assert_eq!(faults.decide(&facts("patch", "status")), None);
        assert_eq!(
            faults.decide(&facts("patch", "")).and_then(|a| a.code),
            Some(409)
        );
        assert_eq!(
            faults.decide(&facts("patch", "")).and_then(|a| a.code),
            Some(409)
        );
        assert_eq!(faults.decide(&facts("patch", "")), None);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(serde_json::from_value::<FaultRule>(json!({"verbs": "get"})).is_err());
    }
}
