//! The point-to-point queue: sends and receives wait here until they are handed to NCCL as one
//! group (see "Point-to-point" in `comm.rs` for why they cannot be issued one by one).

use std::ffi::{c_int, c_void};
use std::sync::{Arc, Mutex};

use cudarc::nccl::sys::{cudaStream_t, ncclDataType_t};

use super::cuda::{DeviceGuard, Event, On};
use super::inner::{lock, Failed, Inner};
use super::library::SUCCESS;
use super::poller::Pending;
use crate::flight::Rec;
use crate::watchdog;

/// A send or receive waiting in `Inner::p2p` for the next flush.
pub(super) struct QueuedP2p {
    pub(super) send: bool,
    /// The device pointer NCCL reads (send) or writes (recv).
    pub(super) ptr: usize,
    pub(super) count: usize,
    pub(super) dtype: ncclDataType_t,
    pub(super) peer: c_int,
    /// Recorded on the caller's current stream when the operation was issued.
    pub(super) ready: Event,
    /// Recorded on the NCCL stream after the group is queued; handed to the `Work` through
    /// `state` only then, so it is never shared before it is recorded.
    pub(super) done: Event,
    /// Times the operation from issue, as for collectives.
    pub(super) guard: watchdog::Guard,
    /// Its flight recorder entry: started when handed to NCCL.
    pub(super) rec: Rec,
    pub(super) state: Arc<Mutex<P2pState>>,
}

/// What became of a queued point-to-point operation.
pub(super) enum P2pState {
    Queued,
    /// Handed to NCCL; the event completes when it has finished.
    Issued(Arc<Event>),
    Failed(String, Failed),
}

impl Inner {
    /// Issues every queued point-to-point operation, in issue order, as one NCCL group (see the
    /// module docs), and settles each one's state. The queue lock is held throughout, so that
    /// concurrent flushes cannot reorder operations.
    pub(super) fn flush_p2p(&self) {
        let mut queue = lock(&self.p2p);
        if queue.is_empty() {
            return;
        }
        let mut ops: Vec<QueuedP2p> = queue.drain(..).collect();
        // NCCL launches on the current device. A failure here shows up in the event calls below.
        let _device = DeviceGuard::new(self.device);
        let outcome = {
            let _issue = lock(&self.issue);
            match self.async_error_locked() {
                Some(f) => Err((f, Failed::Communicator)),
                None => self.issue_p2p_group_locked(&mut ops),
            }
        };
        match outcome {
            Ok(()) => {
                for op in ops {
                    let done = Arc::new(op.done);
                    *lock(&op.state) = P2pState::Issued(done.clone());
                    op.rec.start();
                    self.push_pending(Pending { event: done, _guard: op.guard, rec: op.rec });
                }
            }
            Err((detail, how)) => {
                // The peers have queued (or will queue) the matching operations: whatever failed
                // here, this communicator is out of step with them for good.
                self.fail(detail.clone());
                for op in ops {
                    *lock(&op.state) = P2pState::Failed(detail.clone(), how);
                    op.rec.fail(&detail);
                }
            }
        }
    }

    /// The NCCL calls of `flush_p2p`; the caller holds `issue`.
    fn issue_p2p_group_locked(&self, ops: &mut [QueuedP2p]) -> std::result::Result<(), (String, Failed)> {
        for op in ops.iter() {
            op.ready
                .block(On::Stream(&self.stream))
                .map_err(|e| (format!("ordering the NCCL stream after the issuing stream failed: {e}"), Failed::Communicator))?;
        }
        let stream = self.stream.raw() as cudaStream_t;
        // SAFETY: no arguments; `issue` is held.
        let rc = unsafe { (self.lib.group_start)() };
        if rc != SUCCESS {
            return Err((self.lib.describe("ncclGroupStart", rc, self.comm.0), Failed::Communicator));
        }
        let mut first_error = None;
        for op in ops.iter() {
            // SAFETY: device pointers of live contiguous tensors of `count` elements of `dtype`,
            // kept alive by the operation's Work until the current stream is ordered after `done`.
            let (call, rc) = unsafe {
                if op.send {
                    ("ncclSend", (self.lib.send)(op.ptr as *const c_void, op.count, op.dtype, op.peer, self.comm.0, stream))
                } else {
                    ("ncclRecv", (self.lib.recv)(op.ptr as *mut c_void, op.count, op.dtype, op.peer, self.comm.0, stream))
                }
            };
            if rc != SUCCESS && first_error.is_none() {
                first_error = Some(self.lib.describe(call, rc, self.comm.0));
            }
        }
        // Always closed, even after a failed call: an open group would swallow every later call.
        // SAFETY: as for ncclGroupStart.
        let rc = unsafe { (self.lib.group_end)() };
        // Whether part of a failed group was launched is not knowable: treat it as running.
        if let Some(detail) = first_error {
            return Err((detail, Failed::Untracked));
        }
        if rc != SUCCESS {
            return Err((self.lib.describe("ncclGroupEnd", rc, self.comm.0), Failed::Untracked));
        }
        for op in ops.iter_mut() {
            op.done
                .record(On::Stream(&self.stream))
                .map_err(|e| (format!("the point-to-point group was queued but recording its completion event failed: {e}"), Failed::Untracked))?;
        }
        Ok(())
    }
}
