//! Per-device tokens: `token = lowercase hex(HMAC-SHA256(key, deviceName))`.
//!
//! The key is the secret file's bytes with surrounding whitespace trimmed, so a trailing newline
//! written by an editor or `echo` never changes the key.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The HMAC key held in a secret file: its bytes with surrounding ASCII whitespace trimmed.
pub fn key_from_secret_file(contents: &[u8]) -> Vec<u8> {
    contents.trim_ascii().to_vec()
}

fn mac(key: &[u8], device: &str) -> HmacSha256 {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC-SHA256 accepts keys of every length"),
    };
    mac.update(device.as_bytes());
    mac
}

/// The token device `device` presents.
pub fn device_token(key: &[u8], device: &str) -> String {
    hex::encode(mac(key, device).finalize().into_bytes())
}

/// Whether `presented` is `device`'s token. Compares in constant time.
pub fn verify_device_token(key: &[u8], device: &str, presented: &str) -> bool {
    let Ok(raw) = hex::decode(presented.trim()) else {
        return false;
    };
    mac(key, device).verify_slice(&raw).is_ok()
}

/// A device-token key with HMAC's key schedule done once. Each [`device_token`] /
/// [`verify_device_token`] call hashes the two padded key blocks again before the device name
/// (three of the four SHA-256 compressions of a short name); a server verifying a token on every
/// request keeps one of these and clones the keyed state instead (docs/benchmarks.md).
#[derive(Clone)]
pub struct TokenKey(HmacSha256);

impl TokenKey {
    /// Keys HMAC-SHA256 with `key` (any length).
    pub fn new(key: &[u8]) -> Self {
        let mac = match HmacSha256::new_from_slice(key) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC-SHA256 accepts keys of every length"),
        };
        Self(mac)
    }

    fn mac(&self, device: &str) -> HmacSha256 {
        let mut mac = self.0.clone();
        mac.update(device.as_bytes());
        mac
    }

    /// The token device `device` presents (as [`device_token`]).
    pub fn token(&self, device: &str) -> String {
        hex::encode(self.mac(device).finalize().into_bytes())
    }

    /// Whether `presented` is `device`'s token (as [`verify_device_token`]), in constant time,
    /// without allocating.
    pub fn verify(&self, device: &str, presented: &str) -> bool {
        let mut raw = [0u8; 32];
        if hex::decode_to_slice(presented.trim(), &mut raw).is_err() {
            return false;
        }
        self.mac(device).verify_slice(&raw).is_ok()
    }
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

/// Constant-time equality for shared (dev) tokens.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_matches_rfc4231_style_hmac() {
        // HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog"), a widely published value.
        assert_eq!(
            device_token(b"key", "The quick brown fox jumps over the lazy dog"),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[test]
    fn verify_accepts_own_token_and_refuses_others() {
        let key = key_from_secret_file(b"  s3cret\n");
        assert_eq!(key, b"s3cret");
        let a = device_token(&key, "tor1-01");
        assert!(verify_device_token(&key, "tor1-01", &a));
        assert!(!verify_device_token(&key, "tor1-02", &a));
        assert!(!verify_device_token(b"other", "tor1-01", &a));
        assert!(!verify_device_token(&key, "tor1-01", "not-hex"));
        assert!(!verify_device_token(&key, "tor1-01", ""));
        assert!(!verify_device_token(&key, "tor1-01", &a[..10]));
    }

    #[test]
    fn a_pre_keyed_key_agrees_with_the_one_shot_functions() {
        let long_key = [7u8; 100]; // longer than a SHA-256 block: hashed first, as HMAC requires
        for key in [&b"s3cret"[..], &b""[..], &long_key[..]] {
            let keyed = TokenKey::new(key);
            for device in [
                "tor1-01",
                "",
                "a-much-longer-device-name-of-some-spine.example.net",
            ] {
                let token = device_token(key, device);
                assert_eq!(keyed.token(device), token);
                assert!(keyed.verify(device, &token));
                assert!(keyed.verify(device, &format!(" {token}\n")));
                assert!(!keyed.verify("other", &token));
                assert!(!keyed.verify(device, &token[..62]));
                assert!(!keyed.verify(device, &format!("{token}00")));
                assert!(!keyed.verify(device, &token.replace(|c: char| c.is_ascii_digit(), "z")));
            }
        }
    }

    #[test]
    fn constant_time_eq_works() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
