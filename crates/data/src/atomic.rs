//! Crash-safe file writes: temp file in the same directory, fsync, rename.
//!
//! `rename` within one directory is atomic on POSIX file systems, so a reader
//! sees either the old file or the complete new one; an interrupted run leaves
//! at most a `.<name>.tmp-<pid>` file behind, never a truncated final file.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// Writes `bytes` to `path` atomically.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Writes `tokens` to `path` as flat little-endian uint16 (nanoGPT `.bin`), atomically.
pub(crate) fn write_tokens_atomic(path: &Path, tokens: &[u16]) -> Result<()> {
    write_atomic_with(path, |w| {
        // Chunked conversion keeps memory flat for large corpora.
        let mut buf = Vec::with_capacity(2 * 8192);
        for chunk in tokens.chunks(8192) {
            buf.clear();
            buf.extend(chunk.iter().flat_map(|t| t.to_le_bytes()));
            w.write_all(&buf)?;
        }
        Ok(())
    })
}

/// Temp-file dance shared by the writers; `fill` writes the content.
fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| -> std::io::Result<()> {
        // truncate, not create_new: a crashed earlier run with the same pid
        // (common in containers) may have left this temp name behind.
        let file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        let mut w = BufWriter::new(file);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        // Best effort: do not leave the temp file behind on failure.
        let _ = fs::remove_file(&tmp);
        return Err(DataError::io("write", path, e));
    }
    // Persist the rename itself; best effort (not all platforms allow
    // opening a directory for fsync).
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// `dir/.name.tmp-<pid>`: same directory (so rename is atomic), hidden, and
/// unique per process so concurrent prepares cannot clobber each other's temp.
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.bin");
        write_tokens_atomic(&p, &[1, 0x0203, u16::MAX]).unwrap();
        assert_eq!(fs::read(&p).unwrap(), vec![1, 0, 3, 2, 0xFF, 0xFF]);
        // Overwrite replaces the whole file.
        write_atomic(&p, b"xy").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"xy");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "temp file left behind");
    }

    #[test]
    fn failure_names_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("no_such_dir").join("t.bin");
        let msg = write_atomic(&p, b"x").unwrap_err().to_string();
        assert!(msg.contains("cannot write") && msg.contains("t.bin"), "{msg}");
    }
}
