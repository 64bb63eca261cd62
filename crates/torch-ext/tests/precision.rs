//! TF32 for float32 matmuls on CUDA (`train.tf32`) and the pinned host-to-device copy of the
//! trainer's micro-batches. The flag and the refusals are checked here; what they do to a GPU
//! is checked on one (scripts/device/check.sh runs this binary there).

mod common;

use fabbrica_torch_ext::{cuda_matmul_tf32, set_cuda_matmul_tf32, to_cuda_pinned};
use tch::{Device, Kind, Tensor};

/// The TF32 flag is process-wide and tests run on threads: the tests that set it take turns.
static FLAG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Largest absolute difference from a float64 product, over the largest entry of the product.
fn matmul_error(a: &Tensor, b: &Tensor) -> f64 {
    let exact = a.to_kind(Kind::Double).matmul(&b.to_kind(Kind::Double)).to_device(Device::Cpu);
    let got = a.matmul(b).to_kind(Kind::Double).to_device(Device::Cpu);
    (got - &exact).abs().max().double_value(&[]) / exact.abs().max().double_value(&[])
}

#[test]
fn the_tf32_flag_reads_back_what_was_set_and_leaves_cpu_matmuls_alone() {
    let _flag = FLAG.lock().unwrap_or_else(|p| p.into_inner());
    tch::manual_seed(0);
    let (a, b) = (Tensor::randn([96, 80], (Kind::Float, Device::Cpu)), Tensor::randn([80, 64], (Kind::Float, Device::Cpu)));
    set_cuda_matmul_tf32(false).unwrap();
    assert_eq!(cuda_matmul_tf32(), Some(false));
    let ieee = a.matmul(&b);
    set_cuda_matmul_tf32(true).unwrap();
    assert_eq!(cuda_matmul_tf32(), Some(true));
    // The flag is CUDA's: the CPU's float32 product is bit for bit the same, and exact to float32.
    let with_flag = a.matmul(&b);
    assert!(with_flag.equal(&ieee), "a CPU matmul changed with the CUDA TF32 flag");
    assert!(matmul_error(&a, &b) < 1e-5);
    set_cuda_matmul_tf32(false).unwrap();
    assert_eq!(cuda_matmul_tf32(), Some(false));
}

#[test]
fn the_pinned_copy_refuses_with_a_message_not_a_crash() {
    let host = Tensor::arange(12, (Kind::Int64, Device::Cpu)).view([3, 4]);
    match to_cuda_pinned(&host, 0) {
        // Without a GPU libtorch refuses to pin: the trainer then copies from pageable memory.
        Err(e) => {
            println!("without a GPU: {e}");
            assert!(!tch::Cuda::is_available(), "pinned copy failed with a GPU present: {e}");
            assert!(!e.is_empty());
        }
        Ok(t) => {
            assert_eq!(t.device(), Device::Cuda(0));
            assert!(t.to_device(Device::Cpu).equal(&host));
            // A GPU tensor is not a host tensor to pin.
            let e = to_cuda_pinned(&t, 0).unwrap_err();
            assert!(e.contains("must be a CPU tensor"), "{e}");
        }
    }
}

/// On a GPU: the flag reaches cuBLAS (float32 products in TF32 carry TF32's rounding, in IEEE
/// float32 they do not), and pinned copies whose host tensors are dropped at once, queued behind
/// work on the device, each arrive with their own contents.
#[test]
fn on_cuda_tf32_reaches_cublas_and_pinned_copies_arrive_intact() {
    if !common::cuda_or_skip("precision on_cuda_tf32_reaches_cublas_and_pinned_copies_arrive_intact") {
        return;
    }
    let _flag = FLAG.lock().unwrap_or_else(|p| p.into_inner());
    let gpu = Device::Cuda(0);
    tch::manual_seed(0);
    let (a, b) = (Tensor::randn([512, 512], (Kind::Float, gpu)), Tensor::randn([512, 512], (Kind::Float, gpu)));
    set_cuda_matmul_tf32(false).unwrap();
    let ieee = matmul_error(&a, &b);
    set_cuda_matmul_tf32(true).unwrap();
    let tf32 = matmul_error(&a, &b);
    set_cuda_matmul_tf32(false).unwrap();
    println!("float32 matmul 512^3, max error over max entry: IEEE {ieee:.2e}, TF32 {tf32:.2e}");
    assert!(ieee < 1e-5, "IEEE float32 error {ieee:.2e}: TF32 still on?");
    // TF32 keeps 10 mantissa bits: errors of order 1e-4..1e-3 of the entries, far above float32's.
    assert!(tf32 > 10.0 * ieee && tf32 < 1e-2, "TF32 error {tf32:.2e} against IEEE {ieee:.2e}: the flag did not reach cuBLAS");

    // Keep the device busy so the copies queue behind kernels, then copy 64 host tensors, each
    // dropped as soon as its copy is queued: if a pinned block were reused before its copy ran,
    // a later tensor's contents would show up in an earlier one.
    let mut busy = a.shallow_clone();
    for _ in 0..20 {
        busy = busy.matmul(&b).tanh();
    }
    let copies: Vec<Tensor> = (0..64i64)
        .map(|i| {
            let host = Tensor::full([4, 1024], i, (Kind::Int64, Device::Cpu));
            to_cuda_pinned(&host, 0).unwrap()
        })
        .collect();
    for (i, c) in copies.iter().enumerate() {
        assert_eq!(c.device(), gpu);
        let (lo, hi) = (c.min().int64_value(&[]), c.max().int64_value(&[]));
        assert_eq!((lo, hi), (i as i64, i as i64), "copy {i} holds {lo}..{hi}");
    }
    assert!(busy.isfinite().all().int64_value(&[]) == 1);
}
