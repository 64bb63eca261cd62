//! Launch environment detection: which rank am I, how many are there, and
//! which of them share my node — read from the variables that `mpirun`,
//! `mpiexec` (Hydra) or `srun` export to every process they start.
//!
//! Everything here is pure: [`from_vars`] takes a variable lookup function, so
//! tests pass a map and never touch the process environment; [`detect`] is the
//! thin wrapper that reads the real one.
//!
//! # Which launcher
//!
//! Checked in this order, first match wins:
//!
//! 1. **Open MPI** (`mpirun`): any `OMPI_COMM_WORLD_*` variable.
//! 2. **MPICH / Intel MPI** (Hydra `mpiexec`): `PMI_RANK` or `PMI_SIZE`.
//! 3. **Slurm** (`srun`): `SLURM_PROCID` *and* a job-step id (`SLURM_STEP_ID`
//!    or `SLURM_STEPID`).
//! 4. Otherwise a **single** process: rank 0 of 1.
//!
//! MPI variables take precedence over Slurm ones because an `sbatch`
//! allocation exports `SLURM_*` to everything it runs, including an `mpirun`
//! started from the batch script (whose ranks may even inherit the `SLURM_*`
//! of the daemon step that `mpirun` used to reach other nodes).
//!
//! Slurm also sets `SLURM_PROCID=0`, `SLURM_LOCALID=0` and `SLURM_NTASKS` in
//! the batch script itself and in an `salloc` shell, where nothing else is
//! running; only an `srun` job step sets `SLURM_STEP_ID`, so without one the
//! process is treated as single (otherwise rank 0 would wait forever for
//! `SLURM_NTASKS - 1` peers that were never started).
//!
//! # `srun` without PMIx
//!
//! A rank started by `srun` finds its peers through the process-management
//! interface Slurm's MPI plugin provides: PMIx with `srun --mpi=pmix`, PMI-2
//! with `--mpi=pmi2`, none with `--mpi=none` (Slurm's default `MpiDefault`).
//! Open MPI as Debian builds it only starts under PMIx; anything else dies
//! inside `MPI_Init` with a page of text. [`check_srun_pmi`] (called before
//! MPI is initialised) turns that into one line saying what to add.

use std::fmt;

/// The program that started this process (or [`Launcher::Single`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Launcher {
    /// Open MPI's `mpirun`/`mpiexec`.
    OpenMpi,
    /// MPICH's or Intel MPI's Hydra `mpiexec`.
    Mpich,
    /// Slurm's `srun` (direct launch, one task per rank).
    Slurm,
    /// No launcher: a plain single-process run.
    Single,
}

impl fmt::Display for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Launcher::OpenMpi => "Open MPI (mpirun)",
            Launcher::Mpich => "MPICH/Hydra (mpiexec)",
            Launcher::Slurm => "Slurm (srun)",
            Launcher::Single => "single process",
        })
    }
}

/// Where this process sits in the job, as told by its launcher.
///
/// Invariants (checked by [`from_vars`]): `rank < world_size`,
/// `local_rank < local_world_size <= world_size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Number of ranks in the job.
    pub world_size: usize,
    /// Rank among the processes on this node, `0..local_world_size`; selects
    /// the GPU (see [`cuda_device_for`]).
    pub local_rank: usize,
    /// Number of ranks on this node.
    pub local_world_size: usize,
    /// Who started the job.
    pub launcher: Launcher,
}

impl LaunchEnv {
    /// Rank 0 of a one-process job.
    pub fn single() -> Self {
        Self { rank: 0, world_size: 1, local_rank: 0, local_world_size: 1, launcher: Launcher::Single }
    }

    /// Whether there is more than one rank.
    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }
}

impl fmt::Display for LaunchEnv {
    /// e.g. `rank 5/8 (local 1/4) via Slurm (srun)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rank {}/{} (local {}/{}) via {}", self.rank, self.world_size, self.local_rank, self.local_world_size, self.launcher)
    }
}

/// Why the launch environment is unusable. Each message is one line naming
/// the variable(s) involved.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum LaunchError {
    /// A variable does not hold a non-negative integer.
    #[error("{var}='{value}' is not a number: {launcher} should set it to a non-negative integer")]
    NotANumber { var: &'static str, value: String, launcher: Launcher },

    /// A launcher was recognised but one of its variables is absent.
    #[error(
        "{var} is not set although {present} is: the {launcher} launch environment is incomplete \
         (start the job with the launcher itself, or unset {present} to run as a single process)"
    )]
    Missing { var: &'static str, present: &'static str, launcher: Launcher },

    /// A size (world or node-local) is 0.
    #[error("{source_desc}: the {what} must be at least 1")]
    ZeroSize { source_desc: String, what: &'static str },

    /// A rank is not below the corresponding size.
    #[error("{var}={value} is out of range: it must be below {limit} ({limit_desc})")]
    OutOfRange { var: &'static str, value: usize, limit: usize, limit_desc: String },

    /// More ranks on this node than in the whole job.
    #[error("{local_desc} ranks on this node exceed the {world_desc} ranks of the whole job")]
    LocalExceedsWorld { local_desc: String, world_desc: String },

    /// A Slurm tasks-per-node list that cannot be parsed.
    #[error("{var}='{value}' is not a Slurm tasks-per-node list (expected e.g. '4', '4(x2)' or '2(x3),1')")]
    BadTasksPerNode { var: &'static str, value: String },

    /// `SLURM_NODEID` points past the end of the tasks-per-node list.
    #[error("SLURM_NODEID={node} is out of range for {var}='{value}', which describes only {nodes} node(s)")]
    NodeOutOfRange { node: usize, var: &'static str, value: String, nodes: usize },

    /// An `srun` task without the PMI its MPI library needs (see [`check_srun_pmi`]).
    #[error(
        "srun started this rank {got}, but {mpi}: launch with \
         `srun --mpi=pmix`, or set MpiDefault=pmix in slurm.conf or SLURM_MPI_TYPE=pmix in the \
         environment of srun"
    )]
    SrunWithoutPmix {
        /// How the task was started, e.g. `without a PMI (srun --mpi=none, Slurm's default)`.
        got: &'static str,
        /// The MPI library and what it needs, e.g. `Open MPI starts only with PMIx`.
        mpi: &'static str,
    },

    /// No GPU is visible at all.
    #[error(
        "no CUDA devices are visible to local rank {local_rank}: check CUDA_VISIBLE_DEVICES \
         and that this node has GPUs"
    )]
    NoCudaDevices { local_rank: usize },

    /// More ranks on the node than visible GPUs.
    #[error(
        "local rank {local_rank} has no GPU of its own: only {visible} CUDA device(s) are visible \
         on this node and NCCL cannot share a GPU between ranks; launch at most {visible} ranks per node"
    )]
    NotEnoughDevices { local_rank: usize, visible: usize },
}

// Open MPI.
const OMPI_RANK: &str = "OMPI_COMM_WORLD_RANK";
const OMPI_SIZE: &str = "OMPI_COMM_WORLD_SIZE";
const OMPI_LOCAL_RANK: &str = "OMPI_COMM_WORLD_LOCAL_RANK";
const OMPI_LOCAL_SIZE: &str = "OMPI_COMM_WORLD_LOCAL_SIZE";
// MPICH / Intel MPI (Hydra).
const PMI_RANK: &str = "PMI_RANK";
const PMI_SIZE: &str = "PMI_SIZE";
const MPI_LOCALRANKID: &str = "MPI_LOCALRANKID";
const MPI_LOCALNRANKS: &str = "MPI_LOCALNRANKS";
const PMI_LOCAL_RANK: &str = "PMI_LOCAL_RANK";
const PMI_LOCAL_SIZE: &str = "PMI_LOCAL_SIZE";
// PMI-2 (Slurm's `--mpi=pmi2` plugin) and PMIx (`--mpi=pmix`, also Open MPI's own launcher).
const PMI_FD: &str = "PMI_FD";
const PMIX_RANK: &str = "PMIX_RANK";
const PMIX_NAMESPACE: &str = "PMIX_NAMESPACE";
// Slurm.
const SLURM_PROCID: &str = "SLURM_PROCID";
const SLURM_STEP_ID: &str = "SLURM_STEP_ID";
const SLURM_STEPID: &str = "SLURM_STEPID";
const SLURM_STEP_NUM_TASKS: &str = "SLURM_STEP_NUM_TASKS";
const SLURM_NTASKS: &str = "SLURM_NTASKS";
const SLURM_LOCALID: &str = "SLURM_LOCALID";
const SLURM_NODEID: &str = "SLURM_NODEID";
const SLURM_STEP_TASKS_PER_NODE: &str = "SLURM_STEP_TASKS_PER_NODE";
const SLURM_TASKS_PER_NODE: &str = "SLURM_TASKS_PER_NODE";
const SLURM_NTASKS_PER_NODE: &str = "SLURM_NTASKS_PER_NODE";

/// Reads the launch environment of this process from `std::env`.
pub fn detect() -> Result<LaunchEnv, LaunchError> {
    // Non-UTF-8 values are kept (lossily) so they fail as "not a number"
    // instead of silently looking unset.
    from_vars(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
}

/// Which MPI library this program is linked with, as far as starting under
/// `srun` is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MpiLibrary {
    /// Open MPI: under `srun` it needs PMIx (Debian's is built without
    /// Slurm's PMI-1/PMI-2 support).
    OpenMpi,
    /// MPICH, Intel MPI, MVAPICH...: PMI-2 or PMIx.
    Other,
}

impl MpiLibrary {
    /// Asks the linked MPI library (`MPI_Get_library_version`, allowed before
    /// `MPI_Init`).
    pub fn linked() -> Self {
        match ::mpi::environment::library_version() {
            Ok(v) if v.contains("Open MPI") => MpiLibrary::OpenMpi,
            _ => MpiLibrary::Other,
        }
    }

    /// The library and the PMI it needs under `srun`, for messages.
    fn needs(self) -> &'static str {
        match self {
            MpiLibrary::OpenMpi => "Open MPI starts only with PMIx",
            MpiLibrary::Other => "MPI needs PMIx or PMI-2",
        }
    }
}

/// Refuses, before `MPI_Init`, an `srun` task that its MPI library cannot
/// start from (see [`pmi_problem`]), reading the process environment.
pub fn check_srun_pmi() -> Result<(), LaunchError> {
    let get = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
    // Only an srun task pays for asking the library.
    if !(Vars { get: &get }).is_srun_step() {
        return Ok(());
    }
    match pmi_problem(get, MpiLibrary::linked()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Why an `srun` task cannot start MPI, or `None` when it can (or when this
/// is no `srun` task at all).
///
/// * Not an `srun` step (no `SLURM_STEP_ID`/`SLURM_STEPID` with
///   `SLURM_PROCID`: a batch script, an `salloc` shell), or started by
///   `mpirun` (`OMPI_COMM_WORLD_*`, also inside an allocation): fine.
/// * PMIx (`PMIX_RANK` or `PMIX_NAMESPACE`): fine.
/// * PMI-2 (`PMI_FD` or `PMI_RANK`): fine except for Open MPI.
/// * No PMI at all (`--mpi=none`, Slurm's default): every MPI would start as
///   a singleton, so this is refused whatever the library.
pub fn pmi_problem(get: impl Fn(&str) -> Option<String>, mpi: MpiLibrary) -> Option<LaunchError> {
    let vars = Vars { get: &get };
    if !vars.is_srun_step() {
        return None;
    }
    if vars.first_set(&[OMPI_RANK, OMPI_SIZE, OMPI_LOCAL_RANK, OMPI_LOCAL_SIZE, PMIX_RANK, PMIX_NAMESPACE]).is_some() {
        return None;
    }
    let got = if vars.first_set(&[PMI_FD, PMI_RANK]).is_some() {
        if mpi != MpiLibrary::OpenMpi {
            return None;
        }
        "with PMI-2 (srun --mpi=pmi2)"
    } else {
        "without a PMI (srun --mpi=none, Slurm's default)"
    };
    Some(LaunchError::SrunWithoutPmix { got, mpi: mpi.needs() })
}

/// Works out the launch environment from a variable lookup (`get(name)` is
/// `Some(value)` when the variable is set). See the [module docs](self) for
/// which launcher wins.
///
/// Per launcher:
///
/// * **Open MPI**: `OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}`, all
///   required (`mpirun` always sets all four).
/// * **MPICH / Intel MPI**: `PMI_RANK`, `PMI_SIZE`; node-local values from
///   `MPI_LOCALRANKID`/`MPI_LOCALNRANKS` (set by Hydra), else
///   `PMI_LOCAL_RANK`/`PMI_LOCAL_SIZE`. If neither pair is present:
///   - inside an `srun` step (Slurm's PMI-2 plugin also exports `PMI_RANK`),
///     the job is read as a Slurm launch, whose variables carry the
///     node-local information;
///   - otherwise the job is assumed to fit on one node (`local_rank = rank`,
///     `local_world_size = world_size`). On several nodes this makes
///     [`cuda_device_for`] fail loudly rather than pick a wrong GPU.
/// * **Slurm**: `SLURM_PROCID` (rank), `SLURM_STEP_NUM_TASKS` else
///   `SLURM_NTASKS` (world), `SLURM_LOCALID` (local rank). Tasks on this
///   node: the entry for `SLURM_NODEID` (0 if unset) in
///   `SLURM_STEP_TASKS_PER_NODE`, else `SLURM_TASKS_PER_NODE` (compressed
///   lists like `4(x2)` or `2,1`), else `SLURM_NTASKS_PER_NODE`. The step
///   values come first because job-level ones describe the allocation, which
///   may differ from what this `srun` started.
pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<LaunchEnv, LaunchError> {
    let vars = Vars { get: &get };

    if let Some(present) = vars.first_set(&[OMPI_RANK, OMPI_SIZE, OMPI_LOCAL_RANK, OMPI_LOCAL_SIZE]) {
        return open_mpi(&vars, present);
    }
    if let Some(present) = vars.first_set(&[PMI_RANK, PMI_SIZE]) {
        return mpich(&vars, present);
    }
    if vars.is_srun_step() {
        return slurm(&vars);
    }
    Ok(LaunchEnv::single())
}

/// Picks the CUDA device for a rank: device `local_rank` of the
/// `visible_devices` this process can see, or the only one it sees (`srun
/// --gpus-per-task=1`, or `CUDA_VISIBLE_DEVICES` set per rank). The one rule for
/// the trainer, the benchmarks and the selftest.
///
/// Wrapping around (`local_rank % visible_devices`) would put two ranks on one
/// GPU when a node runs more ranks than it has GPUs, which NCCL rejects (or,
/// worse, deadlocks on); that case is an error instead. Ranks that each see a
/// single, possibly shared, GPU take it: MPI with host staging runs so, and NCCL
/// says at connect time that it refuses two ranks on one device.
pub fn cuda_device_for(local_rank: usize, visible_devices: usize) -> Result<usize, LaunchError> {
    match visible_devices {
        0 => Err(LaunchError::NoCudaDevices { local_rank }),
        1 => Ok(0),
        v if local_rank >= v => Err(LaunchError::NotEnoughDevices { local_rank, visible: v }),
        _ => Ok(local_rank),
    }
}

/// A number read from the environment, with a description of where it came
/// from for error messages (e.g. `OMPI_COMM_WORLD_SIZE=4`).
struct Num {
    var: &'static str,
    value: usize,
    desc: String,
}

impl Num {
    fn plain(var: &'static str, value: usize) -> Self {
        Self { var, value, desc: format!("{var}={value}") }
    }
}

/// The variable lookup plus parsing helpers.
struct Vars<'a> {
    get: &'a dyn Fn(&str) -> Option<String>,
}

impl Vars<'_> {
    fn is_set(&self, name: &str) -> bool {
        (self.get)(name).is_some()
    }

    fn first_set(&self, names: &[&'static str]) -> Option<&'static str> {
        names.iter().copied().find(|n| self.is_set(n))
    }

    /// Inside a task started by `srun` (not the batch script or an `salloc`
    /// shell, which also have `SLURM_PROCID=0`).
    fn is_srun_step(&self) -> bool {
        self.is_set(SLURM_PROCID) && (self.is_set(SLURM_STEP_ID) || self.is_set(SLURM_STEPID))
    }

    /// `Ok(None)` when unset, an error when set but not a number.
    fn num(&self, var: &'static str, launcher: Launcher) -> Result<Option<Num>, LaunchError> {
        match (self.get)(var) {
            None => Ok(None),
            Some(raw) => match raw.trim().parse::<usize>() {
                Ok(value) => Ok(Some(Num::plain(var, value))),
                Err(_) => Err(LaunchError::NotANumber { var, value: shown(&raw), launcher }),
            },
        }
    }

    /// Like [`Vars::num`], but absence is an error blaming `present`.
    fn require(&self, var: &'static str, present: &'static str, launcher: Launcher) -> Result<Num, LaunchError> {
        self.num(var, launcher)?.ok_or(LaunchError::Missing { var, present, launcher })
    }

    /// A node-local (rank, size) pair, both or neither.
    fn local_pair(&self, rank_var: &'static str, size_var: &'static str, launcher: Launcher) -> Result<Option<(Num, Num)>, LaunchError> {
        match (self.num(rank_var, launcher)?, self.num(size_var, launcher)?) {
            (Some(r), Some(s)) => Ok(Some((r, s))),
            (None, None) => Ok(None),
            (Some(_), None) => Err(LaunchError::Missing { var: size_var, present: rank_var, launcher }),
            (None, Some(_)) => Err(LaunchError::Missing { var: rank_var, present: size_var, launcher }),
        }
    }
}

fn open_mpi(vars: &Vars, present: &'static str) -> Result<LaunchEnv, LaunchError> {
    let l = Launcher::OpenMpi;
    let rank = vars.require(OMPI_RANK, present, l)?;
    let world = vars.require(OMPI_SIZE, present, l)?;
    let local_rank = vars.require(OMPI_LOCAL_RANK, present, l)?;
    let local_size = vars.require(OMPI_LOCAL_SIZE, present, l)?;
    finish(l, rank, world, local_rank, local_size)
}

fn mpich(vars: &Vars, present: &'static str) -> Result<LaunchEnv, LaunchError> {
    let l = Launcher::Mpich;
    let rank = vars.require(PMI_RANK, present, l)?;
    let world = vars.require(PMI_SIZE, present, l)?;
    let local = match vars.local_pair(MPI_LOCALRANKID, MPI_LOCALNRANKS, l)? {
        Some(pair) => Some(pair),
        None => vars.local_pair(PMI_LOCAL_RANK, PMI_LOCAL_SIZE, l)?,
    };
    let (local_rank, local_size) = match local {
        Some(pair) => pair,
        // `srun --mpi=pmi2`: Slurm's PMI plugin exports PMI_RANK/PMI_SIZE but
        // not Hydra's node-local variables; Slurm's own variables have them.
        None if vars.is_srun_step() => return slurm(vars),
        // No node-local information at all: assume a single node.
        None => {
            let local_rank =
                Num { var: PMI_RANK, value: rank.value, desc: format!("{PMI_RANK}={} (no {MPI_LOCALRANKID}: assuming one node)", rank.value) };
            let local_size =
                Num { var: PMI_SIZE, value: world.value, desc: format!("{PMI_SIZE}={} (no {MPI_LOCALNRANKS}: assuming one node)", world.value) };
            (local_rank, local_size)
        }
    };
    finish(l, rank, world, local_rank, local_size)
}

fn slurm(vars: &Vars) -> Result<LaunchEnv, LaunchError> {
    let l = Launcher::Slurm;
    let rank = vars.require(SLURM_PROCID, SLURM_STEP_ID, l)?;
    let world = match vars.num(SLURM_STEP_NUM_TASKS, l)? {
        Some(n) => n,
        None => vars.require(SLURM_NTASKS, SLURM_PROCID, l)?,
    };
    let local_rank = vars.require(SLURM_LOCALID, SLURM_PROCID, l)?;
    let local_size = slurm_local_size(vars)?;
    finish(l, rank, world, local_rank, local_size)
}

/// Number of tasks of this step on this node.
fn slurm_local_size(vars: &Vars) -> Result<Num, LaunchError> {
    let l = Launcher::Slurm;
    let node = vars.num(SLURM_NODEID, l)?.map_or(0, |n| n.value);
    for var in [SLURM_STEP_TASKS_PER_NODE, SLURM_TASKS_PER_NODE] {
        let Some(list) = (vars.get)(var) else {
            continue;
        };
        let entries = parse_tasks_per_node(&list).ok_or_else(|| LaunchError::BadTasksPerNode { var, value: shown(&list) })?;
        let nodes = entries.iter().fold(0usize, |n, &(_, repeat)| n.saturating_add(repeat));
        let value = tasks_on_node(&entries, node).ok_or_else(|| LaunchError::NodeOutOfRange { node, var, value: list.clone(), nodes })?;
        return Ok(Num { var, value, desc: format!("{var}='{list}' ({value} on node {node})") });
    }
    vars.num(SLURM_NTASKS_PER_NODE, l)?.ok_or(LaunchError::Missing {
        var: "SLURM_STEP_TASKS_PER_NODE (or SLURM_TASKS_PER_NODE, SLURM_NTASKS_PER_NODE)",
        present: SLURM_PROCID,
        launcher: l,
    })
}

/// A variable's value as an error message shows it: at most 80 characters, control characters
/// escaped (a newline in it would break the message's one line).
fn shown(v: &str) -> String {
    let cut: String = v.chars().take(80).flat_map(char::escape_default).collect();
    if v.chars().count() > 80 {
        format!("{cut}...")
    } else {
        cut
    }
}

/// Parses Slurm's compressed tasks-per-node list: comma-separated entries
/// `N` (one node with N tasks) or `N(xM)` (M consecutive nodes with N tasks
/// each), e.g. `2(x3),1` = nodes with 2, 2, 2 and 1 tasks. Returns
/// `(tasks, repeat)` pairs, or `None` when malformed.
fn parse_tasks_per_node(list: &str) -> Option<Vec<(usize, usize)>> {
    list.split(',')
        .map(|entry| {
            let entry = entry.trim();
            match entry.split_once("(x") {
                None => Some((entry.parse().ok()?, 1)),
                Some((tasks, rest)) => {
                    let repeat: usize = rest.strip_suffix(')')?.parse().ok()?;
                    (repeat > 0).then_some(())?;
                    Some((tasks.parse().ok()?, repeat))
                }
            }
        })
        .collect()
}

/// The task count of node `node` in a parsed list, `None` past its end.
fn tasks_on_node(entries: &[(usize, usize)], mut node: usize) -> Option<usize> {
    for &(tasks, repeat) in entries {
        if node < repeat {
            return Some(tasks);
        }
        node -= repeat;
    }
    None
}

/// Checks the invariants of [`LaunchEnv`] and builds it.
fn finish(launcher: Launcher, rank: Num, world: Num, local_rank: Num, local_size: Num) -> Result<LaunchEnv, LaunchError> {
    if world.value == 0 {
        return Err(LaunchError::ZeroSize { source_desc: world.desc, what: "world size" });
    }
    if local_size.value == 0 {
        return Err(LaunchError::ZeroSize { source_desc: local_size.desc, what: "number of ranks on this node" });
    }
    if rank.value >= world.value {
        return Err(LaunchError::OutOfRange { var: rank.var, value: rank.value, limit: world.value, limit_desc: world.desc });
    }
    if local_rank.value >= local_size.value {
        return Err(LaunchError::OutOfRange { var: local_rank.var, value: local_rank.value, limit: local_size.value, limit_desc: local_size.desc });
    }
    if local_size.value > world.value {
        return Err(LaunchError::LocalExceedsWorld { local_desc: local_size.desc, world_desc: world.desc });
    }
    Ok(LaunchEnv { rank: rank.value, world_size: world.value, local_rank: local_rank.value, local_world_size: local_size.value, launcher })
}

#[cfg(test)]
mod tests;
