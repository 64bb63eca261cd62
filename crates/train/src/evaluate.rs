//! Evaluation: the mean loss over fixed batches of a split, on one rank, spread over the
//! data-parallel ranks, or through a pipeline's stages; the same value on every layout up to
//! the order of a floating-point sum.

use fabbrica_comm::{Communicator, ReduceOp};
use fabbrica_data::{Sampler, Split};
use fabbrica_torch_ext::amp::autocast;
use tch::Tensor;

use crate::error::TrainError;
use crate::grid::Grid;
use crate::setup::Setup;
use crate::trainer::to_tensor;

/// Evaluation batches use this step index, so every evaluation sees the same windows.
pub(crate) const EVAL_STEP: u64 = u64::MAX;

fn comm_err(e: fabbrica_comm::CommError) -> TrainError {
    TrainError::Collective(e)
}

/// Mean loss over `iters` fixed batches of `split`.
pub fn evaluate(s: &Setup, sampler: &Sampler, split: Split, iters: u64) -> f64 {
    eval_sum(s, sampler, split, iters, 0, 1) / iters as f64
}

/// Sum of the losses of the batches `k < iters` with `k % ranks == rank`.
fn eval_sum(s: &Setup, sampler: &Sampler, split: Split, iters: u64, rank: usize, ranks: usize) -> f64 {
    let (b, t) = (s.cfg.train.batch_size, s.cfg.model.block_size());
    let src = s.data.source(split);
    tch::no_grad(|| {
        let mut sum = 0.0;
        for k in (rank as u64..iters).step_by(ranks) {
            let (x, y) = sampler.batch(src, split, EVAL_STEP, k * b as u64, b, t);
            let (x, y) = (to_tensor(x, b, t, s.device), to_tensor(y, b, t, s.device));
            let loss = autocast(s.device, s.bf16, || s.model().loss(&s.model().forward(&x, false), &y));
            sum += loss.double_value(&[]);
        }
        sum
    })
}

/// Evaluation with the batches spread over the data-parallel ranks: the same value as
/// [`evaluate`] on one rank (up to the order of a floating-point sum).
fn evaluate_dp(s: &Setup, sampler: &Sampler, split: Split, iters: u64, comm: &dyn Communicator) -> Result<f64, TrainError> {
    let local = eval_sum(s, sampler, split, iters, comm.rank(), comm.size());
    // f32 on the wire (communicators move f32, bf16, f16 and i64): about 7 significant digits.
    let t = Tensor::from_slice(&[local as f32]);
    comm.all_reduce(&t, ReduceOp::Sum).map_err(comm_err)?;
    Ok(t.double_value(&[0]) / iters as f64)
}

/// Mean evaluation loss over `iters` fixed batches of `split`, spread over the data-parallel
/// ranks (and, with a pipeline, through its stages): the value [`evaluate`] gives on one rank,
/// up to the order of a floating-point sum. Known on every rank.
pub(crate) fn evaluate_grid(s: &Setup, sampler: &Sampler, grid: &Grid, split: Split, iters: u64) -> Result<f64, TrainError> {
    if s.pipeline.is_none() {
        return evaluate_dp(s, sampler, split, iters, &*grid.dp);
    }
    let local = crate::pipelined::eval_sum(s, sampler, &*grid.pp, split, iters, EVAL_STEP, grid.coords.dp, grid.dims.dp)?;
    // The tensor-parallel ranks of a last stage hold the same loss: one of them counts it.
    let local = if grid.coords.tp == 0 { local } else { 0.0 };
    // Only the last stages hold losses; every rank learns their sum.
    let t = Tensor::from_slice(&[local as f32]);
    grid.world.all_reduce(&t, ReduceOp::Sum).map_err(comm_err)?;
    Ok(t.double_value(&[0]) / iters as f64)
}
