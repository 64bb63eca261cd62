//! Communication for fabbrica: one [`Communicator`] trait over tch tensors with MPI, NCCL and
//! single-process backends, non-blocking [`Work`] handles, the launch environment, a watchdog
//! that turns hangs into errors, and a debug mode that catches mismatched collectives.

mod agree;
pub mod communicator;
mod debug;
pub mod error;
pub mod flight;
pub mod group;
pub mod launch;
pub mod mpi;
pub mod nccl;
pub mod single;
pub mod traffic;
pub mod types;
pub mod watchdog;
pub mod work;
mod worker;
pub mod world;

pub use agree::gather_status;
pub use communicator::Communicator;
pub use error::{CommError, OpContext, Result};
pub use group::{BackendChoice, Group};
pub use launch::{cuda_device_for, LaunchEnv, LaunchError, Launcher};
pub use types::{Backend, DType, OpKind, ReduceOp};
pub use work::{Work, WorkImpl};
pub use world::{init, init_with, InitOptions, World, DEFAULT_TIMEOUT};
