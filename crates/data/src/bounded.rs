//! Reading a file whose size and kind the reader does not control (a config, an index, a
//! checkpoint's state, a table passed on the command line), the one implementation every crate
//! uses: at most `max` bytes are read, and only from a regular file.
//!
//! A size check on the path's metadata before reading is not enough: a FIFO reports length 0 and
//! blocks the read (and, without `O_NONBLOCK`, the open) for ever, a symlink to `/dev/zero`
//! reports 0 and never ends, and a file can grow between the check and the read. So the file
//! is opened without blocking, its kind is taken from the open handle, and the read itself is
//! capped at `max + 1` bytes.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Why a bounded read failed; `Display` is the reason only (callers name the file).
#[derive(Debug)]
pub enum ReadError {
    Io(std::io::Error),
    /// Not a regular file: "a directory", "a FIFO", "a character device", ...
    NotAFile(&'static str),
    /// More than `max` bytes.
    TooLarge {
        max: u64,
    },
    /// `read_to_string` only.
    NotUtf8,
}

impl ReadError {
    /// The file does not exist (callers often say what to do about a missing file).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ReadError::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "{e}"),
            ReadError::NotAFile(kind) => write!(f, "it is {kind}, not a regular file"),
            ReadError::TooLarge { max } => write!(f, "it has more than {max} bytes, the most this file may have"),
            ReadError::NotUtf8 => write!(f, "it is not UTF-8 text"),
        }
    }
}

impl std::error::Error for ReadError {}

/// Opens `path` for reading if it is a regular file (after following symlinks), without
/// blocking on a FIFO.
pub fn open_regular(path: &Path) -> Result<File, ReadError> {
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(ReadError::Io)?;
    let kind = file.metadata().map_err(ReadError::Io)?.file_type();
    if kind.is_file() {
        return Ok(file);
    }
    Err(ReadError::NotAFile(if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a file"
    }))
}

/// The bytes of the regular file `path`, if it has at most `max`.
pub fn read(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let file = open_regular(path)?;
    let hint = file.metadata().map(|m| m.len().min(max)).unwrap_or(0);
    let mut bytes = Vec::with_capacity(hint as usize);
    file.take(max.saturating_add(1)).read_to_end(&mut bytes).map_err(ReadError::Io)?;
    if bytes.len() as u64 > max {
        return Err(ReadError::TooLarge { max });
    }
    Ok(bytes)
}

/// As [`read`], as UTF-8 text.
pub fn read_to_string(path: &Path, max: u64) -> Result<String, ReadError> {
    String::from_utf8(read(path, max)?).map_err(|_| ReadError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn reads_a_regular_file_up_to_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        std::fs::write(&p, b"0123456789").unwrap();
        assert_eq!(read(&p, 10).unwrap(), b"0123456789");
        assert_eq!(read_to_string(&p, 100).unwrap(), "0123456789");
        let e = read(&p, 9).unwrap_err();
        assert!(matches!(e, ReadError::TooLarge { max: 9 }), "{e:?}");
        assert_eq!(e.to_string(), "it has more than 9 bytes, the most this file may have");
        // Through a symlink to a regular file: fine.
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert_eq!(read(&link, 10).unwrap(), b"0123456789");
    }

    #[test]
    fn refuses_what_is_not_a_regular_file_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        // A FIFO with no writer: a plain open would block for ever.
        let fifo = dir.path().join("state.json");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read(&fifo, 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), "it is a FIFO, not a regular file");
        // A symlink to an endless device: refused, not read until memory runs out.
        let zero = dir.path().join("zero.json");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert_eq!(read(&zero, 1 << 20).unwrap_err().to_string(), "it is a character device, not a regular file");
        assert_eq!(read(dir.path(), 1 << 20).unwrap_err().to_string(), "it is a directory, not a regular file");
        let missing = read(&dir.path().join("nope"), 10).unwrap_err();
        assert!(missing.is_not_found(), "{missing:?}");
        let bad = dir.path().join("bin");
        std::fs::write(&bad, [0xff, 0xfe]).unwrap();
        assert!(matches!(read_to_string(&bad, 10), Err(ReadError::NotUtf8)));
    }
}
