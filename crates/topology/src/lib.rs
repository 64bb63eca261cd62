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
mod tests {
    use super::*;

    const MAX_WORLD: usize = 64;

    /// Every valid `(dp, pp, tp)` for every world size in `1..=MAX_WORLD`,
    /// in the default order.
    fn all_layouts() -> Vec<ParallelDims> {
        let mut out = Vec::new();
        for world in 1..=MAX_WORLD {
            for dp in 1..=world {
                for pp in 1..=world {
                    if world % (dp * pp) != 0 {
                        continue;
                    }
                    let tp = world / (dp * pp);
                    out.push(ParallelDims::new(dp, pp, tp, world).unwrap());
                }
            }
        }
        out
    }

    /// [`all_layouts`] in every rank order.
    fn all_layouts_all_orders() -> Vec<ParallelDims> {
        let mut out = Vec::new();
        for d in all_layouts() {
            for order in RankOrder::ALL {
                out.push(d.with_order(order));
            }
        }
        out
    }

    /// The rank of `(dp, pp, tp)` by each order's documented formula.
    fn formula(d: &ParallelDims, c: Coords) -> usize {
        match d.order {
            RankOrder::TpDpPp => c.pp * d.dp * d.tp + c.dp * d.tp + c.tp,
            RankOrder::TpPpDp => c.dp * d.pp * d.tp + c.pp * d.tp + c.tp,
        }
    }

    #[test]
    fn enumerates_all_factorisations() {
        let layouts = all_layouts();
        // Number of ordered triples with product n, summed over n = 1..=MAX_WORLD.
        let expected: usize =
            (1..=MAX_WORLD).map(|n| (1..=n).filter(|d| n % d == 0).map(|d| (1..=n / d).filter(|e| (n / d) % e == 0).count()).sum::<usize>()).sum();
        assert_eq!(layouts.len(), expected);
        assert!(layouts.iter().any(|d| d.dp == 2 && d.pp == 2 && d.tp == 8));
        assert!(layouts.iter().any(|d| d.dp == 4 && d.pp == 4 && d.tp == 4));
        assert!(layouts.iter().all(|d| d.order == RankOrder::TpDpPp));
        assert_eq!(all_layouts_all_orders().len(), 2 * expected);
    }

    #[test]
    fn default_order_is_megatron() {
        assert_eq!(RankOrder::default(), RankOrder::TpDpPp);
        assert_eq!(ParallelDims::single().order, RankOrder::TpDpPp);
        assert_eq!(ParallelDims::new(2, 2, 1, 4).unwrap().order, RankOrder::TpDpPp);
        assert_eq!(ParallelDims::from_config(0, 2, 1, 4).unwrap().order, RankOrder::TpDpPp);
        let d = ParallelDims::new(2, 2, 1, 4).unwrap().with_order(RankOrder::TpPpDp);
        assert_eq!(d.order, RankOrder::TpPpDp);
        assert_eq!((d.dp, d.pp, d.tp, d.world_size), (2, 2, 1, 4));
        assert_eq!(d.with_order(RankOrder::TpDpPp), ParallelDims::new(2, 2, 1, 4).unwrap());
    }

    #[test]
    fn order_parse_display_and_key() {
        assert_eq!(KEY_ORDER, "parallel.order");
        for (text, order) in [("tp-dp-pp", RankOrder::TpDpPp), ("tp-pp-dp", RankOrder::TpPpDp)] {
            assert_eq!(text.parse::<RankOrder>().unwrap(), order);
            assert_eq!(order.to_string(), text);
            assert_eq!(order.as_str(), text);
        }
        for bad in ["", "dp-pp-tp", "TP-DP-PP", " tp-dp-pp", "tp-dp-pp\nx", "tp-dp"] {
            let e = bad.parse::<RankOrder>().unwrap_err();
            assert_eq!(e, TopologyError::UnknownOrder { value: bad.to_string() });
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "{msg}");
            for needle in ["parallel.order", "\"tp-dp-pp\"", "\"tp-pp-dp\""] {
                assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
            }
        }
        assert_eq!(
            "pp-tp".parse::<RankOrder>().unwrap_err().to_string(),
            "parallel.order = \"pp-tp\" is not a known rank order: use \"tp-dp-pp\" \
             (default: tp fastest, pipeline outermost) or \"tp-pp-dp\" (data parallel outermost)"
        );
    }

    #[test]
    fn outermost_first_matches_strides() {
        assert_eq!(RankOrder::TpDpPp.outermost_first(), [Dim::Pp, Dim::Dp, Dim::Tp]);
        assert_eq!(RankOrder::TpPpDp.outermost_first(), [Dim::Dp, Dim::Pp, Dim::Tp]);
        for d in all_layouts_all_orders() {
            let dims = d.order.outermost_first();
            let mut sorted = dims;
            sorted.sort_by_key(|&x| Dim::ALL.iter().position(|&y| y == x));
            assert_eq!(sorted, Dim::ALL, "each dimension once");
            // The innermost dimension has stride 1; each outer one the product
            // of the sizes inside it.
            let mut expected = 1;
            for &dim in dims.iter().rev() {
                assert_eq!(d.stride(dim), expected, "{d} {}: {dim}", d.order);
                expected *= d.size(dim);
            }
            assert_eq!(expected, d.world_size);
        }
    }

    #[test]
    fn rank_coords_round_trip_and_layout_formula() {
        for d in all_layouts_all_orders() {
            for rank in 0..d.world_size {
                let c = d.coords(rank).unwrap();
                assert!(c.dp < d.dp && c.pp < d.pp && c.tp < d.tp, "{d}: {c}");
                assert_eq!(rank, formula(&d, c), "{d} {}: {c}", d.order);
                assert_eq!(d.rank_of(c).unwrap(), rank, "{d}: {c}");
            }
            // Every coordinate maps to a distinct rank.
            let mut ranks = Vec::new();
            for dp in 0..d.dp {
                for pp in 0..d.pp {
                    for tp in 0..d.tp {
                        let c = Coords { dp, pp, tp };
                        let r = d.rank_of(c).unwrap();
                        assert_eq!(r, formula(&d, c), "{d} {}: {c}", d.order);
                        assert_eq!(d.coords(r).unwrap(), c);
                        ranks.push(r);
                    }
                }
            }
            ranks.sort_unstable();
            assert_eq!(ranks, (0..d.world_size).collect::<Vec<_>>(), "{d}");
        }
    }

    #[test]
    fn old_order_reproduces_old_formula() {
        // Written out independently of `formula` and `stride`.
        for base in all_layouts() {
            let d = base.with_order(RankOrder::TpPpDp);
            for rank in 0..d.world_size {
                let c = d.coords(rank).unwrap();
                assert_eq!((c.dp, c.pp, c.tp), (rank / (d.pp * d.tp), (rank / d.tp) % d.pp, rank % d.tp), "{d} rank {rank}");
            }
            let new = base.with_order(RankOrder::TpDpPp);
            for rank in 0..new.world_size {
                let c = new.coords(rank).unwrap();
                assert_eq!((c.dp, c.pp, c.tp), ((rank / new.tp) % new.dp, rank / (new.dp * new.tp), rank % new.tp), "{new} rank {rank}");
            }
            // The two orders coincide exactly when dp or pp is 1.
            let same = (0..d.world_size).all(|r| d.coords(r) == new.coords(r));
            assert_eq!(same, d.dp == 1 || d.pp == 1, "{d}");
        }
    }

    #[test]
    fn groups_partition_world_and_vary_only_their_dim() {
        for d in all_layouts_all_orders() {
            for dim in Dim::ALL {
                let groups = d.groups(dim);
                let expected_named = match dim {
                    Dim::Dp => d.dp_groups(),
                    Dim::Pp => d.pp_groups(),
                    Dim::Tp => d.tp_groups(),
                };
                assert_eq!(groups, expected_named);
                assert_eq!(groups.len(), d.world_size / d.size(dim), "{d} {dim}");
                assert!(groups.windows(2).all(|w| w[0][0] < w[1][0]), "{d} {dim}: groups not ordered by smallest rank");

                let mut all: Vec<usize> = groups.iter().flatten().copied().collect();
                all.sort_unstable();
                assert_eq!(all, (0..d.world_size).collect::<Vec<_>>(), "{d} {dim}: not a partition");

                for group in &groups {
                    assert_eq!(group.len(), d.size(dim), "{d} {dim}");
                    assert!(group.windows(2).all(|w| w[0] < w[1]), "{d} {dim}: {group:?} not sorted");
                    let first = d.coords(group[0]).unwrap();
                    for (i, &r) in group.iter().enumerate() {
                        let c = d.coords(r).unwrap();
                        // Position in the group is the coordinate along `dim`…
                        assert_eq!(c.get(dim), i, "{d} {dim}: {group:?}");
                        // …and all other coordinates agree.
                        for other in Dim::ALL.into_iter().filter(|&o| o != dim) {
                            assert_eq!(c.get(other), first.get(other), "{d} {dim}: {group:?}");
                        }
                        assert_eq!(&d.group_of(r, dim).unwrap(), group, "{d} {dim} rank {r}");
                    }
                }
            }
        }
    }

    #[test]
    fn tp_groups_are_runs_of_consecutive_ranks() {
        for d in all_layouts_all_orders() {
            for (i, group) in d.tp_groups().into_iter().enumerate() {
                let run: Vec<usize> = (i * d.tp..(i + 1) * d.tp).collect();
                assert_eq!(group, run, "{d} {}", d.order);
            }
        }
    }

    #[test]
    fn default_order_keeps_dp_groups_compact() {
        for base in all_layouts() {
            let d = base.with_order(RankOrder::TpDpPp);
            let block = d.dp * d.tp;
            for (i, group) in d.dp_groups().into_iter().enumerate() {
                let (lo, hi) = (group[0], *group.last().unwrap());
                // Inside one aligned block of dp × tp consecutive ranks (one
                // pipeline stage's ranks), spread only by the tp stride.
                assert_eq!(lo / block, hi / block, "{d}: {group:?}");
                assert_eq!(lo / block, i / d.tp, "{d}: {group:?}");
                assert_eq!(hi - lo, (d.dp - 1) * d.tp, "{d}: {group:?}");
                if d.tp == 1 {
                    let contiguous: Vec<usize> = (lo..=hi).collect();
                    assert_eq!(group, contiguous, "{d}");
                }
            }
            // Together with their tp peers, the dp groups of one stage fill
            // exactly one block of dp × tp consecutive ranks.
            for stage in 0..d.pp {
                let mut ranks: Vec<usize> = d.dp_groups().into_iter().flatten().filter(|&r| d.coords(r).unwrap().pp == stage).collect();
                ranks.sort_unstable();
                assert_eq!(ranks, (stage * block..(stage + 1) * block).collect::<Vec<_>>());
            }
            // The old order spreads them further whenever pipelining is on.
            let old = base.with_order(RankOrder::TpPpDp);
            let span = |g: &Vec<usize>| g.last().unwrap() - g[0];
            let new_span = d.dp_groups().iter().map(span).max().unwrap();
            let old_span = old.dp_groups().iter().map(span).max().unwrap();
            if d.dp > 1 && d.pp > 1 {
                assert!(new_span < old_span, "{d}: {new_span} vs {old_span}");
            } else {
                assert_eq!(new_span, old_span, "{d}");
            }
        }
    }

    #[test]
    fn pipeline_neighbours_consistent_with_coords() {
        for d in all_layouts_all_orders() {
            for rank in 0..d.world_size {
                let c = d.coords(rank).unwrap();
                let prev = d.pp_prev(rank).unwrap();
                let next = d.pp_next(rank).unwrap();
                let at = |pp| d.rank_of(Coords { pp, ..c }).unwrap();
                assert_eq!(prev, (c.pp > 0).then(|| at(c.pp - 1)), "{d} {} rank {rank}", d.order);
                assert_eq!(next, (c.pp + 1 < d.pp).then(|| at(c.pp + 1)), "{d} {} rank {rank}", d.order);
                assert_eq!(d.is_first_stage(rank).unwrap(), c.pp == 0);
                assert_eq!(d.is_last_stage(rank).unwrap(), c.pp + 1 == d.pp);
                if let Some(p) = prev {
                    let pc = d.coords(p).unwrap();
                    assert_eq!((pc.dp, pc.pp + 1, pc.tp), (c.dp, c.pp, c.tp));
                    assert_eq!(d.pp_next(p).unwrap(), Some(rank));
                }
                if let Some(n) = next {
                    let nc = d.coords(n).unwrap();
                    assert_eq!((nc.dp, nc.pp, nc.tp), (c.dp, c.pp + 1, c.tp));
                    assert_eq!(d.pp_prev(n).unwrap(), Some(rank));
                }
            }
        }
    }

    #[test]
    fn pipeline_neighbours_walk_each_pipeline_in_order() {
        for d in all_layouts_all_orders() {
            for pipeline in d.pp_groups() {
                // Walk forward from the first stage.
                let mut walk = vec![pipeline[0]];
                assert_eq!(d.pp_prev(pipeline[0]).unwrap(), None);
                while let Some(next) = d.pp_next(*walk.last().unwrap()).unwrap() {
                    assert_eq!(d.pp_prev(next).unwrap(), walk.last().copied(), "{d}");
                    walk.push(next);
                    assert!(walk.len() <= d.pp, "{d}: pp_next does not terminate");
                }
                assert_eq!(walk, pipeline, "{d}");

                // Walk backward from the last stage.
                let mut back = vec![*pipeline.last().unwrap()];
                while let Some(prev) = d.pp_prev(*back.last().unwrap()).unwrap() {
                    back.push(prev);
                }
                back.reverse();
                assert_eq!(back, pipeline, "{d}");

                for (stage, &r) in pipeline.iter().enumerate() {
                    assert_eq!(d.is_first_stage(r).unwrap(), stage == 0, "{d} rank {r}");
                    assert_eq!(d.is_last_stage(r).unwrap(), stage + 1 == d.pp, "{d} rank {r}");
                }
            }
        }
    }

    #[test]
    fn documented_dp2_pp2_table() {
        let d = ParallelDims::new(2, 2, 1, 4).unwrap();
        // (rank, dp, pp), as in the crate docs.
        let table = [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)];
        for (rank, dp, pp) in table {
            assert_eq!(d.coords(rank).unwrap(), Coords { dp, pp, tp: 0 });
        }
        assert_eq!(d.pp_groups(), vec![vec![0, 2], vec![1, 3]]);
        assert_eq!(d.dp_groups(), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(d.tp_groups(), vec![vec![0], vec![1], vec![2], vec![3]]);
        assert_eq!(d.pp_next(1).unwrap(), Some(3));
        assert_eq!(d.pp_prev(2).unwrap(), Some(0));
        assert!(d.is_first_stage(1).unwrap() && d.is_last_stage(2).unwrap());
    }

    #[test]
    fn old_order_dp2_pp2_table() {
        let d = ParallelDims::new(2, 2, 1, 4).unwrap().with_order(RankOrder::TpPpDp);
        let table = [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)];
        for (rank, dp, pp) in table {
            assert_eq!(d.coords(rank).unwrap(), Coords { dp, pp, tp: 0 });
        }
        assert_eq!(d.pp_groups(), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(d.dp_groups(), vec![vec![0, 2], vec![1, 3]]);
        assert_eq!(d.group_of(3, Dim::Dp).unwrap(), vec![1, 3]);
        assert_eq!(d.pp_next(0).unwrap(), Some(1));
        assert_eq!(d.pp_next(1).unwrap(), None);
    }

    #[test]
    fn megatron_order_with_tp() {
        // dp 2 × pp 2 × tp 2: tp peers adjacent, dp stride tp, pp stride dp × tp.
        let d = ParallelDims::new(2, 2, 2, 8).unwrap();
        assert_eq!(d.tp_groups(), vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]);
        assert_eq!(d.dp_groups(), vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]);
        assert_eq!(d.pp_groups(), vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]);
        assert_eq!(d.coords(6).unwrap(), Coords { dp: 1, pp: 1, tp: 0 });
        assert_eq!(d.coords(5).unwrap(), Coords { dp: 0, pp: 1, tp: 1 });
        assert_eq!(d.pp_next(1).unwrap(), Some(5));
        assert_eq!(d.pp_prev(7).unwrap(), Some(3));
    }

    #[test]
    fn old_order_with_tp() {
        // dp 2 × pp 2 × tp 2 in the old order: pipeline stride tp, dp stride pp × tp.
        let d = ParallelDims::new(2, 2, 2, 8).unwrap().with_order(RankOrder::TpPpDp);
        assert_eq!(d.tp_groups(), vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]);
        assert_eq!(d.pp_groups(), vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]);
        assert_eq!(d.dp_groups(), vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]);
        assert_eq!(d.coords(6).unwrap(), Coords { dp: 1, pp: 1, tp: 0 });
        assert_eq!(d.pp_next(1).unwrap(), Some(3));
        assert_eq!(d.pp_prev(7).unwrap(), Some(5));
    }

    #[test]
    fn infers_dp() {
        for world in 1..=32usize {
            for pp in 1..=world {
                for tp in 1..=world {
                    let r = ParallelDims::new(0, pp, tp, world);
                    if world % (pp * tp) == 0 {
                        let d = r.unwrap();
                        assert_eq!((d.dp, d.pp, d.tp, d.world_size), (world / (pp * tp), pp, tp, world));
                    } else {
                        assert!(matches!(r, Err(TopologyError::NotDivisible { .. })), "{world} {pp} {tp}");
                    }
                }
            }
        }
        assert_eq!(ParallelDims::new(0, 1, 1, 1).unwrap(), ParallelDims::single());
    }

    #[test]
    fn product_mismatch_message() {
        let e = ParallelDims::new(2, 2, 1, 6).unwrap_err();
        assert_eq!(
            e.to_string(),
            "parallel.dp × parallel.pp × parallel.tp = 2 × 2 × 1 = 4, but the job has 6 ranks (world size): \
             set them so the product is 6, or launch 4 ranks"
        );
        assert!(!e.to_string().contains('\n'));
        // Huge values do not overflow.
        let e = ParallelDims::new(usize::MAX, usize::MAX, 1, 4).unwrap_err();
        assert!(matches!(e, TopologyError::ProductMismatch { .. }), "{e}");
        assert!(e.to_string().contains(&(usize::MAX as u128 * usize::MAX as u128).to_string()), "{e}");
    }

    #[test]
    fn not_divisible_message() {
        let e = ParallelDims::new(0, 4, 1, 6).unwrap_err();
        let msg = e.to_string();
        for needle in ["parallel.dp", "parallel.pp", "parallel.tp", "6", "4 × 1 = 4", "multiple of 4"] {
            assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
        }
        assert!(!msg.contains('\n'));
        // pp × tp larger than the world is reported the same way.
        let msg = ParallelDims::new(0, 4, 2, 4).unwrap_err().to_string();
        assert!(msg.contains("4 × 2 = 8") && msg.contains("world size 4"), "{msg}");
    }

    #[test]
    fn zero_and_negative_sizes() {
        let msg = ParallelDims::new(1, 0, 1, 1).unwrap_err().to_string();
        assert!(msg.starts_with("parallel.pp = 0") && msg.contains("set parallel.pp to at least 1"), "{msg}");
        let msg = ParallelDims::new(1, 1, 0, 1).unwrap_err().to_string();
        assert!(msg.starts_with("parallel.tp = 0") && msg.contains("set parallel.tp to at least 1"), "{msg}");
        assert_eq!(ParallelDims::new(1, 1, 1, 0).unwrap_err(), TopologyError::ZeroWorldSize);
        assert!(ParallelDims::new(0, 1, 1, 0).unwrap_err().to_string().contains("world size is 0"));

        let msg = ParallelDims::from_config(-1, 1, 1, 4).unwrap_err().to_string();
        assert!(msg.starts_with("parallel.dp = -1 is negative") && msg.contains("or 0 to infer"), "{msg}");
        let msg = ParallelDims::from_config(1, -2, 1, 4).unwrap_err().to_string();
        assert!(msg.starts_with("parallel.pp = -2 is negative"), "{msg}");
        let msg = ParallelDims::from_config(1, 1, -3, 4).unwrap_err().to_string();
        assert!(msg.starts_with("parallel.tp = -3 is negative"), "{msg}");
        assert_eq!(ParallelDims::from_config(0, 2, 1, 4).unwrap(), ParallelDims::new(2, 2, 1, 4).unwrap());
        assert_eq!(ParallelDims::from_config(1, 0, 1, 1).unwrap_err(), TopologyError::ZeroSize { key: KEY_PP });
    }

    #[test]
    fn out_of_range_queries() {
        let d = ParallelDims::new(2, 2, 1, 4).unwrap();
        let e = d.coords(4).unwrap_err();
        assert_eq!(e.to_string(), "rank 4 is out of range: the job has 4 ranks (0..=3)");
        for r in [4, 5, usize::MAX] {
            assert!(d.coords(r).is_err());
            assert!(d.group_of(r, Dim::Dp).is_err());
            assert!(d.pp_prev(r).is_err());
            assert!(d.pp_next(r).is_err());
            assert!(d.is_first_stage(r).is_err());
            assert!(d.is_last_stage(r).is_err());
        }
        let msg = d.rank_of(Coords { dp: 0, pp: 2, tp: 0 }).unwrap_err().to_string();
        assert_eq!(msg, "coordinates (dp 0, pp 2, tp 0) are out of range for parallel.dp × parallel.pp × parallel.tp = 2 × 2 × 1");
        assert!(d.rank_of(Coords { dp: 2, pp: 0, tp: 0 }).is_err());
        assert!(d.rank_of(Coords { dp: 0, pp: 0, tp: 1 }).is_err());
    }

    #[test]
    fn display_and_keys() {
        let d = ParallelDims::new(4, 2, 1, 8).unwrap();
        assert_eq!(d.to_string(), "dp 4 × pp 2 × tp 1 = 8 ranks");
        assert!(d.dp_enabled() && d.pp_enabled() && !d.tp_enabled());
        assert_eq!(Dim::Pp.key(), "parallel.pp");
        assert_eq!(Dim::Tp.to_string(), "tp");
    }
}
