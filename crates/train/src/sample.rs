//! Text generation from a model or a checkpoint.

use std::path::Path;

use fabbrica_data::Tokenizer;
use fabbrica_models::Gpt;
use tch::{Device, Tensor};

use crate::checkpoint;
use crate::device::resolve_device;
use crate::error::TrainError;

/// Samples `tokens` tokens after `prompt` (empty: start from a newline for char models, or
/// GPT-2's end-of-text token). Deterministic for a given seed.
pub fn sample_text(model: &Gpt, tok: &Tokenizer, prompt: &str, tokens: usize, temperature: f64, top_k: Option<i64>, seed: u64) -> String {
    let ids: Vec<i64> = if prompt.is_empty() {
        let start = tok.eot().map(|e| e as i64).or_else(|| tok.encode("\n").ok().and_then(|v| v.first().map(|&x| x as i64)));
        vec![start.unwrap_or(0)]
    } else {
        tok.encode(prompt).map(|v| v.into_iter().map(i64::from).collect()).unwrap_or_else(|_| vec![0])
    };
    tch::manual_seed(seed as i64);
    let idx = Tensor::from_slice(&ids).view([1, -1]).to_device(model.device());
    let out = model.generate(&idx, tokens, temperature, top_k);
    let gen: Vec<i64> = Vec::try_from(out.view([-1]).to_device(Device::Cpu)).unwrap_or_default();
    let skip = if prompt.is_empty() { 1 } else { 0 };
    let toks: Vec<u16> = gen.iter().skip(skip).map(|&x| x as u16).collect();
    format!("{prompt}{}", tok.decode(&toks))
}

pub struct SampleArgs<'a> {
    pub checkpoint: &'a Path,
    pub prompt: &'a str,
    pub tokens: usize,
    pub temperature: f64,
    pub top_k: Option<i64>,
    pub seed: u64,
    pub device: &'a str,
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
    // Checkpoints are never written with NaN/Inf weights any more; older ones may hold them, and
    // sampling from those would fail inside the multinomial draw.
    if let Some((name, _)) = ck.model.iter().find(|(_, t)| t.is_floating_point() && !bool::try_from(t.isfinite().all()).unwrap_or(false)) {
        return Err(TrainError::Checkpoint(format!(
            "{}: `{name}` holds NaN or Inf values (the run had diverged when it was written): sample from an earlier checkpoint",
            dir.display()
        )));
    }
    let model = Gpt::new(&ck.state.config.model, device)?;
    model.load_parameters(&ck.model)?;
    Ok(sample_text(&model, &tok, a.prompt, a.tokens, a.temperature, a.top_k, a.seed))
}
