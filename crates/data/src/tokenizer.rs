//! Tokenizers: nanoGPT's char-level vocabulary and GPT-2 BPE (tiktoken r50k_base).
//!
//! Token ids are `u16`, the element type of nanoGPT's `.bin` files, so every
//! vocabulary must have at most 65536 entries; this is checked at construction.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tiktoken_rs::CoreBPE;

use crate::error::{DataError, Result};

/// Largest vocabulary whose ids all fit a `u16`.
pub const MAX_VOCAB: usize = u16::MAX as usize + 1;

/// GPT-2's vocabulary size: 50000 merges + 256 byte tokens + `<|endoftext|>`.
pub const GPT2_VOCAB_SIZE: usize = 50257;

/// GPT-2's `<|endoftext|>` token id.
pub const GPT2_EOT: u16 = 50256;

/// Which tokenizer to use; the serialized names are `"char"` and `"gpt2"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// One token per Unicode scalar value; vocabulary built from the corpus.
    Char,
    /// GPT-2 byte-level BPE (tiktoken `r50k_base`).
    Gpt2,
}

impl TokenizerKind {
    /// All kinds, in the order they are listed in messages.
    pub const ALL: [TokenizerKind; 2] = [TokenizerKind::Char, TokenizerKind::Gpt2];

    /// The canonical lowercase name (`"char"` or `"gpt2"`).
    pub fn as_str(self) -> &'static str {
        match self {
            TokenizerKind::Char => "char",
            TokenizerKind::Gpt2 => "gpt2",
        }
    }
}

impl fmt::Display for TokenizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TokenizerKind {
    type Err = DataError;

    /// Parses `"char"` or `"gpt2"` (case-insensitive, surrounding spaces ignored).
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        TokenizerKind::ALL.into_iter().find(|k| k.as_str().eq_ignore_ascii_case(t)).ok_or_else(|| DataError::UnknownTokenizer { name: s.to_owned() })
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
}

impl Tokenizer {
    /// Char tokenizer whose vocabulary is the sorted unique chars of `text`.
    ///
    /// Fails with [`DataError::VocabTooLarge`] above 65536 distinct chars.
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
            return Err(DataError::VocabTooLarge { size: chars.len() });
        }
        assert!(chars.windows(2).all(|w| w[0] < w[1]), "char vocabulary must be sorted and unique");
        Ok(Tokenizer::Char { chars })
    }

    /// The GPT-2 BPE tokenizer.
    pub fn gpt2() -> Tokenizer {
        // Compile-time fact, kept as an assertion to document the u16 invariant.
        const _: () = assert!(GPT2_VOCAB_SIZE <= MAX_VOCAB);
        Tokenizer::Gpt2(Gpt2Bpe::get())
    }

    /// Builds the tokenizer of `kind` for `text` (char: vocabulary from `text`).
    pub fn for_text(kind: TokenizerKind, text: &str) -> Result<Tokenizer> {
        match kind {
            TokenizerKind::Char => Self::char_from_text(text),
            TokenizerKind::Gpt2 => Ok(Self::gpt2()),
        }
    }

    /// Which kind this is.
    pub fn kind(&self) -> TokenizerKind {
        match self {
            Tokenizer::Char { .. } => TokenizerKind::Char,
            Tokenizer::Gpt2(_) => TokenizerKind::Gpt2,
        }
    }

    /// Number of token ids; every id produced is `< vocab_size()`.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Char { chars } => chars.len(),
            Tokenizer::Gpt2(_) => GPT2_VOCAB_SIZE,
        }
    }

    /// The end-of-text token, if the tokenizer has one (gpt2: 50256; char: none).
    pub fn eot(&self) -> Option<u16> {
        match self {
            Tokenizer::Char { .. } => None,
            Tokenizer::Gpt2(_) => Some(GPT2_EOT),
        }
    }

    /// Encodes `text` into token ids.
    ///
    /// Char: a char outside the vocabulary is [`DataError::UnknownChar`].
    /// GPT-2: `encode_ordinary`, like nanoGPT's prepare.py, so the literal
    /// string `<|endoftext|>` in the text is encoded as ordinary text, never
    /// as the special token.
    pub fn encode(&self, text: &str) -> Result<Vec<u16>> {
        match self {
            Tokenizer::Char { chars } => text
                .chars()
                .map(|c| {
                    // Index fits u16: vocab size <= 65536 was checked at construction.
                    chars.binary_search(&c).map(|i| i as u16).map_err(|_| DataError::UnknownChar { ch: c, vocab_size: chars.len() })
                })
                .collect(),
            Tokenizer::Gpt2(bpe) => Ok(bpe
                .core()
                .encode_ordinary(text)
                .into_iter()
                // Ranks are < 50257 by construction of r50k_base.
                .map(|r| r as u16)
                .collect()),
        }
    }

    /// Decodes ids to text. Never panics: ids outside the vocabulary become
    /// U+FFFD, and GPT-2 byte sequences that are not UTF-8 are decoded lossily
    /// (a sampled sequence may end in the middle of a multi-byte char).
    pub fn decode(&self, ids: &[u16]) -> String {
        match self {
            Tokenizer::Char { chars } => ids.iter().map(|&i| chars.get(usize::from(i)).copied().unwrap_or('\u{FFFD}')).collect(),
            Tokenizer::Gpt2(bpe) => {
                let core = bpe.core();
                let mut bytes = Vec::with_capacity(ids.len() * 4);
                for &id in ids {
                    match core.decode_bytes(&[u32::from(id)]) {
                        Ok(b) => bytes.extend_from_slice(&b),
                        Err(_) => bytes.extend_from_slice("\u{FFFD}".as_bytes()),
                    }
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_parses_and_prints() {
        assert_eq!("char".parse::<TokenizerKind>().unwrap(), TokenizerKind::Char);
        assert_eq!(" GPT2 ".parse::<TokenizerKind>().unwrap(), TokenizerKind::Gpt2);
        for k in TokenizerKind::ALL {
            assert_eq!(k.as_str().parse::<TokenizerKind>().unwrap(), k);
        }
        let msg = "bpe".parse::<TokenizerKind>().unwrap_err().to_string();
        assert!(msg.contains("\"bpe\"") && msg.contains("char, gpt2"), "{msg}");
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
        assert!(ids.iter().all(|&i| usize::from(i) < t.vocab_size()));
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
        assert_eq!(t.decode(&[0, 1, 7, u16::MAX]), "ab\u{FFFD}\u{FFFD}");
    }

    #[test]
    fn char_vocab_limit() {
        // 65536 distinct chars fit (ids 0..=65535); one more does not.
        let many: String = (0u32..0x11000).filter_map(char::from_u32).take(MAX_VOCAB + 1).collect();
        let err = Tokenizer::char_from_text(&many).unwrap_err();
        assert!(matches!(err, DataError::VocabTooLarge { size } if size == MAX_VOCAB + 1));
        let fits: String = many.chars().take(MAX_VOCAB).collect();
        let t = Tokenizer::char_from_text(&fits).unwrap();
        assert_eq!(t.vocab_size(), MAX_VOCAB);
        let last = fits.chars().last().unwrap().to_string();
        assert_eq!(t.encode(&last).unwrap(), vec![u16::MAX]);
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
        assert!(ids.iter().all(|&i| usize::from(i) < t.vocab_size()));
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
        let s = t.decode(&[ids[0], 50257, u16::MAX]);
        assert!(s.contains('\u{FFFD}'));
    }
}
