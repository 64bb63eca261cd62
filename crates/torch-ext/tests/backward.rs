//! `backward_with_grad`: backward seeded with a gradient, as a pipeline stage runs it on its
//! output with the gradient its next stage sent back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use fabbrica_torch_ext::backward_with_grad;
use fabbrica_torch_ext::hooks::register_grad_ready_hook;
use tch::{Device, Kind, Tensor};

fn stage(w: &Tensor, b: &Tensor, x: &Tensor) -> Tensor {
    x.linear(w, Some(b)).tanh()
}

#[test]
fn equals_the_vector_jacobian_product_and_accumulates() {
    tch::manual_seed(3);
    let opts = (Kind::Float, Device::Cpu);
    let (w, b) = (Tensor::randn([5, 4], opts).set_requires_grad(true), Tensor::randn([5], opts).set_requires_grad(true));
    let x = Tensor::randn([3, 4], opts).set_requires_grad(true);
    let g = Tensor::randn([3, 5], opts);
    // Reference: d(sum(out * g))/dθ on independent copies.
    let (w2, b2, x2) =
        (w.detach().copy().set_requires_grad(true), b.detach().copy().set_requires_grad(true), x.detach().copy().set_requires_grad(true));
    (stage(&w2, &b2, &x2) * &g).sum(Kind::Float).backward();

    backward_with_grad(&stage(&w, &b, &x), &g).unwrap();
    for (got, want, what) in [(&w, &w2, "weight"), (&b, &b2, "bias"), (&x, &x2, "input")] {
        let d = (got.grad() - want.grad()).abs().max().double_value(&[]);
        assert!(d < 1e-6, "{what}: {d}");
    }
    // A second call accumulates, as backward() does.
    backward_with_grad(&stage(&w, &b, &x), &g).unwrap();
    let d = (w.grad() - w2.grad() * 2.0).abs().max().double_value(&[]);
    assert!(d < 1e-5, "accumulated: {d}");
}

#[test]
fn fires_grad_ready_hooks() {
    let opts = (Kind::Float, Device::Cpu);
    let w = Tensor::randn([2, 2], opts).set_requires_grad(true);
    let fired = Arc::new(AtomicUsize::new(0));
    let f = fired.clone();
    let _hook = register_grad_ready_hook(&w, 0, move |_| {
        f.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();
    let out = Tensor::ones([3, 2], opts).linear::<Tensor>(&w, None);
    backward_with_grad(&out, &Tensor::ones([3, 2], opts)).unwrap();
    assert_eq!(fired.load(Ordering::SeqCst), 1);
}

#[test]
fn refuses_a_gradient_of_another_shape_with_libtorchs_message() {
    let opts = (Kind::Float, Device::Cpu);
    let w = Tensor::randn([2, 2], opts).set_requires_grad(true);
    let out = Tensor::ones([3, 2], opts).linear::<Tensor>(&w, None);
    let e = backward_with_grad(&out, &Tensor::ones([4, 2], opts)).unwrap_err();
    assert!(e.contains("shape") || e.contains("size"), "{e}");
    assert!(!e.contains('\n'));
    // A tensor that does not require grad is refused, not ignored.
    let e = backward_with_grad(&Tensor::ones([2], opts), &Tensor::ones([2], opts)).unwrap_err();
    assert!(!e.is_empty());
}
