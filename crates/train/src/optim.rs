//! AdamW with decay / no-decay parameter groups.
//!
//! Two update paths, same maths:
//! - `reference`: tensor ops in the order of PyTorch's single-tensor AdamW (`foreach=False,
//!   fused=False`), so CPU fp32 training matches PyTorch step for step;
//! - `fused`: ATen's `_fused_adamw_` kernel through the torch-ext shim (what
//!   `torch.optim.AdamW(fused=True)` runs): one kernel per group instead of ~6 per parameter.
//!
//! The optimizer owns its state (moments, step) as plain tensors, one set per tensor it updates:
//! whole parameters, or under ZeRO-1 the pieces of this rank's shards that the data-parallel
//! reducer hands it (so the moments exist only for the shard). Loading slices a piece's state
//! from the whole tensors a checkpoint stores; saving a sharded state gathers it through the
//! reducer (`Ddp::gather_pieces`).

use fabbrica_ddp::Piece;
use fabbrica_torch_ext::{foreach_add_, foreach_mul_, foreach_norm, fused_adamw, AdamWArgs};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub fused: bool,
}

/// One parameter with its state.
struct Slot {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// float32 scalar on the parameter's device (the fused kernel increments it).
    step: Tensor,
    decay: bool,
    /// A gradient given explicitly (ZeRO-1 shard pieces, which have no `.grad` of their own);
    /// otherwise the parameter's `.grad`.
    grad: Option<Tensor>,
    /// ZeRO-1: where this piece lies in its whole parameter (a checkpoint holds the whole one).
    piece: Option<Piece>,
}

impl Slot {
    fn grad(&self) -> Tensor {
        match &self.grad {
            Some(g) => g.shallow_clone(),
            None => self.param.grad(),
        }
    }
}

pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    steps_taken: u64,
}

/// nanoGPT's grouping: every tensor with 2+ dims (matmul weights, embeddings) is decayed;
/// biases and LayerNorm parameters are not.
pub fn decays(param: &Tensor) -> bool {
    param.dim() >= 2
}

impl AdamW {
    pub fn new(params: &[(String, Tensor)], cfg: AdamWConfig) -> Self {
        let slots = params
            .iter()
            .map(|(name, p)| Slot {
                name: name.clone(),
                param: p.shallow_clone(),
                exp_avg: p.zeros_like().detach(),
                exp_avg_sq: p.zeros_like().detach(),
                step: Tensor::zeros([], (Kind::Float, p.device())),
                decay: decays(p),
                grad: None,
                piece: None,
            })
            .collect();
        AdamW { cfg, slots, steps_taken: 0 }
    }

    /// From what the data-parallel reducer hands out: whole parameters, or ZeRO-1 shard pieces
    /// with explicit gradients. The moments are allocated here, shaped like each tensor handed.
    pub fn from_parts(parts: Vec<fabbrica_ddp::OptParam>, cfg: AdamWConfig) -> Self {
        let slots = parts
            .into_iter()
            .map(|o| Slot {
                exp_avg: o.param.zeros_like().detach(),
                exp_avg_sq: o.param.zeros_like().detach(),
                step: Tensor::zeros([], (Kind::Float, o.param.device())),
                name: o.name,
                decay: o.decay,
                grad: Some(o.grad),
                param: o.param,
                piece: o.piece,
            })
            .collect();
        AdamW { cfg, slots, steps_taken: 0 }
    }

    pub fn steps_taken(&self) -> u64 {
        self.steps_taken
    }

    /// One update with learning rate `lr`; parameters without a gradient are skipped.
    pub fn step(&mut self, lr: f64) -> Result<(), String> {
        self.steps_taken += 1;
        tch::no_grad(|| if self.cfg.fused { self.step_fused(lr) } else { self.step_reference(lr) })
    }

    fn step_reference(&mut self, lr: f64) -> Result<(), String> {
        let c = self.cfg;
        for s in &mut self.slots {
            let grad = s.grad();
            if !grad.defined() {
                continue;
            }
            let _ = s.step.g_add_scalar_(1.0);
            let step = self.steps_taken as f64; // == s.step, without a device sync
            let wd = if s.decay { c.weight_decay } else { 0.0 };
            let _ = s.param.g_mul_scalar_(1.0 - lr * wd);
            let _ = s.exp_avg.lerp_(&grad, 1.0 - c.beta1);
            // addcmul(g, g, value) evaluates value·g·g; scaling the first factor keeps that order.
            let _ = s.exp_avg_sq.g_mul_scalar_(c.beta2).addcmul_(&(&grad * (1.0 - c.beta2)), &grad);
            let bias_correction1 = 1.0 - c.beta1.powf(step);
            let bias_correction2_sqrt = (1.0 - c.beta2.powf(step)).sqrt();
            let step_size = lr / bias_correction1;
            let denom = (s.exp_avg_sq.sqrt() / bias_correction2_sqrt) + c.eps;
            let _ = s.param.addcdiv_(&(&s.exp_avg * -step_size), &denom);
        }
        Ok(())
    }

    fn step_fused(&mut self, lr: f64) -> Result<(), String> {
        let c = self.cfg;
        for decay in [true, false] {
            let group: Vec<&Slot> = self.slots.iter().filter(|s| s.decay == decay && s.grad().defined()).collect();
            if group.is_empty() {
                continue; // e.g. a ZeRO-1 shard holding no bias or LayerNorm piece
            }
            // As torch.optim.AdamW(fused=True) does: the kernel reads the step, the caller bumps
            // it (one foreach launch for the group).
            let list = |f: fn(&Slot) -> Tensor| group.iter().map(|s| f(s)).collect::<Vec<_>>();
            foreach_add_(&list(|s| s.step.shallow_clone()), 1.0)?;
            let args = AdamWArgs { lr, beta1: c.beta1, beta2: c.beta2, weight_decay: if decay { c.weight_decay } else { 0.0 }, eps: c.eps };
            fused_adamw(
                &list(|s| s.param.shallow_clone()),
                &list(|s| s.grad()),
                &list(|s| s.exp_avg.shallow_clone()),
                &list(|s| s.exp_avg_sq.shallow_clone()),
                &list(|s| s.step.shallow_clone()),
                args,
            )?;
        }
        Ok(())
    }

    /// State as named tensors: `<name>.exp_avg`, `<name>.exp_avg_sq`, `<name>.step`, where a
    /// ZeRO-1 piece's name is `<param>[a..b]` (a pipeline checkpoint stores pieces so, and
    /// loading joins them; a single writer gathers them whole with `Ddp::gather_pieces`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.state_where(|_| true)
    }

    /// As [`AdamW::state`], for the slots whose name `which` accepts.
    pub fn state_where(&self, which: impl Fn(&str) -> bool) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .filter(|s| which(&s.name))
            .flat_map(|s| {
                [
                    (format!("{}.exp_avg", s.name), s.exp_avg.shallow_clone()),
                    (format!("{}.exp_avg_sq", s.name), s.exp_avg_sq.shallow_clone()),
                    (format!("{}.step", s.name), s.step.shallow_clone()),
                ]
            })
            .collect()
    }

    /// Restores state from whole tensors (`<param>.exp_avg`, ...: what `state()` gives for whole
    /// parameters, and what loading a checkpoint gives for any layout); a ZeRO-1 piece takes its
    /// elements of its parameter's tensors. Every tensor must be present with the parameter's
    /// shape.
    pub fn load_state(&mut self, tensors: &[(String, Tensor)], steps_taken: u64) -> Result<(), String> {
        let map: std::collections::HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        // A whole tensor, or a piece's elements of one.
        let get = |key: String, like: &Tensor, piece: Option<&Piece>| -> Result<Tensor, String> {
            let t = map.get(key.as_str()).ok_or_else(|| format!("optimizer state has no tensor '{key}'"))?;
            let expected = piece.map_or_else(|| like.size(), |p| p.shape.clone());
            if t.size() != expected {
                return Err(format!("optimizer tensor '{key}' has shape {:?}, expected {expected:?}", t.size()));
            }
            let t = match piece {
                Some(p) => t
                    .f_reshape([-1])
                    .and_then(|f| f.f_narrow(0, p.offset as i64, p.len as i64))
                    .map_err(|e| format!("optimizer tensor '{key}': {}", e.to_string().lines().next().unwrap_or("")))?,
                None => t.shallow_clone(),
            };
            Ok(t.to_device(like.device()))
        };
        let mut loaded = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let (base, piece) = match &s.piece {
                Some(p) => (p.param.as_str(), Some(p)),
                None => (s.name.as_str(), None),
            };
            loaded.push((
                get(format!("{base}.exp_avg"), &s.exp_avg, piece)?,
                get(format!("{base}.exp_avg_sq"), &s.exp_avg_sq, piece)?,
                get(format!("{base}.step"), &s.step, None)?,
            ));
        }
        tch::no_grad(|| {
            for (s, (m, v, st)) in self.slots.iter_mut().zip(loaded) {
                s.exp_avg.copy_(&m);
                s.exp_avg_sq.copy_(&v);
                s.step.copy_(&st);
            }
        });
        self.steps_taken = steps_taken;
        Ok(())
    }
}

/// Global L2 norm of all gradients, then scales them so it is at most `max_norm` (0 = no clip).
/// Mirrors `torch.nn.utils.clip_grad_norm_`: norm of the per-tensor norms, coefficient
/// `max_norm / (norm + 1e-6)` clamped to 1, applied to every gradient. Returns the norm before
/// clipping as a device scalar (reading it synchronises, so the loop reads it only when logging).
pub fn clip_grad_norm(params: &[(String, Tensor)], max_norm: f64) -> Tensor {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad()).filter(|g| g.defined()).collect();
        if grads.is_empty() {
            let device = params.first().map_or(tch::Device::Cpu, |(_, p)| p.device());
            return Tensor::zeros([], (Kind::Float, device));
        }
        // The foreach kernels PyTorch's clip uses on CUDA: one launch for all the norms and one
        // for the scaling, not one per tensor (libtorch's CPU path is the per-tensor loop).
        let norms = foreach_norm(&grads).unwrap_or_else(|_| grads.iter().map(|g| g.norm()).collect());
        let total = Tensor::stack(&norms, 0).norm();
        if max_norm > 0.0 {
            let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
            if foreach_mul_(&grads, &coef).is_err() {
                for mut g in grads {
                    let _ = g.g_mul_(&coef);
                }
            }
        }
        total
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libtorch's RNG is process-wide and tests run on parallel threads: a test that seeds and
    /// then draws holds this for its whole body, or another test's seed lands between the two.
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn rng() -> std::sync::MutexGuard<'static, ()> {
        RNG.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn params(seed: i64) -> Vec<(String, Tensor)> {
        tch::manual_seed(seed);
        vec![
            ("w".to_string(), Tensor::randn([8, 5], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true)),
            ("b".to_string(), Tensor::randn([5], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true)),
        ]
    }

    fn run(fused: bool) -> Vec<Tensor> {
        let ps = params(7);
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, fused };
        let mut opt = AdamW::new(&ps, cfg);
        let x = Tensor::randn([3, 8], (Kind::Float, tch::Device::Cpu));
        for i in 0..5 {
            for (_, p) in &ps {
                p.shallow_clone().zero_grad();
            }
            let loss = (x.matmul(&ps[0].1) + &ps[1].1).pow_tensor_scalar(2).sum(Kind::Float);
            loss.backward();
            opt.step(1e-2 * (i + 1) as f64).unwrap();
        }
        ps.iter().map(|(_, p)| p.detach().copy()).collect()
    }

    #[test]
    fn fused_kernel_matches_reference_path() {
        let _g = rng();
        // ATen has a CPU implementation of _fused_adamw_, so both paths run here.
        let (a, b) = (run(false), run(true));
        for (x, y) in a.iter().zip(&b) {
            let diff = (x - y).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "fused and reference AdamW differ by {diff}");
        }
        // Parameters actually moved.
        let init = params(7);
        assert!((&a[0] - &init[0].1).abs().max().double_value(&[]) > 1e-3);
    }

    #[test]
    fn clip_scales_to_max_norm_and_reports_the_original() {
        let _g = rng();
        let ps = params(3);
        let loss = ps[0].1.sum(Kind::Float) * 10.0 + ps[1].1.sum(Kind::Float);
        loss.backward();
        // grads: 8×5 tens and 5 ones → norm sqrt(40·100 + 5)
        let expected = (40.0f64 * 100.0 + 5.0).sqrt();
        let n = clip_grad_norm(&ps, 1.0).double_value(&[]);
        assert!((n - expected).abs() < 1e-3, "{n} vs {expected}");
        let after = clip_grad_norm(&ps, 0.0).double_value(&[]);
        assert!((after - 1.0).abs() < 1e-4, "clipped norm {after}");
    }

    #[test]
    fn state_round_trips() {
        let _g = rng();
        let ps = params(1);
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, fused: false };
        let mut opt = AdamW::new(&ps, cfg);
        ps[0].1.sum(Kind::Float).backward();
        opt.step(0.1).unwrap();
        let saved: Vec<(String, Tensor)> = opt.state().into_iter().map(|(n, t)| (n, t.copy())).collect();
        let mut fresh = AdamW::new(&ps, cfg);
        fresh.load_state(&saved, 1).unwrap();
        for ((n1, a), (n2, b)) in opt.state().iter().zip(fresh.state().iter()) {
            assert_eq!(n1, n2);
            assert!(a.equal(b), "{n1}");
        }
        let bad = vec![("w.exp_avg".to_string(), Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)))];
        assert!(fresh.load_state(&bad, 1).unwrap_err().contains("w.exp_avg"));
    }
}
