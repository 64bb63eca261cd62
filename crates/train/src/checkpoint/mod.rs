//! Checkpoints: `out_dir/checkpoints/step_NNNNNNNN/` holding
//! - `model.safetensors`: parameters under their PyTorch state-dict names (`lm_head.weight` is
//!   tied to `transformer.wte.weight` and not stored twice; load with `strict=False` or re-tie);
//! - `optim.safetensors`: AdamW moments and step counters;
//! - `state.json`: step, seed, config, tokenizer, the run's identity, the SHA-256 of both tensor
//!   files, and a SHA-256 of state.json's own content (`state_sha256`).
//!
//! Writing is atomic: everything goes into a `.step_N.tmp-<pid>@<host>` sibling, each file and
//! the directory are fsynced, the directory is renamed into place, then `latest` (a one-line
//! hint) is replaced the same way. A crash leaves either the old or the new checkpoint, never a
//! half-written one, and the next run removes the dead writer's temporary ([`files`]).
//! A checkpoint holding a NaN/Inf tensor is never written; a write that fails (disk full) removes
//! its temporary and says what it needed.
//! Loading verifies every checksum, so a truncated, corrupted or edited checkpoint is refused,
//! and resume falls back to the newest valid one ([`select`]).
//! Retention keeps the newest `keep` checkpoints of this run: never the one just written, never
//! one ahead of it, never another run's.

mod files;
mod select;
pub mod sharded;

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::config::Config;
use crate::error::{checkpoint_file, io_err, TrainError};

pub use files::{remove_stale_temporaries, write_atomic, Sweep};
pub use select::{archive_run, earlier_run, find_resume, new_run_id, Archived, Resume};

/// 2: `run_id`, `skipped_steps` and `state_sha256` were added. Version 1 still loads (its
/// state.json has no checksum of its own). 3: a checkpoint may be sharded ([`sharded`]: written
/// by the pipeline stages in parallel, with Hugging Face-style indexes).
pub const FORMAT_VERSION: u32 = 3;
const MODEL_FILE: &str = "model.safetensors";
const OPTIM_FILE: &str = "optim.safetensors";
const STATE_FILE: &str = "state.json";
/// state.json is small (config, tokenizer, checksums): anything far larger is not ours.
const MAX_STATE_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format_version: u32,
    /// Optimizer steps completed; training resumes at this step index.
    pub step: u64,
    /// Base seed. Every random draw of step `s` derives from (seed, s): torch's RNG is reseeded
    /// per step and batches are a counter-based function of (seed, step, sample), so (seed, step)
    /// is the complete RNG state.
    pub seed: u64,
    pub config: Config,
    /// The tokenizer, as in a prepared directory's meta.json, so sampling needs no data.
    pub tokenizer: fabbrica_data::Meta,
    pub val_loss: Option<f64>,
    /// File name → lowercase hex SHA-256.
    pub sha256: std::collections::BTreeMap<String, String>,
    /// The run this checkpoint belongs to: made when a run starts fresh, kept across resumes.
    /// Retention only ever removes checkpoints of its own run. Empty in version 1.
    #[serde(default)]
    pub run_id: String,
    /// Steps whose update was dropped for a NaN/Inf (`train.nonfinite = "skip"`), so far.
    #[serde(default)]
    pub skipped_steps: u64,
    /// Sequences per optimizer step (micro-batch x accumulation x data-parallel ranks) of the
    /// run that wrote it; 0 in checkpoints from before it was recorded (left out, so that their
    /// digests are unchanged).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub global_batch: u64,
    /// SHA-256 of this document serialised with this field empty (set by [`save`]).
    #[serde(default)]
    pub state_sha256: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl CheckpointState {
    /// SHA-256 over the state with `state_sha256` blank: what [`save`] stores and loading checks.
    fn digest(&self) -> String {
        let mut s = self.clone();
        s.state_sha256.clear();
        files::sha256_bytes(&serde_json::to_vec(&s).expect("state serializes"))
    }
}

pub struct Loaded {
    pub state: CheckpointState,
    pub model: Vec<(String, Tensor)>,
    pub optim: Vec<(String, Tensor)>,
    pub dir: PathBuf,
}

pub fn checkpoints_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("checkpoints")
}

/// `step_NNNNNNNN` for `step`.
pub fn dir_name(step: u64) -> String {
    format!("step_{step:08}")
}

/// The step a checkpoint directory name stands for (`step_` and digits only).
pub fn parse_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step_")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The checkpoint directories under `root`, oldest step first.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>, TrainError> {
    let rd = match fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(root)(e)),
    };
    let mut dirs: Vec<(u64, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter_map(|e| parse_dir_name(&e.file_name().to_string_lossy()).map(|s| (s, e.path())))
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// The directory `latest` names, if it is a well-formed checkpoint name that exists. The pointer
/// is only a hint (resume takes the newest valid checkpoint): a pointer naming anything but a
/// `step_N` sibling (`../x`, an absolute path) is ignored, never followed.
fn latest_hint(root: &Path) -> Option<PathBuf> {
    let pointer = root.join("latest");
    let name = fabbrica_data::bounded::read_to_string(&pointer, 256).ok()?;
    let name = name.trim();
    parse_dir_name(name)?;
    let dir = root.join(name);
    dir.is_dir().then_some(dir)
}

/// The newest checkpoint directory of the run in `out_dir` (by step; `latest` only breaks no
/// ties), or `None` if it has none. Does not verify it: [`find_resume`] does.
pub fn latest(out_dir: &Path) -> Result<Option<PathBuf>, TrainError> {
    let root = checkpoints_dir(out_dir);
    let newest = list(&root)?.pop().map(|(_, d)| d);
    Ok(newest.or_else(|| latest_hint(&root)))
}

/// Loads what the user passed to `sample --checkpoint`: a checkpoint directory, or a run
/// directory's newest checkpoint that verifies.
pub fn resolve(path: &Path) -> Result<Loaded, TrainError> {
    if path.join(STATE_FILE).is_file() {
        return load(path);
    }
    if !checkpoints_dir(path).is_dir() {
        return Err(TrainError::Checkpoint(format!(
            "no checkpoint at {}: pass a run directory (run.out_dir of a finished run) or one of its checkpoints/step_* directories",
            path.display()
        )));
    }
    let root = checkpoints_dir(path);
    let all = list(&root)?;
    let mut skipped: Vec<(PathBuf, String)> = Vec::new();
    for (step, dir) in all.iter().rev() {
        match load(dir) {
            Ok(loaded) => {
                // Read-only: what was passed over is said, not moved.
                for (d, why) in &skipped {
                    eprintln!("note: passed over {} ({why}); using the checkpoint of step {step}", display_name(d));
                }
                return Ok(loaded);
            }
            Err(e) => skipped.push((dir.clone(), e.to_string())),
        }
    }
    let whys: Vec<String> = skipped.iter().map(|(d, why)| format!("{}: {why}", display_name(d))).collect();
    Err(TrainError::Checkpoint(if whys.is_empty() {
        format!("{} holds no checkpoint: pass a run directory of a run that wrote one, or a checkpoints/step_* directory", root.display())
    } else {
        format!("no checkpoint in {} verifies ({}): pass a checkpoint directory restored from a backup", root.display(), whys.join("; "))
    }))
}

/// `step_N` of a checkpoint directory, for messages.
fn display_name(dir: &Path) -> String {
    dir.file_name().unwrap_or_default().to_string_lossy().into_owned()
}

pub fn read_state(dir: &Path) -> Result<CheckpointState, TrainError> {
    let path = dir.join(STATE_FILE);
    let corrupt = |why: String| {
        TrainError::Checkpoint(format!(
            "{} is corrupt or truncated ({why}): use an earlier checkpoint (run.resume_from to train on, --checkpoint to sample or export)",
            path.display()
        ))
    };
    let bytes = match fabbrica_data::bounded::read(&path, MAX_STATE_BYTES) {
        Ok(b) => b,
        Err(fabbrica_data::bounded::ReadError::Io(e)) => return Err(checkpoint_file(|e| format!("cannot read {}: {e}", path.display()))(e)),
        Err(e) => return Err(corrupt(e.to_string())),
    };
    // The version first, so that a newer format is named as such rather than as corrupt.
    #[derive(Deserialize)]
    struct Version {
        format_version: u32,
    }
    let version: Version = serde_json::from_slice(&bytes).map_err(|e| corrupt(one_line(&e.to_string())))?;
    if version.format_version == 0 || version.format_version > FORMAT_VERSION {
        return Err(TrainError::Checkpoint(format!(
            "{} has format version {}, this build reads 1 to {FORMAT_VERSION}: use the fabbrica version that wrote it",
            path.display(),
            version.format_version
        )));
    }
    let state: CheckpointState = serde_json::from_slice(&bytes).map_err(|e| corrupt(one_line(&e.to_string())))?;
    if state.format_version >= 2 && state.digest() != state.state_sha256 {
        return Err(corrupt("its content does not match its own SHA-256: it was edited or damaged".into()));
    }
    // Its config builds the model for `sample`: out-of-range values (a version-1 file carries no
    // checksum of its own) are refused here rather than met as an allocation failure later.
    state.config.validate().map_err(|e| corrupt(format!("its config is invalid: {e}")))?;
    Ok(state)
}

pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Loads and verifies a checkpoint directory (tensors on the CPU).
pub fn load(dir: &Path) -> Result<Loaded, TrainError> {
    let state = read_state(dir)?;
    let read = |file: &str| -> Result<Vec<(String, Tensor)>, TrainError> {
        let path = dir.join(file);
        let expected = state.sha256.get(file).ok_or_else(|| {
            TrainError::Checkpoint(format!("{} lists no checksum for {file}: the checkpoint is incomplete", dir.join(STATE_FILE).display()))
        })?;
        if !path.is_file() {
            return Err(TrainError::Checkpoint(format!(
                "checkpoint {} is missing {file}: use an earlier one (run.resume_from to train on, --checkpoint to sample or export)",
                dir.display()
            )));
        }
        if &files::sha256_file(&path)? != expected {
            return Err(TrainError::Checkpoint(format!(
                "{} is corrupt or truncated (SHA-256 does not match state.json): use an earlier checkpoint (run.resume_from to train on, --checkpoint to sample or export)",
                path.display()
            )));
        }
        Tensor::read_safetensors(&path).map_err(|e| TrainError::Checkpoint(format!("cannot read {}: {}", path.display(), one_line(&e.to_string()))))
    };
    let (model, optim) = if state.sha256.contains_key(sharded::MODEL_INDEX) {
        let (model, slices) = sharded::read_indexed(dir, &state, sharded::MODEL_INDEX)?;
        let optim = sharded::assemble_slices(sharded::read_indexed(dir, &state, sharded::OPTIM_INDEX)?.0, &model, dir)?;
        // Tensor-parallel slices (pieces of one ZeRO-1 shard first, then slices) become whole tensors.
        (sharded::join_tp_slices(model, &slices, dir)?, sharded::join_tp_slices(optim, &slices, dir)?)
    } else {
        (read(MODEL_FILE)?, read(OPTIM_FILE)?)
    };
    Ok(Loaded { state, model, optim, dir: dir.to_path_buf() })
}

/// The first tensor holding a NaN or an infinity, by name.
pub(crate) fn first_nonfinite(tensors: &[(String, Tensor)]) -> Option<&str> {
    tensors
        .iter()
        .find(|(_, t)| t.is_floating_point() && t.numel() > 0 && !bool::try_from(t.isfinite().all()).unwrap_or(false))
        .map(|(n, _)| n.as_str())
}

/// Bytes the tensor files of a checkpoint take, roughly (data plus a margin for headers).
pub(crate) fn size_estimate(tensors: &[&[(String, Tensor)]]) -> u64 {
    let data: u64 = tensors.iter().flat_map(|ts| ts.iter()).map(|(_, t)| t.numel() as u64 * t.kind().elt_size_in_bytes() as u64).sum();
    // safetensors headers (JSON, about 100 bytes a tensor) and state.json.
    data + 128 * tensors.iter().map(|ts| ts.len() as u64).sum::<u64>() + (16 << 10)
}

pub(crate) fn is_disk_full(why: &str) -> bool {
    why.contains("os error 28") || why.contains("No space left") || why.contains("os error 122") || why.contains("Disk quota")
}

/// Saves a checkpoint for `state.step` (a new `state.run_id` must be set by the caller) and
/// prunes this run's older checkpoints down to the newest `keep`.
pub fn save(
    out_dir: &Path,
    mut state: CheckpointState,
    model: &[(String, Tensor)],
    optim: &[(String, Tensor)],
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let root = checkpoints_dir(out_dir);
    let name = dir_name(state.step);
    for ts in [model, optim] {
        if let Some(t) = first_nonfinite(ts) {
            return Err(TrainError::NonFiniteCheckpoint { step: state.step, tensor: t.to_string() });
        }
    }
    let needed = size_estimate(&[model, optim]);
    let step = state.step;
    let fail = |why: String| {
        let previous = list(&root).ok().and_then(|l| l.into_iter().rev().find(|(s, _)| *s != step)).map(|(_, d)| d);
        TrainError::CheckpointWrite {
            step,
            dir: root.join(&name),
            disk_full: is_disk_full(&why),
            needed,
            free: files::free_bytes(if root.exists() { &root } else { out_dir }),
            why,
            previous,
        }
    };
    fs::create_dir_all(&root).map_err(|e| fail(e.to_string()))?;
    if let Some(free) = files::free_bytes(&root) {
        if free < needed {
            return Err(fail("No space left on device (checked before writing)".into()));
        }
    }
    let tmp = files::temp_path(&root, &name);
    let written = write_into(&tmp, &mut state, model, optim);
    if let Err(why) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(fail(why));
    }
    let dest = place(&root, &tmp, state.step).map_err(|e| {
        let _ = fs::remove_dir_all(&tmp);
        fail(e.to_string())
    })?;
    publish(&root, &state, keep)?;
    Ok(dest)
}

/// Renames a complete temporary checkpoint directory into place as the checkpoint of `step`,
/// replacing one of that step (only the same run re-writing the same step gets there: a fresh
/// run into a directory with checkpoints is refused or archived first). Shared by the single
/// writer and the sharded commit.
///
/// A replaced checkpoint is swapped with the new one in one step (`renameat2` with
/// `RENAME_EXCHANGE`), so a crash at any moment leaves one complete checkpoint of that step; the
/// old one, now at `tmp`, is removed after (or by the next run's sweep of dead writers'
/// temporaries). Where the exchange is unavailable it falls back to remove, then rename.
pub(crate) fn place(root: &Path, tmp: &Path, step: u64) -> std::io::Result<PathBuf> {
    let dest = root.join(dir_name(step));
    if fs::symlink_metadata(&dest).is_ok() {
        if exchange(tmp, &dest).is_ok() {
            // The new checkpoint is in place; the old one left at `tmp` (if it cannot be removed
            // now) is a dead writer's temporary to the next run's sweep.
            let _ = fs::remove_dir_all(tmp);
            return Ok(dest);
        }
        // No exchange here (an old kernel, a file system or a seccomp profile without it): a
        // failed exchange changed nothing, so the replacement is remove, then rename.
        fs::remove_dir_all(&dest)?;
    }
    fs::rename(tmp, &dest)?;
    Ok(dest)
}

/// Swaps two existing paths atomically (Linux `renameat2(RENAME_EXCHANGE)`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput));
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call; AT_FDCWD resolves
    // relative paths as rename(2) does.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// After [`place`]: the directory entry made durable, `latest` pointed at it, and this run's
/// older checkpoints pruned to `keep`.
pub(crate) fn publish(root: &Path, state: &CheckpointState, keep: usize) -> Result<(), TrainError> {
    files::fsync_path(root)?;
    write_atomic(&root.join("latest"), format!("{}\n", dir_name(state.step)).as_bytes())?;
    prune(root, keep, &state.run_id, state.step)
}

/// Writes the three files into `tmp` (created here), filling in the checksums.
fn write_into(tmp: &Path, state: &mut CheckpointState, model: &[(String, Tensor)], optim: &[(String, Tensor)]) -> Result<(), String> {
    if tmp.exists() {
        fs::remove_dir_all(tmp).map_err(|e| e.to_string())?;
    }
    fs::create_dir(tmp).map_err(|e| e.to_string())?;
    // Tensors are copied to the CPU first: a checkpoint written on a GPU loads anywhere.
    for (file, tensors) in [(MODEL_FILE, model), (OPTIM_FILE, optim)] {
        let path = tmp.join(file);
        let cpu: Vec<(&str, Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t.detach().to_device(tch::Device::Cpu).contiguous())).collect();
        Tensor::write_safetensors(&cpu, &path).map_err(|e| one_line(&e.to_string()))?;
        files::fsync_path(&path).map_err(|e| e.to_string())?;
        state.sha256.insert(file.to_string(), files::sha256_file(&path).map_err(|e| e.to_string())?);
    }
    state.format_version = FORMAT_VERSION;
    state.state_sha256 = state.digest();
    let json = serde_json::to_vec_pretty(&state).expect("state serializes");
    let state_path = tmp.join(STATE_FILE);
    fs::write(&state_path, &json).map_err(|e| e.to_string())?;
    files::fsync_path(&state_path).map_err(|e| e.to_string())?;
    files::fsync_path(tmp).map_err(|e| e.to_string())
}

/// Keeps the newest `keep` checkpoints of run `run_id` at or below step `current` (the one just
/// written, which is always kept) and removes its older ones. Checkpoints of another run, ones
/// whose state cannot be read (never guessed to be ours), and ones ahead of `current` are left.
pub(crate) fn prune(root: &Path, keep: usize, run_id: &str, current: u64) -> Result<(), TrainError> {
    if run_id.is_empty() {
        return Ok(());
    }
    let ours: Vec<(u64, PathBuf)> = list(root)?
        .into_iter()
        .filter(|(step, _)| *step < current)
        .filter(|(_, dir)| read_state(dir).map(|s| s.run_id == run_id).unwrap_or(false))
        .collect();
    // `current` itself is one of the `keep`.
    let remove = ours.len().saturating_sub(keep.saturating_sub(1));
    for (_, old) in ours.iter().take(remove) {
        fs::remove_dir_all(old).map_err(io_err(old))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;

/// The parameter a stored tensor belongs to: `name` of `name`, `name.exp_avg` and
/// `name[a..b].exp_avg` (a ZeRO-1 piece), where `name` is a parameter's (dotted) name.
pub fn param_of(key: &str) -> &str {
    for suffix in [".exp_avg_sq", ".exp_avg", ".step"] {
        if let Some(base) = key.strip_suffix(suffix) {
            return match base.strip_suffix(']').and_then(|b| b.rsplit_once('[')) {
                Some((param, _)) => param,
                None => base,
            };
        }
    }
    key
}
