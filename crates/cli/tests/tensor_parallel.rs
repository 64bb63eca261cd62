//! Tensor and sequence parallelism end to end through the binary (fp32, CPU, real mpirun,
//! oversubscribed): every layout — tp 2 and 4 for GPT and for a grouped-query Llama, with and
//! without sequence parallelism, with ZeRO-1 and recompute, and tp × pp × dp = 2 × 2 × 2 on 8
//! ranks — gives the one-process run's losses and gradient norms within 1e-5 relative at every
//! step, and final weights within 1e-5 relative error per tensor (‖Δ‖/‖w‖: a split matmul sums
//! in another order, and Adam can turn the rounding of a near-zero gradient element into an
//! lr-sized step of that one element, see `common::max_weight_norm_diff`); a checkpoint written at tp = 2 resumes at tp = 1 and tp = 4 as the uninterrupted
//! run; invalid layouts are refused at start with one line and exit 2.

mod common;

use std::path::Path;
use std::process::Output;
use std::sync::Mutex;

use common::{assert_same_curve, describe, train_command, train_curve, Curve};
use fabbrica_train::metrics::read;

/// One job at a time: 2 cores, and Open MPI's session directories race between launches.
static SERIAL: Mutex<()> = Mutex::new(());

const STEPS: u64 = 8;

/// A small model of either architecture; the character vocabulary of the corpus (101) padded to
/// 104 so that it splits over 2 and 4 ranks.
fn base(arch: &str, out: &Path) -> Vec<String> {
    let model: &[&str] = match arch {
        // Tied embeddings, biases, fused q/k/v.
        "gpt" => &["model.arch=gpt", "model.n_layer=2", "model.n_head=4", "model.n_embd=32", "model.dropout=0.0", "model.bias=true"],
        // Grouped-query attention: 8 query heads over 4 key-value heads; untied.
        _ => &["model.arch=llama", "model.n_layer=2", "model.n_head=8", "model.n_kv_head=4", "model.n_embd=64", "model.ffn_hidden=96"],
    };
    model
        .iter()
        .map(|s| s.to_string())
        .chain([
            "model.block_size=32".into(),
            "model.vocab_size=104".into(),
            "train.batch_size=2".into(),
            format!("train.max_steps={STEPS}"),
            "train.warmup_steps=2".into(),
            "train.log_interval=1".into(),
            "train.eval_interval=4".into(),
            "train.eval_iters=2".into(),
            "train.grad_clip=0.5".into(), // clipping active: the global norm must be right
            "run.sample_tokens=0".into(),
            "run.threads=1".into(),
            "parallel.bucket_mb=0.01".into(),
            format!("run.out_dir={}", out.display()),
            common::corpus_set(),
        ])
        .collect()
}

fn launch(np: usize, sets: Vec<String>) -> Output {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    train_command(np, &[], sets).output().unwrap()
}

fn run(arch: &str, np: usize, out: &Path, sets: &[&str]) -> Curve {
    let all: Vec<String> = base(arch, out).into_iter().chain(sets.iter().map(|s| s.to_string())).collect();
    let o = launch(np, all);
    assert!(o.status.success(), "{arch} np={np} {sets:?}\n{}", describe(&o));
    train_curve(out)
}

fn same(name: &str, got: &Curve, want: &Curve, tol: f64) {
    assert_same_curve(name, got, want, STEPS as usize, tol);
}

fn layouts_match(arch: &str, layouts: &[(&str, usize, &[&str])]) {
    let dir = tempfile::tempdir().unwrap();
    let ref_out = dir.path().join("reference");
    let want = run(arch, 0, &ref_out, &["train.grad_accum=2"]);
    assert_eq!(want.len(), STEPS as usize);
    for (name, np, sets) in layouts {
        let out = dir.path().join(name);
        same(&format!("{arch} {name}"), &run(arch, *np, &out, sets), &want, 1e-5);
        let (tensor, d) = common::max_weight_norm_diff(&out, &ref_out);
        assert!(d <= 1e-5, "{arch} {name}: final weights differ by {d:.2e} relative ({tensor})");
    }
}

#[test]
fn gpt_tensor_parallel_layouts_train_like_one_process() {
    layouts_match(
        "gpt",
        &[
            ("tp2", 2, &["train.grad_accum=2", "parallel.tp=2"]),
            ("tp2-sp", 2, &["train.grad_accum=2", "parallel.tp=2", "parallel.sequence_parallel=true"]),
            ("tp4", 4, &["train.grad_accum=2", "parallel.tp=4"]),
            ("tp4-sp-recompute", 4, &["train.grad_accum=2", "parallel.tp=4", "parallel.sequence_parallel=true", "train.recompute=full"]),
            ("tp2-dp2-zero1", 4, &["train.grad_accum=1", "parallel.tp=2", "parallel.dp=2", "parallel.zero=1"]),
        ],
    );
}

#[test]
fn llama_tensor_parallel_layouts_train_like_one_process() {
    layouts_match(
        "llama",
        &[
            ("tp2", 2, &["train.grad_accum=2", "parallel.tp=2"]),
            ("tp2-sp-selective", 2, &["train.grad_accum=2", "parallel.tp=2", "parallel.sequence_parallel=true", "train.recompute=selective"]),
            ("tp4", 4, &["train.grad_accum=2", "parallel.tp=4"]),
            ("tp4-sp", 4, &["train.grad_accum=2", "parallel.tp=4", "parallel.sequence_parallel=true"]),
        ],
    );
}

/// The three dimensions at once on 8 ranks: tensor parallelism inside each pipeline stage, the
/// tied embedding's two pipeline copies summed per tensor-parallel slice, DDP over each
/// (tp, pp) coordinate's data-parallel group.
#[test]
fn three_dimensional_layout_trains_like_one_process() {
    layouts_match(
        "gpt",
        &[("tp2-pp2-dp2", 8, &["train.grad_accum=1", "parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.sequence_parallel=true"])],
    );
}

/// A tp = 2 checkpoint (slices written by their owners) resumes at tp = 1 and at tp = 4, and
/// the resumed runs end where the uninterrupted one-process run ends.
#[test]
fn a_tensor_parallel_checkpoint_resumes_at_other_degrees() {
    let dir = tempfile::tempdir().unwrap();
    let ref_out = dir.path().join("reference");
    let want = run("llama", 0, &ref_out, &["train.grad_accum=2"]);
    for (name, np, tp) in [("to-tp1", 0, "parallel.tp=1"), ("to-tp4", 4, "parallel.tp=4")] {
        let out = dir.path().join(name);
        let first = run("llama", 2, &out, &["train.grad_accum=2", "parallel.tp=2", "run.stop_at=4", "run.sample_tokens=0"]);
        assert_eq!(first.len(), 4, "{name}: the first half stops at step 4");
        let index = std::fs::read_to_string(out.join("checkpoints/step_00000004/model.safetensors.index.json")).unwrap();
        assert!(index.contains("\"model.layers.0.self_attn.q_proj.weight#tp1\"") && index.contains("\"tp_slices\""), "{index}");
        if np == 0 {
            // The Hugging Face export of a tensor-parallel checkpoint holds whole tensors.
            let hf = dir.path().join("hf");
            let o = common::fabbrica(&["export", "--checkpoint", out.to_str().unwrap(), "--out", hf.to_str().unwrap()]);
            assert!(o.status.success(), "{}", describe(&o));
            let tensors = tch::Tensor::read_safetensors(hf.join("model.safetensors")).unwrap();
            assert!(tensors.iter().all(|(n, _)| !n.contains("#tp")), "{:?}", tensors.iter().map(|t| &t.0).collect::<Vec<_>>());
            let q = &tensors.iter().find(|(n, _)| n == "model.layers.0.self_attn.q_proj.weight").unwrap().1;
            assert_eq!(q.size(), vec![64, 64]);
            let e = &tensors.iter().find(|(n, _)| n == "model.embed_tokens.weight").unwrap().1;
            assert_eq!(e.size(), vec![104, 64]);
        }
        let second = run("llama", np, &out, &["train.grad_accum=2", tp, "run.resume=true"]);
        let tail: Curve = second.into_iter().filter(|(s, _)| *s > 4).collect();
        assert_same_curve(name, &tail, &want, STEPS as usize - 4, 1e-5);
        let (tensor, d) = common::max_weight_norm_diff(&out, &ref_out);
        assert!(d <= 1e-5, "{name}: final weights differ by {d:.2e} relative ({tensor})");
    }
}

/// The bytes a tensor-parallel group moves, counted by the communicator, are Megatron-LM's
/// formula exactly. Per layer and micro-batch of b·s tokens of width h: one all-reduce of b·s·h
/// per block (attention, MLP) and direction, 4·b·s·h; with sequence parallelism each becomes an
/// all-gather and a reduce-scatter of b·s·h, and each column-parallel layer gathers its input
/// again in backward instead of keeping it (Megatron's sequence-parallel linear), one more
/// all-gather of b·s·h per block (the head's input too). Once per micro-batch: the vocabulary-parallel
/// embedding's reduction (forward) and the head's input (backward), b·s·h each, and the
/// vocabulary-parallel cross-entropy's three all-reduces of b·s values (maximum, target logit,
/// normaliser). Once per step: the gradient norm (1 value) and, with sequence parallelism, the
/// gradients of the parameters every rank holds whole.
#[test]
fn tensor_parallel_traffic_is_megatrons_formula() {
    let dir = tempfile::tempdir().unwrap();
    let (l, b, s, m) = (2u64, 2u64, 32u64, 2u64);
    for (arch, h, whole_params, sets) in [
        // GPT: per block ln_1, ln_2 (weight and bias) and the two row-parallel biases; ln_f; positions.
        ("gpt", 32u64, l * 6 * 32 + 2 * 32 + 32 * 32, &["parallel.tp=2"][..]),
        ("gpt", 32, l * 6 * 32 + 2 * 32 + 32 * 32, &["parallel.tp=2", "parallel.sequence_parallel=true"][..]),
        // Llama: two RMSNorms per block and the final one.
        ("llama", 64, l * 2 * 64 + 64, &["parallel.tp=4", "parallel.sequence_parallel=true"][..]),
        ("llama", 64, l * 2 * 64 + 64, &["parallel.tp=4"][..]),
    ] {
        let name = format!("{arch}-{}", sets.join("-"));
        let out = dir.path().join(&name);
        let mut all = vec!["train.grad_accum=2"];
        all.extend_from_slice(sets);
        let np = if sets.contains(&"parallel.tp=4") { 4 } else { 2 };
        run(arch, np, &out, &all);
        let sp = sets.contains(&"parallel.sequence_parallel=true");
        let bsh = b * s * h;
        let (ar, ag, rs) = if sp {
            (m * 3 * b * s + 1 + whole_params, m * (6 * l + 3) * bsh, m * (4 * l + 2) * bsh)
        } else {
            (m * (4 * l * bsh + 2 * bsh + 3 * b * s) + 1, 0, 0)
        };
        let records = read(&out.join("metrics.jsonl")).unwrap();
        let train: Vec<_> = records.iter().filter(|r| r.kind == "train").collect();
        assert_eq!(train.len(), STEPS as usize);
        for r in train {
            let t = r.tp_traffic.unwrap_or_else(|| panic!("{name}: no tp_traffic at step {}", r.step));
            assert_eq!((t.all_reduce_elements, t.all_gather_elements, t.reduce_scatter_elements), (ar, ag, rs), "{name} step {}", r.step);
            assert_eq!(t.bytes, 4 * (ar + ag + rs), "{name}: fp32 throughout");
        }
    }
}

/// With dropout, each rank draws its own masks inside the tensor-parallel regions (and on its
/// sequence shard) and the same masks where activations are replicated: `comm.debug` checks at
/// every checkpoint that the parameters every rank holds whole are still identical on all of
/// them (they drift apart at once otherwise), and the loss falls.
#[test]
fn dropout_keeps_replicated_parameters_identical_across_tensor_parallel_ranks() {
    let dir = tempfile::tempdir().unwrap();
    for (name, sets) in [
        ("tp2", &["parallel.tp=2"][..]),
        ("tp2-sp", &["parallel.tp=2", "parallel.sequence_parallel=true"][..]),
        ("tp2-sp-recompute", &["parallel.tp=2", "parallel.sequence_parallel=true", "train.recompute=full"][..]),
    ] {
        let out = dir.path().join(name);
        let mut all = vec!["train.grad_accum=2", "model.dropout=0.1", "comm.debug=true", "run.checkpoint_interval=2", "train.lr=3e-3"];
        all.extend_from_slice(sets);
        let losses = run("gpt", 2, &out, &all);
        assert!(losses[&STEPS].0 < losses[&1].0 - 0.2, "{name}: loss {} → {}", losses[&1].0, losses[&STEPS].0);
    }
}

/// A tensor-parallel group larger than a node is refused: `--dry-run` reads the launch
/// environment Open MPI gives rank 0 of a 16-rank job on 4 nodes of 4 (the planning path reads
/// it without starting MPI), and the same rule guards training.
#[test]
fn a_tensor_parallel_group_larger_than_a_node_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run_with = |tp: &str| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fabbrica"));
        cmd.args([
            "train",
            "--dry-run",
            "--set",
            "model.arch=llama",
            "--set",
            "model.n_head=8",
            "--set",
            "model.n_kv_head=8",
            "--set",
            "model.n_embd=64",
        ])
        .args(["--set", tp, "--set", &format!("run.out_dir={}", dir.path().join("x").display()), "--set", &common::corpus_set()]);
        for (k, v) in
            [("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "16"), ("OMPI_COMM_WORLD_LOCAL_RANK", "0"), ("OMPI_COMM_WORLD_LOCAL_SIZE", "4")]
        {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let o = run_with("parallel.tp=8");
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.lines().any(|l| l.starts_with("error:") && l.contains("parallel.tp = 8") && l.contains("4 ranks per node")), "{err}");
    let o = run_with("parallel.tp=4");
    assert!(o.status.success(), "{}", describe(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("tensor parallel 4 × data parallel 4"), "{}", describe(&o));
}

/// The benchmarks time one whole model per rank: a tensor-parallel layout is refused, not
/// silently measured as one process.
#[test]
fn bench_train_refuses_a_tensor_parallel_layout() {
    let o = common::fabbrica(&["bench", "train", "--preset", "tiny", "--set", "parallel.tp=2", "--steps", "1", "--warmup", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.lines().any(|l| l.starts_with("error:") && l.contains("parallel.tp") && l.contains("fabbrica train")), "{err}");
}

/// Each invalid layout: one line naming the key and what to change, exit 2, before any step.
#[test]
fn invalid_tensor_parallel_layouts_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bad");
    let cases: [(&str, usize, &[&str], &str); 5] = [
        ("heads", 2, &["parallel.tp=2", "model.n_head=3", "model.n_kv_head=3", "model.n_embd=48"], "model.n_head = 3 is not a multiple"),
        ("kv-heads", 4, &["parallel.tp=4", "model.n_kv_head=2"], "model.n_kv_head = 2 is not a multiple"),
        ("vocabulary", 2, &["parallel.tp=2", "model.vocab_size=0"], "set model.vocab_size=102"),
        ("world", 3, &["parallel.tp=2"], "parallel.tp"),
        ("sequence-parallel-without-tp", 0, &["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
    ];
    for (name, np, sets, want) in cases {
        let all: Vec<String> = base("llama", &out).into_iter().chain(sets.iter().map(|s| s.to_string())).collect();
        let o = launch(np, all);
        assert_eq!(o.status.code(), Some(2), "{name}: {}", describe(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        let line = err.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("{name}: no error line\n{}", describe(&o)));
        assert!(line.contains(want), "{name}: {line}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert!(!out.join("metrics.jsonl").exists(), "{name}: no step may run");
    }
}
