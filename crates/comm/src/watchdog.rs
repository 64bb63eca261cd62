//! The watchdog: turns an operation that never completes into an error on every rank, instead of a
//! job that hangs until its allocation runs out.
//!
//! Every rank runs two threads once the world has more than one rank:
//! - a *listener* on a TCP port (addresses are exchanged over MPI at start-up) that answers two
//!   requests from peers without touching MPI: `Q <group id>` ("what is the last collective you
//!   called on this group, and what are you doing now?") and `A <message>` ("the job is aborting");
//! - a *checker* that looks at the operations in flight on this rank. When one has run longer than
//!   the timeout, it asks the group's other ranks how far they got, prints one line naming the
//!   operation, the group, its sequence number and the ranks that did not arrive, tells every rank
//!   of the world to abort with that line, and exits with [`EXIT_CODE`].
//!
//! The blocked thread is inside MPI or NCCL and cannot be unwound, so ending the process is the
//! only way out (PyTorch's NCCL watchdog does the same).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Exit status of a rank that the watchdog ends.
pub const EXIT_CODE: i32 = 3;

/// What a rank is doing, as far as the watchdog is concerned.
struct Inflight {
    /// `OpContext` display: op, seq, group, backend, rank.
    desc: String,
    group_id: String,
    seq: u64,
    /// World ranks of the group's members, by group rank.
    members: Arc<Vec<usize>>,
    /// For point-to-point: the peer's group rank.
    peer: Option<usize>,
    collective: bool,
    started: Instant,
}

pub(crate) struct Watchdog {
    timeout: Duration,
    world_rank: usize,
    /// Listener address of every world rank.
    peers: Vec<SocketAddr>,
    inflight: Mutex<BTreeMap<u64, Inflight>>,
    next: AtomicU64,
    /// Group id -> (last collective sequence number called, its description).
    called: Mutex<HashMap<String, (u64, String)>>,
}

static WATCHDOG: OnceLock<Arc<Watchdog>> = OnceLock::new();

/// Removes its operation from the in-flight table when dropped.
pub(crate) struct Guard(Option<u64>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let (Some(id), Some(w)) = (self.0, WATCHDOG.get()) {
            w.inflight.lock().unwrap().remove(&id);
        }
    }
}

/// Records that this rank called collective `seq` on `group_id` (called when it is issued).
pub(crate) fn called(group_id: &str, seq: u64, desc: &str) {
    if let Some(w) = WATCHDOG.get() {
        w.called.lock().unwrap().insert(group_id.to_string(), (seq, desc.to_string()));
    }
}

/// Starts the timer of an operation; it stops when the guard is dropped.
pub(crate) fn begin(
    desc: String,
    group_id: &str,
    seq: u64,
    members: &Arc<Vec<usize>>,
    peer: Option<usize>,
) -> Guard {
    let Some(w) = WATCHDOG.get() else { return Guard(None) };
    let id = w.next.fetch_add(1, Ordering::Relaxed);
    w.inflight.lock().unwrap().insert(
        id,
        Inflight {
            desc,
            group_id: group_id.to_string(),
            seq,
            members: members.clone(),
            peer,
            collective: peer.is_none(),
            started: Instant::now(),
        },
    );
    Guard(Some(id))
}

/// The configured timeout, once the watchdog runs.
pub fn timeout() -> Option<Duration> {
    WATCHDOG.get().map(|w| w.timeout)
}

/// Binds the listener; returns it with the address peers should use.
pub(crate) fn bind() -> std::io::Result<(TcpListener, String)> {
    let listener = TcpListener::bind("0.0.0.0:0")?;
    let port = listener.local_addr()?.port();
    let host = std::env::var("FABBRICA_WATCHDOG_HOST").ok().filter(|s| !s.is_empty());
    let host = host.unwrap_or_else(reachable_host);
    Ok((listener, format!("{host}:{port}")))
}

/// An address of this host that other hosts can reach: the first non-loopback IPv4 address the
/// host name resolves to, else the loopback address (enough when every rank is on this host).
fn reachable_host() -> String {
    let mut buf = [0u8; 256];
    let name = unsafe {
        if libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) != 0 {
            return "127.0.0.1".into();
        }
        std::ffi::CStr::from_ptr(buf.as_ptr() as *const libc::c_char).to_string_lossy().into_owned()
    };
    if let Ok(addrs) = (name.as_str(), 0).to_socket_addrs() {
        for a in addrs {
            if let SocketAddr::V4(v4) = a {
                if !v4.ip().is_loopback() {
                    return v4.ip().to_string();
                }
            }
        }
    }
    "127.0.0.1".into()
}

/// Starts the listener and checker threads. `peers[r]` is world rank r's listener address.
pub(crate) fn start(
    listener: TcpListener,
    world_rank: usize,
    peers: Vec<String>,
    timeout: Duration,
) -> Result<(), String> {
    let peers = peers
        .iter()
        .enumerate()
        .map(|(r, a)| {
            a.to_socket_addrs()
                .ok()
                .and_then(|mut it| it.next())
                .ok_or_else(|| format!("watchdog: cannot resolve rank {r}'s address '{a}'; set FABBRICA_WATCHDOG_HOST to an address the other hosts can reach"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let w = Arc::new(Watchdog {
        timeout,
        world_rank,
        peers,
        inflight: Mutex::new(BTreeMap::new()),
        next: AtomicU64::new(0),
        called: Mutex::new(HashMap::new()),
    });
    if WATCHDOG.set(w.clone()).is_err() {
        return Err("watchdog started twice".into());
    }
    let lw = w.clone();
    std::thread::Builder::new()
        .name("watchdog-listen".into())
        .spawn(move || listen(&lw, listener))
        .map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || check(&w))
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn listen(w: &Watchdog, listener: TcpListener) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut line = String::new();
        let mut reader = BufReader::new(&stream);
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        let line = line.trim_end();
        if let Some(group) = line.strip_prefix("Q ") {
            let (seq, last) =
                w.called.lock().unwrap().get(group).cloned().unwrap_or((0, String::new()));
            let now = w.activity();
            let mut s = &stream;
            let _ = writeln!(s, "{seq}\t{last}\t{now}");
        } else if let Some(msg) = line.strip_prefix("A ") {
            print_line(&format!("error: {msg}"));
            exit_now();
        }
    }
}

impl Watchdog {
    /// One line: what this rank has in flight, oldest first.
    fn activity(&self) -> String {
        let inflight = self.inflight.lock().unwrap();
        if inflight.is_empty() {
            return "no operation in flight".into();
        }
        inflight
            .values()
            .map(|op| format!("in {} for {:.1}s", op.desc, op.started.elapsed().as_secs_f64()))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn check(w: &Watchdog) {
    let tick = (w.timeout / 20).clamp(Duration::from_millis(20), Duration::from_secs(1));
    loop {
        std::thread::sleep(tick);
        let expired = {
            let inflight = w.inflight.lock().unwrap();
            inflight
                .values()
                .find(|op| op.started.elapsed() > w.timeout)
                .map(|op| {
                    (
                        op.desc.clone(),
                        op.group_id.clone(),
                        op.seq,
                        op.members.clone(),
                        op.peer,
                        op.collective,
                    )
                })
        };
        if let Some((desc, group_id, seq, members, peer, collective)) = expired {
            let report = w.diagnose(&group_id, seq, &members, peer, collective);
            let msg = format!(
                "watchdog: {desc} did not complete within {:.1}s; {report}",
                w.timeout.as_secs_f64()
            );
            print_line(&format!("error: {msg}"));
            // Tell every rank, so that the ones not blocked in this operation stop too, with the
            // reason.
            let note = format!("rank {} aborted the job: {msg}", w.world_rank);
            for (r, addr) in w.peers.iter().enumerate() {
                if r != w.world_rank {
                    if let Ok(mut s) = TcpStream::connect_timeout(addr, Duration::from_millis(500)) {
                        let _ = writeln!(s, "A {note}");
                    }
                }
            }
            // Give the peers a moment to print before the launcher tears the job down.
            std::thread::sleep(Duration::from_millis(300));
            exit_now();
        }
    }
}

impl Watchdog {
    fn query(&self, world_rank: usize, group_id: &str) -> Result<(u64, String, String), String> {
        let addr = self.peers[world_rank];
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("unreachable ({e}; has it exited?)"))?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut w = &s;
        writeln!(w, "Q {group_id}").map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).map_err(|e| format!("no answer ({e})"))?;
        let mut parts = line.trim_end().splitn(3, '\t');
        let seq = parts.next().and_then(|x| x.parse().ok()).ok_or("garbled answer")?;
        Ok((seq, parts.next().unwrap_or("").into(), parts.next().unwrap_or("").into()))
    }

    /// For a collective: which members have not called sequence number `seq` yet, and what each
    /// of them is doing. For point-to-point: what the peer is doing.
    fn diagnose(
        &self,
        group_id: &str,
        seq: u64,
        members: &[usize],
        peer: Option<usize>,
        collective: bool,
    ) -> String {
        if !collective {
            let p = peer.unwrap_or(0);
            let wr = members.get(p).copied().unwrap_or(p);
            return match self.query(wr, group_id) {
                Ok((_, _, now)) => format!("peer rank {p} (world rank {wr}) is {now}"),
                Err(e) => format!("peer rank {p} (world rank {wr}) is {e}"),
            };
        }
        let mut missing = Vec::new();
        let mut details = Vec::new();
        for (gr, &wr) in members.iter().enumerate() {
            if wr == self.world_rank {
                continue;
            }
            match self.query(wr, group_id) {
                Ok((s, last, now)) if s < seq => {
                    missing.push(gr);
                    let last = if s == 0 { "nothing".to_string() } else { last };
                    details.push(format!("rank {gr}: last called {last}; now {now}"));
                }
                Ok(_) => {}
                Err(e) => {
                    missing.push(gr);
                    details.push(format!("rank {gr}: {e}"));
                }
            }
        }
        if missing.is_empty() {
            "every rank of the group called it (the backend itself is stuck: check the network and the GPUs)".into()
        } else {
            format!("ranks {missing:?} did not arrive ({})", details.join("; "))
        }
    }
}

/// One write per line, so that launchers tagging output per write keep it whole.
fn print_line(line: &str) {
    let mut s = std::io::stderr().lock();
    let _ = s.write_all(format!("{line}\n").as_bytes());
}

fn exit_now() -> ! {
    let _ = std::io::stderr().flush();
    let _ = std::io::stdout().flush();
    // Not `exit`: atexit handlers would run MPI/NCCL teardown that blocks on the stuck operation.
    unsafe { libc::_exit(EXIT_CODE) }
}
