//! Loading a dataset: a prepared directory or a raw UTF-8 text file.

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::meta::{Meta, META_FILE};
use crate::prepare::{check_val_fraction, read_text, split_point, TRAIN_FILE, VAL_FILE};
use crate::sampler::Split;
use crate::tokenizer::{Tokenizer, TokenizerSpec};
use crate::tokens::{TokenFile, TokenSource};

/// Tokenizer plus train and val token streams, each with at least
/// `block_size + 1` tokens (so the sampler can always draw a window).
#[derive(Debug)]
pub struct Dataset {
    /// What `load` was given.
    pub path: PathBuf,
    pub tokenizer: Tokenizer,
    pub train: TokenSource,
    pub val: TokenSource,
}

impl Dataset {
    /// The token stream of `split`.
    pub fn source(&self, split: Split) -> &TokenSource {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }
}

/// Loads `path`:
///
/// * a directory made by `prepare`: `meta.json` gives the tokenizer and the
///   token type, and `train.bin`/`val.bin` are memory-mapped and validated
///   against its vocab (`text_tokenizer` and `val_fraction` are ignored);
/// * a UTF-8 text file: tokenized in memory with `text_tokenizer` (char:
///   vocabulary from the whole file) and split like `prepare`.
///
/// Each split must hold at least `block_size + 1` tokens.
pub fn load(path: &Path, text_tokenizer: &TokenizerSpec, block_size: usize, val_fraction: f64) -> Result<Dataset> {
    let metadata = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DataError::PathNotFound { path: path.to_owned() },
        _ => DataError::io("read", path, e),
    })?;
    let dataset = if metadata.is_dir() { load_dir(path)? } else { load_text(path, text_tokenizer, val_fraction)? };
    // Saturating: block_size = usize::MAX must be refused, not wrap to 0 and pass.
    let needed = block_size.saturating_add(1);
    for split in [Split::Train, Split::Val] {
        let source = dataset.source(split);
        if source.len() < needed {
            // Name the .bin file for prepared data, the text file otherwise.
            let path = match source {
                TokenSource::Mapped(f) => f.path().to_owned(),
                TokenSource::Owned(_) => path.to_owned(),
            };
            return Err(DataError::SplitTooShort { split, path, tokens: source.len(), needed });
        }
    }
    Ok(dataset)
}

/// Prepared directory: meta.json + two mapped token files.
fn load_dir(dir: &Path) -> Result<Dataset> {
    let (meta, tokenizer) = Meta::read_with_tokenizer(&dir.join(META_FILE))?;
    let vocab = tokenizer.vocab_size();
    let train = TokenFile::open(&dir.join(TRAIN_FILE), vocab, meta.dtype())?;
    let val = TokenFile::open(&dir.join(VAL_FILE), vocab, meta.dtype())?;
    Ok(Dataset { path: dir.to_owned(), tokenizer, train: train.into(), val: val.into() })
}

/// Raw text file: tokenize in memory and split.
fn load_text(path: &Path, spec: &TokenizerSpec, val_fraction: f64) -> Result<Dataset> {
    check_val_fraction(val_fraction)?;
    let text = read_text(path)?;
    let tokenizer = Tokenizer::for_text(spec, &text)?;
    let mut train = tokenizer.encode(&text)?;
    let val = train.split_off(split_point(train.len(), val_fraction));
    Ok(Dataset { path: path.to_owned(), tokenizer, train: train.into(), val: val.into() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepare::prepare;

    const TEXT: &str = "To be, or not to be, that is the question:\n\
                        Whether 'tis nobler in the mind to suffer\n";

    fn text_file(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("input.txt");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn prepared_dir_reloads_identically_to_text() {
        for kind in &TokenizerSpec::BUILTIN {
            let dir = tempfile::tempdir().unwrap();
            let input = text_file(dir.path(), TEXT);
            let out = dir.path().join("prepared");
            let s = prepare(&input, kind, &out, 0.2).unwrap();

            let from_dir = load(&out, &TokenizerSpec::Char, 2, 0.5).unwrap();
            let from_text = load(&input, kind, 2, 0.2).unwrap();
            assert!(matches!(from_dir.train, TokenSource::Mapped(_)));
            assert!(matches!(from_text.train, TokenSource::Owned(_)));
            assert_eq!(from_dir.tokenizer, from_text.tokenizer);
            assert_eq!(from_dir.tokenizer.kind(), kind.kind());
            assert_eq!(from_dir.train.to_vec(), from_text.train.to_vec());
            assert_eq!(from_dir.val.to_vec(), from_text.val.to_vec());
            assert_eq!(from_dir.train.len(), s.train_tokens);
            assert_eq!(from_dir.val.len(), s.val_tokens);

            // Train followed by val decodes back to the original text.
            let all: Vec<u32> = [from_dir.train.to_vec(), from_dir.val.to_vec()].concat();
            assert_eq!(from_dir.tokenizer.decode(&all), TEXT);
            assert_eq!(from_dir.source(Split::Val).window(0, 3), from_dir.val.window(0, 3));
        }
    }

    #[test]
    fn missing_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("no_such_data");
        let err = load(&p, &TokenizerSpec::Char, 8, 0.1).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::PathNotFound { .. }), "{msg}");
        assert!(msg.contains("no_such_data"), "{msg}");
    }

    #[test]
    fn text_shorter_than_a_block() {
        let dir = tempfile::tempdir().unwrap();
        // 20 chars, val 0.5: 10 tokens each, block_size 10 needs 11.
        let input = text_file(dir.path(), "abcdefghijklmnopqrst");
        let err = load(&input, &TokenizerSpec::Char, 10, 0.5).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::SplitTooShort { split: Split::Train, tokens: 10, needed: 11, .. }), "{msg}");
        assert_eq!(
            msg,
            format!(
                "train split of {} has 10 tokens, fewer than one block (block_size+1 = 11): \
                 give more text or lower model.block_size",
                input.display()
            )
        );
        // A block size with no room for +1 is too long for any text (found by fuzzing: it
        // wrapped to "needs 0 tokens" and loaded).
        let err = load(&input, &TokenizerSpec::Char, usize::MAX, 0.5).unwrap_err();
        assert!(matches!(err, DataError::SplitTooShort { split: Split::Train, tokens: 10, .. }), "{err}");
        // block_size 9 needs exactly 10: fits.
        assert!(load(&input, &TokenizerSpec::Char, 9, 0.5).is_ok());
        // Val too short (train is long enough).
        let err = load(&input, &TokenizerSpec::Char, 9, 0.1).unwrap_err();
        assert!(matches!(err, DataError::SplitTooShort { split: Split::Val, tokens: 2, .. }), "{err}");
    }

    #[test]
    fn prepared_split_too_short_names_bin() {
        let dir = tempfile::tempdir().unwrap();
        let input = text_file(dir.path(), TEXT);
        prepare(&input, &TokenizerSpec::Char, dir.path(), 0.05).unwrap();
        let err = load(dir.path(), &TokenizerSpec::Char, 16, 0.1).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("val split of") && msg.contains("val.bin"), "{msg}");
    }

    #[test]
    fn token_beyond_vocab_in_prepared_dir() {
        let dir = tempfile::tempdir().unwrap();
        let input = text_file(dir.path(), TEXT);
        // GPT-2 ids are far beyond a char vocabulary: swap in a char meta.json.
        prepare(&input, &TokenizerSpec::Gpt2, dir.path(), 0.2).unwrap();
        let char_meta = Meta::for_tokenizer(&Tokenizer::char_from_text(TEXT).unwrap());
        char_meta.write(dir.path()).unwrap();
        let err = load(dir.path(), &TokenizerSpec::Char, 4, 0.1).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::TokenOutOfRange { .. }), "{msg}");
        assert!(msg.contains("train.bin") && msg.contains("meta.json is wrong"), "{msg}");
    }

    #[test]
    fn odd_length_bin_in_prepared_dir() {
        let dir = tempfile::tempdir().unwrap();
        let input = text_file(dir.path(), TEXT);
        prepare(&input, &TokenizerSpec::Char, dir.path(), 0.2).unwrap();
        std::fs::write(dir.path().join(VAL_FILE), [1u8, 0, 2]).unwrap();
        let err = load(dir.path(), &TokenizerSpec::Char, 4, 0.1).unwrap_err();
        assert!(matches!(err, DataError::BadLength { .. }), "{err}");
    }

    #[test]
    fn meta_missing_or_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let input = text_file(dir.path(), TEXT);
        prepare(&input, &TokenizerSpec::Char, dir.path(), 0.2).unwrap();
        let meta = dir.path().join(META_FILE);

        std::fs::write(&meta, "{\"tokenizer\": \"char\", ").unwrap();
        let err = load(dir.path(), &TokenizerSpec::Char, 4, 0.1).unwrap_err();
        assert!(matches!(err, DataError::MetaInvalid { .. }), "{err}");
        assert!(err.to_string().contains("meta.json"));

        std::fs::remove_file(&meta).unwrap();
        let err = load(dir.path(), &TokenizerSpec::Char, 4, 0.1).unwrap_err();
        assert!(matches!(err, DataError::MetaMissing { .. }), "{err}");
    }

    #[test]
    fn missing_bin_in_prepared_dir() {
        let dir = tempfile::tempdir().unwrap();
        let input = text_file(dir.path(), TEXT);
        prepare(&input, &TokenizerSpec::Char, dir.path(), 0.2).unwrap();
        std::fs::remove_file(dir.path().join(TRAIN_FILE)).unwrap();
        let err = load(dir.path(), &TokenizerSpec::Char, 4, 0.1).unwrap_err();
        assert!(matches!(err, DataError::TokenFileMissing { .. }), "{err}");
    }

    #[test]
    fn non_utf8_text() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.txt");
        std::fs::write(&p, [b'a', 0xff, b'b']).unwrap();
        let err = load(&p, &TokenizerSpec::Gpt2, 1, 0.1).unwrap_err();
        assert!(matches!(err, DataError::NotUtf8 { offset: 1, .. }), "{err}");
    }

    #[test]
    fn prepared_data_without_dtype_still_loads_as_uint16() {
        // A directory prepared before meta.json had "dtype" (or by nanoGPT): no dtype field.
        let dir = tempfile::tempdir().unwrap();
        let chars = Tokenizer::char_from_text(TEXT).unwrap();
        let ids = chars.encode(TEXT).unwrap();
        let bytes = |ids: &[u32]| ids.iter().flat_map(|&t| (t as u16).to_le_bytes()).collect::<Vec<u8>>();
        std::fs::write(dir.path().join(TRAIN_FILE), bytes(&ids[..60])).unwrap();
        std::fs::write(dir.path().join(VAL_FILE), bytes(&ids[60..])).unwrap();
        let Tokenizer::Char { chars: vocab } = &chars else { unreachable!() };
        let old = serde_json::json!({"tokenizer": "char", "vocab_size": vocab.len(), "chars": vocab.iter().collect::<String>()});
        std::fs::write(dir.path().join(META_FILE), old.to_string()).unwrap();
        let ds = load(dir.path(), &TokenizerSpec::Gpt2, 8, 0.1).unwrap();
        assert_eq!(ds.tokenizer, chars);
        assert!(matches!(&ds.train, TokenSource::Mapped(f) if f.dtype() == crate::TokenDtype::Uint16));
        assert_eq!([ds.train.to_vec(), ds.val.to_vec()].concat(), ids);
        // The same bytes declared uint32 are other tokens: here an odd count of 2-byte halves or ids
        // beyond the vocabulary, refused either way.
        let with_dtype =
            serde_json::json!({"tokenizer": "char", "vocab_size": vocab.len(), "dtype": "uint32", "chars": vocab.iter().collect::<String>()});
        std::fs::write(dir.path().join(META_FILE), with_dtype.to_string()).unwrap();
        let err = load(dir.path(), &TokenizerSpec::Char, 8, 0.1).unwrap_err();
        assert!(matches!(err, DataError::BadLength { .. } | DataError::TokenOutOfRange { .. }), "{err}");
    }
}
