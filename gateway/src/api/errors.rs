//! The JSON error envelope of the device API (`{"error":{"code","message","field"}}`).

use apollo_protocol::wire::{ErrorBody, ErrorDetail, FieldError};
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};

use crate::api::auth::AuthFailure;

/// An error answered with the JSON envelope.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
    retry_after: Option<u64>,
    not_ready: bool,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
            not_ready: false,
        }
    }

    /// The status code answered.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub(crate) fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub(crate) fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub(crate) fn invalid(error: FieldError) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_field", error.to_string()).field(error.field)
    }

    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).retry_after(1)
    }

    /// 503 from a replica whose watch cache has not synced, marked so a router tries the
    /// fallback replica ([`apollo_protocol::NOT_READY_HEADER`]).
    pub(crate) fn not_ready(message: impl Into<String>) -> Self {
        Self {
            not_ready: true,
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message).retry_after(1)
        }
    }
}

impl From<AuthFailure> for ApiError {
    fn from(failure: AuthFailure) -> Self {
        match failure {
            AuthFailure::MissingToken => Self::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "missing device token (X-Device-Token or Authorization: Bearer)",
            ),
            AuthFailure::InvalidToken => Self::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "invalid device token",
            ),
            AuthFailure::WrongDevice => Self::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the token does not belong to this device",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                field: self.field,
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.not_ready {
            response.headers_mut().insert(
                apollo_protocol::NOT_READY_HEADER,
                HeaderValue::from_static("1"),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"apollo-device\""),
            );
        }
        response
    }
}
