//! Pipeline-parallel training end to end under a real `mpirun` (fp32, CPU): every schedule and
//! layout against one process with the same global batch, the tied embedding's copies, resume
//! across layouts, every invalid combination, and a stage that dies.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{describe, train_command};
use fabbrica_train::checkpoint;
use fabbrica_train::metrics::{read, Record};

/// One job at a time: 2 cores, and Open MPI's session directories race between launches.
static SERIAL: Mutex<()> = Mutex::new(());

const STEPS: u64 = 10;
/// Micro-batches of the one-process reference: a layout with dp replicas uses STEPS / dp each.
const ACCUM: usize = 8;

/// 8 layers (pp = 4 with 2 chunks each), small enough that 10 steps take a second or two.
fn base(out: &Path) -> Vec<String> {
    [
        "model.n_layer=8",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=32",
        "model.dropout=0.0",
        "train.batch_size=2",
        &format!("train.max_steps={STEPS}"),
        "train.warmup_steps=3",
        "train.log_interval=1",
        "train.eval_interval=5",
        "train.eval_iters=4",
        "run.sample_tokens=0",
        "run.threads=1",
        "parallel.bucket_mb=0.01", // several buckets per stage
        &format!("run.out_dir={}", out.display()),
        &common::corpus_set(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn launch(np: usize, out: &Path, sets: &[&str]) -> Output {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let all: Vec<String> = base(out).into_iter().chain(sets.iter().map(|s| s.to_string())).collect();
    train_command(np, &[], all).output().unwrap()
}

fn run(np: usize, out: &Path, sets: &[&str]) -> Vec<Record> {
    let o = launch(np, out, sets);
    assert!(o.status.success(), "np={np} {sets:?}\n{}", describe(&o));
    read(&out.join("metrics.jsonl")).unwrap()
}

fn train(records: &[Record]) -> HashMap<u64, (f64, f64)> {
    records.iter().filter(|r| r.kind == "train").map(|r| (r.step, (r.loss.unwrap(), r.grad_norm.unwrap()))).collect()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn reference(dir: &Path) -> (std::path::PathBuf, HashMap<u64, (f64, f64)>) {
    let out = dir.join("reference");
    let r = run(0, &out, &[&format!("train.grad_accum={ACCUM}")]);
    (out.clone(), train(&r))
}

/// Every schedule, pp = 2 and 4, and pp = 2 × dp = 2 with ZeRO-1: the same losses, gradient
/// norms (before clipping; clipping is active: the norms exceed train.grad_clip = 1) and final
/// weights as one process, within 1e-5 relative.
#[test]
fn every_layout_trains_like_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let (ref_out, want) = reference(dir.path());
    assert!(want.values().any(|(_, n)| *n > 1.0), "clipping must be exercised: {want:?}");
    let layouts: [(&str, usize, &[&str]); 7] = [
        ("gpipe-pp2", 2, &["parallel.pp=2", "parallel.schedule=gpipe"]),
        ("1f1b-pp2", 2, &["parallel.pp=2", "parallel.schedule=1f1b"]),
        ("interleaved-pp2-v2", 2, &["parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2"]),
        ("gpipe-pp4", 4, &["parallel.pp=4", "parallel.schedule=gpipe"]),
        ("1f1b-pp4", 4, &["parallel.pp=4", "parallel.schedule=1f1b", "parallel.stage_layers=[1, 3, 3, 1]"]),
        ("interleaved-pp4-v2", 4, &["parallel.pp=4", "parallel.schedule=interleaved", "parallel.virtual_stages=2"]),
        ("1f1b-pp2-dp2-zero1", 4, &["parallel.pp=2", "parallel.dp=2", "parallel.zero=1", "train.grad_accum=4"]),
    ];
    for (name, np, sets) in layouts {
        let out = dir.path().join(name);
        let accum = format!("train.grad_accum={ACCUM}");
        let mut all: Vec<&str> = vec![&accum];
        all.extend_from_slice(sets); // a later grad_accum wins
        let got = train(&run(np, &out, &all));
        assert_eq!(got.len(), STEPS as usize, "{name}");
        for (step, (loss, norm)) in &got {
            let (wl, wn) = want[step];
            assert!(rel(*loss, wl) <= 1e-5, "{name} step {step}: loss {loss} vs {wl}");
            assert!(rel(*norm, wn) <= 1e-5, "{name} step {step}: grad norm {norm} vs {wn}");
        }
        let (tensor, d) = common::max_weight_diff(&out, &ref_out);
        assert!(d <= 1e-5, "{name}: final weights differ by {d:.2e} relative ({tensor})");
    }
}

/// The tied embedding lives on the first and the last stage; its two copies get the summed
/// gradient and identical updates, so they never drift (checked at every checkpoint).
#[test]
fn the_tied_embeddings_copies_stay_equal() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let r = run(4, &out, &["parallel.pp=2", "parallel.dp=2", "train.grad_accum=2", "run.checkpoint_interval=5"]);
    let checks: Vec<(u64, f64)> = r.iter().filter(|r| r.kind == "tied_embedding").map(|r| (r.step, r.tied_fingerprint_diff.unwrap())).collect();
    assert_eq!(checks.iter().map(|c| c.0).collect::<Vec<_>>(), [5, 10], "{checks:?}");
    assert!(checks.iter().all(|c| c.1 == 0.0), "{checks:?}");
    // The pipeline's timings are in the metrics: every stage computed, and idled some.
    let p = r.iter().rev().find_map(|r| r.pipeline.clone()).expect("pipeline metrics");
    assert_eq!(p.len(), 2);
    assert!(p.iter().all(|s| s.compute_ms > 0.0 && (0.0..1.0).contains(&s.bubble)), "{p:?}");
}

/// A checkpoint of one layout resumes in another and continues with the one-process losses:
/// pp = 2 × dp = 2 with ZeRO-1 → one process and → pp = 4; one process → pp = 2 × dp = 2.
#[test]
fn checkpoints_resume_across_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let (_, want) = reference(dir.path());
    let grid = ["parallel.pp=2", "parallel.dp=2", "parallel.zero=1", "train.grad_accum=4"];
    // (name, ranks of the first run, its overrides, ranks of the resumed run, its overrides)
    type Case = (&'static str, usize, Vec<&'static str>, usize, Vec<&'static str>);
    let cases: [Case; 3] = [
        ("grid-to-one", 4, grid.to_vec(), 0, vec!["train.grad_accum=8"]),
        ("grid-to-pp4", 4, grid.to_vec(), 4, vec!["parallel.pp=4", "train.grad_accum=8"]),
        ("one-to-grid", 0, vec!["train.grad_accum=8"], 4, grid.to_vec()),
    ];
    for (name, np1, first, np2, second) in cases {
        let out = dir.path().join(name);
        run(np1, &out, &[&first[..], &["run.stop_at=5"]].concat());
        let r = run(np2, &out, &[&second[..], &["run.resume=true"]].concat());
        let got = train(&r);
        for step in 1..=STEPS {
            let (l, _) = got[&step];
            assert!(rel(l, want[&step].0) <= 1e-5, "{name} step {step}: {l} vs {}", want[&step].0);
        }
    }
}

/// Every invalid combination is refused before any compute: exit 2 and one line naming what to change.
#[test]
fn invalid_layouts_say_what_to_change() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(usize, &[&str], &str); 9] = [
        (0, &["parallel.pp=9"], "make parallel.pp × parallel.virtual_stages at most 8"),
        (0, &["parallel.pp=4", "parallel.schedule=interleaved", "parallel.virtual_stages=3", "train.grad_accum=8"], "at most 8"),
        (0, &["parallel.pp=4", "parallel.schedule=interleaved", "parallel.virtual_stages=2", "train.grad_accum=6"], "set train.grad_accum=4 or 8"),
        (0, &["parallel.pp=2", "parallel.virtual_stages=2"], "parallel.schedule=interleaved"),
        (0, &["parallel.pp=2", "parallel.schedule=zigzag"], "use gpipe, 1f1b or interleaved"),
        (0, &["parallel.pp=2", "parallel.stage_layers=[4, 3]"], "sum to 8"),
        (0, &["parallel.pp=2", "parallel.stage_layers=[8]"], "one layer count per stage"),
        (3, &["parallel.pp=2"], "world size 3 is not divisible"),
        (2, &["parallel.pp=2", "parallel.dp=2"], "the job has 2 ranks"),
    ];
    for (i, (np, sets, want)) in cases.into_iter().enumerate() {
        let out = dir.path().join(format!("case{i}"));
        let o = launch(np, &out, sets);
        let text = describe(&o);
        assert_eq!(o.status.code(), Some(2), "{sets:?}\n{text}");
        let err: Vec<&str> = std::str::from_utf8(&o.stderr).unwrap().lines().filter(|l| l.starts_with("error")).collect();
        assert!(!err.is_empty() && err.iter().all(|l| l.contains(want)), "{sets:?}: wanted {want:?}\n{text}");
        assert!(!text.contains("panicked"), "{text}");
        assert!(!out.join("metrics.jsonl").exists(), "{sets:?}: something ran");
    }
}

/// kill -9 of one rank of a pp = 2 × dp = 2 job: every rank exits, non-zero, the dead rank is
/// named, and the last checkpoint stays intact.
#[test]
fn a_stage_that_dies_ends_every_rank() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let sets: Vec<String> = base(&out)
        .into_iter()
        .chain(
            ["parallel.pp=2", "parallel.dp=2", "train.grad_accum=2", "train.max_steps=100000", "run.checkpoint_interval=2", "comm.timeout_s=20"]
                .map(String::from),
        )
        .collect();
    let mut child = train_command(4, &[], sets).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let metrics = out.join("metrics.jsonl");
    let t = Instant::now();
    while read(&metrics).map(|r| r.iter().filter(|r| r.kind == "train").count()).unwrap_or(0) < 4 {
        assert!(child.try_wait().unwrap().is_none(), "the job ended early");
        assert!(t.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    let kids = String::from_utf8(Command::new("pgrep").args(["-P", &child.id().to_string()]).output().unwrap().stdout).unwrap();
    let ranks: Vec<u32> = kids.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(ranks.len(), 4, "{kids}");
    // Rank 3: the last stage of the second replica (pipeline outermost: pp 1, dp 1).
    assert!(Command::new("kill").args(["-KILL", &ranks[3].to_string()]).status().unwrap().success());
    let o = child.wait_with_output().unwrap();
    let text = describe(&o);
    assert_ne!(o.status.code(), Some(0), "{text}");
    assert!(text.contains("rank 3"), "the dead rank is not named\n{text}");
    let running = |pid: &u32| fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| !s.contains(") Z ")).unwrap_or(false);
    let t = Instant::now();
    while ranks.iter().any(running) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!ranks.iter().any(running), "ranks still running after the job ended\n{text}");
    let last = checkpoint::latest(&out).unwrap().expect("a checkpoint before the kill");
    checkpoint::load(&last).unwrap();
}

/// `run.trace = true` writes every rank's executed actions as Chrome trace events (one file per
/// rank and a merged one, valid JSON, one forward and one backward per stage and micro-batch per
/// step) and the simulated schedule; `--dry-run` shows the split, memory and bubble per rank.
#[test]
fn the_trace_and_the_dry_run_show_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    run(
        2,
        &out,
        &["parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2", "train.grad_accum=4", "train.max_steps=3", "run.trace=true"],
    );
    let merged: serde_json::Value = serde_json::from_str(&fs::read_to_string(out.join("trace/trace.json")).unwrap()).unwrap();
    let events = merged["traceEvents"].as_array().unwrap();
    for op in ["forward", "backward"] {
        // 3 steps × 4 stages × 4 micro-batches.
        assert_eq!(events.iter().filter(|e| e["cat"] == op).count(), 3 * 4 * 4, "{op}");
    }
    assert!(events.iter().filter(|e| e["ph"] == "X").all(|e| e["dur"].as_i64().unwrap() >= 0 && e["ts"].as_i64().unwrap() > 0));
    for r in 0..2 {
        let one: serde_json::Value = serde_json::from_str(&fs::read_to_string(out.join(format!("trace/rank_{r}.json"))).unwrap()).unwrap();
        assert!(one["traceEvents"].as_array().unwrap().iter().filter(|e| e["ph"] == "X").all(|e| e["pid"] == r));
    }
    assert!(fs::read_to_string(out.join("trace/simulated.svg")).unwrap().starts_with("<svg"));

    // The dry run under a launcher of 4: the split and each rank's memory and bubble.
    let o = {
        let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let mut c =
            train_command(4, &[], base(&dir.path().join("dry")).into_iter().chain(["parallel.pp=4".to_string(), "train.grad_accum=8".to_string()]));
        c.arg("--dry-run").output().unwrap()
    };
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{}", describe(&o));
    assert!(text.contains("pipeline 4 × data parallel 1"), "{text}");
    // 1F1B with 8 micro-batches on 4 ranks: (p-1)/(m+p-1) = 3/11.
    assert!(text.contains("theory (p-1)/(m+p-1) = 27.3%"), "{text}");
    let rows: Vec<&str> = text.lines().filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()) && l.contains("..")).collect();
    assert_eq!(rows.len(), 4, "{text}");
    // 1F1B holds pp - rank micro-batches at the peak.
    for (r, row) in rows.iter().enumerate() {
        // rank, stage, (layers), params, in flight, ...
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!((cols[0], cols[4]), (r.to_string().as_str(), (4 - r).to_string().as_str()), "rank {r}: {row}");
    }
    // A run.trace without a pipeline is refused.
    let o = launch(0, &dir.path().join("notrace"), &["run.trace=true"]);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("run.trace"));
}

/// A pipeline's checkpoint is written by its stages in parallel as Hugging Face sharded
/// safetensors: the `safetensors` package alone (no fabbrica code) loads every tensor of its
/// index, with the values fabbrica reads.
#[test]
fn pipeline_checkpoints_are_sharded_safetensors_that_pytorch_loads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // ZeRO-1: every rank writes its own optimizer shard (4 files), the stages their weights (2).
    run(4, &out, &["parallel.pp=2", "parallel.dp=2", "parallel.zero=1", "train.grad_accum=2", "train.max_steps=2"]);
    let ck = checkpoint::latest(&out).unwrap().unwrap();
    for f in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json", "optim.safetensors.index.json"]
    {
        assert!(ck.join(f).is_file(), "{f} missing in {}", ck.display());
    }
    for i in 1..=4 {
        assert!(ck.join(format!("optim-0000{i}-of-00004.safetensors")).is_file(), "optimizer shard {i} missing");
    }
    // Loaded whole: every parameter's two moments, shaped like it.
    let loaded = checkpoint::load(&ck).unwrap();
    for (n, p) in &loaded.model {
        for m in ["exp_avg", "exp_avg_sq"] {
            let t = &loaded.optim.iter().find(|(k, _)| *k == format!("{n}.{m}")).unwrap_or_else(|| panic!("{n}.{m}")).1;
            assert_eq!(t.size(), p.size(), "{n}.{m}");
        }
    }
    // What fabbrica read, written whole by tch's own safetensors writer, against what the
    // `safetensors` package reads from the shards: every tensor equal, value for value.
    let ours = dir.path().join("ours.safetensors");
    let refs: Vec<(&str, &tch::Tensor)> = loaded.model.iter().map(|(n, t)| (n.as_str(), t)).collect();
    tch::Tensor::write_safetensors(&refs, &ours).unwrap();
    let script = r#"
import json, os, sys, torch
from safetensors.torch import load_file
d, ours = sys.argv[1], load_file(sys.argv[2])
idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))
theirs = {}
for f in sorted(set(idx["weight_map"].values())):
    theirs.update(load_file(os.path.join(d, f)))
assert set(theirs) == set(idx["weight_map"]), "index and shards disagree"
assert set(theirs) == set(ours), f"names differ: {sorted(set(theirs) ^ set(ours))}"
for k in sorted(ours):
    assert theirs[k].dtype == ours[k].dtype and torch.equal(theirs[k], ours[k]), f"{k} differs"
print(len(ours))
"#;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let o = Command::new(root.join(".venv/bin/python")).args(["-c", script, ck.to_str().unwrap(), ours.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", describe(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), loaded.model.len().to_string());
}

/// `model.tie_embeddings = false`: the head has its own weight on the last stage (no embedding
/// group), and a pipeline still trains like one process.
#[test]
fn an_untied_model_pipelines_like_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let want = train(&run(0, &dir.path().join("one"), &["model.tie_embeddings=false", "train.grad_accum=4", "train.max_steps=5"]));
    let out = dir.path().join("pp2");
    let got = train(&run(2, &out, &["model.tie_embeddings=false", "train.grad_accum=4", "train.max_steps=5", "parallel.pp=2"]));
    for (step, (loss, _)) in &got {
        assert!(rel(*loss, want[step].0) <= 1e-5, "step {step}: {loss} vs {}", want[step].0);
    }
    let ck = checkpoint::load(&checkpoint::latest(&out).unwrap().unwrap()).unwrap();
    assert!(ck.model.iter().any(|(n, _)| n == "lm_head.weight"));
    let (tensor, d) = common::max_weight_diff(&out, &dir.path().join("one"));
    assert!(d <= 1e-5, "{tensor}: {d:.2e}");
}
