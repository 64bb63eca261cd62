//! Activation recompute over `csrc/recompute.cpp`: PyTorch's reentrant `torch.utils.checkpoint`.
//!
//! [`recompute`] runs a closure on some tensors as one region of the autograd graph that keeps
//! nothing but its inputs. In backward the closure runs again, with grad enabled, under the RNG
//! state and autocast settings of the forward (dropout draws the same masks), and a nested backward
//! from its outputs accumulates the parameters' gradients (grad-ready hooks fire as usual, once per
//! parameter) and hands the inputs' gradients to the outer pass.
//!
//! The closure must compute the same function both times from its inputs and the parameters it
//! captures, and must own what it captures (shallow tensor handles), since the graph may outlive
//! the caller's borrows. It runs on the thread that executes the backward node (libtorch's device
//! thread for CUDA tensors), once at a time.

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;

use crate::function::exchange;
use crate::take_message;

type RecomputeFn = unsafe extern "C" fn(
    ctx: *mut c_void,
    inputs: *mut *mut torch_sys::C_tensor,
    n_in: usize,
    outputs: *mut *mut torch_sys::C_tensor,
    cap: usize,
    n_out: *mut usize,
) -> *mut c_char;
type DropFn = unsafe extern "C" fn(ctx: *mut c_void);

extern "C" {
    fn fab_recompute(
        inputs: *const *mut torch_sys::C_tensor,
        n_in: usize,
        f: RecomputeFn,
        ctx: *mut c_void,
        drop: DropFn,
        outputs: *mut *mut torch_sys::C_tensor,
        cap: usize,
        n_out: *mut usize,
    ) -> *mut c_char;
}

/// The most outputs a region may return.
pub const MAX_OUTPUTS: usize = 16;

/// Runs `f(inputs)` as a recomputed region (see the module docs) and returns its outputs.
/// Without grad mode, or when no input requires grad and `f` uses no trainable parameter, this
/// costs one call of `f` and nothing is recomputed. Fails with libtorch's message (or the
/// closure's panic) as text.
pub fn recompute<F>(inputs: &[&Tensor], f: F) -> Result<Vec<Tensor>, String>
where
    F: Fn(&[Tensor]) -> Vec<Tensor> + Send + 'static,
{
    let ptrs: Vec<*mut torch_sys::C_tensor> = inputs.iter().map(|t| t.as_ptr() as *mut torch_sys::C_tensor).collect();
    let ctx = Box::into_raw(Box::new(f)) as *mut c_void;
    let mut outs: [*mut torch_sys::C_tensor; MAX_OUTPUTS] = [std::ptr::null_mut(); MAX_OUTPUTS];
    let mut n_out = 0usize;
    // SAFETY: the input pointers come from live tensors borrowed for the call (C++ copies the
    // handles it keeps); `ctx` is a `Box<F>` whose ownership passes to C++ in every case, with
    // trampolines instantiated for the same `F`; `outs` has room for MAX_OUTPUTS pointers.
    let err =
        unsafe { fab_recompute(ptrs.as_ptr(), ptrs.len(), call_closure::<F>, ctx, drop_closure::<F>, outs.as_mut_ptr(), MAX_OUTPUTS, &mut n_out) };
    if let Some(m) = take_message(err) {
        return Err(m);
    }
    // SAFETY: on success C++ wrote `n_out` ≤ MAX_OUTPUTS pointers, each a `new at::Tensor` that
    // we now own (tch frees it on drop).
    Ok(outs[..n_out.min(MAX_OUTPUTS)].iter().map(|&p| unsafe { Tensor::from_ptr(p) }).collect())
}

/// Trampoline from C++ into the closure (through `function::exchange`, as custom functions).
/// Never unwinds.
unsafe extern "C" fn call_closure<F: Fn(&[Tensor]) -> Vec<Tensor>>(
    ctx: *mut c_void,
    inputs: *mut *mut torch_sys::C_tensor,
    n_in: usize,
    outputs: *mut *mut torch_sys::C_tensor,
    cap: usize,
    n_out: *mut usize,
) -> *mut c_char {
    // SAFETY: `ctx` is the `Box<F>` handed to C++, alive until `drop_closure`.
    let f = unsafe { &*(ctx as *const F) };
    // SAFETY: C++ (`RustFn::call`) keeps the contract of `exchange`.
    unsafe { exchange(inputs, n_in, outputs, cap, n_out, "recompute region", |ins| Ok(f(ins))) }
}

/// Drops the closure behind `ctx`. Never unwinds.
unsafe extern "C" fn drop_closure<F>(ctx: *mut c_void) {
    // SAFETY: `ctx` is the `Box<F>` handed to C++, which calls this exactly once.
    let b = unsafe { Box::from_raw(ctx as *mut F) };
    if catch_unwind(AssertUnwindSafe(move || drop(b))).is_err() {
        eprintln!("fabbrica-torch-ext: a recompute closure panicked while being dropped");
    }
}
