//! `hf_reference.py` (transformers in the project venv, offline): makes Hugging Face models and
//! computes their logits for the interop tests of both the train crate and the binary. Included
//! by path from `crates/cli/tests/common`.

use std::path::PathBuf;
use std::process::Command;

/// Runs `crates/train/tests/hf_reference.py ARGS` with the venv's Python; its output, or a panic
/// with it when the script fails.
pub fn hf_reference(args: &[&str]) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup.sh (or scripts/test.sh) first", python.display());
    let out = Command::new(python).arg(root.join("crates/train/tests/hf_reference.py")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "hf_reference.py {args:?} failed:\n{text}");
    text
}
