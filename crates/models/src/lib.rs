//! GPT reference models. This crate knows nothing about communication: data and pipeline
//! parallelism are applied to a model from outside (see the `ddp` and `pipeline` crates).

mod config;
mod error;
pub mod flops;
mod gpt;
mod layers;
pub mod stages;

pub use config::{GptConfig, PRESET_NAMES};
pub use error::{ModelError, Result};
pub use flops::{flops_per_token, memory_estimate, stage_memory_estimate, MemoryEstimate};
pub use gpt::{Gpt, StageSpec};
pub use stages::{balanced_split, check_split, stage_params, PartCosts};
