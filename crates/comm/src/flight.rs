//! The flight recorder: every rank keeps the last N operations of each of its groups in a ring, and
//! writes them to `<dir>/flight/rank_<world rank>.json` when something goes wrong, so that
//! `fabbrica doctor <dir>` can say afterwards which rank fell behind or called something else.
//!
//! What is recorded, per operation: the group's sequence number (collectives and point-to-point
//! are numbered apart, as in [`OpContext`](crate::OpContext)), the operation, dtype, element count,
//! root or peer, reduction, and three monotonic times (nanoseconds since the recorder started):
//! enqueued (the call was accepted), started (MPI: the worker began it; NCCL: it was handed to
//! NCCL), ended (MPI: the call returned; NCCL: the completion poller saw its event, within 5 ms),
//! with the state `enqueued`, `started`, `completed` or `failed`. Each dump carries one anchor
//! (the monotonic time and the wall-clock time at the dump), so that times from different ranks
//! can be put on one clock.
//!
//! When a dump is written (each replaces the rank's previous one, atomically: a temporary file
//! renamed over it):
//! - the watchdog fires, on the rank that fired it and on every rank it tells to abort, before the
//!   process exits;
//! - an operation fails with a communication error (the first one of the process; later errors
//!   are usually its consequences);
//! - the process receives SIGUSR2 (mpirun forwards it to every rank): the job carries on. The
//!   handler only writes a byte to a pipe; a thread of ours waits on the pipe and writes the dump.
//!
//! Settings: `FABBRICA_FLIGHT_RECORDER=N` operations per group (default [`DEFAULT_CAPACITY`], 0
//! turns the recorder and its SIGUSR2 handler off); the directory is `FABBRICA_FLIGHT_DIR`, else
//! the one given to [`set_dump_dir`] (the trainer gives its `run.out_dir`), else the current
//! directory.
//!
//! Cost: each ring is preallocated; recording an operation takes the ring's lock three times
//! (enqueue, start, end) and reads the monotonic clock three times, and allocates nothing (see
//! docs/BENCHMARKS.md for the measured latency with the recorder on and off).

pub mod analyze;
pub mod json;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Instant;

use crate::debug::Sig;
use crate::error::Result;
use crate::types::{Backend, DType, OpKind, ReduceOp};

/// Operations kept per group when `FABBRICA_FLIGHT_RECORDER` is not set.
pub const DEFAULT_CAPACITY: usize = 2000;
/// Largest `FABBRICA_FLIGHT_RECORDER`.
pub const MAX_CAPACITY: usize = 100_000;
/// The `format` field of every dump.
pub const FORMAT: &str = "fabbrica-flight/1";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Parses a `FABBRICA_FLIGHT_RECORDER` value: a number of operations, 0 to [`MAX_CAPACITY`].
pub fn parse_capacity(v: &str) -> std::result::Result<usize, String> {
    match v.trim().parse::<usize>() {
        Ok(n) if n <= MAX_CAPACITY => Ok(n),
        _ => {
            let shown: String = v.chars().take(40).flat_map(char::escape_default).collect();
            Err(format!(
                "FABBRICA_FLIGHT_RECORDER='{shown}' is not a number of operations: set 0 (off) to {MAX_CAPACITY}, e.g. FABBRICA_FLIGHT_RECORDER={DEFAULT_CAPACITY}"
            ))
        }
    }
}

/// State of the recorder for this process, once [`init`] ran.
struct Global {
    capacity: usize,
    epoch: Instant,
    rank: usize,
    world_size: usize,
    /// The launcher's id of this job (see [`job_id`]).
    job: String,
    rings: Mutex<Vec<Weak<Ring>>>,
    /// Set once a communication error wrote a dump.
    error_dumped: AtomicBool,
    /// One dump at a time.
    dumping: Mutex<()>,
}

static GLOBAL: OnceLock<Global> = OnceLock::new();
/// Cleared by [`set_recording`]`(false)`.
static RECORDING: AtomicBool = AtomicBool::new(true);
static DUMP_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Starts the recorder for world rank `rank` of `world_size` (at world start-up, before the first
/// group): reads `FABBRICA_FLIGHT_RECORDER` and installs the SIGUSR2 handler.
pub(crate) fn init(rank: usize, world_size: usize) -> std::result::Result<(), String> {
    if GLOBAL.get().is_some() {
        return Ok(());
    }
    let capacity = match std::env::var_os("FABBRICA_FLIGHT_RECORDER") {
        Some(v) => parse_capacity(&v.to_string_lossy())?,
        None => DEFAULT_CAPACITY,
    };
    let g = Global {
        capacity,
        epoch: Instant::now(),
        rank,
        world_size,
        job: job_id(),
        rings: Mutex::new(Vec::new()),
        error_dumped: AtomicBool::new(false),
        dumping: Mutex::new(()),
    };
    if GLOBAL.set(g).is_ok() && capacity > 0 {
        if let Err(e) = install_sigusr2() {
            eprintln!("warning: flight recorder: no SIGUSR2 dumps ({e})");
        }
    }
    Ok(())
}

/// Pauses (`false`) or resumes recording, keeping the rings and what they hold: for benchmarks
/// that compare the cost with the recorder on and off in one process. Every rank of a job should
/// call it at the same point of its sequence of operations (the dumps then still compare).
pub fn set_recording(on: bool) {
    RECORDING.store(on, Ordering::Relaxed);
}

/// The launcher's id of this job, equal on every rank (PMIx namespace, Open MPI job id, or Slurm
/// job and step), so that `fabbrica doctor` can tell a dump left by an earlier job in the same
/// directory; empty when none is set.
fn job_id() -> String {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    var("PMIX_NAMESPACE")
        .or_else(|| var("OMPI_MCA_ess_base_jobid"))
        .or_else(|| var("SLURM_JOB_ID").map(|j| format!("{j}.{}", var("SLURM_STEP_ID").unwrap_or_default())))
        .unwrap_or_default()
}

/// Operations kept per group (0: the recorder is off or not started).
pub fn capacity() -> usize {
    GLOBAL.get().map(|g| g.capacity).unwrap_or(0)
}

/// Sets the directory whose `flight/` subdirectory receives the dumps (the trainer passes its
/// `run.out_dir`). `FABBRICA_FLIGHT_DIR`, when set, takes precedence.
pub fn set_dump_dir(dir: impl AsRef<Path>) {
    *lock(&DUMP_DIR) = Some(dir.as_ref().to_path_buf());
}

/// Where this rank's dump goes: `<dir>/flight/rank_<world rank>.json`.
pub fn dump_path() -> PathBuf {
    let dir = match std::env::var_os("FABBRICA_FLIGHT_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => lock(&DUMP_DIR).clone().unwrap_or_else(|| PathBuf::from(".")),
    };
    let rank = GLOBAL.get().map(|g| g.rank).unwrap_or(0);
    dir.join("flight").join(format!("rank_{rank}.json"))
}

// ---------------------------------------------------------------------------------------------
// Rings

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Enqueued,
    Started,
    Completed,
    Failed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Enqueued => "enqueued",
            State::Started => "started",
            State::Completed => "completed",
            State::Failed => "failed",
        }
    }
}

/// What an operation is, as the recorder keeps it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OpDesc {
    op: OpKind,
    dtype: Option<DType>,
    count: u64,
    /// Broadcast's root, or a send's or receive's peer (group ranks).
    peer: Option<u32>,
    reduce: Option<ReduceOp>,
}

impl OpDesc {
    /// From the signature the debug check compares (operation, dtype, count, reduction or root).
    pub(crate) fn of(sig: &Sig) -> OpDesc {
        let [op, dtype, numel, extra, _] = sig.encode();
        let op = OpKind::from_code(op).unwrap_or(OpKind::Barrier);
        let reduce = match op {
            OpKind::AllReduce | OpKind::ReduceScatter => {
                [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min].into_iter().find(|r| r.code() == extra)
            }
            _ => None,
        };
        let peer = (op == OpKind::Broadcast).then_some(extra as u32);
        OpDesc { op, dtype: DType::from_code(dtype), count: numel.max(0) as u64, peer, reduce }
    }

    /// A data collective of no elements (nothing to hand to the backend).
    pub(crate) fn is_empty(&self) -> bool {
        self.dtype.is_some() && self.count == 0
    }

    /// A send or receive of `count` elements with group rank `peer`.
    pub(crate) fn p2p(op: OpKind, dtype: DType, count: usize, peer: usize) -> OpDesc {
        OpDesc { op, dtype: Some(dtype), count: count as u64, peer: Some(peer as u32), reduce: None }
    }
}

#[derive(Clone, Copy)]
struct Entry {
    /// The ring's running count when this was recorded (its slot is `id % capacity`).
    id: u64,
    seq: u64,
    desc: OpDesc,
    state: State,
    enqueued: u64,
    started: u64,
    ended: u64,
}

struct Buf {
    entries: Vec<Entry>,
    /// Operations recorded so far (the next entry's id).
    next: u64,
}

/// One group's ring.
pub(crate) struct Ring {
    group: String,
    id: String,
    backend: Backend,
    rank: usize,
    size: usize,
    members: Arc<Vec<usize>>,
    capacity: usize,
    epoch: Instant,
    buf: Mutex<Buf>,
}

impl Ring {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Applies `f` (with the time now, read before the lock) to the entry recorded as `id`, if it
    /// was not overwritten since.
    fn with_entry(&self, id: u64, f: impl FnOnce(&mut Entry, u64)) {
        let t = self.now();
        let mut b = lock(&self.buf);
        if let Some(e) = b.entries.get_mut((id % self.capacity as u64) as usize) {
            if e.id == id {
                f(e, t);
            }
        }
    }
}

/// A communicator's recorder: its group's ring (none when the recorder is off).
pub(crate) struct Recorder(Option<Arc<Ring>>);

impl Recorder {
    pub(crate) fn new(group: &str, id: &str, backend: Backend, rank: usize, size: usize, members: &Arc<Vec<usize>>) -> Recorder {
        let Some(g) = GLOBAL.get().filter(|g| g.capacity > 0) else { return Recorder(None) };
        let ring = Arc::new(Ring {
            group: group.to_string(),
            id: id.to_string(),
            backend,
            rank,
            size,
            members: members.clone(),
            capacity: g.capacity,
            epoch: g.epoch,
            buf: Mutex::new(Buf { entries: Vec::with_capacity(g.capacity), next: 0 }),
        });
        let mut rings = lock(&g.rings);
        rings.retain(|r| r.strong_count() > 0);
        rings.push(Arc::downgrade(&ring));
        Recorder(Some(ring))
    }

    /// Records an accepted call (state `enqueued`); the handle marks its start and end.
    pub(crate) fn enqueue(&self, seq: u64, desc: OpDesc) -> Rec {
        let Some(ring) = self.0.as_ref().filter(|_| RECORDING.load(Ordering::Relaxed)) else {
            return Rec { ring: None, id: 0 };
        };
        let t = ring.now();
        let mut b = lock(&ring.buf);
        let id = b.next;
        b.next += 1;
        let e = Entry { id, seq, desc, state: State::Enqueued, enqueued: t, started: 0, ended: 0 };
        let slot = (id % ring.capacity as u64) as usize;
        if slot < b.entries.len() {
            b.entries[slot] = e;
        } else {
            b.entries.push(e);
        }
        drop(b);
        Rec { ring: Some(ring.clone()), id }
    }

    /// The handle of the newest recorded operation of `op`'s stream (collective or
    /// point-to-point) with sequence number `seq` (for hooks that do not hold the handle).
    pub(crate) fn find(&self, op: OpKind, seq: u64) -> Rec {
        let Some(ring) = &self.0 else { return Rec { ring: None, id: 0 } };
        let p2p = |k: OpKind| matches!(k, OpKind::Send | OpKind::Recv);
        let b = lock(&ring.buf);
        let cap = ring.capacity as u64;
        let found = (0..b.next.min(cap).min(64))
            .map(|back| b.next - 1 - back)
            .find(|&id| b.entries.get((id % cap) as usize).is_some_and(|e| e.seq == seq && p2p(e.desc.op) == p2p(op)));
        drop(b);
        match found {
            Some(id) => Rec { ring: Some(ring.clone()), id },
            None => Rec { ring: None, id: 0 },
        }
    }
}

/// One recorded operation: marks its start and its end.
pub(crate) struct Rec {
    ring: Option<Arc<Ring>>,
    id: u64,
}

impl Rec {
    /// The operation began (MPI: on the worker; NCCL: handed to NCCL).
    pub(crate) fn start(&self) {
        if let Some(r) = &self.ring {
            r.with_entry(self.id, |e, t| {
                if e.state == State::Enqueued {
                    e.state = State::Started;
                    e.started = t;
                }
            });
        }
    }

    fn end(&self, state: State) {
        if let Some(r) = &self.ring {
            r.with_entry(self.id, |e, t| {
                if e.state == State::Enqueued {
                    e.started = t;
                }
                e.ended = t;
                e.state = state;
            });
        }
    }

    /// The operation completed.
    pub(crate) fn complete(&self) {
        self.end(State::Completed);
    }

    /// The operation failed with `why`: also writes a dump if this is the process's first
    /// communication error.
    pub(crate) fn fail(&self, why: &str) {
        if self.ring.is_none() {
            return;
        }
        self.end(State::Failed);
        if let Some(g) = GLOBAL.get() {
            if !g.error_dumped.swap(true, Ordering::SeqCst) {
                dump_and_report(&format!("communication error: {why}"));
            }
        }
    }

    /// `complete` or `fail`, by the operation's result.
    pub(crate) fn finish(&self, r: &Result<()>) {
        match r {
            Ok(()) => self.complete(),
            Err(e) => self.fail(&e.to_string()),
        }
    }
}

/// What recording one operation costs on this thread, alone: nanoseconds per enqueue + start +
/// complete on a ring of [`DEFAULT_CAPACITY`] entries, over `iters` operations (for benchmarks).
pub fn record_cost_ns(iters: u32) -> f64 {
    let ring = Recorder(Some(Arc::new(Ring {
        group: "bench".into(),
        id: "bench".into(),
        backend: Backend::Mpi,
        rank: 0,
        size: 1,
        members: Arc::new(vec![0]),
        capacity: DEFAULT_CAPACITY,
        epoch: Instant::now(),
        buf: Mutex::new(Buf { entries: Vec::with_capacity(DEFAULT_CAPACITY), next: 0 }),
    })));
    let desc = OpDesc { op: OpKind::AllReduce, dtype: Some(DType::F32), count: 2, peer: None, reduce: Some(ReduceOp::Sum) };
    let t = Instant::now();
    for seq in 1..=iters as u64 {
        let rec = ring.enqueue(std::hint::black_box(seq), desc);
        rec.start();
        rec.complete();
    }
    t.elapsed().as_nanos() as f64 / iters.max(1) as f64
}

// ---------------------------------------------------------------------------------------------
// Dumps

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len() - 1` bytes; the last byte stays 0.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The dump's JSON text (see `analyze` for the reader and the format's fields).
fn render(g: &Global, reason: &str) -> String {
    let rings: Vec<Arc<Ring>> = lock(&g.rings).iter().filter_map(Weak::upgrade).collect();
    let mono = g.epoch.elapsed().as_nanos() as u64;
    let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let mut s = String::with_capacity(4096);
    s.push_str(&format!("{{\"format\":\"{FORMAT}\",\"rank\":{},\"world_size\":{},\"host\":", g.rank, g.world_size));
    json::push_str(&mut s, &host_name());
    s.push_str(",\"job\":");
    json::push_str(&mut s, &g.job);
    s.push_str(&format!(",\"pid\":{},\"reason\":", std::process::id()));
    json::push_str(&mut s, reason);
    s.push_str(&format!(",\"capacity\":{},\"clock\":{{\"mono_ns\":{mono},\"unix_ns\":{unix}}},\"groups\":[", g.capacity));
    for (k, ring) in rings.iter().enumerate() {
        let (entries, recorded) = {
            let b = lock(&ring.buf);
            let cap = ring.capacity as u64;
            // Oldest first.
            let first = b.next.saturating_sub(cap);
            let v: Vec<Entry> = (first..b.next).filter_map(|id| b.entries.get((id % cap) as usize).copied()).collect();
            (v, b.next)
        };
        if k > 0 {
            s.push(',');
        }
        s.push_str("\n{\"name\":");
        json::push_str(&mut s, &ring.group);
        s.push_str(",\"id\":");
        json::push_str(&mut s, &ring.id);
        let members: Vec<String> = ring.members.iter().map(|m| m.to_string()).collect();
        s.push_str(&format!(
            ",\"backend\":\"{}\",\"rank\":{},\"size\":{},\"members\":[{}],\"recorded\":{recorded},\"ops\":[",
            ring.backend,
            ring.rank,
            ring.size,
            members.join(",")
        ));
        for (i, e) in entries.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let d = &e.desc;
            s.push_str(&format!("\n{{\"seq\":{},\"op\":\"{}\"", e.seq, d.op.name()));
            if let Some(dt) = d.dtype {
                s.push_str(&format!(",\"dtype\":\"{}\",\"count\":{}", dt.name(), d.count));
            }
            match (d.op, d.peer) {
                (OpKind::Broadcast, Some(p)) => s.push_str(&format!(",\"root\":{p}")),
                (OpKind::Send | OpKind::Recv, Some(p)) => s.push_str(&format!(",\"peer\":{p}")),
                _ => {}
            }
            if let Some(r) = d.reduce {
                s.push_str(&format!(",\"reduce\":\"{}\"", r.name()));
            }
            s.push_str(&format!(",\"state\":\"{}\",\"enqueued_ns\":{}", e.state.name(), e.enqueued));
            if e.state != State::Enqueued {
                s.push_str(&format!(",\"started_ns\":{}", e.started));
            }
            if matches!(e.state, State::Completed | State::Failed) {
                s.push_str(&format!(",\"ended_ns\":{}", e.ended));
            }
            s.push('}');
        }
        s.push_str("]}");
    }
    s.push_str("]}\n");
    s
}

/// Writes this rank's dump now, with `reason`; returns its path. Atomic: a temporary file in the
/// same directory, renamed over the previous dump.
pub fn dump(reason: &str) -> std::io::Result<PathBuf> {
    let Some(g) = GLOBAL.get().filter(|g| g.capacity > 0) else {
        return Err(std::io::Error::other("the flight recorder is off (FABBRICA_FLIGHT_RECORDER=0) or not started"));
    };
    let _one = lock(&g.dumping);
    let text = render(g, reason);
    let path = dump_path();
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".rank_{}.json.tmp-{}", g.rank, std::process::id()));
    let r = std::fs::write(&tmp, text.as_bytes()).and_then(|_| std::fs::rename(&tmp, &path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map(|_| path)
}

/// `dump`, and one line on stderr saying where it went (or why it could not be written).
pub(crate) fn dump_and_report(reason: &str) {
    if capacity() == 0 {
        return;
    }
    let line = match dump(reason) {
        Ok(p) => format!("flight recorder: wrote {}\n", p.display()),
        Err(e) => format!("warning: flight recorder: cannot write {}: {e}\n", dump_path().display()),
    };
    use std::io::Write;
    let _ = std::io::stderr().write_all(line.as_bytes());
}

// ---------------------------------------------------------------------------------------------
// SIGUSR2

/// The pipe's write end, for the handler (-1 until installed).
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_sigusr2(_: libc::c_int) {
    request_dump_from_signal_handler(libc::SIGUSR2);
}

/// Asks the dump thread for a dump naming signal `sig`; async-signal-safe (one write(2) to a
/// non-blocking pipe, errno preserved), for other handlers of this process too: the trainer's
/// stop handler calls it, so that the surviving ranks of a job whose rank died (mpirun then sends
/// them SIGTERM shortly before SIGKILL) leave their dumps for `fabbrica doctor`.
pub fn request_dump_from_signal_handler(sig: libc::c_int) {
    // SAFETY: __errno_location is the calling thread's errno; write on a valid fd or -1.
    unsafe {
        let saved = *libc::__errno_location();
        let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
        if fd >= 0 {
            let b = sig.clamp(1, 255) as u8;
            let _ = libc::write(fd, (&b as *const u8).cast(), 1);
        }
        *libc::__errno_location() = saved;
    }
}

fn signal_name(sig: u8) -> &'static str {
    match sig as libc::c_int {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGUSR1 => "SIGUSR1",
        _ => "SIGUSR2",
    }
}

fn install_sigusr2() -> std::result::Result<(), String> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    let (rd, wr) = (fds[0], fds[1]);
    // The handler must never block: a full pipe already means a dump is due.
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(wr, libc::F_GETFL);
        libc::fcntl(wr, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    SIGNAL_PIPE.store(wr, Ordering::SeqCst);
    std::thread::Builder::new()
        .name("flight-sigusr2".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                // SAFETY: reads into a buffer we own from the pipe's read end.
                let n = unsafe { libc::read(rd, buf.as_mut_ptr().cast(), buf.len()) };
                if n > 0 {
                    dump_and_report(signal_name(buf[n as usize - 1]));
                } else if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                } else {
                    return;
                }
            }
        })
        .map_err(|e| format!("thread: {e}"))?;
    // SAFETY: a handler that is async-signal-safe (see on_sigusr2); SA_RESTART so that system
    // calls interrupted by it are resumed.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigusr2 as *const () as usize;
        act.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGUSR2, &act, std::ptr::null_mut()) != 0 {
            return Err(format!("sigaction: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_values() {
        assert_eq!(parse_capacity("2000"), Ok(2000));
        assert_eq!(parse_capacity(" 0 "), Ok(0));
        assert_eq!(parse_capacity("100000"), Ok(100_000));
        for bad in ["100001", "-1", "abc", "", "1e3", "2000\n1"] {
            let e = parse_capacity(bad).unwrap_err();
            assert!(e.starts_with("FABBRICA_FLIGHT_RECORDER='") && e.contains("FABBRICA_FLIGHT_RECORDER=2000"), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    fn ring(capacity: usize) -> Recorder {
        Recorder(Some(Arc::new(Ring {
            group: "g".into(),
            id: "g".into(),
            backend: Backend::Mpi,
            rank: 0,
            size: 2,
            members: Arc::new(vec![0, 1]),
            capacity,
            epoch: Instant::now(),
            buf: Mutex::new(Buf { entries: Vec::with_capacity(capacity), next: 0 }),
        })))
    }

    fn states(r: &Recorder) -> Vec<(u64, State)> {
        let ring = r.0.as_ref().unwrap();
        let b = lock(&ring.buf);
        let cap = ring.capacity as u64;
        (b.next.saturating_sub(cap)..b.next).map(|id| b.entries[(id % cap) as usize]).map(|e| (e.seq, e.state)).collect()
    }

    #[test]
    fn the_ring_keeps_the_newest_and_tracks_states() {
        let r = ring(3);
        let d = OpDesc { op: OpKind::AllReduce, dtype: Some(DType::F32), count: 8, peer: None, reduce: Some(ReduceOp::Sum) };
        let recs: Vec<Rec> = (1..=5).map(|s| r.enqueue(s, d)).collect();
        // Entries 1 and 2 were overwritten: marking them changes nothing.
        recs[0].complete();
        recs[2].start();
        recs[3].complete();
        assert_eq!(states(&r), vec![(3, State::Started), (4, State::Completed), (5, State::Enqueued)]);
        let buf = lock(&r.0.as_ref().unwrap().buf);
        assert_eq!(buf.entries.capacity(), 3, "preallocated, never grown");
        let e4 = buf.entries.iter().find(|e| e.seq == 4).unwrap();
        assert!(e4.started > 0 && e4.ended >= e4.started && e4.started >= e4.enqueued);
        drop(buf);
        // `find` looks up by stream and number.
        let p = r.enqueue(1, OpDesc::p2p(OpKind::Send, DType::F32, 4, 1));
        drop(p);
        r.find(OpKind::Recv, 1).start();
        r.find(OpKind::AllReduce, 5).complete();
        assert_eq!(states(&r), vec![(4, State::Completed), (5, State::Completed), (1, State::Started)]);
        assert!(r.find(OpKind::AllReduce, 99).ring.is_none());
    }

    #[test]
    fn signatures_decode() {
        let d = OpDesc::of(&Sig::new(OpKind::Broadcast, Some(DType::Bf16), 10, 2));
        assert_eq!((d.op, d.dtype, d.count, d.peer, d.reduce), (OpKind::Broadcast, Some(DType::Bf16), 10, Some(2), None));
        let d = OpDesc::of(&Sig::new(OpKind::ReduceScatter, Some(DType::F32), 3, ReduceOp::Max.code()));
        assert_eq!((d.peer, d.reduce), (None, Some(ReduceOp::Max)));
        let d = OpDesc::of(&Sig::new(OpKind::Barrier, None, 0, 0));
        assert_eq!((d.op, d.dtype), (OpKind::Barrier, None));
    }
}
