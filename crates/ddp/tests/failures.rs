//! What the reducer does when a bucket's collective fails or something panics on the way (in a
//! world of one): `finish` returns an error naming the bucket, with the communicator's error as
//! its source, nothing is left poisoned, and the next step runs normally.
//!
//! The failures come from the real world-of-one communicator behind a thin wrapper that, for the
//! bucket collectives (`all_reduce_async`) chosen by a test, hands it the bucket as f64, which the
//! backend refuses (`UnsupportedDtype`), or defers that refusal to `wait` (a transfer that fails),
//! or panics (a crashing backend).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use fabbrica_comm::{init_with, Backend, CommError, Communicator, InitOptions, LaunchEnv, ReduceOp, Work, World};
use fabbrica_ddp::{Ddp, DdpOptions};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// `all_reduce_async` returns the backend's refusal.
    Refuse,
    /// `all_reduce_async` succeeds; the refusal comes out of `wait`.
    FailWait,
    /// `all_reduce_async` panics.
    Panic,
}

struct Faulty {
    inner: Arc<dyn Communicator>,
    /// The fault, and the index (among `all_reduce_async` calls since it was set) of the first
    /// faulty call; every call from there on is faulty.
    fault: Mutex<Option<(Fault, usize)>>,
    /// `all_reduce_async` calls since the fault was last set.
    calls: AtomicUsize,
}

impl Faulty {
    fn new(world: &World) -> Arc<Faulty> {
        Arc::new(Faulty { inner: world.comm(), fault: Mutex::new(None), calls: AtomicUsize::new(0) })
    }
    fn set(&self, fault: Option<(Fault, usize)>) {
        *self.fault.lock().unwrap() = fault;
        self.calls.store(0, Ordering::SeqCst);
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    /// The real backend's error for this tensor as f64.
    fn refusal(&self, t: &Tensor, op: ReduceOp) -> CommError {
        self.inner.all_reduce_async(&t.to_kind(Kind::Double), op).expect_err("the backend accepts f64")
    }
}

impl Communicator for Faulty {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn backend(&self) -> Backend {
        self.inner.backend()
    }
    fn members(&self) -> &[usize] {
        self.inner.members()
    }
    fn all_reduce_async(&self, t: &Tensor, op: ReduceOp) -> fabbrica_comm::Result<Work> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let fault = *self.fault.lock().unwrap();
        match fault {
            Some((Fault::Refuse, from)) if call >= from => Err(self.refusal(t, op)),
            Some((Fault::FailWait, from)) if call >= from => Ok(Work::done(Err(self.refusal(t, op)))),
            Some((Fault::Panic, from)) if call >= from => panic!("simulated backend crash in all_reduce #{call}"),
            _ => self.inner.all_reduce_async(t, op),
        }
    }
    fn broadcast_async(&self, t: &Tensor, root: usize) -> fabbrica_comm::Result<Work> {
        self.inner.broadcast_async(t, root)
    }
    fn all_gather_async(&self, output: &Tensor, input: &Tensor) -> fabbrica_comm::Result<Work> {
        self.inner.all_gather_async(output, input)
    }
    fn reduce_scatter_async(&self, output: &Tensor, input: &Tensor, op: ReduceOp) -> fabbrica_comm::Result<Work> {
        self.inner.reduce_scatter_async(output, input, op)
    }
    fn send_async(&self, t: &Tensor, dst: usize) -> fabbrica_comm::Result<Work> {
        self.inner.send_async(t, dst)
    }
    fn recv_async(&self, t: &Tensor, src: usize) -> fabbrica_comm::Result<Work> {
        self.inner.recv_async(t, src)
    }
    fn barrier_async(&self) -> fabbrica_comm::Result<Work> {
        self.inner.barrier_async()
    }
    fn split(&self, color: Option<u32>, key: u32, name: &str) -> fabbrica_comm::Result<Option<Arc<dyn Communicator>>> {
        self.inner.split(color, key, name)
    }
}

fn params() -> Vec<(String, Tensor)> {
    tch::manual_seed(0);
    (0..6).map(|i| (format!("p{i}"), Tensor::randn([64, 32], (Kind::Float, Device::Cpu)).set_requires_grad(true))).collect()
}

fn loss(ps: &[(String, Tensor)], x: &Tensor) -> Tensor {
    ps.iter().fold(x.shallow_clone(), |h, (_, w)| h.matmul(&w.tr()).matmul(w).tanh()).sum(Kind::Float)
}

/// 8 KiB per parameter, 16 KiB buckets (first 8 KiB): buckets (p5), (p4, p3), (p2, p1), (p0).
fn opts() -> DdpOptions {
    DdpOptions { bucket_mb: 16.0 / 1024.0, first_bucket_mb: 8.0 / 1024.0, ..Default::default() }
}

struct Setup {
    _world: World,
    comm: Arc<Faulty>,
    ps: Vec<(String, Tensor)>,
    ddp: Ddp,
    x: Tensor,
}

fn setup(opts: DdpOptions) -> Setup {
    let world = init_with(LaunchEnv::single(), InitOptions::default()).unwrap();
    let comm = Faulty::new(&world);
    let ps = params();
    let ddp = Ddp::apply(&ps, comm.clone(), opts).unwrap();
    assert_eq!(ddp.assignment().buckets.len(), 4);
    let x = Tensor::randn([4, 32], (Kind::Float, Device::Cpu));
    Setup { _world: world, comm, ps, ddp, x }
}

/// A step that must succeed, checked against the gradients of the same loss without DDP (a world
/// of one averages over one rank: the reduced gradients are the local ones).
fn clean_step(s: &Setup) {
    let launched = s.ddp.launched();
    s.ddp.zero_grad();
    s.ddp.begin_micro_step(true);
    loss(&s.ps, &s.x).f_backward().expect("backward");
    s.ddp.finish().expect("the step after a failure runs normally");
    assert_eq!(s.ddp.launched(), launched + 4, "every bucket is launched again");
    let copies: Vec<(String, Tensor)> = s.ps.iter().map(|(n, p)| (n.clone(), p.detach().copy().set_requires_grad(true))).collect();
    loss(&copies, &s.x).backward();
    for ((n, p), (_, c)) in s.ps.iter().zip(&copies) {
        let d = (p.grad() - c.grad()).abs().max().double_value(&[]);
        assert!(d < 1e-4, "{n}: gradient differs by {d}");
    }
}

/// The error is one line, and its source is the backend's refusal of the f64 bucket.
fn assert_refusal(e: &(dyn std::error::Error + 'static)) {
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    assert!(msg.contains("dtype Double is not supported"), "{msg}");
    let source = e.source().unwrap_or_else(|| panic!("no source: {msg}"));
    let comm = source.downcast_ref::<CommError>().unwrap_or_else(|| panic!("source is not the CommError: {source}"));
    assert!(matches!(comm, CommError::UnsupportedDtype { .. }), "{comm:?}");
}

#[test]
fn a_bucket_the_backend_refuses_fails_finish_naming_it_and_the_next_step_is_clean() {
    let s = setup(opts());
    // Bucket 1 (p4, p3), launched from backward's hook.
    s.comm.set(Some((Fault::Refuse, 1)));
    s.ddp.begin_micro_step(true);
    loss(&s.ps, &s.x).f_backward().expect("a failed launch is reported by finish, not by backward");
    assert_eq!(s.ddp.launched(), 1, "only bucket 0 was launched");
    assert_eq!(s.comm.calls(), 2, "nothing is launched after the first failure");
    let e = s.ddp.finish().expect_err("finish reports the refused bucket");
    assert_eq!(s.comm.calls(), 2, "finish launches nothing after a failure");
    let msg = e.to_string();
    assert!(msg.starts_with("bucket 1 of 4 (p4, p3): all-reduce could not be launched from backward"), "{msg}");
    assert_refusal(&e);

    s.comm.set(None);
    clean_step(&s);
    clean_step(&s);
}

#[test]
fn a_panic_in_the_hook_is_an_error_of_finish_not_a_poisoned_reducer() {
    let s = setup(opts());
    s.comm.set(Some((Fault::Panic, 0)));
    s.ddp.begin_micro_step(true);
    // The hook catches the panic (backward completes) and records it.
    loss(&s.ps, &s.x).f_backward().expect("the hook records the panic instead of failing backward");
    assert_eq!(s.ddp.launched(), 0);
    let e = s.ddp.finish().expect_err("finish reports the panic");
    let msg = e.to_string();
    assert!(msg.contains("bucket 0 of 4 (p5)") && msg.contains("from backward"), "{msg}");
    assert!(msg.contains("panicked: simulated backend crash in all_reduce #0"), "{msg}");
    assert_eq!(s.comm.calls(), 1, "nothing is launched after the panic");

    // Without overlap the bucket is launched from finish: a panic there is an error too.
    s.ddp.set_mode(false, true);
    s.comm.set(Some((Fault::Panic, 2)));
    s.ddp.begin_micro_step(true);
    loss(&s.ps, &s.x).f_backward().unwrap();
    let e = s.ddp.finish().expect_err("finish reports the panic");
    let msg = e.to_string();
    assert!(msg.contains("bucket 2 of 4 (p2, p1)") && msg.contains("after backward") && msg.contains("panicked"), "{msg}");

    s.comm.set(None);
    clean_step(&s);
    s.ddp.set_mode(true, true);
    clean_step(&s);
}

#[test]
fn a_collective_that_fails_in_flight_is_reported_by_finish_with_its_cause() {
    let s = setup(opts());
    s.comm.set(Some((Fault::FailWait, 2)));
    s.ddp.begin_micro_step(true);
    loss(&s.ps, &s.x).f_backward().unwrap();
    assert_eq!(s.ddp.launched(), 4, "the failure shows only when waiting");
    let e = s.ddp.finish().expect_err("finish reports the failed transfer");
    let msg = e.to_string();
    assert!(msg.starts_with("bucket 2 of 4 (p2, p1): all-reduce failed: "), "{msg}");
    assert_refusal(&e);

    s.comm.set(None);
    clean_step(&s);
}

#[test]
fn a_step_abandoned_before_finish_does_not_fail_the_next_one() {
    let s = setup(opts());
    s.comm.set(Some((Fault::Refuse, 0)));
    s.ddp.begin_micro_step(true);
    loss(&s.ps, &s.x).f_backward().unwrap();
    // The caller gives up on this step (say its own backward failed) and never calls finish.
    s.comm.set(None);
    clean_step(&s);
}

#[test]
fn gathering_pieces_without_zero1_is_an_error() {
    let s = setup(opts());
    let e = s.ddp.gather_pieces("exp_avg", &|_| None).expect_err("no pieces without ZeRO-1");
    assert!(e.to_string().contains("ZeRO-1"), "{e}");
}

#[test]
fn a_gradient_detached_from_its_bucket_is_an_error_naming_the_parameter() {
    let s = setup(opts());
    s.ddp.begin_micro_step(true);
    loss(&s.ps, &s.x).f_backward().unwrap();
    s.ddp.finish().unwrap();
    fabbrica_torch_ext::hooks::set_grad(&s.ps[3].1, None).unwrap();
    for e in [s.ddp.grad_sq_sum().map(drop).unwrap_err(), s.ddp.clip_grad_norm(1.0).map(drop).unwrap_err()] {
        let msg = e.to_string();
        assert!(msg.contains("parameter 'p3' has no gradient"), "{msg}");
    }
}
