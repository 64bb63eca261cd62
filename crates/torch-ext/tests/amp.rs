//! bf16 autocast on the CPU and CUDA's autocast dtype (checked without a GPU).

use fabbrica_torch_ext::amp::{autocast, autocast_state};
use tch::{Device, Kind, Tensor};

#[test]
fn cpu_autocast_runs_matmuls_in_bf16_and_keeps_norms_and_the_residual_in_fp32() {
    let x = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
    let w = Tensor::randn([16, 8], (Kind::Float, Device::Cpu));
    let (y, normed, sum) = autocast(Device::Cpu, true, || {
        let y = x.linear::<Tensor>(&w, None);
        let normed = x.layer_norm([8], None::<Tensor>, None::<Tensor>, 1e-5, false);
        // bf16 + fp32 promotes to fp32: the residual stream stays fp32.
        let sum = &y.narrow(1, 0, 8) + &x;
        (y, normed, sum)
    });
    assert_eq!(y.kind(), Kind::BFloat16);
    assert_eq!(normed.kind(), Kind::Float);
    assert_eq!(sum.kind(), Kind::Float);
    // Off again afterwards, and a disabled region changes nothing.
    assert!(!autocast_state(Device::Cpu).0);
    assert_eq!(x.linear::<Tensor>(&w, None).kind(), Kind::Float);
    assert_eq!(autocast(Device::Cpu, false, || x.linear::<Tensor>(&w, None)).kind(), Kind::Float);
}

#[test]
fn cuda_autocast_is_bf16_where_tch_would_turn_on_fp16() {
    // libtorch's default CUDA autocast dtype is float16, and `tch::autocast` only flips the
    // enabled flag (on a machine with a GPU), so it would run fp16 autocast without loss scaling.
    assert_eq!(autocast_state(Device::Cuda(0)), (false, Kind::Half));
    let ours = autocast(Device::Cuda(0), true, || autocast_state(Device::Cuda(0)));
    assert_eq!(ours, (true, Kind::BFloat16));
    // Nested regions restore the outer state, and the dtype is restored on leaving.
    let inner_then_outer = autocast(Device::Cuda(0), true, || {
        autocast(Device::Cuda(0), true, || ());
        autocast_state(Device::Cuda(0))
    });
    assert_eq!(inner_then_outer, (true, Kind::BFloat16));
    assert_eq!(autocast_state(Device::Cuda(0)), (false, Kind::Half));
}

#[test]
fn a_panic_inside_autocast_leaves_it_off() {
    let r = std::panic::catch_unwind(|| autocast(Device::Cpu, true, || panic!("inside")));
    assert!(r.is_err());
    assert!(!autocast_state(Device::Cpu).0);
}
