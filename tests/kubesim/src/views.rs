//! Conversion between how objects are stored and how each served resource shows them.
//!
//! Events are stored once, in core/v1 form, and served through both `v1` and `events.k8s.io/v1`.

use serde_json::{Map, Value};

use crate::kinds::{KindInfo, View};

/// (events.k8s.io/v1 field, core/v1 field) pairs that differ only in name.
const EVENT_FIELD_RENAMES: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
    ("reportingController", "reportingComponent"),
];

fn rename_fields(object: Value, to_core: bool) -> Value {
    let Value::Object(fields) = object else {
        return object;
    };
    let mut renamed = Map::new();
    for (key, value) in fields {
        let new_key = EVENT_FIELD_RENAMES
            .iter()
            .find_map(|(v1, core)| {
                if to_core && key == *v1 {
                    Some(core.to_string())
                } else if !to_core && key == *core {
                    Some(v1.to_string())
                } else {
                    None
                }
            })
            .unwrap_or(key);
        renamed.insert(new_key, value);
    }
    Value::Object(renamed)
}

/// The object as `kind` serves it: apiVersion and kind set, fields renamed for its view.
pub fn present(kind: &KindInfo, stored: &Value) -> Value {
    let mut object = match kind.view {
        View::Plain => stored.clone(),
        View::EventsV1 => rename_fields(stored.clone(), false),
    };
    if let Some(fields) = object.as_object_mut() {
        fields.insert("apiVersion".into(), Value::String(kind.api_version()));
        fields.insert("kind".into(), Value::String(kind.kind.clone()));
    }
    object
}

/// The stored form of an object written through `kind`.
pub fn absorb(kind: &KindInfo, written: Value) -> Value {
    let mut object = match kind.view {
        View::Plain => written,
        View::EventsV1 => rename_fields(written, true),
    };
    if let Some(fields) = object.as_object_mut() {
        let api_version = match kind.view {
            View::Plain => kind.api_version(),
            View::EventsV1 => "v1".to_string(),
        };
        fields.insert("apiVersion".into(), Value::String(api_version));
        fields.insert("kind".into(), Value::String(kind.kind.clone()));
    }
    object
}

/// Translates a patch written against `kind`'s view into the stored form's field names.
pub fn absorb_patch(kind: &KindInfo, patch: Value) -> Value {
    match kind.view {
        View::Plain => patch,
        View::EventsV1 => rename_fields(patch, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::built_in_kinds;
    use serde_json::json;

    #[test]
    fn events_round_trip_between_views() {
        let kinds = built_in_kinds();
        let v1 = kinds
            .iter()
            .find(|k| k.group == "events.k8s.io")
            .expect("events.k8s.io");
        let core = kinds
            .iter()
            .find(|k| k.group.is_empty() && k.plural == "events")
            .expect("core events");
        let written = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}, "regarding": {"name": "x"}, "note": "hi", "reportingController": "c", "series": {"count": 2}});
        let stored = absorb(v1, written.clone());
        assert_eq!(stored["apiVersion"], "v1");
        assert_eq!(stored["involvedObject"]["name"], "x");
        assert_eq!(stored["message"], "hi");
        assert_eq!(stored["reportingComponent"], "c");
        assert_eq!(present(core, &stored)["message"], "hi");
        assert_eq!(present(v1, &stored), written);
    }
}
