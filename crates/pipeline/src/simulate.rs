//! Dry run of a schedule on all ranks at once: a [`Timeline`] (timing, bubble, activation
//! memory) or a [`Deadlock`].
//!
//! # Semantics
//!
//! Each rank executes its list strictly in order; an action starts when the rank has finished
//! the previous one and the action's inputs are ready, and lasts `f` (an `F`), `b` (a `B`),
//! 0 (a `SEND_*`) or until its data arrives (a `RECV_*`). Time is in integer units.
//!
//! - `sF m` needs its input: nothing for stage 0; otherwise `(s-1)F m` done, when stage s-1
//!   lives on the same rank, or else this rank's `sRECV_F m` done.
//! - `sB m` needs `sF m` done, and its output gradient: nothing for the last stage (the loss
//!   is computed inside its `B`); otherwise `(s+1)B m` done, when stage s+1 lives on the same
//!   rank, or else this rank's `sRECV_B m` done.
//! - `sSEND_F m` / `sSEND_B m` need `sF m` / `sB m` done. A send never blocks its rank: it is
//!   posted asynchronously (like `isend`) when the rank reaches it, and takes no rank time.
//! - `sRECV_F m` / `sRECV_B m` block the rank until the matching send (`(s-1)SEND_F m` /
//!   `(s+1)SEND_B m`) has been posted, and complete `comm` units after the later of the two
//!   posts (the receive's and the send's).
//!
//! Compute-only schedules (no `SEND_*`/`RECV_*` anywhere, as [`crate::generate`] makes them)
//! are simulated too: a cross-rank input is then taken directly from the producing `F`/`B`,
//! arriving `comm` units after it ends (a receive posted early and fully overlapped).
//!
//! "Same rank" uses the schedule's loop placement (stage s on rank `s % pp`), the same rule
//! [`crate::lower()`] uses to decide where to insert communication.
//!
//! When every rank with actions left is stuck, the result is a [`Deadlock`] naming each stuck
//! rank's action and what it waits for. The order of processing ranks does not change any
//! time: each start time is the maximum of its rank's clock and its inputs' ready times.
//!
//! Times are checked: an action whose end would pass `u64::MAX` stops the run with
//! [`SimError::TimeOverflow`] rather than wrapping (costs within [`crate::MAX_COST`] on a
//! validated shape never get near it).

use std::collections::HashMap;

use crate::action::{Action, Op};
use crate::deadlock::{Blocked, Cause, Deadlock, Invalid};
use crate::lower::peer;
use crate::schedule::Schedule;
use crate::timeline::{Costs, Entry, Timeline, MAX_COST};

/// Why a dry run produced no timeline.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum SimError {
    /// Every rank with actions left is stuck.
    #[error(transparent)]
    Deadlock(#[from] Deadlock),
    /// The end of `action` would pass `u64::MAX` time units.
    #[error(
        "the simulated time overflows: {action} (position {index} of rank {rank}'s list) would end past {} time units; use costs of at most {MAX_COST} each",
        u64::MAX
    )]
    TimeOverflow { rank: usize, index: usize, action: Action },
}

impl SimError {
    /// The deadlock, when that is why.
    pub fn deadlock(&self) -> Option<&Deadlock> {
        match self {
            SimError::Deadlock(d) => Some(d),
            SimError::TimeOverflow { .. } => None,
        }
    }
}

/// Dry-runs every rank of `schedule` under `costs`; see the module docs for the semantics.
pub fn simulate(schedule: &Schedule, costs: Costs) -> Result<Timeline, SimError> {
    let mut sim = Sim::new(schedule, costs);
    loop {
        let mut progressed = false;
        for r in 0..schedule.ranks.len() {
            while sim.cursor[r] < schedule.ranks[r].len() {
                match sim.step(r) {
                    Ok(()) => progressed = true,
                    Err(Wait::Overflow) => {
                        let index = sim.cursor[r];
                        let action = schedule.ranks[r][index];
                        return Err(SimError::TimeOverflow { rank: r, index, action });
                    }
                    Err(_) => break,
                }
            }
        }
        if sim.finished() {
            return Ok(sim.into_timeline());
        }
        if !progressed {
            return Err(sim.diagnose().into());
        }
    }
}

/// Why a rank's next action cannot run yet.
enum Wait {
    /// The action needs this one done first.
    For(Action),
    /// The action can never run.
    Invalid(Invalid),
    /// The action's end does not fit in a `u64`.
    Overflow,
}

/// `a + b`, or [`Wait::Overflow`].
fn add(a: u64, b: u64) -> Result<u64, Wait> {
    a.checked_add(b).ok_or(Wait::Overflow)
}

struct Done {
    rank: usize,
    end: u64,
}

struct Sim<'a> {
    schedule: &'a Schedule,
    costs: Costs,
    /// True when the schedule lists communication; otherwise cross-rank inputs are direct.
    lowered: bool,
    stages: usize,
    /// Where each action is first listed: (rank, index). Used only to explain deadlocks.
    listed: HashMap<Action, (usize, usize)>,
    done: HashMap<Action, Done>,
    /// `cursor[r]`: index of rank r's next action.
    cursor: Vec<usize>,
    /// `clock[r]`: when rank r finished its previous action.
    clock: Vec<u64>,
    entries: Vec<Vec<Entry>>,
}

impl<'a> Sim<'a> {
    fn new(schedule: &'a Schedule, costs: Costs) -> Self {
        let pp = schedule.ranks.len();
        let mut listed = HashMap::new();
        for (r, list) in schedule.ranks.iter().enumerate() {
            for (i, &a) in list.iter().enumerate() {
                listed.entry(a).or_insert((r, i));
            }
        }
        Sim {
            schedule,
            costs,
            lowered: schedule.is_lowered(),
            stages: schedule.stages(),
            listed,
            done: HashMap::new(),
            cursor: vec![0; pp],
            clock: vec![0; pp],
            entries: schedule.ranks.iter().map(|l| Vec::with_capacity(l.len())).collect(),
        }
    }

    fn finished(&self) -> bool {
        self.cursor.iter().zip(&self.schedule.ranks).all(|(&c, l)| c == l.len())
    }

    /// Runs rank r's next action if its inputs are ready.
    fn step(&mut self, r: usize) -> Result<(), Wait> {
        let entry = self.next(r)?;
        self.done.entry(entry.action).or_insert(Done { rank: r, end: entry.end });
        self.entries[r].push(entry);
        self.clock[r] = entry.end;
        self.cursor[r] += 1;
        Ok(())
    }

    /// When rank r's next action would run, or what it waits for.
    fn next(&self, r: usize) -> Result<Entry, Wait> {
        let action = self.schedule.ranks[r][self.cursor[r]];
        self.check(action).map_err(Wait::Invalid)?;
        let clock = self.clock[r];
        let Action { stage: s, micro: m, op } = action;
        let (start, end) = match op {
            Op::F => {
                // Stage 0 reads the data loader: no input to wait for.
                let ready = match s.checked_sub(1) {
                    None => 0,
                    Some(prev) => self.input(r, Action::f(prev, m), Op::RecvF, s)?,
                };
                let start = clock.max(ready);
                (start, add(start, self.costs.f)?)
            }
            Op::B => {
                let own = self.end_of(Action::f(s, m))?;
                // The last stage's gradient comes from its own loss.
                let grad = match s.checked_add(1).filter(|&next| next < self.stages) {
                    None => 0,
                    Some(next) => self.input(r, Action::b(next, m), Op::RecvB, s)?,
                };
                let start = clock.max(own).max(grad);
                (start, add(start, self.costs.b)?)
            }
            Op::SendF | Op::SendB => {
                let produced = Action::new(s, if op == Op::SendF { Op::F } else { Op::B }, m);
                let post = clock.max(self.end_of(produced)?);
                (post, post)
            }
            Op::RecvF | Op::RecvB => {
                // `check` has ruled out receives at the ends of the pipeline, which have no peer.
                let end = if op == Op::RecvF { Invalid::BeforeFirstStage } else { Invalid::AfterLastStage };
                let send = peer(action).ok_or(Wait::Invalid(end))?;
                let posted = self.end_of(send)?;
                (clock, add(clock.max(posted), self.costs.comm)?)
            }
        };
        Ok(Entry { start, end, action })
    }

    /// When the data produced by `producer` (stage `s`'s neighbour) is usable by `stage` on
    /// rank r: directly if the neighbour stage lives on r, else via this rank's receive
    /// (lowered) or `comm` after the producer ends (compute-only).
    fn input(&self, r: usize, producer: Action, recv: Op, stage: usize) -> Result<u64, Wait> {
        if self.schedule.rank_of_stage(producer.stage) == r {
            return self.end_of(producer);
        }
        if self.lowered {
            return self.end_of(Action::new(stage, recv, producer.micro));
        }
        let done = self.done.get(&producer).ok_or(Wait::For(producer))?;
        add(done.end, if done.rank == r { 0 } else { self.costs.comm })
    }

    fn end_of(&self, needs: Action) -> Result<u64, Wait> {
        self.done.get(&needs).map(|d| d.end).ok_or(Wait::For(needs))
    }

    /// Rejects actions that name a stage, micro-batch or neighbour the schedule lacks.
    fn check(&self, a: Action) -> Result<(), Invalid> {
        Invalid::check(a, self.stages, self.schedule.microbatches)
    }

    /// Called when no rank can move: explains every stuck rank.
    fn diagnose(&self) -> Deadlock {
        let pp = self.schedule.ranks.len();
        let blocked = (0..pp)
            .filter(|&r| self.cursor[r] < self.schedule.ranks[r].len())
            .map(|r| {
                let index = self.cursor[r];
                let at = self.schedule.ranks[r][index];
                let cause = match self.next(r) {
                    Err(Wait::Invalid(why)) => Cause::Invalid(why),
                    Err(Wait::For(needs)) => self.explain(needs),
                    // Not reached: `simulate` diagnoses only when no rank can step, and stops at
                    // the first overflow.
                    Ok(_) | Err(Wait::Overflow) => Cause::NotReached { needs: at, rank: r, stuck_at: at },
                };
                Blocked { rank: r, index, at, cause }
            })
            .collect();
        Deadlock { blocked }
    }

    /// Where `needs` would come from, given that it has not happened. A listed action that
    /// has not run lies at or after its rank's cursor, so that rank is stuck before it.
    fn explain(&self, needs: Action) -> Cause {
        match self.listed.get(&needs) {
            Some(&(q, i)) => {
                let stuck_at = self.schedule.ranks[q].get(self.cursor[q]).copied().unwrap_or(self.schedule.ranks[q][i]);
                Cause::NotReached { needs, rank: q, stuck_at }
            }
            None => Cause::NeverPosted { needs, owner: self.schedule.rank_of_stage(needs.stage) },
        }
    }

    fn into_timeline(self) -> Timeline {
        Timeline::new(self.schedule, self.costs, self.entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::{gpipe, one_f_one_b};
    use crate::lower::lower;

    fn a(text: &str) -> Action {
        text.parse().unwrap()
    }

    fn list(text: &str) -> Vec<Action> {
        text.split_whitespace().map(a).collect()
    }

    /// `(action, start, end)` per entry of one rank.
    fn spans(t: &Timeline, rank: usize) -> Vec<(String, u64, u64)> {
        t.ranks[rank].iter().map(|e| (e.action.to_string(), e.start, e.end)).collect()
    }

    fn span(text: &str, start: u64, end: u64) -> (String, u64, u64) {
        (text.to_string(), start, end)
    }

    const COSTS: Costs = Costs { f: 1, b: 2, comm: 1 };

    fn deadlock(s: &Schedule) -> Deadlock {
        match simulate(s, COSTS) {
            Err(SimError::Deadlock(d)) => d,
            other => panic!("not a deadlock: {other:?}"),
        }
    }

    #[test]
    fn times_past_u64_max_are_an_error_not_a_wrap() {
        let overflow = |s: &Schedule, costs: Costs| match simulate(s, costs) {
            Err(SimError::TimeOverflow { rank, index, action }) => (rank, index, action.to_string()),
            other => panic!("not an overflow: {other:?}"),
        };
        let lowered = lower(&one_f_one_b(2, 2).unwrap());
        // Two forwards fit (end u64::MAX - 1 on both ranks); rank 1's first backward does not.
        let half = u64::MAX / 2;
        let big_b = Costs { f: half, b: 2, comm: 0 };
        assert_eq!(overflow(&lowered, big_b), (1, 2, "1B0".into()));
        // A transfer that ends past u64::MAX, lowered (a receive) and compute-only (the input).
        let big_comm = Costs { f: 1, b: 1, comm: u64::MAX };
        assert_eq!(overflow(&lowered, big_comm), (1, 0, "1RECV_F0".into()));
        assert_eq!(overflow(&one_f_one_b(2, 2).unwrap(), big_comm), (1, 0, "1F0".into()));
        let msg = simulate(&lowered, big_b).unwrap_err().to_string();
        assert_eq!(
            msg,
            "the simulated time overflows: 1B0 (position 2 of rank 1's list) would end past \
             18446744073709551615 time units; use costs of at most 1000000000 each"
        );
        // The largest costs front ends accept, on the largest shape they accept, stay far from
        // it: at most 2^24 additions of MAX_COST on any path through the schedule.
        assert!((crate::MAX_ACTIONS as u64 * 2).checked_mul(MAX_COST).is_some_and(|t| t < u64::MAX / 1000));
        // Near the edge but not past it: exact.
        let t = simulate(&lower(&gpipe(1, 1).unwrap()), Costs { f: u64::MAX - 1, b: 1, comm: 0 }).unwrap();
        assert_eq!(t.makespan, u64::MAX);
    }

    #[test]
    fn lowered_one_f_one_b_by_hand() {
        let t = simulate(&lower(&one_f_one_b(2, 2).unwrap()), COSTS).unwrap();
        assert_eq!(
            spans(&t, 0),
            [
                span("0F0", 0, 1),
                span("0SEND_F0", 1, 1),
                span("0F1", 1, 2),
                span("0SEND_F1", 2, 2),
                span("0RECV_B0", 2, 6), // 1SEND_B0 is posted at 5, + comm
                span("0B0", 6, 8),
                span("0RECV_B1", 8, 10),
                span("0B1", 10, 12),
            ]
        );
        assert_eq!(
            spans(&t, 1),
            [
                span("1RECV_F0", 0, 2),
                span("1F0", 2, 3),
                span("1B0", 3, 5),
                span("1SEND_B0", 5, 5),
                // 0SEND_F1 was posted at 2, but the receive is only posted at 5: done at 5 + comm.
                span("1RECV_F1", 5, 6),
                span("1F1", 6, 7),
                span("1B1", 7, 9),
                span("1SEND_B1", 9, 9),
            ]
        );
        assert_eq!(t.makespan, 12);
        assert_eq!((t.busy(0), t.idle(0)), (6, 6));
        assert_eq!(t.bubble[0], 0.5);
        assert_eq!(t.peak_in_flight, [2, 1]);
    }

    #[test]
    fn compute_only_takes_cross_rank_inputs_directly() {
        let t = simulate(&one_f_one_b(2, 2).unwrap(), COSTS).unwrap();
        assert_eq!(spans(&t, 0), [span("0F0", 0, 1), span("0F1", 1, 2), span("0B0", 6, 8), span("0B1", 9, 11)]);
        assert_eq!(spans(&t, 1), [span("1F0", 2, 3), span("1B0", 3, 5), span("1F1", 5, 6), span("1B1", 6, 8)]);
        assert_eq!(t.makespan, 11);
    }

    #[test]
    fn single_rank_runs_back_to_back() {
        let s = Schedule::new(crate::Kind::Interleaved1F1B, 1, 2, 3).unwrap();
        let t = simulate(&lower(&s), COSTS).unwrap();
        assert_eq!(t.makespan, 3 * 2 * 3);
        assert_eq!(t.idle(0), 0);
        assert_eq!(t.bubble, [0.0]);
    }

    #[test]
    fn zero_costs_give_zero_makespan_and_bubble() {
        let t = simulate(&lower(&gpipe(3, 2).unwrap()), Costs { f: 0, b: 0, comm: 0 }).unwrap();
        assert_eq!(t.makespan, 0);
        assert_eq!(t.bubble, [0.0; 3]);
    }

    #[test]
    fn recv_before_send_cycle_is_a_deadlock_naming_both_ranks() {
        // Rank 0 waits for a gradient before it sends the forward that produces it.
        let mut s = lower(&one_f_one_b(2, 1).unwrap());
        assert_eq!(s.ranks[0], list("0F0 0SEND_F0 0RECV_B0 0B0"));
        s.ranks[0] = list("0RECV_B0 0F0 0SEND_F0 0B0");
        let err = deadlock(&s);
        assert_eq!(
            err.blocked,
            [
                Blocked { rank: 0, index: 0, at: a("0RECV_B0"), cause: Cause::NotReached { needs: a("1SEND_B0"), rank: 1, stuck_at: a("1RECV_F0") } },
                Blocked { rank: 1, index: 0, at: a("1RECV_F0"), cause: Cause::NotReached { needs: a("0SEND_F0"), rank: 0, stuck_at: a("0RECV_B0") } },
            ]
        );
        let msg = err.to_string();
        assert!(msg.contains("rank 0 waits at 0RECV_B0 for 1SEND_B0, which rank 1 only reaches after 1RECV_F0"), "{msg}");
        assert!(msg.contains("rank 1 waits at 1RECV_F0 for 0SEND_F0, which rank 0 only reaches after 0RECV_B0"), "{msg}");
    }

    #[test]
    fn dropped_send_is_never_posted() {
        let mut s = lower(&one_f_one_b(2, 2).unwrap());
        s.ranks[0].retain(|&x| x != a("0SEND_F0"));
        let err = deadlock(&s);
        assert_eq!(
            err.to_string(),
            "the pipeline schedule deadlocks: \
             rank 0 waits at 0RECV_B0 for 1SEND_B0, which rank 1 only reaches after 1RECV_F0, where it is stuck; \
             rank 1 waits at 1RECV_F0 for 0SEND_F0, which rank 0 never posts"
        );
    }

    #[test]
    fn dropped_recv_blocks_the_compute_that_needs_it() {
        let mut s = lower(&gpipe(2, 1).unwrap());
        s.ranks[1].retain(|&x| x != a("1RECV_F0"));
        let err = deadlock(&s);
        assert_eq!(err.blocked.len(), 2);
        assert_eq!(err.blocked[1].to_string(), "rank 1 waits at 1F0 for 1RECV_F0, which rank 1 never posts");
    }

    #[test]
    fn compute_only_cycle_names_own_list() {
        let mut s = gpipe(2, 1).unwrap();
        s.ranks[0] = list("0B0 0F0");
        let err = deadlock(&s);
        let msg = err.to_string();
        assert!(msg.contains("rank 0 waits at 0B0 for 0F0, which comes later in rank 0's own list"), "{msg}");
        assert!(msg.contains("rank 1 waits at 1F0 for 0F0, which rank 0 only reaches after 0B0, where it is stuck"), "{msg}");
    }

    #[test]
    fn send_before_its_compute_is_stuck_on_itself() {
        let mut s = lower(&gpipe(2, 1).unwrap());
        s.ranks[0] = list("0SEND_F0 0F0 0RECV_B0 0B0");
        let err = deadlock(&s);
        assert!(err.to_string().contains("rank 0 waits at 0SEND_F0 for 0F0, which comes later in rank 0's own list"));
    }

    #[test]
    fn impossible_actions_are_reported_with_their_position() {
        let cases = [
            ("0F0 5F0", Invalid::NoSuchStage { stages: 2 }),
            ("0F0 0F3", Invalid::NoSuchMicro { microbatches: 1 }),
            ("0RECV_F0 0F0", Invalid::BeforeFirstStage),
            ("0F0 0SEND_B0", Invalid::BeforeFirstStage),
            ("0F0 1SEND_F0", Invalid::AfterLastStage),
            ("0F0 1RECV_B0", Invalid::AfterLastStage),
        ];
        for (text, why) in cases {
            let mut s = gpipe(2, 1).unwrap();
            s.ranks = vec![list(text), vec![]];
            let err = deadlock(&s);
            let index = usize::from(text.starts_with("0F0"));
            assert_eq!(err.blocked.len(), 1, "{text}");
            assert_eq!((err.blocked[0].index, &err.blocked[0].cause), (index, &Cause::Invalid(why)), "{text}");
        }
    }
}
