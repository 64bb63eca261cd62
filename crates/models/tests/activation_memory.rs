//! Activation memory of a training micro-step, measured by libtorch's CPU allocator (counted by
//! `fabbrica_torch_ext::amp`), against the estimate that `--dry-run`, the memory check and the
//! planner use: per layer within 2% (the estimate counts the tensors autograd keeps, tensor by
//! tensor), the whole micro-step within 10%, for GPT and Llama (grouped-query), in fp32 and under
//! bf16 autocast (which runs the same casts on the CPU as on CUDA), with the fused attention
//! kernel and with the math path that dropout takes on the CPU.

use fabbrica_models::flops::{memory_estimate_with, Attention};
use fabbrica_models::{GptConfig, LlamaConfig, Model, ModelConfig, Recompute};
use fabbrica_torch_ext::amp::{autocast, count_cpu_allocations, cpu_allocated_bytes, cpu_peak_allocated_bytes, reset_cpu_peak};
use tch::{Device, Kind, Tensor};

const B: i64 = 4;
const T: i64 = 128;
const C: usize = 128;

/// Peak bytes above what was allocated before one forward + backward of a micro-batch, on the
/// second step (the first allocates the gradients, which the estimate counts apart).
fn measured_activations(cfg: &ModelConfig, bf16: bool) -> u64 {
    tch::manual_seed(1);
    let model = Model::new(cfg, Device::Cpu).unwrap();
    let x = Tensor::randint(cfg.vocab_size() as i64, [B, T], (Kind::Int64, Device::Cpu));
    let y = Tensor::randint(cfg.vocab_size() as i64, [B, T], (Kind::Int64, Device::Cpu));
    let mut peak = 0;
    for _ in 0..2 {
        let base = cpu_allocated_bytes();
        reset_cpu_peak();
        let loss = autocast(Device::Cpu, bf16, || model.loss(&model.forward(&x, true), &y));
        loss.backward();
        peak = cpu_peak_allocated_bytes() - base;
    }
    peak
}

fn gpt(layers: usize, dropout: f64) -> ModelConfig {
    ModelConfig::Gpt(GptConfig { vocab_size: 101, block_size: T as usize, n_layer: layers, n_head: 4, n_embd: C, dropout, ..GptConfig::default() })
}

/// A model of `layers` layers with dropout `p`.
type Make = fn(usize, f64) -> ModelConfig;

fn llama(layers: usize, _dropout: f64) -> ModelConfig {
    ModelConfig::Llama(LlamaConfig {
        vocab_size: 101,
        block_size: T as usize,
        n_layer: layers,
        n_head: 8,
        n_kv_head: 4,
        n_embd: C,
        ffn_hidden: 352,
        ..LlamaConfig::default()
    })
}

#[test]
fn the_activation_estimate_is_what_libtorch_allocates() {
    count_cpu_allocations();
    let mut failures = Vec::new();
    let cases: [(&str, Make, f64); 3] = [("gpt", gpt, 0.0), ("gpt, dropout (math attention)", gpt, 0.1), ("llama gqa", llama, 0.0)];
    for (name, cfg, dropout) in cases {
        for bf16 in [false, true] {
            let attention = if dropout > 0.0 { Attention::Math } else { Attention::Fused };
            let est = |l| memory_estimate_with(&cfg(l, dropout), B as usize, T as usize, bf16, attention, Recompute::None).activations;
            let (m1, m3) = (measured_activations(&cfg(1, dropout), bf16), measured_activations(&cfg(3, dropout), bf16));
            let (e1, e3) = (est(1), est(3));
            let per_layer = |a: u64, b: u64| (b - a) as f64 / 2.0 / (B * T * C as i64) as f64;
            let (m, e) = (per_layer(m1, m3), per_layer(e1, e3));
            let line = format!(
                "{name}, {}: per layer {m:.2} bytes per token and channel measured, {e:.2} estimated; 3 layers {m3} bytes measured, {e3} estimated",
                if bf16 { "bf16 autocast" } else { "fp32" }
            );
            println!("{line}");
            if (e - m).abs() > 0.02 * m || (e3 as f64 - m3 as f64).abs() > 0.10 * m3 as f64 {
                failures.push(line);
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
