//! `If-None-Match` matching on arbitrary header values and tags: never a panic; `*` and the tag
//! itself (strong or weak, anywhere in a list) always match; a header naming only other tags
//! never does.
#![no_main]

use apollo_protocol::hash::if_none_match_matches;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // First line: the header; the rest: the current tag.
    let (header, etag) = text.split_once('\n').unwrap_or((text, "\"e\""));
    let matched = if_none_match_matches(header, etag);
    assert!(if_none_match_matches("*", etag));
    let plain = !etag.contains(',') && etag.trim() == etag && !etag.is_empty();
    if plain {
        let bare = etag.trim_start_matches("W/");
        assert!(if_none_match_matches(&format!("{header}, {etag}"), etag));
        assert!(if_none_match_matches(&format!("W/{bare}"), etag));
        let others_only = header
            .split(',')
            .map(str::trim)
            .all(|c| c != "*" && c.trim_start_matches("W/") != bare);
        assert_eq!(matched, !others_only);
    }
});
