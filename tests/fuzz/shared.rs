//! Helpers shared by the fuzz targets of both crates (`model-node/tests/fuzz.rs`,
//! `coordinator/tests/fuzz.rs`), included with `#[path]`.

use std::time::Duration;

/// How long each target runs: `FUZZ_SECONDS` (default 2, so that the test suite stays quick).
pub fn budget() -> Duration {
    let secs = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

/// Flips, inserts and deletes bytes of an encoding: `(position, byte, operation)` per edit.
pub fn mutate(mut bytes: Vec<u8>, edits: &[(u16, u8, u8)]) -> Vec<u8> {
    for &(at, byte, op) in edits {
        let i = usize::from(at) % (bytes.len() + 1);
        match op % 3 {
            0 if i < bytes.len() => bytes[i] ^= byte,
            1 => bytes.insert(i, byte),
            _ if i < bytes.len() => {
                bytes.remove(i);
            }
            _ => {}
        }
    }
    bytes
}
