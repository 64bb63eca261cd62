//! `fabbrica bench collectives` end to end: every op under `mpirun -np 2`, an odd world (np 3),
//! bf16, plots, a world of one, the failure path of a wrong result, and bad input.
//!
//! Runs are small (up to 64 KiB, 2 timed iterations) and serialised: MPI ranks poll, and two jobs
//! side by side on a 2-core machine would mostly measure each other. The JSON is what is checked;
//! the timings themselves are never asserted.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_fabbrica");

/// One MPI job at a time.
static MPI: Mutex<()> = Mutex::new(());

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn describe(&self) -> String {
        format!("exit status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}", self.code, self.stdout, self.stderr)
    }
}

/// Runs `cmd` with its output in files (no pipe to fill up) and a deadline (a hung MPI job fails
/// the test instead of hanging it).
fn run(mut cmd: Command, dir: &Path) -> Run {
    let (out, err) = (dir.join("stdout.txt"), dir.join("stderr.txt"));
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        // Any panic or backtrace must show (and so fail the one-line contract).
        .env("RUST_BACKTRACE", "1")
        // The raw-root and launcher settings of scripts/env.sh, in case the caller did not source it.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_plm", "isolated");
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e} (is Open MPI installed and mpirun on PATH?)"));
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within 180 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run { code: status.code(), stdout: std::fs::read_to_string(&out).unwrap_or_default(), stderr: std::fs::read_to_string(&err).unwrap_or_default() }
}

/// `mpirun -np <np> --oversubscribe fabbrica bench collectives <args>`.
fn mpirun(np: usize, args: &[&str], dir: &Path, extra_env: &[(&str, &str)]) -> Run {
    let _one = MPI.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new("mpirun");
    cmd.args(["-np", &np.to_string(), "--oversubscribe", BIN, "bench", "collectives"]).args(args);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    run(cmd, dir)
}

/// `fabbrica bench collectives <args>` as a single process (a world of one).
fn single(args: &[&str], dir: &Path, extra_env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.args(["bench", "collectives"]).args(args);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    run(cmd, dir)
}

fn bus_factor(op: &str, n: f64) -> f64 {
    match op {
        "all_reduce" => 2.0 * (n - 1.0) / n,
        "all_gather" | "reduce_scatter" => (n - 1.0) / n,
        _ => 1.0,
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-12)
}

/// Checks the JSON of a successful run: sizes doubling from `min` up to at most `max`, every row
/// ok, algbw = bytes / time, busbw = algbw × the op's factor, a raw baseline iff `raw`.
#[allow(clippy::too_many_arguments)] // one call per expectation reads better than a struct here
fn check_json(path: &Path, op: &str, np: usize, dtype: &str, min: u64, max: u64, raw: bool, run: &Run) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("no JSON at {}: {e}\n{}", path.display(), run.describe()));
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON: {e}\n{text}"));
    assert_eq!(v["op"], op, "{text}");
    assert_eq!(v["backend"], "mpi", "{text}");
    assert_eq!(v["world_size"], np as u64, "{text}");
    assert_eq!(v["ok"], true, "{text}");
    let rows = v["rows"].as_array().expect("rows");
    assert!(!rows.is_empty(), "{text}");
    let dsize = if dtype == "bf16" { 2 } else { 4 };
    let factor = bus_factor(op, np as f64);
    let mut expect = min;
    for r in rows {
        let bytes = r["bytes"].as_u64().unwrap();
        assert_eq!(bytes, expect, "sizes must double from {min}\n{text}");
        assert_eq!(r["count"].as_u64().unwrap(), bytes / dsize, "{text}");
        assert_eq!(r["dtype"], dtype, "{text}");
        assert_eq!(r["ok"], true, "row {bytes} not ok\n{text}");
        let t = r["time_us"].as_f64().unwrap();
        let algbw = r["algbw_gbps"].as_f64().unwrap();
        let busbw = r["busbw_gbps"].as_f64().unwrap();
        assert!(t > 0.0, "{text}");
        assert!(close(algbw, bytes as f64 / t / 1e3), "algbw of {bytes} is not bytes / time\n{text}");
        assert!(close(busbw, algbw * factor), "busbw of {bytes} is not algbw × {factor}\n{text}");
        if raw {
            let rb = r["raw_busbw_gbps"].as_f64().unwrap_or_else(|| panic!("no raw busbw at {bytes}\n{text}"));
            assert!(rb >= 0.0 && rb.is_finite(), "{text}");
            if factor > 0.0 {
                assert!(rb > 0.0, "{text}");
            }
        } else {
            assert!(r["raw_busbw_gbps"].is_null(), "{text}");
        }
        expect = bytes * 2;
    }
    assert!(expect > max && expect / 2 <= max, "sizes must stop at the last doubling <= {max}\n{text}");
    v
}

/// Runs `op` under mpirun and checks its JSON and table.
fn mpi_case(op: &str, np: usize, extra: &[&str], dtype: &str, min: u64) -> (TempDir, Run) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let mut args = vec!["--op", op, "--max-bytes", "64K", "--iters", "2", "--warmup", "1", "--json", json.to_str().unwrap()];
    args.extend_from_slice(extra);
    let r = mpirun(np, &args, dir.path(), &[]);
    assert_eq!(r.code, Some(0), "expected success\n{}", r.describe());
    check_json(&json, op, np, dtype, min, 64 << 10, true, &r);
    // The table: one line per size on rank 0 only, with the check column.
    let rows: Vec<&str> = r.stdout.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
    let sizes = std::iter::successors(Some(min), |s| Some(s * 2)).take_while(|&s| s <= 64 << 10).count();
    assert_eq!(rows.len(), sizes, "one table row per size, from rank 0 only\n{}", r.describe());
    assert!(rows.iter().all(|l| l.trim_end().ends_with("ok")), "{}", r.describe());
    assert!(r.stdout.contains("fab/raw"), "{}", r.describe());
    (dir, r)
}

#[test]
fn all_reduce_two_ranks() {
    mpi_case("all_reduce", 2, &[], "f32", 8);
}

#[test]
fn all_gather_two_ranks_with_svg_plot() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("busbw.svg");
    let (_d, r) = mpi_case("all_gather", 2, &["--plot", plot.to_str().unwrap()], "f32", 8);
    let svg = std::fs::read_to_string(&plot).unwrap_or_else(|e| panic!("no plot: {e}\n{}", r.describe()));
    assert!(svg.trim_start().starts_with("<svg") || svg.contains("<svg"), "not an SVG:\n{}", &svg[..svg.len().min(300)]);
    assert!(svg.trim_end().ends_with("</svg>"), "truncated SVG");
    // No temp file left beside it.
    let left: Vec<PathBuf> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(left, vec![plot.clone()], "only the plot in its directory");
}

#[test]
fn reduce_scatter_two_ranks() {
    mpi_case("reduce_scatter", 2, &[], "f32", 8);
}

#[test]
fn broadcast_two_ranks_with_png_plot() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("busbw.png");
    let (_d, r) = mpi_case("broadcast", 2, &["--plot", plot.to_str().unwrap()], "f32", 8);
    let png = std::fs::read(&plot).unwrap_or_else(|e| panic!("no plot: {e}\n{}", r.describe()));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
}

#[test]
fn sendrecv_two_ranks() {
    mpi_case("sendrecv", 2, &[], "f32", 8);
}

/// Odd world: reduce_scatter splits over 3 ranks, so the default smallest size rounds 8 up to
/// 12 bytes (3 f32 elements), and busbw uses (n-1)/n = 2/3.
#[test]
fn reduce_scatter_three_ranks() {
    mpi_case("reduce_scatter", 3, &[], "f32", 12);
}

/// bf16 moves as 16-bit words, reduced by a bf16 sum on both sides.
#[test]
fn all_reduce_bf16() {
    mpi_case("all_reduce", 2, &["--dtype", "bf16", "--min-bytes", "2"], "bf16", 2);
}

/// A world of one (no mpirun): every op but sendrecv runs, with no raw baseline.
#[test]
fn single_process() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("one.json");
    let r = single(&["--op", "all_gather", "--max-bytes", "4K", "--iters", "2", "--warmup", "0", "--json", json.to_str().unwrap()], dir.path(), &[]);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    check_json(&json, "all_gather", 1, "f32", 8, 4096, false, &r);
    assert!(r.stdout.contains("raw baseline: none"), "{}", r.describe());
}

/// A wrong result prints the table, marks the row, writes ok=false and fails the run.
#[test]
fn wrong_result_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bad.json");
    let r = mpirun(
        2,
        &["--op", "all_reduce", "--max-bytes", "64", "--iters", "1", "--warmup", "0", "--json", json.to_str().unwrap()],
        dir.path(),
        &[("FABBRICA_BENCH_CORRUPT_RANK", "1")],
    );
    assert_ne!(r.code, Some(0), "{}", r.describe());
    assert!(r.stdout.contains("WRONG"), "{}", r.describe());
    assert!(r.stderr.contains("error: all_reduce gave wrong results"), "{}", r.describe());
    assert!(!r.stderr.contains("panicked"), "{}", r.describe());
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["rows"].as_array().unwrap().iter().all(|row| row["ok"] == false), "{v}");
}

// ---------------------------------------------------------------------------------------------
// Bad input: exit 2, one `error:` line naming the flag, no panic. Run as a single process (mpirun
// adds lines of its own); the world size is faked through Open MPI's variables where it matters,
// which is enough because the arguments are checked before MPI starts.

fn assert_user_error(r: &Run, needles: &[&str]) {
    assert_eq!(r.code, Some(2), "expected exit code 2\n{}", r.describe());
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one stderr line\n{}", r.describe());
    assert!(lines[0].starts_with("error: "), "{}", r.describe());
    let lower = r.stderr.to_lowercase();
    assert!(!lower.contains("panicked") && !lower.contains("backtrace"), "{}", r.describe());
    for n in needles {
        assert!(lines[0].contains(n), "stderr line does not mention {n:?}\n{}", r.describe());
    }
}

fn bad(args: &[&str], env: &[(&str, &str)], needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let r = single(args, dir.path(), env);
    assert_user_error(&r, needles);
    assert!(r.stdout.is_empty(), "nothing on stdout\n{}", r.describe());
}

const RANK0_OF_2: &[(&str, &str)] =
    &[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_LOCAL_RANK", "0"), ("OMPI_COMM_WORLD_LOCAL_SIZE", "2")];

#[test]
fn bad_op() {
    bad(&["--op", "allreduce"], &[], &["--op", "allreduce", "all_reduce", "sendrecv"]);
    bad(&[], &[], &["--op", "required", "all_reduce"]);
}

#[test]
fn bad_dtype_and_backend() {
    bad(&["--op", "all_reduce", "--dtype", "f64"], &[], &["--dtype", "f64", "f32", "bf16"]);
    bad(&["--op", "all_reduce", "--backend", "gloo"], &[], &["--backend", "gloo", "mpi", "nccl"]);
}

#[test]
fn bad_sizes() {
    bad(&["--op", "all_reduce", "--min-bytes", "1M", "--max-bytes", "64K"], &[], &["--min-bytes", "--max-bytes", "1M"]);
    bad(&["--op", "all_reduce", "--max-bytes", "12X"], &[], &["--max-bytes", "12X", "K, M or G"]);
    bad(&["--op", "all_reduce", "--min-bytes", "0"], &[], &["--min-bytes"]);
    // Not whole elements.
    bad(&["--op", "all_reduce", "--min-bytes", "6"], &[], &["--min-bytes 6", "multiple of 4", "--min-bytes 8"]);
    // all_gather over 2 ranks: the smallest size must split into whole f32 elements per rank.
    bad(&["--op", "all_gather", "--min-bytes", "12"], RANK0_OF_2, &["--min-bytes 12", "multiple of 8", "2 ranks", "--min-bytes 16"]);
    bad(&["--op", "all_reduce", "--max-bytes", "16G"], &[], &["--max-bytes", "2^31-1", "--max-bytes 4G"]);
    bad(&["--op", "all_reduce", "--iters", "0"], &[], &["--iters"]);
}

#[test]
fn bad_outputs() {
    bad(&["--op", "all_reduce", "--plot", "busbw.jpg"], &[], &["--plot", ".svg", ".png"]);
    bad(&["--op", "all_reduce", "--json", "/nonexistent-dir-fabbrica/x.json"], &[], &["--json", "does not exist"]);
}

#[test]
fn nccl_without_gpu() {
    bad(&["--op", "all_reduce", "--backend", "nccl"], &[("CUDA_VISIBLE_DEVICES", "")], &["--backend nccl", "GPU", "--backend mpi"]);
}

#[test]
fn sendrecv_needs_two_ranks() {
    bad(&["--op", "sendrecv"], &[], &["sendrecv", "mpirun -np 2"]);
}
