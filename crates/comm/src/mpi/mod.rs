//! The MPI backend (rsmpi's raw bindings on Open MPI or MPICH).
//!
//! CPU tensors are handed to MPI in place when contiguous. CUDA tensors are staged through host
//! memory, unless the MPI library reports CUDA awareness (Open MPI's `MPIX_Query_cuda_support`),
//! in which case device pointers go to MPI directly after the current stream is synchronised.
//! bf16 and f16 are moved as 16-bit words and reduced by user-defined MPI operations that widen to
//! f32 and round back to nearest-even, as PyTorch's own bf16/f16 addition does.

use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use mpi::ffi;
use tch::{Device, Tensor};

use crate::communicator::Communicator;
use crate::debug::{mismatch_detail, Sig};
use crate::error::{CommError, OpContext, Result};
use crate::flight::{OpDesc, Recorder};
use crate::types::{Backend, DType, OpCounter, OpKind, ReduceOp};
use crate::watchdog;
use crate::work::Work;
use crate::worker::{Job, Worker};

extern "C" {
    fn fabbrica_mpi_cuda_aware() -> c_int;
}

#[derive(Clone, Copy)]
struct RawComm(ffi::MPI_Comm);
// SAFETY: an opaque communicator handle that Rust never dereferences, only passes to MPI. MPI is
// initialised at MPI_THREAD_MULTIPLE (`world::init_with` asks for `Threading::Multiple` and returns
// an error for any lower level; every `MpiComm` descends from `MpiComm::world`, which only
// `init_with` calls, after that check), so MPI may be called on it from any thread, concurrently.
unsafe impl Send for RawComm {}
// SAFETY: as for `Send`: under MPI_THREAD_MULTIPLE, calls through `&RawComm` from several threads at
// once are allowed (the handle itself is never mutated after creation).
unsafe impl Sync for RawComm {}

impl RawComm {
    /// A method, not `.0`, so closures capture the Send wrapper and not the raw pointer.
    fn c(self) -> ffi::MPI_Comm {
        self.0
    }
}

/// Workers of every communicator, so the world can drain and stop them before MPI_Finalize.
#[derive(Default)]
pub(crate) struct Registry {
    workers: Mutex<Vec<Weak<Worker>>>,
}

impl Registry {
    fn add(&self, e: &Arc<Worker>) {
        self.workers.lock().unwrap().push(Arc::downgrade(e));
    }
    pub(crate) fn shutdown_all(&self) {
        for e in self.workers.lock().unwrap().drain(..) {
            if let Some(e) = e.upgrade() {
                e.shutdown();
            }
        }
    }
}

pub struct MpiComm {
    raw: RawComm,
    /// A duplicate used only by the debug-mode mismatch check, so its traffic never matches an
    /// operation's.
    check: Option<RawComm>,
    rank: usize,
    size: usize,
    name: String,
    /// Unique across the job and equal on every member: how the watchdog names the group to peers.
    id: String,
    members: Arc<Vec<usize>>,
    worker: Arc<Worker>,
    ops: OpCounter,
    flight: Recorder,
    splits: AtomicU64,
    cuda_aware: bool,
    registry: Arc<Registry>,
}

mod ops;
mod p2p;
mod staging;

pub use ops::{bf16_sum, in_place};
pub(crate) use ops::{create_user_ops, error_string};
use ops::{datatype, ok, reduction};
use p2p::P2pWork;
use staging::{byte_range, divide, overlaps, Staged};

impl MpiComm {
    /// The world: a duplicate of MPI_COMM_WORLD (so that raw MPI calls elsewhere, e.g. the
    /// benchmark's baseline, never match ours).
    pub(crate) fn world(debug: bool, registry: Arc<Registry>) -> std::result::Result<MpiComm, String> {
        create_user_ops()?;
        // SAFETY: MPI_Comm is a C handle (a pointer or an int): all-zero is a valid value, only
        // used as MPI_Comm_dup's out-parameter.
        let mut raw: ffi::MPI_Comm = unsafe { std::mem::zeroed() };
        // SAFETY: only called by `world::init_with`, after MPI_Init; RSMPI_COMM_WORLD is a C const
        // handle and `raw` a valid out-pointer.
        let rc = unsafe { ffi::MPI_Comm_dup(ffi::RSMPI_COMM_WORLD, &mut raw) };
        if rc != 0 {
            return Err(format!("MPI_Comm_dup(MPI_COMM_WORLD) failed: {}", error_string(rc)));
        }
        let (mut rank, mut size) = (0, 0);
        // SAFETY: `raw` is the communicator MPI_Comm_dup just created; the out-pointers are locals.
        unsafe {
            ffi::MPI_Comm_rank(raw, &mut rank);
            ffi::MPI_Comm_size(raw, &mut size);
        }
        let members = Arc::new((0..size as usize).collect());
        crate::flight::init(rank as usize, size as usize)?;
        Self::assemble(raw, debug, rank as usize, size as usize, "world".into(), "w".into(), members, registry)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        raw: ffi::MPI_Comm,
        debug: bool,
        rank: usize,
        size: usize,
        name: String,
        id: String,
        members: Arc<Vec<usize>>,
        registry: Arc<Registry>,
    ) -> std::result::Result<MpiComm, String> {
        // SAFETY: `raw` is a live communicator (a duplicate of MPI_COMM_WORLD, or the non-null
        // result of MPI_Comm_split); RSMPI_ERRORS_RETURN is a C const handle.
        unsafe {
            ffi::MPI_Comm_set_errhandler(raw, ffi::RSMPI_ERRORS_RETURN);
        }
        let check = if debug {
            // SAFETY: all-zero is a valid MPI_Comm (a C handle), only used as an out-parameter.
            let mut c: ffi::MPI_Comm = unsafe { std::mem::zeroed() };
            // SAFETY: `raw` is a live communicator (above), `c` a valid out-pointer.
            let rc = unsafe { ffi::MPI_Comm_dup(raw, &mut c) };
            if rc != 0 {
                return Err(format!("MPI_Comm_dup failed: {}", error_string(rc)));
            }
            Some(RawComm(c))
        } else {
            None
        };
        let worker = Worker::new(&name);
        registry.add(&worker);
        let flight = Recorder::new(&name, &id, Backend::Mpi, rank, size, &members);
        Ok(MpiComm {
            raw: RawComm(raw),
            check,
            rank,
            size,
            name,
            id,
            members,
            worker,
            ops: OpCounter::default(),
            flight,
            splits: AtomicU64::new(0),
            // SAFETY: csrc/mpi_consts.c: takes nothing; MPIX_Query_cuda_support needs MPI_Init,
            // which `world::init_with` ran before any communicator is assembled.
            cuda_aware: unsafe { fabbrica_mpi_cuda_aware() } == 1,
            registry,
        })
    }

    /// The raw communicator handle, for callers that want to issue MPI calls of their own.
    pub fn raw(&self) -> ffi::MPI_Comm {
        self.raw.c()
    }

    /// Whether the MPI library takes CUDA device pointers.
    pub fn cuda_aware(&self) -> bool {
        self.cuda_aware
    }

    fn ctx(&self, op: OpKind, seq: u64) -> OpContext {
        OpContext { op, seq, group: self.name.clone(), backend: Backend::Mpi, rank: self.rank, size: self.size, world_rank: self.members[self.rank] }
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

    fn dtype_of(&self, t: &Tensor, ctx: &OpContext) -> Result<DType> {
        let kind = t.kind();
        DType::from_kind(kind).ok_or_else(|| CommError::UnsupportedDtype { ctx: ctx.clone(), dtype: format!("{kind:?}") })
    }

    fn count(&self, n: usize, ctx: &OpContext) -> Result<c_int> {
        c_int::try_from(n).map_err(|_| CommError::InvalidArgument {
            ctx: ctx.clone(),
            what: format!("{n} elements is more than the MPI backend moves in one call (2^31-1); split the tensor"),
        })
    }

    /// A contiguous buffer MPI can use for `t`. `copy_in`: its current values are needed.
    fn stage(&self, t: &Tensor, copy_in: bool) -> Staged {
        let on_gpu = t.device() != Device::Cpu;
        if on_gpu && self.cuda_aware && t.is_contiguous() {
            if let Device::Cuda(i) = t.device() {
                tch::Cuda::synchronize(i as i64);
            }
            return Staged { buf: t.shallow_clone(), back: None };
        }
        if on_gpu || !t.is_contiguous() {
            let buf = if copy_in { t.to_device(Device::Cpu).contiguous() } else { Tensor::empty(t.size(), (t.kind(), Device::Cpu)) };
            return Staged { buf, back: Some(t.shallow_clone()) };
        }
        Staged { buf: t.shallow_clone(), back: None }
    }

    /// Read-only staging: the caller's tensor is never written.
    fn stage_in(&self, t: &Tensor) -> Staged {
        let mut s = self.stage(t, true);
        s.back = None;
        s
    }

    /// Queues a collective: the watchdog timer and the debug check wrap `job`.
    fn submit(&self, ctx: OpContext, sig: Sig, job: Job, blocking: bool) -> Work {
        let desc = ctx.to_string();
        watchdog::called(&self.id, ctx.seq, &format!("{} #{}", sig.describe(), ctx.seq));
        let rec = self.flight.enqueue(ctx.seq, OpDesc::of(&sig));
        let (id, members, check, size) = (self.id.clone(), self.members.clone(), self.check, self.size);
        let jctx = ctx.clone();
        let wrapped: Job = Box::new(move || {
            rec.start();
            let _g = watchdog::begin(desc, &id, jctx.seq, &members, None);
            let r = match check {
                Some(c) => debug_check(c, size, &sig, &jctx).and_then(|_| job()),
                None => job(),
            };
            rec.finish(&r);
            r
        });
        self.worker.submit(wrapped, ctx, blocking)
    }

    fn invalid(ctx: &OpContext, what: impl Into<String>) -> CommError {
        CommError::InvalidArgument { ctx: ctx.clone(), what: what.into() }
    }

    fn check_reduce(&self, ctx: &OpContext, dt: DType, op: ReduceOp) -> Result<()> {
        if op == ReduceOp::Avg && !dt.is_float() {
            return Err(Self::invalid(ctx, format!("avg of {dt} tensors is not defined; use sum and divide")));
        }
        Ok(())
    }

    fn same_device(ctx: &OpContext, a: &Tensor, b: &Tensor) -> Result<()> {
        if a.device() != b.device() || a.kind() != b.kind() {
            return Err(Self::invalid(
                ctx,
                format!(
                    "output is {:?} on {:?} but input is {:?} on {:?}; pass tensors of one dtype on one device",
                    a.kind(),
                    a.device(),
                    b.kind(),
                    b.device()
                ),
            ));
        }
        Ok(())
    }

    fn all_reduce_impl(&self, t: &Tensor, op: ReduceOp, blocking: bool) -> Result<Work> {
        let ctx = self.next_ctx(OpKind::AllReduce);
        let dt = self.dtype_of(t, &ctx)?;
        self.check_reduce(&ctx, dt, op)?;
        let n = self.count(t.numel(), &ctx)?;
        let ctx = self.commit(ctx);
        let staged = self.stage(t, true);
        let (raw, size, jctx) = (self.raw, self.size, ctx.clone());
        let sig = Sig::new(OpKind::AllReduce, Some(dt), n as i64, op.code());
        let job: Job = Box::new(move || {
            // SAFETY: `staged.buf` is contiguous, `n` elements of `dt` (host memory, or device memory
            // only when the library is CUDA-aware), owned by this closure until the blocking call
            // returns; user ops exist (created in `world`); `raw` is live.
            let rc = unsafe { ffi::MPI_Allreduce(in_place(), staged.ptr(), n, datatype(dt), reduction(dt, op), raw.c()) };
            ok(rc, &jctx, "MPI_Allreduce")?;
            if op == ReduceOp::Avg {
                divide(&staged.buf, size, &jctx)?;
            }
            staged.finish(&jctx)
        });
        Ok(self.submit(ctx, sig, job, blocking))
    }

    fn broadcast_impl(&self, t: &Tensor, root: usize, blocking: bool) -> Result<Work> {
        let ctx = self.next_ctx(OpKind::Broadcast);
        let dt = self.dtype_of(t, &ctx)?;
        if root >= self.size {
            return Err(Self::invalid(&ctx, format!("root {root} is not a rank of this group (size {})", self.size)));
        }
        let n = self.count(t.numel(), &ctx)?;
        let ctx = self.commit(ctx);
        let is_root = root == self.rank;
        let mut staged = self.stage(t, is_root);
        if is_root {
            staged.back = None;
        }
        let (raw, jctx) = (self.raw, ctx.clone());
        let sig = Sig::new(OpKind::Broadcast, Some(dt), n as i64, root as i64);
        let job: Job = Box::new(move || {
            // SAFETY: `staged.buf` is contiguous, `n` elements of `dt` MPI may use (see `stage`),
            // owned by this closure until the blocking call returns; `root` < size (checked above).
            let rc = unsafe { ffi::MPI_Bcast(staged.ptr(), n, datatype(dt), root as c_int, raw.c()) };
            ok(rc, &jctx, "MPI_Bcast")?;
            staged.finish(&jctx)
        });
        Ok(self.submit(ctx, sig, job, blocking))
    }

    fn all_gather_impl(&self, output: &Tensor, input: &Tensor, blocking: bool) -> Result<Work> {
        let ctx = self.next_ctx(OpKind::AllGather);
        let dt = self.dtype_of(input, &ctx)?;
        Self::same_device(&ctx, output, input)?;
        if output.numel() != input.numel() * self.size {
            return Err(Self::invalid(
                &ctx,
                format!(
                    "output has {} elements but all_gather of {} elements over {} ranks needs {}",
                    output.numel(),
                    input.numel(),
                    self.size,
                    input.numel() * self.size
                ),
            ));
        }
        let n = self.count(input.numel(), &ctx)?;
        let ctx = self.commit(ctx);
        let sig = Sig::new(OpKind::AllGather, Some(dt), n as i64, 0);
        let plain = |t: &Tensor| t.device() == Device::Cpu && t.is_contiguous();
        let (raw, jctx) = (self.raw, ctx.clone());
        if plain(output) && plain(input) {
            let (o, i) = (byte_range(output, dt), byte_range(input, dt));
            let chunk = input.numel() * dt.size();
            if i.0 == o.0 + self.rank * chunk {
                let out = Staged { buf: output.shallow_clone(), back: None };
                let job: Job = Box::new(move || {
                    // SAFETY: `out` is the caller's contiguous CPU output of `n * size` elements of
                    // `dt` (checked above), owned by this closure until the blocking call returns;
                    // this rank's input is its own chunk of it, as MPI_IN_PLACE requires.
                    let rc = unsafe { ffi::MPI_Allgather(in_place(), 0, datatype(dt), out.ptr(), n, datatype(dt), raw.c()) };
                    ok(rc, &jctx, "MPI_Allgather")
                });
                return Ok(self.submit(ctx, sig, job, blocking));
            }
        }
        // Out of place. An input that overlaps the output anywhere else is copied first.
        let mut inp = self.stage_in(input);
        let out = self.stage(output, false);
        if overlaps(byte_range(&inp.buf, dt), byte_range(&out.buf, dt)) {
            inp = Staged { buf: inp.buf.copy(), back: None };
        }
        let job: Job = Box::new(move || {
            // SAFETY: contiguous staged buffers MPI may use (see `stage`), `n` and `n * size`
            // elements of `dt` (checked above), disjoint (an overlapping input was copied), owned by
            // this closure until the blocking call returns.
            let rc = unsafe { ffi::MPI_Allgather(inp.ptr(), n, datatype(dt), out.ptr(), n, datatype(dt), raw.c()) };
            ok(rc, &jctx, "MPI_Allgather")?;
            drop(inp);
            out.finish(&jctx)
        });
        Ok(self.submit(ctx, sig, job, blocking))
    }

    fn reduce_scatter_impl(&self, output: &Tensor, input: &Tensor, op: ReduceOp, blocking: bool) -> Result<Work> {
        let ctx = self.next_ctx(OpKind::ReduceScatter);
        let dt = self.dtype_of(input, &ctx)?;
        Self::same_device(&ctx, output, input)?;
        self.check_reduce(&ctx, dt, op)?;
        if input.numel() != output.numel() * self.size {
            return Err(Self::invalid(
                &ctx,
                format!(
                    "input has {} elements but reduce_scatter into {} elements over {} ranks needs {}",
                    input.numel(),
                    output.numel(),
                    self.size,
                    output.numel() * self.size
                ),
            ));
        }
        let n = self.count(output.numel(), &ctx)?;
        let ctx = self.commit(ctx);
        let sig = Sig::new(OpKind::ReduceScatter, Some(dt), n as i64, op.code());
        let inp = self.stage_in(input);
        let mut out = self.stage(output, false);
        if overlaps(byte_range(&inp.buf, dt), byte_range(&out.buf, dt)) {
            // In place (output is a chunk of input): MPI forbids aliased buffers, so receive into
            // a scratch tensor and copy.
            out = Staged { buf: Tensor::empty(output.size(), (output.kind(), Device::Cpu)), back: Some(output.shallow_clone()) };
        }
        let (raw, size, jctx) = (self.raw, self.size, ctx.clone());
        let job: Job = Box::new(move || {
            // SAFETY: contiguous staged buffers MPI may use (see `stage`), `n * size` and `n`
            // elements of `dt` (checked above), disjoint (an aliased output was replaced by scratch),
            // owned by this closure until the blocking call returns; user ops exist.
            let rc = unsafe { ffi::MPI_Reduce_scatter_block(inp.ptr(), out.ptr(), n, datatype(dt), reduction(dt, op), raw.c()) };
            ok(rc, &jctx, "MPI_Reduce_scatter_block")?;
            drop(inp);
            if op == ReduceOp::Avg {
                divide(&out.buf, size, &jctx)?;
            }
            out.finish(&jctx)
        });
        Ok(self.submit(ctx, sig, job, blocking))
    }

    fn barrier_impl(&self, blocking: bool) -> Result<Work> {
        let ctx = self.commit(self.next_ctx(OpKind::Barrier));
        let (raw, jctx) = (self.raw, ctx.clone());
        // SAFETY: `raw` is a live communicator; a barrier touches no buffers.
        let job: Job = Box::new(move || ok(unsafe { ffi::MPI_Barrier(raw.c()) }, &jctx, "MPI_Barrier"));
        Ok(self.submit(ctx, Sig::new(OpKind::Barrier, None, 0, 0), job, blocking))
    }

    fn p2p(&self, t: &Tensor, peer: usize, send: bool) -> Result<Work> {
        let ctx = self.next_ctx(if send { OpKind::Send } else { OpKind::Recv });
        let dt = self.dtype_of(t, &ctx)?;
        if peer >= self.size || peer == self.rank {
            return Err(Self::invalid(
                &ctx,
                format!("peer {peer} must be another rank of this group (ranks 0..{}, this is {})", self.size, self.rank),
            ));
        }
        let n = self.count(t.numel(), &ctx)?;
        let ctx = self.commit(ctx);
        let staged = if send { self.stage_in(t) } else { self.stage(t, false) };
        let rec = self.flight.enqueue(ctx.seq, OpDesc::p2p(ctx.op, dt, t.numel(), peer));
        rec.start();
        let guard = watchdog::begin(ctx.to_string(), &self.id, ctx.seq, &self.members, Some(peer));
        // SAFETY: MPI_Request is a C handle (a pointer or an int): all-zero is a valid value, only
        // used as an out-parameter.
        let mut req: ffi::MPI_Request = unsafe { std::mem::zeroed() };
        // SAFETY: `staged.buf` is contiguous, `n` elements of `dt` MPI may use (see `stage`). It
        // outlives the transfer: `P2pWork` owns it and releases it only once MPI_Wait or MPI_Test has
        // returned for the request (its `Drop` waits when neither has).
        let rc = unsafe {
            if send {
                ffi::MPI_Isend(staged.ptr(), n, datatype(dt), peer as c_int, 0, self.raw.c(), &mut req)
            } else {
                ffi::MPI_Irecv(staged.ptr(), n, datatype(dt), peer as c_int, 0, self.raw.c(), &mut req)
            }
        };
        ok(rc, &ctx, if send { "MPI_Isend" } else { "MPI_Irecv" }).inspect_err(|e| rec.fail(&e.to_string()))?;
        Ok(Work::from_impl(P2pWork { req, staged: Some(staged), dt, n, ctx, _guard: guard, rec, done: None }))
    }

    fn split_impl(&self, color: Option<u32>, key: u32, name: &str) -> Result<Option<Arc<dyn Communicator>>> {
        let ctx = self.commit(self.next_ctx(OpKind::Split));
        let k = self.splits.fetch_add(1, Ordering::Relaxed);
        let sig = Sig::new(OpKind::Split, None, 0, 0);
        let out: Arc<Mutex<Option<MpiComm>>> = Arc::new(Mutex::new(None));
        let (raw, jctx, slot) = (self.raw, ctx.clone(), out.clone());
        let debug = self.check.is_some();
        let parent_members = self.members.clone();
        let (id, name, registry) = (self.id.clone(), name.to_string(), self.registry.clone());
        let job: Job = Box::new(move || {
            // SAFETY: all-zero is a valid MPI_Comm (a C handle), only used as an out-parameter.
            let mut nc: ffi::MPI_Comm = unsafe { std::mem::zeroed() };
            // SAFETY: reads rsmpi's C `const` RSMPI_UNDEFINED, never written.
            let c = color.map(|c| c as c_int).unwrap_or(unsafe { ffi::RSMPI_UNDEFINED });
            // SAFETY: `raw` is the live parent communicator, `nc` a valid out-pointer.
            ok(unsafe { ffi::MPI_Comm_split(raw.c(), c, key as c_int, &mut nc) }, &jctx, "MPI_Comm_split")?;
            // SAFETY: reads rsmpi's C `const` RSMPI_COMM_NULL, never written.
            if nc == unsafe { ffi::RSMPI_COMM_NULL } {
                return Ok(());
            }
            let (mut r, mut s) = (0, 0);
            // SAFETY: `nc` is the new, non-null communicator; the out-pointers are locals.
            unsafe {
                ffi::MPI_Comm_rank(nc, &mut r);
                ffi::MPI_Comm_size(nc, &mut s);
            }
            // World ranks of the members, by new rank.
            let me = parent_members[jctx.rank] as i64;
            let mut all = vec![0i64; s as usize];
            // SAFETY: sends the one i64 `me`, receives one i64 from each of the `s` members of `nc`
            // into `all` (`s` elements); both are locals alive across the blocking call.
            let rc = unsafe {
                ffi::MPI_Allgather(
                    &me as *const i64 as *const c_void,
                    1,
                    ffi::RSMPI_INT64_T,
                    all.as_mut_ptr() as *mut c_void,
                    1,
                    ffi::RSMPI_INT64_T,
                    nc,
                )
            };
            ok(rc, &jctx, "MPI_Allgather (split members)")?;
            let members = Arc::new(all.into_iter().map(|x| x as usize).collect());
            let cid = format!("{id}.{k}c{}", color.unwrap_or(0));
            let comm = MpiComm::assemble(nc, debug, r as usize, s as usize, name, cid, members, registry)
                .map_err(|detail| CommError::Backend { ctx: jctx.clone(), detail })?;
            *slot.lock().unwrap() = Some(comm);
            Ok(())
        });
        self.submit(ctx, sig, job, true).wait()?;
        let comm = out.lock().unwrap().take();
        Ok(comm.map(|c| Arc::new(c) as Arc<dyn Communicator>))
    }
}

fn debug_check(check: RawComm, size: usize, sig: &Sig, ctx: &OpContext) -> Result<()> {
    let mut s = *sig;
    s.seq = ctx.seq;
    let mine = s.encode();
    let mut all = vec![0i64; 5 * size];
    // SAFETY: sends the 5 i64 of `mine`, receives 5 from each of the `size` members of `check` (a
    // duplicate of the operation's communicator) into `all` (5 * size); locals, alive for the call.
    let rc = unsafe {
        ffi::MPI_Allgather(mine.as_ptr() as *const c_void, 5, ffi::RSMPI_INT64_T, all.as_mut_ptr() as *mut c_void, 5, ffi::RSMPI_INT64_T, check.0)
    };
    ok(rc, ctx, "MPI_Allgather (debug check)")?;
    match mismatch_detail(&all, &mine) {
        None => Ok(()),
        Some(detail) => Err(CommError::Mismatch { ctx: ctx.clone(), detail }),
    }
}

impl Communicator for MpiComm {
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
        Backend::Mpi
    }
    fn members(&self) -> &[usize] {
        &self.members
    }
    fn all_reduce_async(&self, t: &Tensor, op: ReduceOp) -> Result<Work> {
        self.all_reduce_impl(t, op, false)
    }
    fn broadcast_async(&self, t: &Tensor, root: usize) -> Result<Work> {
        self.broadcast_impl(t, root, false)
    }
    fn all_gather_async(&self, output: &Tensor, input: &Tensor) -> Result<Work> {
        self.all_gather_impl(output, input, false)
    }
    fn reduce_scatter_async(&self, output: &Tensor, input: &Tensor, op: ReduceOp) -> Result<Work> {
        self.reduce_scatter_impl(output, input, op, false)
    }
    fn send_async(&self, t: &Tensor, dst: usize) -> Result<Work> {
        self.p2p(t, dst, true)
    }
    fn recv_async(&self, t: &Tensor, src: usize) -> Result<Work> {
        self.p2p(t, src, false)
    }
    fn barrier_async(&self) -> Result<Work> {
        self.barrier_impl(false)
    }
    fn split(&self, color: Option<u32>, key: u32, name: &str) -> Result<Option<Arc<dyn Communicator>>> {
        self.split_impl(color, key, name)
    }
    fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<()> {
        self.all_reduce_impl(t, op, true)?.wait()
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        self.broadcast_impl(t, root, true)?.wait()
    }
    fn all_gather(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        self.all_gather_impl(output, input, true)?.wait()
    }
    fn reduce_scatter(&self, output: &Tensor, input: &Tensor, op: ReduceOp) -> Result<()> {
        self.reduce_scatter_impl(output, input, op, true)?.wait()
    }
    fn barrier(&self) -> Result<()> {
        self.barrier_impl(true)?.wait()
    }
}
