//! Reference models: GPT-2 and the Llama family, built whole or by pipeline stage. This crate
//! knows nothing about communication: data and pipeline parallelism are applied to a model from
//! outside (see the `ddp` and `pipeline` crates), and tensor parallelism through a plan of
//! operators ([`tp`]) that never exposes a communicator.

mod arch;
mod config;
mod error;
pub mod flops;
mod gpt;
mod layers;
mod llama;
mod model;
pub mod stages;
pub mod tp;

pub use arch::{ModelConfig, GPT_ONLY_KEYS, LLAMA_ONLY_KEYS, PRESET_NAMES};
pub use config::{Activation, GptConfig, MAX_VOCAB_SIZE};
pub use error::{ModelError, Result};
pub use flops::{flops_per_token, memory_estimate, stage_memory_estimate, MemoryEstimate};
pub use llama::{LlamaConfig, RopeKind, RopeScaling};
pub use model::{Model, Recompute, StageSpec};
pub use stages::{balanced_split, check_split, stage_params, stage_params_tp, PartCosts};
pub use tp::{Shard, TensorParallel, TpOps};
