//! The reducer in a world of one (the multi-rank behaviour is tested end to end under mpirun in
//! crates/cli/tests/data_parallel.rs): gradients land in bucket storage, communication happens
//! only on the last micro-step, from backward's hooks when overlapping.

use std::sync::Arc;

use fabbrica_comm::{init_with, Communicator, InitOptions, LaunchEnv};
use fabbrica_ddp::{Ddp, DdpOptions};
use tch::{Device, Kind, Tensor};

fn params() -> Vec<(String, Tensor)> {
    tch::manual_seed(0);
    (0..6).map(|i| (format!("p{i}"), Tensor::randn([64, 32], (Kind::Float, Device::Cpu)).set_requires_grad(true))).collect()
}

fn loss(ps: &[(String, Tensor)], x: &Tensor) -> Tensor {
    ps.iter().fold(x.shallow_clone(), |h, (_, w)| h.matmul(&w.tr()).matmul(w).tanh()).sum(Kind::Float)
}

#[test]
fn communicates_once_per_bucket_on_the_last_micro_step_only() {
    let world = init_with(LaunchEnv::single(), InitOptions::default()).unwrap();
    let comm: Arc<dyn Communicator> = world.comm();
    let ps = params();
    // 8 KiB per parameter, 16 KiB buckets (first 8 KiB): several buckets.
    let opts = DdpOptions { bucket_mb: 16.0 / 1024.0, first_bucket_mb: 8.0 / 1024.0, ..Default::default() };
    let ddp = Ddp::apply(&ps, comm, opts).unwrap();
    let nb = ddp.assignment().buckets.len() as u64;
    assert!(nb >= 3, "{nb} buckets");
    let x = Tensor::randn([4, 32], (Kind::Float, Device::Cpu));

    // Reference gradients without DDP's storage: the same loss on detached copies.
    let copies: Vec<(String, Tensor)> = ps.iter().map(|(n, p)| (n.clone(), p.detach().copy().set_requires_grad(true))).collect();
    for _ in 0..3 {
        loss(&copies, &x).backward();
    }

    for step in 0..2u64 {
        for m in 0..3 {
            ddp.begin_micro_step(m == 2);
            loss(&ps, &x).backward();
            let expect = if m == 2 { (step + 1) * nb } else { step * nb };
            assert_eq!(ddp.launched(), expect, "step {step} micro {m}: hooks launch only on the last micro-step");
        }
        ddp.finish().unwrap();
        if step == 0 {
            for ((_, p), (_, c)) in ps.iter().zip(&copies) {
                let d = (p.grad() - c.grad()).abs().max().double_value(&[]);
                assert!(d < 1e-4, "accumulated gradient differs by {d}");
            }
        }
        ddp.zero_grad();
        assert!(ps.iter().all(|(_, p)| p.grad().abs().sum(Kind::Float).double_value(&[]) == 0.0));
    }

    // Overlap off: nothing from the hooks, everything from finish.
    ddp.set_mode(false, true);
    ddp.begin_micro_step(true);
    loss(&ps, &x).backward();
    assert_eq!(ddp.launched(), 2 * nb);
    ddp.finish().unwrap();
    assert_eq!(ddp.launched(), 3 * nb);
    // Communication off: nothing at all.
    ddp.set_mode(true, false);
    ddp.begin_micro_step(true);
    loss(&ps, &x).backward();
    ddp.finish().unwrap();
    assert_eq!(ddp.launched(), 3 * nb);
}

#[test]
fn gradients_are_views_of_bucket_storage() {
    let world = init_with(LaunchEnv::single(), InitOptions::default()).unwrap();
    let ps = params();
    let opts = DdpOptions { bucket_mb: 16.0 / 1024.0, first_bucket_mb: 8.0 / 1024.0, ..Default::default() };
    let ddp = Ddp::apply(&ps, world.comm(), opts).unwrap();
    let x = Tensor::randn([4, 32], (Kind::Float, Device::Cpu));
    ddp.begin_micro_step(true);
    loss(&ps, &x).backward();
    ddp.finish().unwrap();
    // Parameters of one bucket have gradients laid out back to back, at their assigned offsets.
    for b in &ddp.assignment().buckets {
        let base = ps[b.entries[0].param].1.grad().data_ptr() as usize - 4 * b.entries[0].offset;
        for e in &b.entries {
            assert_eq!(ps[e.param].1.grad().data_ptr() as usize, base + 4 * e.offset, "param {}", e.param);
        }
    }
}

/// ZeRO-1 hands the optimizer pieces that say where they lie in their parameter, and
/// `gather_pieces` puts per-piece tensors back together as whole parameters (a world of one:
/// every piece is a whole parameter; several ranks are tested end to end, where a ZeRO-1
/// checkpoint resumes at other dp sizes, in crates/cli/tests/data_parallel.rs).
#[test]
fn zero1_pieces_gather_back_into_whole_parameters() {
    let world = init_with(LaunchEnv::single(), InitOptions::default()).unwrap();
    let ps = params();
    let opts = DdpOptions { bucket_mb: 16.0 / 1024.0, first_bucket_mb: 8.0 / 1024.0, zero1: true, ..Default::default() };
    let ddp = Ddp::apply(&ps, world.comm(), opts).unwrap();
    let parts = ddp.optimizer_params();
    assert_eq!(parts.len(), ps.len());
    let values: std::collections::HashMap<String, Tensor> = parts
        .iter()
        .map(|o| {
            let piece = o.piece.as_ref().expect("ZeRO-1 parts are pieces");
            assert_eq!((piece.offset, piece.len, piece.shape.clone()), (0, 64 * 32, vec![64, 32]), "{}", o.name);
            assert_eq!(o.name, format!("{}[0..{}]", piece.param, piece.len));
            // A value per piece that is not the parameter itself: 2·p + 1.
            (o.name.clone(), o.param.detach() * 2 + 1)
        })
        .collect();
    let whole = ddp.gather_pieces("a test tensor", &|n| values.get(n).map(Tensor::shallow_clone)).unwrap();
    assert_eq!(whole.len(), ps.len());
    for (name, t) in &whole {
        let p = &ps.iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(t.size(), p.size(), "{name}");
        assert!(t.equal(&(p.detach() * 2 + 1)), "{name}: gathered tensor differs");
    }
    // A piece without a value names the piece.
    let e = ddp.gather_pieces("exp_avg", &|n| if n.starts_with("p3") { None } else { values.get(n).map(Tensor::shallow_clone) }).unwrap_err();
    assert!(e.to_string().contains("p3[0..2048]") && e.to_string().contains("exp_avg"), "{e}");
}

/// A communication hook decides how each bucket is reduced: a custom one's result is what the
/// gradients hold after `finish`, called once per bucket; the built-in bf16 hook leaves values
/// that bf16 can hold (a world of one, where the average is the value itself).
#[test]
fn communication_hooks_decide_how_buckets_are_reduced() {
    use fabbrica_comm::{ReduceOp, Work};
    use fabbrica_ddp::{CommHook, HookBucket, HookError};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Averages, then doubles the result, counting its calls.
    struct Doubling(AtomicUsize, AtomicUsize);
    impl CommHook for Doubling {
        fn launch(&self, comm: &dyn Communicator, b: &HookBucket) -> Result<Work, HookError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            comm.all_reduce_async(b.grad, ReduceOp::Avg).map_err(HookError::Comm)
        }
        fn complete(&self, b: &HookBucket) -> Result<(), HookError> {
            self.1.fetch_add(1, Ordering::SeqCst);
            tch::no_grad(|| b.grad.shallow_clone().f_mul_scalar_(2.0)).map(|_| ()).map_err(|e| HookError::torch("doubling", e))
        }
    }

    let world = init_with(LaunchEnv::single(), InitOptions::default()).unwrap();
    let x = Tensor::randn([4, 32], (Kind::Float, Device::Cpu));
    let opts = DdpOptions { bucket_mb: 16.0 / 1024.0, first_bucket_mb: 8.0 / 1024.0, ..Default::default() };
    let reference = |ps: &[(String, Tensor)]| -> Vec<Tensor> {
        let copies: Vec<(String, Tensor)> = ps.iter().map(|(n, p)| (n.clone(), p.detach().copy().set_requires_grad(true))).collect();
        loss(&copies, &x).backward();
        copies.iter().map(|(_, c)| c.grad()).collect()
    };

    let ps = params();
    let expect = reference(&ps);
    let hook = Arc::new(Doubling(AtomicUsize::new(0), AtomicUsize::new(0)));
    let ddp = Ddp::apply_with_hook(&ps, world.comm(), opts, hook.clone()).unwrap();
    let nb = ddp.assignment().buckets.len();
    ddp.begin_micro_step(true);
    loss(&ps, &x).backward();
    ddp.finish().unwrap();
    assert_eq!((hook.0.load(Ordering::SeqCst), hook.1.load(Ordering::SeqCst)), (nb, nb), "one launch and one completion per bucket");
    for ((name, p), e) in ps.iter().zip(&expect) {
        let d = (p.grad() - e * 2.0).abs().max().double_value(&[]);
        assert!(d < 1e-4, "{name}: the hook's doubled gradient differs by {d}");
    }

    let ps = params();
    let expect = reference(&ps);
    let ddp = Ddp::apply(&ps, world.comm(), DdpOptions { reduce_bf16: true, ..opts }).unwrap();
    ddp.begin_micro_step(true);
    loss(&ps, &x).backward();
    ddp.finish().unwrap();
    for ((name, p), e) in ps.iter().zip(&expect) {
        let g = p.grad();
        assert!(g.equal(&g.to_kind(Kind::BFloat16).to_kind(Kind::Float)), "{name}: not bf16 values");
        assert!(g.equal(&e.to_kind(Kind::BFloat16).to_kind(Kind::Float)), "{name}: not the gradient rounded to bf16");
    }
}
