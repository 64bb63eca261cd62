//! Text generation from a model or a checkpoint.

use std::path::Path;

use fabbrica_data::Tokenizer;
use fabbrica_models::Model;
use tch::{Device, Tensor};

use crate::checkpoint;
use crate::device::resolve_device;
use crate::error::TrainError;

/// Samples `tokens` tokens after `prompt` and returns the prompt followed by them. The prompt is
/// encoded as the tokenizer does (a Hugging Face tokenizer adds what its file says, e.g. Llama 3's
/// `<|begin_of_text|>`); when that gives no token (an empty prompt with char or GPT-2), sampling
/// starts from the end-of-text token, else a newline. Deterministic for a given seed.
pub fn sample_text(model: &Model, tok: &Tokenizer, prompt: &str, tokens: usize, temperature: f64, top_k: Option<i64>, seed: u64) -> String {
    let mut ids: Vec<i64> = tok.encode(prompt).map(|v| v.into_iter().map(i64::from).collect()).unwrap_or_default();
    if ids.is_empty() {
        let start = tok.eot().or_else(|| tok.encode("\n").ok().and_then(|v| v.first().copied()));
        ids.push(start.map_or(0, i64::from));
    }
    tch::manual_seed(seed as i64);
    let idx = Tensor::from_slice(&ids).view([1, -1]).to_device(model.device());
    let out = model.generate_within(&idx, tokens, temperature, top_k, tok.vocab_size());
    let gen: Vec<i64> = Vec::try_from(out.view([-1]).to_device(Device::Cpu)).unwrap_or_default();
    // `generate` returns the context too. What follows it is the decoding of everything past the
    // decoding of the context, when that is a prefix: tokenizers that join words with spaces or
    // drop a leading one (WordLevel, SentencePiece) decode a continuation alone differently.
    let all: Vec<u32> = gen.iter().map(|&x| u32::try_from(x).unwrap_or(u32::MAX)).collect();
    let context = tok.decode(&all[..ids.len().min(all.len())]);
    let text = tok.decode(&all);
    let continuation = match text.strip_prefix(context.as_str()) {
        Some(rest) => rest.to_owned(),
        None => tok.decode(all.get(ids.len()..).unwrap_or_default()),
    };
    format!("{prompt}{continuation}")
}

pub struct SampleArgs<'a> {
    pub checkpoint: &'a Path,
    pub prompt: &'a str,
    pub tokens: usize,
    pub temperature: f64,
    pub top_k: Option<i64>,
    pub seed: u64,
    pub device: crate::config::DeviceChoice,
}

/// Loads a checkpoint (or a run directory's latest) and samples from it.
pub fn sample_from_checkpoint(a: &SampleArgs) -> Result<String, TrainError> {
    let ck = checkpoint::resolve(a.checkpoint)?;
    let dir = ck.dir.clone();
    let tok = ck.state.tokenizer.tokenizer()?;
    if !a.prompt.is_empty() {
        tok.encode(a.prompt)?; // a prompt the tokenizer cannot encode is the user's to fix
    }
    let device = resolve_device(a.device, 0)?;
    // Float32 matmuls on a GPU as the run trained them (`train.tf32`).
    crate::device::apply_tf32(ck.state.config.train.tf32)?;
    // Checkpoints are never written with NaN/Inf weights any more; older ones may hold them, and
    // sampling from those would fail inside the multinomial draw.
    if let Some((name, _)) = ck.model.iter().find(|(_, t)| t.is_floating_point() && !bool::try_from(t.isfinite().all()).unwrap_or(false)) {
        return Err(TrainError::Checkpoint(format!(
            "{}: `{name}` holds NaN or Inf values (the run had diverged when it was written): sample from an earlier checkpoint",
            dir.display()
        )));
    }
    let model = Model::new(&ck.state.config.model, device)?;
    model.load_parameters(&ck.model)?;
    Ok(sample_text(&model, &tok, a.prompt, a.tokens, a.temperature, a.top_k, a.seed))
}
