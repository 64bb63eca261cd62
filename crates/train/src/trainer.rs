//! The training loop: micro-steps with gradient accumulation, clipping, AdamW, periodic
//! evaluation, metrics, checkpoints and resume.
//!
//! Determinism: at the start of optimizer step `s`, libtorch's RNG is reseeded from
//! (seed, s) and batches are a pure function of (seed, step, sample index). A run resumed from
//! the checkpoint of step k therefore draws exactly what the uninterrupted run drew.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabbrica_comm::{Communicator, InitOptions, LaunchEnv, ReduceOp, World};

use fabbrica_data::{Sampler, Split};
use fabbrica_models::{flops_per_token, Model, TensorParallel};
use tch::{Device, Kind, Tensor};

use crate::checkpoint;
use crate::config::{CheckpointFailure, Config, IfExists, Nonfinite, Resume};
use crate::device::peak_memory_bytes;
use crate::error::TrainError;
use crate::grads::Grads;
use crate::grid::Grid;
use crate::lr_schedule::CosineSchedule;
use crate::metrics::{MetricsLog, Progress, Record, StageReport, Stragglers};
use crate::optim::{AdamW, AdamWConfig};
use crate::pipelined::StageTimes;
use crate::sample::sample_text;
use crate::saver::{save_checkpoint, Completed, RunState, Saver};
use crate::setup::tp_local;
pub use crate::setup::{setup, setup_on, setup_stage, Part, Pipeline, Setup};
use crate::step::{ForwardBackward, Local, Pipelined};

pub use crate::evaluate::evaluate;
use crate::evaluate::evaluate_grid;

#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Draw progress (rank 0 only; a bar on a terminal, lines otherwise).
    pub progress: bool,
}

#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub steps: u64,
    pub train_loss: f64,
    pub val_loss: f64,
    pub sample: Option<String>,
    pub out_dir: PathBuf,
    pub checkpoint: PathBuf,
    /// What the run did besides training, said at its start (fallbacks, archived files, removed
    /// temporaries); rank 0 only.
    pub notes: Vec<String>,
    /// Updates dropped for a NaN/Inf (`train.nonfinite = skip`), over the whole run.
    pub skipped_steps: u64,
}

/// Decorrelates per-step (and per-micro-batch) seeds drawn from one base seed: splitmix64 of
/// the seed and the step's odd-multiplier spread (the data crate's one implementation).
pub(crate) fn mix(seed: u64, step: u64) -> i64 {
    (fabbrica_data::splitmix64(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 1) as i64
}

/// A micro-batch's tokens as a `[b, t]` tensor on `device`. To a GPU through pinned memory, so the
/// copy does not wait for the kernels already queued (`torch_ext::to_cuda_pinned`); through
/// pageable memory where pinning fails.
pub(crate) fn to_tensor(v: Vec<i64>, b: usize, t: usize, device: Device) -> Tensor {
    let host = Tensor::from_slice(&v).view([b as i64, t as i64]);
    match device {
        Device::Cuda(i) => fabbrica_torch_ext::to_cuda_pinned(&host, i).unwrap_or_else(|_| host.to_device(device)),
        _ => host,
    }
}

fn comm_err(e: fabbrica_comm::CommError) -> TrainError {
    TrainError::Collective(e)
}

/// Trains in this process alone (a world of one, no launcher).
pub fn train(cfg: &Config, opts: &TrainOptions) -> Result<TrainOutcome, TrainError> {
    let world = fabbrica_comm::init_with(LaunchEnv::single(), comm_options(cfg)?).map_err(comm_err)?;
    train_in(&world, cfg, opts)
}

/// The communicator settings of `cfg` (`comm.*`), with the environment's overrides.
pub fn comm_options(cfg: &Config) -> Result<InitOptions, TrainError> {
    let backend = cfg.comm.backend;
    // Config::validate bounds it too; a Config built in code may not have been validated.
    crate::config::check_timeout_s(cfg.comm.timeout_s)?;
    InitOptions { timeout: Duration::from_secs_f64(cfg.comm.timeout_s), debug: cfg.comm.debug, backend }
        .with_env()
        // with_env only reads FABBRICA_COMM_TIMEOUT and FABBRICA_COMM_DEBUG: a bad value the user set.
        .map_err(|e| TrainError::Config(crate::ConfigError::Env(e.to_string())))
}

/// Trains on every rank of `world`: a `parallel.pp × parallel.dp` grid of pipeline stages and
/// data-parallel replicas (`crates/topology` orders the ranks; `grid.rs` makes the groups).
pub fn train_in(world: &World, cfg: &Config, opts: &TrainOptions) -> Result<TrainOutcome, TrainError> {
    let comm: Arc<dyn Communicator> = world.comm();
    let (rank, nranks) = (comm.rank(), comm.size());
    // Flight recorder dumps (a hang, a communication error, SIGUSR2) go to run.out_dir/flight/.
    fabbrica_comm::flight::set_dump_dir(&cfg.run.out_dir);
    let dims = crate::grid::dims(cfg, nranks)?;
    crate::grid::check_tp_fits_node(dims.tp, world.launch().local_world_size, nranks)?;
    let coords = dims.coords(rank).map_err(|e| TrainError::Parallel(e.to_string()))?;
    let dp = dims.dp;
    let rank0 = rank == 0;
    // Local rank i takes cuda:i; a rank that sees a single GPU (srun --gpus-per-task=1, or
    // CUDA_VISIBLE_DEVICES set per rank) takes that one.
    let local = world.launch().local_rank;
    let ordinal = fabbrica_comm::cuda_device_for(local, tch::Cuda::device_count() as usize).unwrap_or(local);
    // Everything that can fail on bad input, on every rank, before the first collective that
    // would wait for a failed rank: data, model, device, output directory, checkpoint.
    // Tensor parallelism: the model holds the region operators; their group is bound below, once
    // every rank's setup has succeeded.
    let region = Arc::new(crate::tensor_parallel::TpRegion::default());
    let plan = (dims.tp > 1).then(|| TensorParallel {
        rank: coords.tp,
        size: dims.tp,
        sequence_parallel: cfg.parallel.sequence_parallel,
        ops: region.clone(),
    });
    let preflight = (|| -> Result<(Setup, Option<checkpoint::Resume>), TrainError> {
        let s = setup_stage(cfg, ordinal, coords.pp, plan.clone())?;
        crate::memory::check_fits(&s, world.launch().local_world_size, dp)?;
        let out = &s.cfg.run.out_dir;
        if rank0 {
            std::fs::create_dir_all(out).map_err(crate::error::checkpoint_file(|e| {
                format!("cannot use run.out_dir = {} ({e}): set run.out_dir to a writable directory", out.display())
            }))?;
        }
        let explicit = Some(s.cfg.run.resume_from.as_path()).filter(|p| !p.as_os_str().is_empty());
        let wanted = explicit.is_some()
            || match s.cfg.run.resume {
                Resume::Yes => true,
                // Requeued jobs: resume when there is something to resume (a corrupt-only set is
                // still an error from find_resume, never a silent start from step 0).
                Resume::Auto => !checkpoint::earlier_run(out)?.is_empty(),
                Resume::No => false,
            };
        let resume = if wanted { Some(checkpoint::find_resume(out, explicit)?) } else { None };
        if let Some(r) = &resume {
            let (step, max) = (r.loaded.state.step, s.cfg.train.max_steps);
            if step > max {
                return Err(TrainError::Config(crate::ConfigError::Invalid {
                    key: "train.max_steps".into(),
                    value: max.to_string(),
                    why: format!(
                        "the checkpoint to resume from ({}) has already trained {step} steps: raise train.max_steps above {step} to train on",
                        r.loaded.dir.display()
                    ),
                }));
            }
        }
        // A fresh run (or one starting from another run's checkpoint) never mixes its checkpoints
        // with an earlier run's in the same directory: refuse, or archive that run first.
        if resume.as_ref().is_none_or(|r| !r.in_run) {
            let earlier = checkpoint::earlier_run(out)?;
            if let Some(newest) = earlier.last() {
                if s.cfg.run.if_exists != IfExists::Archive {
                    return Err(TrainError::Checkpoint(format!(
                        "run.out_dir = {} already holds checkpoints of an earlier run (newest: {}): continue it with run.resume=true, keep it and start anew with run.if_exists=archive (moves it to {}/archive/), or choose another run.out_dir",
                        out.display(),
                        newest.file_name().unwrap_or_default().to_string_lossy(),
                        out.display()
                    )));
                }
            }
        }
        Ok((s, resume))
    })();
    let (s, resume_from) = agree(&*comm, preflight)?;
    crate::agreement::check_setup(
        &*comm,
        &s,
        &[("resume.step", resume_from.as_ref().map_or_else(|| "none".to_string(), |r| r.loaded.state.step.to_string()))],
    )?;
    let cfg = &s.cfg;
    let out = cfg.run.out_dir.clone();
    // Rank 0 (the writer) tidies the run directory before anything is written; every rank then
    // knows whether that worked.
    let tidied = if rank0 { tidy(&out, cfg, resume_from.as_ref()) } else { Ok(Vec::new()) };
    let notes = agree(&*comm, tidied)?;
    if opts.progress && rank0 {
        for n in &notes {
            eprintln!("note: {n}");
        }
    }
    // A run keeps its identity across resumes; a fresh one (or one started from another run's
    // checkpoint) gets a new one. Retention only ever removes checkpoints of this identity.
    let global_batch = cfg.train.batch_size * cfg.train.grad_accum * dp;
    let mut run = RunState { id: checkpoint::new_run_id(), skipped_steps: 0, last_saved: None, last_snapshot_step: None, global_batch };
    if let Some(r) = resume_from.as_ref().filter(|r| r.in_run) {
        if !r.loaded.state.run_id.is_empty() {
            run.id = r.loaded.state.run_id.clone();
        }
        run.skipped_steps = r.loaded.state.skipped_steps;
        run.last_saved = Some(r.loaded.dir.clone());
        run.last_snapshot_step = Some(r.loaded.state.step);
    }

    // The gradients' NCCL communicator is created now, collectively, so that an NCCL that cannot
    // start fails here with its reason rather than inside the first backward.
    let grads_over = match s.device {
        Device::Cuda(i) => {
            if world.comm().connect_cuda(i).map_err(comm_err)? {
                " over nccl".to_string()
            } else {
                format!(" over {}, staged through host memory", comm.backend())
            }
        }
        _ if nranks > 1 => format!(" over {}", comm.backend()),
        _ => String::new(),
    };
    let grid = Grid::new(world, dims)?;
    region.bind(grid.tp.clone());

    let ddp_opts = crate::grads::ddp_options(cfg, world.debug());
    let models: Vec<&Model> = s.parts.iter().map(|p| &p.model).collect();
    let grads = Grads::apply(&models, &grid, ddp_opts)?;
    let zero1 = cfg.parallel.zero == 1;
    let adam = AdamWConfig {
        beta1: cfg.train.beta1,
        beta2: cfg.train.beta2,
        eps: cfg.train.eps,
        weight_decay: cfg.train.weight_decay,
        fused: cfg.fused_adamw(),
    };
    let mut opt = AdamW::from_parts(grads.optimizer_params(), adam);

    let resumed = resume_from.is_some();
    // Resuming with another global batch changes what the run computes: said, with how to keep it.
    if let Some(was) = resume_from.as_ref().map(|r| r.loaded.state.global_batch as usize).filter(|&b| b > 0) {
        let now = global_batch;
        if was != now && rank0 && opts.progress {
            let per_accum = cfg.train.batch_size * dp;
            let keep = if was % per_accum == 0 {
                format!("set train.grad_accum to {} to keep it", was / per_accum)
            } else {
                format!("to keep it, choose train.batch_size and train.grad_accum with train.batch_size x train.grad_accum x {dp} = {was}")
            };
            eprintln!(
                "note: the checkpoint was trained with a global batch of {was} sequences, this run has {now} (micro {} x accum {} x dp {dp}): {keep}",
                cfg.train.batch_size, cfg.train.grad_accum,
            );
        }
    }
    let start = match resume_from {
        Some(resume) => restore(&s, &mut opt, resume.loaded)?,
        None => 0,
    };
    let mut log = if rank0 {
        let log = MetricsLog::open(&out, resumed.then_some(start))?;
        checkpoint::write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())?;
        Some(log)
    } else {
        None
    };

    let sched = CosineSchedule { lr: cfg.train.lr, min_lr: cfg.train.min_lr, warmup_steps: cfg.train.warmup_steps, decay_steps: cfg.decay_steps() };
    let sampler = Sampler::new(cfg.run.seed);
    let tokens_per_step = (global_batch * cfg.model.block_size()) as f64;
    let flops_tok = flops_per_token(&cfg.model, cfg.model.block_size());
    let peak = crate::device::peak_flops(cfg.train.peak_flops, s.device);
    let progress = Progress::new(cfg.train.max_steps, start, opts.progress && rank0);
    let layout = layout_line(&s, &grid);
    progress.println(&format!(
        "training {} parameters on {:?} ({}), {layout}, global batch {global_batch} = micro {} x accum {} x dp {dp} ({} tokens/step), {} buckets{grads_over}{}, steps {}..{}",
        fabbrica_models::flops::total_params(&cfg.model),
        s.device,
        crate::device::precision_label(s.bf16, cfg.train.tf32, s.device),
        cfg.train.batch_size,
        cfg.train.grad_accum,
        tokens_per_step,
        grads.buckets(),
        if zero1 { ", ZeRO-1" } else { "" },
        start,
        cfg.train.max_steps
    ));
    if s.bf16 && s.device == tch::Device::Cpu && !crate::device::cpu_has_bf16() {
        progress.println("note: this CPU has no bf16 instructions (avx512_bf16, amx_bf16): bf16 autocast runs emulated, many times slower than fp32 (train.dtype=fp32 or auto)");
    }

    let stop_at = if cfg.run.stop_at > 0 { cfg.run.stop_at.min(cfg.train.max_steps) } else { cfg.train.max_steps };
    let inject = nan_injection()?;
    // Until this function returns, SIGTERM/SIGINT/SIGUSR1 only ask the loop to stop at a step boundary.
    let _signals = crate::signals::install(nranks > 1);
    // Background writes need a host copy of the state (on rank 0, the whole model's).
    let copy = 12 * fabbrica_models::flops::total_params(&cfg.model);
    let room = crate::memory::host_available_bytes().is_none_or(|avail| avail / 2 > copy);
    let mut saver = Saver::new(run, cfg.run.async_checkpoint && room);
    if rank0 && opts.progress && cfg.run.async_checkpoint && !room {
        eprintln!(
            "note: checkpoints are written synchronously: a host copy ({}) does not fit in half the available memory",
            crate::memory::human_bytes(copy)
        );
    }
    let mut window = (Instant::now(), 0u64); // (start of log window, steps in it)
    let mut waited = Duration::ZERO; // time blocked on gradient communication in the window
    let mut stage_times = StageTimes::default(); // pipeline: measured in the window
    let mut tracelog = crate::trace::TraceLog::default(); // run.trace
    let mut last_val: Option<f64> = None;
    let mut tp_window = crate::metrics::TpTraffic::default(); // tensor parallelism: per step, summed over the window
    let tp_now = || {
        use fabbrica_comm::traffic::Counted::*;
        let t = &grid.tp_traffic;
        let (ar, ag, rs) = (t.get(AllReduce), t.get(AllGather), t.get(ReduceScatter));
        crate::metrics::TpTraffic {
            all_reduce_elements: ar.elements,
            all_gather_elements: ag.elements,
            reduce_scatter_elements: rs.elements,
            bytes: ar.bytes + ag.bytes + rs.bytes,
        }
    };
    let mut step = start;
    let world_comm: &dyn Communicator = &*grid.world;
    let eval = |split: Split| evaluate_grid(&s, &sampler, &grid, split, cfg.train.eval_iters);
    // This replica's micro-batches are the global ones from its data-parallel coordinate on.
    let first_micro = coords.dp * cfg.train.grad_accum;
    // The step's forward and backward: chosen once, from the layout.
    let mut fb: Box<dyn ForwardBackward> = if s.pipeline.is_some() {
        Box::new(Pipelined { setup: &s, sampler: &sampler, grads: &grads, pp: &*grid.pp, first_micro, last: None })
    } else {
        Box::new(Local { setup: &s, sampler: &sampler, grads: &grads, first_micro })
    };
    while step < stop_at {
        let lr = sched.lr_at(step);
        // Steps are numbered from 1 in logs, metrics and messages (`step` updates done after it).
        let poison = inject == Some((step + 1, rank));
        let tp_before = tp_now();
        let origin = crate::trace::wall_us();
        let loss = crate::memory::guard_alloc(step + 1, || fb.run(step, poison))??;
        if let Some((times, trace)) = fb.pipeline_report() {
            stage_times.add(&times);
            if cfg.run.trace {
                tracelog.record(step + 1, origin, &trace);
            }
        }
        waited += grads.finish()?;
        let norm = grads.clip(cfg.train.grad_clip)?;
        let tp_after = tp_now();
        tp_window.all_reduce_elements += tp_after.all_reduce_elements - tp_before.all_reduce_elements;
        tp_window.all_gather_elements += tp_after.all_gather_elements - tp_before.all_gather_elements;
        tp_window.reduce_scatter_elements += tp_after.reduce_scatter_elements - tp_before.reduce_scatter_elements;
        tp_window.bytes += tp_after.bytes - tp_before.bytes;
        // Every rank sees every rank's loss, the norm and any stop signal: all take the same branch.
        let check = check_step(world_comm, &loss, &norm, step + 1)?;
        if let Some(bad) = check.nonfinite {
            saver.run.skipped_steps += 1;
            if cfg.train.nonfinite == Nonfinite::Stop || saver.run.skipped_steps > cfg.train.max_skipped_steps {
                // A background write of an earlier step finishes first, so the message can name it.
                if let Some(done) = saver.settle() {
                    settled(done, true, cfg, &progress, &mut log)?;
                }
                let last = match &saver.run.last_saved {
                    Some(p) => format!("the last one is {}", p.display()),
                    None => "none was written before".into(),
                };
                let why = if cfg.train.nonfinite == Nonfinite::Stop {
                    "train.nonfinite = stop".to_string()
                } else {
                    format!("{} steps skipped, more than train.max_skipped_steps = {}", saver.run.skipped_steps, cfg.train.max_skipped_steps)
                };
                let again = if saver.run.last_saved.is_some() {
                    "then resume with run.resume=true"
                } else {
                    "then run it again from the start (there is no checkpoint to resume from)"
                };
                let msg =
                    format!("{bad} ({why}): stopped without writing a checkpoint ({last}): lower train.lr or set train.nonfinite=skip, {again}");
                progress.finish();
                // Every rank knows; one says it.
                return Err(if rank0 { TrainError::NonFinite(msg) } else { TrainError::Elsewhere { rank: 0, user: true } });
            }
            progress.println(&format!(
                "{bad}: update skipped (train.nonfinite = skip, {} of at most {} skipped)",
                saver.run.skipped_steps, cfg.train.max_skipped_steps
            ));
            if let Some(log) = log.as_mut() {
                log.write(&Record { kind: "skipped".into(), step: step + 1, note: Some(bad), ..empty_record() })?;
            }
            grads.zero_grad();
        } else {
            opt.step(lr).map_err(TrainError::Torch)?;
            grads.after_step()?;
            grads.zero_grad();
        }
        step += 1;
        window.1 += 1;

        if step.is_multiple_of(cfg.train.log_interval) || step == stop_at {
            // Mean over the data-parallel ranks: the loss of the global batch (every pipeline
            // stage knows its replica's). Reading it synchronises the device, so the timings
            // below are real.
            let l = loss.to_device(Device::Cpu).to_kind(Kind::Float).reshape([1]);
            grid.dp.all_reduce(&l, ReduceOp::Avg).map_err(comm_err)?;
            let last_loss = l.double_value(&[0]);
            let elapsed = window.0.elapsed().as_secs_f64();
            let tps = tokens_per_step * window.1 as f64 / elapsed;
            let (compute, wait) = (1e3 * (elapsed - waited.as_secs_f64()) / window.1 as f64, 1e3 * waited.as_secs_f64() / window.1 as f64);
            let stragglers = if nranks > 1 { Some(straggler_report(world_comm, compute, wait)?) } else { None };
            let pipeline = match &s.pipeline {
                Some(_) => Some(pipeline_report(&grid, &stage_times, window.1)?),
                None => None,
            };
            if let Some(log) = log.as_mut() {
                let rec = Record {
                    kind: "train".into(),
                    step,
                    loss: Some(last_loss),
                    lr: Some(lr),
                    grad_norm: Some(norm.double_value(&[])),
                    tokens_per_s: Some(tps),
                    mfu: peak.map(|p| flops_tok * tps / (p * nranks as f64)),
                    step_ms: Some(1e3 * elapsed / window.1 as f64),
                    peak_mem_bytes: Some(peak_memory_bytes(s.device)),
                    stragglers,
                    pipeline,
                    tp_traffic: (dims.tp > 1).then(|| {
                        let n = window.1.max(1);
                        crate::metrics::TpTraffic {
                            all_reduce_elements: tp_window.all_reduce_elements / n,
                            all_gather_elements: tp_window.all_gather_elements / n,
                            reduce_scatter_elements: tp_window.reduce_scatter_elements / n,
                            bytes: tp_window.bytes / n,
                        }
                    }),
                    ..empty_record()
                };
                log.write(&rec)?;
            }
            progress.step(step, Some(format!("loss {last_loss:.4} lr {lr:.2e} {tps:.0} tok/s")));
            window = (Instant::now(), 0);
            waited = Duration::ZERO;
            stage_times = StageTimes::default();
            tp_window = crate::metrics::TpTraffic::default();
        } else {
            progress.step(step, None);
        }

        let last = step == stop_at;
        if step.is_multiple_of(cfg.train.eval_interval) || last {
            let tl = eval(Split::Train)?;
            let vl = eval(Split::Val)?;
            last_val = Some(vl);
            if let Some(log) = log.as_mut() {
                log.write(&Record { kind: "eval".into(), step, train_loss: Some(tl), val_loss: Some(vl), ..empty_record() })?;
            }
            progress.println(&format!("step {step}: train loss {tl:.4}, val loss {vl:.4}"));
            window = (Instant::now(), 0); // evaluation time is not training throughput
            waited = Duration::ZERO;
            stage_times = StageTimes::default();
            tp_window = crate::metrics::TpTraffic::default();
        }
        if (cfg.run.checkpoint_interval > 0 && step.is_multiple_of(cfg.run.checkpoint_interval)) || last {
            for done in save_checkpoint(&s, &grid, &grads, &opt, &mut saver, step, last_val, &mut log)? {
                settled(done, false, cfg, &progress, &mut log)?;
            }
        }
        if let Some((by, sig)) = check.signal {
            // Preempted: this step is done; its checkpoint is written (unless it just was) before
            // anyone leaves.
            if saver.run.last_snapshot_step != Some(step) {
                for done in save_checkpoint(&s, &grid, &grads, &opt, &mut saver, step, last_val, &mut log)? {
                    settled(done, false, cfg, &progress, &mut log)?;
                }
            }
            if let Some(done) = saver.settle() {
                settled(done, true, cfg, &progress, &mut log)?;
            }
            progress.finish();
            // Nobody leaves while rank 0 may still be writing.
            world_comm.barrier().map_err(comm_err)?;
            return Err(TrainError::Preempted { step, rank: by, signal: crate::signals::name(sig), checkpoint: saver.run.last_saved.clone() });
        }
    }
    progress.finish();

    let train_loss = eval(Split::Train)?;
    let val_loss = eval(Split::Val)?;
    // Every rank decides alike (saving is collective under ZeRO-1 and pipelines): by step, which all know.
    if saver.run.last_snapshot_step != Some(step) {
        // Nothing trained (already at max_steps): write the checkpoint of where it stands.
        for done in save_checkpoint(&s, &grid, &grads, &opt, &mut saver, step, Some(val_loss), &mut log)? {
            settled(done, false, cfg, &progress, &mut log)?;
        }
    }
    // The run's last checkpoint must be written, whatever run.checkpoint_failure says.
    if let Some(done) = saver.settle() {
        settled(done, true, cfg, &progress, &mut log)?;
    }
    let checkpoint = saver.run.last_saved.clone().unwrap_or_else(|| out.clone());
    if let (true, Some(pl)) = (cfg.run.trace, &s.pipeline) {
        // The simulated schedule with this rank's measured mean forward and backward times.
        let (f, b) = tracelog.mean_compute_us();
        let svg = fabbrica_pipeline::simulate(&pl.schedule, fabbrica_pipeline::Costs { f, b, comm: 0 }).ok().map(|t| fabbrica_pipeline::to_svg(&t));
        if let Some(path) = tracelog.write(&grid, &out, svg)? {
            let cut = if tracelog.truncated { format!(" (this rank's first {} actions)", crate::trace::MAX_EVENTS) } else { String::new() };
            progress.println(&format!(
                "trace: {}{cut} (open in ui.perfetto.dev); simulated schedule: {}",
                path.display(),
                out.join("trace/simulated.svg").display()
            ));
        }
    }
    let sample = if rank0 && cfg.run.sample_tokens > 0 {
        match &s.pipeline {
            None if dims.tp == 1 => Some(sample_text(s.model(), &s.data.tokenizer, "", cfg.run.sample_tokens, 0.8, Some(200), cfg.run.seed)),
            // Rank 0 holds only its stages or slices: it samples from the whole model in the checkpoint.
            _ => Some(crate::sample::sample_from_checkpoint(&crate::sample::SampleArgs {
                checkpoint: &checkpoint,
                prompt: "",
                tokens: cfg.run.sample_tokens,
                temperature: 0.8,
                top_k: Some(200),
                seed: cfg.run.seed,
                device: crate::config::DeviceChoice::Cpu,
            })?),
        }
    } else {
        None
    };
    // Nobody leaves (and finalises MPI) while rank 0 may still be writing.
    world_comm.barrier().map_err(comm_err)?;
    Ok(TrainOutcome { steps: step, train_loss, val_loss, sample, out_dir: out, checkpoint, notes, skipped_steps: saver.run.skipped_steps })
}

/// Every pipeline rank's compute, wait and idle fraction per step over the log window, gathered
/// from the first replica's stages (every rank takes part: a collective over the world).
fn pipeline_report(grid: &Grid, t: &StageTimes, steps: u64) -> Result<Vec<StageReport>, TrainError> {
    let n = grid.world.size();
    let per = |d: Duration| (1e3 * d.as_secs_f64() / steps.max(1) as f64) as f32;
    let mine = Tensor::from_slice(&[per(t.compute), per(t.wait), t.idle_fraction() as f32]);
    let all = Tensor::zeros([3 * n as i64], (Kind::Float, Device::Cpu));
    grid.world.all_gather(&all, &mine).map_err(comm_err)?;
    let v: Vec<f32> = Vec::try_from(all).map_err(|e: tch::TchError| TrainError::Torch(e.to_string()))?;
    let mut out = Vec::new();
    for p in 0..grid.dims.pp {
        let r = grid.dims.rank_of(fabbrica_topology::Coords { dp: 0, pp: p, tp: 0 }).map_err(|e| TrainError::Parallel(e.to_string()))?;
        out.push(StageReport { pp_rank: p, rank: r, compute_ms: v[3 * r] as f64, wait_ms: v[3 * r + 1] as f64, bubble: v[3 * r + 2] as f64 });
    }
    Ok(out)
}

/// `FABBRICA_INJECT_NAN=STEP:RANK`: fault injection for tests and drills. Rank RANK's loss at
/// step STEP (numbered from 1) becomes NaN before backward, so its gradients are NaN too.
fn nan_injection() -> Result<Option<(u64, usize)>, TrainError> {
    let Ok(v) = std::env::var("FABBRICA_INJECT_NAN") else { return Ok(None) };
    let parsed = v.split_once(':').and_then(|(a, b)| Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<usize>().ok()?)));
    match parsed {
        Some((step, rank)) if step > 0 => Ok(Some((step, rank))),
        _ => Err(TrainError::Config(crate::ConfigError::Env(format!(
            "FABBRICA_INJECT_NAN = {v:?} is invalid: use STEP:RANK with STEP counted from 1, e.g. FABBRICA_INJECT_NAN=5:1, or unset it"
        )))),
    }
}

/// What every rank learned about this step from every other: a NaN/Inf and where, and a stop
/// signal that reached some rank.
struct StepCheck {
    nonfinite: Option<String>,
    /// (lowest rank that got one, signal number).
    signal: Option<(usize, i32)>,
}

/// Gathers every rank's loss, the (global) gradient norm and the pending stop signal (3 floats a
/// rank), so every rank reaches the same verdict in the same step. The NaN/Inf description names
/// the step and the ranks.
fn check_step(comm: &dyn Communicator, loss: &Tensor, norm: &Tensor, step: u64) -> Result<StepCheck, TrainError> {
    let n = comm.size();
    let sig = crate::signals::pending().unwrap_or(0);
    let mine = Tensor::from_slice(&[loss.double_value(&[]) as f32, norm.double_value(&[]) as f32, sig as f32]);
    let all: Vec<f32> = if n == 1 {
        Vec::try_from(mine).map_err(|e: tch::TchError| TrainError::Torch(e.to_string()))?
    } else {
        let all = Tensor::zeros([3 * n as i64], (Kind::Float, Device::Cpu));
        comm.all_gather(&all, &mine).map_err(comm_err)?;
        Vec::try_from(all).map_err(|e: tch::TchError| TrainError::Torch(e.to_string()))?
    };
    let signal = all.chunks(3).enumerate().find(|(_, v)| v[2] != 0.0).map(|(r, v)| (r, v[2] as i32));
    let bad_loss: Vec<(usize, f32)> = all.chunks(3).enumerate().filter(|(_, v)| !v[0].is_finite()).map(|(r, v)| (r, v[0])).collect();
    let bad_norm: Vec<(usize, f32)> = all.chunks(3).enumerate().filter(|(_, v)| !v[1].is_finite()).map(|(r, v)| (r, v[1])).collect();
    if bad_loss.is_empty() && bad_norm.is_empty() {
        return Ok(StepCheck { nonfinite: None, signal });
    }
    let fmt = |v: &[(usize, f32)]| v.iter().map(|(r, x)| format!("{x} on rank {r}")).collect::<Vec<_>>().join(", ");
    let what = match (bad_loss.is_empty(), bad_norm.is_empty()) {
        (false, false) => format!("the loss is {} and the gradient norm is {}", fmt(&bad_loss), bad_norm[0].1),
        (false, true) => format!("the loss is {}", fmt(&bad_loss)),
        _ => format!("the gradient norm is {} (the loss is finite on every rank)", bad_norm[0].1),
    };
    Ok(StepCheck { nonfinite: Some(format!("step {step}: {what}")), signal })
}

/// Rank 0 tidies the run directory before this run writes anything: removes the temporaries of
/// writers that died mid-write, and moves aside what this run must not mix with: an earlier run
/// (a fresh run with `run.if_exists = archive`) or checkpoints ahead of the one resumed from.
/// Returns what it did, for the user.
fn tidy(out: &std::path::Path, cfg: &Config, resume: Option<&checkpoint::Resume>) -> Result<Vec<String>, TrainError> {
    let mut notes = Vec::new();
    for dir in [out.to_path_buf(), checkpoint::checkpoints_dir(out)] {
        let sweep = checkpoint::remove_stale_temporaries(&dir)?;
        if !sweep.removed.is_empty() {
            notes.push(format!(
                "removed {} temporaries left in {} by writers that died mid-write ({} freed)",
                sweep.removed.len(),
                dir.display(),
                crate::memory::human_bytes(sweep.bytes_freed())
            ));
        }
    }
    match resume {
        Some(r) if r.in_run => {
            for (d, why) in &r.skipped {
                notes.push(format!("passed over {}: {why}", d.display()));
            }
            if !r.skipped.is_empty() {
                notes.push(format!("resuming from {}, the newest checkpoint that verifies", r.loaded.dir.display()));
            }
            if !r.ahead.is_empty() {
                let a = checkpoint::archive_run(out, &r.ahead, false)?;
                notes.push(format!(
                    "moved {} checkpoint(s) ahead of step {} to {}: this run continues from step {} and will not return to them",
                    a.moved.len(),
                    r.loaded.state.step,
                    a.dest.display(),
                    r.loaded.state.step
                ));
            }
        }
        _ => {
            let earlier = checkpoint::earlier_run(out)?;
            let metrics = out.join("metrics.jsonl");
            let logged = std::fs::metadata(&metrics).map(|m| m.len() > 0).unwrap_or(false);
            // With run.if_exists = refuse, preflight has already refused a directory with checkpoints.
            if cfg.run.if_exists == IfExists::Archive && (!earlier.is_empty() || logged) {
                let a = checkpoint::archive_run(out, &earlier, true)?;
                let n = earlier.len();
                notes.push(format!(
                    "run.if_exists = archive: moved the earlier run ({n} checkpoint{}, its metrics and config) to {}",
                    if n == 1 { "" } else { "s" },
                    a.dest.display()
                ));
            }
        }
    }
    Ok(notes)
}

/// Loads a checkpoint's weights into this rank's parts and its optimizer state into `opt`, from
/// whole tensors (any layout writes them so, or slices that loading joined): a tensor-parallel
/// rank takes its slices, a ZeRO-1 piece its elements. Returns the step to continue from.
fn restore(s: &Setup, opt: &mut AdamW, ck: checkpoint::Loaded) -> Result<u64, TrainError> {
    for p in &s.parts {
        if s.pipeline.is_some() {
            p.model.load_own_parameters(&ck.model)?;
        } else {
            p.model.load_parameters(&ck.model)?;
        }
    }
    let dir = ck.dir.clone();
    let bad = |e: String| TrainError::Checkpoint(format!("{}: {e}: the checkpoint was written by a different model", dir.display()));
    let optim = tp_local(ck.optim, &s.parts);
    opt.load_state(&optim, ck.state.step).map_err(bad)?;
    Ok(ck.state.step)
}

/// The run's layout for the first line it prints: ranks, and how they split the work.
fn layout_line(s: &Setup, grid: &Grid) -> String {
    let d = &grid.dims;
    let tensor = match (d.tp, s.cfg.parallel.sequence_parallel) {
        (1, _) => String::new(),
        (t, false) => format!("tp {t} x "),
        (t, true) => format!("tp {t} (sequence parallel) x "),
    };
    match &s.pipeline {
        None => format!("{} ranks ({tensor}dp {})", d.world_size, d.dp),
        Some(pl) => format!(
            "{} ranks ({tensor}pp {} x dp {}, {} schedule, {} stages of {:?} layers)",
            d.world_size,
            d.pp,
            d.dp,
            pl.schedule.kind,
            pl.schedule.stages(),
            pl.layers
        ),
    }
}

/// Makes every rank agree on a result that may have failed on some ranks only (a file missing on
/// one node): if any failed, the lowest failing rank returns its error (prefixed with its rank in
/// a multi-rank world) and every other rank returns `TrainError::Elsewhere`, so that all of them
/// stop here instead of waiting in a collective for the failed one, and the error is said once.
/// Every rank learns whether that error is the user's to fix, so all exit with the same code.
fn agree<T>(comm: &dyn Communicator, r: Result<T, TrainError>) -> Result<T, TrainError> {
    let n = comm.size();
    if n == 1 {
        return r;
    }
    // 0: fine; 1: an input error (exit 2); 2: any other failure (exit 1).
    let mine = match &r {
        Ok(_) => 0,
        Err(e) if e.is_user_error() => 1,
        Err(_) => 2,
    };
    let flags = fabbrica_comm::gather_status(comm, mine).map_err(TrainError::Comm)?;
    let Some(first) = flags.iter().position(|&f| f != 0) else { return r };
    let everyone = flags.iter().all(|&f| f != 0);
    match r {
        Err(e) if comm.rank() == first => Err(if everyone { e } else { e.on_rank(first) }),
        _ => Err(TrainError::Elsewhere { rank: first, user: flags[first] == 1 }),
    }
}

/// Every rank's compute and communication-wait time per step (ms), gathered; names the slowest.
fn straggler_report(comm: &dyn Communicator, compute_ms: f64, wait_ms: f64) -> Result<Stragglers, TrainError> {
    let n = comm.size();
    let all = Tensor::zeros([2 * n as i64], (Kind::Float, Device::Cpu));
    comm.all_gather(&all, &Tensor::from_slice(&[compute_ms as f32, wait_ms as f32])).map_err(comm_err)?;
    let v: Vec<f32> = Vec::try_from(all).map_err(|e: tch::TchError| TrainError::Torch(e.to_string()))?;
    let compute: Vec<f64> = v.iter().step_by(2).map(|&x| x as f64).collect();
    let wait: Vec<f64> = v.iter().skip(1).step_by(2).map(|&x| x as f64).collect();
    let slowest = (0..n).max_by(|&a, &b| compute[a].total_cmp(&compute[b])).unwrap_or(0);
    Ok(Stragglers { slowest_rank: slowest, compute_ms: compute, comm_wait_ms: wait })
}

pub(crate) fn empty_record() -> Record {
    Record {
        kind: String::new(),
        step: 0,
        loss: None,
        lr: None,
        grad_norm: None,
        tokens_per_s: None,
        mfu: None,
        step_ms: None,
        peak_mem_bytes: None,
        train_loss: None,
        val_loss: None,
        stragglers: None,
        pipeline: None,
        tied_fingerprint_diff: None,
        tp_traffic: None,
        note: None,
    }
}

/// Applies `run.checkpoint_failure` to a finished write: a failed write is a warning (logged as
/// `checkpoint_failed`) under `continue` unless it is the run's `last`; an error otherwise.
fn settled(done: Completed, last: bool, cfg: &Config, progress: &Progress, log: &mut Option<MetricsLog>) -> Result<(), TrainError> {
    match done.result {
        Ok(_) => Ok(()),
        Err(e @ TrainError::CheckpointWrite { .. }) if cfg.run.checkpoint_failure == CheckpointFailure::Continue && !last => {
            progress.println(&format!("warning: {e} (run.checkpoint_failure = continue: training on, trying again at the next interval)"));
            if let Some(log) = log.as_mut() {
                log.write(&Record { kind: "checkpoint_failed".into(), step: done.step, note: Some(e.to_string()), ..empty_record() })?;
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}
