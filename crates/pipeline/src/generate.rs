//! Compute-only schedule generators: each returns, per rank, the order of its `F`/`B` actions.
//!
//! No communication is listed here; [`crate::lower()`] inserts it. Every generator validates its
//! shape with [`Schedule::validate`] first, so the errors name the config key to change.

use crate::action::Action;
use crate::schedule::{Kind, Schedule, ScheduleError};

/// GPipe: every rank runs all m forwards, then all m backwards.
///
/// Backwards run in micro-batch order 0..m (as torch's `ScheduleGPipe` does), not in reverse:
/// activations are then freed first-in-first-out, the same queue discipline as 1F1B, and each
/// stage's backwards stay in micro order, an invariant the executor and the tests rely on. With
/// uniform costs the makespan is `(m + pp - 1)·(f + b)` either way.
pub fn gpipe(pp: usize, microbatches: usize) -> Result<Schedule, ScheduleError> {
    Schedule::validate(Kind::GPipe, pp, 1, microbatches)?;
    let ranks = (0..pp)
        .map(|r| {
            let forwards = (0..microbatches).map(|m| Action::f(r, m));
            let backwards = (0..microbatches).map(|m| Action::b(r, m));
            forwards.chain(backwards).collect()
        })
        .collect();
    Ok(Schedule { kind: Kind::GPipe, pp, virtual_stages: 1, microbatches, ranks })
}

/// Megatron-LM's non-interleaved 1F1B (`forward_backward_pipelining_without_interleaving`).
///
/// Rank r runs `w = min(pp - r - 1, m)` warm-up forwards, then `m - w` steady pairs
/// "forward micro w + i, backward micro i", then `w` cool-down backwards. The last rank has no
/// warm-up; with `m < pp - r - 1` the rank degenerates to GPipe order. At most `w + 1 ≤ pp - r`
/// micro-batches are in flight on rank r.
pub fn one_f_one_b(pp: usize, microbatches: usize) -> Result<Schedule, ScheduleError> {
    Schedule::validate(Kind::OneFOneB, pp, 1, microbatches)?;
    let m = microbatches;
    let ranks = (0..pp)
        .map(|r| {
            let warmup = (pp - r - 1).min(m);
            let mut list = Vec::with_capacity(2 * m);
            list.extend((0..warmup).map(|i| Action::f(r, i)));
            for i in 0..m - warmup {
                list.push(Action::f(r, warmup + i));
                list.push(Action::b(r, i));
            }
            list.extend((m - warmup..m).map(|i| Action::b(r, i)));
            list
        })
        .collect();
    Ok(Schedule { kind: Kind::OneFOneB, pp, virtual_stages: 1, microbatches, ranks })
}

/// Megatron-LM's interleaved 1F1B (`forward_backward_pipelining_with_interleaving` in
/// `megatron/schedules.py`), which torch's `ScheduleInterleaved1F1B` reproduces for
/// `m % pp == 0`.
///
/// Rank r runs `m·v` forwards and `m·v` backwards. Its k-th forward walks micro-batches in
/// groups of pp per model chunk (`interleaved_forward` below); its k-th backward walks the same
/// groups with the chunks reversed (last chunk first). The order is
/// `w = min((pp - r - 1)·2 + (v - 1)·pp, m·v)` warm-up forwards, then steady pairs
/// "forward w + k, backward k", then the remaining backwards.
///
/// One deliberate difference from Megatron's code: when `m == pp` it makes *every* forward a
/// warm-up forward (`all_warmup_microbatches`). torch's generator has no such special case,
/// and neither do we: the formula order is deadlock-free for `m == pp` too (the tests simulate
/// it) and holds fewer activations (`w + 1` instead of `m·v` on all but the capped ranks).
pub fn interleaved_1f1b(pp: usize, virtual_stages: usize, microbatches: usize) -> Result<Schedule, ScheduleError> {
    Schedule::validate(Kind::Interleaved1F1B, pp, virtual_stages, microbatches)?;
    let total = microbatches * virtual_stages;
    let ranks = (0..pp)
        .map(|r| {
            let warmup = interleaved_warmup(pp, virtual_stages, microbatches, r);
            let fwd = |k| interleaved_forward(pp, virtual_stages, r, k);
            let bwd = |k| interleaved_backward(pp, virtual_stages, r, k);
            let mut list = Vec::with_capacity(2 * total);
            list.extend((0..warmup).map(fwd));
            for k in 0..total - warmup {
                list.push(fwd(warmup + k));
                list.push(bwd(k));
            }
            list.extend((total - warmup..total).map(bwd));
            list
        })
        .collect();
    Ok(Schedule { kind: Kind::Interleaved1F1B, pp, virtual_stages, microbatches, ranks })
}

/// Warm-up forwards of rank r in the interleaved schedule:
/// `min((pp - r - 1)·2 + (v - 1)·pp, m·v)`. The `(v - 1)·pp` term lets the last rank's first
/// backward (on the last chunk) find its forward done; each hop toward rank 0 adds two, one for
/// the forward and one for the gradient still travelling back.
///
/// Meant for `r < pp`, `v ≥ 1` and a shape [`Schedule::validate`] accepts; outside that the
/// arithmetic saturates (a rank past the last warms up like the last) instead of wrapping.
pub fn interleaved_warmup(pp: usize, virtual_stages: usize, microbatches: usize, rank: usize) -> usize {
    let hops = pp.saturating_sub(rank).saturating_sub(1);
    hops.saturating_mul(2).saturating_add(virtual_stages.saturating_sub(1).saturating_mul(pp)).min(microbatches.saturating_mul(virtual_stages))
}

/// The k-th forward of rank r (Megatron's `get_model_chunk_id(k, forward=True)`): within each
/// group of `pp·v` forwards, the first pp go to chunk 0, the next pp to chunk 1, ...; the
/// micro-batch is `(k / (pp·v))·pp + k % pp`.
fn interleaved_forward(pp: usize, v: usize, rank: usize, k: usize) -> Action {
    let chunk = (k % (pp * v)) / pp;
    Action::f(chunk * pp + rank, interleaved_micro(pp, v, k))
}

/// The k-th backward of rank r: same grouping as the forwards, chunks in reverse order.
fn interleaved_backward(pp: usize, v: usize, rank: usize, k: usize) -> Action {
    let chunk = v - 1 - (k % (pp * v)) / pp;
    Action::b(chunk * pp + rank, interleaved_micro(pp, v, k))
}

fn interleaved_micro(pp: usize, v: usize, k: usize) -> usize {
    (k / (pp * v)) * pp + k % pp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &Schedule) -> Vec<String> {
        s.rank_lines()
    }

    #[test]
    fn gpipe_small() {
        let s = gpipe(2, 3).unwrap();
        assert_eq!(text(&s), ["0F0 0F1 0F2 0B0 0B1 0B2", "1F0 1F1 1F2 1B0 1B1 1B2"]);
    }

    #[test]
    fn one_f_one_b_matches_megatron_by_hand() {
        // pp = 4, m = 6: rank 0 warms up 3, rank 3 none.
        let s = one_f_one_b(4, 6).unwrap();
        assert_eq!(
            text(&s),
            [
                "0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0B3 0B4 0B5",
                "1F0 1F1 1F2 1B0 1F3 1B1 1F4 1B2 1F5 1B3 1B4 1B5",
                "2F0 2F1 2B0 2F2 2B1 2F3 2B2 2F4 2B3 2F5 2B4 2B5",
                "3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5",
            ]
        );
    }

    #[test]
    fn one_f_one_b_with_fewer_microbatches_than_ranks() {
        // m = 1 < pp - 1: every rank is F0 then B0.
        let s = one_f_one_b(4, 1).unwrap();
        for (r, list) in s.ranks.iter().enumerate() {
            assert_eq!(list, &[Action::f(r, 0), Action::b(r, 0)]);
        }
        // m = 2, pp = 4: rank 0 and 1 warm up both (GPipe order), rank 3 alternates.
        let s = one_f_one_b(4, 2).unwrap();
        assert_eq!(text(&s), ["0F0 0F1 0B0 0B1", "1F0 1F1 1B0 1B1", "2F0 2F1 2B0 2B1", "3F0 3B0 3F1 3B1"]);
    }

    #[test]
    fn interleaved_matches_megatron_by_hand() {
        // pp = 2, v = 2, m = 4: stages 0,2 on rank 0 and 1,3 on rank 1.
        // Rank 0 warm-up = 2 + 2 = 4, rank 1 = 0 + 2 = 2.
        let s = interleaved_1f1b(2, 2, 4).unwrap();
        assert_eq!(
            text(&s),
            ["0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3", "1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3",]
        );
    }

    #[test]
    fn interleaved_warmup_is_megatrons_formula() {
        assert_eq!(interleaved_warmup(4, 2, 8, 0), 6 + 4);
        assert_eq!(interleaved_warmup(4, 2, 8, 3), 4);
        // 6 + 8 = 14 forwards wanted, capped at m·v = 12: every forward is a warm-up one.
        assert_eq!(interleaved_warmup(4, 3, 4, 0), 12);
        assert_eq!(interleaved_warmup(1, 2, 3, 0), 1);
        // Outside its domain it saturates rather than wraps (or panics in debug builds).
        assert_eq!(interleaved_warmup(4, 2, 8, 9), 4);
        assert_eq!(interleaved_warmup(4, 0, 8, 0), 0);
        assert_eq!(interleaved_warmup(usize::MAX, usize::MAX, usize::MAX, 0), usize::MAX);
    }

    #[test]
    fn generators_reject_invalid_shapes() {
        assert_eq!(gpipe(0, 4).unwrap_err(), ScheduleError::ZeroPp);
        assert_eq!(one_f_one_b(2, 0).unwrap_err(), ScheduleError::ZeroMicrobatches { pp: 2 });
        assert_eq!(interleaved_1f1b(2, 1, 4).unwrap_err(), ScheduleError::InterleavedNeedsChunks { v: 1 });
        assert_eq!(interleaved_1f1b(4, 2, 6).unwrap_err(), ScheduleError::MicrobatchesNotMultiple { m: 6, pp: 4 });
    }
}
