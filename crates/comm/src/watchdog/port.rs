//! The watchdog's TCP port: the listener that answers peers, and the client side of an exchange.
//!
//! One request per connection:
//! ```text
//! listener -> client   fabbrica-watchdog/1 <nonce>\n      nonce: decimal u64, never repeated
//! client   -> listener <tag> <request>\n                  tag: 64 lowercase hex digits
//! listener -> client   <tag> <answer>\n                   for `Q` only
//! ```
//! with `request` = `Q <group id>` or `A <message>` and the tags of [`super::auth`]. A line
//! whose tag does not verify is dropped and counted, without an answer or a message.
//!
//! Limits, so that nobody can hold the port: a request line is at most [`Limits::max_line`] bytes
//! (a longer one closes the connection), it must arrive within [`Limits::request_timeout`] of
//! the connection, every connection has its own thread, and at most [`Limits::max_conns`] are
//! served at once: at the cap, a new connection pushes out the oldest one not yet
//! authenticated. Strangers holding connections open therefore only push each other out, and a
//! peer's request (sent as soon as the greeting arrives, so always among the newest) is served
//! at once. Clients retry a connection that is closed on them until their deadline.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::auth::{self, Secret, TAG_HEX};
use super::Watchdog;

/// The listener's greeting, followed by the nonce.
pub(crate) const HELLO: &str = "fabbrica-watchdog/1";

#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Longest request line, newline excluded; a longer one closes the connection.
    pub max_line: usize,
    /// Longest answer line a client reads.
    pub max_answer: usize,
    /// Time a connection has to deliver its request line.
    pub request_timeout: Duration,
    /// Connections served at once.
    pub max_conns: usize,
}

pub(crate) const LIMITS: Limits = Limits { max_line: 8 << 10, max_answer: 64 << 10, request_timeout: Duration::from_secs(2), max_conns: 32 };

/// A listener's connection table and counters.
pub(crate) struct Port {
    pub(crate) limits: Limits,
    /// The next nonce; also the connection's key in the table (so the table is oldest first).
    next: AtomicU64,
    conns: Mutex<Conns>,
    /// Request lines without a valid tag.
    pub(crate) rejected: AtomicU64,
    /// Connections closed without a complete request line: too long, too slow, closed by the
    /// client, pushed out at the cap, or refused with every slot taken.
    pub(crate) dropped: AtomicU64,
}

#[derive(Default)]
struct Conns {
    /// Connections being served: a handle to shut one down, and whether it is authenticated.
    open: BTreeMap<u64, (TcpStream, bool)>,
    /// Handler threads alive, including those of connections shut down and not yet gone.
    threads: usize,
}

impl Port {
    pub(crate) fn new(limits: Limits) -> Port {
        Port { limits, next: AtomicU64::new(0), conns: Mutex::new(Conns::default()), rejected: AtomicU64::new(0), dropped: AtomicU64::new(0) }
    }

    /// Makes room for connection `nonce`: false when it must be closed unserved.
    fn admit(&self, nonce: u64, stream: &TcpStream) -> bool {
        let Ok(handle) = stream.try_clone() else { return false };
        let mut c = self.conns.lock().unwrap();
        if c.threads >= 2 * self.limits.max_conns {
            return false;
        }
        if c.open.len() >= self.limits.max_conns {
            let Some(oldest) = c.open.iter().find(|(_, (_, authed))| !authed).map(|(&n, _)| n) else {
                return false;
            };
            if let Some((s, _)) = c.open.remove(&oldest) {
                // Its handler's read returns at once; the handler counts it as dropped.
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        c.open.insert(nonce, (handle, false));
        c.threads += 1;
        true
    }

    fn authenticated(&self, nonce: u64) {
        if let Some(e) = self.conns.lock().unwrap().open.get_mut(&nonce) {
            e.1 = true;
        }
    }
}

/// A connection's place in the table, freed when its handler ends (or never starts).
struct Slot(Arc<Watchdog>, u64);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.0.port.conns.lock().unwrap();
        c.open.remove(&self.1);
        c.threads -= 1;
    }
}

/// Accepts connections for ever, each served on its own thread.
pub(crate) fn serve(w: Arc<Watchdog>, listener: TcpListener) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) => {
                // E.g. out of file descriptors: do not spin.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let nonce = w.port.next.fetch_add(1, Ordering::Relaxed);
        if !w.port.admit(nonce, &stream) {
            w.port.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let slot = Slot(w.clone(), nonce);
        let spawned = std::thread::Builder::new().name("watchdog-conn".into()).stack_size(256 << 10).spawn(move || {
            let w = slot.0.clone();
            handle(&w, stream, nonce);
            drop(slot);
        });
        // On failure the closure is dropped: the slot is freed and the connection closed.
        if spawned.is_err() {
            w.port.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn handle(w: &Watchdog, stream: TcpStream, nonce: u64) {
    let port = &w.port;
    let limits = port.limits;
    let deadline = Instant::now() + limits.request_timeout;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(limits.request_timeout));
    let line = match (&stream).write_all(format!("{HELLO} {nonce}\n").as_bytes()) {
        Ok(()) => read_line(&stream, limits.max_line, deadline),
        Err(_) => None,
    };
    let Some(line) = line else {
        port.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let Some(request) = auth::open(&line, |body| auth::request_tag(&w.secret, w.world_rank, nonce, body)) else {
        port.rejected.fetch_add(1, Ordering::Relaxed);
        return;
    };
    port.authenticated(nonce);
    let text = String::from_utf8_lossy(request);
    if let Some(group) = text.strip_prefix("Q ") {
        let answer = bounded_line(&w.answer(group), limits.max_answer - TAG_HEX - 1);
        let tag = auth::answer_tag(&w.secret, w.world_rank, nonce, request, answer.as_bytes());
        let _ = (&stream).write_all(&auth::seal(&tag, answer.as_bytes()));
    } else if let Some(msg) = text.strip_prefix("A ") {
        w.aborted_by_peer(msg);
    }
}

/// Reads one line (newline removed) of at most `max` bytes before `deadline`; None when the peer
/// closes first, sends a longer line, or is too slow.
fn read_line(stream: &TcpStream, max: usize, deadline: Instant) -> Option<Vec<u8>> {
    let mut line = Vec::new();
    let mut chunk = [0u8; 1024];
    let mut s = stream;
    loop {
        let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())?;
        stream.set_read_timeout(Some(left)).ok()?;
        let n = match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return None,
        };
        if let Some(end) = chunk[..n].iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&chunk[..end]);
            return (line.len() <= max).then_some(line);
        }
        line.extend_from_slice(&chunk[..n]);
        if line.len() > max {
            return None;
        }
    }
}

/// `s` on one line (line breaks become spaces), cut to at most `max` bytes.
pub(crate) fn bounded_line(s: &str, max: usize) -> String {
    let mut out = s.replace(['\n', '\r'], " ");
    if out.len() > max {
        let mut end = max.saturating_sub(3);
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push_str("...");
    }
    out
}

/// Why an exchange failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Nobody listens there (the rank has exited).
    Refused(std::io::Error),
    /// Closed, reset or too slow: worth another try.
    Lost(String),
    /// Not our protocol, or an answer without the job's tag.
    Foreign,
}

/// Sends `request` to world rank `target` listening at `addr` and returns the answer if
/// `want_answer`, retrying connections that are lost (e.g. pushed out of a flooded listener)
/// until `deadline`.
pub(crate) fn exchange(
    addr: &SocketAddr,
    target: usize,
    secret: &Secret,
    request: &str,
    want_answer: bool,
    limits: &Limits,
    deadline: Instant,
) -> Result<Option<String>, Failure> {
    let request = bounded_line(request, limits.max_line - TAG_HEX - 1);
    loop {
        match exchange_once(addr, target, secret, &request, want_answer, limits, deadline) {
            Err(Failure::Lost(e)) => {
                let pause = Duration::from_millis(50);
                if Instant::now() + pause >= deadline {
                    return Err(Failure::Lost(e));
                }
                std::thread::sleep(pause);
            }
            r => return r,
        }
    }
}

fn exchange_once(
    addr: &SocketAddr,
    target: usize,
    secret: &Secret,
    request: &str,
    want_answer: bool,
    limits: &Limits,
    deadline: Instant,
) -> Result<Option<String>, Failure> {
    let left = || deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()).ok_or_else(|| Failure::Lost("timed out".into()));
    let s = TcpStream::connect_timeout(addr, left()?).map_err(|e| {
        if e.kind() == ErrorKind::ConnectionRefused {
            Failure::Refused(e)
        } else {
            Failure::Lost(e.to_string())
        }
    })?;
    let _ = s.set_nodelay(true);
    let _ = s.set_write_timeout(Some(left()?));
    let hello = read_line(&s, 64, deadline).ok_or_else(|| Failure::Lost("closed before the greeting".into()))?;
    let nonce =
        std::str::from_utf8(&hello).ok().and_then(|h| h.strip_prefix(HELLO)?.strip_prefix(' ')?.parse::<u64>().ok()).ok_or(Failure::Foreign)?;
    let tag = auth::request_tag(secret, target, nonce, request.as_bytes());
    (&s).write_all(&auth::seal(&tag, request.as_bytes())).map_err(|e| Failure::Lost(e.to_string()))?;
    if !want_answer {
        return Ok(None);
    }
    let line = read_line(&s, limits.max_answer, deadline).ok_or_else(|| Failure::Lost("closed before answering".into()))?;
    let body = auth::open(&line, |b| auth::answer_tag(secret, target, nonce, request.as_bytes(), b)).ok_or(Failure::Foreign)?;
    Ok(Some(String::from_utf8_lossy(body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    /// A listener for world rank 1 of a job with `secret`, whose group 'world' last called #4.
    fn listener(secret: Secret, limits: Limits) -> (Arc<Watchdog>, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let w = Arc::new(Watchdog::new(1, vec![addr, addr], secret, Duration::from_secs(600), limits));
        w.called.lock().unwrap().insert("world".into(), (4, "all_reduce #4".into()));
        let lw = w.clone();
        std::thread::spawn(move || serve(lw, l));
        (w, addr)
    }

    fn stats(w: &Watchdog) -> (u64, u64) {
        (w.port.rejected.load(Ordering::Relaxed), w.port.dropped.load(Ordering::Relaxed))
    }

    /// Everything the listener sends until it closes the connection (panics if it keeps it open).
    fn until_closed(mut s: TcpStream) -> String {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) => panic!("the listener kept the connection open: {e}"),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    /// Waits (bounded) until the listener's counters reach `want`.
    fn wait_stats(w: &Watchdog, want: (u64, u64)) {
        let t = Instant::now();
        while stats(w) != want && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(stats(w), want, "(rejected, dropped)");
    }

    #[test]
    fn a_peer_with_the_secret_gets_an_authenticated_answer() {
        let secret = auth::random_secret().unwrap();
        let (w, addr) = listener(secret, LIMITS);
        let deadline = Instant::now() + Duration::from_secs(20);
        let a = exchange(&addr, 1, &secret, "Q world", true, &LIMITS, deadline).unwrap().unwrap();
        assert_eq!(a, "4\tall_reduce #4\tno operation in flight");
        // The same port, asked with another secret or as if it were another rank, says nothing.
        let other = auth::random_secret().unwrap();
        let soon = Instant::now() + Duration::from_millis(300);
        assert!(matches!(exchange(&addr, 1, &other, "Q world", true, &LIMITS, soon), Err(Failure::Lost(_))));
        let soon = Instant::now() + Duration::from_millis(300);
        assert!(matches!(exchange(&addr, 0, &secret, "Q world", true, &LIMITS, soon), Err(Failure::Lost(_))));
        assert!(w.port.rejected.load(Ordering::Relaxed) >= 2);
    }

    #[test]
    fn strangers_get_nothing_and_are_counted() {
        let secret = auth::random_secret().unwrap();
        let (w, addr) = listener(secret, LIMITS);
        // The old protocol, garbage, and a well-formed line with a wrong tag.
        let zeros = format!("{} Q world\n", "0".repeat(TAG_HEX));
        for line in [&b"Q world\n"[..], b"A stranger says stop\n", b"\xff\x00\x13garbage\n", zeros.as_bytes()] {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(line).unwrap();
            let got = until_closed(s);
            assert!(got.starts_with(HELLO) && got.lines().count() == 1, "answered {line:?} with {got:?}");
        }
        wait_stats(&w, (4, 0));
        // A line longer than the limit, without newline: the connection is closed after the limit,
        // not buffered.
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let mb = vec![b'A'; 1 << 20];
        let mut sent = 0usize;
        let err = loop {
            match s.write(&mb) {
                Ok(n) => sent += n,
                Err(e) => break e,
            }
            assert!(sent < 256 << 20, "the listener accepted {sent} bytes of one line");
        };
        assert!(matches!(err.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted), "{err}");
        wait_stats(&w, (4, 1));
        // A real peer is still served.
        let a = exchange(&addr, 1, &secret, "Q world", true, &LIMITS, Instant::now() + Duration::from_secs(20));
        assert_eq!(a.unwrap().unwrap(), "4\tall_reduce #4\tno operation in flight");
    }

    /// Silent connections filling every slot, with a request timeout far longer than the peer's
    /// deadline: the peer is answered anyway, since a new connection pushes out the oldest
    /// unauthenticated one (served one at a time, or refused at the cap, it would not be).
    #[test]
    fn silent_connections_do_not_delay_a_peer() {
        let secret = auth::random_secret().unwrap();
        let limits = Limits { request_timeout: Duration::from_secs(600), max_conns: 4, ..LIMITS };
        let (w, addr) = listener(secret, limits);
        let mut silent = Vec::new();
        for _ in 0..10 {
            let s = TcpStream::connect(addr).unwrap();
            // Wait for the greeting: the connection has been admitted.
            let mut hello = String::new();
            std::io::BufReader::new(&s).read_line(&mut hello).unwrap();
            assert!(hello.starts_with(HELLO));
            silent.push(s);
        }
        wait_stats(&w, (0, 6));
        for _ in 0..3 {
            let a = exchange(&addr, 1, &secret, "Q world", true, &limits, Instant::now() + Duration::from_secs(2));
            assert_eq!(a.unwrap().unwrap(), "4\tall_reduce #4\tno operation in flight");
        }
        // The table never holds more than the cap.
        assert!(w.port.conns.lock().unwrap().open.len() <= limits.max_conns);
        drop(silent);
    }

    /// A process on a peer's port that does not know the secret cannot make up an answer.
    #[test]
    fn a_forged_answer_is_refused() {
        let secret = auth::random_secret().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            (&s).write_all(format!("{HELLO} 0\n").as_bytes()).unwrap();
            let mut line = String::new();
            std::io::BufReader::new(&s).read_line(&mut line).unwrap();
            let _ = (&s).write_all(format!("{} 9\tall_reduce #9\tno operation in flight\n", "ab".repeat(32)).as_bytes());
        });
        let r = exchange(&addr, 1, &secret, "Q world", true, &LIMITS, Instant::now() + Duration::from_secs(20));
        assert!(matches!(r, Err(Failure::Foreign)), "{r:?}");
    }

    #[test]
    fn lines_are_bounded() {
        assert_eq!(bounded_line("a\nb\rc", 100), "a b c");
        let cut = bounded_line(&"é".repeat(100), 51);
        assert!(cut.len() <= 51 && cut.ends_with("..."), "{cut}");
    }
}
