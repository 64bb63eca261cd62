//! `fabbrica prepare`: text file -> `train.bin`, `val.bin`, `meta.json` (and `tokenizer.json`
//! for a Hugging Face tokenizer).

use std::path::{Path, PathBuf};

use crate::atomic::{write_atomic, write_tokens_atomic};
use crate::error::{DataError, Result};
use crate::meta::{Meta, HF_TOKENIZER_FILE};
use crate::tokenizer::{Tokenizer, TokenizerKind, TokenizerSpec};
use crate::tokens::TokenDtype;

/// Name of the training token file in a prepared directory.
pub const TRAIN_FILE: &str = "train.bin";
/// Name of the validation token file in a prepared directory.
pub const VAL_FILE: &str = "val.bin";

/// What `prepare` wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareSummary {
    pub tokenizer: TokenizerKind,
    pub vocab_size: usize,
    /// Element type of the token files (`uint16` up to 65536 ids, else `uint32`).
    pub dtype: TokenDtype,
    pub train_tokens: usize,
    pub val_tokens: usize,
    /// Paths written: train.bin, val.bin, meta.json.
    pub train_path: PathBuf,
    pub val_path: PathBuf,
    pub meta_path: PathBuf,
}

/// Tokenizes the UTF-8 file `input` and writes `train.bin`, `val.bin` and
/// `meta.json` into `out_dir` (created if needed). The first
/// `n - round(n * val_fraction)` tokens go to train, the rest to val.
///
/// Token files are `uint16` when the vocabulary has at most 65536 ids (nanoGPT's format) and
/// `uint32` otherwise; meta.json's `dtype` says which. A Hugging Face tokenizer file is copied
/// unchanged into `out_dir` as `tokenizer.json`, and meta.json names that copy (with its
/// SHA-256), so the directory is self-contained.
///
/// Each file is written atomically (temp file, fsync, rename), so an
/// interrupted run never leaves a truncated file under a final name. An earlier meta.json is
/// removed first and the new one written last (after train, val, tokenizer.json): a directory
/// with meta.json always has complete files from one run, and a run that failed midway leaves
/// none, so the directory is refused until it is prepared again.
pub fn prepare(input: &Path, spec: &TokenizerSpec, out_dir: &Path, val_fraction: f64) -> Result<PrepareSummary> {
    check_val_fraction(val_fraction)?;
    // The tokenizer file first: a wrong path is reported before a large text is read.
    let hf = match spec {
        TokenizerSpec::Hf(path) => Some(Tokenizer::hf(path)?),
        _ => None,
    };
    let text = read_text(input).map_err(|e| match e {
        DataError::PathNotFound { path } => DataError::InputNotFound { path },
        e => e,
    })?;
    if text.is_empty() {
        return Err(DataError::EmptyInput { path: input.to_owned() });
    }
    let tokenizer = match hf {
        Some(t) => t,
        None => Tokenizer::for_text(spec, &text)?,
    };
    let tokens = tokenizer.encode(&text)?;
    drop(text);
    let dtype = TokenDtype::for_vocab(tokenizer.vocab_size());
    let cut = split_point(tokens.len(), val_fraction);
    let (train, val) = tokens.split_at(cut);

    std::fs::create_dir_all(out_dir).map_err(|e| DataError::io("create directory", out_dir, e))?;
    // An earlier run's meta.json goes first: if a write below fails, the directory has no
    // meta.json (and is refused as unprepared) instead of describing a mix of two runs' files.
    let old_meta = out_dir.join(crate::meta::META_FILE);
    match std::fs::remove_file(&old_meta) {
        Ok(()) => std::fs::File::open(out_dir).and_then(|d| d.sync_all()).map_err(|e| DataError::io("sync", out_dir, e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(DataError::io("remove", &old_meta, e)),
    }
    let train_path = out_dir.join(TRAIN_FILE);
    let val_path = out_dir.join(VAL_FILE);
    write_tokens_atomic(&train_path, train, dtype)?;
    write_tokens_atomic(&val_path, val, dtype)?;
    if let Tokenizer::Hf(t) = &tokenizer {
        write_atomic(&out_dir.join(HF_TOKENIZER_FILE), t.json())?;
    }
    let meta_path = Meta::for_prepared(&tokenizer, dtype).write(out_dir)?;

    Ok(PrepareSummary {
        tokenizer: tokenizer.kind(),
        vocab_size: tokenizer.vocab_size(),
        dtype,
        train_tokens: train.len(),
        val_tokens: val.len(),
        train_path,
        val_path,
        meta_path,
    })
}

/// Index where val starts: `n_tokens - round(n_tokens * val_fraction)`.
///
/// Rounding the val count (rather than flooring `n * (1 - f)`) avoids
/// floating-point surprises like `100 * 0.7 = 69.999…`.
pub fn split_point(n_tokens: usize, val_fraction: f64) -> usize {
    let n_val = (n_tokens as f64 * val_fraction).round() as usize;
    n_tokens - n_val.min(n_tokens)
}

/// `val_fraction` must lie strictly between 0 and 1 (both splits non-empty).
pub(crate) fn check_val_fraction(val_fraction: f64) -> Result<()> {
    if val_fraction > 0.0 && val_fraction < 1.0 {
        Ok(())
    } else {
        Err(DataError::InvalidValFraction { value: val_fraction })
    }
}

/// Reads a whole UTF-8 text file with user-facing errors.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DataError::PathNotFound { path: path.to_owned() },
        _ => DataError::io("read", path, e),
    })?;
    String::from_utf8(bytes).map_err(|e| DataError::NotUtf8 { path: path.to_owned(), offset: e.utf8_error().valid_up_to() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_point_rounds_val_count() {
        assert_eq!(split_point(10, 0.1), 9);
        assert_eq!(split_point(100, 0.3), 70);
        assert_eq!(split_point(1, 0.1), 1); // val gets round(0.1) = 0 tokens
        assert_eq!(split_point(0, 0.5), 0);
    }

    #[test]
    fn val_fraction_must_be_open_unit_interval() {
        for bad in [0.0, 1.0, -0.1, 1.5, f64::NAN] {
            let msg = check_val_fraction(bad).unwrap_err().to_string();
            assert!(msg.contains("val_fraction"), "{msg}");
        }
        assert!(check_val_fraction(0.1).is_ok());
    }

    #[test]
    fn writes_bins_of_two_bytes_per_token() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.txt");
        let text = "abcdefghij".repeat(10); // 100 chars
        std::fs::write(&input, &text).unwrap();
        let out = dir.path().join("out/nested");
        let s = prepare(&input, &TokenizerSpec::Char, &out, 0.1).unwrap();
        assert_eq!((s.train_tokens, s.val_tokens, s.vocab_size, s.dtype), (90, 10, 10, TokenDtype::Uint16));
        assert_eq!(std::fs::metadata(&s.train_path).unwrap().len(), 180);
        assert_eq!(std::fs::metadata(&s.val_path).unwrap().len(), 20);
        // Only the three final files, no temp leftovers.
        let mut names: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["meta.json", "train.bin", "val.bin"]);
        // Bytes are the little-endian ids: 'a' -> 0, 'b' -> 1.
        let bytes = std::fs::read(&s.train_path).unwrap();
        assert_eq!(&bytes[..4], &[0, 0, 1, 0]);
    }

    /// A re-prepare that fails midway leaves no meta.json: the directory is refused as
    /// unprepared, never loaded as the new train.bin with the old val.bin and vocabulary.
    #[test]
    fn a_failed_re_prepare_leaves_no_mixed_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (dir.path().join("abc.txt"), dir.path().join("xyz.txt"));
        std::fs::write(&first, "abcabcabcabcabcabcabcabcabcabc").unwrap();
        std::fs::write(&second, "xyzzyxxyzzyxxyzzyxxyzzyxxyzzyx").unwrap();
        let out = dir.path().join("data");
        prepare(&first, &TokenizerSpec::Char, &out, 0.2).unwrap();
        assert!(crate::load(&out, &TokenizerSpec::Char, 4, 0.2).is_ok());
        // val.bin cannot be replaced (a directory stands in its place): the second run fails
        // after writing train.bin.
        std::fs::remove_file(out.join(VAL_FILE)).unwrap();
        std::fs::create_dir(out.join(VAL_FILE)).unwrap();
        std::fs::write(out.join(VAL_FILE).join("keep"), "x").unwrap();
        assert!(prepare(&second, &TokenizerSpec::Char, &out, 0.2).is_err());
        assert!(!out.join(crate::meta::META_FILE).exists());
        let err = crate::load(&out, &TokenizerSpec::Char, 4, 0.2).unwrap_err();
        assert!(matches!(err, DataError::MetaMissing { .. }), "{err}");
    }

    #[test]
    fn non_utf8_input_names_file() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("latin1.txt");
        std::fs::write(&input, b"caf\xe9 au lait").unwrap();
        let err = prepare(&input, &TokenizerSpec::Char, dir.path(), 0.1).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::NotUtf8 { offset: 3, .. }), "{msg}");
        assert!(msg.contains("latin1.txt") && msg.contains("UTF-8"), "{msg}");
    }

    #[test]
    fn missing_and_empty_input() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.txt");
        let err = prepare(&missing, &TokenizerSpec::Gpt2, dir.path(), 0.1).unwrap_err();
        assert!(matches!(err, DataError::InputNotFound { .. }) && err.to_string().contains("--input"), "{err}");
        assert!(err.to_string().contains("nope.txt"));
        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, "").unwrap();
        let err = prepare(&empty, &TokenizerSpec::Char, dir.path(), 0.1).unwrap_err();
        assert!(matches!(err, DataError::EmptyInput { .. }), "{err}");
    }

    #[test]
    fn wide_vocabulary_writes_uint32_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.txt");
        // 65537 distinct chars, then some repeats: ids up to 65536 need four bytes each.
        let mut text: String = (0u32..0x11000).filter_map(char::from_u32).take(65537).collect();
        text.push_str("abc\u{10000}");
        std::fs::write(&input, &text).unwrap();
        let out = dir.path().join("wide");
        let s = prepare(&input, &TokenizerSpec::Char, &out, 0.1).unwrap();
        assert_eq!((s.vocab_size, s.dtype), (65537, TokenDtype::Uint32));
        let n = text.chars().count();
        assert_eq!(s.train_tokens + s.val_tokens, n);
        assert_eq!(std::fs::metadata(&s.train_path).unwrap().len(), 4 * s.train_tokens as u64);
        let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&s.meta_path).unwrap()).unwrap();
        assert_eq!(meta["dtype"], "uint32");
        let ds = crate::load(&out, &TokenizerSpec::Char, 4, 0.5).unwrap();
        let all: Vec<u32> = [ds.train.to_vec(), ds.val.to_vec()].concat();
        assert!(all.contains(&65536), "the widest id is stored whole");
        assert_eq!(ds.tokenizer.decode(&all), text);
    }

    #[test]
    fn hf_tokenizer_is_copied_and_named_in_meta() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.txt");
        std::fs::write(&input, "w1 w2 w3 w4 w5 w6 w7 w8 w9 w0 ".repeat(5)).unwrap();
        let tk = dir.path().join("elsewhere.json");
        let json = crate::hf::tests::word_level_json(&crate::hf::tests::words(10));
        std::fs::write(&tk, &json).unwrap();
        let out = dir.path().join("prepared");
        let s = prepare(&input, &TokenizerSpec::Hf(tk.clone()), &out, 0.2).unwrap();
        assert_eq!((s.tokenizer, s.vocab_size, s.dtype, s.train_tokens, s.val_tokens), (TokenizerKind::Hf, 12, TokenDtype::Uint16, 40, 10));
        assert_eq!(std::fs::read_to_string(out.join(HF_TOKENIZER_FILE)).unwrap(), json);
        let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&s.meta_path).unwrap()).unwrap();
        assert_eq!(meta["tokenizer"], "hf");
        assert_eq!(meta["tokenizer_file"], HF_TOKENIZER_FILE);
        assert_eq!(meta["tokenizer_sha256"], crate::hf::sha256_hex(json.as_bytes()));
        // The prepared directory no longer needs the original file, and can move.
        std::fs::remove_file(&tk).unwrap();
        let moved = dir.path().join("moved");
        std::fs::rename(&out, &moved).unwrap();
        let ds = crate::load(&moved, &TokenizerSpec::Char, 4, 0.5).unwrap();
        assert_eq!(ds.tokenizer.kind(), TokenizerKind::Hf);
        assert_eq!(ds.train.window(0, 4), vec![1, 2, 3, 4]);
    }

    #[test]
    fn missing_hf_tokenizer_is_named_before_the_text_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no_tokenizer.json");
        // The input is missing too: the tokenizer is what is reported.
        let err = prepare(&dir.path().join("no_input.txt"), &TokenizerSpec::Hf(missing), dir.path(), 0.1).unwrap_err();
        assert!(matches!(err, DataError::TokenizerMissing { .. }), "{err}");
        assert!(err.to_string().contains("no_tokenizer.json"), "{err}");
        assert!(!dir.path().join(crate::META_FILE).exists());
    }
}
