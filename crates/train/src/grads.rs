//! The gradients of the parts a rank holds, across every group they are reduced over: one
//! data-parallel reducer per model chunk (interleaved pipelines hold several, each finishing its
//! last micro-batch at a different time), the tied embedding's two pipeline copies (summed over
//! the embedding group), and gradient clipping over the whole model (squared norms summed over
//! the chunks, the pipeline stages and, under ZeRO-1, the data-parallel shards).

use std::sync::Arc;
use std::time::Duration;

use fabbrica_comm::{Communicator, ReduceOp};
use fabbrica_ddp::{clip_coef, Ddp, DdpOptions, OptParam};
use fabbrica_models::Model;
use fabbrica_torch_ext::hooks::set_grad;
use tch::{Kind, Tensor};

use crate::error::TrainError;
use crate::grid::Grid;

fn comm_err(e: fabbrica_comm::CommError) -> TrainError {
    TrainError::Collective(e)
}

fn ddp_err(e: fabbrica_ddp::DdpError) -> TrainError {
    TrainError::Ddp(e)
}

/// The data-parallel options `cfg.parallel` sets: the one place the trainer and the benchmarks
/// take them from. `check_params`: compare the replicas' weights after the first broadcast
/// (`comm.debug`).
pub fn ddp_options(cfg: &crate::config::Config, check_params: bool) -> DdpOptions {
    let p = &cfg.parallel;
    DdpOptions {
        bucket_mb: p.bucket_mb,
        first_bucket_mb: p.bucket_mb.min(1.0),
        reduce_bf16: p.reduce_dtype == crate::config::ReduceDtype::Bf16,
        overlap: p.overlap,
        zero1: p.zero == 1,
        grad_comm: p.grad_comm,
        check_params,
    }
}

/// A pipeline end's copy of the tied embedding, reduced outside the data-parallel buckets: one
/// all-reduce over the embedding group (both ends of every replica) sums the two copies'
/// gradients and the replicas' at once; dividing by dp makes it the replicas' mean.
struct Tied {
    param: Tensor,
    grad: Tensor,
    comm: Arc<dyn Communicator>,
    dp: usize,
    /// Counted in the gradient norm (the first stage's copy; the last stage's is the same).
    in_norm: bool,
}

pub struct Grads {
    /// One reducer per model part, in the order of the rank's parts.
    pub ddps: Vec<Ddp>,
    tied: Option<Tied>,
    /// The token embedding's name (`ModelConfig::embedding_name`).
    tied_name: &'static str,
    /// Sums the squared norms over the pipeline (pp > 1).
    pp: Option<Arc<dyn Communicator>>,
    /// Tensor parallelism: the group the squared norms are summed over, this rank's place in
    /// it, and the parameters split over it (the others, whole on every rank, count on rank 0).
    tp: Option<(Arc<dyn Communicator>, usize, std::collections::HashSet<String>)>,
    /// Sequence parallelism: the gradients of the parameters held whole (norms, row-parallel
    /// biases, positions) are partial sums over this rank's sequence shard, summed over `tp`.
    sequence_parallel: bool,
}

impl Grads {
    /// Applies data parallelism over `grid.dp` to each part; with pp > 1 the tied embedding is
    /// kept out of the buckets and reduced over the embedding group instead.
    pub fn apply(parts: &[&Model], grid: &Grid, opts: DdpOptions) -> Result<Grads, TrainError> {
        let pipelined = grid.dims.pp > 1;
        let mut tied = None;
        let mut ddps = Vec::with_capacity(parts.len());
        for model in parts {
            let mut params = model.parameter_handles();
            if pipelined && model.config().tie_embeddings() {
                if let Some(i) = params.iter().position(|(n, _)| n == model.config().embedding_name()) {
                    let (_, p) = params.remove(i);
                    let comm = grid
                        .embedding
                        .clone()
                        .ok_or_else(|| TrainError::Parallel(format!("rank {} holds the tied embedding but is in no embedding group", grid.rank)))?;
                    let grad = p.zeros_like().detach();
                    set_grad(&p, Some(&grad)).map_err(|e| TrainError::Torch(e.to_string()))?;
                    // Same weights on every replica: the first data-parallel rank's.
                    grid.dp.broadcast(&p.detach(), 0).map_err(comm_err)?;
                    tied = Some(Tied { param: p, grad, comm, dp: grid.dims.dp, in_norm: model.stage().embed });
                }
            }
            ddps.push(Ddp::apply(&params, grid.dp.clone(), opts).map_err(ddp_err)?);
        }
        let tied_name = parts.first().map_or("", |m| m.config().embedding_name());
        let tp = (grid.dims.tp > 1).then(|| {
            let split = parts.iter().flat_map(|m| m.parameters().iter().filter(|(n, _)| m.shard_of(n).is_some()).map(|(n, _)| n.clone())).collect();
            (grid.tp.clone(), grid.coords.tp, split)
        });
        let sequence_parallel = parts.iter().any(|m| m.tensor_parallel().is_some_and(|p| p.sequence_parallel));
        Ok(Grads { ddps, tied, tied_name, pp: pipelined.then(|| grid.pp.clone()), tp, sequence_parallel })
    }

    /// After the last backward: every reducer's remaining communication, then the tied copies'.
    /// Returns the time spent waiting.
    pub fn finish(&self) -> Result<Duration, TrainError> {
        let mut waited = Duration::ZERO;
        for d in &self.ddps {
            waited += d.finish().map_err(ddp_err)?;
        }
        if let (true, Some((tp, _, split))) = (self.sequence_parallel, &self.tp) {
            // One all-reduce of the whole-parameter gradients, flattened (Megatron's
            // `allreduce_sequence_parallel_grads`). The ranks of a tensor-parallel group hold the
            // same parameters in the same buckets, so under ZeRO-1 the same pieces.
            let start = std::time::Instant::now();
            let mut grads = Vec::new();
            for d in &self.ddps {
                grads.extend(d.grads_where(&|n| !split.contains(n)).map_err(ddp_err)?);
            }
            if !grads.is_empty() {
                tch::no_grad(|| -> Result<(), TrainError> {
                    let flat = Tensor::cat(&grads.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(), 0);
                    tp.all_reduce(&flat, ReduceOp::Sum).map_err(comm_err)?;
                    let mut at = 0;
                    for g in &grads {
                        let n = g.numel() as i64;
                        g.shallow_clone().copy_(&flat.narrow(0, at, n).view_as(g));
                        at += n;
                    }
                    Ok(())
                })?;
            }
            waited += start.elapsed();
        }
        if let Some(t) = &self.tied {
            let start = std::time::Instant::now();
            t.comm.all_reduce(&t.grad, ReduceOp::Sum).map_err(comm_err)?;
            if t.dp > 1 {
                tch::no_grad(|| {
                    let _ = t.grad.shallow_clone().g_div_scalar_(t.dp as f64);
                });
            }
            waited += start.elapsed();
        }
        Ok(waited)
    }

    /// The global gradient norm over the whole model, then clipping to `max_norm` (0 = none), as
    /// `torch.nn.utils.clip_grad_norm_` on the one-process model would.
    pub fn clip(&self, max_norm: f64) -> Result<Tensor, TrainError> {
        let mut sq: Vec<Tensor> = Vec::with_capacity(self.ddps.len() + 1);
        for d in &self.ddps {
            sq.push(
                match &self.tp {
                    None => d.grad_sq_sum(),
                    Some((_, rank, split)) => d.grad_sq_sum_where(&|n| *rank == 0 || split.contains(n)),
                }
                .map_err(ddp_err)?,
            );
        }
        if let Some(t) = self.tied.as_ref().filter(|t| t.in_norm) {
            // Split by vocabulary under tensor parallelism: every rank's slice counts.
            sq.push(tch::no_grad(|| t.grad.to_kind(Kind::Float).square().sum(Kind::Float)));
        }
        // Summed over every group the model is split across (the ZeRO-1 shards are summed by
        // the reducers over the data-parallel group).
        let total_sq = Tensor::stack(&sq, 0).sum(Kind::Float).reshape([1]);
        for group in self.split_groups() {
            group.all_reduce(&total_sq, ReduceOp::Sum).map_err(comm_err)?;
        }
        let total = total_sq.reshape([]).sqrt();
        if max_norm > 0.0 {
            let coef = clip_coef(&total, max_norm);
            for d in &self.ddps {
                d.scale_grads(&coef);
            }
            if let Some(t) = &self.tied {
                tch::no_grad(|| {
                    let _ = t.grad.shallow_clone().g_mul_(&coef);
                });
            }
        }
        Ok(total)
    }

    /// The groups the model's parameters are split across, whose squared gradient norms add up
    /// to the whole model's: tensor-parallel slices, then pipeline stages.
    fn split_groups(&self) -> impl Iterator<Item = &Arc<dyn Communicator>> {
        self.tp.as_ref().map(|(tp, _, _)| tp).into_iter().chain(&self.pp)
    }

    pub fn zero_grad(&self) {
        for d in &self.ddps {
            d.zero_grad();
        }
        if let Some(t) = &self.tied {
            tch::no_grad(|| {
                let _ = t.grad.shallow_clone().zero_();
            });
        }
    }

    /// After the optimizer step (ZeRO-1 gathers the updated shards).
    pub fn after_step(&self) -> Result<(), TrainError> {
        for d in &self.ddps {
            d.after_step().map_err(ddp_err)?;
        }
        Ok(())
    }

    /// What the optimizer updates: each reducer's parameters (or ZeRO-1 pieces), and the tied copy.
    pub fn optimizer_params(&self) -> Vec<OptParam> {
        let mut out: Vec<OptParam> = self.ddps.iter().flat_map(|d| d.optimizer_params()).collect();
        if let Some(t) = &self.tied {
            out.push(OptParam {
                name: self.tied_name.into(),
                param: t.param.shallow_clone(),
                grad: t.grad.shallow_clone(),
                decay: true,
                piece: None,
            });
        }
        out
    }

    /// ZeRO-1: the optimizer's state of every reducer's pieces, gathered whole over the
    /// data-parallel group (collective): `<param>.exp_avg`, `<param>.exp_avg_sq` and
    /// `<param>.step`, as an unsharded optimizer names them, so that the checkpoint loads at any
    /// dp size, with or without ZeRO-1.
    pub fn gather_optimizer_state(&self, opt: &crate::optim::AdamW) -> Result<Vec<(String, Tensor)>, TrainError> {
        let state: std::collections::HashMap<String, Tensor> = opt.state().into_iter().collect();
        let steps = opt.steps_taken();
        let mut out = Vec::new();
        for d in &self.ddps {
            let gather = |m: &str| d.gather_pieces(m, &|piece| state.get(&format!("{piece}.{m}")).map(Tensor::shallow_clone)).map_err(ddp_err);
            let (avg, sq) = (gather("exp_avg")?, gather("exp_avg_sq")?);
            for ((name, m), (_, v)) in avg.into_iter().zip(sq) {
                let device = m.device();
                out.push((format!("{name}.exp_avg"), m));
                out.push((format!("{name}.exp_avg_sq"), v));
                out.push((format!("{name}.step"), Tensor::from(steps as f32).to_device(device)));
            }
        }
        Ok(out)
    }

    /// Whether the tied embedding's copy here is kept out of the buckets (its optimizer state is
    /// then the optimizer's, whole, even under ZeRO-1).
    pub fn holds_tied(&self) -> bool {
        self.tied.is_some()
    }

    /// The buckets of every reducer.
    pub fn buckets(&self) -> usize {
        self.ddps.iter().map(|d| d.assignment().buckets.len()).sum()
    }
}
