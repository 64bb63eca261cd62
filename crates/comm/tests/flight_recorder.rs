//! The flight recorder under real jobs that hang, disagree, lose a rank or get SIGUSR2.

mod common;

use common::*;

use std::path::{Path, PathBuf};

// ---- The flight recorder ------------------------------------------------------------------------
//
// Real jobs that hang, disagree, lose a rank or get SIGUSR2; the dumps they leave are read back
// with the analysis `fabbrica doctor` prints.

use fabbrica_comm::flight::analyze::{self, Report};

fn flight_report(dir: &Path, all: &str) -> Report {
    let l = analyze::load_dir(dir).unwrap_or_else(|e| panic!("{e}:\n{all}"));
    assert!(l.unreadable.is_empty(), "{:?}", l.unreadable);
    analyze::analyze(&l.dir.display().to_string(), &l.dumps, &l.unreadable)
}

fn dump_of(dir: &Path, rank: usize) -> PathBuf {
    dir.join("flight").join(format!("rank_{rank}.json"))
}

/// (a) A rank skips a collective; the watchdog ends the job. Every rank writes its dump first, the
/// sleeping one included (told by the watchdog's abort), and the analysis names it.
#[test]
fn flight_recorder_hung_job_every_rank_dumps_and_the_missing_rank_is_named() {
    let dir = fresh_dir("flight-hang");
    let d = dir.display().to_string();
    let (out, _) = mpirun(3, &["watchdog"], &[("FABBRICA_COMM_TIMEOUT", "2"), ("FABBRICA_FLIGHT_DIR", &d)]);
    let all = text(&out);
    assert!(!out.status.success(), "the job must fail:\n{all}");
    for r in 0..3 {
        let wrote = format!("flight recorder: wrote {}", dump_of(&dir, r).display());
        assert!(lines_of(&all, r).iter().any(|l| l.ends_with(&wrote)), "rank {r} did not dump:\n{all}");
    }
    let rep = flight_report(&dir, &all);
    assert!(rep.missing.is_empty() && rep.set_aside.is_empty(), "{rep:?}");
    assert!(rep.dumps.iter().any(|d| d.reason.starts_with("watchdog: all_reduce #2 on group 'world'")), "{rep:?}");
    assert!(rep.dumps.iter().any(|d| d.rank == 2 && d.reason.contains("aborted the job: watchdog")), "{rep:?}");
    let g = rep.groups.iter().find(|g| g.name == "world" && g.backend == "mpi").expect("the world group");
    assert_eq!(g.behind, vec![2]);
    assert_eq!(g.not_called, Some((2, "all_reduce(f32, 1000 elements, sum)".to_string())));
    assert!(g.divergence.is_none());
    for p in &g.progress[..2] {
        assert_eq!((p.called, p.completed), (2, 1), "{p:?}");
        assert_eq!(p.in_flight.as_ref().map(|f| f.what.as_str()), Some("all_reduce(f32, 1000 elements, sum) #2"));
    }
    assert_eq!((g.progress[2].called, g.progress[2].completed, g.progress[2].in_flight.is_none()), (1, 1, true));
    assert_eq!(rep.look_at[0].rank, 2, "{}", rep.to_text());
    assert!(
        rep.look_at[0]
            .why
            .starts_with("never called collective #2 (all_reduce(f32, 1000 elements, sum)) on group 'world', which ranks 0-1 were waiting in"),
        "{}",
        rep.to_text()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// (b) Ranks call different collectives at one sequence number (debug mode turns it into an error
/// on every rank, which dumps): the analysis names the number and who called what.
#[test]
fn flight_recorder_mismatch_names_the_first_differing_call_and_each_side() {
    let dir = fresh_dir("flight-mismatch");
    let d = dir.display().to_string();
    let (out, _) = mpirun(3, &["mismatch-op"], &[("FABBRICA_COMM_DEBUG", "1"), ("FABBRICA_FLIGHT_DIR", &d)]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let rep = flight_report(&dir, &all);
    assert!(rep.missing.is_empty(), "{rep:?}");
    assert!(rep.dumps.iter().all(|d| d.reason.starts_with("communication error: ") && d.reason.contains("collective mismatch")), "{rep:?}");
    let g = rep.groups.iter().find(|g| g.name == "world").expect("the world group");
    let div = g.divergence.as_ref().unwrap_or_else(|| panic!("no divergence:\n{}", rep.to_text()));
    assert_eq!(div.seq, 2);
    assert_eq!(
        div.sides,
        vec![
            analyze::Side { ranks: vec![0], what: "broadcast(f32, 1000 elements, root 0)".into() },
            analyze::Side { ranks: vec![1, 2], what: "all_reduce(f32, 1000 elements, max)".into() },
        ]
    );
    assert!(g.progress.iter().all(|p| p.failed.as_deref().is_some_and(|f| f.ends_with("#2"))), "{:?}", g.progress);
    assert_eq!(rep.look_at[0].rank, 0);
    assert_eq!(
        rep.look_at[0].why,
        "called broadcast(f32, 1000 elements, root 0) as collective #2 on group 'world', where ranks 1-2 called all_reduce(f32, 1000 elements, max)"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// (c) One rank is killed with SIGKILL while the others wait for it: it leaves no dump, the
/// others' watchdog fires and they dump, and the analysis says to look at the killed rank.
/// (`orte_enable_recovery`: Open MPI would otherwise tear the job down at once.)
#[test]
fn flight_recorder_killed_rank_has_no_dump_and_is_the_one_to_look_at() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = fresh_dir("flight-kill");
    let d = dir.display().to_string();
    let env = [
        ("FABBRICA_SELFTEST_DIR", d.as_str()),
        ("FABBRICA_FLIGHT_DIR", d.as_str()),
        ("FABBRICA_COMM_TIMEOUT", "3"),
        ("OMPI_MCA_orte_enable_recovery", "1"),
    ];
    let mut job = Running::start(3, &["flight-kill"], &env);
    let ranks = job.addresses(&dir, 3);
    let t = Instant::now();
    while !dir.join("asleep").exists() {
        assert!(t.elapsed() < Duration::from_secs(120) && job.child.try_wait().unwrap().is_none(), "rank 2 never got to sleep:\n{}", job.output());
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on a rank of our own job.
    assert_eq!(unsafe { libc::kill(ranks[2].1 as libc::pid_t, libc::SIGKILL) }, 0);
    let (_, all) = job.finish(Duration::from_secs(120));
    assert!(dump_of(&dir, 0).exists() && dump_of(&dir, 1).exists() && !dump_of(&dir, 2).exists(), "{all}");
    let rep = flight_report(&dir, &all);
    assert_eq!(rep.missing, vec![2]);
    let g = rep.groups.iter().find(|g| g.name == "world").expect("the world group");
    assert!(g.behind.is_empty() && g.divergence.is_none(), "{}", rep.to_text());
    assert_eq!(rep.look_at.len(), 1, "{}", rep.to_text());
    assert_eq!(rep.look_at[0].rank, 2);
    assert_eq!(
        rep.look_at[0].why,
        "left no dump (killed, crashed, or never started) while ranks 0-1 were waiting in all_reduce(f32, 1000 elements, sum) #6 on group 'world'"
    );
    assert_eq!(rep.verdict, "rank 2 left no dump: start there");
    let _ = std::fs::remove_dir_all(&dir);
}

/// (d) SIGUSR2 to one running rank writes its dump, and the job carries on to the end.
#[test]
fn flight_recorder_sigusr2_dumps_a_running_rank_and_the_job_goes_on() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = fresh_dir("flight-usr2");
    let d = dir.display().to_string();
    let env = [("FABBRICA_SELFTEST_DIR", d.as_str()), ("FABBRICA_FLIGHT_DIR", d.as_str())];
    let mut job = Running::start(2, &["flight-usr2"], &env);
    let ranks = job.addresses(&dir, 2);
    // Once rank 1 has completed a round, its ring holds a completed send and receive.
    let t = Instant::now();
    while !dir.join("round1.1").exists() {
        assert!(t.elapsed() < Duration::from_secs(60) && job.child.try_wait().unwrap().is_none(), "rank 1 never finished a round:\n{}", job.output());
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on a rank of our own job.
    assert_eq!(unsafe { libc::kill(ranks[1].1 as libc::pid_t, libc::SIGUSR2) }, 0);
    let t = Instant::now();
    while !dump_of(&dir, 1).exists() {
        assert!(t.elapsed() < Duration::from_secs(60) && job.child.try_wait().unwrap().is_none(), "no dump after SIGUSR2:\n{}", job.output());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let the job run on a while after the dump, then stop it.
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(dir.join("go"), "").unwrap();
    let (status, all) = job.finish(Duration::from_secs(120));
    assert!(status.success(), "the job must go on after SIGUSR2:\n{all}");
    for r in 0..2 {
        assert!(lines_of(&all, r).iter().any(|l| l.ends_with(&format!("OK flight-usr2 rank {r}"))), "rank {r}:\n{all}");
    }
    assert!(!dump_of(&dir, 0).exists(), "only the signalled rank dumps");
    let text_ = std::fs::read_to_string(dump_of(&dir, 1)).unwrap();
    let dump = analyze::parse_dump(&text_).unwrap();
    assert_eq!((dump.rank, dump.world_size, dump.reason.as_str(), dump.pid), (1, 2, "SIGUSR2", ranks[1].1 as u64));
    assert!(!dump.job.is_empty(), "mpirun gives every rank its job id");
    let world = dump.groups.iter().find(|g| g.name == "world" && g.backend == "mpi").expect("the world group");
    assert_eq!((world.rank, world.size, world.members.clone()), (1, 2, vec![0, 1]));
    for op in ["broadcast", "all_reduce", "send", "recv"] {
        assert!(world.ops.iter().any(|o| o.op == op && o.state == analyze::State::Completed), "no completed {op}: {text_}");
    }
    // Collectives are numbered 1, 2, 3, ... and the sends and receives apart.
    let coll: Vec<u64> = world.ops.iter().filter(|o| !o.is_p2p()).map(|o| o.seq).collect();
    assert!(coll.windows(2).all(|w| w[1] == w[0] + 1) && coll[0] == 1, "{coll:?}");
    let rounds: u64 = lines_of(&all, 1)
        .iter()
        .find_map(|l| l.split("FLIGHT rank 1 rounds ").nth(1).map(|n| n.trim().parse().unwrap()))
        .expect("rank 1 printed its rounds");
    // Each round is a broadcast and an all_reduce: more rounds ran than the dump saw.
    assert!(rounds > coll.len() as u64 / 2, "rounds {rounds}, dumped {} collectives", coll.len());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn flight_recorder_bad_size_is_one_line() {
    let (out, _) = mpirun(2, &["ops"], &[("FABBRICA_FLIGHT_RECORDER", "lots")]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    for r in 0..2 {
        assert!(
            lines_of(&all, r).iter().any(|l| l.contains("error: FABBRICA_FLIGHT_RECORDER='lots' is not a number of operations")),
            "rank {r}:\n{all}"
        );
    }
}
