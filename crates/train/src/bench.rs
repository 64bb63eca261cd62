//! Training-step throughput on synthetic tokens: what `fabbrica bench train` and the criterion
//! bench measure. Uniform random tokens cost exactly what real ones do, and need no data.

use std::time::Instant;

use fabbrica_models::{flops_per_token, Model};
use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::device::{gpu_name, peak_memory_bytes, resolve_bf16, resolve_device};
use crate::error::TrainError;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use fabbrica_torch_ext::amp::{autocast, hold_casts};
use fabbrica_torch_ext::foreach_zero_;
use fabbrica_torch_ext::hooks::set_grad;

#[derive(Debug, Clone)]
pub struct BenchResult {
    pub device: String,
    pub params: i64,
    pub batch: usize,
    pub block: usize,
    pub steps: usize,
    pub step_ms: f64,
    pub tokens_per_s: f64,
    pub mfu: Option<f64>,
    pub peak_mem_bytes: u64,
    /// How the matmuls ran: `bf16 autocast`, `fp32` (CPU), `fp32, TF32 matmuls` (CUDA), ...
    pub precision: &'static str,
    /// Peak bytes libtorch's allocator handed out (what `--dry-run` estimates before the CPU's
    /// resident overhead): CUDA's `max_memory_allocated`, or on the CPU the counting allocator's
    /// peak (`fabbrica_torch_ext::amp`).
    pub peak_allocated_bytes: Option<u64>,
    /// Where a step's time goes, when asked for.
    pub profile: Option<PhaseProfile>,
}

/// A model, optimizer and fixed random batch, ready to step.
pub struct BenchState {
    model: Model,
    params: Vec<(String, Tensor)>,
    opt: AdamW,
    x: Tensor,
    y: Tensor,
    bf16: bool,
    clip: f64,
    seed: u64,
    steps: u64,
    free_grads: bool,
}

impl BenchState {
    /// `free_grads`: drop the gradients after each step, as PyTorch's
    /// `zero_grad(set_to_none=True)` does, instead of zeroing them in place as the trainer's
    /// gradient buckets are (which keeps them resident: 4 bytes per parameter more at the peak).
    pub fn new(cfg: &Config, free_grads: bool) -> Result<(Self, Device), TrainError> {
        let BenchModel { model, device, bf16, x, y } = bench_model(cfg, 0)?;
        let params: Vec<(String, Tensor)> = model.parameter_handles();
        let opt = AdamW::new(&params, adamw_config(cfg));
        Ok((BenchState { model, params, opt, x, y, bf16, clip: cfg.train.grad_clip, seed: cfg.run.seed, steps: 0, free_grads }, device))
    }

    /// One full training step (the trainer's local forward-backward, clip, AdamW, zero grads)
    /// on the fixed batch; not synchronised.
    pub fn step(&mut self) -> Result<Tensor, TrainError> {
        let loss = bench_forward_backward(&self.model, self.bf16, None, self.seed, self.steps, &self.x, &self.y)?;
        self.steps += 1;
        let _ = clip_grad_norm(&self.params, self.clip);
        self.opt.step(1e-4).map_err(TrainError::Torch)?;
        self.clear_grads()?;
        Ok(loss)
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Where a step's time goes: `steps` steps with the device synchronised after each phase
    /// (forward with the loss, backward, clip, AdamW, zeroing or freeing the gradients), mean
    /// milliseconds per phase. The synchronisations cost a little overlap, so the phases add up
    /// to somewhat more than an unprofiled step.
    pub fn profile(&mut self, steps: usize, device: Device) -> Result<PhaseProfile, TrainError> {
        let sync = || {
            if let Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
        };
        let mut ms = [0f64; 5];
        let mut lap = |i: usize, t: &mut Instant| {
            sync();
            ms[i] += t.elapsed().as_secs_f64() * 1e3;
            *t = Instant::now();
        };
        sync();
        for _ in 0..steps {
            let mut t = Instant::now();
            let (model, bf16) = (&self.model, self.bf16);
            hold_casts(bf16, || -> Result<(), TrainError> {
                tch::manual_seed(dropout_seed(self.seed, self.steps, 0));
                let loss = autocast(device, bf16, || model.loss(&model.forward(&self.x, true), &self.y));
                lap(0, &mut t);
                loss.f_backward().map_err(|e| crate::memory::torch_error(self.steps + 1, e))?;
                lap(1, &mut t);
                Ok(())
            })?;
            self.steps += 1;
            let _ = clip_grad_norm(&self.params, self.clip);
            lap(2, &mut t);
            self.opt.step(1e-4).map_err(TrainError::Torch)?;
            lap(3, &mut t);
            self.clear_grads()?;
            lap(4, &mut t);
        }
        let n = steps.max(1) as f64;
        Ok(PhaseProfile {
            steps,
            forward_ms: ms[0] / n,
            backward_ms: ms[1] / n,
            clip_ms: ms[2] / n,
            optimizer_ms: ms[3] / n,
            zero_grad_ms: ms[4] / n,
        })
    }

    fn clear_grads(&self) -> Result<(), TrainError> {
        if self.free_grads {
            for (_, p) in &self.params {
                set_grad(p, None).map_err(|e| TrainError::Torch(e.to_string()))?;
            }
            Ok(())
        } else {
            let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).filter(Tensor::defined).collect();
            tch::no_grad(|| foreach_zero_(&grads)).map_err(TrainError::Torch)
        }
    }
}

/// Mean milliseconds per phase of a training step ([`BenchState::profile`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PhaseProfile {
    pub steps: usize,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub clip_ms: f64,
    pub optimizer_ms: f64,
    pub zero_grad_ms: f64,
}

/// Micro-batch `m`'s dropout seed at `step`, as the trainer seeds it.
fn dropout_seed(seed: u64, step: u64, m: usize) -> i64 {
    crate::trainer::mix(crate::trainer::mix(seed, step) as u64, m as u64)
}

/// The trainer's local forward-backward ([`crate::step::forward_backward_local`]) on one fixed
/// micro-batch, dropout seeded from (seed, step) as the trainer seeds it.
fn bench_forward_backward(
    model: &Model,
    bf16: bool,
    ddp: Option<&fabbrica_ddp::Ddp>,
    seed: u64,
    step: u64,
    x: &Tensor,
    y: &Tensor,
) -> Result<Tensor, TrainError> {
    let seed_of = |m: usize| dropout_seed(seed, step, m);
    crate::step::forward_backward_local(model, bf16, 1, ddp, step, false, &seed_of, &mut |_| (x.shallow_clone(), y.shallow_clone()))
}

/// A model built as the trainer builds it, and a fixed random batch (seeded by `batch_seed`).
struct BenchModel {
    model: Model,
    device: Device,
    bf16: bool,
    x: Tensor,
    y: Tensor,
}

fn bench_model(cfg: &Config, batch_seed: i64) -> Result<BenchModel, TrainError> {
    bench_model_on(cfg, 0, batch_seed, 1, 1)
}

/// The benchmark's model and batch on `cuda_ordinal` (or the CPU), after the trainer's memory
/// check for `local_ranks` ranks on this node, `dp` of them data-parallel: a batch or model
/// that cannot fit is refused in one line, as `train` refuses it, not left to the allocator or
/// the kernel's OOM killer.
fn bench_model_on(cfg: &Config, cuda_ordinal: usize, batch_seed: i64, local_ranks: usize, dp: usize) -> Result<BenchModel, TrainError> {
    only_data_parallel(cfg)?;
    let device = resolve_device(cfg.run.device, cuda_ordinal)?;
    let bf16 = resolve_bf16(cfg.train.dtype, device);
    crate::memory::check_fits_whole(cfg, 256, device, bf16, local_ranks, dp)?;
    crate::device::apply_tf32(cfg.train.tf32)?;
    if cfg.run.threads > 0 {
        tch::set_num_threads(cfg.run.threads as i32);
    }
    let mut mcfg = cfg.model.clone();
    if mcfg.vocab_size() == 0 {
        mcfg.set_vocab_size(256);
    }
    tch::manual_seed(cfg.run.seed as i64);
    let mut model = Model::new(&mcfg, device)?;
    model.set_recompute(cfg.recompute());
    if batch_seed != 0 {
        tch::manual_seed(cfg.run.seed as i64 + batch_seed);
    }
    let shape = [cfg.train.batch_size as i64, mcfg.block_size() as i64];
    let x = Tensor::randint(mcfg.vocab_size() as i64, shape, (Kind::Int64, device));
    let y = Tensor::randint(mcfg.vocab_size() as i64, shape, (Kind::Int64, device));
    Ok(BenchModel { model, device, bf16, x, y })
}

/// The benchmarks time one whole model per rank (data parallelism at most): a layout they would
/// not run is refused rather than silently measured as something else.
fn only_data_parallel(cfg: &Config) -> Result<(), TrainError> {
    let p = &cfg.parallel;
    for (key, v) in [("parallel.tp", p.tp), ("parallel.pp", p.pp)] {
        if v > 1 {
            return Err(TrainError::Config(crate::ConfigError::Invalid {
                key: key.into(),
                value: v.to_string(),
                why: "the benchmarks time one whole model per rank: measure tensor and pipeline layouts with `fabbrica train` (step_ms and tp_traffic in metrics.jsonl; scripts/tp_bench.sh, scripts/pipeline_bench.sh), or set it to 1".into(),
            }));
        }
    }
    Ok(())
}

fn adamw_config(cfg: &Config) -> AdamWConfig {
    let t = &cfg.train;
    AdamWConfig { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay, fused: cfg.fused_adamw() }
}

/// What `fabbrica bench train` runs.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// See [`BenchState::new`].
    pub free_grads: bool,
    /// After the timed steps, this many profiled ones ([`BenchState::profile`]); 0: none.
    pub profile_steps: usize,
}

/// Times `steps` training steps after `warmup` untimed ones, then profiles `profile_steps`.
pub fn run(cfg: &Config, o: BenchOptions) -> Result<BenchResult, TrainError> {
    let BenchOptions { steps, warmup, free_grads, profile_steps } = o;
    if crate::device::planned_device(cfg.run.device) == Device::Cpu {
        // Counts from here: the weights, gradients, AdamW state, batch and activations.
        fabbrica_torch_ext::amp::count_cpu_allocations();
        fabbrica_torch_ext::amp::reset_cpu_peak();
    }
    let (mut st, device) = BenchState::new(cfg, free_grads)?;
    for _ in 0..warmup {
        st.step()?.double_value(&[]);
    }
    let t0 = Instant::now();
    let mut last = Tensor::zeros([], (Kind::Float, device));
    for _ in 0..steps {
        last = st.step()?;
    }
    let loss = last.double_value(&[]); // waits for the device
    let secs = t0.elapsed().as_secs_f64();
    if !loss.is_finite() {
        return Err(TrainError::Torch(format!("benchmark loss became {loss}")));
    }
    let profile = if profile_steps > 0 { Some(st.profile(profile_steps, device)?) } else { None };
    let mcfg = st.model().config().clone();
    let tokens = (cfg.train.batch_size * mcfg.block_size() * steps) as f64;
    let tps = tokens / secs;
    let peak = crate::device::peak_flops(cfg.train.peak_flops, device);
    Ok(BenchResult {
        device: match device {
            Device::Cuda(i) => gpu_name(i).unwrap_or_else(|| format!("cuda:{i}")),
            _ => format!("cpu ({} threads)", tch::get_num_threads()),
        },
        params: st.model().num_params(),
        batch: cfg.train.batch_size,
        block: mcfg.block_size(),
        steps,
        step_ms: 1e3 * secs / steps as f64,
        tokens_per_s: tps,
        mfu: peak.map(|p| flops_per_token(&mcfg, mcfg.block_size()) * tps / p),
        peak_mem_bytes: peak_memory_bytes(device),
        precision: crate::device::precision_label(resolve_bf16(cfg.train.dtype, device), cfg.train.tf32, device),
        peak_allocated_bytes: match device {
            Device::Cuda(i) => fabbrica_torch_ext::cuda_peak_allocated_bytes(i),
            _ => Some(fabbrica_torch_ext::amp::cpu_peak_allocated_bytes()).filter(|&b| b > 0),
        },
        profile,
    })
}

// ---------------------------------------------------------------------------------------------
// Data-parallel overhead and communication efficiency (`fabbrica bench ddp`).

/// One measured mode of [`run_ddp`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct DdpModeResult {
    /// `plain` (no DDP; world of one only), `overlap`, `no-overlap`, `no-comm`.
    pub mode: String,
    /// Median over rounds of the mean step time, each the maximum over ranks (a data-parallel
    /// step is as slow as its slowest rank).
    pub step_ms: f64,
    /// Tokens per second over all ranks.
    pub tokens_per_s: f64,
    /// Every round's step time (ms), for the spread.
    pub rounds_ms: Vec<f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DdpBenchResult {
    pub world_size: usize,
    pub device: String,
    pub params: i64,
    pub batch: usize,
    pub block: usize,
    pub buckets: usize,
    pub steps: usize,
    pub rounds: usize,
    pub modes: Vec<DdpModeResult>,
}

impl DdpBenchResult {
    pub fn mode(&self, m: &str) -> Option<&DdpModeResult> {
        self.modes.iter().find(|r| r.mode == m)
    }
}

/// A model with DDP applied over `comm`, and its optimizer, stepping on a fixed random batch
/// (different on every rank).
struct DdpBenchState {
    model: Model,
    ddp: fabbrica_ddp::Ddp,
    opt: AdamW,
    x: Tensor,
    y: Tensor,
    bf16: bool,
    clip: f64,
    seed: u64,
    steps: u64,
}

impl DdpBenchState {
    fn step(&mut self) -> Result<Tensor, TrainError> {
        let loss = bench_forward_backward(&self.model, self.bf16, Some(&self.ddp), self.seed, self.steps, &self.x, &self.y)?;
        self.steps += 1;
        let err = TrainError::Ddp;
        self.ddp.finish().map_err(err)?;
        let _ = self.ddp.clip_grad_norm(self.clip).map_err(err)?;
        self.opt.step(1e-4).map_err(TrainError::Torch)?;
        self.ddp.after_step().map_err(err)?;
        self.ddp.zero_grad();
        Ok(loss)
    }
}

/// Times data-parallel training steps in several modes, interleaved round by round so that
/// drifting machine load affects every mode alike: `overlap` (the default), `no-overlap`,
/// `no-comm` (same per-rank work, gradient communication off) and, in a world of one, `plain`
/// (the trainer's step without DDP: the overhead baseline).
pub fn run_ddp(
    cfg: &Config,
    comm: std::sync::Arc<dyn fabbrica_comm::Communicator>,
    (local_rank, local_ranks): (usize, usize),
    steps: usize,
    warmup: usize,
    rounds: usize,
) -> Result<DdpBenchResult, TrainError> {
    use fabbrica_comm::ReduceOp;
    let (rank, n) = (comm.rank(), comm.size());
    let ordinal = fabbrica_comm::cuda_device_for(local_rank, tch::Cuda::device_count() as usize).unwrap_or(local_rank);
    // Same weights on every rank (rank 0's are broadcast anyway), a different batch on each.
    let BenchModel { model, device, bf16, x, y } = bench_model_on(cfg, ordinal, 1 + rank as i64, local_ranks, n)?;
    let mcfg = model.config().clone();
    let params = model.parameter_handles();
    let ddp = fabbrica_ddp::Ddp::apply(
        &params,
        comm.clone(),
        // Overlap and communication are switched per mode below.
        fabbrica_ddp::DdpOptions { overlap: true, grad_comm: true, ..crate::grads::ddp_options(cfg, false) },
    )
    .map_err(TrainError::from)?;
    let t = &cfg.train;
    let opt = AdamW::from_parts(ddp.optimizer_params(), adamw_config(cfg));
    let buckets = ddp.assignment().buckets.len();
    let mut st = DdpBenchState { model, ddp, opt, x, y, bf16, clip: t.grad_clip, seed: cfg.run.seed, steps: 0 };
    let mut plain = if n == 1 { Some(BenchState::new(cfg, false)?.0) } else { None };

    let mut modes: Vec<&str> = vec!["overlap", "no-overlap", "no-comm"];
    if plain.is_some() {
        modes.insert(0, "plain");
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for round in 0..rounds {
        for (mi, &mode) in modes.iter().enumerate() {
            let timed = |st: &mut DdpBenchState, plain: &mut Option<BenchState>, k: usize| -> Result<f64, TrainError> {
                let t0 = Instant::now();
                let mut last = Tensor::zeros([], (Kind::Float, device));
                for _ in 0..k {
                    last = match (mode, plain.as_mut()) {
                        ("plain", Some(pl)) => pl.step()?,
                        _ => st.step()?,
                    };
                }
                last.double_value(&[]);
                Ok(t0.elapsed().as_secs_f64())
            };
            st.ddp.set_mode(mode != "no-overlap", mode != "no-comm");
            // Warm-up in every round: the first steps after a switch re-fill caches.
            timed(&mut st, &mut plain, if round == 0 { warmup.max(1) } else { 1 })?;
            let secs = timed(&mut st, &mut plain, steps)?;
            let m = Tensor::from_slice(&[(1e3 * secs / steps as f64) as f32]);
            comm.all_reduce(&m, ReduceOp::Max).map_err(TrainError::from)?;
            times[mi].push(m.double_value(&[0]));
        }
    }
    st.ddp.set_mode(true, true);
    let tokens_per_step = (t.batch_size * mcfg.block_size() * n) as f64;
    let results = modes
        .iter()
        .zip(times)
        .map(|(m, ts)| {
            let mut s = ts.clone();
            s.sort_by(f64::total_cmp);
            let med = s[s.len() / 2];
            DdpModeResult { mode: m.to_string(), step_ms: med, tokens_per_s: tokens_per_step / (med / 1e3), rounds_ms: ts }
        })
        .collect();
    Ok(DdpBenchResult {
        world_size: n,
        device: match device {
            Device::Cuda(i) => gpu_name(i).unwrap_or_else(|| format!("cuda:{i}")),
            _ => format!("cpu ({} threads per rank)", tch::get_num_threads()),
        },
        params: st.model.num_params(),
        batch: t.batch_size,
        block: mcfg.block_size(),
        buckets,
        steps,
        rounds,
        modes: results,
    })
}
