//! Every rank of a failed job exits with the same code: 2 when the cause is the user's to fix
//! (whichever rank found it), 1 otherwise. Each rank's own exit code is read through a shell
//! wrapper, since mpirun reports only one.

mod common;

use std::process::Command;
use std::sync::Mutex;

/// One mpirun at a time: concurrent launches race on Open MPI's session directory.
static SERIAL: Mutex<()> = Mutex::new(());

/// `mpirun -np 2 sh -c 'fabbrica train …; echo EXIT <rank> $?'`, rank 1 with `rank1` as its last
/// `--set` (a rank-local key such as `data.path` or `run.out_dir`).
fn per_rank_exit_codes(sets: &[String], rank1: &str) -> (Vec<(usize, i32)>, String) {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let bin = env!("CARGO_BIN_EXE_fabbrica");
    let quoted: Vec<String> = sets.iter().chain([common::corpus_set()].iter()).map(|s| format!("--set '{s}'")).collect();
    let script = format!(
        r#"X=""; [ "$OMPI_COMM_WORLD_RANK" = 1 ] && X="--set {rank1}"; "{bin}" train {} $X; echo "EXIT $OMPI_COMM_WORLD_RANK $?""#,
        quoted.join(" "),
    );
    let o = Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe", "sh", "-c", &script])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_plm", "isolated")
        .env_remove("FABBRICA_INJECT_NAN")
        .output()
        .unwrap();
    let text = common::describe(&o);
    let mut codes: Vec<(usize, i32)> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("EXIT ")?.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
        })
        .collect();
    codes.sort();
    (codes, text)
}

#[test]
fn an_input_error_on_one_rank_is_exit_2_on_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let sets = vec!["model.n_layer=1".to_string(), "train.max_steps=1".into(), format!("run.out_dir={}", dir.path().join("run").display())];
    let (codes, text) = per_rank_exit_codes(&sets, "data.path=/nonexistent/corpus.txt");
    assert_eq!(codes, [(0, 2), (1, 2)], "{text}");
    // Said once, by the rank that found it.
    assert_eq!(text.matches("/nonexistent/corpus.txt").count(), 1, "{text}");
}

/// An I/O failure that is not the input's fault on one rank (its run.out_dir is a file, so
/// listing its checkpoints fails): exit 1 on every rank, not 1 there and 2 elsewhere.
#[test]
fn another_failure_on_one_rank_is_exit_1_on_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let sets = vec!["model.n_layer=1".to_string(), "train.max_steps=1".into(), format!("run.out_dir={}", dir.path().join("run").display())];
    let (codes, text) = per_rank_exit_codes(&sets, &format!("run.out_dir={}", file.display()));
    assert_eq!(codes, [(0, 1), (1, 1)], "{text}");
}

#[test]
fn another_ranks_failure_carries_its_kind() {
    use fabbrica_train::TrainError;
    assert!(TrainError::Elsewhere { rank: 1, user: true }.is_user_error());
    assert!(!TrainError::Elsewhere { rank: 1, user: false }.is_user_error());
}
