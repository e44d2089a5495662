//! Parsing of device request bodies and names: every malformed input is a 400 naming the field.
//! The parsers themselves live in [`apollo_protocol::parse`] (shared with the router and the
//! fuzz targets); here they become the API's errors.

pub use apollo_protocol::parse::{parse_connect, parse_report};
use http::StatusCode;

use crate::api::errors::ApiError;

/// Device names become parts of state-store keys: Kubernetes-name characters only
/// ([`apollo_protocol::parse::is_device_name`]).
pub fn check_device(device: &str) -> Result<(), ApiError> {
    if apollo_protocol::parse::is_device_name(device) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_device",
            "device names are 1-253 characters of letters, digits, '-', '.' and '_' (not . or ..)",
        )
        .field("device"))
    }
}
