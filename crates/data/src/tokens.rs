//! Token storage: nanoGPT `.bin` files (flat little-endian uint16, no header)
//! memory-mapped, or tokens held in memory.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{DataError, Result};

/// A validated, memory-mapped nanoGPT token file.
///
/// Layout: `len()` tokens, token `i` at bytes `[2i, 2i+2)`, little-endian.
/// Tokens are decoded with `u16::from_le_bytes`, so this is correct on any
/// host endianness and needs no alignment.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    map: Mmap,
}

impl TokenFile {
    /// Maps `path` and checks it is a uint16 token file whose every token is
    /// `< vocab_size` (one full scan, so later reads need no checks).
    pub fn open(path: &Path, vocab_size: usize) -> Result<TokenFile> {
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DataError::TokenFileMissing { path: path.to_owned() },
            _ => DataError::io("open", path, e),
        })?;
        // SAFETY: the mapping is read-only. As with any mmap, another process
        // truncating or rewriting the file while we train is undefined
        // behaviour; `fabbrica prepare` never does that (it writes a temp
        // file and renames it over, which leaves this mapping intact).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io("memory-map", path, e))?;
        if map.len() % 2 != 0 {
            return Err(DataError::OddLength { path: path.to_owned(), bytes: map.len() as u64 });
        }
        if let Some((index, token)) = first_out_of_range(&map, vocab_size) {
            return Err(DataError::TokenOutOfRange { path: path.to_owned(), index, token, vocab_size });
        }
        Ok(TokenFile { path: path.to_owned(), map })
    }

    /// The file this maps.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tokens (bytes / 2).
    pub fn len(&self) -> usize {
        self.map.len() / 2
    }

    /// True if the file holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Token `i`. Panics if `i >= len()`.
    pub fn get(&self, i: usize) -> u16 {
        u16::from_le_bytes([self.map[2 * i], self.map[2 * i + 1]])
    }

    /// Copies tokens `[start, start + out.len())` into `out` as i64 (the
    /// dtype of embedding indices). Panics if the range exceeds `len()`.
    pub fn fill_window(&self, start: usize, out: &mut [i64]) {
        let bytes = &self.map[2 * start..2 * (start + out.len())];
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *o = i64::from(u16::from_le_bytes([b[0], b[1]]));
        }
    }

    /// Tokens `[start, start + len)` as i64. Panics if out of range.
    pub fn window(&self, start: usize, len: usize) -> Vec<i64> {
        let mut out = vec![0; len];
        self.fill_window(start, &mut out);
        out
    }
}

/// First `(index, token)` with `token >= vocab_size`, if any.
fn first_out_of_range(bytes: &[u8], vocab_size: usize) -> Option<(usize, u16)> {
    if vocab_size > usize::from(u16::MAX) {
        return None; // every u16 is a valid id
    }
    bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).enumerate().find(|&(_, t)| usize::from(t) >= vocab_size)
}

/// Where a split's tokens live: a mapped `.bin` file, or a vector produced by
/// tokenizing a text file in memory. Same accessors either way.
#[derive(Debug)]
pub enum TokenSource {
    Mapped(TokenFile),
    Owned(Vec<u16>),
}

impl TokenSource {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        match self {
            TokenSource::Mapped(f) => f.len(),
            TokenSource::Owned(v) => v.len(),
        }
    }

    /// True if there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Token `i`. Panics if `i >= len()`.
    pub fn get(&self, i: usize) -> u16 {
        match self {
            TokenSource::Mapped(f) => f.get(i),
            TokenSource::Owned(v) => v[i],
        }
    }

    /// Copies tokens `[start, start + out.len())` into `out`. Panics if out of range.
    pub fn fill_window(&self, start: usize, out: &mut [i64]) {
        match self {
            TokenSource::Mapped(f) => f.fill_window(start, out),
            TokenSource::Owned(v) => {
                let src = &v[start..start + out.len()];
                for (o, &t) in out.iter_mut().zip(src) {
                    *o = i64::from(t);
                }
            }
        }
    }

    /// Tokens `[start, start + len)` as i64. Panics if out of range.
    pub fn window(&self, start: usize, len: usize) -> Vec<i64> {
        let mut out = vec![0; len];
        self.fill_window(start, &mut out);
        out
    }

    /// All tokens as u16 (copies; meant for tests and small splits).
    pub fn to_vec(&self) -> Vec<u16> {
        match self {
            TokenSource::Mapped(f) => (0..f.len()).map(|i| f.get(i)).collect(),
            TokenSource::Owned(v) => v.clone(),
        }
    }
}

impl From<TokenFile> for TokenSource {
    fn from(f: TokenFile) -> Self {
        TokenSource::Mapped(f)
    }
}

impl From<Vec<u16>> for TokenSource {
    fn from(v: Vec<u16>) -> Self {
        TokenSource::Owned(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn reads_little_endian_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "a.bin", &[1, 0, 0x34, 0x12, 7, 0]);
        let f = TokenFile::open(&p, 0x1235).unwrap();
        assert_eq!(f.len(), 3);
        assert_eq!((f.get(0), f.get(1), f.get(2)), (1, 0x1234, 7));
        let src = TokenSource::from(f);
        assert_eq!(src.window(1, 2), vec![0x1234, 7]);
        assert_eq!(src.to_vec(), vec![1, 0x1234, 7]);
        let owned = TokenSource::from(vec![1u16, 0x1234, 7]);
        assert_eq!(owned.window(0, 3), src.window(0, 3));
    }

    #[test]
    fn empty_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "e.bin", &[]);
        let f = TokenFile::open(&p, 10).unwrap();
        assert!(f.is_empty());
    }

    #[test]
    fn missing_file_suggests_prepare() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train.bin");
        let err = TokenFile::open(&p, 10).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::TokenFileMissing { .. }));
        assert!(msg.contains("train.bin") && msg.contains("fabbrica prepare"), "{msg}");
    }

    #[test]
    fn odd_length_is_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "odd.bin", &[1, 0, 2]);
        let err = TokenFile::open(&p, 10).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::OddLength { bytes: 3, .. }), "{msg}");
        assert!(msg.contains("odd.bin") && msg.contains("uint16"), "{msg}");
    }

    #[test]
    fn token_out_of_range_names_first_offender() {
        let dir = tempfile::tempdir().unwrap();
        // Tokens 3, 9, 65, 70: with vocab 65, index 2 (id 65) is the first bad one.
        let p = write(dir.path(), "val.bin", &[3, 0, 9, 0, 65, 0, 70, 0]);
        let err = TokenFile::open(&p, 65).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::TokenOutOfRange { index: 2, token: 65, vocab_size: 65, .. }), "{msg}");
        assert!(msg.contains("val.bin") && msg.contains("different tokenizer"), "{msg}");
        // The same file is fine with a large enough vocabulary.
        assert!(TokenFile::open(&p, 71).is_ok());
        assert!(TokenFile::open(&p, 65536).is_ok());
    }
}
