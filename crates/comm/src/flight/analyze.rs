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

mod dumpfile;
mod render;

use std::collections::{BTreeMap, BTreeSet};

pub use dumpfile::{load_dir, parse_dump, Dump, GroupDump, Loaded, OpRecord, State};

/// Largest dump file read (a full ring of [`super::MAX_CAPACITY`] operations in a few groups).
pub const MAX_DUMP_BYTES: u64 = 64 << 20;
/// Most `rank_<N>.json` files read from one directory.
pub const MAX_DUMPS: usize = 65_536;
/// An operation in flight this long at the dump is one its rank waits in (shorter: the job was
/// running), as is any operation in flight in a dump the watchdog wrote.
pub const WAITING_NS: u64 = 1_000_000_000;

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
        !self.behind.is_empty() || self.divergence.is_some() || self.progress.iter().any(|p| !p.dump || p.failed.is_some() || p.in_flight.is_some())
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
    let mut p = Progress { rank, group_rank, dump: true, called: 0, started: 0, completed: 0, failed: None, in_flight: None };
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
/// Ranks without a dump that get a line of their own in `look_at`.
const MAX_MISSING_SUSPECTS: usize = 1024;

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
    let mut ordered: BTreeSet<GroupKey> = BTreeSet::new();
    for d in &dumps {
        let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
        let mine = keyed.entry(d.rank).or_default();
        for g in &d.groups {
            let k = seen.entry((g.backend.clone(), g.id.clone())).or_insert(0);
            let key = (g.backend.clone(), g.id.clone(), *k);
            *k += 1;
            if ordered.insert(key.clone()) {
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
    let mut named: BTreeSet<usize> = BTreeSet::new();
    let mut add = |rank: usize, why: String| {
        if named.insert(rank) {
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
        Some(format!(
            "{} {} waiting in {} on group '{}'",
            ranks_phrase(&ranks),
            if ranks.len() == 1 { "was" } else { "were" },
            first.in_flight.as_ref().unwrap().what,
            g.name
        ))
    };
    if !missing.is_empty() {
        let context = groups.iter().find_map(waiting).map(|w| format!(" while {w}")).unwrap_or_default();
        // One line each for the first ranks; the verdict and `missing` name them all.
        for &r in missing.iter().take(MAX_MISSING_SUSPECTS) {
            add(r, format!("left no dump (killed, crashed, or never started){context}"));
        }
    }
    for g in &groups {
        if let Some(d) = &g.divergence {
            let least = d.sides.iter().map(|s| s.ranks.len()).min().unwrap_or(0);
            for side in d.sides.iter().filter(|s| s.ranks.len() == least) {
                let others: Vec<String> =
                    d.sides.iter().filter(|o| o.what != side.what).map(|o| format!("{} called {}", ranks_phrase(&o.ranks), o.what)).collect();
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

#[cfg(test)]
mod tests;
