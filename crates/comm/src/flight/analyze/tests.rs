//! The analysis on constructed dumps.

use super::*;
use crate::flight::json::{self, Value};

fn group(name: &str, members: &[usize], me: usize, ops: Vec<OpRecord>) -> GroupDump {
    GroupDump {
        name: name.into(),
        id: name.into(),
        backend: "mpi".into(),
        rank: members.iter().position(|&m| m == me).unwrap(),
        size: members.len(),
        members: members.to_vec(),
        recorded: ops.len() as u64,
        ops,
    }
}

fn dump(rank: usize, world: usize, reason: &str, groups: Vec<GroupDump>) -> Dump {
    Dump {
        rank,
        world_size: world,
        host: "node".into(),
        job: "j1".into(),
        pid: 100 + rank as u64,
        reason: reason.into(),
        capacity: 2000,
        mono_ns: 10_000_000_000,
        unix_ns: 1_700_000_000_000_000_000,
        groups,
    }
}

/// `n` completed all_reduces of 1000 f32, numbered from 1.
fn done(n: u64) -> Vec<OpRecord> {
    (1..=n).map(|s| OpRecord::collective(s, "all_reduce", "f32", 1000)).collect()
}

/// `done(n)`, then all_reduce #n+1 started 2 s before the dump.
fn stuck(n: u64) -> Vec<OpRecord> {
    let mut v = done(n);
    let mut op = OpRecord::collective(n + 1, "all_reduce", "f32", 1000);
    op.state = State::Started;
    op.started_ns = Some(8_000_000_000);
    op.ended_ns = None;
    v.push(op);
    v
}

#[test]
fn a_hung_job_names_the_rank_that_did_not_arrive() {
    let w = [0, 1, 2];
    let dumps = vec![
        dump(0, 3, "watchdog: all_reduce #2 ... did not complete", vec![group("world", &w, 0, stuck(1))]),
        dump(1, 3, "rank 0 aborted the job", vec![group("world", &w, 1, stuck(1))]),
        dump(2, 3, "rank 0 aborted the job", vec![group("world", &w, 2, done(1))]),
    ];
    let r = analyze("d", &dumps, &[]);
    assert!(r.missing.is_empty());
    let g = &r.groups[0];
    assert_eq!(g.behind, vec![2]);
    assert_eq!(g.not_called, Some((2, "all_reduce(f32, 1000 elements, sum)".into())));
    assert_eq!(g.divergence, None);
    assert_eq!(g.compared, (1, 2));
    assert_eq!((g.progress[0].called, g.progress[0].started, g.progress[0].completed), (2, 2, 1));
    assert_eq!(g.progress[0].in_flight.as_ref().unwrap().for_ns, 2_000_000_000);
    assert_eq!(r.look_at.len(), 1);
    assert_eq!(r.look_at[0].rank, 2);
    assert_eq!(
        r.look_at[0].why,
        "never called collective #2 (all_reduce(f32, 1000 elements, sum)) on group 'world', which ranks 0-1 were waiting in all_reduce(f32, 1000 elements, sum) #2 on group 'world'; it had no operation in flight"
    );
    assert_eq!(r.verdict, "rank 2 did not arrive where the others wait");
    let t = r.to_text();
    assert!(t.contains("behind: rank 2 (never called collective #2: all_reduce(f32, 1000 elements, sum))"), "{t}");
    assert!(t.contains("look at: rank 2: never called collective #2"), "{t}");
    assert!(t.contains("0-1               #2       #2         #1  in all_reduce(f32, 1000 elements, sum) #2 for 2.0s"), "{t}");
}

#[test]
fn the_rank_behind_is_shown_doing_something_else() {
    let w = [0, 1];
    let mut other = done(3);
    other[2].state = State::Started;
    other[2].started_ns = Some(8_000_000_000);
    other[2].ended_ns = None;
    let dumps = vec![
        dump(0, 2, "watchdog", vec![group("world", &w, 0, stuck(4)), group("pp", &w, 0, done(3))]),
        dump(1, 2, "aborted", vec![group("world", &w, 1, done(4)), group("pp", &w, 1, other)]),
    ];
    let r = analyze("d", &dumps, &[]);
    assert_eq!(r.look_at[0].rank, 1);
    assert!(r.look_at[0].why.ends_with("; it was in all_reduce(f32, 1000 elements, sum) #3 on group 'pp' for 2.0s"), "{}", r.look_at[0].why);
}

#[test]
fn a_mismatch_names_the_first_differing_number_and_both_sides() {
    let w = [0, 1, 2];
    let mut odd = done(3);
    odd[1].count = Some(999);
    // Later numbers differ too: only the first one counts.
    odd[2].op = "broadcast".into();
    odd[2].reduce = None;
    odd[2].root = Some(0);
    let dumps = vec![
        dump(0, 3, "communication error", vec![group("world", &w, 0, done(3))]),
        dump(1, 3, "communication error", vec![group("world", &w, 1, odd)]),
        dump(2, 3, "communication error", vec![group("world", &w, 2, done(3))]),
    ];
    let r = analyze("d", &dumps, &[]);
    let d = r.groups[0].divergence.as_ref().expect("a divergence");
    assert_eq!(d.seq, 2);
    assert_eq!(
        d.sides,
        vec![
            Side { ranks: vec![0, 2], what: "all_reduce(f32, 1000 elements, sum)".into() },
            Side { ranks: vec![1], what: "all_reduce(f32, 999 elements, sum)".into() },
        ]
    );
    assert_eq!(r.look_at.len(), 1);
    assert_eq!(r.look_at[0].rank, 1);
    assert_eq!(
        r.look_at[0].why,
        "called all_reduce(f32, 999 elements, sum) as collective #2 on group 'world', where ranks 0, 2 called all_reduce(f32, 1000 elements, sum)"
    );
    assert_eq!(r.verdict, "the ranks diverged at collective #2 on group 'world'");
    let t = r.to_text();
    assert!(
        t.contains(
            "diverged at collective #2: ranks 0, 2 called all_reduce(f32, 1000 elements, sum); rank 1 called all_reduce(f32, 999 elements, sum)"
        ),
        "{t}"
    );
}

#[test]
fn a_two_rank_mismatch_names_both() {
    let w = [0, 1];
    let mut b = done(2);
    b[1] = OpRecord { root: Some(0), reduce: None, ..OpRecord::collective(2, "broadcast", "f32", 1000) };
    let dumps = vec![dump(0, 2, "e", vec![group("world", &w, 0, done(2))]), dump(1, 2, "e", vec![group("world", &w, 1, b)])];
    let r = analyze("d", &dumps, &[]);
    assert_eq!(r.look_at.iter().map(|s| s.rank).collect::<Vec<_>>(), vec![0, 1]);
    assert!(r.look_at[1].why.starts_with("called broadcast(f32, 1000 elements, root 0) as collective #2"), "{}", r.look_at[1].why);
}

#[test]
fn a_killed_rank_has_no_dump_and_comes_first() {
    let w = [0, 1, 2];
    let dumps = vec![
        dump(0, 3, "watchdog: ... unreachable", vec![group("world", &w, 0, stuck(5))]),
        dump(1, 3, "rank 0 aborted the job", vec![group("world", &w, 1, stuck(5))]),
    ];
    let r = analyze("d", &dumps, &[]);
    assert_eq!(r.missing, vec![2]);
    assert_eq!(r.look_at.len(), 1);
    assert_eq!(r.look_at[0].rank, 2);
    assert_eq!(
        r.look_at[0].why,
        "left no dump (killed, crashed, or never started) while ranks 0-1 were waiting in all_reduce(f32, 1000 elements, sum) #6 on group 'world'"
    );
    assert_eq!(r.verdict, "rank 2 left no dump: start there");
    let t = r.to_text();
    assert!(t.contains("flight recorder dumps in d: 2 of 3 ranks"), "{t}");
    assert!(t.contains("  no dump: rank 2"), "{t}");
    assert!(t.contains("  2                  ?        ?          ?  no dump"), "{t}");
    assert!(t.contains("look at: rank 2: left no dump"), "{t}");
}

#[test]
fn a_healthy_job_and_a_stuck_backend() {
    let w = [0, 1];
    let dumps = vec![dump(0, 2, "SIGUSR2", vec![group("world", &w, 0, done(7))]), dump(1, 2, "SIGUSR2", vec![group("world", &w, 1, done(7))])];
    let r = analyze("d", &dumps, &[]);
    assert!(r.look_at.is_empty() && r.groups[0].behind.is_empty() && r.groups[0].divergence.is_none());
    assert_eq!(r.verdict, "no hang, divergence or failure in the records");
    let t = r.to_text();
    assert!(t.contains("ranks 0-1: SIGUSR2") && t.contains("idle and in step: 'world' (mpi)") && t.contains("look at: no rank in particular"), "{t}");

    let dumps = vec![dump(0, 2, "watchdog", vec![group("world", &w, 0, stuck(7))]), dump(1, 2, "abort", vec![group("world", &w, 1, stuck(7))])];
    let r = analyze("d", &dumps, &[]);
    assert!(r.look_at.is_empty());
    assert_eq!(
        r.verdict,
        "ranks 0-1 were waiting in all_reduce(f32, 1000 elements, sum) #8 on group 'world' and no rank is behind: suspect the backend or the network, not a rank"
    );
}

#[test]
fn wrapped_rings_are_compared_where_they_overlap_and_p2p_is_apart() {
    let w = [0, 1];
    let a: Vec<OpRecord> = done(60).into_iter().skip(49).collect(); // #50-#60
    let mut b: Vec<OpRecord> = done(60).into_iter().skip(39).collect(); // #40-#60
                                                                        // Point-to-point records have their own numbers: never compared with collectives, and an
                                                                        // unfinished receive is what the rank is doing.
    let mut recv = OpRecord { peer: Some(0), reduce: None, ..OpRecord::collective(1, "recv", "f32", 10) };
    recv.state = State::Started;
    recv.ended_ns = None;
    b.push(recv);
    let dumps = vec![dump(0, 2, "x", vec![group("world", &w, 0, a)]), dump(1, 2, "x", vec![group("world", &w, 1, b)])];
    let r = analyze("d", &dumps, &[]);
    let g = &r.groups[0];
    assert_eq!(g.compared, (50, 60));
    assert!(g.divergence.is_none() && g.behind.is_empty());
    assert_eq!(g.progress[1].called, 60);
    assert_eq!(g.progress[1].in_flight.as_ref().unwrap().what, "recv(f32, 10 elements, from rank 0) #1");
}

#[test]
fn groups_match_by_id_and_order_and_failures_are_reported() {
    // Two rings with one id (a group made twice) are told apart by their order.
    let w = [0, 1];
    let mut failed = done(2);
    failed[1].state = State::Failed;
    let d0 = dump(0, 2, "communication error", vec![group("dp", &w, 0, done(3)), group("dp", &w, 0, failed.clone())]);
    let d1 = dump(1, 2, "communication error", vec![group("dp", &w, 1, done(3)), group("dp", &w, 1, done(2))]);
    let r = analyze("d", &[d0, d1], &[]);
    assert_eq!(r.groups.len(), 2);
    assert!(r.groups.iter().all(|g| g.divergence.is_none() && g.behind.is_empty()));
    assert_eq!(r.groups[1].progress[0].failed.as_deref(), Some("all_reduce(f32, 1000 elements, sum) #2"));
    assert_eq!(r.verdict, "rank 0 reports a failed all_reduce(f32, 1000 elements, sum) #2; see the reasons above");
}

#[test]
fn a_large_world_fits_on_a_screen() {
    let n = 512;
    let w: Vec<usize> = (0..n).collect();
    let dumps: Vec<Dump> = (0..n)
        .filter(|&r| r != 300)
        .map(|r| {
            let ops = if r == 17 { done(9) } else { stuck(9) };
            dump(r, n, if r == 0 { "watchdog" } else { "rank 0 aborted the job" }, vec![group("world", &w, r, ops)])
        })
        .collect();
    let r = analyze("d", &dumps, &[]);
    assert_eq!(r.missing, vec![300]);
    assert_eq!(r.look_at.iter().map(|s| s.rank).collect::<Vec<_>>(), vec![300, 17]);
    let t = r.to_text();
    assert!(t.lines().count() <= 25, "{} lines:\n{t}", t.lines().count());
    assert!(t.contains("0-16, 18-299, 301-511"), "{t}");
}

#[test]
fn the_json_report_parses_and_holds_the_findings() {
    let w = [0, 1, 2];
    let dumps =
        vec![dump(0, 3, "watchdog \"quoted\"\nline", vec![group("world", &w, 0, stuck(1))]), dump(2, 3, "x", vec![group("world", &w, 2, done(1))])];
    let r = analyze("a\\dir", &dumps, &[("rank_1.json".into(), "invalid JSON".into())]);
    let v = json::parse(&r.to_json()).expect("valid JSON");
    assert_eq!(v.get("dir").and_then(Value::as_str), Some("a\\dir"));
    assert_eq!(v.get("missing").and_then(Value::as_array).map(|a| a.len()), Some(1));
    assert_eq!(v.get("dumps").and_then(Value::as_array).unwrap()[0].get("reason").and_then(Value::as_str), Some("watchdog \"quoted\"\nline"));
    let look = v.get("look_at").and_then(Value::as_array).unwrap();
    assert_eq!(look[0].get("rank").and_then(Value::as_u64), Some(1));
    let g = &v.get("groups").and_then(Value::as_array).unwrap()[0];
    assert_eq!(g.get("behind").and_then(Value::as_array).unwrap()[0].as_u64(), Some(2));
    assert_eq!(g.get("not_called").and_then(|n| n.get("seq")).and_then(Value::as_u64), Some(2));
    assert!(g.get("divergence").unwrap().is_null());
    let p = g.get("progress").and_then(Value::as_array).unwrap();
    assert_eq!(p[1].get("dump"), Some(&Value::Bool(false)));
    assert_eq!(p[0].get("in_flight").and_then(|f| f.get("state")).and_then(Value::as_str), Some("started"));
    assert_eq!(v.get("unreadable").and_then(Value::as_array).unwrap()[0].get("file").and_then(Value::as_str), Some("rank_1.json"));
}

#[test]
fn what_the_recorder_writes_the_reader_reads() {
    use crate::flight::{Buf, Global, Recorder, Ring};
    use crate::types::{Backend, DType, OpKind, ReduceOp};
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    let epoch = Instant::now();
    let ring = Arc::new(Ring {
        group: "dp\"0".into(),
        id: "w.0c1".into(),
        backend: Backend::Nccl,
        rank: 1,
        size: 2,
        members: Arc::new(vec![3, 5]),
        capacity: 4,
        epoch,
        buf: Mutex::new(Buf { entries: Vec::with_capacity(4), next: 0 }),
    });
    let rec = Recorder(Some(ring.clone()));
    let sig = |op, dt, n, x| crate::flight::OpDesc::of(&crate::debug::Sig::new(op, dt, n, x));
    for s in 1..=4 {
        rec.enqueue(s, sig(OpKind::AllReduce, Some(DType::F32), 8, ReduceOp::Avg.code())).complete();
    }
    let b = rec.enqueue(5, sig(OpKind::Broadcast, Some(DType::Bf16), 3, 1));
    b.start();
    b.fail("boom");
    let s = rec.enqueue(1, crate::flight::OpDesc::p2p(OpKind::Send, DType::I64, 2, 0));
    s.start();
    rec.enqueue(6, sig(OpKind::Barrier, None, 0, 0));
    let g = Global {
        capacity: 4,
        epoch,
        rank: 5,
        world_size: 8,
        job: "ns\"1".into(),
        rings: Mutex::new(vec![Arc::downgrade(&ring)]),
        error_dumped: AtomicBool::new(true),
        dumping: Mutex::new(()),
    };
    let d = parse_dump(&crate::flight::render(&g, "why \"not\"")).expect("the reader reads the writer");
    assert_eq!((d.rank, d.world_size, d.pid, d.reason.as_str(), d.capacity), (5, 8, std::process::id() as u64, "why \"not\"", 4));
    assert_eq!(d.job, "ns\"1");
    assert!(d.unix_ns > 1_600_000_000_000_000_000 && d.mono_ns > 0);
    assert_eq!(d.groups.len(), 1);
    let gd = &d.groups[0];
    assert_eq!((gd.name.as_str(), gd.id.as_str(), gd.backend.as_str(), gd.rank, gd.size), ("dp\"0", "w.0c1", "nccl", 1, 2));
    assert_eq!((gd.members.clone(), gd.recorded), (vec![3, 5], 7));
    let labels: Vec<(String, State)> = gd.ops.iter().map(|o| (o.label(), o.state)).collect();
    assert_eq!(
        labels,
        vec![
            ("all_reduce(f32, 8 elements, avg) #4".to_string(), State::Completed),
            ("broadcast(bf16, 3 elements, root 1) #5".to_string(), State::Failed),
            ("send(i64, 2 elements, to rank 0) #1".to_string(), State::Started),
            ("barrier() #6".to_string(), State::Enqueued),
        ]
    );
    let (a, bc) = (&gd.ops[0], &gd.ops[1]);
    assert!(a.enqueued_ns <= a.started_ns.unwrap() && a.started_ns <= a.ended_ns);
    assert!(bc.ended_ns.is_some() && gd.ops[2].ended_ns.is_none() && gd.ops[3].started_ns.is_none());
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("fabbrica-flight-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const MINIMAL: &str = r#"{"format":"fabbrica-flight/1","rank":RANK,"world_size":2,"host":"h","pid":1,"reason":"r","capacity":10,"clock":{"mono_ns":5,"unix_ns":6},"groups":[{"name":"world","id":"w","backend":"mpi","rank":RANK,"size":2,"members":[0,1],"recorded":1,"ops":[{"seq":1,"op":"barrier","state":"completed","enqueued_ns":1,"started_ns":2,"ended_ns":3}]}]}"#;

#[test]
fn loading_a_directory_is_bounded_and_stays_inside_it() {
    let d = scratch("load");
    assert!(load_dir(&d.join("nope")).unwrap_err().contains("is not a directory"));
    assert!(load_dir(&d).unwrap_err().contains("no flight recorder dumps"));
    std::fs::write(d.join("rank_0.json"), "{\"format\":\n").unwrap();
    std::fs::write(d.join("rank_1.json"), "").unwrap();
    let e = load_dir(&d).unwrap_err();
    assert!(e.contains("no readable flight recorder dump in") && e.contains("rank_0.json: invalid JSON") && e.ends_with("(and 1 more)"), "{e}");
    std::fs::remove_file(d.join("rank_0.json")).unwrap();
    std::fs::remove_file(d.join("rank_1.json")).unwrap();
    // DIR/flight is preferred when it exists.
    let f = d.join("flight");
    std::fs::create_dir(&f).unwrap();
    std::fs::write(f.join("rank_0.json"), MINIMAL.replace("RANK", "0")).unwrap();
    // A dump that claims another rank, garbage, a file too large (sparse), a link to a file
    // outside, and names that are not dumps.
    std::fs::write(f.join("rank_1.json"), MINIMAL.replace("RANK", "0")).unwrap();
    std::fs::write(f.join("rank_2.json"), "{ not json").unwrap();
    std::fs::File::create(f.join("rank_3.json")).unwrap().set_len(MAX_DUMP_BYTES + 1).unwrap();
    let outside = d.join("outside.json");
    std::fs::write(&outside, MINIMAL.replace("RANK", "1")).unwrap();
    std::os::unix::fs::symlink(&outside, f.join("rank_4.json")).unwrap();
    for other in [".rank_0.json.tmp-1", "rank_x.json", "rank_.json", "rank_0.json.bak", "notes.txt"] {
        std::fs::write(f.join(other), "junk").unwrap();
    }
    let l = load_dir(&d).unwrap();
    assert_eq!(l.dir, f);
    assert_eq!(l.dumps.len(), 1);
    assert_eq!(l.dumps[0].rank, 0);
    let why: Vec<(&str, &str)> = l.unreadable.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(why[0], ("rank_1.json", "says it is rank 0"));
    assert!(why[1].0 == "rank_2.json" && why[1].1.starts_with("invalid JSON"), "{why:?}");
    assert!(why[2].0 == "rank_3.json" && why[2].1.contains("more than the 64 MiB"), "{why:?}");
    assert_eq!(why[3], ("rank_4.json", "not a regular file"));
    assert_eq!(why.len(), 4);
    // Without flight/, DIR itself.
    let plain = scratch("plain");
    std::fs::write(plain.join("rank_1.json"), MINIMAL.replace("RANK", "1")).unwrap();
    let l = load_dir(&plain).unwrap();
    assert_eq!((l.dir.clone(), l.dumps.len()), (plain.clone(), 1));
    let r = analyze(&l.dir.display().to_string(), &l.dumps, &l.unreadable);
    assert_eq!(r.missing, vec![0]);
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::remove_dir_all(&plain);
}

/// A dump's claims size the work: a world of 2^24 ranks with one dump, and thousands of
/// groups, are analysed in time linear in them (this test would take hours otherwise), and
/// strings from a dump reach the terminal with their control characters escaped.
#[test]
fn a_hostile_dump_is_analysed_quickly_and_printed_safely() {
    let huge = MINIMAL.replace("RANK", "0").replacen("\"world_size\":2", &format!("\"world_size\":{}", 1 << 24), 1).replacen(
        "\"host\":\"h\"",
        "\"host\":\"h\\u001b[2J\\nx\"",
        1,
    );
    let d = parse_dump(&huge).unwrap();
    assert_eq!(d.host, "h\\u{1b}[2J\\nx");
    let r = analyze("d", &[d], &[]);
    assert_eq!(r.missing.len(), (1 << 24) - 1);
    assert_eq!(r.look_at.len(), MAX_MISSING_SUSPECTS);
    let t = r.to_text();
    assert!(t.contains("1-16777215") && !t.contains('\u{1b}'), "{t}");
    // 40,000 distinct groups in one dump.
    let groups: Vec<GroupDump> = (0..40_000).map(|i| group(&format!("g{i}"), &[0], 0, done(1))).collect();
    let r = analyze("d", &[dump(0, 1, "r", groups)], &[]);
    assert_eq!(r.groups.len(), 40_000);
    // One file per rank: a zero-padded name is not a second dump of the same rank.
    let f = scratch("padded");
    std::fs::write(f.join("rank_0.json"), MINIMAL.replace("RANK", "0")).unwrap();
    std::fs::write(f.join("rank_00.json"), MINIMAL.replace("RANK", "0")).unwrap();
    std::fs::write(f.join("rank_01.json"), MINIMAL.replace("RANK", "1")).unwrap();
    let l = load_dir(&f).unwrap();
    assert_eq!((l.dumps.len(), l.unreadable.len()), (1, 0));
    let _ = std::fs::remove_dir_all(&f);
}

#[test]
fn malformed_dumps_are_errors() {
    let ok = MINIMAL.replace("RANK", "0");
    assert!(parse_dump(&ok).is_ok());
    for (from, to, why) in [
        ("fabbrica-flight/1", "other/9", "format 'other/9'"),
        ("\"rank\":0,\"world_size\":2", "\"rank\":2,\"world_size\":2", "not below its world size"),
        ("\"world_size\":2", "\"world_size\":99999999999", "not a plausible rank or size"),
        ("\"state\":\"completed\"", "\"state\":\"done\"", "unknown state 'done'"),
        ("\"seq\":1", "\"seq\":-1", "\"seq\" is not a non-negative integer"),
        ("\"members\":[0,1]", "\"members\":[0]", "with 1 members"),
        ("\"ops\":[", "\"opz\":[", "has no \"ops\""),
    ] {
        let bad = ok.replacen(from, to, 1);
        assert_ne!(bad, ok, "{from}");
        let e = parse_dump(&bad).unwrap_err();
        assert!(e.contains(why), "{from}: {e}");
    }
}

#[test]
fn operations_in_flight_briefly_are_a_running_job_unless_the_watchdog_fired() {
    let w = [0, 1];
    let brief = |n| {
        let mut v = stuck(n);
        v.last_mut().unwrap().started_ns = Some(9_990_000_000); // 10 ms before the dump
        v
    };
    // SIGUSR2 on a healthy job: rank 1 is one collective ahead, both are mid-operation.
    let dumps = vec![dump(0, 2, "SIGUSR2", vec![group("world", &w, 0, brief(6))]), dump(1, 2, "SIGUSR2", vec![group("world", &w, 1, brief(7))])];
    let r = analyze("d", &dumps, &[]);
    assert_eq!(r.groups[0].behind, vec![0], "behind is a fact");
    assert!(r.look_at.is_empty(), "but nobody waits: {:?}", r.look_at);
    assert_eq!(r.verdict, "no hang, divergence or failure in the records: the job was running (operations in flight for under 1.0s)");
    // The same records in dumps the watchdog wrote (a short timeout): rank 0 is the one behind.
    let dumps = vec![
        dump(0, 2, "rank 1 aborted the job: watchdog: ...", vec![group("world", &w, 0, done(6))]),
        dump(1, 2, "watchdog: all_reduce #7 ...", vec![group("world", &w, 1, brief(6))]),
    ];
    let r = analyze("d", &dumps, &[]);
    assert_eq!(r.look_at.iter().map(|s| s.rank).collect::<Vec<_>>(), vec![0]);
}

#[test]
fn dumps_of_an_earlier_job_are_set_aside() {
    let w = [0, 1, 2];
    let mut old = dump(2, 3, "watchdog", vec![group("world", &w, 2, done(40))]);
    old.job = "j0".into();
    old.unix_ns -= 3_600_000_000_000;
    let dumps = vec![dump(0, 3, "watchdog", vec![group("world", &w, 0, stuck(5))]), dump(1, 3, "abort", vec![group("world", &w, 1, stuck(5))]), old];
    let r = analyze("d", &dumps, &[]);
    assert_eq!(r.set_aside, vec![(2, "of job j0, not j1, written 3600s before the newest dump (an earlier run?)".to_string())]);
    assert_eq!(r.missing, vec![2], "this job's rank 2 left no dump");
    assert_eq!(r.look_at[0].rank, 2);
    assert!(r.to_text().contains("  set aside: rank_2.json: of job j0, not j1"), "{}", r.to_text());
    // Without job ids (no launcher variable), nothing is set aside.
    let mut dumps = dumps;
    for d in &mut dumps {
        d.job.clear();
    }
    assert!(analyze("d", &dumps, &[]).set_aside.is_empty());
}
