//! Errors of the data crate.
//!
//! Every variant renders as ONE line that says what is wrong and what to
//! change. These lines are shown to end users verbatim, so they never contain
//! Debug dumps of structs, and paths are printed with `Path::display`.

use std::io;
use std::path::PathBuf;

use crate::sampler::Split;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, DataError>;

/// Everything that can go wrong while preparing or loading data.
#[derive(thiserror::Error, Debug)]
pub enum DataError {
    /// The dataset path given by the user does not exist.
    #[error(
        "data path {} does not exist: give a directory made by `fabbrica prepare` \
         (train.bin, val.bin, meta.json) or a UTF-8 text file",
        .path.display()
    )]
    PathNotFound { path: PathBuf },

    /// A token file (train.bin / val.bin) is missing from a prepared directory.
    #[error(
        "token file {} does not exist: run `fabbrica prepare` to create train.bin, val.bin and meta.json",
        .path.display()
    )]
    TokenFileMissing { path: PathBuf },

    /// An I/O operation failed; `action` is a short verb phrase ("read", "write", ...).
    #[error("cannot {action} {}: {source}; check the path, its permissions and free disk space", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A token file has an odd number of bytes, so it cannot be flat uint16.
    #[error(
        "{} has {bytes} bytes, an odd count, so it is not a uint16 token file: \
         re-create it with `fabbrica prepare`",
        .path.display()
    )]
    OddLength { path: PathBuf, bytes: u64 },

    /// A token file holds an id the tokenizer of meta.json cannot produce.
    #[error(
        "{} holds token id {token} at index {index}, but the vocabulary has only {vocab_size} ids: \
         the file was made with a different tokenizer or meta.json is wrong; re-run `fabbrica prepare`",
        .path.display()
    )]
    TokenOutOfRange { path: PathBuf, index: usize, token: u16, vocab_size: usize },

    /// An input text file is not valid UTF-8.
    #[error(
        "{} is not valid UTF-8 (first bad byte at offset {offset}): convert the file to UTF-8 text",
        .path.display()
    )]
    NotUtf8 { path: PathBuf, offset: usize },

    /// The input text file is empty.
    #[error("{} is empty: give a text file with some training text", .path.display())]
    EmptyInput { path: PathBuf },

    /// The char tokenizer was asked to encode a character outside its vocabulary.
    #[error(
        "character '{}' (U+{:04X}) is not in the char vocabulary of {vocab_size} characters: \
         use only characters from the training text, or re-run `fabbrica prepare` on text that contains it",
        .ch.escape_debug(), u32::from(*.ch)
    )]
    UnknownChar { ch: char, vocab_size: usize },

    /// A tokenizer name that is neither `char` nor `gpt2`.
    #[error("unknown tokenizer \"{name}\": valid tokenizers are char, gpt2")]
    UnknownTokenizer { name: String },

    /// The char vocabulary does not fit uint16 token ids.
    #[error(
        "the text has {size} distinct characters, more than the 65536 ids a uint16 token file can hold: \
         use the gpt2 tokenizer"
    )]
    VocabTooLarge { size: usize },

    /// A prepared directory lacks meta.json.
    #[error(
        "{} does not exist: the directory was not made by `fabbrica prepare`; re-run it to create meta.json",
        .path.display()
    )]
    MetaMissing { path: PathBuf },

    /// meta.json exists but cannot be parsed or is inconsistent.
    #[error("{} is malformed: {reason}; re-run `fabbrica prepare` to rewrite it", .path.display())]
    MetaInvalid { path: PathBuf, reason: String },

    /// A split is too short to provide even one (x, y) block pair.
    #[error(
        "{split} split of {} has {tokens} tokens, fewer than one block (block_size+1 = {needed}): \
         give more text or lower model.block_size",
        .path.display()
    )]
    SplitTooShort { split: Split, path: PathBuf, tokens: usize, needed: usize },

    /// The validation fraction is outside (0, 1).
    #[error("val_fraction is {value}, but it must be greater than 0 and less than 1 (e.g. 0.1)")]
    InvalidValFraction { value: f64 },
}

impl DataError {
    /// Convenience constructor for [`DataError::Io`].
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        DataError::Io { action, path: path.into(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every message is a single line (shown verbatim to users).
    #[test]
    fn messages_are_one_line() {
        let errors = vec![
            DataError::PathNotFound { path: "x".into() },
            DataError::io("read", "x", io::Error::other("boom")),
            DataError::UnknownChar { ch: '\n', vocab_size: 3 },
            DataError::SplitTooShort { split: Split::Val, path: "d".into(), tokens: 3, needed: 9 },
        ];
        for e in errors {
            let s = e.to_string();
            assert!(!s.contains('\n'), "multi-line message: {s}");
        }
        let s = DataError::UnknownChar { ch: '\n', vocab_size: 3 }.to_string();
        assert!(s.contains(r"'\n' (U+000A)"), "{s}");
    }
}
