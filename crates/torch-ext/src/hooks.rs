//! Autograd hooks for data parallelism over `csrc/hooks.cpp` (tch binds no autograd hooks):
//! a callback when a parameter's gradient is ready, and `.grad` as a view of bucket storage.
//!
//! # When a grad-ready hook fires
//!
//! The hook is a post hook on the parameter's grad accumulator node (`AccumulateGrad`), as in
//! PyTorch DDP's C++ reducer. The engine runs that node once per backward pass, after the
//! gradients from *all* uses of the parameter in the graph have been summed (a parameter used
//! twice, like a tied embedding, still fires once), and calls the hook right after the node has
//! written `.grad`. So, verified by `tests/hooks.rs`:
//! - it fires exactly once per parameter per `backward()`, and the callback sees the final `.grad`
//!   of that pass (the sum over micro-steps if `.grad` was not zeroed in between);
//! - parameters used last in forward fire first (the engine runs a leaf's accumulator as soon as
//!   its gradient is complete);
//! - a parameter the loss does not depend on does not fire at all: a reducer waiting for every
//!   bucket would wait forever (PyTorch's `find_unused_parameters`). Our GPT uses every parameter;
//! - it does not fire for `Tensor::run_backward` with explicit `inputs` (`torch.autograd.grad`),
//!   which returns gradients instead of accumulating them.
//!
//! # Which thread runs the callback
//!
//! The thread that executes the accumulator node. For CPU parameters that is the thread that
//! called `backward()` (the engine runs the CPU ready queue on the caller). For CUDA parameters it
//! is libtorch's autograd worker thread of that device, not the caller's thread: hence the
//! `Send + Sync` bound. Callbacks of different parameters of one backward pass run one after the
//! other on a single-device run; with several devices, or concurrent backward passes, they may run
//! concurrently.
//!
//! # Keeping hooks alive
//!
//! The parameter holds only a weak reference to its accumulator; [`GradReadyHook`] holds a strong
//! one, so the hook survives between backward passes (without it, the next forward would create a
//! fresh accumulator without the hook). Moving the parameter to another device or dtype through
//! `set_data` gives it a new accumulator: register hooks after the model has its final placement.

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::{self, NonNull};

use tch::Tensor;

use crate::take_message;

/// Why a hook or a `.grad` could not be set.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum HookError {
    /// libtorch refused to register the hook (the tensor is not a leaf, does not require grad...).
    #[error("grad-ready hook for parameter {index}: {message}")]
    Register { index: usize, message: String },
    /// `set_grad` refused the gradient tensor (sizes, dtype or device differ from the parameter's).
    #[error("set_grad: {message}")]
    SetGrad { message: String },
}

/// Opaque `fab_grad_hook` (csrc/hooks.cpp).
#[repr(C)]
struct RawHook {
    _private: [u8; 0],
}

/// Runs the closure behind `ctx` for parameter `index`; NULL, or a malloc'd message on panic.
type GradReadyFn = unsafe extern "C" fn(ctx: *mut c_void, index: usize) -> *mut c_char;
/// Drops the closure behind `ctx`.
type DropFn = unsafe extern "C" fn(ctx: *mut c_void);

extern "C" {
    fn fab_register_grad_ready_hook(
        param: *mut torch_sys::C_tensor,
        index: usize,
        f: GradReadyFn,
        ctx: *mut c_void,
        drop: DropFn,
        out: *mut *mut RawHook,
    ) -> *mut c_char;
    fn fab_remove_grad_ready_hook(hook: *mut RawHook);
    fn fab_set_grad(param: *mut torch_sys::C_tensor, grad: *mut torch_sys::C_tensor) -> *mut c_char;
}

/// A registered grad-ready hook. Dropping it removes the hook (no more callbacks, the closure is
/// dropped) and releases the grad accumulator it kept alive.
///
/// Do not drop it while a backward pass that reaches its parameter is running on another thread:
/// libtorch does not lock a node's hook list.
pub struct GradReadyHook {
    raw: NonNull<RawHook>,
    index: usize,
}

// SAFETY: the handle owns a heap `fab_grad_hook` (a `shared_ptr<Node>`, whose count is atomic, and
// an integer key); nothing in it is tied to the thread that created it, and the closure it refers
// to is `Send + Sync`.
unsafe impl Send for GradReadyHook {}

impl GradReadyHook {
    /// The index the callback receives.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl std::fmt::Debug for GradReadyHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradReadyHook").field("index", &self.index).finish()
    }
}

impl Drop for GradReadyHook {
    fn drop(&mut self) {
        // SAFETY: `raw` came from a successful fab_register_grad_ready_hook and is removed exactly
        // once, here; the C++ side catches every exception.
        unsafe { fab_remove_grad_ready_hook(self.raw.as_ptr()) }
    }
}

/// Calls `f(index)` each time a backward pass has accumulated `param`'s gradient into its
/// `.grad` (see the module docs for order and threads). `param` must be a leaf that requires grad.
///
/// A panic in `f` does not cross into C++: it is caught, and `backward` fails with the panic's
/// message (tch's `f_backward` returns it as an error; `backward` panics with it on the caller's
/// thread). State that `f` shares may be left half-updated by such a panic.
pub fn register_grad_ready_hook<F>(param: &Tensor, index: usize, f: F) -> Result<GradReadyHook, HookError>
where
    F: Fn(usize) + Send + Sync + 'static,
{
    let ctx = Box::into_raw(Box::new(f)) as *mut c_void;
    let mut raw: *mut RawHook = ptr::null_mut();
    // SAFETY: `param` is a live tensor borrowed for this call (C++ copies what it keeps: the
    // accumulator holds its own reference to the parameter). `ctx` is a `Box<F>` whose ownership
    // passes to C++ in every case (on failure C++ has already called `drop_closure::<F>`); the
    // trampolines are instantiated for the same `F`.
    let err = unsafe {
        fab_register_grad_ready_hook(param.as_ptr() as *mut torch_sys::C_tensor, index, call_closure::<F>, ctx, drop_closure::<F>, &mut raw)
    };
    if let Some(message) = take_message(err) {
        return Err(HookError::Register { index, message });
    }
    let raw = NonNull::new(raw).ok_or_else(|| HookError::Register { index, message: "libtorch returned no hook handle".into() })?;
    Ok(GradReadyHook { raw, index })
}

/// Sets `param.grad` to `grad`, sharing its storage, so that later backward passes accumulate into
/// that storage in place (PyTorch DDP's `gradient_as_bucket_view`; pass a view of a bucket).
/// `grad` must have the parameter's sizes, dtype and device; give it the parameter's strides
/// (contiguous for our parameters) or libtorch warns about the gradient layout contract.
///
/// In-place accumulation holds while `.grad` stays defined, backward runs without `create_graph`
/// (tch's `backward` never sets it) and gradients are dense: libtorch's `AccumulateGrad` then does
/// `grad += new_grad`. With `create_graph`, or after `.grad` is set to undefined (`set_grad(p,
/// None)`), `.grad` is *replaced* by a fresh tensor and the link to the bucket is lost. tch's
/// `zero_grad` zeroes in place and keeps it.
///
/// What is stored is an alias of `grad` (same storage, offset and strides) that is not an
/// autograd view, so `zero_grad`'s in-place `detach_()` is allowed on it.
pub fn set_grad(param: &Tensor, grad: Option<&Tensor>) -> Result<(), HookError> {
    let g = grad.map_or(ptr::null_mut(), |g| g.as_ptr() as *mut torch_sys::C_tensor);
    // SAFETY: both pointers come from live tensors borrowed for this call (or NULL for `None`);
    // C++ copies the `at::Tensor` handle it stores.
    let err = unsafe { fab_set_grad(param.as_ptr() as *mut torch_sys::C_tensor, g) };
    match take_message(err) {
        None => Ok(()),
        Some(message) => Err(HookError::SetGrad { message }),
    }
}

/// Trampoline from C++ into the closure. Never unwinds: a panic becomes a malloc'd message that
/// C++ turns into an exception of the backward pass.
unsafe extern "C" fn call_closure<F: Fn(usize)>(ctx: *mut c_void, index: usize) -> *mut c_char {
    // SAFETY: `ctx` is the `Box<F>` handed to C++ at registration, alive until `drop_closure`,
    // which C++ calls only after removing the hook; `F: Sync` makes shared calls from several
    // threads sound.
    let f = unsafe { &*(ctx as *const F) };
    match catch_unwind(AssertUnwindSafe(|| f(index))) {
        Ok(()) => ptr::null_mut(),
        Err(payload) => malloc_message(&format!("grad-ready hook for parameter {index} panicked: {}", panic_text(payload))),
    }
}

/// Drops the closure behind `ctx`. Never unwinds.
unsafe extern "C" fn drop_closure<F>(ctx: *mut c_void) {
    // SAFETY: `ctx` is the `Box<F>` from registration; C++ calls this exactly once.
    let b = unsafe { Box::from_raw(ctx as *mut F) };
    if catch_unwind(AssertUnwindSafe(move || drop(b))).is_err() {
        eprintln!("fabbrica-torch-ext: a grad-ready hook's closure panicked while being dropped");
    }
}

/// The text of a caught panic. The payload is forgotten, not dropped: one whose own Drop panics
/// would unwind into C++.
pub(crate) fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into());
    std::mem::forget(payload);
    what
}

/// A NUL-terminated copy of `s` in malloc'd memory, for C++ to `free`.
pub(crate) fn malloc_message(s: &str) -> *mut c_char {
    let bytes = s.as_bytes();
    // SAFETY: malloc of len + 1 bytes; on success we write exactly that many.
    unsafe {
        let p = libc::malloc(bytes.len() + 1) as *mut u8;
        if p.is_null() {
            // C++ treats NULL as success; a static message cannot be freed. Abort rather than
            // silently dropping the panic.
            eprintln!("fabbrica-torch-ext: out of memory reporting a panic in a callback from libtorch: {s}");
            std::process::abort();
        }
        ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        *p.add(bytes.len()) = 0;
        p as *mut c_char
    }
}
