//! `fabbrica bench collectives`: bandwidth of one collective over a range of message sizes, in the
//! format and with the conventions of nccl-tests (doc/PERFORMANCE.md), beside a raw baseline.
//!
//! Protocol, per size (sizes double from `--min-bytes` to `--max-bytes`, like nccl-tests `-f 2`):
//! 1. Correctness: inputs are filled with small integers that depend on the rank and the index
//!    (exact in f32 and bf16, and so are their sums), one operation runs, and every rank compares
//!    its result with the one it computes locally. The raw baseline is checked the same way.
//! 2. `--warmup` untimed operations of each implementation.
//! 3. Timing: `--iters` operations back to back between barriers, for fabbrica and then for the
//!    raw baseline (the order alternates from one size to the next, so that drift does not always
//!    favour the same side). A rank's time per operation is its elapsed time over `iters`; the
//!    reported time is the maximum over the ranks.
//!
//! Bandwidths: `algbw = bytes / time`, where bytes is the per-rank buffer (the gathered size for
//! all_gather, the input for reduce_scatter); `busbw = algbw × 2(n−1)/n` for all_reduce,
//! `× (n−1)/n` for all_gather and reduce_scatter, `× 1` for broadcast and sendrecv.
//!
//! The raw baseline is the MPI call that fabbrica's MPI backend makes, issued through rsmpi on
//! MPI_COMM_WORLD (fabbrica works on a duplicate, so the two never match each other's messages),
//! on the same tensors' memory: in-place `MPI_Allreduce` (rsmpi's safe API has no in-place form,
//! so that one goes through `mpi::ffi`; the out-of-place form would add a full copy and flatter
//! fabbrica), `all_gather_into`, `reduce_scatter_block_into`, `broadcast_into`, and
//! `immediate_send`/`immediate_receive_into`. bf16 moves as u16 words reduced by a user operation
//! that widens to f32 and rounds back to nearest-even, as fabbrica's does. With `--backend nccl`
//! (CUDA tensors) and in a world of one process there is no raw baseline.

use std::ffi::c_void;
use std::io::Write;
use std::os::raw::c_int;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use fabbrica_comm::{BackendChoice, Communicator, DType, Group, InitOptions, LaunchEnv, ReduceOp};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mpi::collective::{CommunicatorCollectives, Operation, Root, SystemOperation, UnsafeUserOperation};
use mpi::datatype::Equivalence;
use mpi::point_to_point::{Destination, Source};
use mpi::raw::AsRaw;
use mpi::topology::{Communicator as _, SimpleCommunicator};
use tch::{Device, Kind, Tensor};

use crate::commands::Failure;

type Result<T> = std::result::Result<T, Failure>;

const OPS: &str = "all_reduce, all_gather, reduce_scatter, broadcast, sendrecv";

#[derive(Args)]
pub struct CollectivesArgs {
    /// The collective: all_reduce, all_gather, reduce_scatter, broadcast or sendrecv.
    #[arg(long, value_name = "OP")]
    pub op: Option<String>,
    /// mpi (CPU tensors, with a raw rsmpi baseline) or nccl (CUDA tensors, no baseline).
    #[arg(long, default_value = "mpi")]
    pub backend: String,
    /// Element type: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Smallest message, in bytes (K, M, G suffixes are binary). Default 8, rounded up to a whole
    /// number of elements per rank where the op splits the buffer over the ranks.
    #[arg(long, value_name = "BYTES")]
    pub min_bytes: Option<String>,
    /// Largest message, in bytes (K, M, G suffixes are binary). Sizes double from the smallest.
    #[arg(long, value_name = "BYTES", default_value = "256M")]
    pub max_bytes: String,
    /// Timed operations per size (per implementation).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Untimed operations per size first (per implementation).
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Timed rounds per size: each round times `--iters` fabbrica operations and `--iters` raw
    /// ones, in alternating order; the reported time is the median round's. More rounds cancel
    /// noise on a shared machine.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Also write the results as JSON to this file (rank 0).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Plot bus bandwidth against message size into this .svg or .png file (rank 0).
    #[arg(long, value_name = "FILE.svg|png")]
    pub plot: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// What to run

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AllReduce,
    AllGather,
    ReduceScatter,
    Broadcast,
    SendRecv,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        match s {
            "all_reduce" => Some(Op::AllReduce),
            "all_gather" => Some(Op::AllGather),
            "reduce_scatter" => Some(Op::ReduceScatter),
            "broadcast" => Some(Op::Broadcast),
            "sendrecv" => Some(Op::SendRecv),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather",
            Op::ReduceScatter => "reduce_scatter",
            Op::Broadcast => "broadcast",
            Op::SendRecv => "sendrecv",
        }
    }
    /// nccl-tests' bus bandwidth factor for `n` ranks.
    fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            Op::AllReduce => 2.0 * (n - 1.0) / n,
            Op::AllGather | Op::ReduceScatter => (n - 1.0) / n,
            Op::Broadcast | Op::SendRecv => 1.0,
        }
    }
    /// The buffer is split evenly over the ranks.
    fn splits(self) -> bool {
        matches!(self, Op::AllGather | Op::ReduceScatter)
    }
    /// What the raw baseline calls, for the header.
    fn raw_call(self) -> &'static str {
        match self {
            Op::AllReduce => "MPI_Allreduce(MPI_IN_PLACE)",
            Op::AllGather => "MPI_Allgather (all_gather_into)",
            Op::ReduceScatter => "MPI_Reduce_scatter_block (reduce_scatter_block_into)",
            Op::Broadcast => "MPI_Bcast (broadcast_into)",
            Op::SendRecv => "MPI_Isend + MPI_Irecv (immediate_send, immediate_receive_into)",
        }
    }
}

struct Plan {
    op: Op,
    nccl: bool,
    dtype: DType,
    sizes: Vec<u64>,
    iters: usize,
    warmup: usize,
    rounds: usize,
    json: Option<PathBuf>,
    plot: Option<PathBuf>,
}

fn user(message: String) -> Failure {
    Failure { user: true, message }
}

/// `8`, `64K`, `256M`, `1G` (binary; `KB`, `KiB`, `B` spellings accepted).
fn parse_bytes(flag: &str, s: &str) -> Result<u64> {
    let bad = || {
        user(format!(
            "{flag} '{s}' is not a byte size; use a whole number with an optional K, M or G suffix (binary), e.g. 8, 64K, 256M"
        ))
    };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let num: u64 = num.parse().map_err(|_| bad())?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(bad()),
    };
    let v = num.checked_mul(1u64 << shift).ok_or_else(bad)?;
    if v == 0 {
        return Err(user(format!("{flag} '{s}' must be at least 1 byte; use e.g. {flag} 8")));
    }
    Ok(v)
}

/// `8B`, `64KiB`, `1.5MiB`: for messages and plot labels.
fn human(b: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (u, name) in UNITS {
        if b >= u {
            return if b % u == 0 { format!("{}{name}", b / u) } else { format!("{:.1}{name}", b as f64 / u as f64) };
        }
    }
    format!("{b}B")
}

/// `K`/`M`/`G` form of a byte count for suggestions on the command line.
fn flag_size(b: u64) -> String {
    for (shift, s) in [(30, "G"), (20, "M"), (10, "K")] {
        if b >= 1 << shift && b % (1 << shift) == 0 {
            return format!("{}{s}", b >> shift);
        }
    }
    b.to_string()
}

fn check_out_path(flag: &str, p: &Path) -> Result<()> {
    let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(user(format!(
            "{flag} {}: the directory {} does not exist; create it or write elsewhere",
            p.display(),
            dir.display()
        )));
    }
    if p.is_dir() {
        return Err(user(format!("{flag} {} is a directory; give a file name", p.display())));
    }
    Ok(())
}

fn validate(a: &CollectivesArgs, launch: &LaunchEnv) -> Result<Plan> {
    let op = match a.op.as_deref() {
        None => return Err(user(format!("--op is required; use one of {OPS}"))),
        Some(s) => Op::parse(s).ok_or_else(|| user(format!("--op '{s}' is not a benchmarked collective; use one of {OPS}")))?,
    };
    let nccl = match a.backend.as_str() {
        "mpi" => false,
        "nccl" => true,
        b => return Err(user(format!("--backend '{b}' is not supported; use mpi or nccl"))),
    };
    let dtype = match DType::parse(&a.dtype) {
        Some(d @ (DType::F32 | DType::Bf16)) => d,
        _ => return Err(user(format!("--dtype '{}' is not supported; use f32 or bf16", a.dtype))),
    };
    if a.iters == 0 {
        return Err(user("--iters must be at least 1".into()));
    }
    if a.rounds == 0 {
        return Err(user("--rounds must be at least 1".into()));
    }
    if let Some(p) = &a.plot {
        let ext = p.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
        if !matches!(ext.as_deref(), Some("svg" | "png")) {
            return Err(user(format!("--plot {}: the file name must end in .svg or .png", p.display())));
        }
        check_out_path("--plot", p)?;
    }
    if let Some(p) = &a.json {
        check_out_path("--json", p)?;
    }
    let n = launch.world_size;
    if op == Op::SendRecv && n < 2 {
        return Err(user(
            "--op sendrecv needs at least 2 ranks and this is a single process; launch it with mpirun -np 2 (or more)".into(),
        ));
    }
    // Every rank's share must be whole elements.
    let unit = dtype.size() as u64 * if op.splits() { n as u64 } else { 1 };
    let why = if op.splits() {
        format!("{}-byte {} elements × {n} ranks: {} splits the buffer evenly over the ranks", dtype.size(), dtype, op.name())
    } else {
        format!("the {}-byte size of {}", dtype.size(), dtype)
    };
    let min = match &a.min_bytes {
        Some(s) => {
            let v = parse_bytes("--min-bytes", s)?;
            if v % unit != 0 {
                let up = v.div_ceil(unit) * unit;
                return Err(user(format!(
                    "--min-bytes {s} is not a multiple of {unit} ({why}); use --min-bytes {}",
                    flag_size(up)
                )));
            }
            v
        }
        None => 8u64.div_ceil(unit) * unit,
    };
    let max = parse_bytes("--max-bytes", &a.max_bytes)?;
    if min > max {
        return Err(user(format!(
            "--min-bytes {} is larger than --max-bytes {}; use a --max-bytes of at least {}",
            flag_size(min),
            a.max_bytes,
            flag_size(min)
        )));
    }
    let mut sizes = vec![];
    let mut s = min;
    while s <= max {
        sizes.push(s);
        s = match s.checked_mul(2) {
            Some(v) => v,
            None => break,
        };
    }
    let largest = *sizes.last().unwrap();
    // MPI counts are C ints.
    let elems = largest / dtype.size() as u64;
    if elems > i32::MAX as u64 {
        let mut ok = min;
        while ok * 2 / (dtype.size() as u64) <= i32::MAX as u64 {
            ok *= 2;
        }
        return Err(user(format!(
            "--max-bytes {} reaches {} {} elements in one call, more than MPI moves at once (2^31-1); use --max-bytes {} or less",
            a.max_bytes,
            elems,
            dtype,
            flag_size(ok)
        )));
    }
    if nccl {
        let visible = tch::Cuda::device_count().max(0) as usize;
        if visible == 0 {
            return Err(user(
                "--backend nccl needs a CUDA GPU and this machine shows none; use --backend mpi (CPU tensors)".into(),
            ));
        }
        fabbrica_comm::cuda_device_for(launch.local_rank, visible)
            .map_err(|e| user(format!("--backend nccl: {e}")))?;
    }
    Ok(Plan { op, nccl, dtype, sizes, iters: a.iters, warmup: a.warmup, rounds: a.rounds, json: a.json.clone(), plot: a.plot.clone() })
}

// ---------------------------------------------------------------------------------------------
// Entry point

struct Row {
    bytes: u64,
    count: u64,
    time_us: f64,
    algbw: f64,
    busbw: f64,
    raw_time_us: Option<f64>,
    raw_busbw: Option<f64>,
    ok: bool,
}

pub fn run(a: CollectivesArgs) -> Result<()> {
    let launch = fabbrica_comm::launch::detect().map_err(|e| user(e.to_string()))?;
    let rank0 = launch.rank == 0;
    let plan = match validate(&a, &launch) {
        Ok(p) => p,
        // Every rank finds the same mistake; one line is enough.
        Err(e) if !rank0 => std::process::exit(if e.user { 2 } else { 1 }),
        Err(e) => return Err(e),
    };
    let r = bench(&plan);
    if !rank0 {
        if let Err(e) = &r {
            if e.message.is_empty() {
                std::process::exit(1);
            }
        }
    }
    r
}

fn bench(plan: &Plan) -> Result<()> {
    let opts = InitOptions {
        backend: if plan.nccl { BackendChoice::Nccl } else { BackendChoice::Mpi },
        ..InitOptions::default()
    }
    .with_env()
    .map_err(|e| user(e.to_string()))?;
    let world = fabbrica_comm::init(opts).map_err(|e| Failure { user: false, message: e.to_string() })?;
    let comm = world.comm();
    let (rank, n) = (comm.rank(), comm.size());
    let device = if plan.nccl {
        let visible = tch::Cuda::device_count().max(0) as usize;
        Device::Cuda(fabbrica_comm::cuda_device_for(world.launch().local_rank, visible).map_err(|e| user(e.to_string()))?)
    } else {
        // One thread for the fills and checks: libtorch's idle OpenMP workers would otherwise spin
        // beside the MPI ranks on small machines.
        tch::set_num_threads(1);
        Device::Cpu
    };
    // The raw baseline needs MPI on host memory.
    let raw_world = if plan.nccl { None } else { world.universe().map(|u| u.world()) };
    let bf16_sum = if plan.dtype == DType::Bf16 && raw_world.is_some() {
        // SAFETY: the function reads and writes exactly `len` 16-bit words of each buffer.
        Some(unsafe { UnsafeUserOperation::commutative(fabbrica_comm::mpi::bf16_sum) })
    } else {
        None
    };
    let raw_op = match &bf16_sum {
        Some(u) => RawOp(u.as_raw()),
        None => RawOp(SystemOperation::sum().as_raw()),
    };
    let rank0 = rank == 0;

    let raw_note = if plan.nccl {
        "none: --backend nccl moves CUDA tensors and there is no raw MPI baseline for them".to_string()
    } else if raw_world.is_none() {
        "none: a world of one process (no MPI); launch with mpirun -np N for a baseline".to_string()
    } else {
        format!("{} through rsmpi on MPI_COMM_WORLD, same buffers", plan.op.raw_call())
    };
    if rank0 {
        let mpi_version = world
            .universe()
            .and_then(|_| mpi::environment::library_version().ok())
            .map(|v| v.replace('\0', "").lines().next().unwrap_or("").trim().trim_end_matches(',').to_string());
        println!(
            "# fabbrica bench collectives: {}, {}, {}, {} backend ({} tensors), {} iters after {} warm-up{}",
            plan.op.name(),
            plan.dtype,
            ranks(n),
            if plan.nccl { "nccl" } else { "mpi" },
            if plan.nccl { "CUDA" } else { "CPU" },
            plan.iters,
            plan.warmup,
            if plan.rounds > 1 { format!(", median of {} rounds", plan.rounds) } else { String::new() }
        );
        if let Some(v) = mpi_version {
            println!("# MPI: {v}");
        }
        println!("# raw baseline: {raw_note}");
        println!("# time: per operation, the slowest rank's; algbw = size / time; busbw = algbw × {}", factor_text(plan.op));
        println!("#");
        println!(
            "# {:>10} {:>12} {:>5} {:>10} {:>7} {:>7} | {:>10} {:>7} {:>6} | {:>5}",
            "size", "count", "type", "time", "algbw", "busbw", "raw time", "busbw", "ratio", "check"
        );
        println!(
            "# {:>10} {:>12} {:>5} {:>10} {:>7} {:>7} | {:>10} {:>7} {:>6} | {:>5}",
            "(B)", "(elements)", "", "(us)", "(GB/s)", "(GB/s)", "(us)", "(GB/s)", "fab/raw", ""
        );
    }
    let progress = Progress::new(rank0, plan.sizes.len() as u64);
    // Test hook for the failure path (a wrong result must fail the run): this rank spoils one
    // element of each fabbrica result before checking it.
    let corrupt = std::env::var("FABBRICA_BENCH_CORRUPT_RANK").ok().and_then(|v| v.parse::<usize>().ok()) == Some(rank);

    let mut rows = Vec::with_capacity(plan.sizes.len());
    for (k, &bytes) in plan.sizes.iter().enumerate() {
        progress.start(bytes);
        let ctx = SizeCtx {
            op: plan.op,
            dtype: plan.dtype,
            device,
            comm: &comm,
            raw: raw_world.as_ref(),
            raw_op: &raw_op,
            rank,
            n,
            count: bytes / plan.dtype.size() as u64,
            corrupt,
        };
        let m = ctx.measure(plan.iters, plan.warmup, plan.rounds, k % 2 == 1).map_err(comm_failure)?;
        let secs = m.time.as_secs_f64();
        let algbw = bytes as f64 / secs / 1e9;
        let factor = plan.op.bus_factor(n);
        let raw_busbw = m.raw_time.map(|t| bytes as f64 / t.as_secs_f64() / 1e9 * factor);
        let row = Row {
            bytes,
            count: ctx.count,
            time_us: secs * 1e6,
            algbw,
            busbw: algbw * factor,
            raw_time_us: m.raw_time.map(|t| t.as_secs_f64() * 1e6),
            raw_busbw,
            ok: m.ok,
        };
        if rank0 {
            progress.println(&format_row(&row, plan.dtype));
        }
        rows.push(row);
        progress.done();
    }
    progress.finish();

    let all_ok = rows.iter().all(|r| r.ok);
    if rank0 {
        summary(&rows, plan.op);
        if let Some(p) = &plan.json {
            let v = serde_json::json!({
                "op": plan.op.name(),
                "backend": if plan.nccl { "nccl" } else { "mpi" },
                "world_size": n,
                "dtype": plan.dtype.name(),
                "iters": plan.iters,
                "warmup": plan.warmup,
                "rounds": plan.rounds,
                "bus_factor": plan.op.bus_factor(n),
                "raw_baseline": raw_note,
                "ok": all_ok,
                "rows": rows.iter().map(|r| serde_json::json!({
                    "bytes": r.bytes,
                    "count": r.count,
                    "dtype": plan.dtype.name(),
                    "time_us": r.time_us,
                    "algbw_gbps": r.algbw,
                    "busbw_gbps": r.busbw,
                    "raw_time_us": r.raw_time_us,
                    "raw_busbw_gbps": r.raw_busbw,
                    "ratio": r.raw_busbw.map(|rb| r.busbw / rb),
                    "ok": r.ok,
                })).collect::<Vec<_>>(),
            });
            let text = serde_json::to_string_pretty(&v).unwrap() + "\n";
            write_atomic(p, |f| f.write_all(text.as_bytes()))
                .map_err(|e| user(format!("--json {}: cannot write: {e}", p.display())))?;
        }
        if let Some(p) = &plan.plot {
            plot(p, &rows, plan, n).map_err(|e| Failure { user: false, message: format!("--plot {}: {e}", p.display()) })?;
        }
    }
    // MPI objects before MPI_Finalize (which dropping the world calls).
    drop(raw_world);
    drop(bf16_sum);
    drop(comm);
    drop(world);
    if !all_ok {
        let bad: Vec<String> = rows.iter().filter(|r| !r.ok).map(|r| human(r.bytes)).collect();
        // Only rank 0 says it; the others exit non-zero quietly (see `run`).
        let message = if rank0 {
            format!(
                "{} gave wrong results at {} of {} sizes ({}); see the check column",
                plan.op.name(),
                bad.len(),
                rows.len(),
                bad.join(", ")
            )
        } else {
            String::new()
        };
        return Err(Failure { user: false, message });
    }
    Ok(())
}

fn ranks(n: usize) -> String {
    if n == 1 {
        "1 rank".into()
    } else {
        format!("{n} ranks")
    }
}

fn comm_failure(e: fabbrica_comm::CommError) -> Failure {
    Failure { user: false, message: e.to_string() }
}

fn factor_text(op: Op) -> &'static str {
    match op {
        Op::AllReduce => "2(n-1)/n",
        Op::AllGather | Op::ReduceScatter => "(n-1)/n",
        Op::Broadcast | Op::SendRecv => "1",
    }
}

fn format_row(r: &Row, dtype: DType) -> String {
    let (rt, rb, ratio) = match (r.raw_time_us, r.raw_busbw) {
        (Some(t), Some(b)) => {
            let ratio = if b > 0.0 { format!("{:.3}", r.busbw / b) } else { format!("{:.3}", t / r.time_us) };
            (format!("{t:.2}"), format!("{b:.2}"), ratio)
        }
        _ => ("-".into(), "-".into(), "-".into()),
    };
    format!(
        "  {:>10} {:>12} {:>5} {:>10.2} {:>7.2} {:>7.2} | {:>10} {:>7} {:>6} | {:>5}",
        r.bytes,
        r.count,
        dtype.name(),
        r.time_us,
        r.algbw,
        r.busbw,
        rt,
        rb,
        ratio,
        if r.ok { "ok" } else { "WRONG" }
    )
}

fn summary(rows: &[Row], op: Op) {
    let avg = rows.iter().map(|r| r.busbw).sum::<f64>() / rows.len() as f64;
    println!("# avg bus bandwidth: {avg:.3} GB/s");
    // fabbrica/raw = raw time / fabbrica time (well defined even where the bus factor is 0).
    let ratios: Vec<(u64, f64)> = rows
        .iter()
        .filter(|r| r.bytes >= 1 << 20)
        .filter_map(|r| r.raw_time_us.map(|t| (r.bytes, t / r.time_us)))
        .collect();
    if !ratios.is_empty() {
        let geomean = (ratios.iter().map(|x| x.1.ln()).sum::<f64>() / ratios.len() as f64).exp();
        let mut sorted: Vec<f64> = ratios.iter().map(|x| x.1).collect();
        sorted.sort_by(f64::total_cmp);
        let median = if sorted.len() % 2 == 1 {
            sorted[sorted.len() / 2]
        } else {
            (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
        };
        let (at, min) = ratios.iter().copied().fold((0, f64::INFINITY), |a, x| if x.1 < a.1 { x } else { a });
        println!(
            "# fabbrica/raw busbw for messages >= 1 MiB ({} sizes): geomean {geomean:.3}, median {median:.3}, min {min:.3} at {}",
            ratios.len(),
            human(at),
        );
    }
    let bad = rows.iter().filter(|r| !r.ok).count();
    if bad == 0 {
        println!("# check: every result of {} matched the expected values", op.name());
    } else {
        println!("# check: {bad} of {} sizes gave WRONG results", rows.len());
    }
}

// ---------------------------------------------------------------------------------------------
// One size

struct SizeCtx<'a> {
    op: Op,
    dtype: DType,
    device: Device,
    comm: &'a Arc<Group>,
    raw: Option<&'a SimpleCommunicator>,
    raw_op: &'a RawOp,
    rank: usize,
    n: usize,
    /// Elements in the per-rank buffer (the gathered one for all_gather, the input for
    /// reduce_scatter).
    count: u64,
    /// Test hook: spoil this rank's fabbrica result before the check.
    corrupt: bool,
}

struct Measured {
    time: Duration,
    raw_time: Option<Duration>,
    ok: bool,
}

/// The tensors of one size. `a` is the in-place buffer, the input, or the send buffer; `b` the
/// output or the receive buffer.
struct Bufs {
    a: Tensor,
    b: Option<Tensor>,
}

impl SizeCtx<'_> {
    fn kind(&self) -> Kind {
        self.dtype.kind()
    }

    /// Small integers, exact in f32 and bf16, as are sums of `n` of them: (7i + 3r) mod m with
    /// (m−1)·n ≤ 256.
    fn modulus(&self) -> u64 {
        (256 / self.n as u64).clamp(2, 16)
    }

    fn value(&self, r: usize, i: u64) -> f32 {
        ((i * 7 + r as u64 * 3) % self.modulus()) as f32
    }

    /// A CPU tensor of `len` elements whose element j is `f(offset + j)`; `f` must have period
    /// `modulus()`, so one period is built and repeated.
    fn periodic(&self, len: u64, offset: u64, f: impl Fn(u64) -> f32) -> Tensor {
        let m = self.modulus();
        let base: Vec<f32> = (0..m).map(|j| f(offset + j)).collect();
        let reps = len.div_ceil(m) as i64;
        Tensor::from_slice(&base).to_kind(self.kind()).repeat([reps]).narrow(0, 0, len as i64)
    }

    fn pattern(&self, r: usize, len: u64, offset: u64) -> Tensor {
        self.periodic(len, offset, |i| self.value(r, i))
    }

    fn sum_pattern(&self, len: u64, offset: u64) -> Tensor {
        self.periodic(len, offset, |i| (0..self.n).map(|r| self.value(r, i)).sum())
    }

    fn chunk(&self) -> u64 {
        if self.op.splits() {
            self.count / self.n as u64
        } else {
            self.count
        }
    }

    fn alloc(&self) -> Bufs {
        let opts = (self.kind(), self.device);
        let (c, chunk) = (self.count as i64, self.chunk() as i64);
        match self.op {
            Op::AllReduce | Op::Broadcast => Bufs { a: Tensor::empty([c], opts), b: None },
            Op::AllGather => Bufs { a: Tensor::empty([chunk], opts), b: Some(Tensor::empty([c], opts)) },
            Op::ReduceScatter => Bufs { a: Tensor::empty([c], opts), b: Some(Tensor::empty([chunk], opts)) },
            Op::SendRecv => Bufs { a: Tensor::empty([c], opts), b: Some(Tensor::empty([c], opts)) },
        }
    }

    fn prev(&self) -> usize {
        (self.rank + self.n - 1) % self.n
    }
    fn next(&self) -> usize {
        (self.rank + 1) % self.n
    }

    /// Inputs for the correctness check; outputs get -1 (never a correct value).
    fn fill(&self, bufs: &Bufs) {
        let mut a = bufs.a.shallow_clone();
        match self.op {
            Op::Broadcast if self.rank != 0 => {
                let _ = a.fill_(-1.0);
            }
            _ => {
                a.copy_(&self.pattern(self.rank, a.numel() as u64, 0));
            }
        }
        if let Some(b) = &bufs.b {
            let _ = b.shallow_clone().fill_(-1.0);
        }
    }

    /// Whether the result in `bufs` is the expected one.
    fn check(&self, bufs: &Bufs) -> bool {
        let (got, want) = match self.op {
            Op::AllReduce => (&bufs.a, self.sum_pattern(self.count, 0)),
            Op::Broadcast => (&bufs.a, self.pattern(0, self.count, 0)),
            Op::AllGather => {
                let parts: Vec<Tensor> = (0..self.n).map(|r| self.pattern(r, self.chunk(), 0)).collect();
                (bufs.b.as_ref().unwrap(), Tensor::cat(&parts, 0))
            }
            Op::ReduceScatter => (bufs.b.as_ref().unwrap(), self.sum_pattern(self.chunk(), self.rank as u64 * self.chunk())),
            Op::SendRecv => (bufs.b.as_ref().unwrap(), self.pattern(self.prev(), self.count, 0)),
        };
        got.to_device(Device::Cpu).equal(&want)
    }

    /// One fabbrica operation.
    fn fab(&self, bufs: &Bufs) -> fabbrica_comm::Result<()> {
        let c = self.comm;
        match self.op {
            Op::AllReduce => c.all_reduce(&bufs.a, ReduceOp::Sum),
            Op::Broadcast => c.broadcast(&bufs.a, 0),
            Op::AllGather => c.all_gather(bufs.b.as_ref().unwrap(), &bufs.a),
            Op::ReduceScatter => c.reduce_scatter(bufs.b.as_ref().unwrap(), &bufs.a, ReduceOp::Sum),
            Op::SendRecv => {
                let recv = c.recv_async(bufs.b.as_ref().unwrap(), self.prev())?;
                let send = c.send_async(&bufs.a, self.next())?;
                send.wait()?;
                recv.wait()
            }
        }
    }

    /// One raw rsmpi operation on the same memory.
    fn raw(&self, world: &SimpleCommunicator, bufs: &Bufs) {
        match self.dtype {
            DType::Bf16 => self.raw_typed::<u16>(world, bufs),
            _ => self.raw_typed::<f32>(world, bufs),
        }
    }

    fn raw_typed<T: Equivalence>(&self, world: &SimpleCommunicator, bufs: &Bufs) {
        // SAFETY: CPU tensors of this size and dtype (T has the dtype's width), alive for the call;
        // `a` and `b` never overlap.
        let a: &mut [T] = unsafe { view(&bufs.a) };
        let b: Option<&mut [T]> = bufs.b.as_ref().map(|t| unsafe { view(t) });
        match self.op {
            Op::AllReduce => {
                let rc = unsafe {
                    mpi::ffi::MPI_Allreduce(
                        fabbrica_comm::mpi::in_place(),
                        a.as_mut_ptr() as *mut c_void,
                        a.len() as c_int,
                        T::equivalent_datatype().as_raw(),
                        self.raw_op.as_raw(),
                        world.as_raw(),
                    )
                };
                // MPI_COMM_WORLD's handler aborts on errors; a return code is a bug here.
                assert_eq!(rc, 0, "MPI_Allreduce returned {rc}");
            }
            Op::Broadcast => world.process_at_rank(0).broadcast_into(a),
            Op::AllGather => world.all_gather_into(&a[..], b.unwrap()),
            Op::ReduceScatter => world.reduce_scatter_block_into(&a[..], b.unwrap(), self.raw_op),
            Op::SendRecv => {
                let b = b.unwrap();
                let (next, prev) = (world.process_at_rank(self.next() as i32), world.process_at_rank(self.prev() as i32));
                mpi::request::scope(|s| {
                    let r = prev.immediate_receive_into(s, b);
                    let w = next.immediate_send(s, &a[..]);
                    w.wait();
                    r.wait();
                });
            }
        }
    }

    fn sync(&self) {
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
    }

    /// `iters` fabbrica operations between barriers: this rank's elapsed time.
    fn time_fab(&self, bufs: &Bufs, iters: usize) -> fabbrica_comm::Result<Duration> {
        self.sync();
        self.comm.barrier()?;
        let t0 = Instant::now();
        for _ in 0..iters {
            self.fab(bufs)?;
        }
        self.sync();
        let t = t0.elapsed();
        self.comm.barrier()?;
        Ok(t)
    }

    fn time_raw(&self, world: &SimpleCommunicator, bufs: &Bufs, iters: usize) -> Duration {
        world.barrier();
        let t0 = Instant::now();
        for _ in 0..iters {
            self.raw(world, bufs);
        }
        let t = t0.elapsed();
        world.barrier();
        t
    }

    fn measure(&self, iters: usize, warmup: usize, rounds: usize, raw_first: bool) -> fabbrica_comm::Result<Measured> {
        let bufs = self.alloc();
        // Correctness, on fresh inputs.
        self.fill(&bufs);
        self.fab(&bufs)?;
        self.sync();
        if self.corrupt {
            let _ = bufs.b.as_ref().unwrap_or(&bufs.a).narrow(0, 0, 1).fill_(-7.0);
        }
        let fab_ok = self.check(&bufs);
        let mut raw_ok = true;
        if let Some(w) = self.raw {
            self.fill(&bufs);
            self.raw(w, &bufs);
            raw_ok = self.check(&bufs);
        }
        // Warm-up, then the timed blocks (values keep changing; only their time matters now).
        for _ in 0..warmup {
            self.fab(&bufs)?;
        }
        self.sync();
        if let Some(w) = self.raw {
            for _ in 0..warmup {
                self.raw(w, &bufs);
            }
        }
        // Timed rounds: fabbrica and raw blocks alternate (and which goes first alternates too),
        // so that drift on a shared machine hits both. Each round's time is the slowest rank's.
        let mut fab_times = Vec::with_capacity(rounds);
        let mut raw_times = Vec::with_capacity(rounds);
        for round in 0..rounds {
            let (f, r) = match self.raw {
                Some(w) if (round % 2 == 1) != raw_first => {
                    let r = self.time_raw(w, &bufs, iters);
                    (self.time_fab(&bufs, iters)?, Some(r))
                }
                Some(w) => {
                    let f = self.time_fab(&bufs, iters)?;
                    (f, Some(self.time_raw(w, &bufs, iters)))
                }
                None => (self.time_fab(&bufs, iters)?, None),
            };
            let mut v = [f.as_nanos() as i64, r.map(|t| t.as_nanos() as i64).unwrap_or(0)];
            let t = Tensor::from_slice(&v);
            self.comm.all_reduce(&t, ReduceOp::Max)?;
            t.copy_data(&mut v, 2);
            fab_times.push(v[0]);
            raw_times.push(v[1]);
        }
        // Whether any rank saw a wrong result.
        let mut bad = [(!fab_ok) as i64, (!raw_ok) as i64];
        let t = Tensor::from_slice(&bad);
        self.comm.all_reduce(&t, ReduceOp::Max)?;
        t.copy_data(&mut bad, 2);
        let per_op = |ns: i64| Duration::from_nanos((ns as u64).div_ceil(iters as u64));
        Ok(Measured {
            time: per_op(median(&mut fab_times)),
            raw_time: self.raw.map(|_| per_op(median(&mut raw_times))),
            ok: bad == [0, 0],
        })
    }
}

/// The median (the lower middle one for an even count).
fn median(v: &mut [i64]) -> i64 {
    v.sort_unstable();
    v[(v.len() - 1) / 2]
}

/// # Safety
/// `t` is a contiguous CPU tensor whose element width is `size_of::<T>()`, alive and not
/// otherwise accessed while the slice is used.
// A tch `Tensor` is a shared handle to memory that libtorch itself mutates through `&Tensor`
// (every in-place op takes `&self` in spirit); the caller guarantees no other view is alive.
#[allow(clippy::mut_from_ref)]
unsafe fn view<'t, T>(t: &'t Tensor) -> &'t mut [T] {
    debug_assert!(t.device() == Device::Cpu && t.is_contiguous());
    debug_assert_eq!(t.kind().elt_size_in_bytes(), std::mem::size_of::<T>());
    std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, t.numel())
}

/// An MPI reduction handle (built-in or user), usable with rsmpi's safe collectives.
struct RawOp(mpi::ffi::MPI_Op);

unsafe impl AsRaw for RawOp {
    type Raw = mpi::ffi::MPI_Op;
    fn as_raw(&self) -> Self::Raw {
        self.0
    }
}

impl Operation for RawOp {}

// ---------------------------------------------------------------------------------------------
// Progress (rank 0, on a terminal only)

struct Progress(Option<ProgressBar>);

impl Progress {
    fn new(rank0: bool, sizes: u64) -> Progress {
        if !rank0 {
            return Progress(None);
        }
        let target = ProgressDrawTarget::stderr();
        if target.is_hidden() {
            return Progress(None);
        }
        let bar = ProgressBar::with_draw_target(Some(sizes), target);
        bar.set_style(
            ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} sizes [{elapsed_precise}] {msg}")
                .expect("valid template")
                .progress_chars("█▉▊▋▌▍▎▏ "),
        );
        Progress(Some(bar))
    }
    fn start(&self, bytes: u64) {
        if let Some(b) = &self.0 {
            b.set_message(human(bytes));
        }
    }
    fn done(&self) {
        if let Some(b) = &self.0 {
            b.inc(1);
        }
    }
    fn println(&self, s: &str) {
        match &self.0 {
            Some(b) => b.suspend(|| println!("{s}")),
            None => println!("{s}"),
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Output files

/// `dir/.name.tmp-<pid>.ext`: same directory (so the rename is atomic), same extension (the PNG
/// encoder picks the format by it).
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let ext = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}{ext}", std::process::id()))
}

fn write_atomic(path: &Path, fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// What the chart shows, whatever the backend.
struct Chart<'a> {
    title: String,
    x: (f64, f64),
    ymax: f64,
    n_labels: usize,
    fab: Vec<(f64, f64)>,
    raw: Vec<(f64, f64)>,
    label: &'a dyn Fn(&f64) -> String,
}

/// Bus bandwidth (fabbrica, and the raw baseline when there is one) against message size, on a
/// log2 x axis. Text needs a system font (through fontconfig); without one the chart is drawn
/// without text rather than not at all, and says so on stdout.
fn plot(path: &Path, rows: &[Row], plan: &Plan, n: usize) -> std::result::Result<(), String> {
    use plotters::prelude::*;

    let png = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
    let size = (960u32, 600u32);
    let fab: Vec<(f64, f64)> = rows.iter().map(|r| ((r.bytes as f64).log2(), r.busbw)).collect();
    let raw: Vec<(f64, f64)> =
        rows.iter().filter_map(|r| r.raw_busbw.map(|b| ((r.bytes as f64).log2(), b))).collect();
    let (mut x0, mut x1) = (fab[0].0, fab[fab.len() - 1].0);
    if x1 - x0 < 1.0 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    let ymax = fab.iter().chain(raw.iter()).map(|p| p.1).fold(0.0, f64::max);
    let label = |x: &f64| {
        let r = x.round();
        if (x - r).abs() < 1e-6 && r >= 0.0 {
            human(1u64 << (r as u32))
        } else {
            String::new()
        }
    };
    let chart = Chart {
        title: format!(
            "{} {}, {}, {} backend: bus bandwidth",
            plan.op.name(),
            plan.dtype,
            ranks(n),
            if plan.nccl { "nccl" } else { "mpi" }
        ),
        x: (x0, x1),
        ymax: if ymax > 0.0 { ymax * 1.1 } else { 1.0 },
        n_labels: ((x1 - x0).round() as usize + 1).min(30),
        fab,
        raw,
        label: &label,
    };

    fn draw<DB: DrawingBackend>(root: DrawingArea<DB, plotters::coord::Shift>, c: &Chart, text: bool) -> std::result::Result<(), String>
    where
        DB::ErrorType: 'static,
    {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(16);
        if text {
            builder.caption(&c.title, ("sans-serif", 22)).x_label_area_size(48).y_label_area_size(64);
        }
        let mut chart = builder.build_cartesian_2d(c.x.0..c.x.1, 0.0..c.ymax).map_err(e)?;
        if text {
            chart
                .configure_mesh()
                .x_labels(c.n_labels)
                .x_label_formatter(c.label)
                .x_desc("message size (bytes, log2 scale)")
                .y_desc("bus bandwidth (GB/s)")
                .draw()
                .map_err(e)?;
        } else {
            // The mesh looks its label font up even with no labels: a plain frame instead.
            let frame = [(c.x.0, 0.0), (c.x.1, 0.0), (c.x.1, c.ymax), (c.x.0, c.ymax), (c.x.0, 0.0)];
            chart.draw_series(std::iter::once(PathElement::new(frame.to_vec(), BLACK))).map_err(e)?;
        }
        let blue = RGBColor(31, 119, 180);
        let orange = RGBColor(255, 127, 14);
        for (points, color, name) in [(&c.fab, blue, "fabbrica"), (&c.raw, orange, "raw MPI (rsmpi)")] {
            if points.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
                .map_err(e)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(e)?;
        }
        if text {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(e)?;
        }
        root.present().map_err(e)
    }

    // One attempt: draw, then put the file in place atomically.
    let attempt = |text: bool| -> std::result::Result<(), String> {
        if png {
            let tmp = temp_path(path);
            let r = draw(BitMapBackend::new(&tmp, size).into_drawing_area(), &chart, text)
                .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| format!("cannot write: {e}")));
            if r.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            r
        } else {
            let mut svg = String::new();
            draw(SVGBackend::with_string(&mut svg, size).into_drawing_area(), &chart, text)?;
            write_atomic(path, |f| f.write_all(svg.as_bytes())).map_err(|e| format!("cannot write: {e}"))
        }
    };
    // Font lookup fails with an error, or (fontconfig missing, loaded at run time) with a panic:
    // both mean "no text", silently.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let with_text = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| attempt(true)));
    std::panic::set_hook(hook);
    match with_text {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.starts_with("cannot write") => Err(e),
        failed => {
            let why = match failed {
                Ok(Err(e)) => e,
                _ => "fontconfig is not available".into(),
            };
            let hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(|_| {}));
            let plain = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| attempt(false)));
            std::panic::set_hook(hook);
            plain.unwrap_or_else(|_| Err(format!("cannot draw the chart ({why})")))?;
            println!("# plot {}: drawn without text (no usable font: {why})", path.display());
            Ok(())
        }
    }
}
