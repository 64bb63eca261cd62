//! Reading flight recorder dumps and finding the rank to look at: what `fabbrica doctor` prints.
//!
//! A dump (`rank_<N>.json`, written by [`super::dump`]):
//! ```text
//! { "format": "fabbrica-flight/1", "rank": 0, "world_size": 3, "host": "node1", "job": "3052470273",
//!   "pid": 4242,
//!   "reason": "watchdog: ...", "capacity": 2000,
//!   "clock": { "mono_ns": <recorder clock at the dump>, "unix_ns": <wall clock at the dump> },
//!   "groups": [ { "name": "world", "id": "w", "backend": "mpi", "rank": 0, "size": 3,
//!                 "members": [0, 1, 2], "recorded": 57,
//!                 "ops": [ { "seq": 1, "op": "all_reduce", "dtype": "f32", "count": 1000,
//!                            "reduce": "sum", "state": "completed", "enqueued_ns": ..,
//!                            "started_ns": .., "ended_ns": .. }, ... ] } ] }
//! ```
//! `ops` is oldest first; `root` (broadcast) and `peer` (send, recv) are group ranks; `members`
//! maps group ranks to world ranks; `recorded` counts every operation the ring saw (more than
//! `ops` once it wrapped). A time `t` happened at wall-clock `unix_ns - (mono_ns - t)`. `job` is
//! the launcher's job id (empty when unknown): dumps of another job than the newest dump's, left
//! in the same directory by an earlier run, are set aside.
//!
//! The analysis is pure: [`analyze`] takes parsed dumps and returns a [`Report`], which renders as
//! text ([`Report::to_text`]) or JSON ([`Report::to_json`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use super::json::{self, Value};

/// Largest dump file read (a full ring of [`super::MAX_CAPACITY`] operations in a few groups).
pub const MAX_DUMP_BYTES: u64 = 64 << 20;
/// Most `rank_<N>.json` files read from one directory.
pub const MAX_DUMPS: usize = 65_536;
/// An operation in flight this long at the dump is one its rank waits in (shorter: the job was
/// running), as is any operation in flight in a dump the watchdog wrote.
pub const WAITING_NS: u64 = 1_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Enqueued,
    Started,
    Completed,
    Failed,
}

impl State {
    fn parse(s: &str) -> Option<State> {
        match s {
            "enqueued" => Some(State::Enqueued),
            "started" => Some(State::Started),
            "completed" => Some(State::Completed),
            "failed" => Some(State::Failed),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            State::Enqueued => "enqueued",
            State::Started => "started",
            State::Completed => "completed",
            State::Failed => "failed",
        }
    }
    fn finished(self) -> bool {
        matches!(self, State::Completed | State::Failed)
    }
}

/// One recorded operation.
#[derive(Debug, Clone, PartialEq)]
pub struct OpRecord {
    pub seq: u64,
    pub op: String,
    pub dtype: Option<String>,
    pub count: Option<u64>,
    /// Broadcast's root (group rank).
    pub root: Option<u64>,
    /// A send's or receive's peer (group rank).
    pub peer: Option<u64>,
    pub reduce: Option<String>,
    pub state: State,
    pub enqueued_ns: u64,
    pub started_ns: Option<u64>,
    pub ended_ns: Option<u64>,
}

impl OpRecord {
    /// A collective with sequence number `seq`, completed (for tests and tools).
    pub fn collective(seq: u64, op: &str, dtype: &str, count: u64) -> OpRecord {
        OpRecord {
            seq,
            op: op.into(),
            dtype: Some(dtype.into()),
            count: Some(count),
            root: None,
            peer: None,
            reduce: (op == "all_reduce" || op == "reduce_scatter").then(|| "sum".to_string()),
            state: State::Completed,
            enqueued_ns: seq * 1000,
            started_ns: Some(seq * 1000 + 10),
            ended_ns: Some(seq * 1000 + 20),
        }
    }

    /// Sends and receives are numbered apart from collectives.
    pub fn is_p2p(&self) -> bool {
        self.op == "send" || self.op == "recv"
    }

    /// What was called, as the debug check and the watchdog print it:
    /// `all_reduce(f32, 1000 elements, sum)`.
    pub fn describe(&self) -> String {
        let dt = self.dtype.as_deref().unwrap_or("?");
        let n = self.count.map(|c| c.to_string()).unwrap_or_else(|| "?".into());
        let num = |x: Option<u64>| x.map(|v| v.to_string()).unwrap_or_else(|| "?".into());
        match self.op.as_str() {
            "all_reduce" | "reduce_scatter" => {
                format!("{}({dt}, {n} elements, {})", self.op, self.reduce.as_deref().unwrap_or("?"))
            }
            "broadcast" => format!("broadcast({dt}, {n} elements, root {})", num(self.root)),
            "all_gather" => format!("all_gather({dt}, {n} elements per rank)"),
            "send" => format!("send({dt}, {n} elements, to rank {})", num(self.peer)),
            "recv" => format!("recv({dt}, {n} elements, from rank {})", num(self.peer)),
            op => format!("{op}()"),
        }
    }

    /// `describe` with the sequence number: `all_reduce(f32, 1000 elements, sum) #2`.
    pub fn label(&self) -> String {
        format!("{} #{}", self.describe(), self.seq)
    }

    /// What ranks must agree on for a collective.
    fn signature(&self) -> (&str, Option<&str>, Option<u64>, Option<u64>, Option<&str>) {
        (&self.op, self.dtype.as_deref(), self.count, self.root, self.reduce.as_deref())
    }
}

/// One group's ring, as one rank dumped it.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupDump {
    pub name: String,
    pub id: String,
    pub backend: String,
    /// This rank's rank in the group, and the group's size.
    pub rank: usize,
    pub size: usize,
    /// World ranks by group rank.
    pub members: Vec<usize>,
    pub recorded: u64,
    /// Oldest first.
    pub ops: Vec<OpRecord>,
}

/// One rank's dump.
#[derive(Debug, Clone, PartialEq)]
pub struct Dump {
    pub rank: usize,
    pub world_size: usize,
    pub host: String,
    /// The launcher's job id ("" when unknown).
    pub job: String,
    pub pid: u64,
    pub reason: String,
    pub capacity: u64,
    pub mono_ns: u64,
    pub unix_ns: u64,
    pub groups: Vec<GroupDump>,
}

fn field<'a>(v: &'a Value, key: &str, what: &str) -> Result<&'a Value, String> {
    v.get(key).ok_or_else(|| format!("{what} has no \"{key}\""))
}
fn num(v: &Value, key: &str, what: &str) -> Result<u64, String> {
    field(v, key, what)?.as_u64().ok_or_else(|| format!("{what}: \"{key}\" is not a non-negative integer"))
}
fn text(v: &Value, key: &str, what: &str) -> Result<String, String> {
    Ok(field(v, key, what)?.as_str().ok_or_else(|| format!("{what}: \"{key}\" is not a string"))?.to_string())
}
fn opt_num(v: &Value, key: &str, what: &str) -> Result<Option<u64>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_u64().map(Some).ok_or_else(|| format!("{what}: \"{key}\" is not a non-negative integer")),
    }
}
fn opt_text(v: &Value, key: &str, what: &str) -> Result<Option<String>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_str().map(|s| Some(s.to_string())).ok_or_else(|| format!("{what}: \"{key}\" is not a string")),
    }
}
fn array<'a>(v: &'a Value, key: &str, what: &str) -> Result<&'a [Value], String> {
    field(v, key, what)?.as_array().ok_or_else(|| format!("{what}: \"{key}\" is not an array"))
}
fn small(n: u64, key: &str, what: &str) -> Result<usize, String> {
    // World sizes and ranks: bounded so that nothing sized by them can be huge.
    if n > 1 << 24 {
        return Err(format!("{what}: \"{key}\" = {n} is not a plausible rank or size"));
    }
    Ok(n as usize)
}

fn parse_op(v: &Value, what: &str) -> Result<OpRecord, String> {
    let state = text(v, "state", what)?;
    Ok(OpRecord {
        seq: num(v, "seq", what)?,
        op: text(v, "op", what)?,
        dtype: opt_text(v, "dtype", what)?,
        count: opt_num(v, "count", what)?,
        root: opt_num(v, "root", what)?,
        peer: opt_num(v, "peer", what)?,
        reduce: opt_text(v, "reduce", what)?,
        state: State::parse(&state).ok_or_else(|| format!("{what}: unknown state '{state}'"))?,
        enqueued_ns: num(v, "enqueued_ns", what)?,
        started_ns: opt_num(v, "started_ns", what)?,
        ended_ns: opt_num(v, "ended_ns", what)?,
    })
}

/// Parses one dump's text.
pub fn parse_dump(text_: &str) -> Result<Dump, String> {
    let v = json::parse(text_)?;
    let fmt = text(&v, "format", "the dump")?;
    if fmt != super::FORMAT {
        return Err(format!("format '{fmt}' is not {}", super::FORMAT));
    }
    let clock = field(&v, "clock", "the dump")?;
    let mut groups = Vec::new();
    for (k, g) in array(&v, "groups", "the dump")?.iter().enumerate() {
        let what = format!("group {k}");
        let members = array(g, "members", &what)?
            .iter()
            .map(|m| m.as_u64().ok_or_else(|| format!("{what}: a member is not a rank")).and_then(|m| small(m, "members", &what)))
            .collect::<Result<Vec<_>, _>>()?;
        let ops = array(g, "ops", &what)?
            .iter()
            .enumerate()
            .map(|(i, o)| parse_op(o, &format!("{what} op {i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let gd = GroupDump {
            name: text(g, "name", &what)?,
            id: text(g, "id", &what)?,
            backend: text(g, "backend", &what)?,
            rank: small(num(g, "rank", &what)?, "rank", &what)?,
            size: small(num(g, "size", &what)?, "size", &what)?,
            members,
            recorded: num(g, "recorded", &what)?,
            ops,
        };
        if gd.members.len() != gd.size || gd.rank >= gd.size {
            return Err(format!("{what}: rank {} of size {} with {} members", gd.rank, gd.size, gd.members.len()));
        }
        groups.push(gd);
    }
    let d = Dump {
        rank: small(num(&v, "rank", "the dump")?, "rank", "the dump")?,
        world_size: small(num(&v, "world_size", "the dump")?, "world_size", "the dump")?,
        host: text(&v, "host", "the dump")?,
        job: opt_text(&v, "job", "the dump")?.unwrap_or_default(),
        pid: num(&v, "pid", "the dump")?,
        reason: text(&v, "reason", "the dump")?,
        capacity: num(&v, "capacity", "the dump")?,
        mono_ns: num(clock, "mono_ns", "clock")?,
        unix_ns: num(clock, "unix_ns", "clock")?,
        groups,
    };
    if d.rank >= d.world_size {
        return Err(format!("rank {} is not below its world size {}", d.rank, d.world_size));
    }
    Ok(d)
}

/// The dumps of a directory.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The directory the dumps were read from (`DIR/flight` when it exists, else `DIR`).
    pub dir: PathBuf,
    pub dumps: Vec<Dump>,
    /// (file name, why it was not used).
    pub unreadable: Vec<(String, String)>,
}

/// `rank_<N>.json` -> N.
fn rank_of_file(name: &str) -> Option<usize> {
    let n = name.strip_prefix("rank_")?.strip_suffix(".json")?;
    if n.is_empty() || n.len() > 8 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// Reads every `rank_<N>.json` in `dir/flight` (or in `dir` itself when it has no `flight/`).
/// Only regular files named so are read (no links: nothing outside the directory), each at most
/// [`MAX_DUMP_BYTES`]; one that cannot be used is listed in `unreadable`, not fatal. Errors: the
/// directory cannot be listed, holds no readable dump, or holds more than [`MAX_DUMPS`].
pub fn load_dir(dir: &Path) -> Result<Loaded, String> {
    if !dir.is_dir() {
        return Err(format!("{} is not a directory (give the run's out_dir or its flight/ directory)", dir.display()));
    }
    let sub = dir.join("flight");
    let dir = if std::fs::symlink_metadata(&sub).map(|m| m.is_dir()).unwrap_or(false) { sub } else { dir.to_path_buf() };
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let name = entry.file_name();
        let Some(rank) = name.to_str().and_then(rank_of_file) else { continue };
        files.push((rank, name.to_string_lossy().into_owned()));
        if files.len() > MAX_DUMPS {
            return Err(format!("{} holds more than {MAX_DUMPS} rank_<N>.json files", dir.display()));
        }
    }
    files.sort();
    let mut dumps = Vec::new();
    let mut unreadable = Vec::new();
    for (rank, name) in files {
        let path = dir.join(&name);
        let read = (|| -> Result<Dump, String> {
            let meta = std::fs::symlink_metadata(&path).map_err(|e| e.to_string())?;
            if !meta.is_file() {
                return Err("not a regular file".into());
            }
            if meta.len() > MAX_DUMP_BYTES {
                return Err(format!("{} bytes, more than the {} MiB a dump may have", meta.len(), MAX_DUMP_BYTES >> 20));
            }
            let mut buf = Vec::new();
            std::fs::File::open(&path)
                .and_then(|f| f.take(MAX_DUMP_BYTES + 1).read_to_end(&mut buf))
                .map_err(|e| e.to_string())?;
            if buf.len() as u64 > MAX_DUMP_BYTES {
                return Err(format!("more than the {} MiB a dump may have", MAX_DUMP_BYTES >> 20));
            }
            let s = String::from_utf8(buf).map_err(|_| "not UTF-8".to_string())?;
            let d = parse_dump(&s)?;
            if d.rank != rank {
                return Err(format!("says it is rank {}", d.rank));
            }
            Ok(d)
        })();
        match read {
            Ok(d) => dumps.push(d),
            Err(e) => unreadable.push((name, e)),
        }
    }
    if dumps.is_empty() && unreadable.is_empty() {
        return Err(format!("no flight recorder dumps (rank_<N>.json) in {}", dir.display()));
    }
    if dumps.is_empty() {
        let (f, why) = &unreadable[0];
        let more = if unreadable.len() > 1 { format!(" (and {} more)", unreadable.len() - 1) } else { String::new() };
        return Err(format!("no readable flight recorder dump in {}: {f}: {why}{more}", dir.display()).replace(['\n', '\r'], " "));
    }
    Ok(Loaded { dir, dumps, unreadable })
}

// ---------------------------------------------------------------------------------------------
// The report

/// Why a rank wrote its dump.
#[derive(Debug, Clone, PartialEq)]
pub struct RankLine {
    pub rank: usize,
    pub host: String,
    pub pid: u64,
    pub reason: String,
}

/// An operation a rank had not finished when it dumped.
#[derive(Debug, Clone, PartialEq)]
pub struct InFlight {
    /// `all_reduce(f32, 1000 elements, sum) #2`.
    pub what: String,
    pub state: State,
    /// Since it started (or was enqueued), until the dump.
    pub for_ns: u64,
}

/// One member's progress on a group's collectives.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// World rank.
    pub rank: usize,
    pub group_rank: usize,
    /// False: this rank left no dump.
    pub dump: bool,
    /// Highest collective sequence number called, started, completed (0: none).
    pub called: u64,
    pub started: u64,
    pub completed: u64,
    /// First collective or point-to-point operation that failed.
    pub failed: Option<String>,
    /// The oldest operation not finished (collective or point-to-point).
    pub in_flight: Option<InFlight>,
}

/// The ranks that called one thing at the first sequence number where ranks differ.
#[derive(Debug, Clone, PartialEq)]
pub struct Side {
    pub ranks: Vec<usize>,
    pub what: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Divergence {
    /// Collective sequence number.
    pub seq: u64,
    pub sides: Vec<Side>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GroupReport {
    pub name: String,
    pub id: String,
    pub backend: String,
    /// World ranks by group rank.
    pub members: Vec<usize>,
    pub progress: Vec<Progress>,
    /// Members with a dump that called fewer collectives than the furthest member.
    pub behind: Vec<usize>,
    /// The collective the ranks behind did not call: (number, what the others called).
    pub not_called: Option<(u64, String)>,
    pub divergence: Option<Divergence>,
    /// Collective numbers recorded by at least two ranks, all of which were compared.
    pub compared: (u64, u64),
}

impl GroupReport {
    fn has_issue(&self) -> bool {
        !self.behind.is_empty()
            || self.divergence.is_some()
            || self.progress.iter().any(|p| !p.dump || p.failed.is_some() || p.in_flight.is_some())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Suspect {
    pub rank: usize,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub dir: String,
    pub world_size: usize,
    pub dumps: Vec<RankLine>,
    /// World ranks without a dump.
    pub missing: Vec<usize>,
    pub unreadable: Vec<(String, String)>,
    /// Dumps set aside: (rank, why), e.g. written by an earlier job into the same directory.
    pub set_aside: Vec<(usize, String)>,
    pub groups: Vec<GroupReport>,
    /// The ranks to look at first, most likely first.
    pub look_at: Vec<Suspect>,
    /// One sentence: what the records say.
    pub verdict: String,
}

/// `0-2, 5, 7-8`.
pub fn rank_list(ranks: &[usize]) -> String {
    let mut v = ranks.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        parts.push(if j == i { v[i].to_string() } else { format!("{}-{}", v[i], v[j]) });
        i = j + 1;
    }
    parts.join(", ")
}

/// `rank 3` or `ranks 0-2`.
pub fn ranks_phrase(ranks: &[usize]) -> String {
    if ranks.len() == 1 {
        format!("rank {}", ranks[0])
    } else {
        format!("ranks {}", rank_list(ranks))
    }
}

fn secs(ns: u64) -> String {
    format!("{:.1}s", ns as f64 / 1e9)
}

fn progress_of(dump: &Dump, group: Option<&GroupDump>, rank: usize, group_rank: usize) -> Progress {
    let mut p = Progress {
        rank,
        group_rank,
        dump: true,
        called: 0,
        started: 0,
        completed: 0,
        failed: None,
        in_flight: None,
    };
    let Some(g) = group else { return p };
    for op in &g.ops {
        if op.state == State::Failed && p.failed.is_none() {
            p.failed = Some(op.label());
        }
        if p.in_flight.is_none() && !op.state.finished() {
            let since = op.started_ns.unwrap_or(op.enqueued_ns);
            p.in_flight = Some(InFlight { what: op.label(), state: op.state, for_ns: dump.mono_ns.saturating_sub(since) });
        }
        if op.is_p2p() {
            continue;
        }
        p.called = p.called.max(op.seq);
        if op.state != State::Enqueued {
            p.started = p.started.max(op.seq);
        }
        if op.state == State::Completed {
            p.completed = p.completed.max(op.seq);
        }
    }
    p
}

/// Groups are matched across ranks by backend, id and the order in which a dump lists rings of
/// the same id (a group made twice has two rings).
type GroupKey = (String, String, usize);

/// What the dumps say: progress per group, who is behind, where ranks diverged, whom to look at.
pub fn analyze(dir: &str, dumps: &[Dump], unreadable: &[(String, String)]) -> Report {
    // The job of the newest dump is the one analysed; others' dumps are leftovers.
    let newest = dumps.iter().max_by_key(|d| d.unix_ns);
    let job = newest.map(|d| d.job.clone()).unwrap_or_default();
    let newest_ns = newest.map(|d| d.unix_ns).unwrap_or(0);
    let (dumps, aside): (Vec<&Dump>, Vec<&Dump>) = dumps.iter().partition(|d| job.is_empty() || d.job == job);
    let set_aside: Vec<(usize, String)> = aside
        .iter()
        .map(|d| {
            let age = newest_ns.saturating_sub(d.unix_ns) / 1_000_000_000;
            (d.rank, format!("of job {}, not {job}, written {age}s before the newest dump (an earlier run?)", d.job))
        })
        .collect();
    let world_size = dumps.iter().map(|d| d.world_size).max().unwrap_or(0);
    let by_rank: BTreeMap<usize, &Dump> = dumps.iter().map(|d| (d.rank, *d)).collect();
    let missing: Vec<usize> = (0..world_size).filter(|r| !by_rank.contains_key(r)).collect();

    // Each dump's groups, keyed.
    let mut keyed: BTreeMap<usize, BTreeMap<GroupKey, &GroupDump>> = BTreeMap::new();
    let mut order: Vec<GroupKey> = Vec::new();
    for d in &dumps {
        let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
        let mine = keyed.entry(d.rank).or_default();
        for g in &d.groups {
            let k = seen.entry((g.backend.clone(), g.id.clone())).or_insert(0);
            let key = (g.backend.clone(), g.id.clone(), *k);
            *k += 1;
            if !order.contains(&key) {
                order.push(key.clone());
            }
            mine.insert(key, g);
        }
    }

    let mut groups = Vec::new();
    for key in &order {
        let first = dumps.iter().find_map(|d| keyed[&d.rank].get(key)).copied().expect("a dump has the group");
        let members = first.members.clone();
        let progress: Vec<Progress> = members
            .iter()
            .enumerate()
            .map(|(gr, &w)| match by_rank.get(&w) {
                Some(d) => progress_of(d, keyed[&w].get(key).copied(), w, gr),
                None => Progress { rank: w, group_rank: gr, dump: false, called: 0, started: 0, completed: 0, failed: None, in_flight: None },
            })
            .collect();
        let present: Vec<&Progress> = progress.iter().filter(|p| p.dump).collect();
        let furthest = present.iter().map(|p| p.called).max().unwrap_or(0);
        let behind: Vec<usize> = present.iter().filter(|p| p.called < furthest).map(|p| p.rank).collect();

        // Every collective record by number, across the members' dumps.
        let mut by_seq: BTreeMap<u64, Vec<(usize, &OpRecord)>> = BTreeMap::new();
        for &w in &members {
            if let Some(g) = keyed.get(&w).and_then(|m| m.get(key)) {
                for op in g.ops.iter().filter(|o| !o.is_p2p()) {
                    by_seq.entry(op.seq).or_default().push((w, op));
                }
            }
        }
        let not_called = behind.iter().map(|r| progress.iter().find(|p| p.rank == *r).unwrap().called).min().map(|c| {
            let s = c + 1;
            let what = by_seq.get(&s).and_then(|v| v.first()).map(|(_, o)| o.describe()).unwrap_or_else(|| "?".into());
            (s, what)
        });
        let shared: Vec<u64> = by_seq.iter().filter(|(_, v)| v.len() >= 2).map(|(s, _)| *s).collect();
        let compared = (shared.first().copied().unwrap_or(0), shared.last().copied().unwrap_or(0));
        let mut divergence = None;
        for s in shared {
            let recs = &by_seq[&s];
            if recs.iter().all(|(_, o)| o.signature() == recs[0].1.signature()) {
                continue;
            }
            let mut sides: Vec<Side> = Vec::new();
            for (w, o) in recs {
                let what = o.describe();
                match sides.iter_mut().find(|sd| sd.what == what) {
                    Some(sd) => sd.ranks.push(*w),
                    None => sides.push(Side { ranks: vec![*w], what }),
                }
            }
            divergence = Some(Divergence { seq: s, sides });
            break;
        }
        groups.push(GroupReport {
            name: first.name.clone(),
            id: first.id.clone(),
            backend: first.backend.clone(),
            members,
            progress,
            behind,
            not_called,
            divergence,
            compared,
        });
    }

    // Whom to look at.
    let mut look_at: Vec<Suspect> = Vec::new();
    let mut add = |rank: usize, why: String| {
        if !look_at.iter().any(|s| s.rank == rank) {
            look_at.push(Suspect { rank, why });
        }
    };
    // Dumps the watchdog wrote (on the rank that fired it, or told by it).
    let by_watchdog: BTreeSet<usize> = dumps.iter().filter(|d| d.reason.contains("watchdog: ")).map(|d| d.rank).collect();
    let waits = |p: &Progress| p.in_flight.as_ref().is_some_and(|f| f.for_ns >= WAITING_NS || by_watchdog.contains(&p.rank));
    // The ranks waiting in an operation: "ranks 0-1 were waiting in all_reduce(..) #6 on group 'world'".
    let waiting = |g: &GroupReport| -> Option<String> {
        let stuck: Vec<&Progress> = g.progress.iter().filter(|p| waits(p)).collect();
        let first = stuck.first()?;
        let ranks: Vec<usize> = stuck.iter().map(|p| p.rank).collect();
        Some(format!("{} {} waiting in {} on group '{}'", ranks_phrase(&ranks), if ranks.len() == 1 { "was" } else { "were" }, first.in_flight.as_ref().unwrap().what, g.name))
    };
    if !missing.is_empty() {
        let context = groups.iter().find_map(waiting).map(|w| format!(" while {w}")).unwrap_or_default();
        for &r in &missing {
            add(r, format!("left no dump (killed, crashed, or never started){context}"));
        }
    }
    for g in &groups {
        if let Some(d) = &g.divergence {
            let least = d.sides.iter().map(|s| s.ranks.len()).min().unwrap_or(0);
            for side in d.sides.iter().filter(|s| s.ranks.len() == least) {
                let others: Vec<String> = d
                    .sides
                    .iter()
                    .filter(|o| o.what != side.what)
                    .map(|o| format!("{} called {}", ranks_phrase(&o.ranks), o.what))
                    .collect();
                for &r in &side.ranks {
                    add(r, format!("called {} as collective #{} on group '{}', where {}", side.what, d.seq, g.name, others.join("; ")));
                }
            }
        }
    }
    for g in &groups {
        let (Some((s, what)), Some(w)) = (&g.not_called, waiting(g)) else { continue };
        for &r in &g.behind {
            let p = g.progress.iter().find(|p| p.rank == r).unwrap();
            if p.called + 1 != *s {
                continue;
            }
            // What it was doing instead, on any group.
            let doing = groups
                .iter()
                .find_map(|o| o.progress.iter().find(|q| q.rank == r).and_then(|q| q.in_flight.as_ref()).map(|f| (o, f)))
                .map(|(o, f)| format!("; it was in {} on group '{}' for {}", f.what, o.name, secs(f.for_ns)))
                .unwrap_or_else(|| "; it had no operation in flight".into());
            add(r, format!("never called collective #{s} ({what}) on group '{}', which {w}{doing}", g.name));
        }
    }

    let verdict = if !missing.is_empty() {
        format!("{} left no dump: start there", ranks_phrase(&missing))
    } else if let Some((g, d)) = groups.iter().find_map(|g| g.divergence.as_ref().map(|d| (g, d))) {
        format!("the ranks diverged at collective #{} on group '{}'", d.seq, g.name)
    } else if !look_at.is_empty() {
        format!("{} did not arrive where the others wait", ranks_phrase(&look_at.iter().map(|s| s.rank).collect::<Vec<_>>()))
    } else if let Some(w) = groups.iter().find_map(waiting) {
        format!("{w} and no rank is behind: suspect the backend or the network, not a rank")
    } else if let Some(p) = groups.iter().flat_map(|g| &g.progress).find(|p| p.failed.is_some()) {
        format!("rank {} reports a failed {}; see the reasons above", p.rank, p.failed.as_deref().unwrap_or(""))
    } else if groups.iter().flat_map(|g| &g.progress).any(|p| p.in_flight.is_some()) {
        format!("no hang, divergence or failure in the records: the job was running (operations in flight for under {})", secs(WAITING_NS))
    } else {
        "no hang, divergence or failure in the records".into()
    };

    Report {
        dir: dir.to_string(),
        world_size,
        dumps: dumps.iter().map(|d| RankLine { rank: d.rank, host: d.host.clone(), pid: d.pid, reason: d.reason.clone() }).collect(),
        missing,
        unreadable: unreadable.to_vec(),
        set_aside,
        groups,
        look_at,
        verdict,
    }
}

/// `s` cut to `n` characters, with an ellipsis.
fn cut(s: &str, n: usize) -> String {
    let s = s.replace(['\n', '\r'], " ");
    if s.chars().count() <= n {
        s
    } else {
        format!("{}...", s.chars().take(n).collect::<String>())
    }
}

/// Groups shown in detail in the text report; the rest are counted.
const TEXT_GROUPS: usize = 6;
const TEXT_WIDTH: usize = 150;

impl Report {
    /// About one screen: the dumps, each group with an issue, and the ranks to look at.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        o.push_str(&format!(
            "flight recorder dumps in {}: {} of {} ranks\n",
            self.dir,
            self.dumps.len(),
            self.world_size
        ));
        // Dumps folded by reason.
        let mut reasons: Vec<(&str, Vec<&RankLine>)> = Vec::new();
        for d in &self.dumps {
            match reasons.iter_mut().find(|(r, _)| *r == d.reason) {
                Some((_, v)) => v.push(d),
                None => reasons.push((&d.reason, vec![d])),
            }
        }
        for (reason, lines) in reasons.iter().take(8) {
            let who = if lines.len() == 1 {
                format!("rank {} ({}, pid {})", lines[0].rank, lines[0].host, lines[0].pid)
            } else {
                ranks_phrase(&lines.iter().map(|l| l.rank).collect::<Vec<_>>())
            };
            o.push_str(&format!("  {who}: {}\n", cut(reason, TEXT_WIDTH)));
        }
        if reasons.len() > 8 {
            o.push_str(&format!("  ... and {} more reasons (see --json)\n", reasons.len() - 8));
        }
        if !self.missing.is_empty() {
            o.push_str(&format!("  no dump: {}\n", ranks_phrase(&self.missing)));
        }
        for (r, why) in self.set_aside.iter().take(5) {
            o.push_str(&format!("  set aside: rank_{r}.json: {}\n", cut(why, TEXT_WIDTH)));
        }
        if self.set_aside.len() > 5 {
            o.push_str(&format!("  ... and {} more set aside\n", self.set_aside.len() - 5));
        }
        for (f, why) in self.unreadable.iter().take(5) {
            o.push_str(&format!("  unreadable: {f}: {}\n", cut(why, TEXT_WIDTH)));
        }
        if self.unreadable.len() > 5 {
            o.push_str(&format!("  ... and {} more unreadable files\n", self.unreadable.len() - 5));
        }

        let (issues, quiet): (Vec<&GroupReport>, Vec<&GroupReport>) = self.groups.iter().partition(|g| g.has_issue());
        for g in issues.iter().take(TEXT_GROUPS) {
            o.push('\n');
            o.push_str(&format!(
                "group '{}' ({}, {} ranks: world {}), collectives:\n",
                g.name,
                g.backend,
                g.members.len(),
                rank_list(&g.members)
            ));
            // Rows folded by identical progress.
            type Row = (bool, u64, u64, u64, Option<String>, Option<String>);
            let mut rows: Vec<(Row, Vec<usize>, u64)> = Vec::new();
            for p in &g.progress {
                let row: Row = (
                    p.dump,
                    p.called,
                    p.started,
                    p.completed,
                    p.in_flight.as_ref().map(|f| format!("{} {}", if f.state == State::Started { "in" } else { "queued" }, f.what)),
                    p.failed.clone(),
                );
                let t = p.in_flight.as_ref().map(|f| f.for_ns).unwrap_or(0);
                match rows.iter_mut().find(|(r, _, _)| *r == row) {
                    Some((_, ranks, tmax)) => {
                        ranks.push(p.rank);
                        *tmax = (*tmax).max(t);
                    }
                    None => rows.push((row, vec![p.rank], t)),
                }
            }
            o.push_str(&format!("  {:<12} {:>7} {:>8} {:>10}  now\n", "world ranks", "called", "started", "completed"));
            for ((dump, called, started, completed, now, failed), ranks, t) in rows.iter().take(10) {
                let ranks = rank_list(ranks);
                if !dump {
                    o.push_str(&format!("  {ranks:<12} {:>7} {:>8} {:>10}  no dump\n", "?", "?", "?"));
                    continue;
                }
                let mut now = match now {
                    Some(n) => format!("{n} for {}", secs(*t)),
                    None => "idle".into(),
                };
                if let Some(f) = failed {
                    now.push_str(&format!("; failed {f}"));
                }
                let n = |x: &u64| if *x == 0 { "-".to_string() } else { format!("#{x}") };
                o.push_str(&format!(
                    "  {ranks:<12} {:>7} {:>8} {:>10}  {}\n",
                    n(called),
                    n(started),
                    n(completed),
                    cut(&now, TEXT_WIDTH - 45)
                ));
            }
            if rows.len() > 10 {
                o.push_str(&format!("  ... {} more rows (see --json)\n", rows.len() - 10));
            }
            match &g.divergence {
                Some(d) => {
                    let sides: Vec<String> = d.sides.iter().map(|s| format!("{} called {}", ranks_phrase(&s.ranks), s.what)).collect();
                    o.push_str(&format!("  diverged at collective #{}: {}\n", d.seq, cut(&sides.join("; "), TEXT_WIDTH)));
                }
                None if g.compared.1 > 0 => o.push_str(&format!(
                    "  diverged: no (collectives #{}-#{} agree on every rank that recorded them)\n",
                    g.compared.0, g.compared.1
                )),
                None => o.push_str("  diverged: nothing to compare (no collective recorded by two ranks)\n"),
            }
            match &g.not_called {
                Some((s, what)) => o.push_str(&format!(
                    "  behind: {} (never called collective #{s}: {what})\n",
                    ranks_phrase(&g.behind)
                )),
                None => o.push_str("  behind: none\n"),
            }
        }
        if issues.len() > TEXT_GROUPS {
            o.push_str(&format!("\n{} more groups with something in flight or failed (see --json)\n", issues.len() - TEXT_GROUPS));
        }
        if !quiet.is_empty() {
            let names: Vec<String> = quiet.iter().take(8).map(|g| format!("'{}' ({})", g.name, g.backend)).collect();
            let more = if quiet.len() > 8 { format!(" and {} more", quiet.len() - 8) } else { String::new() };
            o.push_str(&format!("\nidle and in step: {}{more}\n", names.join(", ")));
        }
        o.push('\n');
        if self.look_at.is_empty() {
            o.push_str("look at: no rank in particular\n");
        } else {
            for (i, s) in self.look_at.iter().take(8).enumerate() {
                let head = if i == 0 { "look at:" } else { "        " };
                o.push_str(&format!("{head} rank {}: {}\n", s.rank, cut(&s.why, 2 * TEXT_WIDTH)));
            }
            if self.look_at.len() > 8 {
                o.push_str(&format!("         ... and {} more ranks (see --json)\n", self.look_at.len() - 8));
            }
        }
        o.push_str(&format!("verdict: {}\n", self.verdict));
        o
    }

    /// The whole report as one JSON object.
    pub fn to_json(&self) -> String {
        let q = json::quote;
        let list = |v: &[usize]| format!("[{}]", v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","));
        let opt = |s: &Option<String>| s.as_deref().map(q).unwrap_or_else(|| "null".into());
        let mut o = String::new();
        o.push_str(&format!("{{\"dir\":{},\"world_size\":{},\"dumps\":[", q(&self.dir), self.world_size));
        o.push_str(
            &self
                .dumps
                .iter()
                .map(|d| format!("{{\"rank\":{},\"host\":{},\"pid\":{},\"reason\":{}}}", d.rank, q(&d.host), d.pid, q(&d.reason)))
                .collect::<Vec<_>>()
                .join(","),
        );
        o.push_str(&format!("],\"missing\":{},\"set_aside\":[", list(&self.missing)));
        o.push_str(
            &self.set_aside.iter().map(|(r, w)| format!("{{\"rank\":{r},\"why\":{}}}", q(w))).collect::<Vec<_>>().join(","),
        );
        o.push_str("],\"unreadable\":[");
        o.push_str(
            &self.unreadable.iter().map(|(f, w)| format!("{{\"file\":{},\"error\":{}}}", q(f), q(w))).collect::<Vec<_>>().join(","),
        );
        o.push_str("],\"groups\":[");
        let groups: Vec<String> = self
            .groups
            .iter()
            .map(|g| {
                let progress: Vec<String> = g
                    .progress
                    .iter()
                    .map(|p| {
                        let inf = match &p.in_flight {
                            Some(f) => format!(
                                "{{\"what\":{},\"state\":\"{}\",\"for_ns\":{}}}",
                                q(&f.what),
                                f.state.name(),
                                f.for_ns
                            ),
                            None => "null".into(),
                        };
                        format!(
                            "{{\"rank\":{},\"group_rank\":{},\"dump\":{},\"called\":{},\"started\":{},\"completed\":{},\"failed\":{},\"in_flight\":{inf}}}",
                            p.rank,
                            p.group_rank,
                            p.dump,
                            p.called,
                            p.started,
                            p.completed,
                            opt(&p.failed)
                        )
                    })
                    .collect();
                let div = match &g.divergence {
                    Some(d) => format!(
                        "{{\"seq\":{},\"sides\":[{}]}}",
                        d.seq,
                        d.sides
                            .iter()
                            .map(|s| format!("{{\"ranks\":{},\"what\":{}}}", list(&s.ranks), q(&s.what)))
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                    None => "null".into(),
                };
                let nc = match &g.not_called {
                    Some((s, w)) => format!("{{\"seq\":{s},\"what\":{}}}", q(w)),
                    None => "null".into(),
                };
                format!(
                    "{{\"name\":{},\"id\":{},\"backend\":{},\"members\":{},\"progress\":[{}],\"behind\":{},\"not_called\":{nc},\"divergence\":{div},\"compared\":[{},{}]}}",
                    q(&g.name),
                    q(&g.id),
                    q(&g.backend),
                    list(&g.members),
                    progress.join(","),
                    list(&g.behind),
                    g.compared.0,
                    g.compared.1
                )
            })
            .collect();
        o.push_str(&groups.join(","));
        o.push_str("],\"look_at\":[");
        o.push_str(
            &self.look_at.iter().map(|s| format!("{{\"rank\":{},\"why\":{}}}", s.rank, q(&s.why))).collect::<Vec<_>>().join(","),
        );
        o.push_str(&format!("],\"verdict\":{}}}\n", q(&self.verdict)));
        o
    }
}

#[cfg(test)]
mod tests;
