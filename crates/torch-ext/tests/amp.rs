//! bf16 autocast on the CPU and CUDA's autocast dtype (checked without a GPU), and the counting
//! CPU allocator. One test function for the allocator: it counts the whole process.

use fabbrica_torch_ext::amp::{autocast, autocast_state, count_cpu_allocations, cpu_allocated_bytes, cpu_peak_allocated_bytes, reset_cpu_peak};
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

#[test]
fn the_counting_allocator_counts_live_cpu_tensors_and_their_peak() {
    let before_install = Tensor::zeros([1024], (Kind::Float, Device::Cpu));
    count_cpu_allocations();
    count_cpu_allocations(); // a second call changes nothing
    let base = cpu_allocated_bytes();
    let a = Tensor::zeros([1 << 20], (Kind::Float, Device::Cpu));
    // Other tests of this binary may allocate concurrently: compare with slack far below 4 MiB.
    let grown = cpu_allocated_bytes() as i64 - base as i64;
    assert!((grown - (4 << 20)).abs() < (1 << 20), "a 4 MiB tensor counted as {grown} bytes");
    let b = Tensor::zeros([1 << 19], (Kind::BFloat16, Device::Cpu));
    let peak_with_both = cpu_peak_allocated_bytes();
    drop(a);
    drop(b);
    drop(before_install); // allocated before installation: its free is not counted
    let after = cpu_allocated_bytes() as i64 - base as i64;
    assert!(after.abs() < (1 << 20), "{after} bytes left counted after freeing");
    assert!(peak_with_both >= base + (5 << 20) - (1 << 20), "peak {peak_with_both}, base {base}");
    reset_cpu_peak();
    assert!(cpu_peak_allocated_bytes() < peak_with_both);
    // Tensors made by kernels (not only factories) are counted, and an empty one costs nothing.
    let c = Tensor::ones([1 << 20], (Kind::Float, Device::Cpu)) * 2.0;
    assert!(cpu_allocated_bytes() >= base + (4 << 20) - (1 << 20));
    let empty = Tensor::zeros([0], (Kind::Float, Device::Cpu));
    assert_eq!(empty.numel(), 0);
    drop(c);
}
