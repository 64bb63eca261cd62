//! Helpers shared by the trainer's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

/// libtorch's RNG and thread pool are process-global: tests that train in-process take this lock
/// so that another test's `manual_seed` cannot interleave with their draws.
pub fn torch_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// The project venv's interpreter (scripts/setup.sh creates it; the tests cannot run without it).
pub fn venv_python() -> PathBuf {
    let p = repo_root().join(".venv/bin/python");
    assert!(p.exists(), "{} is missing: run scripts/setup.sh (or scripts/test.sh) first", p.display());
    p
}

/// The default corpus (real text), created by scripts/setup.sh; made here if missing.
pub fn corpus() -> PathBuf {
    let p = repo_root().join("data/pystdlib.txt");
    if !p.exists() {
        let st = Command::new(venv_python()).arg(repo_root().join("scripts/make_corpus.py")).arg("--out").arg(&p).status().unwrap();
        assert!(st.success(), "make_corpus.py failed");
    }
    p
}

mod hf_reference;
#[allow(unused_imports)] // not every test file calls transformers
pub use hf_reference::hf_reference;
