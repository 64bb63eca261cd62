//! A communicator that counts what passes through it: [`Counted`] wraps any [`Communicator`]
//! and adds, per operation kind, the calls and the elements and bytes each accepted call moves
//! (an all-reduce its tensor; an all-gather its output, the gathered whole; a reduce-scatter
//! its input, the whole before scattering; a send or receive its tensor). Split groups are not
//! counted. The counts are what the benchmarks compare with the textbook formulas (Megatron-LM's
//! tensor-parallel traffic), exactly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tch::Tensor;

use crate::communicator::Communicator;
use crate::error::Result;
use crate::types::{Backend, ReduceOp};
use crate::work::Work;

/// The operation kinds [`Traffic`] counts apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counted {
    AllReduce,
    Broadcast,
    AllGather,
    ReduceScatter,
    Send,
    Recv,
}

const KINDS: usize = 6;

/// Running totals of one communicator's traffic (shared with whoever reads them).
#[derive(Debug, Default)]
pub struct Traffic {
    calls: [AtomicU64; KINDS],
    elements: [AtomicU64; KINDS],
    bytes: [AtomicU64; KINDS],
}

/// One kind's totals at a moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub calls: u64,
    pub elements: u64,
    pub bytes: u64,
}

impl std::ops::Sub for Tally {
    type Output = Tally;
    fn sub(self, o: Tally) -> Tally {
        Tally { calls: self.calls - o.calls, elements: self.elements - o.elements, bytes: self.bytes - o.bytes }
    }
}

impl Traffic {
    fn add(&self, kind: Counted, t: &Tensor) {
        let i = kind as usize;
        let n = t.numel() as u64;
        self.calls[i].fetch_add(1, Ordering::Relaxed);
        self.elements[i].fetch_add(n, Ordering::Relaxed);
        self.bytes[i].fetch_add(n * t.kind().elt_size_in_bytes() as u64, Ordering::Relaxed);
    }

    /// The totals of `kind` so far.
    pub fn get(&self, kind: Counted) -> Tally {
        let i = kind as usize;
        Tally {
            calls: self.calls[i].load(Ordering::Relaxed),
            elements: self.elements[i].load(Ordering::Relaxed),
            bytes: self.bytes[i].load(Ordering::Relaxed),
        }
    }
}

/// `inner`, counting its traffic into [`CountingComm::traffic`].
pub struct CountingComm {
    inner: Arc<dyn Communicator>,
    traffic: Arc<Traffic>,
}

impl CountingComm {
    pub fn new(inner: Arc<dyn Communicator>) -> CountingComm {
        CountingComm { inner, traffic: Arc::new(Traffic::default()) }
    }

    /// The running totals (a handle that stays valid after the communicator is shared).
    pub fn traffic(&self) -> Arc<Traffic> {
        self.traffic.clone()
    }

    /// Counts `t` under `kind` when the call was accepted.
    fn count(&self, kind: Counted, t: &Tensor, r: Result<Work>) -> Result<Work> {
        if r.is_ok() {
            self.traffic.add(kind, t);
        }
        r
    }
}

impl Communicator for CountingComm {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn backend(&self) -> Backend {
        self.inner.backend()
    }
    fn members(&self) -> &[usize] {
        self.inner.members()
    }
    fn all_reduce_async(&self, t: &Tensor, op: ReduceOp) -> Result<Work> {
        self.count(Counted::AllReduce, t, self.inner.all_reduce_async(t, op))
    }
    fn broadcast_async(&self, t: &Tensor, root: usize) -> Result<Work> {
        self.count(Counted::Broadcast, t, self.inner.broadcast_async(t, root))
    }
    fn all_gather_async(&self, output: &Tensor, input: &Tensor) -> Result<Work> {
        self.count(Counted::AllGather, output, self.inner.all_gather_async(output, input))
    }
    fn reduce_scatter_async(&self, output: &Tensor, input: &Tensor, op: ReduceOp) -> Result<Work> {
        self.count(Counted::ReduceScatter, input, self.inner.reduce_scatter_async(output, input, op))
    }
    fn send_async(&self, t: &Tensor, dst: usize) -> Result<Work> {
        self.count(Counted::Send, t, self.inner.send_async(t, dst))
    }
    fn recv_async(&self, t: &Tensor, src: usize) -> Result<Work> {
        self.count(Counted::Recv, t, self.inner.recv_async(t, src))
    }
    fn barrier_async(&self) -> Result<Work> {
        self.inner.barrier_async()
    }
    fn split(&self, color: Option<u32>, key: u32, name: &str) -> Result<Option<Arc<dyn Communicator>>> {
        self.inner.split(color, key, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::single::SingleComm;
    use tch::Kind;

    #[test]
    fn accepted_calls_are_counted_by_kind_and_refused_ones_not() {
        let c = CountingComm::new(Arc::new(SingleComm::new("t", 0)));
        let x = Tensor::ones([3, 4], (Kind::Float, tch::Device::Cpu));
        c.all_reduce(&x, ReduceOp::Sum).unwrap();
        c.all_reduce(&x.to_kind(Kind::BFloat16), ReduceOp::Sum).unwrap();
        let out = Tensor::zeros([12], (Kind::Float, tch::Device::Cpu));
        c.all_gather(&out, &x.reshape([-1])).unwrap();
        // Refused: the output has the wrong size.
        assert!(c.all_gather(&Tensor::zeros([5], (Kind::Float, tch::Device::Cpu)), &x.reshape([-1])).is_err());
        let t = c.traffic();
        assert_eq!(t.get(Counted::AllReduce), Tally { calls: 2, elements: 24, bytes: 48 + 24 });
        assert_eq!(t.get(Counted::AllGather), Tally { calls: 1, elements: 12, bytes: 48 });
        assert_eq!(t.get(Counted::ReduceScatter), Tally::default());
    }
}
