//! Safe wrappers over `csrc/shim.cpp`: libtorch functions that tch 0.24 does not bind.
//! [`amp`] wraps `csrc/amp.cpp`: bf16 autocast on CPU and CUDA, and CPU allocation statistics;
//! [`hooks`] wraps `csrc/hooks.cpp`: autograd gradient-ready hooks and `.grad` as a bucket view;
//! [`recompute`] wraps `csrc/recompute.cpp`: activation recompute (checkpointing) of a region;
//! [`function`] wraps `csrc/function.cpp`: custom autograd functions written in Rust.

pub mod amp;
pub mod function;
pub mod hooks;
pub mod recompute;

use std::ffi::{c_char, c_int, CStr};
use tch::Tensor;

extern "C" {
    fn fab_fused_adamw(
        params: *const *mut torch_sys::C_tensor,
        grads: *const *mut torch_sys::C_tensor,
        exp_avgs: *const *mut torch_sys::C_tensor,
        exp_avg_sqs: *const *mut torch_sys::C_tensor,
        steps: *const *mut torch_sys::C_tensor,
        n: c_int,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut c_char;
    fn fab_foreach_norm(xs: *const *mut torch_sys::C_tensor, n: c_int, out: *mut *mut torch_sys::C_tensor) -> *mut c_char;
    fn fab_foreach_mul_tensor_(xs: *const *mut torch_sys::C_tensor, n: c_int, scalar: *mut torch_sys::C_tensor) -> *mut c_char;
    fn fab_foreach_add_scalar_(xs: *const *mut torch_sys::C_tensor, n: c_int, value: f64) -> *mut c_char;
    fn fab_foreach_zero_(xs: *const *mut torch_sys::C_tensor, n: c_int) -> *mut c_char;
    fn fab_cuda_peak_allocated_bytes(device: c_int) -> i64;
    fn fab_to_cuda_pinned(src: *mut torch_sys::C_tensor, device: c_int, out: *mut *mut torch_sys::C_tensor) -> *mut c_char;
    fn fab_set_cuda_matmul_tf32(on: c_int) -> *mut c_char;
    fn fab_cuda_matmul_tf32() -> c_int;
    fn fab_oom_message() -> *mut c_char;
    fn fab_backward_with_grad(out: *mut torch_sys::C_tensor, grad: *mut torch_sys::C_tensor) -> *mut c_char;
}

/// Takes ownership of a message returned by the shim (NULL: success, none). The one message that
/// is not malloc'd, the shim's out-of-memory notice, is recognised by address and not freed.
pub(crate) fn take_message(err: *mut c_char) -> Option<String> {
    if err.is_null() {
        return None;
    }
    // SAFETY: plain C call returning the address of a static buffer.
    let oom = unsafe { fab_oom_message() };
    // SAFETY: a non-null return is a NUL-terminated string (malloc'd, or the static one).
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    if err != oom {
        // SAFETY: allocated with malloc by the shim, freed exactly once here.
        unsafe { libc::free(err as *mut libc::c_void) };
    }
    Some(msg.lines().next().unwrap_or("libtorch error").to_string())
}

/// `torch.autograd.backward([out], [grad])`: runs backward from `out` seeded with `grad` (same
/// shape), accumulating into the leaves' `.grad` and firing grad-ready hooks, as
/// `loss.backward()` does for a scalar. A pipeline stage runs it on its output with the gradient
/// the next stage sent back. Returns libtorch's message if it refuses (shapes differ, `out` does
/// not require grad, a hook failed).
pub fn backward_with_grad(out: &Tensor, grad: &Tensor) -> Result<(), String> {
    // SAFETY: both pointers come from live `tch::Tensor`s borrowed for the call; the shim copies
    // the handles and keeps no pointer past it, and catches every C++ exception.
    let err = unsafe { fab_backward_with_grad(out.as_ptr() as *mut torch_sys::C_tensor, grad.as_ptr() as *mut torch_sys::C_tensor) };
    match take_message(err) {
        None => Ok(()),
        Some(m) => Err(m),
    }
}

/// Peak bytes libtorch's CUDA caching allocator has handed out on `device` (as
/// `torch.cuda.max_memory_allocated`); `None` where CUDA is not initialised.
pub fn cuda_peak_allocated_bytes(device: usize) -> Option<u64> {
    // SAFETY: plain C call; the shim catches every C++ exception.
    let v = unsafe { fab_cuda_peak_allocated_bytes(device as c_int) };
    (v >= 0).then_some(v as u64)
}

/// Copies a CPU tensor to CUDA device `device` through pinned memory, without waiting: what
/// `t.pin_memory().to(device, non_blocking=True)` does. A copy from pageable memory (`to_device`)
/// first waits for every kernel already queued, so a training loop that copies each micro-batch
/// that way drains the GPU once per micro-batch. A `src` that is already pinned is copied from
/// directly, so it must not be written until the copy has run. Fails (with libtorch's message)
/// where CUDA is unavailable; callers fall back to `to_device`.
pub fn to_cuda_pinned(src: &Tensor, device: usize) -> Result<Tensor, String> {
    let mut out: *mut torch_sys::C_tensor = std::ptr::null_mut();
    // SAFETY: `src` is a live tensor borrowed for the call (the shim copies its handle); `out`
    // receives a fresh heap tensor only on success. The shim catches every C++ exception.
    let err = unsafe { fab_to_cuda_pinned(src.as_ptr() as *mut torch_sys::C_tensor, device as c_int, &mut out) };
    if let Some(m) = take_message(err) {
        return Err(m);
    }
    // SAFETY: a fresh `new at::Tensor`, owned by nobody else: tch frees it on drop.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Makes float32 matmuls on CUDA run on TF32 tensor cores (`on`) or in IEEE float32: what
/// `torch.backends.cuda.matmul.fp32_precision` sets (`allow_tf32` before PyTorch 2.9). TF32
/// keeps float32's range with a 10-bit mantissa, about 1e-3 relative per product; under bf16
/// autocast it only reaches the few matmuls left in float32. Process-wide; nothing changes on the CPU.
pub fn set_cuda_matmul_tf32(on: bool) -> Result<(), String> {
    // SAFETY: plain C call; the shim catches every C++ exception.
    match take_message(unsafe { fab_set_cuda_matmul_tf32(c_int::from(on)) }) {
        None => Ok(()),
        Some(m) => Err(m),
    }
}

/// Whether float32 matmuls on CUDA run in TF32 ([`set_cuda_matmul_tf32`]); `None` where
/// libtorch cannot say.
pub fn cuda_matmul_tf32() -> Option<bool> {
    // SAFETY: plain C call; the shim catches every C++ exception.
    match unsafe { fab_cuda_matmul_tf32() } {
        0 => Some(false),
        1 => Some(true),
        _ => None,
    }
}

/// Hyper-parameters of one AdamW group update.
#[derive(Debug, Clone, Copy)]
pub struct AdamWArgs {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// Runs ATen's fused AdamW kernel (`_fused_adamw_`) in place over one parameter group.
///
/// All slices must have the same length; `steps` are float32 scalars on the parameters' device,
/// already incremented for this step (the kernel reads them; PyTorch's wrapper bumps them first). Returns libtorch's message if it refuses (for example a dtype or
/// device it has no fused kernel for).
pub fn fused_adamw(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    steps: &[Tensor],
    args: AdamWArgs,
) -> Result<(), String> {
    let n = params.len();
    if [grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len()].iter().any(|&l| l != n) {
        return Err(format!("fused_adamw: tensor lists differ in length (params {n})"));
    }
    if n == 0 {
        return Ok(());
    }
    let ptrs = tensor_ptrs;
    let (p, g, m, v, s) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs), ptrs(steps));
    // SAFETY: every pointer comes from a live `tch::Tensor` borrowed for this call (tch's C_tensor
    // is a heap `at::Tensor`), the arrays hold exactly `n` entries, and the shim copies the
    // `at::Tensor` handles before returning, keeping no pointer past the call.
    let err = unsafe {
        fab_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            n as c_int,
            args.lr,
            args.beta1,
            args.beta2,
            args.weight_decay,
            args.eps,
        )
    };
    match take_message(err) {
        None => Ok(()),
        Some(m) => Err(m),
    }
}

fn tensor_ptrs(ts: &[Tensor]) -> Vec<*mut torch_sys::C_tensor> {
    ts.iter().map(|t| t.as_ptr() as *mut torch_sys::C_tensor).collect()
}

/// `torch._foreach_norm(ts)`: each tensor's L2 norm, one kernel launch for the list on CUDA (the
/// per-tensor loop launches one per tensor, and a GPT-2 has ~150 of them). An empty list gives
/// an empty vector; libtorch's message where it refuses (tensors on several devices, integers).
pub fn foreach_norm(ts: &[Tensor]) -> Result<Vec<Tensor>, String> {
    if ts.is_empty() {
        return Ok(Vec::new());
    }
    let xs = tensor_ptrs(ts);
    let mut out: Vec<*mut torch_sys::C_tensor> = vec![std::ptr::null_mut(); ts.len()];
    // SAFETY: `xs` holds `n` pointers to live tensors borrowed for the call; `out` has room for
    // `n` results, which the shim fills with new heap tensors only when it returns success.
    let err = unsafe { fab_foreach_norm(xs.as_ptr(), ts.len() as c_int, out.as_mut_ptr()) };
    if let Some(m) = take_message(err) {
        return Err(m);
    }
    // SAFETY: each entry is a fresh `new at::Tensor`, owned by nobody else: tch frees it on drop.
    Ok(out.into_iter().map(|p| unsafe { Tensor::from_ptr(p) }).collect())
}

/// `torch._foreach_mul_(ts, scalar)` in place, `scalar` a 0-dim tensor (on the tensors' device,
/// or the CPU).
pub fn foreach_mul_(ts: &[Tensor], scalar: &Tensor) -> Result<(), String> {
    if ts.is_empty() {
        return Ok(());
    }
    let xs = tensor_ptrs(ts);
    // SAFETY: live tensors borrowed for the call; the shim keeps no pointer past it.
    let err = unsafe { fab_foreach_mul_tensor_(xs.as_ptr(), ts.len() as c_int, scalar.as_ptr() as *mut torch_sys::C_tensor) };
    take_message(err).map_or(Ok(()), Err)
}

/// `torch._foreach_add_(ts, value)` in place (AdamW's step counters: one launch, not one each).
pub fn foreach_add_(ts: &[Tensor], value: f64) -> Result<(), String> {
    if ts.is_empty() {
        return Ok(());
    }
    let xs = tensor_ptrs(ts);
    // SAFETY: live tensors borrowed for the call; the shim keeps no pointer past it.
    let err = unsafe { fab_foreach_add_scalar_(xs.as_ptr(), ts.len() as c_int, value) };
    take_message(err).map_or(Ok(()), Err)
}

/// `torch._foreach_zero_(ts)` in place (gradients between steps, where they stay allocated).
pub fn foreach_zero_(ts: &[Tensor]) -> Result<(), String> {
    if ts.is_empty() {
        return Ok(());
    }
    let xs = tensor_ptrs(ts);
    // SAFETY: live tensors borrowed for the call; the shim keeps no pointer past it.
    let err = unsafe { fab_foreach_zero_(xs.as_ptr(), ts.len() as c_int) };
    take_message(err).map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shims return `fab_oom_message()` where malloc fails (never NULL, which reads as
    /// success): it is read like any message and, being static, never freed (freeing it would
    /// abort the process; reading it twice shows it was not).
    #[test]
    fn the_out_of_memory_message_reads_as_an_error_and_is_never_freed() {
        for _ in 0..2 {
            // SAFETY: plain C call returning the address of a static buffer.
            let oom = unsafe { fab_oom_message() };
            let msg = take_message(oom).expect("a message, not success");
            assert!(msg.contains("memory"), "{msg}");
        }
    }
}
