//! Overfits one fixed batch with the reference GPT and AdamW, the classic first check of a
//! training stack: the loss must fall from ln(vocab) to near zero. Exits non-zero otherwise.
//!
//!     cargo run --release -p fabbrica-examples --example overfit_one_batch

use fabbrica_models::{GptConfig, Model, ModelConfig};
use fabbrica_train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use tch::{Device, Kind, Tensor};

fn main() {
    tch::manual_seed(0);
    let cfg = GptConfig {
        vocab_size: 50,
        block_size: 32,
        n_layer: 2,
        n_head: 2,
        n_embd: 64,
        dropout: 0.0,
        bias: true,
        tie_embeddings: true,
        ..GptConfig::default()
    };
    let model = Model::new(&ModelConfig::Gpt(cfg), Device::Cpu).expect("valid config");
    let params: Vec<(String, Tensor)> = model.parameter_handles();
    let mut opt = AdamW::new(&params, AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0, fused: false });
    let x = Tensor::randint(50, [4, 32], (Kind::Int64, Device::Cpu)); // (B, T)
    let y = x.roll([-1], [1]); // predict the next token of a fixed sequence
    let mut first = f64::NAN;
    let mut last = f64::NAN;
    for step in 0..200 {
        let loss = Model::cross_entropy(&model.forward(&x, true), &y);
        loss.backward();
        let _ = clip_grad_norm(&params, 1.0);
        opt.step(3e-3).expect("AdamW step");
        for (_, p) in &params {
            p.shallow_clone().zero_grad();
        }
        last = loss.double_value(&[]);
        if step == 0 {
            first = last;
        }
        if step % 50 == 0 {
            println!("step {step:3}: loss {last:.4}");
        }
    }
    println!("loss {first:.4} -> {last:.4}");
    assert!((first - (50f64).ln()).abs() < 0.5, "initial loss {first} should be near ln(50)");
    assert!(last < 0.1, "one batch was not memorised: final loss {last}");
}
