//! Errors: [`KubeSimError`] for starting the emulator, [`ApiError`] for Kubernetes `Status` replies.

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// Why the emulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeSimError {
    /// The listen address could not be bound (usually: the port is taken).
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The bound socket's local address could not be read.
    #[error("reading the bound address: {0}")]
    LocalAddr(std::io::Error),
    /// The kubeconfig file could not be written.
    #[error("writing kubeconfig {path}: {source}")]
    WriteKubeconfig {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The temporary directory for the kubeconfig could not be created.
    #[error("creating a directory for the kubeconfig: {0}")]
    TempDir(std::io::Error),
    /// The server URL was not a valid URI.
    #[error("building the server URL: {0}")]
    ServerUrl(#[from] http::uri::InvalidUri),
    /// kube refused to build a client for the server.
    #[error("building the kube client: {0}")]
    BuildClient(#[from] kube::Error),
    /// The HTTP server stopped with an error.
    #[error("serving HTTP: {0}")]
    Serve(std::io::Error),
}

/// A failed API request, rendered as a `meta/v1 Status` body like the real apiserver's.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
    pub retry_after_seconds: Option<u64>,
}

/// The identity of an object named in an error: resource plural, group and name.
#[derive(Debug, Clone, Copy)]
pub struct ErrorTarget<'a> {
    pub group: &'a str,
    pub resource: &'a str,
    pub name: &'a str,
}

impl ErrorTarget<'_> {
    /// `resource.group`, or `resource` for the core group: how Kubernetes names a resource in errors.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.resource.to_string()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }

    fn details(&self) -> Value {
        json!({"name": self.name, "group": self.group, "kind": self.resource})
    }
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
            retry_after_seconds: None,
        }
    }

    fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn not_found(target: ErrorTarget<'_>) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{}\" not found", target.qualified(), target.name),
        )
        .with_details(target.details())
    }

    /// A 404 for a URL that names no served resource.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
        .with_details(json!({}))
    }

    pub fn already_exists(target: ErrorTarget<'_>) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{}\" already exists", target.qualified(), target.name),
        )
        .with_details(target.details())
    }

    pub fn conflict(target: ErrorTarget<'_>) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                target.qualified(),
                target.name
            ),
        )
        .with_details(target.details())
    }

    /// A 409 from server-side apply: `causes` name each field another manager owns.
    pub fn apply_conflict(target: ErrorTarget<'_>, causes: Vec<(String, String)>) -> Self {
        let summary: Vec<String> = causes
            .iter()
            .map(|(message, field)| format!("{message}: {field}"))
            .collect();
        let causes: Vec<Value> = causes
            .into_iter()
            .map(|(message, field)| {
                json!({"type": "FieldManagerConflict", "reason": "FieldManagerConflict", "message": message, "field": field})
            })
            .collect();
        let mut details = target.details();
        details["causes"] = Value::Array(causes);
        Self::new(
            409,
            "Conflict",
            format!(
                "Apply failed with {} conflict(s): {}",
                summary.len(),
                summary.join(", ")
            ),
        )
        .with_details(details)
    }

    /// A 422 for one invalid field; `kind` is the Kind (not the plural), as Kubernetes prints it.
    pub fn invalid(kind: &str, group: &str, name: &str, field: &str, detail: &str) -> Self {
        let qualified_kind = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        Self::new(
            422,
            "Invalid",
            format!("{qualified_kind} \"{name}\" is invalid: {field}: {detail}"),
        )
        .with_details(json!({
            "name": name,
            "group": group,
            "kind": kind,
            "causes": [{"reason": "FieldValueInvalid", "message": detail, "field": field}],
        }))
    }

    /// A 422 listing several invalid fields, in the apiserver's `[a, b]` form when there are many.
    pub fn invalid_fields(
        kind: &str,
        group: &str,
        name: &str,
        violations: &[(String, String)],
    ) -> Self {
        let qualified_kind = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        let rendered: Vec<String> = violations
            .iter()
            .map(|(field, detail)| format!("{field}: {detail}"))
            .collect();
        let summary = match rendered.as_slice() {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        let causes: Vec<Value> = violations
            .iter()
            .map(|(field, detail)| json!({"reason": "FieldValueInvalid", "message": detail, "field": field}))
            .collect();
        Self::new(
            422,
            "Invalid",
            format!("{qualified_kind} \"{name}\" is invalid: {summary}"),
        )
        .with_details(json!({"name": name, "group": group, "kind": kind, "causes": causes}))
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }

    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml; got {content_type}"),
        )
    }

    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }

    pub fn expired(requested: u64, oldest: u64) -> Self {
        Self::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// An error chosen by fault injection: the reason follows the status code as the apiserver's would.
    pub fn injected(code: u16, retry_after_seconds: Option<u64>, target: ErrorTarget<'_>) -> Self {
        let mut error = match code {
            409 => Self::conflict(target),
            429 => Self::new(429, "TooManyRequests", "the server has received too many requests and has asked us to try again later (injected)"),
            500 => Self::new(500, "InternalError", "an error on the server has prevented the request from succeeding (injected)"),
            503 => Self::new(503, "ServiceUnavailable", "the server is currently unable to handle the request (injected)"),
            504 => Self::new(504, "Timeout", "the server was unable to return a response in the time allotted (injected)"),
            404 => Self::not_found(target),
            410 => Self::new(410, "Expired", "too old resource version (injected)"),
            _ => Self::new(code, "InternalError", format!("injected failure with status {code}")),
        };
        error.retry_after_seconds = retry_after_seconds;
        if let (Some(seconds), Some(details)) = (retry_after_seconds, error.details.as_mut()) {
            details["retryAfterSeconds"] = json!(seconds);
        }
        error
    }

    /// The `Status` object for this error.
    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = self.status().to_string();
        let mut response = (code, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(seconds) = self.retry_after_seconds {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
