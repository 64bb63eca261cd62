//! Launch-environment parsing against the variables each launcher really exports (Open MPI,
//! MPICH/Hydra, Slurm), including the combinations that must not be mistaken for a job.

use super::*;
use std::collections::HashMap;

fn env(pairs: &[(&str, &str)]) -> Result<LaunchEnv, LaunchError> {
    let map: HashMap<String, String> = pairs.iter().map(|&(k, v)| (k.to_owned(), v.to_owned())).collect();
    from_vars(|name| map.get(name).cloned())
}

fn expect(launcher: Launcher, rank: usize, world: usize, local_rank: usize, local_world: usize) -> LaunchEnv {
    LaunchEnv { rank, world_size: world, local_rank, local_world_size: local_world, launcher }
}

/// Asserts an error whose one-line message contains every needle.
fn err_with(result: Result<LaunchEnv, LaunchError>, needles: &[&str]) -> LaunchError {
    let e = result.expect_err("expected an error");
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "multi-line message: {msg}");
    for n in needles {
        assert!(msg.contains(n), "{n:?} missing from: {msg}");
    }
    e
}

fn ompi(rank: &str, size: &str, lrank: &str, lsize: &str) -> Vec<(&'static str, String)> {
    vec![(OMPI_RANK, rank.into()), (OMPI_SIZE, size.into()), (OMPI_LOCAL_RANK, lrank.into()), (OMPI_LOCAL_SIZE, lsize.into())]
}

fn owned<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// The job-level variables an `sbatch -N2 --ntasks-per-node=4` allocation
/// exports to its batch script (and everything the script starts).
const SBATCH: &[(&str, &str)] = &[
    ("SLURM_JOB_ID", "12345"),
    ("SLURM_NTASKS", "8"),
    ("SLURM_NTASKS_PER_NODE", "4"),
    ("SLURM_TASKS_PER_NODE", "4(x2)"),
    ("SLURM_PROCID", "0"),
    ("SLURM_LOCALID", "0"),
    ("SLURM_NODEID", "0"),
];

/// Task `rank` of `srun -N2 -n8` inside that allocation.
fn srun_task(rank: usize, tasks_per_node: &str, node: usize, local: usize) -> Vec<(&'static str, String)> {
    vec![
        ("SLURM_JOB_ID", "12345".into()),
        ("SLURM_STEP_ID", "0".into()),
        ("SLURM_STEPID", "0".into()),
        ("SLURM_PROCID", rank.to_string()),
        ("SLURM_NTASKS", "8".into()),
        ("SLURM_STEP_NUM_TASKS", "8".into()),
        ("SLURM_LOCALID", local.to_string()),
        ("SLURM_NODEID", node.to_string()),
        ("SLURM_TASKS_PER_NODE", tasks_per_node.into()),
        ("SLURM_STEP_TASKS_PER_NODE", tasks_per_node.into()),
    ]
}

#[test]
fn nothing_set_is_single() {
    assert_eq!(env(&[]).unwrap(), LaunchEnv::single());
    assert_eq!(env(&[("UNRELATED", "1")]).unwrap(), expect(Launcher::Single, 0, 1, 0, 1));
    assert!(!LaunchEnv::single().is_distributed());
}

#[test]
fn open_mpi_four_ranks() {
    for rank in 0..4 {
        // 2 nodes × 2 ranks.
        let vars = ompi(&rank.to_string(), "4", &(rank % 2).to_string(), "2");
        let got = env(&owned(&vars)).unwrap();
        assert_eq!(got, expect(Launcher::OpenMpi, rank, 4, rank % 2, 2));
        assert!(got.is_distributed());
    }
    // Whitespace around values is tolerated.
    let vars = ompi(" 3 ", "4\n", "3", "4");
    assert_eq!(env(&owned(&vars)).unwrap(), expect(Launcher::OpenMpi, 3, 4, 3, 4));
}

#[test]
fn mpich_hydra() {
    let got = env(&[(PMI_RANK, "5"), (PMI_SIZE, "8"), (MPI_LOCALRANKID, "1"), (MPI_LOCALNRANKS, "4")]).unwrap();
    assert_eq!(got, expect(Launcher::Mpich, 5, 8, 1, 4));
    // PMI_LOCAL_* fallback.
    let got = env(&[(PMI_RANK, "5"), (PMI_SIZE, "8"), (PMI_LOCAL_RANK, "1"), (PMI_LOCAL_SIZE, "4")]).unwrap();
    assert_eq!(got, expect(Launcher::Mpich, 5, 8, 1, 4));
    // MPI_LOCAL* wins over PMI_LOCAL_*.
    let got = env(&[(PMI_RANK, "5"), (PMI_SIZE, "8"), (MPI_LOCALRANKID, "1"), (MPI_LOCALNRANKS, "4"), (PMI_LOCAL_RANK, "0"), (PMI_LOCAL_SIZE, "1")])
        .unwrap();
    assert_eq!(got, expect(Launcher::Mpich, 5, 8, 1, 4));
    // No node-local variables at all: assume one node.
    let got = env(&[(PMI_RANK, "2"), (PMI_SIZE, "3")]).unwrap();
    assert_eq!(got, expect(Launcher::Mpich, 2, 3, 2, 3));
}

#[test]
fn mpich_under_srun_pmi2_uses_slurm_locals() {
    let mut vars = srun_task(6, "4(x2)", 1, 2);
    vars.push((PMI_RANK, "6".into()));
    vars.push((PMI_SIZE, "8".into()));
    assert_eq!(env(&owned(&vars)).unwrap(), expect(Launcher::Slurm, 6, 8, 2, 4));
}

#[test]
fn slurm_homogeneous_compressed_list() {
    // srun -N2 -n8: "4(x2)".
    for rank in 0..8 {
        let (node, local) = (rank / 4, rank % 4);
        let vars = srun_task(rank, "4(x2)", node, local);
        assert_eq!(env(&owned(&vars)).unwrap(), expect(Launcher::Slurm, rank, 8, local, 4), "rank {rank}");
    }
}

#[test]
fn slurm_heterogeneous_list() {
    // srun -n3 over two nodes: "2,1" — node 0 has ranks 0,1; node 1 has rank 2.
    let task = |rank: usize, node: usize, local: usize| {
        let mut v = srun_task(rank, "2,1", node, local);
        for (k, val) in v.iter_mut() {
            if *k == "SLURM_NTASKS" || *k == "SLURM_STEP_NUM_TASKS" {
                *val = "3".into();
            }
        }
        v
    };
    assert_eq!(env(&owned(&task(0, 0, 0))).unwrap(), expect(Launcher::Slurm, 0, 3, 0, 2));
    assert_eq!(env(&owned(&task(1, 0, 1))).unwrap(), expect(Launcher::Slurm, 1, 3, 1, 2));
    assert_eq!(env(&owned(&task(2, 1, 0))).unwrap(), expect(Launcher::Slurm, 2, 3, 0, 1));
}

#[test]
fn slurm_local_size_sources() {
    let base = [("SLURM_STEP_ID", "0"), ("SLURM_PROCID", "3"), ("SLURM_NTASKS", "4"), ("SLURM_LOCALID", "1")];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        env(&v)
    };
    // Step list beats the job list and the stale --ntasks-per-node.
    let got = with(&[("SLURM_STEP_TASKS_PER_NODE", "2(x2)"), ("SLURM_TASKS_PER_NODE", "4"), ("SLURM_NTASKS_PER_NODE", "4")]);
    assert_eq!(got.unwrap(), expect(Launcher::Slurm, 3, 4, 1, 2));
    // Job-level list (no SLURM_NODEID: first entry).
    assert_eq!(with(&[("SLURM_TASKS_PER_NODE", "2(x2)")]).unwrap().local_world_size, 2);
    // --ntasks-per-node only.
    assert_eq!(with(&[("SLURM_NTASKS_PER_NODE", "2")]).unwrap().local_world_size, 2);
    // SLURM_STEPID (old name) also marks an srun step; SLURM_STEP_NUM_TASKS beats SLURM_NTASKS.
    let got = env(&[
        ("SLURM_STEPID", "3"),
        ("SLURM_PROCID", "1"),
        ("SLURM_NTASKS", "16"),
        ("SLURM_STEP_NUM_TASKS", "2"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_STEP_TASKS_PER_NODE", "2"),
    ]);
    assert_eq!(got.unwrap(), expect(Launcher::Slurm, 1, 2, 1, 2));
}

#[test]
fn tasks_per_node_parsing() {
    assert_eq!(parse_tasks_per_node("4"), Some(vec![(4, 1)]));
    assert_eq!(parse_tasks_per_node("4(x2)"), Some(vec![(4, 2)]));
    assert_eq!(parse_tasks_per_node("2(x3),1"), Some(vec![(2, 3), (1, 1)]));
    assert_eq!(parse_tasks_per_node("2,1"), Some(vec![(2, 1), (1, 1)]));
    for bad in ["", "x", "4(x)", "4(x0)", "4(2)", "4(x2", "(x2)", "2,,1", "-1", "4(x2)junk"] {
        assert_eq!(parse_tasks_per_node(bad), None, "{bad:?}");
    }
    let entries = parse_tasks_per_node("2(x3),1").unwrap();
    let per_node: Vec<_> = (0..5).map(|n| tasks_on_node(&entries, n)).collect();
    assert_eq!(per_node, [Some(2), Some(2), Some(2), Some(1), None]);
}

#[test]
fn open_mpi_beats_slurm_batch_env() {
    // mpirun started from an sbatch script: the ranks see both.
    let mut vars: Vec<(&str, String)> = SBATCH.iter().map(|&(k, v)| (k, v.to_owned())).collect();
    vars.push(("SLURM_STEP_ID", "0".into())); // mpirun's daemons run in an srun step
    vars.extend(ompi("5", "8", "1", "4"));
    assert_eq!(env(&owned(&vars)).unwrap(), expect(Launcher::OpenMpi, 5, 8, 1, 4));
    // Same for Hydra.
    let mut vars: Vec<(&str, &str)> = SBATCH.to_vec();
    vars.extend([(PMI_RANK, "5"), (PMI_SIZE, "8"), (MPI_LOCALRANKID, "1"), (MPI_LOCALNRANKS, "4")]);
    assert_eq!(env(&vars).unwrap(), expect(Launcher::Mpich, 5, 8, 1, 4));
    // Open MPI beats MPICH.
    let mut vars = ompi("0", "2", "0", "2");
    vars.extend([(PMI_RANK, "1".to_owned()), (PMI_SIZE, "2".to_owned())]);
    assert_eq!(env(&owned(&vars)).unwrap().launcher, Launcher::OpenMpi);
}

#[test]
fn slurm_without_srun_step_is_single() {
    assert_eq!(env(&[("SLURM_JOB_ID", "12345")]).unwrap(), LaunchEnv::single());
    // The batch script (or an salloc shell) has SLURM_PROCID=0 and
    // SLURM_NTASKS=8 but is one process, not rank 0 of 8.
    assert_eq!(env(SBATCH).unwrap(), LaunchEnv::single());
    // A step id without SLURM_PROCID is not a task either.
    assert_eq!(env(&[("SLURM_STEP_ID", "0"), ("SLURM_NTASKS", "2")]).unwrap(), LaunchEnv::single());
}

#[test]
fn not_a_number_names_the_variable() {
    let vars = ompi("abc", "4", "0", "4");
    let e = err_with(env(&owned(&vars)), &["OMPI_COMM_WORLD_RANK='abc' is not a number", "Open MPI"]);
    assert!(matches!(e, LaunchError::NotANumber { var: OMPI_RANK, .. }));
    for (i, var) in [OMPI_RANK, OMPI_SIZE, OMPI_LOCAL_RANK, OMPI_LOCAL_SIZE].into_iter().enumerate() {
        let mut vars = ompi("0", "4", "0", "4");
        vars[i].1 = "-1".into();
        err_with(env(&owned(&vars)), &[&format!("{var}='-1' is not a number")]);
    }
    err_with(env(&[(PMI_RANK, "x"), (PMI_SIZE, "2")]), &["PMI_RANK='x' is not a number", "MPICH"]);
    err_with(env(&[(PMI_RANK, "0"), (PMI_SIZE, "2"), (MPI_LOCALRANKID, "0"), (MPI_LOCALNRANKS, "two")]), &["MPI_LOCALNRANKS='two' is not a number"]);
    for var in [SLURM_PROCID, SLURM_NTASKS, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_NODEID] {
        let mut vars = srun_task(0, "4(x2)", 0, 0);
        // SLURM_STEP_NUM_TASKS takes precedence, so drop it to reach SLURM_NTASKS.
        vars.retain(|(k, _)| *k != var && !(var == SLURM_NTASKS && *k == SLURM_STEP_NUM_TASKS));
        vars.push((var, "1.5".into()));
        err_with(env(&owned(&vars)), &[&format!("{var}='1.5' is not a number"), "Slurm"]);
    }
    let vars = [("SLURM_STEP_ID", "0"), ("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1"), ("SLURM_LOCALID", "0"), ("SLURM_NTASKS_PER_NODE", "")];
    err_with(env(&vars), &["SLURM_NTASKS_PER_NODE='' is not a number"]);
}

#[test]
fn missing_variables_are_named() {
    for (i, var) in [OMPI_RANK, OMPI_SIZE, OMPI_LOCAL_RANK, OMPI_LOCAL_SIZE].into_iter().enumerate() {
        let mut vars = ompi("0", "4", "0", "4");
        vars.remove(i);
        let e = err_with(env(&owned(&vars)), &[&format!("{var} is not set although OMPI_COMM_WORLD_"), "Open MPI"]);
        assert!(matches!(e, LaunchError::Missing { .. }));
    }
    err_with(env(&[(PMI_RANK, "0")]), &["PMI_SIZE is not set although PMI_RANK is"]);
    err_with(env(&[(PMI_SIZE, "2")]), &["PMI_RANK is not set although PMI_SIZE is"]);
    err_with(env(&[(PMI_RANK, "0"), (PMI_SIZE, "2"), (MPI_LOCALRANKID, "0")]), &["MPI_LOCALNRANKS is not set although MPI_LOCALRANKID is"]);
    err_with(env(&[(PMI_RANK, "0"), (PMI_SIZE, "2"), (PMI_LOCAL_SIZE, "2")]), &["PMI_LOCAL_RANK is not set although PMI_LOCAL_SIZE is"]);
    for var in [SLURM_NTASKS, SLURM_LOCALID] {
        let mut vars = srun_task(0, "4(x2)", 0, 0);
        vars.retain(|(k, _)| *k != var && (var != SLURM_NTASKS || *k != SLURM_STEP_NUM_TASKS));
        err_with(env(&owned(&vars)), &[&format!("{var} is not set although SLURM_PROCID is"), "Slurm"]);
    }
    let vars = [("SLURM_STEP_ID", "0"), ("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1"), ("SLURM_LOCALID", "0")];
    err_with(env(&vars), &["SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "not set"]);
}

#[test]
fn range_errors_name_both_variables() {
    let vars = ompi("4", "4", "0", "4");
    let e = err_with(env(&owned(&vars)), &["OMPI_COMM_WORLD_RANK=4 is out of range", "below 4", "OMPI_COMM_WORLD_SIZE=4"]);
    assert!(matches!(e, LaunchError::OutOfRange { var: OMPI_RANK, value: 4, limit: 4, .. }));
    let vars = ompi("1", "4", "2", "2");
    err_with(env(&owned(&vars)), &["OMPI_COMM_WORLD_LOCAL_RANK=2 is out of range", "OMPI_COMM_WORLD_LOCAL_SIZE=2"]);
    err_with(env(&[(PMI_RANK, "9"), (PMI_SIZE, "8"), (MPI_LOCALRANKID, "0"), (MPI_LOCALNRANKS, "1")]), &["PMI_RANK=9 is out of range", "PMI_SIZE=8"]);
    err_with(
        env(&[(PMI_RANK, "1"), (PMI_SIZE, "8"), (MPI_LOCALRANKID, "1"), (MPI_LOCALNRANKS, "1")]),
        &["MPI_LOCALRANKID=1 is out of range", "MPI_LOCALNRANKS=1"],
    );
    // Slurm: rank 8 of 8, and local id 4 on a 4-task node.
    err_with(env(&owned(&srun_task(8, "4(x2)", 1, 0))), &["SLURM_PROCID=8 is out of range", "SLURM_STEP_NUM_TASKS=8"]);
    err_with(env(&owned(&srun_task(7, "4(x2)", 1, 4))), &["SLURM_LOCALID=4 is out of range", "SLURM_STEP_TASKS_PER_NODE='4(x2)' (4 on node 1)"]);
    // Heterogeneous: node 1 has a single task.
    err_with(env(&owned(&srun_task(7, "2,1", 1, 1))), &["SLURM_LOCALID=1 is out of range", "(1 on node 1)"]);
}

#[test]
fn zero_sizes_and_inconsistent_sizes() {
    let vars = ompi("0", "0", "0", "1");
    let e = err_with(env(&owned(&vars)), &["OMPI_COMM_WORLD_SIZE=0", "world size must be at least 1"]);
    assert!(matches!(e, LaunchError::ZeroSize { .. }));
    err_with(env(&[(PMI_RANK, "0"), (PMI_SIZE, "0")]), &["PMI_SIZE=0", "world size"]);
    let vars = ompi("0", "2", "0", "0");
    err_with(env(&owned(&vars)), &["OMPI_COMM_WORLD_LOCAL_SIZE=0", "ranks on this node must be at least 1"]);
    let vars = ompi("0", "2", "0", "4");
    let e = err_with(env(&owned(&vars)), &["OMPI_COMM_WORLD_LOCAL_SIZE=4", "exceed", "OMPI_COMM_WORLD_SIZE=2"]);
    assert!(matches!(e, LaunchError::LocalExceedsWorld { .. }));
    let mut vars = srun_task(0, "4(x2)", 0, 0);
    vars.retain(|(k, _)| *k != SLURM_STEP_NUM_TASKS);
    vars.retain(|(k, _)| *k != SLURM_NTASKS);
    vars.push((SLURM_NTASKS, "0".into()));
    err_with(env(&owned(&vars)), &["SLURM_NTASKS=0", "world size"]);
}

#[test]
fn bad_slurm_lists() {
    let e = err_with(env(&owned(&srun_task(0, "4(x2", 0, 0))), &["SLURM_STEP_TASKS_PER_NODE='4(x2'", "not a Slurm tasks-per-node list"]);
    assert!(matches!(e, LaunchError::BadTasksPerNode { .. }));
    let e = err_with(
        env(&owned(&srun_task(0, "4(x2)", 2, 0))),
        &["SLURM_NODEID=2 is out of range for SLURM_STEP_TASKS_PER_NODE='4(x2)'", "only 2 node(s)"],
    );
    assert!(matches!(e, LaunchError::NodeOutOfRange { node: 2, nodes: 2, .. }));
    // Node counts that overflow when summed (the count is only for messages): still read.
    let huge = format!("1(x{}),1", usize::MAX);
    assert_eq!(env(&owned(&srun_task(0, &huge, 0, 0))).unwrap().local_world_size, 1);
    // A value with a newline stays on one line, escaped.
    let e = err_with(env(&owned(&srun_task(0, "4\nx", 0, 0))), &["SLURM_STEP_TASKS_PER_NODE='4\\nx'"]);
    assert!(!e.to_string().contains('\n'), "{e}");
    let vars = ompi("1\n2", "4", "0", "4");
    let e = err_with(env(&owned(&vars)), &["OMPI_COMM_WORLD_RANK='1\\n2' is not a number"]);
    assert!(!e.to_string().contains('\n'), "{e}");
}

#[test]
fn cuda_device_selection() {
    assert_eq!(cuda_device_for(0, 1), Ok(0));
    // A rank that sees one GPU takes it, whatever its local rank.
    assert_eq!(cuda_device_for(3, 1), Ok(0));
    assert_eq!(cuda_device_for(3, 8), Ok(3));
    assert_eq!(cuda_device_for(7, 8), Ok(7));
    let e = cuda_device_for(4, 4).unwrap_err();
    assert_eq!(e, LaunchError::NotEnoughDevices { local_rank: 4, visible: 4 });
    let msg = e.to_string();
    assert!(msg.contains("local rank 4") && msg.contains("only 4 CUDA device(s)") && msg.contains("at most 4 ranks per node"), "{msg}");
    let msg = cuda_device_for(0, 0).unwrap_err().to_string();
    assert!(msg.contains("no CUDA devices") && msg.contains("CUDA_VISIBLE_DEVICES"), "{msg}");
}

#[test]
fn display() {
    assert_eq!(expect(Launcher::Slurm, 5, 8, 1, 4).to_string(), "rank 5/8 (local 1/4) via Slurm (srun)");
    assert_eq!(Launcher::OpenMpi.to_string(), "Open MPI (mpirun)");
    assert_eq!(Launcher::Mpich.to_string(), "MPICH/Hydra (mpiexec)");
    assert_eq!(Launcher::Single.to_string(), "single process");
}

fn pmi(pairs: &[(&str, &str)], mpi: MpiLibrary) -> Option<LaunchError> {
    let map: HashMap<String, String> = pairs.iter().map(|&(k, v)| (k.to_owned(), v.to_owned())).collect();
    pmi_problem(|name| map.get(name).cloned(), mpi)
}

/// `srun` without `--mpi=pmix` is refused before MPI_Init with one line naming the fix; PMIx,
/// mpirun (also inside an allocation) and non-srun processes pass.
#[test]
fn srun_without_pmix_is_refused_before_mpi_init() {
    let task = srun_task(3, "4(x2)", 0, 3);
    let task: Vec<(&str, &str)> = owned(&task);
    for mpi in [MpiLibrary::OpenMpi, MpiLibrary::Other] {
        // --mpi=none (Slurm's default): refused whatever the library.
        let e = pmi(&task, mpi).expect("no PMI must be refused");
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        for needle in ["srun --mpi=pmix", "MpiDefault=pmix", "SLURM_MPI_TYPE=pmix", "--mpi=none"] {
            assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
        }
        // --mpi=pmix.
        let mut with_pmix = task.clone();
        with_pmix.extend([(PMIX_RANK, "3"), (PMIX_NAMESPACE, "slurm.pmix.12345.0")]);
        assert!(pmi(&with_pmix, mpi).is_none());
        // A batch script or salloc shell: no step, nothing to check.
        assert!(pmi(SBATCH, mpi).is_none());
        assert!(pmi(&[], mpi).is_none());
        // mpirun inside an allocation: its ranks may carry the SLURM_* of the daemons' step.
        let mut under_mpirun = task.clone();
        let o = ompi("3", "8", "3", "4");
        under_mpirun.extend(owned(&o));
        assert!(pmi(&under_mpirun, mpi).is_none());
    }
    // --mpi=pmi2: enough for MPICH, not for Open MPI.
    let mut with_pmi2 = task.clone();
    with_pmi2.extend([(PMI_FD, "11"), (PMI_RANK, "3"), (PMI_SIZE, "8")]);
    assert!(pmi(&with_pmi2, MpiLibrary::Other).is_none());
    let msg = pmi(&with_pmi2, MpiLibrary::OpenMpi).expect("Open MPI under pmi2").to_string();
    assert!(msg.contains("PMI-2") && msg.contains("Open MPI") && msg.contains("srun --mpi=pmix"), "{msg}");
}

#[test]
fn the_linked_mpi_is_open_mpi() {
    // The workspace builds against Debian's Open MPI (scripts/setup.sh).
    assert_eq!(MpiLibrary::linked(), MpiLibrary::OpenMpi);
}
