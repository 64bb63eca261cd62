//! What the binary's integration tests share: launching `fabbrica train` alone or under a real
//! mpirun, and describing what came back.
#![allow(dead_code)] // each test file uses its own part

use std::process::{Command, Output};

/// `fabbrica train --set S …` as one process (`np == 0`) or under `mpirun -np np` with
/// `mpirun_args` (e.g. `-x VAR=value`) before the binary. Root-safe and local-only Open MPI
/// settings; backtraces on, so a panic cannot hide behind a one-line contract.
pub fn train_command<S: AsRef<str>>(np: usize, mpirun_args: &[&str], sets: impl IntoIterator<Item = S>) -> Command {
    let bin = env!("CARGO_BIN_EXE_fabbrica");
    let mut cmd = if np == 0 {
        Command::new(bin)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["-np", &np.to_string(), "--oversubscribe"]).args(mpirun_args).arg(bin);
        c
    };
    cmd.arg("train");
    for s in sets {
        cmd.args(["--set", s.as_ref()]);
    }
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_plm", "isolated")
        .env("RUST_BACKTRACE", "1")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("FABBRICA_INJECT_NAN");
    cmd
}

/// Exit status and both streams, for assertion messages.
pub fn describe(o: &Output) -> String {
    format!(
        "exit status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `data.path=` the default corpus (written by scripts/setup.sh).
pub fn corpus_set() -> String {
    format!("data.path={}/../../data/pystdlib.txt", env!("CARGO_MANIFEST_DIR"))
}
