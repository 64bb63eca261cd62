//! Parallel dimensions of a training job: validation, rank ↔ coordinate
//! mapping and process-group membership.
//!
//! Modelled on torchtitan's `ParallelDims`: the job's ranks form a 3-D grid
//! `dp × pp × tp` (data parallel × pipeline parallel × tensor parallel) whose
//! product must equal the world size. Everything here is pure arithmetic on
//! integers, so it is exhaustively unit-tested and can be used before any
//! communicator exists (e.g. to validate a config against `mpirun -np N`).
//!
//! # Rank layout
//!
//! By default ([`RankOrder::TpDpPp`], Megatron-LM's `tp-cp-ep-dp-pp` order
//! without the cp/ep axes, also torchtitan's) **tp varies fastest, then dp,
//! then pp**, so the pipeline dimension is outermost:
//!
//! ```text
//! rank = pp_idx * (dp * tp) + dp_idx * tp + tp_idx
//! ```
//!
//! Launchers (`mpirun`, `srun`) fill nodes with consecutive ranks, so the
//! order decides which traffic stays inside a node:
//!
//! * **tp innermost**: tensor-parallel peers talk in every layer, so they are
//!   adjacent ranks and share a node (NVLink) whenever `tp` ≤ GPUs per node.
//! * **dp next**: each gradient all-reduce group (`dp_groups`) lies inside one
//!   block of `dp × tp` consecutive ranks, the most compact the layout allows
//!   (a contiguous block when `tp = 1`), so it spans as few nodes as possible.
//! * **pp outermost**: pipeline stages exchange only one activation (and one
//!   gradient) per micro-batch with their neighbour, the least traffic of the
//!   three, so they are the ones that cross node boundaries.
//!
//! For `dp = 2, pp = 2, tp = 1` (4 ranks):
//!
//! | rank | dp | pp | tp | pipeline (`pp_groups`) | gradient all-reduce (`dp_groups`) |
//! |-----:|---:|---:|---:|------------------------|-----------------------------------|
//! |    0 |  0 |  0 |  0 | `[0, 2]`, first stage  | `[0, 1]`                          |
//! |    1 |  1 |  0 |  0 | `[1, 3]`, first stage  | `[0, 1]`                          |
//! |    2 |  0 |  1 |  0 | `[0, 2]`, last stage   | `[2, 3]`                          |
//! |    3 |  1 |  1 |  0 | `[1, 3]`, last stage   | `[2, 3]`                          |
//!
//! ```
//! use fabbrica_topology::{Coords, Dim, ParallelDims, RankOrder};
//!
//! let dims = ParallelDims::new(2, 2, 1, 4).unwrap();
//! assert_eq!(dims.order, RankOrder::TpDpPp);
//! assert_eq!(dims.coords(1).unwrap(), Coords { dp: 1, pp: 0, tp: 0 });
//! assert_eq!(dims.coords(2).unwrap(), Coords { dp: 0, pp: 1, tp: 0 });
//! assert_eq!(dims.pp_groups(), vec![vec![0, 2], vec![1, 3]]);
//! assert_eq!(dims.dp_groups(), vec![vec![0, 1], vec![2, 3]]);
//! assert_eq!(dims.group_of(3, Dim::Dp).unwrap(), vec![2, 3]);
//! assert_eq!(dims.pp_next(0).unwrap(), Some(2));
//! assert_eq!(dims.pp_next(2).unwrap(), None);
//! ```
//!
//! The previous layout, **tp fastest, then pp, then dp** (`rank = dp_idx *
//! (pp * tp) + pp_idx * tp + tp_idx`), remains available as
//! [`RankOrder::TpPpDp`] (config value `parallel.order = "tp-pp-dp"`):
//!
//! ```
//! use fabbrica_topology::{ParallelDims, RankOrder};
//!
//! let order: RankOrder = "tp-pp-dp".parse().unwrap();
//! let dims = ParallelDims::new(2, 2, 1, 4).unwrap().with_order(order);
//! assert_eq!(dims.pp_groups(), vec![vec![0, 1], vec![2, 3]]);
//! assert_eq!(dims.dp_groups(), vec![vec![0, 2], vec![1, 3]]);
//! ```

use std::fmt;

/// Config key of the data-parallel degree.
pub const KEY_DP: &str = "parallel.dp";
/// Config key of the pipeline-parallel degree (number of stages).
pub const KEY_PP: &str = "parallel.pp";
/// Config key of the tensor-parallel degree.
pub const KEY_TP: &str = "parallel.tp";
/// Config key of the rank order ([`RankOrder`]): `"tp-dp-pp"` (default) or
/// `"tp-pp-dp"`.
pub const KEY_ORDER: &str = "parallel.order";

/// Why a parallel layout or a rank/coordinate query is invalid.
///
/// Every message is one line that names the offending config key (or rank)
/// and says what to change.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum TopologyError {
    /// A degree that must be at least 1 is 0 (`parallel.pp`, `parallel.tp`;
    /// `parallel.dp = 0` means "infer" and is not an error).
    #[error("{key} = 0 is not a valid size: set {key} to at least 1 (1 disables this kind of parallelism)")]
    ZeroSize { key: &'static str },

    /// A degree read from a config is negative.
    #[error("{key} = {value} is negative: {hint}")]
    Negative {
        key: &'static str,
        value: i64,
        /// What to set instead (differs for `parallel.dp`, which may be 0).
        hint: &'static str,
    },

    /// The job has no ranks at all.
    #[error("the world size is 0: the job must have at least one rank")]
    ZeroWorldSize,

    /// `dp × pp × tp` differs from the number of ranks.
    #[error(
        "parallel.dp × parallel.pp × parallel.tp = {dp} × {pp} × {tp} = {product}, \
         but the job has {world_size} ranks (world size): \
         set them so the product is {world_size}, or launch {product} ranks"
    )]
    ProductMismatch { dp: usize, pp: usize, tp: usize, product: u128, world_size: usize },

    /// `parallel.dp = 0` (infer) but `pp × tp` does not divide the world size.
    #[error(
        "cannot infer parallel.dp (set to 0): the world size {world_size} is not divisible by \
         parallel.pp × parallel.tp = {pp} × {tp} = {pp_tp}: \
         set parallel.pp and parallel.tp so their product divides {world_size}, \
         or launch a multiple of {pp_tp} ranks"
    )]
    NotDivisible { pp: usize, tp: usize, pp_tp: u128, world_size: usize },

    /// A rank outside `0..world_size` was queried.
    #[error("rank {rank} is out of range: the job has {world_size} ranks (0..={max})", max = world_size.saturating_sub(1))]
    RankOutOfRange { rank: usize, world_size: usize },

    /// A coordinate outside the grid was queried.
    #[error("coordinates {coords} are out of range for parallel.dp × parallel.pp × parallel.tp = {dp} × {pp} × {tp}")]
    CoordsOutOfRange { coords: Coords, dp: usize, pp: usize, tp: usize },

    /// `parallel.order` names no known rank order.
    #[error(
        "parallel.order = {value:?} is not a known rank order: \
         use \"tp-dp-pp\" (default: tp fastest, pipeline outermost) or \"tp-pp-dp\" (data parallel outermost)"
    )]
    UnknownOrder { value: String },
}

/// One axis of the parallel grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dim {
    /// Data parallel: replicas that all-reduce gradients.
    Dp,
    /// Pipeline parallel: stages of one model replica.
    Pp,
    /// Tensor parallel: shards of each layer.
    Tp,
}

impl Dim {
    /// All dimensions, in declaration order. This says nothing about the
    /// rank layout: see [`RankOrder::outermost_first`] for that.
    pub const ALL: [Dim; 3] = [Dim::Dp, Dim::Pp, Dim::Tp];

    /// The config key that sets this dimension's size (e.g. `parallel.pp`).
    pub fn key(self) -> &'static str {
        match self {
            Dim::Dp => KEY_DP,
            Dim::Pp => KEY_PP,
            Dim::Tp => KEY_TP,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dim::Dp => "dp",
            Dim::Pp => "pp",
            Dim::Tp => "tp",
        })
    }
}

/// How the `dp × pp × tp` grid is numbered: which dimension varies fastest
/// from one rank to the next.
///
/// Variant names list the dimensions **fastest-varying first**, like
/// Megatron-LM's order strings (`tp-cp-ep-dp-pp`). Set with the config key
/// [`KEY_ORDER`] (`parallel.order`); parse with [`str::parse`], print with
/// `Display`. See the [crate docs](crate) for why the default is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RankOrder {
    /// `"tp-dp-pp"` (default, Megatron-LM's and torchtitan's):
    /// `rank = pp_idx * (dp * tp) + dp_idx * tp + tp_idx`. Tensor-parallel
    /// peers are adjacent, each data-parallel group is compact, pipeline
    /// stages are farthest apart.
    #[default]
    TpDpPp,
    /// `"tp-pp-dp"` (the layout before [`RankOrder::TpDpPp`] became the default):
    /// `rank = dp_idx * (pp * tp) + pp_idx * tp + tp_idx`. Each pipeline
    /// (model replica) is a block of consecutive ranks.
    TpPpDp,
}

impl RankOrder {
    /// Every order, default first.
    pub const ALL: [RankOrder; 2] = [RankOrder::TpDpPp, RankOrder::TpPpDp];

    /// The dimensions from outermost (slowest-varying, largest stride) to
    /// innermost (fastest-varying, stride 1).
    pub fn outermost_first(self) -> [Dim; 3] {
        match self {
            RankOrder::TpDpPp => [Dim::Pp, Dim::Dp, Dim::Tp],
            RankOrder::TpPpDp => [Dim::Dp, Dim::Pp, Dim::Tp],
        }
    }

    /// The config value naming this order (`"tp-dp-pp"` or `"tp-pp-dp"`).
    pub fn as_str(self) -> &'static str {
        match self {
            RankOrder::TpDpPp => "tp-dp-pp",
            RankOrder::TpPpDp => "tp-pp-dp",
        }
    }
}

impl fmt::Display for RankOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RankOrder {
    type Err = TopologyError;

    /// Accepts exactly `"tp-dp-pp"` or `"tp-pp-dp"`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RankOrder::ALL.into_iter().find(|o| o.as_str() == s).ok_or_else(|| TopologyError::UnknownOrder { value: s.to_string() })
    }
}

/// A rank's position in the `dp × pp × tp` grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Coords {
    /// Data-parallel replica index, `0..dp`.
    pub dp: usize,
    /// Pipeline stage index, `0..pp`.
    pub pp: usize,
    /// Tensor-parallel shard index, `0..tp`.
    pub tp: usize,
}

impl Coords {
    /// The coordinate along `dim`.
    pub fn get(&self, dim: Dim) -> usize {
        match dim {
            Dim::Dp => self.dp,
            Dim::Pp => self.pp,
            Dim::Tp => self.tp,
        }
    }
}

impl fmt::Display for Coords {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "(dp {}, pp {}, tp {})", self.dp, self.pp, self.tp)
    }
}

/// The sizes of the parallel dimensions of a job.
///
/// Build it with [`ParallelDims::new`] (or [`ParallelDims::from_config`]),
/// which validates that `dp × pp × tp == world_size` and uses the default
/// [`RankOrder`]; choose another with [`ParallelDims::with_order`]. Every
/// method assumes that invariant and numbers ranks by `order`. The fields are
/// public for reading; a value assembled by hand that breaks the invariant
/// gives meaningless answers.
///
/// See the [crate docs](crate) for the rank layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParallelDims {
    /// Data-parallel degree (number of model replicas).
    pub dp: usize,
    /// Pipeline-parallel degree (number of stages per replica).
    pub pp: usize,
    /// Tensor-parallel degree (shards per layer).
    pub tp: usize,
    /// Number of ranks in the job; equals `dp * pp * tp`.
    pub world_size: usize,
    /// How ranks are numbered across the grid.
    pub order: RankOrder,
}

impl ParallelDims {
    /// Validates a layout. `dp = 0` means "infer": `dp = world_size / (pp * tp)`,
    /// which must divide exactly. `pp` and `tp` must be at least 1. Ranks are
    /// numbered in the default order ([`RankOrder::TpDpPp`]).
    pub fn new(dp: usize, pp: usize, tp: usize, world_size: usize) -> Result<Self, TopologyError> {
        if world_size == 0 {
            return Err(TopologyError::ZeroWorldSize);
        }
        if pp == 0 {
            return Err(TopologyError::ZeroSize { key: KEY_PP });
        }
        if tp == 0 {
            return Err(TopologyError::ZeroSize { key: KEY_TP });
        }
        // Products are computed in u128 so absurd configs report their real
        // product instead of overflowing (three usizes can exceed u128 only in
        // theory; saturate in that case, the numbers are still "too big").
        let pp_tp = pp as u128 * tp as u128;
        let dp = if dp == 0 {
            let divisible = (world_size as u128).is_multiple_of(pp_tp);
            if !divisible {
                return Err(TopologyError::NotDivisible { pp, tp, pp_tp, world_size });
            }
            // Exact and ≤ world_size, so it fits in usize.
            (world_size as u128 / pp_tp) as usize
        } else {
            let product = pp_tp.saturating_mul(dp as u128);
            if product != world_size as u128 {
                return Err(TopologyError::ProductMismatch { dp, pp, tp, product, world_size });
            }
            dp
        };
        Ok(Self { dp, pp, tp, world_size, order: RankOrder::default() })
    }

    /// The same layout with ranks numbered in `order`.
    #[must_use]
    pub fn with_order(self, order: RankOrder) -> Self {
        Self { order, ..self }
    }

    /// Like [`ParallelDims::new`], for sizes read from a config as signed
    /// integers: negative values are rejected with a message naming the key.
    pub fn from_config(dp: i64, pp: i64, tp: i64, world_size: usize) -> Result<Self, TopologyError> {
        fn non_negative(key: &'static str, value: i64, hint: &'static str) -> Result<usize, TopologyError> {
            usize::try_from(value).map_err(|_| TopologyError::Negative { key, value, hint })
        }
        let dp = non_negative(KEY_DP, dp, "set it to the number of data-parallel replicas, or 0 to infer it from the world size")?;
        let pp = non_negative(KEY_PP, pp, "set it to the number of pipeline stages (1 disables pipeline parallelism)")?;
        let tp = non_negative(KEY_TP, tp, "set it to the tensor-parallel degree (1 disables tensor parallelism)")?;
        Self::new(dp, pp, tp, world_size)
    }

    /// A single-process layout (`1 × 1 × 1`).
    pub fn single() -> Self {
        Self { dp: 1, pp: 1, tp: 1, world_size: 1, order: RankOrder::default() }
    }

    /// The size of `dim`.
    pub fn size(&self, dim: Dim) -> usize {
        match dim {
            Dim::Dp => self.dp,
            Dim::Pp => self.pp,
            Dim::Tp => self.tp,
        }
    }

    /// Distance in rank numbers between neighbours along `dim`: the product
    /// of the sizes of the dimensions inside it in `self.order`.
    fn stride(&self, dim: Dim) -> usize {
        self.order.outermost_first().into_iter().rev().take_while(|&d| d != dim).map(|d| self.size(d)).product()
    }

    /// Whether gradients are replicated across more than one rank.
    pub fn dp_enabled(&self) -> bool {
        self.dp > 1
    }

    /// Whether the model is split into more than one pipeline stage.
    pub fn pp_enabled(&self) -> bool {
        self.pp > 1
    }

    /// Whether layers are sharded across more than one rank.
    pub fn tp_enabled(&self) -> bool {
        self.tp > 1
    }

    fn check_rank(&self, rank: usize) -> Result<(), TopologyError> {
        if rank < self.world_size {
            Ok(())
        } else {
            Err(TopologyError::RankOutOfRange { rank, world_size: self.world_size })
        }
    }

    /// The grid position of `rank`.
    pub fn coords(&self, rank: usize) -> Result<Coords, TopologyError> {
        self.check_rank(rank)?;
        let coord = |dim| (rank / self.stride(dim)) % self.size(dim);
        Ok(Coords { dp: coord(Dim::Dp), pp: coord(Dim::Pp), tp: coord(Dim::Tp) })
    }

    /// The rank at grid position `coords`.
    pub fn rank_of(&self, coords: Coords) -> Result<usize, TopologyError> {
        if coords.dp >= self.dp || coords.pp >= self.pp || coords.tp >= self.tp {
            return Err(TopologyError::CoordsOutOfRange { coords, dp: self.dp, pp: self.pp, tp: self.tp });
        }
        Ok(Dim::ALL.into_iter().map(|dim| coords.get(dim) * self.stride(dim)).sum())
    }

    /// All groups along `dim`: each group holds the ranks whose coordinates
    /// agree in the other two dimensions, sorted ascending (which is also the
    /// order of their `dim` coordinate). Groups are ordered by their smallest
    /// rank and together partition `0..world_size`.
    pub fn groups(&self, dim: Dim) -> Vec<Vec<usize>> {
        let (size, stride) = (self.size(dim), self.stride(dim));
        (0..self.world_size)
            // A group's leader has coordinate 0 along `dim`.
            .filter(|&r| (r / stride) % size == 0)
            .map(|leader| (0..size).map(|i| leader + i * stride).collect())
            .collect()
    }

    /// Data-parallel groups: ranks sharing pp and tp index. Each group
    /// all-reduces its gradients together.
    pub fn dp_groups(&self) -> Vec<Vec<usize>> {
        self.groups(Dim::Dp)
    }

    /// Pipeline groups: ranks sharing dp and tp index, in stage order. Each
    /// group is one pipeline (one model replica's stages).
    pub fn pp_groups(&self) -> Vec<Vec<usize>> {
        self.groups(Dim::Pp)
    }

    /// Tensor-parallel groups: ranks sharing dp and pp index.
    pub fn tp_groups(&self) -> Vec<Vec<usize>> {
        self.groups(Dim::Tp)
    }

    /// The group along `dim` that contains `rank` (sorted ascending; the
    /// position of `rank` in it is its `dim` coordinate).
    pub fn group_of(&self, rank: usize, dim: Dim) -> Result<Vec<usize>, TopologyError> {
        let coord = self.coords(rank)?.get(dim);
        let stride = self.stride(dim);
        let leader = rank - coord * stride;
        Ok((0..self.size(dim)).map(|i| leader + i * stride).collect())
    }

    /// The rank holding the previous pipeline stage of `rank`'s pipeline
    /// (same dp and tp index), or `None` on the first stage.
    pub fn pp_prev(&self, rank: usize) -> Result<Option<usize>, TopologyError> {
        let c = self.coords(rank)?;
        Ok((c.pp > 0).then(|| rank - self.stride(Dim::Pp)))
    }

    /// The rank holding the next pipeline stage of `rank`'s pipeline
    /// (same dp and tp index), or `None` on the last stage.
    pub fn pp_next(&self, rank: usize) -> Result<Option<usize>, TopologyError> {
        let c = self.coords(rank)?;
        Ok((c.pp + 1 < self.pp).then(|| rank + self.stride(Dim::Pp)))
    }

    /// Whether `rank` holds the first pipeline stage (embeddings, reads inputs).
    pub fn is_first_stage(&self, rank: usize) -> Result<bool, TopologyError> {
        Ok(self.coords(rank)?.pp == 0)
    }

    /// Whether `rank` holds the last pipeline stage (head, computes the loss).
    pub fn is_last_stage(&self, rank: usize) -> Result<bool, TopologyError> {
        Ok(self.coords(rank)?.pp + 1 == self.pp)
    }
}

impl fmt::Display for ParallelDims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dp {} × pp {} × tp {} = {} ranks", self.dp, self.pp, self.tp, self.world_size)
    }
}

#[cfg(test)]
mod tests;
