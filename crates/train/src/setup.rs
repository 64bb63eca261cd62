//! Everything a run resolves before its first step, on each rank: the validated config, the
//! data, the device and dtype, and the model parts this rank holds (its pipeline stages, its
//! tensor-parallel slices), with published weights loaded when `model.init_from` says so.

use fabbrica_data::{Dataset, TokenizerSpec};
use fabbrica_models::{Model, StageSpec, TensorParallel};
use tch::{Device, Tensor};

use crate::checkpoint;
use crate::config::Config;
use crate::device::{resolve_bf16, resolve_device};
use crate::error::TrainError;

/// Everything resolved before the first step.
pub struct Setup {
    pub cfg: Config,
    pub data: Dataset,
    /// The model parts this rank holds, in stage order: the whole model without pipeline
    /// parallelism, else this rank's stages (one per virtual stage).
    pub parts: Vec<Part>,
    pub device: Device,
    pub bf16: bool,
    /// With `parallel.pp > 1`: the lowered schedule and the split.
    pub pipeline: Option<Pipeline>,
}

/// One model part: pipeline stage `stage` (0 for the whole model).
pub struct Part {
    pub stage: usize,
    pub model: Model,
}

/// A pipeline's shape: the schedule every pipeline rank runs (lowered: with its sends and
/// receives) and the layers of each stage.
pub struct Pipeline {
    pub schedule: fabbrica_pipeline::Schedule,
    pub layers: Vec<usize>,
}

impl Setup {
    /// The whole model (a run without pipeline parallelism).
    pub fn model(&self) -> &Model {
        assert!(self.pipeline.is_none() && self.parts.len() == 1, "the whole model exists only without pipeline parallelism");
        &self.parts[0].model
    }

    /// Parameters this rank holds (the tied embedding's pipeline copy counted).
    pub fn num_params(&self) -> i64 {
        self.parts.iter().map(|p| p.model.num_params()).sum()
    }
}

/// Loads data and builds the model: every input error surfaces here, before any step.
pub fn setup(cfg: &Config) -> Result<Setup, TrainError> {
    setup_on(cfg, 0)
}

/// As [`setup`], on CUDA device `cuda_ordinal` when the run uses a GPU (each rank its local one).
pub fn setup_on(cfg: &Config, cuda_ordinal: usize) -> Result<Setup, TrainError> {
    setup_stage(cfg, cuda_ordinal, 0, None)
}

/// As [`setup_on`], building only the stages of pipeline rank `pp_rank` (all of the model
/// without pipeline parallelism), and with `tp` only this tensor-parallel rank's slices.
pub fn setup_stage(cfg: &Config, cuda_ordinal: usize, pp_rank: usize, tp: Option<TensorParallel>) -> Result<Setup, TrainError> {
    let mut cfg = cfg.clone();
    cfg.validate()?;
    let device = resolve_device(cfg.run.device, cuda_ordinal)?;
    let bf16 = resolve_bf16(cfg.train.dtype, device);
    crate::device::apply_tf32(cfg.train.tf32)?;
    if cfg.run.threads > 0 {
        tch::set_num_threads(cfg.run.threads as i32);
    }
    let kind: TokenizerSpec = cfg.data.tokenizer.parse()?;
    let data = fabbrica_data::load(&cfg.data.path, &kind, cfg.model.block_size(), cfg.data.val_fraction)?;
    // A prepared directory's meta.json names its tokenizer, whatever data.tokenizer says: the
    // resolved config (config.toml, checkpoints) records the one that was used.
    if cfg.data.path.is_dir() {
        cfg.data.tokenizer = match &data.tokenizer {
            fabbrica_data::Tokenizer::Hf(t) => format!("hf:{}", t.path().display()),
            t => t.kind().as_str().to_string(),
        };
    }
    let vocab = data.tokenizer.vocab_size();
    if cfg.model.vocab_size() == 0 {
        cfg.model.set_vocab_size(vocab);
    } else if cfg.model.vocab_size() < vocab && !cfg.model.init_from.as_os_str().is_empty() {
        // The vocabulary is the published model's: it is the data that must change (a prepared
        // directory's tokenizer is its meta.json's, so it is prepared again).
        let tokenizer = format!("hf:{}/tokenizer.json", cfg.model.init_from.display());
        let how = if cfg.data.path.is_dir() {
            format!("prepare the text again with `fabbrica prepare --tokenizer {tokenizer}` and point data.path at the new directory")
        } else {
            format!("set data.tokenizer={tokenizer}")
        };
        return Err(TrainError::Config(crate::ConfigError::Invalid {
            key: "data.path".into(),
            value: cfg.data.path.display().to_string(),
            why: format!(
                "its {} tokenizer has {vocab} tokens, more than the {} of the model in model.init_from = {}: tokenize the data with that model's own tokenizer: {how}",
                data.tokenizer.kind().as_str(),
                cfg.model.vocab_size(),
                cfg.model.init_from.display(),
            ),
        }));
    } else if cfg.model.vocab_size() < vocab {
        return Err(TrainError::Config(crate::ConfigError::Invalid {
            key: "model.vocab_size".into(),
            value: cfg.model.vocab_size().to_string(),
            why: format!(
                "the {} tokenizer of {} has {vocab} tokens: set it to at least {vocab}, or 0 to take it from the data",
                data.tokenizer.kind().as_str(),
                cfg.data.path.display()
            ),
        }));
    }
    Model::check_tensor_parallel(&cfg.model, cfg.parallel.tp)?;
    let build = |spec: &StageSpec| Model::build_tp(&cfg.model, device, spec, cfg.run.seed, tp.clone());
    let (parts, pipeline) = match cfg.pipeline_shape()? {
        None => (vec![Part { stage: 0, model: build(&StageSpec::whole(cfg.model.n_layer()))? }], None),
        Some((schedule, layers)) => {
            let specs = StageSpec::split(&layers);
            let schedule = fabbrica_pipeline::lower(&schedule);
            let parts = (0..specs.len())
                .filter(|&st| schedule.rank_of_stage(st) == pp_rank)
                .map(|st| Ok(Part { stage: st, model: build(&specs[st])? }))
                .collect::<Result<Vec<_>, TrainError>>()?;
            (parts, Some(Pipeline { schedule, layers }))
        }
    };
    let mut parts = parts;
    for p in &mut parts {
        p.model.set_recompute(cfg.recompute());
    }
    if !cfg.model.init_from.as_os_str().is_empty() {
        // Transfer learning: the published weights replace the random init (each stage takes its own).
        let weights = crate::hf::read_weights(&cfg.model.init_from, &cfg.model)
            .map_err(|e| TrainError::Checkpoint(format!("model.init_from = {}: {e}", cfg.model.init_from.display())))?;
        for p in &parts {
            p.model.load_own_parameters(&weights)?;
        }
    }
    Ok(Setup { cfg, data, parts, device, bf16, pipeline })
}

/// The tensor-parallel slice of each whole optimizer tensor this rank's parts split (others pass
/// through): what a rank of any tensor-parallel degree loads from a checkpoint of any other.
pub(crate) fn tp_local(tensors: Vec<(String, Tensor)>, parts: &[Part]) -> Vec<(String, Tensor)> {
    tensors
        .into_iter()
        .map(|(key, t)| {
            let param = checkpoint::param_of(&key);
            let found = parts.iter().find_map(|p| Some((p.model.shard_of(param)?, p.model.tensor_parallel()?.clone())));
            match found {
                Some((sh, tp)) if t.dim() > sh.dim && sh.divides(&t.size(), tp.size) => (key, sh.slice(&t, tp.rank, tp.size).contiguous()),
                _ => (key, t),
            }
        })
        .collect()
}
