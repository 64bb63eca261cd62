//! What an NCCL communicator, its completion poller and its pending `Work`s share: the handle, the
//! stream, the issue lock and the first failure (see `comm.rs` for the ordering and failure model).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use cudarc::nccl::sys::ncclComm_t;

use super::cuda::{DeviceGuard, Event, Stream};
use super::library::{Nccl, RawResult, SUCCESS};
use super::p2p::QueuedP2p;
use super::poller::{Pending, Queue};

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone, Copy)]
pub(super) struct RawComm(pub(super) ncclComm_t);
// SAFETY: an opaque handle; every call on it is serialised by `Inner::issue`.
unsafe impl Send for RawComm {}
// SAFETY: as for `Send`: shared references only copy the handle out, and every NCCL call made with
// it holds `Inner::issue`, so no two threads use the communicator at once.
unsafe impl Sync for RawComm {}

/// What the communicator, its poller and its pending `Work`s share.
pub(super) struct Inner {
    pub(super) lib: &'static Nccl,
    pub(super) comm: RawComm,
    pub(super) device: usize,
    pub(super) stream: Stream,
    /// Serialises every NCCL call on `comm` (NCCL communicators must not be used from two threads
    /// at once) and holds the `ready` event, which is re-recorded for each operation.
    pub(super) issue: Mutex<Event>,
    /// The first asynchronous failure; every later operation and `wait` reports it.
    pub(super) failed: Mutex<Option<String>>,
    /// Set once `ncclCommAbort` ran: the handle is freed and must not be touched again.
    pub(super) aborted: AtomicBool,
    /// "group 'world' (rank 0 of 2, cuda:0)", for messages outside an operation.
    pub(super) label: String,
    /// Point-to-point operations issued but not yet handed to NCCL (see the module docs). Taken
    /// before `issue` whenever both are held.
    pub(super) p2p: Mutex<Vec<QueuedP2p>>,
    /// The poller's queue of completion events.
    pub(super) pending: Arc<(Mutex<Queue>, Condvar)>,
}

impl Inner {
    /// The communicator's failure, if any, asking NCCL for asynchronous errors. The caller holds
    /// `issue`.
    pub(super) fn async_error_locked(&self) -> Option<String> {
        if let Some(f) = lock(&self.failed).clone() {
            return Some(f);
        }
        if self.aborted.load(Ordering::SeqCst) {
            return Some("the NCCL communicator was aborted".into());
        }
        let mut err: RawResult = SUCCESS;
        // SAFETY: the handle is live (not aborted) and `issue` is held.
        let rc = unsafe { (self.lib.comm_get_async_error)(self.comm.0, &mut err) };
        if rc != SUCCESS {
            return Some(self.lib.describe("ncclCommGetAsyncError", rc, self.comm.0));
        }
        if err != SUCCESS {
            return Some(self.lib.describe("an asynchronous NCCL operation", err, self.comm.0));
        }
        None
    }

    /// Like `async_error_locked`, taking the lock; an error found aborts the communicator.
    pub(super) fn check(&self) -> Option<String> {
        let found = {
            let _issue = lock(&self.issue);
            self.async_error_locked()
        };
        if let Some(msg) = &found {
            self.fail(msg.clone());
        }
        found
    }

    /// Records the first failure and aborts the communicator: kernels blocked on a peer that will
    /// never arrive spin forever otherwise, and so would every stream ordered after them.
    pub(super) fn fail(&self, msg: String) {
        {
            let mut failed = lock(&self.failed);
            if failed.is_none() {
                eprintln!("error: NCCL communicator of {}: {msg}; aborting it", self.label);
                *failed = Some(msg);
            }
        }
        let _issue = lock(&self.issue);
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: live handle, `issue` held; it is never used again.
            unsafe { (self.lib.comm_abort)(self.comm.0) };
        }
    }

    /// Hands the completion event (and watchdog guard) of an operation queued on the NCCL stream
    /// to the poller.
    pub(super) fn push_pending(&self, p: Pending) {
        lock(&self.pending.0).pending.push_back(p);
        self.pending.1.notify_all();
    }
}

impl Drop for Inner {
    /// Ends the communicator with `ncclCommAbort`, not `ncclCommDestroy`: destroy synchronises with
    /// the communicator's other ranks on this node, which may drop theirs much later or never (a
    /// rank that failed), and nothing would time that wait. Abort frees the same resources without
    /// it, and nothing is lost: the poller (joined in `NcclComm::drop`) has seen every operation
    /// complete, and the last `Work` holds the last reference.
    fn drop(&mut self) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            let _device = DeviceGuard::new(self.device);
            // SAFETY: live handle, last user.
            unsafe { (self.lib.comm_abort)(self.comm.0) };
        }
    }
}

/// How an issue failed, which decides what becomes of the buffers. Either way the communicator
/// has failed: by the time an operation reaches NCCL its peers have called (or will call) the
/// matching one, so a rank that skips it is out of step with them for good.
#[derive(Clone, Copy)]
pub(super) enum Failed {
    /// Nothing was queued: the buffers may be freed.
    Communicator,
    /// The NCCL kernel was queued but cannot be tracked: the buffers must never be freed.
    Untracked,
}
