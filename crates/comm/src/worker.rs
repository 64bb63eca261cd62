//! One worker thread per communicator runs its collectives in the order they were issued (as
//! c10d's ProcessGroupMPI does), so a non-blocking collective makes progress while the caller
//! computes. A blocking call made while the queue is empty runs on the caller's thread instead,
//! which saves two thread hand-offs on small messages.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::error::{CommError, OpContext, Result};
use crate::work::{Slot, SlotWork, Work};

pub(crate) type Job = Box<dyn FnOnce() -> Result<()> + Send>;

struct Queue {
    jobs: VecDeque<(Job, OpContext, Arc<Slot>)>,
    /// A job is running (on the worker or inline).
    busy: bool,
    stop: bool,
}

struct Inner {
    q: Mutex<Queue>,
    cv: Condvar,
}

pub(crate) struct Worker {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn run_job(job: Job, ctx: &OpContext) -> Result<()> {
    match catch_unwind(AssertUnwindSafe(job)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(CommError::Backend { ctx: ctx.clone(), detail: format!("operation panicked: {msg}") })
        }
    }
}

impl Worker {
    pub(crate) fn new(name: &str) -> Arc<Worker> {
        let inner = Arc::new(Inner { q: Mutex::new(Queue { jobs: VecDeque::new(), busy: false, stop: false }), cv: Condvar::new() });
        let worker = inner.clone();
        let handle =
            std::thread::Builder::new().name(format!("comm:{name}")).spawn(move || worker_loop(&worker)).expect("spawn communicator worker thread");
        Arc::new(Worker { inner, thread: Mutex::new(Some(handle)) })
    }

    /// Runs `job` after every job submitted before it. `blocking` callers get a completed `Work`.
    pub(crate) fn submit(&self, job: Job, ctx: OpContext, blocking: bool) -> Work {
        let mut q = self.inner.q.lock().unwrap();
        if q.stop {
            return Work::done(Err(CommError::Shutdown { ctx }));
        }
        if blocking && !q.busy && q.jobs.is_empty() {
            q.busy = true;
            drop(q);
            let r = run_job(job, &ctx);
            let mut q = self.inner.q.lock().unwrap();
            q.busy = false;
            // Wake the worker only when something queued up meanwhile: an unconditional wake-up
            // costs a system call and a context switch per call (measured: 7.1 µs vs 1.7 µs for
            // an 8-byte all-reduce on 2 cores).
            if !q.jobs.is_empty() {
                self.inner.cv.notify_all();
            }
            return Work::done(r);
        }
        let slot = Arc::new(Slot::default());
        q.jobs.push_back((job, ctx, slot.clone()));
        drop(q);
        self.inner.cv.notify_all();
        let w = Work::from_impl(SlotWork(slot));
        if blocking {
            let r = w.wait();
            Work::done(r)
        } else {
            w
        }
    }

    /// Lets queued jobs finish, then stops and joins the worker. Later submissions fail with
    /// `Shutdown`.
    pub(crate) fn shutdown(&self) {
        {
            let mut q = self.inner.q.lock().unwrap();
            q.stop = true;
        }
        self.inner.cv.notify_all();
        if let Some(h) = self.thread.lock().unwrap().take() {
            let _ = h.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn worker_loop(inner: &Inner) {
    loop {
        let (job, ctx, slot) = {
            let mut q = inner.q.lock().unwrap();
            loop {
                if !q.busy {
                    if let Some(j) = q.jobs.pop_front() {
                        q.busy = true;
                        break j;
                    }
                    if q.stop {
                        return;
                    }
                }
                q = inner.cv.wait(q).unwrap();
            }
        };
        let r = run_job(job, &ctx);
        slot.fill(r);
        // Nobody else waits on `cv` (callers wait on their slot): no wake-up needed.
        inner.q.lock().unwrap().busy = false;
    }
}
