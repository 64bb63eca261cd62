//! Pictures of a [`Timeline`]: a plain-text grid for the terminal and a self-contained SVG
//! Gantt chart. Only `F`/`B` are drawn; time spent in receives shows as idle.

use std::fmt::Write as _;

use crate::action::{Action, Op};
use crate::timeline::Timeline;

/// One row per rank, one column per time unit: each cell is the compute action occupying that
/// unit (`F0`, `B3`; `2F0` with the stage when v > 1, since a rank then runs several stages)
/// or `.` when the rank computes nothing. An action lasting several units repeats its label.
/// A tick line above marks every 5th unit; a summary line follows.
///
/// Meant for small costs (e.g. f = 1, b = 2): the width grows with the makespan.
pub fn to_text(t: &Timeline) -> String {
    let label = |a: Action| {
        if t.virtual_stages > 1 {
            a.to_string()
        } else {
            format!("{}{}", a.op, a.micro)
        }
    };
    let compute = |r: usize| t.ranks[r].iter().filter(|e| e.action.op.is_compute() && e.end > e.start);
    let width = (0..t.ranks.len()).flat_map(|r| compute(r).map(|e| label(e.action).len())).max().unwrap_or(1);
    let name_width = format!("rank {}", t.ranks.len().saturating_sub(1)).len();
    let prefix = name_width + 3; // "rank r | "
    let makespan = usize::try_from(t.makespan).unwrap_or(usize::MAX);

    // Tick line: the time of every 5th column, when it fits after the previous number.
    let mut ticks = String::new();
    for u in (0..makespan).step_by(5) {
        let col = prefix + u * (width + 1);
        if col >= ticks.len() + usize::from(!ticks.is_empty()) {
            let pad = col - ticks.len();
            let _ = write!(ticks, "{:pad$}{u}", "");
        }
    }
    let mut out = ticks.trim_end().to_string();

    for r in 0..t.ranks.len() {
        let mut cells = vec![".".to_string(); makespan];
        for e in compute(r) {
            for cell in &mut cells[e.start as usize..e.end as usize] {
                *cell = label(e.action);
            }
        }
        let mut row = format!("{:<name_width$} |", format!("rank {r}"));
        for cell in cells {
            let _ = write!(row, " {cell:<width$}");
        }
        out.push('\n');
        out.push_str(row.trim_end());
    }
    let _ = write!(out, "\n{}", summary(t));
    out
}

/// `makespan 18 · bubble 33.3% 33.3% · peak in flight 2 1` (per rank).
pub fn summary(t: &Timeline) -> String {
    let bubbles: Vec<String> = t.bubble.iter().map(|b| format!("{:.1}%", b * 100.0)).collect();
    let peaks: Vec<String> = t.peak_in_flight.iter().map(ToString::to_string).collect();
    format!("makespan {} · bubble {} · peak in flight {}", t.makespan, bubbles.join(" "), peaks.join(" "))
}

/// Forward colours, one per model chunk (cycled past four).
const F_COLORS: [&str; 4] = ["#4e79a7", "#76b7b2", "#59a14f", "#9c755f"];
/// Backward colours, one per model chunk.
const B_COLORS: [&str; 4] = ["#e15759", "#f28e2b", "#b07aa1", "#ff9da7"];

/// A Gantt chart of the timeline as standalone SVG text (no scripts, fonts or links): one row
/// per rank, a box per compute action labelled with its micro-batch (forwards in cool colours,
/// backwards in warm ones, one pair per model chunk with a legend), a time axis below, and a
/// title with the shape, costs and [`summary`]. Each box carries a `<title>` (the action and
/// its interval) that viewers show on hover.
pub fn to_svg(t: &Timeline) -> String {
    const LEFT: f64 = 64.0;
    const TOP: f64 = 44.0;
    const ROW: f64 = 28.0;
    const BOX: f64 = 22.0;
    const RIGHT: f64 = 24.0;
    const AXIS: f64 = 40.0;
    let span = t.makespan.max(1) as f64;
    // Px per time unit: fit about 960 px, but keep boxes readable and tiny charts compact.
    let unit = (960.0 / span).clamp(2.0, 40.0);
    let width = LEFT + span * unit + RIGHT;
    let rows = t.ranks.len() as f64;
    let height = TOP + rows * ROW + AXIS;
    let pp = t.pp.max(1);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="18" font-size="14" font-weight="bold">{} pp={} v={} m={} (f={} b={} comm={})</text>"#,
        t.kind, t.pp, t.virtual_stages, t.microbatches, t.costs.f, t.costs.b, t.costs.comm
    );
    let _ = writeln!(s, r##"<text x="{LEFT}" y="34" fill="#444">{}</text>"##, summary(t));

    for (r, entries) in t.ranks.iter().enumerate() {
        let y = TOP + r as f64 * ROW;
        let shade = if r % 2 == 0 { "#f4f4f4" } else { "#fafafa" };
        let _ = writeln!(s, r#"<rect x="{LEFT}" y="{y:.1}" width="{:.1}" height="{ROW}" fill="{shade}"/>"#, span * unit);
        let _ = writeln!(s, r#"<text x="8" y="{:.1}">rank {r}</text>"#, y + ROW / 2.0 + 4.0);
        for e in entries.iter().filter(|e| e.action.op.is_compute() && e.end > e.start) {
            let chunk = e.action.stage / pp;
            let fill = match e.action.op {
                Op::F => F_COLORS[chunk % F_COLORS.len()],
                _ => B_COLORS[chunk % B_COLORS.len()],
            };
            let x = LEFT + e.start as f64 * unit;
            let w = (e.end - e.start) as f64 * unit;
            let by = y + (ROW - BOX) / 2.0;
            let _ = write!(
                s,
                r#"<g><title>{} [{}, {})</title><rect x="{x:.1}" y="{by:.1}" width="{w:.1}" height="{BOX}" fill="{fill}" stroke="white" stroke-width="1"/>"#,
                e.action, e.start, e.end
            );
            if w >= 12.0 {
                let _ = write!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="white" font-size="{}">{}</text>"#,
                    x + w / 2.0,
                    by + BOX / 2.0 + 4.0,
                    if w >= 20.0 { 11 } else { 9 },
                    e.action.micro
                );
            }
            let _ = writeln!(s, "</g>");
        }
    }

    // Time axis with ticks at a round step at least ~40 px apart.
    let axis_y = TOP + rows * ROW + 4.0;
    let _ = writeln!(s, r##"<line x1="{LEFT}" y1="{axis_y:.1}" x2="{:.1}" y2="{axis_y:.1}" stroke="#333"/>"##, LEFT + span * unit);
    let step = tick_step(unit);
    let mut tick = 0;
    while tick <= t.makespan {
        let x = LEFT + tick as f64 * unit;
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{axis_y:.1}" x2="{x:.1}" y2="{:.1}" stroke="#333"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="10">{tick}</text>"##,
            axis_y + 5.0,
            axis_y + 17.0
        );
        tick += step;
    }
    let _ = writeln!(s, r##"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10" fill="#444">time</text>"##, width - 4.0, axis_y + 30.0);

    // Legend, top right: F/B colours, one pair per model chunk when v > 1.
    let chunks = t.virtual_stages.clamp(1, F_COLORS.len());
    let item = 76.0;
    let lx = (width - RIGHT - chunks as f64 * item).max(LEFT);
    for c in 0..chunks {
        let x = lx + c as f64 * item;
        let name = if chunks == 1 { "F / B".to_string() } else { format!("chunk {c}") };
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="26" width="10" height="10" fill="{}"/><rect x="{:.1}" y="26" width="10" height="10" fill="{}"/><text x="{:.1}" y="35" font-size="10">{name}</text>"#,
            F_COLORS[c],
            x + 11.0,
            B_COLORS[c],
            x + 25.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Smallest of 1, 2, 5, 10, 20, 50, ... time units whose ticks are at least 40 px apart.
fn tick_step(px_per_unit: f64) -> u64 {
    let mut base = 1;
    loop {
        for m in [1, 2, 5] {
            if (base * m) as f64 * px_per_unit >= 40.0 {
                return base * m;
            }
        }
        base *= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{generate, lower, simulate, Costs, Schedule};

    fn timeline(s: &Schedule, costs: Costs) -> Timeline {
        simulate(&lower(s), costs).unwrap()
    }

    #[test]
    fn text_grid_of_gpipe() {
        let t = timeline(&generate::gpipe(2, 2).unwrap(), Costs { f: 1, b: 2, comm: 0 });
        let text = to_text(&t);
        let want = [
            "         0              5",
            "rank 0 | F0 F1 .  .  .  B0 B0 B1 B1",
            "rank 1 | .  F0 F1 B0 B0 B1 B1 .  .",
            "makespan 9 · bubble 33.3% 33.3% · peak in flight 2 2",
        ]
        .join("\n");
        assert_eq!(text, want, "\n{text}");
    }

    #[test]
    fn text_labels_carry_the_stage_when_interleaved() {
        let t = timeline(&generate::interleaved_1f1b(2, 2, 2).unwrap(), Costs { f: 1, b: 1, comm: 0 });
        let text = to_text(&t);
        let row0 = text.lines().nth(1).unwrap();
        assert!(row0.starts_with("rank 0 | 0F0 0F1 2F0"), "{text}");
    }

    #[test]
    fn svg_is_self_contained_and_has_every_box() {
        let s = generate::one_f_one_b(4, 8).unwrap();
        let t = timeline(&s, Costs { f: 1, b: 2, comm: 1 });
        let svg = to_svg(&t);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<title>").count(), 2 * 4 * 8);
        assert_eq!(svg.matches("<g>").count(), svg.matches("</g>").count());
        assert!(svg.contains("<title>3B7 ["), "{svg}");
        assert!(svg.contains(">rank 3</text>"));
        assert!(!svg.contains("href"), "no external references");
        // The axis ends at (or just before) the makespan.
        assert!(svg.contains(&format!(">{}</text>", (t.makespan / tick_step(960.0 / t.makespan as f64)) * tick_step(960.0 / t.makespan as f64))));
    }

    #[test]
    fn empty_timeline_renders() {
        let t = timeline(&generate::gpipe(1, 1).unwrap(), Costs { f: 0, b: 0, comm: 0 });
        assert_eq!(t.makespan, 0);
        assert!(to_svg(&t).ends_with("</svg>\n"));
        assert!(to_text(&t).contains("rank 0 |"));
    }

    #[test]
    fn tick_steps_are_round() {
        assert_eq!(tick_step(40.0), 1);
        assert_eq!(tick_step(20.0), 2);
        assert_eq!(tick_step(9.0), 5);
        assert_eq!(tick_step(2.0), 20);
    }
}
