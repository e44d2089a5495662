//! Agent configuration: defaults for library users, and validation of the raw values an operator
//! sets through the environment (every error names the variable to fix).

use std::path::Path;
use std::time::Duration;

use apollo_protocol::MAX_WAIT_SECONDS;
use apollo_runtime::duration::{BareUnit, DurationParser, Human};
use reqwest::Url;

use crate::backoff::{BackoffPolicy, DEFAULT_POLICY};
use crate::AgentError;

/// Device name (required).
pub const ENV_DEVICE_NAME: &str = "APOLLO_DEVICE_NAME";
/// Base URL of the gateway or router.
pub const ENV_GATEWAY_URL: &str = "APOLLO_GATEWAY_URL";
/// The device token itself.
pub const ENV_DEVICE_TOKEN: &str = "APOLLO_DEVICE_TOKEN";
/// A file holding the device token (surrounding whitespace ignored).
pub const ENV_DEVICE_TOKEN_FILE: &str = "APOLLO_DEVICE_TOKEN_FILE";
/// Long-poll wait the agent asks for (whole seconds, at most a minute).
pub const ENV_POLL_WAIT: &str = "APOLLO_POLL_WAIT";
/// Heartbeat interval used until the gateway announces its own.
pub const ENV_HEARTBEAT_INTERVAL: &str = "APOLLO_HEARTBEAT_INTERVAL";
/// Shortest spacing between two polls that came back unchanged.
pub const ENV_MIN_POLL_INTERVAL: &str = "APOLLO_MIN_POLL_INTERVAL";
/// Timeout of connect and report calls (a long poll gets this on top of its wait).
pub const ENV_REQUEST_TIMEOUT: &str = "APOLLO_REQUEST_TIMEOUT";
/// Ceiling of the first retry wait.
pub const ENV_BACKOFF_BASE: &str = "APOLLO_BACKOFF_BASE";
/// Largest retry wait.
pub const ENV_BACKOFF_MAX: &str = "APOLLO_BACKOFF_MAX";

/// Old spelling of [`ENV_POLL_WAIT`]: a bare number is seconds.
pub const ENV_POLL_WAIT_SECONDS: &str = "APOLLO_POLL_WAIT_SECONDS";
/// Old spelling of [`ENV_HEARTBEAT_INTERVAL`]: a bare number is seconds.
pub const ENV_HEARTBEAT_INTERVAL_SECONDS: &str = "APOLLO_HEARTBEAT_INTERVAL_SECONDS";
/// Old spelling of [`ENV_MIN_POLL_INTERVAL`]: a bare number is milliseconds.
pub const ENV_MIN_POLL_INTERVAL_MS: &str = "APOLLO_MIN_POLL_INTERVAL_MS";
/// Old spelling of [`ENV_REQUEST_TIMEOUT`]: a bare number is seconds.
pub const ENV_REQUEST_TIMEOUT_SECONDS: &str = "APOLLO_REQUEST_TIMEOUT_SECONDS";
/// Old spelling of [`ENV_BACKOFF_BASE`]: a bare number is milliseconds.
pub const ENV_BACKOFF_BASE_MS: &str = "APOLLO_BACKOFF_BASE_MS";
/// Old spelling of [`ENV_BACKOFF_MAX`]: a bare number is seconds.
pub const ENV_BACKOFF_MAX_SECONDS: &str = "APOLLO_BACKOFF_MAX_SECONDS";

/// One duration setting: its variable, the old spelling still accepted, and the bounds both
/// share (`apollo_runtime::duration`'s syntax: `500ms`, `15s`, `2m`; a bare number is seconds,
/// or milliseconds for the old `*_MS` spellings).
struct DurationSetting {
    variable: &'static str,
    old_variable: &'static str,
    parser: DurationParser,
    old_unit: BareUnit,
}

impl DurationSetting {
    /// The value and the variable it came from, or None when neither spelling is set.
    fn read(
        &self,
        value: Option<&str>,
        old_value: Option<&str>,
    ) -> Result<Option<(&'static str, Duration)>, AgentError> {
        let (variable, text, parser) = match (present(value), present(old_value)) {
            (Some(_), Some(_)) => {
                return Err(config_error(
                    self.variable,
                    format!(
                        "{} is its old spelling; set only one of them",
                        self.old_variable
                    ),
                ))
            }
            (Some(text), None) => (self.variable, text, self.parser.bare_seconds()),
            (None, Some(text)) => {
                let parser = match self.old_unit {
                    BareUnit::Seconds => self.parser.bare_seconds(),
                    BareUnit::Millis => self.parser.bare_millis(),
                };
                (self.old_variable, text, parser)
            }
            (None, None) => return Ok(None),
        };
        let value = parser
            .parse(text)
            .map_err(|problem| config_error(variable, problem))?;
        Ok(Some((variable, value)))
    }
}

const POLL_WAIT: DurationSetting = DurationSetting {
    variable: ENV_POLL_WAIT,
    old_variable: ENV_POLL_WAIT_SECONDS,
    // Sent as `waitSeconds`.
    parser: DurationParser::new()
        .at_most(Duration::from_secs(MAX_WAIT_SECONDS))
        .whole_seconds(),
    old_unit: BareUnit::Seconds,
};
const HEARTBEAT_INTERVAL: DurationSetting = DurationSetting {
    variable: ENV_HEARTBEAT_INTERVAL,
    old_variable: ENV_HEARTBEAT_INTERVAL_SECONDS,
    parser: DurationParser::new()
        .at_least(Duration::from_secs(1))
        .at_most(Duration::from_secs(3600)),
    old_unit: BareUnit::Seconds,
};
const MIN_POLL_INTERVAL: DurationSetting = DurationSetting {
    variable: ENV_MIN_POLL_INTERVAL,
    old_variable: ENV_MIN_POLL_INTERVAL_MS,
    parser: DurationParser::new()
        .at_least(Duration::from_millis(10))
        .at_most(Duration::from_secs(600)),
    old_unit: BareUnit::Millis,
};
const REQUEST_TIMEOUT: DurationSetting = DurationSetting {
    variable: ENV_REQUEST_TIMEOUT,
    old_variable: ENV_REQUEST_TIMEOUT_SECONDS,
    parser: DurationParser::new()
        .at_least(Duration::from_secs(1))
        .at_most(Duration::from_secs(600)),
    old_unit: BareUnit::Seconds,
};
const BACKOFF_BASE: DurationSetting = DurationSetting {
    variable: ENV_BACKOFF_BASE,
    old_variable: ENV_BACKOFF_BASE_MS,
    parser: DurationParser::new()
        .at_least(Duration::from_millis(10))
        .at_most(Duration::from_secs(60)),
    old_unit: BareUnit::Millis,
};
const BACKOFF_MAX: DurationSetting = DurationSetting {
    variable: ENV_BACKOFF_MAX,
    old_variable: ENV_BACKOFF_MAX_SECONDS,
    parser: DurationParser::new()
        .at_least(Duration::from_secs(1))
        .at_most(Duration::from_secs(3600)),
    old_unit: BareUnit::Seconds,
};

/// Gateway URL used when none is configured.
pub const DEFAULT_GATEWAY_URL: &str = "http://127.0.0.1:8080";

/// Everything an [`crate::Agent`] needs besides its HTTP client.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The device this agent speaks for (a Kubernetes object name).
    pub device_name: String,
    /// Base URL of the gateway (or router); the API paths are appended to its path.
    pub gateway_url: Url,
    /// Sent as `X-Device-Token`; `None` only works against a gateway run with `--insecure-no-auth`.
    pub device_token: Option<String>,
    /// Reported as `agentVersion`.
    pub agent_version: String,
    /// `waitSeconds` of each long poll (0 turns long polling off).
    pub poll_wait: Duration,
    /// Heartbeat interval until the gateway announces one.
    pub initial_heartbeat_interval: Duration,
    /// Shortest spacing between polls that came back unchanged (guards against hot loops when a
    /// gateway or proxy answers long polls early).
    pub min_poll_interval: Duration,
    /// Timeout of connect and report calls; long polls get their wait on top.
    pub request_timeout: Duration,
    /// Retry waits after errors.
    pub backoff: BackoffPolicy,
    /// Where a report's `traceparent` comes from when the process exports traces (the binary
    /// passes `apollo_telemetry::current_traceparent`); None: a fresh random one per report.
    pub traceparent_source: Option<TraceparentSource>,
}

/// Names the current (exported) span as a `traceparent`, or None when nothing is exported.
pub type TraceparentSource = fn() -> Option<String>;

impl AgentConfig {
    /// Defaults for everything but the device and gateway (used by the loadtest harness).
    pub fn new(device_name: impl Into<String>, gateway_url: Url) -> Self {
        Self {
            device_name: device_name.into(),
            gateway_url,
            device_token: None,
            agent_version: concat!("apollo-agent/", env!("CARGO_PKG_VERSION")).to_owned(),
            poll_wait: Duration::from_secs(30),
            initial_heartbeat_interval: Duration::from_secs(15),
            min_poll_interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            backoff: DEFAULT_POLICY,
            traceparent_source: None,
        }
    }

    /// Validate raw values, read the token file, fill in defaults.
    pub fn from_raw(raw: &RawConfig) -> Result<Self, AgentError> {
        let device_name = present(raw.device_name.as_deref())
            .ok_or_else(|| config_error(ENV_DEVICE_NAME, "required but not set"))?;
        validate_device_name(device_name)?;

        let gateway_url =
            parse_gateway_url(present(raw.gateway_url.as_deref()).unwrap_or(DEFAULT_GATEWAY_URL))?;

        let mut config = Self::new(device_name, gateway_url);
        config.device_token = device_token(
            present(raw.device_token.as_deref()),
            present(raw.device_token_file.as_deref()),
        )?;

        if let Some((_, wait)) =
            POLL_WAIT.read(raw.poll_wait.as_deref(), raw.poll_wait_seconds.as_deref())?
        {
            config.poll_wait = wait;
        }
        if let Some((_, interval)) = HEARTBEAT_INTERVAL.read(
            raw.heartbeat_interval.as_deref(),
            raw.heartbeat_interval_seconds.as_deref(),
        )? {
            config.initial_heartbeat_interval = interval;
        }
        if let Some((_, interval)) = MIN_POLL_INTERVAL.read(
            raw.min_poll_interval.as_deref(),
            raw.min_poll_interval_ms.as_deref(),
        )? {
            config.min_poll_interval = interval;
        }
        if let Some((_, timeout)) = REQUEST_TIMEOUT.read(
            raw.request_timeout.as_deref(),
            raw.request_timeout_seconds.as_deref(),
        )? {
            config.request_timeout = timeout;
        }
        let base =
            BACKOFF_BASE.read(raw.backoff_base.as_deref(), raw.backoff_base_ms.as_deref())?;
        if let Some((_, base)) = base {
            config.backoff.base = base;
        }
        let max = BACKOFF_MAX.read(
            raw.backoff_max.as_deref(),
            raw.backoff_max_seconds.as_deref(),
        )?;
        if let Some((_, cap)) = max {
            config.backoff.cap = cap;
        }
        if config.backoff.cap < config.backoff.base {
            let base_variable = base.map_or(ENV_BACKOFF_BASE, |(variable, _)| variable);
            return Err(config_error(
                max.map_or(ENV_BACKOFF_MAX, |(variable, _)| variable),
                format!(
                    "must not be below {base_variable} ({})",
                    Human(config.backoff.base)
                ),
            ));
        }
        Ok(config)
    }
}

/// Configuration values as an operator wrote them (environment variables or flags), unvalidated.
#[derive(Debug, Clone, Default)]
pub struct RawConfig {
    /// [`ENV_DEVICE_NAME`].
    pub device_name: Option<String>,
    /// [`ENV_GATEWAY_URL`].
    pub gateway_url: Option<String>,
    /// [`ENV_DEVICE_TOKEN`].
    pub device_token: Option<String>,
    /// [`ENV_DEVICE_TOKEN_FILE`].
    pub device_token_file: Option<String>,
    /// [`ENV_POLL_WAIT`].
    pub poll_wait: Option<String>,
    /// [`ENV_HEARTBEAT_INTERVAL`].
    pub heartbeat_interval: Option<String>,
    /// [`ENV_MIN_POLL_INTERVAL`].
    pub min_poll_interval: Option<String>,
    /// [`ENV_REQUEST_TIMEOUT`].
    pub request_timeout: Option<String>,
    /// [`ENV_BACKOFF_BASE`].
    pub backoff_base: Option<String>,
    /// [`ENV_BACKOFF_MAX`].
    pub backoff_max: Option<String>,
    /// [`ENV_POLL_WAIT_SECONDS`] (old spelling of [`ENV_POLL_WAIT`]).
    pub poll_wait_seconds: Option<String>,
    /// [`ENV_HEARTBEAT_INTERVAL_SECONDS`] (old spelling of [`ENV_HEARTBEAT_INTERVAL`]).
    pub heartbeat_interval_seconds: Option<String>,
    /// [`ENV_MIN_POLL_INTERVAL_MS`] (old spelling of [`ENV_MIN_POLL_INTERVAL`]).
    pub min_poll_interval_ms: Option<String>,
    /// [`ENV_REQUEST_TIMEOUT_SECONDS`] (old spelling of [`ENV_REQUEST_TIMEOUT`]).
    pub request_timeout_seconds: Option<String>,
    /// [`ENV_BACKOFF_BASE_MS`] (old spelling of [`ENV_BACKOFF_BASE`]).
    pub backoff_base_ms: Option<String>,
    /// [`ENV_BACKOFF_MAX_SECONDS`] (old spelling of [`ENV_BACKOFF_MAX`]).
    pub backoff_max_seconds: Option<String>,
}

fn config_error(variable: &'static str, problem: impl Into<String>) -> AgentError {
    AgentError::Config {
        variable,
        problem: problem.into(),
    }
}

/// A value that is set and not blank. Blank counts as unset, as `VAR=` in a compose file means
/// "nothing here" to most operators.
fn present(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|v| !v.is_empty())
}

/// Device names are Kubernetes object names (RFC 1123 subdomains); anything else could never
/// match a NetworkSwitch and might smuggle characters into the request path.
fn validate_device_name(name: &str) -> Result<(), AgentError> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let alnum = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let valid = name.len() <= 253
        && valid_chars
        && alnum(name.bytes().next())
        && alnum(name.bytes().last());
    if valid {
        Ok(())
    } else {
        Err(config_error(
            ENV_DEVICE_NAME,
            format!(
                "{name:?} is not a valid device name (lowercase letters, digits, '-' and '.', \
                 starting and ending with a letter or digit, at most 253 characters)"
            ),
        ))
    }
}

fn parse_gateway_url(value: &str) -> Result<Url, AgentError> {
    let url = Url::parse(value)
        .map_err(|e| config_error(ENV_GATEWAY_URL, format!("{value:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
        return Err(config_error(
            ENV_GATEWAY_URL,
            format!("{value:?} must be an http:// or https:// URL"),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(config_error(
            ENV_GATEWAY_URL,
            format!("{value:?} has no host"),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(config_error(
            ENV_GATEWAY_URL,
            format!("{value:?} must not carry a query or fragment"),
        ));
    }
    Ok(url)
}

fn device_token(token: Option<&str>, file: Option<&str>) -> Result<Option<String>, AgentError> {
    let token = match (token, file) {
        (Some(_), Some(_)) => {
            return Err(config_error(
                "APOLLO_DEVICE_TOKEN and APOLLO_DEVICE_TOKEN_FILE",
                "set only one of them",
            ))
        }
        (Some(token), None) => (ENV_DEVICE_TOKEN, token.to_owned()),
        (None, Some(path)) => (ENV_DEVICE_TOKEN_FILE, read_token_file(Path::new(path))?),
        (None, None) => return Ok(None),
    };
    let (variable, token) = token;
    // The token travels in a header: visible ASCII only, and never echoed in an error.
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(config_error(
            variable,
            "the token must be non-empty printable ASCII without spaces",
        ));
    }
    Ok(Some(token))
}

fn read_token_file(path: &Path) -> Result<String, AgentError> {
    let contents = std::fs::read_to_string(path).map_err(|e| {
        config_error(
            ENV_DEVICE_TOKEN_FILE,
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    Ok(contents.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(device: &str) -> RawConfig {
        RawConfig {
            device_name: Some(device.into()),
            ..RawConfig::default()
        }
    }

    fn variable_of(r: Result<AgentConfig, AgentError>) -> &'static str {
        match r {
            Err(AgentError::Config { variable, .. }) => variable,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_apply_when_only_the_device_is_set() {
        let c = AgentConfig::from_raw(&raw("tor1-01")).expect("config");
        assert_eq!(c.device_name, "tor1-01");
        assert_eq!(c.gateway_url.as_str(), "http://127.0.0.1:8080/");
        assert_eq!(c.device_token, None);
        assert_eq!(c.poll_wait, Duration::from_secs(30));
        assert_eq!(c.initial_heartbeat_interval, Duration::from_secs(15));
        assert!(c.agent_version.starts_with("apollo-agent/"));
    }

    #[test]
    fn missing_or_blank_device_name_names_the_variable() {
        assert_eq!(
            variable_of(AgentConfig::from_raw(&RawConfig::default())),
            ENV_DEVICE_NAME
        );
        assert_eq!(
            variable_of(AgentConfig::from_raw(&raw("  "))),
            ENV_DEVICE_NAME
        );
        let e = AgentConfig::from_raw(&RawConfig::default())
            .expect_err("missing device")
            .to_string();
        assert_eq!(e, "APOLLO_DEVICE_NAME: required but not set");
    }

    #[test]
    fn device_names_must_be_kubernetes_names() {
        for bad in ["Tor1", "tor1/../x", "-tor", "tor-", "a b", &"a".repeat(254)] {
            assert_eq!(
                variable_of(AgentConfig::from_raw(&raw(bad))),
                ENV_DEVICE_NAME,
                "{bad}"
            );
        }
        for good in ["a", "tor1-01", "rack1.tor-02"] {
            AgentConfig::from_raw(&raw(good)).expect(good);
        }
    }

    #[test]
    fn numbers_are_parsed_and_range_checked() {
        let mut r = raw("d");
        r.poll_wait_seconds = Some("45".into());
        r.heartbeat_interval_seconds = Some("5".into());
        r.min_poll_interval_ms = Some("250".into());
        r.backoff_base_ms = Some("100".into());
        r.backoff_max_seconds = Some("2".into());
        let c = AgentConfig::from_raw(&r).expect("config");
        assert_eq!(c.poll_wait, Duration::from_secs(45));
        assert_eq!(c.initial_heartbeat_interval, Duration::from_secs(5));
        assert_eq!(c.min_poll_interval, Duration::from_millis(250));
        assert_eq!(c.backoff.base, Duration::from_millis(100));
        assert_eq!(c.backoff.cap, Duration::from_secs(2));

        let mut r = raw("d");
        r.poll_wait_seconds = Some("61".into());
        assert_eq!(
            variable_of(AgentConfig::from_raw(&r)),
            ENV_POLL_WAIT_SECONDS
        );
        let mut r = raw("d");
        r.heartbeat_interval_seconds = Some("soon".into());
        assert_eq!(
            variable_of(AgentConfig::from_raw(&r)),
            ENV_HEARTBEAT_INTERVAL_SECONDS
        );
        let mut r = raw("d");
        r.heartbeat_interval_seconds = Some("0".into());
        assert_eq!(
            variable_of(AgentConfig::from_raw(&r)),
            ENV_HEARTBEAT_INTERVAL_SECONDS
        );
        let mut r = raw("d");
        r.backoff_base_ms = Some("5000".into());
        r.backoff_max_seconds = Some("1".into());
        assert_eq!(
            variable_of(AgentConfig::from_raw(&r)),
            ENV_BACKOFF_MAX_SECONDS
        );
    }

    #[test]
    fn durations_take_the_shared_syntax_and_old_variables_keep_their_units() {
        let mut r = raw("d");
        r.poll_wait = Some("45s".into());
        r.heartbeat_interval = Some("1m".into());
        r.min_poll_interval = Some("250ms".into());
        r.request_timeout = Some("5s".into());
        r.backoff_base = Some("100ms".into());
        r.backoff_max = Some("2m".into());
        let c = AgentConfig::from_raw(&r).expect("config");
        assert_eq!(c.poll_wait, Duration::from_secs(45));
        assert_eq!(c.initial_heartbeat_interval, Duration::from_secs(60));
        assert_eq!(c.min_poll_interval, Duration::from_millis(250));
        assert_eq!(c.request_timeout, Duration::from_secs(5));
        assert_eq!(c.backoff.base, Duration::from_millis(100));
        assert_eq!(c.backoff.cap, Duration::from_secs(120));

        // The old spellings: a bare number in seconds, or milliseconds for *_MS.
        let mut r = raw("d");
        r.poll_wait_seconds = Some("5".into());
        r.request_timeout_seconds = Some("3".into());
        r.min_poll_interval_ms = Some("100".into());
        r.backoff_base_ms = Some("20".into());
        let c = AgentConfig::from_raw(&r).expect("config");
        assert_eq!(c.poll_wait, Duration::from_secs(5));
        assert_eq!(c.request_timeout, Duration::from_secs(3));
        assert_eq!(c.min_poll_interval, Duration::from_millis(100));
        assert_eq!(c.backoff.base, Duration::from_millis(20));

        let mut r = raw("d");
        r.poll_wait = Some("5s".into());
        r.poll_wait_seconds = Some("5".into());
        let e = AgentConfig::from_raw(&r).expect_err("both spellings");
        assert!(e.to_string().contains(ENV_POLL_WAIT_SECONDS), "{e}");
        assert_eq!(variable_of(Err(e)), ENV_POLL_WAIT);

        let mut r = raw("d");
        r.poll_wait = Some("1500ms".into());
        assert_eq!(variable_of(AgentConfig::from_raw(&r)), ENV_POLL_WAIT);
        let mut r = raw("d");
        r.min_poll_interval = Some("5ms".into());
        assert_eq!(
            variable_of(AgentConfig::from_raw(&r)),
            ENV_MIN_POLL_INTERVAL
        );
        let mut r = raw("d");
        r.backoff_base = Some("10s".into());
        r.backoff_max = Some("5s".into());
        let e = AgentConfig::from_raw(&r).expect_err("max below base");
        assert_eq!(
            e.to_string(),
            "APOLLO_BACKOFF_MAX: must not be below APOLLO_BACKOFF_BASE (10s)"
        );
    }

    #[test]
    fn gateway_url_must_be_http_with_a_host() {
        for bad in ["not a url", "ftp://x", "http://x/?a=1", "unix:/tmp/sock"] {
            let mut r = raw("d");
            r.gateway_url = Some(bad.into());
            assert_eq!(
                variable_of(AgentConfig::from_raw(&r)),
                ENV_GATEWAY_URL,
                "{bad}"
            );
        }
        let mut r = raw("d");
        r.gateway_url = Some("https://gw.example:8443/apollo".into());
        let c = AgentConfig::from_raw(&r).expect("config");
        assert_eq!(c.gateway_url.path(), "/apollo");
    }

    #[test]
    fn token_comes_from_the_variable_or_a_file_but_not_both() {
        let mut r = raw("d");
        r.device_token = Some(" abc123 ".into());
        assert_eq!(
            AgentConfig::from_raw(&r).expect("config").device_token,
            Some("abc123".into())
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "f00d\n").expect("write");
        let mut r = raw("d");
        r.device_token_file = Some(path.display().to_string());
        assert_eq!(
            AgentConfig::from_raw(&r).expect("config").device_token,
            Some("f00d".into())
        );

        r.device_token = Some("abc".into());
        assert!(variable_of(AgentConfig::from_raw(&r)).contains(ENV_DEVICE_TOKEN_FILE));

        let mut r = raw("d");
        r.device_token_file = Some(dir.path().join("missing").display().to_string());
        assert_eq!(
            variable_of(AgentConfig::from_raw(&r)),
            ENV_DEVICE_TOKEN_FILE
        );

        let mut r = raw("d");
        r.device_token = Some("has space".into());
        assert_eq!(variable_of(AgentConfig::from_raw(&r)), ENV_DEVICE_TOKEN);
    }
}
