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
//!   of the world to abort with that line, and exits with [`EXIT_CODE`]. The peers are asked, and
//!   told, all at once (up to [`FAN_OUT`] at a time) within an overall deadline
//!   ([`DIAGNOSIS_DEADLINE`], [`ABORT_DEADLINE`]): ranks that are gone or frozen cost one
//!   per-peer timeout in all, not one each, so the rank exits in bounded time at any world size.
//!
//! The blocked thread is inside MPI or NCCL and cannot be unwound, so ending the process is the
//! only way out (PyTorch's NCCL watchdog does the same).
//!
//! The port obeys only its own job: rank 0 draws a 32-byte secret at start-up and broadcasts it
//! over MPI with the address exchange, and every request must carry an HMAC-SHA256 of itself, the
//! target rank and a nonce the listener sent on that very connection (so a captured request cannot
//! be replayed); answers are tagged the same way. Anything else is dropped without an answer or a
//! message, and counted ([`port_stats`]). The protocol and the limits that keep strangers from
//! holding the port are described in `watchdog/port.rs`, the tags in `watchdog/auth.rs`.
//!
//! Where it listens: on `FABBRICA_WATCHDOG_HOST` when set (an address of this host; the one the
//! other ranks are given), else on 127.0.0.1 when every rank has the same host name (one node),
//! else on the address this host's name resolves to (non-loopback IPv4 first). Never on every
//! interface.

mod auth;
mod port;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use auth::Secret;
use port::{Failure, Limits, Port};

/// Exit status of a rank that the watchdog ends.
pub const EXIT_CODE: i32 = 3;

/// How long the diagnosis waits for one peer (connection, greeting, question, answer).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(4);
/// The whole diagnosis: the peers are asked at once, [`FAN_OUT`] at a time, and those not asked
/// by then are reported as such. With up to [`FAN_OUT`] peers that do not answer it takes
/// [`QUERY_TIMEOUT`]; with more, never longer than this.
pub const DIAGNOSIS_DEADLINE: Duration = Duration::from_secs(6);
/// How long the aborting rank tries to tell one peer.
pub const ABORT_TIMEOUT: Duration = Duration::from_secs(1);
/// All the abort notices, sent at once ([`FAN_OUT`] at a time): the aborting rank exits after
/// this (and [`EXIT_PAUSE`]) however many peers do not take theirs; the launcher ends those.
pub const ABORT_DEADLINE: Duration = Duration::from_secs(2);
/// How long the aborting rank waits after telling its peers, before it exits.
pub const EXIT_PAUSE: Duration = Duration::from_millis(300);
/// Peers a rank talks to at once (one thread and one connection each) when it asks the group or
/// tells the world to abort.
pub const FAN_OUT: usize = 256;

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
    /// The job's secret (see `auth`): kept here only, never printed or written.
    secret: Secret,
    port: Port,
    /// Set by whichever of the checker or a peer's abort request ends the process first.
    aborting: AtomicBool,
    inflight: Mutex<BTreeMap<u64, Inflight>>,
    next: AtomicU64,
    /// Group id -> (last collective sequence number called, its description).
    called: Mutex<HashMap<String, (u64, String)>>,
}

impl Watchdog {
    fn new(world_rank: usize, peers: Vec<SocketAddr>, secret: Secret, timeout: Duration, limits: Limits) -> Watchdog {
        Watchdog {
            timeout,
            world_rank,
            peers,
            secret,
            port: Port::new(limits),
            aborting: AtomicBool::new(false),
            inflight: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
            called: Mutex::new(HashMap::new()),
        }
    }

    /// The answer to `Q <group>`: `<seq>\t<last collective>\t<what this rank is doing>`.
    fn answer(&self, group: &str) -> String {
        let (seq, last) = self.called.lock().unwrap().get(group).cloned().unwrap_or((0, String::new()));
        format!("{seq}\t{last}\t{}", self.activity())
    }

    /// An authenticated `A <message>` from a peer: print it and end the process, unless this rank
    /// is already ending it.
    fn aborted_by_peer(&self, msg: &str) {
        if self.aborting.swap(true, Ordering::SeqCst) {
            return;
        }
        print_line(&format!("error: {msg}"));
        crate::flight::dump_and_report(msg);
        exit_now();
    }
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
pub(crate) fn begin(desc: String, group_id: &str, seq: u64, members: &Arc<Vec<usize>>, peer: Option<usize>) -> Guard {
    let Some(w) = WATCHDOG.get() else { return Guard(None) };
    let id = w.next.fetch_add(1, Ordering::Relaxed);
    w.inflight.lock().unwrap().insert(
        id,
        Inflight { desc, group_id: group_id.to_string(), seq, members: members.clone(), peer, collective: peer.is_none(), started: Instant::now() },
    );
    Guard(Some(id))
}

/// The configured timeout, once the watchdog runs.
pub fn timeout() -> Option<Duration> {
    WATCHDOG.get().map(|w| w.timeout)
}

/// The listener addresses of every world rank, once the watchdog runs (for tools and tests that
/// probe the port).
pub fn addresses() -> Option<Vec<SocketAddr>> {
    WATCHDOG.get().map(|w| w.peers.clone())
}

/// What the watchdog port turned away since start-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Request lines without a valid tag (strangers, the old protocol, garbage, replays).
    pub rejected: u64,
    /// Connections closed without a complete request line: too long, too slow, closed by the
    /// client, or pushed out at the connection cap.
    pub dropped: u64,
}

/// The port's counters, once the watchdog runs.
pub fn port_stats() -> Option<PortStats> {
    WATCHDOG.get().map(|w| PortStats { rejected: w.port.rejected.load(Ordering::Relaxed), dropped: w.port.dropped.load(Ordering::Relaxed) })
}

/// Brings the watchdog up on every rank of `world` (collective): rank 0 draws the job's secret and
/// broadcasts it, the ranks compare host names to choose where to listen, bind, exchange the
/// addresses, and start the listener and checker threads. Every rank joins every collective even
/// when its own part fails, so that a failure is an error on every rank rather than a hang.
pub(crate) fn start_mpi(world: &::mpi::topology::SimpleCommunicator, timeout: Duration) -> Result<(), String> {
    use ::mpi::traits::*;
    let (rank, size) = (world.rank() as usize, world.size() as usize);

    let mut secret = [0u8; auth::SECRET_LEN + 1];
    if rank == 0 {
        if let Ok(s) = auth::random_secret() {
            secret[..auth::SECRET_LEN].copy_from_slice(&s);
            secret[auth::SECRET_LEN] = 1;
        }
    }
    world.process_at_rank(0).broadcast_into(&mut secret[..]);

    const NAME: usize = 256;
    let mut name = [0u8; NAME];
    if let Some(h) = host_name() {
        let n = h.len().min(NAME);
        name[..n].copy_from_slice(&h.as_bytes()[..n]);
    }
    let mut names = vec![0u8; NAME * size];
    world.all_gather_into(&name[..], &mut names[..]);
    let one_node = name != [0u8; NAME] && names.chunks(NAME).all(|c| c == name);

    const LEN: usize = 128;
    let bound = bind(one_node);
    let mut mine = [0u8; LEN];
    if let Ok((_, addr)) = &bound {
        let addr = addr.to_string();
        mine[..addr.len().min(LEN)].copy_from_slice(&addr.as_bytes()[..addr.len().min(LEN)]);
    }
    let mut all = vec![0u8; LEN * size];
    world.all_gather_into(&mine[..], &mut all[..]);

    if secret[auth::SECRET_LEN] != 1 {
        return Err("watchdog: rank 0 could not draw the job's secret (getrandom and /dev/urandom both failed)".into());
    }
    let (listener, _) = bound?;
    let peers = all
        .chunks(LEN)
        .enumerate()
        .map(|(r, c)| {
            let a = String::from_utf8_lossy(&c[..c.iter().position(|&b| b == 0).unwrap_or(LEN)]).into_owned();
            a.parse::<SocketAddr>().map_err(|_| format!("watchdog: rank {r} could not open its port (it says why); its address is '{a}'"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut key = [0u8; auth::SECRET_LEN];
    key.copy_from_slice(&secret[..auth::SECRET_LEN]);
    start(listener, rank, key, peers, timeout)
}

/// Binds the listener (see the module docs for where); returns it with the address peers use.
fn bind(one_node: bool) -> Result<(TcpListener, SocketAddr), String> {
    let listener = match std::env::var("FABBRICA_WATCHDOG_HOST").ok().filter(|s| !s.trim().is_empty()) {
        Some(host) => {
            let host = host.trim();
            let addrs: Vec<SocketAddr> =
                (host, 0).to_socket_addrs().map_err(|e| format!("watchdog: FABBRICA_WATCHDOG_HOST='{host}' does not resolve: {e}"))?.collect();
            if addrs.iter().any(|a| a.ip().is_unspecified()) {
                return Err(format!(
                    "watchdog: FABBRICA_WATCHDOG_HOST='{host}' is every interface; set the one address of this host that the other hosts reach"
                ));
            }
            let mut last = None;
            let bound = addrs.iter().find_map(|a| TcpListener::bind(a).map_err(|e| last = Some(e)).ok());
            bound.ok_or_else(|| {
                let why = last.map(|e| e.to_string()).unwrap_or_else(|| "no address".into());
                format!("watchdog: cannot listen on FABBRICA_WATCHDOG_HOST='{host}': {why}")
            })?
        }
        None if one_node => TcpListener::bind(("127.0.0.1", 0)).map_err(|e| format!("watchdog: cannot open a TCP port on 127.0.0.1: {e}"))?,
        None => {
            let ip = reachable_ip().ok_or_else(|| {
                format!(
                    "watchdog: this host's name ('{}') does not resolve to an address other hosts can reach; set FABBRICA_WATCHDOG_HOST to one",
                    host_name().unwrap_or_default()
                )
            })?;
            TcpListener::bind((ip, 0)).map_err(|e| format!("watchdog: cannot open a TCP port on {ip}: {e}"))?
        }
    };
    let addr = listener.local_addr().map_err(|e| format!("watchdog: {e}"))?;
    Ok((listener, addr))
}

fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len() - 1` bytes into `buf`; the last byte stays 0, so
    // the string is terminated even when the name was cut.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned()).filter(|s| !s.is_empty())
}

/// An address of this host that other hosts can reach: what the host name resolves to, the first
/// non-loopback IPv4 address, else the first non-loopback IPv6 one.
fn reachable_ip() -> Option<IpAddr> {
    let addrs: Vec<IpAddr> = (host_name()?.as_str(), 0).to_socket_addrs().ok()?.map(|a| a.ip()).collect();
    let usable = |a: &&IpAddr| !a.is_loopback() && !a.is_unspecified();
    addrs.iter().filter(usable).find(|a| a.is_ipv4()).or_else(|| addrs.iter().find(usable)).copied()
}

/// Starts the listener and checker threads. `peers[r]` is world rank r's listener address.
fn start(listener: TcpListener, world_rank: usize, secret: Secret, peers: Vec<SocketAddr>, timeout: Duration) -> Result<(), String> {
    let w = Arc::new(Watchdog::new(world_rank, peers, secret, timeout, port::LIMITS));
    if WATCHDOG.set(w.clone()).is_err() {
        return Err("watchdog started twice".into());
    }
    let lw = w.clone();
    std::thread::Builder::new().name("watchdog-listen".into()).spawn(move || port::serve(lw, listener)).map_err(|e| e.to_string())?;
    std::thread::Builder::new().name("watchdog".into()).spawn(move || check(&w)).map_err(|e| e.to_string())?;
    Ok(())
}

impl Watchdog {
    /// One line: what this rank has in flight, oldest first.
    fn activity(&self) -> String {
        let inflight = self.inflight.lock().unwrap();
        if inflight.is_empty() {
            return "no operation in flight".into();
        }
        inflight.values().map(|op| format!("in {} for {:.1}s", op.desc, op.started.elapsed().as_secs_f64())).collect::<Vec<_>>().join("; ")
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
                .map(|op| (op.desc.clone(), op.group_id.clone(), op.seq, op.members.clone(), op.peer, op.collective))
        };
        if let Some((desc, group_id, seq, members, peer, collective)) = expired {
            let report = w.diagnose(&group_id, seq, &members, peer, collective);
            let msg = format!("watchdog: {desc} did not complete within {:.1}s; {report}", w.timeout.as_secs_f64());
            if w.aborting.swap(true, Ordering::SeqCst) {
                // A peer's abort request got here first; its handler is ending the process.
                loop {
                    std::thread::park();
                }
            }
            let stats = port_stats().unwrap_or_default();
            let turned_away = if stats.rejected + stats.dropped > 0 {
                format!(
                    " (the watchdog port turned away {} requests without a valid tag and {} incomplete connections)",
                    stats.rejected, stats.dropped
                )
            } else {
                String::new()
            };
            print_line(&format!("error: {msg}{turned_away}"));
            crate::flight::dump_and_report(&msg);
            // Tell every rank, so that the ones not blocked in this operation stop too, with the
            // reason.
            w.broadcast_abort(&format!("A rank {} aborted the job: {msg}", w.world_rank));
            // Give the peers a moment to print before the launcher tears the job down.
            std::thread::sleep(EXIT_PAUSE);
            exit_now();
        }
    }
}

/// Runs `job` on every target, up to [`FAN_OUT`] at once (on threads of their own and the calling
/// one), starting none after `deadline`; the results by target, `None` where it was not started.
/// Returns once the jobs started have: `job` must itself end by `deadline` for this to.
fn fan_out<T: Sync, R: Send>(targets: &[T], deadline: Instant, job: impl Fn(&T) -> R + Sync) -> Vec<Option<R>> {
    let results: Vec<Mutex<Option<R>>> = targets.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let work = || {
        while Instant::now() < deadline {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(target) = targets.get(i) else { return };
            let r = job(target);
            *results[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        }
    };
    std::thread::scope(|s| {
        for _ in 1..targets.len().min(FAN_OUT) {
            // Short of threads, fewer work at once (the calling thread always does).
            if std::thread::Builder::new().name("watchdog-ask".into()).stack_size(256 << 10).spawn_scoped(s, work).is_err() {
                break;
            }
        }
        work();
    });
    results.into_iter().map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner())).collect()
}

impl Watchdog {
    /// Sends `request` to every other rank, all at once (see [`fan_out`]), each within
    /// [`ABORT_TIMEOUT`] and all within [`ABORT_DEADLINE`].
    fn broadcast_abort(&self, request: &str) {
        let deadline = Instant::now() + ABORT_DEADLINE;
        let others: Vec<(usize, SocketAddr)> = self.peers.iter().copied().enumerate().filter(|&(r, _)| r != self.world_rank).collect();
        fan_out(&others, deadline, |&(r, addr)| {
            let until = deadline.min(Instant::now() + ABORT_TIMEOUT);
            let _ = port::exchange(&addr, r, &self.secret, request, false, &self.port.limits, until);
        });
    }
}

impl Watchdog {
    /// Asks world rank `world_rank` about `group_id`, within [`QUERY_TIMEOUT`] and by `deadline`.
    fn query(&self, world_rank: usize, group_id: &str, deadline: Instant) -> Result<(u64, String, String), String> {
        let deadline = deadline.min(Instant::now() + QUERY_TIMEOUT);
        let line =
            match port::exchange(&self.peers[world_rank], world_rank, &self.secret, &format!("Q {group_id}"), true, &self.port.limits, deadline) {
                Ok(line) => line.unwrap_or_default(),
                Err(Failure::Refused(e)) => return Err(format!("unreachable ({e}; has it exited?)")),
                Err(Failure::Lost(e)) => return Err(format!("no answer ({e})")),
                Err(Failure::Foreign) => return Err("answered without the job's secret (another process on its port?)".into()),
            };
        let mut parts = line.splitn(3, '\t');
        let seq = parts.next().and_then(|x| x.parse().ok()).ok_or("garbled answer")?;
        Ok((seq, parts.next().unwrap_or("").into(), parts.next().unwrap_or("").into()))
    }

    /// For a collective: which members have not called sequence number `seq` yet, and what each
    /// of them is doing. For point-to-point: what the peer is doing. The members are asked at once
    /// (see [`fan_out`]), so this takes about one [`QUERY_TIMEOUT`] however many do not answer,
    /// and never more than [`DIAGNOSIS_DEADLINE`].
    fn diagnose(&self, group_id: &str, seq: u64, members: &[usize], peer: Option<usize>, collective: bool) -> String {
        let deadline = Instant::now() + DIAGNOSIS_DEADLINE;
        if !collective {
            let p = peer.unwrap_or(0);
            let wr = members.get(p).copied().unwrap_or(p);
            return match self.query(wr, group_id, deadline) {
                Ok((_, _, now)) => format!("peer rank {p} (world rank {wr}) is {now}"),
                Err(e) => format!("peer rank {p} (world rank {wr}) is {e}"),
            };
        }
        let others: Vec<(usize, usize)> = members.iter().copied().enumerate().filter(|&(_, wr)| wr != self.world_rank).collect();
        let answers = fan_out(&others, deadline, |&(_, wr)| self.query(wr, group_id, deadline));
        let mut missing = Vec::new();
        let mut details = Vec::new();
        let mut unasked = Vec::new();
        for (&(gr, _), answer) in others.iter().zip(answers) {
            match answer {
                Some(Ok((s, last, now))) if s < seq => {
                    missing.push(gr);
                    let last = if s == 0 { "nothing".to_string() } else { last };
                    details.push(format!("rank {gr}: last called {last}; now {now}"));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    missing.push(gr);
                    details.push(format!("rank {gr}: {e}"));
                }
                None => unasked.push(gr),
            }
        }
        let unasked = if unasked.is_empty() {
            String::new()
        } else {
            format!("; ranks {unasked:?} were not asked (the diagnosis stops after {:.0}s)", DIAGNOSIS_DEADLINE.as_secs_f64())
        };
        if missing.is_empty() && unasked.is_empty() {
            "every rank of the group called it (the backend itself is stuck: check the network and the GPUs)".into()
        } else if missing.is_empty() {
            format!("every rank asked called it{unasked}")
        } else {
            format!("ranks {missing:?} did not arrive ({}){unasked}", details.join("; "))
        }
    }
}

/// One write per line, so that launchers tagging output per write keep it whole.
fn print_line(line: &str) {
    use std::io::Write;
    let mut s = std::io::stderr().lock();
    let _ = s.write_all(format!("{line}\n").as_bytes());
}

fn exit_now() -> ! {
    use std::io::Write;
    let _ = std::io::stderr().flush();
    let _ = std::io::stdout().flush();
    // Not `exit`: atexit handlers would run MPI/NCCL teardown that blocks on the stuck operation.
    // SAFETY: _exit only ends the process; nothing of ours is used after it.
    unsafe { libc::_exit(EXIT_CODE) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listening rank `rank` of a job with `secret`, whose group 'world' last called `seq`.
    fn live(rank: usize, secret: Secret, seq: u64) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let w = Arc::new(Watchdog::new(rank, Vec::new(), secret, Duration::from_secs(600), port::LIMITS));
        w.called.lock().unwrap().insert("world".into(), (seq, format!("all_reduce #{seq}")));
        std::thread::spawn(move || port::serve(w, l));
        addr
    }

    /// A port nobody listens on any more (a rank that exited).
    fn gone() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
    }

    /// Ports that accept connections and never answer (frozen ranks), and the most of their
    /// connections that were open at one moment: how many peers were being asked at once.
    struct Frozen {
        addrs: Vec<SocketAddr>,
        /// (open now, most open at once)
        open: Arc<Mutex<(usize, usize)>>,
    }

    impl Frozen {
        fn new(n: usize) -> Frozen {
            let open = Arc::new(Mutex::new((0, 0)));
            let addrs = (0..n)
                .map(|_| {
                    let l = TcpListener::bind("127.0.0.1:0").unwrap();
                    let addr = l.local_addr().unwrap();
                    let open = open.clone();
                    std::thread::spawn(move || {
                        for conn in l.incoming() {
                            let Ok(mut conn) = conn else { return };
                            // Counted as it is accepted, here, not in the thread that waits on it.
                            {
                                let mut o = open.lock().unwrap();
                                o.0 += 1;
                                o.1 = o.1.max(o.0);
                            }
                            let open = open.clone();
                            std::thread::spawn(move || {
                                // Never answers; the asker closes the connection when it gives up.
                                let _ = std::io::copy(&mut conn, &mut std::io::sink());
                                open.lock().unwrap().0 -= 1;
                            });
                        }
                    });
                    addr
                })
                .collect();
            Frozen { addrs, open }
        }

        fn most_at_once(&self) -> usize {
            self.open.lock().unwrap().1
        }
    }

    const FROZEN: usize = 100;

    /// A hundred frozen peers are asked all at once (one after another they would cost a hundred
    /// query timeouts), and each is still named, beside a rank that is behind and one that is gone.
    #[test]
    fn frozen_peers_are_asked_all_at_once() {
        let secret = auth::random_secret().unwrap();
        let held = Frozen::new(FROZEN);
        let mut peers = vec![gone(), live(1, secret, 2), live(2, secret, 1), gone()];
        peers.extend(&held.addrs);
        let members: Vec<usize> = (0..peers.len()).collect();
        let w = Watchdog::new(0, peers, secret, Duration::from_secs(600), port::LIMITS);
        let report = w.diagnose("world", 2, &members, None, true);
        assert_eq!(held.most_at_once(), FROZEN, "the frozen peers were not all asked at once");
        let missing: Vec<usize> = (2..members.len()).collect();
        assert!(report.starts_with(&format!("ranks {missing:?} did not arrive (")), "{report}");
        assert!(report.contains("rank 2: last called all_reduce #1; now no operation in flight"), "{report}");
        assert!(report.contains("rank 3: unreachable ("), "{report}");
        for r in 4..members.len() {
            assert!(report.contains(&format!("rank {r}: no answer (")), "rank {r}: {report}");
        }
        assert!(!report.contains("not asked"), "{report}");
    }

    /// A hundred frozen peers (and a gone one) are told to abort all at once.
    #[test]
    fn abort_notices_to_frozen_peers_go_out_all_at_once() {
        let secret = auth::random_secret().unwrap();
        let held = Frozen::new(FROZEN);
        let mut peers = vec![gone(), gone()];
        peers.extend(&held.addrs);
        let w = Watchdog::new(0, peers, secret, Duration::from_secs(600), port::LIMITS);
        w.broadcast_abort("A rank 0 aborted the job: test");
        assert_eq!(held.most_at_once(), FROZEN, "the notices were not all sent at once");
    }

    /// `fan_out` runs the jobs at once, up to FAN_OUT of them, and starts none after its deadline.
    #[test]
    fn fan_out_is_concurrent_and_stops_at_its_deadline() {
        // Each job waits (up to a minute) until all 100 have started: only jobs that run at
        // once can all see the count reach 100.
        let started = Mutex::new(0usize);
        let all_in = std::sync::Condvar::new();
        let rendezvous = |&i: &usize| {
            let mut n = started.lock().unwrap();
            *n += 1;
            all_in.notify_all();
            let (n, _) = all_in.wait_timeout_while(n, Duration::from_secs(60), |n| *n < 100).unwrap();
            (i, *n == 100)
        };
        let targets: Vec<usize> = (0..100).collect();
        let got = fan_out(&targets, Instant::now() + Duration::from_secs(120), rendezvous);
        assert_eq!(got, targets.iter().map(|&i| Some((i, true))).collect::<Vec<_>>());

        // More jobs than run at once: those not started by the deadline are not run (each of
        // the FAN_OUT workers starts at most two of the 4 x FAN_OUT jobs of 200 ms in 300 ms).
        let job = |&i: &usize| {
            std::thread::sleep(Duration::from_millis(200));
            i
        };
        let targets: Vec<usize> = (0..4 * FAN_OUT).collect();
        let got = fan_out(&targets, Instant::now() + Duration::from_millis(300), job);
        let done = got.iter().filter(|r| r.is_some()).count();
        assert!(done > 0 && done < targets.len(), "{done} of {} ran", targets.len());
        assert!(got.iter().enumerate().all(|(i, r)| r.is_none_or(|r| r == i)));
        assert!(fan_out(&[] as &[usize], Instant::now() + Duration::from_secs(1), job).is_empty());
    }
}
