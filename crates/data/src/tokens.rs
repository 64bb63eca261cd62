//! Token storage: nanoGPT `.bin` files (flat little-endian integers, no header) memory-mapped,
//! or tokens held in memory.
//!
//! A file holds `uint16` ids (nanoGPT's format) when its vocabulary fits 65536 ids, and `uint32`
//! otherwise (Llama 3's 128256 tokens); meta.json's `dtype` says which ([`TokenDtype`]). Either
//! way ids are `u32` in the API and the file is read in place, never copied.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// Element type of a token file; serialized as numpy's names, `"uint16"` and `"uint32"`, so
/// `np.memmap(path, dtype=meta["dtype"])` reads either.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    /// Two bytes per token: nanoGPT's format, and what a missing `dtype` in meta.json means.
    #[default]
    Uint16,
    /// Four bytes per token, for vocabularies beyond 65536 ids.
    Uint32,
}

impl TokenDtype {
    /// The narrowest type that holds every id of a `vocab_size` vocabulary (`uint16` up to
    /// 65536 ids, so such data stays nanoGPT-compatible).
    pub fn for_vocab(vocab_size: usize) -> TokenDtype {
        if vocab_size <= TokenDtype::Uint16.max_vocab() {
            TokenDtype::Uint16
        } else {
            TokenDtype::Uint32
        }
    }

    /// Bytes per token.
    pub fn width(self) -> usize {
        match self {
            TokenDtype::Uint16 => 2,
            TokenDtype::Uint32 => 4,
        }
    }

    /// Largest vocabulary whose ids all fit (ids `0..max_vocab()`).
    pub fn max_vocab(self) -> usize {
        match self {
            TokenDtype::Uint16 => 1 << 16,
            TokenDtype::Uint32 => 1 << 32,
        }
    }

    /// `"uint16"` or `"uint32"`.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenDtype::Uint16 => "uint16",
            TokenDtype::Uint32 => "uint32",
        }
    }

    /// Token at element `i` of `bytes` (little-endian). Panics if out of range.
    #[inline]
    fn read(self, bytes: &[u8], i: usize) -> u32 {
        match self {
            TokenDtype::Uint16 => u32::from(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])),
            TokenDtype::Uint32 => u32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]),
        }
    }
}

impl fmt::Display for TokenDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated, memory-mapped nanoGPT token file.
///
/// Layout: `len()` tokens of `dtype().width()` bytes each, little-endian, token `i` at bytes
/// `[w*i, w*i+w)`. Tokens are decoded with `from_le_bytes`, so this is correct on any host
/// endianness and needs no alignment.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    map: Mmap,
    dtype: TokenDtype,
}

impl TokenFile {
    /// Maps `path` and checks it is a `dtype` token file whose every token is `< vocab_size`
    /// (one full scan, so later reads need no checks).
    pub fn open(path: &Path, vocab_size: usize, dtype: TokenDtype) -> Result<TokenFile> {
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DataError::TokenFileMissing { path: path.to_owned() },
            _ => DataError::io("open", path, e),
        })?;
        // SAFETY: the mapping is read-only. As with any mmap, another process
        // truncating or rewriting the file while we train is undefined
        // behaviour; `fabbrica prepare` never does that (it writes a temp
        // file and renames it over, which leaves this mapping intact).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io("memory-map", path, e))?;
        if map.len() % dtype.width() != 0 {
            return Err(DataError::BadLength { path: path.to_owned(), bytes: map.len() as u64, dtype });
        }
        if let Some((index, token)) = first_out_of_range(&map, dtype, vocab_size) {
            return Err(DataError::TokenOutOfRange { path: path.to_owned(), index, token, vocab_size });
        }
        Ok(TokenFile { path: path.to_owned(), map, dtype })
    }

    /// The file this maps.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The element type of the file.
    pub fn dtype(&self) -> TokenDtype {
        self.dtype
    }

    /// Number of tokens (bytes / width).
    pub fn len(&self) -> usize {
        self.map.len() / self.dtype.width()
    }

    /// True if the file holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Token `i`. Panics if `i >= len()`.
    pub fn get(&self, i: usize) -> u32 {
        assert!(i < self.len(), "token {i} of {} tokens", self.len());
        self.dtype.read(&self.map, i)
    }

    /// Copies tokens `[start, start + out.len())` into `out` as i64 (the
    /// dtype of embedding indices). Panics if the range exceeds `len()`.
    pub fn fill_window(&self, start: usize, out: &mut [i64]) {
        let w = self.dtype.width();
        let bytes = &self.map[w * start..w * (start + out.len())];
        match self.dtype {
            TokenDtype::Uint16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = i64::from(u16::from_le_bytes([b[0], b[1]]));
                }
            }
            TokenDtype::Uint32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = i64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
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
}

/// First `(index, token)` of `bytes` (flat `dtype` tokens) with `token >= vocab_size`, if any.
fn first_out_of_range(bytes: &[u8], dtype: TokenDtype, vocab_size: usize) -> Option<(usize, u32)> {
    if vocab_size >= dtype.max_vocab() {
        return None; // every value of the type is a valid id
    }
    let n = bytes.len() / dtype.width();
    (0..n).map(|i| (i, dtype.read(bytes, i))).find(|&(_, t)| t as usize >= vocab_size)
}

/// Where a split's tokens live: a mapped `.bin` file, or a vector produced by
/// tokenizing a text file in memory. Same accessors either way.
#[derive(Debug)]
pub enum TokenSource {
    Mapped(TokenFile),
    Owned(Vec<u32>),
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
    pub fn get(&self, i: usize) -> u32 {
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

    /// All tokens (copies; meant for tests and small splits).
    pub fn to_vec(&self) -> Vec<u32> {
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

impl From<Vec<u32>> for TokenSource {
    fn from(v: Vec<u32>) -> Self {
        TokenSource::Owned(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U16: TokenDtype = TokenDtype::Uint16;
    const U32: TokenDtype = TokenDtype::Uint32;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn reads_little_endian_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "a.bin", &[1, 0, 0x34, 0x12, 7, 0]);
        let f = TokenFile::open(&p, 0x1235, U16).unwrap();
        assert_eq!((f.len(), f.dtype()), (3, U16));
        assert_eq!((f.get(0), f.get(1), f.get(2)), (1, 0x1234, 7));
        let src = TokenSource::from(f);
        assert_eq!(src.window(1, 2), vec![0x1234, 7]);
        assert_eq!(src.to_vec(), vec![1, 0x1234, 7]);
        let owned = TokenSource::from(vec![1u32, 0x1234, 7]);
        assert_eq!(owned.window(0, 3), src.window(0, 3));
    }

    #[test]
    fn reads_uint32_tokens_beyond_u16() {
        let dir = tempfile::tempdir().unwrap();
        let ids = [0u32, 65535, 65536, 128255, 0x0102_0304];
        let bytes: Vec<u8> = ids.iter().flat_map(|t| t.to_le_bytes()).collect();
        let p = write(dir.path(), "wide.bin", &bytes);
        let f = TokenFile::open(&p, 0x0102_0305, U32).unwrap();
        assert_eq!(f.len(), 5);
        assert_eq!((0..5).map(|i| f.get(i)).collect::<Vec<_>>(), ids);
        assert_eq!(f.window(1, 3), vec![65535, 65536, 128255]);
        // The same bytes read as uint16 are twice as many, different tokens.
        let narrow = TokenFile::open(&p, 1 << 16, U16).unwrap();
        assert_eq!(narrow.len(), 10);
        assert_eq!(narrow.get(2), 65535);
        // An id of 128255 with a Llama-3-sized vocabulary of 128256 is fine, one fewer is not.
        let p = write(dir.path(), "llama.bin", &[128255u32, 5].iter().flat_map(|t| t.to_le_bytes()).collect::<Vec<_>>());
        assert!(TokenFile::open(&p, 128256, U32).is_ok());
        let err = TokenFile::open(&p, 128255, U32).unwrap_err();
        assert!(matches!(err, DataError::TokenOutOfRange { index: 0, token: 128255, vocab_size: 128255, .. }), "{err}");
    }

    #[test]
    fn dtype_for_vocab() {
        assert_eq!(TokenDtype::for_vocab(50257), U16);
        assert_eq!(TokenDtype::for_vocab(65536), U16);
        assert_eq!(TokenDtype::for_vocab(65537), U32);
        assert_eq!(TokenDtype::for_vocab(128256), U32);
        assert_eq!(TokenDtype::default(), U16);
        assert_eq!(serde_json::to_string(&U32).unwrap(), "\"uint32\"");
        assert_eq!(serde_json::from_str::<TokenDtype>("\"uint16\"").unwrap(), U16);
    }

    #[test]
    fn empty_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "e.bin", &[]);
        for dtype in [U16, U32] {
            let f = TokenFile::open(&p, 10, dtype).unwrap();
            assert!(f.is_empty());
        }
    }

    #[test]
    fn missing_file_suggests_prepare() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train.bin");
        let err = TokenFile::open(&p, 10, U16).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::TokenFileMissing { .. }));
        assert!(msg.contains("train.bin") && msg.contains("fabbrica prepare"), "{msg}");
    }

    #[test]
    fn length_not_a_multiple_of_the_width_is_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "odd.bin", &[1, 0, 2]);
        let err = TokenFile::open(&p, 10, U16).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::BadLength { bytes: 3, dtype: U16, .. }), "{msg}");
        assert!(msg.contains("odd.bin") && msg.contains("uint16") && msg.contains("multiple of 2"), "{msg}");
        // 6 bytes are three uint16 tokens but not whole uint32 ones.
        let p = write(dir.path(), "six.bin", &[1, 0, 2, 0, 3, 0]);
        assert_eq!(TokenFile::open(&p, 10, U16).unwrap().len(), 3);
        let msg = TokenFile::open(&p, 10, U32).unwrap_err().to_string();
        assert!(msg.contains("six.bin") && msg.contains("6 bytes") && msg.contains("uint32") && msg.contains("multiple of 4"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn token_out_of_range_names_first_offender() {
        let dir = tempfile::tempdir().unwrap();
        // Tokens 3, 9, 65, 70: with vocab 65, index 2 (id 65) is the first bad one.
        let p = write(dir.path(), "val.bin", &[3, 0, 9, 0, 65, 0, 70, 0]);
        let err = TokenFile::open(&p, 65, U16).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::TokenOutOfRange { index: 2, token: 65, vocab_size: 65, .. }), "{msg}");
        assert!(msg.contains("val.bin") && msg.contains("different tokenizer"), "{msg}");
        // The same file is fine with a large enough vocabulary.
        assert!(TokenFile::open(&p, 71, U16).is_ok());
        assert!(TokenFile::open(&p, 65536, U16).is_ok());
    }
}
