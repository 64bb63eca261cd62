//! Rank ↔ coordinate mapping, group lists and validation, exhaustively over small grids.

use super::*;

const MAX_WORLD: usize = 64;

/// Every valid `(dp, pp, tp)` for every world size in `1..=MAX_WORLD`,
/// in the default order.
fn all_layouts() -> Vec<ParallelDims> {
    let mut out = Vec::new();
    for world in 1..=MAX_WORLD {
        for dp in 1..=world {
            for pp in 1..=world {
                if world % (dp * pp) != 0 {
                    continue;
                }
                let tp = world / (dp * pp);
                out.push(ParallelDims::new(dp, pp, tp, world).unwrap());
            }
        }
    }
    out
}

/// [`all_layouts`] in every rank order.
fn all_layouts_all_orders() -> Vec<ParallelDims> {
    let mut out = Vec::new();
    for d in all_layouts() {
        for order in RankOrder::ALL {
            out.push(d.with_order(order));
        }
    }
    out
}

/// The rank of `(dp, pp, tp)` by each order's documented formula.
fn formula(d: &ParallelDims, c: Coords) -> usize {
    match d.order {
        RankOrder::TpDpPp => c.pp * d.dp * d.tp + c.dp * d.tp + c.tp,
        RankOrder::TpPpDp => c.dp * d.pp * d.tp + c.pp * d.tp + c.tp,
    }
}

#[test]
fn enumerates_all_factorisations() {
    let layouts = all_layouts();
    // Number of ordered triples with product n, summed over n = 1..=MAX_WORLD.
    let expected: usize =
        (1..=MAX_WORLD).map(|n| (1..=n).filter(|d| n % d == 0).map(|d| (1..=n / d).filter(|e| (n / d) % e == 0).count()).sum::<usize>()).sum();
    assert_eq!(layouts.len(), expected);
    assert!(layouts.iter().any(|d| d.dp == 2 && d.pp == 2 && d.tp == 8));
    assert!(layouts.iter().any(|d| d.dp == 4 && d.pp == 4 && d.tp == 4));
    assert!(layouts.iter().all(|d| d.order == RankOrder::TpDpPp));
    assert_eq!(all_layouts_all_orders().len(), 2 * expected);
}

#[test]
fn default_order_is_megatron() {
    assert_eq!(RankOrder::default(), RankOrder::TpDpPp);
    assert_eq!(ParallelDims::single().order, RankOrder::TpDpPp);
    assert_eq!(ParallelDims::new(2, 2, 1, 4).unwrap().order, RankOrder::TpDpPp);
    assert_eq!(ParallelDims::from_config(0, 2, 1, 4).unwrap().order, RankOrder::TpDpPp);
    let d = ParallelDims::new(2, 2, 1, 4).unwrap().with_order(RankOrder::TpPpDp);
    assert_eq!(d.order, RankOrder::TpPpDp);
    assert_eq!((d.dp, d.pp, d.tp, d.world_size), (2, 2, 1, 4));
    assert_eq!(d.with_order(RankOrder::TpDpPp), ParallelDims::new(2, 2, 1, 4).unwrap());
}

#[test]
fn order_parse_display_and_key() {
    assert_eq!(KEY_ORDER, "parallel.order");
    for (text, order) in [("tp-dp-pp", RankOrder::TpDpPp), ("tp-pp-dp", RankOrder::TpPpDp)] {
        assert_eq!(text.parse::<RankOrder>().unwrap(), order);
        assert_eq!(order.to_string(), text);
        assert_eq!(order.as_str(), text);
    }
    for bad in ["", "dp-pp-tp", "TP-DP-PP", " tp-dp-pp", "tp-dp-pp\nx", "tp-dp"] {
        let e = bad.parse::<RankOrder>().unwrap_err();
        assert_eq!(e, TopologyError::UnknownOrder { value: bad.to_string() });
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        for needle in ["parallel.order", "\"tp-dp-pp\"", "\"tp-pp-dp\""] {
            assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
        }
    }
    assert_eq!(
        "pp-tp".parse::<RankOrder>().unwrap_err().to_string(),
        "parallel.order = \"pp-tp\" is not a known rank order: use \"tp-dp-pp\" \
         (default: tp fastest, pipeline outermost) or \"tp-pp-dp\" (data parallel outermost)"
    );
}

#[test]
fn outermost_first_matches_strides() {
    assert_eq!(RankOrder::TpDpPp.outermost_first(), [Dim::Pp, Dim::Dp, Dim::Tp]);
    assert_eq!(RankOrder::TpPpDp.outermost_first(), [Dim::Dp, Dim::Pp, Dim::Tp]);
    for d in all_layouts_all_orders() {
        let dims = d.order.outermost_first();
        let mut sorted = dims;
        sorted.sort_by_key(|&x| Dim::ALL.iter().position(|&y| y == x));
        assert_eq!(sorted, Dim::ALL, "each dimension once");
        // The innermost dimension has stride 1; each outer one the product
        // of the sizes inside it.
        let mut expected = 1;
        for &dim in dims.iter().rev() {
            assert_eq!(d.stride(dim), expected, "{d} {}: {dim}", d.order);
            expected *= d.size(dim);
        }
        assert_eq!(expected, d.world_size);
    }
}

#[test]
fn rank_coords_round_trip_and_layout_formula() {
    for d in all_layouts_all_orders() {
        for rank in 0..d.world_size {
            let c = d.coords(rank).unwrap();
            assert!(c.dp < d.dp && c.pp < d.pp && c.tp < d.tp, "{d}: {c}");
            assert_eq!(rank, formula(&d, c), "{d} {}: {c}", d.order);
            assert_eq!(d.rank_of(c).unwrap(), rank, "{d}: {c}");
        }
        // Every coordinate maps to a distinct rank.
        let mut ranks = Vec::new();
        for dp in 0..d.dp {
            for pp in 0..d.pp {
                for tp in 0..d.tp {
                    let c = Coords { dp, pp, tp };
                    let r = d.rank_of(c).unwrap();
                    assert_eq!(r, formula(&d, c), "{d} {}: {c}", d.order);
                    assert_eq!(d.coords(r).unwrap(), c);
                    ranks.push(r);
                }
            }
        }
        ranks.sort_unstable();
        assert_eq!(ranks, (0..d.world_size).collect::<Vec<_>>(), "{d}");
    }
}

#[test]
fn old_order_reproduces_old_formula() {
    // Written out independently of `formula` and `stride`.
    for base in all_layouts() {
        let d = base.with_order(RankOrder::TpPpDp);
        for rank in 0..d.world_size {
            let c = d.coords(rank).unwrap();
            assert_eq!((c.dp, c.pp, c.tp), (rank / (d.pp * d.tp), (rank / d.tp) % d.pp, rank % d.tp), "{d} rank {rank}");
        }
        let new = base.with_order(RankOrder::TpDpPp);
        for rank in 0..new.world_size {
            let c = new.coords(rank).unwrap();
            assert_eq!((c.dp, c.pp, c.tp), ((rank / new.tp) % new.dp, rank / (new.dp * new.tp), rank % new.tp), "{new} rank {rank}");
        }
        // The two orders coincide exactly when dp or pp is 1.
        let same = (0..d.world_size).all(|r| d.coords(r) == new.coords(r));
        assert_eq!(same, d.dp == 1 || d.pp == 1, "{d}");
    }
}

#[test]
fn groups_partition_world_and_vary_only_their_dim() {
    for d in all_layouts_all_orders() {
        for dim in Dim::ALL {
            let groups = d.groups(dim);
            let expected_named = match dim {
                Dim::Dp => d.dp_groups(),
                Dim::Pp => d.pp_groups(),
                Dim::Tp => d.tp_groups(),
            };
            assert_eq!(groups, expected_named);
            assert_eq!(groups.len(), d.world_size / d.size(dim), "{d} {dim}");
            assert!(groups.windows(2).all(|w| w[0][0] < w[1][0]), "{d} {dim}: groups not ordered by smallest rank");

            let mut all: Vec<usize> = groups.iter().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..d.world_size).collect::<Vec<_>>(), "{d} {dim}: not a partition");

            for group in &groups {
                assert_eq!(group.len(), d.size(dim), "{d} {dim}");
                assert!(group.windows(2).all(|w| w[0] < w[1]), "{d} {dim}: {group:?} not sorted");
                let first = d.coords(group[0]).unwrap();
                for (i, &r) in group.iter().enumerate() {
                    let c = d.coords(r).unwrap();
                    // Position in the group is the coordinate along `dim`…
                    assert_eq!(c.get(dim), i, "{d} {dim}: {group:?}");
                    // …and all other coordinates agree.
                    for other in Dim::ALL.into_iter().filter(|&o| o != dim) {
                        assert_eq!(c.get(other), first.get(other), "{d} {dim}: {group:?}");
                    }
                    assert_eq!(&d.group_of(r, dim).unwrap(), group, "{d} {dim} rank {r}");
                }
            }
        }
    }
}

#[test]
fn tp_groups_are_runs_of_consecutive_ranks() {
    for d in all_layouts_all_orders() {
        for (i, group) in d.tp_groups().into_iter().enumerate() {
            let run: Vec<usize> = (i * d.tp..(i + 1) * d.tp).collect();
            assert_eq!(group, run, "{d} {}", d.order);
        }
    }
}

#[test]
fn default_order_keeps_dp_groups_compact() {
    for base in all_layouts() {
        let d = base.with_order(RankOrder::TpDpPp);
        let block = d.dp * d.tp;
        for (i, group) in d.dp_groups().into_iter().enumerate() {
            let (lo, hi) = (group[0], *group.last().unwrap());
            // Inside one aligned block of dp × tp consecutive ranks (one
            // pipeline stage's ranks), spread only by the tp stride.
            assert_eq!(lo / block, hi / block, "{d}: {group:?}");
            assert_eq!(lo / block, i / d.tp, "{d}: {group:?}");
            assert_eq!(hi - lo, (d.dp - 1) * d.tp, "{d}: {group:?}");
            if d.tp == 1 {
                let contiguous: Vec<usize> = (lo..=hi).collect();
                assert_eq!(group, contiguous, "{d}");
            }
        }
        // Together with their tp peers, the dp groups of one stage fill
        // exactly one block of dp × tp consecutive ranks.
        for stage in 0..d.pp {
            let mut ranks: Vec<usize> = d.dp_groups().into_iter().flatten().filter(|&r| d.coords(r).unwrap().pp == stage).collect();
            ranks.sort_unstable();
            assert_eq!(ranks, (stage * block..(stage + 1) * block).collect::<Vec<_>>());
        }
        // The old order spreads them further whenever pipelining is on.
        let old = base.with_order(RankOrder::TpPpDp);
        let span = |g: &Vec<usize>| g.last().unwrap() - g[0];
        let new_span = d.dp_groups().iter().map(span).max().unwrap();
        let old_span = old.dp_groups().iter().map(span).max().unwrap();
        if d.dp > 1 && d.pp > 1 {
            assert!(new_span < old_span, "{d}: {new_span} vs {old_span}");
        } else {
            assert_eq!(new_span, old_span, "{d}");
        }
    }
}

#[test]
fn pipeline_neighbours_consistent_with_coords() {
    for d in all_layouts_all_orders() {
        for rank in 0..d.world_size {
            let c = d.coords(rank).unwrap();
            let prev = d.pp_prev(rank).unwrap();
            let next = d.pp_next(rank).unwrap();
            let at = |pp| d.rank_of(Coords { pp, ..c }).unwrap();
            assert_eq!(prev, (c.pp > 0).then(|| at(c.pp - 1)), "{d} {} rank {rank}", d.order);
            assert_eq!(next, (c.pp + 1 < d.pp).then(|| at(c.pp + 1)), "{d} {} rank {rank}", d.order);
            assert_eq!(d.is_first_stage(rank).unwrap(), c.pp == 0);
            assert_eq!(d.is_last_stage(rank).unwrap(), c.pp + 1 == d.pp);
            if let Some(p) = prev {
                let pc = d.coords(p).unwrap();
                assert_eq!((pc.dp, pc.pp + 1, pc.tp), (c.dp, c.pp, c.tp));
                assert_eq!(d.pp_next(p).unwrap(), Some(rank));
            }
            if let Some(n) = next {
                let nc = d.coords(n).unwrap();
                assert_eq!((nc.dp, nc.pp, nc.tp), (c.dp, c.pp + 1, c.tp));
                assert_eq!(d.pp_prev(n).unwrap(), Some(rank));
            }
        }
    }
}

#[test]
fn pipeline_neighbours_walk_each_pipeline_in_order() {
    for d in all_layouts_all_orders() {
        for pipeline in d.pp_groups() {
            // Walk forward from the first stage.
            let mut walk = vec![pipeline[0]];
            assert_eq!(d.pp_prev(pipeline[0]).unwrap(), None);
            while let Some(next) = d.pp_next(*walk.last().unwrap()).unwrap() {
                assert_eq!(d.pp_prev(next).unwrap(), walk.last().copied(), "{d}");
                walk.push(next);
                assert!(walk.len() <= d.pp, "{d}: pp_next does not terminate");
            }
            assert_eq!(walk, pipeline, "{d}");

            // Walk backward from the last stage.
            let mut back = vec![*pipeline.last().unwrap()];
            while let Some(prev) = d.pp_prev(*back.last().unwrap()).unwrap() {
                back.push(prev);
            }
            back.reverse();
            assert_eq!(back, pipeline, "{d}");

            for (stage, &r) in pipeline.iter().enumerate() {
                assert_eq!(d.is_first_stage(r).unwrap(), stage == 0, "{d} rank {r}");
                assert_eq!(d.is_last_stage(r).unwrap(), stage + 1 == d.pp, "{d} rank {r}");
            }
        }
    }
}

#[test]
fn documented_dp2_pp2_table() {
    let d = ParallelDims::new(2, 2, 1, 4).unwrap();
    // (rank, dp, pp), as in the crate docs.
    let table = [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)];
    for (rank, dp, pp) in table {
        assert_eq!(d.coords(rank).unwrap(), Coords { dp, pp, tp: 0 });
    }
    assert_eq!(d.pp_groups(), vec![vec![0, 2], vec![1, 3]]);
    assert_eq!(d.dp_groups(), vec![vec![0, 1], vec![2, 3]]);
    assert_eq!(d.tp_groups(), vec![vec![0], vec![1], vec![2], vec![3]]);
    assert_eq!(d.pp_next(1).unwrap(), Some(3));
    assert_eq!(d.pp_prev(2).unwrap(), Some(0));
    assert!(d.is_first_stage(1).unwrap() && d.is_last_stage(2).unwrap());
}

#[test]
fn old_order_dp2_pp2_table() {
    let d = ParallelDims::new(2, 2, 1, 4).unwrap().with_order(RankOrder::TpPpDp);
    let table = [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)];
    for (rank, dp, pp) in table {
        assert_eq!(d.coords(rank).unwrap(), Coords { dp, pp, tp: 0 });
    }
    assert_eq!(d.pp_groups(), vec![vec![0, 1], vec![2, 3]]);
    assert_eq!(d.dp_groups(), vec![vec![0, 2], vec![1, 3]]);
    assert_eq!(d.group_of(3, Dim::Dp).unwrap(), vec![1, 3]);
    assert_eq!(d.pp_next(0).unwrap(), Some(1));
    assert_eq!(d.pp_next(1).unwrap(), None);
}

#[test]
fn megatron_order_with_tp() {
    // dp 2 × pp 2 × tp 2: tp peers adjacent, dp stride tp, pp stride dp × tp.
    let d = ParallelDims::new(2, 2, 2, 8).unwrap();
    assert_eq!(d.tp_groups(), vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]);
    assert_eq!(d.dp_groups(), vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]);
    assert_eq!(d.pp_groups(), vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]);
    assert_eq!(d.coords(6).unwrap(), Coords { dp: 1, pp: 1, tp: 0 });
    assert_eq!(d.coords(5).unwrap(), Coords { dp: 0, pp: 1, tp: 1 });
    assert_eq!(d.pp_next(1).unwrap(), Some(5));
    assert_eq!(d.pp_prev(7).unwrap(), Some(3));
}

#[test]
fn old_order_with_tp() {
    // dp 2 × pp 2 × tp 2 in the old order: pipeline stride tp, dp stride pp × tp.
    let d = ParallelDims::new(2, 2, 2, 8).unwrap().with_order(RankOrder::TpPpDp);
    assert_eq!(d.tp_groups(), vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]);
    assert_eq!(d.pp_groups(), vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]);
    assert_eq!(d.dp_groups(), vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]);
    assert_eq!(d.coords(6).unwrap(), Coords { dp: 1, pp: 1, tp: 0 });
    assert_eq!(d.pp_next(1).unwrap(), Some(3));
    assert_eq!(d.pp_prev(7).unwrap(), Some(5));
}

#[test]
fn infers_dp() {
    for world in 1..=32usize {
        for pp in 1..=world {
            for tp in 1..=world {
                let r = ParallelDims::new(0, pp, tp, world);
                if world % (pp * tp) == 0 {
                    let d = r.unwrap();
                    assert_eq!((d.dp, d.pp, d.tp, d.world_size), (world / (pp * tp), pp, tp, world));
                } else {
                    assert!(matches!(r, Err(TopologyError::NotDivisible { .. })), "{world} {pp} {tp}");
                }
            }
        }
    }
    assert_eq!(ParallelDims::new(0, 1, 1, 1).unwrap(), ParallelDims::single());
}

#[test]
fn product_mismatch_message() {
    let e = ParallelDims::new(2, 2, 1, 6).unwrap_err();
    assert_eq!(
        e.to_string(),
        "parallel.dp × parallel.pp × parallel.tp = 2 × 2 × 1 = 4, but the job has 6 ranks (world size): \
         set them so the product is 6, or launch 4 ranks"
    );
    assert!(!e.to_string().contains('\n'));
    // Huge values do not overflow.
    let e = ParallelDims::new(usize::MAX, usize::MAX, 1, 4).unwrap_err();
    assert!(matches!(e, TopologyError::ProductMismatch { .. }), "{e}");
    assert!(e.to_string().contains(&(usize::MAX as u128 * usize::MAX as u128).to_string()), "{e}");
}

#[test]
fn not_divisible_message() {
    let e = ParallelDims::new(0, 4, 1, 6).unwrap_err();
    let msg = e.to_string();
    for needle in ["parallel.dp", "parallel.pp", "parallel.tp", "6", "4 × 1 = 4", "multiple of 4"] {
        assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
    }
    assert!(!msg.contains('\n'));
    // pp × tp larger than the world is reported the same way.
    let msg = ParallelDims::new(0, 4, 2, 4).unwrap_err().to_string();
    assert!(msg.contains("4 × 2 = 8") && msg.contains("world size 4"), "{msg}");
}

#[test]
fn zero_and_negative_sizes() {
    let msg = ParallelDims::new(1, 0, 1, 1).unwrap_err().to_string();
    assert!(msg.starts_with("parallel.pp = 0") && msg.contains("set parallel.pp to at least 1"), "{msg}");
    let msg = ParallelDims::new(1, 1, 0, 1).unwrap_err().to_string();
    assert!(msg.starts_with("parallel.tp = 0") && msg.contains("set parallel.tp to at least 1"), "{msg}");
    assert_eq!(ParallelDims::new(1, 1, 1, 0).unwrap_err(), TopologyError::ZeroWorldSize);
    assert!(ParallelDims::new(0, 1, 1, 0).unwrap_err().to_string().contains("world size is 0"));

    let msg = ParallelDims::from_config(-1, 1, 1, 4).unwrap_err().to_string();
    assert!(msg.starts_with("parallel.dp = -1 is negative") && msg.contains("or 0 to infer"), "{msg}");
    let msg = ParallelDims::from_config(1, -2, 1, 4).unwrap_err().to_string();
    assert!(msg.starts_with("parallel.pp = -2 is negative"), "{msg}");
    let msg = ParallelDims::from_config(1, 1, -3, 4).unwrap_err().to_string();
    assert!(msg.starts_with("parallel.tp = -3 is negative"), "{msg}");
    assert_eq!(ParallelDims::from_config(0, 2, 1, 4).unwrap(), ParallelDims::new(2, 2, 1, 4).unwrap());
    assert_eq!(ParallelDims::from_config(1, 0, 1, 1).unwrap_err(), TopologyError::ZeroSize { key: KEY_PP });
}

#[test]
fn out_of_range_queries() {
    let d = ParallelDims::new(2, 2, 1, 4).unwrap();
    let e = d.coords(4).unwrap_err();
    assert_eq!(e.to_string(), "rank 4 is out of range: the job has 4 ranks (0..=3)");
    for r in [4, 5, usize::MAX] {
        assert!(d.coords(r).is_err());
        assert!(d.group_of(r, Dim::Dp).is_err());
        assert!(d.pp_prev(r).is_err());
        assert!(d.pp_next(r).is_err());
        assert!(d.is_first_stage(r).is_err());
        assert!(d.is_last_stage(r).is_err());
    }
    let msg = d.rank_of(Coords { dp: 0, pp: 2, tp: 0 }).unwrap_err().to_string();
    assert_eq!(msg, "coordinates (dp 0, pp 2, tp 0) are out of range for parallel.dp × parallel.pp × parallel.tp = 2 × 2 × 1");
    assert!(d.rank_of(Coords { dp: 2, pp: 0, tp: 0 }).is_err());
    assert!(d.rank_of(Coords { dp: 0, pp: 0, tp: 1 }).is_err());
}

#[test]
fn display_and_keys() {
    let d = ParallelDims::new(4, 2, 1, 8).unwrap();
    assert_eq!(d.to_string(), "dp 4 × pp 2 × tp 1 = 8 ranks");
    assert!(d.dp_enabled() && d.pp_enabled() && !d.tp_enabled());
    assert_eq!(Dim::Pp.key(), "parallel.pp");
    assert_eq!(Dim::Tp.to_string(), "tp");
}
