//! HTTP front end: URL parsing, verbs, request counting, fault injection and watch streams.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State as AxumState};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::discovery;
use crate::error::{ApiError, ErrorTarget};
use crate::faults::{FaultAction, FaultRule, Faults, RequestCounts, RequestFacts, RequestKey};
use crate::kinds::KindInfo;
use crate::schema::FieldValidation;
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{
    DeleteOptions, DeleteOutcome, EventType, PatchBody, PatchType, State, Subresource, WatchRecord,
    WriteOptions,
};
use crate::table::{self, IncludeObject};
use crate::views;

/// Largest request body accepted (the apiserver's limit is 3 MiB for objects).
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Watch length when the client sets no `timeoutSeconds`.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// Pending lines per watch stream before the writer waits for the client.
const WATCH_BUFFER: usize = 256;

/// Shared server state.
pub struct Sim {
    state: Mutex<State>,
    requests: Mutex<RequestCounts>,
    faults: Mutex<Faults>,
    watch_drops: watch::Sender<u64>,
    shutdown: CancellationToken,
    bookmark_interval: Duration,
    server_address: Mutex<String>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent data (every mutation is a single call).
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Sim {
    pub fn new(
        history_window: usize,
        bookmark_interval: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            state: Mutex::new(State::new(history_window)),
            requests: Mutex::new(RequestCounts::default()),
            faults: Mutex::new(Faults::default()),
            watch_drops: watch::Sender::new(0),
            shutdown,
            bookmark_interval,
            server_address: Mutex::new(String::new()),
        }
    }

    pub fn set_server_address(&self, address: String) {
        *lock(&self.server_address) = address;
    }

    /// Runs `f` with the store locked; the guard never crosses an `.await`.
    pub fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut lock(&self.state))
    }

    pub fn request_counts(&self) -> Value {
        lock(&self.requests).render()
    }

    pub fn reset_request_counts(&self) {
        lock(&self.requests).reset();
    }

    pub fn add_fault(&self, rule: FaultRule) {
        if rule.drop_watches {
            self.watch_drops.send_modify(|generation| *generation += 1);
        }
        if rule.is_persistent() {
            lock(&self.faults).add(rule);
        }
    }

    pub fn clear_faults(&self) {
        lock(&self.faults).clear();
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn ok(body: &Value) -> Response {
    json_response(StatusCode::OK, body)
}

fn percent_decode(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Query parameters; kube-rs sends empty segments (`?&a=b`), which are skipped.
fn parse_query(raw: Option<&str>) -> BTreeMap<String, String> {
    raw.unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(pair), String::new()),
        })
        .collect()
}

fn version_body() -> Value {
    json!({
        "major": "1",
        "minor": crate::SERVER_MINOR_VERSION,
        "gitVersion": crate::SERVER_GIT_VERSION,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-04-22T00:00:00Z",
        "goVersion": "go1.23.8",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// The single entry point: every URL is routed here and parsed by hand, because Kubernetes paths
/// (`/api/v1/namespaces/{ns}/{resource}/{name}/{subresource}`) overlap in ways routers dislike.
pub async fn handle(AxumState(sim): AxumState<Arc<Sim>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    let query = parse_query(parts.uri.query());
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(error) => {
            return ApiError::bad_request(format!("reading the request body: {error}"))
                .into_response()
        }
    };
    let method = parts.method;
    let is_get = method == Method::GET;
    let result = match segments.as_slice() {
        ["version"] if is_get => Ok(ok(&version_body())),
        ["healthz" | "readyz" | "livez", ..] if is_get => {
            Ok((StatusCode::OK, "ok").into_response())
        }
        ["api"] if is_get => {
            let address = lock(&sim.server_address).clone();
            Ok(ok(&discovery::api_versions(&address)))
        }
        ["api", "v1"] if is_get => sim
            .with_state(|s| discovery::api_resource_list(s.kinds(), "", "v1"))
            .map(|b| ok(&b))
            .ok_or_else(|| ApiError::no_route(&path)),
        ["apis"] if is_get => Ok(ok(&sim.with_state(|s| discovery::api_group_list(s.kinds())))),
        ["apis", group] if is_get => sim
            .with_state(|s| discovery::api_group(s.kinds(), group))
            .map(|b| ok(&b))
            .ok_or_else(|| ApiError::no_route(&path)),
        ["apis", group, version] if is_get => sim
            .with_state(|s| discovery::api_resource_list(s.kinds(), group, version))
            .map(|b| ok(&b))
            .ok_or_else(|| ApiError::no_route(&path)),
        ["openapi", "v3"] if is_get => {
            Ok(ok(&sim.with_state(|s| discovery::openapi_index(s.kinds()))))
        }
        ["openapi", "v3", rest @ ..] if is_get => {
            let document_path = rest.join("/");
            sim.with_state(|s| discovery::openapi_document(s.kinds(), &document_path))
                .map(|b| ok(&b))
                .ok_or_else(|| ApiError::no_route(&path))
        }
        ["kubesim", "requests"] => match method {
            Method::GET => Ok(ok(&sim.request_counts())),
            Method::DELETE => {
                sim.reset_request_counts();
                Ok(ok(&sim.request_counts()))
            }
            _ => Err(ApiError::method_not_allowed("use GET or DELETE")),
        },
        ["kubesim", "faults"] => match method {
            Method::POST => match serde_json::from_slice::<FaultRule>(&body) {
                Ok(rule) => {
                    sim.add_fault(rule);
                    Ok(ok(&lock(&sim.faults).render()))
                }
                Err(error) => Err(ApiError::bad_request(format!(
                    "invalid fault rule: {error}"
                ))),
            },
            Method::DELETE => {
                sim.clear_faults();
                Ok(ok(&lock(&sim.faults).render()))
            }
            _ => Err(ApiError::method_not_allowed("use POST or DELETE")),
        },
        ["api", "v1", rest @ ..] if !rest.is_empty() => {
            resource_request(&sim, method, "", "v1", rest, &query, &parts.headers, &body).await
        }
        ["apis", group, version, rest @ ..] if !rest.is_empty() => {
            resource_request(
                &sim,
                method,
                group,
                version,
                rest,
                &query,
                &parts.headers,
                &body,
            )
            .await
        }
        _ => Err(ApiError::no_route(&path)),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

/// A parsed resource URL.
struct Target {
    kind: Arc<KindInfo>,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Subresource,
}

fn parse_target(
    state: &State,
    group: &str,
    version: &str,
    rest: &[&str],
) -> Result<Target, ApiError> {
    let not_found = || ApiError::no_route(&format!("{group}/{version}/{}", rest.join("/")));
    let namespaced_resource = |resource: &str| {
        state
            .resolve(group, version, resource)
            .is_some_and(|k| k.namespaced)
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, resource, tail @ ..] if namespaced_resource(resource) => {
            let mut remaining = vec![*resource];
            remaining.extend_from_slice(tail);
            (Some(ns.to_string()), remaining)
        }
        _ => (None, rest.to_vec()),
    };
    let (resource, name, subresource) = match rest.as_slice() {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(name.to_string()), None),
        [resource, name, sub] => (*resource, Some(name.to_string()), Some(*sub)),
        _ => return Err(not_found()),
    };
    let kind = state
        .resolve(group, version, resource)
        .ok_or_else(not_found)?;
    if namespace.is_some() && !kind.namespaced {
        return Err(not_found());
    }
    let subresource = Subresource::parse(subresource).ok_or_else(not_found)?;
    let served = match subresource {
        Subresource::Main => true,
        Subresource::Status => kind.status_subresource,
        Subresource::Scale => kind.scale.is_some(),
    };
    if !served {
        return Err(not_found());
    }
    Ok(Target {
        kind,
        namespace,
        name,
        subresource,
    })
}

fn audit_verb(method: &Method, has_name: bool, watch: bool) -> Result<&'static str, ApiError> {
    Ok(match (method.as_str(), has_name) {
        ("GET", _) if watch => "watch",
        ("GET", false) => "list",
        ("GET", true) => "get",
        ("POST", false) => "create",
        ("PUT", true) => "update",
        ("PATCH", true) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        (other, _) => {
            return Err(ApiError::method_not_allowed(format!(
                "method {other} is not supported here"
            )))
        }
    })
}

fn truthy(query: &BTreeMap<String, String>, key: &str) -> bool {
    matches!(query.get(key).map(String::as_str), Some("true" | "1"))
}

fn write_options(query: &BTreeMap<String, String>, headers: &HeaderMap) -> WriteOptions {
    let field_manager = query.get("fieldManager").cloned().unwrap_or_else(|| {
        // The apiserver names an unnamed manager after the user agent's program name.
        headers
            .get(header::USER_AGENT)
            .and_then(|ua| ua.to_str().ok())
            .and_then(|ua| ua.split('/').next())
            .unwrap_or("unknown")
            .to_string()
    });
    WriteOptions {
        dry_run: query.get("dryRun").is_some_and(|v| v == "All"),
        field_manager,
        field_validation: FieldValidation::parse(query.get("fieldValidation").map(String::as_str)),
    }
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    serde_json::from_slice(body).map_err(|error| {
        ApiError::bad_request(format!("the request body is not valid JSON: {error}"))
    })
}

#[allow(clippy::too_many_arguments)]
async fn resource_request(
    sim: &Arc<Sim>,
    method: Method,
    group: &str,
    version: &str,
    rest: &[&str],
    query: &BTreeMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let target = sim.with_state(|state| parse_target(state, group, version, rest))?;
    let watch = truthy(query, "watch");
    let verb = audit_verb(&method, target.name.is_some(), watch)?;
    let kind = target.kind.clone();
    lock(&sim.requests).record(RequestKey {
        verb: verb.into(),
        group: kind.group.clone(),
        resource: kind.plural.clone(),
        subresource: target.subresource.name().into(),
    });
    let name = target.name.clone().unwrap_or_default();
    let facts = RequestFacts {
        verb,
        group: &kind.group,
        resource: &kind.plural,
        subresource: target.subresource.name(),
        namespace: target.namespace.as_deref().unwrap_or_default(),
        name: &name,
    };
    let action = lock(&sim.faults).decide(&facts);
    if let Some(FaultAction {
        latency_ms,
        code,
        retry_after_seconds,
    }) = action
    {
        if latency_ms > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(latency_ms)) => {}
                _ = sim.shutdown.cancelled() => {}
            }
        }
        if let Some(code) = code {
            if verb == "watch" && code == 410 {
                let current = sim.with_state(|s| s.resource_version());
                return Ok(expired_watch(ApiError::expired(0, current)));
            }
            let error_target = ErrorTarget {
                group: &kind.group,
                resource: &kind.plural,
                name: &name,
            };
            return Err(ApiError::injected(code, retry_after_seconds, error_target));
        }
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .unwrap_or_default();
    let as_table = table::wants_table(accept)
        .then(|| IncludeObject::parse(query.get("includeObject").map(String::as_str)));
    let namespace = target.namespace.as_deref();
    match verb {
        "get" => {
            let stored = sim.with_state(|s| s.get(&kind, namespace, &name))?;
            let object = views::present(&kind, &stored);
            if target.subresource == Subresource::Scale {
                return Ok(ok(&sim.with_state(|s| s.scale_of(&kind, &object))?));
            }
            match as_table {
                Some(include) => {
                    let rv = object["metadata"]["resourceVersion"]
                        .as_str()
                        .and_then(|rv| rv.parse().ok())
                        .unwrap_or(0);
                    Ok(ok(&table::table(
                        &kind,
                        vec![table::row(&kind, &object, include)],
                        rv,
                        None,
                    )))
                }
                None => Ok(ok(&object)),
            }
        }
        "list" => {
            let (labels, fields) = selectors(&kind, query)?;
            let (items, rv) = sim.with_state(|s| s.list(&kind, namespace, &labels, &fields));
            let items: Vec<Value> = items.iter().map(|o| views::present(&kind, o)).collect();
            match as_table {
                Some(include) => {
                    let rows = items
                        .iter()
                        .map(|o| table::row(&kind, o, include))
                        .collect();
                    Ok(ok(&table::table(&kind, rows, rv, None)))
                }
                None => Ok(ok(&list_body(&kind, rv, items))),
            }
        }
        "watch" => {
            let mut query = query.clone();
            if !name.is_empty() {
                // A watch on an item URL (the legacy form) is a watch pinned to that name.
                let pinned = format!("metadata.name={name}");
                let fields = match query.get("fieldSelector").filter(|f| !f.is_empty()) {
                    Some(existing) => format!("{existing},{pinned}"),
                    None => pinned,
                };
                query.insert("fieldSelector".into(), fields);
            }
            let params = WatchParams::parse(&kind, namespace, &query, as_table)?;
            Ok(start_watch(sim.clone(), kind, params))
        }
        "create" => {
            let body = parse_body(body)?;
            let options = write_options(query, headers);
            let created = sim.with_state(|s| s.create(&kind, namespace, body, &options))?;
            Ok(json_response(
                StatusCode::CREATED,
                &views::present(&kind, &created),
            ))
        }
        "update" => {
            let body = parse_body(body)?;
            let options = write_options(query, headers);
            let updated = sim.with_state(|s| {
                s.update(&kind, namespace, &name, target.subresource, body, &options)
            })?;
            respond_with_object(sim, &kind, target.subresource, &updated, StatusCode::OK)
        }
        "patch" => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|c| c.to_str().ok())
                .unwrap_or_default();
            let force = truthy(query, "force");
            let patch_type = PatchType::from_content_type(content_type, force)
                .ok_or_else(|| ApiError::unsupported_media_type(content_type))?;
            if force && !matches!(patch_type, PatchType::Apply { .. }) {
                return Err(ApiError::unprocessable(
                    "force: Forbidden: may not be specified for non-apply patch",
                ));
            }
            let body = parse_body(body)?;
            let options = write_options(query, headers);
            if matches!(patch_type, PatchType::Apply { .. }) && !query.contains_key("fieldManager")
            {
                return Err(ApiError::unprocessable("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"));
            }
            let (patched, created) = sim.with_state(|s| {
                s.patch(
                    &kind,
                    namespace,
                    &name,
                    target.subresource,
                    PatchBody {
                        patch_type,
                        body: &body,
                    },
                    &options,
                )
            })?;
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            respond_with_object(sim, &kind, target.subresource, &patched, status)
        }
        "delete" => {
            let options = delete_options(query, body)?;
            let outcome = sim.with_state(|s| s.delete(&kind, namespace, &name, &options))?;
            Ok(match outcome {
                DeleteOutcome::Removed(object) => ok(&json!({
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": {"name": name, "group": kind.group, "kind": kind.plural, "uid": object["metadata"]["uid"]},
                })),
                DeleteOutcome::Pending(object) => ok(&views::present(&kind, &object)),
            })
        }
        "deletecollection" => {
            let options = delete_options(query, body)?;
            let (labels, fields) = selectors(&kind, query)?;
            let (deleted, rv) = sim.with_state(|s| {
                let deleted = s.delete_collection(&kind, namespace, &labels, &fields, &options);
                (deleted, s.resource_version())
            });
            let items: Vec<Value> = deleted?.iter().map(|o| views::present(&kind, o)).collect();
            Ok(ok(&list_body(&kind, rv, items)))
        }
        _ => Err(ApiError::method_not_allowed(verb.to_string())),
    }
}

/// Parses the `labelSelector` and `fieldSelector` query parameters (absent means "everything").
fn selectors(
    kind: &KindInfo,
    query: &BTreeMap<String, String>,
) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let param = |name: &str| query.get(name).map(String::as_str).unwrap_or_default();
    let labels = LabelSelector::parse(param("labelSelector"))?;
    let fields = FieldSelector::parse(param("fieldSelector"), &kind.group, &kind.plural)?;
    Ok((labels, fields))
}

/// A `<Kind>List` body holding `items` at list resourceVersion `rv`.
fn list_body(kind: &KindInfo, rv: u64, items: Vec<Value>) -> Value {
    json!({
        "kind": kind.list_kind(),
        "apiVersion": kind.api_version(),
        "metadata": {"resourceVersion": rv.to_string()},
        "items": items,
    })
}

fn respond_with_object(
    sim: &Sim,
    kind: &KindInfo,
    subresource: Subresource,
    stored: &Value,
    status: StatusCode,
) -> Result<Response, ApiError> {
    if subresource == Subresource::Scale {
        let scale = sim.with_state(|s| s.scale_of(kind, stored))?;
        return Ok(json_response(status, &scale));
    }
    Ok(json_response(status, &views::present(kind, stored)))
}

fn delete_options(
    query: &BTreeMap<String, String>,
    body: &Bytes,
) -> Result<DeleteOptions, ApiError> {
    let parsed: Value = if body.is_empty() {
        Value::Null
    } else {
        parse_body(body)?
    };
    let dry_run_in_body = parsed["dryRun"]
        .as_array()
        .is_some_and(|d| d.iter().any(|v| v == "All"));
    Ok(DeleteOptions {
        dry_run: dry_run_in_body || query.get("dryRun").is_some_and(|v| v == "All"),
        propagation: parsed["propagationPolicy"]
            .as_str()
            .map(str::to_string)
            .or_else(|| query.get("propagationPolicy").cloned()),
        precondition_rv: parsed["preconditions"]["resourceVersion"]
            .as_str()
            .map(str::to_string),
        precondition_uid: parsed["preconditions"]["uid"].as_str().map(str::to_string),
    })
}

/// What a watch request asked for.
struct WatchParams {
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    /// `None` means "send the current state first" (resourceVersion unset or "0").
    resume_from: Option<u64>,
    send_initial_events: bool,
    bookmarks: bool,
    timeout: Duration,
    table: Option<IncludeObject>,
}

impl WatchParams {
    fn parse(
        kind: &KindInfo,
        namespace: Option<&str>,
        query: &BTreeMap<String, String>,
        table: Option<IncludeObject>,
    ) -> Result<Self, ApiError> {
        let resume_from =
            match query.get("resourceVersion").map(String::as_str) {
                None | Some("") | Some("0") => None,
                Some(rv) => Some(rv.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid resource version: {rv}"))
                })?),
            };
        let send_initial_events = truthy(query, "sendInitialEvents");
        let bookmarks = truthy(query, "allowWatchBookmarks");
        if send_initial_events && !bookmarks {
            return Err(ApiError::unprocessable("allowWatchBookmarks: Required value: sendInitialEvents requires allowWatchBookmarks"));
        }
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
        let (labels, fields) = selectors(kind, query)?;
        Ok(Self {
            namespace: namespace.map(str::to_string),
            labels,
            fields,
            resume_from,
            send_initial_events,
            bookmarks,
            timeout,
            table,
        })
    }

    fn matches(&self, object: &Value) -> bool {
        let namespace_ok = self
            .namespace
            .as_deref()
            .is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns));
        namespace_ok && self.labels.matches(object) && self.fields.matches(object)
    }
}

fn line(event_type: &str, object: Value) -> Bytes {
    let mut bytes = json!({"type": event_type, "object": object})
        .to_string()
        .into_bytes();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn streaming_response(receiver: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), receiver))
    });
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A watch that starts and immediately reports 410 Expired, as the apiserver does for a
/// resourceVersion that is too old (the HTTP status is still 200).
fn expired_watch(error: ApiError) -> Response {
    let (sender, receiver) = mpsc::channel(1);
    // Cannot fail: the channel is fresh and has room for one line.
    let _ = sender.try_send(line("ERROR", error.status()));
    streaming_response(receiver)
}

fn present_for_watch(kind: &KindInfo, params: &WatchParams, stored: &Value, rv: u64) -> Value {
    let object = views::present(kind, stored);
    match params.table {
        Some(include) => table::table(kind, vec![table::row(kind, &object, include)], rv, None),
        None => object,
    }
}

/// Turns a stored change into what this watcher sees, honouring selector transitions: an object
/// that starts matching is ADDED, one that stops matching is DELETED.
fn visible_event(params: &WatchParams, record: &WatchRecord) -> Option<&'static str> {
    let now = params.matches(&record.object);
    let before = record.previous.as_ref().is_some_and(|p| params.matches(p));
    match (record.event, before, now) {
        (EventType::Added, _, true) => Some("ADDED"),
        (EventType::Modified, true, true) => Some("MODIFIED"),
        (EventType::Modified, false, true) => Some("ADDED"),
        (EventType::Modified, true, false) => Some("DELETED"),
        (EventType::Deleted, _, true) => Some("DELETED"),
        _ => None,
    }
}

fn bookmark(kind: &KindInfo, rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(
        "BOOKMARK",
        json!({"kind": kind.kind, "apiVersion": kind.api_version(), "metadata": metadata}),
    )
}

fn start_watch(sim: Arc<Sim>, kind: Arc<KindInfo>, params: WatchParams) -> Response {
    let (sender, receiver) = mpsc::channel(WATCH_BUFFER);
    // Subscribe and snapshot under one lock so no change falls between the two.
    let (changes, cursor, initial) = sim.with_state(|state| {
        let changes = state.subscribe(&kind.store);
        let rv = state.resource_version();
        let (cursor, initial) = match (params.resume_from, params.send_initial_events) {
            (Some(from), false) => (from, Vec::new()),
            _ => {
                let (items, _) = state.list(
                    &kind,
                    params.namespace.as_deref(),
                    &params.labels,
                    &params.fields,
                );
                let lines = items
                    .iter()
                    .map(|o| line("ADDED", present_for_watch(&kind, &params, o, rv)))
                    .collect::<Vec<_>>();
                (rv, lines)
            }
        };
        (changes, cursor, initial)
    });
    tokio::spawn(run_watch(
        sim, kind, params, sender, changes, cursor, initial,
    ));
    streaming_response(receiver)
}

async fn run_watch(
    sim: Arc<Sim>,
    kind: Arc<KindInfo>,
    params: WatchParams,
    sender: mpsc::Sender<Bytes>,
    mut changes: watch::Receiver<u64>,
    mut cursor: u64,
    initial: Vec<Bytes>,
) {
    let mut drops = sim.watch_drops.subscribe();
    drops.mark_unchanged();
    for chunk in initial {
        if sender.send(chunk).await.is_err() {
            return;
        }
    }
    if params.send_initial_events && sender.send(bookmark(&kind, cursor, true)).await.is_err() {
        return;
    }
    let deadline = tokio::time::sleep(params.timeout);
    tokio::pin!(deadline);
    let mut bookmark_timer = tokio::time::interval(sim.bookmark_interval);
    bookmark_timer.tick().await;
    loop {
        changes.mark_unchanged();
        let batch = sim.with_state(|state| {
            let records = state.events_since(&kind.store, cursor)?;
            let lines: Vec<Bytes> = records
                .iter()
                .filter_map(|record| {
                    visible_event(&params, record).map(|event_type| {
                        line(
                            event_type,
                            present_for_watch(&kind, &params, &record.object, record.rv),
                        )
                    })
                })
                .collect();
            // Every change to this resource up to the current revision has now been seen.
            Ok::<_, ApiError>((lines, state.resource_version()))
        });
        match batch {
            Ok((lines, seen_up_to)) => {
                cursor = seen_up_to;
                for chunk in lines {
                    if sender.send(chunk).await.is_err() {
                        return;
                    }
                }
            }
            Err(expired) => {
                let _ = sender.send(line("ERROR", expired.status())).await;
                return;
            }
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = bookmark_timer.tick(), if params.bookmarks => {
                if sender.send(bookmark(&kind, cursor, false)).await.is_err() {
                    return;
                }
            }
            _ = &mut deadline => return,
            _ = drops.changed() => return,
            _ = sim.shutdown.cancelled() => return,
            _ = sender.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing_skips_empty_segments_and_decodes() {
        let query = parse_query(Some("&labelSelector=app%3Dweb%2Ctier+in+(a)&watch=true&"));
        assert_eq!(
            query.get("labelSelector").map(String::as_str),
            Some("app=web,tier in (a)")
        );
        assert_eq!(query.get("watch").map(String::as_str), Some("true"));
        assert_eq!(
            parse_query(Some("a=%zz")).get("a").map(String::as_str),
            Some("%zz")
        );
    }

    #[test]
    fn verbs_follow_audit_names() {
        assert_eq!(audit_verb(&Method::GET, false, true).ok(), Some("watch"));
        assert_eq!(
            audit_verb(&Method::DELETE, false, false).ok(),
            Some("deletecollection")
        );
        assert!(audit_verb(&Method::PUT, false, false).is_err());
    }
}
