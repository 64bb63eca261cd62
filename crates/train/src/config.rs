//! The one typed configuration: `[model]`, `[data]`, `[train]`, `[run]`.
//!
//! Layers, later wins: preset (default `tiny`) ← `--config FILE.toml` ← each `--set key=value`.
//! Every key is checked against this schema (unknown keys are refused with the valid ones
//! listed) and every value is validated before any data or device is touched.

use std::path::{Path, PathBuf};

use fabbrica_models::{GptConfig, PRESET_NAMES};
use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: GptConfig,
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
    /// Pipeline stages (1: pipeline parallelism is not implemented yet).
    pub pp: usize,
    /// Gradient bucket size cap in MiB (PyTorch DDP's default is 25).
    pub bucket_mb: f64,
    /// Dtype gradients travel in: `fp32` (the gradients' own) or `bf16` (half the bytes).
    pub reduce_dtype: String,
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
        ParallelConfig { dp: 0, pp: 1, bucket_mb: 25.0, reduce_dtype: "fp32".into(), zero: 0, overlap: true, grad_comm: true }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommConfig {
    /// `auto` (NCCL for CUDA tensors when it loads, MPI otherwise), `mpi` or `nccl`.
    pub backend: String,
    /// A collective running longer than this ends the job with a report (env FABBRICA_COMM_TIMEOUT wins).
    pub timeout_s: f64,
    /// Check before each collective that all ranks call the same one (env FABBRICA_COMM_DEBUG wins).
    pub debug: bool,
}

impl Default for CommConfig {
    fn default() -> Self {
        CommConfig { backend: "auto".into(), timeout_s: 600.0, debug: false }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A UTF-8 text file (tokenized at start) or a directory from `fabbrica prepare`.
    pub path: PathBuf,
    /// Tokenizer for a text file: `char` or `gpt2` (a prepared directory names its own).
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
    /// `auto` (bf16 autocast on CUDA, fp32 on CPU), `fp32` or `bf16`.
    pub dtype: String,
    /// `auto`/`on`: ATen's fused AdamW kernel (CPU and CUDA); `off`: tensor-op reference path.
    pub fused_adamw: String,
    pub log_interval: u64,
    pub eval_interval: u64,
    /// Batches per split per evaluation.
    pub eval_iters: u64,
    /// Peak FLOP/s of one device for MFU; 0 = detect (known GPUs), else MFU is not reported.
    pub peak_flops: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub out_dir: PathBuf,
    pub seed: u64,
    /// `auto`, `cpu`, `cuda`.
    pub device: String,
    /// Continue from the latest checkpoint in `out_dir`.
    pub resume: bool,
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
            dtype: "auto".into(),
            fused_adamw: "auto".into(),
            log_interval: 10,
            eval_interval: 200,
            eval_iters: 20,
            peak_flops: 0.0,
        }
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            out_dir: PathBuf::from("runs/tiny"),
            seed: 1337,
            device: "auto".into(),
            resume: false,
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
        let model = GptConfig::preset(name).ok_or_else(|| ConfigError::UnknownPreset {
            name: name.to_string(),
            valid: PRESET_NAMES.join(", "),
        })?;
        let mut c = Config {
            model,
            data: DataConfig::default(),
            train: TrainConfig::default(),
            run: RunConfig::default(),
            parallel: ParallelConfig::default(),
            comm: CommConfig::default(),
        };
        if name != "tiny" {
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
        let schema = toml::Value::try_from(&base).expect("config serializes");
        let mut merged = schema.clone();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::Io { path: path.to_path_buf(), why: e.to_string() })?;
            let table: toml::Value = toml::from_str(&text).map_err(|e| ConfigError::Toml {
                path: path.to_path_buf(),
                why: one_line(&e.to_string()),
            })?;
            merge_checked(&schema, &mut merged, &table, "")?;
        }
        for set in sets {
            let (key, value) = parse_set(set)?;
            let mut overlay = toml::value::Table::new();
            insert_dotted(&mut overlay, &key, value);
            merge_checked(&schema, &mut merged, &toml::Value::Table(overlay), "")?;
        }
        let config: Config = merged.try_into().map_err(|e: toml::de::Error| ConfigError::Type {
            why: one_line(&e.to_string()),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Value checks that need no data or device; each error names its key.
    pub fn validate(&self) -> Result<()> {
        let invalid = |key: &str, value: &dyn std::fmt::Display, why: &str| {
            Err(ConfigError::Invalid { key: key.to_string(), value: value.to_string(), why: why.to_string() })
        };
        let mut model = self.model.clone();
        if model.vocab_size == 0 {
            model.vocab_size = 1; // resolved from the tokenizer later; check the other fields now
        }
        model.validate().map_err(|e| ConfigError::Model(e.to_string()))?;
        let t = &self.train;
        if !matches!(self.data.tokenizer.as_str(), "char" | "gpt2") {
            return invalid("data.tokenizer", &self.data.tokenizer, "use `char` or `gpt2`");
        }
        if !(self.data.val_fraction > 0.0 && self.data.val_fraction < 1.0) {
            return invalid("data.val_fraction", &self.data.val_fraction, "must be between 0 and 1 (exclusive)");
        }
        if t.max_steps == 0 {
            return invalid("train.max_steps", &0, "must be at least 1");
        }
        if t.batch_size == 0 {
            return invalid("train.batch_size", &0, "must be at least 1");
        }
        if t.grad_accum == 0 {
            return invalid("train.grad_accum", &0, "must be at least 1");
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return invalid("train.lr", &t.lr, "must be a positive number");
        }
        if !(t.min_lr.is_finite() && t.min_lr >= 0.0 && t.min_lr <= t.lr) {
            return invalid("train.min_lr", &t.min_lr, "must be between 0 and train.lr");
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return invalid("train.weight_decay", &t.weight_decay, "must be >= 0");
        }
        for (key, b) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return invalid(key, &b, "must be in [0, 1)");
            }
        }
        if !(t.eps.is_finite() && t.eps > 0.0) {
            return invalid("train.eps", &t.eps, "must be a positive number");
        }
        if !(t.grad_clip.is_finite() && t.grad_clip >= 0.0) {
            return invalid("train.grad_clip", &t.grad_clip, "must be >= 0 (0 turns clipping off)");
        }
        if !matches!(t.dtype.as_str(), "auto" | "fp32" | "bf16") {
            return invalid("train.dtype", &t.dtype, "use `auto`, `fp32` or `bf16`");
        }
        if !matches!(t.fused_adamw.as_str(), "auto" | "on" | "off") {
            return invalid("train.fused_adamw", &t.fused_adamw, "use `auto`, `on` or `off`");
        }
        if t.log_interval == 0 {
            return invalid("train.log_interval", &0, "must be at least 1");
        }
        if t.eval_interval == 0 {
            return invalid("train.eval_interval", &0, "must be at least 1");
        }
        if t.eval_iters == 0 {
            return invalid("train.eval_iters", &0, "must be at least 1");
        }
        if !(t.peak_flops.is_finite() && t.peak_flops >= 0.0) {
            return invalid("train.peak_flops", &t.peak_flops, "must be >= 0 (0 = detect)");
        }
        if !matches!(self.run.device.as_str(), "auto" | "cpu" | "cuda") {
            return invalid("run.device", &self.run.device, "use `auto`, `cpu` or `cuda`");
        }
        if self.run.keep_checkpoints == 0 {
            return invalid("run.keep_checkpoints", &0, "must be at least 1");
        }
        if self.run.out_dir.as_os_str().is_empty() {
            return invalid("run.out_dir", &"\"\"", "must name a directory");
        }
        let p = &self.parallel;
        if p.pp != 1 {
            return invalid("parallel.pp", &p.pp, "pipeline parallelism is not available yet: use parallel.pp=1");
        }
        if !(p.bucket_mb.is_finite() && p.bucket_mb > 0.0) {
            return invalid("parallel.bucket_mb", &p.bucket_mb, "must be a positive number of MiB (PyTorch's default is 25)");
        }
        if !matches!(p.reduce_dtype.as_str(), "fp32" | "bf16") {
            return invalid("parallel.reduce_dtype", &p.reduce_dtype, "use `fp32` or `bf16`");
        }
        if p.zero > 1 {
            return invalid("parallel.zero", &p.zero, "use 0 (off) or 1 (ZeRO-1: optimizer state sharded)");
        }
        if !matches!(self.comm.backend.as_str(), "auto" | "mpi" | "nccl") {
            return invalid("comm.backend", &self.comm.backend, "use `auto`, `mpi` or `nccl`");
        }
        if !(self.comm.timeout_s.is_finite() && self.comm.timeout_s > 0.0) {
            return invalid("comm.timeout_s", &self.comm.timeout_s, "must be a positive number of seconds");
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }

    /// Whether AdamW runs ATen's fused kernel (`train.fused_adamw`). `auto` means yes: ATen has
    /// it for CPU and CUDA, it matches PyTorch as closely as the reference path (tests/numerics.rs),
    /// and on the CPU it is 1.3x faster per gpt2-124m step (docs/BENCHMARKS.md).
    pub fn fused_adamw(&self) -> bool {
        self.train.fused_adamw != "off"
    }

    /// Steps of cosine decay (the `lr_decay_steps` default).
    pub fn decay_steps(&self) -> u64 {
        if self.train.lr_decay_steps == 0 { self.train.max_steps } else { self.train.lr_decay_steps }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `key=value`: the value is read as TOML (`3`, `1e-3`, `true`, `"x"`), else as a bare string.
fn parse_set(set: &str) -> Result<(String, toml::Value)> {
    let (key, raw) = set.split_once('=').ok_or_else(|| ConfigError::BadSet { set: set.to_string() })?;
    let key = key.trim().to_string();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(ConfigError::BadSet { set: set.to_string() });
    }
    let raw = raw.trim();
    let value = toml::from_str::<toml::value::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    Ok((key, value))
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

/// Overlays `src` on `dst`, refusing keys absent from `schema` (which has every key).
fn merge_checked(schema: &toml::Value, dst: &mut toml::Value, src: &toml::Value, prefix: &str) -> Result<()> {
    let (toml::Value::Table(schema_t), toml::Value::Table(dst_t), toml::Value::Table(src_t)) = (schema, dst, src) else {
        unreachable!("merge_checked is called on tables")
    };
    for (k, v) in src_t {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        let Some(schema_v) = schema_t.get(k) else {
            let mut valid: Vec<String> = schema_t.keys().map(|s| if prefix.is_empty() { s.clone() } else { format!("{prefix}.{s}") }).collect();
            valid.sort();
            return Err(ConfigError::UnknownKey { key: path, valid: valid.join(", ") });
        };
        match (schema_v, v) {
            (toml::Value::Table(_), toml::Value::Table(_)) => {
                merge_checked(schema_v, dst_t.get_mut(k).expect("dst mirrors schema"), v, &path)?
            }
            (toml::Value::Table(_), _) => return Err(ConfigError::NotATable { key: path }),
            (_, toml::Value::Table(_)) => return Err(ConfigError::Type { why: format!("`{path}` is a value, not a section") }),
            _ => {
                dst_t.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sets(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[train]\nlr = 1e-3\nmax_steps = 7\n[model]\nn_layer = 2\n").unwrap();
        let c = Config::resolve(Some("tiny"), Some(&f), &sets(&["train.max_steps=9", "run.device=cpu"])).unwrap();
        assert_eq!(c.train.lr, 1e-3);
        assert_eq!(c.train.max_steps, 9);
        assert_eq!(c.model.n_layer, 2);
        assert_eq!(c.run.device, "cpu");
        let g = Config::resolve(Some("gpt2-124m"), None, &[]).unwrap();
        assert_eq!((g.model.n_layer, g.model.n_embd, g.data.tokenizer.as_str()), (12, 768, "gpt2"));
    }

    #[test]
    fn unknown_keys_presets_and_values_are_named() {
        let e = Config::resolve(None, None, &sets(&["train.lrr=1"])).unwrap_err().to_string();
        assert!(e.contains("train.lrr") && e.contains("train.lr"), "{e}");
        let e = Config::resolve(None, None, &sets(&["bogus.x=1"])).unwrap_err().to_string();
        assert!(e.contains("bogus") && e.contains("model"), "{e}");
        let e = Config::resolve(Some("gpt9"), None, &[]).unwrap_err().to_string();
        assert!(e.contains("gpt9") && e.contains("gpt2-124m"), "{e}");
        let e = Config::resolve(None, None, &sets(&["train.batch_size=0"])).unwrap_err().to_string();
        assert!(e.contains("train.batch_size"), "{e}");
        let e = Config::resolve(None, None, &sets(&["train.max_steps=abc"])).unwrap_err().to_string();
        assert!(e.contains("max_steps"), "{e}");
        let e = Config::resolve(None, None, &sets(&["run.device=tpu"])).unwrap_err().to_string();
        assert!(e.contains("run.device") && e.contains("cuda"), "{e}");
        let e = Config::resolve(None, None, &sets(&["model.n_embd=130"])).unwrap_err().to_string();
        assert!(e.contains("model.n_embd"), "{e}");
        let e = Config::resolve(None, None, &sets(&["noequals"])).unwrap_err().to_string();
        assert!(e.contains("key=value"), "{e}");
        let e = Config::resolve(None, None, &sets(&["train=3"])).unwrap_err().to_string();
        assert!(e.contains("train") && e.contains("section"), "{e}");
    }

    #[test]
    fn malformed_toml_names_the_file_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bad.toml");
        std::fs::write(&f, "[train\nlr = ").unwrap();
        let e = Config::resolve(None, Some(&f), &[]).unwrap_err().to_string();
        assert!(e.contains("bad.toml") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn round_trips_through_toml() {
        let c = Config::resolve(Some("gpt2-350m"), None, &sets(&["train.lr=3e-4"])).unwrap();
        let back: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(c, back);
    }
}
