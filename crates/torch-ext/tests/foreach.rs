//! The `_foreach_*` shims against the per-tensor ops they replace (on the CPU libtorch runs the
//! per-tensor loop, so results are bit-identical there; on CUDA one kernel serves the list).

mod common;

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
    assert!(e.contains("norm"), "{e}");
    // The coefficient must be a 0-dim tensor (one scalar for every tensor).
    let e = foreach_mul_(&tensors(), &Tensor::ones([2], (Kind::Float, Device::Cpu))).unwrap_err();
    assert!(e.contains("0 dim"), "{e}");
}

/// On CUDA the foreach ops are fused kernels (one launch per list), not the CPU's per-tensor loop:
/// they must give what the CPU gives, with the scalar on the GPU (the clip coefficient) or on the
/// CPU, and fp32 or bf16 tensors. Needs a GPU (scripts/device/check.sh runs it there).
#[test]
fn on_cuda_the_fused_kernels_give_what_the_cpu_gives() {
    if !common::cuda_or_skip("foreach on_cuda_the_fused_kernels_give_what_the_cpu_gives") {
        return;
    }
    let gpu = Device::Cuda(0);
    for kind in [Kind::Float, Kind::BFloat16] {
        let cpu: Vec<Tensor> = tensors().into_iter().map(|t| t.to_kind(kind)).collect();
        let dev: Vec<Tensor> = cpu.iter().map(|t| t.to_device(gpu)).collect();
        let (nc, nd) = (foreach_norm(&cpu).unwrap(), foreach_norm(&dev).unwrap());
        for (c, d) in nc.iter().zip(&nd) {
            assert_eq!(d.device(), gpu);
            let (c, d) = (c.to_kind(Kind::Double).double_value(&[]), d.to_kind(Kind::Double).double_value(&[]));
            let tol = if kind == Kind::Float { 1e-5 } else { 1e-2 };
            assert!((c - d).abs() <= tol * c.abs().max(1e-12), "{kind:?}: norm {d} on CUDA, {c} on the CPU");
        }
        for scalar in [Tensor::from(0.5f32).to_device(gpu), Tensor::from(0.5f32)] {
            let views: Vec<Tensor> = dev.iter().map(|t| t.copy()).collect();
            foreach_mul_(&views, &scalar).unwrap();
            foreach_add_(&views, 2.0).unwrap();
            for (v, c) in views.iter().zip(&cpu) {
                assert!(v.to_device(Device::Cpu).equal(&(c * 0.5 + 2.0)), "{kind:?}, scalar on {:?}", scalar.device());
            }
            let _ = views[1].shallow_clone().fill_(f64::NAN);
            foreach_zero_(&views).unwrap();
            assert!(views.iter().all(|v| v.to_kind(Kind::Float).abs().sum(Kind::Float).double_value(&[]) == 0.0));
        }
    }
}
