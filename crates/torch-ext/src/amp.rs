//! Mixed precision and CPU memory accounting (`csrc/amp.cpp`).
//!
//! - [`autocast`]: bf16 autocast on the CPU or on CUDA. `tch::autocast` switches CUDA autocast on
//!   with libtorch's default CUDA dtype, which is float16 (as `torch.autocast("cuda")`), and has
//!   no CPU autocast; this sets bfloat16 explicitly for the device the model runs on.
//!   [`hold_casts`] keeps autocast's bf16 weight copies across the micro-batches of one step.
//! - [`count_cpu_allocations`], [`cpu_allocated_bytes`], [`cpu_peak_allocated_bytes`],
//!   [`reset_cpu_peak`]: what `torch.cuda.memory_allocated` / `max_memory_allocated` report on
//!   CUDA, for CPU tensors, through a counting wrapper of libtorch's CPU allocator.

use std::ffi::c_int;
use tch::{Device, Kind};

extern "C" {
    fn fab_autocast_enter(cuda: c_int, enabled: c_int, prev_enabled: *mut c_int, prev_dtype: *mut c_int) -> c_int;
    fn fab_hold_casts();
    fn fab_release_casts();
    fn fab_autocast_exit(cuda: c_int, entered: c_int, prev_enabled: c_int, prev_dtype: c_int);
    fn fab_autocast_state(cuda: c_int, dtype: *mut c_int) -> c_int;
    fn fab_count_cpu_allocations();
    fn fab_cpu_allocated_bytes() -> i64;
    fn fab_cpu_peak_allocated_bytes() -> i64;
    fn fab_cpu_reset_peak();
}

/// Restores the autocast state of one device type when dropped (also when `f` panics).
struct Guard {
    cuda: c_int,
    prev_enabled: c_int,
    prev_dtype: c_int,
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: plain C call on thread-local autocast flags; the shim catches every exception.
        unsafe { fab_autocast_exit(self.cuda, 1, self.prev_enabled, self.prev_dtype) };
    }
}

/// Runs `f` with bf16 autocast on for `device`'s type when `enabled` (matmuls and attention in
/// bf16, reductions and norms in fp32, as `torch.autocast(device_type, dtype=torch.bfloat16)`);
/// just runs `f` otherwise (an enclosing autocast region stays as it is). Restores the previous
/// state afterwards, and frees the cached bf16 weight copies when the outermost autocast region
/// ends, unless [`hold_casts`] keeps them.
pub fn autocast<T>(device: Device, enabled: bool, f: impl FnOnce() -> T) -> T {
    if !enabled {
        return f();
    }
    let cuda = matches!(device, Device::Cuda(_)) as c_int;
    let (mut prev_enabled, mut prev_dtype) = (0, 0);
    // SAFETY: plain C call writing two ints we own; the shim catches every exception.
    let entered = unsafe { fab_autocast_enter(cuda, 1, &mut prev_enabled, &mut prev_dtype) } == 1;
    // libtorch only stores thread-local flags here; if it ever refused, run unchanged.
    let _guard = entered.then_some(Guard { cuda, prev_enabled, prev_dtype });
    f()
}

/// Releases what [`hold_casts`] held, also when its closure panics.
struct Held;

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: plain C call on thread-local autocast state; the shim catches every exception.
        unsafe { fab_release_casts() };
    }
}

/// Runs `f` (when `enabled`) keeping the bf16 copies that autocast makes of the weights from one
/// autocast region to the next, and frees them when `f` returns: the micro-batches of one
/// optimizer step (and a pipeline's micro-batches in flight) then share one copy of each weight,
/// cast once, instead of one each. Backward passes inside `f` run outside autocast, as they
/// should. The weights must not change inside `f` (the optimizer steps after it).
pub fn hold_casts<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    if !enabled {
        return f();
    }
    // SAFETY: plain C call on thread-local autocast state; the shim catches every exception.
    unsafe { fab_hold_casts() };
    let _held = Held;
    f()
}

/// Whether autocast is on for `device`'s type on this thread, and the dtype it casts to.
pub fn autocast_state(device: Device) -> (bool, Kind) {
    let cuda = matches!(device, Device::Cuda(_)) as c_int;
    let mut dtype = 0;
    // SAFETY: plain C call writing an int we own; the shim catches every exception.
    let on = unsafe { fab_autocast_state(cuda, &mut dtype) };
    let kind = match dtype {
        5 => Kind::Half,
        15 => Kind::BFloat16,
        _ => Kind::Float,
    };
    (on == 1, kind)
}

/// Installs the counting CPU allocator (once per process). From then on every CPU tensor's bytes
/// are counted while it lives; tensors allocated before are not.
pub fn count_cpu_allocations() {
    // SAFETY: plain C call; installation happens once, under a std::call_once.
    unsafe { fab_count_cpu_allocations() }
}

/// Bytes of CPU tensors alive that were allocated since [`count_cpu_allocations`] (0 before).
pub fn cpu_allocated_bytes() -> u64 {
    // SAFETY: reads an atomic counter.
    unsafe { fab_cpu_allocated_bytes() }.max(0) as u64
}

/// The peak of [`cpu_allocated_bytes`] since installation or the last [`reset_cpu_peak`].
pub fn cpu_peak_allocated_bytes() -> u64 {
    // SAFETY: reads an atomic counter.
    unsafe { fab_cpu_peak_allocated_bytes() }.max(0) as u64
}

/// Sets the peak to what is allocated now, to measure the peak of what follows.
pub fn reset_cpu_peak() {
    // SAFETY: stores to an atomic counter.
    unsafe { fab_cpu_reset_peak() }
}
