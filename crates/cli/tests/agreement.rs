//! Issue 9, "Ranks that disagree corrupt memory": ranks launched with different configurations or
//! data (an MPMD `mpirun -np 1 fabbrica ... : -np 1 fabbrica ...`) must stop before the first
//! collective whose sizes depend on the setup, with one `error:` line that names the first
//! differing key and which rank has which value, exit code 2, and no heap corruption, panic or
//! hang. Keys that are rank-local by design (run.threads, data.path, ...) may differ.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One job at a time: 2 cores, and every job oversubscribes them.
static SERIAL: Mutex<()> = Mutex::new(());

/// A job that takes longer than this hangs (each run here takes a few seconds).
const LIMIT: Duration = Duration::from_secs(120);

/// A model of a few thousand parameters, 3 steps.
fn base(out: &Path, data: &Path) -> Vec<String> {
    [
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=16",
        "model.block_size=16",
        "train.batch_size=2",
        "train.max_steps=3",
        "train.warmup_steps=1",
        "train.log_interval=1",
        "train.eval_interval=1000",
        "train.eval_iters=2",
        "run.sample_tokens=0",
        "run.threads=1",
        &format!("run.out_dir={}", out.display()),
        &format!("data.path={}", data.display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Text whose characters are `alphabet`, long enough for a 16-token window in each split.
fn corpus(dir: &Path, name: &str, alphabet: &str) -> PathBuf {
    let chars: Vec<char> = alphabet.chars().collect();
    let text: String = (0..4000).map(|i| chars[(i * 7 + i / 13) % chars.len()]).collect();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `mpirun --oversubscribe -np 1 fabbrica train <base0 + sets0> : -np 1 fabbrica train <base1 + sets1>`,
/// killed if it runs past [`LIMIT`]. Returns the output and how long it took.
fn mpmd(out: &Path, data: [&Path; 2], sets: [&[&str]; 2]) -> (Output, Duration) {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let bin = env!("CARGO_BIN_EXE_fabbrica");
    let mut cmd = Command::new("mpirun");
    cmd.arg("--oversubscribe");
    for r in 0..2 {
        if r > 0 {
            cmd.arg(":");
        }
        cmd.args(["-np", "1", bin, "train"]);
        for s in base(out, data[r]).iter().map(String::as_str).chain(sets[r].iter().copied()) {
            cmd.args(["--set", s]);
        }
    }
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_plm", "isolated")
        .env("RUST_BACKTRACE", "1")
        .env_remove("FABBRICA_COMM_DEBUG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("cannot run mpirun");
    let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let read_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut so, &mut v).ok();
        v
    });
    let read_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut se, &mut v).ok();
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > LIMIT {
            // SIGTERM first: mpirun then ends its ranks too.
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            std::thread::sleep(Duration::from_secs(5));
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = start.elapsed();
    let o = Output { status, stdout: read_out.join().unwrap(), stderr: read_err.join().unwrap() };
    (o, took)
}

fn describe(o: &Output) -> String {
    format!(
        "exit status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Exit code 2 within the limit, exactly one `error:` line (from one rank) containing every
/// needle, and no sign of memory corruption or a panic anywhere in the output.
fn assert_disagreement(o: &Output, took: Duration, needles: &[&str]) -> String {
    let all = describe(o);
    assert!(took < LIMIT, "the job hung ({took:?})\n{all}");
    assert_eq!(o.status.code(), Some(2), "expected exit code 2\n{all}");
    for bad in ["munmap", "free():", "double free", "corrupted", "panicked", "backtrace", "Signal:", "core dumped"] {
        assert!(!all.contains(bad), "{bad:?} in the output\n{all}");
    }
    let stderr = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line\n{all}");
    let line = lines[0];
    assert!(line.starts_with("error: "), "{all}");
    assert!(line.contains("ranks disagree on") && line.contains("same configuration and data"), "{all}");
    for n in needles {
        assert!(line.contains(n), "the error line does not mention {n:?}\n{all}");
    }
    line.to_string()
}

#[test]
fn a_different_model_shape_on_one_rank_is_one_line_not_heap_corruption() {
    let t = tempfile::tempdir().unwrap();
    let data = corpus(t.path(), "a.txt", "abcdefghij ");
    let (o, took) = mpmd(&t.path().join("out"), [&data, &data], [&[], &["model.n_layer=2"]]);
    assert_disagreement(&o, took, &["model.n_layer", "rank 0 has 1", "rank 1 has 2"]);
}

#[test]
fn a_different_learning_rate_is_named_with_both_values() {
    let t = tempfile::tempdir().unwrap();
    let data = corpus(t.path(), "a.txt", "abcdefghij ");
    let (o, took) = mpmd(&t.path().join("out"), [&data, &data], [&["train.lr=0.001"], &["train.lr=0.002"]]);
    let line = assert_disagreement(&o, took, &["train.lr", "rank 0 has 0.001", "rank 1 has 0.002"]);
    assert!(!line.contains("model."), "{line}");
}

#[test]
fn different_step_counts_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let data = corpus(t.path(), "a.txt", "abcdefghij ");
    let (o, took) = mpmd(&t.path().join("out"), [&data, &data], [&["train.max_steps=3"], &["train.max_steps=5"]]);
    assert_disagreement(&o, took, &["train.max_steps", "rank 0 has 3", "rank 1 has 5"]);
}

#[test]
fn different_data_files_are_named_by_what_differs_in_them() {
    let t = tempfile::tempdir().unwrap();
    // Different vocabularies: 11 characters against 15.
    let a = corpus(t.path(), "a.txt", "abcdefghij ");
    let b = corpus(t.path(), "b.txt", "abcdefghijklmn ");
    let (o, took) = mpmd(&t.path().join("out"), [&a, &b], [&[], &[]]);
    assert_disagreement(&o, took, &["data.vocab_size", "rank 0 has 11", "rank 1 has 15"]);
    // Same vocabulary and length, other text.
    let c = corpus(t.path(), "c.txt", "jihgfedcba ");
    let (o, took) = mpmd(&t.path().join("out2"), [&a, &c], [&[], &[]]);
    assert_disagreement(&o, took, &["data.token_sample_hash"]);
}

#[test]
fn rank_local_settings_may_differ_and_the_job_trains() {
    let t = tempfile::tempdir().unwrap();
    // The same data under another path (as a node-local copy would be) and another thread count.
    let a = corpus(t.path(), "a.txt", "abcdefghij ");
    let copy_dir = t.path().join("node2");
    std::fs::create_dir(&copy_dir).unwrap();
    let b = copy_dir.join("a.txt");
    std::fs::copy(&a, &b).unwrap();
    let out = t.path().join("out");
    // comm.debug on one rank only: the communicator turns it on for every rank (it changes which
    // calls a rank makes, so a split would hang at the first collective).
    let (o, took) = mpmd(&out, [&a, &b], [&["run.threads=1"], &["run.threads=2", "comm.timeout_s=300", "comm.debug=true"]]);
    let all = describe(&o);
    assert!(took < LIMIT, "the job hung\n{all}");
    assert_eq!(o.status.code(), Some(0), "{all}");
    assert!(!String::from_utf8_lossy(&o.stderr).contains("error:"), "{all}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("finished 3 steps"), "{all}");
    assert!(out.join("metrics.jsonl").exists(), "{all}");
}

/// One process (no launcher) with `base` + `sets`; must succeed.
fn single(out: &Path, data: &Path, sets: &[&str]) {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fabbrica"));
    cmd.arg("train");
    for s in base(out, data).iter().map(String::as_str).chain(sets.iter().copied()) {
        cmd.args(["--set", s]);
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", describe(&o));
}

#[test]
fn ranks_never_resume_from_different_steps() {
    let t = tempfile::tempdir().unwrap();
    let data = corpus(t.path(), "a.txt", "abcdefghij ");
    // Two run directories (node-local, as run.out_dir may be) holding checkpoints of steps 2 and 3.
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    single(&a, &data, &["run.stop_at=2"]);
    single(&b, &data, &[]);
    let (o, took) = mpmd(&a, [&data, &data], [&["run.resume=true"], &["run.resume=true", &format!("run.out_dir={}", b.display())]]);
    assert_disagreement(&o, took, &["resume.step", "rank 0 has 2", "rank 1 has 3"]);
}
