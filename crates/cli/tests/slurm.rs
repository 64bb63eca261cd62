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

#[path = "slurm/harness.rs"]
mod harness;

use std::fs;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use harness::*;

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
    let o = c.cmd("srun").args(["--mpi=pmix", "-n", "2", BIN, "train"]).args(train_args(&out, STEPS)).output().unwrap();
    assert!(o.status.success(), "{}{}", text(&o), c.log_tail());
    assert!(text(&o).contains("2 ranks"), "{}", text(&o));
    assert_eq!(losses(&out), want, "srun's losses differ from mpirun's");
}

/// train.sbatch; SIGUSR1 to the batch shell only (as `--signal=B:USR1@...` sends it): the script
/// forwards it through srun to every rank, they stop with a checkpoint (exit 75), the script
/// requeues the job, the job resumes with run.resume=auto and ends with the uninterrupted losses.
#[test]
fn sbatch_signal_checkpoints_requeues_and_resumes_to_the_same_losses() {
    let Some(c) = cluster("sbatch_signal_checkpoints_requeues_and_resumes_to_the_same_losses") else {
        return;
    };
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let want = reference();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let id = sbatch(&c, dir.path(), &["--time=10"], &[], &train_args(&out, STEPS));
    wait_for_step(&c, &id, dir.path(), &out, 20);
    let o = c.cmd("scancel").args(["--batch", "--signal=USR1", &id]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let info = wait_final(&c, &id, dir.path(), Duration::from_secs(180));
    let log = job_out(dir.path());
    assert_eq!(info.state, "COMPLETED", "{log}{}", c.log_tail());
    assert_eq!(info.restarts, 1, "{log}");
    assert!(log.contains("stopped by SIGUSR1") && log.contains("exit code 75") && log.contains("requeueing job"), "{log}");
    assert!(log.contains("attempt 1") && log.contains("training finished"), "{log}");
    assert_eq!(losses(&out), want, "the requeued job's losses differ from an uninterrupted run\n{log}");
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
    let id = sbatch(&c, dir.path(), &["--time=10"], &[], &train_args(&out, STEPS));
    wait_for_step(&c, &id, dir.path(), &out, 20);
    let o = c.cmd("scontrol").args(["requeue", &id]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let info = wait_final(&c, &id, dir.path(), Duration::from_secs(180));
    let log = job_out(dir.path());
    assert_eq!(info.state, "COMPLETED", "{log}{}", c.log_tail());
    assert_eq!(info.restarts, 1, "{log}");
    assert!(log.contains("stopped by SIGTERM") && log.contains("steps 0.."), "{log}");
    // The second attempt started from the checkpoint of the first, not from step 0.
    let resumed = log.split("attempt 1").nth(1).expect("a second attempt");
    assert!(!resumed.contains("steps 0.."), "the requeued job did not resume\n{log}");
    assert_eq!(losses(&out), want, "the requeued job's losses differ from an uninterrupted run\n{log}");
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
        self.c.cmd("scontrol").args(["update", &state, "state=resume"]).output().unwrap()
    }
}

impl Drop for ResumeNode<'_> {
    fn drop(&mut self) {
        let _ = self.resume();
    }
}

fn node_state(c: &Cluster, node: &str) -> String {
    let o = c.cmd("sinfo").args(["-h", "-N", "-n", node, "-o", "%T"]).output().unwrap();
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
    let o = c.cmd("sinfo").args(["-h", "-N", "-o", "%N"]).output().unwrap();
    let node = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(!node.is_empty() && !node.contains('\n'), "nodes: {node:?}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut args = train_args(&out, STEPS);
    args.extend(["--set".to_string(), "run.checkpoint_interval=10".into()]);
    let id = sbatch(&c, dir.path(), &["--time=10"], &[], &args);
    wait_for_step(&c, &id, dir.path(), &out, 25);

    let back = ResumeNode { c: &c, node };
    let o = c.cmd("scontrol").args(["update", &format!("nodename={}", back.node), "state=down", "reason=test"]).output().unwrap();
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
    assert!(!first.contains("training finished"), "the first attempt claims to have finished\n{log}");
    assert!(resumed.contains("training finished"), "the requeued job did not finish\n{log}");
    // From a checkpoint at step 20 (the periodic one before step 25) or later.
    let from: u64 = resumed
        .split("steps ")
        .nth(1)
        .and_then(|s| s.split("..").next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no `steps N..` line in the second attempt\n{log}"));
    assert!((20..STEPS).contains(&from), "the requeued job resumed from step {from}\n{log}");
    assert_eq!(losses(&out), want, "the requeued job's losses differ from an uninterrupted run\n{log}");
    assert_no_process_left(&out);
}

/// `scancel`: SIGTERM to every task (SIGKILL only after KillWait): every rank stops at the same
/// step with the signal handler's checkpoint, the job is not requeued, no process is left, and
/// the losses so far are the uninterrupted run's.
#[test]
fn scancel_stops_every_rank_with_a_checkpoint_and_leaves_no_process() {
    let Some(c) = cluster("scancel_stops_every_rank_with_a_checkpoint_and_leaves_no_process") else {
        return;
    };
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let want = reference();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let id = sbatch(&c, dir.path(), &["--time=10"], &[], &train_args(&out, STEPS));
    wait_for_step(&c, &id, dir.path(), &out, 20);
    let o = c.cmd("scancel").arg(&id).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let info = wait_final(&c, &id, dir.path(), Duration::from_secs(60));
    assert_eq!(info.state, "CANCELLED");
    assert_eq!(info.restarts, 0, "scancel must not requeue");
    assert_no_process_left(&out);
    let log = job_out(dir.path());
    assert!(log.contains("stopped by SIGTERM") && log.contains("exit code 75"), "no checkpoint on scancel\n{log}");
    let stopped = checkpoint_step(&out);
    assert!((20..STEPS).contains(&stopped), "stopped at {stopped}");
    let logged = losses(&out);
    assert_eq!(logged.last().unwrap().0, stopped, "metrics and checkpoint disagree on where it stopped");
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
    let id = sbatch(&c, dir.path(), &["--time=1", "--signal=USR1@20"], &[("FABBRICA_MAX_REQUEUES", "0")], &train_args(&out, 1_000_000));
    let info = wait_final(&c, &id, dir.path(), Duration::from_secs(100));
    let log = job_out(dir.path());
    assert_eq!(info.state, "FAILED", "{log}");
    assert_eq!(info.exit_code, "75:0", "{log}");
    assert!(log.contains("stopped by SIGUSR1") && log.contains("not requeueing"), "{log}");
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
        cmd.args(mpi).args(["-n", n, BIN, "train"]).args(train_args(&out, 5)).env_remove("SLURM_MPI_TYPE");
        let o = cmd.output().unwrap();
        let t = text(&o);
        assert_eq!(o.status.code(), Some(2), "{mpi:?} -n {n}\n{t}");
        let lines: Vec<&str> = t.lines().filter(|l| l.starts_with("error: ")).collect();
        assert_eq!(lines.len(), 1, "{mpi:?} -n {n}: expected one error line\n{t}");
        assert!(lines[0].contains("srun --mpi=pmix") && lines[0].contains("MpiDefault=pmix"), "{t}");
        assert!(!t.contains("MPI_Init") && !t.contains("PMI support"), "reached MPI_Init:\n{t}");
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
    let o = c.cmd("salloc").args(["-n", "2", "mpirun", "-np", "2", BIN, "train"]).args(train_args(&out, STEPS)).output().unwrap();
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
    let has_agent = Command::new("bash").args(["-c", "command -v ssh || command -v rsh"]).output().unwrap().status.success();
    let plm = Command::new("bash")
        .args(["-c", &format!("source {ROOT}/scripts/env.sh && echo \"${{OMPI_MCA_plm-unset}}\"")])
        .env_remove("OMPI_MCA_plm")
        .output()
        .unwrap();
    let plm = String::from_utf8_lossy(&plm.stdout).trim().to_string();
    assert_eq!(plm, if has_agent { "unset" } else { "isolated" }, "ssh/rsh present: {has_agent}");
    if !has_agent {
        return;
    }
    let want = reference();
    let dir = tempfile::tempdir().unwrap();
    for (name, hosts) in [("slots", "localhost slots=2\n"), ("lines", "localhost\nlocalhost\n")] {
        let hostfile = dir.path().join(format!("hosts-{name}"));
        fs::write(&hostfile, hosts).unwrap();
        let out = dir.path().join(name);
        let o = mpi_env(Command::new("bash").args(["-c", &format!("source {ROOT}/scripts/env.sh && exec \"$@\""), "bash"]))
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
    fs::write(&hostfile, "fabbrica-no-such-node slots=1\nlocalhost slots=1\n").unwrap();
    let o = mpi_env(Command::new("bash").args(["-c", &format!("source {ROOT}/scripts/env.sh && exec timeout 60 \"$@\""), "bash"]))
        .args(["mpirun", "--hostfile"])
        .arg(&hostfile)
        .args(["-np", "2", "true"])
        .env_remove("OMPI_MCA_plm")
        .env("OMPI_MCA_plm_rsh_args", "-o BatchMode=yes -o ConnectTimeout=5")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("fabbrica-no-such-node") && !t.contains("not enough slots"), "{t}");
}
