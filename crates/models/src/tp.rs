//! Tensor parallelism as the model sees it (Megatron-LM, Shoeybi et al. 2019; sequence
//! parallelism, Korthikanti et al. 2022): a plan — this rank's place among `size` tensor-parallel
//! ranks, whether the residual stream is split along the sequence, and the region operators — and
//! the slicing of each parameter ([`Shard`]).
//!
//! The model never sees a communicator. The operators of [`TpOps`] are autograd functions that
//! whoever builds the model implements over its tensor-parallel group (the trainer, with
//! `fabbrica_torch_ext::function`): Megatron's `copy_to` / `reduce_from` the tensor-parallel
//! region, their sequence-parallel forms (all-gather / reduce-scatter along the sequence), and the
//! vocabulary-parallel cross-entropy, which never gathers the full logits on one rank.
//!
//! Where each goes, per block: the column-parallel layers (attention's q/k/v, split by heads; the
//! MLP's first layer(s)) take their input through [`enter`], the row-parallel layers (the
//! attention output projection, the MLP's second layer) give their output through [`exit`], and
//! their bias is added after it. Norms, the residual stream and dropout outside the two regions
//! are replicated (without sequence parallelism) or split along the sequence (with it).

use std::sync::Arc;

use tch::Tensor;

/// The communication of the tensor-parallel regions, as autograd operators. A failed collective
/// panics with a message that starts with `tensor-parallel` (the trainer turns it into an error).
pub trait TpOps: Send + Sync {
    /// Megatron's `copy_to_tensor_model_parallel_region`: identity forward, all-reduce (sum) of
    /// the gradient backward.
    fn copy_to(&self, x: &Tensor) -> Tensor;
    /// `reduce_from_tensor_model_parallel_region`: all-reduce (sum) forward, identity backward.
    fn reduce_from(&self, x: &Tensor) -> Tensor;
    /// Sequence parallelism's entry (`gather_from_sequence_parallel_region`): all-gather of
    /// the (B·T/tp, C) token shards into (B·T, C) forward, reduce-scatter of the gradient
    /// backward. A shard is a contiguous block of the micro-batch's tokens (Megatron splits the s
    /// of its [s, b, h] layout: the same contiguous split in s-major order).
    fn gather_seq(&self, x: &Tensor) -> Tensor;
    /// Sequence parallelism's exit (`reduce_scatter_to_sequence_parallel_region`): reduce-scatter
    /// of (…, C) partial sums into this rank's (B·T/tp, C) token shard forward, all-gather of
    /// the gradient backward.
    fn reduce_scatter_seq(&self, x: &Tensor) -> Tensor;
    /// Sequence parallelism's column-parallel linear, `all_gather(x)·Wᵀ + b` (B·T, out) for a
    /// token shard x (B·T/tp, in) (Megatron's `LinearWithGradAccumulationAndAsyncCommunication` with
    /// `sequence_parallel`): only the shard is kept for backward, which gathers it again for
    /// W's gradient and reduce-scatters x's, so the gathered input never stays in memory.
    fn gather_linear(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor;
    /// Per-token cross-entropy (N) of this rank's logits (N, V/tp), fp32, which hold the
    /// vocabulary entries `vocab_start..vocab_start + V/tp`, against global targets (N); a target
    /// of -100 gives 0 and no gradient. Megatron's `vocab_parallel_cross_entropy`.
    fn vocab_parallel_cross_entropy(&self, logits: &Tensor, targets: &Tensor, vocab_start: i64) -> Tensor;
}

/// This rank's part of tensor parallelism: what the model is built with.
#[derive(Clone)]
pub struct TensorParallel {
    /// Rank within the tensor-parallel group.
    pub rank: usize,
    /// `parallel.tp`.
    pub size: usize,
    /// `parallel.sequence_parallel`: the residual stream between the regions is this rank's
    /// (B·T/tp, C) shard of the tokens.
    pub sequence_parallel: bool,
    pub ops: Arc<dyn TpOps>,
}

impl std::fmt::Debug for TensorParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorParallel {{ rank: {}, size: {}, sequence_parallel: {} }}", self.rank, self.size, self.sequence_parallel)
    }
}

/// Into a tensor-parallel region: `copy_to`, or with sequence parallelism the all-gather of the
/// sequence shards; the identity without tensor parallelism.
pub fn enter(tp: Option<&TensorParallel>, x: &Tensor) -> Tensor {
    match tp {
        None => x.shallow_clone(),
        Some(p) if p.sequence_parallel => p.ops.gather_seq(x),
        Some(p) => p.ops.copy_to(x),
    }
}

/// Out of a tensor-parallel region: `reduce_from`, or with sequence parallelism the
/// reduce-scatter to sequence shards; the identity without tensor parallelism.
pub fn exit(tp: Option<&TensorParallel>, x: &Tensor) -> Tensor {
    match tp {
        None => x.shallow_clone(),
        Some(p) if p.sequence_parallel => p.ops.reduce_scatter_seq(x),
        Some(p) => p.ops.reduce_from(x),
    }
}

/// Runs `f` (which draws dropout masks) on this tensor-parallel rank's own random stream, as
/// Megatron-LM's model-parallel RNG tracker does: inside the regions (attention dropout: each
/// rank drops its own heads) and, with sequence parallelism, on the sequence shards, the ranks
/// must not draw the same masks. Everywhere else they must, and do: two numbers are drawn from
/// the global generator, whose state is the same on every rank of the group — one seeds the
/// region's stream with this rank's place mixed in, the other reseeds the global generator
/// after it, so the group leaves in step. Deterministic in (global state, rank): a recomputed
/// region draws the forward's masks. Without tensor parallelism, or when `active` is false
/// (no dropout), `f` runs as it is.
pub fn fork_rng<T>(tp: Option<&TensorParallel>, active: bool, f: impl FnOnce() -> T) -> T {
    let Some(p) = tp.filter(|p| active && p.size > 1) else { return f() };
    let draws = Tensor::randint(i64::MAX, [2], (tch::Kind::Int64, tch::Device::Cpu));
    let (region, after) = (draws.int64_value(&[0]) as u64, draws.int64_value(&[1]));
    tch::manual_seed((fabbrica_data::splitmix64(region ^ (p.rank as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 1) as i64);
    let out = f();
    tch::manual_seed(after);
    out
}

/// Dropout of activations outside the tensor-parallel regions: the same masks on every rank
/// without sequence parallelism (the activations are replicated), each rank its own with it
/// (they are shards of the sequence).
pub fn outer_dropout(tp: Option<&TensorParallel>, x: &Tensor, p: f64, train: bool) -> Tensor {
    let split = tp.is_some_and(|t| t.sequence_parallel);
    fork_rng(tp.filter(|_| split), train && p > 0.0, || x.dropout(p, train))
}

/// Column-parallel layers sharing one input `x` (GPT's fused q/k/v is one; Llama's q, k, v, or
/// gate and up, are several): into the region once, then each layer's slice. With sequence
/// parallelism the layers' weights are stacked for one [`TpOps::gather_linear`], so the
/// sequence is gathered once and not kept.
/// Outputs are (B, T, out) for `bt` = (B, T).
pub fn column_forward(tp: Option<&TensorParallel>, x: &Tensor, layers: &[&crate::layers::Linear], bt: (i64, i64)) -> Vec<Tensor> {
    match tp {
        Some(p) if p.sequence_parallel => {
            let sizes: Vec<i64> = layers.iter().map(|l| l.weight.size()[0]).collect();
            let (w, b) = if layers.len() == 1 {
                (layers[0].weight.shallow_clone(), layers[0].bias.as_ref().map(Tensor::shallow_clone))
            } else {
                let w = Tensor::cat(&layers.iter().map(|l| &l.weight).collect::<Vec<_>>(), 0);
                let b = layers
                    .iter()
                    .all(|l| l.bias.is_some())
                    .then(|| Tensor::cat(&layers.iter().filter_map(|l| l.bias.as_ref()).collect::<Vec<_>>(), 0));
                (w, b)
            };
            let y = p.ops.gather_linear(x, &w, b.as_ref()).view([bt.0, bt.1, -1]);
            if layers.len() == 1 {
                vec![y]
            } else {
                y.split_with_sizes(sizes.as_slice(), -1)
            }
        }
        _ => {
            let mut h = enter(tp, x);
            // Under autocast each linear would cast an fp32 input to bf16 and keep its own copy
            // for backward (three for Llama's q/k/v, two for gate/up): cast once, keep one.
            let (on, kind) = fabbrica_torch_ext::amp::autocast_state(h.device());
            if on && layers.len() > 1 && h.kind() == tch::Kind::Float {
                h = h.to_kind(kind);
            }
            layers.iter().map(|l| l.forward(&h)).collect()
        }
    }
}

/// How a parameter is split over the tensor-parallel ranks: along `dim`, where that dimension
/// holds `parts` equal blocks each split the same way (GPT-2's fused `c_attn` stacks q, k and v:
/// rank r holds heads r·H/tp.. of each). Rank r's slice is the r-th of `size` equal pieces of
/// every block; the parameter keeps its whole-model name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shard {
    pub dim: usize,
    pub parts: usize,
}

impl Shard {
    /// Column-parallel (output features, or vocabulary rows).
    pub const ROWS: Shard = Shard { dim: 0, parts: 1 };
    /// Row-parallel (input features).
    pub const COLUMNS: Shard = Shard { dim: 1, parts: 1 };

    /// Whether `full` splits into `size` slices this way (every block of `dim` divisible).
    pub fn divides(&self, full: &[i64], size: usize) -> bool {
        let (n, p) = (size as i64, self.parts as i64);
        full.get(self.dim).is_some_and(|&d| p > 0 && d % p == 0 && (d / p) % n == 0)
    }

    /// The shape of one slice of a tensor of shape `full`.
    pub fn local_shape(&self, full: &[i64], size: usize) -> Vec<i64> {
        let mut s = full.to_vec();
        s[self.dim] /= size as i64;
        s
    }

    /// Rank `rank`'s slice of `full` (a view where the layout allows; contiguous copies are the
    /// caller's choice).
    pub fn slice(&self, full: &Tensor, rank: usize, size: usize) -> Tensor {
        let shape = full.size();
        let (d, p, n) = (self.dim, self.parts as i64, size as i64);
        let block = shape[d] / p;
        let piece = block / n;
        let mut split = shape[..d].to_vec();
        split.push(p);
        split.push(block);
        split.extend_from_slice(&shape[d + 1..]);
        full.reshape(split.as_slice()).narrow(d as i64 + 1, rank as i64 * piece, piece).reshape(self.local_shape(&shape, size).as_slice())
    }

    /// The whole tensor from every rank's slice, in rank order (the inverse of [`Shard::slice`]).
    pub fn join(&self, slices: &[Tensor]) -> Tensor {
        let shape = slices[0].size();
        let (d, p) = (self.dim, self.parts as i64);
        let mut split = shape[..d].to_vec();
        split.push(p);
        split.push(shape[d] / p);
        split.extend_from_slice(&shape[d + 1..]);
        let blocks: Vec<Tensor> = slices.iter().map(|s| s.reshape(split.as_slice())).collect();
        let mut full = shape.clone();
        full[d] *= slices.len() as i64;
        Tensor::cat(&blocks, d as i64 + 1).reshape(full.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn slices_of_stacked_blocks_take_the_same_heads_of_each_block() {
        // [q; k; v] of 4 rows each, 2 ranks: rank 1 holds rows 2-3 of q, of k and of v.
        let full = Tensor::arange(12 * 2, (Kind::Float, tch::Device::Cpu)).view([12, 2]);
        let s = Shard { dim: 0, parts: 3 };
        assert!(s.divides(&[12, 2], 2));
        assert!(!s.divides(&[12, 2], 4) || 12 / 3 % 4 == 0);
        let r1 = s.slice(&full, 1, 2);
        let rows: Vec<f32> = Vec::try_from(r1.select(1, 0)).unwrap();
        assert_eq!(rows, vec![4.0, 6.0, 12.0, 14.0, 20.0, 22.0]);
        let back = s.join(&[s.slice(&full, 0, 2), r1]);
        assert!(back.equal(&full));
        let c = Shard::COLUMNS;
        let back = c.join(&[c.slice(&full, 0, 2), c.slice(&full, 1, 2)]);
        assert!(back.equal(&full));
        assert!(!Shard::ROWS.divides(&[65, 4], 2));
    }
}
