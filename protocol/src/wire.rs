//! JSON bodies of the device HTTP API (v1).

use serde::{Deserialize, Serialize};

use crate::hash::is_spec_hash;

/// Body of `GET /v1/devices/{device}/desired`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DesiredDocument {
    /// The device this document is for.
    pub device_name: String,
    /// How often the agent must report (its heartbeat timer).
    pub heartbeat_interval_seconds: u64,
    /// Every DeviceProcess bound to the device, sorted by namespace/name.
    pub items: Vec<DesiredItem>,
}

/// One DeviceProcess in a desired document.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DesiredItem {
    /// metadata.uid of the DeviceProcess.
    pub uid: String,
    /// metadata.namespace.
    pub namespace: String,
    /// metadata.name.
    pub name: String,
    /// metadata.generation.
    pub generation: i64,
    /// The DeviceProcess spec, as stored.
    pub spec: serde_json::Value,
    /// `sha256:<hex>` of the canonical JSON of `spec`.
    pub spec_hash: String,
}

/// Body of `POST /v1/devices/{device}/report`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Version string of the agent.
    pub agent_version: String,
    /// When the agent produced the report, RFC 3339.
    pub timestamp: String,
    /// Whether this report is (also) a heartbeat. Every report counts as proof of life.
    #[serde(default)]
    pub heartbeat: bool,
    /// Spec hashes the agent has observed.
    #[serde(default)]
    pub observations: Vec<Observation>,
}

/// The agent observed `observed_spec_hash` for one DeviceProcess.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct Observation {
    /// Namespace of the DeviceProcess.
    pub namespace: String,
    /// Name of the DeviceProcess.
    pub name: String,
    /// specHash the agent observed.
    pub observed_spec_hash: String,
}

/// Body of `POST /v1/devices/{device}/connect`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectRequest {
    /// Version string of the agent.
    pub agent_version: String,
}

/// A DeviceProcess named in a report that the gateway ignored (it no longer exists).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// 200 response to a report or connect.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReportAck {
    /// Always true.
    pub ack: bool,
    /// Heartbeat interval the agent must use from now on.
    pub heartbeat_interval_seconds: u64,
    /// Observations ignored because their DeviceProcess does not exist.
    #[serde(default)]
    pub ignored: Vec<ObjectRef>,
}

/// Error envelope: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Machine-readable code plus human message; `field` names the offending field of a bad request.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `invalid_field`, `forbidden`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// The request field at fault, when there is one (e.g. `observations[2].observedSpecHash`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ErrorBody {
    /// An error body without a field.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
                field: None,
            },
        }
    }
}

/// A field of a report that failed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `timestamp` or `observations[0].observedSpecHash`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

/// Longest accepted agentVersion.
pub const MAX_AGENT_VERSION_LEN: usize = 128;
/// Most observations one report may carry.
pub const MAX_OBSERVATIONS: usize = 256;

fn validate_agent_version(v: &str) -> Result<(), FieldError> {
    if v.len() > MAX_AGENT_VERSION_LEN {
        return Err(FieldError {
            field: "agentVersion".into(),
            message: format!("longer than {MAX_AGENT_VERSION_LEN} bytes"),
        });
    }
    Ok(())
}

impl ConnectRequest {
    /// Field-level checks beyond JSON shape.
    pub fn validate(&self) -> Result<(), FieldError> {
        validate_agent_version(&self.agent_version)
    }
}

impl Report {
    /// Field-level checks beyond JSON shape: RFC 3339 timestamp, hash formats, sizes.
    pub fn validate(&self) -> Result<(), FieldError> {
        validate_agent_version(&self.agent_version)?;
        if self.timestamp.parse::<jiff::Timestamp>().is_err() {
            return Err(FieldError {
                field: "timestamp".into(),
                message: format!(
                    "{:?} is not an RFC 3339 timestamp",
                    truncate(&self.timestamp)
                ),
            });
        }
        if self.observations.len() > MAX_OBSERVATIONS {
            return Err(FieldError {
                field: "observations".into(),
                message: format!("more than {MAX_OBSERVATIONS} observations"),
            });
        }
        for (i, o) in self.observations.iter().enumerate() {
            if o.namespace.is_empty() {
                return Err(FieldError {
                    field: format!("observations[{i}].namespace"),
                    message: "must not be empty".into(),
                });
            }
            if o.name.is_empty() {
                return Err(FieldError {
                    field: format!("observations[{i}].name"),
                    message: "must not be empty".into(),
                });
            }
            if !is_spec_hash(&o.observed_spec_hash) {
                return Err(FieldError {
                    field: format!("observations[{i}].observedSpecHash"),
                    message: format!(
                        "{:?} is not sha256:<64 lowercase hex digits>",
                        truncate(&o.observed_spec_hash)
                    ),
                });
            }
        }
        Ok(())
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash() -> String {
        format!("sha256:{}", "ab".repeat(32))
    }

    fn report() -> Report {
        Report {
            agent_version: "1.0".into(),
            timestamp: "2026-11-22T03:00:00Z".into(),
            heartbeat: true,
            observations: vec![Observation {
                namespace: "default".into(),
                name: "x".into(),
                observed_spec_hash: hash(),
            }],
        }
    }

    #[test]
    fn valid_report_passes() {
        assert_eq!(report().validate(), Ok(()));
    }

    #[test]
    fn bad_timestamp_names_the_field() {
        let mut r = report();
        r.timestamp = "yesterday".into();
        assert_eq!(
            r.validate().map_err(|e| e.field),
            Err("timestamp".to_owned())
        );
    }

    #[test]
    fn bad_hash_names_the_observation() {
        let mut r = report();
        r.observations.push(Observation {
            namespace: "default".into(),
            name: "y".into(),
            observed_spec_hash: "sha256:xyz".into(),
        });
        assert_eq!(
            r.validate().map_err(|e| e.field),
            Err("observations[1].observedSpecHash".to_owned())
        );
    }

    #[test]
    fn report_json_is_camel_case_and_defaults_observations() {
        let r: Report =
            serde_json::from_str(r#"{"agentVersion":"1","timestamp":"2026-01-01T00:00:00+01:00"}"#)
                .expect("parse");
        assert!(r.observations.is_empty());
        assert!(!r.heartbeat);
        assert_eq!(r.validate(), Ok(()));
        let ack = serde_json::to_value(ReportAck {
            ack: true,
            heartbeat_interval_seconds: 15,
            ignored: vec![],
        })
        .expect("serialise");
        assert_eq!(ack["heartbeatIntervalSeconds"], 15);
    }

    #[test]
    fn error_body_shape() {
        let v = serde_json::to_value(ErrorBody::new("forbidden", "no")).expect("serialise");
        assert_eq!(
            v,
            serde_json::json!({"error": {"code": "forbidden", "message": "no"}})
        );
    }
}
