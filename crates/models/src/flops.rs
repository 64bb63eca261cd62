//! Cost model: FLOPs per token (for MFU) and a memory estimate (for `--dry-run`).

use crate::arch::ModelConfig;
use crate::model::{Recompute, StageSpec};

/// Parameters counted the way the cost model needs them: every weight once (the tied embedding
/// once), and what is only looked up excluded (GPT's position embeddings, an untied model's input
/// embedding), since lookups do no matmul work.
pub fn matmul_params(cfg: &ModelConfig) -> u64 {
    let (v, c, l) = (cfg.vocab_size() as u64, cfg.n_embd() as u64, cfg.n_layer() as u64);
    v * c + l * cfg.block_params() + cfg.final_norm_params()
}

/// Total parameters (what `Model::num_params` returns): the matmul parameters, the position
/// embeddings, and the token embedding a second time when the output projection is untied.
pub fn total_params(cfg: &ModelConfig) -> u64 {
    let untied = if cfg.tie_embeddings() { 0 } else { (cfg.vocab_size() * cfg.n_embd()) as u64 };
    matmul_params(cfg) + cfg.lookup_only_params() + untied
}

/// Training FLOPs per token, PaLM's convention (Chowdhery et al. 2022, appendix B):
/// `6·N + 12·L·H·Q·T`, where N = `matmul_params`, L layers, H query heads, Q head size, T the
/// sequence length. 6N is forward (2N) plus backward (4N) of every weight matmul — with grouped-
/// query attention N has the smaller K and V projections, with SwiGLU three MLP matrices;
/// 12·L·H·Q·T is the attention score and value matmuls (QKᵀ and AV), forward and backward, over
/// every query head (a shared key-value head saves parameters, not these FLOPs), without causal
/// savings. Recompute adds work but not model FLOPs: MFU stays comparable across settings.
pub fn flops_per_token(cfg: &ModelConfig, seq_len: usize) -> f64 {
    let n = matmul_params(cfg) as f64;
    let (l, h, q, t) = (cfg.n_layer() as f64, cfg.n_head() as f64, cfg.head_size() as f64, seq_len as f64);
    6.0 * n + 12.0 * l * h * q * t
}

/// Bytes per device for training with AdamW, by component.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    pub params: u64,
    pub grads: u64,
    pub optimizer: u64,
    pub activations: u64,
    /// Of `activations`, the logits' share (the logits, their gradient, the log-softmax the loss
    /// keeps): allocations of B·T·V floats, far above glibc's mmap threshold (32 MiB at most), so
    /// mapped and unmapped whole and resident exactly as allocated.
    pub logits: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.params + self.grads + self.optimizer + self.activations
    }

    /// What the process holds on the CPU for what libtorch allocates: glibc's malloc and
    /// oneDNN's workspaces keep about [`CPU_ACTIVATION_OVERHEAD`] resident bytes per allocated
    /// byte of activations (fitted on measured peak RSS; `crates/cli/tests/memory.rs` measures it run by run).
    /// The estimate itself is what the allocator hands out, as CUDA's `max_memory_allocated`.
    pub fn resident_on_cpu(self) -> MemoryEstimate {
        let heap = self.activations.saturating_sub(self.logits);
        MemoryEstimate { activations: (heap as f64 * CPU_ACTIVATION_OVERHEAD) as u64 + self.logits, ..self }
    }
}

/// Peak resident bytes per allocated byte of activations on the CPU (see
/// [`MemoryEstimate::resident_on_cpu`]).
pub const CPU_ACTIVATION_OVERHEAD: f64 = 1.28;

/// How attention keeps what its backward needs: whether the B·H·T×T scores stay, and how many
/// bytes each takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attention {
    /// A fused kernel (flash attention, SDPA's fused paths, on CUDA also with dropout): the
    /// output and a log-sum-exp per row, nothing per score.
    Fused,
    /// libtorch's math path, which the CPU takes when dropout is on: per score the softmax
    /// output, the dropout noise and the dropped-out product, fp32 (12 bytes; with bf16 inputs
    /// the softmax is kept in fp32 besides: 13.5 bytes, measured by `tests/activation_memory.rs`).
    Math,
    /// A GPU's attention before flash attention, with a fused softmax-dropout kernel
    /// (Megatron-LM 2021): 16-bit scores, a 1-byte mask and the 16-bit dropout output, 5 bytes
    /// per score (Korthikanti et al. 2022, Table 2); 10 in fp32.
    Unfused,
}

impl Attention {
    /// Bytes kept per attention score (0 for a fused kernel).
    pub fn bytes_per_score(self, half: bool) -> f64 {
        match (self, half) {
            (Attention::Fused, _) => 0.0,
            (Attention::Math, false) => 12.0,
            (Attention::Math, true) => 13.5,
            (Attention::Unfused, true) => 5.0,
            (Attention::Unfused, false) => 10.0,
        }
    }
}

/// Estimate for fp32 master weights and grads, two fp32 AdamW moments, and the activations of a
/// training micro-step at `batch` × `seq_len`, with the attention kernel libtorch picks for each
/// device's default precision: fp32 on the CPU, where dropout means the math path that keeps the
/// T×T scores, and bf16 on CUDA, fused (see [`memory_estimate_with`] for any other pairing). Excludes the process's own footprint (libtorch, data; about 0.4 GiB on
/// the CPU).
pub fn memory_estimate(cfg: &ModelConfig, batch: usize, seq_len: usize, half_precision_activations: bool) -> MemoryEstimate {
    let attention = if !half_precision_activations && cfg.dropout() > 0.0 { Attention::Math } else { Attention::Fused };
    memory_estimate_with(cfg, batch, seq_len, half_precision_activations, attention, Recompute::None)
}

/// As [`memory_estimate`], saying whether attention runs through libtorch's math path, which
/// keeps the B·H·T×T scores, softmax and dropout for backward ([`Attention::Math`]: on the
/// CPU when dropout is on, since its fused kernel has no dropout; fused kernels keep only the
/// output and a log-sum-exp).
///
/// Activations are what libtorch's allocator hands out (CUDA's `max_memory_allocated`; on the CPU
/// see [`MemoryEstimate::resident_on_cpu`]): per layer, the tensors autograd keeps
/// ([`block_bytes_per_token`]: 64 bytes per token and channel for GPT in fp32, 36 under bf16
/// autocast), and with the math attention path the scores' softmax, dropout noise and product.
/// Dropout adds the two residual dropouts' masks (fp32 on the CPU). Once per model: the gradients
/// in flight during backward, the embedding sum and the final norm's input, and the logits, whose
/// peak is in backward where the saved log-softmax, the NLL
/// gradient and the log-softmax gradient (three B·T·V fp32 tensors, the loss is computed in fp32
/// even under autocast) coexist, or later the logits' gradient and the tied embedding's V×C
/// gradient, whichever is larger. Under autocast, the bf16 copies of the weights.
pub fn memory_estimate_with(
    cfg: &ModelConfig,
    batch: usize,
    seq_len: usize,
    half_precision_activations: bool,
    attention: Attention,
    recompute: Recompute,
) -> MemoryEstimate {
    let n = total_params(cfg);
    let l = cfg.n_layer() as u64;
    let a = activation_parts(cfg, batch, seq_len, half_precision_activations, attention, recompute, 1, false);
    let weight_copies = if half_precision_activations { 2 * matmul_params(cfg) } else { 0 };
    MemoryEstimate {
        params: 4 * n,
        grads: 4 * n,
        optimizer: 8 * n,
        activations: l * a.per_layer + a.recompute_peak + a.backward + a.embed + a.head + a.logits + weight_copies,
        logits: a.logits,
    }
}

/// Activation bytes of one micro-batch by part of the model (see [`memory_estimate_with`]).
#[derive(Debug, Clone, Copy)]
struct ActivationParts {
    /// What each block keeps until its backward.
    per_layer: u64,
    /// With full recompute, one block's activations rebuilt during its backward, and their
    /// gradients.
    recompute_peak: u64,
    /// Embedding sum and its dropout's noise (the first stage).
    embed: u64,
    /// Final norm input and output (the last stage).
    head: u64,
    /// Peak of the logits and their gradients (the last stage).
    logits: u64,
    /// Gradients in flight during backward, once.
    backward: u64,
}

/// Bytes per token one block keeps for backward, (outside, inside) the tensor-parallel regions,
/// counted tensor by tensor as libtorch's autograd saves them (Korthikanti et al. 2022 count the
/// same way for Megatron's kernels) and checked against libtorch's allocator
/// (`tests/activation_memory.rs`). C is the width, F the MLP's hidden width; fp32, or bf16
/// autocast (norms and the residual stream stay fp32, matmul inputs and outputs are bf16):
///
/// - GPT: the two LayerNorm inputs (fp32) and the copies of their outputs that `c_attn` and
///   `c_fc` keep (bf16 under autocast) — outside the regions; q/k/v (one tensor), the attention
///   output (also `c_proj`'s input: the fused kernel writes it token-major), GELU's input and
///   output — inside. fp32: 4·(4C) + 4·(4C + 2F); bf16: 12C + 2·(4C + 2F).
/// - Llama: each RMSNorm's input and normalised value (fp32), and its weighted output (fp32), or
///   under autocast its one bf16 copy shared by q/k/v and by gate/up — outside; the rotated
///   queries, the keys and values repeated to the query heads (grouped-query attention
///   materialises them; without it they are the projections), the attention output, and
///   SwiGLU's gate, SiLU, up and product — inside. fp32: 4·(6C) + 4·(4C + 4F); bf16: 20C +
///   2·(4C + 4F).
///
/// Without a fused attention kernel the B·H·T×T scores are kept too ([`memory_estimate_with`]).
pub fn block_bytes_per_token(cfg: &ModelConfig, half: bool) -> (f64, f64) {
    let c = cfg.n_embd() as f64;
    let (f, w) = (cfg.ffn_hidden() as f64, if half { 2.0 } else { 4.0 });
    match cfg {
        ModelConfig::Gpt(_) => (8.0 * c + 2.0 * w * c, w * (4.0 * c + 2.0 * f)),
        ModelConfig::Llama(_) => (16.0 * c + 2.0 * w * c, w * (4.0 * c + 4.0 * f)),
    }
}

/// What one micro-batch's activations take on one rank, by part (see [`memory_estimate_with`]),
/// with `tp`-way tensor parallelism (and `sp`, sequence parallelism): the tensors inside the
/// regions, the attention scores and the vocabulary-parallel logits are divided by tp; those
/// outside (norm inputs and outputs, dropout masks, the residual stream) are whole on every rank
/// unless the sequence is split too.
#[allow(clippy::too_many_arguments)]
fn activation_parts(
    cfg: &ModelConfig,
    batch: usize,
    seq_len: usize,
    half: bool,
    attention: Attention,
    recompute: Recompute,
    tp: usize,
    sp: bool,
) -> ActivationParts {
    let (b, t, c, v) = (batch as u64, seq_len as u64, cfg.n_embd() as u64, cfg.vocab_size() as u64);
    let tokens = (b * t) as f64;
    let tp = tp.max(1) as f64;
    let sbh = (b * t * c) as f64;
    let dropout = cfg.dropout() > 0.0;
    let gpt = matches!(cfg, ModelConfig::Gpt(_));
    // Whole on every rank unless the sequence is split; inside a region always split.
    let outside = |x: f64| if sp { x / tp } else { x };
    let (out, ins) = block_bytes_per_token(cfg, half);
    let mut out = out * tokens;
    if dropout && gpt {
        // Two residual dropouts: on the CPU (where dropout means the math attention path) noise
        // of the activations' dtype, on CUDA bool masks.
        out += 2.0
            * sbh
            * if attention != Attention::Math {
                1.0
            } else if half {
                2.0
            } else {
                4.0
            };
    }
    let block = outside(out) + ins * tokens / tp;
    let core = attention.bytes_per_score(half) * (b * cfg.n_head() as u64 * t * t) as f64 / tp;
    // The fp32 residual stream (a block's input, the embedding sum, the final norm's input).
    let stream = outside(4.0 * sbh);
    let (per_layer, recompute_peak) = match recompute {
        Recompute::None => (block + core, 0.0),
        // Only the attention core is rebuilt, one layer at a time.
        Recompute::Selective => (block, core),
        // Only the block's input is kept; one block is rebuilt at a time, and its nested
        // backward's gradients coexist with it (measured: about twice the block,
        // docs/BENCHMARKS.md).
        Recompute::Full => (stream, 2.0 * (block + core)),
    };
    let btv = (b * t * v) as f64;
    ActivationParts {
        per_layer: per_layer as u64,
        recompute_peak: recompute_peak as u64,
        // Plus the embedding dropout's noise.
        embed: (stream * if dropout && gpt { 2.0 } else { 1.0 }) as u64,
        head: stream as u64,
        // The backward pass's gradients in flight (measured: about three fp32 B·T·C tensors
        // beyond what the blocks keep).
        backward: (stream * 3.0) as u64,
        logits: ((3.0 * btv).max(btv + (v * c) as f64) * 4.0 / tp) as u64,
    }
}

/// As [`memory_estimate_with`], for a pipeline rank holding the stages `specs` with
/// `in_flight` micro-batches' activations held at its peak (what the schedule's simulation
/// says: `pp - rank` for 1F1B, every micro-batch for GPipe). Weights, gradients and AdamW state
/// are those of the stages held (the tied embedding's copy included); each micro-batch in flight
/// keeps the activations of the blocks held (and the embedding output on the first stage, the
/// log-softmax on the last), plus one micro-batch's transient logits peak on the last stage.
#[allow(clippy::too_many_arguments)]
pub fn stage_memory_estimate(
    cfg: &ModelConfig,
    specs: &[StageSpec],
    batch: usize,
    seq_len: usize,
    half_precision_activations: bool,
    attention: Attention,
    recompute: Recompute,
    in_flight: usize,
) -> MemoryEstimate {
    stage_memory_estimate_tp(cfg, specs, batch, seq_len, half_precision_activations, attention, recompute, in_flight, 1, false)
}

/// The bf16 copies of the matmul weights autocast keeps for backward (counted with the
/// activations), for the stages `specs` on one of `tp` ranks; none without autocast. Lookups
/// are not cast: GPT's position table, and the token embedding of a stage that holds it only to
/// look tokens up (untied, or tied on a first stage without the head).
pub fn stage_weight_copy_bytes(cfg: &ModelConfig, specs: &[StageSpec], tp: usize, half_precision_activations: bool) -> u64 {
    if !half_precision_activations {
        return 0;
    }
    let rows = (cfg.vocab_size() / tp.max(1)) as u64;
    let cast: u64 = specs
        .iter()
        .map(|s| {
            let n = crate::stages::stage_params_tp(cfg, s, tp);
            let wte_looked_up = s.embed && !(s.head && cfg.tie_embeddings());
            let lookups = if s.embed { cfg.lookup_only_params() + if wte_looked_up { rows * cfg.n_embd() as u64 } else { 0 } } else { 0 };
            n - lookups
        })
        .sum();
    2 * cast
}

/// As [`stage_memory_estimate`], for one rank of `tp` tensor-parallel ranks (with
/// `sequence_parallel` or not): weights, gradients and optimizer state of the rank's slices
/// ([`crate::stage_params_tp`]); the activations inside the tensor-parallel regions divided by
/// tp, those outside (norm inputs and outputs, dropout masks, the residual stream; see
/// [`block_bytes_per_token`]) whole unless the sequence is split too; the T×T attention scores,
/// where kept, and the vocabulary-parallel logits divided by tp.
#[allow(clippy::too_many_arguments)]
pub fn stage_memory_estimate_tp(
    cfg: &ModelConfig,
    specs: &[StageSpec],
    batch: usize,
    seq_len: usize,
    half_precision_activations: bool,
    attention: Attention,
    recompute: Recompute,
    in_flight: usize,
    tp: usize,
    sequence_parallel: bool,
) -> MemoryEstimate {
    let n: u64 = specs.iter().map(|s| crate::stages::stage_params_tp(cfg, s, tp)).sum();
    let a = activation_parts(cfg, batch, seq_len, half_precision_activations, attention, recompute, tp, sequence_parallel);
    let (b, t, v) = (batch as u64, seq_len as u64, (cfg.vocab_size() / tp.max(1)) as u64);
    // The most expensive chunk bounds what one micro-batch in flight holds.
    // The fp32 log-softmax the loss keeps (this rank's vocabulary slice).
    let per_micro = specs
        .iter()
        .map(|s| s.blocks.len() as u64 * a.per_layer + if s.embed { a.embed } else { 0 } + if s.head { a.head + 4 * b * t * v } else { 0 })
        .max()
        .unwrap_or(0);
    let transient = if specs.iter().any(|s| s.head) { a.logits.saturating_sub(4 * b * t * v) } else { 0 };
    let transient = transient + if specs.iter().any(|s| !s.blocks.is_empty()) { a.recompute_peak + a.backward } else { 0 };
    let weight_copies = stage_weight_copy_bytes(cfg, specs, tp, half_precision_activations);
    // Each micro-batch in flight keeps its log-softmax; the last one's logits peak besides.
    let logits = if specs.iter().any(|s| s.head) { in_flight.max(1) as u64 * 4 * b * t * v + a.logits.saturating_sub(4 * b * t * v) } else { 0 };
    MemoryEstimate {
        params: 4 * n,
        grads: 4 * n,
        optimizer: 8 * n,
        activations: in_flight.max(1) as u64 * per_micro + transient + weight_copies,
        logits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GptConfig;
    use crate::llama::LlamaConfig;

    fn gpt(c: GptConfig) -> ModelConfig {
        ModelConfig::Gpt(c)
    }

    fn math(on: bool) -> Attention {
        if on {
            Attention::Math
        } else {
            Attention::Fused
        }
    }

    #[test]
    fn a_whole_model_stage_estimates_like_the_model_and_stages_split_it() {
        let mut g0 = GptConfig::preset("gpt2-124m").unwrap();
        g0.dropout = 0.1;
        let g = gpt(g0.clone());
        let r = Recompute::None;
        for half in [false, true] {
            let whole = memory_estimate_with(&g, 4, 1024, half, math(!half), r);
            assert_eq!(stage_memory_estimate(&g, &[StageSpec::whole(12)], 4, 1024, half, math(!half), r, 1), whole);
            // Four stages, one micro-batch each in flight: weights add up to the model plus the
            // tied copy, activations to about the model's (each stage's own part).
            let specs = StageSpec::split(&[3, 3, 3, 3]);
            let parts: Vec<MemoryEstimate> =
                specs.iter().map(|s| stage_memory_estimate(&g, std::slice::from_ref(s), 4, 1024, half, math(!half), r, 1)).collect();
            let params: u64 = parts.iter().map(|p| p.params).sum();
            assert_eq!(params, whole.params + 4 * (g0.vocab_size * g0.n_embd) as u64);
            // More micro-batches in flight hold proportionally more (1F1B's first stage holds pp),
            // beside what one backward has in flight and the weights' bf16 copies.
            let four = stage_memory_estimate(&g, &specs[1..2], 4, 1024, half, math(!half), r, 4);
            let one = &parts[1];
            let once = stage_weight_copy_bytes(&g, &specs[1..2], 1, half) + 3 * 4 * 4 * 1024 * g0.n_embd as u64;
            assert_eq!(four.activations - once, 4 * (one.activations - once));
        }
    }

    #[test]
    fn tensor_and_sequence_parallelism_divide_what_they_split() {
        let g = gpt(GptConfig::preset("gpt2-124m").unwrap());
        let whole = [StageSpec::whole(12)];
        let est = |tp, sp| stage_memory_estimate_tp(&g, &whole, 4, 1024, true, Attention::Fused, Recompute::None, 1, tp, sp);
        let (one, tp4, sp4) = (est(1, false), est(4, false), est(4, true));
        assert_eq!(one, stage_memory_estimate(&g, &whole, 4, 1024, true, Attention::Fused, Recompute::None, 1));
        // Weights: about a quarter (norms, row-parallel biases and positions stay whole).
        let n = total_params(&g);
        assert_eq!(tp4.params / 4, crate::stages::stage_params_tp(&g, &whole[0], 4));
        assert!(tp4.params > one.params / 4 && (tp4.params as f64) < one.params as f64 / 4.0 * 1.03, "{} of {}", tp4.params, 4 * n);
        // Activations: sequence parallelism divides the rest of them too (Korthikanti et al.:
        // 10 + 24/t of 34 without, 34/t with).
        assert!(sp4.activations < tp4.activations && tp4.activations < one.activations);
        let block = |e: MemoryEstimate| e.activations - 2 * (e.params / 4); // minus the bf16 weight copies
        let ratio = block(tp4) as f64 / block(one) as f64;
        // Blocks keep (10 + 24/4)/34 = 0.47; the vocabulary-parallel logits a quarter.
        assert!((0.25..0.5).contains(&ratio), "tp 4 keeps {ratio:.2} of the activations");
        assert!(block(sp4) as f64 / block(one) as f64 <= 0.26);
        assert_eq!((sp4.params, sp4.grads, sp4.optimizer), (tp4.params, tp4.grads, tp4.optimizer));
    }

    #[test]
    fn gpt2_124m_counts_match_the_published_model() {
        // GPT-2 small with the unpadded vocabulary has 124,439,808 parameters (HF/nanoGPT count,
        // tied embedding once, position embeddings included).
        let cfg = gpt(GptConfig { vocab_size: 50257, ..GptConfig::preset("gpt2-124m").unwrap() });
        assert_eq!(total_params(&cfg), 124_439_808);
        assert_eq!(matmul_params(&cfg), 124_439_808 - 1024 * 768);
    }

    #[test]
    fn flops_follow_palm() {
        let cfg = gpt(GptConfig { vocab_size: 50257, ..GptConfig::preset("gpt2-124m").unwrap() });
        let n = (124_439_808 - 1024 * 768) as f64;
        let expected = 6.0 * n + 12.0 * 12.0 * 12.0 * 64.0 * 1024.0;
        assert_eq!(flops_per_token(&cfg, 1024), expected);
        // Attention term grows with the sequence length, the 6N term does not.
        assert!(flops_per_token(&cfg, 2048) - flops_per_token(&cfg, 1024) == 12.0 * 12.0 * 12.0 * 64.0 * 1024.0);
    }

    #[test]
    fn memory_estimate_scales_with_batch() {
        let cfg = gpt(GptConfig { vocab_size: 65, ..GptConfig::default() });
        let a = memory_estimate(&cfg, 8, 128, false);
        let b = memory_estimate(&cfg, 16, 128, false);
        assert_eq!(a.params, b.params);
        assert_eq!(2 * a.activations, b.activations);
        assert_eq!(a.optimizer, 2 * a.params);
    }

    #[test]
    fn llama_counts_match_the_published_models() {
        // Hugging Face's parameter counts of Meta's checkpoints (model.num_parameters()).
        for (name, params) in
            [("llama3.2-1b", 1_235_814_400u64), ("llama3.2-3b", 3_212_749_824), ("llama3.1-8b", 8_030_261_248), ("llama3.1-70b", 70_553_706_496)]
        {
            let c = ModelConfig::Llama(LlamaConfig::preset(name).unwrap());
            assert_eq!(total_params(&c), params, "{name}");
        }
        // 405B: 126 layers of (2·C² + 2·C·1024 + 3·C·53248 + 2C) plus two 128256 × C tables.
        let c = ModelConfig::Llama(LlamaConfig::preset("llama3.1-405b").unwrap());
        assert_eq!(total_params(&c), 405_853_388_800);
    }

    #[test]
    fn llama_flops_count_gqa_and_swiglu() {
        // 8B at 8192 tokens: 6·N with the untied input embedding excluded (a lookup), plus the
        // attention products over all 32 query heads.
        let c = ModelConfig::Llama(LlamaConfig::preset("llama3.1-8b").unwrap());
        let n = 8_030_261_248u64 - 128256 * 4096;
        assert_eq!(matmul_params(&c), n);
        assert_eq!(flops_per_token(&c, 8192), 6.0 * n as f64 + 12.0 * 32.0 * 32.0 * 128.0 * 8192.0);
        // Halving the key-value heads saves K and V parameters, not attention FLOPs.
        let LlamaConfig { n_kv_head, .. } = LlamaConfig::preset("llama3.1-8b").unwrap();
        let fewer = ModelConfig::Llama(LlamaConfig { n_kv_head: n_kv_head / 2, ..LlamaConfig::preset("llama3.1-8b").unwrap() });
        assert_eq!(matmul_params(&c) - matmul_params(&fewer), 32 * 2 * 4096 * 4 * 128);
    }

    #[test]
    fn recompute_trades_activations_for_work() {
        for cfg in [
            gpt(GptConfig { vocab_size: 65, dropout: 0.1, ..GptConfig::default() }),
            ModelConfig::Llama(LlamaConfig { vocab_size: 65, dropout: 0.1, ..LlamaConfig::default() }),
        ] {
            let est = |r| memory_estimate_with(&cfg, 8, 128, false, Attention::Math, r).activations;
            let (none, sel, full) = (est(Recompute::None), est(Recompute::Selective), est(Recompute::Full));
            assert!(full < sel && sel < none, "{cfg:?}: {full} {sel} {none}");
            // Without a materialised T×T attention there is nothing for selective to save.
            let fused = |r| memory_estimate_with(&cfg, 8, 128, false, Attention::Fused, r).activations;
            assert_eq!(fused(Recompute::Selective), fused(Recompute::None));
        }
    }
}
