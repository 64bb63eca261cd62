//! The Slurm tests' harness: the shared single-node cluster, sbatch and job polling, the
//! reference losses, and the checks every test makes.
#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use fabbrica_train::checkpoint;
use fabbrica_train::metrics::read;

/// One job at a time: 2 cores, and every job uses both.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub const STEPS: u64 = 400;
pub const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
pub const BIN: &str = env!("CARGO_BIN_EXE_fabbrica");

pub fn script(rel: &str) -> PathBuf {
    Path::new(ROOT).join(rel)
}

/// `--set` arguments of a small run (a few seconds on 2 cores), `max_steps` steps into `out`.
pub fn train_args(out: &Path, max_steps: u64) -> Vec<String> {
    [
        "model.n_layer=1".to_string(),
        "model.n_head=2".into(),
        "model.n_embd=16".into(),
        "model.block_size=16".into(),
        "model.dropout=0.1".into(),
        "train.batch_size=2".into(),
        format!("train.max_steps={max_steps}"),
        "train.warmup_steps=5".into(),
        "train.log_interval=1".into(),
        "train.eval_interval=100000".into(),
        "train.eval_iters=2".into(),
        "run.sample_tokens=0".into(),
        "run.threads=1".into(),
        format!("run.out_dir={}", out.display()),
        format!("data.path={ROOT}/data/pystdlib.txt"),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

pub fn losses(out: &Path) -> Vec<(u64, u64)> {
    read(&out.join("metrics.jsonl")).unwrap().into_iter().filter(|r| r.kind == "train").map(|r| (r.step, r.loss.unwrap().to_bits())).collect()
}

pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

pub fn mpi_env(c: &mut Command) -> &mut Command {
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
}

/// The losses of an uninterrupted `mpirun -np 2` run of `STEPS` steps, computed once.
pub fn reference() -> &'static [(u64, u64)] {
    static REF: OnceLock<Vec<(u64, u64)>> = OnceLock::new();
    REF.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ref");
        let o = mpi_env(Command::new("mpirun").args(["-np", "2", "--oversubscribe", BIN, "train"])).args(train_args(&out, STEPS)).output().unwrap();
        assert!(o.status.success(), "reference run failed\n{}", text(&o));
        let l = losses(&out);
        assert_eq!(l.len() as u64, STEPS);
        l
    })
}

// ---------------------------------------------------------------------------------------------
// The cluster.

pub struct Cluster {
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("slurm.conf")
    }

    /// A Slurm command against this cluster.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        mpi_env(&mut c).env("SLURM_CONF", self.conf()).env("FABBRICA", BIN);
        c
    }

    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        for f in ["slurmctld.log", "slurmd.log"] {
            let t = fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            s += &format!("--- {f} (tail)\n{}\n", lines[lines.len().saturating_sub(15)..].join("\n"));
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(script("scripts/slurm/cluster.sh")).arg("stop").arg(self.dir.path()).status();
    }
}

pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// Two consecutive free TCP ports (slurmctld's and slurmd's).
pub fn free_ports() -> u16 {
    let start = 20000 + (std::process::id() % 20000) as u16;
    (start..start + 2000)
        .find(|&p| TcpListener::bind(("0.0.0.0", p)).is_ok() && TcpListener::bind(("0.0.0.0", p + 1)).is_ok())
        .expect("no free ports")
}

/// The shared cluster, started on first use; `None` (with a skip logged for `test`) when this
/// machine cannot run one (not root).
pub fn cluster(test: &str) -> Option<Arc<Cluster>> {
    static SHARED: Mutex<Weak<Cluster>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = shared.upgrade() {
        return Some(c);
    }
    if !is_root() {
        println!("SKIPPED: starting a Slurm cluster needs root");
        if let Ok(log) = std::env::var("FABBRICA_SKIP_LOG") {
            use std::io::Write;
            if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(log) {
                let _ = writeln!(f, "cli::slurm {test}: starting a Slurm cluster needs root");
            }
        }
        return None;
    }
    let c = Arc::new(Cluster { dir: tempfile::tempdir().unwrap() });
    let o = Command::new("bash")
        .arg(script("scripts/slurm/cluster.sh"))
        .arg("start")
        .arg(c.dir.path())
        .env("CLUSTER_PORT", free_ports().to_string())
        .output()
        .unwrap();
    assert!(o.status.success(), "cluster.sh start failed\n{}{}", text(&o), c.log_tail());
    *shared = Arc::downgrade(&c);
    Some(c)
}

/// `scontrol show job` fields of a job.
pub struct JobInfo {
    pub state: String,
    pub exit_code: String,
    pub restarts: u32,
}

pub fn job_info(c: &Cluster, id: &str) -> JobInfo {
    let o = c.cmd("scontrol").args(["show", "job", "-o", id]).output().unwrap();
    let t = String::from_utf8_lossy(&o.stdout).into_owned();
    let field = |name: &str| t.split_whitespace().find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('='))).unwrap_or("").to_string();
    JobInfo { state: field("JobState"), exit_code: field("ExitCode"), restarts: field("Restarts").parse().unwrap_or(0) }
}

pub const FINAL: &[&str] = &["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"];

/// Submits scripts/slurm/train.sbatch for 2 ranks; output to `dir/job.out`.
pub fn sbatch(c: &Cluster, dir: &Path, opts: &[&str], env: &[(&str, &str)], args: &[String]) -> String {
    let mut cmd = c.cmd("sbatch");
    cmd.args(["--parsable", "--nodes=1", "--ntasks-per-node=2"])
        .arg(format!("--output={}", dir.join("job.out").display()))
        .args(opts)
        .arg(script("scripts/slurm/train.sbatch"))
        .args(args)
        .envs(env.iter().copied());
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "sbatch failed\n{}{}", text(&o), c.log_tail());
    String::from_utf8_lossy(&o.stdout).trim().split(';').next().unwrap().to_string()
}

pub fn job_out(dir: &Path) -> String {
    fs::read_to_string(dir.join("job.out")).unwrap_or_default()
}

/// Waits for the job to reach a final state; panics with its output after `limit`.
pub fn wait_final(c: &Cluster, id: &str, dir: &Path, limit: Duration) -> JobInfo {
    let t = Instant::now();
    loop {
        let info = job_info(c, id);
        if FINAL.contains(&info.state.as_str()) {
            return info;
        }
        assert!(t.elapsed() < limit, "job {id} still {} after {limit:?}\n{}{}", info.state, job_out(dir), c.log_tail());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the job's run has logged `step` steps, so that what comes next lands mid-run.
pub fn wait_for_step(c: &Cluster, id: &str, dir: &Path, out: &Path, step: usize) {
    let t = Instant::now();
    loop {
        let logged = fs::read_to_string(out.join("metrics.jsonl")).map(|s| s.lines().count()).unwrap_or(0);
        if logged >= step {
            return;
        }
        let info = job_info(c, id);
        assert!(!FINAL.contains(&info.state.as_str()), "job {id} ended ({}) before step {step}\n{}", info.state, job_out(dir));
        assert!(t.elapsed() < Duration::from_secs(90), "no step {step} within 90 s\n{}{}", job_out(dir), c.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Processes whose command line mentions `needle` (a run's unique out_dir).
pub fn processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == std::process::id().to_string() {
            continue;
        }
        if let Ok(raw) = fs::read(e.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(format!("{name}: {cmdline}"));
            }
        }
    }
    found
}

/// Asserts that no process of the run into `out` is left (waiting a little for the teardown).
pub fn assert_no_process_left(out: &Path) {
    let needle = out.display().to_string();
    let t = Instant::now();
    loop {
        let left = processes_with(&needle);
        if left.is_empty() {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "processes left behind:\n{}", left.join("\n"));
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn checkpoint_step(out: &Path) -> u64 {
    let latest = checkpoint::latest(out).unwrap().expect("a checkpoint was written");
    checkpoint::read_state(&latest).unwrap().step
}

// ---------------------------------------------------------------------------------------------
// Launching under Slurm.
