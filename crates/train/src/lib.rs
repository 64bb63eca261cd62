//! The single-process trainer: config, AdamW, LR schedule, checkpoints, metrics, sampling.
//! Parallelism (data, pipeline) is applied by other crates around the same pieces.

pub mod agreement;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod error;
pub mod grads;
pub mod grid;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod pipelined;
pub mod sample;
pub(crate) mod saver;
pub mod schedule;
pub mod signals;
pub mod trace;
pub mod trainer;

pub use config::Config;
pub use error::{ConfigError, TrainError};
pub use trainer::{comm_options, train, train_in, TrainOptions, TrainOutcome};
