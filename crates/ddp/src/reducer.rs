//! The reducer: data parallelism applied to a model's parameters from outside (the model never
//! sees a communicator).
//!
//! - **Start:** every parameter is broadcast from rank 0 (and, in debug mode, a checksum of all of
//!   them is compared across ranks).
//! - **Storage:** each bucket owns one flat gradient tensor; every parameter's `.grad` is set to a
//!   view of it (`gradient_as_bucket_view`), so autograd accumulates straight into the bucket and a
//!   step does no per-parameter flatten/unflatten copies.
//! - **Overlap:** a grad-ready hook per parameter counts down its bucket; when a bucket is
//!   complete (and every bucket before it has been launched, so that all ranks issue the same
//!   sequence) it is all-reduced (average) asynchronously while backward continues.
//! - **Accumulation:** hooks are armed only on the last micro-step; earlier ones communicate
//!   nothing and simply accumulate into the buckets.
//! - **How a bucket is reduced** is a communication hook ([`CommHook`], PyTorch DDP's
//!   `register_comm_hook`): by default an average in the gradients' dtype ([`AllReduce`]);
//!   `parallel.reduce_dtype = bf16` is [`Bf16Compress`] (copied into a bf16 twin, reduced, copied
//!   back); [`Ddp::apply_with_hook`] takes any other.
//! - **ZeRO-1:** buckets are padded to a multiple of the dp size and split into dp contiguous
//!   shards. Gradients are reduce-scattered, each rank's optimizer updates only its shard (the
//!   optimizer allocates its moments for the [`Piece`]s handed to it, so they exist only for the
//!   shard), and the updated shards are all-gathered straight into the parameters, which are
//!   views of flat per-bucket parameter storage. The reducer holds no optimizer state: for a
//!   checkpoint, [`Ddp::gather_pieces`] gathers any per-piece tensors (the optimizer's moments)
//!   into whole per-parameter tensors.
//!
//! # Failures
//!
//! One locking policy: the state's lock is always taken through one helper (`Shared::state`), which
//! recovers a poisoned lock (nothing in the reducer panics while holding it, see below, so a
//! poisoned lock can only come from a bug; the state is then reset by the next
//! `begin_micro_step` or `finish` anyway).
//!
//! A bucket that cannot be launched (the communicator refuses it, libtorch fails staging it, or
//! something panics on the way, in the grad-ready hook or in `finish`) or whose collective fails
//! is recorded in the state as the step's first [`DdpError`], naming the bucket and its
//! parameters, with the communicator's error as its source. A panic in the hook is caught there,
//! inside the lock, so backward itself succeeds and nothing is poisoned. From the first failure on,
//! no further bucket of that step is launched.
//!
//! - [`Ddp::finish`] waits out every collective already in flight (they use the buckets), returns
//!   that error, and leaves a clean state: the next step starts afresh (and fails again, with a
//!   new error, only if the cause persists). The failed step's gradients are partly reduced: do not
//!   step the optimizer on them.
//! - A step abandoned before its `finish` (the caller stopped at an error of its own backward) is
//!   cleaned up by the next [`Ddp::begin_micro_step`]: it waits out that step's collectives and
//!   drops its recorded error, which the caller, handling its own failure, never asked for.

use std::any::Any;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fabbrica_comm::{Communicator, Work};
use fabbrica_torch_ext::hooks::{register_grad_ready_hook, set_grad, GradReadyHook};
use tch::{Kind, TchError, Tensor};

use crate::buckets::{assign_buckets, BucketAssignment, BucketCaps, ParamSpec};
use crate::error::{first_line, DdpError, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdpOptions {
    /// Bucket cap in MiB (`parallel.bucket_mb`).
    pub bucket_mb: f64,
    /// Cap of the first bucket in MiB: small, so the first all-reduce starts early in backward.
    pub first_bucket_mb: f64,
    /// Reduce in bf16 (`parallel.reduce_dtype = bf16`): [`Ddp::apply`] then uses the
    /// [`Bf16Compress`] hook instead of [`AllReduce`]. [`Ddp::apply_with_hook`] ignores it.
    pub reduce_bf16: bool,
    /// Launch each bucket from backward (`parallel.overlap`); otherwise all after backward.
    pub overlap: bool,
    /// ZeRO-1 (`parallel.zero = 1`).
    pub zero1: bool,
    /// `false` skips gradient communication (benchmark of communication cost only).
    pub grad_comm: bool,
    /// Compare a parameter checksum across ranks after the initial broadcast.
    pub check_params: bool,
}

impl Default for DdpOptions {
    fn default() -> Self {
        DdpOptions { bucket_mb: 25.0, first_bucket_mb: 1.0, reduce_bf16: false, overlap: true, zero1: false, grad_comm: true, check_params: false }
    }
}

/// A tensor the optimizer updates, with its gradient: a whole parameter, or under ZeRO-1 the
/// piece of one that lies in this rank's shard of a bucket. The optimizer makes its own state
/// for it, shaped like `param`.
pub struct OptParam {
    /// The parameter's name, or a piece's `name[a..b]` (elements `a..b` of the flattened
    /// parameter).
    pub name: String,
    pub param: Tensor,
    pub grad: Tensor,
    /// nanoGPT's rule: tensors of 2+ dimensions are weight-decayed.
    pub decay: bool,
    /// ZeRO-1: where this piece lies in its whole parameter; `None` for a whole parameter.
    pub piece: Option<Piece>,
}

/// Where a ZeRO-1 piece lies: elements `offset..offset + len` of the flattened parameter `param`,
/// whose whole shape is `shape` (what a checkpoint stores, and what loading slices the piece's
/// state from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub param: String,
    pub shape: Vec<i64>,
    pub offset: usize,
    pub len: usize,
}

struct Buf {
    grad: Tensor,
    /// What the communication hook prepared for this bucket (the bf16 hook's twin of `grad`).
    scratch: Option<Tensor>,
    /// ZeRO-1: flat parameter storage (parameters are views of it).
    param: Option<Tensor>,
    /// Elements including ZeRO-1 padding, and the shard length.
    padded: usize,
    shard: usize,
}

struct State {
    bufs: Vec<Buf>,
    armed: bool,
    pending: Vec<usize>,
    ready: Vec<bool>,
    /// The next bucket to launch (buckets are launched in order).
    next: usize,
    works: Vec<(usize, Work)>,
    /// The step's first failure (see "Failures" in the module docs): returned and cleared by
    /// `finish`, dropped by `begin_micro_step`. While it is set, no bucket is launched.
    error: Option<DdpError>,
    /// Bucket collectives launched since `apply` (what the tests count); failed launches do not
    /// count.
    launched: u64,
    /// Runtime switches (benchmarks flip them between steps): start from `DdpOptions`.
    overlap: bool,
    grad_comm: bool,
}

impl State {
    /// Records a failure of the step: the first one is kept, and nothing more is launched.
    fn fail(&mut self, e: DdpError) {
        self.armed = false;
        self.error.get_or_insert(e);
    }

    /// Back to the start of a step, disarmed, with no error: first waits out the collectives still
    /// in flight (they read and write the buckets), dropping their results.
    fn restart(&mut self, counts: &[usize]) {
        for (_, w) in std::mem::take(&mut self.works) {
            let _ = w.wait();
        }
        self.error = None;
        self.armed = false;
        self.pending.clear();
        self.pending.extend_from_slice(counts);
        self.ready.iter_mut().for_each(|r| *r = false);
        self.next = 0;
    }
}

/// Where a bucket's collective is launched from, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The grad-ready hook, while backward runs.
    Backward,
    /// `finish`, after backward.
    Finish,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Backward => "from backward (grad-ready hook)",
            Origin::Finish => "after backward (finish)",
        })
    }
}

struct Shared {
    comm: Arc<dyn Communicator>,
    /// Bucket of each parameter.
    bucket_of: Vec<usize>,
    /// Parameters per bucket.
    counts: Vec<usize>,
    /// For messages: parameter names (registration order), and each bucket's description.
    names: Vec<String>,
    buckets: Vec<String>,
    opts: DdpOptions,
    hook: Arc<dyn CommHook>,
    state: Mutex<State>,
}

impl Shared {
    /// The state, recovering a poisoned lock: the only way the reducer takes it (see "Failures"
    /// in the module docs). Nothing panics while holding it in the reducer (panics of the launch
    /// path are caught and recorded), and `begin_micro_step` and `finish` reset the per-step
    /// fields, so what a panic elsewhere could leave half-updated does not outlive its step.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// ZeRO-1 with more than one rank: reduce-scatter, and gradients held as shards.
    fn sharded(&self) -> bool {
        self.opts.zero1 && self.comm.size() > 1
    }

    fn collective(&self) -> &'static str {
        if self.sharded() {
            "reduce-scatter"
        } else {
            "all-reduce"
        }
    }

    /// The grad-ready hook of parameter `param`. Never panics: a panic here would poison the
    /// state and fail backward with a message that names no bucket; it is recorded instead, and
    /// `finish` returns it.
    fn on_ready(&self, param: usize) {
        let mut st = self.state();
        if !st.armed {
            return;
        }
        // Caught with the guard held, so that unwinding never crosses it. `launch` catches its own
        // panics (naming the bucket); what is left to catch here is a broken invariant.
        let res = catch_unwind(AssertUnwindSafe(|| {
            let b = self.bucket_of[param];
            st.pending[b] = st.pending[b].saturating_sub(1);
            if st.pending[b] == 0 {
                st.ready[b] = true;
            }
            self.launch_in_order(&mut st, Origin::Backward);
        }));
        if let Err(payload) = res {
            let name = self.names.get(param).map_or("?", String::as_str);
            st.fail(DdpError::Panic { what: format!("grad-ready hook of parameter {param} ('{name}')"), message: panic_message(&*payload) });
        }
    }

    /// Launches buckets in bucket order, so that every rank issues the same sequence of
    /// collectives: those ready (from backward), or all the rest (from `finish`). Stops at the
    /// step's first failure.
    fn launch_in_order(&self, st: &mut State, origin: Origin) {
        while st.error.is_none() && st.next < st.ready.len() && (origin == Origin::Finish || st.ready[st.next]) {
            let b = st.next;
            st.next += 1;
            match self.launch(st, b, origin) {
                Ok(w) => {
                    st.works.push((b, w));
                    st.launched += 1;
                }
                Err(e) => st.fail(e),
            }
        }
    }

    /// Starts bucket `b`'s collective (average). A panic on the way (libtorch, the communicator)
    /// is caught and returned as an error naming the bucket.
    fn launch(&self, st: &State, b: usize, origin: Origin) -> Result<Work> {
        catch_unwind(AssertUnwindSafe(|| self.try_launch(&st.bufs[b], b, origin))).unwrap_or_else(|payload| {
            Err(DdpError::Panic {
                what: format!("launching the {} of {} {origin}", self.collective(), self.buckets[b]),
                message: panic_message(&*payload),
            })
        })
    }

    fn try_launch(&self, buf: &Buf, b: usize, origin: Origin) -> Result<Work> {
        self.hook.launch(&*self.comm, &self.hook_bucket(buf)).map_err(|e| self.hook_err(b, &format!("could not be launched {origin}"), e))
    }

    /// Bucket `buf` as the communication hook sees it.
    fn hook_bucket<'a>(&self, buf: &'a Buf) -> HookBucket<'a> {
        // In range: a sharded bucket is padded to size × shard elements.
        let shard = self.sharded().then(|| (self.comm.rank() as i64 * buf.shard as i64, buf.shard as i64));
        HookBucket { grad: &buf.grad, scratch: buf.scratch.as_ref(), shard }
    }

    /// Waits for every collective in flight and copies bf16 results back; failures are recorded.
    fn wait_all(&self, st: &mut State) {
        for (b, w) in std::mem::take(&mut st.works) {
            let res = match w.wait() {
                Ok(()) => self.hook.complete(&self.hook_bucket(&st.bufs[b])).map_err(|e| self.hook_err(b, "could not be completed", e)),
                Err(source) => Err(DdpError::Collective { what: format!("{}: {} failed", self.buckets[b], self.collective()), source }),
            };
            if let Err(e) = res {
                st.fail(e);
            }
        }
    }

    /// A hook's failure on bucket `b`, `doing` what (for the collective's message).
    fn hook_err(&self, b: usize, doing: &str, e: HookError) -> DdpError {
        match e {
            HookError::Comm(source) => DdpError::Collective { what: format!("{}: {} {doing}", self.buckets[b], self.collective()), source },
            HookError::Torch(what) => DdpError::Torch(format!("{}: {what}", self.buckets[b])),
        }
    }
}

/// A caught panic's message.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

/// Maps a libtorch error to [`DdpError::Torch`], prefixed with what was being done.
fn torch_err(what: impl fmt::Display) -> impl FnOnce(TchError) -> DdpError {
    let what = what.to_string();
    move |e| DdpError::Torch(format!("{what}: {}", first_line(&e)))
}

/// "bucket 2 of 5 (a, b)", or with more than three parameters "bucket 2 of 5 (7 parameters, a
/// ... g)".
fn describe_bucket(index: usize, count: usize, names: &[&str]) -> String {
    let list = match names {
        [first, .., last] if names.len() > 3 => format!("{} parameters, {first} ... {last}", names.len()),
        _ => names.join(", "),
    };
    format!("bucket {index} of {count} ({list})")
}

pub struct Ddp {
    shared: Arc<Shared>,
    params: Vec<(String, Tensor)>,
    assignment: BucketAssignment,
    _hooks: Vec<GradReadyHook>,
}

mod hook;
mod norm;
pub use hook::{AllReduce, Bf16Compress, CommHook, HookBucket, HookError};
pub use norm::clip_coef;

impl Ddp {
    /// Applies data parallelism over `comm` (the data-parallel group) to `params` (registration
    /// order, as the model lists them), each bucket reduced by the built-in hook `opts` selects
    /// ([`Bf16Compress`] with `reduce_bf16`, else [`AllReduce`]).
    pub fn apply(params: &[(String, Tensor)], comm: Arc<dyn Communicator>, opts: DdpOptions) -> Result<Ddp> {
        let hook: Arc<dyn CommHook> = if opts.reduce_bf16 { Arc::new(Bf16Compress) } else { Arc::new(AllReduce) };
        Ddp::apply_with_hook(params, comm, opts, hook)
    }

    /// As [`Ddp::apply`], with `hook` deciding how each bucket is reduced (PyTorch's
    /// `DistributedDataParallel.register_comm_hook`).
    pub fn apply_with_hook(params: &[(String, Tensor)], comm: Arc<dyn Communicator>, opts: DdpOptions, hook: Arc<dyn CommHook>) -> Result<Ddp> {
        let n = comm.size();
        let params: Vec<(String, Tensor)> = params.iter().map(|(k, p)| (k.clone(), p.shallow_clone())).collect();
        // Same weights everywhere: rank 0's.
        for (name, p) in &params {
            comm.broadcast(&p.detach(), 0)
                .map_err(|source| DdpError::Collective { what: format!("broadcasting parameter '{name}' from rank 0"), source })?;
        }
        if opts.check_params && n > 1 {
            check_equal(&params, &*comm)?;
        }
        let specs: Vec<ParamSpec> = params
            .iter()
            .map(|(_, p)| {
                let key = (p.kind() as u64) << 32 | device_key(p.device());
                ParamSpec::new(p.numel(), p.kind().elt_size_in_bytes()).with_key(key)
            })
            .collect();
        let caps = BucketCaps::from_mb(opts.bucket_mb, opts.first_bucket_mb)?;
        let assignment = assign_buckets(&specs, caps)?;

        let nb = assignment.buckets.len();
        let mut bufs = Vec::with_capacity(nb);
        let mut bucket_of = vec![0; params.len()];
        let mut descriptions = Vec::with_capacity(nb);
        for (bi, b) in assignment.buckets.iter().enumerate() {
            let names: Vec<&str> = b.entries.iter().map(|e| params[e.param].0.as_str()).collect();
            let desc = describe_bucket(bi, nb, &names);
            // A bucket has at least one entry (`assign_buckets` opens one for a parameter).
            let first = &params[b.entries[0].param].1;
            let (kind, dev) = (first.kind(), first.device());
            let padded = if opts.zero1 { b.numel.div_ceil(n) * n } else { b.numel };
            let shard = padded / n;
            let zeros = |len: usize, kind: Kind, what: &str| {
                Tensor::f_zeros([len as i64], (kind, dev)).map_err(torch_err(format_args!("{desc}: allocating {what}")))
            };
            let grad = zeros(padded, kind, "its gradient storage")?;
            let scratch = hook.prepare(&grad).map_err(torch_err(format_args!("{desc}: the communication hook's buffer")))?;
            let mut buf = Buf { grad, scratch, param: None, padded, shard };
            if opts.zero1 {
                let flat = zeros(padded, kind, "its flat parameter storage")?;
                tch::no_grad(|| -> Result<()> {
                    for e in &b.entries {
                        let (name, p) = &params[e.param];
                        let moved = flat.f_narrow(0, e.offset as i64, e.numel as i64).and_then(|v| v.f_view(p.size().as_slice())).and_then(|view| {
                            view.shallow_clone().f_copy_(p)?;
                            p.shallow_clone().f_set_data(&view)
                        });
                        moved.map_err(torch_err(format_args!("parameter '{name}': moving it into {desc}'s flat storage (ZeRO-1)")))?;
                    }
                    Ok(())
                })?;
                buf.param = Some(flat);
            }
            for e in &b.entries {
                let (name, p) = &params[e.param];
                let view = buf
                    .grad
                    .f_narrow(0, e.offset as i64, e.numel as i64)
                    .and_then(|v| v.f_view(p.size().as_slice()))
                    .map_err(torch_err(format_args!("parameter '{name}': viewing its gradient in {desc}")))?;
                set_grad(p, Some(&view)).map_err(|x| DdpError::Torch(format!("parameter '{name}': {x}")))?;
                bucket_of[e.param] = bi;
            }
            bufs.push(buf);
            descriptions.push(desc);
        }
        let counts: Vec<usize> = assignment.buckets.iter().map(|b| b.entries.len()).collect();
        let shared = Arc::new(Shared {
            comm,
            bucket_of,
            counts: counts.clone(),
            names: params.iter().map(|(k, _)| k.clone()).collect(),
            buckets: descriptions,
            opts,
            hook,
            state: Mutex::new(State {
                bufs,
                armed: false,
                pending: counts,
                ready: vec![false; nb],
                next: 0,
                works: Vec::new(),
                error: None,
                launched: 0,
                overlap: opts.overlap,
                grad_comm: opts.grad_comm,
            }),
        });
        // Registered even when overlap is off: `set_mode` may turn it on later, and a disarmed
        // hook costs one uncontended lock per parameter per backward.
        let mut hooks = Vec::new();
        for (i, (name, p)) in params.iter().enumerate() {
            let s = shared.clone();
            hooks.push(register_grad_ready_hook(p, i, move |i| s.on_ready(i)).map_err(|x| DdpError::Torch(format!("parameter '{name}': {x}")))?);
        }
        Ok(Ddp { shared, params, assignment, _hooks: hooks })
    }

    /// Bucket collectives launched so far (one per bucket per optimizer step when communicating;
    /// a launch that failed does not count).
    pub fn launched(&self) -> u64 {
        self.shared.state().launched
    }

    pub fn assignment(&self) -> &BucketAssignment {
        &self.assignment
    }

    pub fn comm(&self) -> &Arc<dyn Communicator> {
        &self.shared.comm
    }

    /// Switches overlap and gradient communication between steps (benchmarks compare them in
    /// one run). Every rank must make the same switch at the same step.
    pub fn set_mode(&self, overlap: bool, grad_comm: bool) {
        let mut st = self.shared.state();
        st.overlap = overlap;
        st.grad_comm = grad_comm;
    }

    /// Call before each micro-step's backward; `last` arms communication for the final one.
    ///
    /// Starts from a clean state: if the previous step was abandoned before its [`Ddp::finish`]
    /// (e.g. its backward failed), this waits out that step's collectives still in flight and
    /// drops its recorded failure.
    pub fn begin_micro_step(&self, last: bool) {
        let mut st = self.shared.state();
        st.restart(&self.shared.counts);
        st.armed = last && st.grad_comm && st.overlap;
    }

    /// After the last micro-step's backward: launches what backward did not (every bucket when
    /// overlap is off) and waits for all of them. Returns the time spent waiting.
    ///
    /// # Errors
    ///
    /// The step's first failure, from backward's hooks or from here: a bucket whose collective
    /// could not be launched or failed ([`DdpError::Collective`], with the communicator's error as
    /// its source), a libtorch error staging it ([`DdpError::Torch`]) or a panic on the way
    /// ([`DdpError::Panic`]). Nothing is launched after a failure; what was launched is waited
    /// for. Either way the reducer is left ready for the next step; the gradients of a failed step
    /// are only partly reduced.
    pub fn finish(&self) -> Result<Duration> {
        let t = Instant::now();
        let mut st = self.shared.state();
        st.armed = false;
        let grad_comm = st.grad_comm;
        if grad_comm {
            self.shared.launch_in_order(&mut st, Origin::Finish);
        }
        self.shared.wait_all(&mut st);
        let error = st.error.take();
        st.restart(&self.shared.counts);
        match error {
            Some(e) => Err(e),
            None if grad_comm => Ok(t.elapsed()),
            None => Ok(Duration::ZERO),
        }
    }

    /// Zeroes every bucket in place (the parameters' `.grad` stay views of them).
    pub fn zero_grad(&self) {
        let st = self.shared.state();
        tch::no_grad(|| {
            for b in &st.bufs {
                // Cannot fail: a dense, defined buffer this reducer allocated.
                let _ = b.grad.shallow_clone().zero_();
            }
        });
    }

    /// What the optimizer updates: whole parameters, or under ZeRO-1 the pieces of parameters
    /// inside this rank's shard of each bucket (in bucket order, then bucket entry order: the
    /// order [`Ddp::gather_pieces`] reads them in).
    pub fn optimizer_params(&self) -> Vec<OptParam> {
        let st = self.shared.state();
        let r = self.shared.comm.rank();
        if !self.shared.opts.zero1 {
            return self
                .params
                .iter()
                .map(|(name, p)| OptParam { name: name.clone(), param: p.shallow_clone(), grad: p.grad(), decay: p.dim() >= 2, piece: None })
                .collect();
        }
        let mut out = Vec::new();
        for (b, buf) in self.assignment.buckets.iter().zip(&st.bufs) {
            let (lo, hi) = (r * buf.shard, (r + 1) * buf.shard);
            let flat = zero1_flat(buf);
            for e in &b.entries {
                let (a, z) = (e.offset.max(lo), (e.offset + e.numel).min(hi));
                if a >= z {
                    continue;
                }
                let (name, p) = &self.params[e.param];
                let len = (z - a) as i64;
                out.push(OptParam {
                    name: piece_name(name, a - e.offset, z - e.offset),
                    param: flat.narrow(0, a as i64, len),
                    grad: buf.grad.narrow(0, a as i64, len),
                    decay: p.dim() >= 2,
                    piece: Some(Piece { param: name.clone(), shape: p.size(), offset: a - e.offset, len: z - a }),
                });
            }
        }
        out
    }

    /// After the optimizer step. ZeRO-1: gathers every rank's updated shard into the parameters.
    pub fn after_step(&self) -> Result<()> {
        if !self.shared.sharded() {
            return Ok(());
        }
        let st = self.shared.state();
        if !st.grad_comm {
            return Ok(());
        }
        let r = self.shared.comm.rank() as i64;
        let what = |b: usize, how: &str| format!("{}: all-gather of the updated ZeRO-1 parameter shards {how}", self.shared.buckets[b]);
        let mut works = Vec::with_capacity(st.bufs.len());
        let mut first_err = None;
        for (bi, b) in st.bufs.iter().enumerate() {
            let flat = zero1_flat(b);
            match self.shared.comm.all_gather_async(flat, &flat.narrow(0, r * b.shard as i64, b.shard as i64)) {
                Ok(w) => works.push((bi, w)),
                Err(source) => {
                    first_err = Some(DdpError::Collective { what: what(bi, "could not be launched"), source });
                    break;
                }
            }
        }
        // Every launched gather is waited for: it writes into the parameters.
        for (bi, w) in works {
            if let Err(source) = w.wait() {
                first_err.get_or_insert(DdpError::Collective { what: what(bi, "failed"), source });
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// ZeRO-1: whole per-parameter tensors from tensors given per piece of this rank's shards
    /// (a collective over the data-parallel group: every rank calls it with the same pieces'
    /// values of its own shard). `value_of` receives each piece's name as
    /// [`Ddp::optimizer_params`] names it (`name[a..b]`) and returns its tensor of `len`
    /// elements: the optimizer's state for it. Returns `(parameter name, whole tensor)` for every
    /// parameter, in registration order of the buckets, each shaped like its parameter, with the
    /// kind of its gradient bucket. A checkpoint stores these, so that it loads with or without
    /// ZeRO-1 and at any dp size.
    ///
    /// # Errors
    ///
    /// [`DdpError::NotSharded`] without ZeRO-1, [`DdpError::MissingPiece`] where `value_of`
    /// has no tensor for a piece (or one of the wrong size), and the gather's failure.
    pub fn gather_pieces(&self, what: &str, value_of: &dyn Fn(&str) -> Option<Tensor>) -> Result<Vec<(String, Tensor)>> {
        if !self.shared.opts.zero1 {
            return Err(DdpError::NotSharded { op: "Ddp::gather_pieces" });
        }
        let st = self.shared.state();
        let r = self.shared.comm.rank();
        let mut out = Vec::new();
        for (bi, (b, buf)) in self.assignment.buckets.iter().zip(&st.bufs).enumerate() {
            let (lo, hi) = (r * buf.shard, (r + 1) * buf.shard);
            let doing = format!("{}: gathering the ZeRO-1 shards of {what}", self.shared.buckets[bi]);
            let opts = (buf.grad.kind(), buf.grad.device());
            let mine = Tensor::f_zeros([buf.shard as i64], opts).map_err(torch_err(&doing))?;
            for e in &b.entries {
                let (a, z) = (e.offset.max(lo), (e.offset + e.numel).min(hi));
                if a >= z {
                    continue;
                }
                let piece = piece_name(&self.params[e.param].0, a - e.offset, z - e.offset);
                let v = value_of(&piece).filter(|v| v.numel() == z - a).ok_or_else(|| DdpError::MissingPiece { what: what.to_string(), piece })?;
                tch::no_grad(|| mine.narrow(0, (a - lo) as i64, (z - a) as i64).f_copy_(&v.f_reshape([-1])?)).map_err(torch_err(&doing))?;
            }
            let all = Tensor::f_zeros([buf.padded as i64], opts).map_err(torch_err(&doing))?;
            self.shared.comm.all_gather(&all, &mine).map_err(|source| DdpError::Collective { what: doing, source })?;
            for e in &b.entries {
                let (name, p) = &self.params[e.param];
                out.push((name.clone(), all.narrow(0, e.offset as i64, e.numel as i64).view(p.size().as_slice())));
            }
        }
        Ok(out)
    }
}

/// A ZeRO-1 piece's name: elements `a..b` of the flattened parameter `name`.
fn piece_name(name: &str, a: usize, b: usize) -> String {
    format!("{name}[{a}..{b}]")
}

/// A ZeRO-1 bucket's flat parameter storage.
fn zero1_flat(buf: &Buf) -> &Tensor {
    // Invariant: `apply` allocates it for every bucket under ZeRO-1, and callers check
    // `opts.zero1` first.
    buf.param.as_ref().expect("ZeRO-1 bucket without flat parameter storage")
}

fn device_key(d: tch::Device) -> u64 {
    match d {
        tch::Device::Cpu => 0,
        tch::Device::Cuda(i) => 1 + i as u64,
        _ => 1 << 20,
    }
}

/// Debug mode: every rank's parameter checksum must equal rank 0's.
fn check_equal(params: &[(String, Tensor)], comm: &dyn Communicator) -> Result<()> {
    let sum: f64 = tch::no_grad(|| {
        params
            .iter()
            .try_fold(0.0, |acc, (_, p)| Ok::<f64, TchError>(acc + p.f_to_kind(Kind::Double)?.f_abs()?.f_sum(Kind::Double)?.f_double_value(&[])?))
    })
    .map_err(torch_err("checksumming the parameters"))?;
    let n = comm.size();
    let all = Tensor::zeros([n as i64], (Kind::Float, tch::Device::Cpu));
    let mine = Tensor::from_slice(&[sum as f32]);
    comm.all_gather(&all, &mine).map_err(|source| DdpError::Collective { what: "comparing parameter checksums across ranks".into(), source })?;
    let v: Vec<f32> = Vec::try_from(all).map_err(torch_err("reading the gathered checksums"))?;
    let bad: Vec<usize> = (0..n).filter(|&i| v[i] != v[0]).collect();
    if !bad.is_empty() {
        return Err(DdpError::Comm(format!(
            "parameters differ across ranks after the broadcast from rank 0: ranks {bad:?} have checksums {:?}, rank 0 has {}",
            bad.iter().map(|&i| v[i]).collect::<Vec<_>>(),
            v[0]
        )));
    }
    Ok(())
}
