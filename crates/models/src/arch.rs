//! `[model]`: which architecture, and its shape. One tagged enum (`arch = "gpt" | "llama"`), so a
//! key of the other architecture is refused rather than ignored, and everything that needs the
//! shape (the model, FLOPs, memory, stage split, the planner) asks this type, not a hard-wired
//! GPT config.

use serde::{Deserialize, Serialize};

use crate::config::GptConfig;
use crate::error::{ModelError, Result};
use crate::llama::LlamaConfig;

/// The model's architecture and hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "lowercase")]
pub enum ModelConfig {
    /// GPT-2 (nanoGPT): learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
    Gpt(GptConfig),
    /// Llama 2/3: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases.
    Llama(LlamaConfig),
}

/// Every preset: the architecture follows from the name.
pub const PRESET_NAMES: [&str; 11] = [
    "tiny",
    "gpt2-124m",
    "gpt2-350m",
    "gpt2-774m",
    "gpt2-1.5b",
    "llama-tiny",
    "llama3.2-1b",
    "llama3.2-3b",
    "llama3.1-8b",
    "llama3.1-70b",
    "llama3.1-405b",
];

/// Keys both architectures have, and what only one of them has (for messages).
pub const GPT_ONLY_KEYS: [&str; 2] = ["bias", "activation"];
pub const LLAMA_ONLY_KEYS: [&str; 5] = ["n_kv_head", "ffn_hidden", "rope_theta", "rope_scaling", "norm_eps"];

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig::Gpt(GptConfig::default())
    }
}

impl ModelConfig {
    pub fn preset(name: &str) -> Option<ModelConfig> {
        GptConfig::preset(name).map(ModelConfig::Gpt).or_else(|| LlamaConfig::preset(name).map(ModelConfig::Llama))
    }

    /// The default shape of an architecture (`gpt` → `tiny`, `llama` → `llama-tiny`).
    pub fn default_for(arch: &str) -> Option<ModelConfig> {
        match arch {
            "gpt" => Some(ModelConfig::Gpt(GptConfig::default())),
            "llama" => Some(ModelConfig::Llama(LlamaConfig::default())),
            _ => None,
        }
    }

    /// `gpt` or `llama`, as written in `model.arch`.
    pub fn arch(&self) -> &'static str {
        match self {
            ModelConfig::Gpt(_) => "gpt",
            ModelConfig::Llama(_) => "llama",
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Gpt(c) => c.vocab_size,
            ModelConfig::Llama(c) => c.vocab_size,
        }
    }

    pub fn set_vocab_size(&mut self, v: usize) {
        match self {
            ModelConfig::Gpt(c) => c.vocab_size = v,
            ModelConfig::Llama(c) => c.vocab_size = v,
        }
    }

    /// Context length of a training sequence.
    pub fn block_size(&self) -> usize {
        match self {
            ModelConfig::Gpt(c) => c.block_size,
            ModelConfig::Llama(c) => c.block_size,
        }
    }

    pub fn n_layer(&self) -> usize {
        match self {
            ModelConfig::Gpt(c) => c.n_layer,
            ModelConfig::Llama(c) => c.n_layer,
        }
    }

    pub fn n_head(&self) -> usize {
        match self {
            ModelConfig::Gpt(c) => c.n_head,
            ModelConfig::Llama(c) => c.n_head,
        }
    }

    /// Key-value heads (GPT: every head has its own).
    pub fn n_kv_head(&self) -> usize {
        match self {
            ModelConfig::Gpt(c) => c.n_head,
            ModelConfig::Llama(c) => c.n_kv_head,
        }
    }

    /// Model width C.
    pub fn n_embd(&self) -> usize {
        match self {
            ModelConfig::Gpt(c) => c.n_embd,
            ModelConfig::Llama(c) => c.n_embd,
        }
    }

    pub fn head_size(&self) -> usize {
        self.n_embd() / self.n_head().max(1)
    }

    /// Inner width of the MLP (GPT: 4C; Llama: SwiGLU's, with Llama's rounding rule for 0).
    pub fn ffn_hidden(&self) -> usize {
        match self {
            ModelConfig::Gpt(c) => 4 * c.n_embd,
            ModelConfig::Llama(c) => c.ffn_hidden(),
        }
    }

    /// Dropout probability (GPT: embeddings, attention, residual branches; Llama: attention only,
    /// Hugging Face's `attention_dropout`).
    pub fn dropout(&self) -> f64 {
        match self {
            ModelConfig::Gpt(c) => c.dropout,
            ModelConfig::Llama(c) => c.dropout,
        }
    }

    pub fn tie_embeddings(&self) -> bool {
        match self {
            ModelConfig::Gpt(c) => c.tie_embeddings,
            ModelConfig::Llama(c) => c.tie_embeddings,
        }
    }

    /// Parameters of one block that tensor parallelism does not split (every tensor-parallel
    /// rank holds them whole): the norms, and GPT's row-parallel biases (added once, after the
    /// reduction).
    pub fn block_replicated_params(&self) -> u64 {
        let c = self.n_embd() as u64;
        match self {
            ModelConfig::Gpt(g) => {
                if g.bias {
                    6 * c
                } else {
                    2 * c
                }
            }
            ModelConfig::Llama(_) => 2 * c,
        }
    }

    /// The token embedding's parameter name (the tied output projection's too).
    pub fn embedding_name(&self) -> &'static str {
        match self {
            ModelConfig::Gpt(_) => "transformer.wte.weight",
            ModelConfig::Llama(_) => "model.embed_tokens.weight",
        }
    }

    /// Checks every field; `vocab_size` must already be resolved (non-zero).
    pub fn validate(&self) -> Result<()> {
        match self {
            ModelConfig::Gpt(c) => c.validate(),
            ModelConfig::Llama(c) => c.validate(),
        }
    }

    /// Parameters of one transformer block (norms included).
    pub fn block_params(&self) -> u64 {
        let c = self.n_embd() as u64;
        match self {
            ModelConfig::Gpt(g) => {
                let b = g.bias as u64;
                // c_attn C·3C (+3C), attn c_proj C·C (+C), c_fc C·4C (+4C), mlp c_proj 4C·C (+C),
                // ln_1 and ln_2 (C weights + C biases each).
                12 * c * c + b * 9 * c + 2 * c + b * 2 * c
            }
            ModelConfig::Llama(l) => {
                let kv = (l.n_kv_head * self.head_size()) as u64;
                let f = l.ffn_hidden() as u64;
                // q and o C·C, k and v C·kv, gate and up C·F, down F·C, two RMSNorm weights.
                2 * c * c + 2 * c * kv + 3 * c * f + 2 * c
            }
        }
    }

    /// Parameters of the final norm.
    pub fn final_norm_params(&self) -> u64 {
        let c = self.n_embd() as u64;
        match self {
            ModelConfig::Gpt(g) => c + g.bias as u64 * c,
            ModelConfig::Llama(_) => c,
        }
    }

    /// Parameters that are only looked up, never multiplied: GPT's position embeddings.
    pub fn lookup_only_params(&self) -> u64 {
        match self {
            ModelConfig::Gpt(g) => (g.block_size * g.n_embd) as u64,
            ModelConfig::Llama(_) => 0,
        }
    }

    /// The error for `model.{key}` set on `arch` when only the other architecture has that key.
    pub fn foreign_key_error(arch: &str, key: &str) -> ModelError {
        let other = if arch == "gpt" { "llama" } else { "gpt" };
        ModelError::InvalidConfig {
            key: "model.arch",
            value: format!("{arch:?}"),
            why: format!("model.{key} belongs to model.arch = \"{other}\": remove it, or set model.arch=\"{other}\""),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_exists_once_and_is_valid() {
        for name in PRESET_NAMES {
            let mut c = ModelConfig::preset(name).unwrap_or_else(|| panic!("{name}"));
            if c.vocab_size() == 0 {
                c.set_vocab_size(65);
            }
            c.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(c.arch(), if name.starts_with("llama") { "llama" } else { "gpt" });
        }
        assert!(ModelConfig::preset("gpt5").is_none());
    }
}
