//! Hugging Face tokenizer files (`tokenizer.json`) through Hugging Face's own `tokenizers` crate,
//! the library behind `transformers`' fast tokenizers, so ids are the ones Python produces.
//!
//! * The file is read with a size bound ([`MAX_TOKENIZER_FILE_BYTES`]) and identified by the
//!   SHA-256 of its bytes: meta.json and checkpoints record that hash, so data tokenized with one
//!   file are never silently read with another.
//! * [`HfTokenizer::encode`] is `tokenizer.encode(text, add_special_tokens=True).ids` in Python:
//!   the file's post-processor adds what it says (Llama 3: `<|begin_of_text|>` first; GPT-2:
//!   nothing), and special tokens written in the text are matched as such. Truncation and padding
//!   settings in the file are dropped: a corpus is one long sequence.
//! * The vocabulary size is the largest id plus one (model vocabulary and added tokens).
//! * The end-of-text token is the file's special added token with one of the usual names
//!   ([`EOT_NAMES`]); a `tokenizer.json` has no field that says which one it is.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};
use crate::tokenizer::MAX_VOCAB;

/// Largest tokenizer.json read. Real ones are far below: GPT-2's is 1.4 MB, Llama 3's 9 MB,
/// Gemma 3's (262k tokens) 33 MB.
pub const MAX_TOKENIZER_FILE_BYTES: u64 = 128 << 20;

/// Special-token contents taken as end-of-text, in order of preference: GPT-2 and Qwen, Llama 3,
/// Llama 2 / Mistral, Gemma.
pub const EOT_NAMES: [&str; 4] = ["<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"];

/// A loaded Hugging Face tokenizer. Cloning is cheap (shared); two are equal when their files
/// have the same bytes.
#[derive(Clone)]
pub struct HfTokenizer(Arc<Inner>);

struct Inner {
    tokenizer: tokenizers::Tokenizer,
    /// Absolute path of the file it was read from.
    path: PathBuf,
    /// The file's bytes, kept so that `prepare` (and an export) can copy it unchanged.
    json: Vec<u8>,
    /// Lowercase hex SHA-256 of `json`.
    sha256: String,
    vocab_size: usize,
    eot: Option<u32>,
}

impl HfTokenizer {
    /// Reads and parses `path` (at most [`MAX_TOKENIZER_FILE_BYTES`]).
    ///
    /// A missing file is [`DataError::TokenizerMissing`], an oversized one
    /// [`DataError::TokenizerTooLarge`], one `tokenizers` rejects [`DataError::TokenizerInvalid`];
    /// each names `path` on one line.
    pub fn from_file(path: &Path) -> Result<HfTokenizer> {
        let json = read_bounded(path)?;
        // Absolute, so that a checkpoint's record of it does not depend on the working directory.
        let path = std::fs::canonicalize(path).or_else(|_| std::path::absolute(path)).unwrap_or_else(|_| path.to_owned());
        Self::from_bytes(path, json)
    }

    /// Parses `json`, the content of the file at `path` (named in errors).
    fn from_bytes(path: PathBuf, json: Vec<u8>) -> Result<HfTokenizer> {
        let invalid = |reason: String| DataError::TokenizerInvalid { path: path.clone(), reason: one_line(&reason) };
        let mut tokenizer = tokenizers::Tokenizer::from_bytes(&json).map_err(|e| invalid(e.to_string()))?;
        // A corpus is one sequence: a max_length or padding saved with the file must not cut or pad it.
        tokenizer.with_truncation(None).map_err(|e| invalid(e.to_string()))?;
        tokenizer.with_padding(None);
        let vocab_size = tokenizer.get_vocab(true).into_values().max().map_or(0, |m| m as usize + 1);
        if vocab_size == 0 {
            return Err(invalid("its vocabulary is empty".into()));
        }
        if vocab_size > MAX_VOCAB {
            return Err(DataError::VocabTooLarge { what: "Hugging Face tokenizer", size: vocab_size });
        }
        let specials: Vec<(u32, String)> =
            tokenizer.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(id, t)| (id, t.content)).collect();
        let eot = EOT_NAMES.iter().find_map(|name| specials.iter().filter(|(_, c)| c == name).map(|(id, _)| *id).min());
        let sha256 = sha256_hex(&json);
        Ok(HfTokenizer(Arc::new(Inner { tokenizer, path, json, sha256, vocab_size, eot })))
    }

    /// Absolute path of the file this was read from.
    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// The file's bytes, unchanged.
    pub fn json(&self) -> &[u8] {
        &self.0.json
    }

    /// Lowercase hex SHA-256 of the file's bytes.
    pub fn sha256(&self) -> &str {
        &self.0.sha256
    }

    /// Number of ids: the largest id of the vocabulary (added tokens included) plus one.
    pub fn vocab_size(&self) -> usize {
        self.0.vocab_size
    }

    /// The end-of-text token, if the file has a special token named as one ([`EOT_NAMES`]).
    pub fn eot(&self) -> Option<u32> {
        self.0.eot
    }

    /// Encodes `text` as Python's `tokenizer.encode(text).ids` does (special tokens of the
    /// post-processor added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .0
            .tokenizer
            .encode_fast(text, true)
            .map_err(|e| DataError::TokenizerFailed { path: self.0.path.clone(), reason: one_line(&e.to_string()) })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes `ids` (special tokens kept). Never panics: an id outside the vocabulary becomes
    /// U+FFFD, and so does a run of ids the decoder rejects.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        let known = |id: u32| (id as usize) < self.0.vocab_size && self.0.tokenizer.id_to_token(id).is_some();
        let mut start = 0;
        for (i, &id) in ids.iter().enumerate() {
            if !known(id) {
                self.decode_run(&ids[start..i], &mut out);
                out.push('\u{FFFD}');
                start = i + 1;
            }
        }
        self.decode_run(&ids[start..], &mut out);
        out
    }

    /// Appends the decoding of `ids` (all in the vocabulary) to `out`.
    fn decode_run(&self, ids: &[u32], out: &mut String) {
        if ids.is_empty() {
            return;
        }
        match self.0.tokenizer.decode(ids, false) {
            Ok(s) => out.push_str(&s),
            Err(_) => out.push('\u{FFFD}'),
        }
    }
}

impl fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HfTokenizer({}, vocab {}, sha256 {})", self.0.path.display(), self.0.vocab_size, self.0.sha256)
    }
}

impl PartialEq for HfTokenizer {
    /// The same file content is the same tokenizer, wherever it was read from.
    fn eq(&self, other: &Self) -> bool {
        self.0.sha256 == other.0.sha256
    }
}

impl Eq for HfTokenizer {}

/// The bytes of `path`, refusing a file over [`MAX_TOKENIZER_FILE_BYTES`] before reading it
/// (and one that grows past it while being read).
pub(crate) fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    let file = crate::bounded::open_regular(path).map_err(|e| match e {
        e if e.is_not_found() => DataError::TokenizerMissing { path: path.to_owned() },
        crate::bounded::ReadError::Io(e) => DataError::io("read", path, e),
        e => DataError::TokenizerInvalid { path: path.to_owned(), reason: e.to_string() },
    })?;
    let meta = file.metadata().map_err(|e| DataError::io("read", path, e))?;
    let max = MAX_TOKENIZER_FILE_BYTES;
    if meta.len() > max {
        return Err(DataError::TokenizerTooLarge { path: path.to_owned(), bytes: meta.len(), max });
    }
    let mut json = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1).read_to_end(&mut json).map_err(|e| DataError::io("read", path, e))?;
    if json.len() as u64 > max {
        return Err(DataError::TokenizerTooLarge { path: path.to_owned(), bytes: json.len() as u64, max });
    }
    Ok(json)
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `bytes`, lowercase hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// `s` on one line: control characters (line breaks included) escaped.
pub(crate) fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A WordLevel tokenizer.json splitting on whitespace: `words` get ids `0..`, `[UNK]` the
    /// next id, then the special `<|endoftext|>`; decoding joins words with spaces.
    pub(crate) fn word_level_json(words: &[String]) -> String {
        let mut vocab = serde_json::Map::new();
        for (i, w) in words.iter().enumerate() {
            vocab.insert(w.clone(), i.into());
        }
        let unk = words.len();
        vocab.insert("[UNK]".into(), unk.into());
        let eot = unk + 1;
        serde_json::json!({
            "version": "1.0",
            "truncation": {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0},
            "padding": null,
            "added_tokens": [
                {"id": eot, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
        })
        .to_string()
    }

    pub(crate) fn words(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("w{i}")).collect()
    }

    fn write(dir: &Path, json: &str) -> PathBuf {
        let p = dir.join("tokenizer.json");
        std::fs::write(&p, json).unwrap();
        p
    }

    #[test]
    fn word_level_encodes_decodes_and_finds_eot() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), &word_level_json(&words(10)));
        let t = HfTokenizer::from_file(&p).unwrap();
        assert_eq!(t.vocab_size(), 12); // w0..w9, [UNK], <|endoftext|>
        assert_eq!(t.eot(), Some(11));
        assert!(t.path().is_absolute());
        assert_eq!(t.sha256(), sha256_hex(&std::fs::read(&p).unwrap()));
        // The file's truncation (max_length 4) is ignored: all 6 words come back.
        assert_eq!(t.encode("w3 w1 w4 w1 w5 w9").unwrap(), vec![3, 1, 4, 1, 5, 9]);
        assert_eq!(t.encode("w2 zz<|endoftext|>w7").unwrap(), vec![2, 10, 11, 7]);
        assert_eq!(t.decode(&[3, 1, 4]), "w3 w1 w4");
        // Unknown ids are U+FFFD, wherever they are.
        assert_eq!(t.decode(&[12, 3, u32::MAX, 1, 99]), "\u{FFFD}w3\u{FFFD}w1\u{FFFD}");
        assert_eq!(t.decode(&[]), "");
        // Same bytes elsewhere: an equal tokenizer.
        let other = tempfile::tempdir().unwrap();
        assert_eq!(HfTokenizer::from_file(&write(other.path(), &word_level_json(&words(10)))).unwrap(), t);
        assert_ne!(HfTokenizer::from_file(&write(other.path(), &word_level_json(&words(11)))).unwrap(), t);
    }

    #[test]
    fn bad_files_are_one_line_errors_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope/tokenizer.json");
        let err = HfTokenizer::from_file(&missing).unwrap_err();
        assert!(matches!(err, DataError::TokenizerMissing { .. }), "{err}");
        assert!(err.to_string().contains("nope/tokenizer.json"), "{err}");

        for (json, needle) in [
            ("{\"version\": \"1.0\", ", "EOF"),
            ("[1, 2, 3]", "tokenizer.json"),
            ("{\"model\": {\"type\": \"NoSuchModel\"}}", "tokenizer.json"),
            ("\u{0}\u{1}binary\n\nbytes", "tokenizer.json"),
        ] {
            let p = write(dir.path(), json);
            let err = HfTokenizer::from_file(&p).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, DataError::TokenizerInvalid { .. }), "{json}: {msg}");
            assert!(msg.contains(&p.display().to_string()) && msg.contains(needle), "{json}: {msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
        let err = HfTokenizer::from_file(dir.path()).unwrap_err();
        assert!(matches!(err, DataError::TokenizerInvalid { .. }), "{err}");
    }

    #[test]
    fn oversized_file_is_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        // Sparse: the size is checked before any byte is read.
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(MAX_TOKENIZER_FILE_BYTES + 1).unwrap();
        let err = HfTokenizer::from_file(&p).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::TokenizerTooLarge { .. }), "{msg}");
        assert!(msg.contains("tokenizer.json") && msg.contains(&MAX_TOKENIZER_FILE_BYTES.to_string()), "{msg}");
    }
}
