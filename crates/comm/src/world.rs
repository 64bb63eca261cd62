//! Bringing the job up and down: launch environment, MPI (thread-multiple), the world group, the
//! watchdog. Without a launcher the world is a single process and MPI is never initialised.

use std::sync::Arc;
use std::time::Duration;

use crate::communicator::Communicator;
use crate::error::{CommError, Result};
use crate::group::{BackendChoice, Group};
use crate::launch::{self, LaunchEnv, Launcher};
use crate::mpi::{MpiComm, Registry};
use crate::single::SingleComm;
use crate::watchdog;

/// Default watchdog timeout (PyTorch's default for NCCL process groups is 10 minutes too).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct InitOptions {
    /// A collective that runs longer than this ends the job (env `FABBRICA_COMM_TIMEOUT`, seconds).
    pub timeout: Duration,
    /// Check before every collective that the group agrees on it (env `FABBRICA_COMM_DEBUG=1`).
    pub debug: bool,
    pub backend: BackendChoice,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions { timeout: DEFAULT_TIMEOUT, debug: false, backend: BackendChoice::Auto }
    }
}

impl InitOptions {
    /// Applies `FABBRICA_COMM_TIMEOUT` and `FABBRICA_COMM_DEBUG`, which override config values.
    pub fn with_env(mut self) -> Result<Self> {
        if let Ok(v) = std::env::var("FABBRICA_COMM_TIMEOUT") {
            let secs: f64 = v.trim().parse().ok().filter(|s: &f64| *s > 0.0).ok_or_else(|| {
                CommError::Init(format!(
                    "FABBRICA_COMM_TIMEOUT='{v}' is not a positive number of seconds; set e.g. FABBRICA_COMM_TIMEOUT=600"
                ))
            })?;
            self.timeout = Duration::from_secs_f64(secs);
        }
        if let Ok(v) = std::env::var("FABBRICA_COMM_DEBUG") {
            self.debug = match v.trim() {
                "1" | "true" | "on" | "yes" => true,
                "0" | "false" | "off" | "no" | "" => false,
                _ => {
                    return Err(CommError::Init(format!(
                        "FABBRICA_COMM_DEBUG='{v}' is not a boolean; use 1 or 0"
                    )))
                }
            };
        }
        Ok(self)
    }
}

/// The running job. Dropping it drains every communicator's queue and finalises MPI.
pub struct World {
    group: Arc<Group>,
    launch: LaunchEnv,
    registry: Arc<Registry>,
    universe: Option<::mpi::environment::Universe>,
}

impl World {
    /// The world group.
    pub fn comm(&self) -> Arc<Group> {
        self.group.clone()
    }
    pub fn rank(&self) -> usize {
        self.group.rank()
    }
    pub fn size(&self) -> usize {
        self.group.size()
    }
    pub fn launch(&self) -> &LaunchEnv {
        &self.launch
    }
    /// The rsmpi universe (None for a single process), for raw MPI baselines.
    pub fn universe(&self) -> Option<&::mpi::environment::Universe> {
        self.universe.as_ref()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.registry.shutdown_all();
        // `universe` drops next: MPI_Finalize.
    }
}

/// Starts the world from the launch environment.
pub fn init(opts: InitOptions) -> Result<World> {
    let launch = launch::detect().map_err(|e| CommError::Init(e.to_string()))?;
    init_with(launch, opts)
}

pub fn init_with(launch: LaunchEnv, opts: InitOptions) -> Result<World> {
    let registry = Arc::new(Registry::default());
    if launch.launcher == Launcher::Single {
        let host: Arc<dyn Communicator> = Arc::new(SingleComm::new("world", 0));
        return Ok(World {
            group: Arc::new(Group::new(host, opts.backend, opts.debug)),
            launch,
            registry,
            universe: None,
        });
    }
    let (universe, threading) = ::mpi::initialize_with_threading(::mpi::Threading::Multiple)
        .ok_or_else(|| CommError::Init("MPI was already initialised in this process".into()))?;
    if threading != ::mpi::Threading::Multiple {
        return Err(CommError::Init(format!(
            "the MPI library provides thread level {threading:?}, and fabbrica needs Multiple (communication runs on its own threads); use an MPI built with thread-multiple support (Open MPI >= 3, MPICH)"
        )));
    }
    let mpi_world = MpiComm::world(opts.debug, registry.clone()).map_err(CommError::Init)?;
    if mpi_world.size() != launch.world_size || mpi_world.rank() != launch.rank {
        return Err(CommError::Init(format!(
            "{} says rank {} of {}, but MPI says rank {} of {}; with srun, pass --mpi=pmix (or the PMI your MPI was built with)",
            launch.launcher,
            launch.rank,
            launch.world_size,
            mpi_world.rank(),
            mpi_world.size()
        )));
    }
    if mpi_world.size() > 1 {
        start_watchdog(&universe, mpi_world.rank(), opts.timeout)?;
    }
    let host: Arc<dyn Communicator> = Arc::new(mpi_world);
    Ok(World { group: Arc::new(Group::new(host, opts.backend, opts.debug)), launch, registry, universe: Some(universe) })
}

/// Binds the watchdog's listener and exchanges the addresses.
fn start_watchdog(universe: &::mpi::environment::Universe, rank: usize, timeout: Duration) -> Result<()> {
    use ::mpi::traits::*;
    const LEN: usize = 128;
    let (listener, addr) =
        watchdog::bind().map_err(|e| CommError::Init(format!("watchdog: cannot open a TCP port: {e}")))?;
    let world = universe.world();
    let mut mine = [0u8; LEN];
    mine[..addr.len().min(LEN)].copy_from_slice(&addr.as_bytes()[..addr.len().min(LEN)]);
    let mut all = vec![0u8; LEN * world.size() as usize];
    world.all_gather_into(&mine[..], &mut all[..]);
    let peers = all
        .chunks(LEN)
        .map(|c| String::from_utf8_lossy(&c[..c.iter().position(|&b| b == 0).unwrap_or(LEN)]).into_owned())
        .collect();
    watchdog::start(listener, rank, peers, timeout).map_err(CommError::Init)
}
