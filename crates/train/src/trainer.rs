//! The training loop: micro-steps with gradient accumulation, clipping, AdamW, periodic
//! evaluation, metrics, checkpoints and resume.
//!
//! Determinism: at the start of optimizer step `s`, libtorch's RNG is reseeded from
//! (seed, s) and batches are a pure function of (seed, step, sample index). A run resumed from
//! the checkpoint of step k therefore draws exactly what the uninterrupted run drew.

use std::path::PathBuf;
use std::time::Instant;

use fabbrica_data::{Dataset, Meta, Sampler, Split, TokenizerKind};
use fabbrica_models::{flops_per_token, Gpt};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, CheckpointState, FORMAT_VERSION};
use crate::config::Config;
use crate::device::{gpu_name, peak_flops_for, peak_memory_bytes, resolve_bf16, resolve_device};
use crate::error::{io_err, TrainError};
use crate::metrics::{MetricsLog, Progress, Record};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::sample::sample_text;
use crate::schedule::CosineSchedule;

/// Evaluation batches use this step index, so every evaluation sees the same windows.
const EVAL_STEP: u64 = u64::MAX;

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
}

/// Everything resolved before the first step.
pub struct Setup {
    pub cfg: Config,
    pub data: Dataset,
    pub model: Gpt,
    pub device: Device,
    pub bf16: bool,
}

/// Loads data and builds the model: every input error surfaces here, before any step.
pub fn setup(cfg: &Config) -> Result<Setup, TrainError> {
    let mut cfg = cfg.clone();
    cfg.validate()?;
    let device = resolve_device(&cfg.run.device, 0)?;
    let bf16 = resolve_bf16(&cfg.train.dtype, device)?;
    if cfg.run.threads > 0 {
        tch::set_num_threads(cfg.run.threads as i32);
    }
    let kind: TokenizerKind = cfg.data.tokenizer.parse()?;
    let data = fabbrica_data::load(&cfg.data.path, kind, cfg.model.block_size, cfg.data.val_fraction)?;
    let vocab = data.tokenizer.vocab_size();
    if cfg.model.vocab_size == 0 {
        cfg.model.vocab_size = vocab;
    } else if cfg.model.vocab_size < vocab {
        return Err(TrainError::Config(crate::ConfigError::Invalid {
            key: "model.vocab_size".into(),
            value: cfg.model.vocab_size.to_string(),
            why: format!("the {} tokenizer of {} has {vocab} tokens: set it to at least {vocab}, or 0 to take it from the data", data.tokenizer.kind().as_str(), cfg.data.path.display()),
        }));
    }
    tch::manual_seed(cfg.run.seed as i64);
    let model = Gpt::new(&cfg.model, device)?;
    Ok(Setup { cfg, data, model, device, bf16 })
}

/// splitmix64 finaliser: decorrelates per-step seeds drawn from one base seed.
fn mix(seed: u64, step: u64) -> i64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D2_49EB_11E8_D1EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

fn to_tensor(v: Vec<i64>, b: usize, t: usize, device: Device) -> Tensor {
    Tensor::from_slice(&v).view([b as i64, t as i64]).to_device(device)
}

/// Mean loss over `iters` fixed batches of `split`.
pub fn evaluate(s: &Setup, sampler: &Sampler, split: Split, iters: u64) -> f64 {
    let (b, t) = (s.cfg.train.batch_size, s.cfg.model.block_size);
    let src = s.data.source(split);
    tch::no_grad(|| {
        let mut sum = 0.0;
        for k in 0..iters {
            let (x, y) = sampler.batch(src, split, EVAL_STEP, k * b as u64, b, t);
            let (x, y) = (to_tensor(x, b, t, s.device), to_tensor(y, b, t, s.device));
            let loss = tch::autocast(s.bf16, || Gpt::loss(&s.model.forward(&x, false), &y));
            sum += loss.double_value(&[]);
        }
        sum / iters as f64
    })
}

/// One optimizer step's forward/backward over `grad_accum` micro-batches (sample indices
/// `first_sample + m·batch_size`). Leaves the mean loss's gradients in `.grad` and returns that
/// loss as a device scalar (not synchronised).
pub fn accumulate_grads(s: &Setup, sampler: &Sampler, step: u64, first_sample: u64, grad_accum: usize) -> Tensor {
    let (b, t) = (s.cfg.train.batch_size, s.cfg.model.block_size);
    let mut loss_sum = Tensor::zeros([], (Kind::Float, s.device));
    for m in 0..grad_accum {
        let (x, y) = sampler.batch(&s.data.train, Split::Train, step, first_sample + (m * b) as u64, b, t);
        let (x, y) = (to_tensor(x, b, t, s.device), to_tensor(y, b, t, s.device));
        let loss = tch::autocast(s.bf16, || Gpt::loss(&s.model.forward(&x, true), &y));
        (&loss / grad_accum as f64).backward();
        loss_sum += loss.detach();
    }
    loss_sum / grad_accum as f64
}

pub fn train(cfg: &Config, opts: &TrainOptions) -> Result<TrainOutcome, TrainError> {
    let s = setup(cfg)?;
    let cfg = &s.cfg;
    let out = cfg.run.out_dir.clone();
    std::fs::create_dir_all(&out).map_err(|e| {
        TrainError::Checkpoint(format!("cannot use run.out_dir = {} ({e}): set run.out_dir to a writable directory", out.display()))
    })?;

    let fused = cfg.fused_adamw();
    let params: Vec<(String, Tensor)> = s.model.parameter_handles();
    let mut opt = AdamW::new(
        &params,
        AdamWConfig { beta1: cfg.train.beta1, beta2: cfg.train.beta2, eps: cfg.train.eps, weight_decay: cfg.train.weight_decay, fused },
    );

    let mut start = 0u64;
    if cfg.run.resume {
        if let Some(dir) = checkpoint::latest(&out)? {
            let ck = checkpoint::load(&dir)?;
            s.model.load_parameters(&ck.model)?;
            opt.load_state(&ck.optim, ck.state.step).map_err(|e| {
                TrainError::Checkpoint(format!("{}: {e}: the checkpoint was written by a different model", dir.display()))
            })?;
            start = ck.state.step;
        }
    }
    let mut log = MetricsLog::open(&out, cfg.run.resume.then_some(start))?;
    std::fs::write(out.join("config.toml"), cfg.to_toml()).map_err(io_err(out.join("config.toml")))?;

    let sched = CosineSchedule { lr: cfg.train.lr, min_lr: cfg.train.min_lr, warmup_steps: cfg.train.warmup_steps, decay_steps: cfg.decay_steps() };
    let sampler = Sampler::new(cfg.run.seed);
    let tokens_per_step = (cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size) as f64;
    let flops_tok = flops_per_token(&cfg.model, cfg.model.block_size);
    let peak = if cfg.train.peak_flops > 0.0 {
        Some(cfg.train.peak_flops)
    } else {
        match s.device {
            Device::Cuda(i) => gpu_name(i).as_deref().and_then(peak_flops_for),
            _ => None,
        }
    };
    let progress = Progress::new(cfg.train.max_steps, start, opts.progress);
    progress.println(&format!(
        "training {} parameters on {:?} ({}), {} tokens/step, steps {}..{}",
        s.model.num_params(),
        s.device,
        if s.bf16 { "bf16 autocast" } else { "fp32" },
        tokens_per_step,
        start,
        cfg.train.max_steps
    ));

    let stop_at = if cfg.run.stop_at > 0 { cfg.run.stop_at.min(cfg.train.max_steps) } else { cfg.train.max_steps };
    let mut window = (Instant::now(), 0u64); // (start of log window, steps in it)
    let mut last_val: Option<f64> = None;
    let mut step = start;
    while step < stop_at {
        let lr = sched.lr_at(step);
        tch::manual_seed(mix(cfg.run.seed, step));
        let loss = accumulate_grads(&s, &sampler, step, 0, cfg.train.grad_accum);
        let norm = clip_grad_norm(&params, cfg.train.grad_clip);
        opt.step(lr).map_err(TrainError::Torch)?;
        for (_, p) in &params {
            p.shallow_clone().zero_grad();
        }
        step += 1;
        window.1 += 1;

        if step % cfg.train.log_interval == 0 || step == stop_at {
            let last_loss = loss.double_value(&[]); // synchronises the device: timings below are real
            let elapsed = window.0.elapsed().as_secs_f64();
            let tps = tokens_per_step * window.1 as f64 / elapsed;
            let rec = Record {
                kind: "train".into(),
                step,
                loss: Some(last_loss),
                lr: Some(lr),
                grad_norm: Some(norm.double_value(&[])),
                tokens_per_s: Some(tps),
                mfu: peak.map(|p| flops_tok * tps / p),
                step_ms: Some(1e3 * elapsed / window.1 as f64),
                peak_mem_bytes: Some(peak_memory_bytes(s.device)),
                train_loss: None,
                val_loss: None,
            };
            log.write(&rec)?;
            progress.step(step, Some(format!("loss {last_loss:.4} lr {lr:.2e} {tps:.0} tok/s")));
            window = (Instant::now(), 0);
        } else {
            progress.step(step, None);
        }

        let last = step == stop_at;
        if step % cfg.train.eval_interval == 0 || last {
            let (tl, vl) = (evaluate(&s, &sampler, Split::Train, cfg.train.eval_iters), evaluate(&s, &sampler, Split::Val, cfg.train.eval_iters));
            last_val = Some(vl);
            log.write(&Record { kind: "eval".into(), step, train_loss: Some(tl), val_loss: Some(vl), ..empty_record() })?;
            progress.println(&format!("step {step}: train loss {tl:.4}, val loss {vl:.4}"));
            window = (Instant::now(), 0); // evaluation time is not training throughput
        }
        if (cfg.run.checkpoint_interval > 0 && step % cfg.run.checkpoint_interval == 0) || last {
            save(&s, &opt, step, last_val, &params)?;
        }
    }
    progress.finish();

    let train_loss = evaluate(&s, &sampler, Split::Train, cfg.train.eval_iters);
    let val_loss = evaluate(&s, &sampler, Split::Val, cfg.train.eval_iters);
    let checkpoint = match checkpoint::latest(&out)? {
        Some(dir) if step > start => dir,
        _ => save(&s, &opt, step, Some(val_loss), &params)?,
    };
    let sample = (cfg.run.sample_tokens > 0).then(|| sample_text(&s.model, &s.data.tokenizer, "", cfg.run.sample_tokens, 0.8, Some(200), cfg.run.seed));
    Ok(TrainOutcome { steps: step, train_loss, val_loss, sample, out_dir: out, checkpoint })
}

fn empty_record() -> Record {
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
    }
}

fn save(s: &Setup, opt: &AdamW, step: u64, val_loss: Option<f64>, params: &[(String, Tensor)]) -> Result<PathBuf, TrainError> {
    let state = CheckpointState {
        format_version: FORMAT_VERSION,
        step,
        seed: s.cfg.run.seed,
        config: s.cfg.clone(),
        tokenizer: Meta::for_tokenizer(&s.data.tokenizer),
        val_loss,
        sha256: Default::default(),
    };
    checkpoint::save(&s.cfg.run.out_dir, state, params, &opt.state(), s.cfg.run.keep_checkpoints)
}
