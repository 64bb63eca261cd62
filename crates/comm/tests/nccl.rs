//! The NCCL backend. Pure parts (dtype and reduction codes, where the library is looked for, which
//! library is resolved) run everywhere; every operation runs on a GPU world of one, against results
//! computed locally, where libtorch sees a GPU.

use std::path::Path;
use std::time::{Duration, Instant};

use fabbrica_comm::{init_with, nccl, Backend, BackendChoice, CommError, Communicator, DType, InitOptions, LaunchEnv, OpKind, ReduceOp};
use tch::{Device, Kind, Tensor};

/// Prints the skip and logs it where scripts/test.sh collects skips. True when skipped.
fn skipped_without_gpu(test: &str) -> bool {
    if tch::Cuda::is_available() {
        return false;
    }
    println!("SKIPPED: no CUDA device");
    if let Ok(log) = std::env::var("FABBRICA_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(f, "comm::nccl {test}: no CUDA device");
        }
    }
    true
}

#[test]
fn dtype_and_reduction_codes_are_nccl_h_values() {
    // nccl.h (2.28): ncclInt64 = 4, ncclFloat16 = 6, ncclFloat32 = 7, ncclBfloat16 = 9.
    assert_eq!(nccl::nccl_datatype(DType::I64) as u32, 4);
    assert_eq!(nccl::nccl_datatype(DType::F16) as u32, 6);
    assert_eq!(nccl::nccl_datatype(DType::F32) as u32, 7);
    assert_eq!(nccl::nccl_datatype(DType::Bf16) as u32, 9);
    // ncclSum = 0, ncclMax = 2, ncclMin = 3, ncclAvg = 4.
    assert_eq!(nccl::nccl_reduce_op(ReduceOp::Sum) as u32, 0);
    assert_eq!(nccl::nccl_reduce_op(ReduceOp::Max) as u32, 2);
    assert_eq!(nccl::nccl_reduce_op(ReduceOp::Min) as u32, 3);
    assert_eq!(nccl::nccl_reduce_op(ReduceOp::Avg) as u32, 4);
    // Every other libtorch dtype is refused before reaching NCCL.
    for k in [Kind::Double, Kind::Int, Kind::Int8, Kind::Uint8, Kind::Bool, Kind::ComplexFloat] {
        assert_eq!(DType::from_kind(k), None, "{k:?}");
    }
    assert_eq!(nccl::version_string(22809), "2.28.9");
    assert_eq!(nccl::version_string(2804), "2.8.4");
}

#[test]
fn library_candidates_follow_libtorch_rpath_and_never_the_unversioned_name() {
    let lib = Path::new("/venv/lib/python3.11/site-packages/torch/lib");
    let c = nccl::library_candidates(lib);
    // libtorch_cuda's rpath entry $ORIGIN/../../nvidia/nccl/lib comes first.
    assert_eq!(c[0], lib.join("../../nvidia/nccl/lib/libnccl.so.2"));
    assert!(c.iter().all(|p| p.is_absolute()), "{c:?}");
    assert!(c.iter().all(|p| p.file_name().is_some_and(|n| n == "libnccl.so.2")), "{c:?}");
}

/// The torch lib folder is the one this process runs on (a binary carried to the GPU machine
/// finds that machine's wheel), taken from the mapped `libtorch_cpu.so`.
#[test]
fn torch_lib_dir_is_where_libtorch_is_mapped() {
    let maps = "7f00-7f10 r-xp 00000000 08:01 12 /usr/lib/x86_64-linux-gnu/libc.so.6\n\
                7f20-7f30 r--p 00000000 08:01 13 /opt/venv/lib/python3.12/site-packages/torch/lib/libtorch_cpu.so\n\
                7f40-7f50 rw-p 00000000 00:00 0 \n\
                7f60-7f70 r--p 00000000 08:01 14 /other/torch/lib/libtorch_cpu.so.bak\n";
    assert_eq!(nccl::torch_lib_in_maps(maps), Some(Path::new("/opt/venv/lib/python3.12/site-packages/torch/lib").to_path_buf()));
    assert_eq!(nccl::torch_lib_in_maps("7f40-7f50 rw-p 00000000 00:00 0 [heap]\n"), None);
    // This test binary links libtorch: the folder holds it (whatever machine the binary is on).
    let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu));
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mapped = nccl::torch_lib_in_maps(&maps).expect("libtorch_cpu.so is mapped into this test");
    let dir = nccl::torch_lib_dir();
    assert_eq!(dir, mapped);
    assert!(dir.join("libtorch_cpu.so").exists(), "{}", dir.display());
    assert!(dir.join("libc10.so").exists(), "{}", dir.display());
}

/// The critical fact: a machine may hold a system libnccl.so beside the wheel's libnccl.so.2 that
/// libtorch_cuda loads, and only the latter works on libtorch's tensors. Needs no GPU: the test
/// binary links libtorch_cuda, which loads its NCCL at start-up.
#[test]
fn library_resolves_to_the_copy_libtorch_loaded() {
    let torch_lib = nccl::torch_lib_dir();
    if !torch_lib.join("libtorch_cuda.so").exists() {
        println!("SKIPPED: CPU-only libtorch has no NCCL ({} holds no libtorch_cuda.so)", torch_lib.display());
        if let Ok(log) = std::env::var("FABBRICA_SKIP_LOG") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
                let _ = writeln!(f, "comm::nccl library_resolves_to_the_copy_libtorch_loaded: CPU-only libtorch");
            }
        }
        return;
    }
    let (path, version) = nccl::library_info().unwrap_or_else(|| panic!("NCCL did not load: {}", nccl::library_error().unwrap_or_default()));
    println!("NCCL {} from {}", nccl::version_string(version), path.display());
    let wheel = nccl::library_candidates(&torch_lib)[0].clone();
    assert_eq!(path, std::fs::canonicalize(&wheel).expect("the wheel's libnccl.so.2 exists"));
    // The version libtorch's wheel ships, as its header next to the library says.
    let header = wheel.parent().and_then(|d| d.parent()).map(|d| d.join("include/nccl.h"));
    if let Some(text) = header.and_then(|h| std::fs::read_to_string(h).ok()) {
        let code = text.lines().find_map(|l| l.strip_prefix("#define NCCL_VERSION_CODE ")).and_then(|v| v.trim().parse::<i32>().ok());
        if let Some(code) = code {
            assert_eq!(version, code);
        }
    }
}

#[test]
fn available_is_safe_without_a_gpu() {
    let a = nccl::available();
    if !tch::Cuda::is_available() {
        assert!(!a);
    }
}

// ---------------------------------------------------------------------------------------------
// GPU: every operation in a world of one (one #[test]: libtorch's CUDA state is process-wide).

/// Rank `r`'s test values: small integers, exact in every dtype (bf16 holds integers to 256).
fn sample(dt: DType, n: i64, r: i64, dev: Device) -> Tensor {
    ((Tensor::arange(n, (Kind::Int64, Device::Cpu)) * 7 + r * 13 + 5).remainder(101) - 50).to_kind(dt.kind()).to_device(dev)
}

fn host_f64(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.to_device(Device::Cpu).to_kind(Kind::Double).reshape([-1])).expect("to vec")
}

fn assert_same(got: &Tensor, want: &Tensor, what: &str) {
    let (g, w) = (host_f64(got), host_f64(want));
    assert_eq!(g.len(), w.len(), "{what}: lengths");
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let tol = 1e-2 * b.abs().max(1.0);
        assert!((a - b).abs() <= tol, "{what}: element {i} is {a}, expected {b}");
    }
}

/// The reduction of every rank's sample, computed here in f64 and rounded to the dtype.
fn reduced(dt: DType, n: i64, size: i64, op: ReduceOp) -> Tensor {
    let all: Vec<Tensor> = (0..size).map(|r| sample(dt, n, r, Device::Cpu).to_kind(Kind::Double)).collect();
    let s = Tensor::stack(&all, 0);
    let out = match op {
        ReduceOp::Sum => s.sum_dim_intlist([0i64].as_slice(), false, Kind::Double),
        ReduceOp::Avg => s.mean_dim([0i64].as_slice(), false, Kind::Double),
        ReduceOp::Max => s.amax([0i64].as_slice(), false),
        ReduceOp::Min => s.amin([0i64].as_slice(), false),
    };
    out.to_kind(dt.kind())
}

fn gathered(dt: DType, n: i64, size: i64) -> Tensor {
    let all: Vec<Tensor> = (0..size).map(|r| sample(dt, n, r, Device::Cpu)).collect();
    Tensor::cat(&all, 0)
}

fn expect_invalid(r: fabbrica_comm::Result<()>, what: &str) {
    match r {
        Err(CommError::InvalidArgument { ctx, .. }) => assert_eq!(ctx.backend, Backend::Nccl, "{what}"),
        other => panic!("{what}: expected InvalidArgument, got {other:?}"),
    }
}

fn wait_completed(w: &mut fabbrica_comm::Work, what: &str) {
    let t = Instant::now();
    while !w.is_completed() {
        assert!(t.elapsed() < Duration::from_secs(30), "{what}: not completed after 30 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn gpu_world_of_one_every_op() {
    if skipped_without_gpu("gpu_world_of_one_every_op") {
        return;
    }
    assert!(nccl::available());
    let (path, version) = nccl::library_info().expect("NCCL loads");
    println!("NCCL {} from {}", nccl::version_string(version), path.display());

    let world = init_with(LaunchEnv::single(), InitOptions { backend: BackendChoice::Nccl, ..Default::default() }).expect("world of one");
    let g = world.comm();
    let dev = Device::Cuda(0);
    let (rank, size) = (g.rank() as i64, g.size() as i64);
    let c = g.route(&Tensor::zeros([1], (Kind::Float, dev)), OpKind::AllReduce).expect("NCCL communicator");
    assert_eq!(c.backend(), Backend::Nccl);

    let n = 37i64;
    for dt in [DType::F32, DType::Bf16, DType::F16, DType::I64] {
        let k = dt.kind();
        // all_reduce, every reduction; avg only for floats.
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min] {
            let t = sample(dt, n, rank, dev);
            let r = g.all_reduce(&t, op);
            if op == ReduceOp::Avg && !dt.is_float() {
                expect_invalid(r, "avg of i64");
                continue;
            }
            r.unwrap_or_else(|e| panic!("all_reduce {dt} {op}: {e}"));
            assert_same(&t, &reduced(dt, n, size, op), &format!("all_reduce {dt} {op}"));
            // Non-contiguous (a transposed view): staged, reduced, copied back.
            let base = sample(dt, 6 * 5, rank, dev).reshape([6, 5]);
            let view = base.transpose(0, 1);
            assert!(!view.is_contiguous());
            g.all_reduce(&view, op).unwrap_or_else(|e| panic!("all_reduce non-contiguous {dt} {op}: {e}"));
            let want = reduced(dt, 30, size, op).reshape([6, 5]).transpose(0, 1);
            assert_same(&view, &want, &format!("all_reduce non-contiguous {dt} {op}"));
        }

        // broadcast from root 0, contiguous and not.
        let t = sample(dt, n, rank, dev);
        g.broadcast(&t, 0).unwrap_or_else(|e| panic!("broadcast {dt}: {e}"));
        assert_same(&t, &sample(dt, n, 0, Device::Cpu), &format!("broadcast {dt}"));
        let base = sample(dt, 2 * n, rank, dev).reshape([n, 2]);
        let view = base.select(1, 1);
        g.broadcast(&view, 0).unwrap_or_else(|e| panic!("broadcast non-contiguous {dt}: {e}"));
        assert_same(&view, &sample(dt, 2 * n, 0, Device::Cpu).reshape([n, 2]).select(1, 1), "broadcast strided");
        expect_invalid(g.broadcast(&t, size as usize), "broadcast from a root outside the group");

        // all_gather: out of place, in place, strided input and output.
        let input = sample(dt, n, rank, dev);
        let out = Tensor::zeros([size * n], (k, dev));
        g.all_gather(&out, &input).unwrap_or_else(|e| panic!("all_gather {dt}: {e}"));
        assert_same(&out, &gathered(dt, n, size), &format!("all_gather {dt}"));

        let out = Tensor::zeros([size * n], (k, dev));
        out.narrow(0, rank * n, n).copy_(&sample(dt, n, rank, dev));
        let chunk = out.narrow(0, rank * n, n);
        g.all_gather(&out, &chunk).unwrap_or_else(|e| panic!("all_gather in place {dt}: {e}"));
        assert_same(&out, &gathered(dt, n, size), &format!("all_gather in place {dt}"));

        let src = sample(dt, 2 * n, rank, dev).reshape([n, 2]);
        let input = src.select(1, 0);
        let out_base = Tensor::zeros([size * n, 2], (k, dev));
        let out = out_base.select(1, 1);
        g.all_gather(&out, &input).unwrap_or_else(|e| panic!("all_gather strided {dt}: {e}"));
        let want: Vec<Tensor> = (0..size).map(|r| sample(dt, 2 * n, r, Device::Cpu).reshape([n, 2]).select(1, 0)).collect();
        assert_same(&out, &Tensor::cat(&want, 0), &format!("all_gather strided {dt}"));
        assert_same(&out_base.select(1, 0), &Tensor::zeros([size * n], (k, Device::Cpu)), "all_gather: untouched column");
        expect_invalid(g.all_gather(&Tensor::zeros([size * n + 1], (k, dev)), &input), "all_gather size mismatch");

        // reduce_scatter: out of place, in place, strided output; avg only for floats.
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min] {
            let input = sample(dt, size * n, rank, dev);
            let out = Tensor::zeros([n], (k, dev));
            let r = g.reduce_scatter(&out, &input, op);
            if op == ReduceOp::Avg && !dt.is_float() {
                expect_invalid(r, "reduce_scatter avg of i64");
                continue;
            }
            r.unwrap_or_else(|e| panic!("reduce_scatter {dt} {op}: {e}"));
            let want = reduced(dt, size * n, size, op).narrow(0, rank * n, n);
            assert_same(&out, &want, &format!("reduce_scatter {dt} {op}"));

            let input = sample(dt, size * n, rank, dev);
            let chunk = input.narrow(0, rank * n, n);
            g.reduce_scatter(&chunk, &input, op).unwrap_or_else(|e| panic!("reduce_scatter in place {dt} {op}: {e}"));
            assert_same(&chunk, &want, &format!("reduce_scatter in place {dt} {op}"));

            let input = sample(dt, size * n, rank, dev);
            let out_base = Tensor::zeros([n, 3], (k, dev));
            let out = out_base.select(1, 2);
            g.reduce_scatter(&out, &input, op).unwrap_or_else(|e| panic!("reduce_scatter strided {dt} {op}: {e}"));
            assert_same(&out, &want, &format!("reduce_scatter strided {dt} {op}"));
        }
    }

    // Async ordering, both sides. The input comes out of a long chain of kernels on the current
    // stream: NCCL must wait for it (the `ready` event), and work queued after `wait` must see
    // NCCL's result (the `done` event), all without a host synchronisation in between.
    let a = Tensor::randn([2048, 2048], (Kind::Float, dev)) / 45.0;
    let mut x = a.shallow_clone();
    for _ in 0..40 {
        x = x.matmul(&a).tanh();
    }
    let src = x.reshape([-1]).narrow(0, 0, 4096);
    let out = Tensor::zeros([size * 4096], (Kind::Float, dev));
    let work = g.all_gather_async(&out, &src).expect("all_gather_async");
    work.wait().expect("wait");
    let doubled = &out * 2.0;
    let want = src.to_device(Device::Cpu);
    assert_same(&out.narrow(0, rank * 4096, 4096), &want, "async all_gather after a kernel chain");
    assert_same(&doubled.narrow(0, rank * 4096, 4096), &(&want * 2.0), "work queued after wait");

    // is_completed turns true without wait, and wait afterwards still succeeds.
    let t = sample(DType::F32, 1 << 20, rank, dev);
    let mut w = g.all_reduce_async(&t, ReduceOp::Sum).expect("all_reduce_async");
    wait_completed(&mut w, "all_reduce_async");
    w.wait().expect("wait after completion");

    // Several operations in flight, waited in reverse order.
    let ts: Vec<Tensor> = (0..8).map(|i| sample(DType::Bf16, 1000 + i, rank, dev)).collect();
    let works: Vec<_> = ts.iter().map(|t| g.all_reduce_async(t, ReduceOp::Max).expect("issue")).collect();
    for w in works.into_iter().rev() {
        w.wait().expect("wait");
    }
    for (i, t) in ts.iter().enumerate() {
        assert_same(t, &reduced(DType::Bf16, 1000 + i as i64, size, ReduceOp::Max), "in-flight all_reduce");
    }

    // A Work dropped without wait still lands its result (copy back included) before later work.
    let input = sample(DType::F16, n, rank, dev);
    let out_base = Tensor::zeros([size * n, 2], (Kind::Half, dev));
    let out = out_base.select(1, 0);
    drop(g.all_gather_async(&out, &input).expect("all_gather_async"));
    assert_same(&out, &gathered(DType::F16, n, size), "dropped Work");

    // Refusals, with the NCCL context.
    match g.all_reduce(&Tensor::zeros([4], (Kind::Double, dev)), ReduceOp::Sum) {
        Err(CommError::UnsupportedDtype { ctx, dtype }) => {
            assert_eq!(ctx.backend, Backend::Nccl);
            assert_eq!(ctx.op, OpKind::AllReduce);
            assert!(dtype.contains("Double"), "{dtype}");
        }
        other => panic!("f64: expected UnsupportedDtype, got {other:?}"),
    }
    expect_invalid(g.send(&t, 0), "send to self");
    expect_invalid(g.recv(&t, 1), "recv from outside the group");
    assert!(g.all_reduce(&Tensor::zeros([4], (Kind::Float, Device::Cpu)), ReduceOp::Sum).is_err());
    // Empty tensors complete at once.
    g.all_reduce(&Tensor::zeros([0], (Kind::Float, dev)), ReduceOp::Sum).expect("empty all_reduce");

    // Barrier (host), and splits: of the NCCL communicator itself and of the Group.
    g.barrier().expect("group barrier");
    c.barrier().expect("nccl barrier");
    assert!(c.split(None, 0, "none").expect("split out").is_none());
    let sub = c.split(Some(0), 0, "sub").expect("split").expect("a member");
    assert_eq!(sub.backend(), Backend::Nccl);
    assert_eq!(sub.name(), "sub");
    let t = sample(DType::F32, n, rank, dev);
    sub.all_reduce(&t, ReduceOp::Sum).expect("all_reduce on the split");
    assert_same(&t, &reduced(DType::F32, n, 1, ReduceOp::Sum), "all_reduce on the split");
    let gsub = g.split(Some(0), 0, "gsub").expect("group split").expect("a member");
    let out = Tensor::zeros([n], (Kind::Float, dev));
    gsub.all_gather(&out, &t).expect("all_gather on the group split");
    assert_same(&out, &t, "all_gather on the group split");

    // Debug mode (a group of one has nobody to disagree with, but the path runs).
    let dworld =
        init_with(LaunchEnv::single(), InitOptions { backend: BackendChoice::Nccl, debug: true, ..Default::default() }).expect("debug world");
    let t = sample(DType::I64, n, rank, dev);
    dworld.comm().all_reduce(&t, ReduceOp::Min).expect("debug all_reduce");
    assert_same(&t, &reduced(DType::I64, n, 1, ReduceOp::Min), "debug all_reduce");
    tch::Cuda::synchronize(0);
}

/// Eager creation (`Group::connect_cuda`) answers without touching CUDA where it must not, and
/// names the problem where NCCL is required but cannot run. On a GPU it creates the communicator
/// that the group's CUDA operations then use, and refuses a second device.
#[test]
fn connect_cuda_creates_nccl_eagerly_or_says_why_not() {
    let world = |backend| init_with(LaunchEnv::single(), InitOptions { backend, ..Default::default() }).expect("world of one");
    // backend = mpi: CUDA tensors are staged through host memory; nothing is created.
    assert!(!world(BackendChoice::Mpi).comm().connect_cuda(0).expect("mpi needs no NCCL"));
    let gpu = tch::Cuda::is_available();
    // auto: NCCL exactly when a GPU is visible.
    assert_eq!(world(BackendChoice::Auto).comm().connect_cuda(0).expect("auto never fails on a CPU machine"), gpu);
    let w = world(BackendChoice::Nccl);
    let g = w.comm();
    if !gpu {
        let e = g.connect_cuda(0).expect_err("nccl without a GPU").to_string();
        assert!(e.contains("no CUDA device") && e.contains("comm.backend"), "{e}");
        return;
    }
    assert!(g.connect_cuda(0).expect("NCCL at world size 1"));
    let t = Tensor::ones([8], (Kind::Float, Device::Cuda(0)));
    assert_eq!(g.route(&t, OpKind::AllReduce).expect("route").backend(), Backend::Nccl);
    g.all_reduce(&t, ReduceOp::Sum).expect("all_reduce on the eagerly created communicator");
    assert_same(&t, &Tensor::ones([8], (Kind::Float, Device::Cuda(0))), "all_reduce at world size 1");
    // One device per rank: a second device is refused, naming both.
    let e = g.connect_cuda(1).expect_err("a second device").to_string();
    assert!(e.contains("cuda:0") && e.contains("cuda:1") && e.contains("connect"), "{e}");
}
