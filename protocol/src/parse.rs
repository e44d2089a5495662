//! Parsing what devices send, shared by the gateway (which serves it), the router (which routes
//! on the path) and the fuzz targets: report and connect bodies, device names and the device of a
//! request path. Every malformed input is an error naming the field at fault, never a panic.

use crate::wire::{ConnectRequest, FieldError, Report};

/// Longest device name accepted (a Kubernetes object name).
pub const MAX_DEVICE_NAME_LEN: usize = 253;
/// The path prefix of the device API.
pub const DEVICE_PREFIX: &str = "/v1/devices/";

/// Whether `device` is a device name the gateway accepts. Device names become parts of
/// state-store keys: 1-253 Kubernetes-name characters (letters, digits, `-`, `.`, `_`), and not
/// `.` or `..`.
pub fn is_device_name(device: &str) -> bool {
    !device.is_empty()
        && device.len() <= MAX_DEVICE_NAME_LEN
        && device != "."
        && device != ".."
        && device
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
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

/// The device named by a `/v1/devices/{device}/...` path, percent-decoded.
pub fn device_of(path: &str) -> Option<String> {
    let rest = path.strip_prefix(DEVICE_PREFIX)?;
    let (raw, tail) = rest.split_once('/')?;
    if raw.is_empty() || tail.is_empty() {
        return None;
    }
    percent_decode(raw)
}

/// Decodes `%XX` escapes; None for a malformed escape (percent-encoding would pass `%zz` through
/// as it is, and no device name holds a `%`) or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let escapes_well_formed = bytes.iter().enumerate().all(|(i, b)| {
        *b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_well_formed {
        return None;
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|decoded| decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_paths_parse_and_decode() {
        assert_eq!(
            device_of("/v1/devices/tor1-01/desired").as_deref(),
            Some("tor1-01")
        );
        assert_eq!(
            device_of("/v1/devices/a%2Db/report").as_deref(),
            Some("a-b")
        );
        assert_eq!(device_of("/v1/devices/tor1-01"), None);
        assert_eq!(device_of("/v1/devices//desired"), None);
        assert_eq!(device_of("/v2/devices/x/desired"), None);
        assert_eq!(device_of("/v1/devices/%zz/desired"), None);
    }

    #[test]
    fn device_names_are_kubernetes_name_characters_and_not_dot_segments() {
        assert!(is_device_name("tor1-01.dc_2"));
        for bad in ["", ".", "..", "a/b", "a b", "é", &"x".repeat(254)] {
            assert!(!is_device_name(bad), "{bad:?}");
        }
        assert!(is_device_name(&"x".repeat(253)));
    }

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
        assert!(is_device_name("tor1-01.site_a"));
        assert!(!is_device_name(""));
        assert!(!is_device_name("a{b}"));
        assert!(!is_device_name(&"a".repeat(254)));
    }
}
