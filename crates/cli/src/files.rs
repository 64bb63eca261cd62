//! Output files whole or not at all: written to a temporary file beside the target (same
//! directory, so the rename is atomic), synced, then renamed over it (`fabbrica_data::atomic`).
//! An interrupted or failed write leaves the previous file, never half of a new one.

use std::path::{Path, PathBuf};

/// The largest input table read (`--inputs`, calibration inputs: a `--json` output of a few KB).
pub const MAX_INPUT_BYTES: u64 = 64 << 20;

/// The temporary a library writes `path` through: `fabbrica_data::atomic`'s name, with
/// `path`'s extension after it (image encoders pick the format by it).
fn temp_path(path: &Path) -> PathBuf {
    let tmp = fabbrica_data::atomic::temp_path(path);
    match path.extension() {
        Some(ext) => PathBuf::from(format!("{}.{}", tmp.display(), ext.to_string_lossy())),
        None => tmp,
    }
}

/// Before the work that produces an output: whether `path` can be written, by writing and
/// removing its temporary beside it, so that a mistyped or read-only output path is one line at
/// the start, not after minutes of measuring. `None` when it can; else the one-line reason.
pub fn unwritable(path: &Path, flag: &str) -> Option<String> {
    if path.is_dir() {
        return Some(format!("{flag} {} is a directory: give a file name", path.display()));
    }
    let tmp = temp_path(path);
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp) {
        Ok(_) => {
            let _ = std::fs::remove_file(&tmp);
            None
        }
        Err(e) => {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.display().to_string(),
                _ => ".".into(),
            };
            Some(format!("{flag} {}: cannot write in {dir} ({e}): give a path in an existing, writable directory", path.display()))
        }
    }
}

/// [`unwritable`] for each (flag, path) given.
pub fn check_outputs(outputs: &[(&str, Option<&Path>)]) -> Result<(), crate::commands::Failure> {
    for (flag, path) in outputs {
        if let Some(why) = path.and_then(|p| unwritable(p, flag)) {
            return Err(crate::commands::Failure { user: true, message: why });
        }
    }
    Ok(())
}

/// `path` written whole or not at all (`fabbrica_data::atomic`, the one implementation).
pub fn write_bytes(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    fabbrica_data::atomic::write(path, bytes)
}

/// For files a library writes itself (a PNG encoder given a path): `draw` writes the temporary
/// path, which is then renamed over `path`, or removed if anything failed.
pub fn write_via(path: &Path, draw: impl FnOnce(&Path) -> Result<(), String>) -> Result<(), String> {
    let tmp = temp_path(path);
    let r = draw(&tmp).and_then(|_| std::fs::rename(&tmp, path).map_err(|e| format!("cannot write: {e}")));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}
