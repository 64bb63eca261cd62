//! The NCCL backend: collectives and point-to-point on CUDA tensors, one NCCL communicator per
//! group and device, created collectively the first time a CUDA tensor reaches a
//! [`Group`](crate::Group).
//!
//! - **Library**: the libnccl.so.2 that libtorch itself loaded, never whatever "libnccl.so" the
//!   system has (see `library.rs` for the measured reason); [`library_info`] says which one.
//! - **Streams**: each communicator runs NCCL on its own CUDA stream, ordered with events against
//!   libtorch's current stream on both sides, so `wait` never blocks the host (see `comm.rs`).
//! - **Setup**: rank 0's `ncclUniqueId` travels over the host communicator (MPI, or nothing in a
//!   world of one); barriers and splits go through the host communicator too.
//! - **Dtypes**: f32, bf16, f16 and i64; avg is NCCL's own `ncclAvg` (float dtypes only).
//!
//! The CUDA parts can only run where libtorch sees a GPU; [`available`] is safe and cheap to call
//! anywhere.

mod comm;
mod cuda;
mod inner;
mod library;
mod p2p;
mod poller;
mod setup;
mod work;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use cudarc::nccl::sys::{ncclDataType_t, ncclRedOp_t};

pub use comm::NcclComm;
pub use library::{library_candidates, torch_lib_dir, torch_lib_in_maps, version_string};

use crate::communicator::Communicator;
use crate::error::Result;
use crate::types::{DType, ReduceOp};

/// Whether CUDA tensors can use NCCL in this process: libtorch sees a GPU and libtorch's NCCL
/// loads. Asks libtorch first, because nothing below it may be touched without a CUDA driver.
/// Cached; cheap after the first call.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| tch::Cuda::is_available() && library::nccl().is_ok())
}

/// The NCCL library in use (canonical path) and its version code (e.g. 22809 for 2.28.9), for
/// benchmark and log headers. Needs no GPU: loading the library does not initialise it.
pub fn library_info() -> Option<(PathBuf, i32)> {
    library::nccl().ok().map(|l| (l.path.clone(), l.version))
}

/// Why NCCL did not load (what was tried), when it did not.
pub fn library_error() -> Option<String> {
    library::nccl().err()
}

/// The NCCL element type of a dtype (nccl.h's `ncclDataType_t`).
pub fn nccl_datatype(d: DType) -> ncclDataType_t {
    match d {
        DType::F32 => ncclDataType_t::ncclFloat32,
        DType::Bf16 => ncclDataType_t::ncclBfloat16,
        DType::F16 => ncclDataType_t::ncclFloat16,
        DType::I64 => ncclDataType_t::ncclInt64,
    }
}

/// The NCCL reduction of a reduce op; avg is NCCL's own (sum, then divide by the group size).
pub fn nccl_reduce_op(op: ReduceOp) -> ncclRedOp_t {
    match op {
        ReduceOp::Sum => ncclRedOp_t::ncclSum,
        ReduceOp::Avg => ncclRedOp_t::ncclAvg,
        ReduceOp::Max => ncclRedOp_t::ncclMax,
        ReduceOp::Min => ncclRedOp_t::ncclMin,
    }
}

/// Collective over `host`'s group: the NCCL communicator for CUDA device `device`.
pub(crate) fn create(host: &Arc<dyn Communicator>, device: usize, debug: bool) -> Result<Arc<NcclComm>> {
    Ok(Arc::new(NcclComm::new(host.clone(), device, debug)?))
}
