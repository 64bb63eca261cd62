//! File-system pieces of checkpointing: checksums, fsync, atomic replacement, the names of
//! in-progress temporaries (and removing those whose writer is dead), free space.
//!
//! A temporary is named `.<final name>.tmp-<pid>@<host>` (`fabbrica_data::atomic`, the one
//! implementation of atomic writes): the writer's process id and host, so a later run can tell a
//! crashed writer's leftovers (pid not alive on this host) from a live writer's (another rank's,
//! another job's) and never touches the latter. Names written before the host was added
//! (`.tmp-<pid>`) are taken as this host's.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{io_err, TrainError};

pub(crate) fn sha256_file(path: &Path) -> Result<String, TrainError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

pub(crate) fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn fsync_path(path: &Path) -> Result<(), TrainError> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io_err(path))
}

pub(crate) use fabbrica_data::atomic::host_name;

/// `dir/.<name>.tmp-<pid>@<host>`: the temporary this process writes `dir/<name>` through.
pub(crate) fn temp_path(dir: &Path, name: &str) -> PathBuf {
    fabbrica_data::atomic::temp_path(&dir.join(name))
}

/// Writes `bytes` to `path` atomically (temp file in the same directory, fsync, rename, fsync dir).
/// On failure the temp file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    fabbrica_data::atomic::write(path, bytes).map_err(io_err(path))
}

/// Bytes available to this user on the file system holding `path` (None if it cannot be asked).
pub(crate) fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is a plain C struct of integers: all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a statvfs we own.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Total size of the files under `path` (a file or a directory tree; links are not followed).
pub(crate) fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    fs::read_dir(path).map(|rd| rd.filter_map(|e| e.ok()).map(|e| disk_usage(&e.path())).sum()).unwrap_or(0)
}

use fabbrica_data::atomic::writer_of;

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// What [`remove_stale_temporaries`] did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Sweep {
    /// Temporaries of dead writers, removed, with their sizes.
    pub removed: Vec<(PathBuf, u64)>,
    /// Temporaries of live writers or of other hosts, left alone.
    pub kept: Vec<PathBuf>,
}

impl Sweep {
    pub fn bytes_freed(&self) -> u64 {
        self.removed.iter().map(|(_, b)| b).sum()
    }
}

/// Removes the temporaries in `dir` left by writers that died mid-write (a killed run leaves
/// `.step_N.tmp-…/`, up to a checkpoint's size each). Called before this process writes
/// anything there, so its own pid's leftovers (a crashed earlier run that had the same pid, as
/// happens in containers) are stale too. A live process's, or another host's, are kept.
pub fn remove_stale_temporaries(dir: &Path) -> Result<Sweep, TrainError> {
    let mut sweep = Sweep::default();
    let entries = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(sweep),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let me = (std::process::id() as i32, host_name());
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((pid, host)) = writer_of(&name) else { continue };
        let path = entry.path();
        let this_host = host.is_none_or(|h| h == me.1);
        if !this_host || (pid != me.0 && alive(pid)) {
            sweep.kept.push(path);
            continue;
        }
        let size = disk_usage(&path);
        let removed = if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        match removed {
            Ok(()) => sweep.removed.push((path, size)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(TrainError::Checkpoint(format!(
                    "cannot remove {}, left by a writer that died ({e}): remove it by hand or fix its permissions",
                    path.display()
                )))
            }
        }
    }
    Ok(sweep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_names_parse() {
        assert_eq!(writer_of(".step_00000010.tmp-123@node7"), Some((123, Some("node7"))));
        assert_eq!(writer_of(".step_00000010.tmp-123"), Some((123, None)));
        assert_eq!(writer_of(".latest.tmp-9@a-b"), Some((9, Some("a-b"))));
        assert_eq!(writer_of("step_00000010"), None);
        assert_eq!(writer_of(".step_1.tmp-x"), None);
        assert_eq!(writer_of(".step_1.tmp-0"), None);
        assert_eq!(writer_of(".step_1.tmp--5"), None);
    }

    #[test]
    fn stale_temporaries_of_dead_writers_go_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let host = host_name();
        // A dead writer: a child that has exited (its pid is not alive any more).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let live = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let dead_dir = dir.path().join(format!(".step_00000005.tmp-{dead}@{host}"));
        fs::create_dir(&dead_dir).unwrap();
        fs::write(dead_dir.join("model.safetensors"), vec![0u8; 4096]).unwrap();
        let old_style = dir.path().join(format!(".step_00000006.tmp-{dead}"));
        fs::create_dir(&old_style).unwrap();
        let mine = dir.path().join(format!(".latest.tmp-{}@{host}", std::process::id()));
        fs::write(&mine, "x").unwrap();
        let live_dir = dir.path().join(format!(".step_00000007.tmp-{}@{host}", live.id()));
        fs::create_dir(&live_dir).unwrap();
        let other_host = dir.path().join(format!(".step_00000008.tmp-{dead}@{host}x"));
        fs::create_dir(&other_host).unwrap();
        let real = dir.path().join("step_00000004");
        fs::create_dir(&real).unwrap();

        let sweep = remove_stale_temporaries(dir.path()).unwrap();
        let mut live = live;
        let _ = live.kill();
        let _ = live.wait();
        assert!(!dead_dir.exists() && !old_style.exists() && !mine.exists());
        assert!(live_dir.exists(), "a live writer's temporary was removed");
        assert!(other_host.exists(), "another host's temporary was removed");
        assert!(real.exists());
        assert_eq!(sweep.removed.len(), 3);
        assert_eq!(sweep.kept.len(), 2);
        assert!(sweep.bytes_freed() >= 4096);
    }

    #[test]
    fn write_atomic_failure_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("sub");
        fs::create_dir(&target).unwrap();
        // Renaming a file over a non-empty directory fails: the temp file must not stay behind.
        fs::write(target.join("x"), "x").unwrap();
        assert!(write_atomic(&target, b"data").is_err());
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("sub")]);
    }
}
