//! How one optimizer step's forward and backward run: a strategy the trainer holds (torchtitan's
//! `forward_backward_step`), chosen once from the layout. [`Local`] runs the whole model on this
//! rank, micro-batch after micro-batch, accumulating gradients; [`Pipelined`] runs this rank's
//! stages through the pipeline schedule. Both leave the gradients of the mean loss over the
//! replica's micro-batches in the parts' `.grad` (the reducers told which backward is the last)
//! and return that loss.
//!
//! The local body, [`forward_backward_local`], is also what every benchmark times
//! (`bench train`, `bench ddp`, the criterion bench), on a fixed synthetic batch instead of the
//! sampler's.

use fabbrica_data::{Sampler, Split};
use fabbrica_ddp::Ddp;
use fabbrica_models::Model;
use fabbrica_torch_ext::amp::{autocast, hold_casts};
use tch::{Kind, Tensor};

use crate::error::TrainError;
use crate::grads::Grads;
use crate::pipelined::StageTimes;
use crate::setup::Setup;
use crate::trainer::{mix, to_tensor};
use fabbrica_pipeline::Trace;

/// A step's forward and backward, as the trainer runs it.
pub trait ForwardBackward {
    /// Runs step `step` (0-based) on this replica's micro-batches and returns the mean loss (a
    /// device scalar). `inject_nan` poisons the first micro-batch's loss (fault injection).
    fn run(&mut self, step: u64, inject_nan: bool) -> Result<Tensor, TrainError>;

    /// What the pipeline measured and traced in the last `run` (nothing for a local step).
    fn pipeline_report(&mut self) -> Option<(StageTimes, Trace)> {
        None
    }
}

/// The one local forward-backward body: `grad_accum` micro-batches through `model`, the mean
/// loss's gradients accumulated in `.grad`, `ddp` told which backward is the last (the only one
/// that communicates). Micro-batch `m` is `batch(m)`, with libtorch's RNG (dropout) seeded by
/// `seed(m)` first. A failure in backward (an allocation, a gradient hook) is an error, never a
/// panic. Returns the mean loss as a device scalar.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward_local(
    model: &Model,
    bf16: bool,
    grad_accum: usize,
    ddp: Option<&Ddp>,
    step: u64,
    inject_nan: bool,
    seed: &dyn Fn(usize) -> i64,
    batch: &mut dyn FnMut(usize) -> (Tensor, Tensor),
) -> Result<Tensor, TrainError> {
    // One bf16 copy of each weight for all the step's micro-batches.
    hold_casts(bf16, || {
        let mut loss_sum = Tensor::zeros([], (Kind::Float, model.device()));
        for m in 0..grad_accum {
            tch::manual_seed(seed(m));
            let (x, y) = batch(m);
            let mut loss = autocast(model.device(), bf16, || model.loss(&model.forward(&x, true), &y));
            if inject_nan && m == 0 {
                loss *= f64::NAN;
            }
            if let Some(d) = ddp {
                d.begin_micro_step(m + 1 == grad_accum);
            }
            (&loss / grad_accum as f64).f_backward().map_err(|e| crate::memory::torch_error(step + 1, e))?;
            loss_sum += loss.detach();
        }
        Ok(loss_sum / grad_accum as f64)
    })
}

/// The whole model on this rank: the trainer's micro-batches `first_micro + m` from the sampler
/// (sample indices from `(first_micro + m)·batch_size`, dropout seeded from (seed, step, global
/// micro-batch)), so N data-parallel replicas with accumulation `a` compute exactly what one
/// with accumulation `N·a` does.
pub struct Local<'a> {
    pub setup: &'a Setup,
    pub sampler: &'a Sampler,
    pub grads: &'a Grads,
    pub first_micro: usize,
}

impl ForwardBackward for Local<'_> {
    fn run(&mut self, step: u64, inject_nan: bool) -> Result<Tensor, TrainError> {
        let s = self.setup;
        let (b, t) = (s.cfg.train.batch_size, s.cfg.model.block_size());
        let first = self.first_micro as u64;
        let seed = |m: usize| mix(mix(s.cfg.run.seed, step) as u64, first + m as u64);
        let mut batch = |m: usize| {
            let micro = first + m as u64;
            let (x, y) = self.sampler.batch(&s.data.train, Split::Train, step, micro * b as u64, b, t);
            (to_tensor(x, b, t, s.device), to_tensor(y, b, t, s.device))
        };
        forward_backward_local(s.model(), s.bf16, s.cfg.train.grad_accum, self.grads.ddps.first(), step, inject_nan, &seed, &mut batch)
    }
}

/// This rank's pipeline stages, through the schedule (`crate::pipelined`), with what each step
/// measured and traced kept for the trainer's reports.
pub struct Pipelined<'a> {
    pub setup: &'a Setup,
    pub sampler: &'a Sampler,
    pub grads: &'a Grads,
    pub pp: &'a dyn fabbrica_comm::Communicator,
    pub first_micro: usize,
    pub last: Option<(StageTimes, Trace)>,
}

impl ForwardBackward for Pipelined<'_> {
    fn run(&mut self, step: u64, inject_nan: bool) -> Result<Tensor, TrainError> {
        // One bf16 copy of each weight however many micro-batches are in flight.
        let (loss, times, trace) = hold_casts(self.setup.bf16, || {
            crate::pipelined::forward_backward(self.setup, self.sampler, self.grads, self.pp, step, self.first_micro, inject_nan)
        })?;
        self.last = Some((times, trace));
        Ok(loss)
    }

    fn pipeline_report(&mut self) -> Option<(StageTimes, Trace)> {
        self.last.take()
    }
}
