//! Device-token verification, as the gateway does it on every device request: the one-shot
//! `verify_device_token` (HMAC keyed per call) against a pre-keyed `TokenKey`.
//!
//! `cargo bench -p apollo-protocol --bench token` (numbers in docs/benchmarks.md).

use std::hint::black_box;
use std::time::Instant;

use apollo_protocol::token::{device_token, verify_device_token, TokenKey};

const ROUNDS: u32 = 1_000_000;

fn per_call(what: &str, mut f: impl FnMut(u32) -> bool) {
    // Warm up, then take the best of three rounds (other work shares the machine).
    for i in 0..ROUNDS / 10 {
        black_box(f(i));
    }
    let best = (0..3)
        .map(|_| {
            let start = Instant::now();
            for i in 0..ROUNDS {
                assert!(black_box(f(i)));
            }
            start.elapsed().as_nanos() as f64 / f64::from(ROUNDS)
        })
        .fold(f64::INFINITY, f64::min);
    println!("{what:<44} {best:>7.0} ns per verification");
}

fn main() {
    let key = b"a-secret-of-the-length-a-secret-file-would-hold".to_vec();
    let device = "spine-07.pod-3.dc1";
    let token = device_token(&key, device);
    let keyed = TokenKey::new(&key);
    per_call("verify_device_token (keyed per call)", |_| {
        verify_device_token(black_box(&key), black_box(device), black_box(&token))
    });
    per_call("TokenKey::verify (keyed once)", |_| {
        keyed.verify(black_box(device), black_box(&token))
    });
}
