//! Checkpoints from the step loop. At a checkpoint step every rank takes part in the snapshot
//! (ZeRO-1 gathers the optimizer state, a collective). Rank 0 then either writes it at once
//! (`run.async_checkpoint = false`), or copies it to host memory and hands it to a background
//! thread that writes it (atomic and checksummed as always) while training goes on.
//! At most one write is in flight: the next checkpoint, the end of the run, a preemption, or
//! dropping the saver (any early return) waits for it first. A write's outcome reaches the
//! caller as a [`Completed`], and the caller applies `run.checkpoint_failure`. A failed write
//! leaves the previous checkpoint valid.

use std::path::PathBuf;
use std::thread::JoinHandle;

use fabbrica_data::Meta;
use tch::{Device, Tensor};

use crate::checkpoint::{self, CheckpointState, FORMAT_VERSION};
use crate::error::TrainError;
use crate::trainer::Setup;

/// The whole model's parameters and optimizer state by name, as rank 0 writes them.
pub(crate) struct Snapshot {
    pub model: Vec<(String, Tensor)>,
    pub optim: Vec<(String, Tensor)>,
}

/// What a run carries between checkpoints besides the model and optimizer.
pub(crate) struct RunState {
    /// The run's identity (`CheckpointState::run_id`).
    pub id: String,
    /// Updates dropped for a NaN/Inf so far (`train.nonfinite = skip`).
    pub skipped_steps: u64,
    /// The newest checkpoint of this run known to be written (rank 0 knows its directory).
    pub last_saved: Option<PathBuf>,
    /// The step of the newest snapshot taken (every rank knows it): written, or being written.
    pub last_snapshot_step: Option<u64>,
}

/// A finished write: the step and where it went, or why it failed.
pub(crate) struct Completed {
    pub step: u64,
    pub result: Result<PathBuf, TrainError>,
}

struct Inflight {
    step: u64,
    handle: JoinHandle<Result<PathBuf, TrainError>>,
}

pub(crate) struct Saver {
    pub run: RunState,
    background: bool,
    inflight: Option<Inflight>,
}

/// A copy of `ts` on the host that training cannot change under the writer.
fn host_copy(ts: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    tch::no_grad(|| {
        ts.iter().map(|(n, t)| (n.clone(), if t.device() == Device::Cpu { t.detach().copy() } else { t.detach().to_device(Device::Cpu) })).collect()
    })
}

impl Saver {
    /// `background`: write from a thread (`run.async_checkpoint`, where host memory allows).
    pub fn new(run: RunState, background: bool) -> Saver {
        Saver { run, background, inflight: None }
    }

    /// Writes the state of `step` (`snapshot`, on rank 0 only: see the trainer's `snapshot`),
    /// now or in the background; every rank records that `step` was snapshot. Returns the writes
    /// that finished meanwhile: this one when writing at once; the previous background write
    /// otherwise.
    pub fn save(&mut self, s: &Setup, snapshot: Option<Snapshot>, step: u64, val_loss: Option<f64>) -> Result<Vec<Completed>, TrainError> {
        // At most one write in flight: the previous one finishes first.
        let mut done: Vec<Completed> = self.settle().into_iter().collect();
        self.run.last_snapshot_step = Some(step);
        let Some(Snapshot { model, optim }) = snapshot else {
            return Ok(done);
        };
        let state = self.state_for(s, step, val_loss);
        let (out, keep) = (s.cfg.run.out_dir.clone(), s.cfg.run.keep_checkpoints);
        if self.background {
            let (model, optim) = (host_copy(&model), host_copy(&optim));
            let handle = std::thread::Builder::new()
                .name("checkpoint-writer".into())
                .spawn(move || checkpoint::save(&out, state, &model, &optim, keep))
                .map_err(|e| TrainError::Checkpoint(format!("cannot start the checkpoint writer thread ({e}): set run.async_checkpoint=false")))?;
            self.inflight = Some(Inflight { step, handle });
        } else {
            let result = checkpoint::save(&out, state, &model, &optim, keep);
            done.push(self.record(Completed { step, result }));
        }
        Ok(done)
    }

    /// Waits for the write in flight, if any, and returns how it went.
    pub fn settle(&mut self) -> Option<Completed> {
        let Inflight { step, handle } = self.inflight.take()?;
        let result = handle.join().unwrap_or_else(|_| Err(TrainError::Checkpoint(format!("the checkpoint writer of step {step} panicked"))));
        Some(self.record(Completed { step, result }))
    }

    /// The state.json content of this run's checkpoint of `step` (checksums filled in by the writer).
    pub fn state_for(&self, s: &Setup, step: u64, val_loss: Option<f64>) -> CheckpointState {
        CheckpointState {
            format_version: FORMAT_VERSION,
            step,
            seed: s.cfg.run.seed,
            config: s.cfg.clone(),
            tokenizer: Meta::for_tokenizer(&s.data.tokenizer),
            val_loss,
            sha256: Default::default(),
            run_id: self.run.id.clone(),
            skipped_steps: self.run.skipped_steps,
            state_sha256: String::new(),
        }
    }

    /// Records a finished write (done here or by the caller): a written checkpoint is the last saved.
    pub fn record(&mut self, c: Completed) -> Completed {
        if let Ok(dir) = &c.result {
            self.run.last_saved = Some(dir.clone());
        }
        c
    }
}

impl Drop for Saver {
    /// The process never leaves with a checkpoint half-written by its own thread.
    fn drop(&mut self) {
        let _ = self.settle();
    }
}
