//! `NcclWork`: the handle of one NCCL operation; `wait` orders the caller's current stream after
//! it on the GPU and releases its buffers (see "Ordering" in `comm.rs`).

use std::sync::{Arc, Mutex};

use tch::Tensor;

use super::cuda::{record_use, DeviceGuard, Event, On};
use super::inner::{lock, Failed, Inner};
use super::p2p::P2pState;
use crate::error::{CommError, OpContext, Result};
use crate::work::WorkImpl;

pub(super) struct NcclWork {
    pub(super) ctx: OpContext,
    pub(super) inner: Arc<Inner>,
    /// Completes when NCCL has finished the operation; for a send or receive, known only once its
    /// group has been handed to NCCL (taken from `p2p` then).
    pub(super) done: Option<Arc<Event>>,
    /// Every tensor NCCL reads or writes (the caller's and staging buffers): alive until the
    /// current stream is ordered after `done`.
    pub(super) keep: Vec<Tensor>,
    /// (caller's tensor, contiguous buffer NCCL wrote): copied on the current stream after the wait.
    pub(super) copy_back: Option<(Tensor, Tensor)>,
    pub(super) finished: bool,
    /// A point-to-point operation's state, which may still be queued (see the module docs).
    pub(super) p2p: Option<Arc<Mutex<P2pState>>>,
}

impl NcclWork {
    fn error(&self, detail: String) -> CommError {
        CommError::Backend { ctx: self.ctx.clone(), detail }
    }

    /// The buffers can no longer be proven idle: keep them forever rather than free them under a
    /// kernel.
    fn leak(&mut self) {
        for t in self.keep.drain(..) {
            std::mem::forget(t);
        }
        if let Some(pair) = self.copy_back.take() {
            std::mem::forget(pair);
        }
    }

    /// Hands a still-queued point-to-point operation to NCCL, and says why it could not be issued,
    /// if it could not. Afterwards `done` is known.
    fn settle(&mut self) -> std::result::Result<(), (String, Failed)> {
        let Some(state) = &self.p2p else { return Ok(()) };
        self.inner.flush_p2p();
        match &*lock(state) {
            P2pState::Failed(detail, how) => Err((detail.clone(), *how)),
            P2pState::Issued(done) => {
                self.done = Some(done.clone());
                Ok(())
            }
            // A flush settles every queued operation.
            P2pState::Queued => Err(("the operation was never handed to NCCL".into(), Failed::Untracked)),
        }
    }

    fn finish(&mut self) -> Result<()> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        if let Err((detail, how)) = self.settle() {
            match how {
                // Part of its group may be running: the buffers can never be proven idle.
                Failed::Untracked => self.leak(),
                Failed::Communicator => {
                    self.keep.clear();
                    self.copy_back = None;
                }
            }
            return Err(self.error(detail));
        }
        let done = self.done.clone().expect("a settled operation has its completion event");
        let device = self.inner.device;
        let _device = match DeviceGuard::new(device) {
            Ok(g) => g,
            Err(e) => {
                self.leak();
                return Err(self.error(format!("cannot make cuda:{device} current: {e}")));
            }
        };
        // First order the caller's stream after the operation: from then on, work queued there
        // (the copy back, and whatever reuses the buffers) runs after NCCL is done with them.
        // Then mark the buffers as used by that stream too: if it is not the stream that
        // allocated them, the allocator would otherwise hand them out again before the copy back
        // queued here has read them.
        let ordered = done.block(On::Current(device)).and_then(|_| self.keep.iter().try_for_each(|t| record_use(t, On::Current(device))));
        if let Err(e) = ordered {
            self.leak();
            return Err(self.error(format!("making the current stream wait for the operation failed: {e}")));
        }
        let failure = self.inner.check();
        let copied = match (self.copy_back.take(), &failure) {
            (Some((mut dst, src)), None) => {
                tch::no_grad(|| dst.f_copy_(&src)).map_err(|e| self.error(format!("copying the result back into the tensor failed: {e}")))
            }
            _ => Ok(()),
        };
        self.keep.clear();
        match failure {
            Some(f) => Err(self.error(f)),
            None => copied,
        }
    }
}

impl WorkImpl for NcclWork {
    /// Never blocks the host: the caller's current stream waits for the operation on the GPU.
    fn wait(&mut self) -> Result<()> {
        self.finish()
    }

    /// Whether the operation has finished on the GPU (or failed).
    fn is_completed(&mut self) -> bool {
        if self.finished {
            return true;
        }
        if self.settle().is_err() {
            return true;
        }
        let Some(done) = self.done.clone() else { return true };
        // On this communicator's device: a CUDA call on a thread that never chose one would set
        // up a context on device 0.
        let _device = DeviceGuard::new(self.inner.device);
        match done.query() {
            Ok(true) => true,
            Ok(false) => self.inner.check().is_some(),
            Err(e) => {
                self.inner.fail(format!("querying the operation's completion event failed: {e}"));
                true
            }
        }
    }
}

impl Drop for NcclWork {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}
