//! The agent's one error type; each variant names the step that failed.

use std::time::Duration;

use crate::metrics::RequestKind;

/// Everything that can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A configuration value is missing or invalid. `variable` is the environment variable an
    /// operator has to fix, so the message is actionable on its own.
    #[error("{variable}: {problem}")]
    Config {
        /// Environment variable at fault (or several, joined by " and ").
        variable: &'static str,
        /// What is wrong with it.
        problem: String,
    },

    /// The shared HTTP client could not be built.
    #[error("building the HTTP client")]
    BuildHttpClient(#[source] reqwest::Error),

    /// The request never got an HTTP answer (connect refused, reset, timeout).
    #[error("sending {kind} request")]
    SendRequest {
        /// Which call.
        kind: RequestKind,
        /// Transport error.
        #[source]
        source: reqwest::Error,
    },

    /// The gateway answered with a status the agent cannot use.
    #[error("{kind} request answered {status}: {message}")]
    UnexpectedStatus {
        /// Which call.
        kind: RequestKind,
        /// HTTP status.
        status: reqwest::StatusCode,
        /// The gateway's error message, or a placeholder when its body had none.
        message: String,
        /// Parsed `Retry-After`, when the gateway asked for a pause.
        retry_after: Option<Duration>,
    },

    /// The body of a successful answer could not be read or decoded.
    #[error("decoding {kind} response: {message}")]
    DecodeResponse {
        /// Which call.
        kind: RequestKind,
        /// Why decoding failed.
        message: String,
    },
}

impl AgentError {
    /// The error and all its sources, `: `-separated, for one-line logs.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            out.push_str(": ");
            out.push_str(&cause.to_string());
            source = cause.source();
        }
        out
    }

    /// The pause the gateway asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::UnexpectedStatus { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}
