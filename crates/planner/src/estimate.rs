//! The cost model: one layout's step time (compute, exposed TP/PP/DP communication, bubble,
//! optimizer), throughput, MFU and memory. docs/PLANNER.md states each formula and its source.

use serde::Serialize;

use crate::cluster::Cluster;
use crate::comm::{all_reduce, hierarchical_all_reduce, hierarchical_reduce_scatter, p2p, Group, Link};
use crate::error::PlanError;
use crate::layout::Layout;
use crate::memory::{per_gpu, Memory, StageMap};
use crate::model::{ModelShape, Recompute};
use crate::sim::{kind_for, Simulator};

/// Bytes of element-wise traffic per token of one block's forward, per unit of width: two norms,
/// two residual adds, two dropouts, the bias adds (each a read and a write of h bf16 values:
/// 24h), plus the MLP activation over the hidden layer (read and write of f values: 4f; a gated
/// MLP reads two and writes one: 6f). Backward moves twice as much.
const ELEMENTWISE_H: f64 = 24.0;

/// Bytes per attention score of a materialised softmax's forward (write the scores, read them
/// and write the probabilities, the dropout's mask and output): about 8 bytes per score.
const SOFTMAX_BYTES: f64 = 8.0;

/// Bytes moved per logit by the cross-entropy, forward and backward each.
const LOSS_BYTES: f64 = 24.0;

/// Bytes per parameter the fused AdamW step reads and writes (fp32 weight, gradient and two
/// moments read and written, the bf16 copy written).
const ADAMW_BYTES: f64 = 30.0;

/// How the runtime executes a layout: the defaults are a current Megatron-style runtime.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Execution {
    /// Attention keeps its a·s×s scores (no fused flash kernel): memory and HBM traffic.
    pub materialised_attention: bool,
    /// Sequence parallelism: norms, dropouts and residuals split over the tensor-parallel group.
    pub sequence_parallel: bool,
    /// The data-parallel gradient reduction overlaps the last micro-batch's backward.
    pub dp_overlap: bool,
    /// Bytes per gradient element on the wire (fp32: Megatron's and fabbrica's default).
    pub grad_wire_bytes: f64,
    /// Megatron-LM's mixed precision instead of fabbrica's: bf16 weights (2 bytes per
    /// parameter), fp32 main gradients (4), and the fp32 master copy with AdamW's moments (12)
    /// in the optimizer state, where fabbrica keeps fp32 weights with autocast's bf16 copies (6),
    /// fp32 gradients (4) and the moments (8). For published Megatron runs; a fabbrica plan is
    /// the trainer's own per-rank figure.
    pub megatron_state: bool,
}

impl Default for Execution {
    fn default() -> Self {
        Execution { materialised_attention: false, sequence_parallel: true, dp_overlap: true, grad_wire_bytes: 4.0, megatron_state: false }
    }
}

/// What is asked: global batch in sequences; tokens to train on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Workload {
    /// Sequences per optimizer step.
    pub global_batch: usize,
}

/// Everything the planner says about one layout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    /// tp, pp, dp, v, mb, recompute, zero.
    #[serde(serialize_with = "ser_layout")]
    pub layout: Layout,
    /// Pipeline schedule.
    pub schedule: &'static str,
    /// GPUs the layout uses.
    pub gpus: usize,
    /// Micro-batches per step per pipeline.
    pub microbatches: usize,
    /// Seconds per optimizer step.
    pub step_s: f64,
    /// Of which compute (forward, backward, recompute, element-wise kernels) of one rank.
    pub compute_s: f64,
    /// Tensor-parallel all-reduces (not overlapped).
    pub tp_s: f64,
    /// Pipeline p2p transfers left exposed (simulated).
    pub pp_s: f64,
    /// Data-parallel reduction left exposed after the overlap with backward.
    pub dp_s: f64,
    /// Data-parallel reduction before overlap.
    pub dp_total_s: f64,
    /// Pipeline bubble (simulated).
    pub bubble_s: f64,
    /// Optimizer step.
    pub optimizer_s: f64,
    /// Tokens per second over the whole job.
    pub tokens_per_s: f64,
    /// Model FLOPs utilisation: tokens/s × FLOPs per token / (GPUs × peak), a fraction.
    pub mfu: f64,
    /// Model TFLOP/s per GPU.
    pub tflops_per_gpu: f64,
    /// Memory of the fullest GPU.
    pub memory: Memory,
    /// The pipeline rank that holds the most.
    pub fullest_rank: usize,
    /// Micro-batches in flight on that rank at its peak (simulator).
    pub in_flight: usize,
    /// Usable bytes per GPU.
    pub usable_bytes: f64,
    /// Blocks per pipeline stage.
    pub stage_layers: Vec<usize>,
    /// Forward of the costliest stage for one micro-batch (what the simulator ran), seconds.
    pub stage_f_s: f64,
    /// Backward of that stage, seconds.
    pub stage_b_s: f64,
    /// One p2p transfer between stages, seconds.
    pub p2p_s: f64,
}

fn ser_layout<S: serde::Serializer>(l: &Layout, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(7))?;
    m.serialize_entry("tp", &l.tp)?;
    m.serialize_entry("pp", &l.pp)?;
    m.serialize_entry("dp", &l.dp)?;
    m.serialize_entry("v", &l.v)?;
    m.serialize_entry("mb", &l.mb)?;
    m.serialize_entry("recompute", l.recompute.as_str())?;
    m.serialize_entry("zero", &l.zero)?;
    m.end()
}

impl Estimate {
    /// The layout fits in the GPU's usable memory.
    pub fn fits(&self) -> bool {
        self.memory.total() <= self.usable_bytes
    }
}

/// Per micro-batch forward and backward seconds of one block on one GPU, and the part of each
/// that is tensor-parallel communication.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockTimes {
    /// Forward.
    pub f: f64,
    /// Backward (with any recomputation).
    pub b: f64,
    /// TP all-reduce time inside `f`.
    pub f_tp: f64,
    /// TP all-reduce time inside `b`.
    pub b_tp: f64,
}

/// One block's times for a micro-batch of `mb` sequences.
pub fn block_times(model: &ModelShape, c: &Cluster, l: &Layout, x: &Execution) -> BlockTimes {
    let tokens = (l.mb * model.seq) as f64;
    let tp = l.tp as f64;
    let (h, f) = (model.hidden as f64, model.ffn_hidden as f64);
    let peak = c.peak_tflops * 1e12;
    let hbm = c.hbm_tbps * 1e12;
    // Forward is a third of the training FLOPs (backward computes two products per weight).
    let dense = tokens * model.dense_flops_per_token() / 3.0 / tp / (peak * c.matmul_fraction(h));
    let attention = tokens * model.attention_flops_per_token() / 3.0 / tp / (peak * c.attention_efficiency);
    let mlp_ew = if model.glu { 6.0 * f } else { 4.0 * f } / tp;
    let ew_h = ELEMENTWISE_H * h / if x.sequence_parallel { tp } else { 1.0 };
    let elementwise = tokens * (ew_h + mlp_ew) / hbm;
    let softmax = if x.materialised_attention { tokens * model.heads as f64 / tp * model.seq as f64 * SOFTMAX_BYTES / hbm } else { 0.0 };
    // Two all-reduces of the block's output activations (bf16) per pass: after attention and
    // after the MLP (Narayanan et al. 2021 §2.3); sequence parallelism turns each into a
    // reduce-scatter and an all-gather of the same total volume.
    let ar = 2.0 * all_reduce(tokens * h * 2.0, l.tp, Link::intra(c));
    let fwd = dense + attention + elementwise + softmax;
    let bwd = 2.0 * (dense + attention) + 2.0 * (elementwise + softmax);
    let (re, re_tp) = match l.recompute {
        Recompute::None => (0.0, 0.0),
        Recompute::Selective => (attention + softmax, 0.0),
        Recompute::Full => (fwd, ar),
    };
    BlockTimes { f: fwd + ar, b: bwd + re + ar + re_tp, f_tp: ar, b_tp: ar + re_tp }
}

/// The output projection and loss of one micro-batch on the last stage (forward, backward).
fn head_times(model: &ModelShape, c: &Cluster, l: &Layout) -> (f64, f64) {
    let tokens = (l.mb * model.seq) as f64;
    let (h, v, tp) = (model.hidden as f64, model.vocab as f64, l.tp as f64);
    let matmul = tokens * 2.0 * v * h / tp / (c.peak_tflops * 1e12 * c.matmul_fraction(h));
    // Cross-entropy over the (vocabulary-parallel) logits in fp32, each pass over B·T·V/tp
    // elements: forward upcasts, takes the max, exponentiates, sums (about 24 bytes per logit),
    // backward forms softmax minus one-hot and casts back (about 24).
    let loss = tokens * v / tp * LOSS_BYTES / (c.hbm_tbps * 1e12);
    (matmul + loss, 2.0 * matmul + loss)
}

/// Where a group of `n` ranks with stride `stride` (in rank order) lands on nodes.
fn group(n: usize, stride: usize, gpus_per_node: usize) -> Group {
    let per_node = (gpus_per_node / stride.max(1)).clamp(1, n.max(1));
    Group { n, per_node }
}

/// Estimates one layout; `map` places the model's `pp·v` stages on the pipeline ranks.
pub fn estimate(
    model: &ModelShape,
    c: &Cluster,
    l: &Layout,
    w: &Workload,
    x: &Execution,
    map: &StageMap,
    sim: &mut Simulator,
) -> Result<Estimate, PlanError> {
    let stage_layers = &map.stage_layers[..];
    let per_replica = w.global_batch / l.dp;
    if per_replica == 0 || !w.global_batch.is_multiple_of(l.dp) || !per_replica.is_multiple_of(l.mb) {
        return Err(PlanError::input(format!(
            "--global-batch {} is not a multiple of dp × mb = {} × {}: choose a batch, dp and mb that divide",
            w.global_batch, l.dp, l.mb
        )));
    }
    let m = per_replica / l.mb;
    let kind = kind_for(l.v);
    let bt = block_times(model, c, l, x);
    let (head_f, head_b) = head_times(model, c, l);
    // The pipeline runs at the pace of its costliest stage (blocks, plus the head on the last).
    let last = stage_layers.len() - 1;
    let (mut f_stage, mut b_stage, mut tp_stage) = (0.0f64, 0.0f64, 0.0f64);
    for (s, &n) in stage_layers.iter().enumerate() {
        let (hf, hb) = if s == last { (head_f, head_b) } else { (0.0, 0.0) };
        let (f, b) = (n as f64 * bt.f + hf, n as f64 * bt.b + hb);
        if f + b > f_stage + b_stage {
            (f_stage, b_stage, tp_stage) = (f, b, n as f64 * (bt.f_tp + bt.b_tp));
        }
    }
    // Activations (or their gradients) between stages, bf16, split over the tensor-parallel group
    // (Narayanan et al. 2021's scatter/gather). Neighbouring stages are dp·tp ranks apart.
    let p2p_bytes = (l.mb * model.seq * model.hidden) as f64 * 2.0 / l.tp as f64;
    let link = if l.tp * l.dp >= c.gpus_per_node { Link::inter(c) } else { Link::intra(c) };
    let comm = if l.pp > 1 { p2p(p2p_bytes, link) } else { 0.0 };
    let pipe = sim.run(kind, l.pp, l.v, m, [f_stage, b_stage, comm])?;
    let bubble_s = pipe.makespan_no_comm_s - pipe.busy_s;
    let pp_s = pipe.makespan_s - pipe.makespan_no_comm_s;
    let tp_s = m as f64 * l.v as f64 * tp_stage;
    let compute_s = pipe.busy_s - tp_s;

    let rank_params = (0..l.pp).map(|r| map.rank_params_tp(model, r, l.tp)).fold(0.0, f64::max);
    // Data parallelism: ranks of a dp group are tp apart (rank order tp-dp-pp).
    let g = group(l.dp, l.tp, c.gpus_per_node);
    let grads = rank_params * x.grad_wire_bytes;
    let (reduce, gather) = match l.zero {
        0 => (hierarchical_all_reduce(grads, g, c), 0.0),
        // Reduce-scatter the gradients, all-gather the updated bf16 weights.
        _ => (hierarchical_reduce_scatter(grads, g, c), hierarchical_reduce_scatter(rank_params * 2.0, g, c)),
    };
    // ZeRO-3 gathers the weights again for every micro-batch's forward and backward.
    let zero3 = if l.zero == 3 { 2.0 * m as f64 * hierarchical_reduce_scatter(rank_params * 2.0, g, c) } else { 0.0 };
    let dp_total_s = reduce + gather + zero3;
    let dp_s = if x.dp_overlap {
        // The reduction overlaps the last micro-batch's backward of this rank's chunks; the
        // weight gather the next step's first forward; ZeRO-3's gathers the compute.
        let window_b = l.v as f64 * b_stage;
        let window_f = l.v as f64 * f_stage;
        (reduce - window_b).max(0.0) + (gather - window_f).max(0.0) + (zero3 - pipe.busy_s).max(0.0)
    } else {
        dp_total_s
    };
    let shard = if l.zero >= 1 { l.dp as f64 } else { 1.0 };
    let optimizer_s = rank_params / shard * ADAMW_BYTES / (c.hbm_tbps * 1e12);
    let step_s = pipe.makespan_s + dp_s + optimizer_s;

    let gpus = l.gpus();
    let tokens_per_s = (w.global_batch * model.seq) as f64 / step_s;
    let flops = tokens_per_s * model.flops_per_token;
    let (memory, fullest_rank) = per_gpu(model, l, map, &pipe.peak_in_flight, x);
    Ok(Estimate {
        layout: *l,
        schedule: kind.name(),
        gpus,
        microbatches: m,
        step_s,
        compute_s,
        tp_s,
        pp_s,
        dp_s,
        dp_total_s,
        bubble_s,
        optimizer_s,
        tokens_per_s,
        mfu: flops / (gpus as f64 * c.peak_tflops * 1e12),
        tflops_per_gpu: flops / gpus as f64 / 1e12,
        memory,
        fullest_rank,
        in_flight: pipe.peak_in_flight.get(fullest_rank).copied().unwrap_or(1),
        usable_bytes: c.usable_bytes(),
        stage_layers: stage_layers.to_vec(),
        stage_f_s: f_stage,
        stage_b_s: b_stage,
        p2p_s: comm,
    })
}
