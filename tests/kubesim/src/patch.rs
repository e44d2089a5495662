//! Patch formats: JSON merge patch, JSON patch (with the apiserver's `test` semantics) and
//! strategic merge patch for built-in kinds.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// RFC 7386 JSON merge patch: objects merge recursively, `null` deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target_fields) = target {
        for (key, value) in patch_fields {
            if value.is_null() {
                target_fields.remove(key);
            } else {
                merge_patch(
                    target_fields.entry(key.clone()).or_insert(Value::Null),
                    value,
                );
            }
        }
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn pointer_tokens(path: &str) -> Result<Vec<String>, String> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| format!("invalid JSON pointer {path:?}"))?;
    Ok(rest.split('/').map(unescape).collect())
}

fn parent_mut<'a>(doc: &'a mut Value, tokens: &[String]) -> Result<&'a mut Value, String> {
    let mut current = doc;
    for token in tokens {
        current = match current {
            Value::Object(fields) => fields
                .get_mut(token)
                .ok_or_else(|| format!("missing path segment {token:?}"))?,
            Value::Array(items) => {
                let index: usize = token
                    .parse()
                    .map_err(|_| format!("invalid index {token:?}"))?;
                items
                    .get_mut(index)
                    .ok_or_else(|| format!("index {index} out of range"))?
            }
            _ => return Err(format!("cannot descend into a scalar at {token:?}")),
        };
    }
    Ok(current)
}

fn get<'a>(doc: &'a Value, tokens: &[String]) -> Option<&'a Value> {
    let mut current = doc;
    for token in tokens {
        current = match current {
            Value::Object(fields) => fields.get(token)?,
            Value::Array(items) => items.get(token.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(current)
}

fn add(doc: &mut Value, tokens: &[String], value: Value) -> Result<(), String> {
    let Some((last, parent_tokens)) = tokens.split_last() else {
        *doc = value;
        return Ok(());
    };
    match parent_mut(doc, parent_tokens)? {
        Value::Object(fields) => {
            fields.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(items) => {
            if last == "-" {
                items.push(value);
                return Ok(());
            }
            let index: usize = last
                .parse()
                .map_err(|_| format!("invalid index {last:?}"))?;
            if index > items.len() {
                return Err(format!("index {index} out of range"));
            }
            items.insert(index, value);
            Ok(())
        }
        _ => Err("cannot add to a scalar".into()),
    }
}

fn remove(doc: &mut Value, tokens: &[String]) -> Result<Value, String> {
    let (last, parent_tokens) = tokens
        .split_last()
        .ok_or_else(|| "cannot remove the whole document".to_string())?;
    match parent_mut(doc, parent_tokens)? {
        Value::Object(fields) => fields
            .remove(last)
            .ok_or_else(|| format!("unable to remove nonexistent key: {last}")),
        Value::Array(items) => {
            let index: usize = last
                .parse()
                .map_err(|_| format!("invalid index {last:?}"))?;
            if index >= items.len() {
                return Err(format!("index {index} out of range"));
            }
            Ok(items.remove(index))
        }
        _ => Err("cannot remove from a scalar".into()),
    }
}

/// RFC 6902 JSON patch as the apiserver applies it (evanphx/json-patch): a `test` for `null`
/// succeeds on a missing path, which kube-rs's finalizer helper relies on. Failures are 422.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let operations = patch
        .as_array()
        .ok_or_else(|| ApiError::bad_request("json patch must be an array of operations"))?;
    let mut working = target.clone();
    for operation in operations {
        apply_operation(&mut working, operation).map_err(ApiError::unprocessable)?;
    }
    *target = working;
    Ok(())
}

fn apply_operation(doc: &mut Value, operation: &Value) -> Result<(), String> {
    let op = operation["op"]
        .as_str()
        .ok_or("json patch operation without \"op\"")?;
    let path = pointer_tokens(
        operation["path"]
            .as_str()
            .ok_or("json patch operation without \"path\"")?,
    )?;
    let value = || {
        operation
            .get("value")
            .cloned()
            .ok_or_else(|| format!("{op} operation without \"value\""))
    };
    let from = || -> Result<Vec<String>, String> {
        pointer_tokens(
            operation["from"]
                .as_str()
                .ok_or(format!("{op} operation without \"from\""))?,
        )
    };
    match op {
        "add" => add(doc, &path, value()?),
        "remove" => remove(doc, &path).map(|_| ()),
        "replace" => {
            if path.is_empty() {
                *doc = value()?;
                return Ok(());
            }
            remove(doc, &path)?;
            add(doc, &path, value()?)
        }
        "move" => {
            let moved = remove(doc, &from()?)?;
            add(doc, &path, moved)
        }
        "copy" => {
            let copied = get(doc, &from()?)
                .cloned()
                .ok_or("copy from a missing path")?;
            add(doc, &path, copied)
        }
        "test" => {
            let expected = value()?;
            let actual = get(doc, &path).cloned().unwrap_or(Value::Null);
            if actual == expected {
                Ok(())
            } else {
                Err(format!(
                    "the server rejected our request due to an error in our request: testing value {} failed: test failed",
                    operation["path"].as_str().unwrap_or_default()
                ))
            }
        }
        other => Err(format!("unexpected json patch operation {other:?}")),
    }
}

/// The merge key of a list field in built-in kinds' strategic merge patch (Go struct tags).
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets" => "name",
        "volumeMounts" => "mountPath",
        "ports" => "containerPort",
        "conditions" => "type",
        "ownerReferences" => "uid",
        _ => return None,
    })
}

/// Primitive lists that strategic merge patch merges as sets rather than replacing.
fn is_merged_primitive_list(field: &str) -> bool {
    matches!(field, "finalizers")
}

/// Strategic merge patch for built-in kinds: lists with a known merge key merge by it, and the
/// `$patch`, `$retainKeys`, `$setElementOrder/` and `$deleteFromPrimitiveList/` directives apply.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let Value::Object(patch_fields) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    match patch_fields.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut replacement = patch_fields.clone();
            replacement.remove("$patch");
            *target = Value::Object(replacement);
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown patch directive {other:?}"
            )))
        }
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target_fields) = target else {
        return Ok(());
    };
    if let Some(retain) = patch_fields.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = retain.iter().filter_map(Value::as_str).collect();
        target_fields.retain(|key, _| keep.contains(&key.as_str()));
    }
    for (key, value) in patch_fields {
        if key == "$patch" || key == "$retainKeys" || key.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(list) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let doomed = value.as_array().cloned().unwrap_or_default();
            if let Some(Value::Array(items)) = target_fields.get_mut(list) {
                items.retain(|item| !doomed.contains(item));
            }
            continue;
        }
        if value.is_null() {
            target_fields.remove(key);
            continue;
        }
        match value {
            Value::Array(patch_items) => {
                let existing = target_fields
                    .remove(key)
                    .unwrap_or(Value::Array(Vec::new()));
                let merged = merge_list(key, existing, patch_items)?;
                target_fields.insert(key.clone(), merged);
            }
            Value::Object(_) => {
                let slot = target_fields.entry(key.clone()).or_insert(Value::Null);
                strategic_merge_patch(slot, value)?;
            }
            scalar => {
                target_fields.insert(key.clone(), scalar.clone());
            }
        }
    }
    Ok(())
}

fn merge_list(field: &str, existing: Value, patch_items: &[Value]) -> Result<Value, ApiError> {
    let replace_whole = patch_items
        .iter()
        .any(|item| item.get("$patch").and_then(Value::as_str) == Some("replace"));
    if replace_whole {
        let kept = patch_items
            .iter()
            .filter(|item| item.get("$patch").is_none())
            .cloned()
            .collect();
        return Ok(Value::Array(kept));
    }
    let Value::Array(mut items) = existing else {
        return Ok(Value::Array(patch_items.to_vec()));
    };
    if is_merged_primitive_list(field) {
        for item in patch_items {
            if !items.contains(item) {
                items.push(item.clone());
            }
        }
        return Ok(Value::Array(items));
    }
    let Some(key) = merge_key(field) else {
        return Ok(Value::Array(patch_items.to_vec()));
    };
    for patch_item in patch_items {
        let Some(wanted) = patch_item.get(key) else {
            return Err(ApiError::bad_request(format!(
                "map: {patch_item} does not contain declared merge key: {key}"
            )));
        };
        let position = items.iter().position(|item| item.get(key) == Some(wanted));
        let delete = patch_item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (position, delete) {
            (Some(index), true) => {
                items.remove(index);
            }
            (None, true) => {}
            (Some(index), false) => strategic_merge_patch(&mut items[index], patch_item)?,
            (None, false) => {
                let mut fresh = Value::Object(Map::new());
                strategic_merge_patch(&mut fresh, patch_item)?;
                items.push(fresh);
            }
        }
    }
    Ok(Value::Array(items))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_deletes_nulls_and_replaces_lists() {
        let mut doc = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge_patch(&mut doc, &json!({"a": {"b": null, "d": 3}, "l": [3]}));
        assert_eq!(doc, json!({"a": {"c": 2, "d": 3}, "l": [3]}));
    }

    #[test]
    fn json_patch_test_null_succeeds_on_missing_path_like_the_apiserver() {
        let mut doc = json!({"metadata": {"name": "x"}});
        let patch = json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["a"]},
            {"op": "add", "path": "/metadata/finalizers/-", "value": "b"},
        ]);
        json_patch(&mut doc, &patch).expect("patch applies");
        assert_eq!(doc["metadata"]["finalizers"], json!(["a", "b"]));
    }

    #[test]
    fn json_patch_failed_test_is_422_and_leaves_target_untouched() {
        let mut doc = json!({"metadata": {"finalizers": ["a"]}});
        let patch = json!([
            {"op": "remove", "path": "/metadata/finalizers/0"},
            {"op": "test", "path": "/metadata/finalizers/0", "value": "a"},
        ]);
        let error = json_patch(&mut doc, &patch).expect_err("test fails");
        assert_eq!(error.code, 422);
        assert_eq!(doc["metadata"]["finalizers"], json!(["a"]));
    }

    #[test]
    fn strategic_merge_patch_merges_by_key_and_honours_directives() {
        let mut doc = json!({
            "metadata": {"finalizers": ["a"], "labels": {"x": "1", "y": "2"}},
            "spec": {"template": {"spec": {"containers": [{"name": "app", "image": "v1"}, {"name": "side", "image": "s1"}]}}},
        });
        let patch = json!({
            "metadata": {"finalizers": ["b"], "labels": {"x": null}, "$deleteFromPrimitiveList/finalizers": ["a"]},
            "spec": {"template": {"spec": {
                "$setElementOrder/containers": [{"name": "app"}],
                "containers": [{"name": "app", "image": "v2"}, {"name": "side", "$patch": "delete"}],
            }}},
        });
        strategic_merge_patch(&mut doc, &patch).expect("patch applies");
        assert_eq!(doc["metadata"]["finalizers"], json!(["b"]));
        assert_eq!(doc["metadata"]["labels"], json!({"y": "2"}));
        assert_eq!(
            doc["spec"]["template"]["spec"]["containers"],
            json!([{"name": "app", "image": "v2"}])
        );
        strategic_merge_patch(
            &mut doc,
            &json!({"metadata": {"labels": {"$patch": "replace", "z": "3"}}}),
        )
        .expect("replace");
        assert_eq!(doc["metadata"]["labels"], json!({"z": "3"}));
    }
}
