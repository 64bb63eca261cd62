use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// GPT-2 architecture hyper-parameters (nanoGPT's `GPTConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GptConfig {
    /// Rows of the (tied) token embedding. 0 = take the tokenizer's vocabulary size.
    /// May exceed it (GPT-2 presets pad 50257 to 50304, a multiple of 64, for faster matmuls).
    pub vocab_size: usize,
    /// Context length T: learned position embeddings exist for positions 0..block_size.
    pub block_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// Model width C; head size is C / n_head.
    pub n_embd: usize,
    /// Dropout on embeddings, attention weights and residual branches (training only).
    pub dropout: f64,
    /// Bias in Linear layers and LayerNorms.
    pub bias: bool,
    /// The output projection is the token embedding (GPT-2's tying). `false` gives the head its
    /// own `lm_head.weight`; with pipeline stages a tied embedding lives on the first and the
    /// last stage, kept equal by summing their gradients every step.
    #[serde(default = "yes")]
    pub tie_embeddings: bool,
    /// The MLP's GELU: `gelu` (exact, nanoGPT's `nn.GELU()`) or `gelu_tanh` (the tanh
    /// approximation, Hugging Face GPT-2's `gelu_new`, which its published checkpoints use).
    #[serde(default)]
    pub activation: Activation,
}

/// A model config value stored as its spelling: `as_str`, `Display`, a `FromStr` whose error says
/// what to set, and serde through the spelling (so a bad value fails deserialisation with that
/// advice, which the trainer's config reports with the key).
macro_rules! spelled {
    ($(#[$m:meta])* $name:ident, $help:literal, { $($(#[$vm:meta])* $var:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub enum $name {
            $($(#[$vm])* $var),+
        }

        impl $name {
            /// The config spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$var => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                [$($name::$var),+].into_iter().find(|v| v.as_str() == s).ok_or_else(|| $help.into())
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> std::result::Result<Self, String> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.as_str().into()
            }
        }
    };
}
pub(crate) use spelled;

spelled!(
    /// `model.activation`: the MLP's GELU.
    Activation, "use \"gelu\" (exact) or \"gelu_tanh\" (Hugging Face GPT-2's gelu_new)", {
        /// Exact (nanoGPT's `nn.GELU()`).
        #[default]
        Gelu = "gelu",
        /// The tanh approximation (Hugging Face GPT-2's `gelu_new`).
        GeluTanh = "gelu_tanh",
    }
);

impl Activation {
    /// ATen's `approximate` argument of `gelu`.
    pub fn approximate(self) -> &'static str {
        match self {
            Activation::Gelu => "none",
            Activation::GeluTanh => "tanh",
        }
    }
}

fn yes() -> bool {
    true
}

impl Default for GptConfig {
    fn default() -> Self {
        Self::preset("tiny").expect("tiny preset exists")
    }
}

/// GPT presets; the trainer's presets of the same names add batch and schedule settings.
#[cfg(test)]
const GPT_PRESET_NAMES: [&str; 5] = ["tiny", "gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1.5b"];

impl GptConfig {
    pub fn preset(name: &str) -> Option<Self> {
        let gpt2 = |n_layer, n_head, n_embd| GptConfig {
            vocab_size: 50304,
            block_size: 1024,
            n_layer,
            n_head,
            n_embd,
            dropout: 0.0,
            bias: true,
            tie_embeddings: true,
            activation: Activation::Gelu,
        };
        Some(match name {
            // A char-level model that learns visible structure in a few CPU minutes.
            "tiny" => GptConfig {
                vocab_size: 0,
                block_size: 128,
                n_layer: 4,
                n_head: 4,
                n_embd: 128,
                dropout: 0.0,
                bias: true,
                tie_embeddings: true,
                activation: Activation::Gelu,
            },
            "gpt2-124m" => gpt2(12, 12, 768),
            "gpt2-350m" => gpt2(24, 16, 1024),
            "gpt2-774m" => gpt2(36, 20, 1280),
            "gpt2-1.5b" => gpt2(48, 25, 1600),
            _ => return None,
        })
    }

    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// Checks every field; `vocab_size` must already be resolved (non-zero). Each field is
    /// bounded so that shapes and parameter counts cannot overflow.
    pub fn validate(&self) -> Result<()> {
        let range = |key, value: usize, lo: usize, hi: usize, example: &str| {
            if (lo..=hi).contains(&value) {
                return Ok(());
            }
            Err(ModelError::InvalidConfig { key, value: value.to_string(), why: format!("must be in [{lo}, {hi}]; set e.g. {key}={example}") })
        };
        if self.vocab_size == 0 {
            return Err(ModelError::InvalidConfig {
                key: "model.vocab_size",
                value: "0".into(),
                why: "must be resolved from the tokenizer before building".into(),
            });
        }
        if self.vocab_size > MAX_VOCAB_SIZE {
            return Err(ModelError::InvalidConfig {
                key: "model.vocab_size",
                value: self.vocab_size.to_string(),
                why: format!("at most {MAX_VOCAB_SIZE} rows (token ids) are supported: set model.vocab_size=0 (the tokenizer's size) or e.g. 50304"),
            });
        }
        range("model.block_size", self.block_size, 1, MAX_BLOCK_SIZE, "1024")?;
        range("model.n_layer", self.n_layer, 1, MAX_LAYERS, "12")?;
        range("model.n_head", self.n_head, 1, MAX_HEADS, "12")?;
        range("model.n_embd", self.n_embd, 1, MAX_EMBD, "768")?;
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(ModelError::InvalidConfig {
                key: "model.n_embd",
                value: self.n_embd.to_string(),
                why: format!("must be a positive multiple of model.n_head ({})", self.n_head),
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelError::InvalidConfig {
                key: "model.dropout",
                value: self.dropout.to_string(),
                why: "must be in [0, 1); set e.g. model.dropout=0.0".into(),
            });
        }
        Ok(())
    }
}

/// Largest `vocab_size`: fabbrica_data's bound on a vocabulary (2^24 ids; token files hold
/// uint16 ids up to 65536, uint32 beyond), far above today's largest (262144).
pub const MAX_VOCAB_SIZE: usize = fabbrica_data::MAX_VOCAB;
/// Largest `block_size` (context length).
pub const MAX_BLOCK_SIZE: usize = 1 << 20;
/// Largest `n_layer`.
pub const MAX_LAYERS: usize = 1024;
/// Largest `n_head`.
pub const MAX_HEADS: usize = 1024;
/// Largest `n_embd`.
pub const MAX_EMBD: usize = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_named() {
        for name in GPT_PRESET_NAMES {
            let mut c = GptConfig::preset(name).unwrap();
            if c.vocab_size == 0 {
                c.vocab_size = 65;
            }
            c.validate().unwrap();
        }
        assert!(GptConfig::preset("gpt5").is_none());
    }

    #[test]
    fn invalid_fields_name_their_key() {
        let mut c = GptConfig { vocab_size: 65, ..GptConfig::default() };
        c.n_embd = 130;
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("model.n_embd") && msg.contains("model.n_head"), "{msg}");
        let c = GptConfig { vocab_size: 65, dropout: 1.0, ..GptConfig::default() };
        assert!(c.validate().unwrap_err().to_string().contains("model.dropout"));
        let c = GptConfig::default();
        assert!(c.validate().unwrap_err().to_string().contains("model.vocab_size"));
    }

    #[test]
    fn every_size_is_bounded() {
        let ok = GptConfig { vocab_size: 65, ..GptConfig::default() };
        let cases: [(&str, GptConfig); 6] = [
            ("model.vocab_size", GptConfig { vocab_size: MAX_VOCAB_SIZE + 1, ..ok.clone() }),
            ("model.block_size", GptConfig { block_size: MAX_BLOCK_SIZE + 1, ..ok.clone() }),
            ("model.block_size", GptConfig { block_size: 0, ..ok.clone() }),
            ("model.n_layer", GptConfig { n_layer: usize::MAX, ..ok.clone() }),
            ("model.n_head", GptConfig { n_head: MAX_HEADS + 1, n_embd: 2 * (MAX_HEADS + 1), ..ok.clone() }),
            ("model.n_embd", GptConfig { n_head: 1, n_embd: MAX_EMBD + 1, ..ok.clone() }),
        ];
        for (key, c) in cases {
            let msg = c.validate().unwrap_err().to_string();
            assert!(msg.starts_with(key) && msg.contains("set"), "{key}: {msg}");
        }
        // The limits themselves are valid.
        let max = GptConfig {
            vocab_size: MAX_VOCAB_SIZE,
            block_size: MAX_BLOCK_SIZE,
            n_layer: MAX_LAYERS,
            n_head: MAX_HEADS,
            n_embd: MAX_EMBD,
            ..ok.clone()
        };
        max.validate().unwrap();
        let nan = GptConfig { dropout: f64::NAN, ..ok };
        assert!(nan.validate().unwrap_err().to_string().contains("model.dropout"));
    }
}
