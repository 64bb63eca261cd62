//! Llama 2/3 (Hugging Face's `LlamaForCausalLM`, parameter names included): RMSNorm, rotary
//! position embeddings with Llama 3.1's frequency scaling, grouped-query attention through
//! libtorch's `scaled_dot_product_attention`, SwiGLU MLP, no biases.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::config::{MAX_BLOCK_SIZE, MAX_EMBD, MAX_HEADS, MAX_LAYERS, MAX_VOCAB_SIZE};
use crate::error::{ModelError, Result};
use crate::layers::{Linear, Params};
use crate::tp::{column_forward, TensorParallel};

/// Llama hyper-parameters; names follow ours where GPT has the same key, Hugging Face's
/// `LlamaConfig` otherwise (`config.json` maps onto this, see `hf`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlamaConfig {
    /// Rows of the token embedding. 0 = take the tokenizer's vocabulary size.
    pub vocab_size: usize,
    /// Context length of training sequences (rotary embeddings need no table of positions).
    pub block_size: usize,
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key-value heads (grouped-query attention; `n_head` must be a multiple of it).
    pub n_kv_head: usize,
    /// Model width C; head size is C / n_head.
    pub n_embd: usize,
    /// Inner width of the SwiGLU MLP; 0 = Llama's rule (2/3 of 4C, rounded up to a multiple of 256).
    pub ffn_hidden: usize,
    /// Base of the rotary frequencies (Llama 2: 1e4, Llama 3: 5e5).
    pub rope_theta: f64,
    /// Llama 3.1's long-context frequency scaling (`kind = "none"`: off).
    pub rope_scaling: RopeScaling,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// The output projection is the token embedding (Llama 3.2 1B/3B), else its own `lm_head`.
    pub tie_embeddings: bool,
    /// Dropout on the attention probabilities (Hugging Face's `attention_dropout`), training only.
    pub dropout: f64,
}

/// Llama 3.1's `rope_scaling` (`rope_type = "llama3"`): wavelengths longer than
/// `original_max_position_embeddings / low_freq_factor` are slowed by `factor`, shorter than
/// `.. / high_freq_factor` kept, and those between interpolated smoothly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RopeScaling {
    /// `none` or `llama3`.
    pub kind: RopeKind,
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

crate::config::spelled!(
    /// `model.rope_scaling.kind`: how RoPE frequencies are scaled for long contexts.
    RopeKind, "use \"none\" or \"llama3\" (Llama 3.1's frequency-dependent scaling)", {
        #[default]
        None = "none",
        Llama3 = "llama3",
    }
);

impl Default for RopeScaling {
    fn default() -> Self {
        RopeScaling { kind: RopeKind::None, factor: 1.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 }
    }
}

impl RopeScaling {
    fn llama3(factor: f64) -> RopeScaling {
        RopeScaling { kind: RopeKind::Llama3, factor, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 }
    }
}

impl Default for LlamaConfig {
    fn default() -> Self {
        Self::preset("llama-tiny").expect("llama-tiny preset exists")
    }
}

impl LlamaConfig {
    pub fn preset(name: &str) -> Option<Self> {
        // Llama 3 shapes as published (Meta's params.json / Hugging Face config.json): 128256
        // tokens, theta 5e5, 8 key-value heads; trained at 8192 tokens of context.
        let llama3 = |n_layer, n_head, n_embd, ffn_hidden, tie_embeddings, factor| LlamaConfig {
            vocab_size: 128256,
            block_size: 8192,
            n_layer,
            n_head,
            n_kv_head: 8,
            n_embd,
            ffn_hidden,
            rope_theta: 500000.0,
            rope_scaling: RopeScaling::llama3(factor),
            norm_eps: 1e-5,
            tie_embeddings,
            dropout: 0.0,
        };
        Some(match name {
            // Char level, trains in a few CPU minutes like `tiny`: 4 layers, 4 query heads
            // sharing 2 key-value heads.
            "llama-tiny" => LlamaConfig {
                vocab_size: 0,
                block_size: 128,
                n_layer: 4,
                n_head: 4,
                n_kv_head: 2,
                n_embd: 128,
                ffn_hidden: 352,
                rope_theta: 10000.0,
                rope_scaling: RopeScaling::default(),
                norm_eps: 1e-5,
                tie_embeddings: false,
                dropout: 0.0,
            },
            "llama3.2-1b" => llama3(16, 32, 2048, 8192, true, 32.0),
            "llama3.2-3b" => llama3(28, 24, 3072, 8192, true, 32.0),
            "llama3.1-8b" => llama3(32, 32, 4096, 14336, false, 8.0),
            "llama3.1-70b" => llama3(80, 64, 8192, 28672, false, 8.0),
            "llama3.1-405b" => llama3(126, 128, 16384, 53248, false, 8.0),
            _ => return None,
        })
    }

    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// The SwiGLU inner width: `ffn_hidden`, or for 0 Llama's rule (Meta's `FeedForward`:
    /// 2/3 of 4C, rounded up to a multiple of 256).
    pub fn ffn_hidden(&self) -> usize {
        if self.ffn_hidden > 0 {
            return self.ffn_hidden;
        }
        let h = 2 * (4 * self.n_embd) / 3;
        h.div_ceil(256) * 256
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |key: &'static str, value: String, why: String| Err(ModelError::InvalidConfig { key, value, why });
        let range = |key, value: usize, lo: usize, hi: usize, example: &str| {
            if (lo..=hi).contains(&value) {
                return Ok(());
            }
            bad(key, value.to_string(), format!("must be in [{lo}, {hi}]; set e.g. {key}={example}"))
        };
        if self.vocab_size == 0 {
            return bad("model.vocab_size", "0".into(), "must be resolved from the tokenizer before building".into());
        }
        range("model.vocab_size", self.vocab_size, 1, MAX_VOCAB_SIZE, "128256")?;
        range("model.block_size", self.block_size, 1, MAX_BLOCK_SIZE, "2048")?;
        range("model.n_layer", self.n_layer, 1, MAX_LAYERS, "16")?;
        range("model.n_head", self.n_head, 1, MAX_HEADS, "32")?;
        range("model.n_kv_head", self.n_kv_head, 1, MAX_HEADS, "8")?;
        range("model.n_embd", self.n_embd, 1, MAX_EMBD, "2048")?;
        range("model.ffn_hidden", self.ffn_hidden, 0, 16 * MAX_EMBD, "0 (Llama's rule)")?;
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad("model.n_embd", self.n_embd.to_string(), format!("must be a multiple of model.n_head ({})", self.n_head));
        }
        if !self.head_size().is_multiple_of(2) {
            return bad(
                "model.n_embd",
                self.n_embd.to_string(),
                format!("rotary embeddings need an even head size, but model.n_embd / model.n_head = {}", self.head_size()),
            );
        }
        if !self.n_head.is_multiple_of(self.n_kv_head) {
            return bad(
                "model.n_kv_head",
                self.n_kv_head.to_string(),
                format!("model.n_head ({}) must be a multiple of it: each key-value head serves a whole group of query heads", self.n_head),
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0 && self.rope_theta <= 1e12) {
            return bad("model.rope_theta", self.rope_theta.to_string(), "must be in (1, 1e12]; set e.g. model.rope_theta=500000".into());
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            return bad("model.norm_eps", self.norm_eps.to_string(), "must be in (0, 1); set e.g. model.norm_eps=1e-5".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("model.dropout", self.dropout.to_string(), "must be in [0, 1); set e.g. model.dropout=0.0".into());
        }
        let s = &self.rope_scaling;
        match s.kind {
            RopeKind::None => {}
            RopeKind::Llama3 => {
                if !(s.factor.is_finite() && s.factor >= 1.0 && s.factor <= 1e6) {
                    return bad("model.rope_scaling.factor", s.factor.to_string(), "must be in [1, 1e6]; set e.g. 8".into());
                }
                if !(s.low_freq_factor.is_finite()
                    && s.high_freq_factor.is_finite()
                    && 0.0 < s.low_freq_factor
                    && s.low_freq_factor < s.high_freq_factor)
                {
                    return bad(
                        "model.rope_scaling.low_freq_factor",
                        s.low_freq_factor.to_string(),
                        format!("must be positive and below model.rope_scaling.high_freq_factor ({}); Llama 3.1 uses 1 and 4", s.high_freq_factor),
                    );
                }
                range("model.rope_scaling.original_max_position_embeddings", s.original_max_position_embeddings, 1, MAX_BLOCK_SIZE, "8192")?;
            }
        }
        Ok(())
    }

    /// The rotary inverse frequencies (head_size / 2), in fp32 as Hugging Face computes them
    /// (`_compute_default_rope_parameters`, `_compute_llama3_parameters`).
    pub fn inv_freq(&self) -> Tensor {
        let hs = self.head_size() as i64;
        let exps = Tensor::arange_start_step(0, hs, 2, (Kind::Int64, tch::Device::Cpu)).to_kind(Kind::Float) / hs as f64;
        let inv = Tensor::from(self.rope_theta as f32).pow(&exps).reciprocal();
        let s = &self.rope_scaling;
        if s.kind != RopeKind::Llama3 {
            return inv;
        }
        let old = s.original_max_position_embeddings as f64;
        let low_wavelen = old / s.low_freq_factor;
        let high_wavelen = old / s.high_freq_factor;
        let wavelen = inv.reciprocal() * (2.0 * std::f64::consts::PI);
        let scaled = inv.where_self(&wavelen.le(low_wavelen), &(&inv / s.factor));
        let smooth = (old / &wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        let smoothed: Tensor = (smooth.ones_like() - &smooth) * &scaled / s.factor + &smooth * &scaled;
        let medium = wavelen.ge(high_wavelen).logical_and(&wavelen.le(low_wavelen));
        smoothed.where_self(&medium, &scaled)
    }
}

/// The cos and sin tables for positions `0..t` (each `(t, head_size)`, fp32, Hugging Face's
/// layout: the frequencies repeated over the two halves of a head).
pub fn rope_tables(cfg: &LlamaConfig, t: i64, device: tch::Device) -> (Tensor, Tensor) {
    let inv = cfg.inv_freq().to_device(device);
    let pos = Tensor::arange(t, (Kind::Float, device));
    let freqs = pos.unsqueeze(1).matmul(&inv.unsqueeze(0)); // (t, hs/2)
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.cos(), emb.sin())
}

/// `q·cos + rotate_half(q)·sin` over (B, heads, T, hs), in the dtype of `x`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let hs = x.size()[3];
    let (x1, x2) = (x.narrow(3, 0, hs / 2), x.narrow(3, hs / 2, hs / 2));
    let rotated = Tensor::cat(&[&(-x2), &x1], -1);
    let kind = x.kind();
    x * cos.to_kind(kind) + rotated * sin.to_kind(kind)
}

/// Hugging Face's `LlamaRMSNorm`: in fp32, `x / sqrt(mean(x²) + eps)`, back to the input dtype,
/// times the weight.
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(ps: &mut Params, p: &tch::nn::Path, dim: i64, eps: f64) -> Self {
        RmsNorm { weight: ps.var(p, "weight", &[dim], tch::nn::Init::Const(1.0)), eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = x.to_kind(Kind::Float);
        let var = h.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let h = h * (var + self.eps).rsqrt();
        &self.weight * h.to_kind(kind)
    }

    pub fn shallow(&self) -> RmsNorm {
        RmsNorm { weight: self.weight.shallow_clone(), eps: self.eps }
    }
}

/// One decoder layer: `x + o(attn(norm(x)))`, then `h + down(silu(gate(norm(h))) · up(norm(h)))`.
pub struct LlamaBlock {
    pub input_layernorm: RmsNorm,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub post_attention_layernorm: RmsNorm,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl LlamaBlock {
    /// Registers layer `i`'s parameters under `model.layers.{i}` (Hugging Face's names):
    /// N(0, std) weights, the residual projections (o, down) at `proj_std`, norms at 1. With
    /// tensor parallelism q/k/v (by heads: every rank holds whole key-value heads) and gate/up
    /// are column-parallel, o and down row-parallel.
    pub fn new(ps: &mut Params, p: &tch::nn::Path, cfg: &LlamaConfig, std: f64, proj_std: f64) -> LlamaBlock {
        let (c, kv, f) = (cfg.n_embd as i64, (cfg.n_kv_head * cfg.head_size()) as i64, cfg.ffn_hidden() as i64);
        let (a, m) = (p.sub("self_attn"), p.sub("mlp"));
        LlamaBlock {
            input_layernorm: RmsNorm::new(ps, &p.sub("input_layernorm"), c, cfg.norm_eps),
            q_proj: Linear::column(ps, &a.sub("q_proj"), c, c, false, std, 1),
            k_proj: Linear::column(ps, &a.sub("k_proj"), c, kv, false, std, 1),
            v_proj: Linear::column(ps, &a.sub("v_proj"), c, kv, false, std, 1),
            o_proj: Linear::row(ps, &a.sub("o_proj"), c, c, false, proj_std),
            post_attention_layernorm: RmsNorm::new(ps, &p.sub("post_attention_layernorm"), c, cfg.norm_eps),
            gate_proj: Linear::column(ps, &m.sub("gate_proj"), c, f, false, std, 1),
            up_proj: Linear::column(ps, &m.sub("up_proj"), c, f, false, std, 1),
            down_proj: Linear::row(ps, &m.sub("down_proj"), f, c, false, proj_std),
        }
    }

    /// Handles to the same parameters (for a recompute closure that must own what it runs).
    pub fn shallow(&self) -> LlamaBlock {
        LlamaBlock {
            input_layernorm: self.input_layernorm.shallow(),
            q_proj: self.q_proj.shallow(),
            k_proj: self.k_proj.shallow(),
            v_proj: self.v_proj.shallow(),
            o_proj: self.o_proj.shallow(),
            post_attention_layernorm: self.post_attention_layernorm.shallow(),
            gate_proj: self.gate_proj.shallow(),
            up_proj: self.up_proj.shallow(),
            down_proj: self.down_proj.shallow(),
        }
    }

    /// Queries, keys and values (B, heads, T, hs) with rotary embeddings applied; keys and values
    /// have `n_kv_head` heads (with tensor parallelism this rank's `n_head/tp` and `n_kv_head/tp`,
    /// over the whole sequence).
    /// `bt` = (B, T): with sequence parallelism `x` is this rank's (B·T/tp, C) token shard.
    pub fn qkv(
        &self,
        cfg: &LlamaConfig,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        tp: Option<&TensorParallel>,
        bt: (i64, i64),
    ) -> (Tensor, Tensor, Tensor) {
        let mut qkv = column_forward(tp, &self.input_layernorm.forward(x), &[&self.q_proj, &self.k_proj, &self.v_proj], bt);
        let (b, t) = bt;
        let hs = cfg.head_size() as i64;
        let n = tp.map_or(1, |p| p.size);
        let heads = |z: Tensor, heads: usize| z.view([b, t, (heads / n) as i64, hs]).transpose(1, 2);
        let v = heads(qkv.remove(2), cfg.n_kv_head);
        let k = heads(qkv.remove(1), cfg.n_kv_head);
        let q = heads(qkv.remove(0), cfg.n_head);
        (apply_rope(&q, cos, sin), apply_rope(&k, cos, sin), v)
    }

    /// The rest of the layer after the attention core: output projection, residual, MLP.
    pub fn finish(&self, x: &Tensor, y: &Tensor, tp: Option<&TensorParallel>, bt: (i64, i64)) -> Tensor {
        let (b, nh, t, hs) = y.size4().expect("y is (B, H, T, hs)");
        let y = y.transpose(1, 2).contiguous().view([b, t, nh * hs]);
        let h = x + self.o_proj.row_forward(&y, tp);
        let gate_up = column_forward(tp, &self.post_attention_layernorm.forward(&h), &[&self.gate_proj, &self.up_proj], bt);
        let mlp = self.down_proj.row_forward(&(gate_up[0].silu() * &gate_up[1]), tp);
        h + mlp
    }
}

/// Causal attention of (B, H, T, hs) queries over (B, KV, T, hs) keys and values: each group of
/// `H / KV` query heads shares one key-value head (Hugging Face's `repeat_kv`).
pub fn attention_core(q: &Tensor, k: &Tensor, v: &Tensor, dropout: f64) -> Tensor {
    let (b, h, t, hs) = q.size4().expect("q is (B, H, T, hs)");
    let kv = k.size()[1];
    let repeat = |z: &Tensor| {
        if kv == h {
            z.shallow_clone()
        } else {
            z.unsqueeze(2).expand([b, kv, h / kv, t, hs], false).reshape([b, h, t, hs])
        }
    };
    Tensor::scaled_dot_product_attention(q, &repeat(k), &repeat(v), None::<Tensor>, dropout, true, None, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llamas_rounding_rule_gives_the_published_widths() {
        // Llama 2 7B: C 4096 → 11008 (2/3·4C = 10922, rounded up to 256).
        let c = LlamaConfig { n_embd: 4096, n_head: 32, n_kv_head: 32, ffn_hidden: 0, ..LlamaConfig::default() };
        assert_eq!(c.ffn_hidden(), 11008);
        assert_eq!(LlamaConfig { ffn_hidden: 352, ..c }.ffn_hidden(), 352);
    }

    #[test]
    fn invalid_fields_name_their_key() {
        let ok = LlamaConfig { vocab_size: 65, ..LlamaConfig::default() };
        ok.validate().unwrap();
        let cases = [
            ("model.n_kv_head", LlamaConfig { n_kv_head: 3, ..ok.clone() }),
            ("model.n_embd", LlamaConfig { n_embd: 130, ..ok.clone() }),
            ("model.rope_theta", LlamaConfig { rope_theta: f64::NAN, ..ok.clone() }),
            ("model.norm_eps", LlamaConfig { norm_eps: 0.0, ..ok.clone() }),
            ("model.rope_scaling.factor", LlamaConfig { rope_scaling: RopeScaling { factor: 0.5, ..RopeScaling::llama3(8.0) }, ..ok.clone() }),
            ("model.vocab_size", LlamaConfig { vocab_size: 0, ..ok.clone() }),
        ];
        for (key, c) in cases {
            let msg = c.validate().unwrap_err().to_string();
            assert!(msg.starts_with(key), "{key}: {msg}");
        }
        let msg = LlamaConfig { n_kv_head: 3, ..ok }.validate().unwrap_err().to_string();
        assert!(msg.contains("model.n_head (4) must be a multiple"), "{msg}");
    }

    #[test]
    fn llama3_scaling_slows_only_the_low_frequencies() {
        let base = LlamaConfig { vocab_size: 10, n_embd: 128, n_head: 2, n_kv_head: 1, rope_theta: 500000.0, ..LlamaConfig::default() };
        let scaled = LlamaConfig { rope_scaling: RopeScaling::llama3(8.0), ..base.clone() };
        let (a, b): (Vec<f32>, Vec<f32>) = (Vec::try_from(base.inv_freq()).unwrap(), Vec::try_from(scaled.inv_freq()).unwrap());
        assert_eq!(a.len(), 32);
        // The highest frequency (wavelength 2π < 8192/4) is unchanged; the lowest is divided by 8.
        assert_eq!(a[0], b[0]);
        assert!((a[31] / b[31] - 8.0).abs() < 1e-5, "{} {}", a[31], b[31]);
        assert!(a.iter().zip(&b).all(|(x, y)| y <= x));
    }
}
