//! Numerics against PyTorch (CPU, fp32): scripts/torch_reference.py builds nanoGPT's GPT-2 with
//! the same config, dumps weights, a batch, logits, loss, every gradient, the gradient norm, the
//! losses of 10 AdamW steps (clip 1.0, decay/no-decay groups) and the final weights. We load the
//! same weights and must reproduce all of it.
//!
//! Tolerances (absolute, fp32): logits/loss 2e-5, gradients 2e-5 (their scale is ~1e-2..1),
//! the 10 losses 5e-5 and final weights 5e-5 (differences in summation order compound over steps).

mod common;

use std::collections::HashMap;
use std::process::Command;

use fabbrica_models::{GptConfig, Model, ModelConfig};
use fabbrica_train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use tch::{Device, Tensor};

fn reference(bias: bool) -> HashMap<String, Tensor> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ref.safetensors");
    let st = Command::new(common::venv_python())
        .arg(common::repo_root().join("scripts/torch_reference.py"))
        .args(["--out", out.to_str().unwrap(), "--bias", if bias { "1" } else { "0" }])
        .status()
        .unwrap();
    assert!(st.success(), "torch_reference.py failed");
    Tensor::read_safetensors(&out).unwrap().into_iter().collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn check(bias: bool, fused: bool) {
    let r = reference(bias);
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

    let (x, y) = (&r["x"], &r["y"]);
    let logits = model.forward(x, true);
    assert!(max_diff(&logits, &r["logits"]) < 2e-5, "logits differ by {}", max_diff(&logits, &r["logits"]));
    let loss = Model::cross_entropy(&logits, y);
    assert!(max_diff(&loss, &r["loss"]) < 2e-5, "loss {} vs {}", loss.double_value(&[]), r["loss"].double_value(&[]));
    loss.backward();
    for (n, p) in model.parameters() {
        let d = max_diff(&p.grad(), &r[&format!("grad.{n}")]);
        assert!(d < 2e-5, "gradient of {n} differs by {d}");
    }
    let params: Vec<(String, Tensor)> = model.parameter_handles();
    let norm = clip_grad_norm(&params, 1.0).double_value(&[]);
    assert!((norm - r["grad_norm"].double_value(&[])).abs() < 1e-5, "grad norm {norm}");

    // 10 AdamW steps on the same batch: step 0 reuses the gradients above (already clipped).
    let mut opt = AdamW::new(&params, AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, fused });
    let losses = &r["losses"];
    let steps = losses.size()[0];
    for i in 0..steps {
        if i > 0 {
            for (_, p) in &params {
                p.shallow_clone().zero_grad();
            }
            let l = Model::cross_entropy(&model.forward(x, true), y);
            let want = losses.double_value(&[i]);
            assert!((l.double_value(&[]) - want).abs() < 5e-5, "step {i}: loss {} vs PyTorch {want}", l.double_value(&[]));
            l.backward();
            let _ = clip_grad_norm(&params, 1.0);
        }
        opt.step(1e-3).unwrap();
    }
    for (n, p) in &params {
        let d = max_diff(p, &r[&format!("final.{n}")]);
        assert!(d < 5e-5, "final {n} differs by {d}");
    }
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
