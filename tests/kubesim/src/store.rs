//! The object store: one global resourceVersion, per-resource objects and bounded watch history,
//! and every write rule (preconditions, subresources, generation, finalizers, garbage collection).
//!
//! All of it runs under one mutex held only for the duration of a synchronous call.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio::sync::watch;

use crate::error::{ApiError, ErrorTarget};
use crate::kinds::{built_in_kinds, crd_status, kinds_from_crd, KindInfo, ScaleSpec, StoreKey};
use crate::managed;
use crate::patch;
use crate::schema::{self, FieldValidation, SchemaError};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::views;

/// Namespaces every kubesim starts with, as a fresh cluster has.
pub const INITIAL_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];

/// Namespaces the apiserver refuses to delete.
const IMMORTAL_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public"];

const FINALIZER_FOREGROUND: &str = "foregroundDeletion";
const FINALIZER_ORPHAN: &str = "orphan";

/// The type of a stored watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change, kept in a resource's history so watches can resume from any recent resourceVersion.
#[derive(Debug)]
pub struct WatchRecord {
    pub rv: u64,
    pub event: EventType,
    pub object: Value,
    /// The object before a modification: watches use it to turn selector transitions into ADDED/DELETED.
    pub previous: Option<Value>,
}

/// The part of an object a request addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subresource {
    Main,
    Status,
    Scale,
}

impl Subresource {
    pub fn parse(name: Option<&str>) -> Option<Self> {
        match name {
            None => Some(Self::Main),
            Some("status") => Some(Self::Status),
            Some("scale") => Some(Self::Scale),
            Some(_) => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Main => "",
            Self::Status => "status",
            Self::Scale => "scale",
        }
    }
}

/// How a PATCH body is to be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Json,
    Strategic,
    Apply { force: bool },
}

impl PatchType {
    pub fn from_content_type(content_type: &str, force: bool) -> Option<Self> {
        let media_type = content_type.split(';').next().unwrap_or_default().trim();
        match media_type {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/json-patch+json" => Some(Self::Json),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => {
                Some(Self::Apply { force })
            }
            _ => None,
        }
    }
}

/// A PATCH request body and how to apply it.
#[derive(Debug, Clone, Copy)]
pub struct PatchBody<'a> {
    pub patch_type: PatchType,
    pub body: &'a Value,
}

/// Options shared by every write.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    pub dry_run: bool,
    pub field_manager: String,
    pub field_validation: FieldValidation,
}

/// `DeleteOptions` as the apiserver reads them from the request body and query.
#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    pub dry_run: bool,
    pub propagation: Option<String>,
    pub precondition_rv: Option<String>,
    pub precondition_uid: Option<String>,
}

/// What a delete did: removed the object, or marked it for deletion behind finalizers.
#[derive(Debug, Clone, PartialEq)]
pub enum DeleteOutcome {
    Removed(Value),
    Pending(Value),
}

struct Collection {
    objects: BTreeMap<(String, String), Value>,
    history: VecDeque<Arc<WatchRecord>>,
    /// Every event with a resourceVersion above this one is still in `history`.
    floor: u64,
    notify: watch::Sender<u64>,
}

impl Collection {
    fn new(floor: u64) -> Self {
        Self {
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            floor,
            notify: watch::Sender::new(floor),
        }
    }
}

/// Everything kubesim stores.
pub struct State {
    rv: u64,
    kinds: Vec<Arc<KindInfo>>,
    collections: BTreeMap<StoreKey, Collection>,
    history_limit: usize,
    /// Set when a deletion or a deletionTimestamp may give the garbage collector work.
    gc_pending: bool,
    /// uids of removed objects: dependents whose owners are all gone, and one of them is among
    /// these, are collected (owners that never existed are left alone).
    removed_uids: HashSet<String>,
}

/// Who owns the fields of a newly created object.
enum Ownership {
    /// An Update entry for the manager covering every field.
    Update,
    /// An Apply entry (server-side apply creating the object) with the applied fields.
    Apply(Vec<Vec<String>>),
}

/// The current time as Kubernetes writes `metav1.Time`: RFC 3339 in whole seconds.
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn new_uid() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// `generateName` suffix: five characters from the apiserver's alphabet (no vowels, no look-alikes).
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn meta(object: &Value) -> &Value {
    &object["metadata"]
}

fn meta_str<'a>(object: &'a Value, field: &str) -> &'a str {
    object["metadata"][field].as_str().unwrap_or_default()
}

/// Turns `value` into an object if it is not one, and returns its fields.
pub(crate) fn ensure_object(value: &mut Value) -> &mut Map<String, Value> {
    if !value.is_object() {
        *value = Value::Object(Map::new());
    }
    match value {
        Value::Object(fields) => fields,
        _ => unreachable!("replaced with an object just above"),
    }
}

fn meta_mut(object: &mut Value) -> &mut Map<String, Value> {
    ensure_object(
        ensure_object(object)
            .entry("metadata")
            .or_insert(Value::Null),
    )
}

fn finalizers(object: &Value) -> Vec<String> {
    meta(object)["finalizers"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn set_finalizers(object: &mut Value, list: &[String]) {
    let metadata = meta_mut(object);
    if list.is_empty() {
        metadata.remove("finalizers");
    } else {
        metadata.insert("finalizers".into(), json!(list));
    }
}

/// Whether the object has a `deletionTimestamp`, i.e. is waiting for its finalizers.
fn is_deleting(object: &Value) -> bool {
    meta(object).get("deletionTimestamp").is_some()
}

/// Starts an object's graceful deletion: stamps `deletionTimestamp` now, with no grace period.
fn mark_deleting(object: &mut Value) {
    let metadata = meta_mut(object);
    metadata.insert("deletionTimestamp".into(), Value::String(now_rfc3339()));
    metadata.insert("deletionGracePeriodSeconds".into(), json!(0));
}

/// Makes `to`'s status that of `from`, removing it when `from` has none.
fn copy_status(from: &Value, to: &mut Value) {
    match from.get("status") {
        Some(status) => to["status"] = status.clone(),
        None => {
            if let Some(fields) = to.as_object_mut() {
                fields.remove("status");
            }
        }
    }
}

/// Where CustomResourceDefinitions are stored.
fn crd_store_key() -> StoreKey {
    StoreKey {
        group: "apiextensions.k8s.io".into(),
        resource: "customresourcedefinitions".into(),
    }
}

/// Where `/scale` reads and writes replicas for `kind`, or 404 if it has no scale subresource.
fn scale_spec(kind: &KindInfo) -> Result<&ScaleSpec, ApiError> {
    kind.scale
        .as_ref()
        .ok_or_else(|| ApiError::no_route(&format!("{}/scale", kind.plural)))
}

/// The object without bookkeeping that changes on every write; equal content means a no-op write.
fn content(object: &Value) -> Value {
    let mut stripped = object.clone();
    if let Some(Value::Object(metadata)) = stripped.get_mut("metadata") {
        metadata.remove("resourceVersion");
        metadata.remove("managedFields");
    }
    stripped
}

/// Prunes, defaults and validates a custom resource against its schema, as the apiserver does.
fn conform_to_schema(
    kind: &KindInfo,
    object: &mut Value,
    validation: FieldValidation,
) -> Result<(), ApiError> {
    let Some(schema) = &kind.schema else {
        return Ok(());
    };
    let name = meta_str(object, "name").to_string();
    schema::conform(schema, object, validation).map_err(|error| match error {
        SchemaError::UnknownFields(fields) => {
            let rendered: Vec<String> = fields
                .iter()
                .map(|f| format!("unknown field \"{f}\""))
                .collect();
            ApiError::bad_request(format!("strict decoding error: {}", rendered.join(", ")))
        }
        SchemaError::Invalid(violations) => {
            let pairs: Vec<(String, String)> = violations
                .into_iter()
                .map(|v| (v.field, v.detail))
                .collect();
            ApiError::invalid_fields(&kind.kind, &kind.group, &name, &pairs)
        }
    })
}

/// Whether anything outside metadata (and outside status, when status is its own subresource) changed.
fn generation_relevant_change(kind: &KindInfo, old: &Value, new: &Value) -> bool {
    let strip = |object: &Value| {
        let mut stripped = object.clone();
        if let Some(fields) = stripped.as_object_mut() {
            fields.remove("metadata");
            fields.remove("apiVersion");
            fields.remove("kind");
            if kind.status_subresource {
                fields.remove("status");
            }
        }
        stripped
    };
    strip(old) != strip(new)
}

fn target<'a>(kind: &'a KindInfo, name: &'a str) -> ErrorTarget<'a> {
    ErrorTarget {
        group: &kind.group,
        resource: &kind.plural,
        name,
    }
}

/// Reads a dotted path such as `.spec.replicas`.
fn get_path<'a>(object: &'a Value, path: &str) -> &'a Value {
    let mut current = object;
    for key in path
        .trim_start_matches('.')
        .split('.')
        .filter(|k| !k.is_empty())
    {
        current = &current[key];
    }
    current
}

fn set_path(object: &mut Value, path: &str, value: Value) {
    let keys: Vec<&str> = path
        .trim_start_matches('.')
        .split('.')
        .filter(|k| !k.is_empty())
        .collect();
    let mut current = object;
    for key in keys.iter().take(keys.len().saturating_sub(1)) {
        if !current[*key].is_object() {
            current[*key] = Value::Object(Map::new());
        }
        current = &mut current[*key];
    }
    if let Some(last) = keys.last() {
        current[*last] = value;
    }
}

/// `matchLabels`/`matchExpressions` rendered as a label selector string, as Scale reports it.
fn label_selector_string(selector: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(labels) = selector["matchLabels"].as_object() {
        for (key, value) in labels {
            parts.push(format!("{key}={}", value.as_str().unwrap_or_default()));
        }
    }
    if let Some(expressions) = selector["matchExpressions"].as_array() {
        for expression in expressions {
            let key = expression["key"].as_str().unwrap_or_default();
            let values: Vec<&str> = expression["values"]
                .as_array()
                .map(|v| v.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            match expression["operator"].as_str().unwrap_or_default() {
                "In" => parts.push(format!("{key} in ({})", values.join(","))),
                "NotIn" => parts.push(format!("{key} notin ({})", values.join(","))),
                "Exists" => parts.push(key.to_string()),
                "DoesNotExist" => parts.push(format!("!{key}")),
                _ => {}
            }
        }
    }
    parts.join(",")
}

impl State {
    pub fn new(history_limit: usize) -> Self {
        let mut state = Self {
            rv: 0,
            kinds: Vec::new(),
            collections: BTreeMap::new(),
            history_limit: history_limit.max(1),
            gc_pending: false,
            removed_uids: HashSet::new(),
        };
        state.sync_kinds();
        let namespaces = state.builtin("", "namespaces");
        for name in INITIAL_NAMESPACES {
            let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            if let Some(kind) = &namespaces {
                // Cannot fail: the store is empty and the names are valid.
                let _ = state.create(
                    kind,
                    None,
                    body,
                    &WriteOptions {
                        field_manager: "kubesim".into(),
                        ..Default::default()
                    },
                );
            }
        }
        state
    }

    fn builtin(&self, group: &str, plural: &str) -> Option<Arc<KindInfo>> {
        self.kinds
            .iter()
            .find(|k| k.group == group && k.plural == plural && k.built_in)
            .cloned()
    }

    /// The latest resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn kinds(&self) -> &[Arc<KindInfo>] {
        &self.kinds
    }

    pub fn resolve(&self, group: &str, version: &str, resource: &str) -> Option<Arc<KindInfo>> {
        self.kinds
            .iter()
            .find(|k| k.group == group && k.version == version && k.plural == resource)
            .cloned()
    }

    /// Rebuilds the served kinds from the built-ins and the stored CRDs.
    fn sync_kinds(&mut self) {
        let mut kinds: Vec<Arc<KindInfo>> = built_in_kinds().into_iter().map(Arc::new).collect();
        if let Some(crds) = self.collections.get(&crd_store_key()) {
            for crd in crds.objects.values() {
                kinds.extend(kinds_from_crd(crd).into_iter().map(Arc::new));
            }
        }
        let rv = self.rv;
        for kind in &kinds {
            self.collections
                .entry(kind.store.clone())
                .or_insert_with(|| Collection::new(rv));
        }
        self.kinds = kinds;
    }

    /// Subscribes to change notifications for a store; the value is the latest resourceVersion.
    pub fn subscribe(&mut self, store: &StoreKey) -> watch::Receiver<u64> {
        let rv = self.rv;
        self.collections
            .entry(store.clone())
            .or_insert_with(|| Collection::new(rv))
            .notify
            .subscribe()
    }

    /// Events with a resourceVersion above `since`, or 410 Expired if history no longer reaches back.
    pub fn events_since(
        &self,
        store: &StoreKey,
        since: u64,
    ) -> Result<Vec<Arc<WatchRecord>>, ApiError> {
        let Some(collection) = self.collections.get(store) else {
            return Ok(Vec::new());
        };
        if since < collection.floor {
            return Err(ApiError::expired(since, collection.floor));
        }
        Ok(collection
            .history
            .iter()
            .filter(|record| record.rv > since)
            .cloned()
            .collect())
    }

    fn collection(&self, kind: &KindInfo) -> Option<&Collection> {
        self.collections.get(&kind.store)
    }

    pub fn get(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        self.collection(kind)
            .and_then(|c| {
                c.objects
                    .get(&(namespace.unwrap_or_default().to_string(), name.to_string()))
            })
            .cloned()
            .ok_or_else(|| ApiError::not_found(target(kind, name)))
    }

    /// Stored objects matching the selectors, ordered by namespace and name, plus the list resourceVersion.
    pub fn list(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> (Vec<Value>, u64) {
        let items = self
            .collection(kind)
            .map(|c| {
                c.objects
                    .iter()
                    .filter(|((ns, _), _)| namespace.is_none_or(|wanted| wanted == ns))
                    .map(|(_, object)| object)
                    .filter(|object| labels.matches(object) && fields.matches(object))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        (items, self.rv)
    }

    fn namespace_phase(&self, name: &str) -> Option<String> {
        let key = StoreKey {
            group: String::new(),
            resource: "namespaces".into(),
        };
        self.collections
            .get(&key)?
            .objects
            .get(&(String::new(), name.to_string()))
            .map(|ns| {
                ns["status"]["phase"]
                    .as_str()
                    .unwrap_or("Active")
                    .to_string()
            })
    }

    /// Records a change: bumps the global resourceVersion, stores the object and wakes watchers.
    fn commit(
        &mut self,
        store: &StoreKey,
        event: EventType,
        mut object: Value,
        previous: Option<Value>,
    ) -> Value {
        self.rv += 1;
        let rv = self.rv;
        meta_mut(&mut object).insert("resourceVersion".into(), Value::String(rv.to_string()));
        let key = (
            meta_str(&object, "namespace").to_string(),
            meta_str(&object, "name").to_string(),
        );
        let history_limit = self.history_limit;
        let collection = self
            .collections
            .entry(store.clone())
            .or_insert_with(|| Collection::new(rv - 1));
        match event {
            EventType::Deleted => {
                collection.objects.remove(&key);
            }
            EventType::Added | EventType::Modified => {
                collection.objects.insert(key, object.clone());
            }
        }
        collection.history.push_back(Arc::new(WatchRecord {
            rv,
            event,
            object: object.clone(),
            previous,
        }));
        while collection.history.len() > history_limit {
            if let Some(evicted) = collection.history.pop_front() {
                collection.floor = evicted.rv;
            }
        }
        collection.notify.send_replace(rv);
        if event == EventType::Deleted {
            self.removed_uids
                .insert(meta_str(&object, "uid").to_string());
            self.gc_pending = true;
        } else if is_deleting(&object) {
            self.gc_pending = true;
        }
        object
    }

    /// Forgets watch history for every resource, so any watch resuming from before now gets 410.
    pub fn compact(&mut self) {
        let rv = self.rv;
        for collection in self.collections.values_mut() {
            collection.history.clear();
            collection.floor = rv;
        }
    }

    pub fn create(
        &mut self,
        kind: &KindInfo,
        namespace: Option<&str>,
        body: Value,
        options: &WriteOptions,
    ) -> Result<Value, ApiError> {
        if !meta_str(&body, "resourceVersion").is_empty() {
            // etcd3's Create refuses this, and the apiserver surfaces it as an internal error.
            return Err(ApiError::internal(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        self.create_owned(kind, namespace, body, options, Ownership::Update)
    }

    fn create_owned(
        &mut self,
        kind: &KindInfo,
        namespace: Option<&str>,
        body: Value,
        options: &WriteOptions,
        ownership: Ownership,
    ) -> Result<Value, ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be a JSON object",
            ));
        }
        let mut object = views::absorb(kind, body);
        let namespace = self.check_namespace(kind, namespace, &object)?;
        let metadata = meta_mut(&mut object);
        let mut name = metadata
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if name.is_empty() {
            match metadata.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => name = format!("{prefix}{}", random_suffix()),
                _ => {
                    return Err(ApiError::invalid(
                        &kind.kind,
                        &kind.group,
                        "",
                        "metadata.name",
                        "Required value: name or generateName is required",
                    ))
                }
            }
        }
        metadata.insert("name".into(), Value::String(name.clone()));
        match &namespace {
            Some(ns) => metadata.insert("namespace".into(), Value::String(ns.clone())),
            None => metadata.remove("namespace"),
        };
        for field in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
        ] {
            metadata.remove(field);
        }
        let now = now_rfc3339();
        metadata.insert("uid".into(), Value::String(new_uid()));
        metadata.insert("creationTimestamp".into(), Value::String(now.clone()));
        if kind.tracks_generation {
            metadata.insert("generation".into(), json!(1));
        } else {
            metadata.remove("generation");
        }
        let key = (namespace.clone().unwrap_or_default(), name.clone());
        if self
            .collection(kind)
            .is_some_and(|c| c.objects.contains_key(&key))
        {
            return Err(ApiError::already_exists(target(kind, &name)));
        }
        if kind.status_subresource && !kind.built_in {
            if let Some(fields) = object.as_object_mut() {
                fields.remove("status");
            }
        }
        conform_to_schema(kind, &mut object, options.field_validation)?;
        self.apply_kind_defaults(kind, &mut object, &now)?;
        match ownership {
            Ownership::Update => managed::record_update(
                kind,
                None,
                &mut object,
                &options.field_manager,
                Subresource::Main,
                &now,
            ),
            Ownership::Apply(applied) => managed::replace_entries_with_apply(
                &mut object,
                &options.field_manager,
                &kind.api_version(),
                &applied,
                Subresource::Main,
            ),
        }
        if options.dry_run {
            meta_mut(&mut object).insert("resourceVersion".into(), Value::String(String::new()));
            return Ok(object);
        }
        let stored = self.commit(&kind.store, EventType::Added, object, None);
        if kind.group == "apiextensions.k8s.io" {
            self.sync_kinds();
        }
        Ok(stored)
    }

    /// Checks the request namespace against the body and that it exists and is not terminating.
    fn check_namespace(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        object: &Value,
    ) -> Result<Option<String>, ApiError> {
        if !kind.namespaced {
            return Ok(None);
        }
        let body_namespace = meta_str(object, "namespace");
        let namespace = match (namespace, body_namespace) {
            (Some(path), body) if !body.is_empty() && body != path => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ))
            }
            (Some(path), _) => path.to_string(),
            (None, body) if !body.is_empty() => body.to_string(),
            (None, _) => return Err(ApiError::bad_request("a namespaced resource needs a namespace")),
        };
        match self.namespace_phase(&namespace).as_deref() {
            None => Err(ApiError::not_found(ErrorTarget { group: "", resource: "namespaces", name: &namespace })),
            Some("Terminating") => Err(ApiError::forbidden(format!(
                "{} \"{}\" is forbidden: unable to create new content in namespace {namespace} because it is being terminated",
                kind.plural,
                meta_str(object, "name")
            ))),
            Some(_) => Ok(Some(namespace)),
        }
    }

    fn apply_kind_defaults(
        &self,
        kind: &KindInfo,
        object: &mut Value,
        now: &str,
    ) -> Result<(), ApiError> {
        match (kind.group.as_str(), kind.plural.as_str()) {
            ("", "namespaces") => {
                if object["status"]["phase"].as_str().is_none() {
                    object["status"] = json!({"phase": "Active"});
                }
                object["spec"] = json!({"finalizers": ["kubernetes"]});
            }
            ("apiextensions.k8s.io", "customresourcedefinitions") => {
                let spec = &object["spec"];
                let group = spec["group"].as_str().unwrap_or_default();
                let plural = spec["names"]["plural"].as_str().unwrap_or_default();
                let name = meta_str(object, "name");
                if group.is_empty()
                    || plural.is_empty()
                    || spec["names"]["kind"]
                        .as_str()
                        .unwrap_or_default()
                        .is_empty()
                {
                    return Err(ApiError::invalid(
                        &kind.kind,
                        &kind.group,
                        name,
                        "spec",
                        "Required value: group, names.plural and names.kind are required",
                    ));
                }
                if name != format!("{plural}.{group}") {
                    return Err(ApiError::invalid(
                        &kind.kind,
                        &kind.group,
                        name,
                        "metadata.name",
                        "Invalid value: must be spec.names.plural+\".\"+spec.group",
                    ));
                }
                object["status"] = crd_status(object, now);
            }
            ("events.k8s.io", "events") => {
                // The apiserver requires these on events.k8s.io writes; kube's Recorder sends them.
                let type_ = object["type"].as_str().unwrap_or_default();
                if type_ != "Normal" && type_ != "Warning" {
                    return Err(ApiError::invalid(
                        &kind.kind,
                        &kind.group,
                        meta_str(object, "name"),
                        "type",
                        &format!("Unsupported value: \"{type_}\": supported values: \"Normal\", \"Warning\""),
                    ));
                }
                for field in [
                    "eventTime",
                    "action",
                    "reason",
                    "reportingComponent",
                    "reportingInstance",
                ] {
                    if object[field].is_null() || object[field].as_str() == Some("") {
                        let shown = if field == "reportingComponent" {
                            "reportingController"
                        } else {
                            field
                        };
                        return Err(ApiError::invalid(
                            &kind.kind,
                            &kind.group,
                            meta_str(object, "name"),
                            shown,
                            "Required value",
                        ));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn check_preconditions(
        kind: &KindInfo,
        current: &Value,
        rv: Option<&str>,
        uid: Option<&str>,
    ) -> Result<(), ApiError> {
        let name = meta_str(current, "name");
        if let Some(rv) = rv.filter(|rv| !rv.is_empty()) {
            if rv != meta_str(current, "resourceVersion") {
                return Err(ApiError::conflict(target(kind, name)));
            }
        }
        if let Some(uid) = uid.filter(|uid| !uid.is_empty()) {
            if uid != meta_str(current, "uid") {
                return Err(ApiError::conflict(target(kind, name)));
            }
        }
        Ok(())
    }

    /// PUT: replaces an object (or its status or scale) under a resourceVersion precondition.
    pub fn update(
        &mut self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
        subresource: Subresource,
        body: Value,
        options: &WriteOptions,
    ) -> Result<Value, ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be a JSON object",
            ));
        }
        let current = self.get(kind, namespace, name)?;
        let body_name = meta_str(&body, "name");
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let requested_rv = meta_str(&body, "resourceVersion").to_string();
        if requested_rv.is_empty() && !kind.allow_unconditional_update {
            return Err(ApiError::invalid(
                &kind.kind,
                &kind.group,
                name,
                "metadata.resourceVersion",
                "Invalid value: 0x0: must be specified for an update",
            ));
        }
        Self::check_preconditions(
            kind,
            &current,
            Some(&requested_rv),
            Some(meta_str(&body, "uid")),
        )?;
        let candidate = match subresource {
            Subresource::Scale => self.scale_to_object(kind, &current, &body)?,
            _ => views::absorb(kind, body),
        };
        self.finish_update(kind, current, candidate, subresource, options, false)
    }

    /// PATCH in any of the four formats. Returns the object and whether apply created it.
    pub fn patch(
        &mut self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
        subresource: Subresource,
        patch: PatchBody<'_>,
        options: &WriteOptions,
    ) -> Result<(Value, bool), ApiError> {
        let PatchBody { patch_type, body } = patch;
        if patch_type == PatchType::Strategic && !kind.built_in {
            return Err(ApiError::unsupported_media_type(
                "application/strategic-merge-patch+json",
            ));
        }
        let current = match self.get(kind, namespace, name) {
            Ok(current) => current,
            Err(not_found) => {
                let PatchType::Apply { .. } = patch_type else {
                    return Err(not_found);
                };
                if subresource != Subresource::Main {
                    return Err(not_found);
                }
                let created = self.apply_create(kind, namespace, name, body, options)?;
                return Ok((created, true));
            }
        };
        let body = views::absorb_patch(kind, body.clone());
        let mut candidate = match subresource {
            Subresource::Scale => self.scale_of(kind, &current)?,
            _ => current.clone(),
        };
        match patch_type {
            PatchType::Merge => {
                if !body.is_object() {
                    return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                }
                patch::merge_patch(&mut candidate, &body);
            }
            PatchType::Json => patch::json_patch(&mut candidate, &body)?,
            PatchType::Strategic => patch::strategic_merge_patch(&mut candidate, &body)?,
            PatchType::Apply { force } => {
                candidate = managed::apply(
                    kind,
                    &current,
                    &body,
                    &options.field_manager,
                    subresource,
                    force,
                )
                .map_err(|causes| ApiError::apply_conflict(target(kind, name), causes))?;
            }
        }
        if subresource == Subresource::Scale {
            // A resourceVersion written into the Scale is a precondition on the scaled object.
            Self::check_preconditions(
                kind,
                &current,
                Some(meta_str(&candidate, "resourceVersion")),
                None,
            )?;
            candidate = self.scale_to_object(kind, &current, &candidate)?;
        } else {
            // A resourceVersion in the patch body is a precondition, exactly like on PUT.
            Self::check_preconditions(
                kind,
                &current,
                Some(meta_str(&candidate, "resourceVersion")),
                Some(meta_str(&candidate, "uid")),
            )?;
        }
        let is_apply = matches!(patch_type, PatchType::Apply { .. });
        let updated =
            self.finish_update(kind, current, candidate, subresource, options, is_apply)?;
        Ok((updated, false))
    }

    fn apply_create(
        &mut self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
        body: &Value,
        options: &WriteOptions,
    ) -> Result<Value, ApiError> {
        if body["apiVersion"].as_str().unwrap_or_default().is_empty()
            || body["kind"].as_str().unwrap_or_default().is_empty()
        {
            return Err(ApiError::bad_request(
                "apply patches must set apiVersion and kind",
            ));
        }
        let mut object = body.clone();
        let metadata = meta_mut(&mut object);
        metadata.insert("name".into(), Value::String(name.to_string()));
        metadata.remove("resourceVersion");
        let applied_set = managed::applied_set(kind, &object);
        self.create_owned(
            kind,
            namespace,
            object,
            options,
            Ownership::Apply(applied_set),
        )
    }

    /// The rules every update shares: which parts a subresource may change, immutable metadata,
    /// generation, finalizers on deleting objects, and the no-op short-circuit.
    fn finish_update(
        &mut self,
        kind: &KindInfo,
        current: Value,
        candidate: Value,
        subresource: Subresource,
        options: &WriteOptions,
        is_apply: bool,
    ) -> Result<Value, ApiError> {
        let name = meta_str(&current, "name").to_string();
        let mut next = match subresource {
            Subresource::Status => {
                let mut next = current.clone();
                copy_status(&candidate, &mut next);
                if is_apply {
                    next["metadata"]["managedFields"] =
                        candidate["metadata"]["managedFields"].clone();
                }
                next
            }
            Subresource::Main | Subresource::Scale => {
                let mut next = candidate;
                if kind.status_subresource {
                    copy_status(&current, &mut next);
                }
                next
            }
        };
        if let Some(fields) = next.as_object_mut() {
            fields.insert("apiVersion".into(), current["apiVersion"].clone());
            fields.insert("kind".into(), current["kind"].clone());
        }
        let old_meta = meta(&current).clone();
        let metadata = meta_mut(&mut next);
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "resourceVersion",
        ] {
            match old_meta.get(field) {
                Some(value) => metadata.insert(field.into(), value.clone()),
                None => metadata.remove(field),
            };
        }
        if !is_apply {
            match old_meta.get("managedFields") {
                Some(value) => metadata.insert("managedFields".into(), value.clone()),
                None => metadata.remove("managedFields"),
            };
        }
        if metadata
            .get("finalizers")
            .is_some_and(|f| f.as_array().is_some_and(Vec::is_empty))
        {
            metadata.remove("finalizers");
        }
        if is_deleting(&current) {
            let old_finalizers = finalizers(&current);
            if finalizers(&next)
                .iter()
                .any(|f| !old_finalizers.contains(f))
            {
                return Err(ApiError::invalid(
                    &kind.kind,
                    &kind.group,
                    &name,
                    "metadata.finalizers",
                    "Forbidden: no new finalizers can be added if the object is being deleted",
                ));
            }
        }
        if kind.tracks_generation
            && subresource != Subresource::Status
            && generation_relevant_change(kind, &current, &next)
        {
            let generation = old_meta["generation"].as_i64().unwrap_or(0) + 1;
            meta_mut(&mut next).insert("generation".into(), json!(generation));
        }
        if kind.group == "apiextensions.k8s.io"
            && kind.plural == "customresourcedefinitions"
            && subresource == Subresource::Main
        {
            next["status"] = crd_status(&next, &now_rfc3339());
            if let Some(conditions) = current["status"]["conditions"].as_array() {
                // Keep the original transition times: re-registration is not a transition.
                next["status"]["conditions"] = Value::Array(conditions.clone());
            }
        }
        conform_to_schema(kind, &mut next, options.field_validation)?;
        if content(&next) == content(&current) {
            return Ok(current);
        }
        let now = now_rfc3339();
        if !is_apply {
            managed::record_update(
                kind,
                Some(&current),
                &mut next,
                &options.field_manager,
                subresource,
                &now,
            );
        }
        if options.dry_run {
            return Ok(next);
        }
        if is_deleting(&next) && finalizers(&next).is_empty() {
            let removed = self.commit(&kind.store, EventType::Deleted, next, Some(current));
            self.after_removal(kind);
            return Ok(removed);
        }
        let stored = self.commit(&kind.store, EventType::Modified, next, Some(current));
        if kind.group == "apiextensions.k8s.io" {
            self.sync_kinds();
        }
        self.collect_garbage();
        Ok(stored)
    }

    fn after_removal(&mut self, kind: &KindInfo) {
        if kind.group == "apiextensions.k8s.io" {
            self.remove_orphaned_custom_resources();
            self.sync_kinds();
        }
        self.collect_garbage();
    }

    /// Deleting a CRD deletes its custom resources, as the apiserver's CRD finalizer does.
    fn remove_orphaned_custom_resources(&mut self) {
        let live: BTreeSet<StoreKey> = self
            .collections
            .get(&crd_store_key())
            .map(|c| {
                c.objects
                    .values()
                    .flat_map(kinds_from_crd)
                    .map(|k| k.store)
                    .collect()
            })
            .unwrap_or_default();
        let doomed: Vec<(StoreKey, Value)> = self
            .kinds
            .iter()
            .filter(|k| k.crd_name.is_some() && !live.contains(&k.store))
            .flat_map(|k| {
                self.collections
                    .get(&k.store)
                    .map(|c| {
                        c.objects
                            .values()
                            .map(|o| (k.store.clone(), o.clone()))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            })
            .collect();
        for (store, object) in doomed {
            self.commit(&store, EventType::Deleted, object.clone(), Some(object));
        }
    }

    /// The `autoscaling/v1 Scale` view of an object.
    pub fn scale_of(&self, kind: &KindInfo, object: &Value) -> Result<Value, ApiError> {
        let scale = scale_spec(kind)?;
        let metadata = meta(object);
        let selector = match &scale.label_selector_path {
            Some(path) if scale.selector_is_object => label_selector_string(get_path(object, path)),
            Some(path) => get_path(object, path)
                .as_str()
                .unwrap_or_default()
                .to_string(),
            None => String::new(),
        };
        let mut status = json!({"replicas": get_path(object, &scale.status_replicas_path).as_i64().unwrap_or(0)});
        if !selector.is_empty() {
            status["selector"] = Value::String(selector);
        }
        let mut scale_metadata = json!({
            "name": metadata["name"],
            "uid": metadata["uid"],
            "resourceVersion": metadata["resourceVersion"],
            "creationTimestamp": metadata["creationTimestamp"],
        });
        if let Some(ns) = metadata.get("namespace") {
            scale_metadata["namespace"] = ns.clone();
        }
        Ok(json!({
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": scale_metadata,
            "spec": {"replicas": get_path(object, &scale.spec_replicas_path).as_i64().unwrap_or(0)},
            "status": status,
        }))
    }

    fn scale_to_object(
        &self,
        kind: &KindInfo,
        current: &Value,
        scale_body: &Value,
    ) -> Result<Value, ApiError> {
        let scale = scale_spec(kind)?;
        let replicas = scale_body["spec"]["replicas"].as_i64().unwrap_or(0);
        if replicas < 0 {
            return Err(ApiError::invalid(
                "Scale",
                "autoscaling",
                meta_str(current, "name"),
                "spec.replicas",
                &format!("Invalid value: {replicas}: must be greater than or equal to 0"),
            ));
        }
        let mut object = current.clone();
        set_path(&mut object, &scale.spec_replicas_path, json!(replicas));
        Ok(object)
    }

    pub fn delete(
        &mut self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
        options: &DeleteOptions,
    ) -> Result<DeleteOutcome, ApiError> {
        let current = self.get(kind, namespace, name)?;
        Self::check_preconditions(
            kind,
            &current,
            options.precondition_rv.as_deref(),
            options.precondition_uid.as_deref(),
        )?;
        let mut marked = current.clone();
        let mut list = finalizers(&marked);
        let policy_finalizer = match options.propagation.as_deref() {
            Some("Foreground") => Some(FINALIZER_FOREGROUND),
            Some("Orphan") => Some(FINALIZER_ORPHAN),
            _ => None,
        };
        if let Some(finalizer) = policy_finalizer {
            if !is_deleting(&current) && !list.iter().any(|f| f == finalizer) {
                list.push(finalizer.to_string());
            }
        }
        let is_namespace = kind.group.is_empty() && kind.plural == "namespaces";
        if is_namespace && IMMORTAL_NAMESPACES.contains(&name) {
            // The NamespaceLifecycle admission plugin protects these.
            return Err(ApiError::forbidden(format!(
                "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
            )));
        }
        if list.is_empty() && !is_namespace {
            if options.dry_run {
                return Ok(DeleteOutcome::Removed(current));
            }
            let removed = self.commit(
                &kind.store,
                EventType::Deleted,
                current.clone(),
                Some(current),
            );
            self.after_removal(kind);
            return Ok(DeleteOutcome::Removed(removed));
        }
        if is_deleting(&current) {
            return Ok(DeleteOutcome::Pending(current));
        }
        set_finalizers(&mut marked, &list);
        mark_deleting(&mut marked);
        if is_namespace {
            marked["status"]["phase"] = json!("Terminating");
        }
        if options.dry_run {
            return Ok(DeleteOutcome::Pending(marked));
        }
        let stored = self.commit(&kind.store, EventType::Modified, marked, Some(current));
        self.collect_garbage();
        Ok(DeleteOutcome::Pending(stored))
    }

    /// Every stored object with its store, for garbage collection passes.
    fn all_objects(&self) -> Vec<(StoreKey, Value)> {
        self.collections
            .iter()
            .flat_map(|(store, c)| c.objects.values().map(move |o| (store.clone(), o.clone())))
            .collect()
    }

    fn remove_now(&mut self, store: &StoreKey, object: Value) {
        self.commit(store, EventType::Deleted, object.clone(), Some(object));
    }

    /// Starts deleting an object on behalf of the garbage collector (background propagation).
    fn gc_delete(&mut self, store: &StoreKey, object: Value) {
        if is_deleting(&object) {
            return;
        }
        if finalizers(&object).is_empty() {
            self.remove_now(store, object);
        } else {
            let mut marked = object.clone();
            mark_deleting(&mut marked);
            self.commit(store, EventType::Modified, marked, Some(object));
        }
    }

    /// Starts deleting the first of `objects` that is not being deleted yet; false if none is left.
    fn gc_delete_first_live(&mut self, objects: &[&(StoreKey, Value)]) -> bool {
        match objects.iter().find(|(_, o)| !is_deleting(o)) {
            Some((store, object)) => {
                self.gc_delete(store, object.clone());
                true
            }
            None => false,
        }
    }

    fn without_finalizer(&mut self, store: &StoreKey, object: &Value, finalizer: &str) {
        let mut next = object.clone();
        let list: Vec<String> = finalizers(object)
            .into_iter()
            .filter(|f| f != finalizer)
            .collect();
        set_finalizers(&mut next, &list);
        if list.is_empty() && is_deleting(object) {
            self.commit(store, EventType::Deleted, next, Some(object.clone()));
        } else {
            self.commit(store, EventType::Modified, next, Some(object.clone()));
        }
    }

    /// Runs the garbage collector and namespace controller synchronously until nothing changes:
    /// dependents of removed owners are deleted, `orphan` and `foregroundDeletion` finalizers are
    /// processed, and terminating namespaces are emptied and removed.
    fn collect_garbage(&mut self) {
        if !self.gc_pending {
            return;
        }
        // Bounded: each pass removes or changes at least one object, or the loop ends.
        for _ in 0..100_000 {
            if !self.garbage_pass() {
                break;
            }
        }
        self.gc_pending = false;
    }

    fn garbage_pass(&mut self) -> bool {
        let objects = self.all_objects();
        let live_uids: HashSet<String> = objects
            .iter()
            .map(|(_, o)| meta_str(o, "uid").to_string())
            .collect();
        let owner_uids = |object: &Value| -> Vec<String> {
            meta(object)["ownerReferences"]
                .as_array()
                .map(|refs| {
                    refs.iter()
                        .filter_map(|r| r["uid"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let dependents_of = |uid: &str| -> Vec<&(StoreKey, Value)> {
            objects
                .iter()
                .filter(|(_, o)| owner_uids(o).iter().any(|u| u == uid))
                .collect()
        };
        for (store, object) in &objects {
            let deleting = is_deleting(object);
            let uid = meta_str(object, "uid");
            let list = finalizers(object);
            if deleting && list.iter().any(|f| f == FINALIZER_ORPHAN) {
                for (dep_store, dependent) in dependents_of(uid) {
                    let mut freed = dependent.clone();
                    if let Some(Value::Array(refs)) = freed["metadata"].get_mut("ownerReferences") {
                        refs.retain(|r| r["uid"].as_str() != Some(uid));
                        if refs.is_empty() {
                            meta_mut(&mut freed).remove("ownerReferences");
                        }
                    }
                    self.commit(
                        dep_store,
                        EventType::Modified,
                        freed,
                        Some(dependent.clone()),
                    );
                }
                self.without_finalizer(store, object, FINALIZER_ORPHAN);
                return true;
            }
            if deleting && list.iter().any(|f| f == FINALIZER_FOREGROUND) {
                let dependents = dependents_of(uid);
                if self.gc_delete_first_live(&dependents) {
                    return true;
                }
                let blocking = dependents.iter().any(|(_, o)| {
                    meta(o)["ownerReferences"].as_array().is_some_and(|refs| {
                        refs.iter().any(|r| {
                            r["uid"].as_str() == Some(uid)
                                && r["blockOwnerDeletion"].as_bool() == Some(true)
                        })
                    })
                });
                if !blocking {
                    self.without_finalizer(store, object, FINALIZER_FOREGROUND);
                    return true;
                }
            }
            let owners = owner_uids(object);
            let owners_removed = !owners.is_empty()
                && owners.iter().all(|u| !live_uids.contains(u))
                && owners.iter().any(|u| self.removed_uids.contains(u));
            if !deleting && owners_removed {
                self.gc_delete(store, object.clone());
                return true;
            }
            if deleting && store.group.is_empty() && store.resource == "namespaces" {
                let name = meta_str(object, "name");
                let contents: Vec<&(StoreKey, Value)> = objects
                    .iter()
                    .filter(|(_, o)| meta_str(o, "namespace") == name)
                    .collect();
                if self.gc_delete_first_live(&contents) {
                    return true;
                }
                if contents.is_empty() && list.is_empty() {
                    self.remove_now(store, object.clone());
                    return true;
                }
            }
        }
        false
    }

    pub fn delete_collection(
        &mut self,
        kind: &KindInfo,
        namespace: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        options: &DeleteOptions,
    ) -> Result<Vec<Value>, ApiError> {
        let (items, _) = self.list(kind, namespace, labels, fields);
        let mut deleted = Vec::new();
        for item in items {
            let item_namespace = meta_str(&item, "namespace").to_string();
            let ns = (!item_namespace.is_empty()).then_some(item_namespace.as_str());
            match self.delete(kind, ns, meta_str(&item, "name"), options)? {
                DeleteOutcome::Removed(object) | DeleteOutcome::Pending(object) => {
                    deleted.push(object)
                }
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_with_crd() -> (State, Arc<KindInfo>) {
        let mut state = State::new(100);
        let crds = state
            .resolve("apiextensions.k8s.io", "v1", "customresourcedefinitions")
            .expect("crd kind");
        let crd = json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "foos.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced", "names": {"plural": "foos", "kind": "Foo"},
                "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}}}]},
        });
        state
            .create(&crds, None, crd, &options())
            .expect("crd created");
        let foo = state
            .resolve("example.com", "v1", "foos")
            .expect("foo served");
        (state, foo)
    }

    fn options() -> WriteOptions {
        WriteOptions {
            field_manager: "test".into(),
            ..Default::default()
        }
    }

    /// Creates `body` in the `default` namespace as the test's field manager.
    fn create(state: &mut State, kind: &KindInfo, body: Value) -> Result<Value, ApiError> {
        state.create(kind, Some("default"), body, &options())
    }

    /// Creates an object with nothing but `name` in the `default` namespace.
    fn create_named(state: &mut State, kind: &KindInfo, name: &str) -> Result<Value, ApiError> {
        create(state, kind, json!({"metadata": {"name": name}}))
    }

    /// Merge-patches `default/<name>` as the test's field manager.
    fn merge_patch(
        state: &mut State,
        kind: &KindInfo,
        name: &str,
        body: Value,
    ) -> Result<Value, ApiError> {
        merge_patch_at(state, kind, name, Subresource::Main, body)
    }

    /// Merge-patches `default/<name>` or one of its subresources as the test's field manager.
    fn merge_patch_at(
        state: &mut State,
        kind: &KindInfo,
        name: &str,
        subresource: Subresource,
        body: Value,
    ) -> Result<Value, ApiError> {
        let patch = PatchBody {
            patch_type: PatchType::Merge,
            body: &body,
        };
        let (patched, _created) =
            state.patch(kind, Some("default"), name, subresource, patch, &options())?;
        Ok(patched)
    }

    /// Replaces `default/<name>` with `body` as the test's field manager.
    fn update(
        state: &mut State,
        kind: &KindInfo,
        name: &str,
        body: Value,
    ) -> Result<Value, ApiError> {
        state.update(
            kind,
            Some("default"),
            name,
            Subresource::Main,
            body,
            &options(),
        )
    }

    #[test]
    fn no_op_patch_keeps_resource_version_and_records_no_event() {
        let (mut state, foo) = state_with_crd();
        let created = create(
            &mut state,
            &foo,
            json!({"metadata": {"name": "a"}, "spec": {"x": 1}}),
        )
        .expect("created");
        let rv = state.resource_version();
        let patched =
            merge_patch(&mut state, &foo, "a", json!({"spec": {"x": 1}})).expect("patched");
        assert_eq!(
            patched["metadata"]["resourceVersion"],
            created["metadata"]["resourceVersion"]
        );
        assert_eq!(state.resource_version(), rv);
        assert!(state
            .events_since(&foo.store, rv)
            .expect("history")
            .is_empty());
    }

    #[test]
    fn status_and_spec_writes_keep_each_other_and_generation_tracks_spec_only() {
        let (mut state, foo) = state_with_crd();
        let created = create(
            &mut state,
            &foo,
            json!({"metadata": {"name": "a"}, "spec": {"x": 1}, "status": {"dropped": true}}),
        )
        .expect("created");
        assert!(
            created.get("status").is_none(),
            "create drops status when status is a subresource"
        );
        let with_status = merge_patch_at(
            &mut state,
            &foo,
            "a",
            Subresource::Status,
            json!({"status": {"ready": true}, "spec": {"x": 9}}),
        )
        .expect("status patch");
        assert_eq!(with_status["spec"]["x"], 1);
        assert_eq!(with_status["metadata"]["generation"], 1);
        let with_spec = merge_patch(
            &mut state,
            &foo,
            "a",
            json!({"spec": {"x": 2}, "status": {"ready": false}}),
        )
        .expect("spec patch");
        assert_eq!(with_spec["status"]["ready"], true);
        assert_eq!(with_spec["metadata"]["generation"], 2);
        let labelled = merge_patch(
            &mut state,
            &foo,
            "a",
            json!({"metadata": {"labels": {"l": "v"}}}),
        )
        .expect("label patch");
        assert_eq!(labelled["metadata"]["generation"], 2);
    }

    #[test]
    fn stale_resource_version_conflicts() {
        let (mut state, foo) = state_with_crd();
        let created = create_named(&mut state, &foo, "a").expect("created");
        let stale = created["metadata"]["resourceVersion"]
            .as_str()
            .expect("rv")
            .to_string();
        merge_patch(&mut state, &foo, "a", json!({"spec": {"x": 1}})).expect("patched");
        let mut replacement = created.clone();
        replacement["metadata"]["resourceVersion"] = json!(stale);
        let error = update(&mut state, &foo, "a", replacement).expect_err("conflict");
        assert_eq!((error.code, error.reason), (409, "Conflict"));
        let error = merge_patch(
            &mut state,
            &foo,
            "a",
            json!({"metadata": {"resourceVersion": stale}}),
        )
        .expect_err("conflict");
        assert_eq!(error.code, 409);
        let mut unconditional = created;
        meta_mut(&mut unconditional).remove("resourceVersion");
        let error =
            update(&mut state, &foo, "a", unconditional).expect_err("custom resources need an rv");
        assert_eq!(error.code, 422);
    }

    #[test]
    fn history_window_expires_old_resource_versions() {
        let mut state = State::new(2);
        let cm = state.resolve("", "v1", "configmaps").expect("configmaps");
        let start = state.resource_version();
        for name in ["a", "b", "c"] {
            create_named(&mut state, &cm, name).expect("created");
        }
        assert_eq!(
            state
                .events_since(&cm.store, start)
                .expect_err("expired")
                .code,
            410
        );
        assert_eq!(
            state
                .events_since(&cm.store, start + 1)
                .expect("in window")
                .len(),
            2
        );
    }

    #[test]
    fn background_deletion_collects_dependents_and_orphan_keeps_them() {
        let mut state = State::new(100);
        let cm = state.resolve("", "v1", "configmaps").expect("configmaps");
        let owner = create_named(&mut state, &cm, "owner").expect("owner");
        let uid = owner["metadata"]["uid"].clone();
        let child = json!({"metadata": {"name": "child", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]}});
        create(&mut state, &cm, child.clone()).expect("child");
        state
            .delete(&cm, Some("default"), "owner", &DeleteOptions::default())
            .expect("deleted");
        assert_eq!(
            state
                .get(&cm, Some("default"), "child")
                .expect_err("collected")
                .code,
            404
        );

        let owner = create_named(&mut state, &cm, "owner").expect("owner");
        let mut child = child;
        child["metadata"]["ownerReferences"][0]["uid"] = owner["metadata"]["uid"].clone();
        create(&mut state, &cm, child).expect("child");
        let orphan = DeleteOptions {
            propagation: Some("Orphan".into()),
            ..Default::default()
        };
        state
            .delete(&cm, Some("default"), "owner", &orphan)
            .expect("deleted");
        assert_eq!(
            state
                .get(&cm, Some("default"), "owner")
                .expect_err("owner gone")
                .code,
            404
        );
        let kept = state
            .get(&cm, Some("default"), "child")
            .expect("child kept");
        assert!(kept["metadata"].get("ownerReferences").is_none());
    }

    #[test]
    fn generate_name_and_missing_namespace() {
        let mut state = State::new(100);
        let cm = state.resolve("", "v1", "configmaps").expect("configmaps");
        let created =
            create(&mut state, &cm, json!({"metadata": {"generateName": "x-"}})).expect("created");
        let name = created["metadata"]["name"].as_str().expect("name");
        assert!(name.starts_with("x-") && name.len() == 7, "{name}");
        let error = state
            .create(
                &cm,
                Some("nope"),
                json!({"metadata": {"name": "a"}}),
                &options(),
            )
            .expect_err("404");
        assert_eq!(error.message, "namespaces \"nope\" not found");
    }
}
