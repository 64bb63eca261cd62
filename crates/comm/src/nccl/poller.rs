//! The completion poller: one thread per NCCL communicator that releases watchdog guards as the
//! completion events of its operations complete, and aborts the communicator on an asynchronous
//! NCCL error (see "Hangs and failures" in `comm.rs`).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::cuda::{DeviceGuard, Event};
use super::inner::{lock, Inner};
use crate::flight::Rec;
use crate::watchdog;

/// How often the poller looks at the oldest pending operation. Only the watchdog's timing and
/// error detection depend on it, never an operation's latency.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

pub(super) struct Pending {
    pub(super) event: Arc<Event>,
    pub(super) _guard: watchdog::Guard,
    /// Its flight recorder entry: completed when the event is.
    pub(super) rec: Rec,
}

#[derive(Default)]
pub(super) struct Queue {
    pub(super) pending: VecDeque<Pending>,
    pub(super) stop: bool,
}

pub(super) struct Poller {
    shared: Arc<(Mutex<Queue>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Poller {
    pub(super) fn start(inner: Arc<Inner>, name: &str) -> std::io::Result<Poller> {
        let shared = inner.pending.clone();
        let s = shared.clone();
        let thread = std::thread::Builder::new().name(format!("nccl:{name}")).spawn(move || poll_loop(&inner, &s))?;
        Ok(Poller { shared, thread: Some(thread) })
    }
}

impl Drop for Poller {
    /// Waits for every pending operation to complete, so that the communicator is destroyed only
    /// once nothing runs on it.
    fn drop(&mut self) {
        lock(&self.shared.0).stop = true;
        self.shared.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn poll_loop(inner: &Inner, shared: &(Mutex<Queue>, Condvar)) {
    // The communicator's device for the thread's whole life: its CUDA calls would otherwise set
    // up a context on device 0, which on a shared node belongs to another rank.
    let _device = DeviceGuard::new(inner.device);
    let (q, cv) = shared;
    loop {
        let event = {
            let mut g = lock(q);
            loop {
                if let Some(p) = g.pending.front() {
                    break p.event.clone();
                }
                if g.stop {
                    return;
                }
                g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        };
        let failure = match event.query() {
            Ok(true) => {
                let done = lock(q).pending.pop_front();
                if let Some(p) = done {
                    p.rec.complete();
                }
                continue;
            }
            Ok(false) => inner.check(),
            Err(e) => {
                let msg = format!("querying an operation's completion event failed: {e}");
                inner.fail(msg.clone());
                Some(msg)
            }
        };
        if failure.is_some() {
            // The communicator is aborted and its error reported: nothing it queued can hang any
            // more, so stop timing its operations.
            let drained: Vec<Pending> = lock(q).pending.drain(..).collect();
            for p in drained {
                p.rec.fail(failure.as_deref().unwrap_or("the NCCL communicator failed"));
            }
        } else {
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}
