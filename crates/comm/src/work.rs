//! `Work`: the handle a non-blocking operation returns. It owns what the operation needs (tensor
//! handles, staging buffers, requests), so buffers stay alive until the operation is complete.

use std::sync::{Arc, Condvar, Mutex};

use crate::error::Result;

/// What a backend plugs into a [`Work`].
pub trait WorkImpl: Send {
    /// Blocks until the operation is complete (for GPU backends: until the caller's stream is
    /// ordered after it) and returns its result.
    fn wait(&mut self) -> Result<()>;
    /// True when `wait` would return at once.
    fn is_completed(&mut self) -> bool;
}

/// Handle to an operation in flight. Dropping it without `wait` does not cancel the operation; its
/// buffers stay alive until the operation completes.
pub struct Work(Box<dyn WorkImpl>);

impl Work {
    pub fn from_impl(imp: impl WorkImpl + 'static) -> Work {
        Work(Box::new(imp))
    }

    /// An operation that already finished (a world of one, or a call that ran inline).
    pub fn done(result: Result<()>) -> Work {
        Work(Box::new(Done(Some(result))))
    }

    pub fn wait(mut self) -> Result<()> {
        self.0.wait()
    }

    pub fn is_completed(&mut self) -> bool {
        self.0.is_completed()
    }
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Work")
    }
}

struct Done(Option<Result<()>>);

impl WorkImpl for Done {
    fn wait(&mut self) -> Result<()> {
        self.0.take().unwrap_or(Ok(()))
    }
    fn is_completed(&mut self) -> bool {
        true
    }
}

/// Completion slot filled by a worker thread.
#[derive(Default)]
pub(crate) struct Slot {
    result: Mutex<Option<Result<()>>>,
    cv: Condvar,
}

impl Slot {
    pub(crate) fn fill(&self, r: Result<()>) {
        *self.result.lock().unwrap() = Some(r);
        self.cv.notify_all();
    }
}

pub(crate) struct SlotWork(pub(crate) Arc<Slot>);

impl WorkImpl for SlotWork {
    fn wait(&mut self) -> Result<()> {
        let mut g = self.0.result.lock().unwrap();
        loop {
            if let Some(r) = g.take() {
                // Leave a success behind so that a second look says "completed".
                *g = Some(Ok(()));
                return r;
            }
            g = self.0.cv.wait(g).unwrap();
        }
    }
    fn is_completed(&mut self) -> bool {
        self.0.result.lock().unwrap().is_some()
    }
}
