//! Objects the unit tests build (compiled for tests only).

use apollo_crds::{Artifact, Backend, Execution, WorkloadSpec};

/// A container workload of the OCI image `url` running `command` with `args`.
pub(crate) fn workload(url: &str, command: &[&str], args: &[&str]) -> WorkloadSpec {
    let owned = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect();
    WorkloadSpec {
        artifact: Artifact {
            type_: "oci".into(),
            url: url.into(),
            digest: None,
        },
        execution: Execution {
            backend: Backend::Container,
            command: owned(command),
            args: owned(args),
            env: vec![],
            working_dir: None,
        },
    }
}
