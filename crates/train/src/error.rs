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
    #[error("{0}")]
    Checkpoint(String),
    #[error("{0}")]
    Device(String),
    #[error("I/O error on {path}: {why}")]
    Io { path: PathBuf, why: String },
    #[error("libtorch: {0}")]
    Torch(String),
    /// A data-parallel layout that does not fit the world (`parallel.*`).
    #[error("{0}")]
    Parallel(String),
    /// Communication failed (a collective's error names rank, operation, group and backend).
    #[error("{0}")]
    Comm(String),
    /// Another rank failed and reported it; this rank stops with it.
    #[error("rank {rank} failed (its error is printed by that rank)")]
    Elsewhere { rank: usize },
    /// An error that happened on one rank only, named so.
    #[error("rank {rank}: {inner}")]
    OnRank { rank: usize, inner: Box<TrainError> },
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
            TrainError::Elsewhere { .. } => return true,
            _ => {}
        }
        !matches!(self, TrainError::Torch(_) | TrainError::Io { .. } | TrainError::Comm(_))
            && !matches!(self, TrainError::Model(fabbrica_models::ModelError::Torch(_)))
    }
}

impl From<tch::TchError> for TrainError {
    fn from(e: tch::TchError) -> Self {
        TrainError::Torch(e.to_string().lines().next().unwrap_or("error").to_string())
    }
}

pub fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |e| TrainError::Io { path, why: e.to_string() }
}
