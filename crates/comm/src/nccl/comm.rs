//! `NcclComm`: the [`Communicator`] over one NCCL communicator, for CUDA tensors on one device.
//!
//! # Ordering
//!
//! NCCL kernels run on a stream of their own (one per communicator, from libtorch's pool), so
//! communication overlaps the compute that libtorch queues on its current stream. Each operation
//! is ordered on both sides with CUDA events, never with a host synchronisation:
//!
//! ```text
//! current stream:  ..compute(t).. [ready]                          ..wait(done).. later work
//!                                    \                                 ^
//! NCCL stream:                        wait(ready) -- ncclOp(t) -- [done]
//! ```
//!
//! `ready` (one event per communicator, re-recorded under the issue lock) makes the NCCL stream
//! wait for everything queued before the call, including the staging copies. `done` (one per
//! operation) is what [`Work::wait`] makes the caller's current stream wait on; `is_completed`
//! queries it. Results staged through a contiguous buffer are copied back on the current stream,
//! after that wait.
//!
//! Memory: libtorch's caching allocator hands a freed block back to the stream that allocated it,
//! which knows nothing of the NCCL stream. So every buffer an operation reads or writes is
//! recorded as used by the NCCL stream when it is issued (`Tensor.record_stream`, as
//! ProcessGroupNCCL does), and the `Work` also holds the buffers until the current stream is
//! ordered after `done` (in `wait`, or in `Drop` for a `Work` never waited on). Either alone keeps
//! a block from being reused under the kernel in the common case; the record also covers a
//! caller that waits on one stream and frees the tensor on another.
//!
//! # Hangs and failures
//!
//! Each operation is timed by the watchdog from issue until its `done` event completes: a poller
//! thread per communicator holds (event, watchdog guard) pairs and drops the guards as the events
//! complete, in issue order (one stream, so they complete in order). The same thread checks
//! `ncclCommGetAsyncError` while operations are pending; on an error it aborts the communicator
//! (as PyTorch's NCCL watchdog does) so that kernels blocked on a dead peer end, and every later
//! `wait` or operation on it returns the error.
//!
//! # Point-to-point
//!
//! NCCL runs one communicator's kernels one after the other, and a send or receive kernel does
//! not finish before its peer's matching kernel runs. Issued one by one, the sends and receives of
//! an exchange (both directions between two ranks, or a ring: every rank sends to its successor
//! and receives from its predecessor) would each queue a send first and wait forever for receives
//! queued behind it; NCCL requires such calls to be fused in one `ncclGroupStart`/`ncclGroupEnd`
//! (its "Point-to-point communication" guide). So `send_async` and `recv_async` only queue the
//! operation (ordered after the caller's current stream by an event of its own); the queue is
//! handed to NCCL as one group, in issue order, as soon as one of its `Work`s is waited on,
//! queried or dropped, or any other operation (collective, barrier, split) is issued on this
//! communicator, or it is dropped. A rank must therefore not block on a peer (a host
//! synchronisation on a tensor the peer's receive fills, say) while its own matching send is still
//! queued: wait on the send's `Work` first.

use std::ffi::{c_int, c_void};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use cudarc::nccl::sys::{cudaStream_t, ncclComm_t, ncclDataType_t};
use tch::{Device, Kind, Tensor};

use super::cuda::{record_use, DeviceGuard, Event, On};
use super::inner::{lock, Failed, Inner, RawComm};
use super::library::{Nccl, RawResult, SUCCESS};
use super::p2p::{P2pState, QueuedP2p};
use super::poller::{Pending, Poller};
use super::setup::{group_id, local_setup, unique_id, Local};
use super::work::NcclWork;
use super::{nccl_datatype, nccl_reduce_op};
use crate::agree;
use crate::communicator::Communicator;
use crate::debug::{mismatch_detail, Sig};
use crate::error::{CommError, OpContext, Result};
use crate::flight::{OpDesc, Recorder};
use crate::types::{Backend, DType, OpCounter, OpKind, ReduceOp};
use crate::watchdog;
use crate::work::Work;

/// One NCCL communicator over a host group, on one CUDA device: what a [`Group`](crate::Group)
/// hands CUDA tensors to. Made by the group on first use (or by [`Communicator::split`] here);
/// dropping it waits for its pending operations on the GPU, then destroys the NCCL communicator.
pub struct NcclComm {
    /// Dropped first: joining the poller waits for pending operations before `inner` can go.
    /// Only held for that (operations reach its queue through `Inner::pending`).
    #[allow(dead_code)]
    poller: Poller,
    inner: Arc<Inner>,
    /// The CPU communicator of the same group: carries the unique id, the debug-mode check,
    /// barriers and splits.
    host: Arc<dyn Communicator>,
    rank: usize,
    size: usize,
    name: String,
    /// Equal on every member, distinct per group: how the watchdog names the group to peers.
    id: String,
    members: Arc<Vec<usize>>,
    ops: OpCounter,
    flight: Recorder,
    debug: bool,
}

/// A contiguous buffer NCCL can use for a tensor, and the tensor to copy the result back into.
struct Staged {
    buf: Tensor,
    back: Option<Tensor>,
}

fn byte_range(t: &Tensor, dt: DType) -> (usize, usize) {
    let p = t.data_ptr() as usize;
    (p, p + t.numel() * dt.size())
}

fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl NcclComm {
    /// Collective over `host`'s group: every member calls it, with its own CUDA device. Each rank
    /// sets up locally, then all of them join the unique-id broadcast and a vote whatever
    /// happened, so that a failure on one rank fails every rank at once, each naming it.
    pub(crate) fn new(host: Arc<dyn Communicator>, device: usize, debug: bool) -> Result<NcclComm> {
        let (rank, size) = (host.rank(), host.size());
        let name = host.name().to_string();
        let members: Arc<Vec<usize>> = Arc::new(host.members().to_vec());
        let label = format!("group '{name}' (rank {rank} of {size}, cuda:{device})");
        let init = |what: String| CommError::Init(format!("NCCL for {label}: {what}"));
        let local = local_setup(device);
        let id = unique_id(local.as_ref().ok().map(|l| l.lib), &host);
        let failing = agree::ranks_voting_no(&*host, local.is_ok() && id.is_ok()).map_err(init)?;
        let Local { lib, _device, stream, ready } = local.map_err(init)?;
        let id = id.map_err(init)?;
        if !failing.is_empty() {
            return Err(init(format!("ranks {failing:?} of the group could not set up NCCL (their logs say why)")));
        }
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // ncclCommInitRank blocks until every rank has joined: timed by the watchdog like an
        // operation, under an id of its own (sequence 1 there), so that a rank that never gets
        // here is named instead of the job hanging in NCCL's bootstrap.
        let init_id = format!("{}:init", group_id(&name, &members));
        let what = format!("NCCL communicator creation (ncclCommInitRank) for {label}");
        watchdog::called(&init_id, 1, &what);
        let guard = watchdog::begin(what, &init_id, 1, &members, None);
        // SAFETY: `comm` is written on success; rank < size by the host's invariants.
        let rc = unsafe { (lib.comm_init_rank)(&mut comm, size as c_int, id, rank as c_int) };
        drop(guard);
        if rc != SUCCESS {
            let detail = lib.describe("ncclCommInitRank", rc, comm);
            if !comm.is_null() {
                // A failed init can leave a half-made communicator (proxy thread, sockets).
                // SAFETY: the handle NCCL returned, never used again.
                unsafe { (lib.comm_abort)(comm) };
            }
            return Err(init(detail));
        }
        let inner = Arc::new(Inner {
            lib,
            comm: RawComm(comm),
            device,
            stream,
            issue: Mutex::new(ready),
            failed: Mutex::new(None),
            aborted: AtomicBool::new(false),
            label: label.clone(),
            p2p: Mutex::new(Vec::new()),
            pending: Arc::default(),
        });
        let poller = Poller::start(inner.clone(), &name).map_err(|e| init(format!("cannot start the completion poller thread: {e}")))?;
        let flight = Recorder::new(&name, &group_id(&name, &members), Backend::Nccl, rank, size, &members);
        Ok(NcclComm { poller, inner, host, rank, size, flight, id: group_id(&name, &members), name, members, ops: OpCounter::default(), debug })
    }

    /// Hands queued sends and receives to NCCL now (see "Point-to-point" in the module docs).
    pub(crate) fn flush(&self) {
        self.inner.flush_p2p();
    }

    /// The CUDA device this communicator moves tensors on.
    pub fn device(&self) -> usize {
        self.inner.device
    }

    fn ctx(&self, op: OpKind, seq: u64) -> OpContext {
        OpContext { op, seq, group: self.name.clone(), backend: Backend::Nccl, rank: self.rank, size: self.size, world_rank: self.members[self.rank] }
    }

    /// The context of the next operation of kind `op`; its number is taken by `commit` (see
    /// [`OpCounter`]).
    fn next_ctx(&self, op: OpKind) -> OpContext {
        self.ctx(op, self.ops.peek(op))
    }

    fn commit(&self, mut ctx: OpContext) -> OpContext {
        ctx.seq = self.ops.take(ctx.op);
        ctx
    }

    fn invalid(ctx: &OpContext, what: impl Into<String>) -> CommError {
        CommError::InvalidArgument { ctx: ctx.clone(), what: what.into() }
    }

    fn backend_error(ctx: &OpContext, detail: impl Into<String>) -> CommError {
        CommError::Backend { ctx: ctx.clone(), detail: detail.into() }
    }

    fn dtype_of(ctx: &OpContext, t: &Tensor) -> Result<DType> {
        let kind = t.kind();
        DType::from_kind(kind).ok_or_else(|| CommError::UnsupportedDtype { ctx: ctx.clone(), dtype: format!("{kind:?}") })
    }

    fn on_device(&self, ctx: &OpContext, t: &Tensor, which: &str) -> Result<()> {
        let want = Device::Cuda(self.inner.device);
        if t.device() != want {
            return Err(Self::invalid(
                ctx,
                format!("{which} is on {:?} but this NCCL communicator is on cuda:{}; keep one device per rank", t.device(), self.inner.device),
            ));
        }
        Ok(())
    }

    fn same_kind(ctx: &OpContext, output: &Tensor, input: &Tensor) -> Result<()> {
        if output.kind() != input.kind() {
            return Err(Self::invalid(ctx, format!("output is {:?} but input is {:?}; pass tensors of one dtype", output.kind(), input.kind())));
        }
        Ok(())
    }

    fn check_reduce(ctx: &OpContext, dt: DType, op: ReduceOp) -> Result<()> {
        if op == ReduceOp::Avg && !dt.is_float() {
            return Err(Self::invalid(ctx, format!("avg of {dt} tensors is not defined; use sum and divide")));
        }
        Ok(())
    }

    /// At issue of a collective whose arguments passed the local checks: takes its sequence
    /// number, tells the watchdog, then (debug mode) checks that the group agrees on it before
    /// anything reaches NCCL, where a mismatch would hang or corrupt.
    fn announce(&self, ctx: OpContext, sig: &Sig) -> Result<OpContext> {
        let ctx = self.commit(ctx);
        watchdog::called(&self.id, ctx.seq, &format!("{} #{}", sig.describe(), ctx.seq));
        let desc = OpDesc::of(sig);
        let rec = self.flight.enqueue(ctx.seq, desc);
        if self.debug && self.size > 1 {
            self.debug_check(&ctx, sig).inspect_err(|e| rec.fail(&e.to_string()))?;
        }
        if desc.is_empty() {
            // Nothing reaches NCCL: done as soon as announced.
            rec.complete();
        }
        Ok(ctx)
    }

    /// Every rank all-gathers its signature (op, dtype, element count, reduction or root, sequence
    /// number) over the host communicator, so that all of them see the same table and fail
    /// together.
    fn debug_check(&self, ctx: &OpContext, sig: &Sig) -> Result<()> {
        let mut s = *sig;
        s.seq = ctx.seq;
        let mine = s.encode();
        let tensors = tch::no_grad(|| -> std::result::Result<(Tensor, Tensor), tch::TchError> {
            Ok((Tensor::f_zeros([5 * self.size as i64], (Kind::Int64, Device::Cpu))?, Tensor::f_from_slice(&mine)?))
        });
        let (all, me) = tensors.map_err(|e| Self::backend_error(ctx, format!("debug check: {e}")))?;
        self.host
            .all_gather(&all, &me)
            .map_err(|e| Self::backend_error(ctx, format!("the debug-mode check over the host communicator failed: {e}")))?;
        let all = Vec::<i64>::try_from(&all).map_err(|e| Self::backend_error(ctx, format!("debug check: {e}")))?;
        match mismatch_detail(&all, &mine) {
            None => Ok(()),
            Some(detail) => Err(CommError::Mismatch { ctx: ctx.clone(), detail }),
        }
    }

    /// A contiguous buffer for `t`: `t` itself when contiguous, else a new one (holding `t`'s
    /// values when `copy_in`) that is copied back into `t` when the operation is waited on.
    fn stage(ctx: &OpContext, t: &Tensor, copy_in: bool) -> Result<Staged> {
        if t.is_contiguous() {
            return Ok(Staged { buf: t.shallow_clone(), back: None });
        }
        let buf = tch::no_grad(|| if copy_in { t.f_contiguous() } else { Tensor::f_empty(t.size(), (t.kind(), t.device())) })
            .map_err(|e| Self::backend_error(ctx, format!("staging a non-contiguous tensor failed: {e}")))?;
        Ok(Staged { buf, back: Some(t.shallow_clone()) })
    }

    /// Read-only staging: the caller's tensor is never written.
    fn stage_in(ctx: &OpContext, t: &Tensor) -> Result<Staged> {
        let mut s = Self::stage(ctx, t, true)?;
        s.back = None;
        Ok(s)
    }

    /// A copy of `t` in fresh memory (an input that overlaps the output where NCCL cannot take it).
    fn fresh_copy(ctx: &OpContext, t: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| -> std::result::Result<Tensor, tch::TchError> {
            let mut c = Tensor::f_empty(t.size(), (t.kind(), t.device()))?;
            c.f_copy_(t)?;
            Ok(c)
        })
        .map_err(|e| Self::backend_error(ctx, format!("copying an overlapping input failed: {e}")))
    }

    fn scratch(ctx: &OpContext, t: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| Tensor::f_empty(t.size(), (t.kind(), t.device())))
            .map_err(|e| Self::backend_error(ctx, format!("allocating a staging buffer failed: {e}")))
    }

    /// Makes cuda:`dev` current, marks every buffer of an operation as used by the NCCL stream (see
    /// "Memory" in the module docs) and creates the events it needs.
    fn prepare(&self, keep: &[Tensor], events: usize) -> std::result::Result<(DeviceGuard, Vec<Event>), String> {
        let dev = self.inner.device;
        let device = DeviceGuard::new(dev).map_err(|e| format!("cannot make cuda:{dev} current: {e}"))?;
        for t in keep {
            record_use(t, On::Stream(&self.inner.stream)).map_err(|e| format!("recording a buffer's use by the NCCL stream failed: {e}"))?;
        }
        let events =
            (0..events).map(|_| Event::new().map_err(|e| format!("cannot create a CUDA event: {e}"))).collect::<std::result::Result<Vec<_>, _>>()?;
        Ok((device, events))
    }

    /// Issues one NCCL call on the communicator's stream, ordered after the current stream (see the
    /// module docs), and returns the `Work` that owns `keep` and the copy back.
    ///
    /// Called after the operation was announced: the peers have called, or will call, the
    /// matching operation, so any failure from here on fails the communicator (a rank that skipped
    /// it would be paired with the peers' next operation).
    fn launch(
        &self,
        ctx: &OpContext,
        call: &str,
        keep: Vec<Tensor>,
        copy_back: Option<(Tensor, Tensor)>,
        f: impl FnOnce(&Nccl, ncclComm_t, cudaStream_t) -> RawResult,
    ) -> Result<Work> {
        let inner = &self.inner;
        let dev = inner.device;
        // Timed from here, not from the kernel's queueing: the NCCL call itself can block the host
        // (NCCL connects to peers at a communicator's first use of an algorithm), waiting for a
        // peer that never comes.
        let guard = watchdog::begin(ctx.to_string(), &self.id, ctx.seq, &self.members, None);
        let rec = self.flight.find(ctx.op, ctx.seq);
        // Point-to-point operations issued before this one reach NCCL before it.
        inner.flush_p2p();
        let issued = (|| -> std::result::Result<Event, (String, Failed)> {
            let (_device, mut events) = self.prepare(&keep, 1).map_err(|e| (e, Failed::Communicator))?;
            let mut done = events.pop().expect("one event");
            let mut ready = lock(&inner.issue);
            if let Some(f) = inner.async_error_locked() {
                return Err((f, Failed::Communicator));
            }
            ready
                .record(On::Current(dev))
                .and_then(|_| ready.block(On::Stream(&inner.stream)))
                .map_err(|e| (format!("ordering the NCCL stream after the current stream failed: {e}"), Failed::Communicator))?;
            let rc = f(inner.lib, inner.comm.0, inner.stream.raw() as cudaStream_t);
            if rc != SUCCESS {
                return Err((inner.lib.describe(call, rc, inner.comm.0), Failed::Communicator));
            }
            done.record(On::Stream(&inner.stream))
                .map_err(|e| (format!("{call} was queued but recording its completion event failed: {e}"), Failed::Untracked))?;
            Ok(done)
        })();
        let done = match issued {
            Ok(done) => Arc::new(done),
            Err((detail, how)) => {
                if let Failed::Untracked = how {
                    // Nothing can tell when the queued kernel is done with its buffers: they must
                    // never be freed.
                    std::mem::forget(keep);
                    std::mem::forget(copy_back);
                }
                inner.fail(detail.clone());
                rec.fail(&detail);
                return Err(Self::backend_error(ctx, detail));
            }
        };
        rec.start();
        inner.push_pending(Pending { event: done.clone(), _guard: guard, rec });
        Ok(Work::from_impl(NcclWork { ctx: ctx.clone(), inner: inner.clone(), done: Some(done), keep, copy_back, finished: false, p2p: None }))
    }

    /// Queues a send or receive for the next flush (see the module docs), ordered after the work
    /// queued so far on the caller's current stream, and returns the `Work` that owns `keep` and the
    /// copy back. A failure fails the communicator, as in `launch`: the peer posts its side anyway.
    #[allow(clippy::too_many_arguments)]
    fn queue_p2p(
        &self,
        ctx: &OpContext,
        peer: usize,
        send: bool,
        ptr: *mut c_void,
        count: usize,
        dtype: ncclDataType_t,
        keep: Vec<Tensor>,
        copy_back: Option<(Tensor, Tensor)>,
    ) -> Result<Work> {
        let inner = &self.inner;
        let dev = inner.device;
        let guard = watchdog::begin(ctx.to_string(), &self.id, ctx.seq, &self.members, Some(peer));
        let rec = self.flight.find(ctx.op, ctx.seq);
        let prepared = self.prepare(&keep, 2).and_then(|(device, mut events)| {
            let (done, mut ready) = (events.pop().expect("two events"), events.pop().expect("two events"));
            ready.record(On::Current(dev)).map_err(|e| format!("recording the current stream failed: {e}"))?;
            Ok((device, ready, done))
        });
        let (_device, ready, done) = match prepared {
            Ok(p) => p,
            Err(detail) => {
                inner.fail(detail.clone());
                rec.fail(&detail);
                return Err(Self::backend_error(ctx, detail));
            }
        };
        let state = Arc::new(Mutex::new(P2pState::Queued));
        lock(&inner.p2p).push(QueuedP2p {
            send,
            ptr: ptr as usize,
            count,
            dtype,
            peer: peer as c_int,
            ready,
            done,
            guard,
            rec,
            state: state.clone(),
        });
        Ok(Work::from_impl(NcclWork { ctx: ctx.clone(), inner: inner.clone(), done: None, keep, copy_back, finished: false, p2p: Some(state) }))
    }

    fn all_reduce_impl(&self, t: &Tensor, op: ReduceOp) -> Result<Work> {
        let ctx = self.next_ctx(OpKind::AllReduce);
        let dt = Self::dtype_of(&ctx, t)?;
        self.on_device(&ctx, t, "the tensor")?;
        Self::check_reduce(&ctx, dt, op)?;
        let n = t.numel();
        let ctx = self.announce(ctx, &Sig::new(OpKind::AllReduce, Some(dt), n as i64, op.code()))?;
        if n == 0 {
            return Ok(Work::done(Ok(())));
        }
        let s = Self::stage(&ctx, t, true)?;
        let p = s.buf.data_ptr();
        let (dtype, redop) = (nccl_datatype(dt), nccl_reduce_op(op));
        let keep = vec![s.buf.shallow_clone()];
        let back = s.back.map(|b| (b, s.buf));
        // SAFETY: `p` is the device pointer of a contiguous tensor on this communicator's device
        // (`on_device`) of `n` elements of `dtype`. `keep` holds it in the Work and `prepare` records
        // its use on the NCCL stream, so its memory is neither freed nor reused before the kernel is
        // done; `launch` calls this with `issue` held, on a live communicator and its own stream.
        // (The other launches below rest on the same argument.)
        self.launch(&ctx, "ncclAllReduce", keep, back, |lib, comm, stream| unsafe {
            (lib.all_reduce)(p as *const c_void, p, n, dtype, redop, comm, stream)
        })
    }

    fn broadcast_impl(&self, t: &Tensor, root: usize) -> Result<Work> {
        let ctx = self.next_ctx(OpKind::Broadcast);
        let dt = Self::dtype_of(&ctx, t)?;
        self.on_device(&ctx, t, "the tensor")?;
        if root >= self.size {
            return Err(Self::invalid(&ctx, format!("root {root} is not a rank of this group (size {})", self.size)));
        }
        let n = t.numel();
        let ctx = self.announce(ctx, &Sig::new(OpKind::Broadcast, Some(dt), n as i64, root as i64))?;
        if n == 0 {
            return Ok(Work::done(Ok(())));
        }
        let is_root = root == self.rank;
        // The root only sends: its tensor does not change, so it needs no copy back.
        let s = if is_root { Self::stage_in(&ctx, t)? } else { Self::stage(&ctx, t, false)? };
        let p = s.buf.data_ptr();
        let dtype = nccl_datatype(dt);
        let keep = vec![s.buf.shallow_clone()];
        let back = s.back.map(|b| (b, s.buf));
        // SAFETY: as in `all_reduce_impl`: `p`, `n` elements of `dtype` in a contiguous device
        // tensor that `keep` holds and `prepare` records on the NCCL stream; `root` < size (checked).
        self.launch(&ctx, "ncclBroadcast", keep, back, |lib, comm, stream| unsafe {
            (lib.broadcast)(p as *const c_void, p, n, dtype, root as c_int, comm, stream)
        })
    }

    fn all_gather_impl(&self, output: &Tensor, input: &Tensor) -> Result<Work> {
        let ctx = self.next_ctx(OpKind::AllGather);
        let dt = Self::dtype_of(&ctx, input)?;
        self.on_device(&ctx, input, "input")?;
        self.on_device(&ctx, output, "output")?;
        Self::same_kind(&ctx, output, input)?;
        let n = input.numel();
        if output.numel() != n * self.size {
            return Err(Self::invalid(
                &ctx,
                format!("output has {} elements but all_gather of {n} elements over {} ranks needs {}", output.numel(), self.size, n * self.size),
            ));
        }
        let ctx = self.announce(ctx, &Sig::new(OpKind::AllGather, Some(dt), n as i64, 0))?;
        if n == 0 {
            return Ok(Work::done(Ok(())));
        }
        let dtype = nccl_datatype(dt);
        // In place (input is this rank's chunk of output): NCCL takes that layout as it is.
        if output.is_contiguous() && input.is_contiguous() && input.data_ptr() as usize == output.data_ptr() as usize + self.rank * n * dt.size() {
            let (o, i) = (output.data_ptr(), input.data_ptr());
            let keep = vec![output.shallow_clone(), input.shallow_clone()];
            // SAFETY: as in `all_reduce_impl`: contiguous device tensors of `n` (input) and
            // `n * size` (output, checked) elements, the input being this rank's chunk of the
            // output, the in-place layout NCCL accepts; `keep` holds both.
            return self.launch(&ctx, "ncclAllGather", keep, None, |lib, comm, stream| unsafe {
                (lib.all_gather)(i as *const c_void, o, n, dtype, comm, stream)
            });
        }
        let out = Self::stage(&ctx, output, false)?;
        let mut inp = Self::stage_in(&ctx, input)?;
        // Any other overlap of input and output is not one NCCL allows: read from a copy.
        if overlaps(byte_range(&inp.buf, dt), byte_range(&out.buf, dt)) {
            inp = Staged { buf: Self::fresh_copy(&ctx, &inp.buf)?, back: None };
        }
        let (o, i) = (out.buf.data_ptr(), inp.buf.data_ptr());
        let keep = vec![out.buf.shallow_clone(), inp.buf];
        let back = out.back.map(|b| (b, out.buf));
        // SAFETY: as in `all_reduce_impl`: contiguous staged device buffers of `n` and `n * size`
        // elements (checked), not overlapping (an overlapping input was copied); `keep` holds both.
        self.launch(&ctx, "ncclAllGather", keep, back, |lib, comm, stream| unsafe { (lib.all_gather)(i as *const c_void, o, n, dtype, comm, stream) })
    }

    fn reduce_scatter_impl(&self, output: &Tensor, input: &Tensor, op: ReduceOp) -> Result<Work> {
        let ctx = self.next_ctx(OpKind::ReduceScatter);
        let dt = Self::dtype_of(&ctx, input)?;
        self.on_device(&ctx, input, "input")?;
        self.on_device(&ctx, output, "output")?;
        Self::same_kind(&ctx, output, input)?;
        Self::check_reduce(&ctx, dt, op)?;
        let n = output.numel();
        if input.numel() != n * self.size {
            return Err(Self::invalid(
                &ctx,
                format!("input has {} elements but reduce_scatter into {n} elements over {} ranks needs {}", input.numel(), self.size, n * self.size),
            ));
        }
        let ctx = self.announce(ctx, &Sig::new(OpKind::ReduceScatter, Some(dt), n as i64, op.code()))?;
        if n == 0 {
            return Ok(Work::done(Ok(())));
        }
        let (dtype, redop) = (nccl_datatype(dt), nccl_reduce_op(op));
        // In place (output is this rank's chunk of input): NCCL takes that layout as it is.
        if output.is_contiguous() && input.is_contiguous() && output.data_ptr() as usize == input.data_ptr() as usize + self.rank * n * dt.size() {
            let (o, i) = (output.data_ptr(), input.data_ptr());
            let keep = vec![output.shallow_clone(), input.shallow_clone()];
            // SAFETY: as in `all_reduce_impl`: contiguous device tensors of `n * size` (input,
            // checked) and `n` (output) elements, the output being this rank's chunk of the input,
            // the in-place layout NCCL accepts; `keep` holds both.
            return self.launch(&ctx, "ncclReduceScatter", keep, None, |lib, comm, stream| unsafe {
                (lib.reduce_scatter)(i as *const c_void, o, n, dtype, redop, comm, stream)
            });
        }
        let inp = Self::stage_in(&ctx, input)?;
        let mut out = Self::stage(&ctx, output, false)?;
        // Any other overlap is not one NCCL allows: receive into scratch and copy back.
        if overlaps(byte_range(&inp.buf, dt), byte_range(&out.buf, dt)) {
            out = Staged { buf: Self::scratch(&ctx, output)?, back: Some(output.shallow_clone()) };
        }
        let (o, i) = (out.buf.data_ptr(), inp.buf.data_ptr());
        let keep = vec![out.buf.shallow_clone(), inp.buf];
        let back = out.back.map(|b| (b, out.buf));
        // SAFETY: as in `all_reduce_impl`: contiguous staged device buffers of `n * size` and `n`
        // elements (checked), not overlapping (an aliased output became scratch); `keep` holds both.
        self.launch(&ctx, "ncclReduceScatter", keep, back, |lib, comm, stream| unsafe {
            (lib.reduce_scatter)(i as *const c_void, o, n, dtype, redop, comm, stream)
        })
    }

    fn p2p(&self, t: &Tensor, peer: usize, send: bool) -> Result<Work> {
        let ctx = self.next_ctx(if send { OpKind::Send } else { OpKind::Recv });
        let dt = Self::dtype_of(&ctx, t)?;
        self.on_device(&ctx, t, "the tensor")?;
        if peer >= self.size || peer == self.rank {
            return Err(Self::invalid(
                &ctx,
                format!("peer {peer} must be another rank of this group (ranks 0..{}, this is {})", self.size, self.rank),
            ));
        }
        let n = t.numel();
        let ctx = self.commit(ctx);
        let rec = self.flight.enqueue(ctx.seq, OpDesc::p2p(ctx.op, dt, n, peer));
        if n == 0 {
            rec.complete();
            return Ok(Work::done(Ok(())));
        }
        let dtype = nccl_datatype(dt);
        if send {
            let s = Self::stage_in(&ctx, t)?;
            let p = s.buf.data_ptr();
            return self.queue_p2p(&ctx, peer, true, p, n, dtype, vec![s.buf], None);
        }
        let s = Self::stage(&ctx, t, false)?;
        let p = s.buf.data_ptr();
        let keep = vec![s.buf.shallow_clone()];
        let back = s.back.map(|b| (b, s.buf));
        self.queue_p2p(&ctx, peer, false, p, n, dtype, keep, back)
    }
}

impl Drop for NcclComm {
    /// Queued point-to-point operations reach NCCL (and the poller) before the poller is stopped.
    fn drop(&mut self) {
        self.inner.flush_p2p();
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn backend(&self) -> Backend {
        Backend::Nccl
    }
    fn members(&self) -> &[usize] {
        &self.members
    }
    fn all_reduce_async(&self, t: &Tensor, op: ReduceOp) -> Result<Work> {
        self.all_reduce_impl(t, op)
    }
    fn broadcast_async(&self, t: &Tensor, root: usize) -> Result<Work> {
        self.broadcast_impl(t, root)
    }
    fn all_gather_async(&self, output: &Tensor, input: &Tensor) -> Result<Work> {
        self.all_gather_impl(output, input)
    }
    fn reduce_scatter_async(&self, output: &Tensor, input: &Tensor, op: ReduceOp) -> Result<Work> {
        self.reduce_scatter_impl(output, input, op)
    }
    fn send_async(&self, t: &Tensor, dst: usize) -> Result<Work> {
        self.p2p(t, dst, true)
    }
    fn recv_async(&self, t: &Tensor, src: usize) -> Result<Work> {
        self.p2p(t, src, false)
    }
    /// On the host communicator: a barrier orders processes, and GPU work is already ordered by
    /// streams (it does not wait for NCCL operations still running on the GPU).
    fn barrier_async(&self) -> Result<Work> {
        self.inner.flush_p2p();
        self.host.barrier_async()
    }
    fn barrier(&self) -> Result<()> {
        self.inner.flush_p2p();
        self.host.barrier()
    }
    /// The host communicator splits, then each new group creates its own NCCL communicator (a
    /// fresh unique id broadcast over the new host group), on this communicator's device.
    fn split(&self, color: Option<u32>, key: u32, name: &str) -> Result<Option<Arc<dyn Communicator>>> {
        let ctx = self.commit(self.next_ctx(OpKind::Split));
        let rec = self.flight.enqueue(ctx.seq, OpDesc::of(&Sig::new(OpKind::Split, None, 0, 0)));
        rec.start();
        self.inner.flush_p2p();
        let made = self.host.split(color, key, name).and_then(|host| match host {
            None => Ok(None),
            Some(host) => {
                NcclComm::new(host, self.inner.device, self.debug).map(|c| Some(Arc::new(c) as Arc<dyn Communicator>)).map_err(|e| match e {
                    CommError::Init(detail) => CommError::Backend { ctx, detail },
                    other => other,
                })
            }
        });
        rec.finish(&made.as_ref().map(|_| ()).map_err(Clone::clone));
        made
    }
}
