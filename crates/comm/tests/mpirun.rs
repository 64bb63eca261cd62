//! The communicator under a real `mpirun` (Open MPI), 2 to 8 ranks on this machine's cores
//! (`--oversubscribe`). The scenarios live in `src/bin/comm_selftest.rs`.

use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One mpirun at a time: the machine has 2 cores and every job oversubscribes them.
static SERIAL: Mutex<()> = Mutex::new(());

fn mpirun(np: usize, args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut cmd = command(np, args, env);
    let t = Instant::now();
    let out = cmd.output().expect("mpirun is installed (scripts/setup.sh installs openmpi-bin)");
    (out, t.elapsed())
}

fn command(np: usize, args: &[&str], env: &[(&str, &str)]) -> Command {
    command_of(env!("CARGO_BIN_EXE_comm_selftest").as_ref(), np, args, env)
}

/// `mpirun` of `program` with this file's settings.
fn command_of(program: &std::ffi::OsStr, np: usize, args: &[&str], env: &[(&str, &str)]) -> Command {
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

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Lines that rank `r` wrote (mpirun --tag-output prefixes them with `[1,r]<stream>:`).
fn lines_of(all: &str, r: usize) -> Vec<String> {
    let tag = format!("[1,{r}]<");
    all.lines().filter(|l| l.contains(&tag)).map(|l| l.to_string()).collect()
}

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
    assert!(!out.status.success(), "the job must fail:\n{all}");
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
    assert!(!out.status.success(), "the job must fail:\n{all}");
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

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// What a rank's port says first on every connection.
const HELLO: &str = "fabbrica-watchdog/1 ";

/// A job running in the background, its output collected by two threads.
struct Running {
    child: Child,
    out: Option<JoinHandle<Vec<u8>>>,
    err: Option<JoinHandle<Vec<u8>>>,
}

impl Running {
    fn start(np: usize, args: &[&str], env: &[(&str, &str)]) -> Running {
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
    fn finish(&mut self, limit: Duration) -> (ExitStatus, String) {
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

    fn output(&mut self) -> String {
        let out = self.out.take().map(|h| h.join().unwrap()).unwrap_or_default();
        let err = self.err.take().map(|h| h.join().unwrap()).unwrap_or_default();
        format!("{}{}", String::from_utf8_lossy(&out), String::from_utf8_lossy(&err))
    }

    /// Every rank's watchdog address and process id, once published.
    fn addresses(&mut self, dir: &Path, np: usize) -> Vec<(SocketAddr, u32)> {
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

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fabbrica-comm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Everything the port sends until it closes the connection; panics if it is still open after 20 s.
fn until_closed(mut s: TcpStream, what: &str) -> String {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{what}: the rank kept the connection open ({e})"),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Reads the greeting line.
fn greeting(s: &TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    let mut r = s;
    while r.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Cheap, varied bytes (not secret: a stranger guessing).
struct Noise(u64);
impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn hex(&mut self, n: usize) -> String {
        (0..n).map(|_| char::from_digit((self.next() % 16) as u32, 16).unwrap()).collect()
    }
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Everything a stranger can try on one rank's port, none of which may change the job. Returns
/// how many complete request lines it sent.
fn attack(addr: SocketAddr, pid: u32, noise: &mut Noise) -> u64 {
    let mut lines = 0;
    // The old protocol: abort and query, sent without waiting for the greeting.
    for line in ["A stranger says stop\n", "Q world\n"] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(line.as_bytes()).unwrap();
        let got = until_closed(s, line);
        assert!(got.lines().count() <= 1 && got.lines().all(|l| l.starts_with(HELLO)), "{line:?} was answered: {got:?}");
        lines += 1;
    }
    // Garbage bytes.
    let mut s = TcpStream::connect(addr).unwrap();
    let mut junk: Vec<u8> = (0..3000).map(|_| (noise.next() % 255) as u8 + 1).filter(|&b| b != b'\n').collect();
    junk.push(b'\n');
    s.write_all(&junk).unwrap();
    let got = until_closed(s, "garbage");
    assert!(got.lines().all(|l| l.starts_with(HELLO)), "garbage was answered: {got:?}");
    lines += 1;
    // The new protocol with a guessed tag, and with a truncated one.
    for line in [
        format!("{} A stranger says stop\n", noise.hex(64)),
        format!("{} Q world\n", noise.hex(64)),
        format!("{} A stranger says stop\n", "0".repeat(64)),
        format!("{} Q world\n", noise.hex(63)),
    ] {
        let mut s = TcpStream::connect(addr).unwrap();
        assert!(greeting(&s).starts_with(HELLO));
        s.write_all(line.as_bytes()).unwrap();
        assert_eq!(until_closed(s, &line), "", "{line:?} was answered");
        lines += 1;
    }
    // A line without end: the rank closes the connection instead of buffering it.
    let before = vm_rss_kib(pid);
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let mb = vec![b'A'; 1 << 20];
    let mut sent = 0usize;
    let err = loop {
        match s.write(&mb) {
            Ok(n) => sent += n,
            Err(e) => break e,
        }
        assert!(sent < 256 << 20, "the rank took {sent} bytes of one line");
    };
    assert!(
        matches!(err.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted),
        "the rank neither read nor closed the connection: {err}"
    );
    let after = vm_rss_kib(pid);
    assert!(after < before + 8192, "the rank's memory grew from {before} KiB to {after} KiB after {sent} bytes");
    lines
}

/// A stranger holding `n` silent connections to `addr` (reopening those the rank closes) and
/// sending an old-protocol abort every round, until `stop`.
fn hold(addr: SocketAddr, n: usize, stop: Arc<AtomicBool>, ready: Arc<AtomicUsize>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut conns: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
        let mut first = true;
        while !stop.load(Ordering::Relaxed) {
            for c in conns.iter_mut() {
                let alive = c.as_mut().is_some_and(|s| {
                    let mut b = [0u8; 256];
                    loop {
                        match s.read(&mut b) {
                            Ok(0) => break false,
                            Ok(_) => continue,
                            Err(e) => break e.kind() == ErrorKind::WouldBlock,
                        }
                    }
                });
                if !alive {
                    *c = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok();
                    if let Some(s) = c {
                        s.set_nonblocking(true).unwrap();
                    }
                }
            }
            if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                let _ = s.write_all(b"A stranger says stop\n");
            }
            if first {
                ready.fetch_add(1, Ordering::SeqCst);
                first = false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

/// Strangers talking to a running job's watchdog ports (the old protocol, garbage, guessed and
/// truncated tags, a line without end, silent connections beyond the port's cap) change nothing:
/// the job ends normally with the right results, nothing is printed, the rank's memory does
/// not take the line in, and every bad line is counted.
#[test]
fn strangers_cannot_stop_query_or_bloat_a_running_job() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = fresh_dir("strangers");
    let d = dir.to_str().unwrap();
    let mut job = Running::start(2, &["stranger"], &[("FABBRICA_SELFTEST_DIR", d)]);
    let ranks = job.addresses(&dir, 2);
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64);
    let mut sent = Vec::new();
    for &(addr, pid) in &ranks {
        // One node: the port is on the loopback interface only.
        assert_eq!(addr.ip().to_string(), "127.0.0.1", "{addr}");
        sent.push(attack(addr, pid, &mut noise));
    }
    // Silent connections, more than the port serves at once, held while the job keeps going.
    let silent: Vec<TcpStream> = ranks.iter().flat_map(|&(addr, _)| (0..40).map(move |_| TcpStream::connect(addr).unwrap())).collect();
    std::thread::sleep(Duration::from_secs(1));
    std::fs::write(dir.join("go"), "").unwrap();
    let (status, all) = job.finish(Duration::from_secs(180));
    drop(silent);
    assert!(status.success(), "{all}");
    assert!(!all.contains("stranger says") && !all.contains("error"), "{all}");
    for (r, &bad_lines) in sent.iter().enumerate() {
        let mine = lines_of(&all, r);
        assert!(mine.iter().any(|l| l.ends_with(&format!("OK stranger rank {r}"))), "rank {r}:\n{all}");
        let port = mine.iter().find_map(|l| l.split_once(&format!("PORT rank {r} ")).map(|(_, x)| x.to_string()));
        let port = port.unwrap_or_else(|| panic!("rank {r} did not report its port:\n{all}"));
        let num = |key: &str| -> u64 {
            let mut it = port.split_whitespace();
            it.position(|w| w == key).unwrap();
            it.next().unwrap().parse().unwrap()
        };
        assert!(num("rejected") >= bad_lines, "rank {r} counted fewer bad lines than {bad_lines}: {port}");
        // The line without end, and the 8 silent connections beyond the cap of 32, pushed out.
        assert!(num("dropped") > 8, "rank {r}: {port}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The watchdog still ends a hung job, naming the rank, while strangers hold more connections to
/// every rank's port than it serves at once (and keep sending old-protocol aborts). The port is
/// on FABBRICA_WATCHDOG_HOST when that is set.
#[test]
fn watchdog_ends_a_hung_job_while_strangers_hold_its_ports() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = fresh_dir("hung");
    let d = dir.to_str().unwrap();
    let env = [("FABBRICA_COMM_TIMEOUT", "2"), ("FABBRICA_SELFTEST_DIR", d), ("FABBRICA_WATCHDOG_HOST", "127.0.0.2")];
    let mut job = Running::start(3, &["watchdog"], &env);
    let ranks = job.addresses(&dir, 3);
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicUsize::new(0));
    let strangers: Vec<_> = ranks
        .iter()
        .map(|&(addr, _)| {
            assert_eq!(addr.ip().to_string(), "127.0.0.2", "FABBRICA_WATCHDOG_HOST is where it listens");
            hold(addr, 48, stop.clone(), ready.clone())
        })
        .collect();
    let t = Instant::now();
    while ready.load(Ordering::SeqCst) < ranks.len() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(dir.join("go"), "").unwrap();
    let (status, all) = job.finish(Duration::from_secs(180));
    stop.store(true, Ordering::Relaxed);
    for s in strangers {
        s.join().unwrap();
    }
    assert!(!status.success(), "the job must fail:\n{all}");
    for r in 0..3 {
        assert!(
            lines_of(&all, r).iter().any(|l| l.contains("error:")
                && l.contains("all_reduce #2 on group 'world'")
                && l.contains("did not complete within 2.0s")
                && l.contains("ranks [2] did not arrive")),
            "rank {r} did not report the hang:\n{all}"
        );
    }
    assert!(!all.contains("stranger says stop") && !all.contains("should have ended the job"), "{all}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Stopped ranks (SIGSTOP: a frozen node, whose port still accepts connections and never answers)
/// do not add up: the watchdog asks all its peers at once and tells them all to abort at once, so
/// the job ends within the timeout plus one query timeout and one abort timeout (plus slack for the
/// launcher), however many ranks are stopped. Asked one after the other, as before, each stopped
/// rank adds a whole query timeout: 4 of them here, 4 x 4 s, far past the bound.
#[test]
fn watchdog_ends_a_job_with_stopped_ranks_in_bounded_time() {
    use fabbrica_comm::watchdog::{ABORT_TIMEOUT, EXIT_PAUSE, QUERY_TIMEOUT};
    const NP: usize = 8;
    const STOPPED: usize = 4;
    let timeout = Duration::from_secs(3);
    // The checker looks every timeout / 20; the launcher then tears the job down (SIGTERM, and
    // SIGKILL for the stopped ranks) on 2 oversubscribed cores: a few seconds of slack.
    let slack = Duration::from_secs(6);
    // Fewer stopped ranks than FAN_OUT: every one is asked and told at once, so the per-peer
    // timeouts apply (not the overall deadlines, DIAGNOSIS_DEADLINE and ABORT_DEADLINE).
    const { assert!(STOPPED <= fabbrica_comm::watchdog::FAN_OUT) };
    let bound = timeout + timeout / 20 + QUERY_TIMEOUT + ABORT_TIMEOUT + EXIT_PAUSE + slack;
    // What the serial diagnosis would need at least, teardown not counted.
    let serial = timeout + STOPPED as u32 * QUERY_TIMEOUT + EXIT_PAUSE;
    assert!(serial > bound + Duration::from_secs(2), "the test must tell the two apart: {serial:?} vs {bound:?}");

    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = fresh_dir("stopped");
    let d = dir.to_str().unwrap();
    let secs = timeout.as_secs().to_string();
    let mut job = Running::start(NP, &["watchdog-stop", &STOPPED.to_string()], &[("FABBRICA_COMM_TIMEOUT", &secs), ("FABBRICA_SELFTEST_DIR", d)]);
    let ranks = job.addresses(&dir, NP);
    // Whatever happens from here on, no rank of this job outlives the test, stopped or not.
    let _reaper = Reaper(ranks.iter().map(|&(_, pid)| pid).collect());
    std::fs::write(dir.join("go"), "").unwrap();
    let stopped: Vec<usize> = (NP - STOPPED..NP).collect();
    let t = Instant::now();
    while !stopped.iter().all(|r| dir.join(format!("asleep.{r}")).exists()) {
        assert!(t.elapsed() < Duration::from_secs(120) && job.child.try_wait().unwrap().is_none(), "the ranks never got to sleep:\n{}", job.output());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The others are in all_reduce #2 by now (their clock started no later than this).
    let t0 = Instant::now();
    for &r in &stopped {
        // SAFETY: kill(2) on a rank of our own job.
        assert_eq!(unsafe { libc::kill(ranks[r].1 as libc::pid_t, libc::SIGSTOP) }, 0);
    }
    // Past the bound, `finish` kills the job and fails the test.
    let (status, all) = job.finish(bound.saturating_sub(t0.elapsed()));
    let took = t0.elapsed();
    assert!(!status.success(), "the job must fail:\n{all}");
    let names = format!("ranks {stopped:?} did not arrive");
    for r in 0..NP - STOPPED {
        assert!(
            lines_of(&all, r).iter().any(|l| l.contains("error:")
                && l.contains("all_reduce #2 on group 'world'")
                && l.contains("did not complete within 3.0s")
                && l.contains(&names)
                && stopped.iter().all(|s| l.contains(&format!("rank {s}: no answer")))),
            "rank {r} did not name the stopped ranks ({took:?}):\n{all}"
        );
    }
    assert!(!all.contains("should have ended the job"), "{all}");
    println!("ended {took:?} after stopping {STOPPED} of {NP} ranks (bound {bound:?}, one at a time at least {serial:?})");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Kills (SIGKILL, which ends a stopped process too) whichever of these ranks still runs when
/// dropped: the launcher may leave stopped ranks behind, and a failed test must not.
struct Reaper(Vec<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // Only our selftest: the number may have been given to another process since.
            let ours = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains("comm_selftest"));
            if ours {
                // SAFETY: kill(2) on a rank of our own job; it only sends signals.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                    libc::kill(pid as libc::pid_t, libc::SIGCONT);
                }
            }
        }
    }
}

/// FABBRICA_WATCHDOG_HOST names one address: every interface is refused, on every rank alike
/// (no rank is left waiting in the address exchange).
#[test]
fn watchdog_host_must_not_be_every_interface() {
    let (out, took) = mpirun(2, &["ops"], &[("FABBRICA_WATCHDOG_HOST", "0.0.0.0")]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(took < Duration::from_secs(60), "the job took {took:?}:\n{all}");
    for r in 0..2 {
        assert!(
            lines_of(&all, r).iter().any(|l| l.contains("error: watchdog: FABBRICA_WATCHDOG_HOST='0.0.0.0' is every interface")),
            "rank {r}:\n{all}"
        );
    }
}

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
    std::thread::sleep(Duration::from_millis(300));
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
