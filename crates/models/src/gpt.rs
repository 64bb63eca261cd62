//! GPT-2 (nanoGPT's model.py): token + learned position embeddings, pre-LayerNorm blocks with
//! causal self-attention through libtorch's `scaled_dot_product_attention` (flash attention on
//! CUDA), GELU MLP, final LayerNorm and an output projection tied to the token embedding.

use tch::{nn, nn::Init, Device, Kind, Tensor};

use fabbrica_data::splitmix64;

use crate::config::GptConfig;
use crate::error::{ModelError, Result};
use crate::layers::{LayerNorm, Linear, Params};

struct Attention {
    c_attn: Linear, // C -> 3C (q, k, v)
    c_proj: Linear, // C -> C
}

struct Mlp {
    c_fc: Linear,   // C -> 4C
    c_proj: Linear, // 4C -> C
}

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

/// Which part of the model a [`Gpt`] holds: the embeddings (token and position), blocks
/// `blocks` (global layer indices), and the final LayerNorm with the output projection. The
/// whole model holds all three; a pipeline stage holds a contiguous range of blocks, with the
/// embeddings on the first stage and the head on the last.
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

/// A GPT-2 model, or the part of it one pipeline stage holds ([`StageSpec`]): only the
/// parameters of that part are ever allocated.
pub struct Gpt {
    cfg: GptConfig,
    spec: StageSpec,
    vs: nn::VarStore,
    params: Vec<(String, Tensor)>,
    /// [V, C] token embedding: on the first stage, and on the last as the tied output projection
    /// (a copy there when the two are different stages, initialised equal).
    wte: Option<Tensor>,
    /// [V, C] output projection of an untied model (`lm_head.weight`), on the last stage.
    lm_head: Option<Tensor>,
    wpe: Option<Tensor>, // [block_size, C], first stage only
    blocks: Vec<Block>,
    ln_f: Option<LayerNorm>,
}

/// FNV-1a over a parameter's name: with the run's seed, the seed of that parameter's init.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl Gpt {
    /// The whole model with GPT-2 initialisation (see [`Gpt::build`]), its seed drawn from
    /// libtorch's global RNG: seed that with `tch::manual_seed` first for a reproducible init.
    pub fn new(cfg: &GptConfig, device: Device) -> Result<Self> {
        let seed = Tensor::randint(i64::MAX, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]) as u64;
        Self::build(cfg, device, &StageSpec::whole(cfg.n_layer), seed)
    }

    /// Builds the part `spec` of the model with GPT-2 initialisation: N(0, 0.02) for weights and
    /// embeddings, zero biases, and N(0, 0.02/sqrt(2·n_layer)) for the residual projections
    /// (`c_proj`), which keeps the residual stream's variance independent of depth.
    ///
    /// Each parameter is drawn from its own generator, seeded by (`seed`, its name): a parameter
    /// has the same initial value whichever stages a rank holds, so every pipeline layout starts
    /// from the weights of the one-process run, and the last stage's copy of the tied embedding
    /// equals the first stage's. The draws use libtorch's global RNG, which this reseeds (and
    /// leaves reseeded); builds in one process are serialised so that they do not interleave.
    pub fn build(cfg: &GptConfig, device: Device, spec: &StageSpec, seed: u64) -> Result<Self> {
        static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
        cfg.validate()?;
        if spec.blocks.end > cfg.n_layer || spec.blocks.start > spec.blocks.end {
            return Err(ModelError::InvalidConfig {
                key: "parallel.stage_layers",
                value: format!("{:?}", spec.blocks),
                why: format!("blocks must lie in 0..{} (model.n_layer)", cfg.n_layer),
            });
        }
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let tr = root.sub("transformer");
        let (c, l) = (cfg.n_embd as i64, cfg.n_layer);
        let std = 0.02;
        let proj_std = 0.02 / ((2 * l) as f64).sqrt();
        let mut ps = Params::default();
        ps.seeded(move |name| tch::manual_seed((splitmix64(seed ^ name_hash(name)) >> 1) as i64));
        let normal = Init::Randn { mean: 0.0, stdev: std };
        let tied = cfg.tie_embeddings;
        let wte = (spec.embed || (spec.head && tied)).then(|| ps.var(&tr.sub("wte"), "weight", &[cfg.vocab_size as i64, c], normal));
        let wpe = spec.embed.then(|| ps.var(&tr.sub("wpe"), "weight", &[cfg.block_size as i64, c], normal));
        let h = tr.sub("h");
        let blocks = spec
            .blocks
            .clone()
            .map(|i| {
                let p = h.sub(i);
                let (a, m) = (p.sub("attn"), p.sub("mlp"));
                Block {
                    ln_1: LayerNorm::new(&mut ps, &p.sub("ln_1"), c, cfg.bias),
                    attn: Attention {
                        c_attn: Linear::new(&mut ps, &a.sub("c_attn"), c, 3 * c, cfg.bias, std),
                        c_proj: Linear::new(&mut ps, &a.sub("c_proj"), c, c, cfg.bias, proj_std),
                    },
                    ln_2: LayerNorm::new(&mut ps, &p.sub("ln_2"), c, cfg.bias),
                    mlp: Mlp {
                        c_fc: Linear::new(&mut ps, &m.sub("c_fc"), c, 4 * c, cfg.bias, std),
                        c_proj: Linear::new(&mut ps, &m.sub("c_proj"), 4 * c, c, cfg.bias, proj_std),
                    },
                }
            })
            .collect();
        let ln_f = spec.head.then(|| LayerNorm::new(&mut ps, &tr.sub("ln_f"), c, cfg.bias));
        let lm_head = (spec.head && !tied).then(|| ps.var(&root.sub("lm_head"), "weight", &[cfg.vocab_size as i64, c], normal));
        Ok(Gpt { cfg: cfg.clone(), spec: spec.clone(), vs, params: ps.list, wte, lm_head, wpe, blocks, ln_f })
    }

    /// The part of the model this holds.
    pub fn stage(&self) -> &StageSpec {
        &self.spec
    }

    /// Whether this holds the tied embedding's second copy (the head of a last stage that is not
    /// also the first): its gradient must be summed with the first stage's every step.
    pub fn holds_tied_copy(&self) -> bool {
        self.cfg.tie_embeddings && self.spec.head && !self.spec.embed
    }

    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Parameters in registration order (embeddings first, then block by block) with their
    /// PyTorch state-dict names. With tied embeddings `lm_head.weight` is not listed: it is
    /// `transformer.wte.weight`.
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
    pub fn forward_stage(&self, input: &Tensor, train: bool) -> Tensor {
        let mut x = if let (Some(wte), Some(wpe)) = (&self.wte, &self.wpe) {
            let (_b, t) = input.size2().expect("idx is (B, T)");
            assert!(t as usize <= self.cfg.block_size, "sequence length {t} exceeds block_size");
            let pos = Tensor::arange(t, (Kind::Int64, input.device()));
            let tok_emb = Tensor::embedding(wte, input, -1, false, false); // (B, T, C)
            let pos_emb = Tensor::embedding(wpe, &pos, -1, false, false); // (T, C)
            (tok_emb + pos_emb).dropout(self.cfg.dropout, train)
        } else {
            input.shallow_clone()
        };
        for block in &self.blocks {
            x = &x + self.attention(&block.attn, &block.ln_1.forward(&x), train);
            x = &x + self.mlp(&block.mlp, &block.ln_2.forward(&x), train);
        }
        match (&self.ln_f, self.lm_head.as_ref().or(self.wte.as_ref())) {
            (Some(ln_f), Some(head)) => ln_f.forward(&x).linear(head, None::<&Tensor>), // (B, T, V)
            _ => x,
        }
    }

    fn attention(&self, a: &Attention, x: &Tensor, train: bool) -> Tensor {
        let (b, t, c) = x.size3().expect("x is (B, T, C)");
        let nh = self.cfg.n_head as i64;
        let qkv = a.c_attn.forward(x).split(c, 2); // 3 × (B, T, C)
        let heads = |z: &Tensor| z.view([b, t, nh, c / nh]).transpose(1, 2); // (B, nh, T, hs)
        let (q, k, v) = (heads(&qkv[0]), heads(&qkv[1]), heads(&qkv[2]));
        let p = if train { self.cfg.dropout } else { 0.0 };
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, p, true, None, false);
        let y = y.transpose(1, 2).contiguous().view([b, t, c]);
        a.c_proj.forward(&y).dropout(self.cfg.dropout, train)
    }

    fn mlp(&self, m: &Mlp, x: &Tensor, train: bool) -> Tensor {
        m.c_proj.forward(&m.c_fc.forward(x).gelu("none")).dropout(self.cfg.dropout, train)
    }

    /// Mean cross-entropy of logits (B, T, V) against targets (B, T), computed in fp32.
    pub fn loss(logits: &Tensor, targets: &Tensor) -> Tensor {
        let v = logits.size().last().copied().expect("logits have a vocab dim");
        logits.view([-1, v]).to_kind(Kind::Float).cross_entropy_loss::<Tensor>(&targets.view([-1]), None, tch::Reduction::Mean, -100, 0.0)
    }

    /// Autoregressive sampling: appends `new_tokens` tokens to `idx` (1, T0), cropping the
    /// context to the last block_size tokens. `top_k` limits sampling to the k likeliest tokens.
    pub fn generate(&self, idx: &Tensor, new_tokens: usize, temperature: f64, top_k: Option<i64>) -> Tensor {
        assert!(self.spec.is_whole(self.cfg.n_layer), "generate needs the whole model");
        tch::no_grad(|| {
            let mut idx = idx.shallow_clone();
            let bs = self.cfg.block_size as i64;
            for _ in 0..new_tokens {
                let t = idx.size()[1];
                let ctx = if t > bs { idx.narrow(1, t - bs, bs) } else { idx.shallow_clone() };
                let logits = self.forward(&ctx, false).select(1, -1).to_kind(Kind::Float) / temperature.max(1e-6);
                let logits = match top_k {
                    Some(k) if k < logits.size()[1] => {
                        let (vals, _) = logits.topk(k, -1, true, true);
                        let kth = vals.select(1, k - 1).unsqueeze(1);
                        logits.where_self(&logits.ge_tensor(&kth), &Tensor::from(f64::NEG_INFINITY).to_device(logits.device()))
                    }
                    _ => logits,
                };
                let next = logits.softmax(-1, Kind::Float).multinomial(1, true);
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
    /// exactly (so a checkpoint of another model shape is refused with the offending name).
    pub fn load_parameters(&self, tensors: &[(String, Tensor)]) -> Result<()> {
        let by_name: std::collections::HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        if let Some((extra, _)) = tensors.iter().find(|(n, _)| !self.params.iter().any(|(p, _)| p == n)) {
            return Err(ModelError::UnexpectedTensor { name: extra.clone() });
        }
        // Check every name and shape before copying anything: a refused checkpoint changes nothing.
        let mut pairs = Vec::with_capacity(self.params.len());
        for (name, p) in &self.params {
            let src = *by_name.get(name.as_str()).ok_or_else(|| ModelError::MissingTensor { name: name.clone() })?;
            if src.size() != p.size() {
                return Err(ModelError::ShapeMismatch { name: name.clone(), expected: p.size(), found: src.size() });
            }
            pairs.push((p, src));
        }
        tch::no_grad(|| {
            for (p, src) in pairs {
                p.shallow_clone().f_copy_(src)?;
            }
            Ok(())
        })
    }
}
