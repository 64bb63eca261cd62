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

/// Total parameters including position embeddings (what `Gpt::num_params` returns), and the
/// token embedding a second time when the output projection is untied (the first copy is a
/// lookup; `matmul_params` counts the projection).
pub fn total_params(cfg: &GptConfig) -> u64 {
    let untied = if cfg.tie_embeddings { 0 } else { (cfg.vocab_size * cfg.n_embd) as u64 };
    matmul_params(cfg) + (cfg.block_size * cfg.n_embd) as u64 + untied
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

/// Estimate for fp32 master weights and grads, two fp32 AdamW moments, and the activations of a
/// training micro-step at `batch` × `seq_len`, with the attention kernel libtorch picks for
/// `half_precision_activations` (see [`memory_estimate_with`]: CPU training with dropout keeps the
/// T×T attention matrix). Excludes the process's own footprint (libtorch, data; about 0.4 GiB on
/// the CPU).
pub fn memory_estimate(cfg: &GptConfig, batch: usize, seq_len: usize, half_precision_activations: bool) -> MemoryEstimate {
    let materialised = !half_precision_activations && cfg.dropout > 0.0;
    memory_estimate_with(cfg, batch, seq_len, half_precision_activations, materialised)
}

/// As [`memory_estimate`], saying whether attention runs through libtorch's math path, which
/// keeps the B·H·T×T scores, softmax and dropout for backward (`materialised_attention`: on the
/// CPU when dropout is on, since its fused kernel has no dropout; fused kernels keep only the
/// output and a log-sum-exp).
///
/// Activations, per layer, `s·b·h` bytes × 82 in fp32 (41 for 16-bit autocast): measured peak
/// RSS of fp32 CPU training (tiny and gpt2-124m shapes, libtorch 2.11) gives 20.5 fp32 values
/// per token and channel — the 17 tensors of Korthikanti et al. (2022) (input, LayerNorm outputs,
/// q/k/v, attention output and its contiguous copy, MLP 4h input and GELU output) plus about
/// 3.5 of kernel workspace and the backward pass's transient gradients. Dropout adds the two
/// residual dropouts' masks (fp32 on the CPU). Once per model: the embedding sum and the final
/// LayerNorm, and the logits, whose peak is in backward where the saved log-softmax, the NLL
/// gradient and the log-softmax gradient (three B·T·V fp32 tensors, the loss is computed in fp32
/// even under autocast) coexist, or later the logits' gradient and the tied embedding's V×C
/// gradient, whichever is larger. Under autocast, the bf16 copies of the weights.
pub fn memory_estimate_with(
    cfg: &GptConfig,
    batch: usize,
    seq_len: usize,
    half_precision_activations: bool,
    materialised_attention: bool,
) -> MemoryEstimate {
    let n = total_params(cfg);
    let l = cfg.n_layer as u64;
    let a = activation_parts(cfg, batch, seq_len, half_precision_activations, materialised_attention);
    let weight_copies = if half_precision_activations { 2 * matmul_params(cfg) } else { 0 };
    MemoryEstimate { params: 4 * n, grads: 4 * n, optimizer: 8 * n, activations: l * a.per_layer + a.embed + a.head + a.logits + weight_copies }
}

/// Activation bytes of one micro-batch by part of the model (see [`memory_estimate_with`]).
struct ActivationParts {
    per_layer: u64,
    /// Embedding sum and its dropout's noise (the first stage).
    embed: u64,
    /// Final LayerNorm input and output (the last stage).
    head: u64,
    /// Peak of the logits and their gradients (the last stage).
    logits: u64,
}

fn activation_parts(cfg: &GptConfig, batch: usize, seq_len: usize, half: bool, materialised_attention: bool) -> ActivationParts {
    let (b, t, c, v) = (batch as u64, seq_len as u64, cfg.n_embd as u64, cfg.vocab_size as u64);
    let sbh = b * t * c;
    let dropout = cfg.dropout > 0.0;
    let mut per_layer = if half { 41 * sbh } else { 82 * sbh };
    if dropout {
        // Two residual dropouts: fp32 noise on the CPU's path, bool masks in the fused kernel.
        per_layer += if half { 2 * sbh } else { 8 * sbh };
    }
    if materialised_attention {
        // Scores, softmax, dropout noise and its product, and a backward temporary: 5 fp32 copies.
        per_layer += 20 * b * cfg.n_head as u64 * t * t;
    }
    let btv = b * t * v;
    // Embedding sum and final LayerNorm input/output (the residual stream is fp32), plus the
    // embedding dropout's noise.
    ActivationParts { per_layer, embed: sbh * 4 * (1 + dropout as u64), head: sbh * 4, logits: (3 * btv).max(btv + v * c) * 4 }
}

/// As [`memory_estimate_with`], for a pipeline rank holding the stages `specs` with
/// `in_flight` micro-batches' activations held at its peak (what the schedule's simulation
/// says: `pp - rank` for 1F1B, every micro-batch for GPipe). Weights, gradients and AdamW state
/// are those of the stages held (the tied embedding's copy included); each micro-batch in flight
/// keeps the activations of the blocks held (and the embedding output on the first stage, the
/// log-softmax on the last), plus one micro-batch's transient logits peak on the last stage.
pub fn stage_memory_estimate(
    cfg: &GptConfig,
    specs: &[crate::gpt::StageSpec],
    batch: usize,
    seq_len: usize,
    half_precision_activations: bool,
    materialised_attention: bool,
    in_flight: usize,
) -> MemoryEstimate {
    let n: u64 = specs.iter().map(|s| crate::stages::stage_params(cfg, s)).sum();
    let a = activation_parts(cfg, batch, seq_len, half_precision_activations, materialised_attention);
    let (b, t, v) = (batch as u64, seq_len as u64, cfg.vocab_size as u64);
    // The most expensive chunk bounds what one micro-batch in flight holds.
    let per_micro = specs
        .iter()
        .map(|s| s.blocks.len() as u64 * a.per_layer + if s.embed { a.embed } else { 0 } + if s.head { a.head + 4 * b * t * v } else { 0 })
        .max()
        .unwrap_or(0);
    let transient = if specs.iter().any(|s| s.head) { a.logits.saturating_sub(4 * b * t * v) } else { 0 };
    // bf16 copies of the matmul weights (position embeddings are a lookup).
    let wpe = if specs.iter().any(|s| s.embed) { (cfg.block_size * cfg.n_embd) as u64 } else { 0 };
    let weight_copies = if half_precision_activations { 2 * (n - wpe) } else { 0 };
    MemoryEstimate { params: 4 * n, grads: 4 * n, optimizer: 8 * n, activations: in_flight.max(1) as u64 * per_micro + transient + weight_copies }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_model_stage_estimates_like_the_model_and_stages_split_it() {
        use crate::gpt::StageSpec;
        let mut g = GptConfig::preset("gpt2-124m").unwrap();
        g.dropout = 0.1;
        for half in [false, true] {
            let whole = memory_estimate_with(&g, 4, 1024, half, !half);
            assert_eq!(stage_memory_estimate(&g, &[StageSpec::whole(12)], 4, 1024, half, !half, 1), whole);
            // Four stages, one micro-batch each in flight: weights add up to the model plus the
            // tied copy, activations to about the model's (each stage's own part).
            let specs = StageSpec::split(&[3, 3, 3, 3]);
            let parts: Vec<MemoryEstimate> =
                specs.iter().map(|s| stage_memory_estimate(&g, std::slice::from_ref(s), 4, 1024, half, !half, 1)).collect();
            let params: u64 = parts.iter().map(|p| p.params).sum();
            assert_eq!(params, whole.params + 4 * (g.vocab_size * g.n_embd) as u64);
            // More micro-batches in flight hold proportionally more (1F1B's first stage holds pp).
            let four = stage_memory_estimate(&g, &specs[1..2], 4, 1024, half, !half, 4);
            let one = &parts[1];
            let w = if half { 2 * (one.params / 4) } else { 0 };
            assert_eq!(four.activations - w, 4 * (one.activations - w));
        }
    }

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

    /// Measured peak RSS of `fabbrica train` on the CPU (fp32, libtorch 2.11, 2 steps, VmHWM
    /// before evaluation and checkpoint), less about 0.4 GiB of process footprint: the estimate
    /// must be within 15% of it, so the memory check neither refuses runs that fit nor waves
    /// through runs that are far over.
    #[test]
    fn memory_estimate_matches_measured_cpu_training() {
        let gib = |x: f64| x * (1u64 << 30) as f64;
        let tiny = GptConfig { vocab_size: 101, ..GptConfig::preset("tiny").unwrap() };
        let g124_full = GptConfig::preset("gpt2-124m").unwrap();
        let g124 = GptConfig { block_size: 256, ..g124_full.clone() };
        let g124_1 = GptConfig { n_layer: 1, ..g124.clone() };
        let g124_char = GptConfig { vocab_size: 101, ..g124.clone() };
        let tiny_dropout = GptConfig { dropout: 0.1, ..tiny.clone() };
        // (model, micro-batch, measured peak RSS in MiB)
        let runs: [(&GptConfig, usize, f64); 7] = [
            (&tiny, 256, 1769.0),
            (&tiny, 128, 1064.0),
            (&tiny_dropout, 128, 1791.0),
            (&g124_full, 2, 4987.0),
            (&g124, 4, 3594.0),
            (&g124_char, 4, 2470.0),
            (&g124_1, 8, 2532.0),
        ];
        for (cfg, b, rss_mib) in runs {
            let measured = rss_mib * (1u64 << 20) as f64 - gib(0.4);
            let est = memory_estimate(cfg, b, cfg.block_size, false).total() as f64;
            let err = (est - measured) / measured;
            assert!(
                err.abs() < 0.15,
                "{cfg:?} at batch {b}: estimate {:.2} GiB, measured {:.2} GiB ({:+.0}%)",
                est / gib(1.0),
                measured / gib(1.0),
                100.0 * err
            );
        }
    }
}
