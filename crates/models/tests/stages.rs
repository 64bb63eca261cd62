//! A model built as stages computes what the whole model computes, from the same weights, for
//! both architectures; recompute changes memory, not results.

use std::sync::{Mutex, MutexGuard};

use fabbrica_models::{GptConfig, LlamaConfig, Model, ModelConfig, Recompute, StageSpec};
use tch::{Device, Kind, Tensor};

/// libtorch's RNG is process-global and the tests of this file run on parallel threads: each
/// holds this lock, so that another test's seeding cannot land between its seed and its draws.
fn rng_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn gpt(tie: bool) -> ModelConfig {
    ModelConfig::Gpt(GptConfig { vocab_size: 37, block_size: 16, n_layer: 5, n_head: 2, n_embd: 16, tie_embeddings: tie, ..GptConfig::default() })
}

fn llama(tie: bool) -> ModelConfig {
    ModelConfig::Llama(LlamaConfig {
        vocab_size: 37,
        block_size: 16,
        n_layer: 5,
        n_head: 4,
        n_kv_head: 2,
        n_embd: 16,
        ffn_hidden: 40,
        tie_embeddings: tie,
        ..LlamaConfig::default()
    })
}

#[test]
fn stages_chained_equal_the_whole_model_and_share_its_initial_weights() {
    let _rng = rng_lock();
    for c in [gpt(true), llama(true)] {
        let whole = Model::build(&c, Device::Cpu, &StageSpec::whole(5), 42).unwrap();
        let stages: Vec<Model> = StageSpec::split(&[2, 1, 2]).iter().map(|s| Model::build(&c, Device::Cpu, s, 42).unwrap()).collect();
        // Each stage's parameters are the whole model's of the same name, value for value.
        let by_name: std::collections::HashMap<&str, &Tensor> = whole.parameters().iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut seen = 0;
        for s in &stages {
            for (n, t) in s.parameters() {
                assert!(t.equal(by_name[n.as_str()]), "{n} differs");
                seen += 1;
            }
        }
        assert_eq!(seen, whole.parameters().len() + 1, "every parameter once, the tied embedding twice");
        assert!(!stages[0].holds_tied_copy() && stages[2].holds_tied_copy());
        // Forward through the chain equals the whole model's forward.
        tch::manual_seed(0);
        let idx = Tensor::randint(37, [3, 16], (Kind::Int64, Device::Cpu));
        let want = whole.forward(&idx, false);
        let got = stages.iter().fold(idx.shallow_clone(), |x, s| s.forward_stage(&x, false));
        assert_eq!(got.size(), [3, 16, 37]);
        assert!((got - want).abs().max().double_value(&[]) < 1e-6, "{}", c.arch());
        // Another seed, other weights.
        let other = Model::build(&c, Device::Cpu, &StageSpec::whole(5), 43).unwrap();
        assert!(!other.parameters()[0].1.equal(&whole.parameters()[0].1));
    }
}

#[test]
fn a_stage_loads_its_own_tensors_from_a_whole_model() {
    let _rng = rng_lock();
    for (c, layer4) in [(gpt(true), "transformer.h.4.mlp"), (llama(true), "model.layers.4.mlp")] {
        let whole = Model::build(&c, Device::Cpu, &StageSpec::whole(5), 1).unwrap();
        let stage = Model::build(&c, Device::Cpu, &StageSpec { embed: false, blocks: 3..5, head: true }, 2).unwrap();
        stage.load_own_parameters(whole.parameters()).unwrap();
        for (n, t) in stage.parameters() {
            let w = &whole.parameters().iter().find(|(m, _)| m == n).unwrap().1;
            assert!(t.equal(w), "{n}");
        }
        // A tensor of the stage missing is refused by name.
        let partial: Vec<(String, Tensor)> =
            whole.parameters().iter().filter(|(n, _)| !n.starts_with(layer4)).map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        let e = stage.load_own_parameters(&partial).unwrap_err().to_string();
        assert!(e.contains(layer4), "{e}");
    }
}

#[test]
fn an_untied_model_has_its_own_head_on_the_last_stage_only() {
    let _rng = rng_lock();
    for c in [gpt(false), llama(false)] {
        let emb = c.embedding_name();
        let whole = Model::build(&c, Device::Cpu, &StageSpec::whole(5), 9).unwrap();
        let names: Vec<&str> = whole.parameters().iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"lm_head.weight") && names.contains(&emb));
        assert_eq!(whole.num_params() as u64, fabbrica_models::flops::total_params(&c));
        let stages: Vec<Model> = StageSpec::split(&[3, 2]).iter().map(|s| Model::build(&c, Device::Cpu, s, 9).unwrap()).collect();
        let last: Vec<&str> = stages[1].parameters().iter().map(|(n, _)| n.as_str()).collect();
        assert!(last.contains(&"lm_head.weight") && !last.contains(&emb));
        assert!(!stages[1].holds_tied_copy());
        for (s, spec) in stages.iter().zip(StageSpec::split(&[3, 2])) {
            assert_eq!(s.num_params() as u64, fabbrica_models::stage_params(&c, &spec));
            // The shapes listed without allocating are the built ones.
            let shapes = Model::parameter_shapes(&c, &spec).unwrap();
            let built: Vec<(String, Vec<i64>)> = s.parameters().iter().map(|(n, t)| (n.clone(), t.size())).collect();
            assert_eq!(shapes, built);
        }
        tch::manual_seed(0);
        let idx = Tensor::randint(37, [2, 16], (Kind::Int64, Device::Cpu));
        let got = stages.iter().fold(idx.shallow_clone(), |x, s| s.forward_stage(&x, false));
        assert!((got - whole.forward(&idx, false)).abs().max().double_value(&[]) < 1e-6);
    }
}

/// Loss and every gradient of one training forward/backward, with `r` recompute, from the same
/// weights and the same RNG seed.
fn loss_and_grads(c: &ModelConfig, r: Recompute) -> (f64, Vec<(String, Tensor)>) {
    let mut m = Model::build(c, Device::Cpu, &StageSpec::whole(c.n_layer()), 5).unwrap();
    m.set_recompute(r);
    tch::manual_seed(11);
    let idx = Tensor::randint(37, [2, 16], (Kind::Int64, Device::Cpu));
    let tgt = Tensor::randint(37, [2, 16], (Kind::Int64, Device::Cpu));
    tch::manual_seed(12);
    let loss = Model::cross_entropy(&m.forward(&idx, true), &tgt);
    // Draws between forward and backward must not change the recomputed dropout masks.
    let _ = Tensor::rand([64], (Kind::Float, Device::Cpu));
    loss.backward();
    (loss.double_value(&[]), m.parameters().iter().map(|(n, t)| (n.clone(), t.grad())).collect())
}

#[test]
fn recompute_gives_the_same_loss_and_gradients_with_and_without_dropout() {
    let _rng = rng_lock();
    for base in [gpt(true), llama(false)] {
        for dropout in [0.0, 0.2] {
            let c = match base.clone() {
                ModelConfig::Gpt(g) => ModelConfig::Gpt(GptConfig { dropout, ..g }),
                ModelConfig::Llama(l) => ModelConfig::Llama(LlamaConfig { dropout, ..l }),
            };
            let (l0, g0) = loss_and_grads(&c, Recompute::None);
            for r in [Recompute::Full, Recompute::Selective] {
                let (l1, g1) = loss_and_grads(&c, r);
                assert_eq!(l0, l1, "{} dropout {dropout} {r:?}: loss", c.arch());
                for ((n, a), (_, b)) in g0.iter().zip(&g1) {
                    // Same maths in the same order: bitwise, except that the residual stream's
                    // gradient may be summed in another order (one float rounding).
                    let d = (a - b).abs().max().double_value(&[]);
                    let scale = a.abs().max().double_value(&[]).max(1e-12);
                    assert!(d <= 1e-6 * scale, "{} dropout {dropout} {r:?}: {n} differs by {d} (scale {scale})", c.arch());
                }
            }
        }
    }
}
