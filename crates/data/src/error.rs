//! Errors of the data crate.
//!
//! Every variant renders as ONE line that says what is wrong and what to
//! change. These lines are shown to end users verbatim, so they never contain
//! Debug dumps of structs, and paths are printed with `Path::display`.

use std::io;
use std::path::PathBuf;

use crate::sampler::Split;
use crate::tokens::TokenDtype;

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

    /// `prepare`'s input text file does not exist.
    #[error("input file {} does not exist: give `fabbrica prepare --input` a UTF-8 text file", .path.display())]
    InputNotFound { path: PathBuf },

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

    /// A token file's size is not a whole number of tokens of meta.json's `dtype`.
    #[error(
        "{} has {bytes} bytes, not a multiple of {}, so it is not a {dtype} token file (meta.json's dtype): \
         re-create it with `fabbrica prepare`",
        .path.display(), .dtype.width()
    )]
    BadLength { path: PathBuf, bytes: u64, dtype: TokenDtype },

    /// A token file holds an id the tokenizer of meta.json cannot produce.
    #[error(
        "{} holds token id {token} at index {index}, but the vocabulary has only {vocab_size} ids: \
         the file was made with a different tokenizer or meta.json is wrong; re-run `fabbrica prepare`",
        .path.display()
    )]
    TokenOutOfRange { path: PathBuf, index: usize, token: u32, vocab_size: usize },

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

    /// A tokenizer name that is neither `char`, `gpt2` nor `hf:PATH`.
    #[error("unknown tokenizer \"{name}\": valid tokenizers are char, gpt2 and hf:PATH/tokenizer.json (a Hugging Face tokenizer file)")]
    UnknownTokenizer { name: String },

    /// A vocabulary with more ids than fabbrica supports ([`crate::MAX_VOCAB`]).
    #[error("the {what} has {size} token ids, more than the {} fabbrica supports: use a smaller vocabulary", crate::MAX_VOCAB)]
    VocabTooLarge { what: &'static str, size: usize },

    /// A Hugging Face tokenizer file that does not exist.
    #[error(
        "Hugging Face tokenizer file {} does not exist: give the path of a tokenizer.json \
         (data.tokenizer = \"hf:PATH/tokenizer.json\"), or re-run `fabbrica prepare` if meta.json names it",
        .path.display()
    )]
    TokenizerMissing { path: PathBuf },

    /// A Hugging Face tokenizer file larger than [`crate::MAX_TOKENIZER_FILE_BYTES`].
    #[error(
        "{} has {bytes} bytes, more than the {max} a Hugging Face tokenizer.json may have: give the tokenizer.json itself, \
         not a model or data file",
        .path.display()
    )]
    TokenizerTooLarge { path: PathBuf, bytes: u64, max: u64 },

    /// A file that `tokenizers` cannot load as a tokenizer.
    #[error("{} is not a valid Hugging Face tokenizer.json: {reason}; give the tokenizer.json saved by `tokenizers` or `transformers`", .path.display())]
    TokenizerInvalid { path: PathBuf, reason: String },

    /// The Hugging Face tokenizer failed on some text.
    #[error("the Hugging Face tokenizer {} cannot encode the text: {reason}", .path.display())]
    TokenizerFailed { path: PathBuf, reason: String },

    /// A tokenizer file whose content is not the one meta.json (or a checkpoint) was made with.
    #[error(
        "{} has changed since the data were tokenized with it (SHA-256 {found}, expected {expected}): \
         restore that file or re-run `fabbrica prepare`",
        .path.display()
    )]
    TokenizerChanged { path: PathBuf, expected: String, found: String },

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
            DataError::InputNotFound { path: "x".into() },
            DataError::io("read", "x", io::Error::other("boom")),
            DataError::UnknownChar { ch: '\n', vocab_size: 3 },
            DataError::SplitTooShort { split: Split::Val, path: "d".into(), tokens: 3, needed: 9 },
            DataError::BadLength { path: "t.bin".into(), bytes: 7, dtype: TokenDtype::Uint32 },
            DataError::VocabTooLarge { what: "text", size: 1 << 25 },
            DataError::TokenizerMissing { path: "tokenizer.json".into() },
            DataError::TokenizerTooLarge { path: "tokenizer.json".into(), bytes: 1 << 30, max: 1 << 26 },
            DataError::TokenizerInvalid { path: "tokenizer.json".into(), reason: "expected value at line 1 column 1".into() },
            DataError::TokenizerChanged { path: "tokenizer.json".into(), expected: "ab".into(), found: "cd".into() },
        ];
        for e in errors {
            let s = e.to_string();
            assert!(!s.contains('\n'), "multi-line message: {s}");
        }
        let s = DataError::UnknownChar { ch: '\n', vocab_size: 3 }.to_string();
        assert!(s.contains(r"'\n' (U+000A)"), "{s}");
    }
}
