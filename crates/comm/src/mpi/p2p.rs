//! A point-to-point transfer in flight: its MPI request, staging buffer and flight record.

use std::os::raw::c_int;

use mpi::ffi;

use super::ops::{datatype, ok};
use super::staging::Staged;
use crate::error::{CommError, OpContext, Result};
use crate::flight::Rec;
use crate::types::{DType, OpKind};
use crate::watchdog;
use crate::work::WorkImpl;

pub(super) struct P2pWork {
    pub(super) req: ffi::MPI_Request,
    pub(super) staged: Option<Staged>,
    pub(super) dt: DType,
    pub(super) n: c_int,
    pub(super) ctx: OpContext,
    pub(super) _guard: watchdog::Guard,
    pub(super) rec: Rec,
    pub(super) done: Option<Result<()>>,
}

// SAFETY: what needs this is the MPI_Request handle (a raw pointer in Open MPI); `staged` is `Send`
// (above). MPI is initialised at MPI_THREAD_MULTIPLE (`world::init_with` asks for
// `Threading::Multiple` and returns an error for any lower level; every `MpiComm` descends from
// `MpiComm::world`, which only `init_with` calls, after that check), so a request started on one
// thread may be waited on or tested on another; `WorkImpl` methods take `&mut self`, so one thread at
// a time touches it.
unsafe impl Send for P2pWork {}

impl P2pWork {
    fn complete(&mut self, status: &ffi::MPI_Status) -> Result<()> {
        if self.ctx.op == OpKind::Recv {
            let mut got: c_int = 0;
            // SAFETY: `status` is the one MPI_Wait/MPI_Test filled for this receive; `got` a local.
            unsafe { ffi::MPI_Get_count(status, datatype(self.dt), &mut got) };
            if got != self.n {
                return Err(CommError::InvalidArgument {
                    ctx: self.ctx.clone(),
                    what: format!("received {got} elements into a tensor of {}; send and recv sizes must match", self.n),
                });
            }
        }
        match self.staged.take() {
            Some(s) => s.finish(&self.ctx),
            None => Ok(()),
        }
    }
}

impl WorkImpl for P2pWork {
    fn wait(&mut self) -> Result<()> {
        if let Some(r) = self.done.take() {
            self.done = Some(Ok(()));
            return r;
        }
        // SAFETY: MPI_Status is a plain C struct of integers: all-zero is a valid value.
        let mut status: ffi::MPI_Status = unsafe { std::mem::zeroed() };
        // SAFETY: `req` is the active request from MPI_Isend/MPI_Irecv (not completed: `done` is
        // None), its buffer alive in `self.staged`; `status` is a local.
        let rc = unsafe { ffi::MPI_Wait(&mut self.req, &mut status) };
        let r = ok(rc, &self.ctx, "MPI_Wait").and_then(|_| self.complete(&status));
        self.rec.finish(&r);
        self.done = Some(Ok(()));
        r
    }
    fn is_completed(&mut self) -> bool {
        if self.done.is_some() {
            return true;
        }
        let mut flag: c_int = 0;
        // SAFETY: MPI_Status is a plain C struct of integers: all-zero is a valid value.
        let mut status: ffi::MPI_Status = unsafe { std::mem::zeroed() };
        // SAFETY: `req` is the active request (not completed: `done` is None), its buffer alive in
        // `self.staged`; `flag` and `status` are locals.
        let rc = unsafe { ffi::MPI_Test(&mut self.req, &mut flag, &mut status) };
        if rc != 0 {
            let r = ok(rc, &self.ctx, "MPI_Test");
            self.rec.finish(&r);
            self.done = Some(r);
            return true;
        }
        if flag != 0 {
            let r = self.complete(&status);
            self.rec.finish(&r);
            self.done = Some(r);
        }
        flag != 0
    }
}

impl Drop for P2pWork {
    fn drop(&mut self) {
        // The buffers must outlive the transfer.
        if self.done.is_none() {
            // SAFETY: MPI_Status is a plain C struct of integers: all-zero is a valid value.
            let mut status: ffi::MPI_Status = unsafe { std::mem::zeroed() };
            // SAFETY: `req` is still active (`done` is None) and its buffer is alive in
            // `self.staged`, which is only dropped after this wait.
            let rc = unsafe { ffi::MPI_Wait(&mut self.req, &mut status) };
            let r = self.complete(&status);
            self.rec.finish(&ok(rc, &self.ctx, "MPI_Wait").and(r));
        }
    }
}
