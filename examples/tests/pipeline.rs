//! Pipeline schedules run for real: `pipeline_chain` under `mpirun -np N` executes each rank's
//! part of a lowered GPipe / 1F1B / interleaved schedule over MPI point-to-point and checks its
//! gradients and loss against the whole model run in one process (the program exits non-zero
//! otherwise).

use std::process::Command;
use std::sync::Mutex;

/// One mpirun at a time: concurrent launches race on Open MPI's session directory
/// (/tmp/ompi.<host>.<uid>: "mkdir … File exists") and oversubscribe the 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn run(np: usize, args: &[&str]) {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let out = Command::new("mpirun")
        .args(["-np", &np.to_string(), "--oversubscribe"])
        .arg(env!("CARGO_BIN_EXE_pipeline_chain"))
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_plm", "isolated")
        .output()
        .expect("mpirun is installed (scripts/setup.sh installs openmpi-bin)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "np={np} {args:?}:\n{text}");
    for r in 0..np {
        assert!(text.contains(&format!("OK pipeline_chain rank {r}:")), "np={np} {args:?}: rank {r} did not finish:\n{text}");
    }
}

#[test]
fn gpipe_and_1f1b_match_the_whole_model() {
    for kind in ["gpipe", "1f1b"] {
        run(2, &[kind, "3"]);
        run(4, &[kind, "6"]);
    }
    // Fewer micro-batches than ranks: 1F1B degenerates to GPipe order on the first ranks.
    run(3, &["1f1b", "2"]);
}

#[test]
fn interleaved_matches_the_whole_model() {
    run(2, &["interleaved", "4", "2"]);
    run(2, &["interleaved", "2", "3"]);
    run(4, &["interleaved", "4", "2"]);
}

#[test]
fn one_rank_runs_every_stage() {
    run(1, &["1f1b", "3"]);
    run(1, &["interleaved", "2", "3"]);
}
