//! Issue 9, "Nothing lost", end to end on the real binary: checkpoint retention across re-runs,
//! resume that finds its checkpoint by itself and falls back past a corrupt one, temporaries of
//! dead writers, NaN/Inf steps (one process and under mpirun), and a full disk (a real tmpfs of a
//! few hundred KiB, mounted in a private mount namespace).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use fabbrica_train::checkpoint;
use fabbrica_train::metrics::{read, Record};

mod common;

/// One job at a time: 2 cores, and the mpirun jobs oversubscribe them.
static SERIAL: Mutex<()> = Mutex::new(());

/// A model of about 6k parameters: a few ms per step, checkpoints of about 80 KiB.
fn base(out: &Path) -> Vec<String> {
    [
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=16",
        "model.block_size=16",
        "train.batch_size=2",
        "train.warmup_steps=2",
        "train.log_interval=1",
        "train.eval_interval=1000",
        "train.eval_iters=2",
        "run.sample_tokens=0",
        "run.threads=1",
        &format!("run.out_dir={}", out.display()),
        &common::corpus_set(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn command(np: usize, out: &Path, sets: &[&str]) -> Command {
    common::train_command(np, &[], base(out).iter().map(String::as_str).chain(sets.iter().copied()))
}

/// As [`command`] under mpirun with `FABBRICA_INJECT_NAN=spec` passed to every rank.
fn command_injecting(np: usize, spec: &str, out: &Path, sets: &[&str]) -> Command {
    let x = format!("FABBRICA_INJECT_NAN={spec}");
    common::train_command(np, &["-x", &x], base(out).iter().map(String::as_str).chain(sets.iter().copied()))
}

fn go(mut cmd: Command) -> Output {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    cmd.output().unwrap()
}

fn train(np: usize, out: &Path, sets: &[&str]) -> Output {
    go(command(np, out, sets))
}

fn text(o: &Output) -> String {
    common::describe(o)
}

fn ok(o: &Output) {
    assert!(o.status.success(), "expected success\n{}", text(o));
}

/// Exit code `code`, exactly one `error:` line on stderr holding every needle, no panic.
fn one_line_error(o: &Output, code: i32, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(code), "{}", text(o));
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one error line\n{}", text(o));
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{}", text(o));
    for n in needles {
        assert!(errors[0].contains(n), "error line lacks {n:?}\n{}", text(o));
    }
    errors[0].to_string()
}

fn steps(out: &Path) -> Vec<u64> {
    checkpoint::list(&checkpoint::checkpoints_dir(out)).unwrap().into_iter().map(|(s, _)| s).collect()
}

fn latest_step(out: &Path) -> u64 {
    let name = fs::read_to_string(checkpoint::checkpoints_dir(out).join("latest")).unwrap();
    checkpoint::parse_dir_name(name.trim()).unwrap()
}

fn train_records(out: &Path) -> Vec<Record> {
    read(&out.join("metrics.jsonl")).unwrap().into_iter().filter(|r| r.kind == "train").collect()
}

fn archives(out: &Path) -> Vec<PathBuf> {
    fs::read_dir(out.join("archive")).map(|rd| rd.map(|e| e.unwrap().path()).collect()).unwrap_or_default()
}

/// 9.1: a shorter fresh run into a directory with a longer run's checkpoints is refused before
/// training (nothing changes), or with run.if_exists=archive moves the earlier run aside whole;
/// its own checkpoint is never removed by retention.
#[test]
fn a_shorter_rerun_never_loses_either_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    ok(&train(0, &out, &["train.max_steps=30", "run.checkpoint_interval=10"]));
    assert_eq!(steps(&out), vec![20, 30]);
    let before = fs::read(out.join("metrics.jsonl")).unwrap();

    let o = train(0, &out, &["train.max_steps=15"]);
    one_line_error(&o, 2, &["already holds checkpoints", "step_00000030", "run.resume=true", "run.if_exists=archive"]);
    assert!(String::from_utf8_lossy(&o.stdout).is_empty(), "it trained before refusing\n{}", text(&o));
    assert_eq!(steps(&out), vec![20, 30]);
    assert_eq!(fs::read(out.join("metrics.jsonl")).unwrap(), before, "the earlier run's metrics changed");

    let o = train(0, &out, &["train.max_steps=15", "run.if_exists=archive"]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("run.if_exists = archive"), "{}", text(&o));
    assert_eq!(steps(&out), vec![15], "the new run's own checkpoint must survive retention");
    assert_eq!(latest_step(&out), 15);
    let a = archives(&out);
    assert_eq!(a.len(), 1);
    assert_eq!(fs::read(a[0].join("metrics.jsonl")).unwrap(), before);
    for s in ["step_00000020", "step_00000030"] {
        checkpoint::load(&a[0].join("checkpoints").join(s)).unwrap();
    }
    // The new run resumes from its own checkpoint.
    ok(&train(0, &out, &["train.max_steps=18", "run.resume=true"]));
    assert_eq!(steps(&out), vec![15, 18]);
    assert_eq!(train_records(&out).last().unwrap().step, 18);
}

/// 9.2: resume finds the newest checkpoint without `latest`; resume with nothing is an error.
#[test]
fn resume_finds_its_checkpoint_and_refuses_to_start_over() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = train(0, &out, &["train.max_steps=10", "run.resume=true"]);
    one_line_error(&o, 2, &["no checkpoint to resume from", "run.resume=false"]);
    assert!(steps(&out).is_empty());

    ok(&train(0, &out, &["train.max_steps=20", "run.checkpoint_interval=10", "run.stop_at=20"]));
    fs::remove_file(checkpoint::checkpoints_dir(&out).join("latest")).unwrap();
    ok(&train(0, &out, &["train.max_steps=25", "run.checkpoint_interval=10", "run.resume=true"]));
    let recs = train_records(&out);
    let logged: Vec<u64> = recs.iter().map(|r| r.step).collect();
    assert_eq!(logged, (1..=25).collect::<Vec<u64>>(), "resume did not continue from step 20");
    assert_eq!(steps(&out), vec![20, 25]);
}

/// 9.3: a corrupt newest checkpoint is passed over (saying which and why) for the newest valid
/// one and moved aside; run.resume_from picks one; an edited state.json is refused.
#[test]
fn a_corrupt_newest_checkpoint_falls_back_and_resume_from_chooses() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    ok(&train(0, &out, &["train.max_steps=30", "run.checkpoint_interval=10", "run.keep_checkpoints=3"]));
    assert_eq!(steps(&out), vec![10, 20, 30]);
    let root = checkpoint::checkpoints_dir(&out);
    let model = root.join("step_00000030/model.safetensors");
    let mut bytes = fs::read(&model).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xFF;
    fs::write(&model, bytes).unwrap();

    // `sample` reads the run as it is: it says what it passed over (and moves nothing).
    let o = common::fabbrica(&["sample", "--checkpoint", out.to_str().unwrap(), "--tokens", "5", "--device", "cpu"]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("note: passed over step_00000030") && err.contains("using the checkpoint of step 20"), "{}", text(&o));
    assert!(root.join("step_00000030").is_dir());

    let o = train(0, &out, &["train.max_steps=35", "run.checkpoint_interval=10", "run.keep_checkpoints=3", "run.resume=true"]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("passed over") && err.contains("step_00000030") && err.contains("corrupt"), "{}", text(&o));
    assert!(err.contains("resuming from") && err.contains("step_00000020"), "{}", text(&o));
    // Resumed at 20: steps 21..35 trained (writing a new, valid step_30), and the corrupt 30 was
    // moved aside, not deleted.
    assert_eq!(steps(&out), vec![20, 30, 35]);
    checkpoint::load(&root.join("step_00000030")).unwrap();
    let a = archives(&out);
    assert_eq!(a.len(), 1);
    assert!(a[0].join("checkpoints/step_00000030/model.safetensors").is_file());
    let logged: Vec<u64> = train_records(&out).iter().map(|r| r.step).collect();
    assert_eq!(logged, (1..=35).collect::<Vec<u64>>());

    // run.resume_from = an older checkpoint: the newer ones are moved aside, the run goes on from 20.
    let from = root.join("step_00000020");
    ok(&train(0, &out, &["train.max_steps=22", &format!("run.resume_from={}", from.display())]));
    assert_eq!(steps(&out), vec![20, 22]);
    assert_eq!(archives(&out).len(), 2);

    // An edited state.json (its step) is refused, naming the file, with nothing else to fall back to
    // when it is the one chosen.
    let state = root.join("step_00000022/state.json");
    let t = fs::read_to_string(&state).unwrap().replace("\"step\": 22", "\"step\": 21");
    fs::write(&state, t).unwrap();
    let o = train(0, &out, &["train.max_steps=24", &format!("run.resume_from={}", root.join("step_00000022").display())]);
    one_line_error(&o, 2, &["run.resume_from", "state.json", "edited or damaged"]);
}

/// 9.4: temporaries of writers that died are removed at start (saying how much was freed); a
/// live writer's is left alone.
#[test]
fn temporaries_of_dead_writers_are_removed_live_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    ok(&train(0, &out, &["train.max_steps=4", "run.checkpoint_interval=2"]));
    let root = checkpoint::checkpoints_dir(&out);
    let hostname = String::from_utf8(Command::new("hostname").output().unwrap().stdout).unwrap();
    let hostname: String = hostname.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect();
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let mut live = Command::new("sleep").arg("60").spawn().unwrap();
    let stale = root.join(format!(".step_00000006.tmp-{dead}@{hostname}"));
    fs::create_dir(&stale).unwrap();
    fs::write(stale.join("model.safetensors"), vec![7u8; 3 << 20]).unwrap();
    let stale_latest = root.join(format!(".latest.tmp-{dead}@{hostname}"));
    fs::write(&stale_latest, "step_00000006\n").unwrap();
    let busy = root.join(format!(".step_00000006.tmp-{}@{hostname}", live.id()));
    fs::create_dir(&busy).unwrap();

    let o = train(0, &out, &["train.max_steps=6", "run.checkpoint_interval=2", "run.resume=true"]);
    let _ = live.kill();
    let _ = live.wait();
    ok(&o);
    assert!(!stale.exists() && !stale_latest.exists(), "a dead writer's temporary is still there");
    assert!(busy.exists(), "a live writer's temporary was removed");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("removed 2 temporaries") && err.contains("3.0 MiB"), "{}", text(&o));
    assert_eq!(steps(&out), vec![4, 6]);
}

/// 9.6: a NaN injected into one rank's loss under data parallelism is seen by every rank in the
/// same step: `stop` ends the job naming step and rank and writes no checkpoint; `skip` drops the
/// update (the optimizer's step count shows it) and trains on.
#[test]
fn a_nan_on_one_rank_stops_or_skips_on_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("stop");
    let o = go(command_injecting(2, "5:1", &out, &["train.max_steps=10", "run.checkpoint_interval=3"]));
    one_line_error(&o, 2, &["step 5", "NaN on rank 1", "train.nonfinite = stop", "step_00000003", "train.nonfinite=skip"]);
    assert_eq!(steps(&out), vec![3], "a checkpoint was written at or after the NaN");
    let logged: Vec<u64> = train_records(&out).iter().map(|r| r.step).collect();
    assert_eq!(logged, vec![1, 2, 3, 4]);

    let out = dir.path().join("skip");
    let cmd = command_injecting(2, "5:1", &out, &["train.max_steps=8", "train.nonfinite=skip"]);
    let o = go(cmd);
    ok(&o);
    let recs = read(&out.join("metrics.jsonl")).unwrap();
    let skipped: Vec<&Record> = recs.iter().filter(|r| r.kind == "skipped").collect();
    assert_eq!(skipped.len(), 1, "{recs:?}");
    assert_eq!(skipped[0].step, 5);
    assert!(skipped[0].note.as_deref().unwrap().contains("NaN on rank 1"), "{:?}", skipped[0]);
    let ck = checkpoint::load(&checkpoint::latest(&out).unwrap().unwrap()).unwrap();
    assert_eq!((ck.state.step, ck.state.skipped_steps), (8, 1));
    // AdamW took 7 steps, not 8: the skipped update left the optimizer state untouched.
    let counts: Vec<f64> = ck.optim.iter().filter(|(n, _)| n.ends_with(".step")).map(|(_, t)| t.double_value(&[])).collect();
    assert!(!counts.is_empty() && counts.iter().all(|&c| c == 7.0), "{counts:?}");
    for (n, t) in &ck.model {
        assert!(bool::try_from(t.isfinite().all()).unwrap(), "{n} is not finite");
    }
}

/// 9.6: a learning rate that blows the model up (1e6) stops with one line at the first NaN/Inf
/// instead of writing NaN checkpoints and panicking in `sample`; the last good checkpoint stays.
/// With `skip`, more than train.max_skipped_steps bad steps stop it too.
#[test]
fn a_diverging_run_stops_before_writing_a_nan_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = train(
        0,
        &out,
        &["train.max_steps=60", "train.lr=1e6", "train.warmup_steps=0", "train.grad_clip=0", "run.checkpoint_interval=1", "run.sample_tokens=50"],
    );
    let line = one_line_error(&o, 2, &["train.nonfinite = stop", "stopped without writing a checkpoint"]);
    assert!(line.contains("NaN") || line.contains("inf"), "{line}");
    // The advice fits what is there: resume from a checkpoint, or start again without one.
    let any = !checkpoint::list(&checkpoint::checkpoints_dir(&out)).unwrap().is_empty();
    assert_eq!((line.contains("resume with run.resume=true"), line.contains("no checkpoint to resume from")), (any, !any), "{line}");
    for (_, d) in checkpoint::list(&checkpoint::checkpoints_dir(&out)).unwrap() {
        let ck = checkpoint::load(&d).unwrap();
        for (n, t) in ck.model.iter().chain(ck.optim.iter()) {
            assert!(bool::try_from(t.isfinite().all()).unwrap(), "{} holds {n} non-finite", d.display());
        }
    }
    let out = dir.path().join("skip");
    let o = train(
        0,
        &out,
        &["train.max_steps=60", "train.lr=1e6", "train.warmup_steps=0", "train.grad_clip=0", "train.nonfinite=skip", "train.max_skipped_steps=2"],
    );
    let line = one_line_error(&o, 2, &["3 steps skipped", "train.max_skipped_steps = 2"]);
    assert!(checkpoint::list(&checkpoint::checkpoints_dir(&out)).unwrap().is_empty());
    assert!(line.contains("run it again from the start (there is no checkpoint to resume from)"), "{line}");
}

/// Runs `fabbrica train` with `run.out_dir` on a fresh tmpfs of `kib` KiB in a private mount
/// namespace (root only; the test says so and fails elsewhere).
fn train_on_small_disk(kib: u64, sets: &[&str]) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("disk");
    fs::create_dir(&mnt).unwrap();
    let out = mnt.join("run");
    let cmd = command(0, &out, sets);
    let prog = cmd.get_program().to_string_lossy().into_owned();
    let args: Vec<String> = cmd.get_args().map(|a| format!("'{}'", a.to_string_lossy())).collect();
    // The training runs inside the namespace; the test reads the outcome from a copy made there.
    let script = format!(
        "mount -t tmpfs -o size={kib}k tmpfs '{m}' && {prog} {a}; rc=$?; cp -r '{m}/run' '{d}/copy' 2>/dev/null; exit $rc",
        m = mnt.display(),
        a = args.join(" "),
        d = dir.path().display()
    );
    let mut c = Command::new("unshare");
    c.args(["-m", "--propagation", "private", "sh", "-c", &script]).env("RUST_BACKTRACE", "1");
    let o = go(c);
    (o, dir)
}

/// 9.8: a full disk during a checkpoint says which path, how much was needed and what to do; the
/// previous checkpoint stays valid and no temporary is left. `continue` trains on and tries again.
#[test]
fn a_full_disk_keeps_the_previous_checkpoint_and_says_what_to_do() {
    // About 80 KiB per checkpoint: 160 KiB hold one, not two.
    let sets = ["train.max_steps=6", "run.checkpoint_interval=2", "run.keep_checkpoints=2"];
    let (o, dir) = train_on_small_disk(160, &sets);
    let line = one_line_error(&o, 1, &["checkpoint of step 4", "the disk is full", "needs about", "free", "run.out_dir", "step_00000002 is kept"]);
    assert!(!line.contains("IoError") && !line.contains("Os {"), "{line}");
    let copy = dir.path().join("copy");
    assert_eq!(steps(&copy), vec![2]);
    checkpoint::load(&checkpoint::checkpoints_dir(&copy).join("step_00000002")).unwrap();
    let leftovers: Vec<String> = fs::read_dir(checkpoint::checkpoints_dir(&copy))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let mut sets = sets.to_vec();
    sets.push("run.checkpoint_failure=continue");
    let (o, dir) = train_on_small_disk(160, &sets);
    // Steps 4 and 6 fail; training went on to the end, and the last checkpoint must succeed.
    one_line_error(&o, 1, &["checkpoint of step 6", "the disk is full"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("warning: cannot write the checkpoint of step 4") && out.contains("run.checkpoint_failure = continue"), "{}", text(&o));
    let copy = dir.path().join("copy");
    let recs = read(&copy.join("metrics.jsonl")).unwrap();
    let failed: Vec<u64> = recs.iter().filter(|r| r.kind == "checkpoint_failed").map(|r| r.step).collect();
    assert_eq!(failed, vec![4]);
    assert_eq!(recs.iter().filter(|r| r.kind == "train").map(|r| r.step).max(), Some(6));
    assert_eq!(steps(&copy), vec![2]);
}

/// 9.6: `sample` from a checkpoint with NaN weights (written by an older version, which did not
/// check) says so in one line instead of panicking in the multinomial draw.
#[test]
fn sampling_a_nan_checkpoint_of_an_older_version_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    ok(&train(0, &out, &["train.max_steps=2"]));
    let ck = checkpoint::latest(&out).unwrap().unwrap();
    let model = ck.join("model.safetensors");
    let tensors = tch::Tensor::read_safetensors(&model).unwrap();
    let poisoned: Vec<(String, tch::Tensor)> =
        tensors.into_iter().map(|(n, t)| if n.ends_with("wte.weight") { (n, t * f64::NAN) } else { (n, t) }).collect();
    tch::Tensor::write_safetensors(&poisoned, &model).unwrap();
    let sum = String::from_utf8(Command::new("sha256sum").arg(&model).output().unwrap().stdout).unwrap();
    // A version-1 state.json: no checksum of its own, the model file's checksum updated.
    let p = ck.join("state.json");
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    let o = v.as_object_mut().unwrap();
    o.insert("format_version".into(), 1.into());
    o.remove("state_sha256");
    o["sha256"]["model.safetensors"] = sum.split_whitespace().next().unwrap().into();
    fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let o = go({
        let mut c = Command::new(env!("CARGO_BIN_EXE_fabbrica"));
        c.args(["sample", "--checkpoint"]).arg(&ck).args(["--tokens", "5", "--device", "cpu"]).env("RUST_BACKTRACE", "1");
        c
    });
    one_line_error(&o, 2, &["wte.weight", "NaN or Inf", "earlier checkpoint"]);
}

/// A closed standard output (`fabbrica train | head -1`) loses a printed line, never the run:
/// training goes on to its end, with every step in metrics.jsonl and its checkpoint.
#[test]
fn a_closed_stdout_does_not_end_the_run() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut child =
        command(0, &out, &["train.max_steps=40"]).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    // The reader is gone: every later write to stdout fails with EPIPE.
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{first}\n{}", text(&o));
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"), "{}", text(&o));
    assert_eq!(steps(&out), vec![40]);
    let logged: Vec<u64> = read(&out.join("metrics.jsonl")).unwrap().iter().filter(|r| r.kind == "train").map(|r| r.step).collect();
    assert_eq!(logged, (1..=40).collect::<Vec<u64>>());
}

/// `fabbrica train > log` from a terminal: the bar stays on the terminal (stderr) and every line
/// (the start, each logged step, evaluations, the end) goes to the log, none lost to the bar.
/// `script` gives the run a terminal, as an interactive shell would.
#[test]
fn a_redirected_stdout_keeps_every_line_while_the_terminal_shows_the_bar() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let log = dir.path().join("train.log");
    let cmd = command(0, &out, &["train.max_steps=5"]);
    let mut line = format!("{:?}", cmd.get_program());
    for a in cmd.get_args() {
        line.push(' ');
        line.push_str(&format!("'{}'", a.to_string_lossy()));
    }
    line.push_str(&format!(" > '{}'", log.display()));
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let o = Command::new("script").args(["-qec", &line, "/dev/null"]).env("RUST_BACKTRACE", "1").output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let logged = fs::read_to_string(&log).unwrap();
    for want in ["step 1: loss", "step 5: loss", "step 5: train loss", "finished 5 steps"] {
        assert!(logged.contains(want), "{want:?} missing from the log:\n{logged}");
    }
}
