//! `Group`: the communicator the trainer holds. It routes each operation by the tensor's device
//! and the configured backend: CUDA tensors to NCCL (created on first use, collectively), CPU
//! tensors (and CUDA tensors when `backend = mpi`) to the host backend (MPI, or a group of one).

use std::sync::{Arc, Mutex};

use tch::{Device, Tensor};

use crate::agree;
use crate::communicator::Communicator;
use crate::error::{CommError, OpContext, Result};
use crate::nccl::{self, NcclComm};
use crate::types::{Backend, OpKind, ReduceOp};
use crate::work::Work;

/// Which backend moves CUDA tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// NCCL for CUDA tensors when it loads, else MPI with host staging; MPI for CPU tensors.
    Auto,
    /// MPI for everything.
    Mpi,
    /// NCCL, and an error for CPU tensors or when NCCL is unavailable.
    Nccl,
}

impl BackendChoice {
    /// Every choice, in the order the help lists them.
    pub const ALL: [BackendChoice; 3] = [BackendChoice::Auto, BackendChoice::Mpi, BackendChoice::Nccl];

    /// The config spelling (`comm.backend`).
    pub fn as_str(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Mpi => "mpi",
            BackendChoice::Nccl => "nccl",
        }
    }
}

impl std::fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for BackendChoice {
    type Err = &'static str;
    fn from_str(s: &str) -> std::result::Result<Self, &'static str> {
        BackendChoice::ALL
            .into_iter()
            .find(|b| b.as_str() == s)
            .ok_or("use `auto` (NCCL for CUDA tensors when it loads, MPI otherwise), `mpi` or `nccl`")
    }
}

/// What the group decided for CUDA tensors, at their first use (or `connect_cuda`).
enum CudaPath {
    Undecided,
    /// `auto` found NCCL unusable on some rank: host staging, on every rank alike.
    Host,
    /// The NCCL communicator and the CUDA device it was made for.
    Nccl(usize, Arc<NcclComm>),
}

pub struct Group {
    host: Arc<dyn Communicator>,
    cuda: Mutex<CudaPath>,
    choice: BackendChoice,
    debug: bool,
}

impl Group {
    pub(crate) fn new(host: Arc<dyn Communicator>, choice: BackendChoice, debug: bool) -> Group {
        Group { host, cuda: Mutex::new(CudaPath::Undecided), choice, debug }
    }

    /// The host (CPU) communicator.
    pub fn host(&self) -> &Arc<dyn Communicator> {
        &self.host
    }

    fn error(&self, op: OpKind, what: String) -> CommError {
        CommError::InvalidArgument {
            ctx: OpContext {
                op,
                seq: 0,
                group: self.host.name().into(),
                backend: self.backend(),
                rank: self.host.rank(),
                size: self.host.size(),
                world_rank: self.host.members()[self.host.rank()],
            },
            what,
        }
    }

    /// The communicator that moves `t`.
    pub fn route(&self, t: &Tensor, op: OpKind) -> Result<Arc<dyn Communicator>> {
        match (t.device(), self.choice) {
            (Device::Cuda(_), BackendChoice::Mpi) => Ok(self.host.clone()),
            (Device::Cuda(i), _) => Ok(self.nccl_for(i, op)?.unwrap_or_else(|| self.host.clone())),
            (_, BackendChoice::Nccl) => {
                Err(self.error(op, "comm.backend = nccl moves CUDA tensors only and this tensor is on the CPU; use comm.backend = auto".into()))
            }
            _ => Ok(self.host.clone()),
        }
    }

    /// Creates now, collectively, the NCCL communicator that CUDA tensors on `cuda:device` will
    /// use, instead of at the group's first CUDA operation. Every member calls it, each with its
    /// own device. Returns whether CUDA tensors go through NCCL (false: `backend = mpi`, or `auto`
    /// without a usable NCCL, where they are staged through the host communicator).
    ///
    /// What this buys: setup failures (a wrong device, an NCCL that will not initialise) surface
    /// before training starts rather than inside the first backward, and the first step is not
    /// slowed by NCCL's bootstrap. Pipeline stages that only exchange point-to-point messages on a
    /// larger group need it, because lazy creation needs every member to reach a CUDA operation.
    pub fn connect_cuda(&self, device: usize) -> Result<bool> {
        if self.choice == BackendChoice::Mpi {
            return Ok(false);
        }
        Ok(self.nccl_for(device, OpKind::Connect)?.is_some())
    }

    /// The NCCL communicator for `cuda:device`, created on first call; `None` when `auto` found
    /// NCCL unusable. Collective the first time: with `auto` the group votes, so that every rank
    /// takes the same path even where only some of them can load NCCL.
    fn nccl_for(&self, device: usize, op: OpKind) -> Result<Option<Arc<dyn Communicator>>> {
        let mut path = self.cuda.lock().unwrap_or_else(|p| p.into_inner());
        match &*path {
            CudaPath::Nccl(dev, c) if *dev == device => return Ok(Some(c.clone())),
            CudaPath::Nccl(dev, _) => {
                return Err(self.error(
                    op,
                    format!("this group's NCCL communicator is on cuda:{dev} but the tensor is on cuda:{device}; keep one device per rank"),
                ))
            }
            CudaPath::Host => return Ok(None),
            CudaPath::Undecided => {}
        }
        if self.choice == BackendChoice::Auto {
            let without = agree::ranks_voting_no(&*self.host, nccl::available()).map_err(|e| self.error(op, e))?;
            if !without.is_empty() {
                *path = CudaPath::Host;
                return Ok(None);
            }
        }
        let c = nccl::create(&self.host, device, self.debug)?;
        *path = CudaPath::Nccl(device, c.clone());
        Ok(Some(c))
    }

    /// Hands queued NCCL sends and receives to NCCL: before an operation that goes to the host
    /// communicator (barrier, split), which a peer may be waiting in only after receiving them.
    fn flush_nccl(&self) {
        if let CudaPath::Nccl(_, c) = &*self.cuda.lock().unwrap_or_else(|p| p.into_inner()) {
            c.flush();
        }
    }
}

impl Communicator for Group {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn size(&self) -> usize {
        self.host.size()
    }
    fn name(&self) -> &str {
        self.host.name()
    }
    fn backend(&self) -> Backend {
        self.host.backend()
    }
    fn members(&self) -> &[usize] {
        self.host.members()
    }
    fn all_reduce_async(&self, t: &Tensor, op: ReduceOp) -> Result<Work> {
        self.route(t, OpKind::AllReduce)?.all_reduce_async(t, op)
    }
    fn broadcast_async(&self, t: &Tensor, root: usize) -> Result<Work> {
        self.route(t, OpKind::Broadcast)?.broadcast_async(t, root)
    }
    fn all_gather_async(&self, output: &Tensor, input: &Tensor) -> Result<Work> {
        self.route(input, OpKind::AllGather)?.all_gather_async(output, input)
    }
    fn reduce_scatter_async(&self, output: &Tensor, input: &Tensor, op: ReduceOp) -> Result<Work> {
        self.route(input, OpKind::ReduceScatter)?.reduce_scatter_async(output, input, op)
    }
    fn send_async(&self, t: &Tensor, dst: usize) -> Result<Work> {
        self.route(t, OpKind::Send)?.send_async(t, dst)
    }
    fn recv_async(&self, t: &Tensor, src: usize) -> Result<Work> {
        self.route(t, OpKind::Recv)?.recv_async(t, src)
    }
    fn barrier_async(&self) -> Result<Work> {
        self.flush_nccl();
        self.host.barrier_async()
    }
    fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<()> {
        self.route(t, OpKind::AllReduce)?.all_reduce(t, op)
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        self.route(t, OpKind::Broadcast)?.broadcast(t, root)
    }
    fn all_gather(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        self.route(input, OpKind::AllGather)?.all_gather(output, input)
    }
    fn reduce_scatter(&self, output: &Tensor, input: &Tensor, op: ReduceOp) -> Result<()> {
        self.route(input, OpKind::ReduceScatter)?.reduce_scatter(output, input, op)
    }
    fn barrier(&self) -> Result<()> {
        self.flush_nccl();
        self.host.barrier()
    }
    fn split(&self, color: Option<u32>, key: u32, name: &str) -> Result<Option<Arc<dyn Communicator>>> {
        self.flush_nccl();
        Ok(self.host.split(color, key, name)?.map(|h| Arc::new(Group::new(h, self.choice, self.debug)) as Arc<dyn Communicator>))
    }
}
