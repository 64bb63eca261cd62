//! Issue 9, memory: a batch too large for memory is refused before the first step with one line
//! that gives the numbers and names what to lower (exit code 2), instead of a panic in libtorch's
//! allocator (exit 101), an abort (134) or the kernel's OOM killer; runs that fit still train.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Mutex;
use std::time::{Duration, Instant};

mod common;

/// One job at a time: 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

use common::describe;

/// A small English-like text (the GPT-2 tokenizer is quick on it).
fn text(dir: &Path) -> PathBuf {
    let p = dir.join("input.txt");
    let s: String =
        (0..3000).map(|i| format!("Line {i}: the loom ran all day and {} watched it turn.\n", ["Anna", "Bruno", "Carla"][i % 3])).collect();
    std::fs::write(&p, s).unwrap();
    p
}

fn fabbrica(np: usize, sets: &[String]) -> (Output, Duration) {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let start = Instant::now();
    let o = common::train_command(np, &[], sets).output().expect("cannot run fabbrica");
    (o, start.elapsed())
}

fn huge_batch(dir: &Path) -> Vec<String> {
    vec![
        "run.device=cpu".into(),
        "train.batch_size=4096".into(),
        "train.max_steps=1".into(),
        "run.sample_tokens=0".into(),
        format!("data.path={}", text(dir).display()),
        format!("run.out_dir={}", dir.join("out").display()),
    ]
}

/// gpt2-124m at 4096 sequences of 1024 tokens per micro-step needs about 1.6 TiB of activations.
fn assert_refused(o: &Output, took: Duration, ranks: &str) {
    let all = describe(o);
    assert_eq!(o.status.code(), Some(2), "expected exit code 2\n{all}");
    // Model construction and the check only: nothing near the activations was allocated.
    assert!(took < Duration::from_secs(90), "took {took:?}\n{all}");
    let stderr = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line\n{all}");
    let line = lines[0];
    assert!(line.starts_with("error: "), "{all}");
    for n in ["this run needs about", "GiB per rank", "activations", "train.batch_size=4096", "are available", ranks] {
        assert!(line.contains(n), "the error line does not mention {n:?}\n{all}");
    }
    // What to lower: the batch (how far), or, on a machine too small for the model itself, the model.
    assert!(
        (line.contains("lower train.batch_size to ") && line.contains("raise train.grad_accum")) || line.contains("the model alone"),
        "the error line does not say what to lower\n{all}"
    );
    for bad in ["panicked", "backtrace", "DefaultCPUAllocator", "Signal:", "core dumped"] {
        assert!(!all.contains(bad), "{bad:?} in the output\n{all}");
    }
    assert!(!o.stdout.windows(8).any(|w| w == b"training"), "training started\n{all}");
}

/// gpt2-124m's shape, set key by key (the preset's schedule settings do not matter here).
fn gpt2_124m(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.block_size=1024", "model.vocab_size=50304", "data.tokenizer=gpt2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    v.extend(huge_batch(dir));
    v
}

#[test]
fn a_batch_that_cannot_fit_is_refused_before_the_first_step() {
    let t = tempfile::tempdir().unwrap();
    let (o, took) = fabbrica(0, &gpt2_124m(t.path()));
    assert_refused(&o, took, "on this node for 1 rank");
}

#[test]
fn under_mpirun_the_ranks_of_a_node_share_its_memory_and_the_refusal_is_said_once() {
    let t = tempfile::tempdir().unwrap();
    let (o, took) = fabbrica(2, &gpt2_124m(t.path()));
    assert_refused(&o, took, "per rank on this node for 2 ranks");
}

#[test]
fn runs_that_fit_are_not_refused() {
    let t = tempfile::tempdir().unwrap();
    // A small model at a batch far below the machine's memory.
    let sets: Vec<String> = [
        "run.device=cpu",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=32",
        "train.batch_size=64",
        "train.max_steps=2",
        "train.eval_iters=1",
        "run.sample_tokens=0",
        "run.threads=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("data.path={}", text(t.path()).display()), format!("run.out_dir={}", t.path().join("out").display())])
    .collect();
    let (o, _) = fabbrica(0, &sets);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("finished 2 steps"), "{}", describe(&o));
}
