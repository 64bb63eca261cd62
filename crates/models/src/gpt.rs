//! GPT-2 (nanoGPT's model.py) blocks: pre-LayerNorm, causal self-attention through libtorch's
//! `scaled_dot_product_attention` (flash attention on CUDA), GELU MLP. The embeddings (token +
//! learned positions), the final LayerNorm and the tied output projection live in `model.rs`.

use tch::Tensor;

use crate::config::GptConfig;
use crate::layers::{LayerNorm, Linear, Params};
use crate::tp::{column_forward, outer_dropout, TensorParallel};

/// One block: `x + attn(ln_1(x))`, then `h + mlp(ln_2(h))`.
pub struct GptBlock {
    pub ln_1: LayerNorm,
    pub c_attn: Linear, // C -> 3C (q, k, v)
    pub attn_proj: Linear,
    pub ln_2: LayerNorm,
    pub c_fc: Linear, // C -> 4C
    pub mlp_proj: Linear,
}

impl GptBlock {
    /// Registers block `i`'s parameters under `transformer.h.{i}` (nanoGPT's and Hugging Face's
    /// names): N(0, std) weights, residual projections (`c_proj`) at `proj_std`, zero biases.
    /// With tensor parallelism `c_attn` (by heads, of q, k and v each) and `c_fc` are
    /// column-parallel, the two `c_proj` row-parallel.
    pub fn new(ps: &mut Params, p: &tch::nn::Path, cfg: &GptConfig, std: f64, proj_std: f64) -> GptBlock {
        let c = cfg.n_embd as i64;
        let (a, m) = (p.sub("attn"), p.sub("mlp"));
        GptBlock {
            ln_1: LayerNorm::new(ps, &p.sub("ln_1"), c, cfg.bias),
            c_attn: Linear::column(ps, &a.sub("c_attn"), c, 3 * c, cfg.bias, std, 3),
            attn_proj: Linear::row(ps, &a.sub("c_proj"), c, c, cfg.bias, proj_std),
            ln_2: LayerNorm::new(ps, &p.sub("ln_2"), c, cfg.bias),
            c_fc: Linear::column(ps, &m.sub("c_fc"), c, 4 * c, cfg.bias, std, 1),
            mlp_proj: Linear::row(ps, &m.sub("c_proj"), 4 * c, c, cfg.bias, proj_std),
        }
    }

    /// Handles to the same parameters (for a recompute closure that must own what it runs).
    pub fn shallow(&self) -> GptBlock {
        GptBlock {
            ln_1: self.ln_1.shallow(),
            c_attn: self.c_attn.shallow(),
            attn_proj: self.attn_proj.shallow(),
            ln_2: self.ln_2.shallow(),
            c_fc: self.c_fc.shallow(),
            mlp_proj: self.mlp_proj.shallow(),
        }
    }

    /// Queries, keys and values, each (B, nh, T, hs): with tensor parallelism this rank's
    /// nh/tp heads, over the whole sequence.
    /// `bt` = (B, T): with sequence parallelism `x` is this rank's (B·T/tp, C) token shard.
    pub fn qkv(&self, cfg: &GptConfig, x: &Tensor, tp: Option<&TensorParallel>, bt: (i64, i64)) -> (Tensor, Tensor, Tensor) {
        let fused = column_forward(tp, &self.ln_1.forward(x), &[&self.c_attn], bt).remove(0); // (B, T, 3C/tp)
        let (b, t) = bt;
        let n = tp.map_or(1, |p| p.size) as i64;
        let (nh, c) = (cfg.n_head as i64 / n, cfg.n_embd as i64 / n);
        let qkv = fused.split(c, 2); // 3 × (B, T, C/tp)
        let heads = |z: &Tensor| z.view([b, t, nh, c / nh]).transpose(1, 2);
        (heads(&qkv[0]), heads(&qkv[1]), heads(&qkv[2]))
    }

    /// The rest of the block after the attention core `y` (B, nh, T, hs): projection, residual
    /// dropout and add, MLP.
    pub fn finish(&self, cfg: &GptConfig, x: &Tensor, y: &Tensor, train: bool, tp: Option<&TensorParallel>, bt: (i64, i64)) -> Tensor {
        let (b, nh, t, hs) = y.size4().expect("y is (B, nh, T, hs)");
        let y = y.transpose(1, 2).contiguous().view([b, t, nh * hs]);
        let h = x + outer_dropout(tp, &self.attn_proj.row_forward(&y, tp), cfg.dropout, train);
        let approximate = cfg.activation.approximate();
        let inner = column_forward(tp, &self.ln_2.forward(&h), &[&self.c_fc], bt).remove(0).gelu(approximate);
        let m = outer_dropout(tp, &self.mlp_proj.row_forward(&inner, tp), cfg.dropout, train);
        h + m
    }
}

/// Causal self-attention of (B, nh, T, hs) queries, keys and values, with dropout on the weights.
pub fn attention_core(q: &Tensor, k: &Tensor, v: &Tensor, dropout: f64) -> Tensor {
    Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, dropout, true, None, false)
}
