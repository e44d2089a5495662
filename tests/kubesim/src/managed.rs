//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! A field set is a set of leaf paths; each path element is a FieldsV1 key: `f:name` for a map
//! field, `k:{"type":"Ready"}` for an item of a list keyed by its map keys, `v:"x"` for a member of
//! a set-like list. Atomic lists are leaves. Updates give a manager the leaves they changed; apply
//! gives it exactly the leaves of its configuration and refuses (409) to take leaves another
//! manager owns with a different value, unless forced.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use crate::kinds::KindInfo;
use crate::store::{ensure_object, Subresource};

type FieldPath = Vec<String>;
type FieldSet = BTreeSet<FieldPath>;

/// Metadata that belongs to the server, never to a field manager.
const SERVER_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
    "generateName",
];

/// Map keys of list fields that built-in kinds declare as `listType=map`.
fn builtin_list_keys(field: &str) -> Option<Vec<String>> {
    let keys: &[&str] = match field {
        "conditions" => &["type"],
        "containers" | "initContainers" | "volumes" | "env" | "imagePullSecrets" => &["name"],
        "ownerReferences" => &["uid"],
        "ports" => &["containerPort", "protocol"],
        _ => return None,
    };
    Some(keys.iter().map(|k| k.to_string()).collect())
}

/// Looks through a CRD schema for a property named `field` that declares list-map keys.
fn schema_list_keys(schema: &Value, field: &str) -> Option<Vec<String>> {
    match schema {
        Value::Object(fields) => {
            if let Some(Value::Object(properties)) = fields.get("properties") {
                if let Some(property) = properties.get(field) {
                    if property["x-kubernetes-list-type"].as_str() == Some("map") {
                        let keys: Vec<String> = property["x-kubernetes-list-map-keys"]
                            .as_array()
                            .map(|k| {
                                k.iter()
                                    .filter_map(|v| v.as_str().map(str::to_string))
                                    .collect()
                            })
                            .unwrap_or_default();
                        if !keys.is_empty() {
                            return Some(keys);
                        }
                    }
                }
            }
            fields
                .values()
                .find_map(|child| schema_list_keys(child, field))
        }
        Value::Array(items) => items
            .iter()
            .find_map(|child| schema_list_keys(child, field)),
        _ => None,
    }
}

fn schema_list_is_set(schema: &Value, field: &str) -> bool {
    match schema {
        Value::Object(fields) => {
            let here = fields
                .get("properties")
                .and_then(|p| p.get(field))
                .is_some_and(|p| p["x-kubernetes-list-type"].as_str() == Some("set"));
            here || fields
                .values()
                .any(|child| schema_list_is_set(child, field))
        }
        Value::Array(items) => items.iter().any(|child| schema_list_is_set(child, field)),
        _ => false,
    }
}

enum ListType {
    Map(Vec<String>),
    Set,
    Atomic,
}

fn list_type(kind: &KindInfo, field: &str) -> ListType {
    if field == "finalizers" {
        return ListType::Set;
    }
    if let Some(schema) = &kind.schema {
        if let Some(keys) = schema_list_keys(schema, field) {
            return ListType::Map(keys);
        }
        if schema_list_is_set(schema, field) {
            return ListType::Set;
        }
    }
    builtin_list_keys(field).map_or(ListType::Atomic, ListType::Map)
}

fn item_key(item: &Value, keys: &[String]) -> Option<String> {
    let mut key = Map::new();
    for k in keys {
        if let Some(v) = item.get(k) {
            key.insert(k.clone(), v.clone());
        }
    }
    // The first key is required; the others (e.g. `protocol`) may default.
    item.get(keys.first()?)?;
    Some(format!("k:{}", Value::Object(key)))
}

fn collect_leaves(
    kind: &KindInfo,
    value: &Value,
    field: &str,
    path: &mut FieldPath,
    out: &mut FieldSet,
) {
    match value {
        Value::Object(fields) if !fields.is_empty() => {
            for (key, child) in fields {
                path.push(format!("f:{key}"));
                collect_leaves(kind, child, key, path, out);
                path.pop();
            }
        }
        Value::Array(items) if !items.is_empty() => match list_type(kind, field) {
            ListType::Map(keys) if items.iter().all(|i| item_key(i, &keys).is_some()) => {
                for item in items {
                    if let Some(key) = item_key(item, &keys) {
                        path.push(key);
                        collect_leaves(kind, item, "", path, out);
                        path.pop();
                    }
                }
            }
            ListType::Set => {
                for item in items {
                    let mut leaf = path.clone();
                    leaf.push(format!("v:{item}"));
                    out.insert(leaf);
                }
            }
            _ => {
                out.insert(path.clone());
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The leaves of an object a manager can own (server-owned metadata excluded).
fn leaves(kind: &KindInfo, object: &Value) -> FieldSet {
    let mut owned = object.clone();
    if let Some(fields) = owned.as_object_mut() {
        fields.remove("apiVersion");
        fields.remove("kind");
        if let Some(Value::Object(metadata)) = fields.get_mut("metadata") {
            for field in SERVER_METADATA {
                metadata.remove(*field);
            }
            if metadata.is_empty() {
                fields.remove("metadata");
            }
        }
    }
    let mut out = FieldSet::new();
    if owned.as_object().is_some_and(|f| !f.is_empty()) {
        collect_leaves(kind, &owned, "", &mut Vec::new(), &mut out);
    }
    out
}

fn key_matches(item: &Value, key: &str) -> bool {
    let Some(Ok(Value::Object(wanted))) = key.strip_prefix("k:").map(serde_json::from_str::<Value>)
    else {
        return false;
    };
    wanted.iter().all(|(k, v)| item.get(k) == Some(v))
}

/// The value at a field path, if present.
fn value_at<'a>(object: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut current = object;
    for element in path {
        current = if let Some(field) = element.strip_prefix("f:") {
            current.get(field)?
        } else if element.starts_with("k:") {
            current
                .as_array()?
                .iter()
                .find(|item| key_matches(item, element))?
        } else if let Some(raw) = element.strip_prefix("v:") {
            let wanted: Value = serde_json::from_str(raw).ok()?;
            current.as_array()?.iter().find(|item| **item == wanted)?
        } else {
            return None;
        };
    }
    Some(current)
}

fn key_fields(element: &str) -> Option<Vec<String>> {
    let Ok(Value::Object(key)) = serde_json::from_str::<Value>(element.strip_prefix("k:")?) else {
        return None;
    };
    Some(key.keys().cloned().collect())
}

/// Whether a keyed list item holds nothing but its key fields (so it can go).
fn only_keys_left(object: &Value, item_path: &[String]) -> bool {
    let keys = item_path
        .last()
        .and_then(|p| key_fields(p))
        .unwrap_or_default();
    value_at(object, item_path)
        .and_then(Value::as_object)
        .is_some_and(|fields| fields.keys().all(|k| keys.contains(k)))
}

/// Removes the leaf at `path`, then any map or keyed item the removal left empty.
fn remove_at(object: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let parent_keys = parents.last().and_then(|p| key_fields(p));
    let removing_key_field = last.strip_prefix("f:").is_some_and(|field| {
        parent_keys
            .as_ref()
            .is_some_and(|keys| keys.iter().any(|k| k == field))
    });
    if !removing_key_field {
        if let Some(parent) = value_at_mut(object, parents) {
            if let Some(field) = last.strip_prefix("f:") {
                if let Some(fields) = parent.as_object_mut() {
                    fields.remove(field);
                }
            } else if let Some(items) = parent.as_array_mut() {
                if last.starts_with("k:") {
                    items.retain(|item| !key_matches(item, last));
                } else if let Some(Ok(wanted)) =
                    last.strip_prefix("v:").map(serde_json::from_str::<Value>)
                {
                    items.retain(|item| *item != wanted);
                }
            }
        }
    }
    if parents.is_empty() {
        return;
    }
    let emptied = if parent_keys.is_some() {
        only_keys_left(object, parents)
    } else {
        value_at(object, parents).is_some_and(|parent| match parent {
            Value::Object(fields) => fields.is_empty(),
            Value::Array(items) => items.is_empty(),
            _ => false,
        })
    };
    if emptied {
        remove_at(object, parents);
    }
}

fn value_at_mut<'a>(object: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    let mut current = object;
    for element in path {
        current = if let Some(field) = element.strip_prefix("f:") {
            current.get_mut(field)?
        } else if element.starts_with("k:") {
            current
                .as_array_mut()?
                .iter_mut()
                .find(|item| key_matches(item, element))?
        } else {
            return None;
        };
    }
    Some(current)
}

/// Deep-merges an applied configuration: maps recurse, keyed lists merge by key, set lists union.
fn merge_applied(kind: &KindInfo, target: &mut Value, applied: &Value, field: &str) {
    match applied {
        Value::Object(fields) => {
            let target_fields = ensure_object(target);
            for (key, child) in fields {
                let slot = target_fields.entry(key.clone()).or_insert(Value::Null);
                if child.is_object() || child.is_array() {
                    merge_applied(kind, slot, child, key);
                } else {
                    *slot = child.clone();
                }
            }
        }
        Value::Array(items) => match (list_type(kind, field), target.as_array_mut()) {
            (ListType::Map(keys), Some(existing)) => {
                for item in items {
                    let position = item_key(item, &keys)
                        .and_then(|key| existing.iter().position(|e| key_matches(e, &key)));
                    match position {
                        Some(index) => merge_applied(kind, &mut existing[index], item, ""),
                        None => existing.push(item.clone()),
                    }
                }
            }
            (ListType::Set, Some(existing)) => {
                for item in items {
                    if !existing.contains(item) {
                        existing.push(item.clone());
                    }
                }
            }
            _ => *target = applied.clone(),
        },
        scalar => *target = scalar.clone(),
    }
}

struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    time: String,
    subresource: String,
    fields: FieldSet,
}

fn decode_fields(node: &Value, path: &mut FieldPath, out: &mut FieldSet) {
    let Some(children) = node.as_object() else {
        return;
    };
    if (children.is_empty() || children.contains_key(".")) && !path.is_empty() {
        out.insert(path.clone());
    }
    for (key, child) in children {
        if key == "." {
            continue;
        }
        path.push(key.clone());
        decode_fields(child, path, out);
        path.pop();
    }
}

fn encode_fields(fields: &FieldSet) -> Value {
    let mut root = Value::Object(Map::new());
    for path in fields {
        let mut node = &mut root;
        for element in path {
            node = ensure_object(node)
                .entry(element.clone())
                .or_insert(json!({}));
        }
        if node.as_object().is_some_and(|n| !n.is_empty()) {
            ensure_object(node).insert(".".into(), json!({}));
        }
    }
    root
}

fn read_entries(object: &Value) -> Vec<Entry> {
    object["metadata"]["managedFields"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|e| {
                    let mut fields = FieldSet::new();
                    decode_fields(&e["fieldsV1"], &mut Vec::new(), &mut fields);
                    Entry {
                        manager: e["manager"].as_str().unwrap_or_default().to_string(),
                        operation: e["operation"].as_str().unwrap_or("Update").to_string(),
                        api_version: e["apiVersion"].as_str().unwrap_or_default().to_string(),
                        time: e["time"].as_str().unwrap_or_default().to_string(),
                        subresource: e["subresource"].as_str().unwrap_or_default().to_string(),
                        fields,
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

fn write_entries(object: &mut Value, entries: Vec<Entry>) {
    let rendered: Vec<Value> = entries
        .into_iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut entry = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": encode_fields(&e.fields),
            });
            if !e.subresource.is_empty() {
                entry["subresource"] = Value::String(e.subresource);
            }
            entry
        })
        .collect();
    let metadata = ensure_object(
        ensure_object(object)
            .entry("metadata")
            .or_insert(Value::Null),
    );
    if rendered.is_empty() {
        metadata.remove("managedFields");
    } else {
        metadata.insert("managedFields".into(), Value::Array(rendered));
    }
}

fn manager_name(manager: &str) -> String {
    if manager.is_empty() {
        "unknown".into()
    } else {
        manager.to_string()
    }
}

/// Records a create or update: `manager` takes the leaves it changed; nobody keeps removed leaves.
pub fn record_update(
    kind: &KindInfo,
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    subresource: Subresource,
    now: &str,
) {
    let api_version = kind.api_version();
    let new_leaves = leaves(kind, new);
    let (mut entries, old_leaves) = match old {
        Some(old) => (read_entries(old), leaves(kind, old)),
        None => (Vec::new(), FieldSet::new()),
    };
    let changed: FieldSet = new_leaves
        .iter()
        .filter(|p| old.is_none_or(|o| value_at(o, p) != value_at(new, p)))
        .cloned()
        .collect();
    for entry in &mut entries {
        entry.fields.retain(|p| {
            !changed.contains(p) && (new_leaves.contains(p) || !old_leaves.contains(p))
        });
    }
    let manager = manager_name(manager);
    let position = entries.iter().position(|e| {
        e.manager == manager && e.operation == "Update" && e.subresource == subresource.name()
    });
    match position {
        Some(index) => {
            entries[index].fields.extend(changed);
            entries[index].time = now.to_string();
            entries[index].api_version = api_version;
        }
        None => entries.push(Entry {
            manager,
            operation: "Update".into(),
            api_version,
            time: now.to_string(),
            subresource: subresource.name().to_string(),
            fields: changed,
        }),
    }
    write_entries(new, entries);
}

/// The part of an apply configuration a subresource accepts.
fn scoped_configuration(kind: &KindInfo, applied: &Value, subresource: Subresource) -> Value {
    let mut scoped = applied.clone();
    if let Some(fields) = scoped.as_object_mut() {
        match subresource {
            Subresource::Status => {
                fields.retain(|k, _| k == "status" || k == "apiVersion" || k == "kind")
            }
            _ if kind.status_subresource => {
                fields.remove("status");
            }
            _ => {}
        }
    }
    scoped
}

/// The leaves an apply configuration sets.
pub fn applied_set(kind: &KindInfo, applied: &Value) -> Vec<Vec<String>> {
    leaves(
        kind,
        &scoped_configuration(kind, applied, Subresource::Main),
    )
    .into_iter()
    .collect()
}

/// After apply created an object, its managedFields hold one Apply entry for the manager.
pub fn replace_entries_with_apply(
    object: &mut Value,
    manager: &str,
    api_version: &str,
    applied: &[Vec<String>],
    subresource: Subresource,
) {
    let time = object["metadata"]["creationTimestamp"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let entry = Entry {
        manager: manager_name(manager),
        operation: "Apply".into(),
        api_version: api_version.to_string(),
        time,
        subresource: subresource.name().to_string(),
        fields: applied.iter().cloned().collect(),
    };
    write_entries(object, vec![entry]);
}

fn render_path(path: &[String]) -> String {
    path.iter()
        .map(|element| match element.split_once(':') {
            Some(("f", field)) => format!(".{field}"),
            Some((_, key)) => format!("[{key}]"),
            None => element.clone(),
        })
        .collect()
}

/// Server-side apply of `applied` by `manager` onto `current`. Returns the new object (with its
/// managedFields), or the conflicts as (message, field) pairs.
pub fn apply(
    kind: &KindInfo,
    current: &Value,
    applied: &Value,
    manager: &str,
    subresource: Subresource,
    force: bool,
) -> Result<Value, Vec<(String, String)>> {
    let manager = manager_name(manager);
    let configuration = scoped_configuration(kind, applied, subresource);
    let applied_leaves = leaves(kind, &configuration);
    let mut entries = read_entries(current);
    let mut conflicts = Vec::new();
    for entry in entries
        .iter_mut()
        .filter(|e| e.manager != manager || e.operation != "Apply")
    {
        if entry.subresource != subresource.name() {
            continue;
        }
        let contested: Vec<FieldPath> = entry
            .fields
            .iter()
            .filter(|p| {
                applied_leaves.contains(*p) && value_at(current, p) != value_at(&configuration, p)
            })
            .cloned()
            .collect();
        for path in contested {
            if force || entry.manager == manager {
                entry.fields.remove(&path);
            } else {
                let message = if entry.operation == "Apply" {
                    format!("conflict with \"{}\"", entry.manager)
                } else {
                    format!(
                        "conflict with \"{}\" using {}",
                        entry.manager, entry.api_version
                    )
                };
                conflicts.push((message, render_path(&path)));
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(conflicts);
    }
    let mut next = current.clone();
    let position = entries.iter().position(|e| {
        e.manager == manager && e.operation == "Apply" && e.subresource == subresource.name()
    });
    if let Some(index) = position {
        let dropped: Vec<FieldPath> = entries[index]
            .fields
            .iter()
            .filter(|p| !applied_leaves.contains(*p))
            .filter(|p| {
                !entries
                    .iter()
                    .enumerate()
                    .any(|(i, e)| i != index && e.fields.contains(*p))
            })
            .cloned()
            .collect();
        for path in dropped {
            remove_at(&mut next, &path);
        }
    }
    let mut merged_configuration = configuration.clone();
    if let Some(fields) = merged_configuration.as_object_mut() {
        fields.remove("apiVersion");
        fields.remove("kind");
        if let Some(Value::Object(metadata)) = fields.get_mut("metadata") {
            for field in SERVER_METADATA {
                if *field != "resourceVersion" && *field != "uid" {
                    metadata.remove(*field);
                }
            }
        }
    }
    merge_applied(kind, &mut next, &merged_configuration, "");
    let now = crate::store::now_rfc3339();
    match position {
        Some(index) => {
            entries[index].fields = applied_leaves;
            entries[index].time = now;
            entries[index].api_version = kind.api_version();
        }
        None => entries.push(Entry {
            manager,
            operation: "Apply".into(),
            api_version: kind.api_version(),
            time: now,
            subresource: subresource.name().to_string(),
            fields: applied_leaves,
        }),
    }
    write_entries(&mut next, entries);
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::built_in_kinds;

    fn lease_kind() -> KindInfo {
        built_in_kinds()
            .into_iter()
            .find(|k| k.plural == "leases")
            .expect("leases")
    }

    fn lease(holder: &str) -> Value {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l"}, "spec": {"holderIdentity": holder}})
    }

    #[test]
    fn a_second_manager_conflicts_unless_forced() {
        let kind = lease_kind();
        let base = json!({"metadata": {"name": "l", "uid": "u"}});
        let a = apply(&kind, &base, &lease("a"), "mgr-a", Subresource::Main, false)
            .expect("first apply");
        assert_eq!(a["spec"]["holderIdentity"], "a");
        let conflicts =
            apply(&kind, &a, &lease("b"), "mgr-b", Subresource::Main, false).expect_err("conflict");
        assert_eq!(
            conflicts,
            vec![(
                "conflict with \"mgr-a\"".to_string(),
                ".spec.holderIdentity".to_string()
            )]
        );
        let same = apply(&kind, &a, &lease("a"), "mgr-b", Subresource::Main, false)
            .expect("same value shares ownership");
        assert_eq!(
            same["metadata"]["managedFields"].as_array().map(Vec::len),
            Some(2)
        );
        let forced =
            apply(&kind, &a, &lease("b"), "mgr-b", Subresource::Main, true).expect("forced");
        assert_eq!(forced["spec"]["holderIdentity"], "b");
        let again = apply(
            &kind,
            &forced,
            &lease("a"),
            "mgr-a",
            Subresource::Main,
            false,
        )
        .expect_err("mgr-a lost it");
        assert_eq!(again[0].0, "conflict with \"mgr-b\"");
    }

    #[test]
    fn fields_a_manager_stops_applying_are_removed_and_keyed_lists_merge() {
        let kind = lease_kind();
        let base = json!({"metadata": {"name": "l"}});
        let first = json!({"spec": {"holderIdentity": "a", "leaseDurationSeconds": 10}, "status": {"conditions": [{"type": "A", "status": "True"}]}});
        let applied = apply(&kind, &base, &first, "m", Subresource::Main, false).expect("apply");
        let second = json!({"spec": {"holderIdentity": "a"}, "status": {"conditions": [{"type": "B", "status": "False"}]}});
        let other = apply(
            &kind,
            &applied,
            &json!({"status": {"conditions": [{"type": "C", "status": "True"}]}}),
            "other",
            Subresource::Main,
            false,
        )
        .expect("other");
        let reapplied =
            apply(&kind, &other, &second, "m", Subresource::Main, false).expect("reapply");
        assert!(reapplied["spec"].get("leaseDurationSeconds").is_none());
        let types: Vec<&str> = reapplied["status"]["conditions"]
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|c| c["type"].as_str())
            .collect();
        assert_eq!(types, vec!["C", "B"]);
    }

    #[test]
    fn updates_take_ownership_from_appliers() {
        let kind = lease_kind();
        let base = json!({"metadata": {"name": "l"}});
        let applied = apply(
            &kind,
            &base,
            &lease("a"),
            "applier",
            Subresource::Main,
            false,
        )
        .expect("apply");
        let mut updated = applied.clone();
        updated["spec"]["holderIdentity"] = json!("b");
        record_update(
            &kind,
            Some(&applied),
            &mut updated,
            "kubectl-edit",
            Subresource::Main,
            "now",
        );
        let conflicts = apply(
            &kind,
            &updated,
            &lease("a"),
            "applier",
            Subresource::Main,
            false,
        )
        .expect_err("conflict");
        assert_eq!(
            conflicts[0].0,
            "conflict with \"kubectl-edit\" using coordination.k8s.io/v1"
        );
    }

    #[test]
    fn fields_v1_round_trips() {
        let set: FieldSet = [
            vec!["f:spec".to_string(), "f:a".to_string()],
            vec![
                "f:status".to_string(),
                "f:conditions".to_string(),
                "k:{\"type\":\"X\"}".to_string(),
                "f:status".to_string(),
            ],
            vec![
                "f:metadata".to_string(),
                "f:finalizers".to_string(),
                "v:\"f\"".to_string(),
            ],
        ]
        .into_iter()
        .collect();
        let mut decoded = FieldSet::new();
        decode_fields(&encode_fields(&set), &mut Vec::new(), &mut decoded);
        assert_eq!(decoded, set);
    }
}
