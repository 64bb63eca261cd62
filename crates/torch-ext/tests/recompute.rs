//! `recompute`: a region recomputed in backward gives the gradients of running it directly,
//! with the same dropout masks, and fires each parameter's grad-ready hook once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use fabbrica_torch_ext::hooks::register_grad_ready_hook;
use fabbrica_torch_ext::recompute::recompute;
use tch::{Device, Kind, Tensor};

fn region(w: &Tensor, x: &Tensor, p: f64) -> Tensor {
    x.linear(w, None::<&Tensor>).gelu("none").dropout(p, true) * 2.0
}

/// libtorch's RNG is process-global and tests run on parallel threads: each test holds this lock,
/// so that another test's seeding cannot land between its seed and its draws.
fn rng_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn leaf(t: &Tensor) -> Tensor {
    t.detach().copy().set_requires_grad(true)
}

#[test]
fn gradients_equal_the_direct_run_with_the_same_dropout_masks() {
    let _rng = rng_lock();
    let opts = (Kind::Float, Device::Cpu);
    tch::manual_seed(1);
    let (w0, x0) = (Tensor::randn([6, 5], opts), Tensor::randn([4, 5], opts));
    let g = Tensor::randn([4, 6], opts);
    for p in [0.0, 0.5] {
        // Direct.
        let (w, x) = (leaf(&w0), leaf(&x0));
        tch::manual_seed(7);
        let direct = region(&w, &x, p);
        let after_direct = Tensor::rand([3], opts);
        (&direct * &g).sum(Kind::Float).backward();
        // Recomputed: same seed, so the forward draws the same mask; backward must draw it again.
        let (w2, x2) = (leaf(&w0), leaf(&x0));
        tch::manual_seed(7);
        let wc = w2.shallow_clone();
        let out = recompute(&[&x2], move |ins| vec![region(&wc, &ins[0], p)]).unwrap();
        // The RNG stream continues as if nothing were recomputed.
        let after_recompute = Tensor::rand([3], opts);
        assert!(after_direct.equal(&after_recompute), "p={p}: the recompute changed the RNG stream");
        assert!(out[0].equal(&direct), "p={p}: forward differs");
        // Draws between forward and backward must not change the recomputed mask.
        let _ = Tensor::rand([100], opts);
        (&out[0] * &g).sum(Kind::Float).backward();
        assert!(w2.grad().equal(&w.grad()), "p={p}: weight gradient differs");
        assert!(x2.grad().equal(&x.grad()), "p={p}: input gradient differs");
    }
}

#[test]
fn parameters_fire_their_hook_once_and_chained_regions_compose() {
    let _rng = rng_lock();
    let opts = (Kind::Float, Device::Cpu);
    tch::manual_seed(2);
    let w0 = Tensor::randn([5, 5], opts);
    let x0 = Tensor::randn([3, 5], opts);
    let (w, x) = (leaf(&w0), leaf(&x0));
    // Reference: two uses of w in a row.
    (region(&region(&w, &x, 0.0), &w, 0.0)).sum(Kind::Float).backward();

    let (w2, x2) = (leaf(&w0), leaf(&x0));
    let fired = Arc::new(AtomicUsize::new(0));
    let f2 = fired.clone();
    let _hook = register_grad_ready_hook(&w2, 0, move |_| {
        f2.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();
    let (wa, wb) = (w2.shallow_clone(), w2.shallow_clone());
    let h = recompute(&[&x2], move |i| vec![region(&wa, &i[0], 0.0)]).unwrap();
    let y = recompute(&[&h[0]], move |i| vec![region(&wb, &i[0], 0.0)]).unwrap();
    y[0].sum(Kind::Float).backward();
    let d = (w2.grad() - w.grad()).abs().max().double_value(&[]);
    assert!(d < 1e-6, "weight gradient differs by {d}");
    assert!(x2.grad().allclose(&x.grad(), 1e-6, 1e-6, false));
    // One backward node per region: the weight's accumulator runs once in each nested backward.
    assert_eq!(fired.load(Ordering::SeqCst), 2);
}

#[test]
fn a_panicking_region_is_an_error_not_an_abort() {
    let _rng = rng_lock();
    let x = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let e = recompute(&[&x], |_| panic!("boom")).unwrap_err();
    assert!(e.contains("boom"), "{e}");
    // Panicking only in backward: backward fails with the message.
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let out = recompute(&[&x], move |i| {
        if c.fetch_add(1, Ordering::SeqCst) == 1 {
            panic!("second call");
        }
        vec![&i[0] * 3.0]
    })
    .unwrap();
    let e = out[0].sum(Kind::Float).f_backward().unwrap_err().to_string();
    assert!(e.contains("second call"), "{e}");
}
