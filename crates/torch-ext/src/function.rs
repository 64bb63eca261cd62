//! Custom autograd functions written in Rust, over `csrc/function.cpp` (PyTorch's
//! `torch.autograd.Function`).
//!
//! [`apply`] runs a [`Function`]'s `forward` on some tensors as one node of the autograd graph;
//! when backward reaches that node it calls the same object's `backward` with the gradients of
//! the outputs. The tensor-parallel region operators (Megatron-LM's `copy_to` / `reduce_from` /
//! `gather_from` / `scatter_to` the tensor-model-parallel region, and its vocabulary-parallel
//! cross-entropy) are functions of this kind whose bodies call a communicator: the model sees an
//! operator, never the communicator.
//!
//! `forward` runs with grad mode off (nothing it does is recorded), `backward` too. Whatever
//! forward must leave for backward, the object keeps (behind a `Mutex`: backward runs on the
//! thread that executes the node, libtorch's device thread for CUDA tensors). A failure in either
//! is an `Err` with one line: from `forward` it is [`apply`]'s error; from `backward` it fails the
//! whole backward pass (`f_backward` returns it).

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;

use crate::hooks::{malloc_message, panic_text};
use crate::take_message;

/// A differentiable operation with its own backward.
pub trait Function: Send + 'static {
    /// The outputs (at most [`MAX_TENSORS`]). An output that is one of the inputs unchanged is
    /// allowed (libtorch makes it a view). Integer outputs are marked non-differentiable.
    fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, String>;
    /// One gradient per input, in order (fewer: the rest get none); an undefined tensor
    /// (`Tensor::new()`) where an input needs no gradient. `grads` has one gradient per output
    /// (zeros where an output did not take part in the loss).
    fn backward(&self, grads: &[Tensor]) -> Result<Vec<Tensor>, String>;
}

type CallFn = unsafe extern "C" fn(
    ctx: *mut c_void,
    inputs: *mut *mut torch_sys::C_tensor,
    n_in: usize,
    outputs: *mut *mut torch_sys::C_tensor,
    cap: usize,
    n_out: *mut usize,
) -> *mut c_char;
type DropFn = unsafe extern "C" fn(ctx: *mut c_void);

extern "C" {
    fn fab_function_apply(
        inputs: *const *mut torch_sys::C_tensor,
        n_in: usize,
        fwd: CallFn,
        bwd: CallFn,
        ctx: *mut c_void,
        drop: DropFn,
        outputs: *mut *mut torch_sys::C_tensor,
        cap: usize,
        n_out: *mut usize,
    ) -> *mut c_char;
}

/// The most inputs or outputs a function may have.
pub const MAX_TENSORS: usize = 16;

/// Applies `f` to `inputs` as one autograd node (see the module docs) and returns its outputs.
pub fn apply<F: Function>(inputs: &[&Tensor], f: F) -> Result<Vec<Tensor>, String> {
    if inputs.len() > MAX_TENSORS {
        return Err(format!("a custom function takes at most {MAX_TENSORS} inputs, not {}", inputs.len()));
    }
    let ptrs: Vec<*mut torch_sys::C_tensor> = inputs.iter().map(|t| t.as_ptr() as *mut torch_sys::C_tensor).collect();
    let ctx = Box::into_raw(Box::new(f)) as *mut c_void;
    let mut outs: [*mut torch_sys::C_tensor; MAX_TENSORS] = [std::ptr::null_mut(); MAX_TENSORS];
    let mut n_out = 0usize;
    // SAFETY: the input pointers come from live tensors borrowed for the call (C++ copies the
    // handles it keeps); `ctx` is a `Box<F>` whose ownership passes to C++ in every case, with
    // trampolines instantiated for the same `F`; `outs` has room for MAX_TENSORS pointers.
    let err = unsafe {
        fab_function_apply(
            ptrs.as_ptr(),
            ptrs.len(),
            call_forward::<F>,
            call_backward::<F>,
            ctx,
            drop_function::<F>,
            outs.as_mut_ptr(),
            MAX_TENSORS,
            &mut n_out,
        )
    };
    if let Some(m) = take_message(err) {
        return Err(m);
    }
    // SAFETY: on success C++ wrote `n_out` ≤ MAX_TENSORS pointers, each a `new at::Tensor` that
    // we now own (tch frees it on drop).
    Ok(outs[..n_out.min(MAX_TENSORS)].iter().map(|&p| unsafe { Tensor::from_ptr(p) }).collect())
}

/// Calls `body` with the tensors C++ passed and hands the results back: the one Rust side of
/// every C++ → Rust tensor call (custom functions here, recompute regions in `recompute`).
/// `what` names the callee in messages (`custom function forward`). An undefined output goes
/// back as a null pointer, which C++ reads as an undefined tensor. Never unwinds.
///
/// # Safety
/// `inputs` holds `n_in` pointers, each a `new at::Tensor` whose ownership passes here;
/// `outputs` has room for `cap` pointers; `n_out` points to C++'s count.
pub(crate) unsafe fn exchange(
    inputs: *mut *mut torch_sys::C_tensor,
    n_in: usize,
    outputs: *mut *mut torch_sys::C_tensor,
    cap: usize,
    n_out: *mut usize,
    what: &str,
    body: impl FnOnce(&[Tensor]) -> Result<Vec<Tensor>, String>,
) -> *mut c_char {
    let ins: Vec<Tensor> = (0..n_in)
        .map(|i| {
            // SAFETY: per this function's contract, each pointer is an owned `new at::Tensor`.
            unsafe { Tensor::from_ptr(*inputs.add(i)) }
        })
        .collect();
    match catch_unwind(AssertUnwindSafe(|| body(&ins))) {
        Ok(Ok(outs)) if outs.len() > cap => malloc_message(&format!("{what} returned {} tensors, at most {cap} are allowed", outs.len())),
        Ok(Ok(outs)) => {
            let n = outs.len();
            for (i, mut t) in outs.into_iter().enumerate() {
                let p = if t.defined() {
                    let p = t.as_mut_ptr();
                    std::mem::forget(t);
                    p
                } else {
                    std::ptr::null_mut() // "no gradient": C++ leaves the slot undefined
                };
                // SAFETY: `outputs` has room for `cap` ≥ n pointers; ownership of each tensor
                // passes to C++, which deletes it after copying the handle.
                unsafe { *outputs.add(i) = p };
            }
            // SAFETY: `n_out` points to C++'s count.
            unsafe { *n_out = n };
            std::ptr::null_mut()
        }
        Ok(Err(msg)) => malloc_message(&msg),
        Err(payload) => malloc_message(&format!("{what} panicked: {}", panic_text(payload))),
    }
}

unsafe extern "C" fn call_forward<F: Function>(
    ctx: *mut c_void,
    inputs: *mut *mut torch_sys::C_tensor,
    n_in: usize,
    outputs: *mut *mut torch_sys::C_tensor,
    cap: usize,
    n_out: *mut usize,
) -> *mut c_char {
    // SAFETY: `ctx` is the `Box<F>` handed to C++, alive until `drop_function`.
    let f = unsafe { &*(ctx as *const F) };
    // SAFETY: C++ keeps the contract of `exchange`.
    unsafe { exchange(inputs, n_in, outputs, cap, n_out, "custom function forward", |ins| f.forward(ins)) }
}

unsafe extern "C" fn call_backward<F: Function>(
    ctx: *mut c_void,
    inputs: *mut *mut torch_sys::C_tensor,
    n_in: usize,
    outputs: *mut *mut torch_sys::C_tensor,
    cap: usize,
    n_out: *mut usize,
) -> *mut c_char {
    // SAFETY: `ctx` is the `Box<F>` handed to C++, alive until `drop_function`.
    let f = unsafe { &*(ctx as *const F) };
    // SAFETY: C++ keeps the contract of `exchange`.
    unsafe { exchange(inputs, n_in, outputs, cap, n_out, "custom function backward", |grads| f.backward(grads)) }
}

/// Drops the function behind `ctx`. Never unwinds.
unsafe extern "C" fn drop_function<F>(ctx: *mut c_void) {
    // SAFETY: `ctx` is the `Box<F>` handed to C++, which calls this exactly once.
    let b = unsafe { Box::from_raw(ctx as *mut F) };
    if catch_unwind(AssertUnwindSafe(move || drop(b))).is_err() {
        eprintln!("fabbrica-torch-ext: a custom autograd function panicked while being dropped");
    }
}
