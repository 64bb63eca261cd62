//! Tokenizers: nanoGPT's char-level vocabulary, GPT-2 BPE (tiktoken r50k_base) and Hugging Face
//! tokenizer files ([`HfTokenizer`]).
//!
//! Token ids are `u32`. Token files store them as `uint16` when the vocabulary has at most 65536
//! ids (nanoGPT's format) and as `uint32` beyond ([`crate::TokenDtype`]); every vocabulary has at
//! most [`MAX_VOCAB`] ids, checked at construction.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tiktoken_rs::CoreBPE;

use crate::error::{DataError, Result};
use crate::hf::HfTokenizer;

/// Largest vocabulary fabbrica accepts: 2^24 ids, far above today's largest (Gemma's 262144)
/// and above the 1,112,064 Unicode scalar values a char vocabulary can have, while keeping an
/// embedding table's row count, and an untrusted meta.json's `vocab_size`, bounded.
pub const MAX_VOCAB: usize = 1 << 24;

/// GPT-2's vocabulary size: 50000 merges + 256 byte tokens + `<|endoftext|>`.
pub const GPT2_VOCAB_SIZE: usize = 50257;

/// GPT-2's `<|endoftext|>` token id.
pub const GPT2_EOT: u32 = 50256;

/// Which tokenizer a prepared directory or a checkpoint uses; the serialized names (meta.json's
/// `"tokenizer"`) are `"char"`, `"gpt2"` and `"hf"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// One token per Unicode scalar value; vocabulary built from the corpus.
    Char,
    /// GPT-2 byte-level BPE (tiktoken `r50k_base`).
    Gpt2,
    /// A Hugging Face `tokenizer.json`.
    Hf,
}

impl TokenizerKind {
    /// All kinds, in the order they are listed in messages.
    pub const ALL: [TokenizerKind; 3] = [TokenizerKind::Char, TokenizerKind::Gpt2, TokenizerKind::Hf];

    /// The canonical lowercase name (`"char"`, `"gpt2"` or `"hf"`).
    pub fn as_str(self) -> &'static str {
        match self {
            TokenizerKind::Char => "char",
            TokenizerKind::Gpt2 => "gpt2",
            TokenizerKind::Hf => "hf",
        }
    }
}

impl fmt::Display for TokenizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A tokenizer as the user names it (`data.tokenizer`, `fabbrica prepare --tokenizer`):
/// `char`, `gpt2`, or `hf:PATH` for a Hugging Face tokenizer file.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TokenizerSpec {
    /// `char`: vocabulary from the text.
    Char,
    /// `gpt2`: GPT-2 BPE.
    Gpt2,
    /// `hf:PATH`: the Hugging Face `tokenizer.json` at PATH (relative to the working directory).
    Hf(PathBuf),
}

impl TokenizerSpec {
    /// The tokenizers that need no file.
    pub const BUILTIN: [TokenizerSpec; 2] = [TokenizerSpec::Char, TokenizerSpec::Gpt2];

    /// The kind this names.
    pub fn kind(&self) -> TokenizerKind {
        match self {
            TokenizerSpec::Char => TokenizerKind::Char,
            TokenizerSpec::Gpt2 => TokenizerKind::Gpt2,
            TokenizerSpec::Hf(_) => TokenizerKind::Hf,
        }
    }
}

impl fmt::Display for TokenizerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizerSpec::Hf(p) => write!(f, "hf:{}", p.display()),
            other => f.write_str(other.kind().as_str()),
        }
    }
}

impl FromStr for TokenizerSpec {
    type Err = DataError;

    /// Parses `"char"` or `"gpt2"` (case-insensitive, surrounding spaces ignored) or `"hf:PATH"`
    /// (PATH non-empty, taken as written).
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        if let Some(path) = t.get(..3).filter(|p| p.eq_ignore_ascii_case("hf:")).map(|_| &t[3..]) {
            if !path.is_empty() {
                return Ok(TokenizerSpec::Hf(PathBuf::from(path)));
            }
        }
        TokenizerSpec::BUILTIN
            .into_iter()
            .find(|k| k.kind().as_str().eq_ignore_ascii_case(t))
            .ok_or_else(|| DataError::UnknownTokenizer { name: s.to_owned() })
    }
}

/// Handle to the process-wide GPT-2 BPE tables.
///
/// Building `CoreBPE` parses ~50k ranks and compiles many regexes, so it is
/// done once per process (tiktoken-rs's `r50k_base_singleton`, which wraps
/// `r50k_base()`); cloning a `Tokenizer::Gpt2` is then free.
#[derive(Clone, Copy)]
pub struct Gpt2Bpe(&'static CoreBPE);

impl Gpt2Bpe {
    /// The shared GPT-2 encoder (ranks are embedded in tiktoken-rs: works offline).
    pub fn get() -> Self {
        Gpt2Bpe(tiktoken_rs::r50k_base_singleton())
    }

    /// The underlying tiktoken encoder.
    pub fn core(&self) -> &'static CoreBPE {
        self.0
    }
}

impl fmt::Debug for Gpt2Bpe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Gpt2Bpe(r50k_base)")
    }
}

impl PartialEq for Gpt2Bpe {
    /// There is only one GPT-2 vocabulary.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Gpt2Bpe {}

/// A concrete tokenizer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tokenizer {
    /// Char-level vocabulary; `chars` is sorted and unique, id = index.
    /// (Same as nanoGPT's shakespeare_char `stoi`/`itos`.) Construct it via
    /// [`Tokenizer::char_from_text`] or [`Tokenizer::char_from_vocab`] so the
    /// invariants hold; `encode` relies on the sort order.
    Char { chars: Vec<char> },
    /// GPT-2 BPE, vocabulary 50257.
    Gpt2(Gpt2Bpe),
    /// A Hugging Face tokenizer file.
    Hf(HfTokenizer),
}

impl Tokenizer {
    /// Char tokenizer whose vocabulary is the sorted unique chars of `text`.
    ///
    /// Fails with [`DataError::VocabTooLarge`] above [`MAX_VOCAB`] distinct chars (which no
    /// text reaches: Unicode has fewer scalar values).
    pub fn char_from_text(text: &str) -> Result<Tokenizer> {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Self::char_from_vocab(chars)
    }

    /// Char tokenizer from an explicit vocabulary (e.g. meta.json's `chars`).
    ///
    /// The vocabulary must be strictly increasing (sorted, no duplicates) so
    /// that ids agree with [`Tokenizer::char_from_text`] on the same corpus.
    ///
    /// # Panics
    /// If `chars` is not strictly increasing (a programming error: callers
    /// reading untrusted input, like `Meta::tokenizer`, check this first).
    pub fn char_from_vocab(chars: Vec<char>) -> Result<Tokenizer> {
        if chars.len() > MAX_VOCAB {
            return Err(DataError::VocabTooLarge { what: "char vocabulary", size: chars.len() });
        }
        assert!(chars.windows(2).all(|w| w[0] < w[1]), "char vocabulary must be sorted and unique");
        Ok(Tokenizer::Char { chars })
    }

    /// The GPT-2 BPE tokenizer.
    pub fn gpt2() -> Tokenizer {
        Tokenizer::Gpt2(Gpt2Bpe::get())
    }

    /// The Hugging Face tokenizer in the `tokenizer.json` at `path`.
    pub fn hf(path: &std::path::Path) -> Result<Tokenizer> {
        HfTokenizer::from_file(path).map(Tokenizer::Hf)
    }

    /// Builds the tokenizer `spec` names for `text` (char: vocabulary from `text`; hf: reads the file).
    pub fn for_text(spec: &TokenizerSpec, text: &str) -> Result<Tokenizer> {
        match spec {
            TokenizerSpec::Char => Self::char_from_text(text),
            TokenizerSpec::Gpt2 => Ok(Self::gpt2()),
            TokenizerSpec::Hf(path) => Self::hf(path),
        }
    }

    /// Which kind this is.
    pub fn kind(&self) -> TokenizerKind {
        match self {
            Tokenizer::Char { .. } => TokenizerKind::Char,
            Tokenizer::Gpt2(_) => TokenizerKind::Gpt2,
            Tokenizer::Hf(_) => TokenizerKind::Hf,
        }
    }

    /// Number of token ids; every id produced is `< vocab_size()`.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Char { chars } => chars.len(),
            Tokenizer::Gpt2(_) => GPT2_VOCAB_SIZE,
            Tokenizer::Hf(t) => t.vocab_size(),
        }
    }

    /// The end-of-text token, if the tokenizer has one (gpt2: 50256; char: none; hf: the file's
    /// special token named like one, see [`crate::hf::EOT_NAMES`]).
    pub fn eot(&self) -> Option<u32> {
        match self {
            Tokenizer::Char { .. } => None,
            Tokenizer::Gpt2(_) => Some(GPT2_EOT),
            Tokenizer::Hf(t) => t.eot(),
        }
    }

    /// Encodes `text` into token ids.
    ///
    /// Char: a char outside the vocabulary is [`DataError::UnknownChar`].
    /// GPT-2: `encode_ordinary`, like nanoGPT's prepare.py, so the literal
    /// string `<|endoftext|>` in the text is encoded as ordinary text, never
    /// as the special token.
    /// Hf: as Python's `tokenizer.encode(text).ids` ([`HfTokenizer::encode`]).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Char { chars } => text
                .chars()
                .map(|c| {
                    // Index fits u32: vocab size <= MAX_VOCAB was checked at construction.
                    chars.binary_search(&c).map(|i| i as u32).map_err(|_| DataError::UnknownChar { ch: c, vocab_size: chars.len() })
                })
                .collect(),
            // Ranks are < 50257 by construction of r50k_base.
            Tokenizer::Gpt2(bpe) => Ok(bpe.core().encode_ordinary(text)),
            Tokenizer::Hf(t) => t.encode(text),
        }
    }

    /// Decodes ids to text. Never panics: ids outside the vocabulary become
    /// U+FFFD, and GPT-2 byte sequences that are not UTF-8 are decoded lossily
    /// (a sampled sequence may end in the middle of a multi-byte char).
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Char { chars } => ids.iter().map(|&i| chars.get(i as usize).copied().unwrap_or('\u{FFFD}')).collect(),
            Tokenizer::Gpt2(bpe) => {
                let core = bpe.core();
                let mut bytes = Vec::with_capacity(ids.len() * 4);
                for &id in ids {
                    match core.decode_bytes(&[id]) {
                        Ok(b) => bytes.extend_from_slice(&b),
                        Err(_) => bytes.extend_from_slice("\u{FFFD}".as_bytes()),
                    }
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Tokenizer::Hf(t) => t.decode(ids),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_and_prints() {
        assert_eq!("char".parse::<TokenizerSpec>().unwrap(), TokenizerSpec::Char);
        assert_eq!(" GPT2 ".parse::<TokenizerSpec>().unwrap(), TokenizerSpec::Gpt2);
        for k in TokenizerSpec::BUILTIN {
            assert_eq!(k.to_string().parse::<TokenizerSpec>().unwrap(), k);
        }
        let hf = "hf:models/llama 3/tokenizer.json".parse::<TokenizerSpec>().unwrap();
        assert_eq!(hf, TokenizerSpec::Hf(PathBuf::from("models/llama 3/tokenizer.json")));
        assert_eq!(hf.kind(), TokenizerKind::Hf);
        assert_eq!(hf.to_string(), "hf:models/llama 3/tokenizer.json");
        assert_eq!("HF:/abs/t.json".parse::<TokenizerSpec>().unwrap(), TokenizerSpec::Hf(PathBuf::from("/abs/t.json")));
        for bad in ["bpe", "hf:", "hf", " hf: ", "", "ünï"] {
            let msg = bad.parse::<TokenizerSpec>().unwrap_err().to_string();
            assert!(msg.contains(&format!("{bad:?}")) && msg.contains("char, gpt2 and hf:PATH"), "{msg}");
        }
        assert_eq!(TokenizerKind::ALL.map(TokenizerKind::as_str), ["char", "gpt2", "hf"]);
    }

    #[test]
    fn char_vocab_is_sorted_unique() {
        let t = Tokenizer::char_from_text("hello").unwrap();
        assert_eq!(t, Tokenizer::Char { chars: vec!['e', 'h', 'l', 'o'] });
        assert_eq!(t.vocab_size(), 4);
        assert_eq!(t.kind(), TokenizerKind::Char);
        assert_eq!(t.eot(), None);
        assert_eq!(t.encode("hello").unwrap(), vec![1, 0, 2, 2, 3]);
    }

    #[test]
    fn char_round_trip() {
        let text = "First Citizen:\nBefore we proceed any further, hear me speak. — ünïcödé ✓";
        let t = Tokenizer::char_from_text(text).unwrap();
        let ids = t.encode(text).unwrap();
        assert_eq!(ids.len(), text.chars().count());
        assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
        assert_eq!(t.decode(&ids), text);
    }

    #[test]
    fn char_unknown_char_is_error_naming_it() {
        let t = Tokenizer::char_from_text("abc").unwrap();
        let msg = t.encode("abz").unwrap_err().to_string();
        assert!(msg.contains("'z'"), "{msg}");
        assert!(msg.contains("3 characters"), "{msg}");
    }

    #[test]
    fn char_decode_never_panics() {
        let t = Tokenizer::char_from_text("ab").unwrap();
        assert_eq!(t.decode(&[0, 1, 7, u32::MAX]), "ab\u{FFFD}\u{FFFD}");
    }

    #[test]
    fn char_vocab_beyond_u16() {
        // 65537 distinct chars: ids up to 65536, one past what uint16 holds.
        let many: String = (0u32..0x11000).filter_map(char::from_u32).take((1 << 16) + 1).collect();
        let t = Tokenizer::char_from_text(&many).unwrap();
        assert_eq!(t.vocab_size(), 65537);
        let last = many.chars().last().unwrap().to_string();
        assert_eq!(t.encode(&last).unwrap(), vec![65536]);
        let ids = t.encode(&many).unwrap();
        assert_eq!(t.decode(&ids), many);
        // The limit is MAX_VOCAB, far above any text (checked on the vocabulary, not the text).
        let err = Tokenizer::char_from_vocab(vec!['a'; MAX_VOCAB + 1]).unwrap_err();
        assert!(matches!(err, DataError::VocabTooLarge { size, .. } if size == MAX_VOCAB + 1), "{err}");
    }

    #[test]
    fn gpt2_known_ids() {
        let t = Tokenizer::gpt2();
        assert_eq!(t.kind(), TokenizerKind::Gpt2);
        assert_eq!(t.vocab_size(), 50257);
        assert_eq!(t.eot(), Some(50256));
        assert_eq!(t.encode("Hello world").unwrap(), vec![15496, 995]);
        assert_eq!(t.decode(&[50256]), "<|endoftext|>");
    }

    #[test]
    fn gpt2_round_trip_and_ordinary() {
        let t = Tokenizer::gpt2();
        let text = "The quick brown fox jumps over the lazy dog. Ünïcödé ✓\n";
        let ids = t.encode(text).unwrap();
        assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
        assert_eq!(t.decode(&ids), text);
        // encode_ordinary: the special-token string is plain text, not 50256.
        let ids = t.encode("<|endoftext|>").unwrap();
        assert!(!ids.contains(&GPT2_EOT) && ids.len() > 1, "{ids:?}");
    }

    #[test]
    fn gpt2_decode_never_panics() {
        let t = Tokenizer::gpt2();
        // 50257.. are not GPT-2 ids; a lone byte token (e.g. 0xE2 of a 3-byte char) is invalid UTF-8.
        let ids = t.encode("✓").unwrap();
        let s = t.decode(&[ids[0], 50257, u32::MAX]);
        assert!(s.contains('\u{FFFD}'));
    }
}
