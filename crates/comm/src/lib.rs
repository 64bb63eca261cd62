pub mod launch;
pub use launch::{cuda_device_for, LaunchEnv, LaunchError, Launcher};
