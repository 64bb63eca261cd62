//! The GPU machine's image may have no Open MPI and no freetype, and our binaries need both to
//! load at all. scripts/device/pack_mpi.sh carries them with a relocatable mpirun; this rehearses
//! the device run here with this machine's own MPI stack hidden (scripts/device/without_system_mpi.sh,
//! a private mount namespace): the bare binary must fail to load, and with the pack the device
//! check script's CPU steps (training, the loss comparison, MPI all-reduce under the carried
//! mpirun) must pass.

use std::path::Path;
use std::process::Command;

mod common;
use common::describe;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().and_then(Path::parent).unwrap()
}

fn skip(why: &str) {
    println!("SKIPPED: {why}");
    if let Ok(log) = std::env::var("FABBRICA_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(f, "cli::device_pack: {why}");
        }
    }
}

#[test]
fn the_pack_runs_mpi_steps_on_an_image_without_open_mpi() {
    let bin = env!("CARGO_BIN_EXE_fabbrica");
    let hide = repo().join("scripts/device/without_system_mpi.sh");
    // Hidden, the system's libraries cannot load: the binary alone fails (else nothing is shown).
    let bare = Command::new(&hide).args([bin, "--version"]).output().unwrap();
    if bare.status.code() == Some(3) {
        skip(String::from_utf8_lossy(&bare.stderr).trim());
        return;
    }
    assert!(!bare.status.success(), "the binary loaded with the system MPI hidden: {}", describe(&bare));
    assert!(String::from_utf8_lossy(&bare.stderr).contains("error while loading shared libraries"), "{}", describe(&bare));

    // A pack as scripts/device/pack.sh lays it out, in a tree with no .venv (as on the device).
    let root = tempfile::tempdir().unwrap();
    let dev = root.path().join(".device");
    std::fs::create_dir_all(dev.join("bin")).unwrap();
    let pack = Command::new(repo().join("scripts/device/pack_mpi.sh")).arg(&dev).arg(bin).output().unwrap();
    assert!(pack.status.success(), "{}", describe(&pack));
    std::os::unix::fs::symlink(bin, dev.join("bin/fabbrica")).unwrap();
    // The device's own environment (../shared/device/env.sh, which CI's checkout lacks), less torch.
    std::fs::write(
        dev.join("env.sh"),
        "export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_plm=isolated\n\
         export OMPI_MCA_btl_vader_single_copy_mechanism=none\n",
    )
    .unwrap();
    std::fs::write(dev.join("pystdlib.txt"), "def f(x):\n    return x + 1\n".repeat(2000)).unwrap();
    std::fs::create_dir_all(root.path().join("scripts/device")).unwrap();
    std::fs::copy(repo().join("scripts/device/check.sh"), root.path().join("scripts/device/check.sh")).unwrap();

    let out = root.path().join("out");
    let o = Command::new(&hide)
        .args(["bash", "scripts/device/check.sh", "correctness", "collectives"])
        .current_dir(root.path())
        .env("EXPECT_GPU", "0")
        .env("QUICK", "1")
        .env("DEADLINE", "600")
        .env("OUT", &out)
        .env_remove("OMPI_MCA_plm")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", describe(&o));
    // The carried mpirun, not the (hidden) system one, ran the step.
    let carried = format!("mpirun: {}", dev.join("mpi/bin/mpirun").display());
    assert!(stdout.contains(&carried), "expected '{carried}' in the preflight\n{}", describe(&o));
    assert!(!stdout.contains("MISSING LIBRARIES"), "{}", describe(&o));
    assert!(stdout.contains("ok     MPI all_reduce, np=2"), "{}", describe(&o));
    // A step that is a shell function (the loss comparison) runs under its time limit too.
    assert!(stdout.contains("ok       the two CPU runs match"), "{}", describe(&o));
    assert!(stdout.contains("4 passed, 0 failed"), "{}", describe(&o));
    // Results are written as the run goes.
    assert!(out.join("results.tar.gz").is_file() && out.join("check.log").is_file());
}
