//! Training-step throughput on synthetic tokens: what `fabbrica bench train` and the criterion
//! bench measure. Uniform random tokens cost exactly what real ones do, and need no data.

use std::time::Instant;

use fabbrica_models::{flops_per_token, Gpt};
use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::device::{gpu_name, peak_flops_for, peak_memory_bytes, resolve_bf16, resolve_device};
use crate::error::TrainError;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};

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
}

/// A model, optimizer and fixed random batch, ready to step.
pub struct BenchState {
    model: Gpt,
    params: Vec<(String, Tensor)>,
    opt: AdamW,
    x: Tensor,
    y: Tensor,
    bf16: bool,
    clip: f64,
}

impl BenchState {
    pub fn new(cfg: &Config) -> Result<(Self, Device), TrainError> {
        let device = resolve_device(&cfg.run.device, 0)?;
        let bf16 = resolve_bf16(&cfg.train.dtype, device)?;
        if cfg.run.threads > 0 {
            tch::set_num_threads(cfg.run.threads as i32);
        }
        let mut mcfg = cfg.model.clone();
        if mcfg.vocab_size == 0 {
            mcfg.vocab_size = 256;
        }
        tch::manual_seed(cfg.run.seed as i64);
        let model = Gpt::new(&mcfg, device)?;
        let params: Vec<(String, Tensor)> = model.parameter_handles();
        let fused = cfg.fused_adamw();
        let t = &cfg.train;
        let opt = AdamW::new(&params, AdamWConfig { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay, fused });
        let shape = [t.batch_size as i64, mcfg.block_size as i64];
        let x = Tensor::randint(mcfg.vocab_size as i64, shape, (Kind::Int64, device));
        let y = Tensor::randint(mcfg.vocab_size as i64, shape, (Kind::Int64, device));
        Ok((BenchState { model, params, opt, x, y, bf16, clip: t.grad_clip }, device))
    }

    /// One full training step (forward, backward, clip, AdamW, zero grads); not synchronised.
    pub fn step(&mut self) -> Tensor {
        let loss = tch::autocast(self.bf16, || Gpt::loss(&self.model.forward(&self.x, true), &self.y));
        loss.backward();
        let _ = clip_grad_norm(&self.params, self.clip);
        self.opt.step(1e-4).expect("AdamW step");
        for (_, p) in &self.params {
            p.shallow_clone().zero_grad();
        }
        loss.detach()
    }

    pub fn model(&self) -> &Gpt {
        &self.model
    }
}

/// Times `steps` training steps after `warmup` untimed ones.
pub fn run(cfg: &Config, steps: usize, warmup: usize) -> Result<BenchResult, TrainError> {
    let (mut st, device) = BenchState::new(cfg)?;
    for _ in 0..warmup {
        st.step().double_value(&[]);
    }
    let t0 = Instant::now();
    let mut last = Tensor::zeros([], (Kind::Float, device));
    for _ in 0..steps {
        last = st.step();
    }
    let loss = last.double_value(&[]); // waits for the device
    let secs = t0.elapsed().as_secs_f64();
    if !loss.is_finite() {
        return Err(TrainError::Torch(format!("benchmark loss became {loss}")));
    }
    let mcfg = st.model().config().clone();
    let tokens = (cfg.train.batch_size * mcfg.block_size * steps) as f64;
    let tps = tokens / secs;
    let peak = if cfg.train.peak_flops > 0.0 {
        Some(cfg.train.peak_flops)
    } else if let Device::Cuda(i) = device {
        gpu_name(i).as_deref().and_then(peak_flops_for)
    } else {
        None
    };
    Ok(BenchResult {
        device: match device {
            Device::Cuda(i) => gpu_name(i).unwrap_or_else(|| format!("cuda:{i}")),
            _ => format!("cpu ({} threads)", tch::get_num_threads()),
        },
        params: st.model().num_params(),
        batch: cfg.train.batch_size,
        block: mcfg.block_size,
        steps,
        step_ms: 1e3 * secs / steps as f64,
        tokens_per_s: tps,
        mfu: peak.map(|p| flops_per_token(&mcfg, mcfg.block_size) * tps / p),
        peak_mem_bytes: peak_memory_bytes(device),
    })
}
