//! Label selectors: matching is `kube::core::Selector`'s; this module adds the checks Kubernetes
//! makes that kube's conversion does not (`metav1.LabelSelectorAsSelector` and the DaemonSet
//! validation), so a selector the apiserver would call invalid never selects anything here:
//!
//! - an empty selector (no `matchLabels`, no `matchExpressions`) is invalid, as it is for a
//!   DaemonSet: it would select every device (the CRD rejects it too, with a CEL rule; objects
//!   stored before that rule existed are still refused here);
//! - `In` / `NotIn` need at least one value (kube accepts an empty list);
//! - `Exists` / `DoesNotExist` take none (kube ignores them);
//! - the operator must be one of those four (checked first, for a message naming it).
//!
//! A selector is validated as a whole before any object is matched, so an invalid selector selects
//! nothing *and* says why, instead of silently matching a subset.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::core::{Selector as KubeSelector, SelectorExt};

/// Why a selector cannot be evaluated. The message is stable for a given selector, so it can be
/// put in a status condition without causing write churn.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// Neither `matchLabels` nor `matchExpressions`: it would select everything.
    #[error("empty selector is invalid: it would select every NetworkSwitch")]
    Empty,
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
    /// kube refused the selector for a reason not listed above.
    #[error("{0}")]
    Unparsable(String),
}

/// A validated selector, cheap to match against many label sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector(KubeSelector);

impl Selector {
    /// Validate `selector` as a deployment's: empty is invalid.
    pub fn new(selector: &LabelSelector) -> Result<Self, SelectorError> {
        let empty = selector
            .match_labels
            .as_ref()
            .is_none_or(BTreeMap::is_empty)
            && selector
                .match_expressions
                .as_ref()
                .is_none_or(Vec::is_empty);
        if empty {
            return Err(SelectorError::Empty);
        }
        Self::allowing_empty(selector)
    }

    /// Validate `selector` where an empty one means "everything" (a canary selector).
    pub fn allowing_empty(selector: &LabelSelector) -> Result<Self, SelectorError> {
        for (index, expr) in selector.match_expressions.iter().flatten().enumerate() {
            check(index, expr)?;
        }
        KubeSelector::try_from(selector.clone())
            .map(Self)
            .map_err(|e| SelectorError::Unparsable(e.to_string()))
    }

    /// Whether an object with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.matches(labels)
    }
}

fn check(index: usize, expr: &LabelSelectorRequirement) -> Result<(), SelectorError> {
    let needs_values = match expr.operator.as_str() {
        "In" | "NotIn" => true,
        "Exists" | "DoesNotExist" => false,
        other => {
            return Err(SelectorError::UnknownOperator {
                index,
                key: expr.key.clone(),
                operator: other.to_owned(),
            })
        }
    };
    let has_values = expr.values.as_ref().is_some_and(|v| !v.is_empty());
    let fault = || (index, expr.key.clone(), expr.operator.clone());
    match (needs_values, has_values) {
        (true, false) => {
            let (index, key, operator) = fault();
            Err(SelectorError::MissingValues {
                index,
                key,
                operator,
            })
        }
        (false, true) => {
            let (index, key, operator) = fault();
            Err(SelectorError::UnexpectedValues {
                index,
                key,
                operator,
            })
        }
        _ => Ok(()),
    }
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
    fn an_empty_selector_is_invalid_for_a_deployment_and_everything_for_a_canary() {
        for empty in [
            LabelSelector::default(),
            LabelSelector {
                match_labels: Some(BTreeMap::new()),
                match_expressions: Some(vec![]),
            },
        ] {
            assert_eq!(Selector::new(&empty), Err(SelectorError::Empty));
            let all = Selector::allowing_empty(&empty).expect("valid canary selector");
            assert!(all.matches(&labels(&[])));
            assert!(all.matches(&labels(&[("role", "tor")])));
        }
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
    fn what_kubernetes_refuses_is_refused_with_a_stable_message_though_kube_accepts_it() {
        let unknown = selector(&[], vec![expr("role", "Equals", Some(&["tor"]))]);
        let err = Selector::new(&unknown).expect_err("unknown operator");
        assert_eq!(
            err.to_string(),
            r#"matchExpressions[0] (key "role"): unknown operator "Equals""#
        );
        // kube's own conversion accepts both of these; Kubernetes does not.
        let no_values = selector(&[], vec![expr("role", "In", Some(&[]))]);
        assert!(KubeSelector::try_from(no_values.clone()).is_ok());
        assert!(matches!(
            Selector::new(&no_values),
            Err(SelectorError::MissingValues { .. })
        ));
        let missing_list = selector(&[], vec![expr("role", "NotIn", None)]);
        assert!(matches!(
            Selector::new(&missing_list),
            Err(SelectorError::MissingValues { .. })
        ));
        let stray_values = selector(&[], vec![expr("role", "Exists", Some(&["x"]))]);
        assert!(KubeSelector::try_from(stray_values.clone()).is_ok());
        assert!(matches!(
            Selector::new(&stray_values),
            Err(SelectorError::UnexpectedValues { .. })
        ));
    }
}
