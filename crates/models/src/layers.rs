//! Minimal layers over raw parameters, so that parameter names follow nanoGPT's state dict and
//! the model keeps them in registration order (DDP buckets and optimizer groups rely on it).

use tch::{nn::Init, nn::Path, Tensor};

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
    /// The shape of each parameter of `list`, in order.
    pub shapes: Vec<Vec<i64>>,
}

impl Params {
    /// Reseeds libtorch's RNG per parameter, from its name, before each initialisation.
    pub fn seeded(&mut self, f: impl Fn(&str) + 'static) {
        self.reseed = Some(Box::new(f));
    }

    pub fn var(&mut self, p: &Path, name: &str, dims: &[i64], init: Init) -> Tensor {
        self.shapes.push(dims.to_vec());
        if self.dry {
            let t = Tensor::empty([0], (tch::Kind::Float, tch::Device::Cpu));
            self.list.push((p.path(name), t.shallow_clone()));
            return t;
        }
        if let Some(f) = &self.reseed {
            f(&p.path(name));
        }
        let t = p.var(name, dims, init);
        self.list.push((p.path(name), t.shallow_clone()));
        t
    }
}

pub struct Linear {
    pub weight: Tensor, // [out, in]
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(ps: &mut Params, p: &Path, d_in: i64, d_out: i64, bias: bool, std: f64) -> Self {
        let weight = ps.var(p, "weight", &[d_out, d_in], Init::Randn { mean: 0.0, stdev: std });
        let bias = bias.then(|| ps.var(p, "bias", &[d_out], Init::Const(0.0)));
        Linear { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
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
