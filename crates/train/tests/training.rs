//! End-to-end training behaviour on real text (the default corpus): the loss falls, and a run
//! resumed from a checkpoint continues bitwise identically to an uninterrupted one (CPU).

mod common;

use std::path::Path;

use fabbrica_train::metrics::{read, Record};
use fabbrica_train::{train, Config, TrainOptions};

fn config(out: &Path, sets: &[&str]) -> Config {
    config_for("tiny", out, sets)
}

fn config_for(preset: &str, out: &Path, sets: &[&str]) -> Config {
    let mut all: Vec<String> = vec![
        format!("data.path={}", common::corpus().display()),
        format!("run.out_dir={}", out.display()),
        "run.device=cpu".into(),
        "run.sample_tokens=0".into(),
    ];
    all.extend(sets.iter().map(|s| s.to_string()));
    Config::resolve(Some(preset), None, &all).unwrap()
}

fn train_losses(out: &Path) -> Vec<(u64, f64)> {
    read(&out.join("metrics.jsonl")).unwrap().into_iter().filter(|r: &Record| r.kind == "train").map(|r| (r.step, r.loss.unwrap())).collect()
}

#[test]
fn tiny_preset_loss_falls_well_below_its_start() {
    let _g = common::torch_lock();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &["train.max_steps=150", "train.log_interval=1", "train.eval_iters=5", "train.eval_interval=1000"]);
    let out = train(&cfg, &TrainOptions::default()).unwrap();
    let losses = train_losses(dir.path());
    let first = losses.first().unwrap().1;
    // At init the loss is about ln(vocab) = ln(101) ≈ 4.6. The unigram distribution of this
    // corpus is worth ≈ 3.3; below 2.6 the model has learned real structure (words, indentation).
    assert!(first > 4.0, "first loss {first}");
    assert!(out.val_loss < 0.6 * first, "val loss {} did not fall well below the start {first}", out.val_loss);
    assert!(out.train_loss < 2.6, "train loss {}", out.train_loss);
}

#[test]
fn llama_tiny_preset_loss_falls_well_below_its_start() {
    let _g = common::torch_lock();
    let dir = tempfile::tempdir().unwrap();
    let cfg =
        config_for("llama-tiny", dir.path(), &["train.max_steps=150", "train.log_interval=1", "train.eval_iters=5", "train.eval_interval=1000"]);
    let out = train(&cfg, &TrainOptions::default()).unwrap();
    let first = train_losses(dir.path()).first().unwrap().1;
    // The same bar as GPT's tiny: from ln(101) ≈ 4.6 to well below the unigram 3.3.
    assert!(first > 4.0, "first loss {first}");
    assert!(out.val_loss < 0.6 * first, "val loss {} did not fall well below the start {first}", out.val_loss);
    assert!(out.train_loss < 2.6, "train loss {}", out.train_loss);
}

#[test]
fn resume_continues_bitwise_identically() {
    let _g = common::torch_lock();
    // Dropout on, so the per-step RNG state matters too.
    let sets = [
        "model.n_layer=2",
        "model.n_embd=64",
        "model.dropout=0.1",
        "train.batch_size=8",
        "train.max_steps=12",
        "train.warmup_steps=3",
        "train.log_interval=1",
        "train.eval_interval=1000",
        "train.eval_iters=2",
        "train.grad_accum=2",
    ];
    for preset in ["tiny", "llama-tiny"] {
        resume_bitwise(preset, &sets);
    }
}

fn resume_bitwise(preset: &str, sets: &[&str]) {
    let config = |out: &Path, sets: &[&str]| config_for(preset, out, sets);
    let a = tempfile::tempdir().unwrap();
    train(&config(a.path(), sets), &TrainOptions::default()).unwrap();

    let b = tempfile::tempdir().unwrap();
    let mut first: Vec<&str> = sets.to_vec();
    first.push("run.stop_at=5");
    let stopped = train(&config(b.path(), &first), &TrainOptions::default()).unwrap();
    assert_eq!(stopped.steps, 5);
    let mut second: Vec<&str> = sets.to_vec();
    second.push("run.resume=true");
    let resumed = train(&config(b.path(), &second), &TrainOptions::default()).unwrap();
    assert_eq!(resumed.steps, 12);

    let (la, lb) = (train_losses(a.path()), train_losses(b.path()));
    assert_eq!(la.len(), 12);
    assert_eq!(lb.iter().map(|x| x.0).collect::<Vec<_>>(), (1..=12).collect::<Vec<_>>(), "metrics read as one run");
    for ((sa, x), (sb, y)) in la.iter().zip(&lb) {
        assert_eq!(sa, sb);
        assert_eq!(x.to_bits(), y.to_bits(), "step {sa}: {x} vs {y}");
    }
    // Same final weights, byte for byte.
    let ck = |d: &Path| fabbrica_train::checkpoint::read_state(&fabbrica_train::checkpoint::latest(d).unwrap().unwrap()).unwrap();
    assert_eq!(ck(a.path()).sha256["model.safetensors"], ck(b.path()).sha256["model.safetensors"]);
}

/// `train.tf32` reaches libtorch's process-wide flag in every setup (on by default, off when
/// asked), and the bench says how its matmuls ran. On the CPU the flag changes no result
/// (torch-ext's precision tests); on CUDA it is what cuBLAS reads.
#[test]
fn train_tf32_sets_libtorch_flag_in_setup_and_bench() {
    let _g = common::torch_lock();
    let dir = tempfile::tempdir().unwrap();
    fabbrica_torch_ext::set_cuda_matmul_tf32(false).unwrap();
    fabbrica_train::setup::setup(&config(dir.path(), &[])).unwrap();
    assert_eq!(fabbrica_torch_ext::cuda_matmul_tf32(), Some(true), "the default is on");
    fabbrica_train::setup::setup(&config(dir.path(), &["train.tf32=false"])).unwrap();
    assert_eq!(fabbrica_torch_ext::cuda_matmul_tf32(), Some(false));
    let opts = fabbrica_train::bench::BenchOptions { steps: 1, warmup: 0, free_grads: false, profile_steps: 0 };
    let r = fabbrica_train::bench::run(&config(dir.path(), &["train.tf32=true", "train.batch_size=2"]), opts).unwrap();
    assert_eq!(fabbrica_torch_ext::cuda_matmul_tf32(), Some(true));
    assert_eq!(r.precision, "fp32");
    assert_eq!(fabbrica_train::device::precision_label(false, true, tch::Device::Cuda(0)), "fp32, TF32 matmuls");
    assert_eq!(fabbrica_train::device::precision_label(false, false, tch::Device::Cuda(0)), "fp32, IEEE matmuls");
    assert_eq!(fabbrica_train::device::precision_label(true, true, tch::Device::Cuda(0)), "bf16 autocast");
    // Sampling runs its matmuls as the run trained them.
    let run = dir.path().join("run");
    let c = config(&run, &["train.tf32=false", "train.max_steps=1", "train.batch_size=2", "train.eval_iters=1"]);
    train(&c, &TrainOptions::default()).unwrap();
    fabbrica_torch_ext::set_cuda_matmul_tf32(true).unwrap();
    let a = fabbrica_train::sample::SampleArgs {
        checkpoint: &run,
        prompt: "def ",
        tokens: 4,
        temperature: 1.0,
        top_k: None,
        seed: 1,
        device: fabbrica_train::config::DeviceChoice::Cpu,
    };
    fabbrica_train::sample::sample_from_checkpoint(&a).unwrap();
    assert_eq!(fabbrica_torch_ext::cuda_matmul_tf32(), Some(false));
}

/// `sample` prints as it generates: the pieces, joined, are exactly what the one-shot sampler
/// returns, for the char and GPT-2 (byte-level BPE: characters split across tokens) tokenizers,
/// and they come as many pieces, not one at the end.
#[test]
fn streamed_samples_equal_the_whole_sample() {
    use fabbrica_data::{Tokenizer, TokenizerSpec};
    use fabbrica_models::{GptConfig, Model, ModelConfig};
    let _g = common::torch_lock();
    // A tiny model: one thread (more only spin against the other tests); restored after.
    let threads = tch::get_num_threads();
    tch::set_num_threads(1);
    let text = "def f(x):\n    return x + 1  # één\n\nprint(f(2))\n";
    for tok in [Tokenizer::for_text(&TokenizerSpec::Char, text).unwrap(), Tokenizer::gpt2()] {
        let cfg = GptConfig { vocab_size: tok.vocab_size(), block_size: 32, n_layer: 1, n_head: 2, n_embd: 16, dropout: 0.0, ..GptConfig::default() };
        tch::manual_seed(3);
        let model = Model::new(&ModelConfig::Gpt(cfg), tch::Device::Cpu).unwrap();
        for prompt in ["", "def ", "x\n"] {
            let t = std::time::Instant::now();
            let whole = fabbrica_train::sample::sample_text(&model, &tok, prompt, 300, 1.0, None, 7);
            let mut pieces: Vec<String> = Vec::new();
            let mut emit = |p: &str| pieces.push(p.to_string());
            let returned = fabbrica_train::sample::sample_streaming(&model, &tok, prompt, 300, 1.0, None, 7, Some(&mut emit));
            assert_eq!(returned, whole);
            assert_eq!(pieces.concat(), whole, "{:?}, prompt {prompt:?}", tok.kind());
            assert!(pieces.len() > 10, "{:?}: {} pieces", tok.kind(), pieces.len());
            println!("{:?} {prompt:?}: {} pieces in {:?}", tok.kind(), pieces.len(), t.elapsed());
        }
    }
    tch::set_num_threads(threads);
}
