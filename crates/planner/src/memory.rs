//! Memory per GPU: weights, gradients, optimizer state (ZeRO 0/1, and 2/3 as what-if) and
//! activations times the micro-batches each pipeline rank holds in flight (from the simulator).
//!
//! Bytes per parameter follow what fabbrica's trainer allocates (`models::flops::memory_estimate`):
//! fp32 weights (4) and their bf16 copies under autocast (2), fp32 gradients (4), AdamW's two fp32
//! moments (8): 18 bytes, as Megatron-LM's mixed precision (Korthikanti et al. 2022 §2;
//! Rajbhandari et al. 2020, ZeRO §3: 16 bytes + the fp16 copy). ZeRO-1 divides the optimizer state
//! by dp, ZeRO-2 the gradients too, ZeRO-3 the weights too.

use serde::Serialize;

use crate::layout::Layout;
use crate::model::{ModelShape, Recompute};

/// Bytes per parameter of each kind.
pub const WEIGHT_BYTES: f64 = 6.0;
/// fp32 gradients.
pub const GRAD_BYTES: f64 = 4.0;
/// AdamW's two fp32 moments.
pub const OPTIMIZER_BYTES: f64 = 8.0;

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

/// The memory of the fullest pipeline rank, and which rank that is.
///
/// Activations per (stage, micro-batch) in flight: the blocks of the rank's largest chunk times
/// [`ModelShape::activation_bytes_per_token`] times the micro-batch's tokens; the first stage
/// adds its embedding output (2h per token), the last the logits of one micro-batch (bf16 logits,
/// fp32 log-softmax and its gradient: 10 bytes per vocabulary entry and token, over tp). Full
/// recomputation adds one block's whole activations, rebuilt for its backward.
pub fn per_gpu(
    model: &ModelShape,
    l: &Layout,
    map: &StageMap,
    in_flight: &[usize],
    materialised_attention: bool,
    sequence_parallel: bool,
) -> (Memory, usize) {
    let tp = l.tp as f64;
    let dp = l.dp as f64;
    let tokens = (l.mb * model.seq) as f64;
    let per_layer = model.activation_bytes_per_token(l.recompute, l.tp, materialised_attention, sequence_parallel) * tokens;
    let rebuilt = if l.recompute == Recompute::Full {
        model.activation_bytes_per_token(Recompute::Selective, l.tp, materialised_attention, sequence_parallel) * tokens
    } else {
        0.0
    };
    let shard = |stage: u8| if l.zero >= stage { dp } else { 1.0 };
    let mut worst = (Memory::default(), 0);
    for r in 0..l.pp {
        let p = map.rank_params_tp(model, r, l.tp);
        let mut act = in_flight.get(r).copied().unwrap_or(1).max(1) as f64 * map.chunk[r] as f64 * per_layer + rebuilt;
        if r == 0 {
            act += 2.0 * model.hidden as f64 * tokens / if sequence_parallel { tp } else { 1.0 };
        }
        if map.last_rank == r {
            act += 10.0 * model.vocab as f64 * tokens / tp;
        }
        let m = Memory {
            weights: WEIGHT_BYTES * p / shard(3),
            grads: GRAD_BYTES * p / shard(2),
            optimizer: OPTIMIZER_BYTES * p / shard(1),
            activations: act,
        };
        if m.total() > worst.0.total() {
            worst = (m, r);
        }
    }
    worst
}
