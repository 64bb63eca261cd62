//! Checkpoints written by many ranks in parallel (pipelines): each pipeline stage's first
//! data-parallel rank writes its stages' weights and optimizer state as one shard, in the
//! Hugging Face sharded-safetensors layout (`model-0000i-of-0000n.safetensors` with
//! `model.safetensors.index.json`, and the same for `optim-*`), so PyTorch users load the weights
//! without our code. Rank 0 prepares the temporary directory, every writer writes and fsyncs its
//! shard, and only once every shard is in place and checksummed does rank 0 write the indexes and
//! state.json (which lists every file's SHA-256) and rename the directory into place, then
//! `latest`, then prune. A checkpoint is therefore valid whole or not at all, as a single-file one.
//! Tensors are named as in the whole model, so any layout reads any checkpoint by name.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{
    checkpoints_dir, dir_name, files, first_nonfinite, is_disk_full, list, one_line, place, publish, CheckpointState, FORMAT_VERSION, STATE_FILE,
};
use crate::error::TrainError;

pub const MODEL_INDEX: &str = "model.safetensors.index.json";
pub const OPTIM_INDEX: &str = "optim.safetensors.index.json";
/// An index lists names and files only: far smaller than this.
const MAX_INDEX_BYTES: u64 = 256 << 20;

/// `model-00002-of-00004.safetensors` for shard 1 of 4 of `kind` (`model` or `optim`).
pub fn shard_name(kind: &str, i: usize, n: usize) -> String {
    format!("{kind}-{:05}-of-{:05}.safetensors", i + 1, n)
}

/// What a writer reports to rank 0 about the shard it wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
    pub names: Vec<String>,
    /// Tensor-parallel slices in this shard: whole-model name → how it is split.
    #[serde(default)]
    pub tp_slices: BTreeMap<String, TpSlice>,
}

/// How a parameter was split over `size` tensor-parallel ranks (`fabbrica_models::Shard`): rank
/// r's slice is stored as `{name}#tp{r}` (its optimizer state as `{name}#tp{r}.exp_avg`, …), and
/// the index records the split, so any tensor-parallel degree reassembles and re-slices it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpSlice {
    pub dim: usize,
    pub parts: usize,
    pub size: usize,
}

/// Tensors by name.
pub type Named = Vec<(String, Tensor)>;

/// `{name}#tp{rank}`: the stored name of a tensor-parallel rank's slice of `name`.
pub fn tp_slice_name(name: &str, rank: usize) -> String {
    format!("{name}#tp{rank}")
}

/// Hugging Face's index: which file holds each tensor (and, beyond Hugging Face's format, how
/// tensor-parallel slices reassemble).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Index {
    metadata: IndexMeta,
    weight_map: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    tp_slices: BTreeMap<String, TpSlice>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct IndexMeta {
    total_size: u64,
}

fn write_error(out_dir: &Path, step: u64, needed: u64, why: String) -> TrainError {
    let root = checkpoints_dir(out_dir);
    let previous = list(&root).ok().and_then(|l| l.into_iter().rev().find(|(s, _)| *s != step)).map(|(_, d)| d);
    TrainError::CheckpointWrite {
        step,
        dir: root.join(dir_name(step)),
        disk_full: is_disk_full(&why),
        needed,
        free: files::free_bytes(if root.exists() { &root } else { out_dir }),
        why,
        previous,
    }
}

/// Rank 0, before any shard: the empty temporary directory of step `step`'s checkpoint, after
/// checking that about `needed` bytes are free.
pub fn begin(out_dir: &Path, step: u64, needed: u64) -> Result<PathBuf, TrainError> {
    let root = checkpoints_dir(out_dir);
    let fail = |why: String| write_error(out_dir, step, needed, why);
    fs::create_dir_all(&root).map_err(|e| fail(e.to_string()))?;
    if let Some(free) = files::free_bytes(&root) {
        if free < needed {
            return Err(fail("No space left on device (checked before writing)".into()));
        }
    }
    let tmp = files::temp_path(&root, &dir_name(step));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| fail(e.to_string()))?;
    }
    fs::create_dir(&tmp).map_err(|e| fail(e.to_string()))?;
    Ok(tmp)
}

/// Any writer: writes `tensors` (copied to the CPU) as `tmp/file`, fsynced, and says what it
/// wrote. A NaN/Inf tensor is refused before anything is written.
pub fn write_shard(tmp: &Path, file: &str, tensors: &[(String, Tensor)], step: u64) -> Result<ShardInfo, TrainError> {
    if let Some(t) = first_nonfinite(tensors) {
        return Err(TrainError::NonFiniteCheckpoint { step, tensor: t.to_string() });
    }
    let path = tmp.join(file);
    let cpu: Vec<(&str, Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t.detach().to_device(tch::Device::Cpu).contiguous())).collect();
    let io = |e: String| TrainError::Checkpoint(format!("cannot write {}: {e}", path.display()));
    Tensor::write_safetensors(&cpu, &path).map_err(|e| io(one_line(&e.to_string())))?;
    files::fsync_path(&path)?;
    let bytes = fs::metadata(&path).map_err(|e| io(e.to_string()))?.len();
    Ok(ShardInfo {
        file: file.to_string(),
        sha256: files::sha256_file(&path)?,
        bytes,
        names: tensors.iter().map(|(n, _)| n.clone()).collect(),
        tp_slices: BTreeMap::new(),
    })
}

/// Rank 0, once every shard is in `tmp`: writes the two indexes and state.json (every file's
/// SHA-256), places the directory, points `latest` at it and prunes this run's older ones.
pub fn commit(
    out_dir: &Path,
    tmp: &Path,
    mut state: CheckpointState,
    model: &[ShardInfo],
    optim: &[ShardInfo],
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let step = state.step;
    let needed: u64 = model.iter().chain(optim).map(|s| s.bytes).sum();
    let fail = |why: String| {
        let _ = fs::remove_dir_all(tmp);
        write_error(out_dir, step, needed, why)
    };
    let written = (|| -> Result<(), String> {
        for (index, shards) in [(MODEL_INDEX, model), (OPTIM_INDEX, optim)] {
            let mut weight_map = BTreeMap::new();
            let mut tp_slices = BTreeMap::new();
            for s in shards {
                for (n, t) in &s.tp_slices {
                    if tp_slices.insert(n.clone(), *t).is_some_and(|before| before != *t) {
                        return Err(format!("tensor {n} is split two ways"));
                    }
                }
                state.sha256.insert(s.file.clone(), s.sha256.clone());
                for n in &s.names {
                    if weight_map.insert(n.clone(), s.file.clone()).is_some() {
                        return Err(format!("tensor {n} is in two shards"));
                    }
                }
            }
            let total_size = shards.iter().map(|s| s.bytes).sum();
            let json = serde_json::to_vec_pretty(&Index { metadata: IndexMeta { total_size }, weight_map, tp_slices }).expect("index serializes");
            let path = tmp.join(index);
            fs::write(&path, &json).map_err(|e| e.to_string())?;
            files::fsync_path(&path).map_err(|e| e.to_string())?;
            state.sha256.insert(index.to_string(), files::sha256_bytes(&json));
        }
        state.format_version = FORMAT_VERSION;
        state.state_sha256 = state.digest();
        let json = serde_json::to_vec_pretty(&state).expect("state serializes");
        let state_path = tmp.join(STATE_FILE);
        fs::write(&state_path, &json).map_err(|e| e.to_string())?;
        files::fsync_path(&state_path).map_err(|e| e.to_string())?;
        files::fsync_path(tmp).map_err(|e| e.to_string())
    })();
    written.map_err(fail)?;
    let root = checkpoints_dir(out_dir);
    let dest = place(&root, tmp, step).map_err(|e| fail(e.to_string()))?;
    publish(&root, &state, keep)?;
    Ok(dest)
}

/// Reads the tensors an index lists, each file verified against state.json's checksum. File
/// names come from the index: only plain names of files in this directory that state.json
/// lists are read (a name with a path, `..` or unknown to state.json is refused).
pub fn read_indexed(dir: &Path, state: &CheckpointState, index: &str) -> Result<(Named, BTreeMap<String, TpSlice>), TrainError> {
    let corrupt = |why: String| {
        TrainError::Checkpoint(format!(
            "{}: {why}: use an earlier checkpoint (run.resume_from to train on, --checkpoint to sample or export)",
            dir.join(index).display()
        ))
    };
    let path = dir.join(index);
    let bytes = fabbrica_data::bounded::read(&path, MAX_INDEX_BYTES).map_err(|e| corrupt(format!("cannot read it: {e}")))?;
    if state.sha256.get(index) != Some(&files::sha256_bytes(&bytes)) {
        return Err(corrupt("does not match the SHA-256 in state.json".into()));
    }
    let idx: Index = serde_json::from_slice(&bytes).map_err(|e| corrupt(one_line(&e.to_string())))?;
    let mut wanted: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, file) in &idx.weight_map {
        let plain = !file.is_empty() && file != "." && file != ".." && !file.contains('/') && !file.contains('\\') && file.ends_with(".safetensors");
        if !plain || !state.sha256.contains_key(file) {
            return Err(corrupt(format!("names {file:?} for {name}, which is not a shard state.json lists")));
        }
        wanted.entry(file.as_str()).or_default().push(name.as_str());
    }
    let mut out = Vec::with_capacity(idx.weight_map.len());
    for (file, names) in wanted {
        let p = dir.join(file);
        if !p.is_file() {
            return Err(TrainError::Checkpoint(format!(
                "checkpoint {} is missing {file}: use an earlier one (run.resume_from to train on, --checkpoint to sample or export)",
                dir.display()
            )));
        }
        if files::sha256_file(&p)? != state.sha256[file] {
            return Err(TrainError::Checkpoint(format!(
                "{} is corrupt or truncated (SHA-256 does not match state.json): use an earlier checkpoint (run.resume_from to train on, --checkpoint to sample or export)",
                p.display()
            )));
        }
        let tensors =
            Tensor::read_safetensors(&p).map_err(|e| TrainError::Checkpoint(format!("cannot read {}: {}", p.display(), one_line(&e.to_string()))))?;
        for n in &names {
            if !tensors.iter().any(|(t, _)| t == n) {
                return Err(corrupt(format!("lists {n} in {file}, which does not hold it")));
            }
        }
        out.extend(tensors);
    }
    Ok((out, idx.tp_slices))
}

/// `name#tp3.exp_avg` → (`name`, 3, `.exp_avg`); `name#tp0` → (`name`, 0, ``).
fn tp_slice_of(key: &str) -> Option<(&str, usize, &str)> {
    let (param, rest) = key.rsplit_once("#tp")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let (rank, suffix) = rest.split_at(digits);
    if digits == 0 || !(suffix.is_empty() || suffix.starts_with('.')) {
        return None;
    }
    Some((param, rank.parse().ok()?, suffix))
}

/// Whole tensors from tensor-parallel slices (`{name}#tp{r}{suffix}`, split as `slices[name]`
/// says); other tensors pass through. Every slice of a tensor must be there, once, with the
/// same shape.
pub fn join_tp_slices(tensors: Vec<(String, Tensor)>, slices: &BTreeMap<String, TpSlice>, dir: &Path) -> Result<Vec<(String, Tensor)>, TrainError> {
    let corrupt = |why: String| {
        TrainError::Checkpoint(format!(
            "{}: {why}: use an earlier checkpoint (run.resume_from to train on, --checkpoint to sample or export)",
            dir.display()
        ))
    };
    let mut out = Vec::new();
    let mut groups: BTreeMap<(String, String), BTreeMap<usize, Tensor>> = BTreeMap::new();
    for (name, t) in tensors {
        match tp_slice_of(&name) {
            Some((param, rank, suffix)) if suffix != ".step" => {
                if groups.entry((param.to_string(), suffix.to_string())).or_default().insert(rank, t).is_some() {
                    return Err(corrupt(format!("slice {rank} of {param}{suffix} is stored twice")));
                }
            }
            // The optimizer's step count of a slice: the same on every slice.
            Some((param, 0, suffix)) => out.push((format!("{param}{suffix}"), t)),
            Some(_) => {}
            None => out.push((name, t)),
        }
    }
    for ((param, suffix), parts) in groups {
        let how = slices.get(&param).ok_or_else(|| corrupt(format!("{param} is stored in slices, but the index does not say how it was split")))?;
        if parts.len() != how.size || parts.keys().copied().ne(0..how.size) {
            return Err(corrupt(format!("{param}{suffix} has slices {:?} of {}", parts.keys().collect::<Vec<_>>(), how.size)));
        }
        let ordered: Vec<Tensor> = parts.into_values().collect();
        let shard = fabbrica_models::Shard { dim: how.dim, parts: how.parts };
        if ordered.iter().any(|t| t.size() != ordered[0].size()) || ordered[0].dim() <= how.dim {
            return Err(corrupt(format!("the slices of {param}{suffix} differ in shape")));
        }
        // Each slice holds `parts` blocks along `dim` (q, k and v of a fused weight, say).
        if how.parts == 0 || ordered[0].size()[how.dim] % how.parts as i64 != 0 {
            return Err(corrupt(format!(
                "the index splits {param} into {} parts along dim {}, which its slices of shape {:?} cannot hold",
                how.parts,
                how.dim,
                ordered[0].size()
            )));
        }
        out.push((format!("{param}{suffix}"), shard.join(&ordered)));
    }
    Ok(out)
}

/// `name[a..b].exp_avg` → (`name`, a, b, `exp_avg`): a ZeRO-1 shard's piece of a flattened
/// optimizer tensor (elements a..b of `name`'s moment).
fn slice_of(key: &str) -> Option<(&str, usize, usize, &str)> {
    let (base, suffix) = key.rsplit_once('.')?;
    let (param, range) = base.strip_suffix(']')?.rsplit_once('[')?;
    let (a, b) = range.split_once("..")?;
    Some((param, a.parse().ok()?, b.parse().ok()?, suffix))
}

/// Optimizer state written by ZeRO-1 shard owners (pieces named by slice, see [`slice_of`])
/// reassembled into whole tensors shaped like their parameters (`model`), so that any layout,
/// with or without ZeRO-1, loads it. Whole tensors pass through. The pieces must cover every
/// element exactly once.
pub fn assemble_slices(optim: Vec<(String, Tensor)>, model: &[(String, Tensor)], dir: &Path) -> Result<Vec<(String, Tensor)>, TrainError> {
    let corrupt = |why: String| {
        TrainError::Checkpoint(format!(
            "{}: {why}: use an earlier checkpoint (run.resume_from to train on, --checkpoint to sample or export)",
            dir.display()
        ))
    };
    let shapes: BTreeMap<&str, Vec<i64>> = model.iter().map(|(n, t)| (n.as_str(), t.size())).collect();
    let mut out = Vec::new();
    // (parameter, state suffix) -> its pieces: (first element, end element, values).
    type Pieces = BTreeMap<(String, String), Vec<(usize, usize, Tensor)>>;
    let mut pieces: Pieces = BTreeMap::new();
    for (name, t) in optim {
        match slice_of(&name) {
            None => out.push((name, t)),
            Some((param, a, b, suffix)) => pieces.entry((param.to_string(), suffix.to_string())).or_default().push((a, b, t)),
        }
    }
    for ((param, suffix), mut parts) in pieces {
        let key = format!("{param}.{suffix}");
        if suffix == "step" {
            // A scalar per piece, equal on every shard.
            out.push((key, parts.swap_remove(0).2));
            continue;
        }
        let shape = shapes.get(param.as_str()).ok_or_else(|| corrupt(format!("optimizer state for {param}, which the model does not have")))?;
        let numel: i64 = shape.iter().product();
        parts.sort_by_key(|p| p.0);
        let mut at = 0usize;
        for (a, b, t) in &parts {
            if *a != at || b <= a || t.numel() != b - a {
                return Err(corrupt(format!("the shards of {key} do not cover it exactly (a piece {a}..{b} after {at})")));
            }
            at = *b;
        }
        if at as i64 != numel {
            return Err(corrupt(format!("the shards of {key} cover {at} of its {numel} elements")));
        }
        let flat = Tensor::cat(&parts.iter().map(|p| p.2.reshape([-1])).collect::<Vec<_>>(), 0);
        out.push((key, flat.reshape(shape.as_slice())));
    }
    Ok(out)
}
