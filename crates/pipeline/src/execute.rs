//! Running one rank's part of a lowered schedule: the actions, in order, through a [`Runner`]
//! that owns the tensors and the communicator. What runs is exactly what [`crate::simulate()`]
//! dry-ran: the executor adds no ordering of its own, only checks and a measured trace.
//!
//! Contract with the runner (the semantics the simulator assumes):
//! - `send` posts the transfer and returns without waiting for the peer (an `isend`); the
//!   runner keeps it alive until `finish`.
//! - `recv` returns once the data is usable by the compute that follows (it may wait).
//! - `forward`/`backward` of a stage find their input where the preceding `recv` (or, for
//!   stages on the same rank, the neighbour stage's compute) left it.

use std::time::Instant;

use crate::action::{Action, Op};
use crate::deadlock::Invalid;
use crate::lower::{check_transfer_order, peer};
use crate::schedule::Schedule;
use crate::timeline::Entry;

/// What a rank does for each kind of action.
pub trait Runner {
    type Error;
    /// `sF m`: stage `stage`'s forward of micro-batch `micro`.
    fn forward(&mut self, stage: usize, micro: usize) -> Result<(), Self::Error>;
    /// `sB m`: its backward (the last stage's includes the loss).
    fn backward(&mut self, stage: usize, micro: usize) -> Result<(), Self::Error>;
    /// `sSEND_F m` (stage s's output to `peer`, the rank of stage s+1) or `sSEND_B m` (stage s's
    /// input gradient to the rank of stage s-1). Posted, not awaited.
    fn send(&mut self, action: Action, peer: usize) -> Result<(), Self::Error>;
    /// `sRECV_F m` (stage s's input from `peer`, the rank of stage s-1) or `sRECV_B m` (stage s's
    /// output gradient from the rank of stage s+1). Usable when it returns.
    fn recv(&mut self, action: Action, peer: usize) -> Result<(), Self::Error>;
    /// After the last action: waits for the sends still in flight.
    fn finish(&mut self) -> Result<(), Self::Error>;
}

/// Why a rank's part of a schedule did not run.
#[derive(thiserror::Error, Debug)]
pub enum ExecError<E> {
    /// The schedule has no send/recv: run [`crate::lower()`] first.
    #[error("the schedule is not lowered (it lists no SEND/RECV): lower it before executing it")]
    NotLowered,
    /// The rank is not one of the schedule's.
    #[error("rank {rank} is not in a schedule of pp = {pp}")]
    NoSuchRank { rank: usize, pp: usize },
    /// Two ranks would post their messages to each other in different orders.
    #[error("the schedule cannot run on order-matched point-to-point: {0}")]
    TransferOrder(String),
    /// An action that cannot run in this schedule at all (a schedule edited by hand): its stage
    /// or micro-batch does not exist, or it is a transfer past either end of the pipeline
    /// (`0SEND_B`, `0RECV_F`, or `SEND_F`/`RECV_B` of the last stage), which has no peer.
    #[error("action {action} at position {index} of rank {rank}'s list cannot run: {}", why.explain(*action))]
    Invalid { rank: usize, index: usize, action: Action, why: Invalid },
    /// An action names a stage this rank does not hold (a schedule edited by hand).
    #[error("action {action} at position {index} of rank {rank}'s list belongs to rank {owner}")]
    WrongRank { rank: usize, index: usize, action: Action, owner: usize },
    /// The runner failed on an action.
    #[error("rank {rank}, action {action} (position {index}): {source}")]
    Runner { rank: usize, index: usize, action: Action, source: E },
}

/// Measured times of one rank's actions, in microseconds from the start of [`execute`]: the
/// same shape as a simulated timeline's row, so the two can be compared or drawn alike.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub rank: usize,
    pub entries: Vec<Entry>,
    /// Until `finish` returned.
    pub total_us: u64,
}

/// Runs `rank`'s list of the lowered `schedule` through `runner`, in order, then `finish`.
pub fn execute<R: Runner>(schedule: &Schedule, rank: usize, runner: &mut R) -> Result<Trace, ExecError<R::Error>> {
    if rank >= schedule.ranks.len() {
        return Err(ExecError::NoSuchRank { rank, pp: schedule.ranks.len() });
    }
    if schedule.pp > 1 && !schedule.is_lowered() {
        return Err(ExecError::NotLowered);
    }
    let list = &schedule.ranks[rank];
    // Every action is checked before the first runs; `peers[i]`: the rank on the other side of
    // transfer i (the neighbour stage's, found without arithmetic that could wrap), or this rank
    // for a compute action.
    let stages = schedule.stages();
    let mut peers = Vec::with_capacity(list.len());
    for (index, &action) in list.iter().enumerate() {
        let invalid = |why| ExecError::Invalid { rank, index, action, why };
        Invalid::check(action, stages, schedule.microbatches).map_err(invalid)?;
        let owner = schedule.rank_of_stage(action.stage);
        if owner != rank {
            return Err(ExecError::WrongRank { rank, index, action, owner });
        }
        peers.push(match peer(action) {
            Some(other) => schedule.rank_of_stage(other.stage),
            None if action.op.is_compute() => rank,
            // Ruled out by `Invalid::check`; kept as an error rather than a wrong peer.
            None if matches!(action.op, Op::RecvF | Op::SendB) => return Err(invalid(Invalid::BeforeFirstStage)),
            None => return Err(invalid(Invalid::AfterLastStage)),
        });
    }
    check_transfer_order(schedule).map_err(ExecError::TransferOrder)?;
    let t0 = Instant::now();
    let us = |t: Instant| t.duration_since(t0).as_micros() as u64;
    let mut entries = Vec::with_capacity(list.len());
    for (index, (&action, &other)) in list.iter().zip(&peers).enumerate() {
        let Action { stage, micro, op } = action;
        let start = Instant::now();
        let r = match op {
            Op::F => runner.forward(stage, micro),
            Op::B => runner.backward(stage, micro),
            Op::SendF | Op::SendB => runner.send(action, other),
            Op::RecvF | Op::RecvB => runner.recv(action, other),
        };
        r.map_err(|source| ExecError::Runner { rank, index, action, source })?;
        entries.push(Entry { start: us(start), end: us(Instant::now()), action });
    }
    let last = list.last().copied().unwrap_or(Action::f(rank, 0));
    runner.finish().map_err(|source| ExecError::Runner { rank, index: list.len(), action: last, source })?;
    Ok(Trace { rank, entries, total_us: us(Instant::now()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::{interleaved_1f1b, one_f_one_b};
    use crate::lower::lower;

    /// Records what it is asked to do, and can be told to fail at one action.
    #[derive(Default)]
    struct Log {
        calls: Vec<String>,
        fail_at: Option<Action>,
    }

    impl Log {
        fn call(&mut self, a: Action, what: String) -> Result<(), String> {
            if self.fail_at == Some(a) {
                return Err("injected".into());
            }
            self.calls.push(what);
            Ok(())
        }
    }

    impl Runner for Log {
        type Error = String;
        fn forward(&mut self, s: usize, m: usize) -> Result<(), String> {
            self.call(Action::f(s, m), format!("{s}F{m}"))
        }
        fn backward(&mut self, s: usize, m: usize) -> Result<(), String> {
            self.call(Action::b(s, m), format!("{s}B{m}"))
        }
        fn send(&mut self, a: Action, peer: usize) -> Result<(), String> {
            self.call(a, format!("{a}>{peer}"))
        }
        fn recv(&mut self, a: Action, peer: usize) -> Result<(), String> {
            self.call(a, format!("{a}<{peer}"))
        }
        fn finish(&mut self) -> Result<(), String> {
            self.calls.push("finish".into());
            Ok(())
        }
    }

    #[test]
    fn runs_the_list_in_order_with_the_peers_of_loop_placement() {
        // pp = 2, v = 2: stages 0, 2 on rank 0 and 1, 3 on rank 1.
        let s = lower(&interleaved_1f1b(2, 2, 2).unwrap());
        for rank in 0..2 {
            let mut log = Log::default();
            let trace = execute(&s, rank, &mut log).unwrap();
            let want: Vec<String> = s.ranks[rank]
                .iter()
                .map(|a| match a.op {
                    Op::F | Op::B => a.to_string(),
                    // With pp = 2 the neighbour on either side is the other rank.
                    Op::SendF | Op::SendB => format!("{a}>{}", 1 - rank),
                    Op::RecvF | Op::RecvB => format!("{a}<{}", 1 - rank),
                })
                .chain(["finish".to_string()])
                .collect();
            assert_eq!(log.calls, want, "rank {rank}");
            assert_eq!(trace.entries.len(), s.ranks[rank].len());
            assert!(trace.entries.iter().all(|e| e.start <= e.end && e.end <= trace.total_us));
        }
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let compute_only = one_f_one_b(2, 2).unwrap();
        assert!(matches!(execute(&compute_only, 0, &mut Log::default()), Err(ExecError::NotLowered)));
        let s = lower(&compute_only);
        assert!(matches!(execute(&s, 2, &mut Log::default()), Err(ExecError::NoSuchRank { rank: 2, pp: 2 })));
        // Two sends swapped: the receiver would take each message for the other.
        let mut swapped = s.clone();
        let i = swapped.ranks[0].iter().position(|a| a.op == Op::SendF).unwrap();
        let j = swapped.ranks[0].iter().rposition(|a| a.op == Op::SendF).unwrap();
        swapped.ranks[0].swap(i, j);
        let e = execute(&swapped, 1, &mut Log::default()).unwrap_err().to_string();
        assert!(e.contains("transfer 0 from rank 0 to rank 1 is for 1RECV_F1 but rank 1 expects 1RECV_F0"), "{e}");
        let mut edited = s.clone();
        edited.ranks[0].push(Action::f(1, 0));
        let e = execute(&edited, 0, &mut Log::default()).unwrap_err();
        assert_eq!(e.to_string(), format!("action 1F0 at position {} of rank 0's list belongs to rank 1", s.ranks[0].len()));
        // Nothing ran before the check failed.
        let mut log = Log::default();
        let _ = execute(&edited, 0, &mut log);
        assert!(log.calls.is_empty());
    }

    #[test]
    fn transfers_past_either_end_and_unknown_stages_are_refused_before_anything_runs() {
        // pp = 2, v = 2: stages 0 and 2 on rank 0, 1 and 3 on rank 1.
        let s = lower(&interleaved_1f1b(2, 2, 2).unwrap());
        let cases: [(usize, &str, Invalid, &str); 6] = [
            // Stage 0 sending a gradient to stage -1: `stage - 1` used to wrap to usize::MAX
            // (peer rank usize::MAX % pp: rank 1 here) in release builds, or panic in debug ones.
            (0, "0SEND_B0", Invalid::BeforeFirstStage, "stage 0 is the first stage and sends no input gradient"),
            (0, "0RECV_F1", Invalid::BeforeFirstStage, "stage 0 is the first stage and receives no forward input"),
            // The last stage sending on to stage 4, which does not exist (it used to go to rank 0).
            (1, "3SEND_F0", Invalid::AfterLastStage, "stage 3 is the last stage and sends no forward output"),
            (1, "3RECV_B1", Invalid::AfterLastStage, "stage 3 is the last stage and receives no output gradient"),
            (0, "4F0", Invalid::NoSuchStage { stages: 4 }, "stage 4 does not exist, the model has 4 stages"),
            (1, "1B2", Invalid::NoSuchMicro { microbatches: 2 }, "micro-batch 2 does not exist"),
        ];
        for (rank, text, why, words) in cases {
            let action: Action = text.parse().unwrap();
            let mut edited = s.clone();
            edited.ranks[rank].push(action);
            let index = s.ranks[rank].len();
            let mut log = Log::default();
            let e = execute(&edited, rank, &mut log).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(e, ExecError::Invalid { rank: r, index: i, action: a, why: w } if (r, i, a, w) == (rank, index, action, why)),
                "{text}: {msg}"
            );
            assert!(msg.starts_with(&format!("action {text} at position {index} of rank {rank}'s list cannot run: ")), "{msg}");
            assert!(msg.contains(words), "{msg}");
            assert!(log.calls.is_empty(), "{text}: ran {:?}", log.calls);
        }
        // The largest stage a text can name: no `stage + 1` overflow, just no such stage.
        let mut edited = s.clone();
        edited.ranks[1].insert(0, Action::new(usize::MAX, Op::SendF, 0));
        let e = execute(&edited, 1, &mut Log::default()).unwrap_err();
        assert!(matches!(e, ExecError::Invalid { why: Invalid::NoSuchStage { stages: 4 }, .. }), "{e}");
    }

    #[test]
    fn a_runner_failure_names_the_action_and_stops() {
        let s = lower(&one_f_one_b(2, 3).unwrap());
        let mut log = Log { fail_at: Some(Action::b(1, 1)), ..Log::default() };
        let e = execute(&s, 1, &mut log).unwrap_err().to_string();
        assert!(e.starts_with("rank 1, action 1B1 (position "), "{e}");
        assert!(e.ends_with("): injected"), "{e}");
        assert!(!log.calls.contains(&"finish".to_string()));
        assert!(!log.calls.iter().any(|c| c.starts_with("1F2")), "stopped at the failure: {:?}", log.calls);
    }
}
