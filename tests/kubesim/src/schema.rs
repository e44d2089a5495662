//! Structural-schema handling for custom resources, in the apiserver's order: unknown fields are
//! pruned (or rejected with `fieldValidation=Strict`), nulls in non-nullable fields dropped,
//! `default`s applied, then types, `enum` and `required` validated (422 on failure).

use serde_json::{Map, Value};

/// The `fieldValidation` query parameter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FieldValidation {
    /// Unknown fields are an error (400), as `kubectl apply` asks by default.
    Strict,
    /// Unknown fields are dropped (the apiserver also warns).
    Warn,
    /// Unknown fields are dropped silently.
    #[default]
    Ignore,
}

impl FieldValidation {
    pub fn parse(value: Option<&str>) -> Self {
        match value {
            Some("Strict") => Self::Strict,
            Some("Warn") => Self::Warn,
            _ => Self::Ignore,
        }
    }
}

/// Why an object does not conform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaError {
    /// Fields the schema does not know, under `fieldValidation=Strict` (400).
    UnknownFields(Vec<String>),
    /// Type, enum or required violations (422).
    Invalid(Vec<Violation>),
}

/// One violation of the schema: the field path and what is wrong, as the apiserver words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub detail: String,
}

fn preserves_unknown(schema: &Value) -> bool {
    schema["x-kubernetes-preserve-unknown-fields"].as_bool() == Some(true)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Prunes unknown fields and non-nullable nulls, then applies defaults. Returns the paths of
/// unknown fields found (for Strict validation).
fn normalize(schema: &Value, value: &mut Value, path: &str, unknown: &mut Vec<String>) {
    match value {
        Value::Object(fields) => {
            let properties = schema["properties"].as_object();
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let keep_unknown =
                preserves_unknown(schema) || schema["additionalProperties"].as_bool() == Some(true);
            let keys: Vec<String> = fields.keys().cloned().collect();
            for key in keys {
                let child_schema = properties.and_then(|p| p.get(&key)).or(additional);
                match child_schema {
                    Some(child_schema) => {
                        let child_path = join(path, &key);
                        let drop_null = fields.get(&key).is_some_and(Value::is_null)
                            && child_schema["nullable"].as_bool() != Some(true);
                        if drop_null {
                            fields.remove(&key);
                        } else if let Some(child) = fields.get_mut(&key) {
                            normalize(child_schema, child, &child_path, unknown);
                        }
                    }
                    None if keep_unknown
                        || properties.is_none()
                            && additional.is_none()
                            && schema.get("type").is_none() => {}
                    None => {
                        fields.remove(&key);
                        unknown.push(join(path, &key));
                    }
                }
            }
            apply_defaults(schema, fields);
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items").filter(|i| i.is_object()) {
                for (index, item) in items.iter_mut().enumerate() {
                    normalize(item_schema, item, &format!("{path}[{index}]"), unknown);
                }
            }
        }
        _ => {}
    }
}

fn apply_defaults(schema: &Value, fields: &mut Map<String, Value>) {
    let Some(properties) = schema["properties"].as_object() else {
        return;
    };
    for (key, property) in properties {
        if fields.contains_key(key) {
            continue;
        }
        if let Some(default) = property.get("default") {
            let mut value = default.clone();
            normalize(property, &mut value, "", &mut Vec::new());
            fields.insert(key.clone(), value);
        }
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_matches(expected: &str, value: &Value) -> bool {
    match (expected, value) {
        (_, Value::Null) => true,
        ("number", Value::Number(_)) => true,
        (expected, value) => expected == type_name(value),
    }
}

fn validate(schema: &Value, value: &Value, path: &str, violations: &mut Vec<Violation>) {
    if schema["x-kubernetes-int-or-string"].as_bool() == Some(true) {
        if !matches!(value, Value::String(_) | Value::Number(_)) {
            violations.push(Violation {
                field: path.into(),
                detail: format!(
                    "Invalid value: \"{}\": {path} in body must be of type int-or-string",
                    type_name(value)
                ),
            });
        }
        return;
    }
    if let Some(expected) = schema["type"].as_str() {
        if !type_matches(expected, value) {
            violations.push(Violation {
                field: path.into(),
                detail: format!(
                    "Invalid value: \"{}\": {path} in body must be of type {expected}: \"{}\"",
                    type_name(value),
                    type_name(value)
                ),
            });
            return;
        }
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !value.is_null() && !allowed.contains(value) {
            let listed: Vec<String> = allowed.iter().map(Value::to_string).collect();
            violations.push(Violation {
                field: path.into(),
                detail: format!(
                    "Unsupported value: {value}: supported values: {}",
                    listed.join(", ")
                ),
            });
        }
    }
    match value {
        Value::Object(fields) => {
            if let Some(required) = schema["required"].as_array() {
                for name in required.iter().filter_map(Value::as_str) {
                    if !fields.contains_key(name) {
                        violations.push(Violation {
                            field: join(path, name),
                            detail: "Required value".into(),
                        });
                    }
                }
            }
            let properties = schema["properties"].as_object();
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (key, child) in fields {
                if let Some(child_schema) = properties.and_then(|p| p.get(key)).or(additional) {
                    validate(child_schema, child, &join(path, key), violations);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items").filter(|i| i.is_object()) {
                for (index, item) in items.iter().enumerate() {
                    validate(item_schema, item, &format!("{path}[{index}]"), violations);
                }
            }
        }
        _ => {}
    }
}

/// Normalizes a custom resource against its version's `openAPIV3Schema` and validates it.
/// `apiVersion`, `kind` and `metadata` belong to the server and are left alone.
pub fn conform(
    schema: &Value,
    object: &mut Value,
    validation: FieldValidation,
) -> Result<(), SchemaError> {
    let Some(fields) = object.as_object_mut() else {
        return Ok(());
    };
    let server_owned: Vec<(String, Value)> = ["apiVersion", "kind", "metadata"]
        .iter()
        .filter_map(|key| fields.remove(*key).map(|value| (key.to_string(), value)))
        .collect();
    let mut unknown = Vec::new();
    normalize(schema, object, "", &mut unknown);
    let mut violations = Vec::new();
    validate(schema, object, "", &mut violations);
    // `required: [spec]` style checks at the root ignore the server-owned fields removed above.
    violations.retain(|v| !matches!(v.field.as_str(), "apiVersion" | "kind" | "metadata"));
    if let Some(fields) = object.as_object_mut() {
        fields.extend(server_owned);
    }
    if validation == FieldValidation::Strict && !unknown.is_empty() {
        return Err(SchemaError::UnknownFields(unknown));
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(SchemaError::Invalid(violations))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "required": ["spec"],
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string"},
                        "replicas": {"type": "integer", "default": 1},
                        "mode": {"type": "string", "enum": ["a", "b"]},
                        "note": {"type": "string", "nullable": true},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    },
                },
                "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
            },
        })
    }

    #[test]
    fn prunes_unknown_fields_drops_nulls_and_defaults() {
        let mut object = json!({
            "apiVersion": "x/v1", "kind": "X", "metadata": {"name": "n"},
            "spec": {"name": "a", "extra": 1, "mode": null, "note": null, "labels": {"k": "v"}, "free": {"any": {"thing": 1}}},
            "status": {"phase": "P", "junk": true},
        });
        conform(&schema(), &mut object, FieldValidation::Ignore).expect("valid");
        assert_eq!(
            object["spec"],
            json!({"name": "a", "note": null, "labels": {"k": "v"}, "free": {"any": {"thing": 1}}, "replicas": 1})
        );
        assert_eq!(object["status"], json!({"phase": "P"}));
        assert_eq!(object["metadata"]["name"], "n");
    }

    #[test]
    fn strict_rejects_unknown_fields() {
        let mut object = json!({"spec": {"name": "a", "extra": 1}});
        let error = conform(&schema(), &mut object, FieldValidation::Strict).expect_err("strict");
        assert_eq!(error, SchemaError::UnknownFields(vec!["spec.extra".into()]));
    }

    #[test]
    fn type_enum_and_required_violations() {
        let mut object = json!({"spec": {"replicas": "three", "mode": "c"}});
        let Err(SchemaError::Invalid(violations)) =
            conform(&schema(), &mut object, FieldValidation::Ignore)
        else {
            panic!("expected violations");
        };
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, vec!["spec.name", "spec.mode", "spec.replicas"]);
        let mut missing_spec = json!({"metadata": {"name": "n"}});
        let Err(SchemaError::Invalid(violations)) =
            conform(&schema(), &mut missing_spec, FieldValidation::Ignore)
        else {
            panic!("expected violations");
        };
        assert_eq!(violations[0].field, "spec");
    }
}
