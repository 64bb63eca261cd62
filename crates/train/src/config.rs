//! The one typed configuration: `[model]`, `[data]`, `[train]`, `[run]`.
//!
//! Layers, later wins: preset (default `tiny`) ← `--config FILE.toml` ← each `--set key=value`.
//! Every key is checked against this schema (unknown keys are refused with the valid ones
//! listed) and every value is validated before any data or device is touched.

use std::path::{Path, PathBuf};

use fabbrica_comm::BackendChoice;
use fabbrica_models::{ModelConfig, Recompute, PRESET_NAMES};
use fabbrica_pipeline::Kind as ScheduleKind;
use fabbrica_topology::RankOrder;
use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, Result};

/// The largest config file read (a resolved config is a few KB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

mod choices;
mod model_section;
pub use choices::{CheckpointFailure, DeviceChoice, Dtype, Fused, IfExists, Nonfinite, NotAChoice, ReduceDtype};
pub use model_section::ModelSection;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelSection,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub run: RunConfig,
    /// Absent in checkpoints written before data parallelism existed: defaults then.
    #[serde(default)]
    pub parallel: ParallelConfig,
    #[serde(default)]
    pub comm: CommConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// Data-parallel ranks; 0 = the world size divided by `pp`.
    pub dp: usize,
    /// Pipeline stages: ranks each holding a contiguous part of the model's layers.
    pub pp: usize,
    /// Tensor-parallel ranks: every layer split over them (Megatron-LM: attention by heads, the
    /// MLP by its width, the embedding and output layer by vocabulary). Consecutive ranks, so
    /// they share a node.
    pub tp: usize,
    /// With `tp > 1`: the norms, dropout and residual stream between the tensor-parallel regions
    /// work on a 1/tp shard of the sequence (Korthikanti et al. 2022): all-gather and
    /// reduce-scatter replace the all-reduces, activation memory there drops by tp.
    pub sequence_parallel: bool,
    /// Pipeline schedule: `gpipe`, `1f1b` (Megatron's) or `interleaved` (Megatron's interleaved
    /// 1F1B, with `virtual_stages` model chunks per rank).
    #[serde(with = "choices::text")]
    pub schedule: ScheduleKind,
    /// Model chunks per pipeline rank (`interleaved` only; 1 otherwise).
    pub virtual_stages: usize,
    /// Layers of each of the `pp × virtual_stages` stages, in order; empty = the balanced split
    /// (by estimated cost, the embedding and the head counting as work).
    pub stage_layers: Vec<usize>,
    /// Rank order on the grid, fastest-varying first: `tp-dp-pp` (Megatron's: pipeline
    /// outermost, so data-parallel groups are compact) or `tp-pp-dp`.
    #[serde(with = "choices::text")]
    pub order: RankOrder,
    /// Gradient bucket size cap in MiB (PyTorch DDP's default is 25).
    pub bucket_mb: f64,
    /// Dtype gradients travel in: `fp32` (the gradients' own) or `bf16` (half the bytes).
    #[serde(with = "choices::text")]
    pub reduce_dtype: ReduceDtype,
    /// 0: every rank holds the whole optimizer state; 1: ZeRO-1, state sharded across dp ranks.
    pub zero: u8,
    /// All-reduce each bucket as soon as backward has produced its gradients.
    pub overlap: bool,
    /// Benchmarking only: `false` skips gradient communication (ranks then diverge), to measure
    /// what communication costs at the same per-rank work.
    pub grad_comm: bool,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            dp: 0,
            pp: 1,
            tp: 1,
            sequence_parallel: false,
            schedule: ScheduleKind::OneFOneB,
            virtual_stages: 1,
            stage_layers: Vec::new(),
            order: RankOrder::TpDpPp,
            bucket_mb: 25.0,
            reduce_dtype: ReduceDtype::Fp32,
            zero: 0,
            overlap: true,
            grad_comm: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommConfig {
    /// `auto` (NCCL for CUDA tensors when it loads, MPI otherwise), `mpi` or `nccl`.
    #[serde(with = "choices::text")]
    pub backend: BackendChoice,
    /// A collective running longer than this ends the job with a report (env FABBRICA_COMM_TIMEOUT wins).
    pub timeout_s: f64,
    /// Check before each collective that all ranks call the same one (env FABBRICA_COMM_DEBUG wins).
    pub debug: bool,
}

impl Default for CommConfig {
    fn default() -> Self {
        CommConfig { backend: BackendChoice::Auto, timeout_s: 600.0, debug: false }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A UTF-8 text file (tokenized at start) or a directory from `fabbrica prepare`.
    pub path: PathBuf,
    /// Tokenizer for a text file: `char`, `gpt2` or `hf:PATH` (a Hugging Face tokenizer.json);
    /// a prepared directory names its own.
    pub tokenizer: String,
    /// Fraction of a text file held out for evaluation.
    pub val_fraction: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub max_steps: u64,
    /// Sequences per micro-step (per rank).
    pub batch_size: usize,
    /// Micro-steps per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate, reached after `warmup_steps`.
    pub lr: f64,
    /// Floor of the cosine decay.
    pub min_lr: f64,
    pub warmup_steps: u64,
    /// Steps over which the LR decays to `min_lr` (0 = `max_steps`).
    pub lr_decay_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this value (0 = off).
    pub grad_clip: f64,
    /// `auto` (bf16 autocast on CUDA, fp32 on the CPU), `fp32` or `bf16` (bf16 autocast on either).
    #[serde(with = "choices::text")]
    pub dtype: Dtype,
    /// Float32 matmuls on CUDA on TF32 tensor cores (`true`, as nanoGPT, llm.c and the PyTorch
    /// anchor set it) or in IEEE float32 (`false`, PyTorch's default). Under bf16 autocast it only
    /// reaches the few matmuls autocast leaves in float32; nothing changes on the CPU.
    pub tf32: bool,
    /// `auto`/`on`: ATen's fused AdamW kernel (CPU and CUDA); `off`: tensor-op reference path.
    #[serde(with = "choices::text")]
    pub fused_adamw: Fused,
    pub log_interval: u64,
    pub eval_interval: u64,
    /// Batches per split per evaluation.
    pub eval_iters: u64,
    /// Peak FLOP/s of one device for MFU; 0 = detect (known GPUs), else MFU is not reported.
    pub peak_flops: f64,
    /// A NaN/Inf loss or gradient norm on any rank: `stop` (no checkpoint is written; the job
    /// exits naming step and rank) or `skip` (that update is dropped, optimizer state untouched).
    #[serde(with = "choices::text")]
    pub nonfinite: Nonfinite,
    /// With `nonfinite = "skip"`: more skipped steps than this in one run stop it as `stop` would.
    pub max_skipped_steps: u64,
    /// Activation recompute: `none`, `full` (keep each block's input, recompute the block in
    /// backward) or `selective` (recompute only the attention core, Korthikanti et al. 2022).
    #[serde(with = "choices::text")]
    pub recompute: Recompute,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub out_dir: PathBuf,
    pub seed: u64,
    /// `auto`, `cpu`, `cuda`.
    #[serde(with = "choices::text")]
    pub device: DeviceChoice,
    /// `true`: continue from the newest valid checkpoint in `out_dir/checkpoints` (`latest` is a
    /// hint; a corrupt newest checkpoint falls back to the one before); nothing to resume is an
    /// error. `"auto"`: resume when `out_dir` holds checkpoints, start fresh otherwise (one job
    /// script, requeued blindly). `false`: a fresh run.
    pub resume: Resume,
    /// Resume from this checkpoint directory (a `checkpoints/step_*` directory); implies `resume`.
    /// Empty: choose automatically.
    pub resume_from: PathBuf,
    /// A fresh run (`resume = false`) into an `out_dir` that holds an earlier run's checkpoints:
    /// `refuse` (say so and stop before training) or `archive` (move that run's checkpoints,
    /// metrics and config into `out_dir/archive/<time>/` first).
    #[serde(with = "choices::text")]
    pub if_exists: IfExists,
    /// Write checkpoints from a background thread while training goes on (the step only copies
    /// the state to host memory; at most one write in flight). Falls back to writing at once
    /// when a host copy would not fit in half the available memory.
    pub async_checkpoint: bool,
    /// Pipelines: write every rank's executed actions with their times as Chrome trace-event
    /// JSON (`out_dir/trace/`, open in Perfetto), beside the simulated schedule.
    pub trace: bool,
    /// A checkpoint that cannot be written (disk full, I/O error): `stop` the job, or `continue`
    /// training and try again at the next checkpoint interval (the previous checkpoint is kept).
    #[serde(with = "choices::text")]
    pub checkpoint_failure: CheckpointFailure,
    /// Steps between checkpoints (0 = only at the end).
    pub checkpoint_interval: u64,
    /// Checkpoints kept in `out_dir/checkpoints` (older ones are deleted).
    pub keep_checkpoints: usize,
    /// Intra-op CPU threads for libtorch (0 = libtorch's default).
    pub threads: usize,
    /// Characters/tokens of text sampled at the end of training (0 = none).
    pub sample_tokens: usize,
    /// Stop once this step is done, with a checkpoint, as an interrupted job would (the LR
    /// schedule still follows train.max_steps); resume later with run.resume=true. 0 = off.
    pub stop_at: u64,
}

/// `run.resume`: written `false`, `true` or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resume {
    #[default]
    No,
    Yes,
    Auto,
}

impl Serialize for Resume {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Resume::No => s.serialize_bool(false),
            Resume::Yes => s.serialize_bool(true),
            Resume::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Resume {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(b) => Ok(if b { Resume::Yes } else { Resume::No }),
            Raw::Text(t) if t == "auto" => Ok(Resume::Auto),
            Raw::Text(t) => Err(serde::de::Error::custom(format!("run.resume = {t:?}: use true, false or \"auto\""))),
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig { path: PathBuf::from("data/pystdlib.txt"), tokenizer: "char".into(), val_fraction: 0.1 }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            max_steps: 600,
            batch_size: 32,
            grad_accum: 1,
            lr: 2e-3,
            min_lr: 2e-4,
            warmup_steps: 50,
            lr_decay_steps: 0,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            grad_clip: 1.0,
            dtype: Dtype::Auto,
            tf32: true,
            fused_adamw: Fused::Auto,
            log_interval: 10,
            eval_interval: 200,
            eval_iters: 20,
            peak_flops: 0.0,
            nonfinite: Nonfinite::Stop,
            max_skipped_steps: 10,
            recompute: Recompute::None,
        }
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            out_dir: PathBuf::from("runs/tiny"),
            seed: 1337,
            device: DeviceChoice::Auto,
            resume: Resume::No,
            resume_from: PathBuf::new(),
            if_exists: IfExists::Refuse,
            async_checkpoint: true,
            trace: false,
            checkpoint_failure: CheckpointFailure::Stop,
            checkpoint_interval: 0,
            keep_checkpoints: 2,
            threads: 0,
            sample_tokens: 300,
            stop_at: 0,
        }
    }
}

impl Config {
    /// The named preset: model shape plus batch and schedule settings that suit it.
    pub fn preset(name: &str) -> Result<Config> {
        let model = ModelConfig::preset(name).ok_or_else(|| ConfigError::UnknownPreset { name: printable(name), valid: PRESET_NAMES.join(", ") })?;
        let mut c = Config {
            model: model.into(),
            data: DataConfig::default(),
            train: TrainConfig::default(),
            run: RunConfig::default(),
            parallel: ParallelConfig::default(),
            comm: CommConfig::default(),
        };
        if name.starts_with("llama3") {
            // Llama 3 recipes at laptop scale of the batch: BPE tokens (a Hugging Face tokenizer
            // file for real runs: data.tokenizer="hf:PATH"), 3e-4 peak, 0.95 beta2.
            c.data.tokenizer = "gpt2".into();
            c.train = TrainConfig {
                max_steps: 5000,
                batch_size: 1,
                grad_accum: 8,
                lr: 3e-4,
                min_lr: 3e-5,
                warmup_steps: 200,
                beta2: 0.95,
                eval_interval: 500,
                ..TrainConfig::default()
            };
            c.run.out_dir = PathBuf::from(format!("runs/{name}"));
        } else if name == "llama-tiny" {
            c.run.out_dir = PathBuf::from("runs/llama-tiny");
        } else if name != "tiny" {
            // GPT-2 recipes (nanoGPT's train_gpt2 defaults): BPE tokens, 6e-4 peak, 0.95 beta2.
            c.data.tokenizer = "gpt2".into();
            c.train = TrainConfig {
                max_steps: 5000,
                batch_size: 8,
                grad_accum: 8,
                lr: 6e-4,
                min_lr: 6e-5,
                warmup_steps: 200,
                beta2: 0.95,
                log_interval: 10,
                eval_interval: 500,
                ..TrainConfig::default()
            };
            c.run.out_dir = PathBuf::from(format!("runs/{name}"));
        }
        Ok(c)
    }

    /// Resolves preset ← file ← overrides into a validated config.
    pub fn resolve(preset: Option<&str>, file: Option<&Path>, sets: &[String]) -> Result<Config> {
        let base = Config::preset(preset.unwrap_or("tiny"))?;
        let mut schema = toml::Value::try_from(&base).expect("config serializes");
        model_section::widen_schema(&mut schema, &base.model);
        let mut merged = schema.clone();
        // The [model] keys as the user wrote them (file, then --set), for model_section::finish.
        let mut user_model = toml::value::Table::new();
        if let Some(path) = file {
            let text = fabbrica_data::bounded::read_to_string(path, MAX_CONFIG_BYTES)
                .map_err(|e| ConfigError::Io { path: path.to_path_buf(), why: e.to_string() })?;
            let table: toml::Value =
                toml::from_str(&text).map_err(|e| ConfigError::Toml { path: path.to_path_buf(), why: one_line(&e.to_string()) })?;
            merge_checked(&schema, &mut merged, &table, "")?;
            if let Some(toml::Value::Table(m)) = table.get("model") {
                overlay(&mut user_model, m);
            }
        }
        for set in sets {
            let (key, mut value, raw) = parse_set(set)?;
            // A string key takes the text as written: `run.out_dir=2024` is the directory "2024".
            if matches!(lookup(&schema, &key), Some(toml::Value::String(_))) && !value.is_str() {
                value = toml::Value::String(raw);
            }
            let mut layer = toml::value::Table::new();
            insert_dotted(&mut layer, &key, value);
            merge_checked(&schema, &mut merged, &toml::Value::Table(layer.clone()), "")?;
            if let Some(toml::Value::Table(m)) = layer.get("model") {
                overlay(&mut user_model, m);
            }
        }
        model_section::finish(&mut merged, &user_model, &base.model)?;
        let config: Config = merged.clone().try_into().map_err(|e: toml::de::Error| type_error(&e, &merged, ""))?;
        config.validate()?;
        Ok(config)
    }

    /// Value checks that need no data or device; each error names its key, the allowed range
    /// and a value to set. Every number is bounded, so nothing downstream overflows or panics
    /// (durations, thread counts, products such as batch_size·grad_accum·dp·block_size).
    pub fn validate(&self) -> Result<()> {
        let invalid = |key: &str, value: &dyn std::fmt::Display, why: &str| {
            Err(ConfigError::Invalid { key: key.to_string(), value: printable(&value.to_string()), why: why.to_string() })
        };
        let invalid_str = |key: &str, value: &str, why: &str| {
            Err(ConfigError::Invalid { key: key.to_string(), value: printable(&format!("{value:?}")), why: why.to_string() })
        };
        let mut model = self.model.arch.clone();
        if model.vocab_size() == 0 {
            model.set_vocab_size(1); // resolved from the tokenizer later; check the other fields now
        }
        model.validate().map_err(|e| ConfigError::Model(e.to_string()))?;
        let t = &self.train;
        let r = &self.run;
        let p = &self.parallel;
        // `hf:PATH` names a Hugging Face tokenizer.json; the file itself is read with the data.
        if self.data.tokenizer.parse::<fabbrica_data::TokenizerSpec>().is_err() {
            return invalid_str("data.tokenizer", &self.data.tokenizer, "use `char`, `gpt2` or `hf:PATH/tokenizer.json`");
        }
        if !(self.data.val_fraction > 0.0 && self.data.val_fraction < 1.0) {
            return invalid("data.val_fraction", &self.data.val_fraction, "must be between 0 and 1 (exclusive), e.g. data.val_fraction=0.1");
        }
        check_int("train.max_steps", t.max_steps, 1, MAX_STEPS, "train.max_steps=5000")?;
        check_int("train.batch_size", t.batch_size as u64, 1, MAX_BATCH, "train.batch_size=32")?;
        check_int("train.grad_accum", t.grad_accum as u64, 1, MAX_BATCH, "train.grad_accum=1")?;
        check_int("parallel.dp", p.dp as u64, 0, MAX_RANKS, "parallel.dp=0 (all ranks)")?;
        let per_rank = t.batch_size as u128 * t.grad_accum as u128 * self.model.block_size() as u128;
        if per_rank > MAX_TOKENS_PER_RANK_STEP as u128 {
            return invalid(
                "train.batch_size",
                &t.batch_size,
                &format!(
                    "train.batch_size x train.grad_accum x model.block_size = {per_rank} tokens per rank per step, more than {MAX_TOKENS_PER_RANK_STEP}: lower one of them"
                ),
            );
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return invalid("train.lr", &t.lr, "must be a positive (finite) number, e.g. train.lr=3e-4");
        }
        if !(t.min_lr.is_finite() && t.min_lr >= 0.0 && t.min_lr <= t.lr) {
            return invalid("train.min_lr", &t.min_lr, &format!("must be between 0 and train.lr ({}), e.g. train.min_lr=0", t.lr));
        }
        check_float("train.weight_decay", t.weight_decay, 0.0, true, MAX_WEIGHT_DECAY, "train.weight_decay=0.1")?;
        for (key, b, example) in [("train.beta1", t.beta1, "train.beta1=0.9"), ("train.beta2", t.beta2, "train.beta2=0.95")] {
            if !(0.0..1.0).contains(&b) {
                return invalid(key, &b, &format!("must be in [0, 1), e.g. {example}"));
            }
        }
        check_float("train.eps", t.eps, 0.0, false, 1.0, "train.eps=1e-8")?;
        check_float("train.grad_clip", t.grad_clip, 0.0, true, MAX_GRAD_CLIP, "train.grad_clip=1.0 (0 turns clipping off)")?;
        check_int("train.warmup_steps", t.warmup_steps, 0, MAX_STEPS, "train.warmup_steps=100")?;
        check_int("train.lr_decay_steps", t.lr_decay_steps, 0, MAX_STEPS, "train.lr_decay_steps=0 (= train.max_steps)")?;
        check_int("train.log_interval", t.log_interval, 1, MAX_STEPS, "train.log_interval=10")?;
        check_int("train.eval_interval", t.eval_interval, 1, MAX_STEPS, "train.eval_interval=500")?;
        check_int("train.eval_iters", t.eval_iters, 1, MAX_EVAL_ITERS, "train.eval_iters=20")?;
        check_float("train.peak_flops", t.peak_flops, 0.0, true, MAX_PEAK_FLOPS, "train.peak_flops=0 (detect)")?;
        check_int("train.max_skipped_steps", t.max_skipped_steps, 0, MAX_STEPS, "train.max_skipped_steps=10")?;
        check_int("run.checkpoint_interval", r.checkpoint_interval, 0, MAX_STEPS, "run.checkpoint_interval=1000 (0 = only at the end)")?;
        check_int("run.keep_checkpoints", r.keep_checkpoints as u64, 1, MAX_KEEP_CHECKPOINTS, "run.keep_checkpoints=2")?;
        check_int("run.threads", r.threads as u64, 0, MAX_THREADS, "run.threads=0 (libtorch's default)")?;
        check_int("run.sample_tokens", r.sample_tokens as u64, 0, MAX_SAMPLE_TOKENS, "run.sample_tokens=300 (0 = none)")?;
        check_int("run.stop_at", r.stop_at, 0, MAX_STEPS, "run.stop_at=0 (off)")?;
        if r.out_dir.as_os_str().is_empty() {
            return invalid("run.out_dir", &"\"\"", "must name a directory");
        }
        check_int("parallel.pp", p.pp as u64, 1, MAX_PP as u64, "parallel.pp=2 (1 = no pipeline)")?;
        check_int("parallel.virtual_stages", p.virtual_stages as u64, 1, MAX_PP as u64, "parallel.virtual_stages=2 (interleaved only)")?;
        check_int("parallel.tp", p.tp as u64, 1, MAX_TP as u64, "parallel.tp=8 (1 = no tensor parallelism)")?;
        if p.sequence_parallel && p.tp == 1 {
            return invalid(
                "parallel.sequence_parallel",
                &p.sequence_parallel,
                "splits the sequence over the tensor-parallel ranks: set parallel.tp > 1, or parallel.sequence_parallel=false",
            );
        }
        if p.sequence_parallel && !self.model.block_size().is_multiple_of(p.tp) {
            return Err(ConfigError::Invalid {
                key: "model.block_size".into(),
                value: self.model.block_size().to_string(),
                why: format!(
                    "parallel.sequence_parallel splits each sequence into parallel.tp = {} shards: use a multiple of {}, or parallel.sequence_parallel=false",
                    p.tp, p.tp
                ),
            });
        }
        self.pipeline_shape()?;
        if r.trace && p.pp == 1 {
            return invalid("run.trace", &r.trace, "the trace records a pipeline's schedule: set parallel.pp > 1, or run.trace=false");
        }
        check_float("parallel.bucket_mb", p.bucket_mb, MIN_BUCKET_MB, true, MAX_BUCKET_MB, "parallel.bucket_mb=25 (PyTorch's default)")?;
        if p.zero > 1 {
            return invalid("parallel.zero", &p.zero, "use 0 (off) or 1 (ZeRO-1: optimizer state sharded)");
        }
        check_timeout_s(self.comm.timeout_s)?;
        Ok(())
    }

    /// The pipeline's schedule (validated against `parallel.pp`, `virtual_stages` and
    /// `train.grad_accum`, the micro-batches) and its stage split (layers per stage), or `None`
    /// without pipeline parallelism. Every invalid combination is one line naming what to change.
    pub fn pipeline_shape(&self) -> Result<Option<(fabbrica_pipeline::Schedule, Vec<usize>)>> {
        use fabbrica_pipeline::{Kind, Schedule, ScheduleError};
        let p = &self.parallel;
        let bad = |key: &str, value: String, why: String| ConfigError::Invalid { key: key.into(), value: printable(&value), why };
        let kind: Kind = p.schedule;
        if p.pp == 1 {
            if p.virtual_stages != 1 {
                return Err(bad(
                    "parallel.virtual_stages",
                    p.virtual_stages.to_string(),
                    "model chunks need a pipeline: set parallel.pp > 1, or parallel.virtual_stages=1".into(),
                ));
            }
            if !p.stage_layers.is_empty() {
                return Err(bad(
                    "parallel.stage_layers",
                    format!("{:?}", p.stage_layers),
                    "a split needs a pipeline: set parallel.pp > 1, or parallel.stage_layers=[]".into(),
                ));
            }
            return Ok(None);
        }
        let m = self.train.grad_accum;
        // The schedule lists every (stage, micro-batch) twice: bound it before building it.
        if (p.pp as u128) * (p.virtual_stages as u128) * (m as u128) > MAX_PIPELINE_ACTIONS as u128 {
            return Err(bad(
                "train.grad_accum",
                m.to_string(),
                format!("parallel.pp × parallel.virtual_stages × train.grad_accum (the micro-batches) exceeds {MAX_PIPELINE_ACTIONS}: use fewer micro-batches"),
            ));
        }
        let schedule = Schedule::new(kind, p.pp, p.virtual_stages, m).map_err(|e| match e {
            ScheduleError::VirtualStagesNeedInterleaved { kind, v } => bad(
                "parallel.virtual_stages",
                v.to_string(),
                format!("parallel.schedule = {kind} runs one model chunk per rank: set parallel.virtual_stages=1, or parallel.schedule=interleaved"),
            ),
            ScheduleError::InterleavedNeedsChunks { v } => bad(
                "parallel.virtual_stages",
                v.to_string(),
                "parallel.schedule = interleaved needs at least 2 model chunks per rank: set parallel.virtual_stages=2 or more, or parallel.schedule=1f1b".into(),
            ),
            ScheduleError::MicrobatchesNotMultiple { m, pp } => {
                let below = m / pp * pp;
                let near = if below == 0 { format!("{pp}") } else { format!("{below} or {}", below + pp) };
                bad(
                    "train.grad_accum",
                    m.to_string(),
                    format!("the micro-batches of a pipeline step are train.grad_accum, and parallel.schedule = interleaved runs them in groups of parallel.pp = {pp}: set train.grad_accum={near}, or use parallel.schedule=1f1b (any count)"),
                )
            }
            other => bad("parallel.schedule", p.schedule.to_string(), other.to_string()),
        })?;
        let stages = p.pp * p.virtual_stages;
        let mut model = self.model.arch.clone();
        if model.vocab_size() == 0 {
            model.set_vocab_size(256); // only the split's cost estimate reads it
        }
        let layers = if p.stage_layers.is_empty() {
            fabbrica_models::balanced_split(&model, model.block_size(), stages)
        } else {
            fabbrica_models::check_split(&model, &p.stage_layers, stages).map(|()| p.stage_layers.clone())
        }
        .map_err(|e| ConfigError::Model(e.to_string()))?;
        Ok(Some((schedule, layers)))
    }

    /// `train.recompute`.
    pub fn recompute(&self) -> Recompute {
        self.train.recompute
    }

    /// Whether this run may continue an earlier one (`run.resume` true or auto, or `run.resume_from`).
    pub fn resuming(&self) -> bool {
        self.run.resume != Resume::No || !self.run.resume_from.as_os_str().is_empty()
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }

    /// Whether AdamW runs ATen's fused kernel (`train.fused_adamw`). `auto` means yes: ATen has
    /// it for CPU and CUDA, it matches PyTorch as closely as the reference path (tests/numerics.rs),
    /// and on the CPU it is 1.3x faster per gpt2-124m step (docs/BENCHMARKS.md).
    pub fn fused_adamw(&self) -> bool {
        self.train.fused_adamw != Fused::Off
    }

    /// Steps of cosine decay (the `lr_decay_steps` default).
    pub fn decay_steps(&self) -> u64 {
        if self.train.lr_decay_steps == 0 {
            self.train.max_steps
        } else {
            self.train.lr_decay_steps
        }
    }
}

/// A value the schema's types refuse (an enum-valued key's unknown value, say): toml's message
/// ends with the key's path (`in \`parallel.reduce_dtype\``), so the error names the key, the value
/// and the type's own advice (what to set); a message that already names its key stays as it is.
/// `root` is the value deserialised, whose keys are named with `prefix` (`model.` for the model
/// section deserialised alone).
fn type_error(e: &toml::de::Error, root: &toml::Value, prefix: &str) -> ConfigError {
    let text = e.to_string();
    let key = text.lines().last().and_then(|l| l.strip_prefix("in `")).and_then(|l| l.strip_suffix('`'));
    let why = one_line(text.lines().next().unwrap_or_default());
    match key {
        Some(key) if !why.contains(key) => {
            let value = match lookup(root, key) {
                Some(toml::Value::String(s)) => format!("{s:?}"),
                Some(v) => v.to_string(),
                None => String::new(),
            };
            ConfigError::Invalid { key: format!("{prefix}{key}"), value: printable(&value), why }
        }
        _ => ConfigError::Type { why },
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

// Bounds of the numeric keys (see `Config::validate`). Generous for any real run, tight enough
// that nothing downstream overflows: e.g. batch·accum·block ≤ 2^40 and dp ≤ 2^20 keep every
// token count below 2^60.
mod limits;
pub use limits::*;

/// `value` in `[lo, hi]`, else an error naming the key, the range and `example` (`key=value`).
fn check_int(key: &str, value: u64, lo: u64, hi: u64, example: &str) -> Result<()> {
    if (lo..=hi).contains(&value) {
        return Ok(());
    }
    Err(ConfigError::Invalid { key: key.into(), value: value.to_string(), why: format!("must be in [{lo}, {hi}]; set e.g. {example}") })
}

/// `value` finite and in `[lo, hi]` (`(lo, hi]` when `lo_inclusive` is false).
fn check_float(key: &str, value: f64, lo: f64, lo_inclusive: bool, hi: f64, example: &str) -> Result<()> {
    let above = if lo_inclusive { value >= lo } else { value > lo };
    if value.is_finite() && above && value <= hi {
        return Ok(());
    }
    let open = if lo_inclusive { '[' } else { '(' };
    Err(ConfigError::Invalid { key: key.into(), value: value.to_string(), why: format!("must be in {open}{lo}, {hi}]; set e.g. {example}") })
}

/// `comm.timeout_s`: the bounds of `FABBRICA_COMM_TIMEOUT`.
pub(crate) fn check_timeout_s(value: f64) -> Result<()> {
    use fabbrica_comm::world::{MAX_TIMEOUT_S, MIN_TIMEOUT_S};
    check_float("comm.timeout_s", value, MIN_TIMEOUT_S, true, MAX_TIMEOUT_S, "comm.timeout_s=600 (seconds; at most one week)")
}

/// Text from the user for a one-line message: control characters escaped, long text cut.
fn printable(s: &str) -> String {
    const MAX: usize = 80;
    let mut out = String::new();
    for c in s.chars().take(MAX) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if s.chars().nth(MAX).is_some() {
        out.push_str("...");
    }
    out
}

/// `key=value`: the value is read as TOML (`3`, `1e-3`, `true`, `"x"`), else as a bare string.
/// Returns the key, the value and the raw value text.
fn parse_set(set: &str) -> Result<(String, toml::Value, String)> {
    let bad = || ConfigError::BadSet { set: printable(set) };
    let (key, raw) = set.split_once('=').ok_or_else(bad)?;
    let key = key.trim().to_string();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(bad());
    }
    let raw = raw.trim();
    // Exactly one key: `1\nmax_steps = 5` is not the value 1.
    let value = toml::from_str::<toml::value::Table>(&format!("v = {raw}"))
        .ok()
        .filter(|t| t.len() == 1)
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    Ok((key, value, raw.to_string()))
}

/// The schema value at dotted `key`, if there is one.
fn lookup<'a>(schema: &'a toml::Value, key: &str) -> Option<&'a toml::Value> {
    key.split('.').try_fold(schema, |v, k| v.as_table()?.get(k))
}

/// Overlays `src` on `dst`, sub-tables key by key.
fn overlay(dst: &mut toml::value::Table, src: &toml::value::Table) {
    for (k, v) in src {
        match (dst.get_mut(k), v) {
            (Some(toml::Value::Table(d)), toml::Value::Table(s)) => overlay(d, s),
            _ => {
                dst.insert(k.clone(), v.clone());
            }
        }
    }
}

fn insert_dotted(table: &mut toml::value::Table, key: &str, value: toml::Value) {
    match key.split_once('.') {
        None => {
            table.insert(key.to_string(), value);
        }
        Some((head, rest)) => {
            let entry = table.entry(head.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
            if let toml::Value::Table(t) = entry {
                insert_dotted(t, rest, value);
            }
        }
    }
}

/// Overlays `src` on `dst`, refusing keys absent from `schema` (which has every key) and values
/// whose TOML type differs from the schema's (a float key also takes an integer).
fn merge_checked(schema: &toml::Value, dst: &mut toml::Value, src: &toml::Value, prefix: &str) -> Result<()> {
    let (toml::Value::Table(schema_t), toml::Value::Table(dst_t), toml::Value::Table(src_t)) = (schema, dst, src) else {
        unreachable!("merge_checked is called on tables")
    };
    for (k, v) in src_t {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        let Some(schema_v) = schema_t.get(k) else {
            let mut valid: Vec<String> = schema_t.keys().map(|s| if prefix.is_empty() { s.clone() } else { format!("{prefix}.{s}") }).collect();
            valid.sort();
            return Err(ConfigError::UnknownKey { key: printable(&path), valid: valid.join(", ") });
        };
        match (schema_v, v) {
            (toml::Value::Table(_), toml::Value::Table(_)) => merge_checked(schema_v, dst_t.get_mut(k).expect("dst mirrors schema"), v, &path)?,
            (toml::Value::Table(_), _) => return Err(ConfigError::NotATable { key: printable(&path) }),
            (_, toml::Value::Table(_)) => return Err(ConfigError::Type { why: format!("`{}` is a value, not a section", printable(&path)) }),
            _ => {
                let value = checked_type(&path, schema_v, v)?;
                dst_t.insert(k.clone(), value);
            }
        }
    }
    Ok(())
}

/// `value` if it has the type of `schema` (the key's default), an integer widened for a float
/// key; else an error naming the key, the type expected and an example.
fn checked_type(key: &str, schema: &toml::Value, value: &toml::Value) -> Result<toml::Value> {
    use toml::Value as V;
    // The one key that takes a boolean or a word.
    if key == "run.resume" && matches!(value, V::String(s) if s == "auto") {
        return Ok(value.clone());
    }
    let expected = match (schema, value) {
        (V::Integer(_), V::Integer(i)) if *i < 0 => "a non-negative integer",
        (V::Integer(_), V::Integer(_)) | (V::Float(_), V::Float(_)) | (V::Boolean(_), V::Boolean(_)) | (V::String(_), V::String(_)) => {
            return Ok(value.clone())
        }
        (V::Float(_), V::Integer(i)) => return Ok(V::Float(*i as f64)),
        (V::Array(_), V::Array(a)) if a.iter().all(|x| matches!(x, V::Integer(i) if *i >= 0)) => return Ok(value.clone()),
        (V::Array(_), _) => "a list of non-negative integers",
        (V::Integer(_), _) => "an integer",
        (V::Float(_), _) => "a number",
        (V::Boolean(_), _) if key == "run.resume" => "true, false or \"auto\"",
        (V::Boolean(_), _) => "true or false",
        (V::String(_), _) => "a string",
        _ => "a value like the default",
    };
    let example = match schema {
        V::String(s) if s.is_empty() => format!("{key}=\"...\""),
        V::Array(_) => format!("{key}=[2, 2]"),
        other => format!("{key}={other}"),
    };
    Err(ConfigError::WrongType { key: printable(key), value: printable(&value.to_string()), expected: expected.into(), example: printable(&example) })
}

#[cfg(test)]
mod tests;
