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

mod measure;
mod output;
use measure::*;
use output::*;

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
    let bad = || user(format!("{flag} '{s}' is not a byte size; use a whole number with an optional K, M or G suffix (binary), e.g. 8, 64K, 256M"));
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
            return if b.is_multiple_of(u) { format!("{}{name}", b / u) } else { format!("{:.1}{name}", b as f64 / u as f64) };
        }
    }
    format!("{b}B")
}

/// `K`/`M`/`G` form of a byte count for suggestions on the command line.
fn flag_size(b: u64) -> String {
    for (shift, s) in [(30, "G"), (20, "M"), (10, "K")] {
        if b >= 1 << shift && b.is_multiple_of(1 << shift) {
            return format!("{}{s}", b >> shift);
        }
    }
    b.to_string()
}

fn check_out_path(flag: &str, p: &Path) -> Result<()> {
    let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(user(format!("{flag} {}: the directory {} does not exist; create it or write elsewhere", p.display(), dir.display())));
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
        return Err(user("--op sendrecv needs at least 2 ranks and this is a single process; launch it with mpirun -np 2 (or more)".into()));
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
                return Err(user(format!("--min-bytes {s} is not a multiple of {unit} ({why}); use --min-bytes {}", flag_size(up))));
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
            return Err(user("--backend nccl needs a CUDA GPU and this machine shows none; use --backend mpi (CPU tensors)".into()));
        }
        fabbrica_comm::cuda_device_for(launch.local_rank, visible).map_err(|e| user(format!("--backend nccl: {e}")))?;
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
    // Rank 0 writes the results; under mpirun its early exit ends the job.
    if rank0 {
        crate::files::check_outputs(&[("--json", a.json.as_deref()), ("--plot", a.plot.as_deref())])?;
    }
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
    let opts = InitOptions { backend: if plan.nccl { BackendChoice::Nccl } else { BackendChoice::Mpi }, ..InitOptions::default() }
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
            crate::files::write_bytes(p, text.as_bytes()).map_err(|e| user(format!("--json {}: cannot write: {e}", p.display())))?;
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
            format!("{} gave wrong results at {} of {} sizes ({}); see the check column", plan.op.name(), bad.len(), rows.len(), bad.join(", "))
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
    let ratios: Vec<(u64, f64)> =
        rows.iter().filter(|r| r.bytes >= 1 << 20).filter_map(|r| r.raw_time_us.map(|t| (r.bytes, t / r.time_us))).collect();
    if !ratios.is_empty() {
        let geomean = (ratios.iter().map(|x| x.1.ln()).sum::<f64>() / ratios.len() as f64).exp();
        let mut sorted: Vec<f64> = ratios.iter().map(|x| x.1).collect();
        sorted.sort_by(f64::total_cmp);
        let median = if sorted.len() % 2 == 1 { sorted[sorted.len() / 2] } else { (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0 };
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
