//! The dump file: its records, parsing one, and reading a directory of them (bounded).

use std::io::Read;
use std::path::{Path, PathBuf};

use super::super::json::{self, Value};
use super::{MAX_DUMPS, MAX_DUMP_BYTES};

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
    pub(super) fn finished(self) -> bool {
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
    pub(super) fn signature(&self) -> (&str, Option<&str>, Option<u64>, Option<u64>, Option<&str>) {
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
    Ok(printable(field(v, key, what)?.as_str().ok_or_else(|| format!("{what}: \"{key}\" is not a string"))?))
}
/// A string from a dump as the report may print it: control characters (a newline, a
/// terminal's escape sequences) escaped.
fn printable(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars().flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] }).collect()
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
        Some(x) => x.as_str().map(|s| Some(printable(s))).ok_or_else(|| format!("{what}: \"{key}\" is not a string")),
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
    if fmt != super::super::FORMAT {
        return Err(format!("format '{fmt}' is not {}", super::super::FORMAT));
    }
    let clock = field(&v, "clock", "the dump")?;
    let mut groups = Vec::new();
    for (k, g) in array(&v, "groups", "the dump")?.iter().enumerate() {
        let what = format!("group {k}");
        let members = array(g, "members", &what)?
            .iter()
            .map(|m| m.as_u64().ok_or_else(|| format!("{what}: a member is not a rank")).and_then(|m| small(m, "members", &what)))
            .collect::<Result<Vec<_>, _>>()?;
        let ops = array(g, "ops", &what)?.iter().enumerate().map(|(i, o)| parse_op(o, &format!("{what} op {i}"))).collect::<Result<Vec<_>, _>>()?;
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
    // One name per rank: `rank_07.json` is not rank 7's dump.
    if n.is_empty() || n.len() > 8 || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0')) {
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
            std::fs::File::open(&path).and_then(|f| f.take(MAX_DUMP_BYTES + 1).read_to_end(&mut buf)).map_err(|e| e.to_string())?;
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
