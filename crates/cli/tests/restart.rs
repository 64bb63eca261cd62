//! scripts/restart.sh, the restart loop for plain mpirun (issue 13), with a real mpirun: a crashed
//! run is restarted and resumes (run.resume=auto) to the uninterrupted run's losses, bit for bit;
//! a signal to the script stops the run with a checkpoint and no restart; user errors are not
//! retried; restarts are bounded and back off exponentially.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use fabbrica_train::checkpoint;
use fabbrica_train::metrics::read;

/// One job at a time: 2 cores, and every job uses both.
static SERIAL: Mutex<()> = Mutex::new(());

const STEPS: u64 = 400;
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
const BIN: &str = env!("CARGO_BIN_EXE_fabbrica");

/// `--set` arguments of a small 2-rank run, with a checkpoint every 50 steps.
fn train_args(out: &Path) -> Vec<String> {
    [
        "model.n_layer=1".to_string(),
        "model.n_head=2".into(),
        "model.n_embd=16".into(),
        "model.block_size=16".into(),
        "model.dropout=0.1".into(),
        "train.batch_size=2".into(),
        format!("train.max_steps={STEPS}"),
        "train.warmup_steps=5".into(),
        "train.log_interval=1".into(),
        "train.eval_interval=100000".into(),
        "train.eval_iters=2".into(),
        "run.sample_tokens=0".into(),
        "run.threads=1".into(),
        "run.checkpoint_interval=50".into(),
        format!("run.out_dir={}", out.display()),
        format!("data.path={ROOT}/data/pystdlib.txt"),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

fn mpirun(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["mpirun", "-np", "2", "--oversubscribe", BIN, "train"].iter().map(|s| s.to_string()).collect();
    v.extend(train_args(out));
    v.extend(extra.iter().flat_map(|s| ["--set".to_string(), s.to_string()]));
    v
}

/// `restart.sh OPTS -- COMMAND`.
fn restart_sh(opts: &[&str], command: &[String]) -> Command {
    let mut c = Command::new("bash");
    c.arg(format!("{ROOT}/scripts/restart.sh"))
        .args(opts)
        .arg("--")
        .args(command)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // After a rank exits non-zero (75 included) mpirun sends SIGCONT, sleeps this long, sends
        // SIGTERM, sleeps again, then SIGKILL, even when every rank is already gone: restart.sh's
        // default of 5 would add ten seconds to every test here.
        .env("OMPI_MCA_odls_base_sigkill_timeout", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn losses(out: &Path) -> Vec<(u64, u64)> {
    read(&out.join("metrics.jsonl")).unwrap().into_iter().filter(|r| r.kind == "train").map(|r| (r.step, r.loss.unwrap().to_bits())).collect()
}

/// The losses of one uninterrupted run, computed once.
fn reference() -> &'static [(u64, u64)] {
    static REF: OnceLock<Vec<(u64, u64)>> = OnceLock::new();
    REF.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ref");
        let cmd = mpirun(&out, &[]);
        let o = Command::new(&cmd[0]).args(&cmd[1..]).env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1").output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        losses(&out)
    })
}

/// Waits until the run into `out` has logged `step` steps.
fn wait_for_step(out: &Path, step: usize, child: &mut Child) {
    let t = Instant::now();
    loop {
        let logged = fs::read_to_string(out.join("metrics.jsonl")).map(|s| s.lines().count()).unwrap_or(0);
        if logged >= step {
            return;
        }
        assert!(child.try_wait().unwrap().is_none(), "restart.sh ended before step {step}");
        assert!(t.elapsed() < Duration::from_secs(90), "no step {step} within 90 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn children(pid: u32) -> Vec<u32> {
    let o = Command::new("pgrep").args(["-P", &pid.to_string()]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

fn kill(pid: u32, sig: &str) {
    assert!(Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().unwrap().success());
}

/// A rank killed outright (no checkpoint of its own): mpirun fails, restart.sh says so in one
/// line, waits, runs the command again, and it resumes from the last periodic checkpoint to the
/// uninterrupted losses.
#[test]
fn a_crashed_run_is_restarted_and_resumes_to_the_same_losses() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let want = reference();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut child = restart_sh(&["-n", "3", "--backoff", "1"], &mpirun(&out, &["run.resume=auto"])).spawn().unwrap();
    wait_for_step(&out, 120, &mut child);
    // restart.sh -> mpirun -> ranks: kill the last rank.
    let mpirun_pid = *children(child.id()).first().expect("restart.sh runs mpirun");
    let rank = *children(mpirun_pid).last().expect("mpirun has ranks");
    kill(rank, "KILL");
    let o = child.wait_with_output().unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    let restarts: Vec<&str> = t.lines().filter(|l| l.starts_with("restart.sh: the run crashed")).collect();
    assert_eq!(restarts.len(), 1, "one line per restart\n{t}");
    assert!(restarts[0].contains("restart 1 of 3 in 1s"), "{t}");
    // The second attempt starts from a periodic checkpoint (every 50 steps), not from step 0.
    let starts: Vec<u64> = t.lines().filter_map(|l| l.strip_prefix("training ")?.split("steps ").nth(1)?.split("..").next()?.parse().ok()).collect();
    assert_eq!(starts.len(), 2, "{t}");
    assert!(starts[0] == 0 && starts[1] >= 100 && starts[1].is_multiple_of(50), "the restart did not resume: {starts:?}\n{t}");
    assert_eq!(losses(&out), want, "the restarted run's losses differ from an uninterrupted run");
}

/// SIGTERM to restart.sh: the run gets SIGUSR1 through mpirun, every rank stops with a checkpoint,
/// the script exits 75 without restarting; running it again finishes to the same losses.
#[test]
fn a_signal_to_the_script_stops_the_run_with_a_checkpoint_and_no_restart() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let want = reference();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cmd = mpirun(&out, &["run.resume=auto"]);
    let mut child = restart_sh(&["--backoff", "0"], &cmd).spawn().unwrap();
    wait_for_step(&out, 20, &mut child);
    kill(child.id(), "TERM");
    let o = child.wait_with_output().unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(75), "{t}");
    assert!(t.contains("stopped by SIGUSR1") && t.contains("will not be restarted"), "{t}");
    assert!(!t.contains("restart 1 of"), "restarted after a signal\n{t}");
    let latest = checkpoint::latest(&out).unwrap().expect("a checkpoint");
    let stopped = checkpoint::read_state(&latest).unwrap().step;
    assert!((20..STEPS).contains(&stopped), "stopped at {stopped}");

    let o = restart_sh(&["--backoff", "0"], &cmd).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(losses(&out), want);
}

/// Without run.resume=auto a restart would start over (or fail): refused in one line.
#[test]
fn a_command_without_resume_auto_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let o = restart_sh(&[], &mpirun(&dir.path().join("run"), &[])).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let t = text(&o);
    assert_eq!(t.lines().count(), 1, "{t}");
    assert!(t.contains("run.resume=auto"), "{t}");
    assert!(!dir.path().join("run").exists(), "the command ran");
}

/// Exit 2 (fabbrica refused its input) is not retried.
#[test]
fn a_user_error_is_not_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cmd: Vec<String> = [BIN, "train", "--set", "run.resume=auto", "--set", "train.max_steps=-1", "--set"]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("run.out_dir={}", out.display())])
        .collect();
    let o = restart_sh(&["--backoff", "0"], &cmd).output().unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains("not restarting") && !t.contains("restart 1 of"), "{t}");
}

/// restart.sh sets mpirun's teardown pace (odls_base_sigkill_timeout) to 5 s unless told otherwise.
#[test]
fn the_sigkill_timeout_defaults_to_5_seconds() {
    let echo = |preset: Option<&str>| {
        let mut c = restart_sh(&[], &["sh".into(), "-c".into(), "echo \"t=$OMPI_MCA_odls_base_sigkill_timeout\"".into(), "run.resume=auto".into()]);
        match preset {
            Some(v) => c.env("OMPI_MCA_odls_base_sigkill_timeout", v),
            None => c.env_remove("OMPI_MCA_odls_base_sigkill_timeout"),
        };
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(echo(None), "t=5");
    assert_eq!(echo(Some("7")), "t=7");
}

/// A command that keeps failing is restarted MAX times, after 1, 2, 4... seconds, then the script
/// gives up with its exit code.
#[test]
fn restarts_are_bounded_and_back_off_exponentially() {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("count");
    let cmd: Vec<String> = ["sh", "-c", "echo x >> \"$0\"; exit 3"]
        .iter()
        .map(|s| s.to_string())
        .chain([count.display().to_string(), "run.resume=auto".into()])
        .collect();
    let t0 = Instant::now();
    let o = restart_sh(&["-n", "2", "--backoff", "1"], &cmd).output().unwrap();
    let took = t0.elapsed();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(3), "{t}");
    assert_eq!(fs::read_to_string(&count).unwrap().lines().count(), 3, "one run and two restarts\n{t}");
    assert!(t.contains("restart 1 of 2 in 1s") && t.contains("restart 2 of 2 in 2s") && t.contains("giving up after 2 restarts"), "{t}");
    assert!(took >= Duration::from_secs(3), "backoff 1 s + 2 s, took {took:?}");
}
