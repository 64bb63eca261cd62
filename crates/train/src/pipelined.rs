//! Pipeline-parallel forward and backward: a rank's model parts run one lowered schedule
//! (`crates/pipeline`: GPipe, 1F1B or interleaved) through the executor, with activations and
//! their gradients moving over the pipeline group's point-to-point calls. The schedule stays
//! pure data; this is the [`Runner`] that gives its actions tensors.
//!
//! Micro-batch `k` of a step is the data-parallel replica's `first_micro + k`-th, exactly the
//! micro-batch a one-process run with gradient accumulation computes, so losses and gradients do
//! not depend on the layout. The first stage reads its tokens, the last stage its targets, both
//! from the same counter-based sampler: no data moves between stages.

use fabbrica_torch_ext::amp::autocast;
use std::collections::HashMap;
use std::time::Duration;

use fabbrica_comm::{Communicator, ReduceOp, Work};
use fabbrica_data::{Sampler, Split};
use fabbrica_models::Model;
use fabbrica_pipeline::{execute, Action, Op, Runner, Schedule, Trace};
use tch::{Device, Kind, Tensor};

use crate::error::TrainError;
use crate::grads::Grads;
use crate::trainer::{mix, to_tensor, Setup};

/// What one rank measured running its part of a step's schedule.
#[derive(Debug, Clone, Default)]
pub struct StageTimes {
    /// Forward and backward compute.
    pub compute: Duration,
    /// Not computing: waiting in receives, for sends, and for the rest of the pipeline.
    pub wait: Duration,
    /// The step's pipeline makespan as this rank saw it (see [`StageTimes::from_trace`]).
    pub total: Duration,
}

impl StageTimes {
    /// The part of the step this rank was not computing: the pipeline bubble plus communication.
    pub fn idle_fraction(&self) -> f64 {
        let t = self.total.as_secs_f64();
        if t > 0.0 {
            (1.0 - self.compute.as_secs_f64() / t).max(0.0)
        } else {
            0.0
        }
    }

    pub fn add(&mut self, o: &StageTimes) {
        self.compute += o.compute;
        self.wait += o.wait;
        self.total += o.total;
    }

    /// From one step's executed actions and its wall time: from before the first action until the
    /// whole pipeline is done (the loss's all-reduce over the pipeline after the schedule waits for
    /// the slowest stage), so the idle fraction is measured against the pipeline's makespan, as the
    /// theory's (p-1)/(m+p-1) is, and includes the tail a stage spends waiting for the others.
    pub fn from_trace(t: &Trace, wall: Duration) -> StageTimes {
        let us = |e: &fabbrica_pipeline::Entry| Duration::from_micros(e.end - e.start);
        let compute: Duration = t.entries.iter().filter(|e| matches!(e.action.op, Op::F | Op::B)).map(us).sum();
        let total = wall.max(compute);
        StageTimes { compute, wait: total - compute, total }
    }
}

/// One step's schedule on this rank.
struct StageRunner<'a> {
    s: &'a Setup,
    sampler: &'a Sampler,
    grads: &'a Grads,
    comm: &'a dyn Communicator,
    schedule: &'a Schedule,
    step: u64,
    first_micro: usize,
    /// Local part index of each stage this rank holds.
    part_of: HashMap<usize, usize>,
    inputs: HashMap<(usize, usize), Tensor>,
    outputs: HashMap<(usize, usize), Tensor>,
    received: HashMap<(Op, usize, usize), Tensor>,
    sends: Vec<(Work, Tensor)>,
    loss_sum: Tensor,
    inject_nan: bool,
    /// (B, T, C) of every activation on the wire.
    shape: Vec<i64>,
    /// This rank's pipeline coordinate, and the position in its action list of the call running.
    rank: usize,
    next: usize,
    /// Receives posted ahead of their RECV action (in list order), and how far the list has
    /// been scanned for them.
    posted: std::collections::VecDeque<(Action, Work, Tensor)>,
    scanned: usize,
    /// Post receives ahead (MPI: the transfer then runs while this rank computes).
    prefetch: bool,
}

/// How many actions ahead receives are posted.
const LOOKAHEAD: usize = 4;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl StageRunner<'_> {
    /// Before the action at `self.next`: posts the receives among the next [`LOOKAHEAD`] actions
    /// that are not posted yet, in the order of the list (the order the peers send in, which is
    /// how point-to-point messages match). The RECV action then only waits for data that has
    /// been arriving meanwhile, instead of starting the transfer when the compute needs it.
    fn post_ahead(&mut self) -> Result<(), String> {
        if !self.prefetch {
            return Ok(());
        }
        let list = &self.schedule.ranks[self.rank];
        let end = (self.next + LOOKAHEAD + 1).min(list.len());
        while self.scanned.max(self.next) < end {
            let i = self.scanned.max(self.next);
            self.scanned = i + 1;
            let a = list[i];
            let peer = match a.op {
                Op::RecvF => self.schedule.rank_of_stage(a.stage.checked_sub(1).ok_or_else(|| format!("{a}: no previous stage"))?),
                Op::RecvB => self.schedule.rank_of_stage(a.stage + 1),
                _ => continue,
            };
            let t = Tensor::zeros(self.shape.as_slice(), (Kind::Float, self.s.device));
            let w = self.comm.recv_async(&t, peer).map_err(err)?;
            self.posted.push_back((a, w, t));
        }
        Ok(())
    }

    fn model(&self, stage: usize) -> &Model {
        &self.s.parts[self.part_of[&stage]].model
    }

    fn last_stage(&self, stage: usize) -> bool {
        stage + 1 == self.schedule.stages()
    }

    /// Tokens and targets of micro-batch `micro` of this step.
    fn batch(&self, micro: usize) -> (Tensor, Tensor) {
        let (b, t) = (self.s.cfg.train.batch_size, self.s.cfg.model.block_size());
        let global = (self.first_micro + micro) as u64;
        let (x, y) = self.sampler.batch(&self.s.data.train, Split::Train, self.step, global * b as u64, b, t);
        (to_tensor(x, b, t, self.s.device), to_tensor(y, b, t, self.s.device))
    }
}

impl Runner for StageRunner<'_> {
    type Error = String;

    fn forward(&mut self, stage: usize, micro: usize) -> Result<(), String> {
        self.post_ahead()?;
        self.next += 1;
        // Dropout draws from (seed, step, micro-batch, stage).
        let global = (self.first_micro + micro) as u64;
        tch::manual_seed(mix(mix(mix(self.s.cfg.run.seed, self.step) as u64, global) as u64, stage as u64));
        let input = if stage == 0 {
            self.batch(micro).0
        } else {
            self.received
                .remove(&(Op::RecvF, stage, micro))
                .ok_or_else(|| format!("{stage}F{micro}: no activation received"))?
                .set_requires_grad(true)
        };
        let bf16 = self.s.bf16;
        let model = self.model(stage);
        let out = autocast(self.s.device, bf16, || model.forward_stage(&input, true));
        let out = if self.last_stage(stage) {
            let mut loss = model.loss(&out, &self.batch(micro).1);
            if self.inject_nan && micro == 0 {
                loss *= f64::NAN;
            }
            self.loss_sum += loss.detach();
            loss / self.schedule.microbatches as f64
        } else {
            out
        };
        self.inputs.insert((stage, micro), input);
        self.outputs.insert((stage, micro), out);
        Ok(())
    }

    fn backward(&mut self, stage: usize, micro: usize) -> Result<(), String> {
        self.post_ahead()?;
        self.next += 1;
        let out = self.outputs.remove(&(stage, micro)).ok_or_else(|| format!("{stage}B{micro}: forward not run"))?;
        // Every schedule runs a stage's backwards in micro-batch order: the last one communicates.
        self.grads.ddps[self.part_of[&stage]].begin_micro_step(micro + 1 == self.schedule.microbatches);
        if self.last_stage(stage) {
            out.f_backward().map_err(|e| e.to_string().lines().next().unwrap_or("backward failed").to_string())?;
        } else {
            let grad = self.received.remove(&(Op::RecvB, stage, micro)).ok_or_else(|| format!("{stage}B{micro}: no gradient received"))?;
            fabbrica_torch_ext::backward_with_grad(&out, &grad.to_kind(out.kind()))?;
        }
        if stage == 0 {
            self.inputs.remove(&(stage, micro));
        }
        Ok(())
    }

    fn send(&mut self, a: Action, peer: usize) -> Result<(), String> {
        self.post_ahead()?;
        self.next += 1;
        let key = (a.stage, a.micro);
        let t = match a.op {
            Op::SendF => self.outputs.get(&key).ok_or_else(|| format!("{a}: nothing to send"))?.detach().to_kind(Kind::Float).contiguous(),
            _ => {
                let input = self.inputs.remove(&key).ok_or_else(|| format!("{a}: no input kept"))?;
                input.grad().to_kind(Kind::Float).contiguous()
            }
        };
        let w = self.comm.send_async(&t, peer).map_err(err)?;
        self.sends.push((w, t));
        Ok(())
    }

    fn recv(&mut self, a: Action, peer: usize) -> Result<(), String> {
        self.post_ahead()?;
        self.next += 1;
        let t = match self.posted.front() {
            Some((posted, _, _)) if *posted == a => {
                let (_, w, t) = self.posted.pop_front().expect("a posted receive");
                w.wait().map_err(err)?;
                t
            }
            _ => {
                let t = Tensor::zeros(self.shape.as_slice(), (Kind::Float, self.s.device));
                self.comm.recv(&t, peer).map_err(err)?;
                t
            }
        };
        self.received.insert((a.op, a.stage, a.micro), t);
        Ok(())
    }

    fn finish(&mut self) -> Result<(), String> {
        if let Some((a, _, _)) = self.posted.front() {
            return Err(format!("{a} was posted but never consumed"));
        }
        for (w, _) in self.sends.drain(..) {
            w.wait().map_err(err)?;
        }
        Ok(())
    }
}

/// Runs this rank's part of one optimizer step: forward and backward of the replica's
/// `microbatches` micro-batches from `first_micro` through the schedule, leaving the gradients
/// of the mean loss in `.grad` (the reducers told which backward is each part's last). Returns
/// the mean loss over the micro-batches, known on every stage (summed over the pipeline from the
/// last), what this rank measured, and the executor's trace.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    s: &Setup,
    sampler: &Sampler,
    grads: &Grads,
    pp: &dyn Communicator,
    step: u64,
    first_micro: usize,
    inject_nan: bool,
) -> Result<(Tensor, StageTimes, Trace), TrainError> {
    let pl = s.pipeline.as_ref().expect("a pipelined setup");
    let start = std::time::Instant::now();
    let schedule = &pl.schedule;
    let rank = pp.rank();
    let mut runner = StageRunner {
        s,
        sampler,
        grads,
        comm: pp,
        schedule,
        step,
        first_micro,
        part_of: s.parts.iter().enumerate().map(|(i, p)| (p.stage, i)).collect(),
        inputs: HashMap::new(),
        outputs: HashMap::new(),
        received: HashMap::new(),
        sends: Vec::new(),
        loss_sum: Tensor::zeros([], (Kind::Float, s.device)),
        inject_nan,
        shape: hidden_shape(s),
        rank,
        next: 0,
        posted: std::collections::VecDeque::new(),
        scanned: 0,
        // CPU activations travel over MPI, where a posted receive progresses on the group's
        // worker; NCCL queues point-to-point calls until a wait, so CUDA keeps receiving in place.
        prefetch: s.device == Device::Cpu,
    };
    let trace = execute(schedule, rank, &mut runner).map_err(|e| TrainError::Pipeline(e.to_string()))?;
    let loss = (runner.loss_sum.to_device(Device::Cpu) / schedule.microbatches as f64).reshape([1]);
    pp.all_reduce(&loss, ReduceOp::Sum).map_err(TrainError::from)?;
    let times = StageTimes::from_trace(&trace, start.elapsed());
    Ok((loss.reshape([]), times, trace))
}

/// Sum of the losses of evaluation batches `k < iters` with `k % ranks == rank` (`rank`,
/// `ranks`: the data-parallel coordinate and degree), through the pipeline stage by stage
/// (forward only). Known on the last stage; 0 elsewhere.
// The non-pipelined `trainer::eval_sum`'s arguments plus the stage communicator and step number;
// a struct would only bundle them for this one call.
#[allow(clippy::too_many_arguments)]
pub fn eval_sum(
    s: &Setup,
    sampler: &Sampler,
    pp: &dyn Communicator,
    split: Split,
    iters: u64,
    eval_step: u64,
    rank: usize,
    ranks: usize,
) -> Result<f64, TrainError> {
    let pl = s.pipeline.as_ref().expect("a pipelined setup");
    let stages = pl.schedule.stages();
    let (b, t) = (s.cfg.train.batch_size, s.cfg.model.block_size());
    let src = s.data.source(split);
    let comm_err = TrainError::Collective;
    tch::no_grad(|| {
        let mut sum = 0.0;
        for k in (rank as u64..iters).step_by(ranks) {
            let (x, y) = sampler.batch(src, split, eval_step, k * b as u64, b, t);
            let mut carry: Option<Tensor> = None;
            for part in &s.parts {
                let stage = part.stage;
                let input = if stage == 0 {
                    to_tensor(x.clone(), b, t, s.device)
                } else {
                    match carry.take() {
                        Some(h) => h,
                        None => {
                            let h = Tensor::zeros(hidden_shape(s).as_slice(), (Kind::Float, s.device));
                            pp.recv(&h, pl.schedule.rank_of_stage(stage - 1)).map_err(comm_err)?;
                            h
                        }
                    }
                };
                let out = autocast(s.device, s.bf16, || part.model.forward_stage(&input, false));
                if stage + 1 == stages {
                    let loss = autocast(s.device, s.bf16, || part.model.loss(&out, &to_tensor(y.clone(), b, t, s.device)));
                    sum += loss.double_value(&[]);
                } else {
                    let h = out.to_kind(Kind::Float).contiguous();
                    pp.send(&h, pl.schedule.rank_of_stage(stage + 1)).map_err(comm_err)?;
                }
            }
        }
        Ok(sum)
    })
}

/// The hidden states one stage sends the next, (B, T, C): with sequence parallelism this tensor-
/// parallel rank's shard of the micro-batch's tokens, (B·T/tp, C).
fn hidden_shape(s: &Setup) -> Vec<i64> {
    let p = &s.cfg.parallel;
    let (b, t, c) = (s.cfg.train.batch_size as i64, s.cfg.model.block_size() as i64, s.cfg.model.n_embd() as i64);
    if p.sequence_parallel {
        vec![b * t / p.tp as i64, c]
    } else {
        vec![b, t, c]
    }
}
