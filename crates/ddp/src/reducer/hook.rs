//! Communication hooks: what a bucket's collective is, as PyTorch DDP's `register_comm_hook`
//! makes it pluggable. The reducer decides *when* a bucket is reduced (in bucket order, from
//! backward's hooks or from `finish`) and waits for it; the hook decides *how*: which collective,
//! in which dtype, with what before and after. Two are built in, PyTorch's two defaults:
//! [`AllReduce`] (`allreduce_hook`) and [`Bf16Compress`] (`bf16_compress_hook`).
//!
//! Every hook averages over the data-parallel group, into the whole bucket or, under ZeRO-1,
//! into this rank's shard of it ([`HookBucket::shard`]): the optimizer reads only that part.

use fabbrica_comm::{CommError, Communicator, ReduceOp, Work};
use tch::{Kind, TchError, Tensor};

/// One bucket, as a hook sees it.
pub struct HookBucket<'a> {
    /// The bucket's flat gradients (the parameters' `.grad` are views of it).
    pub grad: &'a Tensor,
    /// What [`CommHook::prepare`] allocated for this bucket, if anything.
    pub scratch: Option<&'a Tensor>,
    /// ZeRO-1 with more than one rank: `(offset, len)` of this rank's shard, which must hold the
    /// average when the work completes (the rest of the bucket may hold anything); `None`: the
    /// whole bucket must.
    pub shard: Option<(i64, i64)>,
}

/// Why a hook could not start or complete a bucket's reduction. The reducer adds which bucket.
#[derive(Debug)]
pub enum HookError {
    /// libtorch refused an operation; the text says which (one line).
    Torch(String),
    /// The communicator refused the collective.
    Comm(CommError),
}

impl HookError {
    /// A libtorch error while `doing` something.
    pub fn torch(doing: &str, e: TchError) -> HookError {
        HookError::Torch(format!("{doing}: {}", crate::error::first_line(&e)))
    }
}

/// How a bucket is reduced. Called with the reducer's state locked, from backward's grad-ready
/// hooks or from `finish`: a hook must not block on other ranks beyond starting its collective.
pub trait CommHook: Send + Sync {
    /// Per-bucket state, allocated once when data parallelism is applied (e.g. a bf16 buffer).
    fn prepare(&self, _grad: &Tensor) -> Result<Option<Tensor>, TchError> {
        Ok(None)
    }

    /// Starts the bucket's reduction (an average over `comm`); the reducer waits for the work.
    fn launch(&self, comm: &dyn Communicator, bucket: &HookBucket) -> Result<Work, HookError>;

    /// After the work completed: whatever the result still needs (e.g. copying it back).
    fn complete(&self, _bucket: &HookBucket) -> Result<(), HookError> {
        Ok(())
    }
}

/// The average of `src` over `comm`, in place, or reduce-scattered into `shard` of it.
fn average(comm: &dyn Communicator, src: &Tensor, shard: Option<(i64, i64)>) -> Result<Work, HookError> {
    match shard {
        Some((offset, len)) => comm.reduce_scatter_async(&src.narrow(0, offset, len), src, ReduceOp::Avg),
        None => comm.all_reduce_async(src, ReduceOp::Avg),
    }
    .map_err(HookError::Comm)
}

/// The default: the gradients averaged in their own dtype (PyTorch's `allreduce_hook`).
pub struct AllReduce;

impl CommHook for AllReduce {
    fn launch(&self, comm: &dyn Communicator, bucket: &HookBucket) -> Result<Work, HookError> {
        average(comm, bucket.grad, bucket.shard)
    }
}

/// Gradients travel in bf16, half the bytes of fp32 (PyTorch's `bf16_compress_hook`): copied
/// into a bf16 twin of the bucket, averaged there, and copied back. Each reduced value carries
/// bf16's 8 significant bits.
pub struct Bf16Compress;

impl CommHook for Bf16Compress {
    fn prepare(&self, grad: &Tensor) -> Result<Option<Tensor>, TchError> {
        Tensor::f_zeros(grad.size(), (Kind::BFloat16, grad.device())).map(Some)
    }

    fn launch(&self, comm: &dyn Communicator, bucket: &HookBucket) -> Result<Work, HookError> {
        let twin = scratch(bucket)?;
        tch::no_grad(|| twin.shallow_clone().f_copy_(bucket.grad))
            .map_err(|e| HookError::torch("copying the gradients into the bf16 buffer to reduce", e))?;
        average(comm, twin, bucket.shard)
    }

    fn complete(&self, bucket: &HookBucket) -> Result<(), HookError> {
        let twin = scratch(bucket)?;
        tch::no_grad(|| match bucket.shard {
            Some((o, l)) => bucket.grad.narrow(0, o, l).f_copy_(&twin.narrow(0, o, l)),
            None => bucket.grad.shallow_clone().f_copy_(twin),
        })
        .map(|_| ())
        .map_err(|e| HookError::torch("copying the reduced bf16 gradients back", e))
    }
}

fn scratch<'a>(bucket: &HookBucket<'a>) -> Result<&'a Tensor, HookError> {
    bucket.scratch.ok_or_else(|| HookError::Torch("the bf16 hook's buffer was not prepared for this bucket".into()))
}
