//! Parsing of device request bodies and names: every malformed input is a 400 naming the field.

use apollo_protocol::wire::{ConnectRequest, FieldError, Report};
use http::StatusCode;

use crate::api::errors::ApiError;

const MAX_DEVICE_NAME_LEN: usize = 253;

/// Device names become parts of state-store keys: Kubernetes-name characters only.
pub fn check_device(device: &str) -> Result<(), ApiError> {
    let ok = !device.is_empty()
        && device.len() <= MAX_DEVICE_NAME_LEN
        && device
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_device",
            "device names are 1-253 characters of letters, digits, '-', '.' and '_'",
        )
        .field("device"))
    }
}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

fn parse_object(bytes: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, FieldError> {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(field_error("body", "must be a JSON object")),
        Err(error) => Err(field_error("body", format!("malformed JSON: {error}"))),
    }
}

fn require_string(
    map: &serde_json::Map<String, serde_json::Value>,
    name: &str,
    path: &str,
) -> Result<(), FieldError> {
    match map.get(name) {
        Some(serde_json::Value::String(_)) => Ok(()),
        Some(_) => Err(field_error(path, "must be a string")),
        None => Err(field_error(path, "is required")),
    }
}

/// Parses a report body, naming the field at fault for anything malformed.
pub fn parse_report(bytes: &[u8]) -> Result<Report, FieldError> {
    let map = parse_object(bytes)?;
    require_string(&map, "agentVersion", "agentVersion")?;
    require_string(&map, "timestamp", "timestamp")?;
    match map.get("heartbeat") {
        None | Some(serde_json::Value::Bool(_)) => {}
        Some(_) => return Err(field_error("heartbeat", "must be a boolean")),
    }
    match map.get("observations") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let serde_json::Value::Object(o) = item else {
                    return Err(field_error(
                        format!("observations[{i}]"),
                        "must be an object",
                    ));
                };
                for name in ["namespace", "name", "observedSpecHash"] {
                    require_string(o, name, &format!("observations[{i}].{name}"))?;
                }
            }
        }
        Some(_) => return Err(field_error("observations", "must be an array")),
    }
    let mut map = map;
    if map
        .get("observations")
        .is_some_and(serde_json::Value::is_null)
    {
        map.remove("observations");
    }
    serde_json::from_value(serde_json::Value::Object(map))
        .map_err(|error| field_error("body", error.to_string()))
}

/// Parses a connect body, naming the field at fault.
pub fn parse_connect(bytes: &[u8]) -> Result<ConnectRequest, FieldError> {
    let map = parse_object(bytes)?;
    require_string(&map, "agentVersion", "agentVersion")?;
    serde_json::from_value(serde_json::Value::Object(map))
        .map_err(|error| field_error("body", error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_parsing_names_the_field() {
        let field = |body: &str| {
            parse_report(body.as_bytes())
                .map(|_| ())
                .map_err(|e| e.field)
        };
        assert_eq!(field("{"), Err("body".into()));
        assert_eq!(field("[]"), Err("body".into()));
        assert_eq!(field(r#"{"timestamp":"x"}"#), Err("agentVersion".into()));
        assert_eq!(
            field(r#"{"agentVersion":1,"timestamp":"x"}"#),
            Err("agentVersion".into())
        );
        assert_eq!(field(r#"{"agentVersion":"1"}"#), Err("timestamp".into()));
        assert_eq!(
            field(r#"{"agentVersion":"1","timestamp":"x","heartbeat":"yes"}"#),
            Err("heartbeat".into())
        );
        assert_eq!(
            field(r#"{"agentVersion":"1","timestamp":"x","observations":{}}"#),
            Err("observations".into())
        );
        assert_eq!(
            field(
                r#"{"agentVersion":"1","timestamp":"x","observations":[{"namespace":"a","name":"b"}]}"#
            ),
            Err("observations[0].observedSpecHash".into())
        );
        assert_eq!(
            field(r#"{"agentVersion":"1","timestamp":"x","observations":null}"#),
            Ok(())
        );
        let bad_time = parse_report(br#"{"agentVersion":"1","timestamp":"x"}"#).expect("shape ok");
        assert_eq!(
            bad_time.validate().map_err(|e| e.field),
            Err("timestamp".into())
        );
    }

    #[test]
    fn connect_parsing_names_the_field() {
        assert_eq!(
            parse_connect(b"{}").map_err(|e| e.field).err(),
            Some("agentVersion".into())
        );
        assert!(parse_connect(br#"{"agentVersion":"1"}"#).is_ok());
    }

    #[test]
    fn device_names_are_checked() {
        assert!(check_device("tor1-01.site_a").is_ok());
        assert!(check_device("").is_err());
        assert!(check_device("a{b}").is_err());
        assert!(check_device(&"a".repeat(254)).is_err());
    }
}
