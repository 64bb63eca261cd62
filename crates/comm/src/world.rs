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
        // var_os: a value that is not UTF-8 is a mistake to report, not an unset variable.
        if let Some(v) = std::env::var_os("FABBRICA_COMM_TIMEOUT") {
            self.timeout = parse_timeout(&v.to_string_lossy())?;
        }
        if let Some(v) = std::env::var_os("FABBRICA_COMM_DEBUG") {
            self.debug = parse_debug(&v.to_string_lossy())?;
        }
        Ok(self)
    }
}

/// Shortest watchdog timeout, in seconds (`FABBRICA_COMM_TIMEOUT`, `comm.timeout_s`).
pub const MIN_TIMEOUT_S: f64 = 0.001;
/// Longest watchdog timeout, in seconds: one week.
pub const MAX_TIMEOUT_S: f64 = 604_800.0;

/// A variable's value for a message: in single quotes, on one line (control characters escaped),
/// long text cut.
fn quoted(v: &str) -> String {
    let mut out = String::from("'");
    for c in v.chars().take(64) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if v.chars().nth(64).is_some() {
        out.push_str("...");
    }
    out.push('\'');
    out
}

/// Parses a `FABBRICA_COMM_TIMEOUT` value: seconds in [`MIN_TIMEOUT_S`, `MAX_TIMEOUT_S`].
pub fn parse_timeout(v: &str) -> Result<Duration> {
    let range = MIN_TIMEOUT_S..=MAX_TIMEOUT_S;
    match v.trim().parse::<f64>() {
        Ok(secs) if range.contains(&secs) => Ok(Duration::from_secs_f64(secs)),
        Ok(_) => Err(CommError::Init(format!(
            "FABBRICA_COMM_TIMEOUT={} is out of range: set seconds between {MIN_TIMEOUT_S} and {MAX_TIMEOUT_S} (one week), e.g. FABBRICA_COMM_TIMEOUT=600",
            quoted(v)
        ))),
        Err(_) => Err(CommError::Init(format!(
            "FABBRICA_COMM_TIMEOUT={} is not a positive number of seconds: set e.g. FABBRICA_COMM_TIMEOUT=600 (between {MIN_TIMEOUT_S} and {MAX_TIMEOUT_S}, one week)",
            quoted(v)
        ))),
    }
}

/// Parses a `FABBRICA_COMM_DEBUG` value: `1`/`true`/`on`/`yes` or `0`/`false`/`off`/`no`/empty.
pub fn parse_debug(v: &str) -> Result<bool> {
    match v.trim() {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" | "" => Ok(false),
        _ => Err(CommError::Init(format!("FABBRICA_COMM_DEBUG={} is not a boolean: set FABBRICA_COMM_DEBUG=1 or FABBRICA_COMM_DEBUG=0", quoted(v)))),
    }
}

/// The running job. Dropping it drains every communicator's queue and finalises MPI.
pub struct World {
    group: Arc<Group>,
    launch: LaunchEnv,
    registry: Arc<Registry>,
    universe: Option<::mpi::environment::Universe>,
    debug: bool,
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
    /// Debug mode as every rank of the world runs it (on everywhere if any rank asked for it).
    pub fn debug(&self) -> bool {
        self.debug
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
    // Before MPI_Init, which under `srun` without PMIx aborts with a page of text.
    launch::check_srun_pmi().map_err(|e| CommError::Init(e.to_string()))?;
    init_with(launch, opts)
}

pub fn init_with(launch: LaunchEnv, opts: InitOptions) -> Result<World> {
    let registry = Arc::new(Registry::default());
    if launch.launcher == Launcher::Single {
        let host: Arc<dyn Communicator> = Arc::new(SingleComm::new("world", 0));
        return Ok(World { group: Arc::new(Group::new(host, opts.backend, opts.debug)), launch, registry, universe: None, debug: opts.debug });
    }
    let (universe, threading) = ::mpi::initialize_with_threading(::mpi::Threading::Multiple)
        .ok_or_else(|| CommError::Init("MPI was already initialised in this process".into()))?;
    if threading != ::mpi::Threading::Multiple {
        return Err(CommError::Init(format!(
            "the MPI library provides thread level {threading:?}, and fabbrica needs Multiple (communication runs on its own threads); use an MPI built with thread-multiple support (Open MPI >= 3, MPICH)"
        )));
    }
    // Debug mode changes which calls each rank makes (the mismatch check is a collective of its
    // own): ranks that disagree on it would hang at the first collective. Any rank's asking
    // (config or FABBRICA_COMM_DEBUG) turns it on everywhere.
    let debug = {
        use ::mpi::collective::{CommunicatorCollectives, SystemOperation};
        let mut any = 0i32;
        universe.world().all_reduce_into(&(opts.debug as i32), &mut any, SystemOperation::max());
        any != 0
    };
    let opts = InitOptions { debug, ..opts };
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
        start_watchdog(&universe, opts.timeout)?;
    }
    let host: Arc<dyn Communicator> = Arc::new(mpi_world);
    Ok(World { group: Arc::new(Group::new(host, opts.backend, opts.debug)), launch, registry, universe: Some(universe), debug: opts.debug })
}

/// Starts the watchdog: the job's secret, where to listen and the addresses are settled over MPI.
fn start_watchdog(universe: &::mpi::environment::Universe, timeout: Duration) -> Result<()> {
    watchdog::start_mpi(&universe.world(), timeout).map_err(CommError::Init)
}

#[cfg(test)]
mod env_tests {
    use super::*;

    #[test]
    fn timeout_values_in_range_parse() {
        assert_eq!(parse_timeout("600").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_timeout(" 0.5 ").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_timeout("0.001").unwrap(), Duration::from_millis(1));
        assert_eq!(parse_timeout("604800").unwrap(), Duration::from_secs(604_800));
    }

    #[test]
    fn bad_timeouts_are_one_line_errors_naming_the_variable() {
        for (v, why) in [
            ("inf", "out of range"),
            ("1e30", "out of range"),
            ("NaN", "out of range"),
            ("0", "out of range"),
            ("-5", "out of range"),
            ("0.0001", "out of range"),
            ("604801", "out of range"),
            ("abc", "not a positive number"),
            ("", "not a positive number"),
            ("10s\n", "not a positive number"),
            ("1\n2", "not a positive number"),
        ] {
            let msg = parse_timeout(v).unwrap_err().to_string();
            assert!(msg.starts_with("FABBRICA_COMM_TIMEOUT='") && msg.contains(why), "{v:?}: {msg}");
            assert!(msg.contains("FABBRICA_COMM_TIMEOUT=600") && msg.contains("604800"), "{msg}");
            assert!(!msg.contains('\n') && !msg.contains('\r'), "{msg}");
        }
        let long = "9".repeat(500);
        let msg = parse_timeout(&long).unwrap_err().to_string();
        assert!(msg.len() < 300 && msg.contains("..."), "{msg}");
    }

    #[test]
    fn debug_values() {
        assert!(parse_debug("1").unwrap() && parse_debug(" yes ").unwrap());
        assert!(!parse_debug("0").unwrap() && !parse_debug("").unwrap());
        let msg = parse_debug("maybe\n").unwrap_err().to_string();
        assert!(msg.contains("FABBRICA_COMM_DEBUG='maybe\\n'") && msg.contains("=1") && !msg.contains('\n'), "{msg}");
    }
}
