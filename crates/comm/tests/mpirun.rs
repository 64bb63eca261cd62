//! The communicator under a real `mpirun` (Open MPI), 2 to 8 ranks on this machine's cores
//! (`--oversubscribe`). The scenarios live in `src/bin/comm_selftest.rs`.

mod common;

use common::*;

fn ops(np: usize) {
    let (out, _) = mpirun(np, &["ops"], &[]);
    let all = text(&out);
    assert!(out.status.success(), "np={np} failed:\n{all}");
    for r in 0..np {
        assert!(lines_of(&all, r).iter().any(|l| l.ends_with(&format!("OK ops rank {r}"))), "rank {r} did not finish:\n{all}");
    }
}

#[test]
fn every_op_two_ranks() {
    ops(2);
}

#[test]
fn every_op_three_ranks() {
    ops(3);
}

#[test]
fn every_op_four_ranks() {
    ops(4);
}

#[test]
fn every_op_without_a_launcher() {
    let out = Command::new(env!("CARGO_BIN_EXE_comm_selftest")).arg("ops").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("OK ops rank 0"));
}

#[test]
fn watchdog_ends_a_job_with_a_missing_rank() {
    // Rank 2 skips all_reduce #2 and sleeps 120 s; ranks 0 and 1 wait in it.
    let (out, took) = mpirun(3, &["watchdog"], &[("FABBRICA_COMM_TIMEOUT", "2")]);
    let all = text(&out);
    // The watchdog's own exit code (README: "exits with code 3"), which mpirun passes on from
    // the first rank that failed.
    assert_eq!(out.status.code(), Some(fabbrica_comm::watchdog::EXIT_CODE), "the job must fail with the watchdog's code:\n{all}");
    // Not a speed assertion: proof that the job did not wait for the sleeping rank (120 s).
    assert!(took < Duration::from_secs(60), "the job took {took:?}:\n{all}");
    for r in 0..3 {
        let mine = lines_of(&all, r);
        assert!(
            mine.iter().any(|l| l.contains("error:")
                && l.contains("all_reduce #2 on group 'world'")
                && l.contains("did not complete within 2.0s")
                && l.contains("ranks [2] did not arrive")),
            "rank {r} did not report the hang:\n{all}"
        );
    }
    assert!(!all.contains("should have ended the job"), "{all}");
}

#[test]
fn watchdog_ends_a_job_stuck_in_a_receive() {
    let (out, took) = mpirun(2, &["watchdog-p2p"], &[("FABBRICA_COMM_TIMEOUT", "2")]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(fabbrica_comm::watchdog::EXIT_CODE), "the job must fail with the watchdog's code:\n{all}");
    assert!(took < Duration::from_secs(60), "the job took {took:?}:\n{all}");
    for r in 0..2 {
        assert!(
            lines_of(&all, r).iter().any(|l| l.contains("error:")
                && l.contains("recv #1 on group 'world'")
                && l.contains("did not complete within 2.0s")
                && l.contains("peer rank 1 (world rank 1) is no operation in flight")),
            "rank {r} did not report the hang:\n{all}"
        );
    }
}

#[test]
fn debug_mode_reports_mismatched_sizes() {
    let (out, _) = mpirun(3, &["mismatch-size"], &[("FABBRICA_COMM_DEBUG", "1")]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    for r in 0..3 {
        assert!(
            lines_of(&all, r).iter().any(|l| l.contains(&format!("MISMATCH rank {r}"))
                && l.contains("ranks [0, 2] called all_reduce(f32, 1000 elements, sum) #2")
                && l.contains("rank 1 called all_reduce(f32, 999 elements, sum) #2")),
            "rank {r}:\n{all}"
        );
    }
}

#[test]
fn debug_mode_reports_mismatched_operations() {
    let (out, _) = mpirun(3, &["mismatch-op"], &[("FABBRICA_COMM_DEBUG", "1")]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    for r in 0..3 {
        assert!(
            lines_of(&all, r).iter().any(|l| l.contains(&format!("MISMATCH rank {r}"))
                && l.contains("rank 0 called broadcast(f32, 1000 elements, root 0) #2")
                && l.contains("ranks [1, 2] called all_reduce(f32, 1000 elements, max) #2")),
            "rank {r}:\n{all}"
        );
    }
}

#[test]
fn bad_environment_is_one_line() {
    let (out, _) = mpirun(2, &["ops"], &[("FABBRICA_COMM_TIMEOUT", "soon")]);
    let all = text(&out);
    assert!(!out.status.success());
    assert!(all.contains("error: FABBRICA_COMM_TIMEOUT='soon' is not a positive number of seconds"), "{all}");
    assert!(!all.contains("panicked"), "{all}");
}

/// CUDA tensors: NCCL at world size 1, and MPI with host staging at 2 ranks on one GPU (NCCL
/// refuses two ranks on one GPU). Skipped, and logged as skipped, without a GPU.
#[test]
fn cuda_tensors_when_a_gpu_is_visible() {
    if !tch::Cuda::is_available() {
        println!("SKIPPED: no CUDA device");
        if let Ok(log) = std::env::var("FABBRICA_SKIP_LOG") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
                let _ = writeln!(f, "comm::mpirun cuda_tensors_when_a_gpu_is_visible: no CUDA device");
            }
        }
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_comm_selftest")).args(["ops", "cuda"]).output().unwrap();
    assert!(out.status.success(), "NCCL world of one:\n{}", text(&out));
    let (out, _) = mpirun(2, &["ops", "cuda-mpi"], &[]);
    assert!(out.status.success(), "MPI host staging:\n{}", text(&out));
}

/// Creating NCCL up front (`Group::connect_cuda`) is collective: on a machine without a GPU, `auto`
/// falls back on every rank alike and `nccl` fails on every rank alike, each rank saying why, and
/// the world's host collectives stay matched afterwards (every rank joined the unique-id
/// broadcast and the vote).
#[test]
fn connect_cuda_agrees_on_every_rank() {
    if tch::Cuda::is_available() {
        return; // covered by tests/nccl.rs there; NCCL refuses two ranks on one GPU anyway
    }
    for backend in ["auto", "nccl"] {
        let (out, _) = mpirun(3, &["connect", backend], &[]);
        let all = text(&out);
        assert!(out.status.success(), "connect {backend} failed:\n{all}");
        for r in 0..3 {
            let lines = lines_of(&all, r);
            assert!(lines.iter().any(|l| l.ends_with(&format!("OK connect rank {r}"))), "rank {r}:\n{all}");
            if backend == "nccl" {
                assert!(lines.iter().any(|l| l.contains("CONNECT") && l.contains("no CUDA device")), "rank {r}:\n{all}");
            }
        }
    }
}

/// A call refused by one rank's own checks never reached the group, so it takes no sequence
/// number there: with the debug check on (which compares sequence numbers), the group's next
/// collective still agrees. Counting it would make every later collective a "mismatch", and
/// the watchdog would take the rank for one that arrived.
#[test]
fn a_call_refused_on_one_rank_is_not_counted() {
    let (out, _) = mpirun(3, &["refused"], &[("FABBRICA_COMM_DEBUG", "1")]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    for r in 0..3 {
        assert!(lines_of(&all, r).iter().any(|l| l.ends_with(&format!("OK refused rank {r}"))), "rank {r}:\n{all}");
    }
}

/// `ReduceOp::Avg` divides the backend's sum by the group size after the transfer (MPI backend).
/// That division ran under grad mode, where it fails on a leaf tensor that requires grad (a
/// parameter), and its result was ignored (with tch 0.24 the failure panicked instead, while
/// freeing the divisor). Every Avg path, into plain tensors and into parameters, blocking and
/// asynchronous, is the average here (the selftest's `avg` scenario). (The selftest's `ops` covers
/// all_reduce Avg over dtypes and sizes; reduce_scatter Avg only here.)
#[test]
fn avg_is_the_average_even_into_a_parameter() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let out = command(2, &["avg"], &[]).output().expect("mpirun is installed (scripts/setup.sh installs openmpi-bin)");
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    for r in 0..2 {
        assert!(lines_of(&all, r).iter().any(|l| l.ends_with(&format!("OK avg rank {r}"))), "rank {r} did not finish:\n{all}");
    }
}

// ---- The watchdog port against strangers -------------------------------------------------------
//
// The ranks are told to publish their watchdog address and process id in a directory
// (`FABBRICA_SELFTEST_DIR`, see comm_selftest), and wait there for the test's `go`.
