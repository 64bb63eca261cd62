//! The simulator's error: which ranks can never make progress, and why.
//!
//! A schedule "deadlocks" when every rank that has actions left is stuck: it waits for an
//! action that no rank will ever complete, or it holds an action that cannot run at all (a
//! stage or micro-batch the schedule does not have). The message names, per stuck rank, the
//! action it is stuck at and what it waits for, e.g.
//! `rank 1 waits at 1RECV_F0 for 0SEND_F0, which rank 0 never posts`.

use std::fmt;

use crate::action::{Action, Op};

/// A schedule that cannot run to completion. Lists every rank that still has actions left.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("the pipeline schedule deadlocks: {}", join(.blocked))]
pub struct Deadlock {
    /// One entry per stuck rank, in rank order.
    pub blocked: Vec<Blocked>,
}

/// One rank that cannot make progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// The stuck rank.
    pub rank: usize,
    /// Position of `at` in the rank's list.
    pub index: usize,
    /// The action the rank cannot run.
    pub at: Action,
    /// Why it cannot.
    pub cause: Cause,
}

/// Why a rank cannot run its next action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// It needs `needs`, which no rank's list contains; loop placement would put it on `owner`.
    NeverPosted { needs: Action, owner: usize },
    /// It needs `needs`, which `rank`'s list holds after the point where `rank` is stuck
    /// (`stuck_at`). When `rank` is the blocked rank itself, `needs` comes later in its own list.
    NotReached { needs: Action, rank: usize, stuck_at: Action },
    /// The action can never run, whatever the other ranks do.
    Invalid(Invalid),
}

/// An action that names something the schedule does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// The stage is not in `0..stages`.
    NoSuchStage { stages: usize },
    /// The micro-batch is not in `0..microbatches`.
    NoSuchMicro { microbatches: usize },
    /// `0RECV_F` or `0SEND_B`: stage 0 has no previous stage.
    BeforeFirstStage,
    /// `RECV_B` or `SEND_F` on the last stage: it has no next stage.
    AfterLastStage,
}

impl Invalid {
    /// Whether `a` can run at all in a schedule of `stages` stages and `microbatches`
    /// micro-batches: its stage and micro-batch exist, and a transfer has a stage on the other
    /// side (`0RECV_F` and `0SEND_B` have none before stage 0; `SEND_F` and `RECV_B` of the last
    /// stage none after it). The neighbour is never computed, so nothing can overflow.
    pub fn check(a: Action, stages: usize, microbatches: usize) -> Result<(), Invalid> {
        if a.stage >= stages {
            return Err(Invalid::NoSuchStage { stages });
        }
        if a.micro >= microbatches {
            return Err(Invalid::NoSuchMicro { microbatches });
        }
        // `stages ≥ 1` here (a.stage < stages), so `stages - 1` is the last stage.
        let last = stages - 1;
        match a.op {
            Op::RecvF | Op::SendB if a.stage == 0 => Err(Invalid::BeforeFirstStage),
            Op::SendF | Op::RecvB if a.stage == last => Err(Invalid::AfterLastStage),
            _ => Ok(()),
        }
    }

    /// Why `at` cannot run, e.g. `stage 0 is the first stage and sends no input gradient`.
    pub fn explain(self, at: Action) -> String {
        match self {
            Invalid::NoSuchStage { stages } => {
                format!("stage {} does not exist, the model has {stages} stages", at.stage)
            }
            Invalid::NoSuchMicro { microbatches } => {
                format!("micro-batch {} does not exist, the schedule has {microbatches} micro-batches", at.micro)
            }
            Invalid::BeforeFirstStage => {
                let what = if at.op == Op::RecvF { "receives no forward input" } else { "sends no input gradient" };
                format!("stage 0 is the first stage and {what}")
            }
            Invalid::AfterLastStage => {
                let what = if at.op == Op::SendF { "sends no forward output" } else { "receives no output gradient" };
                format!("stage {} is the last stage and {what}", at.stage)
            }
        }
    }
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (rank, at) = (self.rank, self.at);
        match &self.cause {
            Cause::NeverPosted { needs, owner } => {
                let verb = if needs.op.is_comm() { "posts" } else { "runs" };
                write!(f, "rank {rank} waits at {at} for {needs}, which rank {owner} never {verb}")
            }
            Cause::NotReached { needs, rank: other, .. } if *other == rank => {
                write!(f, "rank {rank} waits at {at} for {needs}, which comes later in rank {rank}'s own list")
            }
            Cause::NotReached { needs, rank: other, stuck_at } => {
                write!(f, "rank {rank} waits at {at} for {needs}, which rank {other} only reaches after {stuck_at}, where it is stuck")
            }
            Cause::Invalid(why) => {
                write!(f, "rank {rank} cannot run {at} (position {}): {}", self.index, why.explain(at))
            }
        }
    }
}

fn join(blocked: &[Blocked]) -> String {
    blocked.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(text: &str) -> Action {
        text.parse().unwrap()
    }

    #[test]
    fn messages_name_rank_action_and_cause() {
        let d = Deadlock {
            blocked: vec![
                Blocked { rank: 0, index: 2, at: a("0RECV_B0"), cause: Cause::NotReached { needs: a("1SEND_B0"), rank: 1, stuck_at: a("1RECV_F0") } },
                Blocked { rank: 1, index: 0, at: a("1RECV_F0"), cause: Cause::NeverPosted { needs: a("0SEND_F0"), owner: 0 } },
            ],
        };
        assert_eq!(
            d.to_string(),
            "the pipeline schedule deadlocks: \
             rank 0 waits at 0RECV_B0 for 1SEND_B0, which rank 1 only reaches after 1RECV_F0, where it is stuck; \
             rank 1 waits at 1RECV_F0 for 0SEND_F0, which rank 0 never posts"
        );
    }

    #[test]
    fn own_list_and_compute_wording() {
        let own = Blocked { rank: 2, index: 0, at: a("2SEND_F1"), cause: Cause::NotReached { needs: a("2F1"), rank: 2, stuck_at: a("2SEND_F1") } };
        assert_eq!(own.to_string(), "rank 2 waits at 2SEND_F1 for 2F1, which comes later in rank 2's own list");
        let never = Blocked { rank: 1, index: 3, at: a("1F0"), cause: Cause::NeverPosted { needs: a("0F0"), owner: 0 } };
        assert_eq!(never.to_string(), "rank 1 waits at 1F0 for 0F0, which rank 0 never runs");
    }

    #[test]
    fn check_finds_what_cannot_run_at_either_end() {
        // 4 stages, 2 micro-batches.
        let check = |text: &str| Invalid::check(a(text), 4, 2);
        for ok in ["0F0", "3B1", "0SEND_F1", "1RECV_F0", "1SEND_B0", "2RECV_B1", "3RECV_F0", "3SEND_B1", "0RECV_B0"] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        assert_eq!(check("0SEND_B0"), Err(Invalid::BeforeFirstStage));
        assert_eq!(check("0RECV_F1"), Err(Invalid::BeforeFirstStage));
        assert_eq!(check("3SEND_F0"), Err(Invalid::AfterLastStage));
        assert_eq!(check("3RECV_B0"), Err(Invalid::AfterLastStage));
        assert_eq!(check("4F0"), Err(Invalid::NoSuchStage { stages: 4 }));
        assert_eq!(check("1F2"), Err(Invalid::NoSuchMicro { microbatches: 2 }));
        // The largest stage and a schedule of usize::MAX stages: no neighbour arithmetic.
        let top = Action::new(usize::MAX, Op::SendF, 0);
        assert_eq!(Invalid::check(top, usize::MAX, 1), Err(Invalid::NoSuchStage { stages: usize::MAX }));
        let last = Action::new(usize::MAX - 1, Op::RecvB, 0);
        assert_eq!(Invalid::check(last, usize::MAX, 1), Err(Invalid::AfterLastStage));
        assert_eq!(Invalid::check(a("0F0"), 0, 1), Err(Invalid::NoSuchStage { stages: 0 }));
    }

    #[test]
    fn invalid_wording() {
        let cases = [
            ("9F0", Invalid::NoSuchStage { stages: 4 }, "stage 9 does not exist, the model has 4 stages"),
            ("1B7", Invalid::NoSuchMicro { microbatches: 4 }, "micro-batch 7 does not exist"),
            ("0RECV_F0", Invalid::BeforeFirstStage, "stage 0 is the first stage and receives no forward input"),
            ("0SEND_B0", Invalid::BeforeFirstStage, "sends no input gradient"),
            ("3SEND_F0", Invalid::AfterLastStage, "stage 3 is the last stage and sends no forward output"),
            ("3RECV_B0", Invalid::AfterLastStage, "receives no output gradient"),
        ];
        for (text, why, want) in cases {
            let b = Blocked { rank: 0, index: 5, at: a(text), cause: Cause::Invalid(why) };
            let msg = b.to_string();
            assert!(msg.starts_with(&format!("rank 0 cannot run {text} (position 5): ")), "{msg}");
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        }
    }
}
