//! Pipeline parallelism end to end on a small model, under a real launcher: a chain of
//! `pp·v` stages (each `tanh(x·Wᵀ + b)`, d = 16; the last one adds a mean-squared-error loss)
//! split over the ranks by loop placement. Each rank runs its part of a lowered GPipe, 1F1B or
//! interleaved schedule through the pipeline executor, with activations and gradients moving by
//! the communicator's point-to-point calls. Then every rank runs the whole chain alone, in this
//! process, on the same micro-batches, and checks its own stages' gradients (and the last stage's
//! rank the loss) against it. Exits non-zero on any mismatch.
//!
//!     mpirun -np 4 target/release/pipeline_chain 1f1b 8          # SCHEDULE MICROBATCHES [V]
//!     mpirun -np 2 target/release/pipeline_chain interleaved 4 2

use std::collections::HashMap;
use std::sync::Arc;

use fabbrica_comm::{init, Communicator, InitOptions, Work};
use fabbrica_pipeline::{execute, lower, Action, Kind, Op, Runner, Schedule};
use tch::{Device, Kind as Dtype, Tensor};

const D: i64 = 16;
const BATCH: i64 = 3;

/// Stage s's weights, the same on every rank and in the reference (seeded by s).
fn stage_params(s: usize) -> (Tensor, Tensor) {
    tch::manual_seed(1000 + s as i64);
    let w = (Tensor::randn([D, D], (Dtype::Float, Device::Cpu)) * 0.4).set_requires_grad(true);
    let b = (Tensor::randn([D], (Dtype::Float, Device::Cpu)) * 0.1).set_requires_grad(true);
    (w, b)
}

/// Micro-batch m's input and target, (BATCH, D) each.
fn micro_batch(m: usize) -> (Tensor, Tensor) {
    tch::manual_seed(10_000 + m as i64);
    let x = Tensor::randn([BATCH, D], (Dtype::Float, Device::Cpu));
    let y = Tensor::randn([BATCH, D], (Dtype::Float, Device::Cpu));
    (x, y)
}

fn apply(p: &(Tensor, Tensor), x: &Tensor) -> Tensor {
    x.linear(&p.0, Some(&p.1)).tanh()
}

/// Loss of one micro-batch, scaled so that the m micro-batches add up to the batch mean.
fn loss(out: &Tensor, y: &Tensor, microbatches: usize) -> Tensor {
    (out - y).square().mean(Dtype::Float) / microbatches as f64
}

/// One rank's stages and what moves between its actions.
struct Chain {
    comm: Arc<dyn Communicator>,
    schedule: Schedule,
    rank: usize,
    params: HashMap<usize, (Tensor, Tensor)>,
    /// (stage, micro) -> the stage's input (a leaf that collects its gradient, except stage 0).
    inputs: HashMap<(usize, usize), Tensor>,
    /// (stage, micro) -> the stage's output (the loss, for the last stage).
    outputs: HashMap<(usize, usize), Tensor>,
    /// (stage, micro) -> a received activation (input) or output gradient.
    received_f: HashMap<(usize, usize), Tensor>,
    received_b: HashMap<(usize, usize), Tensor>,
    sends: Vec<Work>,
    loss_sum: f64,
}

impl Chain {
    fn local(&self, stage: usize) -> bool {
        self.schedule.rank_of_stage(stage) == self.rank
    }

    fn last(&self, stage: usize) -> bool {
        stage + 1 == self.schedule.stages()
    }
}

impl Runner for Chain {
    type Error = String;

    fn forward(&mut self, s: usize, m: usize) -> Result<(), String> {
        let (x, y) = micro_batch(m);
        let input = if s == 0 {
            x
        } else if self.local(s - 1) {
            self.outputs[&(s - 1, m)].detach().set_requires_grad(true)
        } else {
            self.received_f.remove(&(s, m)).ok_or(format!("{s}F{m}: no input received"))?.set_requires_grad(true)
        };
        let out = apply(&self.params[&s], &input);
        let out = if self.last(s) { loss(&out, &y, self.schedule.microbatches) } else { out };
        self.inputs.insert((s, m), input);
        self.outputs.insert((s, m), out);
        Ok(())
    }

    fn backward(&mut self, s: usize, m: usize) -> Result<(), String> {
        let out = self.outputs.remove(&(s, m)).ok_or(format!("{s}B{m}: forward not run"))?;
        if self.last(s) {
            self.loss_sum += out.double_value(&[]);
            out.backward();
        } else {
            let grad = if self.local(s + 1) {
                self.inputs[&(s + 1, m)].grad()
            } else {
                self.received_b.remove(&(s, m)).ok_or(format!("{s}B{m}: no gradient received"))?
            };
            // d(sum(out · g))/dθ = Jᵀg: the backward of `out` seeded with g.
            (out * grad).sum(Dtype::Float).backward();
        }
        Ok(())
    }

    fn send(&mut self, a: Action, peer: usize) -> Result<(), String> {
        let key = (a.stage, a.micro);
        let t = match a.op {
            Op::SendF => self.outputs[&key].detach(),
            _ => self.inputs[&key].grad(),
        };
        self.sends.push(self.comm.send_async(&t, peer).map_err(|e| e.to_string())?);
        Ok(())
    }

    fn recv(&mut self, a: Action, peer: usize) -> Result<(), String> {
        let t = Tensor::zeros([BATCH, D], (Dtype::Float, Device::Cpu));
        self.comm.recv(&t, peer).map_err(|e| e.to_string())?;
        let into = if a.op == Op::RecvF { &mut self.received_f } else { &mut self.received_b };
        into.insert((a.stage, a.micro), t);
        Ok(())
    }

    fn finish(&mut self) -> Result<(), String> {
        for w in self.sends.drain(..) {
            w.wait().map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

fn fail(msg: String) -> ! {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("error: {msg}\n").as_bytes());
    std::process::exit(1)
}

/// SCHEDULE MICROBATCHES [VIRTUAL_STAGES]: the schedule, m, and v (default 2 for interleaved, else 1).
fn parse_args(args: &[String]) -> Result<(Kind, usize, usize), String> {
    let usage = "usage: pipeline_chain gpipe|1f1b|interleaved MICROBATCHES [VIRTUAL_STAGES]";
    let kind: Kind = args.get(1).ok_or(usage)?.parse().map_err(|e: fabbrica_pipeline::ScheduleError| e.to_string())?;
    let m = args.get(2).and_then(|a| a.parse::<usize>().ok()).ok_or(usage)?;
    let v = match args.get(3) {
        Some(a) => a.parse::<usize>().map_err(|_| usage.to_string())?,
        None if kind == Kind::Interleaved1F1B => 2,
        None => 1,
    };
    Ok((kind, m, v))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (kind, m, v) = parse_args(&args).unwrap_or_else(|e| fail(e));
    let world = init(InitOptions::default()).unwrap_or_else(|e| fail(e.to_string()));
    let comm: Arc<dyn Communicator> = world.comm();
    let (rank, pp) = (world.rank(), world.size());
    let schedule = lower(&Schedule::new(kind, pp, v, m).unwrap_or_else(|e| fail(e.to_string())));
    let stages = schedule.stages();

    let mine: Vec<usize> = (0..stages).filter(|&s| schedule.rank_of_stage(s) == rank).collect();
    let mut chain = Chain {
        comm: comm.clone(),
        schedule: schedule.clone(),
        rank,
        params: mine.iter().map(|&s| (s, stage_params(s))).collect(),
        inputs: HashMap::new(),
        outputs: HashMap::new(),
        received_f: HashMap::new(),
        received_b: HashMap::new(),
        sends: Vec::new(),
        loss_sum: 0.0,
    };
    let trace = execute(&schedule, rank, &mut chain).unwrap_or_else(|e| fail(e.to_string()));
    if !(chain.outputs.is_empty() && chain.received_f.is_empty() && chain.received_b.is_empty()) {
        fail(format!("rank {rank}: activations left over after the schedule"));
    }

    // The whole chain in this process: the same micro-batches, summed losses, one backward.
    let reference: Vec<(Tensor, Tensor)> = (0..stages).map(stage_params).collect();
    let losses: Vec<Tensor> = (0..m)
        .map(|mb| {
            let (x, y) = micro_batch(mb);
            let out = reference.iter().fold(x, |h, p| apply(p, &h));
            loss(&out, &y, m)
        })
        .collect();
    let total = Tensor::stack(&losses, 0).sum(Dtype::Float);
    total.backward();
    let mut worst = 0f64;
    for &s in &mine {
        for (got, want) in [(&chain.params[&s].0, &reference[s].0), (&chain.params[&s].1, &reference[s].1)] {
            let (g, w) = (got.grad(), want.grad());
            let scale = w.abs().max().double_value(&[]).max(1e-12);
            worst = worst.max((g - &w).abs().max().double_value(&[]) / scale);
        }
    }
    if worst > 1e-5 {
        fail(format!("rank {rank} ({kind}, pp={pp}, v={v}, m={m}): gradients differ from the whole chain by {worst:.2e} relative"));
    }
    if mine.contains(&(stages - 1)) {
        let want = total.double_value(&[]);
        if (chain.loss_sum - want).abs() > 1e-6 * want.abs().max(1.0) {
            fail(format!("rank {rank}: loss {} but the whole chain gives {want}", chain.loss_sum));
        }
    }
    println!(
        "OK pipeline_chain rank {rank}: {kind} pp={pp} v={v} m={m}, stages {mine:?}, {} actions in {} us, gradients within {worst:.1e} of the whole chain",
        trace.entries.len(),
        trace.total_us
    );
}
