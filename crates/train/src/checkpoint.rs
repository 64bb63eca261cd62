//! Checkpoints: `out_dir/checkpoints/step_NNNNNNNN/` holding
//! - `model.safetensors`: parameters under their PyTorch state-dict names (`lm_head.weight` is
//!   tied to `transformer.wte.weight` and not stored twice; load with `strict=False` or re-tie);
//! - `optim.safetensors`: AdamW moments and step counters;
//! - `state.json`: step, seed, config, tokenizer, and the SHA-256 of both tensor files.
//!
//! Writing is atomic: everything goes into a `.tmp-*` sibling, each file and the directory are
//! fsynced, the directory is renamed into place, then `latest` (a one-line pointer) is replaced
//! the same way. A crash leaves either the old or the new checkpoint, never a half-written one.
//! Loading verifies the checksums, so a truncated or corrupted file is refused, not half-read.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Tensor;

use crate::config::Config;
use crate::error::{io_err, TrainError};

pub const FORMAT_VERSION: u32 = 1;
const MODEL_FILE: &str = "model.safetensors";
const OPTIM_FILE: &str = "optim.safetensors";
const STATE_FILE: &str = "state.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
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

fn sha256_file(path: &Path) -> Result<String, TrainError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn fsync_path(path: &Path) -> Result<(), TrainError> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io_err(path))
}

/// Writes `bytes` to `path` atomically (temp file in the same directory, fsync, rename, fsync dir).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp-{}", path.file_name().unwrap().to_string_lossy(), std::process::id()));
    {
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io_err(path))?;
    fsync_path(dir)
}

/// Saves a checkpoint for `state.step` and prunes all but the newest `keep`.
pub fn save(
    out_dir: &Path,
    mut state: CheckpointState,
    model: &[(String, Tensor)],
    optim: &[(String, Tensor)],
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let root = checkpoints_dir(out_dir);
    fs::create_dir_all(&root).map_err(io_err(&root))?;
    let name = format!("step_{:08}", state.step);
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    // Tensors are copied to the CPU first: a checkpoint written on a GPU loads anywhere.
    for (file, tensors) in [(MODEL_FILE, model), (OPTIM_FILE, optim)] {
        let path = tmp.join(file);
        let cpu: Vec<(&str, Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t.detach().to_device(tch::Device::Cpu).contiguous())).collect();
        Tensor::write_safetensors(&cpu, &path).map_err(|e| TrainError::Checkpoint(format!("cannot write {}: {e}", path.display())))?;
        fsync_path(&path)?;
        state.sha256.insert(file.to_string(), sha256_file(&path)?);
    }
    let json = serde_json::to_vec_pretty(&state).expect("state serializes");
    let state_path = tmp.join(STATE_FILE);
    fs::write(&state_path, &json).map_err(io_err(&state_path))?;
    fsync_path(&state_path)?;
    fsync_path(&tmp)?;
    let dest = root.join(&name);
    if dest.exists() {
        fs::remove_dir_all(&dest).map_err(io_err(&dest))?;
    }
    fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
    fsync_path(&root)?;
    write_atomic(&root.join("latest"), format!("{name}\n").as_bytes())?;
    prune(&root, keep)?;
    Ok(dest)
}

fn list(root: &Path) -> Result<Vec<String>, TrainError> {
    let mut names: Vec<String> = fs::read_dir(root)
        .map_err(io_err(root))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step_"))
        .collect();
    names.sort();
    Ok(names)
}

fn prune(root: &Path, keep: usize) -> Result<(), TrainError> {
    let names = list(root)?;
    for old in names.iter().take(names.len().saturating_sub(keep)) {
        let p = root.join(old);
        fs::remove_dir_all(&p).map_err(io_err(&p))?;
    }
    Ok(())
}

/// The checkpoint directory to resume from: `latest` in `out_dir/checkpoints`, or `None` if the
/// run has no checkpoint yet.
pub fn latest(out_dir: &Path) -> Result<Option<PathBuf>, TrainError> {
    let root = checkpoints_dir(out_dir);
    let pointer = root.join("latest");
    if !pointer.exists() {
        return Ok(None);
    }
    let name = fs::read_to_string(&pointer).map_err(io_err(&pointer))?;
    let dir = root.join(name.trim());
    if !dir.is_dir() {
        return Err(TrainError::Checkpoint(format!(
            "{} points to {}, which does not exist: delete {} to start over or restore the directory",
            pointer.display(),
            dir.display(),
            root.display()
        )));
    }
    Ok(Some(dir))
}

/// Resolves what the user passed to `sample --checkpoint`: a checkpoint directory, or a run
/// directory whose `checkpoints/latest` is used.
pub fn resolve(path: &Path) -> Result<PathBuf, TrainError> {
    if path.join(STATE_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    match latest(path)? {
        Some(dir) => Ok(dir),
        None => Err(TrainError::Checkpoint(format!(
            "no checkpoint at {}: pass a run directory (run.out_dir of a finished run) or one of its checkpoints/step_* directories",
            path.display()
        ))),
    }
}

pub fn read_state(dir: &Path) -> Result<CheckpointState, TrainError> {
    let path = dir.join(STATE_FILE);
    let bytes = fs::read(&path).map_err(|e| TrainError::Checkpoint(format!("cannot read {}: {e}", path.display())))?;
    let state: CheckpointState = serde_json::from_slice(&bytes).map_err(|e| {
        TrainError::Checkpoint(format!("{} is corrupt or truncated ({e}): delete this checkpoint or resume from an earlier one", path.display()))
    })?;
    if state.format_version != FORMAT_VERSION {
        return Err(TrainError::Checkpoint(format!(
            "{} has format version {}, this build reads {FORMAT_VERSION}: use the fabbrica version that wrote it",
            path.display(),
            state.format_version
        )));
    }
    Ok(state)
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
            return Err(TrainError::Checkpoint(format!("checkpoint {} is missing {file}: delete it or resume from an earlier one", dir.display())));
        }
        if &sha256_file(&path)? != expected {
            return Err(TrainError::Checkpoint(format!(
                "{} is corrupt or truncated (SHA-256 does not match state.json): delete this checkpoint or resume from an earlier one",
                path.display()
            )));
        }
        Tensor::read_safetensors(&path).map_err(|e| TrainError::Checkpoint(format!("cannot read {}: {e}", path.display())))
    };
    let model = read(MODEL_FILE)?;
    let optim = read(OPTIM_FILE)?;
    Ok(Loaded { state, model, optim, dir: dir.to_path_buf() })
}
