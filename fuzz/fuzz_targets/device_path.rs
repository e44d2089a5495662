//! Device names in paths: the router's `device_of` (percent-decoding, malformed escapes refused)
//! and the gateway's device-name check (`is_device_name`) on arbitrary text. Never a panic; the router decodes exactly
//! as RFC 3986 percent-decoding does whenever it accepts; a name the gateway accepts contains only
//! name characters, so it survives encoding and decoding unchanged and routes to itself.
#![no_main]

use apollo_protocol::parse::{device_of, is_device_name};
use libfuzzer_sys::fuzz_target;
use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // As a whole path, and as the device segment of a well-formed one.
    let _ = device_of(text);
    let segment = text.split('/').next().unwrap_or_default();
    let path = format!("/v1/devices/{segment}/desired");
    if let Some(name) = device_of(&path) {
        let decoded = percent_decode_str(segment)
            .decode_utf8()
            .expect("the router accepts only UTF-8");
        assert_eq!(
            name, decoded,
            "router decoding differs from percent-decoding"
        );
        assert!(!segment.contains("%") || segment.len() > name.len());
        if is_device_name(&name) {
            assert!(name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')));
            let encoded = utf8_percent_encode(&name, NON_ALPHANUMERIC).to_string();
            let round = device_of(&format!("/v1/devices/{encoded}/report"));
            assert_eq!(round.as_deref(), Some(name.as_str()));
        }
    }
    if is_device_name(text) {
        assert!(!text.is_empty() && text.len() <= 253);
        assert_eq!(
            device_of(&format!("/v1/devices/{text}/desired")).as_deref(),
            Some(text)
        );
    }
});
