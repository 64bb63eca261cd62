//! Crash-safe file writes: temp file in the same directory, fsync, rename.
//!
//! `rename` within one directory is atomic on POSIX file systems, so a reader
//! sees either the old file or the complete new one; an interrupted run leaves
//! at most a `.<name>.tmp-<pid>` file behind, never a truncated final file.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::tokens::TokenDtype;

/// Writes `bytes` to `path` atomically.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Writes `tokens` to `path` as flat little-endian `dtype` (nanoGPT `.bin`), atomically.
///
/// A token that does not fit `dtype` fails the write (the caller picks a `dtype` that holds its
/// vocabulary, so this never happens).
pub(crate) fn write_tokens_atomic(path: &Path, tokens: &[u32], dtype: TokenDtype) -> Result<()> {
    write_atomic_with(path, |w| {
        // Chunked conversion keeps memory flat for large corpora.
        let mut buf = Vec::with_capacity(dtype.width() * 8192);
        for chunk in tokens.chunks(8192) {
            buf.clear();
            match dtype {
                TokenDtype::Uint16 => {
                    for &t in chunk {
                        let t = u16::try_from(t).map_err(|_| std::io::Error::other(format!("token id {t} does not fit uint16")))?;
                        buf.extend_from_slice(&t.to_le_bytes());
                    }
                }
                TokenDtype::Uint32 => buf.extend(chunk.iter().flat_map(|t| t.to_le_bytes())),
            }
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
        write_tokens_atomic(&p, &[1, 0x0203, 0xFFFF], TokenDtype::Uint16).unwrap();
        assert_eq!(fs::read(&p).unwrap(), vec![1, 0, 3, 2, 0xFF, 0xFF]);
        write_tokens_atomic(&p, &[1, 0x0001_0203], TokenDtype::Uint32).unwrap();
        assert_eq!(fs::read(&p).unwrap(), vec![1, 0, 0, 0, 3, 2, 1, 0]);
        // An id too wide for uint16 fails the write and leaves the old file.
        let msg = write_tokens_atomic(&p, &[1, 0x0001_0000], TokenDtype::Uint16).unwrap_err().to_string();
        assert!(msg.contains("65536") && msg.contains("t.bin"), "{msg}");
        assert_eq!(fs::read(&p).unwrap(), vec![1, 0, 0, 0, 3, 2, 1, 0]);
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
