//! The report as one screen of text, or as JSON.

use super::super::json;
use super::*;

/// Groups shown in detail in the text report; the rest are counted.
const TEXT_GROUPS: usize = 6;
const TEXT_WIDTH: usize = 150;

impl Report {
    /// About one screen: the dumps, each group with an issue, and the ranks to look at.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        o.push_str(&format!("flight recorder dumps in {}: {} of {} ranks\n", self.dir, self.dumps.len(), self.world_size));
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
            o.push_str(&format!("group '{}' ({}, {} ranks: world {}), collectives:\n", g.name, g.backend, g.members.len(), rank_list(&g.members)));
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
                o.push_str(&format!("  {ranks:<12} {:>7} {:>8} {:>10}  {}\n", n(called), n(started), n(completed), cut(&now, TEXT_WIDTH - 45)));
            }
            if rows.len() > 10 {
                o.push_str(&format!("  ... {} more rows (see --json)\n", rows.len() - 10));
            }
            match &g.divergence {
                Some(d) => {
                    let sides: Vec<String> = d.sides.iter().map(|s| format!("{} called {}", ranks_phrase(&s.ranks), s.what)).collect();
                    o.push_str(&format!("  diverged at collective #{}: {}\n", d.seq, cut(&sides.join("; "), TEXT_WIDTH)));
                }
                None if g.compared.1 > 0 => {
                    o.push_str(&format!("  diverged: no (collectives #{}-#{} agree on every rank that recorded them)\n", g.compared.0, g.compared.1))
                }
                None => o.push_str("  diverged: nothing to compare (no collective recorded by two ranks)\n"),
            }
            match &g.not_called {
                Some((s, what)) => o.push_str(&format!("  behind: {} (never called collective #{s}: {what})\n", ranks_phrase(&g.behind))),
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
        o.push_str(&self.set_aside.iter().map(|(r, w)| format!("{{\"rank\":{r},\"why\":{}}}", q(w))).collect::<Vec<_>>().join(","));
        o.push_str("],\"unreadable\":[");
        o.push_str(&self.unreadable.iter().map(|(f, w)| format!("{{\"file\":{},\"error\":{}}}", q(f), q(w))).collect::<Vec<_>>().join(","));
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
        o.push_str(&self.look_at.iter().map(|s| format!("{{\"rank\":{},\"why\":{}}}", s.rank, q(&s.why))).collect::<Vec<_>>().join(","));
        o.push_str(&format!("],\"verdict\":{}}}\n", q(&self.verdict)));
        o
    }
}
