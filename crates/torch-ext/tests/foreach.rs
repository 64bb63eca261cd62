//! The `_foreach_*` shims against the per-tensor ops they replace (on the CPU libtorch runs the
//! per-tensor loop, so results are bit-identical there; on CUDA one kernel serves the list).

use fabbrica_torch_ext::{foreach_add_, foreach_mul_, foreach_norm, foreach_zero_};
use tch::{Device, Kind, Tensor};

fn tensors() -> Vec<Tensor> {
    tch::manual_seed(11);
    vec![
        Tensor::randn([64, 33], (Kind::Float, Device::Cpu)),
        Tensor::randn([7], (Kind::Float, Device::Cpu)),
        Tensor::randn([3, 4, 5], (Kind::Float, Device::Cpu)).transpose(0, 2), // not contiguous
        Tensor::zeros([0], (Kind::Float, Device::Cpu)),
    ]
}

#[test]
fn foreach_norm_is_each_tensors_l2_norm() {
    let ts = tensors();
    let norms = foreach_norm(&ts).unwrap();
    assert_eq!(norms.len(), ts.len());
    for (t, n) in ts.iter().zip(&norms) {
        assert_eq!(n.dim(), 0);
        assert_eq!(n.double_value(&[]), t.norm().double_value(&[]));
    }
    assert_eq!(norms[3].double_value(&[]), 0.0);
    assert!(foreach_norm(&[]).unwrap().is_empty());
    // The results are owned tensors: they outlive the inputs.
    drop(ts);
    assert!(norms[0].double_value(&[]) > 1.0);
}

#[test]
fn foreach_mul_and_add_change_every_tensor_in_place() {
    let ts = tensors();
    let before: Vec<Tensor> = ts.iter().map(|t| t.copy()).collect();
    let views: Vec<Tensor> = ts.iter().map(|t| t.shallow_clone()).collect();
    foreach_mul_(&views, &Tensor::from(0.25f32)).unwrap();
    for (t, b) in ts.iter().zip(&before) {
        assert!(t.equal(&(b * 0.25)));
    }
    foreach_add_(&views, 1.5).unwrap();
    for (t, b) in ts.iter().zip(&before) {
        assert!(t.equal(&(b * 0.25 + 1.5)));
    }
    // Zeroing clears NaN and Inf too (multiplying by 0 would keep them).
    let _ = ts[1].shallow_clone().fill_(f64::NAN);
    foreach_zero_(&views).unwrap();
    assert!(ts.iter().all(|t| t.abs().sum(Kind::Float).double_value(&[]) == 0.0));
    foreach_zero_(&[]).unwrap();
    foreach_mul_(&[], &Tensor::from(2f32)).unwrap();
    foreach_add_(&[], 1.0).unwrap();
}

#[test]
fn foreach_refusals_are_libtorch_messages_not_crashes() {
    let ints = [Tensor::ones([3], (Kind::Int64, Device::Cpu))];
    let e = foreach_norm(&ints).unwrap_err();
    assert!(!e.is_empty() && e.lines().count() == 1, "{e}");
    let e = foreach_mul_(&tensors(), &Tensor::ones([2], (Kind::Float, Device::Cpu))).unwrap_err();
    assert!(!e.is_empty(), "{e}");
}
