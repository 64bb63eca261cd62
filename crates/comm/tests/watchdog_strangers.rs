//! The watchdog's ports under real jobs: strangers cannot stop, query or bloat a job, a hung job
//! ends while they hold its ports, stopped ranks end a job, each named.

mod common;

use common::*;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// What a rank's port says first on every connection.
const HELLO: &str = "fabbrica-watchdog/1 ";

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
/// end the job: every running rank reports the hang and names each stopped rank as giving no
/// answer. That the peers are asked and told all at once (so stopped ranks do not add up) is
/// shown by the watchdog's unit tests, which count the connections open at once; here the limit
/// is only a hang guard, far above even the one-at-a-time diagnosis.
#[test]
fn watchdog_ends_a_job_with_stopped_ranks_and_names_each() {
    use fabbrica_comm::watchdog::{ABORT_TIMEOUT, EXIT_PAUSE, QUERY_TIMEOUT};
    const NP: usize = 8;
    const STOPPED: usize = 4;
    let timeout = Duration::from_secs(3);
    const { assert!(STOPPED <= fabbrica_comm::watchdog::FAN_OUT) };
    let guard = 4 * (timeout + STOPPED as u32 * (QUERY_TIMEOUT + ABORT_TIMEOUT) + EXIT_PAUSE) + Duration::from_secs(60);

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
    // Past the guard, `finish` kills the job and fails the test.
    let (status, all) = job.finish(guard.saturating_sub(t0.elapsed()));
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
    println!("ended {took:?} after stopping {STOPPED} of {NP} ranks");
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
