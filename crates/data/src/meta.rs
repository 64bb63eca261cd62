//! `meta.json`: the tokenizer and token type stored beside `train.bin`/`val.bin`.
//!
//! Format (char):  `{"tokenizer": "char", "vocab_size": 65, "dtype": "uint16", "chars": "\n !$&',-.3:;?AB..."}`
//! Format (gpt2):  `{"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16"}`
//! Format (hf):    `{"tokenizer": "hf", "vocab_size": 128256, "dtype": "uint32",
//!                   "tokenizer_file": "tokenizer.json", "tokenizer_sha256": "…"}`
//!
//! `chars` lists the whole char vocabulary in id order (id = index), which is
//! sorted order, as in nanoGPT's shakespeare_char `itos`.
//!
//! `dtype` is the element type of the token files; a meta.json without one (every directory
//! prepared before it existed, and nanoGPT's) means `uint16`.
//!
//! `tokenizer_file` names the Hugging Face tokenizer.json. In a prepared directory it is a plain
//! file name in the directory holding meta.json (a path that leaves it is refused). `prepare` copies the tokenizer file into the prepared directory
//! and names that copy, so the directory is self-contained and can be moved. A checkpoint's copy
//! of this description (built by [`Meta::for_tokenizer`]) names the absolute path the tokenizer
//! was loaded from, and must carry `tokenizer_sha256`. Where present, `tokenizer_sha256` pins the
//! file's content: a changed file is an error, not silently different ids.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::hf::{one_line, HfTokenizer};
use crate::tokenizer::{Tokenizer, TokenizerKind, GPT2_VOCAB_SIZE, MAX_VOCAB};
use crate::tokens::TokenDtype;

/// File name of the metadata inside a prepared directory.
pub const META_FILE: &str = "meta.json";

/// File name of the Hugging Face tokenizer `prepare` copies into a prepared directory.
pub const HF_TOKENIZER_FILE: &str = "tokenizer.json";

/// Largest meta.json read: a char vocabulary of every Unicode scalar value is under 5 MB.
const MAX_META_BYTES: u64 = 64 << 20;

/// Parsed `meta.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub tokenizer: TokenizerKind,
    pub vocab_size: usize,
    /// Element type of the token files; `None` (absent) means `uint16`. Left out when writing a
    /// checkpoint's description of a vocabulary that fits `uint16`, so that descriptions (and the
    /// digests over them) are unchanged from before the field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<TokenDtype>,
    /// Char vocabulary in id order; present only for the char tokenizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chars: Option<String>,
    /// The Hugging Face tokenizer.json (hf only); relative to meta.json's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_file: Option<String>,
    /// Lowercase hex SHA-256 of that file's bytes (hf only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_sha256: Option<String>,
    /// Where this was read from, for error messages and relative paths (not serialized).
    #[serde(skip)]
    source: Option<PathBuf>,
}

/// A file name with no directory part: not empty, not `.` or `..`, no separator.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\\') && !name.contains('\0')
}

impl Meta {
    /// Metadata describing `tokenizer` (hf: by the absolute path it was read from). `dtype` is
    /// set only when the vocabulary needs `uint32`.
    pub fn for_tokenizer(tokenizer: &Tokenizer) -> Meta {
        let chars = match tokenizer {
            Tokenizer::Char { chars } => Some(chars.iter().collect()),
            _ => None,
        };
        let (tokenizer_file, tokenizer_sha256) = match tokenizer {
            Tokenizer::Hf(t) => (Some(t.path().to_string_lossy().into_owned()), Some(t.sha256().to_owned())),
            _ => (None, None),
        };
        let dtype = Some(TokenDtype::for_vocab(tokenizer.vocab_size())).filter(|&d| d != TokenDtype::Uint16);
        Meta { tokenizer: tokenizer.kind(), vocab_size: tokenizer.vocab_size(), dtype, chars, tokenizer_file, tokenizer_sha256, source: None }
    }

    /// What `prepare` writes: `dtype` always present, and an hf tokenizer named by its copy
    /// [`HF_TOKENIZER_FILE`] beside meta.json.
    pub(crate) fn for_prepared(tokenizer: &Tokenizer, dtype: TokenDtype) -> Meta {
        let mut meta = Meta::for_tokenizer(tokenizer);
        meta.dtype = Some(dtype);
        if meta.tokenizer_file.is_some() {
            meta.tokenizer_file = Some(HF_TOKENIZER_FILE.into());
        }
        meta
    }

    /// Element type of the token files (`uint16` when meta.json does not say).
    pub fn dtype(&self) -> TokenDtype {
        self.dtype.unwrap_or_default()
    }

    /// The Hugging Face tokenizer file this names, resolved: a relative name against the
    /// directory of the meta.json it was read from. `None` for other tokenizers.
    pub fn tokenizer_path(&self) -> Option<PathBuf> {
        let file = Path::new(self.tokenizer_file.as_deref()?);
        let dir = self.source.as_deref().and_then(Path::parent);
        Some(match dir {
            Some(dir) if file.is_relative() => dir.join(file),
            _ => file.to_owned(),
        })
    }

    /// Reads and validates `path` (the meta.json file itself; at most 64 MiB).
    ///
    /// Missing file: [`DataError::MetaMissing`]; bad JSON or an inconsistent
    /// description: [`DataError::MetaInvalid`] naming the path; an hf tokenizer file that is
    /// missing, invalid or changed: the error naming that file.
    pub fn read(path: &Path) -> Result<Meta> {
        Self::read_with_tokenizer(path).map(|(meta, _)| meta)
    }

    /// As [`Meta::read`], also returning the tokenizer it describes (built once: a large
    /// tokenizer.json takes a moment to parse).
    pub fn read_with_tokenizer(path: &Path) -> Result<(Meta, Tokenizer)> {
        let invalid = |reason: String| DataError::MetaInvalid { path: path.to_owned(), reason };
        let bytes = match crate::bounded::read(path, MAX_META_BYTES) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Err(DataError::MetaMissing { path: path.to_owned() }),
            Err(crate::bounded::ReadError::Io(e)) => return Err(DataError::io("read", path, e)),
            Err(e) => return Err(invalid(e.to_string())),
        };
        let text = String::from_utf8(bytes).map_err(|_| invalid("it is not UTF-8 text".into()))?;
        // serde quotes unknown names raw: a "\n" in one would break the message's line.
        let mut meta: Meta = serde_json::from_str(&text).map_err(|e| invalid(one_line(&e.to_string())))?;
        meta.source = Some(path.to_owned());
        // Validate eagerly so a broken file is reported at load time.
        let tokenizer = meta.tokenizer()?;
        Ok((meta, tokenizer))
    }

    /// Writes `meta.json` into `dir` atomically.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join(META_FILE);
        let mut json = serde_json::to_string_pretty(self).expect("Meta serializes");
        json.push('\n');
        crate::atomic::write_atomic(&path, json.as_bytes())?;
        Ok(path)
    }

    /// Builds the tokenizer this metadata describes, checking consistency
    /// (char: `chars` present, sorted, unique, count = vocab_size;
    /// gpt2: vocab_size = 50257; hf: the file loads, has the recorded SHA-256 and vocab_size;
    /// every kind: the vocabulary fits `dtype`).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let invalid = |reason: String| DataError::MetaInvalid { path: self.source.clone().unwrap_or_else(|| PathBuf::from(META_FILE)), reason };
        self.check().map_err(invalid)?;
        match self.tokenizer {
            TokenizerKind::Hf => {
                // check() made sure the file is named.
                let path = self.tokenizer_path().unwrap_or_default();
                let tok = HfTokenizer::from_file(&path)?;
                if let Some(expected) = &self.tokenizer_sha256 {
                    if tok.sha256() != expected.to_ascii_lowercase() {
                        return Err(DataError::TokenizerChanged { path, expected: expected.clone(), found: tok.sha256().to_owned() });
                    }
                }
                if tok.vocab_size() != self.vocab_size {
                    return Err(invalid(format!("vocab_size is {}, but {} has {} token ids", self.vocab_size, path.display(), tok.vocab_size())));
                }
                Ok(Tokenizer::Hf(tok))
            }
            TokenizerKind::Gpt2 => Ok(Tokenizer::gpt2()),
            TokenizerKind::Char => {
                let chars: Vec<char> = self.chars.as_deref().unwrap_or_default().chars().collect();
                Tokenizer::char_from_vocab(chars)
            }
        }
    }

    /// Consistency checks that need no file; `Err` is the human-readable reason.
    fn check(&self) -> std::result::Result<(), String> {
        if self.vocab_size == 0 || self.vocab_size > MAX_VOCAB {
            return Err(format!("vocab_size is {}, but it must be between 1 and {MAX_VOCAB}", self.vocab_size));
        }
        let dtype = self.dtype();
        if self.vocab_size > dtype.max_vocab() {
            return Err(format!(
                "vocab_size {} does not fit \"dtype\": \"{dtype}\" (at most {} ids); a larger vocabulary needs \"uint32\"",
                self.vocab_size,
                dtype.max_vocab()
            ));
        }
        if self.chars.is_some() && self.tokenizer != TokenizerKind::Char {
            return Err("\"chars\" is only valid with \"tokenizer\": \"char\"".into());
        }
        if (self.tokenizer_file.is_some() || self.tokenizer_sha256.is_some()) && self.tokenizer != TokenizerKind::Hf {
            return Err("\"tokenizer_file\" and \"tokenizer_sha256\" are only valid with \"tokenizer\": \"hf\"".into());
        }
        match self.tokenizer {
            TokenizerKind::Gpt2 if self.vocab_size != GPT2_VOCAB_SIZE => {
                Err(format!("gpt2 has vocab_size {GPT2_VOCAB_SIZE}, but it says {}", self.vocab_size))
            }
            TokenizerKind::Gpt2 => Ok(()),
            TokenizerKind::Hf => match self.tokenizer_file.as_deref() {
                None | Some("") => Err("\"tokenizer\": \"hf\" needs a \"tokenizer_file\" naming the tokenizer.json".into()),
                // Read from a prepared directory's meta.json: a file of that directory, never a
                // path that leaves it.
                Some(f) if self.source.is_some() && !is_plain_name(f) => Err(format!(
                    "\"tokenizer_file\" is {f:?}, but it must name a file in the directory of meta.json (a plain name such as \"{HF_TOKENIZER_FILE}\"): copy the tokenizer there"
                )),
                // A checkpoint's copy names the absolute path it was loaded from, so its content
                // must be pinned.
                Some(_) if self.source.is_none() && self.tokenizer_sha256.is_none() => {
                    Err("\"tokenizer_file\" comes without \"tokenizer_sha256\": a tokenizer outside a prepared directory must be pinned by its SHA-256".into())
                }
                Some(_) => Ok(()),
            },
            TokenizerKind::Char => {
                let chars: Vec<char> = self.chars.as_deref().ok_or("\"tokenizer\": \"char\" needs a \"chars\" string")?.chars().collect();
                if chars.len() != self.vocab_size {
                    return Err(format!("\"chars\" has {} characters, but vocab_size is {}", chars.len(), self.vocab_size));
                }
                if let Some(w) = chars.windows(2).find(|w| w[0] >= w[1]) {
                    return Err(format!(
                        "\"chars\" must be sorted with no repeats, but '{}' comes before '{}'",
                        w[0].escape_debug(),
                        w[1].escape_debug()
                    ));
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Meta> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(META_FILE);
        std::fs::write(&p, json).unwrap();
        Meta::read(&p)
    }

    #[test]
    fn round_trip_char_and_gpt2() {
        for tok in [Tokenizer::char_from_text("hello\n\"world\"").unwrap(), Tokenizer::gpt2()] {
            let dir = tempfile::tempdir().unwrap();
            let meta = Meta::for_tokenizer(&tok);
            let path = meta.write(dir.path()).unwrap();
            let back = Meta::read(&path).unwrap();
            assert_eq!(back.tokenizer().unwrap(), tok);
            assert_eq!(back.vocab_size, tok.vocab_size());
            assert_eq!(back.dtype(), TokenDtype::Uint16);
        }
    }

    #[test]
    fn json_shape() {
        let m = Meta::for_tokenizer(&Tokenizer::char_from_text("ba").unwrap());
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"tokenizer":"char","vocab_size":2,"chars":"ab"}"#);
        let m = Meta::for_tokenizer(&Tokenizer::gpt2());
        // A checkpoint's description of a uint16 vocabulary is what it was before dtype existed.
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"tokenizer":"gpt2","vocab_size":50257}"#);
        // What prepare writes says the dtype.
        let m = Meta::for_prepared(&Tokenizer::gpt2(), TokenDtype::Uint16);
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"tokenizer":"gpt2","vocab_size":50257,"dtype":"uint16"}"#);
    }

    #[test]
    fn missing_dtype_means_uint16_and_a_wide_vocab_needs_uint32() {
        let m = parse(r#"{"tokenizer":"char","vocab_size":2,"chars":"ab"}"#).unwrap();
        assert_eq!((m.dtype, m.dtype()), (None, TokenDtype::Uint16));
        let m = parse(r#"{"tokenizer":"char","vocab_size":2,"chars":"ab","dtype":"uint32"}"#).unwrap();
        assert_eq!(m.dtype(), TokenDtype::Uint32);
        // 65537 chars: the vocabulary needs uint32, so a missing or uint16 dtype is refused.
        let chars: String = (0u32..0x11000).filter_map(char::from_u32).take(65537).collect();
        let tok = Tokenizer::char_from_text(&chars).unwrap();
        let wide = Meta::for_tokenizer(&tok);
        assert_eq!(wide.dtype, Some(TokenDtype::Uint32));
        for dtype in [None, Some(TokenDtype::Uint16)] {
            let json = serde_json::to_string(&Meta { dtype, ..wide.clone() }).unwrap();
            let msg = parse(&json).unwrap_err().to_string();
            assert!(msg.contains("vocab_size 65537 does not fit") && msg.contains("uint16") && msg.contains(META_FILE), "{msg}");
        }
        assert_eq!(parse(&serde_json::to_string(&wide).unwrap()).unwrap().tokenizer().unwrap(), tok);
    }

    #[test]
    fn hf_meta_resolves_relative_to_its_directory_and_pins_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let tk = dir.path().join(HF_TOKENIZER_FILE);
        std::fs::write(&tk, crate::hf::tests::word_level_json(&crate::hf::tests::words(5))).unwrap();
        let tok = Tokenizer::hf(&tk).unwrap();
        let sha = crate::hf::sha256_hex(&std::fs::read(&tk).unwrap());
        let prepared = Meta::for_prepared(&tok, TokenDtype::Uint16);
        assert_eq!(prepared.tokenizer_file.as_deref(), Some(HF_TOKENIZER_FILE));
        let path = prepared.write(dir.path()).unwrap();
        // Read from another working directory's point of view: the name is relative to meta.json.
        let (meta, back) = Meta::read_with_tokenizer(&path).unwrap();
        assert_eq!(back, tok);
        assert_eq!(meta.tokenizer_path().unwrap(), dir.path().join(HF_TOKENIZER_FILE));
        // A checkpoint's description names the absolute path.
        let ck = Meta::for_tokenizer(&tok);
        assert!(Path::new(ck.tokenizer_file.as_deref().unwrap()).is_absolute());
        assert_eq!(ck.tokenizer().unwrap(), tok);

        // The file changed: named, with both hashes.
        std::fs::write(&tk, crate::hf::tests::word_level_json(&crate::hf::tests::words(6))).unwrap();
        let err = Meta::read(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::TokenizerChanged { .. }), "{msg}");
        assert!(msg.contains(HF_TOKENIZER_FILE) && msg.contains(&sha), "{msg}");
        // Without a recorded hash, a different vocabulary size is still caught.
        let unpinned = Meta { tokenizer_sha256: None, ..prepared.clone() };
        unpinned.write(dir.path()).unwrap();
        let msg = Meta::read(&path).unwrap_err().to_string();
        assert!(msg.contains("vocab_size is 7") && msg.contains("8 token ids"), "{msg}");
        // Gone: named.
        std::fs::remove_file(&tk).unwrap();
        let err = Meta::read(&path).unwrap_err();
        assert!(matches!(err, DataError::TokenizerMissing { .. }) && err.to_string().contains(HF_TOKENIZER_FILE), "{err}");
    }

    #[test]
    fn a_prepared_directory_tokenizer_never_leaves_the_directory() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        // A valid tokenizer outside the directory: still refused when meta.json points at it.
        let outside = root.path().join(HF_TOKENIZER_FILE);
        std::fs::write(&outside, crate::hf::tests::word_level_json(&crate::hf::tests::words(5))).unwrap();
        let tok = Tokenizer::hf(&outside).unwrap();
        for name in ["../tokenizer.json".to_string(), outside.to_string_lossy().into_owned(), "sub/tokenizer.json".into(), "..".into()] {
            let meta = Meta { tokenizer_file: Some(name.clone()), ..Meta::for_prepared(&tok, TokenDtype::Uint16) };
            let path = meta.write(&dir).unwrap();
            let err = Meta::read(&path).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, DataError::MetaInvalid { .. }), "{name}: {msg}");
            assert!(msg.contains("must name a file in the directory of meta.json") && msg.contains(META_FILE), "{name}: {msg}");
        }
        // A checkpoint's copy names an absolute path, and only with the content's hash.
        let ck = Meta::for_tokenizer(&tok);
        assert_eq!(ck.tokenizer().unwrap(), tok);
        let msg = Meta { tokenizer_sha256: None, ..ck }.tokenizer().unwrap_err().to_string();
        assert!(msg.contains("must be pinned by its SHA-256"), "{msg}");
    }

    #[test]
    fn malformed_meta_is_error_naming_file() {
        let cases = [
            ("{not json", "malformed"),
            (r#"{"tokenizer":"bpe","vocab_size":3}"#, "unknown variant"),
            (r#"{"tokenizer":"char","vocab_size":3}"#, "needs a \"chars\""),
            (r#"{"tokenizer":"char","vocab_size":4,"chars":"abc"}"#, "vocab_size is 4"),
            (r#"{"tokenizer":"char","vocab_size":3,"chars":"bac"}"#, "sorted"),
            (r#"{"tokenizer":"gpt2","vocab_size":5}"#, "50257"),
            (r#"{"tokenizer":"gpt2","vocab_size":50257,"dtype":"int8"}"#, "unknown variant `int8`"),
            (r#"{"tokenizer":"gpt2","vocab_size":50257,"tokenizer_file":"t.json"}"#, "only valid with \"tokenizer\": \"hf\""),
            (r#"{"tokenizer":"hf","vocab_size":50257}"#, "needs a \"tokenizer_file\""),
            (r#"{"tokenizer":"hf","vocab_size":5,"chars":"abcde","tokenizer_file":"t.json"}"#, "\"chars\" is only valid"),
            (r#"{"tokenizer":"char","vocab_size":0,"chars":""}"#, "between 1 and"),
            (r#"{"tokenizer":"char","vocab_size":99999999999,"chars":"a"}"#, "between 1 and"),
            // Found by fuzzing: serde quoted the unknown name raw, line break included.
            (r#"{"tokenizer":"a\nb","vocab_size":3}"#, r"unknown variant `a\nb`"),
            (r#"{"tokenizer":"char","vocab_size":1,"chars":"a","x\ry":1}"#, r"unknown field `x\ry`"),
        ];
        for (json, needle) in cases {
            let err = parse(json).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, DataError::MetaInvalid { .. }), "{msg}");
            assert!(msg.contains(META_FILE) && msg.contains(needle), "{json}: {msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn missing_meta_is_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Meta::read(&dir.path().join(META_FILE)).unwrap_err();
        assert!(matches!(err, DataError::MetaMissing { .. }), "{err}");
        assert!(err.to_string().contains("fabbrica prepare"));
    }
}
