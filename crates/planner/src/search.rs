//! The layout search: every (tp, pp, dp, v, mb, recompute, ZeRO) the topology accepts, checked
//! for memory first (micro-batches in flight from the schedule), then ranked by step time.
//!
//! Branch and bound: each layout's compute time without bubble or exposed communication
//! (`m·v·(f + b)` plus the optimizer) is a lower bound of its step time, so layouts are simulated
//! in the order of that bound and the search stops once the bound passes the `top`-th best step.

use std::collections::HashMap;

use crate::cluster::Cluster;
use crate::error::PlanError;
use crate::estimate::{block_times, estimate, Estimate, Execution, Workload};
use crate::layout::{Forced, Layout};
use crate::memory::{per_gpu, StageMap};
use crate::model::{ModelShape, Recompute};
use crate::sim::{kind_for, Simulator};

/// Chunks per pipeline rank the search tries.
const VIRTUAL: [usize; 8] = [1, 2, 3, 4, 6, 8, 12, 16];
/// Micro-batch sizes the search tries.
const MICRO: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

/// What the search found for one GPU count.
#[derive(Debug, Clone)]
pub struct Found {
    /// GPUs asked for.
    pub gpus: usize,
    /// The fastest layouts that fit, fastest first (at most `top`).
    pub best: Vec<Estimate>,
    /// The fastest layouts that do not fit (by their lower bound), with their memory.
    pub unfit: Vec<Estimate>,
    /// Layouts considered.
    pub considered: usize,
    /// Layouts simulated.
    pub simulated: usize,
}

/// The planner's state across GPU counts: the model's stage splits and the simulator's cache.
pub struct Planner<'a> {
    /// The model.
    pub model: &'a ModelShape,
    /// The cluster.
    pub cluster: &'a Cluster,
    /// The batch.
    pub workload: Workload,
    /// How the runtime executes.
    pub execution: Execution,
    maps: HashMap<(usize, usize), StageMap>,
    /// Pipeline simulations, cached.
    pub sim: Simulator,
}

/// `peak_in_flight` saturates once a schedule has `2·pp` micro-batches (the warm-up of every
/// schedule here is shorter): the memory check asks for at most that many (tested).
pub fn in_flight_microbatches(pp: usize, m: usize) -> usize {
    m.min(2 * pp)
}

impl<'a> Planner<'a> {
    /// A planner for one model, cluster, batch and execution.
    pub fn new(model: &'a ModelShape, cluster: &'a Cluster, workload: Workload, execution: Execution) -> Self {
        Planner::with_simulator(model, cluster, workload, execution, Simulator::default())
    }

    /// As [`Planner::new`], reusing a simulator's cache (schedules do not depend on the model).
    pub fn with_simulator(model: &'a ModelShape, cluster: &'a Cluster, workload: Workload, execution: Execution, sim: Simulator) -> Self {
        Planner { model, cluster, workload, execution, maps: HashMap::new(), sim }
    }

    /// The model's balanced split into `pp·v` stages, placed on `pp` ranks (cached).
    pub fn map(&mut self, pp: usize, v: usize) -> Result<StageMap, PlanError> {
        if let Some(s) = self.maps.get(&(pp, v)) {
            return Ok(s.clone());
        }
        let s = StageMap::new(self.model, pp, &self.model.stage_layers(pp * v)?);
        self.maps.insert((pp, v), s.clone());
        Ok(s)
    }

    /// Every layout of `gpus` GPUs that the forced keys, the model's shape and the topology admit.
    pub fn layouts(&self, gpus: usize, forced: &Forced) -> Vec<Layout> {
        let (m, c, b) = (self.model, self.cluster, self.workload.global_batch);
        let mut out = Vec::new();
        let tps: Vec<usize> = (0..=10).map(|k| 1usize << k).filter(|&t| t <= c.gpus_per_node && t <= gpus).collect();
        for tp in tps {
            if !(m.heads.is_multiple_of(tp) && m.kv_heads.is_multiple_of(tp) && m.ffn_hidden.is_multiple_of(tp)) || forced.tp.is_some_and(|x| x != tp)
            {
                continue;
            }
            for pp in 1..=m.layers.min(gpus / tp) {
                if forced.pp.is_some_and(|x| x != pp) {
                    continue;
                }
                // The most replicas that fit in the GPUs and divide the batch.
                let dp = match forced.dp {
                    Some(dp) => dp,
                    None => match (1..=(gpus / (tp * pp)).min(b)).rev().find(|d| b.is_multiple_of(*d)) {
                        Some(d) => d,
                        None => continue,
                    },
                };
                if tp * pp * dp > gpus || !b.is_multiple_of(dp) {
                    continue;
                }
                let per_replica = b / dp;
                let vs: Vec<usize> = match forced.v {
                    Some(v) => vec![v],
                    None => VIRTUAL.to_vec(),
                };
                let mbs: Vec<usize> = match forced.mb {
                    Some(mb) => vec![mb],
                    None => MICRO.to_vec(),
                };
                for &v in &vs {
                    if (v > 1 && pp == 1) || pp * v > m.layers || forced.v.is_some_and(|x| x != v) {
                        continue;
                    }
                    for &mb in &mbs {
                        if !per_replica.is_multiple_of(mb) || forced.mb.is_some_and(|x| x != mb) {
                            continue;
                        }
                        if v > 1 && !(per_replica / mb).is_multiple_of(pp) {
                            continue;
                        }
                        for recompute in Recompute::ALL {
                            for zero in [0u8, 1, 2, 3] {
                                let l = Layout { tp, pp, dp, v, mb, recompute, zero };
                                // ZeRO-2/3 are what-if: only when asked for.
                                let zero_ok = if zero >= 2 { forced.zero == Some(zero) } else { forced.zero.is_none_or(|z| z == zero) };
                                if zero_ok && forced.admits(&l) && l.dims().is_ok() {
                                    out.push(l);
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Compute-only lower bound of the step time and the memory of one layout (no timeline).
    fn screen(&mut self, l: &Layout) -> Result<(f64, crate::memory::Memory), PlanError> {
        let map = self.map(l.pp, l.v)?;
        let m = self.workload.global_batch / l.dp / l.mb;
        let bt = block_times(self.model, self.cluster, l, &self.execution);
        let most = map.chunk.iter().copied().max().unwrap_or(0) as f64;
        let bound = m as f64 * l.v as f64 * most * (bt.f + bt.b);
        let in_flight = self.sim.peak_in_flight(kind_for(l.v), l.pp, l.v, in_flight_microbatches(l.pp, m))?;
        let (mem, _) = per_gpu(self.model, l, &map, &in_flight, &self.execution);
        Ok((bound, mem))
    }

    /// The `top` fastest layouts of `gpus` GPUs that fit, and the fastest few that do not.
    pub fn search(&mut self, gpus: usize, forced: &Forced, top: usize) -> Result<Found, PlanError> {
        let layouts = self.layouts(gpus, forced);
        let usable = self.cluster.usable_bytes();
        let mut fit = Vec::new();
        let mut unfit = Vec::new();
        for l in &layouts {
            let (bound, mem) = self.screen(l)?;
            if mem.total() <= usable {
                fit.push((bound, *l));
            } else {
                unfit.push((bound, *l));
            }
        }
        fit.sort_by(|a, b| a.0.total_cmp(&b.0));
        unfit.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut best: Vec<Estimate> = Vec::new();
        let mut simulated = 0;
        for (bound, l) in fit {
            if best.len() >= top.max(1) && bound * (1.0 - 1e-3) > best[best.len() - 1].step_s {
                break;
            }
            let map = self.map(l.pp, l.v)?;
            let e = estimate(self.model, self.cluster, &l, &self.workload, &self.execution, &map, &mut self.sim)?;
            simulated += 1;
            best.push(e);
            // Equal step times: the layout that holds less memory first.
            best.sort_by(|a, b| a.step_s.total_cmp(&b.step_s).then(a.memory.total().total_cmp(&b.memory.total())));
            best.truncate(top.max(1));
        }
        let mut shown = Vec::new();
        for (_, l) in unfit.into_iter().take(top.max(1)) {
            let map = self.map(l.pp, l.v)?;
            shown.push(estimate(self.model, self.cluster, &l, &self.workload, &self.execution, &map, &mut self.sim)?);
        }
        Ok(Found { gpus, best, unfit: shown, considered: layouts.len(), simulated })
    }

    /// The fewest GPUs on which some layout (ZeRO-1, full recomputation, micro-batch 1) fits,
    /// and that layout; `None` when not even the leanest does at the batch given.
    pub fn smallest_fit(&mut self) -> Result<Option<Layout>, PlanError> {
        let (model, c, b) = (self.model, self.cluster, self.workload.global_batch);
        let mut best: Option<Layout> = None;
        let tps: Vec<usize> = (0..=10).map(|k| 1usize << k).filter(|&t| t <= c.gpus_per_node).collect();
        for tp in tps {
            if !(model.heads.is_multiple_of(tp) && model.kv_heads.is_multiple_of(tp) && model.ffn_hidden.is_multiple_of(tp)) {
                continue;
            }
            for pp in 1..=model.layers {
                for dp in (1..=b).filter(|d| b.is_multiple_of(*d)) {
                    if best.is_some_and(|x| x.gpus() <= tp * pp * dp) {
                        break;
                    }
                    let l = Layout { tp, pp, dp, v: 1, mb: 1, recompute: Recompute::Full, zero: 1 };
                    if self.screen(&l)?.1.total() <= c.usable_bytes() {
                        best = Some(l);
                        break;
                    }
                }
            }
        }
        Ok(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabbrica_pipeline::{Kind, Schedule};

    #[test]
    fn in_flight_saturates_at_two_pipelines_of_microbatches() {
        for pp in 1..=8 {
            for v in 1..=4 {
                let kind = kind_for(v);
                if v > 1 && pp == 1 {
                    continue;
                }
                for m in (1..=64).filter(|m| v == 1 || m % pp == 0) {
                    let full = fabbrica_pipeline::peak_in_flight(&Schedule::new(kind, pp, v, m).unwrap());
                    let capped = fabbrica_pipeline::peak_in_flight(&Schedule::new(kind, pp, v, in_flight_microbatches(pp, m)).unwrap());
                    assert_eq!(full, capped, "{kind} pp={pp} v={v} m={m}");
                }
            }
        }
        let _ = Kind::GPipe;
    }
}
