//! Shared by the mpirun test files: launching comm_selftest under a real `mpirun`, and a job
//! running in the background with its output collected.
#![allow(dead_code)] // each test file uses its own part

pub use std::process::{Command, Output};
use std::sync::Mutex;
use std::thread::JoinHandle;
pub use std::time::{Duration, Instant};

/// One mpirun at a time: the machine has 2 cores and every job oversubscribes them.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn mpirun(np: usize, args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut cmd = command(np, args, env);
    let t = Instant::now();
    let out = cmd.output().expect("mpirun is installed (scripts/setup.sh installs openmpi-bin)");
    (out, t.elapsed())
}

pub fn command(np: usize, args: &[&str], env: &[(&str, &str)]) -> Command {
    command_of(env!("CARGO_BIN_EXE_comm_selftest").as_ref(), np, args, env)
}

/// `mpirun` of `program` with this file's settings.
pub fn command_of(program: &std::ffi::OsStr, np: usize, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["-np", &np.to_string(), "--oversubscribe", "--tag-output"])
        .arg(program)
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_plm", "isolated")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        // Flight recorder dumps (a watchdog firing, a communication error) out of the source tree;
        // the flight recorder tests set a directory of their own.
        .env("FABBRICA_FLIGHT_DIR", concat!(env!("CARGO_TARGET_TMPDIR"), "/mpirun-flight"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Lines that rank `r` wrote (mpirun --tag-output prefixes them with `[1,r]<stream>:`).
pub fn lines_of(all: &str, r: usize) -> Vec<String> {
    let tag = format!("[1,{r}]<");
    all.lines().filter(|l| l.contains(&tag)).map(|l| l.to_string()).collect()
}

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};

/// A job running in the background, its output collected by two threads.
pub struct Running {
    pub child: Child,
    out: Option<JoinHandle<Vec<u8>>>,
    err: Option<JoinHandle<Vec<u8>>>,
}

impl Running {
    pub fn start(np: usize, args: &[&str], env: &[(&str, &str)]) -> Running {
        let mut child = command(np, args, env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mpirun is installed (scripts/setup.sh installs openmpi-bin)");
        let drain = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = r.read_to_end(&mut v);
                v
            })
        };
        let out = Some(drain(Box::new(child.stdout.take().unwrap())));
        let err = Some(drain(Box::new(child.stderr.take().unwrap())));
        Running { child, out, err }
    }

    /// Waits (at most `limit`) for the job to end; its status and output.
    pub fn finish(&mut self, limit: Duration) -> (ExitStatus, String) {
        let t = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break Some(s);
            }
            if t.elapsed() > limit {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let status = status.unwrap_or_else(|| {
            // SAFETY: kill(2) on our own child's pid; it only sends a signal.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(5));
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!("the job did not end within {limit:?}:\n{}", self.output());
        });
        (status, self.output())
    }

    pub fn output(&mut self) -> String {
        let out = self.out.take().map(|h| h.join().unwrap()).unwrap_or_default();
        let err = self.err.take().map(|h| h.join().unwrap()).unwrap_or_default();
        format!("{}{}", String::from_utf8_lossy(&out), String::from_utf8_lossy(&err))
    }

    /// Every rank's watchdog address and process id, once published.
    pub fn addresses(&mut self, dir: &Path, np: usize) -> Vec<(SocketAddr, u32)> {
        let t = Instant::now();
        loop {
            let got: Vec<_> = (0..np).filter_map(|r| std::fs::read_to_string(dir.join(format!("addr.{r}"))).ok()).collect();
            if got.len() == np {
                return got
                    .iter()
                    .map(|l| {
                        let (a, p) = l.trim().split_once(' ').unwrap();
                        (a.parse().unwrap(), p.parse().unwrap())
                    })
                    .collect();
            }
            if self.child.try_wait().unwrap().is_some() || t.elapsed() > Duration::from_secs(120) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("the ranks did not publish their addresses:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A failed assertion must not leave the job running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fabbrica-comm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
