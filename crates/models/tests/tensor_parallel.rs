//! Tensor-parallel model construction, without communication: each rank's slices of a model
//! built for tp ranks are the one-process model's weights sliced (so layouts start equal), the
//! slices join back to it, the per-rank parameter count is what `stage_params_tp` (the memory
//! estimate's) says, and degrees that do not divide the model are refused naming `parallel.tp`.

use std::sync::Arc;

use fabbrica_models::{stage_params_tp, GptConfig, LlamaConfig, Model, ModelConfig, StageSpec, TensorParallel, TpOps};
use tch::{Device, Tensor};

/// Building a model never communicates: these operators exist only to make the plan, and fail
/// the test if anything calls them.
struct NotCalled;
impl TpOps for NotCalled {
    fn copy_to(&self, _: &Tensor) -> Tensor {
        unreachable!("building a model communicates nothing")
    }
    fn reduce_from(&self, _: &Tensor) -> Tensor {
        unreachable!("building a model communicates nothing")
    }
    fn gather_seq(&self, _: &Tensor) -> Tensor {
        unreachable!("building a model communicates nothing")
    }
    fn reduce_scatter_seq(&self, _: &Tensor) -> Tensor {
        unreachable!("building a model communicates nothing")
    }
    fn gather_linear(&self, _: &Tensor, _: &Tensor, _: Option<&Tensor>) -> Tensor {
        unreachable!("building a model communicates nothing")
    }
    fn vocab_parallel_cross_entropy(&self, _: &Tensor, _: &Tensor, _: i64) -> Tensor {
        unreachable!("building a model communicates nothing")
    }
}

fn plan(rank: usize, size: usize) -> Option<TensorParallel> {
    Some(TensorParallel { rank, size, sequence_parallel: false, ops: Arc::new(NotCalled) })
}

fn models() -> Vec<ModelConfig> {
    vec![
        ModelConfig::Gpt(GptConfig { vocab_size: 96, n_layer: 2, n_head: 4, n_embd: 32, block_size: 16, ..GptConfig::default() }),
        ModelConfig::Llama(LlamaConfig {
            vocab_size: 96,
            n_layer: 2,
            n_head: 8,
            n_kv_head: 4,
            n_embd: 64,
            ffn_hidden: 96,
            block_size: 16,
            tie_embeddings: false,
            ..LlamaConfig::default()
        }),
    ]
}

#[test]
fn slices_join_to_the_one_process_weights_and_count_as_estimated() {
    for cfg in models() {
        let whole = Model::build(&cfg, Device::Cpu, &StageSpec::whole(2), 7).unwrap();
        for tp in [2, 4] {
            let specs =
                [StageSpec::whole(2), StageSpec { embed: true, blocks: 0..1, head: false }, StageSpec { embed: false, blocks: 1..2, head: true }];
            for spec in &specs {
                let ranks: Vec<Model> = (0..tp).map(|r| Model::build_tp(&cfg, Device::Cpu, spec, 7, plan(r, tp)).unwrap()).collect();
                for r in &ranks {
                    assert_eq!(r.num_params() as u64, stage_params_tp(&cfg, spec, tp), "{cfg:?} tp {tp} {spec:?}");
                }
                for (name, p) in ranks[0].parameters() {
                    let full = &whole.parameters().iter().find(|(n, _)| n == name).unwrap().1;
                    let got = match ranks[0].shard_of(name) {
                        Some(sh) => {
                            let slices: Vec<Tensor> =
                                ranks.iter().map(|m| m.parameters().iter().find(|(n, _)| n == name).unwrap().1.shallow_clone()).collect();
                            for (r, s) in slices.iter().enumerate() {
                                assert!(s.equal(&sh.slice(full, r, tp)), "{name}: rank {r}'s slice");
                            }
                            sh.join(&slices)
                        }
                        None => p.shallow_clone(),
                    };
                    assert!(got.equal(full), "{name} at tp {tp} is not the one-process weight");
                }
            }
        }
    }
}

#[test]
fn whole_weights_load_into_every_rank_as_its_slice() {
    for cfg in models() {
        let whole = Model::build(&cfg, Device::Cpu, &StageSpec::whole(2), 3).unwrap();
        let other = Model::build_tp(&cfg, Device::Cpu, &StageSpec::whole(2), 99, plan(1, 2)).unwrap();
        other.load_parameters(&whole.parameter_handles()).unwrap();
        let same = Model::build_tp(&cfg, Device::Cpu, &StageSpec::whole(2), 3, plan(1, 2)).unwrap();
        for ((n, a), (_, b)) in other.parameters().iter().zip(same.parameters()) {
            assert!(a.equal(b), "{n}");
        }
    }
}

#[test]
fn degrees_that_do_not_divide_the_model_are_refused_naming_the_key() {
    let gpt = &models()[0];
    let msg = Model::check_tensor_parallel(gpt, 3).unwrap_err().to_string();
    assert!(msg.starts_with("parallel.tp = 3 is invalid") && msg.contains("model.n_head = 4"), "{msg}");
    let llama = &models()[1];
    let msg = Model::check_tensor_parallel(llama, 8).unwrap_err().to_string();
    assert!(msg.contains("model.n_kv_head = 4"), "{msg}");
    let odd = ModelConfig::Gpt(GptConfig { vocab_size: 65, n_layer: 1, n_head: 4, n_embd: 32, block_size: 16, ..GptConfig::default() });
    let msg = Model::check_tensor_parallel(&odd, 2).unwrap_err().to_string();
    assert!(msg.contains("set model.vocab_size=66"), "{msg}");
    assert!(Model::build_tp(&odd, Device::Cpu, &StageSpec::whole(1), 0, plan(0, 2)).is_err());
    Model::check_tensor_parallel(gpt, 4).unwrap();
}
