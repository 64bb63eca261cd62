//! The crate's error type: one line per failure, naming the config key or parameter to fix.

/// Why a data-parallel setup is invalid.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum DdpError {
    /// A bucket size cap is 0, negative or not a number.
    #[error("{key} must be > 0 (got {got}): it caps the gradient bytes all-reduced in one call; the default is {default} MiB")]
    BadBucketCap { key: &'static str, got: String, default: &'static str },

    /// A parameter was described with an element size of 0 bytes.
    #[error("parameter {param}: element size is 0 bytes (pass the dtype's size, e.g. 4 for f32, 2 for bf16)")]
    ZeroElementSize { param: usize },

    /// Two parameters with the same bucket key disagree on their element size, so they cannot share
    /// one contiguous storage of a single dtype.
    #[error("parameter {param}: element size {got} bytes differs from {expected} bytes of earlier parameters with bucket key {key}: give parameters of different dtypes different keys")]
    MixedElementSize { param: usize, key: u64, expected: usize, got: usize },

    /// numel × element size does not fit in `usize`.
    #[error("parameter {param}: size in bytes overflows usize ({numel} elements × {elem_size} bytes)")]
    SizeOverflow { param: usize, numel: usize, elem_size: usize },

    /// A collective failed (the message names rank, operation, group and backend), or ranks disagree.
    #[error("{0}")]
    Comm(String),

    /// libtorch refused an operation on the parameters or gradients.
    #[error("libtorch: {0}")]
    Torch(String),
}

/// `Result` with this crate's error.
pub type Result<T, E = DdpError> = std::result::Result<T, E>;
