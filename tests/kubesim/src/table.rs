//! Server-side printing (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`), as `kubectl get`
//! requests it: Name, the CRD's additionalPrinterColumns (a JSONPath subset), date columns as ages.

use serde_json::{json, Value};

use crate::kinds::{age_column, KindInfo, PrinterColumn};

/// Whether the client asked for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

/// What each row carries in `object`, from the `includeObject` query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(value: Option<&str>) -> Self {
        match value {
            Some("None") => Self::None,
            Some("Object") => Self::Object,
            _ => Self::Metadata,
        }
    }
}

/// Formats a duration as `kubectl` and the apiserver do (`apimachinery` `duration.HumanDuration`).
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    let seconds = seconds.max(0);
    if seconds < 120 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let rest = seconds % 60;
        return if rest == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{rest}s")
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = seconds / 3600;
    if hours < 8 {
        let rest = minutes % 60;
        return if rest == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{rest}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let rest = hours % 24;
        let days = hours / 24;
        return if rest == 0 {
            format!("{days}d")
        } else {
            format!("{days}d{rest}h")
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    let years = hours / 24 / 365;
    if hours < 24 * 365 * 8 {
        let days = (hours / 24) % 365;
        return if days == 0 {
            format!("{years}y")
        } else {
            format!("{years}y{days}d")
        };
    }
    format!("{years}y")
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    Index(usize),
    All,
    /// `[?(@.a.b=="x")]` or `!=`.
    Filter {
        path: Vec<String>,
        equals: bool,
        value: String,
    },
}

fn parse_filter(inner: &str) -> Option<Step> {
    let expression = inner.strip_prefix("?(")?.strip_suffix(')')?.trim();
    let (left, equals, right) = if let Some((l, r)) = expression.split_once("!=") {
        (l, false, r)
    } else {
        let (l, r) = expression.split_once("==")?;
        (l, true, r)
    };
    let path = left
        .trim()
        .strip_prefix('@')?
        .split('.')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let value = right
        .trim()
        .trim_matches('"')
        .trim_matches('\'')
        .to_string();
    Some(Step::Filter {
        path,
        equals,
        value,
    })
}

/// Parses the JSONPath subset printer columns use: `.a.b`, `[0]`, `[*]`, `['key']`, filters.
fn parse_json_path(expression: &str) -> Option<Vec<Step>> {
    let expression = expression.trim();
    let expression = expression
        .strip_prefix('{')
        .and_then(|e| e.strip_suffix('}'))
        .unwrap_or(expression);
    let expression = expression.strip_prefix('$').unwrap_or(expression);
    let mut steps = Vec::new();
    let mut rest = expression;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('.') {
            let end = after.find(['.', '[']).unwrap_or(after.len());
            if end > 0 {
                steps.push(Step::Field(after[..end].to_string()));
            }
            rest = &after[end..];
        } else if let Some(after) = rest.strip_prefix('[') {
            let mut depth = 1;
            let mut end = None;
            for (i, c) in after.char_indices() {
                match c {
                    '[' => depth += 1,
                    ']' => {
                        depth -= 1;
                        if depth == 0 {
                            end = Some(i);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let end = end?;
            let inner = after[..end].trim();
            steps.push(if inner == "*" {
                Step::All
            } else if let Ok(index) = inner.parse() {
                Step::Index(index)
            } else if inner.starts_with('?') {
                parse_filter(inner)?
            } else {
                Step::Field(inner.trim_matches('\'').trim_matches('"').to_string())
            });
            rest = &after[end + 1..];
        } else {
            return None;
        }
    }
    Some(steps)
}

fn scalar_string(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Evaluates a printer column's JSONPath and returns every match.
pub fn evaluate(expression: &str, object: &Value) -> Vec<Value> {
    let Some(steps) = parse_json_path(expression) else {
        return Vec::new();
    };
    let mut current = vec![object.clone()];
    for step in steps {
        let mut next = Vec::new();
        for value in current {
            match &step {
                Step::Field(name) => {
                    if let Some(child) = value.get(name.as_str()) {
                        next.push(child.clone());
                    }
                }
                Step::Index(index) => {
                    if let Some(child) = value.get(*index) {
                        next.push(child.clone());
                    }
                }
                Step::All => {
                    if let Some(items) = value.as_array() {
                        next.extend(items.iter().cloned());
                    } else if let Some(fields) = value.as_object() {
                        next.extend(fields.values().cloned());
                    }
                }
                Step::Filter {
                    path,
                    equals,
                    value: wanted,
                } => {
                    for item in value.as_array().into_iter().flatten() {
                        let mut field = item;
                        for key in path {
                            field = &field[key.as_str()];
                        }
                        let hit = !field.is_null() && scalar_string(field) == *wanted;
                        if hit == *equals {
                            next.push(item.clone());
                        }
                    }
                }
            }
        }
        current = next;
    }
    current
}

fn seconds_since(timestamp: &str) -> Option<i64> {
    let then: jiff::Timestamp = timestamp.parse().ok()?;
    Some(jiff::Timestamp::now().as_second() - then.as_second())
}

fn cell(column: &PrinterColumn, object: &Value) -> Value {
    let Some(value) = evaluate(&column.json_path, object).into_iter().next() else {
        return Value::Null;
    };
    match column.type_.as_str() {
        "date" => value
            .as_str()
            .and_then(seconds_since)
            .map_or(Value::Null, |s| Value::String(human_duration(s))),
        "string" => Value::String(scalar_string(&value)),
        _ => value,
    }
}

/// The printer columns of a kind; Age when it defines none.
fn columns(kind: &KindInfo) -> Vec<PrinterColumn> {
    if kind.printer_columns.is_empty() {
        vec![age_column()]
    } else {
        kind.printer_columns.clone()
    }
}

pub fn column_definitions(kind: &KindInfo) -> Vec<Value> {
    let mut definitions = vec![json!({
        "name": "Name",
        "type": "string",
        "format": "name",
        "description": "Name must be unique within a namespace.",
        "priority": 0,
    })];
    definitions.extend(columns(kind).into_iter().map(|c| {
        json!({"name": c.name, "type": c.type_, "format": c.format, "description": c.description, "priority": c.priority})
    }));
    definitions
}

/// One row; `object` is the presented object.
pub fn row(kind: &KindInfo, object: &Value, include: IncludeObject) -> Value {
    let mut cells = vec![object["metadata"]["name"].clone()];
    cells.extend(columns(kind).iter().map(|c| cell(c, object)));
    let mut row = json!({"cells": cells});
    match include {
        IncludeObject::None => {}
        IncludeObject::Metadata => {
            row["object"] = json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": object["metadata"],
            });
        }
        IncludeObject::Object => row["object"] = object.clone(),
    }
    row
}

pub fn table(
    kind: &KindInfo,
    rows: Vec<Value>,
    resource_version: u64,
    continue_token: Option<String>,
) -> Value {
    let mut metadata = json!({"resourceVersion": resource_version.to_string()});
    if let Some(token) = continue_token {
        metadata["continue"] = Value::String(token);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": column_definitions(kind),
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_path_subset_handles_fields_indexes_and_filters() {
        let object = json!({
            "spec": {"deviceRef": {"name": "tor1"}, "list": [1, 2]},
            "status": {"conditions": [{"type": "A", "status": "False"}, {"type": "Ready", "status": "True"}]},
        });
        assert_eq!(
            evaluate(".spec.deviceRef.name", &object),
            vec![json!("tor1")]
        );
        assert_eq!(evaluate("{.spec.list[1]}", &object), vec![json!(2)]);
        assert_eq!(evaluate(".spec.list[*]", &object), vec![json!(1), json!(2)]);
        assert_eq!(
            evaluate(r#".status.conditions[?(@.type=="Ready")].status"#, &object),
            vec![json!("True")]
        );
        assert_eq!(
            evaluate(r#".status.conditions[?(@.type!="Ready")].type"#, &object),
            vec![json!("A")]
        );
        assert!(evaluate(".status.missing", &object).is_empty());
    }

    #[test]
    fn human_durations_match_kubectl() {
        for (seconds, expected) in [
            (0, "0s"),
            (59, "59s"),
            (119, "119s"),
            (125, "2m5s"),
            (600, "10m"),
            (3 * 3600 + 60, "3h1m"),
            (30 * 3600, "30h"),
            (3 * 86400 + 3600, "3d1h"),
            (40 * 86400, "40d"),
            (3 * 365 * 86400, "3y"),
        ] {
            assert_eq!(human_duration(seconds), expected, "{seconds}");
        }
    }

    #[test]
    fn wants_table_only_when_table_is_preferred() {
        assert!(wants_table("application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"));
        assert!(!wants_table("application/json"));
    }
}
