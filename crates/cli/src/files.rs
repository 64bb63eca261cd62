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
