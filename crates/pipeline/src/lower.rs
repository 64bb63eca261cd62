//! Lowering: insert the `SEND_*`/`RECV_*` that a compute-only schedule implies.
//!
//! For every compute action of rank r (r is the list it sits in):
//! - `sF m`: `sRECV_F m` immediately before it if stage s-1 lives on another rank (stage 0
//!   reads the data loader and receives nothing); `sSEND_F m` immediately after it if stage
//!   s+1 lives on another rank (the last stage feeds the loss and sends nothing).
//! - `sB m`: `sRECV_B m` immediately before it if stage s+1 lives on another rank (the last
//!   stage's gradient comes from its own loss); `sSEND_B m` immediately after it if stage s-1
//!   lives on another rank.
//!
//! Placement: a receive sits right before the compute that consumes it and a send right after
//! the compute that produces it. That is the latest a receive can be posted and the earliest a
//! send can, so no rank waits on a transfer earlier than it must and activations leave as soon
//! as they exist. With sends posted asynchronously (isend; see [`crate::simulate()`]) the lowered
//! schedule deadlocks exactly when the compute order itself has a dependency cycle. An executor
//! that made sends blocking rendezvous (NCCL without grouping) would need Megatron's paired
//! `send_forward_recv_backward` calls instead; this pass does not model that.
//!
//! Stages on the same rank (only possible when pp == 1) hand tensors over in memory: with
//! pp == 1 nothing is inserted. Under loop placement with pp ≥ 2, neighbouring stages are always
//! on different ranks, so every stage boundary gets one send and one receive per direction.

use crate::action::{Action, Op};
use crate::schedule::Schedule;

/// Returns `schedule` with communication inserted around every compute action.
///
/// Existing `SEND_*`/`RECV_*` are dropped and derived again from the compute order, so
/// lowering a lowered schedule gives the same schedule (the pass is idempotent).
pub fn lower(schedule: &Schedule) -> Schedule {
    let stages = schedule.stages();
    let remote = |rank: usize, stage: usize| schedule.rank_of_stage(stage) != rank;
    let ranks = schedule
        .ranks
        .iter()
        .enumerate()
        .map(|(r, list)| {
            let mut out = Vec::with_capacity(list.len() * 3);
            for &a in list.iter().filter(|a| a.op.is_compute()) {
                let (s, m) = (a.stage, a.micro);
                // Checked: stage 0 has no previous stage, and a stage parsed from text may be
                // usize::MAX, which has no next one.
                let has_prev = s.checked_sub(1).is_some_and(|prev| remote(r, prev));
                let has_next = s.checked_add(1).is_some_and(|next| next < stages && remote(r, next));
                let (before, after) = match a.op {
                    Op::F => (has_prev.then_some(Op::RecvF), has_next.then_some(Op::SendF)),
                    _ => (has_next.then_some(Op::RecvB), has_prev.then_some(Op::SendB)),
                };
                out.extend(before.map(|op| Action::new(s, op, m)));
                out.push(a);
                out.extend(after.map(|op| Action::new(s, op, m)));
            }
            out
        })
        .collect();
    Schedule { ranks, ..schedule.clone() }
}

/// The action on the other side of a communication action: `sSEND_F m` ↔ `(s+1)RECV_F m`,
/// `sSEND_B m` ↔ `(s-1)RECV_B m`. `None` for compute actions and for the ends of the pipeline
/// (`0RECV_F`, `0SEND_B` have no peer; nor has stage `usize::MAX`, parsed from text, a next one).
pub fn peer(action: Action) -> Option<Action> {
    let Action { stage, micro, op } = action;
    match op {
        Op::SendF => stage.checked_add(1).map(|s| Action::new(s, Op::RecvF, micro)),
        Op::RecvF => stage.checked_sub(1).map(|s| Action::new(s, Op::SendF, micro)),
        Op::SendB => stage.checked_sub(1).map(|s| Action::new(s, Op::RecvB, micro)),
        Op::RecvB => stage.checked_add(1).map(|s| Action::new(s, Op::SendB, micro)),
        Op::F | Op::B => None,
    }
}

/// Checks that point-to-point messages can be matched by order alone, as NCCL and MPI (one tag)
/// match them: for every pair of ranks, the order in which one posts its sends to the other is
/// the order in which the other posts the matching receives. A schedule that breaks this would
/// deliver one message into another's buffer (same shapes: silently) on such transports, even
/// though it simulates fine (the simulator matches by name). Every generated schedule keeps it
/// (tested exhaustively); the executor checks it before running anything.
///
/// The error names the pair and the first position where the two orders differ.
pub fn check_transfer_order(schedule: &Schedule) -> Result<(), String> {
    let pp = schedule.ranks.len();
    let remote_peer = |a: &Action| peer(*a).map(|p| (schedule.rank_of_stage(p.stage), p));
    for src in 0..pp {
        for dst in (0..pp).filter(|&d| d != src) {
            // What src sends to dst, named by the receive it must meet, and what dst receives.
            let sent = schedule.ranks[src]
                .iter()
                .filter(|a| matches!(a.op, Op::SendF | Op::SendB))
                .filter_map(|a| remote_peer(a).filter(|(r, _)| *r == dst).map(|(_, p)| p));
            let received = schedule.ranks[dst]
                .iter()
                .filter(|a| matches!(a.op, Op::RecvF | Op::RecvB))
                .filter(|a| remote_peer(a).is_some_and(|(r, _)| r == src))
                .copied();
            let (sent, received): (Vec<Action>, Vec<Action>) = (sent.collect(), received.collect());
            if let Some(i) = (0..sent.len().max(received.len())).find(|&i| sent.get(i) != received.get(i)) {
                let name = |x: Option<&Action>| x.map_or("nothing".to_string(), ToString::to_string);
                return Err(format!(
                    "transfer {i} from rank {src} to rank {dst} is for {} but rank {dst} expects {} there; \
                     messages between two ranks are matched in order, so both lists must post them in the same order",
                    name(sent.get(i)),
                    name(received.get(i))
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::{interleaved_1f1b, one_f_one_b};
    use crate::schedule::Kind;

    fn text(s: &Schedule) -> Vec<String> {
        s.rank_lines()
    }

    #[test]
    fn one_f_one_b_two_ranks_by_hand() {
        let s = lower(&one_f_one_b(2, 2).unwrap());
        assert_eq!(text(&s), ["0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1", "1RECV_F0 1F0 1B0 1SEND_B0 1RECV_F1 1F1 1B1 1SEND_B1",]);
        assert!(s.is_lowered());
        assert_eq!((s.kind, s.pp, s.virtual_stages, s.microbatches), (Kind::OneFOneB, 2, 1, 2));
    }

    #[test]
    fn interleaved_wraps_around_ranks() {
        // pp = 2, v = 2: stage 1 (rank 1) sends to stage 2 (rank 0); stage 3 sends nothing.
        let s = lower(&interleaved_1f1b(2, 2, 2).unwrap());
        let r0 = &s.ranks[0];
        let r1 = &s.ranks[1];
        assert!(r1.contains(&"1SEND_F0".parse().unwrap()));
        assert!(r0.contains(&"2RECV_F0".parse().unwrap()));
        assert!(r0.contains(&"2SEND_B0".parse().unwrap()));
        assert!(r1.contains(&"1RECV_B0".parse().unwrap()));
        assert!(!r1.iter().any(|a| a.stage == 3 && (a.op == Op::SendF || a.op == Op::RecvB)));
        assert!(!r0.iter().any(|a| a.stage == 0 && (a.op == Op::RecvF || a.op == Op::SendB)));
    }

    #[test]
    fn single_rank_inserts_nothing() {
        for kind in Kind::ALL {
            let v = if kind == Kind::Interleaved1F1B { 3 } else { 1 };
            let s = Schedule::new(kind, 1, v, 5).unwrap();
            assert_eq!(lower(&s), s, "{kind}");
        }
    }

    #[test]
    fn lowering_is_idempotent() {
        let once = lower(&interleaved_1f1b(4, 2, 8).unwrap());
        assert_eq!(lower(&once), once);
    }

    #[test]
    fn lowering_stages_up_to_usize_max_does_not_overflow() {
        // A stage parsed from text may be usize::MAX: it has no next stage (no SEND_F/RECV_B),
        // and the neighbour rule applies to the previous one as to any other stage (stages past
        // the model are the simulator's and the executor's to refuse).
        let (m1, m) = (usize::MAX - 1, usize::MAX);
        let mut s = one_f_one_b(2, 1).unwrap();
        s.ranks[0].extend([Action::b(m1, 0), Action::f(m1, 0)]);
        s.ranks[1].extend([Action::f(m, 0), Action::b(m, 0)]);
        assert_eq!(
            text(&lower(&s)),
            [
                format!("0F0 0SEND_F0 0RECV_B0 0B0 {m1}B0 {m1}SEND_B0 {m1}RECV_F0 {m1}F0"),
                format!("1RECV_F0 1F0 1B0 1SEND_B0 {m}RECV_F0 {m}F0 {m}B0 {m}SEND_B0"),
            ]
        );
    }

    #[test]
    fn peers_pair_up() {
        for op in [Op::SendF, Op::RecvF, Op::SendB, Op::RecvB] {
            let a = Action::new(3, op, 7);
            assert_eq!(peer(peer(a).unwrap()), Some(a), "{a}");
        }
        assert_eq!(peer("0SEND_F1".parse().unwrap()), Some("1RECV_F1".parse().unwrap()));
        assert_eq!(peer("1SEND_B0".parse().unwrap()), Some("0RECV_B0".parse().unwrap()));
        assert_eq!(peer("0RECV_F0".parse().unwrap()), None);
        assert_eq!(peer("0SEND_B0".parse().unwrap()), None);
        assert_eq!(peer(Action::f(1, 1)), None);
        // The last representable stage has no next one (found by fuzzing: stage + 1 overflowed).
        assert_eq!(peer(Action::new(usize::MAX, Op::SendF, 0)), None);
        assert_eq!(peer(Action::new(usize::MAX, Op::RecvB, 0)), None);
    }
}
