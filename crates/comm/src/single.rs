//! A world (or group) of one process: collectives are local copies, so a plain `fabbrica train`
//! runs without a launcher and through the same code as a distributed run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tch::Tensor;

use crate::communicator::Communicator;
use crate::error::{CommError, OpContext, Result};
use crate::types::{Backend, DType, OpKind, ReduceOp};
use crate::work::Work;

pub struct SingleComm {
    name: String,
    members: Vec<usize>,
    seq: AtomicU64,
}

impl SingleComm {
    pub fn new(name: &str, world_rank: usize) -> SingleComm {
        SingleComm { name: name.into(), members: vec![world_rank], seq: AtomicU64::new(0) }
    }

    fn ctx(&self, op: OpKind) -> OpContext {
        OpContext {
            op,
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            group: self.name.clone(),
            backend: Backend::Single,
            rank: 0,
            size: 1,
            world_rank: self.members[0],
        }
    }

    fn dtype(ctx: &OpContext, t: &Tensor) -> Result<DType> {
        DType::from_kind(t.kind()).ok_or_else(|| CommError::UnsupportedDtype { ctx: ctx.clone(), dtype: format!("{:?}", t.kind()) })
    }

    /// `output` gets `input`'s elements (same count, any shapes or strides).
    fn copy(ctx: &OpContext, output: &Tensor, input: &Tensor) -> Result<Work> {
        Self::dtype(ctx, input)?;
        if output.numel() != input.numel() || output.kind() != input.kind() {
            let (o, i) = (output.numel(), input.numel());
            let what = if output.kind() != input.kind() {
                format!("output is {:?} but input is {:?}; pass tensors of one dtype", output.kind(), input.kind())
            } else if ctx.op == OpKind::AllGather {
                format!("output has {o} elements but all_gather of {i} elements over 1 rank needs {i}")
            } else {
                format!("input has {i} elements but reduce_scatter into {o} elements over 1 rank needs {o}")
            };
            return Err(CommError::InvalidArgument { ctx: ctx.clone(), what });
        }
        if output.data_ptr() != input.data_ptr() || output.stride() != input.stride() {
            let mut o = output.shallow_clone();
            tch::no_grad(|| o.f_copy_(&input.reshape(output.size()))).map_err(|e| CommError::Backend { ctx: ctx.clone(), detail: e.to_string() })?;
        }
        Ok(Work::done(Ok(())))
    }
}

impl Communicator for SingleComm {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn backend(&self) -> Backend {
        Backend::Single
    }
    fn members(&self) -> &[usize] {
        &self.members
    }
    fn all_reduce_async(&self, t: &Tensor, op: ReduceOp) -> Result<Work> {
        let ctx = self.ctx(OpKind::AllReduce);
        let dt = Self::dtype(&ctx, t)?;
        if op == ReduceOp::Avg && !dt.is_float() {
            return Err(CommError::InvalidArgument { ctx, what: format!("avg of {dt} tensors is not defined; use sum and divide") });
        }
        Ok(Work::done(Ok(())))
    }
    fn broadcast_async(&self, t: &Tensor, root: usize) -> Result<Work> {
        let ctx = self.ctx(OpKind::Broadcast);
        Self::dtype(&ctx, t)?;
        if root != 0 {
            return Err(CommError::InvalidArgument { ctx, what: format!("root {root} is not a rank of this group (size 1)") });
        }
        Ok(Work::done(Ok(())))
    }
    fn all_gather_async(&self, output: &Tensor, input: &Tensor) -> Result<Work> {
        Self::copy(&self.ctx(OpKind::AllGather), output, input)
    }
    fn reduce_scatter_async(&self, output: &Tensor, input: &Tensor, _op: ReduceOp) -> Result<Work> {
        Self::copy(&self.ctx(OpKind::ReduceScatter), output, input)
    }
    fn send_async(&self, _t: &Tensor, dst: usize) -> Result<Work> {
        Err(CommError::InvalidArgument {
            ctx: self.ctx(OpKind::Send),
            what: format!("no rank {dst} to send to in a group of one; launch more ranks with mpirun -np N"),
        })
    }
    fn recv_async(&self, _t: &Tensor, src: usize) -> Result<Work> {
        Err(CommError::InvalidArgument {
            ctx: self.ctx(OpKind::Recv),
            what: format!("no rank {src} to receive from in a group of one; launch more ranks with mpirun -np N"),
        })
    }
    fn barrier_async(&self) -> Result<Work> {
        self.ctx(OpKind::Barrier);
        Ok(Work::done(Ok(())))
    }
    fn split(&self, color: Option<u32>, _key: u32, name: &str) -> Result<Option<Arc<dyn Communicator>>> {
        self.ctx(OpKind::Split);
        Ok(color.map(|_| Arc::new(SingleComm::new(name, self.members[0])) as Arc<dyn Communicator>))
    }
}
