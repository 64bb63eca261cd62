//! Small value types shared by every backend.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use tch::Kind;

/// How values from the ranks are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    /// Sum, then divide by the group size (floating-point dtypes only).
    Avg,
    Max,
    Min,
}

impl ReduceOp {
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
        }
    }
    pub(crate) fn code(self) -> i64 {
        match self {
            ReduceOp::Sum => 1,
            ReduceOp::Avg => 2,
            ReduceOp::Max => 3,
            ReduceOp::Min => 4,
        }
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which library moves the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    Mpi,
    Nccl,
    /// A world of one process: every collective is a local copy.
    Single,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Mpi => "mpi",
            Backend::Nccl => "nccl",
            Backend::Single => "single",
        })
    }
}

/// The operations, for error messages, the watchdog and the mismatch check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    AllReduce,
    Broadcast,
    AllGather,
    ReduceScatter,
    Send,
    Recv,
    Barrier,
    Split,
    /// Creating a group's NCCL communicator ahead of its first CUDA operation.
    Connect,
}

impl OpKind {
    pub fn name(self) -> &'static str {
        match self {
            OpKind::AllReduce => "all_reduce",
            OpKind::Broadcast => "broadcast",
            OpKind::AllGather => "all_gather",
            OpKind::ReduceScatter => "reduce_scatter",
            OpKind::Send => "send",
            OpKind::Recv => "recv",
            OpKind::Barrier => "barrier",
            OpKind::Split => "split",
            OpKind::Connect => "connect",
        }
    }
    pub(crate) fn code(self) -> i64 {
        self as i64 + 1
    }
    pub(crate) fn from_code(c: i64) -> Option<OpKind> {
        use OpKind::*;
        [AllReduce, Broadcast, AllGather, ReduceScatter, Send, Recv, Barrier, Split, Connect].into_iter().find(|k| k.code() == c)
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The element types a collective accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    Bf16,
    F16,
    I64,
}

impl DType {
    pub fn from_kind(kind: Kind) -> Option<DType> {
        match kind {
            Kind::Float => Some(DType::F32),
            Kind::BFloat16 => Some(DType::Bf16),
            Kind::Half => Some(DType::F16),
            Kind::Int64 => Some(DType::I64),
            _ => None,
        }
    }
    pub fn kind(self) -> Kind {
        match self {
            DType::F32 => Kind::Float,
            DType::Bf16 => Kind::BFloat16,
            DType::F16 => Kind::Half,
            DType::I64 => Kind::Int64,
        }
    }
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
            DType::I64 => 8,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::I64 => "i64",
        }
    }
    pub fn is_float(self) -> bool {
        !matches!(self, DType::I64)
    }
    pub(crate) fn code(self) -> i64 {
        self as i64 + 1
    }
    pub(crate) fn from_code(c: i64) -> Option<DType> {
        [DType::F32, DType::Bf16, DType::F16, DType::I64].into_iter().find(|d| d.code() == c)
    }
    /// Parses the names used on command lines and in config files.
    pub fn parse(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" | "float" => Some(DType::F32),
            "bf16" | "bfloat16" => Some(DType::Bf16),
            "f16" | "fp16" | "float16" | "half" => Some(DType::F16),
            "i64" | "int64" | "long" => Some(DType::I64),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A group's operation counters, collectives and point-to-point apart (p2p involves two ranks, a
/// collective all of them, so each stream is numbered alike on the ranks that take part). A
/// number is read ([`peek`](Self::peek)) for the messages of an operation's argument checks and
/// taken ([`take`](Self::take)) only once they pass: a call refused on one rank is not counted
/// there, so the numbers the watchdog and the debug check compare are those of the calls that
/// reached the group.
#[derive(Default)]
pub(crate) struct OpCounter {
    collective: AtomicU64,
    p2p: AtomicU64,
}

impl OpCounter {
    fn of(&self, op: OpKind) -> &AtomicU64 {
        match op {
            OpKind::Send | OpKind::Recv => &self.p2p,
            _ => &self.collective,
        }
    }

    /// The number the next operation of kind `op` will take.
    pub(crate) fn peek(&self, op: OpKind) -> u64 {
        self.of(op).load(Ordering::Relaxed) + 1
    }

    /// Takes the next number for an operation of kind `op`.
    pub(crate) fn take(&self, op: OpKind) -> u64 {
        self.of(op).fetch_add(1, Ordering::Relaxed) + 1
    }
}
