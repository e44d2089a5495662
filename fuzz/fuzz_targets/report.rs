//! The gateway's report and connect decoders on arbitrary bytes: never a panic; whatever they
//! accept re-encodes to a body they accept again as the same value, and validation either passes
//! or names a field.
#![no_main]

use apollo_protocol::parse::{parse_connect, parse_report};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(report) = parse_report(data) {
        let again = serde_json::to_vec(&report).expect("a parsed report encodes");
        let reparsed = parse_report(&again).expect("a re-encoded report parses");
        assert_eq!(reparsed, report);
        if let Err(error) = report.validate() {
            assert!(
                !error.field.is_empty(),
                "a validation error names its field"
            );
        }
    }
    if let Ok(connect) = parse_connect(data) {
        let again = serde_json::to_vec(&connect).expect("a parsed connect encodes");
        assert_eq!(
            parse_connect(&again).expect("re-encoded connect parses"),
            connect
        );
        let _ = connect.validate();
    }
});
