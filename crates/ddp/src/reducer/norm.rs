//! The gradients a reducer holds, as the global norm and clipping see them: their squared sum
//! (over the ZeRO-1 shards too), the subset whose names a filter accepts (tensor parallelism),
//! and scaling them by the clip coefficient.

use tch::{Kind, Tensor};

use super::{torch_err, Ddp, State};
use crate::error::{DdpError, Result};
use fabbrica_comm::ReduceOp;
use fabbrica_torch_ext::{foreach_mul_, foreach_norm};

impl Ddp {
    /// Global gradient L2 norm, then clipping to `max_norm` (0 = no clip), as
    /// `torch.nn.utils.clip_grad_norm_`. Under ZeRO-1 each rank holds only its shard of the
    /// reduced gradients, so the squares are summed across ranks.
    pub fn clip_grad_norm(&self, max_norm: f64) -> Result<Tensor> {
        let total = self.grad_sq_sum()?.sqrt();
        if max_norm > 0.0 {
            self.f_scale_grads(&clip_coef(&total, max_norm))?;
        }
        Ok(total)
    }

    /// The sum of the squares of this replica's reduced gradients (a device scalar, fp32): the
    /// whole parameter list's, summed across the data-parallel ranks' shards under ZeRO-1 (a
    /// collective then). Gradient clipping over several groups (pipeline stages, model chunks)
    /// adds these up before taking the root.
    pub fn grad_sq_sum(&self) -> Result<Tensor> {
        let st = self.shared.state();
        let sum_across = self.shared.sharded() && st.grad_comm;
        let grads = self.grads(&st)?;
        drop(st);
        self.sq_sum(&grads, sum_across)
    }

    /// The reduced gradients this rank holds of the parameters whose names `keep` accepts: whole
    /// `.grad`s, or under ZeRO-1 the pieces of them inside this rank's shards (views: changing
    /// them changes the gradients). Tensor parallelism with sequence parallelism sums those of
    /// the parameters every tensor-parallel rank holds whole over its group.
    pub fn grads_where(&self, keep: &dyn Fn(&str) -> bool) -> Result<Vec<Tensor>> {
        let st = self.shared.state();
        let mut grads: Vec<Tensor> = Vec::new();
        if self.shared.sharded() {
            let r = self.shared.comm.rank();
            for (b, buf) in self.assignment.buckets.iter().zip(&st.bufs) {
                let (lo, hi) = (r * buf.shard, (r + 1) * buf.shard);
                for e in &b.entries {
                    let (a, z) = (e.offset.max(lo), (e.offset + e.numel).min(hi));
                    if a < z && keep(&self.params[e.param].0) {
                        grads.push(buf.grad.narrow(0, a as i64, (z - a) as i64));
                    }
                }
            }
        } else {
            for (name, p) in self.params.iter().filter(|(n, _)| keep(n)) {
                let g = p.grad();
                if !g.defined() {
                    return Err(DdpError::NoGradient { param: name.clone() });
                }
                grads.push(g);
            }
        }
        Ok(grads)
    }

    /// As [`Ddp::grad_sq_sum`], over the parameters whose names `keep` accepts (under ZeRO-1,
    /// the pieces of them in this rank's shards). Tensor parallelism counts a parameter every
    /// tensor-parallel rank holds whole on one rank only, and the slices of split ones on all.
    pub fn grad_sq_sum_where(&self, keep: &dyn Fn(&str) -> bool) -> Result<Tensor> {
        let grads = self.grads_where(keep)?;
        let sum_across = self.shared.sharded() && self.shared.state().grad_comm;
        self.sq_sum(&grads, sum_across)
    }

    /// Σ g² over `grads` (fp32), summed across the data-parallel ranks when `sum_across` (the
    /// ZeRO-1 shards).
    fn sq_sum(&self, grads: &[Tensor], sum_across: bool) -> Result<Tensor> {
        tch::no_grad(|| {
            let what = "summing the squared gradients";
            let mut total_sq = if grads.is_empty() {
                // On the parameters' device, where the other groups' sums are stacked with it.
                let device = self.params.first().map_or(tch::Device::Cpu, |(_, p)| p.device());
                Tensor::zeros([], (Kind::Float, device))
            } else {
                // Each gradient's norm in one foreach launch (on CUDA; one per tensor otherwise).
                let fp32 = grads.iter().map(|g| g.f_to_kind(Kind::Float)).collect::<std::result::Result<Vec<_>, _>>().map_err(torch_err(what))?;
                let norms = foreach_norm(&fp32).map_err(|e| DdpError::Torch(format!("{what}: {e}")))?;
                Tensor::f_stack(&norms, 0).and_then(|n| n.f_square()?.f_sum(Kind::Float)).map_err(torch_err(what))?
            };
            if sum_across {
                total_sq = total_sq.reshape([1]);
                self.shared.comm.all_reduce(&total_sq, ReduceOp::Sum).map_err(|source| DdpError::Collective {
                    what: "summing the squared gradients of the ZeRO-1 shards across the data-parallel ranks".into(),
                    source,
                })?;
                total_sq = total_sq.reshape([]);
            }
            Ok(total_sq)
        })
    }

    /// Multiplies the reduced gradients this rank holds (its shards under ZeRO-1) by `coef`.
    ///
    /// # Panics
    ///
    /// Where [`Ddp::f_scale_grads`] returns an error.
    pub fn scale_grads(&self, coef: &Tensor) {
        if let Err(e) = self.f_scale_grads(coef) {
            panic!("Ddp::scale_grads: {e}");
        }
    }

    /// Multiplies the reduced gradients this rank holds (its shards under ZeRO-1) by `coef`, a
    /// scalar on the gradients' device (as [`clip_coef`] returns it); an error where libtorch
    /// refuses it (another CUDA device, not a 0-dim tensor) or a parameter has no
    /// gradient.
    pub fn f_scale_grads(&self, coef: &Tensor) -> Result<()> {
        let st = self.shared.state();
        let grads = self.grads(&st)?;
        tch::no_grad(|| foreach_mul_(&grads, coef)).map_err(|e| DdpError::Torch(format!("scaling the gradients: {e}")))
    }

    /// The reduced gradients this rank holds: every parameter's, or under ZeRO-1 its shards.
    fn grads(&self, st: &State) -> Result<Vec<Tensor>> {
        if self.shared.sharded() {
            let r = self.shared.comm.rank() as i64;
            // In range: each bucket is padded to size × shard elements.
            Ok(st.bufs.iter().map(|b| b.grad.narrow(0, r * b.shard as i64, b.shard as i64)).collect())
        } else {
            self.params
                .iter()
                .map(|(name, p)| {
                    let g = p.grad();
                    if g.defined() {
                        Ok(g)
                    } else {
                        Err(DdpError::NoGradient { param: name.clone() })
                    }
                })
                .collect()
        }
    }
}

/// `torch.nn.utils.clip_grad_norm_`'s coefficient: `max_norm / (norm + 1e-6)`, at most 1.
pub fn clip_coef(total_norm: &Tensor, max_norm: f64) -> Tensor {
    (max_norm / (total_norm + 1e-6)).clamp_max(1.0)
}
