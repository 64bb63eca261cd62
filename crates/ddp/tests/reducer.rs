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
