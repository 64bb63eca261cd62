//! The crate's error type: one line per failure, naming the config key or parameter to fix.

use fabbrica_comm::CommError;

/// Why a data-parallel setup is invalid, or why a step of the reducer failed.
///
/// `Display` is one line (the first line of a multi-line cause); [`std::error::Error::source`]
/// gives the communicator's error itself for [`DdpError::Collective`].
#[derive(thiserror::Error, Debug, Clone)]
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

    /// A collective of the reducer failed. `what` names it (which bucket or parameter, and from
    /// where it was launched); `source` is the communicator's error, whose message names rank,
    /// operation, group and backend.
    #[error("{what}: {}", first_line(.source))]
    Collective {
        what: String,
        #[source]
        source: CommError,
    },

    /// Ranks disagree (e.g. parameters differ after the initial broadcast), or another failure of
    /// data parallelism that is not one collective's.
    #[error("{}", first_line(.0))]
    Comm(String),

    /// libtorch refused an operation on the parameters or gradients.
    #[error("libtorch: {}", first_line(.0))]
    Torch(String),

    /// Something panicked in the grad-ready hook or while launching a bucket's collective (`what`
    /// names which); the reducer caught it and recorded it instead of leaving its state poisoned.
    #[error("{what} panicked: {}", first_line(.message))]
    Panic { what: String, message: String },

    /// A parameter's `.grad` is no longer defined (it was set to None), so it is no longer a view of
    /// the reducer's bucket.
    #[error("parameter '{param}' has no gradient (was its .grad set to None?): it must stay a view of the reducer's bucket; zero gradients with Ddp::zero_grad")]
    NoGradient { param: String },

    /// A ZeRO-1 operation (gathering per-piece tensors) was called on a reducer applied without
    /// ZeRO-1.
    #[error("{op}: the optimizer state is sharded only with ZeRO-1 (parallel.zero = 1); without it the optimizer holds its own state")]
    NotSharded { op: &'static str },

    /// `Ddp::gather_pieces` was given no tensor (or one of the wrong size) for a piece of this
    /// rank's shard.
    #[error("gathering {what}: no tensor of the piece's size for ZeRO-1 piece '{piece}' of this rank's shard")]
    MissingPiece { what: String, piece: String },
}

/// The first line of `s` (libtorch's messages go on with a C++ backtrace), marked when cut.
pub(crate) fn first_line(s: &impl std::fmt::Display) -> String {
    let s = s.to_string();
    let s = s.trim();
    match s.split_once('\n') {
        Some((first, _)) => format!("{} (...)", first.trim_end()),
        None => s.to_string(),
    }
}

/// `Result` with this crate's error.
pub type Result<T, E = DdpError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use fabbrica_comm::{Backend, OpContext, OpKind};

    fn ctx() -> OpContext {
        OpContext { op: OpKind::AllReduce, seq: 3, group: "dp".into(), backend: Backend::Single, rank: 0, size: 1, world_rank: 0 }
    }

    #[test]
    fn a_collective_error_is_one_line_and_keeps_its_cause() {
        let cause = CommError::Backend { ctx: ctx(), detail: "connection reset\nframe #0: somewhere".into() };
        let e = DdpError::Collective { what: "bucket 1 (p0)".into(), source: cause };
        let msg = e.to_string();
        assert!(msg.starts_with("bucket 1 (p0): all_reduce #3 on group 'dp'") && msg.contains("connection reset"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        let src = std::error::Error::source(&e).expect("a source");
        let comm = src.downcast_ref::<CommError>().expect("the CommError itself");
        assert!(matches!(comm, CommError::Backend { .. }));
        assert!(comm.to_string().contains("frame #0"), "the source keeps the whole message");
    }

    #[test]
    fn torch_and_panic_messages_keep_their_first_line() {
        let e = DdpError::Torch("shape mismatch\nException raised from foo at bar.cpp:1".into());
        assert_eq!(e.to_string(), "libtorch: shape mismatch (...)");
        let e = DdpError::Panic { what: "grad-ready hook".into(), message: "boom".into() };
        assert_eq!(e.to_string(), "grad-ready hook panicked: boom");
    }
}
