//! The one model-specific module: a trainer model becomes a [`ModelShape`], with its parameter
//! and FLOP counts taken from the trainer's own code (`fabbrica_models::flops`) and its pipeline
//! split from the trainer's balanced split, for every architecture the trainer has (GPT, Llama).

use fabbrica_models::flops::{flops_per_token, matmul_params, total_params};
use fabbrica_models::{GptConfig, ModelConfig};

use crate::error::PlanError;

/// What the planner needs of a model: its shape, its counts and its activation memory.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    /// Shown in reports.
    pub name: String,
    /// Transformer blocks.
    pub layers: usize,
    /// Model width h.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (= heads without grouped-query attention).
    pub kv_heads: usize,
    /// Width of the MLP's hidden layer (4h for GPT-2).
    pub ffn_hidden: usize,
    /// Rows of the embedding (padded vocabulary).
    pub vocab: usize,
    /// Sequence length the plan trains at.
    pub seq: usize,
    /// Gated MLP (SwiGLU: three matrices) instead of GELU's two.
    pub glu: bool,
    /// Output projection tied to the token embedding.
    pub tied: bool,
    /// Dropout layers present (their masks are stored for backward).
    pub dropout: bool,
    /// Every parameter, as the trainer counts it (`flops::total_params`).
    pub params: u64,
    /// Parameters that do matmul work (`flops::matmul_params`).
    pub matmul_params: u64,
    /// Parameters of one transformer block.
    pub layer_params: u64,
    /// Training FLOPs per token (`flops::flops_per_token` at `seq`): the MFU numerator.
    pub flops_per_token: f64,
    pub(crate) model: ModelConfig,
}

/// Activation recomputation: the trainer's own type (`train.recompute`), so that the two never
/// disagree on what exists or how it is spelled.
pub use fabbrica_models::Recompute;

impl ModelShape {
    /// A trainer model config (preset or `--config` file), planned at sequence length `seq`.
    pub fn from_config(name: &str, cfg: &ModelConfig, seq: usize) -> Result<ModelShape, PlanError> {
        let mut cfg = cfg.clone();
        if cfg.vocab_size() == 0 {
            // The trainer takes it from the tokenizer; GPT-2's padded BPE is the planning default.
            cfg.set_vocab_size(50304);
        }
        check_shape(&cfg, seq)?;
        match &mut cfg {
            ModelConfig::Gpt(g) => g.block_size = seq,
            ModelConfig::Llama(l) => l.block_size = seq,
        }
        let (glu, dropout) = (matches!(cfg, ModelConfig::Llama(_)), cfg.dropout() > 0.0);
        Ok(ModelShape {
            name: name.to_string(),
            layers: cfg.n_layer(),
            hidden: cfg.n_embd(),
            heads: cfg.n_head(),
            kv_heads: cfg.n_kv_head(),
            ffn_hidden: cfg.ffn_hidden(),
            vocab: cfg.vocab_size(),
            seq,
            glu,
            tied: cfg.tie_embeddings(),
            dropout,
            params: total_params(&cfg),
            matmul_params: matmul_params(&cfg),
            layer_params: cfg.block_params(),
            flops_per_token: flops_per_token(&cfg, seq),
            model: cfg,
        })
    }

    /// A GPT config, planned at sequence length `seq`.
    pub fn from_gpt(name: &str, cfg: &GptConfig, seq: usize) -> Result<ModelShape, PlanError> {
        ModelShape::from_config(name, &ModelConfig::Gpt(cfg.clone()), seq)
    }

    /// A GPT-style decoder given by its columns (the published runs: LayerNorm, GELU MLP of 4h,
    /// biases, tied embedding, Megatron's dropout 0.1), counted by the same code.
    pub fn from_columns(name: &str, layers: usize, hidden: usize, heads: usize, seq: usize, vocab: usize) -> Result<ModelShape, PlanError> {
        let cfg = GptConfig {
            vocab_size: vocab,
            block_size: seq,
            n_layer: layers,
            n_head: heads,
            n_embd: hidden,
            dropout: 0.1,
            bias: true,
            tie_embeddings: true,
            ..GptConfig::default()
        };
        ModelShape::from_gpt(name, &cfg, seq)
    }

    /// Training FLOPs per token of the output projection (and loss): `6·V·h`.
    pub fn head_flops_per_token(&self) -> f64 {
        6.0 * self.vocab as f64 * self.hidden as f64
    }

    /// Training FLOPs per token of one block's attention score and value products (`12·h·T`,
    /// PaLM's convention: no causal saving).
    pub fn attention_flops_per_token(&self) -> f64 {
        12.0 * self.hidden as f64 * self.seq as f64
    }

    /// Training FLOPs per token of one block's weight matmuls: what is left of the trainer's
    /// count after the head and the attention products, per block.
    pub fn dense_flops_per_token(&self) -> f64 {
        (self.flops_per_token - self.head_flops_per_token()) / self.layers as f64 - self.attention_flops_per_token()
    }

    /// Parameters outside the blocks held by the first stage (token and position embeddings).
    pub fn embed_params(&self) -> u64 {
        self.vocab as u64 * self.hidden as u64 + self.model.lookup_only_params()
    }

    /// Parameters outside the blocks held by the last stage (final norm, and the output
    /// projection: the tied embedding's copy, or its own matrix).
    pub fn head_params(&self) -> u64 {
        self.params - self.layers as u64 * self.layer_params - self.embed_params()
            + if self.tied { self.vocab as u64 * self.hidden as u64 } else { 0 }
    }

    /// Blocks per pipeline stage for `parts` stages (the trainer's balanced split: the
    /// embedding and the head count as work).
    pub fn stage_layers(&self, parts: usize) -> Result<Vec<usize>, PlanError> {
        fabbrica_models::balanced_split(&self.model, self.seq, parts).map_err(|e| PlanError::input(e.to_string()))
    }
}

/// Largest sequence, width, layer, head and vocabulary counts the planner accepts (so that no
/// product of them overflows or loses precision).
const MAX_DIM: usize = 1 << 22;

/// The checks the planner needs (the trainer's own `validate` also bounds the vocabulary by its
/// uint16 token files, which a plan for another runtime's data need not respect).
fn check_shape(cfg: &ModelConfig, seq: usize) -> Result<(), PlanError> {
    let fields = [
        ("--seq", seq),
        ("model.n_layer", cfg.n_layer()),
        ("model.n_head", cfg.n_head()),
        ("model.n_embd", cfg.n_embd()),
        ("model.vocab_size", cfg.vocab_size()),
    ];
    for (key, v) in fields {
        if v == 0 || v > MAX_DIM {
            return Err(PlanError::input(format!("{key} = {v} must be in [1, {MAX_DIM}]")));
        }
    }
    if !cfg.n_embd().is_multiple_of(cfg.n_head()) {
        return Err(PlanError::input(format!("model.n_embd = {} must be a multiple of model.n_head ({})", cfg.n_embd(), cfg.n_head())));
    }
    Ok(())
}
