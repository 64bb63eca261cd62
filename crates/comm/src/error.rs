//! One error type for the crate. Every error that comes from an operation carries an [`OpContext`]:
//! which rank, which operation (with its sequence number), which group and which backend.

use std::fmt;

use crate::types::{Backend, OpKind};

/// Where an operation failed: printed at the start of every operation error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpContext {
    pub op: OpKind,
    /// Sequence number of the operation on its group (collectives and point-to-point are counted
    /// separately), starting at 1.
    pub seq: u64,
    pub group: String,
    pub backend: Backend,
    /// Rank in the group, and the group's size.
    pub rank: usize,
    pub size: usize,
    /// Rank in the world.
    pub world_rank: usize,
}

impl fmt::Display for OpContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} #{} on group '{}' ({} backend, rank {} of {}, world rank {})",
            self.op, self.seq, self.group, self.backend, self.rank, self.size, self.world_rank
        )
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CommError {
    /// A tensor with a dtype no backend reduces.
    #[error("{ctx}: dtype {dtype} is not supported; use f32, bf16, f16 or i64")]
    UnsupportedDtype { ctx: OpContext, dtype: String },
    /// Arguments that cannot work (sizes, ranks, devices); `what` says what to change.
    #[error("{ctx}: {what}")]
    InvalidArgument { ctx: OpContext, what: String },
    /// The backend library returned an error.
    #[error("{ctx}: {detail}")]
    Backend { ctx: OpContext, detail: String },
    /// Debug mode found ranks of a group calling different collectives.
    #[error("{ctx}: collective mismatch: {detail}")]
    Mismatch { ctx: OpContext, detail: String },
    /// The communicator's worker was shut down (the world was finalized) before the operation ran.
    #[error("{ctx}: the communicator is shut down (was the World dropped?)")]
    Shutdown { ctx: OpContext },
    /// Setting up the world or a backend failed.
    #[error("{0}")]
    Init(String),
}

impl CommError {
    /// The operation context, when the error came from an operation.
    pub fn context(&self) -> Option<&OpContext> {
        match self {
            CommError::UnsupportedDtype { ctx, .. }
            | CommError::InvalidArgument { ctx, .. }
            | CommError::Backend { ctx, .. }
            | CommError::Mismatch { ctx, .. }
            | CommError::Shutdown { ctx } => Some(ctx),
            CommError::Init(_) => None,
        }
    }
}

pub type Result<T, E = CommError> = std::result::Result<T, E>;
