//! The trainer: config, one training loop over a grid of pipeline stages and data-parallel
//! replicas (`grid`, `pipelined`, `grads`) driving a forward-backward strategy (`step`), AdamW, LR schedule, checkpoints, metrics, sampling.
//! The model (`fabbrica-models`) never sees a communicator: data parallelism (`fabbrica-ddp`)
//! and pipeline stages are applied to it from here.

pub mod agreement;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod error;
pub mod evaluate;
pub mod grads;
pub mod grid;
pub mod hf;
pub mod lr_schedule;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod pipelined;
pub mod sample;
pub(crate) mod saver;
pub mod setup;
pub mod signals;
pub mod step;
pub mod tensor_parallel;
pub mod trace;
pub mod trainer;

pub use config::Config;
pub use error::{ConfigError, TrainError};
pub use trainer::{comm_options, train, train_in, TrainOptions, TrainOutcome};
