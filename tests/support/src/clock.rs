//! A process with a wrong wall clock, for tests of clock skew between replicas.

use std::path::PathBuf;

/// Environment that starts a process with its wall clock (`CLOCK_REALTIME`) shifted by `offset`
/// (libfaketime syntax, e.g. `"+30s"` or `"-2m"`), through `LD_PRELOAD` of Debian's libfaketime
/// (`scripts/test.sh` installs it). Monotonic clocks are left alone, so timers and timeouts behave.
///
/// Panics when libfaketime is not installed.
pub fn skewed_clock_env(offset: &str) -> Vec<(String, String)> {
    let library = libfaketime().unwrap_or_else(|| {
        panic!("libfaketime is not installed (apt-get install libfaketime; scripts/test.sh does)")
    });
    vec![
        ("LD_PRELOAD".into(), library.display().to_string()),
        ("FAKETIME".into(), offset.into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

/// Debian installs the library under the multiarch directory, e.g.
/// `/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1`.
fn libfaketime() -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib")
        .ok()?
        .filter_map(Result::ok)
        .map(|dir| dir.path().join("faketime/libfaketime.so.1"))
        .find(|candidate| candidate.is_file())
}
