//! Memory: a run that cannot fit is refused before the first step, with the numbers and what to
//! lower ([`check_fits`]), and an allocation that fails anyway during training becomes an error
//! that names the step and the tensor's size instead of a panic in libtorch's allocator
//! ([`guard_alloc`]).
//!
//! The check compares the cost model's estimate ([`fabbrica_models::memory_estimate`]: weights,
//! gradients, AdamW moments, activations at `train.batch_size`) with what is free: on the CPU,
//! `MemAvailable` (or the cgroup's limit, when lower) shared among the ranks on this node; on a
//! GPU, the device's free memory from the CUDA driver (`cuMemGetInfo`). The model's weights,
//! already built when the check runs, are counted as available to the run. Only a run whose
//! estimate exceeds what is available is refused: the estimate is a little above what runs
//! really use, so a run that is refused would not have fitted.

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};

use fabbrica_models::flops::{stage_memory_estimate_tp, Attention};
use fabbrica_models::{MemoryEstimate, StageSpec};
use fabbrica_pipeline::{simulate, Costs, Schedule};
use tch::Device;

use crate::error::TrainError;
use crate::trainer::Setup;

/// `1.5 GiB`, `320.0 MiB`, `12 bytes`.
pub fn human_bytes(b: u64) -> String {
    const KIB: f64 = 1024.0;
    let x = b as f64;
    if x >= KIB * KIB * KIB {
        format!("{:.1} GiB", x / (KIB * KIB * KIB))
    } else if x >= KIB * KIB {
        format!("{:.1} MiB", x / (KIB * KIB))
    } else if x >= KIB {
        format!("{:.1} KiB", x / KIB)
    } else {
        format!("{b} bytes")
    }
}

fn gib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1u64 << 30) as f64)
}

/// The estimate for the run `s` describes, per rank: tensor parallelism divides what its layers
/// hold (and sequence parallelism the rest of the activations); ZeRO-1 (`parallel.zero = 1`) divides the
/// AdamW moments among the `dp` data-parallel ranks; a pipeline rank holds its stages' weights
/// and the activations of the micro-batches its schedule keeps in flight.
pub fn estimate(s: &Setup, dp: usize) -> MemoryEstimate {
    let cfg = &s.cfg;
    let attention = attention_kernel(s.device, &cfg.model);
    let e = match &s.pipeline {
        None => stage_memory_estimate_tp(
            &cfg.model,
            &[StageSpec::whole(cfg.model.n_layer())],
            cfg.train.batch_size,
            cfg.model.block_size(),
            s.bf16,
            attention,
            cfg.recompute(),
            1,
            cfg.parallel.tp,
            cfg.parallel.sequence_parallel,
        ),
        Some(pl) => {
            let rank = pl.schedule.rank_of_stage(s.parts[0].stage);
            let specs: Vec<StageSpec> = s.parts.iter().map(|p| p.model.stage().clone()).collect();
            stage_memory_estimate_tp(
                &cfg.model,
                &specs,
                cfg.train.batch_size,
                cfg.model.block_size(),
                s.bf16,
                attention,
                cfg.recompute(),
                in_flight(&pl.schedule)[rank],
                cfg.parallel.tp,
                cfg.parallel.sequence_parallel,
            )
        }
    };
    per_rank(e, cfg, dp, s.device)
}

/// `e` as one rank of `dp` holds it on `device`: ZeRO-1 (`parallel.zero = 1`) divides the AdamW
/// moments among the data-parallel ranks; resident memory on the CPU ([`on_device`]).
fn per_rank(mut e: MemoryEstimate, cfg: &crate::Config, dp: usize, device: Device) -> MemoryEstimate {
    if cfg.parallel.zero == 1 && dp > 1 {
        e.optimizer = e.optimizer.div_ceil(dp as u64);
    }
    on_device(e, device)
}

/// The attention kernel libtorch runs: fused, except on the CPU with dropout, where it takes the
/// math path (its fused CPU kernel has no dropout) and keeps the B·H·T×T scores.
pub fn attention_kernel(device: Device, model: &fabbrica_models::ModelConfig) -> Attention {
    if device == Device::Cpu && model.dropout() > 0.0 {
        Attention::Math
    } else {
        Attention::Fused
    }
}

/// The estimate as the device holds it: what libtorch allocates on a GPU (its caching
/// allocator's `max_memory_allocated`), resident memory on the CPU
/// ([`MemoryEstimate::resident_on_cpu`]).
pub fn on_device(e: MemoryEstimate, device: Device) -> MemoryEstimate {
    if device == Device::Cpu {
        e.resident_on_cpu()
    } else {
        e
    }
}

/// Micro-batches whose activations each pipeline rank holds at its peak, from the schedule's
/// simulation (forward 1, backward 2, free transfers): `pp - rank` for 1F1B, every micro-batch
/// for GPipe.
pub fn in_flight(schedule: &Schedule) -> Vec<usize> {
    let lowered = if schedule.is_lowered() { schedule.clone() } else { fabbrica_pipeline::lower(schedule) };
    simulate(&lowered, Costs { f: 1, b: 2, comm: 0 }).map(|t| t.peak_in_flight).unwrap_or_else(|_| vec![schedule.microbatches; schedule.pp])
}

/// One pipeline rank of a planned run, for `--dry-run`.
#[derive(Debug, Clone)]
pub struct RankPlan {
    pub pp_rank: usize,
    /// (stage, its layers as a range of block indices, its parameters).
    pub stages: Vec<(usize, std::ops::Range<usize>, u64)>,
    pub in_flight: usize,
    pub memory: MemoryEstimate,
    /// The simulated schedule's idle fraction on this rank (forward 1, backward 2, free transfers).
    pub bubble: f64,
}

/// The pipeline of `cfg` rank by rank (`None` without one): the split, memory and simulated
/// bubble, from the same code the trainer runs. `model` has its vocabulary resolved.
pub fn pipeline_plan(
    cfg: &crate::config::Config,
    model: &fabbrica_models::ModelConfig,
    bf16: bool,
    device: Device,
    dp: usize,
) -> Result<Option<Vec<RankPlan>>, TrainError> {
    let attention = attention_kernel(device, model);
    let Some((schedule, layers)) = cfg.pipeline_shape()? else { return Ok(None) };
    let lowered = fabbrica_pipeline::lower(&schedule);
    let timeline = simulate(&lowered, Costs { f: 1, b: 2, comm: 0 }).map_err(|d| TrainError::Pipeline(d.to_string()))?;
    let specs = StageSpec::split(&layers);
    let mut plans = Vec::new();
    for r in 0..schedule.pp {
        let mine: Vec<StageSpec> = (0..specs.len()).filter(|&st| schedule.rank_of_stage(st) == r).map(|st| specs[st].clone()).collect();
        let mut memory = stage_memory_estimate_tp(
            model,
            &mine,
            cfg.train.batch_size,
            model.block_size(),
            bf16,
            attention,
            cfg.recompute(),
            timeline.peak_in_flight[r],
            cfg.parallel.tp,
            cfg.parallel.sequence_parallel,
        );
        if cfg.parallel.zero == 1 && dp > 1 {
            memory.optimizer = memory.optimizer.div_ceil(dp as u64);
        }
        plans.push(RankPlan {
            pp_rank: r,
            stages: (0..specs.len())
                .filter(|&st| schedule.rank_of_stage(st) == r)
                .map(|st| (st, specs[st].blocks.clone(), fabbrica_models::stage_params_tp(model, &specs[st], cfg.parallel.tp)))
                .collect(),
            in_flight: timeline.peak_in_flight[r],
            memory: on_device(memory, device),
            bubble: timeline.bubble[r],
        });
    }
    Ok(Some(plans))
}

/// Where the memory comes from, for the message.
#[derive(Debug, Clone, PartialEq)]
pub struct Available {
    /// Bytes this rank may use, the weights it already holds included.
    pub bytes: u64,
    /// e.g. `on this node for 2 ranks`, `free on cuda:0`.
    pub place: String,
}

/// Refuses (one line, the numbers and what to lower) when `need` exceeds `avail`. Activations
/// grow linearly with the micro-batch, so the message can say which `train.batch_size` would
/// fit; `dp` and `zero1` decide whether sharding the AdamW state (ZeRO-1) is worth suggesting.
pub fn refusal(need: &MemoryEstimate, avail: &Available, batch_size: usize, dp: usize, zero1: bool) -> Option<String> {
    if need.total() <= avail.bytes {
        return None;
    }
    let fixed = need.params + need.grads + need.optimizer;
    let per_seq = need.activations / batch_size.max(1) as u64;
    let fits = |fixed: u64| if fixed >= avail.bytes { 0 } else { (avail.bytes - fixed) / per_seq.max(1) };
    // ZeRO-1 would keep 1/dp of the moments here.
    let sharded = fixed - need.optimizer + need.optimizer.div_ceil(dp.max(1) as u64);
    let zero_hint = if !zero1 && dp > 1 && fits(sharded) > fits(fixed) {
        format!(", or set parallel.zero=1 to shard the AdamW state over the {dp} data-parallel ranks")
    } else {
        String::new()
    };
    let what = match fits(fixed) {
        0 => format!("the model alone (weights, gradients and AdamW state: {} GiB) does not fit: use a smaller model{zero_hint}", gib(fixed)),
        b => format!(
            "lower train.batch_size to {} or less (and raise train.grad_accum to keep the global batch), lower model.block_size or use a smaller model{zero_hint}",
            b.min(batch_size as u64 - 1)
        ),
    };
    Some(format!(
        "this run needs about {} GiB per rank (params {}, grads {}, AdamW {}, activations {} at train.batch_size={batch_size}), but {} GiB are available {}: {what}",
        gib(need.total()),
        gib(need.params),
        gib(need.grads),
        gib(need.optimizer),
        gib(need.activations),
        gib(avail.bytes),
        avail.place,
    ))
}

/// Before the first step: refuses the run `s` when its estimate exceeds the memory available to
/// this rank. `local_ranks` is the number of ranks on this node (they share its RAM), `dp` the
/// data-parallel degree. Nothing is refused when the free memory cannot be read.
pub fn check_fits(s: &Setup, local_ranks: usize, dp: usize) -> Result<(), TrainError> {
    check_need(&estimate(s, dp), s.device, &s.cfg, local_ranks, dp)
}

/// [`check_fits`] for a whole model on one rank, before anything is built: what the benchmarks
/// (`bench train`, `bench ddp`) run, with `cfg`'s model (a vocabulary still to be taken from
/// the data counted as `vocab`), batch and block, on `device`.
pub fn check_fits_whole(cfg: &crate::Config, vocab: usize, device: Device, bf16: bool, local_ranks: usize, dp: usize) -> Result<(), TrainError> {
    let mut model = cfg.model.clone();
    if model.vocab_size() == 0 {
        model.set_vocab_size(vocab);
    }
    let e = stage_memory_estimate_tp(
        &model,
        &[StageSpec::whole(model.n_layer())],
        cfg.train.batch_size,
        model.block_size(),
        bf16,
        attention_kernel(device, &model),
        cfg.recompute(),
        1,
        1,
        false,
    );
    check_need(&per_rank(e, cfg, dp, device), device, cfg, local_ranks, dp)
}

fn check_need(need: &MemoryEstimate, device: Device, cfg: &crate::Config, local_ranks: usize, dp: usize) -> Result<(), TrainError> {
    let avail = match device {
        Device::Cuda(i) => cuda_free_bytes(i).map(|free| Available { bytes: free.saturating_add(need.params), place: format!("on cuda:{i}") }),
        _ => host_available_bytes().map(|free| {
            let n = local_ranks.max(1);
            let place = if n == 1 { "on this node for 1 rank".to_string() } else { format!("per rank on this node for {n} ranks") };
            Available { bytes: (free / n as u64).saturating_add(need.params), place }
        }),
    };
    match avail.and_then(|a| refusal(need, &a, cfg.train.batch_size, dp, cfg.parallel.zero == 1)) {
        Some(msg) => Err(TrainError::NotEnoughMemory(msg)),
        None => Ok(()),
    }
}

/// Host memory free for new allocations: `MemAvailable`, or less when this process's cgroup
/// (a container, a Slurm job) is limited.
pub fn host_available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let avail = meminfo_available(&meminfo)?;
    Some(match cgroup_headroom() {
        Some(h) => avail.min(h),
        None => avail,
    })
}

/// `MemAvailable` of a /proc/meminfo text, in bytes.
pub fn meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Limit minus usage of this process's memory cgroup (v2, else v1), when it has a limit.
fn cgroup_headroom() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    // v2: a line `0::/path`.
    if let Some(path) = cg.lines().find_map(|l| l.strip_prefix("0::")) {
        let dir = format!("/sys/fs/cgroup{}", path.trim_end_matches('/'));
        if let (Some(max), Some(cur)) = (read(&format!("{dir}/memory.max")), read(&format!("{dir}/memory.current"))) {
            return Some(max.saturating_sub(cur));
        }
    }
    // v1: the limit is a huge number when unset.
    let (max, cur) = (read("/sys/fs/cgroup/memory/memory.limit_in_bytes")?, read("/sys/fs/cgroup/memory/memory.usage_in_bytes")?);
    (max < (1u64 << 60)).then(|| max.saturating_sub(cur))
}

/// Free memory of CUDA device `ordinal` from the driver (`cuMemGetInfo` in the device's primary
/// context, the one libtorch uses). Memory libtorch's caching allocator holds counts as used.
pub fn cuda_free_bytes(ordinal: usize) -> Option<u64> {
    // SAFETY: is_culib_present only tries to dlopen libcuda and drops the handle.
    if !tch::Cuda::is_available() || !unsafe { cudarc::driver::sys::is_culib_present() } {
        return None;
    }
    use cudarc::driver::result;
    result::init().ok()?;
    let dev = result::device::get(ordinal as i32).ok()?;
    // SAFETY: the primary context is retained for the query and released after; making it
    // current on this thread is what the CUDA runtime (libtorch) does for this device anyway.
    unsafe {
        let ctx = result::primary_ctx::retain(dev).ok()?;
        let prev = result::ctx::get_current().ok().flatten();
        let free = result::ctx::set_current(ctx).ok().and_then(|_| result::mem_get_info().ok()).map(|(free, _total)| free as u64);
        if let Some(p) = prev {
            let _ = result::ctx::set_current(p);
        }
        let _ = result::primary_ctx::release(dev);
        free
    }
}

thread_local! {
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is inside [`guard_alloc`] (the panic hook stays silent for allocation
/// failures there: they become an error instead).
pub fn is_guarded() -> bool {
    GUARDED.with(Cell::get)
}

/// For a panic hook: true when this panic is an allocation failure that [`guard_alloc`] turns
/// into an error, so printing it (and a backtrace) would only add noise.
pub fn panic_is_handled(payload: &(dyn std::any::Any + Send)) -> bool {
    is_guarded() && panic_text(payload).and_then(alloc_failure).is_some()
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&'static str>().copied())
}

/// A libtorch allocation failure in a panic or error message: the tensor's size in bytes when
/// the message gives it, and the device. CPU: `DefaultCPUAllocator: can't allocate memory: you
/// tried to allocate 4096 bytes`; CUDA: `CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0
/// has a total capacity of ...`.
pub fn alloc_failure(msg: &str) -> Option<(Option<u64>, String)> {
    if let Some(i) = msg.find("can't allocate memory") {
        let rest = &msg[i..];
        let bytes = rest
            .find("tried to allocate ")
            .and_then(|j| rest[j + "tried to allocate ".len()..].split_whitespace().next())
            .and_then(|n| n.trim_end_matches(|c: char| !c.is_ascii_digit()).parse::<u64>().ok());
        return Some((bytes, "the CPU".to_string()));
    }
    if let Some(i) = msg.find("CUDA out of memory") {
        let rest = &msg[i..];
        let bytes = rest.find("Tried to allocate ").and_then(|j| {
            let mut it = rest[j + "Tried to allocate ".len()..].split_whitespace();
            let n: f64 = it.next()?.parse().ok()?;
            let unit = it.next()?.trim_end_matches(['.', ',', ';']);
            let scale = match unit {
                "B" | "bytes" => 1.0,
                "KiB" => 1024.0,
                "MiB" => 1024.0 * 1024.0,
                "GiB" => 1024.0 * 1024.0 * 1024.0,
                "TiB" => 1024.0f64.powi(4),
                _ => return None,
            };
            Some((n * scale).round() as u64)
        });
        let gpu = rest
            .find("GPU ")
            .and_then(|j| rest[j + 4..].split_whitespace().next())
            .and_then(|g| g.trim_end_matches(|c: char| !c.is_ascii_digit()).parse::<u32>().ok());
        return Some((bytes, gpu.map(|g| format!("cuda:{g}")).unwrap_or_else(|| "the GPU".to_string())));
    }
    None
}

/// A libtorch error returned (not panicked) at step `step`: an allocation failure becomes
/// [`TrainError::OutOfMemory`] with its size, anything else its first line.
pub fn torch_error(step: u64, e: tch::TchError) -> TrainError {
    let text = e.to_string();
    match alloc_failure(&text) {
        Some((bytes, device)) => TrainError::OutOfMemory { step, bytes, device },
        None => TrainError::Torch(text.lines().next().unwrap_or("libtorch error").to_string()),
    }
}

/// Runs `f` (a training step at `step`); a libtorch allocation failure inside it (a panic in
/// tch) becomes [`TrainError::OutOfMemory`], a failed tensor-parallel collective
/// [`TrainError::Comm`], any other panic continues unwinding. While `f` runs
/// the panic hook (installed by the binary, see [`panic_is_handled`]) does not print
/// allocation failures.
pub fn guard_alloc<T>(step: u64, f: impl FnOnce() -> T) -> Result<T, TrainError> {
    let before = GUARDED.with(|g| g.replace(true));
    let r = panic::catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(before));
    match r {
        Ok(v) => Ok(v),
        Err(payload) => {
            let text = panic_text(&*payload);
            if let Some((bytes, device)) = text.and_then(alloc_failure) {
                return Err(TrainError::OutOfMemory { step, bytes, device });
            }
            // A tensor-parallel collective inside the model's forward (the operators panic: a
            // forward returns tensors, not results).
            match text.filter(|t| t.starts_with("tensor-parallel")) {
                Some(t) => Err(TrainError::Comm(format!("step {step}: {}", t.lines().next().unwrap_or(t)))),
                None => panic::resume_unwind(payload),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn allocation_failures_are_recognised_with_their_size() {
        let cpu = "called `Result::unwrap()` on an `Err` value: Torch(\"DefaultCPUAllocator: can't allocate memory: you tried to allocate 1125899906842624 bytes. Error code 12 (Cannot allocate memory)\\nException raised from ...\")";
        assert_eq!(alloc_failure(cpu), Some((Some(1 << 50), "the CPU".to_string())));
        let cuda = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 3 has a total capacity of 79.19 GiB of which 1.06 GiB is free.";
        assert_eq!(alloc_failure(cuda), Some((Some(2 << 30), "cuda:3".to_string())));
        let cuda = "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.78 GiB total capacity)";
        assert_eq!(alloc_failure(cuda), Some((Some(20 << 20), "cuda:0".to_string())));
        assert_eq!(alloc_failure("index out of range in self"), None);
    }

    #[test]
    fn a_real_cpu_allocation_failure_becomes_an_error_naming_step_and_size() {
        // 1 PiB: above any machine's RAM and above the 128 TiB of user address space, so it fails
        // whatever the overcommit policy (no lazy success).
        let r = guard_alloc(7, || Tensor::empty([1i64 << 50], (Kind::Uint8, Device::Cpu)).numel());
        let e = r.unwrap_err();
        assert!(matches!(e, TrainError::OutOfMemory { step: 7, bytes: Some(b), .. } if b == 1 << 50), "{e:?}");
        let line = e.to_string();
        assert!(line.contains("step 7") && line.contains("1048576.0 GiB") && line.contains("train.batch_size") && !line.contains('\n'), "{line}");
        assert!(e.is_user_error());
        assert!(!is_guarded(), "the flag is reset after a failure");
        // And a step that allocates what it can proceeds.
        assert_eq!(guard_alloc(8, || Tensor::zeros([4], (Kind::Float, Device::Cpu)).numel()).unwrap(), 4);
    }

    #[test]
    fn other_panics_are_raised_again() {
        let r = panic::catch_unwind(|| guard_alloc(1, || -> u32 { panic!("index 9 is out of bounds") }));
        let payload = r.unwrap_err();
        assert_eq!(panic_text(&*payload), Some("index 9 is out of bounds"));
        assert!(!is_guarded());
        // A libtorch error that is not about memory is not an allocation failure either.
        let r = panic::catch_unwind(|| {
            guard_alloc(1, || Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)).matmul(&Tensor::zeros([2, 3], (Kind::Float, Device::Cpu))))
        });
        assert!(r.is_err());
    }

    #[test]
    fn the_panic_hook_is_silent_only_for_allocation_failures_inside_the_guard() {
        let oom: Box<dyn std::any::Any + Send> = Box::new(String::from("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes."));
        let other: Box<dyn std::any::Any + Send> = Box::new("attempt to divide by zero");
        assert!(!panic_is_handled(&*oom), "outside guard_alloc every panic is printed");
        assert_eq!(guard_alloc(1, || (panic_is_handled(&*oom), panic_is_handled(&*other))).unwrap(), (true, false));
        assert!(!panic_is_handled(&*oom));
    }

    fn est(params: u64, act: u64) -> MemoryEstimate {
        MemoryEstimate { params, grads: params, optimizer: 2 * params, activations: act, logits: 0 }
    }

    #[test]
    fn refuses_only_what_does_not_fit_and_says_what_to_lower() {
        let g = 1u64 << 30;
        let avail = Available { bytes: 20 * g, place: "on this node for 1 rank".into() };
        assert_eq!(refusal(&est(g / 2, 10 * g), &avail, 64, 1, false), None);
        assert_eq!(refusal(&est(g / 2, 18 * g), &avail, 64, 1, false), None, "exactly at the limit fits");
        // 512 sequences of 80 MiB each; 18 GiB are left after the 2 GiB of state: 230 fit.
        let m = refusal(&est(g / 2, 40 * g), &avail, 512, 1, false).unwrap();
        assert_eq!(
            m,
            "this run needs about 42.0 GiB per rank (params 0.5, grads 0.5, AdamW 1.0, activations 40.0 at train.batch_size=512), but 20.0 GiB are available on this node for 1 rank: lower train.batch_size to 230 or less (and raise train.grad_accum to keep the global batch), lower model.block_size or use a smaller model"
        );
        // ZeRO-1 is suggested only where there are data-parallel ranks to shard over.
        let m = refusal(&est(g / 2, 40 * g), &avail, 512, 4, false).unwrap();
        assert!(m.contains("parallel.zero=1 to shard the AdamW state over the 4 data-parallel ranks"), "{m}");
        assert!(!refusal(&est(g / 2, 40 * g), &avail, 512, 4, true).unwrap().contains("parallel.zero"));
        // A model whose state alone is too large.
        let m = refusal(&est(8 * g, g), &avail, 1, 1, false).unwrap();
        assert!(m.contains("the model alone (weights, gradients and AdamW state: 32.0 GiB) does not fit: use a smaller model"), "{m}");
        assert!(!m.contains('\n'));
    }

    #[test]
    fn meminfo_and_sizes_read() {
        assert_eq!(meminfo_available("MemTotal: 100 kB\nMemAvailable:   2048 kB\n"), Some(2048 * 1024));
        assert_eq!(meminfo_available("MemTotal: 100 kB\n"), None);
        assert!(host_available_bytes().unwrap() > 0);
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(12), "12 bytes");
    }
}
