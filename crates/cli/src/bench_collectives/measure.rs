//! Timing one message size: fabbrica's call and the raw rsmpi call on the same buffers, checked.

use super::*;
// ---------------------------------------------------------------------------------------------
// One size

pub(super) struct SizeCtx<'a> {
    pub(super) op: Op,
    pub(super) dtype: DType,
    pub(super) device: Device,
    pub(super) comm: &'a Arc<Group>,
    pub(super) raw: Option<&'a SimpleCommunicator>,
    pub(super) raw_op: &'a RawOp,
    pub(super) rank: usize,
    pub(super) n: usize,
    /// Elements in the per-rank buffer (the gathered one for all_gather, the input for
    /// reduce_scatter).
    pub(super) count: u64,
    /// Test hook: spoil this rank's fabbrica result before the check.
    pub(super) corrupt: bool,
}

pub(super) struct Measured {
    pub(super) time: Duration,
    pub(super) raw_time: Option<Duration>,
    pub(super) ok: bool,
}

/// The tensors of one size. `a` is the in-place buffer, the input, or the send buffer; `b` the
/// output or the receive buffer.
pub(super) struct Bufs {
    pub(super) a: Tensor,
    pub(super) b: Option<Tensor>,
}

impl SizeCtx<'_> {
    pub(super) fn kind(&self) -> Kind {
        self.dtype.kind()
    }

    /// Small integers, exact in f32 and bf16, as are sums of `n` of them: (7i + 3r) mod m with
    /// (m−1)·n ≤ 256.
    pub(super) fn modulus(&self) -> u64 {
        (256 / self.n as u64).clamp(2, 16)
    }

    pub(super) fn value(&self, r: usize, i: u64) -> f32 {
        ((i * 7 + r as u64 * 3) % self.modulus()) as f32
    }

    /// A CPU tensor of `len` elements whose element j is `f(offset + j)`; `f` must have period
    /// `modulus()`, so one period is built and repeated.
    pub(super) fn periodic(&self, len: u64, offset: u64, f: impl Fn(u64) -> f32) -> Tensor {
        let m = self.modulus();
        let base: Vec<f32> = (0..m).map(|j| f(offset + j)).collect();
        let reps = len.div_ceil(m) as i64;
        Tensor::from_slice(&base).to_kind(self.kind()).repeat([reps]).narrow(0, 0, len as i64)
    }

    pub(super) fn pattern(&self, r: usize, len: u64, offset: u64) -> Tensor {
        self.periodic(len, offset, |i| self.value(r, i))
    }

    pub(super) fn sum_pattern(&self, len: u64, offset: u64) -> Tensor {
        self.periodic(len, offset, |i| (0..self.n).map(|r| self.value(r, i)).sum())
    }

    pub(super) fn chunk(&self) -> u64 {
        if self.op.splits() {
            self.count / self.n as u64
        } else {
            self.count
        }
    }

    pub(super) fn alloc(&self) -> Bufs {
        let opts = (self.kind(), self.device);
        let (c, chunk) = (self.count as i64, self.chunk() as i64);
        match self.op {
            Op::AllReduce | Op::Broadcast => Bufs { a: Tensor::empty([c], opts), b: None },
            Op::AllGather => Bufs { a: Tensor::empty([chunk], opts), b: Some(Tensor::empty([c], opts)) },
            Op::ReduceScatter => Bufs { a: Tensor::empty([c], opts), b: Some(Tensor::empty([chunk], opts)) },
            Op::SendRecv => Bufs { a: Tensor::empty([c], opts), b: Some(Tensor::empty([c], opts)) },
        }
    }

    pub(super) fn prev(&self) -> usize {
        (self.rank + self.n - 1) % self.n
    }
    pub(super) fn next(&self) -> usize {
        (self.rank + 1) % self.n
    }

    /// Inputs for the correctness check; outputs get -1 (never a correct value).
    pub(super) fn fill(&self, bufs: &Bufs) {
        let mut a = bufs.a.shallow_clone();
        match self.op {
            Op::Broadcast if self.rank != 0 => {
                let _ = a.fill_(-1.0);
            }
            _ => {
                a.copy_(&self.pattern(self.rank, a.numel() as u64, 0));
            }
        }
        if let Some(b) = &bufs.b {
            let _ = b.shallow_clone().fill_(-1.0);
        }
    }

    /// Whether the result in `bufs` is the expected one.
    pub(super) fn check(&self, bufs: &Bufs) -> bool {
        let (got, want) = match self.op {
            Op::AllReduce => (&bufs.a, self.sum_pattern(self.count, 0)),
            Op::Broadcast => (&bufs.a, self.pattern(0, self.count, 0)),
            Op::AllGather => {
                let parts: Vec<Tensor> = (0..self.n).map(|r| self.pattern(r, self.chunk(), 0)).collect();
                (bufs.b.as_ref().unwrap(), Tensor::cat(&parts, 0))
            }
            Op::ReduceScatter => (bufs.b.as_ref().unwrap(), self.sum_pattern(self.chunk(), self.rank as u64 * self.chunk())),
            Op::SendRecv => (bufs.b.as_ref().unwrap(), self.pattern(self.prev(), self.count, 0)),
        };
        got.to_device(Device::Cpu).equal(&want)
    }

    /// One fabbrica operation.
    pub(super) fn fab(&self, bufs: &Bufs) -> fabbrica_comm::Result<()> {
        let c = self.comm;
        match self.op {
            Op::AllReduce => c.all_reduce(&bufs.a, ReduceOp::Sum),
            Op::Broadcast => c.broadcast(&bufs.a, 0),
            Op::AllGather => c.all_gather(bufs.b.as_ref().unwrap(), &bufs.a),
            Op::ReduceScatter => c.reduce_scatter(bufs.b.as_ref().unwrap(), &bufs.a, ReduceOp::Sum),
            Op::SendRecv => {
                let recv = c.recv_async(bufs.b.as_ref().unwrap(), self.prev())?;
                let send = c.send_async(&bufs.a, self.next())?;
                send.wait()?;
                recv.wait()
            }
        }
    }

    /// One raw rsmpi operation on the same memory.
    pub(super) fn raw(&self, world: &SimpleCommunicator, bufs: &Bufs) {
        match self.dtype {
            DType::Bf16 => self.raw_typed::<u16>(world, bufs),
            _ => self.raw_typed::<f32>(world, bufs),
        }
    }

    pub(super) fn raw_typed<T: Equivalence>(&self, world: &SimpleCommunicator, bufs: &Bufs) {
        // SAFETY: CPU tensors of this size and dtype (T has the dtype's width), alive for the call;
        // `a` and `b` never overlap.
        let a: &mut [T] = unsafe { view(&bufs.a) };
        // SAFETY: as for `a`: `b` is another CPU tensor of this dtype, allocated apart from `a`.
        let b: Option<&mut [T]> = bufs.b.as_ref().map(|t| unsafe { view(t) });
        match self.op {
            Op::AllReduce => {
                // SAFETY: in place over `a`, `a.len()` elements of T's MPI datatype, borrowed for
                // the blocking call; `raw_op` is a live reduction (see `RawOp`) and `world` is
                // rsmpi's live world communicator.
                let rc = unsafe {
                    mpi::ffi::MPI_Allreduce(
                        fabbrica_comm::mpi::in_place(),
                        a.as_mut_ptr() as *mut c_void,
                        a.len() as c_int,
                        T::equivalent_datatype().as_raw(),
                        self.raw_op.as_raw(),
                        world.as_raw(),
                    )
                };
                // MPI_COMM_WORLD's handler aborts on errors; a return code is a bug here.
                assert_eq!(rc, 0, "MPI_Allreduce returned {rc}");
            }
            Op::Broadcast => world.process_at_rank(0).broadcast_into(a),
            Op::AllGather => world.all_gather_into(&a[..], b.unwrap()),
            Op::ReduceScatter => world.reduce_scatter_block_into(&a[..], b.unwrap(), self.raw_op),
            Op::SendRecv => {
                let b = b.unwrap();
                let (next, prev) = (world.process_at_rank(self.next() as i32), world.process_at_rank(self.prev() as i32));
                mpi::request::scope(|s| {
                    let r = prev.immediate_receive_into(s, b);
                    let w = next.immediate_send(s, &a[..]);
                    w.wait();
                    r.wait();
                });
            }
        }
    }

    pub(super) fn sync(&self) {
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
    }

    /// `iters` fabbrica operations between barriers: this rank's elapsed time.
    pub(super) fn time_fab(&self, bufs: &Bufs, iters: usize) -> fabbrica_comm::Result<Duration> {
        self.sync();
        self.comm.barrier()?;
        let t0 = Instant::now();
        for _ in 0..iters {
            self.fab(bufs)?;
        }
        self.sync();
        let t = t0.elapsed();
        self.comm.barrier()?;
        Ok(t)
    }

    pub(super) fn time_raw(&self, world: &SimpleCommunicator, bufs: &Bufs, iters: usize) -> Duration {
        world.barrier();
        let t0 = Instant::now();
        for _ in 0..iters {
            self.raw(world, bufs);
        }
        let t = t0.elapsed();
        world.barrier();
        t
    }

    pub(super) fn measure(&self, iters: usize, warmup: usize, rounds: usize, raw_first: bool) -> fabbrica_comm::Result<Measured> {
        let bufs = self.alloc();
        // Correctness, on fresh inputs.
        self.fill(&bufs);
        self.fab(&bufs)?;
        self.sync();
        if self.corrupt {
            let _ = bufs.b.as_ref().unwrap_or(&bufs.a).narrow(0, 0, 1).fill_(-7.0);
        }
        let fab_ok = self.check(&bufs);
        let mut raw_ok = true;
        if let Some(w) = self.raw {
            self.fill(&bufs);
            self.raw(w, &bufs);
            raw_ok = self.check(&bufs);
        }
        // Warm-up, then the timed blocks (values keep changing; only their time matters now).
        for _ in 0..warmup {
            self.fab(&bufs)?;
        }
        self.sync();
        if let Some(w) = self.raw {
            for _ in 0..warmup {
                self.raw(w, &bufs);
            }
        }
        // Timed rounds: fabbrica and raw blocks alternate (and which goes first alternates too),
        // so that drift on a shared machine hits both. Each round's time is the slowest rank's.
        let mut fab_times = Vec::with_capacity(rounds);
        let mut raw_times = Vec::with_capacity(rounds);
        for round in 0..rounds {
            let (f, r) = match self.raw {
                Some(w) if (round % 2 == 1) != raw_first => {
                    let r = self.time_raw(w, &bufs, iters);
                    (self.time_fab(&bufs, iters)?, Some(r))
                }
                Some(w) => {
                    let f = self.time_fab(&bufs, iters)?;
                    (f, Some(self.time_raw(w, &bufs, iters)))
                }
                None => (self.time_fab(&bufs, iters)?, None),
            };
            let mut v = [f.as_nanos() as i64, r.map(|t| t.as_nanos() as i64).unwrap_or(0)];
            let t = Tensor::from_slice(&v);
            self.comm.all_reduce(&t, ReduceOp::Max)?;
            t.copy_data(&mut v, 2);
            fab_times.push(v[0]);
            raw_times.push(v[1]);
        }
        // Whether any rank saw a wrong result.
        let mut bad = [(!fab_ok) as i64, (!raw_ok) as i64];
        let t = Tensor::from_slice(&bad);
        self.comm.all_reduce(&t, ReduceOp::Max)?;
        t.copy_data(&mut bad, 2);
        let per_op = |ns: i64| Duration::from_nanos((ns as u64).div_ceil(iters as u64));
        Ok(Measured { time: per_op(median(&mut fab_times)), raw_time: self.raw.map(|_| per_op(median(&mut raw_times))), ok: bad == [0, 0] })
    }
}

/// The median (the lower middle one for an even count).
pub(super) fn median(v: &mut [i64]) -> i64 {
    v.sort_unstable();
    v[(v.len() - 1) / 2]
}

/// # Safety
/// `t` is a contiguous CPU tensor whose element width is `size_of::<T>()`, alive and not
/// otherwise accessed while the slice is used.
// A tch `Tensor` is a shared handle to memory that libtorch itself mutates through `&Tensor`
// (every in-place op takes `&self` in spirit); the caller guarantees no other view is alive.
#[allow(clippy::mut_from_ref)]
pub(super) unsafe fn view<T>(t: &Tensor) -> &mut [T] {
    debug_assert!(t.device() == Device::Cpu && t.is_contiguous());
    debug_assert_eq!(t.kind().elt_size_in_bytes(), std::mem::size_of::<T>());
    std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, t.numel())
}

/// An MPI reduction handle (built-in or user), usable with rsmpi's safe collectives.
pub(super) struct RawOp(pub(super) mpi::ffi::MPI_Op);

// SAFETY: `AsRaw` asks for a valid handle: `RawOp` is only built (bench_collectives/mod.rs) from
// MPI_SUM or from the `UnsafeUserOperation` that `bench` keeps alive until after every use.
unsafe impl AsRaw for RawOp {
    type Raw = mpi::ffi::MPI_Op;
    fn as_raw(&self) -> Self::Raw {
        self.0
    }
}

impl Operation for RawOp {}
