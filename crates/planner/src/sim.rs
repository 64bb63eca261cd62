//! Pipeline bubble, p2p waits and micro-batches in flight: `crates/pipeline`'s simulator on the
//! real schedule (1F1B, or interleaved 1F1B for v > 1) — never a second formula. The schedule is
//! simulated as generated (compute only): the simulator then delivers each cross-rank input
//! `comm` after its producer ends, which is how the trainer runs it, with every receive posted
//! ahead (`pipelined.rs`); the lowered form, with a receive that blocks where it is listed, is
//! one test away (`lowered_costs_at_least_as_much`).
//!
//! Costs go to the simulator in integer units, scaled so that one stage's forward plus backward
//! is [`UNITS`] (quantisation error below 0.1%). Results are cached by (schedule, shape, costs).
//! Above [`MAX_SIM_PAIRS`] (stage, micro-batch) pairs the schedule is simulated with fewer
//! micro-batches `m₀` (at least `2·pp`, a multiple of pp), past its warm-up, and again with
//! `m₀ + pp`; the makespan grows linearly in the steady state (every rank repeats the same
//! pattern each `pp` micro-batches), so it is extended by the slope of those two runs per
//! micro-batch left out. The test `capped_simulation_extrapolates_exactly` checks that against
//! full simulations.

use std::collections::HashMap;

use fabbrica_pipeline::{simulate, Costs, Kind, Schedule};

use crate::error::PlanError;

/// Simulator time units for one stage's forward plus backward.
pub const UNITS: f64 = 4000.0;

/// Most (stage, micro-batch) pairs simulated per schedule; larger shapes are extrapolated.
pub const MAX_SIM_PAIRS: usize = 1 << 12;

/// What the simulator says about one pipeline step.
#[derive(Debug, Clone, PartialEq)]
pub struct PipeResult {
    /// Seconds from the first forward to the last backward of the step, with p2p transfers.
    pub makespan_s: f64,
    /// The same without p2p transfer time (pure bubble).
    pub makespan_no_comm_s: f64,
    /// Compute time of one rank: `m·v·(f + b)`.
    pub busy_s: f64,
    /// Peak (stage, micro-batch) pairs in flight per pipeline rank.
    pub peak_in_flight: Vec<usize>,
    /// Micro-batches actually simulated (fewer than asked above [`MAX_SIM_PAIRS`]).
    pub simulated_microbatches: usize,
}

impl PipeResult {
    /// Idle fraction of the step from the schedule alone (no transfers).
    pub fn bubble_fraction(&self) -> f64 {
        if self.makespan_no_comm_s > 0.0 {
            1.0 - self.busy_s / self.makespan_no_comm_s
        } else {
            0.0
        }
    }
}

type Key = (Kind, usize, usize, usize, Costs);

/// The simulator with a cache of schedules and timelines.
#[derive(Default)]
pub struct Simulator {
    makespans: HashMap<Key, u64>,
    in_flight: HashMap<(Kind, usize, usize, usize), Vec<usize>>,
}

/// The schedule the planner runs for `v` chunks per rank.
pub fn kind_for(v: usize) -> Kind {
    if v > 1 {
        Kind::Interleaved1F1B
    } else {
        Kind::OneFOneB
    }
}

/// Micro-batches to simulate for `m` asked: all of them when small enough, else at least `2·pp`,
/// about [`MAX_SIM_PAIRS`] pairs, and congruent to `m` modulo `pp`.
pub fn simulated_microbatches(pp: usize, v: usize, m: usize) -> usize {
    if pp * v * m <= MAX_SIM_PAIRS {
        return m;
    }
    let base = ((MAX_SIM_PAIRS / (pp * v)) / pp * pp).max(2 * pp);
    // The same remainder modulo pp as m, so the steady state's period divides what is left out.
    (base + (m.saturating_sub(base)) % pp).min(m)
}

impl Simulator {
    /// Peak micro-batches in flight per rank for the schedule (depends on order only).
    pub fn peak_in_flight(&mut self, kind: Kind, pp: usize, v: usize, m: usize) -> Result<Vec<usize>, PlanError> {
        let ms = simulated_microbatches(pp, v, m);
        if let Some(p) = self.in_flight.get(&(kind, pp, v, ms)) {
            return Ok(p.clone());
        }
        let s = Schedule::new(kind, pp, v, ms).map_err(|e| PlanError::input(e.to_string()))?;
        let p = fabbrica_pipeline::peak_in_flight(&s);
        self.in_flight.insert((kind, pp, v, ms), p.clone());
        Ok(p)
    }

    /// Simulates one step of `m` micro-batches with `[forward, backward, transfer]` seconds per
    /// stage (and per transfer between ranks).
    pub fn run(&mut self, kind: Kind, pp: usize, v: usize, m: usize, [f_s, b_s, comm_s]: [f64; 3]) -> Result<PipeResult, PlanError> {
        let scale = UNITS / (f_s + b_s).max(f64::MIN_POSITIVE);
        let unit = |x: f64| ((x * scale).round() as u64).clamp(0, fabbrica_pipeline::MAX_COST);
        let costs = Costs { f: unit(f_s).max(1), b: unit(b_s).max(1), comm: unit(comm_s) };
        let ms = simulated_microbatches(pp, v, m);
        let free = Costs { comm: 0, ..costs };
        let mut at = |c: Costs| -> Result<f64, PlanError> {
            let t0 = self.makespan(kind, pp, v, ms, c)? as f64;
            if ms == m {
                return Ok(t0);
            }
            let t1 = self.makespan(kind, pp, v, ms + pp, c)? as f64;
            Ok(t0 + (m - ms) as f64 * (t1 - t0) / pp as f64)
        };
        let (with, without) = (at(costs)?, at(free)?);
        Ok(PipeResult {
            makespan_s: with / scale,
            makespan_no_comm_s: without / scale,
            busy_s: (m * v) as f64 * (costs.f + costs.b) as f64 / scale,
            peak_in_flight: self.peak_in_flight(kind, pp, v, m)?,
            simulated_microbatches: ms,
        })
    }

    fn makespan(&mut self, kind: Kind, pp: usize, v: usize, m: usize, costs: Costs) -> Result<u64, PlanError> {
        let key = (kind, pp, v, m, costs);
        if let Some(&t) = self.makespans.get(&key) {
            return Ok(t);
        }
        let s = Schedule::new(kind, pp, v, m).map_err(|e| PlanError::input(e.to_string()))?;
        let t = simulate(&s, costs).map_err(|e| PlanError::internal(format!("the pipeline simulator failed on {kind} pp={pp} v={v} m={m}: {e}")))?;
        self.makespans.insert(key, t.makespan);
        Ok(t.makespan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_f_one_b_bubble_is_the_simulators() {
        let mut sim = Simulator::default();
        let r = sim.run(Kind::OneFOneB, 4, 1, 8, [1.0, 2.0, 0.0]).unwrap();
        // (m + p - 1)(f + b) with f + b = 3 s.
        assert!((r.makespan_s - 33.0).abs() < 1e-9, "{}", r.makespan_s);
        assert!((r.bubble_fraction() - 9.0 / 33.0).abs() < 1e-9);
        assert_eq!(r.peak_in_flight, [4, 3, 2, 1]);
    }

    #[test]
    fn lowered_costs_at_least_as_much() {
        use fabbrica_pipeline::lower;
        for (kind, pp, v, m) in [(Kind::OneFOneB, 4, 1, 8), (Kind::Interleaved1F1B, 4, 2, 8)] {
            let s = Schedule::new(kind, pp, v, m).unwrap();
            let costs = Costs { f: 10, b: 20, comm: 3 };
            let (direct, lowered) = (simulate(&s, costs).unwrap(), simulate(&lower(&s), costs).unwrap());
            assert!(direct.makespan <= lowered.makespan);
            assert_eq!(direct.peak_in_flight, lowered.peak_in_flight);
            // Without transfer time both are the same schedule.
            let free = Costs { comm: 0, ..costs };
            assert_eq!(simulate(&s, free).unwrap().makespan, simulate(&lower(&s), free).unwrap().makespan);
        }
    }

    #[test]
    fn capped_simulation_extrapolates_exactly() {
        // Shapes just above the cap against a full simulation of the same schedule.
        for (kind, pp, v, m) in
            [(Kind::OneFOneB, 8, 1, 603), (Kind::Interleaved1F1B, 8, 2, 304), (Kind::Interleaved1F1B, 16, 4, 80), (Kind::OneFOneB, 64, 1, 200)]
        {
            assert!(simulated_microbatches(pp, v, m) < m);
            let mut sim = Simulator::default();
            let r = sim.run(kind, pp, v, m, [1.0, 2.0, 0.1]).unwrap();
            let scale = UNITS / 3.0;
            let costs = Costs { f: (scale).round() as u64, b: (2.0 * scale).round() as u64, comm: (0.1 * scale).round() as u64 };
            let full = simulate(&Schedule::new(kind, pp, v, m).unwrap(), costs).unwrap();
            assert!(
                (r.makespan_s - full.makespan as f64 / scale).abs() < 1e-6,
                "{kind} pp={pp} v={v} m={m}: {} vs {}",
                r.makespan_s,
                full.makespan as f64 / scale
            );
            assert_eq!(r.peak_in_flight, full.peak_in_flight);
        }
    }
}
