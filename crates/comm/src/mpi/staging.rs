//! The contiguous host buffers MPI reads and writes for tensors it cannot take in place.

use std::os::raw::c_void;

use tch::Tensor;

use crate::error::{CommError, OpContext, Result};
use crate::types::DType;

/// The contiguous buffer MPI reads or writes, and the caller's tensor to copy it back into.
pub(super) struct Staged {
    pub(super) buf: Tensor,
    pub(super) back: Option<Tensor>,
}

impl Staged {
    pub(super) fn ptr(&self) -> *mut c_void {
        self.buf.data_ptr()
    }
    /// Writes the result back into the caller's tensor (non-contiguous or device tensors).
    pub(super) fn finish(self, ctx: &OpContext) -> Result<()> {
        if let Some(mut back) = self.back {
            // no_grad is per thread and this may run on the worker: the destination can be a
            // parameter (a leaf that requires grad), which refuses in-place writes under grad mode.
            tch::no_grad(|| back.f_copy_(&self.buf))
                .map_err(|e| CommError::Backend { ctx: ctx.clone(), detail: format!("copying the result back into the tensor failed: {e}") })?;
        }
        Ok(())
    }
}

// SAFETY: tensors are reference-counted handles; the operation owns its buffers until it ends.
unsafe impl Send for Staged {}

/// Turns the sum MPI left in `buf` into the average over `size` ranks (MPI has no average op),
/// in place. A failure is the operation's error: ignoring it would hand back the sum as if it
/// were the average. Under no_grad, as in [`Staged::finish`]: `buf` can be the caller's own
/// tensor, a parameter (a leaf that requires grad), which refuses in-place writes under grad mode
/// (and this may run on the worker thread, where grad mode is on whatever the caller set).
///
/// The divisor is a 0-dim f64 tensor, which divides exactly as the scalar of `div_scalar_`
/// (same result dtype, same arithmetic), rather than a `tch::Scalar`: tch frees a temporary
/// `Scalar` before it reads the call's error, and that free panics on the pending error, so a
/// failing `f_div_scalar_` panics instead of returning its `Err`.
pub(super) fn divide(buf: &Tensor, size: usize, ctx: &OpContext) -> Result<()> {
    let mut b = buf.shallow_clone();
    let divisor = Tensor::from(size as f64);
    tch::no_grad(|| b.f_div_(&divisor))
        .map(drop)
        .map_err(|e| CommError::Backend { ctx: ctx.clone(), detail: format!("dividing the sum by the {size} ranks for the average failed: {e}") })
}

pub(super) fn byte_range(t: &Tensor, dt: DType) -> (usize, usize) {
    let p = t.data_ptr() as usize;
    (p, p + t.numel() * dt.size())
}

pub(super) fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < b.1 && b.0 < a.1
}
