//! Minimal layers over raw parameters, so that parameter names follow nanoGPT's state dict and
//! the model keeps them in registration order (DDP buckets and optimizer groups rely on it).

use tch::{nn::Init, nn::Path, Tensor};

use crate::tp::{exit, Shard, TensorParallel};

/// What [`Params::seeded`] installs.
type Reseed = Box<dyn Fn(&str)>;

/// Ordered registry of (state-dict name, parameter) pairs.
#[derive(Default)]
pub struct Params {
    pub list: Vec<(String, Tensor)>,
    /// Called with each parameter's full name before it is initialised (seeds its draw).
    reseed: Option<Reseed>,
    /// Record names and shapes only (`shapes`), allocating nothing.
    pub dry: bool,
    /// The shape of each parameter of `list`, in order (this rank's slice of a split one).
    pub shapes: Vec<Vec<i64>>,
    /// Tensor parallelism: (this rank, the degree). Parameters registered with a [`Shard`] hold
    /// this rank's slice of the whole-model tensor.
    pub tp: Option<(usize, usize)>,
    /// How each parameter of `list` is split (`None`: whole on every tensor-parallel rank).
    pub shards: Vec<Option<Shard>>,
}

impl Params {
    /// Reseeds libtorch's RNG per parameter, from its name, before each initialisation.
    pub fn seeded(&mut self, f: impl Fn(&str) + 'static) {
        self.reseed = Some(Box::new(f));
    }

    pub fn var(&mut self, p: &Path, name: &str, dims: &[i64], init: Init) -> Tensor {
        self.var_split(p, name, dims, init, None)
    }

    /// A parameter split over the tensor-parallel ranks by `shard` (whole without tensor
    /// parallelism). The whole tensor is drawn as the one-process model draws it and this rank
    /// keeps its slice, so every layout starts from the same weights.
    pub fn var_split(&mut self, p: &Path, name: &str, dims: &[i64], init: Init, shard: Option<Shard>) -> Tensor {
        let split = match (shard, self.tp) {
            (Some(s), Some((rank, size))) if size > 1 => Some((s, rank, size)),
            _ => None,
        };
        self.shards.push(split.map(|(s, _, _)| s));
        let local = split.map_or_else(|| dims.to_vec(), |(s, _, size)| s.local_shape(dims, size));
        self.shapes.push(local);
        if let Some((s, rank, size)) = split {
            if !self.dry {
                if let Some(f) = &self.reseed {
                    f(&p.path(name));
                }
                let full = tch::nn::init(init, dims, tch::Device::Cpu);
                let t = p.var_copy(name, &s.slice(&full, rank, size));
                self.list.push((p.path(name), t.shallow_clone()));
                return t;
            }
        }
        if self.dry {
            let t = Tensor::empty([0], (tch::Kind::Float, tch::Device::Cpu));
            self.list.push((p.path(name), t.shallow_clone()));
            return t;
        }
        if let Some(f) = &self.reseed {
            f(&p.path(name));
        }
        // Drawn on the CPU's generator whatever the device, so that a CUDA run starts from the
        // weights a CPU run of the same seed starts from (CUDA's generator draws other numbers).
        let t = p.var_copy(name, &tch::nn::init(init, dims, tch::Device::Cpu));
        self.list.push((p.path(name), t.shallow_clone()));
        t
    }
}

pub struct Linear {
    pub weight: Tensor, // [out, in]
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Column-parallel: each tensor-parallel rank holds a slice of the output features (of each
    /// of `parts` stacked blocks), weight and bias alike. Its input comes through `tp::enter`.
    pub fn column(ps: &mut Params, p: &Path, d_in: i64, d_out: i64, bias: bool, std: f64, parts: usize) -> Self {
        let shard = Some(Shard { dim: 0, parts });
        let weight = ps.var_split(p, "weight", &[d_out, d_in], Init::Randn { mean: 0.0, stdev: std }, shard);
        let bias = bias.then(|| ps.var_split(p, "bias", &[d_out], Init::Const(0.0), shard));
        Linear { weight, bias }
    }

    /// Row-parallel: each tensor-parallel rank holds a slice of the input features; the bias is
    /// whole and added once, after the partial products are reduced ([`Linear::row_forward`]).
    pub fn row(ps: &mut Params, p: &Path, d_in: i64, d_out: i64, bias: bool, std: f64) -> Self {
        let weight = ps.var_split(p, "weight", &[d_out, d_in], Init::Randn { mean: 0.0, stdev: std }, Some(Shard::COLUMNS));
        let bias = bias.then(|| ps.var(p, "bias", &[d_out], Init::Const(0.0)));
        Linear { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }

    /// A row-parallel layer's forward: the partial product, out of the region (`tp::exit`), then
    /// the bias. Without tensor parallelism, [`Linear::forward`].
    pub fn row_forward(&self, x: &Tensor, tp: Option<&TensorParallel>) -> Tensor {
        if tp.is_none() {
            return self.forward(x);
        }
        let y = exit(tp, &x.linear(&self.weight, None::<&Tensor>));
        match &self.bias {
            Some(b) => y + b,
            None => y,
        }
    }

    /// A handle to the same parameters.
    pub fn shallow(&self) -> Linear {
        Linear { weight: self.weight.shallow_clone(), bias: self.bias.as_ref().map(Tensor::shallow_clone) }
    }
}

pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub dim: i64,
}

impl LayerNorm {
    pub fn new(ps: &mut Params, p: &Path, dim: i64, bias: bool) -> Self {
        let weight = ps.var(p, "weight", &[dim], Init::Const(1.0));
        let bias = bias.then(|| ps.var(p, "bias", &[dim], Init::Const(0.0)));
        LayerNorm { weight, bias, dim }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.dim], Some(&self.weight), self.bias.as_ref(), 1e-5, true)
    }

    /// A handle to the same parameters.
    pub fn shallow(&self) -> LayerNorm {
        LayerNorm { weight: self.weight.shallow_clone(), bias: self.bias.as_ref().map(Tensor::shallow_clone), dim: self.dim }
    }
}
