//! Helpers shared by torch-ext's integration tests.

/// Whether a GPU test can run. Without a CUDA device it prints that `test` was skipped and
/// appends it to `$FABBRICA_SKIP_LOG` (the test summary lists skips; the device check fails on any).
pub fn cuda_or_skip(test: &str) -> bool {
    if tch::Cuda::is_available() {
        return true;
    }
    println!("SKIPPED: no CUDA device");
    if let Ok(log) = std::env::var("FABBRICA_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(f, "torch-ext::{test}: no CUDA device");
        }
    }
    false
}
