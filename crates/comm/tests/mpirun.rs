//! The communicator under a real `mpirun` (Open MPI), 2 to 4 ranks on this machine's cores
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
    let mut cmd = Command::new("mpirun");
    cmd.args(["-np", &np.to_string(), "--oversubscribe", "--tag-output"])
        .arg(env!("CARGO_BIN_EXE_comm_selftest"))
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_plm", "isolated")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
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
    let silent: Vec<TcpStream> = ranks
        .iter()
        .flat_map(|&(addr, _)| (0..40).map(move |_| TcpStream::connect(addr).unwrap()))
        .collect();
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
