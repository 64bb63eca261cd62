//! `meta.json`: the tokenizer description stored beside `train.bin`/`val.bin`.
//!
//! Format (char):  `{"tokenizer": "char", "vocab_size": 65, "chars": "\n !$&',-.3:;?AB..."}`
//! Format (gpt2):  `{"tokenizer": "gpt2", "vocab_size": 50257}`
//!
//! `chars` lists the whole char vocabulary in id order (id = index), which is
//! sorted order, as in nanoGPT's shakespeare_char `itos`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::tokenizer::{Tokenizer, TokenizerKind, GPT2_VOCAB_SIZE};

/// File name of the metadata inside a prepared directory.
pub const META_FILE: &str = "meta.json";

/// Parsed `meta.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub tokenizer: TokenizerKind,
    pub vocab_size: usize,
    /// Char vocabulary in id order; present only for the char tokenizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chars: Option<String>,
    /// Where this was read from, for error messages (not serialized).
    #[serde(skip)]
    source: Option<PathBuf>,
}

impl Meta {
    /// Metadata describing `tokenizer`.
    pub fn for_tokenizer(tokenizer: &Tokenizer) -> Meta {
        let chars = match tokenizer {
            Tokenizer::Char { chars } => Some(chars.iter().collect()),
            Tokenizer::Gpt2(_) => None,
        };
        Meta { tokenizer: tokenizer.kind(), vocab_size: tokenizer.vocab_size(), chars, source: None }
    }

    /// Reads and validates `path` (the meta.json file itself).
    ///
    /// Missing file: [`DataError::MetaMissing`]; bad JSON or an inconsistent
    /// description: [`DataError::MetaInvalid`] naming the path.
    pub fn read(path: &Path) -> Result<Meta> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(DataError::MetaMissing { path: path.to_owned() }),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(DataError::MetaInvalid { path: path.to_owned(), reason: "it is not UTF-8 text".into() })
            }
            Err(e) => return Err(DataError::io("read", path, e)),
        };
        let mut meta: Meta = serde_json::from_str(&text).map_err(|e| DataError::MetaInvalid {
            path: path.to_owned(),
            // serde quotes unknown names raw: a "\n" in one would break the message's line.
            reason: escape_control(&e.to_string()),
        })?;
        meta.source = Some(path.to_owned());
        // Validate eagerly so a broken file is reported at load time.
        meta.tokenizer()?;
        Ok(meta)
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
    /// gpt2: vocab_size = 50257).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        self.build().map_err(|reason| DataError::MetaInvalid { path: self.source.clone().unwrap_or_else(|| PathBuf::from(META_FILE)), reason })
    }

    /// Consistency checks; `Err` is the human-readable reason.
    fn build(&self) -> std::result::Result<Tokenizer, String> {
        match self.tokenizer {
            TokenizerKind::Gpt2 => {
                if self.chars.is_some() {
                    return Err("\"chars\" is only valid with \"tokenizer\": \"char\"".into());
                }
                if self.vocab_size != GPT2_VOCAB_SIZE {
                    return Err(format!("gpt2 has vocab_size {GPT2_VOCAB_SIZE}, but it says {}", self.vocab_size));
                }
                Ok(Tokenizer::gpt2())
            }
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
                // Sorted & unique checked above; size limit reported as VocabTooLarge.
                Tokenizer::char_from_vocab(chars).map_err(|e| e.to_string())
            }
        }
    }
}

/// `s` with control characters escaped (`\n` as the two characters `\` `n`), so an error
/// quoting text from the file stays on one line.
fn escape_control(s: &str) -> String {
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
        }
    }

    #[test]
    fn json_shape() {
        let m = Meta::for_tokenizer(&Tokenizer::char_from_text("ba").unwrap());
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"tokenizer":"char","vocab_size":2,"chars":"ab"}"#);
        let m = Meta::for_tokenizer(&Tokenizer::gpt2());
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"tokenizer":"gpt2","vocab_size":50257}"#);
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
