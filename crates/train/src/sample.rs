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
    sample_streaming(model, tok, prompt, tokens, temperature, top_k, seed, None)
}

/// As [`sample_text`], handing the text to `emit` as it is generated: the prompt first, then
/// pieces of the continuation whose concatenation is what [`sample_text`] returns (tested for
/// the char, GPT-2 and Hugging Face tokenizers). A piece is given once the decoding of the
/// current line is settled up to a space or a newline (whole characters only); the rest at the
/// end. Text without spaces (Chinese, say) shows a line at a time.
#[allow(clippy::too_many_arguments)]
pub fn sample_streaming(
    model: &Model,
    tok: &Tokenizer,
    prompt: &str,
    tokens: usize,
    temperature: f64,
    top_k: Option<i64>,
    seed: u64,
    mut emit: Option<&mut dyn FnMut(&str)>,
) -> String {
    let mut ids: Vec<i64> = tok.encode(prompt).map(|v| v.into_iter().map(i64::from).collect()).unwrap_or_default();
    if ids.is_empty() {
        let start = tok.eot().or_else(|| tok.encode("\n").ok().and_then(|v| v.first().copied()));
        ids.push(start.map_or(0, i64::from));
    }
    tch::manual_seed(seed as i64);
    let idx = Tensor::from_slice(&ids).view([1, -1]).to_device(model.device());
    let out = match emit.as_mut() {
        None => model.generate_within(&idx, tokens, temperature, top_k, tok.vocab_size()),
        Some(emit) => {
            emit(prompt);
            let mut stream = Stream::new(tok, ids.iter().map(|&x| u32::try_from(x).unwrap_or(u32::MAX)).collect());
            let mut each = |id: i64| stream.push(u32::try_from(id).unwrap_or(u32::MAX), &mut **emit);
            let out = model.generate_each(&idx, tokens, temperature, top_k, tok.vocab_size(), Some(&mut each));
            stream.finish(&mut **emit);
            out
        }
    };
    let gen: Vec<i64> = Vec::try_from(out.view([-1]).to_device(Device::Cpu)).unwrap_or_default();
    let all: Vec<u32> = gen.iter().map(|&x| u32::try_from(x).unwrap_or(u32::MAX)).collect();
    format!("{prompt}{}", continuation(tok, &all[..ids.len().min(all.len())], &all[ids.len().min(all.len())..]))
}

/// The text of `generated` after `context`: the decoding of the whole past the decoding of the
/// context, when that is a prefix (tokenizers that join words with spaces or drop a leading one,
/// WordLevel or SentencePiece, decode a continuation alone differently), else the decoding of
/// `generated` alone.
pub fn continuation(tok: &Tokenizer, context: &[u32], generated: &[u32]) -> String {
    let all = [context, generated].concat();
    let (head, text) = (tok.decode(context), tok.decode(&all));
    match text.strip_prefix(head.as_str()) {
        Some(rest) => rest.to_owned(),
        None => tok.decode(generated),
    }
}

/// The pieces [`sample_streaming`] prints for `generated` after `context`: joined, they are
/// [`continuation`] (for a test that feeds it chosen tokens, newlines included).
pub fn stream_pieces(tok: &Tokenizer, context: &[u32], generated: &[u32]) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut emit = |p: &str| pieces.push(p.to_string());
    let mut stream = Stream::new(tok, context.to_vec());
    for &id in generated {
        stream.push(id, &mut emit);
    }
    stream.finish(&mut emit);
    pieces
}

/// The streaming decoder of [`sample_streaming`] (as transformers' `TextStreamer`): the
/// current line's tokens, after the context, are decoded whole each time (so tokenizers that
/// join or strip spaces decode as they would the whole text) and what is settled of it is given
/// once; a newline starts a new line, which bounds the work per token by the line's length. The
/// new line keeps the newline's token as its context: decoders that drop a leading space (a
/// SentencePiece `▁`) see the space as inside the text, as the whole decoding does.
struct Stream<'t> {
    tok: &'t Tokenizer,
    /// Token ids of the current line (the context's ids while on its line).
    line: Vec<u32>,
    /// Bytes of the decoding of `line` not to give (the context's), or already given.
    done: usize,
}

impl<'t> Stream<'t> {
    fn new(tok: &'t Tokenizer, context: Vec<u32>) -> Self {
        let done = tok.decode(&context).len();
        Stream { tok, line: context, done }
    }

    fn push(&mut self, id: u32, emit: &mut dyn FnMut(&str)) {
        self.line.push(id);
        let text = self.tok.decode(&self.line);
        // A decoding that does not extend what was given (a tokenizer that rewrites the end of
        // its text as it grows) waits for the end of the line.
        if text.len() < self.done || !text.is_char_boundary(self.done) {
            return;
        }
        let settled = if text.ends_with('\n') {
            text.len()
        } else if text.ends_with('\u{FFFD}') {
            self.done // half a character: wait for its other bytes
        } else {
            text[self.done..].rfind(' ').map_or(self.done, |i| self.done + i + 1)
        };
        if settled > self.done {
            emit(&text[self.done..settled]);
            self.done = settled;
        }
        if text.ends_with('\n') && settled == text.len() {
            self.line.clear();
            self.line.push(id);
            self.done = self.tok.decode(&self.line).len();
        }
    }

    fn finish(&mut self, emit: &mut dyn FnMut(&str)) {
        let text = self.tok.decode(&self.line);
        if text.len() > self.done && text.is_char_boundary(self.done) {
            emit(&text[self.done..]);
        }
    }
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
    sample_from_checkpoint_streaming(a, None)
}

/// As [`sample_from_checkpoint`], handing the text to `emit` as it is generated
/// ([`sample_streaming`]).
pub fn sample_from_checkpoint_streaming(a: &SampleArgs, emit: Option<&mut dyn FnMut(&str)>) -> Result<String, TrainError> {
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
    Ok(sample_streaming(&model, &tok, a.prompt, a.tokens, a.temperature, a.top_k, a.seed, emit))
}
