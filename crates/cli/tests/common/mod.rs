//! What the binary's integration tests share: launching `fabbrica train` alone or under a real
//! mpirun, and describing what came back.
#![allow(dead_code)] // each test file uses its own part

use std::process::{Command, Output};

/// `fabbrica train --set S …` as one process (`np == 0`) or under `mpirun -np np` with
/// `mpirun_args` (e.g. `-x VAR=value`) before the binary. Root-safe and local-only Open MPI
/// settings; backtraces on, so a panic cannot hide behind a one-line contract.
pub fn train_command<S: AsRef<str>>(np: usize, mpirun_args: &[&str], sets: impl IntoIterator<Item = S>) -> Command {
    let bin = env!("CARGO_BIN_EXE_fabbrica");
    let mut cmd = if np == 0 {
        Command::new(bin)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["-np", &np.to_string(), "--oversubscribe"]).args(mpirun_args).arg(bin);
        c
    };
    cmd.arg("train");
    for s in sets {
        cmd.args(["--set", s.as_ref()]);
    }
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_plm", "isolated")
        .env("RUST_BACKTRACE", "1")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("FABBRICA_INJECT_NAN");
    cmd
}

/// Exit status and both streams, for assertion messages.
pub fn describe(o: &Output) -> String {
    format!(
        "exit status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `data.path=` the default corpus (written by scripts/setup.sh).
pub fn corpus_set() -> String {
    format!("data.path={}/../../data/pystdlib.txt", env!("CARGO_MANIFEST_DIR"))
}

/// The final checkpoints of two runs, compared tensor by tensor: the name and value of the
/// largest relative difference (max abs difference over max abs value). Skips the key third of
/// each attention `c_attn.bias`: softmax ignores a constant added to every score of a row, so
/// that bias's true gradient is exactly zero and what backward produces is rounding noise, which
/// Adam normalises into lr-sized steps in whichever direction the noise points. The query and
/// value thirds are checked. Panics if the two hold different tensors.
pub fn max_weight_diff(a: &std::path::Path, b: &std::path::Path) -> (String, f64) {
    use fabbrica_train::checkpoint;
    let load = |out: &std::path::Path| {
        let dir = checkpoint::latest(out).unwrap().expect("a checkpoint");
        let mut m = checkpoint::load(&dir).unwrap().model;
        m.sort_by(|a, b| a.0.cmp(&b.0));
        m
    };
    let (wa, wb) = (load(a), load(b));
    assert_eq!(wa.iter().map(|t| &t.0).collect::<Vec<_>>(), wb.iter().map(|t| &t.0).collect::<Vec<_>>(), "different tensor sets");
    let mut worst = (String::new(), 0.0f64);
    for ((n, x), (_, y)) in wa.iter().zip(wb.iter()) {
        let (x, y) = (without_key_bias(n, x), without_key_bias(n, y));
        let d = (&x - &y).abs().max().double_value(&[]) / x.abs().max().double_value(&[]).max(1e-12);
        if d > worst.1 {
            worst = (n.clone(), d);
        }
    }
    worst
}

/// The final checkpoints of two runs, compared tensor by tensor by the relative error of the
/// whole tensor, ‖a − b‖ / ‖b‖: the name and value of the worst. Layouts that change the order
/// of floating-point sums (tensor parallelism splits every matmul's reduction) move a gradient
/// element that is nearly zero by rounding, and Adam turns that into a step of up to lr in one
/// element; this measure weighs such an element by its share of the tensor instead of letting
/// it stand for the tensor (which [`max_weight_diff`] does). Panics if the two hold different
/// tensors.
pub fn max_weight_norm_diff(a: &std::path::Path, b: &std::path::Path) -> (String, f64) {
    use fabbrica_train::checkpoint;
    let load = |out: &std::path::Path| {
        let dir = checkpoint::latest(out).unwrap().expect("a checkpoint");
        let mut m = checkpoint::load(&dir).unwrap().model;
        m.sort_by(|a, b| a.0.cmp(&b.0));
        m
    };
    let (wa, wb) = (load(a), load(b));
    assert_eq!(wa.iter().map(|t| &t.0).collect::<Vec<_>>(), wb.iter().map(|t| &t.0).collect::<Vec<_>>(), "different tensor sets");
    let mut worst = (String::new(), 0.0f64);
    for ((n, x), (_, y)) in wa.iter().zip(wb.iter()) {
        let (x, y) = (without_key_bias(n, x), without_key_bias(n, y));
        let d = (&x - &y).norm().double_value(&[]) / y.norm().double_value(&[]).max(1e-12);
        if d > worst.1 {
            worst = (n.clone(), d);
        }
    }
    worst
}

/// A tensor as the weight comparisons see it: GPT's `c_attn.bias` without its key third, whose
/// true gradient is exactly zero (softmax ignores a constant added to a row's scores).
fn without_key_bias(name: &str, t: &tch::Tensor) -> tch::Tensor {
    if name.ends_with("attn.c_attn.bias") {
        let c = t.size()[0] / 3;
        tch::Tensor::cat(&[t.narrow(0, 0, c), t.narrow(0, 2 * c, c)], 0)
    } else {
        t.shallow_clone()
    }
}

#[path = "../../../train/tests/common/hf_reference.rs"]
mod hf_reference;
#[allow(unused_imports)] // not every test file calls transformers
pub use hf_reference::hf_reference;

/// The `fabbrica` binary with `args`, run to completion (backtraces on, should it panic).
pub fn fabbrica(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_fabbrica")).args(args).env("RUST_BACKTRACE", "1").output().unwrap()
}

/// A run's training curve: loss and gradient norm by step, from its `metrics.jsonl`.
pub type Curve = std::collections::HashMap<u64, (f64, f64)>;

/// The training curve a run wrote into `out`.
pub fn train_curve(out: &std::path::Path) -> Curve {
    fabbrica_train::metrics::read(&out.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == "train")
        .map(|r| (r.step, (r.loss.unwrap(), r.grad_norm.unwrap())))
        .collect()
}

/// |a - b| relative to b.
pub fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// `got` has `steps` steps, and each one's loss and gradient norm are within `tol` (relative) of
/// `want`'s.
pub fn assert_same_curve(name: &str, got: &Curve, want: &Curve, steps: usize, tol: f64) {
    assert_eq!(got.len(), steps, "{name}: steps logged");
    let mut worst = (0f64, 0f64);
    for (step, (loss, norm)) in got {
        let (wl, wn) = want[step];
        assert!(rel(*loss, wl) <= tol, "{name} step {step}: loss {loss} vs {wl}");
        assert!(rel(*norm, wn) <= tol, "{name} step {step}: grad norm {norm} vs {wn}");
        worst = (worst.0.max(rel(*loss, wl)), worst.1.max(rel(*norm, wn)));
    }
    println!("{name}: largest relative difference {:.1e} (loss), {:.1e} (gradient norm), tolerance {tol:.0e}", worst.0, worst.1);
}
