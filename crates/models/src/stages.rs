//! Splitting a model into pipeline stages by layers: the cost of each part, the balanced split,
//! and an explicit split's checks. A function of the model alone: the trainer applies it from
//! outside, as it applies data parallelism.

use crate::arch::ModelConfig;
use crate::error::{ModelError, Result};
use crate::model::StageSpec;

/// Relative training cost (FLOPs per token, forward and backward) of the parts of a stage:
/// a block is 6 FLOPs per weight (`6·12C²` for GPT) plus `12·C·T` for attention's score and value products;
/// the head (output projection, the loss's softmax) `6·C·V`; the embedding, which does no matmul,
/// `2·C·V` for its backward scatter into a V×C gradient and the optimizer's pass over V×C.
/// The two ends are where pipelines are usually unbalanced; counting them moves layers off the
/// first and last stages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PartCosts {
    pub block: f64,
    pub embed: f64,
    pub head: f64,
}

impl PartCosts {
    pub fn of(cfg: &ModelConfig, seq_len: usize) -> PartCosts {
        let (c, v, t) = (cfg.n_embd() as f64, cfg.vocab_size() as f64, seq_len as f64);
        PartCosts { block: 6.0 * cfg.block_params() as f64 + 12.0 * c * t, embed: 2.0 * c * v, head: 6.0 * c * v }
    }

    /// The cost of one stage.
    pub fn stage(&self, spec: &StageSpec) -> f64 {
        spec.blocks.len() as f64 * self.block + if spec.embed { self.embed } else { 0.0 } + if spec.head { self.head } else { 0.0 }
    }
}

/// Config key of an explicit split.
pub const KEY_STAGE_LAYERS: &str = "parallel.stage_layers";

/// Layers per stage for `parts` stages that minimises the largest stage cost (every stage holds
/// at least one block; the first also the embeddings, the last the head). Ties go to the split
/// with the most even layer counts.
pub fn balanced_split(cfg: &ModelConfig, seq_len: usize, parts: usize) -> Result<Vec<usize>> {
    let l = cfg.n_layer();
    if parts == 0 || parts > l {
        return Err(ModelError::InvalidConfig {
            key: "parallel.pp",
            value: parts.to_string(),
            why: format!(
                "the model has {l} layers (model.n_layer) and every pipeline stage needs at least one: make parallel.pp × parallel.virtual_stages at most {l}"
            ),
        });
    }
    let costs = PartCosts::of(cfg, seq_len);
    // best[k][i]: (largest stage cost, sum of squared layer counts) splitting the first i blocks
    // into k stages; choice[k][i]: the start of the k-th stage.
    let inf = (f64::INFINITY, u64::MAX);
    let mut best = vec![vec![inf; l + 1]; parts + 1];
    let mut choice = vec![vec![0usize; l + 1]; parts + 1];
    best[0][0] = (0.0, 0);
    for k in 1..=parts {
        for i in k..=l {
            for j in (k - 1)..i {
                let (prev, sq) = best[k - 1][j];
                if !prev.is_finite() {
                    continue;
                }
                let spec = StageSpec { embed: k == 1, blocks: j..i, head: k == parts && i == l };
                let n = (i - j) as u64;
                let cand = (prev.max(costs.stage(&spec)), sq + n * n);
                // Compare with a relative tolerance so that float noise does not beat evenness.
                let better = cand.0 < best[k][i].0 * (1.0 - 1e-9) || (cand.0 <= best[k][i].0 * (1.0 + 1e-9) && cand.1 < best[k][i].1);
                if better {
                    best[k][i] = cand;
                    choice[k][i] = j;
                }
            }
        }
    }
    let mut layers = vec![0; parts];
    let mut i = l;
    for k in (1..=parts).rev() {
        let j = choice[k][i];
        layers[k - 1] = i - j;
        i = j;
    }
    Ok(layers)
}

/// Checks an explicit split (`parallel.stage_layers`) against the model and the stage count.
pub fn check_split(cfg: &ModelConfig, layers: &[usize], parts: usize) -> Result<()> {
    let bad = |why: String| Err(ModelError::InvalidConfig { key: KEY_STAGE_LAYERS, value: format!("{layers:?}"), why });
    if layers.len() != parts {
        return bad(format!(
            "has {} entries but the pipeline has {parts} stages (parallel.pp × parallel.virtual_stages): give one layer count per stage, or [] for the balanced split",
            layers.len()
        ));
    }
    if layers.contains(&0) {
        return bad("every stage needs at least one layer: move a layer into the empty stage".into());
    }
    let sum: usize = layers.iter().sum();
    let l = cfg.n_layer();
    if sum != l {
        return bad(format!("adds up to {sum} layers but the model has {l} (model.n_layer): make the counts sum to {l}"));
    }
    Ok(())
}

/// Parameters of one stage (the tied embedding counted on both ends when they are different stages).
pub fn stage_params(cfg: &ModelConfig, spec: &StageSpec) -> u64 {
    let vc = (cfg.vocab_size() * cfg.n_embd()) as u64;
    let mut n = spec.blocks.len() as u64 * cfg.block_params();
    if spec.embed {
        n += vc + cfg.lookup_only_params();
    }
    if spec.head {
        n += cfg.final_norm_params();
        // The output projection: the tied embedding's copy on a last stage that is not also the
        // first, or an untied model's own lm_head.
        if !spec.embed || !cfg.tie_embeddings() {
            n += vc;
        }
    }
    n
}

/// The parameters one tensor-parallel rank of `tp` holds of stage `spec`: the split ones' 1/tp
/// slice (attention, MLP, the vocabulary matrices), and whole the norms, GPT's row-parallel
/// biases and its position embeddings.
pub fn stage_params_tp(cfg: &ModelConfig, spec: &StageSpec, tp: usize) -> u64 {
    let tp = tp.max(1) as u64;
    let mut whole = spec.blocks.len() as u64 * cfg.block_replicated_params();
    if spec.embed {
        whole += cfg.lookup_only_params();
    }
    if spec.head {
        whole += cfg.final_norm_params();
    }
    (stage_params(cfg, spec) - whole) / tp + whole
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GptConfig;

    fn cfg(l: usize, c: usize, v: usize) -> ModelConfig {
        ModelConfig::Gpt(GptConfig { vocab_size: v, n_layer: l, n_embd: c, n_head: 4, block_size: 64, ..GptConfig::default() })
    }

    #[test]
    fn a_small_vocabulary_splits_evenly() {
        assert_eq!(balanced_split(&cfg(8, 128, 65), 64, 4).unwrap(), [2, 2, 2, 2]);
        assert_eq!(balanced_split(&cfg(4, 128, 65), 64, 4).unwrap(), [1, 1, 1, 1]);
        assert_eq!(balanced_split(&cfg(5, 128, 65), 64, 1).unwrap(), [5]);
    }

    #[test]
    fn a_large_vocabulary_moves_layers_off_the_last_stage() {
        // gpt2-124m: the head costs about 5 blocks.
        let g = ModelConfig::preset("gpt2-124m").unwrap();
        let s = balanced_split(&g, 1024, 4).unwrap();
        assert_eq!(s.iter().sum::<usize>(), 12);
        assert!(s[3] < s[1] && s[0] <= s[1], "{s:?}");
        // And it is optimal: no other split of 12 into 4 has a smaller largest stage.
        let c = PartCosts::of(&g, 1024);
        let worst = |ls: &[usize]| StageSpec::split(ls).iter().map(|sp| c.stage(sp)).fold(0.0, f64::max);
        let got = worst(&s);
        for a in 1..12 {
            for b in 1..12 {
                for d in 1..12 {
                    if a + b + d < 12 {
                        assert!(worst(&[a, b, d, 12 - a - b - d]) >= got * (1.0 - 1e-12));
                    }
                }
            }
        }
    }

    #[test]
    fn too_many_stages_and_bad_explicit_splits_say_what_to_change() {
        let e = balanced_split(&cfg(4, 128, 65), 64, 5).unwrap_err().to_string();
        assert!(e.starts_with("parallel.pp") && e.contains("at most 4"), "{e}");
        let c = cfg(4, 128, 65);
        check_split(&c, &[2, 2], 2).unwrap();
        for (ls, parts, want) in [(&[2, 2][..], 4, "4 stages"), (&[4, 0], 2, "at least one"), (&[2, 1], 2, "sum to 4")] {
            let e = check_split(&c, ls, parts).unwrap_err().to_string();
            assert!(e.starts_with(KEY_STAGE_LAYERS) && e.contains(want), "{e}");
        }
    }

    #[test]
    fn stage_params_add_up_to_the_model_plus_the_tied_copy() {
        let c = cfg(6, 64, 101);
        let whole = crate::flops::total_params(&c);
        assert_eq!(stage_params(&c, &StageSpec::whole(6)), whole);
        let split: u64 = StageSpec::split(&[2, 3, 1]).iter().map(|s| stage_params(&c, s)).sum();
        assert_eq!(split, whole + 101 * 64);
    }

    #[test]
    fn llama_stages_add_up_too() {
        use crate::llama::LlamaConfig;
        for tie in [false, true] {
            let c = ModelConfig::Llama(LlamaConfig { vocab_size: 101, n_layer: 6, tie_embeddings: tie, ..LlamaConfig::default() });
            let whole = crate::flops::total_params(&c);
            assert_eq!(stage_params(&c, &StageSpec::whole(6)), whole);
            let split: u64 = StageSpec::split(&[2, 3, 1]).iter().map(|s| stage_params(&c, s)).sum();
            assert_eq!(split, whole + if tie { 101 * 128 } else { 0 });
        }
    }
}
