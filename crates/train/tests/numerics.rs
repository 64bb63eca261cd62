//! Numerics against PyTorch (CPU, fp32): scripts/torch_reference.py builds nanoGPT's GPT-2 with
//! the same config, dumps weights, a batch, logits, loss, every gradient, the gradient norm, the
//! losses of 10 AdamW steps (clip 1.0, decay/no-decay groups) and the final weights. We load the
//! same weights and must reproduce all of it.
//!
//! With `--autocast` on both sides, the same under bf16 autocast (`bf16_autocast_matches_pytorch_autocast`).
//!
//! Tolerances (absolute, fp32): logits/loss 2e-5, gradients 2e-5 (their scale is ~1e-2..1),
//! the 10 losses 5e-5 and final weights 5e-5 (differences in summation order compound over steps).

mod common;

use std::collections::HashMap;
use std::process::Command;

use fabbrica_models::{GptConfig, Model, ModelConfig};
use fabbrica_torch_ext::amp::autocast;
use fabbrica_train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use tch::{Device, Kind, Tensor};

fn reference(bias: bool, bf16: bool) -> HashMap<String, Tensor> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ref.safetensors");
    let st = Command::new(common::venv_python())
        .arg(common::repo_root().join("scripts/torch_reference.py"))
        .args(["--out", out.to_str().unwrap(), "--bias", if bias { "1" } else { "0" }])
        .args(if bf16 { &["--autocast"][..] } else { &[] })
        .status()
        .unwrap();
    assert!(st.success(), "torch_reference.py failed");
    Tensor::read_safetensors(&out).unwrap().into_iter().collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

/// Absolute tolerances: logits and loss; gradients and their norm; the losses of the 10 steps
/// and the final weights.
struct Tol {
    forward: f64,
    grad: f64,
    steps: f64,
}

/// fp32: differences only in summation order.
const FP32: Tol = Tol { forward: 2e-5, grad: 2e-5, steps: 5e-5 };

fn check(bias: bool, fused: bool) {
    check_with(bias, fused, false, FP32)
}

/// Loads the reference's weights, then reproduces its forward, backward, clip and 10 AdamW steps;
/// `bf16`: the forward and the loss under bf16 autocast on both sides.
fn check_with(bias: bool, fused: bool, bf16: bool, tol: Tol) {
    let r = reference(bias, bf16);
    let cfg = GptConfig {
        vocab_size: 65,
        block_size: 16,
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
        dropout: 0.0,
        bias,
        tie_embeddings: true,
        ..GptConfig::default()
    };
    let model = Model::new(&ModelConfig::Gpt(cfg.clone()), Device::Cpu).unwrap();
    let names: Vec<String> = model.parameters().iter().map(|(n, _)| n.clone()).collect();
    let weights: Vec<(String, Tensor)> = names.iter().map(|n| (n.clone(), r[n].shallow_clone())).collect();
    model.load_parameters(&weights).unwrap();
    // Every parameter the reference has, we have, and vice versa (names are PyTorch's).
    let ref_params = r.keys().filter(|k| k.starts_with("transformer.")).count();
    assert_eq!(ref_params, names.len());
    let forward = |x: &Tensor, y: &Tensor| {
        autocast(Device::Cpu, bf16, || {
            let logits = model.forward(x, true);
            let loss = Model::cross_entropy(&logits, y);
            (logits.to_kind(Kind::Float), loss.to_kind(Kind::Float))
        })
    };

    let (x, y) = (&r["x"], &r["y"]);
    if bf16 {
        // Both sides really ran in bf16: the same weights in fp32 land far from the reference.
        let plain = tch::no_grad(|| model.forward(x, true));
        assert!(max_diff(&plain, &r["logits"]) > 1e-4, "the reference's logits are fp32's: {}", max_diff(&plain, &r["logits"]));
    }
    let (logits, loss) = forward(x, y);
    let mut worst = [0f64; 5]; // logits, loss, gradients, steps' losses, final weights
    worst[0] = max_diff(&logits, &r["logits"]);
    assert!(worst[0] < tol.forward, "logits differ by {}", worst[0]);
    worst[1] = max_diff(&loss, &r["loss"]);
    assert!(worst[1] < tol.forward, "loss {} vs {}", loss.double_value(&[]), r["loss"].double_value(&[]));
    loss.backward();
    for (n, p) in model.parameters() {
        let d = max_diff(&p.grad(), &r[&format!("grad.{n}")]);
        worst[2] = worst[2].max(d);
        assert!(d < tol.grad, "gradient of {n} differs by {d}");
    }
    let params: Vec<(String, Tensor)> = model.parameter_handles();
    let norm = clip_grad_norm(&params, 1.0).double_value(&[]);
    assert!((norm - r["grad_norm"].double_value(&[])).abs() < tol.grad / 2.0, "grad norm {norm}");

    // 10 AdamW steps on the same batch: step 0 reuses the gradients above (already clipped).
    let mut opt = AdamW::new(&params, AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, fused });
    let losses = &r["losses"];
    let steps = losses.size()[0];
    for i in 0..steps {
        if i > 0 {
            for (_, p) in &params {
                p.shallow_clone().zero_grad();
            }
            let (_, l) = forward(x, y);
            let want = losses.double_value(&[i]);
            worst[3] = worst[3].max((l.double_value(&[]) - want).abs());
            assert!((l.double_value(&[]) - want).abs() < tol.steps, "step {i}: loss {} vs PyTorch {want}", l.double_value(&[]));
            l.backward();
            let _ = clip_grad_norm(&params, 1.0);
        }
        opt.step(1e-3).unwrap();
    }
    for (n, p) in &params {
        let d = max_diff(p, &r[&format!("final.{n}")]);
        worst[4] = worst[4].max(d);
        assert!(d < tol.steps, "final {n} differs by {d}");
    }
    println!(
        "bias {bias} fused {fused} bf16 {bf16}: max |diff| logits {:.1e} loss {:.1e} grads {:.1e} losses {:.1e} final {:.1e}",
        worst[0], worst[1], worst[2], worst[3], worst[4]
    );
}

/// bf16 autocast on the CPU against PyTorch's own (`torch.autocast("cpu", torch.bfloat16)`):
/// the same libtorch casts the same ops to bf16 (and runs the same kernels on the same machine),
/// so the fp32 tolerances hold, where bf16 against fp32 differs by ~1e-3 (bf16's rounding is
/// 4e-3 relative). Measured (2026-12-02, fused AdamW against PyTorch's single-tensor one):
/// logits, loss, gradients and the 10 losses identical, final weights within 4e-9.
#[test]
fn bf16_autocast_matches_pytorch_autocast() {
    check_with(true, true, true, FP32);
}

#[test]
fn gpt_matches_pytorch_with_bias() {
    check(true, false);
}

#[test]
fn gpt_matches_pytorch_without_bias() {
    check(false, false);
}

#[test]
fn fused_adamw_matches_pytorch() {
    check(true, true);
}
