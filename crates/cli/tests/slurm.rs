//! A real single-node Slurm (scripts/slurm/cluster.sh: munged, slurmctld, slurmd under a temporary
//! directory) running `fabbrica train` the ways users do (issue 13):
//!
//! * `srun --mpi=pmix` gives the same losses, bit for bit, as `mpirun` of the same config;
//! * scripts/slurm/train.sbatch, stopped mid-run by a signal or by `scontrol requeue`, writes its
//!   checkpoint, is requeued, resumes with run.resume=auto and ends with the uninterrupted losses;
//! * a node failure (`scontrol update state=down`) makes Slurm requeue the job; once the node is
//!   back it resumes from its checkpoint and ends with the uninterrupted losses;
//! * `scancel` stops every rank with a checkpoint and leaves no process behind;
//! * a time limit's `--signal` warning stops the job with a checkpoint;
//! * launch pitfalls: `srun` without `--mpi=pmix` is refused in one line (exit 2) before MPI_Init,
//!   `mpirun` inside an allocation is not, and scripts/env.sh leaves mpirun able to use a hostfile.
//!
//! The cluster is started once and shared; it stops when the last test using it ends, also when
//! one fails (the handle's Drop runs `cluster.sh stop`). Starting Slurm needs root: elsewhere the
//! Slurm tests log a skip to FABBRICA_SKIP_LOG and pass.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use fabbrica_train::checkpoint;
use fabbrica_train::metrics::read;

/// One job at a time: 2 cores, and every job uses both.
static SERIAL: Mutex<()> = Mutex::new(());

const STEPS: u64 = 400;
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
const BIN: &str = env!("CARGO_BIN_EXE_fabbrica");

fn script(rel: &str) -> PathBuf {
    Path::new(ROOT).join(rel)
}

/// `--set` arguments of a small run (a few seconds on 2 cores), `max_steps` steps into `out`.
fn train_args(out: &Path, max_steps: u64) -> Vec<String> {
    [
        "model.n_layer=1".to_string(),
        "model.n_head=2".into(),
        "model.n_embd=16".into(),
        "model.block_size=16".into(),
        "model.dropout=0.1".into(),
        "train.batch_size=2".into(),
        format!("train.max_steps={max_steps}"),
        "train.warmup_steps=5".into(),
        "train.log_interval=1".into(),
        "train.eval_interval=100000".into(),
        "train.eval_iters=2".into(),
        "run.sample_tokens=0".into(),
        "run.threads=1".into(),
        format!("run.out_dir={}", out.display()),
        format!("data.path={ROOT}/data/pystdlib.txt"),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

fn losses(out: &Path) -> Vec<(u64, u64)> {
    read(&out.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == "train")
        .map(|r| (r.step, r.loss.unwrap().to_bits()))
        .collect()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn mpi_env(c: &mut Command) -> &mut Command {
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
}

/// The losses of an uninterrupted `mpirun -np 2` run of `STEPS` steps, computed once.
fn reference() -> &'static [(u64, u64)] {
    static REF: OnceLock<Vec<(u64, u64)>> = OnceLock::new();
    REF.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ref");
        let o = mpi_env(Command::new("mpirun").args(["-np", "2", "--oversubscribe", BIN, "train"]))
            .args(train_args(&out, STEPS))
            .output()
            .unwrap();
        assert!(o.status.success(), "reference run failed\n{}", text(&o));
        let l = losses(&out);
        assert_eq!(l.len() as u64, STEPS);
        l
    })
}

// ---------------------------------------------------------------------------------------------
// The cluster.

struct Cluster {
    dir: tempfile::TempDir,
}

impl Cluster {
    fn conf(&self) -> PathBuf {
        self.dir.path().join("slurm.conf")
    }

    /// A Slurm command against this cluster.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        mpi_env(&mut c)
            .env("SLURM_CONF", self.conf())
            .env("FABBRICA", BIN);
        c
    }

    fn log_tail(&self) -> String {
        let mut s = String::new();
        for f in ["slurmctld.log", "slurmd.log"] {
            let t = fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            s += &format!(
                "--- {f} (tail)\n{}\n",
                lines[lines.len().saturating_sub(15)..].join("\n")
            );
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script("scripts/slurm/cluster.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Two consecutive free TCP ports (slurmctld's and slurmd's).
fn free_ports() -> u16 {
    let start = 20000 + (std::process::id() % 20000) as u16;
    (start..start + 2000)
        .find(|&p| {
            TcpListener::bind(("0.0.0.0", p)).is_ok()
                && TcpListener::bind(("0.0.0.0", p + 1)).is_ok()
        })
        .expect("no free ports")
}

/// The shared cluster, started on first use; `None` (with a skip logged for `test`) when this
/// machine cannot run one (not root).
fn cluster(test: &str) -> Option<Arc<Cluster>> {
    static SHARED: Mutex<Weak<Cluster>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = shared.upgrade() {
        return Some(c);
    }
    if !is_root() {
        println!("SKIPPED: starting a Slurm cluster needs root");
        if let Ok(log) = std::env::var("FABBRICA_SKIP_LOG") {
            use std::io::Write;
            if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(log) {
                let _ = writeln!(f, "cli::slurm {test}: starting a Slurm cluster needs root");
            }
        }
        return None;
    }
    let c = Arc::new(Cluster {
        dir: tempfile::tempdir().unwrap(),
    });
    let o = Command::new("bash")
        .arg(script("scripts/slurm/cluster.sh"))
        .arg("start")
        .arg(c.dir.path())
        .env("CLUSTER_PORT", free_ports().to_string())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "cluster.sh start failed\n{}{}",
        text(&o),
        c.log_tail()
    );
    *shared = Arc::downgrade(&c);
    Some(c)
}

/// `scontrol show job` fields of a job.
struct JobInfo {
    state: String,
    exit_code: String,
    restarts: u32,
}

fn job_info(c: &Cluster, id: &str) -> JobInfo {
    let o = c
        .cmd("scontrol")
        .args(["show", "job", "-o", id])
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&o.stdout).into_owned();
    let field = |name: &str| {
        t.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .unwrap_or("")
            .to_string()
    };
    JobInfo {
        state: field("JobState"),
        exit_code: field("ExitCode"),
        restarts: field("Restarts").parse().unwrap_or(0),
    }
}

const FINAL: &[&str] = &[
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
];

/// Submits scripts/slurm/train.sbatch for 2 ranks; output to `dir/job.out`.
fn sbatch(c: &Cluster, dir: &Path, opts: &[&str], env: &[(&str, &str)], args: &[String]) -> String {
    let mut cmd = c.cmd("sbatch");
    cmd.args(["--parsable", "--nodes=1", "--ntasks-per-node=2"])
        .arg(format!("--output={}", dir.join("job.out").display()))
        .args(opts)
        .arg(script("scripts/slurm/train.sbatch"))
        .args(args)
        .envs(env.iter().copied());
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "sbatch failed\n{}{}",
        text(&o),
        c.log_tail()
    );
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

fn job_out(dir: &Path) -> String {
    fs::read_to_string(dir.join("job.out")).unwrap_or_default()
}

/// Waits for the job to reach a final state; panics with its output after `limit`.
fn wait_final(c: &Cluster, id: &str, dir: &Path, limit: Duration) -> JobInfo {
    let t = Instant::now();
    loop {
        let info = job_info(c, id);
        if FINAL.contains(&info.state.as_str()) {
            return info;
        }
        assert!(
            t.elapsed() < limit,
            "job {id} still {} after {limit:?}\n{}{}",
            info.state,
            job_out(dir),
            c.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the job's run has logged `step` steps, so that what comes next lands mid-run.
fn wait_for_step(c: &Cluster, id: &str, dir: &Path, out: &Path, step: usize) {
    let t = Instant::now();
    loop {
        let logged = fs::read_to_string(out.join("metrics.jsonl"))
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if logged >= step {
            return;
        }
        let info = job_info(c, id);
        assert!(
            !FINAL.contains(&info.state.as_str()),
            "job {id} ended ({}) before step {step}\n{}",
            info.state,
            job_out(dir)
        );
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "no step {step} within 90 s\n{}{}",
            job_out(dir),
            c.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Processes whose command line mentions `needle` (a run's unique out_dir).
fn processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == std::process::id().to_string() {
            continue;
        }
        if let Ok(raw) = fs::read(e.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(format!("{name}: {cmdline}"));
            }
        }
    }
    found
}

/// Asserts that no process of the run into `out` is left (waiting a little for the teardown).
fn assert_no_process_left(out: &Path) {
    let needle = out.display().to_string();
    let t = Instant::now();
    loop {
        let left = processes_with(&needle);
        if left.is_empty() {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "processes left behind:\n{}",
            left.join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn checkpoint_step(out: &Path) -> u64 {
    let latest = checkpoint::latest(out)
        .unwrap()
        .expect("a checkpoint was written");
    checkpoint::read_state(&latest).unwrap().step
}

// ---------------------------------------------------------------------------------------------
// Launching under Slurm.

/// `srun --mpi=pmix -n 2` and `mpirun -np 2` of one config: the same losses, bit for bit.
#[test]
fn srun_with_pmix_matches_mpirun_bit_for_bit() {
    let Some(c) = cluster("srun_with_pmix_matches_mpirun_bit_for_bit") else {
        return;
    };
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let want = reference();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("srun");
    let o = c
        .cmd("srun")
        .args(["--mpi=pmix", "-n", "2", BIN, "train"])
        .args(train_args(&out, STEPS))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", text(&o), c.log_tail());
    assert!(text(&o).contains("2 ranks"), "{}", text(&o));
    assert_eq!(losses(&out), want, "srun's losses differ from mpirun's");
}

/// train.sbatch; SIGUSR1 to the batch shell only (as `--signal=B:USR1@...` sends it): the script
/// forwards it through srun to every rank, they stop with a checkpoint (exit 75), the script
/// requeues the job, the job resumes with run.resume=auto and ends with the uninterrupted losses.
#[test]
fn sbatch_signal_checkpoints_requeues_and_resumes_to_the_same_losses() {
    let Some(c) = cluster("sbatch_signal_checkpoints_requeues_and_resumes_to_the_same_losses")
    else {
        return;
    };
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let want = reference();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let id = sbatch(
        &c,
        dir.path(),
        &["--time=10"],
        &[],
        &train_args(&out, STEPS),
    );
    wait_for_step(&c, &id, dir.path(), &out, 20);
    let o = c
        .cmd("scancel")
        .args(["--batch", "--signal=USR1", &id])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let info = wait_final(&c, &id, dir.path(), Duration::from_secs(180));
    let log = job_out(dir.path());
    assert_eq!(info.state, "COMPLETED", "{log}{}", c.log_tail());
    assert_eq!(info.restarts, 1, "{log}");
    assert!(
        log.contains("stopped by SIGUSR1")
            && log.contains("exit code 75")
            && log.contains("requeueing job"),
        "{log}"
    );
    assert!(
        log.contains("attempt 1") && log.contains("training finished"),
        "{log}"
    );
    assert_eq!(
        losses(&out),
        want,
        "the requeued job's losses differ from an uninterrupted run\n{log}"
    );
    assert_no_process_left(&out);
}

/// `scontrol requeue` from outside (what preemption with PreemptMode=REQUEUE does): Slurm sends
/// SIGTERM, the ranks write their checkpoint within KillWait, the job restarts and resumes.
#[test]
fn scontrol_requeue_mid_run_resumes_to_the_same_losses() {
    let Some(c) = cluster("scontrol_requeue_mid_run_resumes_to_the_same_losses") else {
        return;
    };
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let want = reference();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let id = sbatch(
        &c,
        dir.path(),
        &["--time=10"],
        &[],
        &train_args(&out, STEPS),
    );
    wait_for_step(&c, &id, dir.path(), &out, 20);
    let o = c.cmd("scontrol").args(["requeue", &id]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let info = wait_final(&c, &id, dir.path(), Duration::from_secs(180));
    let log = job_out(dir.path());
    assert_eq!(info.state, "COMPLETED", "{log}{}", c.log_tail());
    assert_eq!(info.restarts, 1, "{log}");
    assert!(
        log.contains("stopped by SIGTERM") && log.contains("steps 0.."),
        "{log}"
    );
    // The second attempt started from the checkpoint of the first, not from step 0.
    let resumed = log.split("attempt 1").nth(1).expect("a second attempt");
    assert!(
        !resumed.contains("steps 0.."),
        "the requeued job did not resume\n{log}"
    );
    assert_eq!(
        losses(&out),
        want,
        "the requeued job's losses differ from an uninterrupted run\n{log}"
    );
    assert_no_process_left(&out);
}

/// Sets the cluster's node back to service when dropped, also when a test fails while it is down
/// (the cluster is shared).
struct ResumeNode<'a> {
    c: &'a Cluster,
    node: String,
}

impl ResumeNode<'_> {
    fn resume(&self) -> Output {
        let state = format!("nodename={}", self.node);
        self.c
            .cmd("scontrol")
            .args(["update", &state, "state=resume"])
            .output()
            .unwrap()
    }
}

impl Drop for ResumeNode<'_> {
    fn drop(&mut self) {
        let _ = self.resume();
    }
}

fn node_state(c: &Cluster, node: &str) -> String {
    let o = c
        .cmd("sinfo")
        .args(["-h", "-N", "-n", node, "-o", "%T"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A node failure mid-run, simulated with `scontrol update state=down`. What Slurm 22.05 does
/// (measured): slurmctld requeues the job itself at once ("requeue job ... due to failure of node"),
/// because of `#SBATCH --requeue` (JobRequeue=1 is also Slurm's default); with `--no-requeue` it
/// ends as NODE_FAIL instead. srun prints "Node failure on <node>" and exits 0, so train.sbatch's
/// own node-down branch (for a crash) is not what requeues here. slurmd is still alive on this
/// "failed" node and stops the step with SIGTERM, so the ranks usually write a checkpoint at the
/// step they reached; a node that really dies leaves the periodic one (run.checkpoint_interval).
/// The requeued job stays pending while the node is down (cluster.sh's ReturnToService=1; with 2
/// the node would come back by itself at once), starts again after `state=resume`, resumes with
/// run.resume=auto and ends with the uninterrupted losses.
#[test]
fn node_failure_requeues_and_resumes_to_the_same_losses() {
    let Some(c) = cluster("node_failure_requeues_and_resumes_to_the_same_losses") else {
        return;
    };
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let want = reference();
    let o = c
        .cmd("sinfo")
        .args(["-h", "-N", "-o", "%N"])
        .output()
        .unwrap();
    let node = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(!node.is_empty() && !node.contains('\n'), "nodes: {node:?}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut args = train_args(&out, STEPS);
    args.extend(["--set".to_string(), "run.checkpoint_interval=10".into()]);
    let id = sbatch(&c, dir.path(), &["--time=10"], &[], &args);
    wait_for_step(&c, &id, dir.path(), &out, 25);

    let back = ResumeNode { c: &c, node };
    let o = c
        .cmd("scontrol")
        .args([
            "update",
            &format!("nodename={}", back.node),
            "state=down",
            "reason=test",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // Requeued by Slurm, and kept pending while the node is down: longer than cred_expire (5 s)
    // plus sched_interval (2 s), after which it would have started on a node in service.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(8) {
        let info = job_info(&c, &id);
        assert!(
            info.state == "PENDING" && info.restarts == 1,
            "job {id} is {} (restarts {}) with its node down\n{}{}",
            info.state,
            info.restarts,
            job_out(dir.path()),
            c.log_tail()
        );
        assert!(node_state(&c, &back.node).starts_with("down"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = back.resume();
    assert!(o.status.success(), "{}", text(&o));

    let info = wait_final(&c, &id, dir.path(), Duration::from_secs(120));
    let log = job_out(dir.path());
    assert_eq!(info.state, "COMPLETED", "{log}{}", c.log_tail());
    assert_eq!(info.restarts, 1, "{log}");
    assert!(log.contains("Node failure on"), "{log}");
    let (first, resumed) = log.split_once("attempt 1").expect("a second attempt");
    // srun exits 0 after the node failure: the script must not take that for the end of training
    // (it says "srun exited 0 but the job is PENDING", when the shell lives long enough to say it).
    assert!(
        !first.contains("training finished"),
        "the first attempt claims to have finished\n{log}"
    );
    assert!(
        resumed.contains("training finished"),
        "the requeued job did not finish\n{log}"
    );
    // From a checkpoint at step 20 (the periodic one before step 25) or later.
    let from: u64 = resumed
        .split("steps ")
        .nth(1)
        .and_then(|s| s.split("..").next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no `steps N..` line in the second attempt\n{log}"));
    assert!(
        (20..STEPS).contains(&from),
        "the requeued job resumed from step {from}\n{log}"
    );
    assert_eq!(
        losses(&out),
        want,
        "the requeued job's losses differ from an uninterrupted run\n{log}"
    );
    assert_no_process_left(&out);
}

/// `scancel`: SIGTERM to every task (SIGKILL only after KillWait): every rank stops at the same
/// step with the signal handler's checkpoint, the job is not requeued, no process is left, and
/// the losses so far are the uninterrupted run's.
#[test]
fn scancel_stops_every_rank_with_a_checkpoint_and_leaves_no_process() {
    let Some(c) = cluster("scancel_stops_every_rank_with_a_checkpoint_and_leaves_no_process")
    else {
        return;
    };
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let want = reference();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let id = sbatch(
        &c,
        dir.path(),
        &["--time=10"],
        &[],
        &train_args(&out, STEPS),
    );
    wait_for_step(&c, &id, dir.path(), &out, 20);
    let o = c.cmd("scancel").arg(&id).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let info = wait_final(&c, &id, dir.path(), Duration::from_secs(60));
    assert_eq!(info.state, "CANCELLED");
    assert_eq!(info.restarts, 0, "scancel must not requeue");
    assert_no_process_left(&out);
    let log = job_out(dir.path());
    assert!(
        log.contains("stopped by SIGTERM") && log.contains("exit code 75"),
        "no checkpoint on scancel\n{log}"
    );
    let stopped = checkpoint_step(&out);
    assert!((20..STEPS).contains(&stopped), "stopped at {stopped}");
    let logged = losses(&out);
    assert_eq!(
        logged.last().unwrap().0,
        stopped,
        "metrics and checkpoint disagree on where it stopped"
    );
    assert_eq!(logged[..], want[..logged.len()]);
}

/// A time limit: `--signal=USR1@20` with `--time=1` (the shortest limit) warns the ranks 20 s (and
/// up to a minute, Slurm's resolution) before the end; they stop with a checkpoint and exit 75.
/// Requeueing is turned off (FABBRICA_MAX_REQUEUES=0), so the job ends there.
#[test]
fn time_limit_warning_signal_stops_the_job_with_a_checkpoint() {
    let Some(c) = cluster("time_limit_warning_signal_stops_the_job_with_a_checkpoint") else {
        return;
    };
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let id = sbatch(
        &c,
        dir.path(),
        &["--time=1", "--signal=USR1@20"],
        &[("FABBRICA_MAX_REQUEUES", "0")],
        &train_args(&out, 1_000_000),
    );
    let info = wait_final(&c, &id, dir.path(), Duration::from_secs(100));
    let log = job_out(dir.path());
    assert_eq!(info.state, "FAILED", "{log}");
    assert_eq!(info.exit_code, "75:0", "{log}");
    assert!(
        log.contains("stopped by SIGUSR1") && log.contains("not requeueing"),
        "{log}"
    );
    let stopped = checkpoint_step(&out);
    assert!(stopped > 0, "{log}");
    assert_eq!(losses(&out).last().unwrap().0, stopped);
    assert_no_process_left(&out);
}

// ---------------------------------------------------------------------------------------------
// Launch pitfalls.

/// `srun` without `--mpi=pmix` (Slurm's default `none`, or `pmi2`), one task or two: one line
/// saying what to add, exit code 2, before Open MPI's MPI_Init would abort with a page of text.
#[test]
fn srun_without_pmix_is_refused_in_one_line() {
    let Some(c) = cluster("srun_without_pmix_is_refused_in_one_line") else {
        return;
    };
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    for (mpi, n) in [(None, "1"), (None, "2"), (Some("--mpi=pmi2"), "2")] {
        let out = dir.path().join(format!("{n}{}", mpi.unwrap_or("")));
        let mut cmd = c.cmd("srun");
        cmd.args(mpi)
            .args(["-n", n, BIN, "train"])
            .args(train_args(&out, 5))
            .env_remove("SLURM_MPI_TYPE");
        let o = cmd.output().unwrap();
        let t = text(&o);
        assert_eq!(o.status.code(), Some(2), "{mpi:?} -n {n}\n{t}");
        let lines: Vec<&str> = t.lines().filter(|l| l.starts_with("error: ")).collect();
        assert_eq!(
            lines.len(),
            1,
            "{mpi:?} -n {n}: expected one error line\n{t}"
        );
        assert!(
            lines[0].contains("srun --mpi=pmix") && lines[0].contains("MpiDefault=pmix"),
            "{t}"
        );
        assert!(
            !t.contains("MPI_Init") && !t.contains("PMI support"),
            "reached MPI_Init:\n{t}"
        );
        assert!(!out.join("metrics.jsonl").exists());
    }
}

/// mpirun inside an allocation (salloc; an sbatch script is alike: SLURM_* set, no step): the
/// srun check must not fire, and the run matches plain mpirun.
#[test]
fn mpirun_inside_an_allocation_is_not_mistaken_for_srun() {
    let Some(c) = cluster("mpirun_inside_an_allocation_is_not_mistaken_for_srun") else {
        return;
    };
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let want = reference();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = c
        .cmd("salloc")
        .args(["-n", "2", "mpirun", "-np", "2", BIN, "train"])
        .args(train_args(&out, STEPS))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", text(&o), c.log_tail());
    assert_eq!(losses(&out), want);
}

/// scripts/env.sh (which the README has users source) must not pin mpirun to this node when it
/// can reach others (ssh or rsh present): OMPI_MCA_plm=isolated would make a hostfile naming other
/// nodes fail. Then `mpirun --hostfile` naming localhost (as `slots=2` and as two lines) runs the
/// job. One machine cannot show a second node; a hostfile naming an unknown one shows that mpirun
/// tries to reach it rather than ignoring it.
#[test]
fn env_sh_leaves_mpirun_free_to_use_a_hostfile() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let has_agent = Command::new("bash")
        .args(["-c", "command -v ssh || command -v rsh"])
        .output()
        .unwrap()
        .status
        .success();
    let plm = Command::new("bash")
        .args([
            "-c",
            &format!("source {ROOT}/scripts/env.sh && echo \"${{OMPI_MCA_plm-unset}}\""),
        ])
        .env_remove("OMPI_MCA_plm")
        .output()
        .unwrap();
    let plm = String::from_utf8_lossy(&plm.stdout).trim().to_string();
    assert_eq!(
        plm,
        if has_agent { "unset" } else { "isolated" },
        "ssh/rsh present: {has_agent}"
    );
    if !has_agent {
        return;
    }
    let want = reference();
    let dir = tempfile::tempdir().unwrap();
    for (name, hosts) in [
        ("slots", "localhost slots=2\n"),
        ("lines", "localhost\nlocalhost\n"),
    ] {
        let hostfile = dir.path().join(format!("hosts-{name}"));
        fs::write(&hostfile, hosts).unwrap();
        let out = dir.path().join(name);
        let o = mpi_env(Command::new("bash").args([
            "-c",
            &format!("source {ROOT}/scripts/env.sh && exec \"$@\""),
            "bash",
        ]))
        .args(["mpirun", "--hostfile"])
        .arg(&hostfile)
        .args(["-np", "2", BIN, "train"])
        .args(train_args(&out, STEPS))
        .env_remove("OMPI_MCA_plm")
        .output()
        .unwrap();
        assert!(o.status.success(), "hostfile {hosts:?}\n{}", text(&o));
        assert_eq!(losses(&out), want, "hostfile {hosts:?}");
    }
    // A node that does not exist: mpirun must try to start a daemon there (and fail), not run
    // both ranks here or complain about slots as `isolated` does.
    let hostfile = dir.path().join("hosts-other");
    fs::write(
        &hostfile,
        "fabbrica-no-such-node slots=1\nlocalhost slots=1\n",
    )
    .unwrap();
    let o = mpi_env(Command::new("bash").args([
        "-c",
        &format!("source {ROOT}/scripts/env.sh && exec timeout 60 \"$@\""),
        "bash",
    ]))
    .args(["mpirun", "--hostfile"])
    .arg(&hostfile)
    .args(["-np", "2", "true"])
    .env_remove("OMPI_MCA_plm")
    .env(
        "OMPI_MCA_plm_rsh_args",
        "-o BatchMode=yes -o ConnectTimeout=5",
    )
    .stdin(Stdio::null())
    .output()
    .unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("fabbrica-no-such-node") && !t.contains("not enough slots"),
        "{t}"
    );
}
