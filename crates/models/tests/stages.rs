//! A model built as stages computes what the whole model computes, from the same weights.

use fabbrica_models::{Gpt, GptConfig, StageSpec};
use tch::{Device, Kind, Tensor};

fn cfg() -> GptConfig {
    GptConfig { vocab_size: 37, block_size: 16, n_layer: 5, n_head: 2, n_embd: 16, dropout: 0.0, bias: true, tie_embeddings: true }
}

#[test]
fn stages_chained_equal_the_whole_model_and_share_its_initial_weights() {
    let c = cfg();
    let whole = Gpt::build(&c, Device::Cpu, &StageSpec::whole(5), 42).unwrap();
    let stages: Vec<Gpt> = StageSpec::split(&[2, 1, 2]).iter().map(|s| Gpt::build(&c, Device::Cpu, s, 42).unwrap()).collect();
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
    assert!((got - want).abs().max().double_value(&[]) < 1e-6);
    // Another seed, other weights.
    let other = Gpt::build(&c, Device::Cpu, &StageSpec::whole(5), 43).unwrap();
    assert!(!other.parameters()[0].1.equal(&whole.parameters()[0].1));
}

#[test]
fn a_stage_loads_its_own_tensors_from_a_whole_model() {
    let c = cfg();
    let whole = Gpt::build(&c, Device::Cpu, &StageSpec::whole(5), 1).unwrap();
    let stage = Gpt::build(&c, Device::Cpu, &StageSpec { embed: false, blocks: 3..5, head: true }, 2).unwrap();
    stage.load_own_parameters(whole.parameters()).unwrap();
    for (n, t) in stage.parameters() {
        let w = &whole.parameters().iter().find(|(m, _)| m == n).unwrap().1;
        assert!(t.equal(w), "{n}");
    }
    // A tensor of the stage missing is refused by name.
    let partial: Vec<(String, Tensor)> =
        whole.parameters().iter().filter(|(n, _)| !n.contains("h.4.mlp")).map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    let e = stage.load_own_parameters(&partial).unwrap_err().to_string();
    assert!(e.contains("transformer.h.4.mlp"), "{e}");
}

#[test]
fn an_untied_model_has_its_own_head_on_the_last_stage_only() {
    let c = GptConfig { tie_embeddings: false, ..cfg() };
    let whole = Gpt::build(&c, Device::Cpu, &StageSpec::whole(5), 9).unwrap();
    let names: Vec<&str> = whole.parameters().iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"lm_head.weight") && names.contains(&"transformer.wte.weight"));
    assert_eq!(whole.num_params() as u64, fabbrica_models::flops::total_params(&c));
    let stages: Vec<Gpt> = StageSpec::split(&[3, 2]).iter().map(|s| Gpt::build(&c, Device::Cpu, s, 9).unwrap()).collect();
    let last: Vec<&str> = stages[1].parameters().iter().map(|(n, _)| n.as_str()).collect();
    assert!(last.contains(&"lm_head.weight") && !last.contains(&"transformer.wte.weight"));
    assert!(!stages[1].holds_tied_copy());
    for (s, spec) in stages.iter().zip(StageSpec::split(&[3, 2])) {
        assert_eq!(s.num_params() as u64, fabbrica_models::stage_params(&c, &spec));
    }
    tch::manual_seed(0);
    let idx = Tensor::randint(37, [2, 16], (Kind::Int64, Device::Cpu));
    let got = stages.iter().fold(idx.shallow_clone(), |x, s| s.forward_stage(&x, false));
    assert!((got - whole.forward(&idx, false)).abs().max().double_value(&[]) < 1e-6);
}
