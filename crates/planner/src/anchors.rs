//! Validation against published, measured runs (`data/published_runs.csv`, a copy of
//! `shared/anchors/published_runs.csv`): for each run, the planner's throughput for the
//! published layout on the preset of its hardware, against the published figure converted to
//! tokens per second per GPU with the source's own FLOP counting.
//!
//! Keys a source leaves blank (micro-batch, virtual stages, recomputation) are chosen by the
//! planner's search, as `--explain` does. Execution follows each source: Narayanan et al. 2021
//! (Megatron-LM, SC21) ran before fused attention kernels and sequence parallelism, and reduced
//! gradients after the backward pass; Megatron-Core r0.8 (2024) runs flash attention, sequence
//! parallelism and overlapped communication.

use crate::cluster::Cluster;
use crate::error::PlanError;
use crate::estimate::{Execution, Workload};
use crate::layout::Forced;
use crate::model::{ModelShape, Recompute};
use crate::search::Planner;
use crate::sim::Simulator;

/// The validation set, built into the binary.
pub const PUBLISHED_RUNS: &str = include_str!("../data/published_runs.csv");

/// One published run.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// Paper or document.
    pub source: String,
    /// Hardware as the source names it.
    pub hardware: String,
    /// Parameters, billions (as published).
    pub params_b: f64,
    /// Shape.
    pub layers: usize,
    /// Model width.
    pub hidden: usize,
    /// Heads.
    pub heads: usize,
    /// Sequence length.
    pub seq: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// Layout.
    pub tp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Data-parallel replicas.
    pub dp: usize,
    /// GPUs.
    pub gpus: usize,
    /// Sequences per step.
    pub global_batch: usize,
    /// When published.
    pub micro_batch: Option<usize>,
    /// When published.
    pub virtual_stages: Option<usize>,
    /// When published.
    pub recompute: Option<Recompute>,
    /// Measured TFLOP/s per GPU as the source counts them.
    pub measured_tflops: f64,
    /// `hfu_with_full_recompute` or `model_flops`.
    pub counting: String,
}

impl Run {
    /// The cluster preset of the run's hardware.
    pub fn cluster(&self) -> Result<Cluster, PlanError> {
        let name = match self.hardware.as_str() {
            "A100-80GB" => "a100",
            "H100-SXM" => "h100-sxm",
            other => return Err(PlanError::input(format!("published run on {other}: no cluster preset for it"))),
        };
        Cluster::preset(name).ok_or_else(|| PlanError::internal(format!("preset {name} missing")))
    }

    /// How the source's runtime executed (see the module docs).
    pub fn execution(&self) -> Execution {
        if self.source.starts_with("narayanan2021") {
            Execution { materialised_attention: true, sequence_parallel: false, dp_overlap: false, megatron_state: true, ..Execution::default() }
        } else {
            Execution { megatron_state: true, ..Execution::default() }
        }
    }

    /// FLOPs per token as the source counts them: Narayanan et al. 2021 eq. 3,
    /// `96·l·h²·(1 + s/(6h) + V/(16·l·h))` per token, counts the recomputed forward; model FLOPs
    /// (Megatron's `num_floating_point_operations`) are `72·l·h²·(1 + s/(6h) + V/(12·l·h))`.
    pub fn counted_flops_per_token(&self) -> f64 {
        let (l, h, s, v) = (self.layers as f64, self.hidden as f64, self.seq as f64, self.vocab as f64);
        if self.counting == "hfu_with_full_recompute" {
            96.0 * l * h * h * (1.0 + s / (6.0 * h) + v / (16.0 * l * h))
        } else {
            72.0 * l * h * h * (1.0 + s / (6.0 * h) + v / (12.0 * l * h))
        }
    }

    /// The published throughput, tokens per second per GPU.
    pub fn measured_tokens_per_gpu(&self) -> f64 {
        self.measured_tflops * 1e12 / self.counted_flops_per_token()
    }
}

/// Parses the CSV (comment lines start with `#`).
pub fn parse(text: &str) -> Result<Vec<Run>, PlanError> {
    let mut lines = text.lines().filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty());
    let header: Vec<&str> = lines.next().ok_or_else(|| PlanError::input("published runs: no header".into()))?.split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).ok_or_else(|| PlanError::input(format!("published runs: no column {name}")));
    let idx: Vec<usize> = [
        "source",
        "hardware",
        "params_b",
        "layers",
        "hidden",
        "heads",
        "seq",
        "vocab",
        "tp",
        "pp",
        "dp",
        "gpus",
        "global_batch",
        "micro_batch",
        "virtual_stages",
        "recompute",
        "measured_tflops_per_gpu",
        "flops_counting",
    ]
    .iter()
    .map(|n| col(n))
    .collect::<Result<_, _>>()?;
    let mut runs = Vec::new();
    for (i, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        let get = |k: usize| f.get(idx[k]).copied().unwrap_or("").trim();
        let bad = |k: usize| PlanError::input(format!("published runs row {}: bad {}", i + 1, header[idx[k]]));
        let n = |k: usize| get(k).parse::<usize>().map_err(|_| bad(k));
        let x = |k: usize| get(k).parse::<f64>().map_err(|_| bad(k));
        let opt = |k: usize| if get(k).is_empty() { Ok(None) } else { n(k).map(Some) };
        let recompute = match get(15) {
            "" => None,
            r => Some(r.parse::<Recompute>().map_err(|_| bad(15))?),
        };
        runs.push(Run {
            source: get(0).into(),
            hardware: get(1).into(),
            params_b: x(2)?,
            layers: n(3)?,
            hidden: n(4)?,
            heads: n(5)?,
            seq: n(6)?,
            vocab: n(7)?,
            tp: n(8)?,
            pp: n(9)?,
            dp: n(10)?,
            gpus: n(11)?,
            global_batch: n(12)?,
            micro_batch: opt(13)?,
            virtual_stages: opt(14)?,
            recompute,
            measured_tflops: x(16)?,
            counting: get(17).into(),
        });
    }
    Ok(runs)
}

/// The planner against one published run.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// The run.
    pub run: Run,
    /// Published tokens/s per GPU.
    pub measured: f64,
    /// Planner's tokens/s per GPU for the published layout (unknown keys searched).
    pub predicted: f64,
    /// `predicted / measured - 1`.
    pub error: f64,
    /// The layout the planner completed (`--explain` form).
    pub layout: String,
    /// Step time of the planner's own best layout over the published one's (≤ 1: at least as fast).
    pub own_best_ratio: f64,
    /// The planner's own best layout.
    pub own_best: String,
}

/// Runs the planner on every published run.
pub fn check_all(runs: &[Run]) -> Result<Vec<Check>, PlanError> {
    let mut sim = Simulator::default();
    runs.iter().map(|r| check(r, &mut sim)).collect()
}

/// Runs the planner on one published run (`sim`: a simulator whose cache is shared across runs).
pub fn check(run: &Run, sim: &mut Simulator) -> Result<Check, PlanError> {
    let name = format!("{} {}B", run.source, run.params_b);
    let model = ModelShape::from_columns(&name, run.layers, run.hidden, run.heads, run.seq, run.vocab)?;
    let cluster = run.cluster()?;
    let mut planner = Planner::with_simulator(&model, &cluster, Workload { global_batch: run.global_batch }, run.execution(), std::mem::take(sim));
    let forced = Forced {
        tp: Some(run.tp),
        pp: Some(run.pp),
        dp: Some(run.dp),
        v: run.virtual_stages,
        mb: run.micro_batch,
        recompute: run.recompute,
        zero: None,
    };
    let found = planner.search(run.gpus, &forced, 1)?;
    let e = found.best.first().ok_or_else(|| PlanError::input(format!("{name}: the published layout does not fit by the planner's memory model")))?;
    let predicted = e.tokens_per_s / e.gpus as f64;
    let measured = run.measured_tokens_per_gpu();
    let own = planner.search(run.gpus, &Forced::default(), 1)?;
    *sim = std::mem::take(&mut planner.sim);
    let best = own.best.first().ok_or_else(|| PlanError::internal(format!("{name}: the free search found nothing")))?;
    Ok(Check {
        run: run.clone(),
        measured,
        predicted,
        error: predicted / measured - 1.0,
        layout: e.layout.spec(),
        own_best_ratio: best.step_s / e.step_s,
        own_best: best.layout.spec(),
    })
}

/// Median and largest absolute error.
pub fn summary(checks: &[Check]) -> (f64, f64) {
    let mut e: Vec<f64> = checks.iter().map(|c| c.error.abs()).collect();
    e.sort_by(f64::total_cmp);
    let median = if e.is_empty() {
        0.0
    } else if e.len() % 2 == 1 {
        e[e.len() / 2]
    } else {
        (e[e.len() / 2 - 1] + e[e.len() / 2]) / 2.0
    };
    (median, e.last().copied().unwrap_or(0.0))
}
