//! Preemption (issue 13): SIGTERM/SIGINT/SIGUSR1 on any rank stop every rank at the same step
//! boundary with a checkpoint and exit code 75; resuming continues with bitwise-identical losses.
//! Real signals to real processes, one process and under mpirun.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fabbrica_train::checkpoint;
use fabbrica_train::metrics::read;

mod common;

static SERIAL: Mutex<()> = Mutex::new(());

const STEPS: u64 = 400;

fn base(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=16",
        "model.block_size=16",
        "model.dropout=0.1",
        "train.batch_size=2",
        &format!("train.max_steps={STEPS}"),
        "train.warmup_steps=5",
        "train.log_interval=1",
        "train.eval_interval=100000",
        "train.eval_iters=2",
        "run.sample_tokens=0",
        "run.threads=1",
        &format!("run.out_dir={}", out.display()),
        &common::corpus_set(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn cmd(np: usize, out: &Path, extra: &[&str]) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = common::train_command(np, &[], base(out, extra));
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    // SIGHUP as a terminal session has it, whatever this test runner inherited (a CI started
    // under nohup ignores it, and a child would inherit that).
    // SAFETY: signal(2) is async-signal-safe, the only call between fork and exec.
    unsafe {
        c.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
            Ok(())
        });
    }
    c
}

fn losses(out: &Path) -> Vec<(u64, u64)> {
    read(&out.join("metrics.jsonl")).unwrap().into_iter().filter(|r| r.kind == "train").map(|r| (r.step, r.loss.unwrap().to_bits())).collect()
}

/// Waits until the run has logged `step` (or panics after a minute), so the signal lands mid-run.
fn wait_for_step(out: &Path, step: u64, child: &mut Child) {
    let t = Instant::now();
    loop {
        let logged = fs::read_to_string(out.join("metrics.jsonl")).map(|s| s.lines().count() as u64).unwrap_or(0);
        if logged >= step {
            return;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended before step {step}");
        assert!(t.elapsed() < Duration::from_secs(60), "no step {step} within a minute");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// kill(2) itself, not a `kill` process: no fork and exec between the decision and the signal.
fn signal(pid: u32, sig: &str) {
    let sig = match sig {
        "KILL" => libc::SIGKILL,
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        "USR1" => libc::SIGUSR1,
        "HUP" => libc::SIGHUP,
        other => panic!("no signal {other}"),
    };
    // SAFETY: kill(2) on a process this test started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, sig) }, 0, "kill: {}", std::io::Error::last_os_error());
}

fn finish(child: Child) -> (Option<i32>, String) {
    let o = child.wait_with_output().unwrap();
    (o.status.code(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

/// Runs uninterrupted, then interrupted by `sig` (sent by `send` once step 20 is logged) and
/// resumed; the losses must be bitwise the same. Returns the step the interrupted run stopped at.
fn interrupted_run_matches(np: usize, sig: &str, send: impl Fn(&Child)) -> u64 {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (whole, part) = (dir.path().join("whole"), dir.path().join("part"));
    let (code, text) = finish(cmd(np, &whole, &[]).spawn().unwrap());
    assert_eq!(code, Some(0), "{text}");

    let mut child = cmd(np, &part, &[]).spawn().unwrap();
    wait_for_step(&part, 20, &mut child);
    send(&child);
    let (code, text) = finish(child);
    assert_eq!(code, Some(75), "{sig}: expected the preempted exit code\n{text}");
    assert!(text.contains(&format!("stopped by {sig}")) && text.contains("resume with run.resume=true"), "{text}");
    let stopped = checkpoint::read_state(&checkpoint::latest(&part).unwrap().unwrap()).unwrap().step;
    assert!((20..STEPS).contains(&stopped), "stopped at {stopped}");
    let logged = losses(&part);
    assert_eq!(logged.last().unwrap().0, stopped, "metrics and checkpoint disagree on where it stopped");

    let (code, text) = finish(cmd(np, &part, &["run.resume=true"]).spawn().unwrap());
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(losses(&whole), losses(&part), "{sig}: the resumed losses differ from the uninterrupted run");
    stopped
}

#[test]
fn sigterm_stops_one_process_at_a_step_boundary_with_a_checkpoint() {
    interrupted_run_matches(0, "SIGTERM", |c| signal(c.id(), "TERM"));
}

#[test]
fn sigint_stops_one_process_too() {
    interrupted_run_matches(0, "SIGINT", |c| signal(c.id(), "INT"));
}

/// A closed terminal (SIGHUP) stops at a step boundary with a checkpoint too.
#[test]
fn sighup_stops_one_process_with_a_checkpoint() {
    interrupted_run_matches(0, "SIGHUP", |c| signal(c.id(), "HUP"));
}

/// Started to ignore SIGHUP (`nohup`), a run stays so: the signal changes nothing.
#[test]
fn under_nohup_sighup_is_still_ignored() {
    use std::os::unix::process::CommandExt;
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut cmd = cmd(0, &out, &["train.max_steps=60"]);
    // SAFETY: signal(2) is async-signal-safe, the only call between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    wait_for_step(&out, 20, &mut child);
    signal(child.id(), "HUP");
    let (code, text) = finish(child);
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains("stopped by"), "{text}");
    assert_eq!(losses(&out).last().unwrap().0, 60);
}

/// SIGUSR1 to one rank (as Slurm's `--signal` or a node's preemption notice would deliver it):
/// every rank stops at the same step and the job exits 75.
#[test]
fn sigusr1_on_one_rank_stops_every_rank_at_the_same_step() {
    interrupted_run_matches(2, "SIGUSR1", |c| {
        // mpirun's children are the ranks; signal the last one only.
        let kids = String::from_utf8(Command::new("pgrep").args(["-P", &c.id().to_string()]).output().unwrap().stdout).unwrap();
        let pid: u32 = kids.lines().last().expect("mpirun has ranks").trim().parse().unwrap();
        signal(pid, "USR1");
    });
}

/// mpirun forwards SIGUSR1 to every rank without ending the job.
#[test]
fn sigusr1_to_mpirun_stops_the_job_gracefully() {
    interrupted_run_matches(2, "SIGUSR1", |c| signal(c.id(), "USR1"));
}

/// A second stop signal while the first is being handled ends the process at once, as a second
/// Ctrl-C should: killed by that signal, not after the step and a checkpoint. The checkpoint
/// written before still loads. (SIGINT then SIGTERM: two of the same kind sent together could
/// merge into one pending signal.)
#[test]
fn a_second_stop_signal_ends_the_process_at_once() {
    use std::os::unix::process::ExitStatusExt;
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // Steps of a few hundred ms: both signals land inside the step the first would end.
    let slow = [
        "model.n_layer=4",
        "model.n_head=4",
        "model.n_embd=256",
        "model.block_size=128",
        "train.batch_size=8",
        "run.checkpoint_interval=5",
        "run.async_checkpoint=false",
    ];
    let mut child = cmd(0, &out, &slow).spawn().unwrap();
    wait_for_step(&out, 6, &mut child);
    signal(child.id(), "INT");
    signal(child.id(), "TERM");
    let o = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(matches!(o.status.signal(), Some(libc::SIGINT) | Some(libc::SIGTERM)), "expected death by the second signal: {:?}\n{text}", o.status);
    assert!(!text.contains("stopped by"), "the graceful stop ran: {text}");
    let last = checkpoint::latest(&out).unwrap().expect("the checkpoint of step 5");
    assert!(checkpoint::read_state(&last).unwrap().step >= 5);
    checkpoint::load(&last).unwrap();
}

/// `run.resume=auto`: a fresh directory starts from step 0, a directory with checkpoints resumes,
/// so one job script can be requeued blindly.
#[test]
fn resume_auto_starts_fresh_then_resumes() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let (code, text) = finish(cmd(0, &out, &["run.resume=auto", "run.stop_at=30"]).spawn().unwrap());
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(losses(&out).first().unwrap().0, 1);
    let (code, text) = finish(cmd(0, &out, &["run.resume=auto", "run.stop_at=60"]).spawn().unwrap());
    assert_eq!(code, Some(0), "{text}");
    let steps: Vec<u64> = losses(&out).iter().map(|x| x.0).collect();
    assert_eq!(steps, (1..=60).collect::<Vec<u64>>(), "auto did not resume from step 30");
}

/// kill -9 while a checkpoint is being written (sync and background): the previous checkpoint
/// loads, and the next run removes the dead writer's temporary and resumes from it.
#[test]
fn kill_9_during_a_checkpoint_write_loses_nothing_written_before() {
    for mode in ["run.async_checkpoint=false", "run.async_checkpoint=true"] {
        let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        // About 60 MB a checkpoint: its write takes long enough to be caught in the act.
        let big =
            ["model.n_layer=4", "model.n_head=4", "model.n_embd=256", "model.block_size=32", "train.max_steps=4", "run.checkpoint_interval=2", mode];
        let mut child = cmd(0, &out, &big).spawn().unwrap();
        let root = checkpoint::checkpoints_dir(&out);
        let t = Instant::now();
        let caught = loop {
            let writing = fs::read_dir(&root)
                .map(|rd| rd.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().starts_with(".step_00000004.tmp-")))
                .unwrap_or(false);
            if writing {
                signal(child.id(), "KILL");
                break true;
            }
            if child.try_wait().unwrap().is_some() || t.elapsed() > Duration::from_secs(120) {
                break false;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let (code, text) = finish(child);
        assert!(caught, "{mode}: never saw the write of step 4 in progress\n{text}");
        assert_eq!(code, None, "{mode}: killed by a signal expected\n{text}");
        assert_eq!(checkpoint::list(&root).unwrap().iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![2], "{mode}");
        checkpoint::load(&root.join("step_00000002")).unwrap();
        let (code, text) = finish(cmd(0, &out, &[&big[..6], &["run.resume=true"]].concat()).spawn().unwrap());
        assert_eq!(code, Some(0), "{mode}: {text}");
        assert!(text.contains("writers that died mid-write"), "{mode}: {text}");
        let leftovers = fs::read_dir(&root).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(".tmp-")).count();
        assert_eq!(leftovers, 0, "{mode}");
        assert_eq!(checkpoint::read_state(&checkpoint::latest(&out).unwrap().unwrap()).unwrap().step, 4);
    }
}

/// kill -9 of one rank of 4 at some step: every rank ends because of that death (the comm
/// timeout is set far beyond the test, and the watchdog's timeout message must not appear), the
/// killed rank is named, the last checkpoint loads, and a restart
/// from it runs to the end.
#[test]
fn kill_9_of_one_rank_of_four_ends_the_job_and_a_restart_continues() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // A comm timeout far beyond the test: the job must end because a rank died, not because the
    // watchdog gave up on it.
    let sets = ["comm.timeout_s=600", "run.checkpoint_interval=10"];
    let mut child = cmd(4, &out, &sets).spawn().unwrap();
    wait_for_step(&out, 25, &mut child);
    let kids = String::from_utf8(Command::new("pgrep").args(["-P", &child.id().to_string()]).output().unwrap().stdout).unwrap();
    let ranks: Vec<u32> = kids.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(ranks.len(), 4, "{kids}");
    signal(ranks[2], "KILL");
    let (code, text) = finish(child);
    assert_ne!(code, Some(0), "{text}");
    assert!(!text.contains("did not complete within"), "the watchdog's timeout ended the job, not the death of rank 2\n{text}");
    assert!(text.contains("signal 9") || text.contains("Killed") || text.contains("rank 2"), "the dead rank is not named\n{text}");
    // Every rank is gone (or a zombie about to be reaped) within a few seconds of mpirun's exit.
    let running = |pid: &u32| fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| !s.contains(") Z ")).unwrap_or(false);
    let t = Instant::now();
    while ranks.iter().any(running) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<String> = ranks.iter().filter(|p| running(p)).map(|p| fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default()).collect();
    assert!(left.is_empty(), "ranks still running after the job ended: {left:?}\n{text}");
    let last = checkpoint::latest(&out).unwrap().expect("a checkpoint before the kill");
    let ck = checkpoint::load(&last).unwrap();
    assert!(ck.state.step >= 20, "{}", ck.state.step);
    let (code, text) = finish(cmd(4, &out, &[&sets[..], &["run.resume=auto"]].concat()).spawn().unwrap());
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(losses(&out).last().unwrap().0, STEPS);
}
