//! Output files whole or not at all: written to a temporary file beside the target (same
//! directory, so the rename is atomic), synced, then renamed over it. An interrupted or failed
//! write leaves the previous file, never half of a new one.

use std::path::{Path, PathBuf};

/// `dir/.name.tmp-<pid>.ext`: same directory as `path`, same extension (image encoders pick the
/// format by it).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let ext = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}{ext}", std::process::id()))
}

/// Creates the temporary file, lets `fill` write it, syncs and renames it over `path`.
pub fn write_atomic(path: &Path, fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// `write_atomic` of a byte string.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic(path, |f| std::io::Write::write_all(f, bytes))
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
