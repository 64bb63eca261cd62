//! A decoder-only language model of either architecture ([`ModelConfig`]), or the part of it one
//! pipeline stage holds ([`StageSpec`]): token embedding, a range of blocks, final norm and output
//! projection. Only the parameters of that part are allocated; each is initialised from (seed,
//! its name), so every layout starts from the same weights. Activation recompute
//! ([`Recompute`]) wraps blocks, or their attention cores, in recomputed regions.

use tch::{nn, nn::Init, Device, Kind, Tensor};

use fabbrica_data::splitmix64;

use crate::arch::ModelConfig;
use crate::error::{ModelError, Result};
use crate::gpt::GptBlock;
use crate::layers::{LayerNorm, Params};
use crate::llama::{LlamaBlock, RmsNorm};
use crate::tp::{enter, exit, fork_rng, outer_dropout, Shard, TensorParallel};

/// Which part of the model a [`Model`] holds: the embeddings, blocks `blocks` (global layer
/// indices), and the final norm with the output projection. The whole model holds all three; a
/// pipeline stage holds a contiguous range of blocks, with the embeddings on the first stage and
/// the head on the last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSpec {
    pub embed: bool,
    pub blocks: std::ops::Range<usize>,
    pub head: bool,
}

impl StageSpec {
    /// The whole model of `n_layer` blocks.
    pub fn whole(n_layer: usize) -> StageSpec {
        StageSpec { embed: true, blocks: 0..n_layer, head: true }
    }

    /// Stages holding `layers[i]` consecutive blocks each, in order: the embeddings on the first,
    /// the head on the last.
    pub fn split(layers: &[usize]) -> Vec<StageSpec> {
        let mut at = 0;
        let n = layers.len();
        layers
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                let s = StageSpec { embed: i == 0, blocks: at..at + k, head: i + 1 == n };
                at += k;
                s
            })
            .collect()
    }

    pub fn is_whole(&self, n_layer: usize) -> bool {
        self.embed && self.head && self.blocks == (0..n_layer)
    }
}

/// `train.recompute` (and the planner's `recompute=`): which activations backward recomputes
/// instead of keeping (Korthikanti et al. 2022). Ordered by the compute it adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Recompute {
    /// Keep every activation.
    #[default]
    None,
    /// Recompute only the attention core (softmax(QKᵀ)V and its dropout), the activations that
    /// grow with T² when attention is not fused.
    Selective,
    /// Keep only each block's input; recompute the whole block in backward.
    Full,
}

impl Recompute {
    /// All, cheapest compute first.
    pub const ALL: [Recompute; 3] = [Recompute::None, Recompute::Selective, Recompute::Full];

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Full => "full",
            Recompute::Selective => "selective",
        }
    }
}

impl std::fmt::Display for Recompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Recompute {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Recompute::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| "use `none`, `full` (recompute each block in backward) or `selective` (only the attention core)".into())
    }
}

enum Block {
    Gpt(GptBlock),
    Llama(LlamaBlock),
}

impl Block {
    fn shallow(&self) -> Block {
        match self {
            Block::Gpt(b) => Block::Gpt(b.shallow()),
            Block::Llama(b) => Block::Llama(b.shallow()),
        }
    }
}

enum Norm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Norm::Layer(n) => n.forward(x),
            Norm::Rms(n) => n.forward(x),
        }
    }
}

/// What one block's forward needs besides its parameters (owned, so that a recompute closure can
/// hold it).
struct BlockCtx {
    cfg: ModelConfig,
    train: bool,
    recompute: Recompute,
    /// Llama's rotary tables for this sequence length.
    rope: Option<(Tensor, Tensor)>,
    tp: Option<TensorParallel>,
    /// The micro-batch's (B, T) (a sequence-parallel block sees a shard of its tokens).
    bt: (i64, i64),
}

impl BlockCtx {
    fn shallow(&self) -> BlockCtx {
        BlockCtx {
            cfg: self.cfg.clone(),
            train: self.train,
            recompute: self.recompute,
            rope: self.rope.as_ref().map(|(c, s)| (c.shallow_clone(), s.shallow_clone())),
            tp: self.tp.clone(),
            bt: self.bt,
        }
    }

    fn attention_dropout(&self) -> f64 {
        if self.train {
            self.cfg.dropout()
        } else {
            0.0
        }
    }

    /// One block; with `Selective`, its attention core is a recomputed region.
    fn block(&self, block: &Block, x: &Tensor) -> Tensor {
        let p = self.attention_dropout();
        // Inside the region each rank holds other heads: its own dropout stream.
        let core = |q: Tensor, k: Tensor, v: Tensor, f: fn(&Tensor, &Tensor, &Tensor, f64) -> Tensor| {
            fork_rng(self.tp.as_ref(), p > 0.0, || {
                if self.recompute == Recompute::Selective && self.train {
                    let out = fabbrica_torch_ext::recompute::recompute(&[&q, &k, &v], move |i| vec![f(&i[0], &i[1], &i[2], p)]);
                    out.map(|mut o| o.remove(0)).unwrap_or_else(|e| panic!("selective recompute: {e}"))
                } else {
                    f(&q, &k, &v, p)
                }
            })
        };
        let tp = self.tp.as_ref();
        match (block, &self.cfg) {
            (Block::Gpt(b), ModelConfig::Gpt(cfg)) => {
                let (q, k, v) = b.qkv(cfg, x, tp, self.bt);
                b.finish(cfg, x, &core(q, k, v, crate::gpt::attention_core), self.train, tp, self.bt)
            }
            (Block::Llama(b), ModelConfig::Llama(cfg)) => {
                let (cos, sin) = self.rope.as_ref().expect("rotary tables for a Llama block");
                let (q, k, v) = b.qkv(cfg, x, cos, sin, tp, self.bt);
                b.finish(x, &core(q, k, v, crate::llama::attention_core), tp, self.bt)
            }
            _ => unreachable!("blocks are built from the model's own config"),
        }
    }
}

/// A language model of either architecture, or the part of it one pipeline stage holds.
pub struct Model {
    cfg: ModelConfig,
    spec: StageSpec,
    vs: nn::VarStore,
    params: Vec<(String, Tensor)>,
    /// [V, C] token embedding: on the first stage, and on the last as the tied output projection
    /// (a copy there when the two are different stages, initialised equal).
    wte: Option<Tensor>,
    /// [V, C] output projection of an untied model (`lm_head.weight`), on the last stage.
    lm_head: Option<Tensor>,
    /// GPT's [block_size, C] learned positions, first stage only.
    wpe: Option<Tensor>,
    blocks: Vec<Block>,
    norm: Option<Norm>,
    recompute: Recompute,
    /// Tensor parallelism: this rank's slices of the split parameters, the region operators.
    tp: Option<TensorParallel>,
    /// How each parameter of `params` is split over the tensor-parallel ranks, in order.
    shards: Vec<Option<Shard>>,
}

/// FNV-1a over a parameter's name: with the run's seed, the seed of that parameter's init.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl Model {
    /// The whole model (see [`Model::build`]), its seed drawn from libtorch's global RNG: seed
    /// that with `tch::manual_seed` first for a reproducible init.
    pub fn new(cfg: &ModelConfig, device: Device) -> Result<Self> {
        let seed = Tensor::randint(i64::MAX, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]) as u64;
        Self::build(cfg, device, &StageSpec::whole(cfg.n_layer()), seed)
    }

    /// Builds the part `spec` of the model: N(0, 0.02) for weights and embeddings, zero biases,
    /// unit norms, and N(0, 0.02/sqrt(2·n_layer)) for the residual projections (GPT-2's scheme,
    /// which keeps the residual stream's variance independent of depth; used for both).
    ///
    /// Each parameter is drawn from its own generator, seeded by (`seed`, its name): a parameter
    /// has the same initial value whichever stages a rank holds, so every pipeline layout starts
    /// from the weights of the one-process run, and the last stage's copy of the tied embedding
    /// equals the first stage's. The draws use libtorch's global RNG, which this reseeds (and
    /// leaves reseeded); builds in one process are serialised so that they do not interleave.
    pub fn build(cfg: &ModelConfig, device: Device, spec: &StageSpec, seed: u64) -> Result<Self> {
        Self::assemble(cfg, device, spec, seed, false, None).map(|(m, _)| m)
    }

    /// As [`Model::build`], holding this tensor-parallel rank's part of each layer (`tp`: see
    /// [`crate::tp`]). Each split parameter is drawn whole, as the one-process model draws it,
    /// and sliced, so a tensor-parallel run starts from the one-process run's weights. Refuses
    /// a degree that does not divide the heads (query and key-value), the MLP width or the
    /// vocabulary, naming `parallel.tp`.
    pub fn build_tp(cfg: &ModelConfig, device: Device, spec: &StageSpec, seed: u64, tp: Option<TensorParallel>) -> Result<Self> {
        Self::assemble(cfg, device, spec, seed, false, tp.filter(|p| p.size > 1)).map(|(m, _)| m)
    }

    /// Whether tensor parallelism of degree `tp` can split `cfg`: the first reason it cannot, as
    /// the error of [`Model::build_tp`].
    pub fn check_tensor_parallel(cfg: &ModelConfig, tp: usize) -> Result<()> {
        if tp <= 1 {
            return Ok(());
        }
        let bad = |why: String| Err(ModelError::InvalidConfig { key: "parallel.tp", value: tp.to_string(), why });
        let heads = match cfg {
            ModelConfig::Gpt(g) => g.n_head,
            ModelConfig::Llama(m) => m.n_head,
        };
        if !heads.is_multiple_of(tp) {
            return bad(format!(
                "each tensor-parallel rank holds whole attention heads, and model.n_head = {heads} is not a multiple of it: use a divisor of {heads}"
            ));
        }
        if let ModelConfig::Llama(m) = cfg {
            if !m.n_kv_head.is_multiple_of(tp) {
                return bad(format!(
                    "each tensor-parallel rank holds whole key-value heads (they are split, not replicated), and model.n_kv_head = {} is not a multiple of it: use parallel.tp ≤ {} dividing it",
                    m.n_kv_head, m.n_kv_head
                ));
            }
        }
        if !cfg.ffn_hidden().is_multiple_of(tp) {
            return bad(format!("the MLP width ({}) is not a multiple of it: use a divisor of {}", cfg.ffn_hidden(), cfg.ffn_hidden()));
        }
        let v = cfg.vocab_size();
        if !v.is_multiple_of(tp) {
            let up = v.div_ceil(tp) * tp;
            return bad(format!(
                "the embedding and output layer are split by vocabulary, and model.vocab_size = {v} is not a multiple of it: set model.vocab_size={up} (padding; the extra entries are never targets) or use a divisor of {v}"
            ));
        }
        Ok(())
    }

    /// The names and shapes of the parameters of part `spec`, in order, allocating nothing (a
    /// 405B model's list is as cheap as a tiny one's).
    pub fn parameter_shapes(cfg: &ModelConfig, spec: &StageSpec) -> Result<Vec<(String, Vec<i64>)>> {
        let (m, shapes) = Self::assemble(cfg, Device::Cpu, spec, 0, true, None)?;
        Ok(m.params.into_iter().map(|(n, _)| n).zip(shapes).collect())
    }

    fn assemble(
        cfg: &ModelConfig,
        device: Device,
        spec: &StageSpec,
        seed: u64,
        dry: bool,
        tp: Option<TensorParallel>,
    ) -> Result<(Self, Vec<Vec<i64>>)> {
        static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
        cfg.validate()?;
        if let Some(p) = &tp {
            Self::check_tensor_parallel(cfg, p.size)?;
        }
        let l = cfg.n_layer();
        if spec.blocks.end > l || spec.blocks.start > spec.blocks.end {
            return Err(ModelError::InvalidConfig {
                key: "parallel.stage_layers",
                value: format!("{:?}", spec.blocks),
                why: format!("blocks must lie in 0..{l} (model.n_layer)"),
            });
        }
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let (c, v) = (cfg.n_embd() as i64, cfg.vocab_size() as i64);
        let std = 0.02;
        let proj_std = 0.02 / ((2 * l) as f64).sqrt();
        let mut ps = Params::default();
        ps.dry = dry;
        ps.tp = tp.as_ref().map(|p| (p.rank, p.size));
        ps.seeded(move |name| tch::manual_seed((splitmix64(seed ^ name_hash(name)) >> 1) as i64));
        let normal = Init::Randn { mean: 0.0, stdev: std };
        let tied = cfg.tie_embeddings();
        let has_wte = spec.embed || (spec.head && tied);
        let (wte, wpe, blocks, norm) = match cfg {
            ModelConfig::Gpt(g) => {
                let tr = root.sub("transformer");
                let wte = has_wte.then(|| ps.var_split(&tr.sub("wte"), "weight", &[v, c], normal, Some(Shard::ROWS)));
                let wpe = spec.embed.then(|| ps.var(&tr.sub("wpe"), "weight", &[g.block_size as i64, c], normal));
                let h = tr.sub("h");
                let blocks = spec.blocks.clone().map(|i| Block::Gpt(GptBlock::new(&mut ps, &h.sub(i), g, std, proj_std))).collect();
                let norm = spec.head.then(|| Norm::Layer(LayerNorm::new(&mut ps, &tr.sub("ln_f"), c, g.bias)));
                (wte, wpe, blocks, norm)
            }
            ModelConfig::Llama(m) => {
                let md = root.sub("model");
                let wte = has_wte.then(|| ps.var_split(&md.sub("embed_tokens"), "weight", &[v, c], normal, Some(Shard::ROWS)));
                let h = md.sub("layers");
                let blocks = spec.blocks.clone().map(|i| Block::Llama(LlamaBlock::new(&mut ps, &h.sub(i), m, std, proj_std))).collect();
                let norm = spec.head.then(|| Norm::Rms(RmsNorm::new(&mut ps, &md.sub("norm"), c, m.norm_eps)));
                (wte, None, blocks, norm)
            }
        };
        let lm_head = (spec.head && !tied).then(|| ps.var_split(&root.sub("lm_head"), "weight", &[v, c], normal, Some(Shard::ROWS)));
        let model = Model {
            cfg: cfg.clone(),
            spec: spec.clone(),
            vs,
            params: ps.list,
            wte,
            lm_head,
            wpe,
            blocks,
            norm,
            recompute: Recompute::None,
            tp,
            shards: ps.shards,
        };
        Ok((model, ps.shapes))
    }

    /// Sets what backward recomputes (`train.recompute`); takes effect at the next forward.
    pub fn set_recompute(&mut self, r: Recompute) {
        self.recompute = r;
    }

    /// The part of the model this holds.
    pub fn stage(&self) -> &StageSpec {
        &self.spec
    }

    /// Whether this holds the tied embedding's second copy (the head of a last stage that is not
    /// also the first): its gradient must be summed with the first stage's every step.
    pub fn holds_tied_copy(&self) -> bool {
        self.cfg.tie_embeddings() && self.spec.head && !self.spec.embed
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The tensor parallelism this was built with (`None`: every layer whole).
    pub fn tensor_parallel(&self) -> Option<&TensorParallel> {
        self.tp.as_ref()
    }

    /// How parameter `name` is split over the tensor-parallel ranks (`None`: whole on each, or no
    /// such parameter).
    pub fn shard_of(&self, name: &str) -> Option<Shard> {
        self.params.iter().position(|(n, _)| n == name).and_then(|i| self.shards[i])
    }

    /// Parameters in registration order (embeddings first, then block by block) with their
    /// state-dict names (nanoGPT's and Hugging Face's GPT-2 names; Hugging Face's Llama names).
    /// With tied embeddings `lm_head.weight` is not listed: it is the token embedding.
    pub fn parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Shallow handles to the parameters (same storage), for optimizers and reducers to own.
    pub fn parameter_handles(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }

    /// Number of parameters, counting the tied embedding once.
    pub fn num_params(&self) -> i64 {
        self.params.iter().map(|(_, t)| t.numel() as i64).sum()
    }

    /// Forward pass of the whole model. `idx` is (B, T) int64 token ids with T <= block_size;
    /// returns logits (B, T, vocab_size) in the compute dtype (bf16 under autocast, else fp32).
    pub fn forward(&self, idx: &Tensor, train: bool) -> Tensor {
        assert!(self.spec.embed && self.spec.head, "forward needs the whole model; a stage runs forward_stage");
        self.forward_stage(idx, train)
    }

    /// This part's forward: from token ids (B, T) on a stage with the embeddings, else from the
    /// previous stage's hidden states (B, T, C); to logits (B, T, V) on a stage with the head,
    /// else to hidden states (B, T, C).
    ///
    /// With tensor parallelism the logits are this rank's vocabulary slice (B, T, V/tp) (see
    /// [`Model::loss`]), and with sequence parallelism the hidden states between stages are this
    /// rank's shard of the micro-batch's tokens (B·T/tp, C), of sequences of `block_size`.
    pub fn forward_stage(&self, input: &Tensor, train: bool) -> Tensor {
        let tp = self.tp.as_ref();
        let sp = tp.is_some_and(|p| p.sequence_parallel);
        // The micro-batch's (B, T): a sequence-parallel stage's hidden states are a token shard.
        let (b, t) = if sp && !self.spec.embed {
            let t = self.cfg.block_size() as i64;
            (input.size()[0] * tp.map_or(1, |p| p.size) as i64 / t, t)
        } else {
            (input.size()[0], input.size()[1])
        };
        let mut x = match &self.wte {
            Some(wte) if self.spec.embed => {
                assert!(t as usize <= self.cfg.block_size(), "sequence length {t} exceeds block_size");
                let tok_emb = match tp {
                    None => Tensor::embedding(wte, input, -1, false, false), // (B, T, C)
                    Some(p) => {
                        // Vocabulary-parallel: this rank's rows, zeros for tokens held elsewhere,
                        // summed over the ranks (reduce-scattered along the sequence with SP).
                        let rows = wte.size()[0];
                        let local = input - p.rank as i64 * rows;
                        let inside = local.ge(0).logical_and(&local.lt(rows));
                        let ids = local.where_self(&inside, &local.zeros_like());
                        let e = Tensor::embedding(wte, &ids, -1, false, false) * inside.unsqueeze(-1).to_kind(wte.kind());
                        exit(tp, &e)
                    }
                };
                match &self.wpe {
                    Some(wpe) => {
                        let pos = match tp {
                            // Token i of the micro-batch is at position i mod T.
                            Some(p) if sp => {
                                let shard = b * t / p.size as i64;
                                Tensor::arange_start(p.rank as i64 * shard, (p.rank as i64 + 1) * shard, (Kind::Int64, input.device())).remainder(t)
                            }
                            _ => Tensor::arange(t, (Kind::Int64, input.device())),
                        };
                        outer_dropout(tp, &(tok_emb + Tensor::embedding(wpe, &pos, -1, false, false)), self.cfg.dropout(), train)
                    }
                    None => tok_emb,
                }
            }
            _ => input.shallow_clone(),
        };
        let ctx = BlockCtx {
            cfg: self.cfg.clone(),
            train,
            recompute: self.recompute,
            tp: self.tp.clone(),
            bt: (b, t),
            rope: match &self.cfg {
                ModelConfig::Llama(m) if !self.blocks.is_empty() => Some(crate::llama::rope_tables(m, t, input.device())),
                _ => None,
            },
        };
        for block in &self.blocks {
            x = if self.recompute == Recompute::Full && train {
                let (b, c) = (block.shallow(), ctx.shallow());
                let out = fabbrica_torch_ext::recompute::recompute(&[&x], move |i| vec![c.block(&b, &i[0])]);
                out.map(|mut o| o.remove(0)).unwrap_or_else(|e| panic!("full recompute: {e}"))
            } else {
                ctx.block(block, &x)
            };
        }
        match (&self.norm, self.lm_head.as_ref().or(self.wte.as_ref())) {
            (Some(norm), Some(head)) => match tp {
                Some(p) if p.sequence_parallel => p.ops.gather_linear(&norm.forward(&x), head, None).view([b, t, -1]), // (B, T, V/tp)
                _ => enter(tp, &norm.forward(&x)).linear(head, None::<&Tensor>),                                       // (B, T, V or V/tp)
            },
            _ => x,
        }
    }

    /// Mean cross-entropy (fp32) of this model's logits against targets (B, T): of the whole
    /// vocabulary's logits [`Model::cross_entropy`]; of a tensor-parallel rank's slice, the
    /// vocabulary-parallel cross-entropy (the same value on every rank of the group).
    pub fn loss(&self, logits: &Tensor, targets: &Tensor) -> Tensor {
        match &self.tp {
            None => Self::cross_entropy(logits, targets),
            Some(p) => {
                let rows = logits.size().last().copied().expect("logits have a vocab dim");
                let targets = targets.reshape([-1]);
                let per_token = p.ops.vocab_parallel_cross_entropy(&logits.reshape([-1, rows]).to_kind(Kind::Float), &targets, p.rank as i64 * rows);
                let valid = targets.ne(-100).to_kind(Kind::Float);
                per_token.sum(Kind::Float) / valid.sum(Kind::Float)
            }
        }
    }

    /// Mean cross-entropy of logits (B, T, V) against targets (B, T), computed in fp32.
    pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
        let v = logits.size().last().copied().expect("logits have a vocab dim");
        logits.view([-1, v]).to_kind(Kind::Float).cross_entropy_loss::<Tensor>(&targets.view([-1]), None, tch::Reduction::Mean, -100, 0.0)
    }

    /// Autoregressive sampling: appends `new_tokens` tokens to `idx` (1, T0), cropping the
    /// context to the last block_size tokens. `top_k` limits sampling to the k likeliest tokens.
    pub fn generate(&self, idx: &Tensor, new_tokens: usize, temperature: f64, top_k: Option<i64>) -> Tensor {
        self.generate_within(idx, new_tokens, temperature, top_k, self.cfg.vocab_size())
    }

    /// As [`Model::generate`], drawing only token ids below `vocab` (a vocabulary padded beyond
    /// its tokenizer's, e.g. to split it over tensor-parallel ranks, never samples a padding row).
    pub fn generate_within(&self, idx: &Tensor, new_tokens: usize, temperature: f64, top_k: Option<i64>, vocab: usize) -> Tensor {
        self.generate_each(idx, new_tokens, temperature, top_k, vocab, None)
    }

    /// As [`Model::generate_within`], handing each new token id to `on_token` as it is drawn (a
    /// sampler that prints as it goes; each call waits for the device).
    pub fn generate_each(
        &self,
        idx: &Tensor,
        new_tokens: usize,
        temperature: f64,
        top_k: Option<i64>,
        vocab: usize,
        mut on_token: Option<&mut dyn FnMut(i64)>,
    ) -> Tensor {
        assert!(self.spec.is_whole(self.cfg.n_layer()) && self.tp.is_none(), "generate needs the whole model");
        let vocab = vocab.clamp(1, self.cfg.vocab_size()) as i64;
        tch::no_grad(|| {
            let mut idx = idx.shallow_clone();
            let bs = self.cfg.block_size() as i64;
            for _ in 0..new_tokens {
                let t = idx.size()[1];
                let ctx = if t > bs { idx.narrow(1, t - bs, bs) } else { idx.shallow_clone() };
                let logits = self.forward(&ctx, false).select(1, -1).narrow(1, 0, vocab).to_kind(Kind::Float) / temperature.max(1e-6);
                let logits = match top_k {
                    Some(k) if k < logits.size()[1] => {
                        let (vals, _) = logits.topk(k, -1, true, true);
                        let kth = vals.select(1, k - 1).unsqueeze(1);
                        logits.where_self(&logits.ge_tensor(&kth), &Tensor::from(f64::NEG_INFINITY).to_device(logits.device()))
                    }
                    _ => logits,
                };
                let next = logits.softmax(-1, Kind::Float).multinomial(1, true);
                if let Some(f) = on_token.as_mut() {
                    f(next.int64_value(&[0, 0]));
                }
                idx = Tensor::cat(&[idx, next], 1);
            }
            idx
        })
    }

    /// Copies this part's parameters from a set of named tensors that may hold more (a whole
    /// model's checkpoint read by one pipeline stage): every parameter of this part must be
    /// there with its shape; the others are ignored.
    pub fn load_own_parameters(&self, tensors: &[(String, Tensor)]) -> Result<()> {
        let mine: Vec<(String, Tensor)> =
            tensors.iter().filter(|(n, _)| self.params.iter().any(|(p, _)| p == n)).map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        self.load_parameters(&mine)
    }

    /// Copies named tensors into the parameters, checking that the names and shapes match
    /// exactly (so a checkpoint of another model shape is refused with the offending name). A
    /// tensor-parallel rank takes its slice of a whole tensor, so any layout loads a whole
    /// model's weights.
    pub fn load_parameters(&self, tensors: &[(String, Tensor)]) -> Result<()> {
        let by_name: std::collections::HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        if let Some((extra, _)) = tensors.iter().find(|(n, _)| !self.params.iter().any(|(p, _)| p == n)) {
            return Err(ModelError::UnexpectedTensor { name: extra.clone() });
        }
        // Check every name and shape before copying anything: a refused checkpoint changes nothing.
        let mut pairs = Vec::with_capacity(self.params.len());
        for ((name, p), shard) in self.params.iter().zip(&self.shards) {
            let src = *by_name.get(name.as_str()).ok_or_else(|| ModelError::MissingTensor { name: name.clone() })?;
            let src = match (shard, &self.tp) {
                (Some(s), Some(tp)) if src.size() != p.size() => {
                    let mut full = p.size();
                    full[s.dim] *= tp.size as i64;
                    if src.size() != full {
                        return Err(ModelError::ShapeMismatch { name: name.clone(), expected: full, found: src.size() });
                    }
                    s.slice(src, tp.rank, tp.size)
                }
                _ if src.size() != p.size() => return Err(ModelError::ShapeMismatch { name: name.clone(), expected: p.size(), found: src.size() }),
                _ => src.shallow_clone(),
            };
            pairs.push((p, src));
        }
        tch::no_grad(|| {
            for (p, src) in pairs {
                p.shallow_clone().f_copy_(&src)?;
            }
            Ok(())
        })
    }
}
