//! Authentication of device requests.
//!
//! A device presents `X-Device-Token: <token>` or `Authorization: Bearer <token>`, where the token
//! is `hex(HMAC-SHA256(key, deviceName))` (see `apollo_protocol::token`). Outcomes:
//! - no token, or a token that is not even shaped like one: 401 (who are you?);
//! - a well-formed HMAC token that is not this device's: 403 (you are someone, but not this
//!   device), which is what device A's token on device B's path yields;
//! - a shared development token is accepted only when `--dev-shared-token-file` is given.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use apollo_protocol::token::{constant_time_eq, key_from_secret_file, TokenKey};
use apollo_protocol::DEVICE_TOKEN_HEADER;
use http::HeaderMap;

use crate::error::Error;

/// How device requests are authenticated. Secrets never appear in Debug output.
#[derive(Clone)]
pub struct Auth {
    hmac_key: Option<Arc<TokenKey>>,
    shared_token: Option<Arc<[u8]>>,
    insecure: bool,
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No token header at all (401).
    MissingToken,
    /// A token that no configured scheme accepts and that is not shaped like a device token (401).
    InvalidToken,
    /// A well-formed device token that belongs to another device, or was signed with another key
    /// (403).
    WrongDevice,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("hmac", &self.hmac_key.is_some())
            .field("shared_token", &self.shared_token.is_some())
            .field("insecure", &self.insecure)
            .finish()
    }
}

impl Auth {
    /// Builds the authentication from the flags; refuses a configuration without any auth unless
    /// `insecure_no_auth` is set.
    pub fn from_flags(
        secret_file: Option<&Path>,
        shared_token_file: Option<&Path>,
        insecure_no_auth: bool,
    ) -> Result<Self, Error> {
        let hmac_key = secret_file
            .map(|p| read_secret("--auth-secret-file", p))
            .transpose()?;
        let shared_token = shared_token_file
            .map(|p| read_secret("--dev-shared-token-file", p))
            .transpose()?;
        if hmac_key.is_none() && shared_token.is_none() && !insecure_no_auth {
            return Err(Error::InvalidConfig(
                "no device authentication configured: give --auth-secret-file (or \
                 --dev-shared-token-file), or --insecure-no-auth to serve devices without \
                 authentication"
                    .into(),
            ));
        }
        Ok(Self {
            hmac_key: hmac_key.map(|key| Arc::new(TokenKey::new(&key))),
            shared_token: shared_token.map(Arc::from),
            insecure: insecure_no_auth,
        })
    }

    /// Per-device HMAC tokens with `key`.
    pub fn hmac(key: &[u8]) -> Self {
        Self {
            hmac_key: Some(Arc::new(TokenKey::new(key))),
            shared_token: None,
            insecure: false,
        }
    }

    /// No authentication at all.
    pub fn insecure() -> Self {
        Self {
            hmac_key: None,
            shared_token: None,
            insecure: true,
        }
    }

    /// Adds a shared development token.
    pub fn with_shared_token(mut self, token: &[u8]) -> Self {
        self.shared_token = Some(Arc::from(token));
        self
    }

    /// Whether requests are served without authentication.
    pub fn is_insecure(&self) -> bool {
        self.insecure
    }

    /// Whether a shared development token is accepted.
    pub fn has_shared_token(&self) -> bool {
        self.shared_token.is_some()
    }

    /// Checks the token presented in `headers` for `device`.
    pub fn check(&self, device: &str, headers: &HeaderMap) -> Result<(), AuthFailure> {
        if self.insecure {
            return Ok(());
        }
        let token = presented_token(headers).ok_or(AuthFailure::MissingToken)?;
        if let Some(shared) = &self.shared_token {
            if constant_time_eq(token.as_bytes(), shared) {
                return Ok(());
            }
        }
        match &self.hmac_key {
            Some(key) if key.verify(device, token) => Ok(()),
            Some(_) if looks_like_device_token(token) => Err(AuthFailure::WrongDevice),
            _ => Err(AuthFailure::InvalidToken),
        }
    }
}

fn read_secret(what: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    let contents = std::fs::read(path).map_err(|source| Error::ReadSecretFile {
        what,
        path: path.to_owned(),
        source,
    })?;
    let key = key_from_secret_file(&contents);
    if key.is_empty() {
        return Err(Error::EmptySecretFile {
            what,
            path: path.to_owned(),
        });
    }
    Ok(key)
}

/// The token from `X-Device-Token`, else from `Authorization: Bearer`.
fn presented_token(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(DEVICE_TOKEN_HEADER) {
        return v.to_str().ok().map(str::trim).filter(|t| !t.is_empty());
    }
    let auth = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// 64 lowercase hex digits: the shape of hex(HMAC-SHA256).
fn looks_like_device_token(token: &str) -> bool {
    token.len() == 64
        && token
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use apollo_protocol::token::device_token;
    use http::HeaderValue;

    fn headers(name: &str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            HeaderValue::from_str(value).expect("value"),
        );
        h
    }

    #[test]
    fn own_token_passes_in_either_header() {
        let auth = Auth::hmac(b"k");
        let token = device_token(b"k", "tor1-01");
        assert_eq!(
            auth.check("tor1-01", &headers("x-device-token", &token)),
            Ok(())
        );
        assert_eq!(
            auth.check(
                "tor1-01",
                &headers("authorization", &format!("Bearer {token}"))
            ),
            Ok(())
        );
    }

    #[test]
    fn another_devices_token_is_forbidden_and_garbage_is_unauthenticated() {
        let auth = Auth::hmac(b"k");
        let a = device_token(b"k", "tor1-01");
        assert_eq!(
            auth.check("tor1-02", &headers("x-device-token", &a)),
            Err(AuthFailure::WrongDevice)
        );
        assert_eq!(
            auth.check("tor1-02", &HeaderMap::new()),
            Err(AuthFailure::MissingToken)
        );
        assert_eq!(
            auth.check("tor1-02", &headers("x-device-token", "nope")),
            Err(AuthFailure::InvalidToken)
        );
        assert_eq!(
            auth.check("tor1-02", &headers("authorization", "Basic abc")),
            Err(AuthFailure::MissingToken)
        );
    }

    #[test]
    fn shared_token_only_when_configured() {
        let auth = Auth::hmac(b"k");
        assert_eq!(
            auth.check("d", &headers("x-device-token", "dev-token")),
            Err(AuthFailure::InvalidToken)
        );
        let auth = auth.with_shared_token(b"dev-token");
        assert_eq!(
            auth.check("d", &headers("x-device-token", "dev-token")),
            Ok(())
        );
        assert_eq!(
            auth.check("e", &headers("x-device-token", "dev-token")),
            Ok(())
        );
        assert_eq!(
            auth.check("d", &headers("x-device-token", "dev-tokem")),
            Err(AuthFailure::InvalidToken)
        );
    }

    #[test]
    fn insecure_accepts_anything() {
        assert_eq!(Auth::insecure().check("d", &HeaderMap::new()), Ok(()));
    }

    #[test]
    fn secret_file_is_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "  s3cret\n").expect("write");
        let auth = Auth::from_flags(Some(&path), None, false).expect("auth");
        let token = device_token(b"s3cret", "d");
        assert_eq!(auth.check("d", &headers("x-device-token", &token)), Ok(()));
        std::fs::write(&path, "\n").expect("write");
        assert!(matches!(
            Auth::from_flags(Some(&path), None, false),
            Err(Error::EmptySecretFile { .. })
        ));
        assert!(matches!(
            Auth::from_flags(Some(&dir.path().join("missing")), None, false),
            Err(Error::ReadSecretFile { .. })
        ));
        assert!(Auth::from_flags(None, None, false).is_err());
        assert!(format!("{auth:?}").contains("hmac: true"));
        assert!(!format!("{auth:?}").contains("s3cret"));
    }
}
