//! Label selector matching with Kubernetes semantics (`metav1.LabelSelectorAsSelector`).
//!
//! - An empty selector (no `matchLabels`, no `matchExpressions`) selects everything.
//! - `In` / `NotIn` need at least one value; `Exists` / `DoesNotExist` take none.
//! - `NotIn` matches objects that lack the key (as in Kubernetes).
//!
//! A selector is validated as a whole before any object is matched, so an invalid selector selects
//! nothing *and* says why, instead of silently matching a subset.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

/// Why a selector cannot be evaluated. The message is stable for a given selector, so it can be
/// put in a status condition without causing write churn.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// The operator is not one of In, NotIn, Exists, DoesNotExist.
    #[error("matchExpressions[{index}] (key {key:?}): unknown operator {operator:?}")]
    UnknownOperator {
        index: usize,
        key: String,
        operator: String,
    },
    /// In / NotIn with an empty value list.
    #[error(
        "matchExpressions[{index}] (key {key:?}): operator {operator} needs at least one value"
    )]
    MissingValues {
        index: usize,
        key: String,
        operator: String,
    },
    /// Exists / DoesNotExist with values.
    #[error("matchExpressions[{index}] (key {key:?}): operator {operator} takes no values")]
    UnexpectedValues {
        index: usize,
        key: String,
        operator: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// A validated selector, cheap to match against many label sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    operator: Operator,
    values: Vec<String>,
}

impl Selector {
    /// Validate `selector`.
    pub fn new(selector: &LabelSelector) -> Result<Self, SelectorError> {
        let mut requirements: Vec<Requirement> = selector
            .match_labels
            .iter()
            .flatten()
            .map(|(key, value)| Requirement {
                key: key.clone(),
                operator: Operator::In,
                values: vec![value.clone()],
            })
            .collect();
        for (index, expr) in selector.match_expressions.iter().flatten().enumerate() {
            requirements.push(requirement(index, expr)?);
        }
        Ok(Self { requirements })
    }

    /// Whether an object with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| {
            let value = labels.get(&r.key);
            match r.operator {
                Operator::In => value.is_some_and(|v| r.values.contains(v)),
                Operator::NotIn => value.is_none_or(|v| !r.values.contains(v)),
                Operator::Exists => value.is_some(),
                Operator::DoesNotExist => value.is_none(),
            }
        })
    }
}

fn requirement(
    index: usize,
    expr: &LabelSelectorRequirement,
) -> Result<Requirement, SelectorError> {
    let operator = match expr.operator.as_str() {
        "In" => Operator::In,
        "NotIn" => Operator::NotIn,
        "Exists" => Operator::Exists,
        "DoesNotExist" => Operator::DoesNotExist,
        other => {
            return Err(SelectorError::UnknownOperator {
                index,
                key: expr.key.clone(),
                operator: other.to_owned(),
            })
        }
    };
    let values = expr.values.clone().unwrap_or_default();
    let needs_values = matches!(operator, Operator::In | Operator::NotIn);
    if needs_values && values.is_empty() {
        return Err(SelectorError::MissingValues {
            index,
            key: expr.key.clone(),
            operator: expr.operator.clone(),
        });
    }
    if !needs_values && !values.is_empty() {
        return Err(SelectorError::UnexpectedValues {
            index,
            key: expr.key.clone(),
            operator: expr.operator.clone(),
        });
    }
    Ok(Requirement {
        key: expr.key.clone(),
        operator,
        values,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn expr(key: &str, operator: &str, values: Option<&[&str]>) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.to_owned(),
            operator: operator.to_owned(),
            values: values.map(|vs| vs.iter().map(|v| (*v).to_owned()).collect()),
        }
    }

    fn selector(
        match_labels: &[(&str, &str)],
        exprs: Vec<LabelSelectorRequirement>,
    ) -> LabelSelector {
        LabelSelector {
            match_labels: (!match_labels.is_empty()).then(|| labels(match_labels)),
            match_expressions: (!exprs.is_empty()).then_some(exprs),
        }
    }

    fn matches(sel: &LabelSelector, object: &[(&str, &str)]) -> bool {
        Selector::new(sel).expect("valid").matches(&labels(object))
    }

    #[test]
    fn empty_selector_selects_everything() {
        let sel = LabelSelector::default();
        assert!(matches(&sel, &[]));
        assert!(matches(&sel, &[("role", "tor")]));
    }

    #[test]
    fn match_labels_need_every_pair() {
        let sel = selector(&[("site", "sfo"), ("role", "tor")], vec![]);
        assert!(matches(
            &sel,
            &[("site", "sfo"), ("role", "tor"), ("rack", "r1")]
        ));
        assert!(!matches(&sel, &[("site", "sfo")]));
        assert!(!matches(&sel, &[("site", "sfo"), ("role", "spine")]));
    }

    #[test]
    fn in_needs_key_with_listed_value() {
        let sel = selector(&[], vec![expr("role", "In", Some(&["tor", "leaf"]))]);
        assert!(matches(&sel, &[("role", "leaf")]));
        assert!(!matches(&sel, &[("role", "spine")]));
        assert!(!matches(&sel, &[]));
    }

    #[test]
    fn not_in_matches_missing_key_and_unlisted_values() {
        let sel = selector(&[], vec![expr("role", "NotIn", Some(&["spine"]))]);
        assert!(matches(&sel, &[("role", "tor")]));
        assert!(matches(&sel, &[]));
        assert!(!matches(&sel, &[("role", "spine")]));
    }

    #[test]
    fn exists_and_does_not_exist_look_at_the_key_only() {
        let exists = selector(&[], vec![expr("drained", "Exists", None)]);
        assert!(matches(&exists, &[("drained", "")]));
        assert!(!matches(&exists, &[("role", "tor")]));
        let absent = selector(&[], vec![expr("drained", "DoesNotExist", Some(&[]))]);
        assert!(matches(&absent, &[("role", "tor")]));
        assert!(!matches(&absent, &[("drained", "yes")]));
    }

    #[test]
    fn labels_and_expressions_are_and_ed() {
        let sel = selector(
            &[("site", "sfo")],
            vec![
                expr("role", "In", Some(&["tor"])),
                expr("drained", "DoesNotExist", None),
            ],
        );
        assert!(matches(&sel, &[("site", "sfo"), ("role", "tor")]));
        assert!(!matches(&sel, &[("site", "sea"), ("role", "tor")]));
        assert!(!matches(
            &sel,
            &[("site", "sfo"), ("role", "tor"), ("drained", "y")]
        ));
    }

    #[test]
    fn invalid_expressions_are_refused_with_a_stable_message() {
        let unknown = selector(&[], vec![expr("role", "Equals", Some(&["tor"]))]);
        let err = Selector::new(&unknown).expect_err("unknown operator");
        assert_eq!(
            err.to_string(),
            r#"matchExpressions[0] (key "role"): unknown operator "Equals""#
        );
        let no_values = selector(&[], vec![expr("role", "In", Some(&[]))]);
        assert!(matches!(
            Selector::new(&no_values),
            Err(SelectorError::MissingValues { .. })
        ));
        let stray_values = selector(&[], vec![expr("role", "Exists", Some(&["x"]))]);
        assert!(matches!(
            Selector::new(&stray_values),
            Err(SelectorError::UnexpectedValues { .. })
        ));
    }
}
