//! `fabbrica plan`: the planner. Three inputs kept apart (Calculon, Isaev et al. SC23): the
//! model ([`ModelShape`], counted by the trainer's own code), the system ([`Cluster`]) and the
//! execution ([`Layout`] and [`Execution`]). For a GPU count and a global batch it searches the
//! layouts ([`Planner`]), estimates each one's step time with every part broken down (compute,
//! exposed TP/PP/DP communication, the pipeline bubble from `crates/pipeline`'s simulator,
//! optimizer), its memory per GPU (weights, gradients, optimizer state, activations) and, for a
//! token budget, time, GPU-hours, energy and cost to train with failures counted
//! ([`resilience`]). docs/PLANNER.md states every formula and its source, and the validation
//! against published runs ([`anchors`]).

pub mod anchors;
pub mod calibrate;
pub mod cluster;
pub mod comm;
mod error;
pub mod estimate;
pub mod failures;
pub mod layout;
pub mod memory;
pub mod model;
pub mod plot;
pub mod report;
pub mod search;
pub mod sim;

pub use cluster::{Cluster, GIB, LLAMA3_FAILURES_PER_GPU_HOUR, PRESETS};
pub use error::PlanError;
pub use estimate::{estimate, Estimate, Execution, Workload};
pub use failures::{resilience, Resilience};
pub use layout::{Forced, Layout};
pub use memory::Memory;
pub use model::{ModelShape, Recompute};
pub use search::{Found, Planner};
