//! Cost model: FLOPs per token (for MFU) and a memory estimate (for `--dry-run`).

use crate::config::GptConfig;

/// Parameters counted the way the cost model needs them: every weight once (the tied embedding
/// once), and position embeddings excluded, since they are a lookup and do no matmul work.
pub fn matmul_params(cfg: &GptConfig) -> u64 {
    let (v, c, l) = (cfg.vocab_size as u64, cfg.n_embd as u64, cfg.n_layer as u64);
    let b = cfg.bias as u64;
    // Per block: c_attn C·3C (+3C), attn c_proj C·C (+C), c_fc C·4C (+4C), mlp c_proj 4C·C (+C),
    // ln_1 and ln_2 (C weights + C biases each).
    let per_block = 12 * c * c + b * 9 * c + 2 * c + b * 2 * c;
    v * c + l * per_block + c + b * c // + ln_f
}

/// Total parameters including position embeddings (what `Gpt::num_params` returns).
pub fn total_params(cfg: &GptConfig) -> u64 {
    matmul_params(cfg) + (cfg.block_size * cfg.n_embd) as u64
}

/// Training FLOPs per token, PaLM's convention (Chowdhery et al. 2022, appendix B):
/// `6·N + 12·L·H·Q·T`, where N = `matmul_params`, L layers, H heads, Q head size, T the sequence
/// length. 6N is forward (2N) plus backward (4N) of every weight matmul; 12·L·H·Q·T is the
/// attention score and value matmuls (QKᵀ and AV), forward and backward, without causal savings.
pub fn flops_per_token(cfg: &GptConfig, seq_len: usize) -> f64 {
    let n = matmul_params(cfg) as f64;
    let (l, h, q, t) = (cfg.n_layer as f64, cfg.n_head as f64, cfg.head_size() as f64, seq_len as f64);
    6.0 * n + 12.0 * l * h * q * t
}

/// Bytes per device for training with AdamW, by component.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    pub params: u64,
    pub grads: u64,
    pub optimizer: u64,
    pub activations: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.params + self.grads + self.optimizer + self.activations
    }
}

/// Estimate for fp32 master weights and grads, two fp32 AdamW moments, and activations saved
/// for backward at micro-batch `batch` × `seq_len`. Activations follow Korthikanti et al. (2022),
/// per layer `s·b·h·34` bytes in 16-bit precision (doubled for fp32), with no `5·a·s²·b` attention
/// term because scaled_dot_product_attention does not keep the T×T score matrix; plus the
/// logits (B·T·V in fp32, twice: value and gradient).
pub fn memory_estimate(cfg: &GptConfig, batch: usize, seq_len: usize, half_precision_activations: bool) -> MemoryEstimate {
    let n = total_params(cfg);
    let sbh = (batch * seq_len * cfg.n_embd) as u64;
    let act_scale = if half_precision_activations { 1 } else { 2 };
    let per_layer = sbh * 34 * act_scale;
    let logits = (batch * seq_len * cfg.vocab_size) as u64 * 4 * 2;
    MemoryEstimate { params: 4 * n, grads: 4 * n, optimizer: 8 * n, activations: cfg.n_layer as u64 * per_layer + logits }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_124m_counts_match_the_published_model() {
        // GPT-2 small with the unpadded vocabulary has 124,439,808 parameters (HF/nanoGPT count,
        // tied embedding once, position embeddings included).
        let mut cfg = GptConfig::preset("gpt2-124m").unwrap();
        cfg.vocab_size = 50257;
        assert_eq!(total_params(&cfg), 124_439_808);
        assert_eq!(matmul_params(&cfg), 124_439_808 - 1024 * 768);
    }

    #[test]
    fn flops_follow_palm() {
        let mut cfg = GptConfig::preset("gpt2-124m").unwrap();
        cfg.vocab_size = 50257;
        let n = (124_439_808 - 1024 * 768) as f64;
        let expected = 6.0 * n + 12.0 * 12.0 * 12.0 * 64.0 * 1024.0;
        assert_eq!(flops_per_token(&cfg, 1024), expected);
        // Attention term grows with the sequence length, the 6N term does not.
        assert!(flops_per_token(&cfg, 2048) - flops_per_token(&cfg, 1024) == 12.0 * 12.0 * 12.0 * 64.0 * 1024.0);
    }

    #[test]
    fn memory_estimate_scales_with_batch() {
        let cfg = GptConfig { vocab_size: 65, ..GptConfig::default() };
        let a = memory_estimate(&cfg, 8, 128, false);
        let b = memory_estimate(&cfg, 16, 128, false);
        assert_eq!(a.params, b.params);
        assert_eq!(2 * a.activations, b.activations);
        assert_eq!(a.optimizer, 2 * a.params);
    }
}
