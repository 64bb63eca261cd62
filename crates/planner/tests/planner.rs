//! The planner's contract: counts from the trainer's code, memory that matches what the trainer
//! allocates, layouts the topology accepts that fit, the simulator's bubble, and no step that
//! grows with more GPUs at fixed per-GPU work beyond its data-parallel communication.

use fabbrica_models::flops::{flops_per_token, total_params};
use fabbrica_models::{GptConfig, ModelConfig, Recompute, PRESET_NAMES};
use fabbrica_pipeline::{simulate, Costs, Kind, Schedule};
use fabbrica_planner::sim::UNITS;
use fabbrica_planner::{Cluster, Execution, Forced, ModelShape, Planner, Workload};

fn preset(name: &str) -> GptConfig {
    let mut c = GptConfig::preset(name).unwrap();
    if c.vocab_size == 0 {
        c.vocab_size = 65;
    }
    c
}

fn any_preset(name: &str) -> ModelConfig {
    let mut c = ModelConfig::preset(name).unwrap();
    if c.vocab_size() == 0 {
        c.set_vocab_size(65);
    }
    c
}

#[test]
fn params_and_flops_are_the_trainers_for_every_preset() {
    // GPT and Llama (grouped-query attention, SwiGLU) alike.
    for name in PRESET_NAMES {
        let cfg = any_preset(name);
        let m = ModelShape::from_config(name, &cfg, cfg.block_size()).unwrap();
        assert_eq!(m.params, total_params(&cfg), "{name}");
        assert_eq!(m.flops_per_token, flops_per_token(&cfg, cfg.block_size()), "{name}");
        // The split of the FLOPs adds back up.
        let parts = m.layers as f64 * (m.dense_flops_per_token() + m.attention_flops_per_token()) + m.head_flops_per_token();
        assert!((parts - m.flops_per_token).abs() / m.flops_per_token < 1e-12, "{name}");
    }
}

#[test]
fn weights_and_optimizer_are_the_bytes_the_trainer_allocates() {
    for name in ["tiny", "gpt2-124m", "llama-tiny"] {
        let cfg = any_preset(name);
        let model = fabbrica_models::Model::new(&cfg, tch::Device::Cpu).unwrap();
        let fp32: i64 = model.parameters().iter().map(|(_, t)| t.numel() as i64 * 4).sum();
        let m = ModelShape::from_config(name, &cfg, cfg.block_size()).unwrap();
        let c = Cluster::preset("h100-sxm").unwrap();
        let mut p = Planner::new(&m, &c, Workload { global_batch: 8 }, Execution::default());
        let f = Forced { tp: Some(1), pp: Some(1), dp: Some(1), mb: Some(8), zero: Some(0), ..Forced::default() };
        let e = p.search(1, &f, 1).unwrap().best.remove(0);
        // fp32 weights, and the bf16 copies autocast makes of every matrix a matmul reads (not
        // of lookups: GPT's position table, an untied token embedding); AdamW's two moments 8
        // bytes per parameter.
        let lookup = |n: &str| n.contains("wpe") || (!cfg.tie_embeddings() && n.contains("embed_tokens"));
        let copies: i64 = model.parameters().iter().filter(|(n, _)| !lookup(n)).map(|(_, t)| t.numel() as i64 * 2).sum();
        assert!(copies <= fp32 / 2, "{name}");
        assert_eq!(e.memory.weights.round() as i64, fp32 + copies, "{name}");
        assert_eq!((e.memory.optimizer / 2.0).round() as i64, fp32, "{name}");
        assert_eq!(e.memory.grads.round() as i64, fp32, "{name}");
    }
}

/// Under tensor, sequence and pipeline parallelism the planner's memory per GPU is the trainer's
/// per-rank figure (`stage_memory_estimate_tp`, which `--dry-run` prints for a CUDA run): weights
/// (with autocast's bf16 copies), gradients, optimizer state and activations, each rank holding
/// the micro-batches its schedule keeps in flight, for every recompute mode.
#[test]
fn per_rank_memory_is_the_trainers_under_tensor_parallelism() {
    use fabbrica_models::flops::{stage_memory_estimate_tp, Attention};
    use fabbrica_models::StageSpec;
    for name in ["gpt2-350m", "llama3.2-1b"] {
        let cfg = any_preset(name);
        let seq = cfg.block_size().min(2048);
        let m = ModelShape::from_config(name, &cfg, seq).unwrap();
        let c = Cluster::preset("h100-sxm").unwrap();
        for (tp, pp, sp, recompute) in [
            (1, 1, false, Recompute::None),
            (2, 1, false, Recompute::Selective),
            (2, 1, true, Recompute::None),
            (4, 2, true, Recompute::Full),
            (8, 4, false, Recompute::None),
        ] {
            let x = Execution { sequence_parallel: sp, ..Execution::default() };
            let mut p = Planner::new(&m, &c, Workload { global_batch: 64 }, x);
            let f = Forced { tp: Some(tp), pp: Some(pp), dp: Some(1), v: Some(1), mb: Some(1), zero: Some(0), recompute: Some(recompute) };
            let e = p.search(tp * pp, &f, 1).unwrap().best.remove(0);
            // The fullest rank as the trainer estimates each pipeline rank (1F1B: rank r holds
            // pp − r micro-batches).
            let layers = m.stage_layers(pp).unwrap();
            let specs = StageSpec::split(&layers);
            let trainer = (0..pp)
                .map(|r| stage_memory_estimate_tp(&cfg, &specs[r..r + 1], 1, seq, true, Attention::Fused, recompute, pp - r, tp, sp))
                .max_by_key(|x| x.total())
                .unwrap();
            let what = format!("{name} tp {tp} pp {pp} sp {sp} {recompute:?}");
            assert_eq!(e.memory.grads.round() as u64, trainer.grads, "{what}");
            assert_eq!(e.memory.optimizer.round() as u64, trainer.optimizer, "{what}");
            assert_eq!((e.memory.weights + e.memory.activations).round() as u64, trainer.params + trainer.activations, "{what}");
        }
    }
}

#[test]
fn proposed_layouts_are_valid_and_fit_and_their_bubble_is_the_simulators() {
    let cfg = GptConfig { n_layer: 48, n_head: 32, n_embd: 4096, ..preset("gpt2-1.5b") };
    let m = ModelShape::from_gpt("7b", &cfg, 2048).unwrap();
    let c = Cluster::preset("a100").unwrap();
    let mut p = Planner::new(&m, &c, Workload { global_batch: 512 }, Execution::default());
    for gpus in [8, 64, 256] {
        let found = p.search(gpus, &Forced::default(), 8).unwrap();
        assert!(!found.best.is_empty(), "{gpus}");
        for e in &found.best {
            let l = e.layout;
            let dims = l.dims().unwrap();
            assert_eq!(dims.world_size, e.gpus);
            assert!(e.gpus <= gpus && l.tp <= c.gpus_per_node);
            assert!(e.fits() && e.memory.total() <= c.usable_bytes(), "{}", l.spec());
            for u in &found.unfit {
                assert!(!u.fits());
            }
            // The bubble is what the pipeline simulator says for the same schedule and costs.
            if l.pp > 1 {
                let scale = UNITS / (e.stage_f_s + e.stage_b_s);
                let costs = Costs { f: (e.stage_f_s * scale).round() as u64, b: (e.stage_b_s * scale).round() as u64, comm: 0 };
                let kind = if l.v > 1 { Kind::Interleaved1F1B } else { Kind::OneFOneB };
                let t = simulate(&Schedule::new(kind, l.pp, l.v, e.microbatches).unwrap(), costs).unwrap();
                let busy = (e.microbatches * l.v) as u64 * (costs.f + costs.b);
                let bubble = (t.makespan - busy) as f64 / scale;
                assert!((bubble - e.bubble_s).abs() <= 1e-9 * t.makespan as f64 / scale + 1e-12, "{}: {bubble} vs {}", l.spec(), e.bubble_s);
            }
        }
    }
}

#[test]
fn more_gpus_at_fixed_work_per_gpu_only_add_communication() {
    // Weak scaling: the global batch grows with the GPUs, each replica does the same work.
    let cfg = preset("gpt2-1.5b");
    let m = ModelShape::from_gpt("gpt2-1.5b", &cfg, 1024).unwrap();
    let c = Cluster::preset("h100-sxm").unwrap();
    let f = Forced {
        tp: Some(1),
        pp: Some(2),
        v: Some(1),
        mb: Some(1),
        recompute: Some(fabbrica_planner::Recompute::None),
        zero: Some(1),
        ..Forced::default()
    };
    let mut last: Option<fabbrica_planner::Estimate> = None;
    for dp in [1usize, 4, 16, 64, 512, 4096] {
        let mut p = Planner::new(&m, &c, Workload { global_batch: 16 * dp }, Execution::default());
        let e = p.search(2 * dp, &Forced { dp: Some(dp), ..f }, 1).unwrap().best.remove(0);
        if let Some(prev) = &last {
            // Compute, TP and bubble do not change; what grows is stated: DP (a larger group) and
            // PP (stages moving from NVLink to the network once a pipeline's ranks span nodes).
            let comm = |e: &fabbrica_planner::Estimate| e.dp_s + e.pp_s + e.optimizer_s;
            assert!((e.compute_s - prev.compute_s).abs() < 1e-9 && (e.bubble_s - prev.bubble_s).abs() < 1e-6 * e.step_s, "dp {dp}");
            assert!(e.step_s <= prev.step_s + (comm(&e) - comm(prev)) + 1e-9, "dp {dp}: longer step without a communication reason");
            assert!(e.dp_total_s >= prev.dp_total_s, "a larger dp group never reduces faster");
        }
        last = Some(e);
    }
}

#[test]
fn a_model_too_large_for_one_gpu_says_where_it_fits() {
    let cfg = GptConfig { n_layer: 80, n_head: 64, n_embd: 8192, ..preset("gpt2-1.5b") };
    let m = ModelShape::from_gpt("70b", &cfg, 2048).unwrap();
    let c = Cluster::preset("h100-sxm").unwrap();
    let mut p = Planner::new(&m, &c, Workload { global_batch: 64 }, Execution::default());
    assert!(p.search(1, &Forced::default(), 3).unwrap().best.is_empty());
    let l = p.smallest_fit().unwrap().unwrap();
    assert!(l.gpus() > 1);
    let at = p.search(l.gpus(), &Forced::default(), 1).unwrap();
    assert!(!at.best.is_empty(), "{}", l.spec());
}
