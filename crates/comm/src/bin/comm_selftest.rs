//! Exercises the communicator under a real launcher; the integration tests in `tests/mpirun.rs`
//! start it with `mpirun -np N`. Scenarios:
//! - `ops [cpu|cuda]`: every operation against a locally computed reference (dtypes, odd sizes,
//!   in-place and out-of-place, non-contiguous, async ordering, point-to-point, sub-groups);
//! - `avg`: `ReduceOp::Avg` into plain tensors and into parameters, blocking and asynchronous,
//!   all_reduce and reduce_scatter, against the exact average;
//! - `watchdog`: the last rank skips a collective; the watchdog must end the job;
//! - `watchdog-p2p`: rank 0 waits for a message that rank 1 never sends;
//! - `mismatch-size` / `mismatch-op`: ranks disagree (run with FABBRICA_COMM_DEBUG=1);
//! - `refused` (with FABBRICA_COMM_DEBUG=1): a call refused on one rank only (an unsupported dtype)
//!   is not counted there, so the group's next collective still agrees on its sequence number;
//! - `connect [auto|nccl]` (machines without a GPU): creating the NCCL communicator up front
//!   either falls back on every rank alike (`auto`) or fails on every rank alike (`nccl`), and
//!   the group's host collectives stay matched afterwards.
//!
//! - `stranger` (with FABBRICA_SELFTEST_DIR): runs checked collectives until the test writes
//!   `go`, then prints what the watchdog port turned away (`PORT rank <r> rejected <n> dropped <m>`),
//!   while the test talks to the ports without the job's secret.
//!
//! With `FABBRICA_SELFTEST_DIR=<dir>` set, every rank writes `<dir>/addr.<rank>` (its watchdog
//! address and process id, `<addr> <pid>`) after start-up, so that a test can find the ports, and
//! the `watchdog*` scenarios wait for `<dir>/go` before they start.
//!
//! - `flight-usr2` (with FABBRICA_SELFTEST_DIR): runs collectives and a send/receive ring until the
//!   test writes `go`, marking the end of its first round with `round1.<rank>` (meanwhile the test
//!   sends SIGUSR2 to a rank, whose flight recorder dumps);
//!   prints `FLIGHT rank <r> rounds <n>`;
//! - `flight-kill` (with FABBRICA_SELFTEST_DIR): five all_reduces, then the last rank writes
//!   `<dir>/asleep` and sleeps (the test kills it with SIGKILL) while the others wait in the sixth.
//! - `watchdog-stop K` (with FABBRICA_SELFTEST_DIR): one all_reduce, then the last K ranks write
//!   `<dir>/asleep.<rank>` and sleep (the test stops them with SIGSTOP) while the others wait in the
//!   second; the watchdog must end the job, naming the stopped ranks, in a bounded time.
//! - `flight-bench cpu [ITERS] [ROUNDS]`: the flight recorder's cost: blocking all_reduce latency
//!   (f32, 8 B to 64 KiB) with recording on and off, alternating round by round in this one job;
//!   rank 0 prints the median of the rounds for each and their ratio.
//!
//! Prints `OK <scenario> rank <r>` at the end; any failure panics with the reason.

use std::sync::Arc;

use fabbrica_comm::{init, BackendChoice, CommError, Communicator, DType, InitOptions, ReduceOp};
use fabbrica_topology::ParallelDims;
use tch::{Device, Kind, Tensor};

/// Values exact in every dtype: small integers depending on rank and index.
fn data(rank: usize, n: i64, kind: Kind, dev: Device) -> Tensor {
    let i = Tensor::arange(n, (Kind::Int64, Device::Cpu));
    ((i.remainder(7) + 1) * (rank as i64 + 1) - 3).to_kind(kind).to_device(dev)
}

fn same(a: &Tensor, b: &Tensor, what: &str) {
    let a = a.to_device(Device::Cpu).to_kind(Kind::Double);
    let b = b.to_device(Device::Cpu).to_kind(Kind::Double);
    assert_eq!(a.size(), b.size(), "{what}: shapes differ");
    let diff = (a - &b).abs().max().double_value(&[]);
    assert!(diff == 0.0, "{what}: max abs difference {diff}");
}

fn reduce_ref(world: usize, n: i64, kind: Kind, op: ReduceOp) -> Tensor {
    let all: Vec<Tensor> = (0..world).map(|r| data(r, n, Kind::Double, Device::Cpu)).collect();
    let s = Tensor::stack(&all, 0);
    let r = match op {
        ReduceOp::Sum | ReduceOp::Avg => s.sum_dim_intlist(&[0i64][..], false, Kind::Double),
        ReduceOp::Max => s.amax(&[0i64][..], false),
        ReduceOp::Min => s.amin(&[0i64][..], false),
    };
    // Avg: the backend sums in the dtype (exact here) and divides in the dtype.
    let r = r.to_kind(kind);
    if op == ReduceOp::Avg {
        r / world as f64
    } else {
        r
    }
}

fn ops(comm: &Arc<fabbrica_comm::Group>, dev: Device) {
    let (rank, n) = (comm.rank(), comm.size());
    let kinds = [Kind::Float, Kind::BFloat16, Kind::Half, Kind::Int64];
    let sizes = [1i64, 7, 1000, 4099, (1 << 18) + 3];
    for &kind in &kinds {
        let dt = DType::from_kind(kind).unwrap();
        for &len in &sizes {
            for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min] {
                if op == ReduceOp::Avg && !dt.is_float() {
                    continue;
                }
                let t = data(rank, len, kind, dev);
                comm.all_reduce(&t, op).unwrap();
                same(&t, &reduce_ref(n, len, kind, op), &format!("all_reduce {dt} {len} {op}"));
            }
            // Non-contiguous: every other element of a longer tensor, the rest untouched.
            let base = Tensor::full([2 * len], 5, (kind, dev));
            let view = base.slice(0, 0, 2 * len, 2);
            view.shallow_clone().copy_(&data(rank, len, kind, dev));
            comm.all_reduce(&view, ReduceOp::Sum).unwrap();
            same(&view, &reduce_ref(n, len, kind, ReduceOp::Sum), &format!("strided all_reduce {dt} {len}"));
            same(&base.slice(0, 1, 2 * len, 2), &Tensor::full([len], 5, (kind, Device::Cpu)), "strided gaps untouched");

            for root in 0..n {
                let t = data(rank, len, kind, dev);
                comm.broadcast(&t, root).unwrap();
                same(&t, &data(root, len, kind, Device::Cpu), &format!("broadcast {dt} {len} root {root}"));
            }

            // all_gather: out of place, then in place (input is this rank's chunk of the output).
            let expect = Tensor::cat(&(0..n).map(|r| data(r, len, kind, Device::Cpu)).collect::<Vec<_>>(), 0);
            let out = Tensor::zeros([n as i64 * len], (kind, dev));
            comm.all_gather(&out, &data(rank, len, kind, dev)).unwrap();
            same(&out, &expect, &format!("all_gather {dt} {len}"));
            let out = Tensor::zeros([n as i64 * len], (kind, dev));
            let mine = out.narrow(0, rank as i64 * len, len);
            mine.shallow_clone().copy_(&data(rank, len, kind, dev));
            comm.all_gather(&out, &mine).unwrap();
            same(&out, &expect, &format!("in-place all_gather {dt} {len}"));
            // Output as a 2-D non-contiguous view (transposed).
            let out2 = Tensor::zeros([len, n as i64], (kind, dev));
            comm.all_gather(&out2.tr(), &data(rank, len, kind, dev)).unwrap();
            same(&out2.tr().reshape([-1]), &expect, &format!("strided all_gather {dt} {len}"));

            // reduce_scatter: input has n chunks of len; rank r gets chunk r of the sum.
            let full = reduce_ref(n, n as i64 * len, kind, ReduceOp::Sum);
            let expect_chunk = full.narrow(0, rank as i64 * len, len);
            let input = data(rank, n as i64 * len, kind, dev);
            let out = Tensor::zeros([len], (kind, dev));
            comm.reduce_scatter(&out, &input, ReduceOp::Sum).unwrap();
            same(&out, &expect_chunk, &format!("reduce_scatter {dt} {len}"));
            let input = data(rank, n as i64 * len, kind, dev);
            let mine = input.narrow(0, rank as i64 * len, len);
            comm.reduce_scatter(&mine, &input, ReduceOp::Sum).unwrap();
            same(&mine, &expect_chunk, &format!("in-place reduce_scatter {dt} {len}"));
            if dt.is_float() {
                let input = data(rank, n as i64 * len, kind, dev);
                let out = Tensor::zeros([len], (kind, dev));
                comm.reduce_scatter(&out, &input, ReduceOp::Max).unwrap();
                same(&out, &reduce_ref(n, n as i64 * len, kind, ReduceOp::Max).narrow(0, rank as i64 * len, len), "reduce_scatter max");
            }
        }
    }

    // Several collectives in flight at once complete in issue order with the right results.
    let ts: Vec<Tensor> = (0..8).map(|k| data(rank, 1000 + k, Kind::Float, dev)).collect();
    let works: Vec<_> = ts.iter().map(|t| comm.all_reduce_async(t, ReduceOp::Sum).unwrap()).collect();
    for (k, w) in works.into_iter().enumerate().rev() {
        w.wait().unwrap();
        same(&ts[k], &reduce_ref(n, 1000 + k as i64, Kind::Float, ReduceOp::Sum), "async all_reduce");
    }
    let mut w = comm.barrier_async().unwrap();
    while !w.is_completed() {
        std::thread::yield_now();
    }
    w.wait().unwrap();

    // Point to point: a ring, both directions posted before either waits.
    if n > 1 {
        for &kind in &kinds {
            let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
            let send = data(rank, 4099, kind, dev);
            let recv = Tensor::zeros([4099], (kind, dev));
            let ws = comm.send_async(&send, next).unwrap();
            let wr = comm.recv_async(&recv, prev).unwrap();
            wr.wait().unwrap();
            ws.wait().unwrap();
            same(&recv, &data(prev, 4099, kind, Device::Cpu), "sendrecv ring");
        }
        // Size mismatch is reported by the receiver (MPI only: NCCL requires matching counts
        // and leaves a mismatch undefined).
        let probe = Tensor::ones([1], (Kind::Float, dev));
        let mpi = comm.route(&probe, fabbrica_comm::OpKind::Send).map(|c| c.backend() == fabbrica_comm::Backend::Mpi).unwrap_or(false);
        if !mpi {
        } else if rank == 0 {
            comm.send(&Tensor::ones([10], (Kind::Float, dev)), 1).unwrap();
        } else if rank == 1 {
            let e = comm.recv(&Tensor::zeros([12], (Kind::Float, dev)), 0).unwrap_err();
            assert!(e.to_string().contains("received 10 elements into a tensor of 12"), "{e}");
        }
        comm.barrier().unwrap();
    }

    // Errors name rank, op, group and backend.
    let e = comm.all_reduce(&Tensor::ones([3], (Kind::Int, dev)), ReduceOp::Sum).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, CommError::UnsupportedDtype { .. }), "{msg}");
    assert!(
        msg.contains("all_reduce")
            && msg.contains("group 'world'")
            && msg.contains(&format!("rank {rank} of {n}"))
            && msg.contains("use f32, bf16, f16 or i64"),
        "{msg}"
    );
    let e = comm.all_reduce(&Tensor::ones([3], (Kind::Int64, dev)), ReduceOp::Avg).unwrap_err();
    assert!(e.to_string().contains("avg of i64"), "{e}");
    let e = comm.all_gather(&Tensor::zeros([5], (Kind::Float, dev)), &Tensor::zeros([3], (Kind::Float, dev))).unwrap_err();
    assert!(e.to_string().contains("output has 5 elements"), "{e}");
    let e = comm.broadcast(&Tensor::zeros([3], (Kind::Float, dev)), n).unwrap_err();
    assert!(e.to_string().contains(&format!("root {n} is not a rank")), "{e}");

    // Sub-groups from the topology: every (dp, pp) factorisation of the world.
    for pp in (1..=n).filter(|pp| n % pp == 0) {
        let dims = ParallelDims::new(n / pp, pp, 1, n).unwrap();
        for (label, groups) in [("dp", dims.dp_groups()), ("pp", dims.pp_groups())] {
            let sub = comm.split_groups(&groups, label).unwrap().expect("every rank is in a group");
            let mine = groups.iter().position(|g| g.contains(&rank)).unwrap();
            assert_eq!(sub.size(), groups[mine].len());
            assert_eq!(sub.members(), &groups[mine][..], "members in group order");
            assert_eq!(sub.name(), format!("{label}{mine}"));
            let t = Tensor::from_slice(&[rank as f32 + 1.0]).to_device(dev);
            sub.all_reduce(&t, ReduceOp::Sum).unwrap();
            let expect: f32 = groups[mine].iter().map(|&r| r as f32 + 1.0).sum();
            assert_eq!(t.double_value(&[0]) as f32, expect, "{label} group sum");
            let out = Tensor::zeros([sub.size() as i64], (Kind::Float, dev));
            sub.all_gather(&out, &Tensor::from_slice(&[rank as f32]).to_device(dev)).unwrap();
            let got: Vec<f32> = Vec::try_from(out.to_device(Device::Cpu)).unwrap();
            assert_eq!(got, groups[mine].iter().map(|&r| r as f32).collect::<Vec<_>>(), "{label} gather order");
        }
    }
    // A rank left out of a split gets None; the others get a group without it.
    let sub = comm.split(if rank == 0 { None } else { Some(7) }, (n - rank) as u32, "rest").unwrap();
    match sub {
        None => assert_eq!(rank, 0),
        Some(s) => {
            assert_eq!(s.size(), n - 1);
            // key = n - rank reverses the order.
            assert_eq!(s.members(), &(1..n).rev().collect::<Vec<_>>()[..]);
            s.barrier().unwrap();
        }
    }
}

/// `ReduceOp::Avg` into plain tensors and into parameters (leaves that require grad), blocking
/// and asynchronous, all_reduce and reduce_scatter: exactly the average (tests/mpirun.rs).
fn avg(comm: &fabbrica_comm::Group, rank: usize) {
    let n = comm.size();
    // Rank r holds (r + 1)·(i + 1): the average (n + 1)/2·(i + 1) is exact in f32.
    let mine = |len: i64| Tensor::arange(len, (Kind::Float, Device::Cpu)).g_add_scalar(1.0) * (rank as f64 + 1.0);
    let avg = |len: i64| Tensor::arange(len, (Kind::Float, Device::Cpu)).g_add_scalar(1.0) * ((n as f64 + 1.0) / 2.0);
    let check = |got: &Tensor, want: &Tensor, what: &str| {
        let diff = (got.detach() - want).abs().max().double_value(&[]);
        assert!(diff == 0.0, "{what} on rank {rank} of {n}: max abs difference {diff} from the average ({got:?})");
    };

    let plain = mine(5);
    comm.all_reduce(&plain, ReduceOp::Avg).unwrap();
    check(&plain, &avg(5), "all_reduce avg");
    let param = mine(5).set_requires_grad(true);
    comm.all_reduce(&param, ReduceOp::Avg).unwrap();
    check(&param, &avg(5), "all_reduce avg into a parameter");
    assert!(param.requires_grad());
    // Asynchronous: the division runs on the communicator's worker thread.
    let params: Vec<Tensor> = (0..4).map(|_| mine(7).set_requires_grad(true)).collect();
    let works: Vec<_> = params.iter().map(|p| comm.all_reduce_async(p, ReduceOp::Avg).unwrap()).collect();
    for (w, p) in works.into_iter().zip(&params) {
        w.wait().unwrap();
        check(p, &avg(7), "all_reduce_async avg into a parameter");
    }

    // reduce_scatter: rank r gets chunk r of the average.
    let len = 3;
    let want = avg(n as i64 * len).narrow(0, rank as i64 * len, len);
    let out = Tensor::zeros([len], (Kind::Float, Device::Cpu));
    comm.reduce_scatter(&out, &mine(n as i64 * len), ReduceOp::Avg).unwrap();
    check(&out, &want, "reduce_scatter avg");
    let out = Tensor::zeros([len], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    comm.reduce_scatter(&out, &mine(n as i64 * len), ReduceOp::Avg).unwrap();
    check(&out, &want, "reduce_scatter avg into a parameter");
}

/// `ops cuda` is a check of the NCCL backend: if CUDA tensors were routed to host staging instead
/// (NCCL failed to load, or a rank voted it down), every op would still pass, so say so and fail.
fn require_nccl(comm: &fabbrica_comm::Group, dev: Device) {
    if !tch::Cuda::is_available() {
        eprintln!("error: `ops cuda` needs a CUDA device and libtorch sees none; run `ops cpu` here");
        std::process::exit(2)
    }
    let probe = Tensor::zeros([1], (Kind::Float, dev));
    let backend = comm.route(&probe, fabbrica_comm::OpKind::AllReduce).map(|c| c.backend());
    match (backend, fabbrica_comm::nccl::library_info()) {
        (Ok(fabbrica_comm::Backend::Nccl), Some((path, version))) => {
            println!("selftest: CUDA tensors go through NCCL {version} ({})", path.display())
        }
        (backend, lib) => {
            eprintln!("error: `ops cuda` checks the NCCL backend, but CUDA tensors are routed to {backend:?} (NCCL library: {lib:?}); run `ops cuda-mpi` for host staging");
            std::process::exit(1)
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scenario = args.get(1).map(String::as_str).unwrap_or("ops");
    let dev_arg = args.get(2).map(String::as_str).unwrap_or("cpu");
    let opts = InitOptions {
        backend: match dev_arg {
            "cuda-mpi" => BackendChoice::Mpi,
            "nccl" => BackendChoice::Nccl,
            _ => BackendChoice::Auto,
        },
        ..Default::default()
    }
    .with_env();
    let world = opts.and_then(init).unwrap_or_else(|e| {
        use std::io::Write;
        // One write: launchers that tag output per write keep the line whole.
        let _ = std::io::stderr().write_all(format!("error: {e}\n").as_bytes());
        std::process::exit(2)
    });
    let comm = world.comm();
    let rank = comm.rank();
    let dir = std::env::var_os("FABBRICA_SELFTEST_DIR").map(std::path::PathBuf::from);
    if let Some(dir) = &dir {
        let addr = fabbrica_comm::watchdog::addresses().expect("the watchdog runs with more than one rank")[rank];
        let tmp = dir.join(format!(".addr.{rank}"));
        std::fs::write(&tmp, format!("{addr} {}\n", std::process::id())).unwrap();
        std::fs::rename(&tmp, dir.join(format!("addr.{rank}"))).unwrap();
        if scenario.starts_with("watchdog") {
            wait_for_go(dir);
        }
    }
    match scenario {
        "avg" => avg(&comm, rank),
        "ops" => {
            let dev = if dev_arg.starts_with("cuda") {
                Device::Cuda(fabbrica_comm::cuda_device_for(world.launch().local_rank, tch::Cuda::device_count() as usize).unwrap_or(0))
            } else {
                Device::Cpu
            };
            if dev_arg == "cuda" {
                require_nccl(&comm, dev);
            }
            ops(&comm, dev);
        }
        "watchdog" => {
            let t = Tensor::ones([1000], (Kind::Float, Device::Cpu));
            comm.all_reduce(&t, ReduceOp::Sum).unwrap();
            if rank == comm.size() - 1 {
                // Skips the second all_reduce; stays alive (as a rank stuck in a data loader would).
                std::thread::sleep(std::time::Duration::from_secs(120));
            } else {
                comm.all_reduce(&t, ReduceOp::Sum).unwrap();
            }
            panic!("the watchdog should have ended the job");
        }
        "watchdog-p2p" => {
            // Rank 0 waits for a message rank 1 never sends.
            let t = Tensor::zeros([10], (Kind::Float, Device::Cpu));
            if rank == 0 {
                comm.recv(&t, 1).unwrap();
            } else {
                std::thread::sleep(std::time::Duration::from_secs(120));
            }
            panic!("the watchdog should have ended the job");
        }
        "mismatch-size" | "mismatch-op" => {
            let t = Tensor::ones([1000], (Kind::Float, Device::Cpu));
            comm.all_reduce(&t, ReduceOp::Sum).unwrap();
            let r = if scenario == "mismatch-size" {
                let t = Tensor::ones([if rank == 1 { 999 } else { 1000 }], (Kind::Float, Device::Cpu));
                comm.all_reduce(&t, ReduceOp::Sum)
            } else if rank == 0 {
                comm.broadcast(&t, 0)
            } else {
                comm.all_reduce(&t, ReduceOp::Max)
            };
            let e = r.expect_err("the debug check should have caught the mismatch");
            assert!(matches!(e, CommError::Mismatch { .. }), "{e}");
            println!("MISMATCH rank {rank}: {e}");
            // The group is still usable afterwards.
            comm.all_reduce(&t, ReduceOp::Sum).unwrap();
        }
        "refused" => {
            if rank == 1 {
                let bad = Tensor::ones([4], (Kind::Double, Device::Cpu));
                let e = comm.all_reduce(&bad, ReduceOp::Sum).expect_err("f64 is not a supported dtype");
                assert!(matches!(e, CommError::UnsupportedDtype { .. }), "{e}");
            }
            // The debug check compares sequence numbers: it passes only if rank 1 did not count
            // the refused call.
            let t = Tensor::ones([7], (Kind::Float, Device::Cpu));
            comm.all_reduce(&t, ReduceOp::Sum).expect("the group still agrees");
            same(&t, &Tensor::full([7], comm.size() as f64, (Kind::Float, Device::Cpu)), "all_reduce after a refused call");
        }
        "connect" => {
            assert!(!tch::Cuda::is_available(), "the connect scenario is for machines without a GPU");
            let size = comm.size();
            // Even where a rank names a device of its own, every rank reaches the same outcome.
            let r = comm.connect_cuda(rank % 2);
            if dev_arg == "nccl" {
                let e = r.expect_err("comm.backend = nccl without a GPU").to_string();
                assert!(e.contains("no CUDA device"), "{e}");
                println!("CONNECT rank {rank}: {e}");
            } else {
                assert!(!r.expect("auto falls back to host staging"), "NCCL cannot be in use without a GPU");
            }
            // The unique-id broadcast and the vote were joined by every rank: the next host
            // collective is matched, not paired with a leftover. (On the host communicator: a
            // group with comm.backend = nccl refuses CPU tensors.)
            let t = Tensor::full([5], rank as f64 + 1.0, (Kind::Float, Device::Cpu));
            comm.host().all_reduce(&t, ReduceOp::Sum).unwrap();
            same(&t, &Tensor::full([5], (size * (size + 1) / 2) as f64, (Kind::Float, Device::Cpu)), "all_reduce after connect");
        }
        "stranger" => {
            let dir = dir.expect("the stranger scenario needs FABBRICA_SELFTEST_DIR");
            let n = comm.size();
            let started = std::time::Instant::now();
            let mut rounds = 0u64;
            loop {
                // Rank 0 decides when to stop, so that every rank runs the same collectives.
                let go = Tensor::from_slice(&[(rank == 0 && dir.join("go").exists()) as i64]);
                comm.broadcast(&go, 0).unwrap();
                let t = data(rank, 1000, Kind::Float, Device::Cpu);
                comm.all_reduce(&t, ReduceOp::Sum).unwrap();
                same(&t, &reduce_ref(n, 1000, Kind::Float, ReduceOp::Sum), "all_reduce among strangers");
                let out = Tensor::zeros([n as i64 * 10], (Kind::Int64, Device::Cpu));
                comm.all_gather(&out, &data(rank, 10, Kind::Int64, Device::Cpu)).unwrap();
                let expect = Tensor::cat(&(0..n).map(|r| data(r, 10, Kind::Int64, Device::Cpu)).collect::<Vec<_>>(), 0);
                same(&out, &expect, "all_gather among strangers");
                rounds += 1;
                if go.int64_value(&[0]) == 1 {
                    break;
                }
                assert!(started.elapsed() < std::time::Duration::from_secs(300), "the test never wrote go");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let s = fabbrica_comm::watchdog::port_stats().expect("the watchdog runs");
            println!("PORT rank {rank} rejected {} dropped {} rounds {rounds}", s.rejected, s.dropped);
        }
        "flight-usr2" => {
            let dir = dir.expect("the flight-usr2 scenario needs FABBRICA_SELFTEST_DIR");
            let n = comm.size();
            let started = std::time::Instant::now();
            let mut rounds = 0u64;
            loop {
                let go = Tensor::from_slice(&[(rank == 0 && dir.join("go").exists()) as i64]);
                comm.broadcast(&go, 0).unwrap();
                let t = data(rank, 100, Kind::Float, Device::Cpu);
                comm.all_reduce(&t, ReduceOp::Sum).unwrap();
                same(&t, &reduce_ref(n, 100, Kind::Float, ReduceOp::Sum), "all_reduce while dumping");
                let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
                let recv = Tensor::zeros([10], (Kind::Float, Device::Cpu));
                let ws = comm.send_async(&data(rank, 10, Kind::Float, Device::Cpu), next).unwrap();
                comm.recv(&recv, prev).unwrap();
                ws.wait().unwrap();
                same(&recv, &data(prev, 10, Kind::Float, Device::Cpu), "ring while dumping");
                rounds += 1;
                if rounds == 1 {
                    // The test signals once a whole round (collectives and the ring) is recorded.
                    std::fs::write(dir.join(format!("round1.{rank}")), "").unwrap();
                }
                if go.int64_value(&[0]) == 1 {
                    break;
                }
                assert!(started.elapsed() < std::time::Duration::from_secs(300), "the test never wrote go");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            println!("FLIGHT rank {rank} rounds {rounds}");
        }
        "flight-kill" => {
            let dir = dir.expect("the flight-kill scenario needs FABBRICA_SELFTEST_DIR");
            let t = Tensor::ones([1000], (Kind::Float, Device::Cpu));
            for _ in 0..5 {
                comm.all_reduce(&t, ReduceOp::Sum).unwrap();
            }
            if rank == comm.size() - 1 {
                std::fs::write(dir.join("asleep"), "").unwrap();
                std::thread::sleep(std::time::Duration::from_secs(120));
            } else {
                let _ = comm.all_reduce(&t, ReduceOp::Sum);
            }
            panic!("the killed rank's peers should have been ended by the watchdog");
        }
        "watchdog-stop" => {
            let dir = dir.expect("the watchdog-stop scenario needs FABBRICA_SELFTEST_DIR");
            let stopped: usize = dev_arg.parse().expect("watchdog-stop K: the number of ranks to stop");
            let t = Tensor::ones([1000], (Kind::Float, Device::Cpu));
            comm.all_reduce(&t, ReduceOp::Sum).unwrap();
            if rank + stopped >= comm.size() {
                // Skips the second all_reduce; the test stops this process (a frozen node: its port
                // still accepts connections, nothing answers on them).
                std::fs::write(dir.join(format!("asleep.{rank}")), "").unwrap();
                std::thread::sleep(std::time::Duration::from_secs(120));
            } else {
                let _ = comm.all_reduce(&t, ReduceOp::Sum);
            }
            panic!("the watchdog should have ended the job");
        }
        "flight-bench" => {
            let iters: u32 = args.get(3).map(|a| a.parse().expect("ITERS")).unwrap_or(2000);
            let rounds: usize = args.get(4).map(|a| a.parse().expect("ROUNDS")).unwrap_or(11);
            assert!(fabbrica_comm::flight::capacity() > 0, "run with the flight recorder on (FABBRICA_FLIGHT_RECORDER unset or > 0)");
            if rank == 0 {
                println!(
                    "flight recorder cost: blocking all_reduce, f32, {} ranks, mpi backend (CPU), {iters} ops per round after {} warm-up, median of {rounds} rounds; on and off alternate round by round (order flipped each round)",
                    comm.size(),
                    iters / 10
                );
                println!("{:>8} {:>12} {:>12} {:>8} {:>14}", "bytes", "off (us/op)", "on (us/op)", "on/off", "paired on/off");
            }
            let mut paired_all = Vec::new();
            let mut bytes = 8usize;
            while bytes <= 64 << 10 {
                let t = Tensor::ones([(bytes / 4) as i64], (Kind::Float, Device::Cpu));
                let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
                let mut paired = Vec::new();
                for round in 0..rounds {
                    for k in 0..2 {
                        let on = (k + round) % 2 == 1;
                        fabbrica_comm::flight::set_recording(on);
                        for _ in 0..iters / 10 {
                            comm.all_reduce(&t, ReduceOp::Max).unwrap();
                        }
                        comm.barrier().unwrap();
                        let start = std::time::Instant::now();
                        for _ in 0..iters {
                            comm.all_reduce(&t, ReduceOp::Max).unwrap();
                        }
                        let mine = Tensor::from_slice(&[(start.elapsed().as_secs_f64() * 1e6 / iters as f64) as f32]);
                        // The slowest rank's time per operation.
                        comm.all_reduce(&mine, ReduceOp::Max).unwrap();
                        times[on as usize].push(mine.double_value(&[0]));
                    }
                    // This round's on/off ratio: both halves ran back to back, under the same load.
                    paired.push(times[1][round] / times[0][round]);
                }
                fabbrica_comm::flight::set_recording(true);
                let (off, on) = (median(&mut times[0]), median(&mut times[1]));
                paired_all.extend_from_slice(&paired);
                let p = median(&mut paired);
                if rank == 0 {
                    println!("{bytes:>8} {off:>12.2} {on:>12.2} {:>8.3} {p:>14.3}", on / off);
                }
                bytes *= 2;
            }
            if rank == 0 {
                println!("all sizes: median paired on/off ratio {:.3} over {} rounds", median(&mut paired_all), paired_all.len());
                let mut alone: Vec<f64> = (0..5).map(|_| fabbrica_comm::flight::record_cost_ns(1_000_000)).collect();
                println!("recording alone (enqueue + start + complete, one thread): {:.0} ns per operation (median of 5 x 1e6)", median(&mut alone));
            }
        }
        other => panic!("unknown scenario {other}"),
    }
    println!("OK {scenario} rank {rank}");
}

/// The middle value (flight-bench).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Waits for the test's `go` file (bounded: a test that never writes it fails instead of hanging).
fn wait_for_go(dir: &std::path::Path) {
    let started = std::time::Instant::now();
    while !dir.join("go").exists() {
        assert!(started.elapsed() < std::time::Duration::from_secs(300), "the test never wrote go");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
