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
//! - **bf16 reduction:** a bucket is copied into a bf16 twin, reduced, and copied back.
//! - **ZeRO-1:** buckets are padded to a multiple of the dp size and split into dp contiguous
//!   shards. Gradients are reduce-scattered, each rank's optimizer updates only its shard (its
//!   moments exist only for the shard), and the updated shards are all-gathered straight into
//!   the parameters, which are views of flat per-bucket parameter storage.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fabbrica_comm::{CommError, Communicator, ReduceOp, Work};
use fabbrica_torch_ext::hooks::{register_grad_ready_hook, set_grad, GradReadyHook};
use tch::{Kind, Tensor};

use crate::buckets::{assign_buckets, BucketAssignment, BucketCaps, ParamSpec};
use crate::error::{DdpError, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdpOptions {
    /// Bucket cap in MiB (`parallel.bucket_mb`).
    pub bucket_mb: f64,
    /// Cap of the first bucket in MiB: small, so the first all-reduce starts early in backward.
    pub first_bucket_mb: f64,
    /// Reduce in bf16 (`parallel.reduce_dtype = bf16`).
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

/// A tensor the optimizer updates, with its gradient and (under ZeRO-1) the state tensors the
/// reducer owns. Without ZeRO-1 these are whole parameters and the optimizer makes its own state.
pub struct OptParam {
    pub name: String,
    pub param: Tensor,
    pub grad: Tensor,
    /// nanoGPT's rule: tensors of 2+ dimensions are weight-decayed.
    pub decay: bool,
    pub exp_avg: Option<Tensor>,
    pub exp_avg_sq: Option<Tensor>,
}

struct Buf {
    grad: Tensor,
    /// bf16 twin of `grad` for reduction.
    stage: Option<Tensor>,
    /// ZeRO-1: flat parameter storage (parameters are views of it) and the optimizer moments of
    /// this rank's shard.
    param: Option<Tensor>,
    exp_avg: Option<Tensor>,
    exp_avg_sq: Option<Tensor>,
    /// Elements including ZeRO-1 padding, and the shard length.
    padded: usize,
    shard: usize,
}

struct State {
    bufs: Vec<Buf>,
    armed: bool,
    pending: Vec<usize>,
    ready: Vec<bool>,
    next: usize,
    works: Vec<(usize, Work)>,
    error: Option<CommError>,
    /// Buckets launched since `apply` (what the tests count).
    launched: u64,
    /// Runtime switches (benchmarks flip them between steps): start from `DdpOptions`.
    overlap: bool,
    grad_comm: bool,
}

struct Shared {
    comm: Arc<dyn Communicator>,
    /// Bucket of each parameter.
    bucket_of: Vec<usize>,
    /// Parameters per bucket.
    counts: Vec<usize>,
    opts: DdpOptions,
    state: Mutex<State>,
}

impl Shared {
    fn on_ready(&self, param: usize) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !st.armed {
            return;
        }
        let b = self.bucket_of[param];
        st.pending[b] = st.pending[b].saturating_sub(1);
        if st.pending[b] == 0 {
            st.ready[b] = true;
        }
        // Launch in bucket order only, so every rank issues the same sequence of collectives.
        while st.next < st.ready.len() && st.ready[st.next] {
            let n = st.next;
            self.launch(&mut st, n);
            st.next += 1;
        }
    }

    fn launch(&self, st: &mut State, b: usize) {
        let (r, n) = (self.comm.rank() as i64, self.comm.size());
        let buf = &st.bufs[b];
        let src = match &buf.stage {
            Some(stage) => {
                tch::no_grad(|| stage.shallow_clone().copy_(&buf.grad));
                stage.shallow_clone()
            }
            None => buf.grad.shallow_clone(),
        };
        let res = if self.opts.zero1 && n > 1 {
            let out = src.narrow(0, r * buf.shard as i64, buf.shard as i64);
            self.comm.reduce_scatter_async(&out, &src, ReduceOp::Avg)
        } else {
            self.comm.all_reduce_async(&src, ReduceOp::Avg)
        };
        st.launched += 1;
        match res {
            Ok(w) => st.works.push((b, w)),
            Err(e) => {
                st.error.get_or_insert(e);
            }
        }
    }
}

pub struct Ddp {
    shared: Arc<Shared>,
    params: Vec<(String, Tensor)>,
    assignment: BucketAssignment,
    _hooks: Vec<GradReadyHook>,
}

fn comm_err(e: CommError) -> DdpError {
    DdpError::Comm(e.to_string())
}

impl Ddp {
    /// Applies data parallelism over `comm` (the data-parallel group) to `params` (registration
    /// order, as the model lists them).
    pub fn apply(params: &[(String, Tensor)], comm: Arc<dyn Communicator>, opts: DdpOptions) -> Result<Ddp> {
        let n = comm.size();
        let params: Vec<(String, Tensor)> = params.iter().map(|(k, p)| (k.clone(), p.shallow_clone())).collect();
        // Same weights everywhere: rank 0's.
        for (_, p) in &params {
            comm.broadcast(&p.detach(), 0).map_err(comm_err)?;
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

        let mut bufs = Vec::with_capacity(assignment.buckets.len());
        let mut bucket_of = vec![0; params.len()];
        let r = comm.rank();
        for (bi, b) in assignment.buckets.iter().enumerate() {
            let first = &params[b.entries[0].param].1;
            let (kind, dev) = (first.kind(), first.device());
            let padded = if opts.zero1 { b.numel.div_ceil(n) * n } else { b.numel };
            let shard = padded / n;
            let grad = Tensor::zeros([padded as i64], (kind, dev));
            let stage = opts.reduce_bf16.then(|| Tensor::zeros([padded as i64], (Kind::BFloat16, dev)));
            let mut buf = Buf { grad, stage, param: None, exp_avg: None, exp_avg_sq: None, padded, shard };
            if opts.zero1 {
                let flat = Tensor::zeros([padded as i64], (kind, dev));
                tch::no_grad(|| -> Result<()> {
                    for e in &b.entries {
                        let p = &params[e.param].1;
                        let view = flat.narrow(0, e.offset as i64, e.numel as i64).view(p.size().as_slice());
                        view.shallow_clone().copy_(p);
                        p.shallow_clone().f_set_data(&view).map_err(|x| DdpError::Torch(x.to_string()))?;
                    }
                    Ok(())
                })?;
                buf.param = Some(flat);
                buf.exp_avg = Some(Tensor::zeros([shard as i64], (kind, dev)));
                buf.exp_avg_sq = Some(Tensor::zeros([shard as i64], (kind, dev)));
            }
            for e in &b.entries {
                let p = &params[e.param].1;
                let view = buf.grad.narrow(0, e.offset as i64, e.numel as i64).view(p.size().as_slice());
                set_grad(p, Some(&view)).map_err(|x| DdpError::Torch(x.to_string()))?;
                bucket_of[e.param] = bi;
            }
            let _ = r;
            bufs.push(buf);
        }
        let counts: Vec<usize> = assignment.buckets.iter().map(|b| b.entries.len()).collect();
        let nb = counts.len();
        let shared = Arc::new(Shared {
            comm,
            bucket_of,
            counts: counts.clone(),
            opts,
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
        {
            for (i, (_, p)) in params.iter().enumerate() {
                let s = shared.clone();
                hooks.push(register_grad_ready_hook(p, i, move |i| s.on_ready(i)).map_err(|x| DdpError::Torch(x.to_string()))?);
            }
        }
        Ok(Ddp { shared, params, assignment, _hooks: hooks })
    }

    /// Bucket collectives launched so far (one per bucket per optimizer step when communicating).
    pub fn launched(&self) -> u64 {
        self.shared.state.lock().unwrap().launched
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
        let mut st = self.shared.state.lock().unwrap();
        st.overlap = overlap;
        st.grad_comm = grad_comm;
    }

    /// Call before each micro-step's backward; `last` arms communication for the final one.
    pub fn begin_micro_step(&self, last: bool) {
        let mut st = self.shared.state.lock().unwrap();
        st.armed = last && st.grad_comm && st.overlap;
        st.pending = self.shared.counts.clone();
        st.ready.iter_mut().for_each(|r| *r = false);
        st.next = 0;
    }

    /// After the last micro-step's backward: launches what backward did not (every bucket when
    /// overlap is off) and waits for all of them. Returns the time spent waiting.
    pub fn finish(&self) -> Result<Duration> {
        let t = Instant::now();
        let mut st = self.shared.state.lock().unwrap();
        if !st.grad_comm {
            st.armed = false;
            return Ok(Duration::ZERO);
        }
        while st.next < st.ready.len() {
            let n = st.next;
            self.shared.launch(&mut st, n);
            st.next += 1;
        }
        st.armed = false;
        let works = std::mem::take(&mut st.works);
        let mut first_err = st.error.take();
        let (r, zero1) = (self.shared.comm.rank() as i64, self.shared.opts.zero1 && self.shared.comm.size() > 1);
        for (b, w) in works {
            match w.wait() {
                Ok(()) => {
                    let buf = &st.bufs[b];
                    if let Some(stage) = &buf.stage {
                        tch::no_grad(|| {
                            if zero1 {
                                let (o, l) = (r * buf.shard as i64, buf.shard as i64);
                                buf.grad.narrow(0, o, l).copy_(&stage.narrow(0, o, l));
                            } else {
                                buf.grad.shallow_clone().copy_(stage);
                            }
                        });
                    }
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(comm_err(e)),
            None => Ok(t.elapsed()),
        }
    }

    /// Zeroes every bucket in place (the parameters' `.grad` stay views of them).
    pub fn zero_grad(&self) {
        let st = self.shared.state.lock().unwrap();
        tch::no_grad(|| {
            for b in &st.bufs {
                let _ = b.grad.shallow_clone().zero_();
            }
        });
    }

    /// What the optimizer updates: whole parameters, or under ZeRO-1 the pieces of parameters
    /// inside this rank's shard of each bucket (with the moments this reducer owns).
    pub fn optimizer_params(&self) -> Vec<OptParam> {
        let st = self.shared.state.lock().unwrap();
        let zero1 = self.shared.opts.zero1;
        let (r, n) = (self.shared.comm.rank(), self.shared.comm.size());
        if !zero1 {
            return self
                .params
                .iter()
                .map(|(name, p)| OptParam {
                    name: name.clone(),
                    param: p.shallow_clone(),
                    grad: p.grad(),
                    decay: p.dim() >= 2,
                    exp_avg: None,
                    exp_avg_sq: None,
                })
                .collect();
        }
        let _ = n;
        let mut out = Vec::new();
        for (b, buf) in self.assignment.buckets.iter().zip(&st.bufs) {
            let (lo, hi) = (r * buf.shard, (r + 1) * buf.shard);
            let flat = buf.param.as_ref().expect("zero1 buffers");
            for e in &b.entries {
                let (a, z) = (e.offset.max(lo), (e.offset + e.numel).min(hi));
                if a >= z {
                    continue;
                }
                let (name, p) = &self.params[e.param];
                let len = (z - a) as i64;
                let s = (a - lo) as i64;
                out.push(OptParam {
                    name: format!("{name}[{}..{}]", a - e.offset, z - e.offset),
                    param: flat.narrow(0, a as i64, len),
                    grad: buf.grad.narrow(0, a as i64, len),
                    decay: p.dim() >= 2,
                    exp_avg: Some(buf.exp_avg.as_ref().unwrap().narrow(0, s, len)),
                    exp_avg_sq: Some(buf.exp_avg_sq.as_ref().unwrap().narrow(0, s, len)),
                });
            }
        }
        out
    }

    /// Global gradient L2 norm, then clipping to `max_norm` (0 = no clip), as
    /// `torch.nn.utils.clip_grad_norm_`. Under ZeRO-1 each rank holds only its shard of the
    /// reduced gradients, so the squares are summed across ranks.
    pub fn clip_grad_norm(&self, max_norm: f64) -> Result<Tensor> {
        let total = self.grad_sq_sum()?.sqrt();
        if max_norm > 0.0 {
            self.scale_grads(&clip_coef(&total, max_norm));
        }
        Ok(total)
    }

    /// The sum of the squares of this replica's reduced gradients (a device scalar, fp32): the
    /// whole parameter list's, summed across the data-parallel ranks' shards under ZeRO-1 (a
    /// collective then). Gradient clipping over several groups (pipeline stages, model chunks)
    /// adds these up before taking the root.
    pub fn grad_sq_sum(&self) -> Result<Tensor> {
        let st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let zero1 = self.shared.opts.zero1 && self.shared.comm.size() > 1;
        let sum_across = zero1 && st.grad_comm;
        tch::no_grad(|| {
            let sq: Vec<Tensor> = self.grads(&st).iter().map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float)).collect();
            let mut total_sq = Tensor::stack(&sq, 0).sum(Kind::Float);
            if sum_across {
                total_sq = total_sq.reshape([1]);
                self.shared.comm.all_reduce(&total_sq, ReduceOp::Sum).map_err(comm_err)?;
                total_sq = total_sq.reshape([]);
            }
            Ok(total_sq)
        })
    }

    /// Multiplies the reduced gradients this rank holds (its shards under ZeRO-1) by `coef`.
    pub fn scale_grads(&self, coef: &Tensor) {
        let st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        tch::no_grad(|| {
            for mut g in self.grads(&st) {
                let _ = g.g_mul_(coef);
            }
        });
    }

    /// The reduced gradients this rank holds: every parameter's, or under ZeRO-1 its shards.
    fn grads(&self, st: &State) -> Vec<Tensor> {
        if self.shared.opts.zero1 && self.shared.comm.size() > 1 {
            let r = self.shared.comm.rank() as i64;
            st.bufs.iter().map(|b| b.grad.narrow(0, r * b.shard as i64, b.shard as i64)).collect()
        } else {
            self.params.iter().map(|(_, p)| p.grad()).collect()
        }
    }

    /// After the optimizer step. ZeRO-1: gathers every rank's updated shard into the parameters.
    pub fn after_step(&self) -> Result<()> {
        if !(self.shared.opts.zero1 && self.shared.comm.size() > 1) {
            return Ok(());
        }
        let st = self.shared.state.lock().unwrap();
        if !st.grad_comm {
            return Ok(());
        }
        let r = self.shared.comm.rank() as i64;
        let works = st
            .bufs
            .iter()
            .map(|b| {
                let flat = b.param.as_ref().expect("zero1 buffers");
                self.shared.comm.all_gather_async(flat, &flat.narrow(0, r * b.shard as i64, b.shard as i64))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(comm_err)?;
        for w in works {
            w.wait().map_err(comm_err)?;
        }
        Ok(())
    }

    /// ZeRO-1: the whole optimizer state (`<param>.exp_avg`, `<param>.exp_avg_sq`, `<param>.step`),
    /// gathered from every rank's shard, in the format of the unsharded optimizer, so that a
    /// checkpoint loads with or without ZeRO-1 and at any dp size.
    pub fn gather_state(&self, steps_taken: u64) -> Result<Vec<(String, Tensor)>> {
        let st = self.shared.state.lock().unwrap();
        let r = self.shared.comm.rank() as i64;
        let mut out = Vec::new();
        for (b, buf) in self.assignment.buckets.iter().zip(&st.bufs) {
            let mut full = Vec::new();
            for (suffix, shard) in [("exp_avg", &buf.exp_avg), ("exp_avg_sq", &buf.exp_avg_sq)] {
                let shard = shard.as_ref().expect("zero1 buffers");
                let all = Tensor::zeros([buf.padded as i64], (shard.kind(), shard.device()));
                self.shared.comm.all_gather(&all, shard).map_err(comm_err)?;
                full.push((suffix, all));
            }
            let _ = r;
            for e in &b.entries {
                let (name, p) = &self.params[e.param];
                for (suffix, all) in &full {
                    out.push((format!("{name}.{suffix}"), all.narrow(0, e.offset as i64, e.numel as i64).view(p.size().as_slice())));
                }
                out.push((format!("{name}.step"), Tensor::from(steps_taken as f32).to_device(p.device())));
            }
        }
        Ok(out)
    }

    /// ZeRO-1: loads this rank's shard from a whole optimizer state (see `gather_state`).
    pub fn scatter_state(&self, tensors: &[(String, Tensor)]) -> std::result::Result<(), String> {
        let map: std::collections::HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let st = self.shared.state.lock().unwrap();
        let r = self.shared.comm.rank();
        tch::no_grad(|| {
            for (b, buf) in self.assignment.buckets.iter().zip(&st.bufs) {
                let (lo, hi) = (r * buf.shard, (r + 1) * buf.shard);
                for e in &b.entries {
                    let (a, z) = (e.offset.max(lo), (e.offset + e.numel).min(hi));
                    let (name, p) = &self.params[e.param];
                    for (suffix, shard) in [("exp_avg", &buf.exp_avg), ("exp_avg_sq", &buf.exp_avg_sq)] {
                        let key = format!("{name}.{suffix}");
                        let t = map.get(key.as_str()).ok_or_else(|| format!("optimizer state has no tensor '{key}'"))?;
                        if t.size() != p.size() {
                            return Err(format!("optimizer tensor '{key}' has shape {:?}, expected {:?}", t.size(), p.size()));
                        }
                        if a < z {
                            let src = t.reshape([-1]).narrow(0, (a - e.offset) as i64, (z - a) as i64);
                            shard.as_ref().unwrap().narrow(0, (a - lo) as i64, (z - a) as i64).copy_(&src.to_device(p.device()));
                        }
                    }
                }
            }
            Ok(())
        })
    }
}

/// `torch.nn.utils.clip_grad_norm_`'s coefficient: `max_norm / (norm + 1e-6)`, at most 1.
pub fn clip_coef(total_norm: &Tensor, max_norm: f64) -> Tensor {
    (max_norm / (total_norm + 1e-6)).clamp_max(1.0)
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
    let sum: f64 = tch::no_grad(|| params.iter().map(|(_, p)| p.to_kind(Kind::Double).abs().sum(Kind::Double).double_value(&[])).sum());
    let n = comm.size();
    let all = Tensor::zeros([n as i64], (Kind::Float, tch::Device::Cpu));
    let mine = Tensor::from_slice(&[sum as f32]);
    comm.all_gather(&all, &mine).map_err(comm_err)?;
    let v: Vec<f32> = Vec::try_from(all).map_err(|e: tch::TchError| DdpError::Torch(e.to_string()))?;
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
