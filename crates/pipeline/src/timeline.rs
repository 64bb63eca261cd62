//! The result of a dry run: per-rank intervals, makespan, bubble and activation memory.

use std::collections::HashSet;

use crate::action::{Action, Op};
use crate::schedule::{Kind, Schedule};

/// The largest cost of one action that front ends (`fabbrica schedule --costs`) accept: 10^9
/// time units. With at most [`crate::MAX_ACTIONS`] compute actions (and a receive per compute
/// action when lowered), no simulated time of a validated shape comes near `u64::MAX` (bounded
/// by 2^24 · 10^9 < 2^54), so every figure of the timeline is exact; [`crate::simulate()`] also
/// checks every addition and reports a time past `u64::MAX` as an error instead of wrapping.
pub const MAX_COST: u64 = 1_000_000_000;

/// Duration of each kind of action, in time units, for one virtual stage.
///
/// Any `u64` is accepted by the simulator; [`MAX_COST`] is the documented range for inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Costs {
    /// One stage's forward of one micro-batch.
    pub f: u64,
    /// One stage's backward of one micro-batch.
    pub b: u64,
    /// Transfer time of one activation or gradient between ranks.
    pub comm: u64,
}

/// One executed action: it occupied its rank over `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// When the rank began the action (for a receive: when it began waiting).
    pub start: u64,
    /// When it finished (for a send: when it was posted; `start == end`).
    pub end: u64,
    /// What ran.
    pub action: Action,
}

/// The result of a successful dry run.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    /// The simulated schedule's kind and shape.
    pub kind: Kind,
    /// Number of ranks; `ranks.len() == pp`.
    pub pp: usize,
    /// Model chunks per rank.
    pub virtual_stages: usize,
    /// Micro-batches per step.
    pub microbatches: usize,
    /// The costs the run used.
    pub costs: Costs,
    /// `ranks[r]`: one entry per action of rank r, in execution order (sends and receives too).
    pub ranks: Vec<Vec<Entry>>,
    /// When the last action of any rank ends.
    pub makespan: u64,
    /// `bubble[r]`: fraction of `[0, makespan)` in which rank r runs no `F`/`B` (waiting for
    /// data and transfer time count as idle). 0 when the makespan is 0.
    pub bubble: Vec<f64>,
    /// `peak_in_flight[r]`: most (stage, micro-batch) pairs forwarded but not yet backwarded on
    /// rank r at once, i.e. peak activation memory in units of one stage's activations for one
    /// micro-batch. See [`peak_in_flight`].
    pub peak_in_flight: Vec<usize>,
}

impl Timeline {
    /// Summarises the executed `entries` (one list per rank) of `schedule` under `costs`.
    pub fn new(schedule: &Schedule, costs: Costs, entries: Vec<Vec<Entry>>) -> Self {
        let makespan = entries.iter().flatten().map(|e| e.end).max().unwrap_or(0);
        let mut timeline = Timeline {
            kind: schedule.kind,
            pp: schedule.pp,
            virtual_stages: schedule.virtual_stages,
            microbatches: schedule.microbatches,
            costs,
            ranks: entries,
            makespan,
            bubble: Vec::new(),
            peak_in_flight: peak_in_flight(schedule),
        };
        timeline.bubble = (0..timeline.ranks.len())
            .map(|r| match makespan {
                0 => 0.0,
                _ => timeline.idle(r) as f64 / makespan as f64,
            })
            .collect();
        timeline
    }

    /// Time rank r spends in `F` and `B`. (Saturating, for entries built by hand: a simulated
    /// rank runs one action at a time, so its busy time is at most the makespan.)
    pub fn busy(&self, rank: usize) -> u64 {
        self.ranks[rank].iter().filter(|e| e.action.op.is_compute()).fold(0u64, |sum, e| sum.saturating_add(e.end.saturating_sub(e.start)))
    }

    /// Time rank r spends not computing within `[0, makespan)`; `bubble[r] = idle / makespan`.
    pub fn idle(&self, rank: usize) -> u64 {
        self.makespan.saturating_sub(self.busy(rank))
    }
}

/// Per rank, the peak number of (stage, micro-batch) pairs whose `F` has run and whose `B`
/// has not yet, walking the rank's list in order. This depends only on the order, not on
/// timing: it is the activation memory the schedule needs, in units of one stage's stored
/// activations for one micro-batch (GPipe: m; 1F1B: `min(pp - r, m)` on rank r).
pub fn peak_in_flight(schedule: &Schedule) -> Vec<usize> {
    schedule
        .ranks
        .iter()
        .map(|list| {
            let mut live = HashSet::new();
            let mut peak = 0;
            for a in list {
                match a.op {
                    Op::F => {
                        live.insert((a.stage, a.micro));
                        peak = peak.max(live.len());
                    }
                    Op::B => {
                        live.remove(&(a.stage, a.micro));
                    }
                    _ => {}
                }
            }
            peak
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::one_f_one_b;

    fn list(text: &str) -> Vec<Action> {
        text.split_whitespace().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn peak_in_flight_counts_stage_micro_pairs() {
        let mut s = one_f_one_b(1, 1).unwrap();
        s.ranks = vec![list("0F0 0F1 0B0 0F2 0F3 0B1 0B2 0B3")];
        assert_eq!(peak_in_flight(&s), [3]);
        // Communication does not count; a B without its F does not go negative.
        s.ranks = vec![list("0B5 0SEND_F0 0F0 0B0 0F1")];
        assert_eq!(peak_in_flight(&s), [1]);
    }

    #[test]
    fn new_measures_makespan_busy_idle_and_bubble() {
        let mut s = one_f_one_b(2, 1).unwrap();
        s.ranks = vec![list("0F0 0B0"), list("1RECV_F0 1F0 1B0")];
        let e = |start, end, text: &str| Entry { start, end, action: text.parse().unwrap() };
        let entries = vec![vec![e(0, 1, "0F0"), e(6, 8, "0B0")], vec![e(0, 3, "1RECV_F0"), e(3, 4, "1F0"), e(4, 6, "1B0")]];
        let t = Timeline::new(&s, Costs { f: 1, b: 2, comm: 2 }, entries);
        assert_eq!(t.makespan, 8);
        assert_eq!((t.busy(0), t.idle(0)), (3, 5));
        // Time in a receive is idle: rank 1 computes 3 of 8 units.
        assert_eq!((t.busy(1), t.idle(1)), (3, 5));
        assert_eq!(t.bubble, [5.0 / 8.0, 5.0 / 8.0]);
        assert_eq!(t.peak_in_flight, [1, 1]);
        assert_eq!((t.kind, t.pp, t.virtual_stages, t.microbatches), (Kind::OneFOneB, 2, 1, 1));
    }
}
