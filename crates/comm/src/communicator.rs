//! The `Communicator` trait: collectives and point-to-point over tch tensors.
//!
//! Every operation comes in two forms: `op(..)` blocks until the result is in place, and
//! `op_async(..)` returns a [`Work`] at once. Operations on one communicator run in the order they
//! were issued. Arguments are checked when the call is made (an `Err` then), and the transfer's
//! own failure comes out of `wait`.
//!
//! Tensors may be non-contiguous (they are staged through a contiguous copy and written back) and,
//! on the MPI backend, on a GPU (staged through host memory unless the MPI library is CUDA-aware).
//! Point-to-point calls are not ordered after pending collectives of the same communicator: wait
//! for those first.

use std::sync::Arc;

use tch::Tensor;

use crate::error::Result;
use crate::types::{Backend, ReduceOp};
use crate::work::Work;

pub trait Communicator: Send + Sync {
    /// This process's rank in the group.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// Name used in messages, e.g. `world` or `dp1`.
    fn name(&self) -> &str;
    fn backend(&self) -> Backend;
    /// World rank of each member, indexed by group rank.
    fn members(&self) -> &[usize];

    /// In place: `t` becomes the reduction of every rank's `t`.
    fn all_reduce_async(&self, t: &Tensor, op: ReduceOp) -> Result<Work>;
    /// In place: `t` on every rank becomes `t` of `root`.
    fn broadcast_async(&self, t: &Tensor, root: usize) -> Result<Work>;
    /// `output` (size × `input` elements) becomes the ranks' inputs in rank order. In place when
    /// `input` is this rank's chunk of `output`.
    fn all_gather_async(&self, output: &Tensor, input: &Tensor) -> Result<Work>;
    /// `output` becomes chunk `rank` of the reduction of every rank's `input` (size × `output`
    /// elements). `output` may be a chunk of `input`.
    fn reduce_scatter_async(&self, output: &Tensor, input: &Tensor, op: ReduceOp) -> Result<Work>;
    fn send_async(&self, t: &Tensor, dst: usize) -> Result<Work>;
    /// Receives into `t`, which must have exactly as many elements as were sent.
    fn recv_async(&self, t: &Tensor, src: usize) -> Result<Work>;
    fn barrier_async(&self) -> Result<Work>;

    /// Collective: ranks with the same `color` form a new group, ordered by `key` (then by rank).
    /// Ranks passing `None` get `None`. `name` names the new group in messages.
    fn split(&self, color: Option<u32>, key: u32, name: &str) -> Result<Option<Arc<dyn Communicator>>>;

    fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<()> {
        self.all_reduce_async(t, op)?.wait()
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        self.broadcast_async(t, root)?.wait()
    }
    fn all_gather(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        self.all_gather_async(output, input)?.wait()
    }
    fn reduce_scatter(&self, output: &Tensor, input: &Tensor, op: ReduceOp) -> Result<()> {
        self.reduce_scatter_async(output, input, op)?.wait()
    }
    fn send(&self, t: &Tensor, dst: usize) -> Result<()> {
        self.send_async(t, dst)?.wait()
    }
    fn recv(&self, t: &Tensor, src: usize) -> Result<()> {
        self.recv_async(t, src)?.wait()
    }
    fn barrier(&self) -> Result<()> {
        self.barrier_async()?.wait()
    }

    /// Collective over this group: the sub-group (from a topology's group lists, given as ranks of
    /// this group) that contains this rank, named `{prefix}{index}`. Every rank must be in exactly
    /// one list; a rank in none gets `None`.
    fn split_groups(&self, groups: &[Vec<usize>], prefix: &str) -> Result<Option<Arc<dyn Communicator>>> {
        let me = self.rank();
        let found = groups.iter().enumerate().find_map(|(i, g)| g.iter().position(|&r| r == me).map(|pos| (i, pos)));
        match found {
            Some((i, pos)) => self.split(Some(i as u32), pos as u32, &format!("{prefix}{i}")),
            None => self.split(None, 0, prefix),
        }
    }
}
