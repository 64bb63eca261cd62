//! Exhaustive checks of every generated schedule: pp in 1..=8, m in 1..=16, and for the
//! interleaved schedule v in 2..=4 with m % pp == 0 (382 schedules in all).

use std::collections::{HashMap, HashSet};

use fabbrica_pipeline::{
    check_transfer_order, gpipe, interleaved_1f1b, interleaved_warmup, lower, one_f_one_b, peak_in_flight, peer, simulate, Action, Cause, Costs,
    Kind, Op, Schedule, Timeline,
};

/// Costs per virtual stage used by the exact makespan checks.
const F1B2: Costs = Costs { f: 1, b: 2, comm: 0 };

/// Every valid compute-only schedule of the ranges above.
fn all_schedules() -> Vec<Schedule> {
    let mut out = Vec::new();
    for pp in 1..=8 {
        for m in 1..=16 {
            out.push(gpipe(pp, m).unwrap());
            out.push(one_f_one_b(pp, m).unwrap());
            if m % pp == 0 {
                for v in 2..=4 {
                    out.push(interleaved_1f1b(pp, v, m).unwrap());
                }
            }
        }
    }
    assert_eq!(out.len(), 2 * 8 * 16 + 3 * (16 + 8 + 5 + 4 + 3 + 2 + 2 + 2));
    out
}

fn name(s: &Schedule) -> String {
    format!("{} pp={} v={} m={}", s.kind, s.pp, s.virtual_stages, s.microbatches)
}

/// Where each action sits: (rank, index). Panics on a duplicate.
fn positions(s: &Schedule) -> HashMap<Action, (usize, usize)> {
    let mut at = HashMap::new();
    for (r, list) in s.ranks.iter().enumerate() {
        for (i, &a) in list.iter().enumerate() {
            assert!(at.insert(a, (r, i)).is_none(), "{}: {a} listed twice", name(s));
        }
    }
    at
}

#[test]
fn every_stage_micro_has_one_f_and_one_b_on_its_rank() {
    for s in all_schedules() {
        let at = positions(&s);
        assert_eq!(s.ranks.len(), s.pp);
        assert_eq!(s.len(), 2 * s.stages() * s.microbatches, "{}", name(&s));
        for (a, &(r, _)) in &at {
            assert!(a.op.is_compute(), "{}: {a} in a compute-only list", name(&s));
            assert_eq!(r, a.stage % s.pp, "{}: {a} on rank {r}", name(&s));
        }
        for stage in 0..s.stages() {
            for m in 0..s.microbatches {
                assert!(at.contains_key(&Action::f(stage, m)), "{}: no {stage}F{m}", name(&s));
                assert!(at.contains_key(&Action::b(stage, m)), "{}: no {stage}B{m}", name(&s));
            }
        }
    }
}

#[test]
fn backwards_follow_forwards_and_each_stage_runs_in_micro_order() {
    for s in all_schedules() {
        let at = positions(&s);
        for (a, &(_, i)) in at.iter().filter(|(a, _)| a.op == Op::B) {
            let (_, j) = at[&Action::f(a.stage, a.micro)];
            assert!(j < i, "{}: {a} before its forward", name(&s));
        }
        for list in &s.ranks {
            let mut last: HashMap<(usize, Op), usize> = HashMap::new();
            for a in list {
                if let Some(prev) = last.insert((a.stage, a.op), a.micro) {
                    assert!(prev < a.micro, "{}: {}{}{} after micro {prev}", name(&s), a.stage, a.op, a.micro);
                }
            }
        }
    }
}

#[test]
fn lowering_pairs_every_send_with_one_recv_on_the_peer_rank() {
    for s in all_schedules() {
        let low = lower(&s);
        // Matchable by order alone (NCCL, MPI with one tag): between any two ranks, sends and
        // receives are posted in the same order.
        check_transfer_order(&low).unwrap_or_else(|e| panic!("{}: {e}", name(&s)));
        let at = positions(&low);
        // The compute order is unchanged.
        for (r, list) in low.ranks.iter().enumerate() {
            let compute: Vec<_> = list.iter().copied().filter(|a| a.op.is_compute()).collect();
            assert_eq!(compute, s.ranks[r], "{}", name(&s));
        }
        let mut comm = 0;
        for (&a, &(r, i)) in at.iter().filter(|(a, _)| a.op.is_comm()) {
            comm += 1;
            assert_eq!(r, low.rank_of_stage(a.stage), "{}: {a} on rank {r}", name(&s));
            let p = peer(a).unwrap_or_else(|| panic!("{}: {a} has no peer", name(&s)));
            let &(q, _) = at.get(&p).unwrap_or_else(|| panic!("{}: {a} has no matching {p}", name(&s)));
            assert_eq!(q, low.rank_of_stage(p.stage), "{}: {p} on rank {q}", name(&s));
            assert_ne!(q, r, "{}: {a} talks to its own rank", name(&s));
            // Each transfer sits next to its compute: a receive right before, a send right after.
            let neighbour = match a.op {
                Op::RecvF | Op::RecvB => low.ranks[r][i + 1],
                _ => low.ranks[r][i - 1],
            };
            let compute = if matches!(a.op, Op::SendF | Op::RecvF) { Op::F } else { Op::B };
            assert_eq!(neighbour, Action::new(a.stage, compute, a.micro), "{}: {a}", name(&s));
        }
        // pp ≥ 2: every one of the stages-1 boundaries carries m activations and m gradients,
        // each as one send and one receive.
        let boundaries = if s.pp == 1 { 0 } else { s.stages() - 1 };
        assert_eq!(comm, 4 * boundaries * s.microbatches, "{}", name(&s));
    }
}

/// Every interval respects its inputs: ranks run in order, compute after its data (plus comm
/// across ranks), receives after their send plus comm.
fn check_causality(s: &Schedule, t: &Timeline) {
    let mut end = HashMap::new();
    let mut rank_of = HashMap::new();
    for (r, entries) in t.ranks.iter().enumerate() {
        assert_eq!(entries.len(), s.ranks[r].len());
        for w in entries.windows(2) {
            assert!(w[0].end <= w[1].start, "{}: {} overlaps {}", name(s), w[0].action, w[1].action);
        }
        for e in entries {
            end.insert(e.action, e.end);
            rank_of.insert(e.action, r);
        }
    }
    let c = t.costs;
    let after = |e: &fabbrica_pipeline::Entry, dep: Action| {
        let cross = rank_of[&dep] != rank_of[&e.action];
        let delay = if cross && !s.is_lowered() { c.comm } else { 0 };
        assert!(e.start >= end[&dep] + delay, "{}: {} starts before {dep}", name(s), e.action);
    };
    let last = s.stages() - 1;
    for e in t.ranks.iter().flatten() {
        let a = e.action;
        match a.op {
            Op::F => {
                assert_eq!(e.end - e.start, c.f);
                if a.stage > 0 {
                    after(e, Action::f(a.stage - 1, a.micro));
                }
            }
            Op::B => {
                assert_eq!(e.end - e.start, c.b);
                after(e, Action::f(a.stage, a.micro));
                if a.stage < last {
                    after(e, Action::b(a.stage + 1, a.micro));
                }
            }
            Op::RecvF | Op::RecvB => {
                assert!(e.end >= end[&peer(a).unwrap()] + c.comm, "{}: {a}", name(s))
            }
            Op::SendF | Op::SendB => assert_eq!(e.start, e.end),
        }
    }
}

#[test]
fn every_schedule_simulates_without_deadlock_and_respects_causality() {
    let costs = [F1B2, Costs { f: 1, b: 1, comm: 1 }, Costs { f: 3, b: 5, comm: 2 }];
    for s in all_schedules() {
        let low = lower(&s);
        for c in costs {
            for sched in [&s, &low] {
                let t = simulate(sched, c).unwrap_or_else(|e| panic!("{} ({c:?}): {e}", name(sched)));
                check_causality(sched, &t);
                assert_eq!(t.peak_in_flight, peak_in_flight(&s));
            }
        }
        // Without transfer time, lowering changes no compute time.
        let times = |t: Timeline| {
            let mut v: Vec<_> = t.ranks.into_iter().flatten().filter(|e| e.action.op.is_compute()).map(|e| (e.action, e.start)).collect();
            v.sort();
            v
        };
        assert_eq!(times(simulate(&s, F1B2).unwrap()), times(simulate(&low, F1B2).unwrap()), "{}", name(&s));
    }
}

#[test]
fn gpipe_and_1f1b_take_m_plus_p_minus_1_slots() {
    for s in all_schedules().into_iter().filter(|s| s.kind != Kind::Interleaved1F1B) {
        let (pp, m) = (s.pp as u64, s.microbatches as u64);
        let t = simulate(&lower(&s), F1B2).unwrap();
        assert_eq!(t.makespan, (m + pp - 1) * (F1B2.f + F1B2.b), "{}", name(&s));
        // Bubble (pp-1)/(m+pp-1), exactly, on the first rank (and on every rank: all do m·(f+b)).
        for r in 0..s.pp {
            assert_eq!(t.idle(r) * (m + pp - 1), t.makespan * (pp - 1), "{} rank {r}", name(&s));
        }
        let want = (pp - 1) as f64 / (m + pp - 1) as f64;
        assert!((t.bubble[0] - want).abs() < 1e-12, "{}: {} vs {want}", name(&s), t.bubble[0]);
    }
}

/// Cost model: one rank's share of the model costs f = v, b = 2v in 1F1B (one chunk) and
/// f = 1, b = 2 per chunk in the interleaved schedule, so both do the same work per rank.
/// Megatron's claim is then exact here: the interleaved makespan is the ideal m·v·(f + b) plus
/// a bubble of (pp - 1)·(f + b), i.e. bubble / ideal = (pp - 1) / (v·m).
#[test]
fn interleaving_divides_the_bubble_by_v() {
    for s in all_schedules().into_iter().filter(|s| s.kind == Kind::Interleaved1F1B) {
        let (pp, v, m) = (s.pp as u64, s.virtual_stages as u64, s.microbatches as u64);
        let t = simulate(&lower(&s), F1B2).unwrap();
        let ideal = m * v * (F1B2.f + F1B2.b);
        let bubble = t.makespan - ideal;
        assert_eq!(bubble * v * m, ideal * (pp - 1), "{}: makespan {}", name(&s), t.makespan);
        let plain = simulate(&lower(&one_f_one_b(s.pp, s.microbatches).unwrap()), Costs { f: v, b: 2 * v, comm: 0 }).unwrap();
        assert_eq!(plain.makespan - ideal, (pp - 1) * v * (F1B2.f + F1B2.b));
        if m >= pp && pp >= 2 {
            assert!(t.makespan < plain.makespan, "{}: {} vs 1f1b {}", name(&s), t.makespan, plain.makespan);
        }
    }
}

#[test]
fn peak_activations_match_megatron() {
    for s in all_schedules() {
        let peaks = peak_in_flight(&s);
        assert_eq!(peaks, peak_in_flight(&lower(&s)), "{}", name(&s));
        let m = s.microbatches;
        for (r, &peak) in peaks.iter().enumerate() {
            let want = match s.kind {
                Kind::GPipe => m,
                Kind::OneFOneB => (s.pp - r).min(m),
                Kind::Interleaved1F1B => {
                    let warmup = interleaved_warmup(s.pp, s.virtual_stages, m, r);
                    assert!(peak <= warmup + 1, "{} rank {r}: {peak} > warm-up {warmup} + 1", name(&s));
                    (warmup + 1).min(m * s.virtual_stages)
                }
            };
            assert_eq!(peak, want, "{} rank {r}", name(&s));
        }
    }
}

#[test]
fn every_action_round_trips_through_text() {
    let mut seen = HashSet::new();
    for s in all_schedules() {
        for &a in lower(&s).ranks.iter().flatten() {
            if seen.insert(a) {
                assert_eq!(a.to_string().parse::<Action>(), Ok(a));
            }
        }
    }
    assert!(seen.len() > 1000);
}

#[test]
fn breaking_any_lowered_schedule_is_a_named_deadlock() {
    for s in all_schedules().into_iter().filter(|s| s.pp >= 2) {
        let low = lower(&s);

        // Drop rank 0's first send (always 0SEND_F0): rank 1 starts with 1RECV_F0 and never gets it.
        let mut dropped = low.clone();
        let first_send = dropped.ranks[0].iter().position(|a| a.op == Op::SendF).unwrap();
        assert_eq!(dropped.ranks[0].remove(first_send).to_string(), "0SEND_F0");
        let err = simulate(&dropped, F1B2).unwrap_err().deadlock().cloned().expect("a deadlock");
        let rank1 = err.blocked.iter().find(|b| b.rank == 1).unwrap_or_else(|| panic!("{}: {err}", name(&s)));
        assert_eq!((rank1.index, rank1.at.to_string()), (0, "1RECV_F0".to_string()));
        assert!(matches!(rank1.cause, Cause::NeverPosted { owner: 0, .. }));
        assert!(err.to_string().contains("rank 1 waits at 1RECV_F0 for 0SEND_F0, which rank 0 never posts"), "{}: {err}", name(&s));

        // Move rank 0's first gradient receive to the front: rank 0 waits for a gradient that
        // needs its own forward, a cycle through rank 1.
        let mut cycle = low.clone();
        let recv = cycle.ranks[0].iter().position(|a| a.op == Op::RecvB).unwrap();
        let moved = cycle.ranks[0].remove(recv);
        cycle.ranks[0].insert(0, moved);
        let err = simulate(&cycle, F1B2).unwrap_err().deadlock().cloned().expect("a deadlock");
        let rank0 = &err.blocked[0];
        assert_eq!((rank0.rank, rank0.index, rank0.at), (0, 0, moved), "{}: {err}", name(&s));
        let msg = err.to_string();
        assert!(msg.contains(&format!("rank 0 waits at {moved} for ")), "{}: {msg}", name(&s));
        assert!(msg.contains("rank 1 waits at 1RECV_F0 for 0SEND_F0, which rank 0 only reaches after"), "{}: {msg}", name(&s));
    }
}
