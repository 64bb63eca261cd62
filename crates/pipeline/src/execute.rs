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
use crate::lower::check_transfer_order;
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
    check_transfer_order(schedule).map_err(ExecError::TransferOrder)?;
    let list = &schedule.ranks[rank];
    for (index, &action) in list.iter().enumerate() {
        let owner = schedule.rank_of_stage(action.stage);
        if owner != rank {
            return Err(ExecError::WrongRank { rank, index, action, owner });
        }
    }
    let t0 = Instant::now();
    let us = |t: Instant| t.duration_since(t0).as_micros() as u64;
    let mut entries = Vec::with_capacity(list.len());
    for (index, &action) in list.iter().enumerate() {
        let Action { stage, micro, op } = action;
        let start = Instant::now();
        let r = match op {
            Op::F => runner.forward(stage, micro),
            Op::B => runner.backward(stage, micro),
            Op::SendF => runner.send(action, schedule.rank_of_stage(stage + 1)),
            Op::SendB => runner.send(action, schedule.rank_of_stage(stage - 1)),
            Op::RecvF => runner.recv(action, schedule.rank_of_stage(stage - 1)),
            Op::RecvB => runner.recv(action, schedule.rank_of_stage(stage + 1)),
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
