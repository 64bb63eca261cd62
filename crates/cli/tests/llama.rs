//! The Llama family end to end through the binary (fp32, CPU, real mpirun): data and pipeline
//! layouts train like one process, activation recompute changes no result under 2-rank data
//! parallelism (with dropout), and transfer learning from a Hugging Face directory made by
//! `transformers`: fine-tune, sample, export, and `transformers` loads the export with fabbrica's
//! logits. Bad input is one line and exit 2.

mod common;

use std::path::Path;
use std::process::Output;
use std::sync::Mutex;

use common::{assert_same_curve, describe, train_command, train_curve, Curve};
use fabbrica_models::{Model, StageSpec};
use fabbrica_train::checkpoint;
use fabbrica_train::metrics::read;
use tch::{Device, Kind, Tensor};

/// One job at a time: 2 cores, and Open MPI's session directories race between launches.
static SERIAL: Mutex<()> = Mutex::new(());

const STEPS: u64 = 8;

/// A small Llama: 4 layers, 4 query heads over 2 key-value heads, untied.
fn base(out: &Path) -> Vec<String> {
    [
        "model.arch=llama",
        "model.n_layer=4",
        "model.n_head=4",
        "model.n_kv_head=2",
        "model.n_embd=32",
        "model.ffn_hidden=64",
        "model.block_size=32",
        "train.batch_size=2",
        &format!("train.max_steps={STEPS}"),
        "train.warmup_steps=2",
        "train.log_interval=1",
        "train.eval_interval=4",
        "train.eval_iters=2",
        "run.sample_tokens=0",
        "run.threads=1",
        "parallel.bucket_mb=0.01",
        &format!("run.out_dir={}", out.display()),
        &common::corpus_set(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn launch(np: usize, sets: Vec<String>) -> Output {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    train_command(np, &[], sets).output().unwrap()
}

fn run(np: usize, out: &Path, sets: &[&str]) -> Curve {
    let all: Vec<String> = base(out).into_iter().chain(sets.iter().map(|s| s.to_string())).collect();
    let o = launch(np, all);
    assert!(o.status.success(), "np={np} {sets:?}\n{}", describe(&o));
    train_curve(out)
}

fn same(name: &str, got: &Curve, want: &Curve, tol: f64) {
    assert_same_curve(name, got, want, STEPS as usize, tol);
}

/// Data parallelism (DDP, ZeRO-1) and pipeline stages (with recompute too): the same losses,
/// gradient norms and final weights as one process with the same global batch, within 1e-5
/// relative.
#[test]
fn llama_layouts_train_like_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let ref_out = dir.path().join("reference");
    let want = run(0, &ref_out, &["train.grad_accum=4"]);
    let layouts: [(&str, usize, &[&str]); 4] = [
        ("dp2", 2, &["train.grad_accum=2"]),
        ("dp2-zero1", 2, &["train.grad_accum=2", "parallel.zero=1"]),
        ("pp2-1f1b", 2, &["train.grad_accum=4", "parallel.pp=2"]),
        // Recompute inside pipeline stages (backward from a received gradient).
        (
            "pp2-interleaved-recompute",
            2,
            &["train.grad_accum=4", "parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2", "train.recompute=full"],
        ),
    ];
    for (name, np, sets) in layouts {
        let out = dir.path().join(name);
        same(name, &run(np, &out, sets), &want, 1e-5);
        let (tensor, d) = common::max_weight_diff(&out, &ref_out);
        assert!(d <= 1e-5, "{name}: final weights differ by {d:.2e} relative ({tensor})");
    }
}

/// `train.recompute = full | selective` against `none`, under 2-rank data parallelism, with
/// dropout (the recomputed masks must be the forward's) and without.
#[test]
fn recompute_changes_no_result_under_data_parallelism() {
    let dir = tempfile::tempdir().unwrap();
    for (arch, dropout) in [("llama", "0.0"), ("llama", "0.2"), ("gpt", "0.2")] {
        let sets = |r: &str| -> Vec<String> {
            let mut v: Vec<String> = base(&dir.path().join(format!("{arch}-{dropout}-{r}")));
            if arch == "gpt" {
                v.retain(|s| !s.starts_with("model.arch") && !s.starts_with("model.n_kv_head") && !s.starts_with("model.ffn_hidden"));
            }
            v.extend([format!("model.dropout={dropout}"), format!("train.recompute={r}"), "train.grad_accum=2".into()]);
            v
        };
        let outcome = |r: &str| {
            let o = launch(2, sets(r));
            assert!(o.status.success(), "{arch} dropout {dropout} recompute {r}\n{}", describe(&o));
            train_curve(&dir.path().join(format!("{arch}-{dropout}-{r}")))
        };
        let none = outcome("none");
        for r in ["full", "selective"] {
            // The same maths in the same order: equal up to the order of one residual sum.
            same(&format!("{arch} dropout {dropout} {r}"), &outcome(r), &none, 1e-6);
        }
    }
}

use common::{fabbrica, hf_reference as python};

/// Transfer learning: a `LlamaForCausalLM` made by transformers is the starting point
/// (`model.init_from`); fabbrica fine-tunes it on the corpus, samples from it, exports it, and
/// transformers loads the export with the logits fabbrica computes from its checkpoint.
#[test]
fn fine_tune_a_transformers_llama_sample_and_export_it_back() {
    let dir = tempfile::tempdir().unwrap();
    python(&["make", "--arch", "llama", "--out", dir.path().to_str().unwrap(), "--kv-heads", "2", "--vocab", "128"]);
    let hf_dir = dir.path().join("model");
    let init = format!("model.init_from={}", hf_dir.display());
    let common_sets = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec![
            init.clone(),
            "model.block_size=16".into(),
            "train.batch_size=2".into(),
            "train.log_interval=1".into(),
            "train.eval_interval=100".into(),
            "train.eval_iters=1".into(),
            "run.sample_tokens=0".into(),
            "run.threads=1".into(),
            format!("run.out_dir={}", out.display()),
            common::corpus_set(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // With a learning rate of ~0 the checkpoint is the published weights: they were loaded.
    let frozen = dir.path().join("frozen");
    let o = launch(0, common_sets(&frozen, &["train.max_steps=1", "train.lr=1e-12", "train.min_lr=0", "train.warmup_steps=0"]));
    assert!(o.status.success(), "{}", describe(&o));
    let ck = checkpoint::load(&checkpoint::latest(&frozen).unwrap().unwrap()).unwrap();
    let published = Tensor::read_safetensors(hf_dir.join("model.safetensors")).unwrap();
    assert_eq!(ck.model.len(), published.len());
    for (name, t) in &published {
        let ours = &ck.model.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} not in the checkpoint")).1;
        let d = (ours - t).abs().max().double_value(&[]);
        assert!(d < 1e-9, "{name} moved by {d} at lr 1e-12: not the published weights");
    }

    // Fine-tune for real; the loss falls from the published model's.
    let tuned = dir.path().join("tuned");
    let o = launch(0, common_sets(&tuned, &["train.max_steps=30", "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=2"]));
    assert!(o.status.success(), "{}", describe(&o));
    let losses: Vec<f64> = read(&tuned.join("metrics.jsonl")).unwrap().into_iter().filter(|r| r.kind == "train").map(|r| r.loss.unwrap()).collect();
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    assert!(mean(&losses[25..]) < 0.85 * mean(&losses[..3]), "{losses:?}");

    // Sample from it.
    let o = fabbrica(&["sample", "--checkpoint", tuned.to_str().unwrap(), "--prompt", "def ", "--tokens", "20"]);
    assert!(o.status.success(), "{}", describe(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("def "), "{}", describe(&o));

    // Export, and transformers reads it with fabbrica's logits.
    let exported = dir.path().join("exported");
    let o = fabbrica(&["export", "--checkpoint", tuned.to_str().unwrap(), "--out", exported.to_str().unwrap()]);
    assert!(o.status.success(), "{}", describe(&o));
    let ck = checkpoint::resolve(&tuned).unwrap();
    let cfg = &ck.state.config.model;
    let model = Model::build(cfg, Device::Cpu, &StageSpec::whole(cfg.n_layer()), 0).unwrap();
    model.load_parameters(&ck.model).unwrap();
    tch::manual_seed(3);
    let ids = Tensor::randint(101, [2, 16], (Kind::Int64, Device::Cpu));
    let ids_file = dir.path().join("ids.safetensors");
    Tensor::write_safetensors(&[("ids", &ids)], &ids_file).unwrap();
    let lf = dir.path().join("logits.safetensors");
    let said = python(&["logits", exported.to_str().unwrap(), "--ids", ids_file.to_str().unwrap(), "--out", lf.to_str().unwrap()]);
    assert!(said.contains("LlamaForCausalLM"), "{said}");
    let theirs = Tensor::read_safetensors(&lf).unwrap().remove(0).1;
    let ours = tch::no_grad(|| model.forward(&ids, false));
    let d = (&ours - &theirs).abs().max().double_value(&[]) / theirs.abs().max().double_value(&[]);
    assert!(d < 1e-5, "transformers' logits of the export differ by {d:e} relative");
}

/// Each mistake is one line naming what to change, exit 2, before anything is trained.
#[test]
fn bad_transfer_learning_input_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    python(&["make", "--arch", "gpt2", "--out", dir.path().to_str().unwrap(), "--vocab", "128"]);
    let hf_dir = dir.path().join("model");
    let out = dir.path().join("run");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![format!("model.init_from={}", dir.path().display())], "config.json"),
        (vec![format!("model.init_from={}", dir.path().join("nowhere").display())], "model.init_from"),
        (vec![format!("model.init_from={}", hf_dir.display()), "model.n_layer=2".into()], "model.n_layer"),
        (vec![format!("model.init_from={}", hf_dir.display()), "model.arch=llama".into()], "model.arch"),
        // Data tokenized for a larger vocabulary than the published model's: the data must change.
        (
            vec![format!("model.init_from={}", hf_dir.display()), "data.tokenizer=gpt2".into()],
            "tokenize the data with that model's own tokenizer: set data.tokenizer=hf:",
        ),
        // A block longer than GPT-2's learned position table.
        (vec![format!("model.init_from={}", hf_dir.display()), "model.block_size=100000".into()], "learned positions for"),
    ];
    for (sets, want) in cases {
        let mut all = sets.clone();
        all.extend([format!("run.out_dir={}", out.display()), common::corpus_set(), "train.max_steps=1".into()]);
        let o = launch(0, all);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{sets:?}\n{}", describe(&o));
        assert_eq!(err.trim().lines().count(), 1, "{sets:?}: not one line\n{err}");
        assert!(err.contains(want), "{sets:?}: {err}");
    }
    // Export: no checkpoint there; an --out that exists.
    let o = fabbrica(&["export", "--checkpoint", dir.path().join("nowhere").to_str().unwrap(), "--out", dir.path().join("x").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no checkpoint"), "{}", describe(&o));
    let o = launch(0, {
        let mut v = vec![format!("model.init_from={}", hf_dir.display()), "train.max_steps=1".into(), "run.sample_tokens=0".into()];
        v.extend([format!("run.out_dir={}", out.display()), common::corpus_set()]);
        v
    });
    assert!(o.status.success(), "{}", describe(&o));
    let o = fabbrica(&["export", "--checkpoint", out.to_str().unwrap(), "--out", hf_dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("exists"), "{}", describe(&o));
}
