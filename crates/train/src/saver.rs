//! Checkpoints from the step loop. At a checkpoint step every rank takes part in the snapshot
//! (ZeRO-1 gathers the optimizer state, a collective). Rank 0 then either writes it at once
//! (`run.async_checkpoint = false`), or copies it to host memory and hands it to a background
//! thread that writes it (atomic and checksummed as always) while training goes on.
//! At most one write is in flight: the next checkpoint, the end of the run, a preemption, or
//! dropping the saver (any early return) waits for it first. A write's outcome reaches the
//! caller as a [`Completed`], and the caller applies `run.checkpoint_failure`. A failed write
//! leaves the previous checkpoint valid.
//!
//! [`save_checkpoint`] is what the loop calls: rank 0 alone through the [`Saver`] without a
//! pipeline; with one, every stage's writers in parallel (`checkpoint::sharded`), rank 0 committing.

use std::path::PathBuf;
use std::thread::JoinHandle;

use fabbrica_data::Meta;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, CheckpointState, FORMAT_VERSION};
use crate::error::TrainError;
use crate::grads::Grads;
use crate::grid::Grid;
use crate::metrics::{MetricsLog, Record};
use crate::optim::AdamW;
use crate::trainer::{empty_record, Setup};

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
    /// Sequences per optimizer step (`CheckpointState::global_batch`).
    pub global_batch: usize,
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
                .map_err(crate::error::checkpoint_file(|e| {
                    format!("cannot start the checkpoint writer thread ({e}): set run.async_checkpoint=false")
                }))?;
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
            global_batch: self.run.global_batch as u64,
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

/// Tensors by name, as a checkpoint stores them.
type Named = Vec<(String, Tensor)>;

/// This rank's parts' parameters and optimizer state by name, as a checkpoint stores them:
/// the last stage's copy of the tied embedding left out (the first stage's is the same), and
/// under ZeRO-1 the moments gathered from the data-parallel shards (a collective over `grid.dp`).
fn local_state(s: &Setup, grads: &Grads, opt: &AdamW, zero1: bool) -> Result<(Named, Named), TrainError> {
    let tied = s.cfg.model.embedding_name();
    let copy_here = s.parts.iter().any(|p| p.model.holds_tied_copy());
    let mut model: Vec<(String, Tensor)> = Vec::new();
    for p in &s.parts {
        model.extend(p.model.parameter_handles().into_iter().filter(|(n, _)| !(p.model.holds_tied_copy() && n == tied)));
    }
    let optim: Vec<(String, Tensor)> = if zero1 {
        let mut v = grads.gather_optimizer_state(opt)?;
        if grads.holds_tied() && !copy_here {
            v.extend(opt.state_where(|n| n == tied));
        }
        v
    } else {
        opt.state_where(|n| !(copy_here && n == tied))
    };
    Ok((model, optim))
}

/// What a checkpoint holds, on rank 0 (the writer) of a run without pipeline parallelism: the
/// whole model's parameters and optimizer state. Collective under ZeRO-1. `None` elsewhere.
fn snapshot(s: &Setup, grid: &Grid, grads: &Grads, opt: &AdamW, zero1: bool) -> Result<Option<Snapshot>, TrainError> {
    let (model, optim) = local_state(s, grads, opt, zero1)?;
    Ok((grid.rank == 0).then_some(Snapshot { model, optim }))
}

/// Writes the checkpoint of `step` (collective): rank 0 alone without a pipeline; with one,
/// every stage's first data-parallel rank writes its shard in parallel and rank 0 commits the
/// checkpoint once all are in place (`checkpoint::sharded`). Returns the writes that finished
/// (known on rank 0).
#[allow(clippy::too_many_arguments)]
pub(crate) fn save_checkpoint(
    s: &Setup,
    grid: &Grid,
    grads: &Grads,
    opt: &AdamW,
    saver: &mut Saver,
    step: u64,
    val_loss: Option<f64>,
    log: &mut Option<MetricsLog>,
) -> Result<Vec<Completed>, TrainError> {
    let zero1 = s.cfg.parallel.zero == 1;
    if s.cfg.comm.debug && grid.dims.tp > 1 {
        check_tp_replicas(s, grid)?;
    }
    if s.pipeline.is_none() && grid.dims.tp == 1 {
        let snap = snapshot(s, grid, grads, opt, zero1)?;
        return saver.save(s, snap, step, val_loss);
    }
    let mut done: Vec<Completed> = saver.settle().into_iter().collect();
    saver.run.last_snapshot_step = Some(step);
    // What this rank writes: its stages' weights (the first data-parallel rank of each stage) and
    // optimizer state: under ZeRO-1 every rank its own shard, named by slice (`name[a..b].exp_avg`),
    // so nothing is gathered; otherwise the first data-parallel rank the whole state.
    let tied = s.cfg.model.embedding_name();
    let copy_here = s.parts.iter().any(|p| p.model.holds_tied_copy());
    let first = grid.coords.dp == 0;
    let model: Vec<(String, Tensor)> = if first {
        s.parts.iter().flat_map(|p| p.model.parameter_handles().into_iter().filter(|(n, _)| !(p.model.holds_tied_copy() && n == tied))).collect()
    } else {
        Vec::new()
    };
    let optim: Option<Vec<(String, Tensor)>> = if zero1 {
        // The reducers' shard pieces, and the tied embedding's whole state (kept out of the
        // buckets, replicated on every data-parallel rank: the first writes it).
        Some(opt.state_where(|n| n != tied || (first && !copy_here)))
    } else {
        first.then(|| opt.state_where(|n| !(copy_here && n == tied)))
    };
    let diff = tied_check(s, grid, &model)?;
    // Tensor parallelism: this rank's slices are stored by slice name, whole-on-every-rank
    // tensors by the first tensor-parallel rank only; the index records how each split one joins.
    let (tp, tpc) = (grid.dims.tp, grid.coords.tp);
    let mut tp_slices = std::collections::BTreeMap::new();
    let mut slice_names = |tensors: Vec<(String, Tensor)>| -> Vec<(String, Tensor)> {
        if tp == 1 {
            return tensors;
        }
        tensors
            .into_iter()
            .filter_map(|(key, t)| {
                let param = checkpoint::param_of(&key);
                match s.parts.iter().find_map(|p| p.model.shard_of(param)) {
                    Some(sh) => {
                        tp_slices.insert(param.to_string(), checkpoint::sharded::TpSlice { dim: sh.dim, parts: sh.parts, size: tp });
                        Some((format!("{}{}", checkpoint::sharded::tp_slice_name(param, tpc), &key[param.len()..]), t))
                    }
                    None => (tpc == 0).then_some((key, t)),
                }
            })
            .collect()
    };
    let model = slice_names(model);
    let optim = optim.map(&mut slice_names);
    if let (Some(d), Some(log)) = (diff, log.as_mut()) {
        log.write(&Record { kind: "tied_embedding".into(), step, tied_fingerprint_diff: Some(d), ..empty_record() })?;
    }
    let out = &s.cfg.run.out_dir;
    // Rank 0 prepares the directory; every writer learns where (empty: it could not).
    let begun = if grid.rank == 0 {
        let needed = 12 * fabbrica_models::flops::total_params(&s.cfg.model) + (1 << 20);
        checkpoint::sharded::begin(out, step, needed)
    } else {
        Ok(std::path::PathBuf::new())
    };
    let tmp = crate::grid::broadcast_text(&*grid.world, 0, &begun.as_ref().map(|p| p.display().to_string()).unwrap_or_default())?;
    if tmp.is_empty() {
        if let Err(e) = begun {
            done.push(saver.record(Completed { step, result: Err(e) }));
        }
        return Ok(done);
    }
    let tmp = std::path::PathBuf::from(tmp);
    use checkpoint::sharded::{shard_name, write_shard, ShardInfo};
    let (pp, dp) = (grid.dims.pp, grid.dims.dp);
    // Weights: one shard per (stage, tensor-parallel rank). Optimizer: the same, or one per rank
    // under ZeRO-1.
    let model_index = |c: fabbrica_topology::Coords| c.pp * tp + c.tp;
    let optim_index = |c: fabbrica_topology::Coords| if zero1 { model_index(c) * dp + c.dp } else { model_index(c) };
    let optim_files = if zero1 { pp * tp * dp } else { pp * tp };
    let written = (first || optim.is_some()).then(|| -> Result<(Option<ShardInfo>, Option<ShardInfo>), TrainError> {
        let with_slices = |mut info: ShardInfo| {
            info.tp_slices = tp_slices.clone();
            info
        };
        let m =
            if first { Some(with_slices(write_shard(&tmp, &shard_name("model", model_index(grid.coords), pp * tp), &model, step)?)) } else { None };
        let o = match &optim {
            Some(o) => Some(with_slices(write_shard(&tmp, &shard_name("optim", optim_index(grid.coords), optim_files), o, step)?)),
            None => None,
        };
        Ok((m, o))
    });
    if grid.rank != 0 {
        if let Some(w) = written {
            let report = match w {
                Ok(pair) => serde_json::json!({ "ok": pair }),
                Err(e) => serde_json::json!({ "err": e.to_string() }),
            };
            crate::grid::send_text(&*grid.world, 0, &report.to_string())?;
        }
        return Ok(done);
    }
    // Rank 0: its own shards, then every other writer's report (in rank order), then the commit.
    let writers: Vec<usize> = (1..grid.dims.world_size).filter(|&r| grid.dims.coords(r).map(|c| c.dp == 0 || zero1).unwrap_or(false)).collect();
    let mut models = Vec::with_capacity(pp * tp);
    let mut optims = Vec::with_capacity(optim_files);
    let mut failure: Option<TrainError> = None;
    let mut take = |pair: (Option<ShardInfo>, Option<ShardInfo>)| {
        models.extend(pair.0);
        optims.extend(pair.1);
    };
    match written.expect("rank 0 writes") {
        Ok(pair) => take(pair),
        Err(e) => failure = Some(e),
    }
    for &w in &writers {
        let text = crate::grid::recv_text(&*grid.world, w)?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| TrainError::Comm(format!("checkpoint report from rank {w}: {e}")))?;
        if let Some(e) = v.get("err").and_then(|e| e.as_str()) {
            failure.get_or_insert(TrainError::Checkpoint(format!("rank {w} could not write its shard of step {step}: {e}")));
        } else {
            let pair: (Option<ShardInfo>, Option<ShardInfo>) =
                serde_json::from_value(v["ok"].clone()).map_err(|e| TrainError::Comm(format!("checkpoint report from rank {w}: {e}")))?;
            take(pair);
        }
    }
    let result = match failure {
        Some(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
        None => checkpoint::sharded::commit(out, &tmp, saver.state_for(s, step, val_loss), &models, &optims, s.cfg.run.keep_checkpoints),
    };
    done.push(saver.record(Completed { step, result }));
    Ok(done)
}

/// Pipelines: whether the first stage's tied embedding and the last stage's copy are still
/// equal, on rank 0 (collective between the two). Compares fingerprints computed where the
/// tensors live (the sum, the sum of squares and a position-weighted sum, each in f64, sent as
/// their exact bits), so 24 bytes travel instead of a V×C matrix; identical copies give identical
/// bits, and copies that differ anywhere almost surely do not. Returns the largest relative
/// difference of the fingerprints (0 when equal).
fn tied_check(s: &Setup, grid: &Grid, model: &[(String, Tensor)]) -> Result<Option<f64>, TrainError> {
    let tied = s.cfg.model.embedding_name();
    if grid.dims.pp == 1 {
        return Ok(None); // one copy (tensor parallelism without a pipeline)
    }
    let last =
        grid.dims.rank_of(fabbrica_topology::Coords { dp: 0, pp: grid.dims.pp - 1, tp: 0 }).map_err(|e| TrainError::Parallel(e.to_string()))?;
    if grid.rank != 0 && grid.rank != last {
        return Ok(None);
    }
    let fingerprint = |t: &Tensor| -> [f64; 3] {
        tch::no_grad(|| {
            let x = t.to_kind(Kind::Double).reshape([-1]);
            let w = Tensor::arange(x.numel() as i64, (Kind::Double, x.device())).remainder(97.0) + 1.0;
            [x.sum(Kind::Double).double_value(&[]), x.square().sum(Kind::Double).double_value(&[]), (&x * w).sum(Kind::Double).double_value(&[])]
        })
    };
    if grid.rank == last {
        let copy = s.parts.iter().flat_map(|p| p.model.parameter_handles()).find(|(n, _)| n == tied);
        let bits: Vec<i64> = match copy {
            Some((_, t)) => fingerprint(&t).iter().map(|v| v.to_bits() as i64).collect(),
            None => vec![],
        };
        crate::grid::send_text(&*grid.world, 0, &bits.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(" "))?;
        return Ok(None);
    }
    let theirs: Vec<f64> = crate::grid::recv_text(&*grid.world, last)?
        .split_whitespace()
        .filter_map(|b| b.parse::<i64>().ok())
        .map(|b| f64::from_bits(b as u64))
        .collect();
    let Some((_, ours)) = model.iter().find(|(n, _)| n == tied) else { return Ok(None) };
    if theirs.len() != 3 {
        return Ok(None); // untied: the last stage holds no copy
    }
    let ours = fingerprint(ours);
    Ok(Some(
        ours.iter()
            .zip(&theirs)
            .map(|(a, b)| if a == b { 0.0 } else { (a - b).abs() / a.abs().max(b.abs()).max(f64::MIN_POSITIVE) })
            .fold(0.0, f64::max),
    ))
}

/// `comm.debug` with tensor parallelism, at each checkpoint (collective over `grid.tp`): the
/// parameters every tensor-parallel rank holds whole (norms, row-parallel biases, positions)
/// must be identical on all of them, since only the first writes them. They drift apart if
/// replicated activations drew different dropout masks, or a sequence-parallel gradient was not
/// summed. Compares exact fingerprints (sum and sum of squares in f64, sent as their bits).
fn check_tp_replicas(s: &Setup, grid: &Grid) -> Result<(), TrainError> {
    let mut names: Vec<&str> = Vec::new();
    let mut bits: Vec<i64> = Vec::new();
    tch::no_grad(|| {
        for p in &s.parts {
            for (n, t) in p.model.parameters().iter().filter(|(n, _)| p.model.shard_of(n).is_none()) {
                let x = t.to_kind(Kind::Double);
                names.push(n);
                bits.push(x.sum(Kind::Double).double_value(&[]).to_bits() as i64);
                bits.push(x.square().sum(Kind::Double).double_value(&[]).to_bits() as i64);
            }
        }
    });
    if bits.is_empty() {
        return Ok(());
    }
    let tp = grid.dims.tp;
    let all = Tensor::zeros([(bits.len() * tp) as i64], (Kind::Int64, Device::Cpu));
    grid.tp.all_gather(&all, &Tensor::from_slice(&bits)).map_err(TrainError::from)?;
    let all: Vec<i64> = Vec::try_from(&all).map_err(|e: tch::TchError| TrainError::Torch(e.to_string()))?;
    for r in 1..tp {
        let theirs = &all[r * bits.len()..(r + 1) * bits.len()];
        if let Some(i) = (0..bits.len()).find(|&i| theirs[i] != all[i]) {
            return Err(TrainError::Parallel(format!(
                "comm.debug: tensor-parallel rank {r} of group {} holds a different {} than rank 0, though every rank holds it whole: replicated activations drew different dropout masks or a gradient was not summed over the group (a fabbrica bug: please report it with this run's config)",
                grid.tp.name(),
                names[i / 2]
            )));
        }
    }
    Ok(())
}
