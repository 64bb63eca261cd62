//! nanoGPT-compatible data handling for fabbrica, fully offline.
//!
//! * [`Tokenizer`]: char-level (vocabulary = sorted unique chars of the
//!   corpus), GPT-2 BPE (tiktoken `r50k_base`, embedded ranks), or a Hugging
//!   Face `tokenizer.json` ([`HfTokenizer`], `hf:PATH`). Token ids are `u32`.
//! * [`prepare()`]: text -> `train.bin`, `val.bin` (flat little-endian uint16,
//!   or uint32 for vocabularies over 65536 ids) and `meta.json`, each written
//!   atomically.
//! * [`load()`]: a prepared directory (memory-mapped, validated) or a raw text
//!   file (tokenized in memory) -> [`Dataset`].
//! * [`Sampler`]: stateless counter-based batches, identical across resumption
//!   and any data-parallel layout.
//!
//! All errors are [`DataError`]s whose `Display` is one user-facing line.

pub mod atomic;
pub mod bounded;
pub mod dataset;
pub mod error;
pub mod hf;
pub mod meta;
pub mod prepare;
pub mod sampler;
pub mod tokenizer;
pub mod tokens;

pub use dataset::{load, Dataset};
pub use error::{DataError, Result};
pub use hf::{HfTokenizer, MAX_TOKENIZER_FILE_BYTES};
pub use meta::{Meta, HF_TOKENIZER_FILE, META_FILE};
pub use prepare::{prepare, split_point, PrepareSummary, TRAIN_FILE, VAL_FILE};
pub use sampler::{splitmix64, Sampler, Split};
pub use tokenizer::{Gpt2Bpe, Tokenizer, TokenizerKind, TokenizerSpec, GPT2_EOT, GPT2_VOCAB_SIZE, MAX_VOCAB};
pub use tokens::{TokenDtype, TokenFile, TokenSource};
