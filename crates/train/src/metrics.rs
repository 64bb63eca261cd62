//! Training metrics: one JSON object per line in `out_dir/metrics.jsonl`, and a progress bar
//! (rank 0 only, drawn only on a terminal; otherwise plain log lines).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::checkpoint::write_atomic;
use crate::error::{io_err, TrainError};

/// One line of metrics.jsonl. Train lines carry the step metrics; eval lines carry the losses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub kind: String, // "train" | "eval"
    pub step: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens_per_s: Option<f64>,
    /// Model FLOPs utilisation; null when the device's peak is unknown (set train.peak_flops).
    #[serde(default)]
    pub mfu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub step_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub peak_mem_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub train_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
    /// Data-parallel runs: per-rank time per step over the log window.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stragglers: Option<Stragglers>,
    /// Pipeline runs: each pipeline rank's (of the first replica) compute and wait per step and
    /// its measured idle fraction (bubble plus communication) over the log window.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pipeline: Option<Vec<StageReport>>,
    /// Tensor-parallel runs: what rank 0's tensor-parallel group moved per training step
    /// (forward, backward, the sequence-parallel gradient sum and the norm), as counted by the
    /// communicator, by collective.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tp_traffic: Option<TpTraffic>,
    /// `tied_embedding` lines (pipelines, at each checkpoint): how far the last stage's copy of the
    /// tied embedding is from the first stage's, as the largest relative difference of their
    /// fingerprints (sums computed where they live); exactly 0 when the copies are equal.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tied_fingerprint_diff: Option<f64>,
    /// `skipped` lines (a NaN/Inf step under `train.nonfinite = skip`) and `checkpoint_failed`
    /// lines: what happened, naming step and ranks.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub note: Option<String>,
}

/// Elements and bytes a tensor-parallel group moved in one training step (`Record::tp_traffic`):
/// all-reduces count their tensor, all-gathers their gathered output, reduce-scatters their input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpTraffic {
    pub all_reduce_elements: u64,
    pub all_gather_elements: u64,
    pub reduce_scatter_elements: u64,
    pub bytes: u64,
}

/// One pipeline rank's measured share of a step (`Record::pipeline`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    /// Pipeline coordinate (it holds stages `pp_rank`, `pp_rank + pp`, ...).
    pub pp_rank: usize,
    /// World rank.
    pub rank: usize,
    /// Forward and backward compute, ms per step.
    pub compute_ms: f64,
    /// Waiting on receives and sends, ms per step.
    pub wait_ms: f64,
    /// Fraction of the schedule's time not computing: the pipeline bubble plus communication.
    pub bubble: f64,
}

/// Straggler report: each rank's compute time and time blocked on gradient communication per
/// step (ms), and the rank with the most compute (the one the others wait for).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stragglers {
    pub slowest_rank: usize,
    pub compute_ms: Vec<f64>,
    pub comm_wait_ms: Vec<f64>,
}

pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `out_dir/metrics.jsonl`. A fresh run starts it empty; a resumed run keeps the lines
    /// up to the checkpoint's step (taken after that step) and drops later ones, written by the
    /// interrupted run after its last checkpoint, so the file reads as one uninterrupted run.
    pub fn open(out_dir: &Path, resume_step: Option<u64>) -> Result<Self, TrainError> {
        let path = out_dir.join("metrics.jsonl");
        let kept = match resume_step {
            Some(step) if path.exists() => read(&path)?
                .into_iter()
                .filter(|r| r.step <= step)
                .map(|r| serde_json::to_string(&r).expect("record serializes") + "\n")
                .collect::<String>(),
            _ => String::new(),
        };
        write_atomic(&path, kept.as_bytes())?;
        let file = OpenOptions::new().append(true).open(&path).map_err(io_err(&path))?;
        Ok(MetricsLog { path, file })
    }

    pub fn write(&mut self, r: &Record) -> Result<(), TrainError> {
        let line = serde_json::to_string(r).expect("record serializes");
        writeln!(self.file, "{line}").map_err(io_err(&self.path))?;
        self.file.flush().map_err(io_err(&self.path))
    }
}

/// Reads a metrics.jsonl file.
pub fn read(path: &Path) -> Result<Vec<Record>, TrainError> {
    let f = fabbrica_data::bounded::open_regular(path).map_err(|e| match e {
        fabbrica_data::bounded::ReadError::Io(e) => io_err(path)(e),
        e => TrainError::Io { path: path.to_path_buf(), source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()) },
    })?;
    // fabbrica's own log, read line by line (a long run's is large): only its kind is checked.
    BufReader::new(f)
        .lines()
        .filter(|l| l.as_ref().map(|s| !s.trim().is_empty()).unwrap_or(true))
        .map(|l| {
            let l = l.map_err(io_err(path))?;
            serde_json::from_str(&l).map_err(|e| TrainError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad metrics line: {e}")),
            })
        })
        .collect()
}

/// One line to standard output that never stops the run: a closed pipe (`train | head`) or a
/// full disk behind a redirect loses the line (metrics.jsonl has it), not the training.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(format!("{line}\n").as_bytes());
}

/// Progress on rank 0, nothing on other ranks: a bar on standard error when it is a terminal,
/// and the lines (steps, evaluations, checkpoints) on standard output — through the bar when
/// both are the same terminal, as plain lines when standard output is redirected
/// (`train > log` keeps every line while the terminal shows the bar) or there is no bar.
pub struct Progress {
    bar: Option<ProgressBar>,
    lines: bool,
}

impl Progress {
    pub fn new(total: u64, start: u64, rank0: bool) -> Self {
        use std::io::IsTerminal;
        if !rank0 {
            return Progress { bar: None, lines: false };
        }
        let target = ProgressDrawTarget::stderr();
        if target.is_hidden() {
            return Progress { bar: None, lines: true };
        }
        let lines = !std::io::stdout().is_terminal();
        let bar = ProgressBar::with_draw_target(Some(total), target);
        bar.set_style(
            ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                .expect("valid template")
                .progress_chars("█▉▊▋▌▍▎▏ "),
        );
        bar.set_position(start);
        Progress { bar: Some(bar), lines }
    }

    pub fn step(&self, step: u64, msg: Option<String>) {
        if let Some(b) = &self.bar {
            b.set_position(step);
            if let Some(m) = &msg {
                b.set_message(m.clone());
            }
        }
        if self.lines {
            if let Some(m) = msg {
                say(&format!("step {step}: {m}"));
            }
        }
    }

    /// A line that should stay visible (evaluations, checkpoints).
    pub fn println(&self, s: &str) {
        if self.lines {
            say(s);
        } else if let Some(b) = &self.bar {
            b.println(s);
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
