//! Memory per GPU: weights, gradients, optimizer state (ZeRO 0/1, and 2/3 as what-if) and
//! activations times the micro-batches each pipeline rank holds in flight (from the simulator).
//!
//! Every figure is the trainer's own per-rank estimate (`models::flops::stage_memory_estimate_tp`,
//! what `train --dry-run` prints for the layout on CUDA): fp32 weights (4 bytes per parameter)
//! and the bf16 copies autocast keeps of the matmul weights (2), fp32 gradients (4), AdamW's two
//! fp32 moments (8) — 18 bytes, as Megatron-LM's mixed precision (Korthikanti et al. 2022 §2;
//! Rajbhandari et al. 2020, ZeRO §3: 16 bytes + the 16-bit copy) — and the activations counted as
//! libtorch keeps them. ZeRO-1 divides the optimizer state by dp, ZeRO-2 the gradients too,
//! ZeRO-3 the weights too.

use serde::Serialize;

use crate::layout::Layout;
use crate::model::ModelShape;

/// Bytes on one GPU by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Memory {
    /// Weights (fp32 and the bf16 copies).
    pub weights: f64,
    /// Gradients.
    pub grads: f64,
    /// Optimizer state.
    pub optimizer: f64,
    /// Activations held for backward at the peak, plus the head's transient logits.
    pub activations: f64,
}

impl Memory {
    /// All of it.
    pub fn total(&self) -> f64 {
        self.weights + self.grads + self.optimizer + self.activations
    }
}

/// Where the model's stages land on the pipeline ranks (stage s on rank s mod pp).
#[derive(Debug, Clone, PartialEq)]
pub struct StageMap {
    /// Blocks per stage, `pp·v` stages.
    pub stage_layers: Vec<usize>,
    /// Parameters held by each rank, before tensor parallelism.
    pub params: Vec<f64>,
    /// Blocks of each rank's largest chunk.
    pub chunk: Vec<usize>,
    /// The rank holding the last stage (the head).
    pub last_rank: usize,
}

impl StageMap {
    /// The map of `stage_layers` over `pp` ranks.
    pub fn new(model: &ModelShape, pp: usize, stage_layers: &[usize]) -> StageMap {
        let stages = stage_layers.len();
        let (mut params, mut chunk) = (vec![0.0; pp], vec![0; pp]);
        for (s, &layers) in stage_layers.iter().enumerate() {
            let mut p = layers as f64 * model.layer_params as f64;
            if s == 0 {
                p += model.embed_params() as f64;
            }
            if s + 1 == stages {
                p += model.head_params() as f64;
                if s == 0 && model.tied {
                    // One stage holds both ends: the tied embedding is one tensor, not a copy.
                    p -= (model.vocab * model.hidden) as f64;
                }
            }
            params[s % pp] += p;
            chunk[s % pp] = chunk[s % pp].max(layers);
        }
        StageMap { stage_layers: stage_layers.to_vec(), params, chunk, last_rank: (stages.max(1) - 1) % pp }
    }

    /// Parameters one tensor-parallel rank of pipeline rank `r` holds: the trainer's own count
    /// (`fabbrica_models::stage_params_tp`: the split matrices' 1/tp slice, the norms, GPT's
    /// row-parallel biases and positions whole).
    pub fn rank_params_tp(&self, model: &ModelShape, r: usize, tp: usize) -> f64 {
        let pp = self.params.len().max(1);
        let specs = fabbrica_models::StageSpec::split(&self.stage_layers);
        specs.iter().enumerate().filter(|(s, _)| s % pp == r).map(|(_, spec)| fabbrica_models::stage_params_tp(&model.model, spec, tp) as f64).sum()
    }
}

/// The memory of the fullest pipeline rank, and which rank that is: for each rank, the trainer's
/// own per-rank estimate (`fabbrica_models::flops::stage_memory_estimate_tp`, which `train
/// --dry-run` prints for the same layout on CUDA) of the stages it holds, under bf16 autocast,
/// with the micro-batches its schedule keeps in flight (`in_flight`, from the simulator). The
/// bf16 weight copies autocast keeps are counted with the weights here; ZeRO divides the
/// optimizer state (1), the gradients (2) and the weights (3) by dp. For a published Megatron
/// run ([`crate::estimate::Execution::megatron_state`]) the weights and optimizer state are
/// Megatron's.
pub fn per_gpu(model: &ModelShape, l: &Layout, map: &StageMap, in_flight: &[usize], x: &crate::estimate::Execution) -> (Memory, usize) {
    use fabbrica_models::flops::{stage_memory_estimate_tp, stage_weight_copy_bytes, Attention};
    let specs = fabbrica_models::StageSpec::split(&map.stage_layers);
    let dp = l.dp as f64;
    let shard = |stage: u8| if l.zero >= stage { dp } else { 1.0 };
    let mut worst = (Memory::default(), 0);
    for r in 0..l.pp {
        let mine: Vec<fabbrica_models::StageSpec> = specs.iter().enumerate().filter(|(s, _)| s % l.pp == r).map(|(_, s)| s.clone()).collect();
        let e = stage_memory_estimate_tp(
            &model.model,
            &mine,
            l.mb,
            model.seq,
            true,
            if x.materialised_attention { Attention::Unfused } else { Attention::Fused },
            l.recompute,
            in_flight.get(r).copied().unwrap_or(1).max(1),
            l.tp,
            x.sequence_parallel,
        );
        let copies = stage_weight_copy_bytes(&model.model, &mine, l.tp, true);
        let p = (e.params / 4) as f64;
        let (weights, optimizer) = if x.megatron_state { (2.0 * p, 12.0 * p) } else { ((e.params + copies) as f64, e.optimizer as f64) };
        let m = Memory {
            weights: weights / shard(3),
            grads: e.grads as f64 / shard(2),
            optimizer: optimizer / shard(1),
            activations: (e.activations - copies) as f64,
        };
        if m.total() > worst.0.total() {
            worst = (m, r);
        }
    }
    worst
}
