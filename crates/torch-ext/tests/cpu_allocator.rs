//! The counting CPU allocator, and what it shows of autocast's weight copies. One test function:
//! the allocator counts the whole process, so nothing else may run beside it.

use fabbrica_torch_ext::amp::{autocast, count_cpu_allocations, cpu_allocated_bytes, cpu_peak_allocated_bytes, hold_casts, reset_cpu_peak};
use tch::{Device, Kind, Tensor};

/// Bytes still allocated after two autocast regions that each run a linear layer over the same
/// fp32 weight and keep their outputs' graphs (as two micro-batches in flight do).
fn two_regions(hold: bool, w: &Tensor) -> i64 {
    let base = cpu_allocated_bytes() as i64;
    // An activation (not a leaf, whose casts autocast would cache too): its gradient needs the
    // (bf16) weight, which backward keeps.
    let leaf = Tensor::ones([4, 1024], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let x = &leaf * 1.0;
    let kept = hold_casts(hold, || {
        let y1 = autocast(Device::Cpu, true, || x.linear::<Tensor>(w, None));
        let y2 = autocast(Device::Cpu, true, || x.linear::<Tensor>(w, None));
        (y1, y2)
    });
    let held = cpu_allocated_bytes() as i64 - base;
    drop(kept);
    held
}

#[test]
fn the_counting_allocator_counts_live_cpu_tensors_and_their_peak() {
    let before_install = Tensor::zeros([1024], (Kind::Float, Device::Cpu));
    count_cpu_allocations();
    count_cpu_allocations(); // a second call changes nothing
    let base = cpu_allocated_bytes();
    let a = Tensor::zeros([1 << 20], (Kind::Float, Device::Cpu));
    assert_eq!(cpu_allocated_bytes() - base, 4 << 20, "a 4 MiB tensor");
    let b = Tensor::zeros([1 << 19], (Kind::BFloat16, Device::Cpu));
    assert_eq!(cpu_peak_allocated_bytes(), base + (5 << 20));
    drop(a);
    drop(b);
    drop(before_install); // allocated before installation: freed, and not counted
    assert_eq!(cpu_allocated_bytes(), base, "everything freed is uncounted");
    assert_eq!(cpu_peak_allocated_bytes(), base + (5 << 20), "the peak stays");
    reset_cpu_peak();
    assert_eq!(cpu_peak_allocated_bytes(), base);
    // Tensors made by kernels (not only factories) are counted, and an empty one costs nothing.
    let c = Tensor::ones([1 << 20], (Kind::Float, Device::Cpu)) * 2.0;
    assert_eq!(cpu_allocated_bytes() - base, 4 << 20, "a kernel's output (the factory's input is freed)");
    let empty = Tensor::zeros([0], (Kind::Float, Device::Cpu));
    assert_eq!(empty.numel(), 0);
    assert_eq!(cpu_allocated_bytes() - base, 4 << 20);
    drop(c);

    // Autocast keeps a bf16 copy of the 1024 × 1024 weight (2 MiB) for each region's backward;
    // holding the casts, the two regions share one.
    let w = Tensor::randn([1024, 1024], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let (apart, shared) = (two_regions(false, &w), two_regions(true, &w));
    assert_eq!(apart - shared, 2 << 20, "one bf16 weight copy fewer: {apart} vs {shared} bytes");
    // And nothing stays cached once the held region ends.
    let base = cpu_allocated_bytes();
    two_regions(true, &w);
    assert_eq!(cpu_allocated_bytes(), base);
}
