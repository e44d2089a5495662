//! The committed CRD YAML must be exactly what crdgen produces from the Rust types.

use std::path::PathBuf;

#[test]
fn committed_crd_yaml_matches_crdgen_output() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    for (file, expected) in apollo_crds::render_all_crds().expect("render CRDs") {
        let path = dir.join(file);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == expected,
            "{} is out of date with the CRD types; regenerate it with \
             `cargo run -p apollo-crds --bin crdgen` and commit the result",
            path.display()
        );
    }
}
