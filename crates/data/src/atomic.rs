//! Crash-safe file writes, the one implementation every crate uses (data files, checkpoints,
//! metrics, traces, the CLI's tables and plots): a temporary in the same directory, fsync,
//! rename, fsync of the directory.
//!
//! `rename` within one directory is atomic on POSIX file systems, so a reader sees either the
//! old file or the complete new one; an interrupted run leaves at most a temporary behind, never
//! a truncated final file. A temporary is named `.<final name>.tmp-<pid>@<host>` ([`temp_path`]):
//! the writer's process id and host, so a later run can tell a crashed writer's leftovers (pid
//! not alive on this host) from a live writer's ([`writer_of`]; the checkpoint sweep uses it).

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::tokens::TokenDtype;

/// Writes `bytes` to `path` atomically (see the module docs).
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_with(path, |w| w.write_all(bytes))
}

/// Writes `path` atomically with what `fill` writes (buffered). On failure the temporary is
/// removed and `path` is untouched.
pub fn write_with(path: &Path, fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let result = (|| -> std::io::Result<()> {
        // truncate, not create_new: a crashed earlier run with the same pid (common in
        // containers) may have left this temp name behind.
        let file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        let mut w = BufWriter::new(file);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    // Persist the rename itself.
    File::open(parent(path))?.sync_all()
}

/// The directory `path` is in (`.` for a bare name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// `dir/.<name>.tmp-<pid>@<host>`: the temporary this process writes `dir/<name>` through
/// (same directory, so the rename is atomic; hidden; unique per process and host).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    parent(path).join(format!(".{name}.tmp-{}@{}", std::process::id(), host_name()))
}

/// Who wrote a temporary, from its name: `(pid, host)`; `None` for names that are not
/// temporaries. Names written before the host was added (`.tmp-<pid>`) have no host.
pub fn writer_of(name: &str) -> Option<(i32, Option<&str>)> {
    if !name.starts_with('.') {
        return None;
    }
    let (_, tail) = name.rsplit_once(".tmp-")?;
    let (pid, host) = match tail.split_once('@') {
        Some((p, h)) => (p, Some(h)),
        None => (tail, None),
    };
    let pid: i32 = pid.parse().ok().filter(|&p| p > 0)?;
    Some((pid, host))
}

/// This host's name, as temporaries carry it: only `[A-Za-z0-9_-]` (safe in a file name, never
/// confused with the separators); `localhost` if it cannot be read.
pub fn host_name() -> String {
    let name = fs::read_to_string("/proc/sys/kernel/hostname").or_else(|_| fs::read_to_string("/etc/hostname")).unwrap_or_default();
    let clean: String = name.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

/// Writes `bytes` to `path` atomically, as this crate's error.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write(path, bytes).map_err(|e| DataError::io("write", path, e))
}

/// Writes `tokens` to `path` as flat little-endian `dtype` (nanoGPT `.bin`), atomically.
///
/// A token that does not fit `dtype` fails the write (the caller picks a `dtype` that holds its
/// vocabulary, so this never happens).
pub(crate) fn write_tokens_atomic(path: &Path, tokens: &[u32], dtype: TokenDtype) -> Result<()> {
    write_with(path, |w| {
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
    .map_err(|e| DataError::io("write", path, e))
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

    #[test]
    fn a_failed_fill_keeps_the_old_file_and_the_temporary_names_its_writer() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("plot.svg");
        write(&p, b"old").unwrap();
        let e = write_with(&p, |w| {
            w.write_all(b"half of a new")?;
            w.flush()?;
            // The temporary exists while it is being written, named for this process and host.
            let tmp = temp_path(&p);
            assert!(tmp.is_file(), "{}", tmp.display());
            let name = tmp.file_name().unwrap().to_string_lossy().into_owned();
            assert!(name.starts_with(".plot.svg.tmp-"), "{name}");
            assert_eq!(writer_of(&name), Some((std::process::id() as i32, Some(host_name().as_str()))));
            Err(std::io::Error::other("encoder failed"))
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "encoder failed");
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "temporary left behind");
    }
}
