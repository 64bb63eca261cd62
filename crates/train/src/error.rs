use std::path::PathBuf;

/// Configuration errors: each displays as one line that names the key or file and what to change.
#[derive(thiserror::Error, Debug)]
pub enum ConfigError {
    #[error("unknown preset '{name}': choose one of {valid}")]
    UnknownPreset { name: String, valid: String },
    #[error("unknown config key `{key}`: valid keys here are {valid}")]
    UnknownKey { key: String, valid: String },
    #[error("config key `{key}` is a section: set one of its keys, e.g. `{key}.<name>=...`")]
    NotATable { key: String },
    #[error("invalid config value: {why}")]
    Type { why: String },
    #[error("`{key} = {value}` is invalid: {why}")]
    Invalid { key: String, value: String, why: String },
    /// A value of the wrong TOML type; `expected` is e.g. "an integer", `example` a valid `key=value`.
    #[error("`{key} = {value}` has the wrong type: expected {expected}, e.g. {example}")]
    WrongType { key: String, value: String, expected: String, example: String },
    /// An environment variable that overrides a config key holds a bad value (the message names it).
    #[error("{0}")]
    Env(String),
    #[error("{0}")]
    Model(String),
    #[error("--set expects key=value with a dotted key such as train.lr=3e-4, got '{set}'")]
    BadSet { set: String },
    #[error("cannot read config file {path}: {why}")]
    Io { path: PathBuf, why: String },
    #[error("config file {path} is not valid TOML: {why}")]
    Toml { path: PathBuf, why: String },
}

pub type Result<T> = std::result::Result<T, ConfigError>;

/// Trainer errors. `User` errors are caused by input (bad data, config, checkpoint) and map to
/// exit code 2; the rest are internal or environmental.
#[derive(thiserror::Error, Debug)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Data(#[from] fabbrica_data::DataError),
    #[error(transparent)]
    Model(#[from] fabbrica_models::ModelError),
    /// A checkpoint (or the run directory) cannot be used as it is: what to change.
    #[error("{0}")]
    Checkpoint(String),
    /// As [`TrainError::Checkpoint`], caused by a file operation: the OS error is kept as the
    /// source (the message already says it, and what to do).
    #[error("{message}")]
    CheckpointFile {
        message: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Device(String),
    /// A file operation failed; the OS error is kept as the source (callers match on its kind).
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("libtorch: {0}")]
    Torch(String),
    /// A data-parallel layout that does not fit the world (`parallel.*`).
    #[error("{0}")]
    Parallel(String),
    /// A collective or point-to-point operation failed: the communicator's error, kept whole
    /// (it names rank, operation, group and backend) so that callers can match on its kind.
    #[error(transparent)]
    Collective(#[from] fabbrica_comm::CommError),
    /// Data parallelism failed (a bucket's collective, a hook, replicas that disagree): the
    /// reducer's error, kept whole.
    #[error(transparent)]
    Ddp(#[from] fabbrica_ddp::DdpError),
    /// Communication went wrong in a way no single operation reports (a peer's message that
    /// does not parse, a tensor-parallel collective inside the model's forward).
    #[error("{0}")]
    Comm(String),
    /// A pipeline stage's action failed (the message names the rank, the action and why).
    #[error("pipeline: {0}")]
    Pipeline(String),
    /// A checkpoint would hold a NaN/Inf: it is not written.
    #[error("step {step}: `{tensor}` holds NaN or Inf values, so no checkpoint was written (the previous one is kept): lower train.lr or set train.nonfinite=skip, then resume with run.resume=true")]
    NonFiniteCheckpoint { step: u64, tensor: String },
    /// A checkpoint could not be written (disk full, I/O error); its temporary is removed.
    #[error("{}", checkpoint_write_message(*step, dir, *disk_full, *needed, *free, why, previous.as_deref()))]
    CheckpointWrite { step: u64, dir: PathBuf, disk_full: bool, needed: u64, free: Option<u64>, why: String, previous: Option<PathBuf> },
    /// A NaN/Inf loss or gradient norm under `train.nonfinite = "stop"` (or too many skipped).
    #[error("{0}")]
    NonFinite(String),
    /// Stopped by a signal at a step boundary, after writing the checkpoint (not a failure: the
    /// binary exits with `signals::EXIT_PREEMPTED`).
    #[error("stopped by {signal} (received by rank {rank}) after step {step}; {}: resume with run.resume=true or run.resume=auto", match checkpoint { Some(c) => format!("its checkpoint is {}", c.display()), None => "the checkpoint was written by rank 0".to_string() })]
    Preempted { step: u64, rank: usize, signal: String, checkpoint: Option<PathBuf> },
    /// Another rank failed and reported it; this rank stops with it. `user`: that rank's error
    /// was the user's to fix, so every rank exits with the same code (2, or 1).
    #[error("rank {rank} failed (its error is printed by that rank)")]
    Elsewhere { rank: usize, user: bool },
    /// An error that happened on one rank only, named so.
    #[error("rank {rank}: {inner}")]
    OnRank { rank: usize, inner: Box<TrainError> },
    /// Ranks were launched with different configurations or data (`agreement.rs`): names the
    /// first differing key and which ranks have which value.
    #[error("{0}")]
    Disagreement(String),
    /// The memory estimate of the run exceeds what this node or device has free (`memory.rs`),
    /// found before the first step: gives the numbers and what to lower.
    #[error("{0}")]
    NotEnoughMemory(String),
    /// libtorch could not allocate a tensor during training (`memory::guard_alloc`).
    #[error("{}", oom_message(*.step, *.bytes, .device))]
    OutOfMemory { step: u64, bytes: Option<u64>, device: String },
}

fn oom_message(step: u64, bytes: Option<u64>, device: &str) -> String {
    let size = match bytes {
        Some(b) => format!("a tensor of {}", crate::memory::human_bytes(b)),
        None => "a tensor".to_string(),
    };
    format!(
        "out of memory at step {step}: {device} could not allocate {size}: lower train.batch_size (and raise train.grad_accum to keep the global batch), model.block_size or the model size, or set parallel.zero=1 to shard the optimizer state"
    )
}

impl TrainError {
    /// The same error, saying which rank it happened on.
    pub fn on_rank(self, rank: usize) -> TrainError {
        TrainError::OnRank { rank, inner: Box::new(self) }
    }

    /// True when the user can fix it by changing input (exit code 2).
    pub fn is_user_error(&self) -> bool {
        match self {
            TrainError::OnRank { inner, .. } => return inner.is_user_error(),
            TrainError::Elsewhere { user, .. } => return *user,
            _ => {}
        }
        !matches!(
            self,
            TrainError::Torch(_)
                | TrainError::Io { .. }
                | TrainError::Comm(_)
                | TrainError::Collective(_)
                | TrainError::Pipeline(_)
                | TrainError::CheckpointWrite { .. }
        ) && !matches!(self, TrainError::Model(fabbrica_models::ModelError::Torch(_)))
            && !matches!(self, TrainError::Ddp(e) if !matches!(e, fabbrica_ddp::DdpError::BadBucketCap { .. }))
    }
}

impl From<tch::TchError> for TrainError {
    fn from(e: tch::TchError) -> Self {
        TrainError::Torch(e.to_string().lines().next().unwrap_or("error").to_string())
    }
}

/// A [`TrainError::CheckpointFile`]: `message(e)` is the one line (naming the file, the OS error
/// and what to do), `e` its source.
pub(crate) fn checkpoint_file(message: impl FnOnce(&std::io::Error) -> String) -> impl FnOnce(std::io::Error) -> TrainError {
    move |source| TrainError::CheckpointFile { message: message(&source), source }
}

pub fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}

fn checkpoint_write_message(
    step: u64,
    dir: &std::path::Path,
    disk_full: bool,
    needed: u64,
    free: Option<u64>,
    why: &str,
    previous: Option<&std::path::Path>,
) -> String {
    let gib = crate::memory::human_bytes;
    let kept = match previous {
        Some(p) => format!("the previous checkpoint {} is kept", p.display()),
        None => "no earlier checkpoint exists".to_string(),
    };
    if disk_full {
        let free = free.map(|f| format!(", {} free", gib(f))).unwrap_or_default();
        format!(
            "cannot write the checkpoint of step {step} to {}: the disk is full (it needs about {}{free}): free space there or set run.out_dir to a larger disk, then resume with run.resume=true; {kept}",
            dir.display(),
            gib(needed)
        )
    } else {
        format!(
            "cannot write the checkpoint of step {step} to {}: {why}: fix the directory (permissions, mount) and resume with run.resume=true; {kept}",
            dir.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabbrica_comm::{CommError, Communicator};

    /// A checkpoint file that cannot be read is the user's to fix (exit 2), and keeps the OS
    /// error as its source.
    #[test]
    fn checkpoint_file_errors_keep_their_cause() {
        let path = std::path::Path::new("/nonexistent/step_00000010/model.safetensors");
        let e = std::fs::read(path).map_err(checkpoint_file(|e| format!("cannot read {}: {e}", path.display()))).unwrap_err();
        let source = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>()).expect("the OS error as source");
        assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        assert!(e.to_string().starts_with("cannot read /nonexistent/step_00000010/model.safetensors: "), "{e}");
        assert!(e.is_user_error());
    }

    /// An I/O failure keeps the OS error as its source, under a one-line message naming the file.
    #[test]
    fn io_errors_keep_their_cause() {
        let e = io_err("/data/run/metrics.jsonl")(std::io::Error::from(std::io::ErrorKind::StorageFull));
        let source = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>()).expect("the OS error as source");
        assert_eq!(source.kind(), std::io::ErrorKind::StorageFull);
        let line = e.to_string();
        assert!(line.contains("/data/run/metrics.jsonl") && !line.contains('\n'), "{line}");
        assert!(!e.is_user_error());
    }

    /// A communicator's and a reducer's errors reach the trainer's callers whole: matchable by
    /// kind, with the same one-line message, and not counted as the user's.
    #[test]
    fn communication_errors_keep_their_cause() {
        let comm = fabbrica_comm::single::SingleComm::new("world", 0);
        let x = tch::Tensor::zeros([3], (tch::Kind::Float, tch::Device::Cpu));
        let wrong = tch::Tensor::zeros([5], (tch::Kind::Float, tch::Device::Cpu));
        let e = comm.all_gather(&wrong, &x).unwrap_err();
        let line = e.to_string();
        let t: TrainError = e.into();
        assert!(matches!(&t, TrainError::Collective(CommError::InvalidArgument { .. })), "{t:?}");
        assert_eq!(t.to_string(), line);
        assert!(!t.is_user_error());
        let bad_cap = fabbrica_ddp::DdpError::BadBucketCap { key: "parallel.bucket_mb", got: "0".into(), default: "25" };
        let t: TrainError = bad_cap.into();
        assert!(matches!(t, TrainError::Ddp(fabbrica_ddp::DdpError::BadBucketCap { .. })) && t.is_user_error());
    }
}
