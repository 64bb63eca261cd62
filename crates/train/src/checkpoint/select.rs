//! Which checkpoint a resumed run starts from, and moving an earlier run's files aside.
//!
//! Resume takes the newest checkpoint (by step) that verifies: `latest` is only a hint, since it
//! can be lost or point at a checkpoint that was damaged later. A corrupt newest checkpoint is
//! passed over, saying which and why. `run.resume_from` names one explicitly.
//! Checkpoints *ahead* of the one resumed from (the corrupt ones passed over, or newer ones when
//! an older checkpoint is chosen) belong to a timeline this run abandons: the trainer moves them
//! into `out_dir/archive/` so that a later automatic resume can never pick them up.

use std::fs;
use std::path::{Path, PathBuf};

use super::{checkpoints_dir, list, load, Loaded, STATE_FILE};
use crate::error::TrainError;

pub struct Resume {
    pub loaded: Loaded,
    /// Newer checkpoints that did not verify, newest first, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    /// Checkpoints in `out_dir/checkpoints` with a step above the chosen one.
    pub ahead: Vec<PathBuf>,
    /// The chosen checkpoint is one of `out_dir/checkpoints` (this run continues); false for a
    /// `run.resume_from` elsewhere (a new run starting from another run's state).
    pub in_run: bool,
}

/// The checkpoint to resume the run in `out_dir` from: `explicit` (`run.resume_from`) if given,
/// else the newest one that loads and verifies. Nothing to resume from is an error.
pub fn find_resume(out_dir: &Path, explicit: Option<&Path>) -> Result<Resume, TrainError> {
    let root = checkpoints_dir(out_dir);
    let all = list(&root)?;
    if let Some(p) = explicit {
        if !p.join(STATE_FILE).is_file() {
            return Err(TrainError::Checkpoint(format!(
                "run.resume_from = {} is not a checkpoint directory (it has no state.json): point it at a checkpoints/step_* directory",
                p.display()
            )));
        }
        let loaded = load(p).map_err(|e| TrainError::Checkpoint(format!("run.resume_from: {e}")))?;
        let in_run = match (fs::canonicalize(p), fs::canonicalize(&root)) {
            (Ok(a), Ok(b)) => a.parent() == Some(b.as_path()),
            _ => false,
        };
        let step = loaded.state.step;
        let ahead = if in_run { all.into_iter().filter(|(s, _)| *s > step).map(|(_, d)| d).collect() } else { Vec::new() };
        return Ok(Resume { loaded, skipped: Vec::new(), ahead, in_run });
    }
    if all.is_empty() {
        return Err(TrainError::Checkpoint(format!(
            "run.resume = true, but {} holds no checkpoint to resume from: start a fresh run with run.resume=false, or set run.resume_from to a checkpoint directory",
            root.display()
        )));
    }
    let mut skipped = Vec::new();
    for (step, dir) in all.iter().rev() {
        match load(dir) {
            Ok(loaded) => {
                let ahead = all.iter().filter(|(s, _)| s > step).map(|(_, d)| d.clone()).collect();
                return Ok(Resume { loaded, skipped, ahead, in_run: true });
            }
            Err(e) => skipped.push((dir.clone(), e.to_string())),
        }
    }
    let whys: Vec<String> = skipped.iter().map(|(d, why)| format!("{}: {why}", d.file_name().unwrap_or_default().to_string_lossy())).collect();
    Err(TrainError::Checkpoint(format!(
        "run.resume = true, but no checkpoint in {} verifies ({}): restore one from a backup, or start a fresh run with run.resume=false and run.if_exists=archive",
        root.display(),
        whys.join("; ")
    )))
}

/// The checkpoints of an earlier run in `out_dir` (oldest first); empty if there are none.
pub fn earlier_run(out_dir: &Path) -> Result<Vec<PathBuf>, TrainError> {
    Ok(list(&checkpoints_dir(out_dir))?.into_iter().map(|(_, d)| d).collect())
}

/// What [`archive_run`] moved, and where.
#[derive(Debug, Clone)]
pub struct Archived {
    pub dest: PathBuf,
    pub moved: Vec<PathBuf>,
}

/// Moves `dirs` (checkpoint directories of `out_dir/checkpoints`) into
/// `out_dir/archive/<UTC time>/checkpoints/`, and with `whole_run` also `checkpoints/latest`,
/// `metrics.jsonl` and `config.toml`: an earlier run is kept whole, apart from the new one.
/// Nothing is deleted; a file that cannot be moved stops it with the reason.
pub fn archive_run(out_dir: &Path, dirs: &[PathBuf], whole_run: bool) -> Result<Archived, TrainError> {
    let base = out_dir.join("archive");
    let stamp = utc_stamp();
    let mut dest = base.join(&stamp);
    let mut n = 1;
    while dest.exists() {
        n += 1;
        dest = base.join(format!("{stamp}-{n}"));
    }
    let cant = |what: &Path, e: std::io::Error| {
        let message = format!("cannot move {} into {} ({e}): move or remove it by hand", what.display(), dest.display());
        TrainError::CheckpointFile { message, source: e }
    };
    let ck = dest.join("checkpoints");
    fs::create_dir_all(&ck).map_err(|e| cant(&ck, e))?;
    let mut moved = Vec::new();
    for d in dirs {
        let name = d.file_name().unwrap_or_default();
        fs::rename(d, ck.join(name)).map_err(|e| cant(d, e))?;
        moved.push(d.clone());
    }
    if whole_run {
        for (from, to) in [
            (checkpoints_dir(out_dir).join("latest"), ck.join("latest")),
            (out_dir.join("metrics.jsonl"), dest.join("metrics.jsonl")),
            (out_dir.join("config.toml"), dest.join("config.toml")),
        ] {
            if from.exists() {
                fs::rename(&from, &to).map_err(|e| cant(&from, e))?;
                moved.push(from);
            }
        }
    }
    Ok(Archived { dest, moved })
}

/// A new run's identity: 16 random hex digits.
pub fn new_run_id() -> String {
    let mut bytes = [0u8; 8];
    let ok = fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes)).is_ok();
    if !ok {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        bytes = ((t as u64) ^ ((std::process::id() as u64) << 32)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `YYYYMMDD-HHMMSS` in UTC, now.
fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_stamp_is_well_formed() {
        let s = super::utc_stamp();
        assert_eq!(s.len(), 15, "{s}");
        assert!(s.starts_with("20"), "{s}");
        assert_eq!(&s[8..9], "-");
    }
}
