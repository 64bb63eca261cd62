//! Data parallelism end to end: `fabbrica train` under a real `mpirun` against one process with
//! the same global batch through accumulation (fp32, CPU).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use fabbrica_train::metrics::{read, Record};

/// One job at a time: 2 cores, and every job oversubscribes them.
static SERIAL: Mutex<()> = Mutex::new(());

const STEPS: u64 = 20;

/// A small model and batch so that 20 steps take a few seconds; dropout on, so the per-micro-batch
/// RNG streams are part of what must match.
fn base(out: &Path) -> Vec<String> {
    [
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=32",
        "model.dropout=0.1",
        "train.batch_size=2",
        &format!("train.max_steps={STEPS}"),
        "train.warmup_steps=5",
        "train.log_interval=1",
        "train.eval_interval=10",
        "train.eval_iters=4",
        "run.sample_tokens=0",
        "run.threads=1",
        "parallel.bucket_mb=0.01", // several buckets even for this model
        &format!("run.out_dir={}", out.display()),
        &format!("data.path={}/../../data/pystdlib.txt", env!("CARGO_MANIFEST_DIR")),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(np: usize, out: &Path, sets: &[&str]) -> Vec<Record> {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut args: Vec<String> = vec!["train".into()];
    for s in base(out).iter().map(String::as_str).chain(sets.iter().copied()) {
        args.push("--set".into());
        args.push(s.into());
    }
    let bin = env!("CARGO_BIN_EXE_fabbrica");
    let mut cmd = if np == 0 {
        Command::new(bin)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["-np", &np.to_string(), "--oversubscribe", bin]);
        c
    };
    let o = cmd
        .args(&args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_plm", "isolated")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "np={np} {sets:?} failed:\n{text}");
    read(&out.join("metrics.jsonl")).unwrap()
}

fn losses(r: &[Record]) -> Vec<f64> {
    r.iter().filter(|x| x.kind == "train").map(|x| x.loss.unwrap()).collect()
}

fn assert_close(a: &[f64], b: &[f64], rel: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: step counts differ");
    assert_eq!(a.len() as u64, STEPS, "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let d = (x - y).abs() / x.abs().max(1e-12);
        assert!(d <= rel, "{what}: step {} loss {x} vs {y} (relative difference {d:.2e} > {rel:.0e})", i + 1);
    }
}

fn assert_weights_close(a: &Path, b: &Path, rel: f64) {
    let (name, d) = common::max_weight_diff(a, b);
    assert!(d <= rel, "final weights {name}: relative difference {d:.2e} > {rel:.0e}");
}

#[test]
fn two_and_four_ranks_match_one_rank_with_accumulation() {
    let t = tempfile::tempdir().unwrap();
    let (one, two, four) = (t.path().join("1"), t.path().join("2"), t.path().join("4"));
    let l1 = losses(&run(0, &one, &["train.grad_accum=4"]));
    let l2 = run(2, &two, &["train.grad_accum=2"]);
    let l4 = losses(&run(4, &four, &["train.grad_accum=1"]));
    assert_close(&l1, &losses(&l2), 1e-5, "2 ranks x accum 2 vs 1 rank x accum 4");
    assert_close(&l1, &l4, 1e-5, "4 ranks vs 1 rank x accum 4");
    assert_weights_close(&one, &two, 1e-5);
    assert_weights_close(&one, &four, 1e-5);
    // The loss actually moved, so equality is not trivial.
    assert!(l1[STEPS as usize - 1] < l1[0] - 0.1, "{l1:?}");
    // Straggler report: every rank's times, and the slowest named.
    let s = l2.iter().find_map(|r| r.stragglers.clone()).expect("a straggler report");
    assert_eq!((s.compute_ms.len(), s.comm_wait_ms.len()), (2, 2));
    assert!(s.slowest_rank < 2 && s.compute_ms.iter().all(|&c| c > 0.0), "{s:?}");
}

#[test]
fn zero1_overlap_and_bf16_reduction() {
    let t = tempfile::tempdir().unwrap();
    let dir = |s: &str| t.path().join(s);
    let plain = losses(&run(2, &dir("plain"), &[]));
    let zero = losses(&run(2, &dir("zero"), &["parallel.zero=1"]));
    assert_close(&plain, &zero, 1e-5, "ZeRO-1 vs plain data parallelism");
    assert_weights_close(&dir("plain"), &dir("zero"), 1e-5);
    // Debug mode: parameter checksums after the broadcast and a signature check before every
    // collective; same results.
    let debug = losses(&run(2, &dir("debug"), &["comm.debug=true"]));
    assert_eq!(plain, debug, "debug mode must not change results");
    let no_overlap = losses(&run(2, &dir("seq"), &["parallel.overlap=false"]));
    assert_eq!(plain, no_overlap, "overlap on and off must give identical losses");
    // bf16 carries 8 significant bits: each reduced gradient is off by up to 2^-9 relative, and
    // over 20 steps the loss stays within 1e-3 (measured: ~1e-5).
    let bf16 = losses(&run(2, &dir("bf16"), &["parallel.reduce_dtype=bf16"]));
    assert_close(&plain, &bf16, 1e-3, "bf16 reduction");
    assert_ne!(plain, bf16, "bf16 reduction should not be bit-identical to fp32");
    let zero3 = losses(&run(3, &dir("zero3"), &["parallel.zero=1", "train.grad_accum=2"]));
    let one6 = losses(&run(0, &dir("one6"), &["train.grad_accum=6"]));
    assert_close(&one6, &zero3, 1e-5, "ZeRO-1 over 3 ranks (shards padded) vs 1 rank x accum 6");
}

#[test]
fn resumed_data_parallel_runs_continue_identically() {
    let t = tempfile::tempdir().unwrap();
    for zero in ["parallel.zero=0", "parallel.zero=1"] {
        let (full, part) = (t.path().join(format!("full{zero}")), t.path().join(format!("part{zero}")));
        let whole = losses(&run(2, &full, &[zero]));
        run(2, &part, &[zero, "run.stop_at=9"]);
        let resumed = losses(&run(2, &part, &[zero, "run.resume=true"]));
        assert_eq!(whole, resumed, "{zero}: resumed losses differ from the uninterrupted run");
        assert_weights_close(&full, &part, 0.0);
    }
}

/// A ZeRO-1 checkpoint holds the whole optimizer state (the optimizer's shard pieces gathered
/// over the data-parallel group), so it resumes at another dp size, sharded or not, and the run
/// ends where the uninterrupted one ends. The pieces' boundaries differ at every dp size (3 ranks
/// also pad the buckets), so a piece loaded from the wrong elements would show.
#[test]
fn a_zero1_checkpoint_resumes_at_other_data_parallel_sizes() {
    let t = tempfile::tempdir().unwrap();
    let full = t.path().join("full");
    let whole = losses(&run(2, &full, &["parallel.zero=1", "train.grad_accum=3"]));
    for (np, accum, zero) in [(3, 2, 1), (0, 6, 0)] {
        let part = t.path().join(format!("part{np}"));
        run(2, &part, &["parallel.zero=1", "train.grad_accum=3", "run.stop_at=9"]);
        let (accum, zero) = (format!("train.grad_accum={accum}"), format!("parallel.zero={zero}"));
        let resumed = losses(&run(np, &part, &[&zero, &accum, "run.resume=true"]));
        assert_close(&whole, &resumed, 1e-5, &format!("ZeRO-1 dp=2 checkpoint resumed with {np} ranks, {zero}"));
        assert_weights_close(&full, &part, 1e-5);
    }
}

#[test]
fn a_layout_that_does_not_fit_the_world_is_one_line() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let t = tempfile::tempdir().unwrap();
    let o = Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe", env!("CARGO_BIN_EXE_fabbrica"), "train", "--set", "parallel.dp=4", "--set"])
        .arg(format!("run.out_dir={}", t.path().display()))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_plm", "isolated")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line from rank 0 only:\n{err}");
    assert!(lines[0].contains("parallel.dp") || lines[0].contains("dp"), "{}", lines[0]);
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn an_input_error_on_one_rank_is_said_once_by_that_rank_and_ends_the_job() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let t = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_fabbrica");
    let out = format!("run.out_dir={}", t.path().display());
    let good = format!("data.path={}/../../data/pystdlib.txt", env!("CARGO_MANIFEST_DIR"));
    // MPMD: rank 0 has the data, rank 1 is pointed at a file that does not exist (as when a
    // file is missing on one node).
    let o = Command::new("mpirun")
        .args([
            "--oversubscribe",
            "-np",
            "1",
            bin,
            "train",
            "--set",
            &out,
            "--set",
            &good,
            ":",
            "-np",
            "1",
            bin,
            "train",
            "--set",
            &out,
            "--set",
            "data.path=/nonexistent/corpus.txt",
        ])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_plm", "isolated")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("error: rank 1: data path /nonexistent/corpus.txt does not exist"), "{}", lines[0]);
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn dry_run_under_mpirun_prints_the_layout_once() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let o = Command::new("mpirun")
        .args([
            "-np",
            "2",
            "--oversubscribe",
            env!("CARGO_BIN_EXE_fabbrica"),
            "train",
            "--dry-run",
            "--set",
            "parallel.zero=1",
            "--set",
            "train.grad_accum=3",
        ])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_plm", "isolated")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(out.matches("global batch:").count(), 1, "{out}");
    assert!(out.contains("data parallel 2, ZeRO-1"), "{out}");
    assert!(out.contains("global batch:      192 sequences = micro 32 × accum 3 × dp 2"), "{out}");
}
