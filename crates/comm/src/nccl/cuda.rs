//! Streams, events and the current device, through csrc/cuda_shim.cpp (libtorch's c10 layer).
//!
//! Going through libtorch rather than the CUDA driver keeps one notion of "current stream" and
//! "current device": the ones libtorch's kernels run on. Every call here is only made after
//! `tch::Cuda::is_available()` said yes (the shim itself fails cleanly otherwise, with c10's
//! message).

use std::ffi::{c_char, c_int, c_void, CStr};

extern "C" {
    fn fab_cuda_free_message(msg: *mut c_char);
    fn fab_cuda_exchange_device(device: c_int, previous: *mut c_int) -> *mut c_char;
    fn fab_cuda_restore_device(device: c_int) -> *mut c_char;
    fn fab_cuda_pool_stream(device: c_int, high_priority: c_int, id: *mut i64, raw: *mut *mut c_void) -> *mut c_char;
    fn fab_cuda_event_new(event: *mut *mut c_void) -> *mut c_char;
    fn fab_cuda_event_free(event: *mut c_void);
    fn fab_cuda_event_record(event: *mut c_void, device: c_int, current: c_int, stream_id: i64) -> *mut c_char;
    fn fab_cuda_event_block(event: *mut c_void, device: c_int, current: c_int, stream_id: i64) -> *mut c_char;
    fn fab_cuda_event_query(event: *mut c_void, done: *mut c_int) -> *mut c_char;
    fn fab_cuda_record_stream(tensor: *mut c_void, device: c_int, current: c_int, stream_id: i64) -> *mut c_char;
}

/// The shim's convention: NULL, or a malloc'd message that we own.
fn check(msg: *mut c_char) -> Result<(), String> {
    if msg.is_null() {
        return Ok(());
    }
    // SAFETY: a NUL-terminated string from malloc, freed once, here.
    let text = unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned();
    // SAFETY: `msg` is the shim's non-null message, owned by us and not used after this.
    unsafe { fab_cuda_free_message(msg) };
    Err(text)
}

/// Makes a device current on this thread for its lifetime and restores the previous one after:
/// NCCL initialises and launches on the current device, and the caller's thread must not come
/// back on another device than it left.
pub(crate) struct DeviceGuard {
    previous: c_int,
    device: c_int,
}

impl DeviceGuard {
    pub(crate) fn new(device: usize) -> Result<DeviceGuard, String> {
        let device = device as c_int;
        let mut previous: c_int = -1;
        // SAFETY: `previous` is a valid out-pointer; the shim catches every C++ exception and
        // reports it as a message, which `check` takes.
        check(unsafe { fab_cuda_exchange_device(device, &mut previous) })?;
        Ok(DeviceGuard { previous, device })
    }
}

impl Drop for DeviceGuard {
    fn drop(&mut self) {
        if self.previous >= 0 && self.previous != self.device {
            // SAFETY: takes a device index only; failures come back as a message (`check`).
            let _ = check(unsafe { fab_cuda_restore_device(self.previous) });
        }
    }
}

/// A CUDA stream as c10 names it (packed id + device), with its native `cudaStream_t` for NCCL.
pub(crate) struct Stream {
    id: i64,
    device: c_int,
    raw: *mut c_void,
}

// SAFETY: a stream handle is a plain identifier; CUDA stream operations are thread-safe.
unsafe impl Send for Stream {}
// SAFETY: as for `Send`: `&Stream` only reads the id, device and raw handle, which never change
// after `from_pool`.
unsafe impl Sync for Stream {}

impl Stream {
    /// A high-priority stream of libtorch's pool on `device`: communication should not queue
    /// behind compute kernels that were launched on other pool streams.
    pub(crate) fn from_pool(device: usize) -> Result<Stream, String> {
        let (mut id, mut raw) = (0i64, std::ptr::null_mut());
        // SAFETY: `id` and `raw` are valid out-pointers; errors come back as a message (`check`).
        check(unsafe { fab_cuda_pool_stream(device as c_int, 1, &mut id, &mut raw) })?;
        Ok(Stream { id, device: device as c_int, raw })
    }

    pub(crate) fn raw(&self) -> *mut c_void {
        self.raw
    }
}

/// Which stream an event operation targets.
pub(crate) enum On<'a> {
    /// libtorch's current stream on the device, for the calling thread.
    Current(usize),
    Stream(&'a Stream),
}

impl On<'_> {
    fn args(&self) -> (c_int, c_int, i64) {
        match self {
            On::Current(device) => (*device as c_int, 1, 0),
            On::Stream(s) => (s.device, 0, s.id),
        }
    }
}

/// A CUDA event (timing disabled), owned; destroyed on drop (CUDA defers the release until a
/// pending record has completed, so dropping early is safe).
pub(crate) struct Event(*mut c_void);

// SAFETY: the only mutation, `record`, takes `&mut self`, so a shared event is only queried and
// waited on (const in c10), which CUDA allows from any thread.
unsafe impl Send for Event {}
// SAFETY: see `Send`: through `&Event` only `block` and `query` are reachable, both const in c10 and
// callable from any thread.
unsafe impl Sync for Event {}

/// Marks `t`'s memory as used by the stream `on` (PyTorch's `Tensor.record_stream`): libtorch's
/// caching allocator will not reuse it, once freed, before that stream's work queued up to the
/// free has finished. What lets a `Work` be dropped, or waited on from another stream than the one
/// that allocated its buffers, without a kernel reading freed or reused memory.
pub(crate) fn record_use(t: &tch::Tensor, on: On<'_>) -> Result<(), String> {
    let (device, current, id) = on.args();
    // SAFETY: `as_ptr` is tch's `at::Tensor*`, alive for the call; the shim only reads it.
    check(unsafe { fab_cuda_record_stream(t.as_ptr() as *mut c_void, device, current, id) })
}

impl Event {
    pub(crate) fn new() -> Result<Event, String> {
        let mut ev = std::ptr::null_mut();
        // SAFETY: `ev` is a valid out-pointer; errors come back as a message (`check`).
        check(unsafe { fab_cuda_event_new(&mut ev) })?;
        Ok(Event(ev))
    }

    /// Captures the work queued on `on` so far. `&mut`: recording changes the C++ object (it
    /// creates the CUDA event on first use), so it must not race with a query or block.
    pub(crate) fn record(&mut self, on: On<'_>) -> Result<(), String> {
        let (device, current, id) = on.args();
        // SAFETY: `self.0` is the live c10::Event from `fab_cuda_event_new` (freed only in `Drop`),
        // and `&mut self` keeps this record from racing with any other use of it.
        check(unsafe { fab_cuda_event_record(self.0, device, current, id) })
    }

    /// Makes the stream `on` wait (on the GPU, not the host) for the last record.
    pub(crate) fn block(&self, on: On<'_>) -> Result<(), String> {
        let (device, current, id) = on.args();
        // SAFETY: `self.0` is the live c10::Event from `fab_cuda_event_new` (freed only in `Drop`);
        // `block` only reads it.
        check(unsafe { fab_cuda_event_block(self.0, device, current, id) })
    }

    /// Whether the work captured by the last record has finished.
    pub(crate) fn query(&self) -> Result<bool, String> {
        let mut done: c_int = 0;
        // SAFETY: `self.0` is the live c10::Event (freed only in `Drop`), only read; `done` is a
        // valid out-pointer.
        check(unsafe { fab_cuda_event_query(self.0, &mut done) })?;
        Ok(done != 0)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from `fab_cuda_event_new` and is freed exactly once, here.
        unsafe { fab_cuda_event_free(self.0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shim's error path, exercised where it can be: without a GPU every CUDA call must come
    /// back as an error message (a C++ exception caught in the shim), never a crash.
    #[test]
    fn without_a_gpu_calls_fail_cleanly() {
        if tch::Cuda::is_available() {
            return;
        }
        let e = Event::new().expect("an event that was never recorded needs no device");
        assert!(e.query().expect("an unrecorded event is complete"));
        drop(e);
        let err = DeviceGuard::new(0).err().expect("no device to make current");
        assert!(!err.is_empty());
        let err = Stream::from_pool(0).err().expect("no device to take a stream from");
        assert!(!err.is_empty());
        let mut e = Event::new().expect("event");
        let err = e.record(On::Current(0)).expect_err("no stream to record on");
        println!("record without a GPU: {err}");
        assert!(e.block(On::Current(0)).is_err());
        let t = tch::Tensor::zeros([4], (tch::Kind::Float, tch::Device::Cpu));
        let err = record_use(&t, On::Current(0)).expect_err("no stream to record a use on");
        println!("record_use without a GPU: {err}");
    }
}
