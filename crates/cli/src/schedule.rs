//! `fabbrica schedule`: a pipeline schedule as data, before anything runs. Prints each rank's
//! action list (compute only, or lowered with its sends and receives), dry-runs every rank
//! under per-action costs, and shows the timeline, makespan, bubble and peak activations in
//! flight per rank; optionally an SVG Gantt chart and a JSON summary for sweeps.

use std::path::PathBuf;

use fabbrica_pipeline::{lower, simulate, summary, to_svg, to_text, Costs, Kind, Schedule, KEY_SCHEDULE, MAX_COST};

use crate::commands::Failure;

/// A timeline wider than this many time units is not drawn in the terminal (use --svg).
const MAX_TEXT_UNITS: u64 = 160;

#[derive(clap::Args)]
pub struct ScheduleArgs {
    /// gpipe, 1f1b (Megatron's non-interleaved) or interleaved (Megatron's interleaved 1F1B)
    #[arg(long, default_value = "1f1b")]
    pub schedule: String,
    /// Pipeline ranks
    #[arg(long)]
    pub pp: usize,
    /// Micro-batches per optimizer step
    #[arg(long)]
    pub microbatches: usize,
    /// Model chunks per rank (interleaved only; default 2 there, else 1)
    #[arg(long)]
    pub virtual_stages: Option<usize>,
    /// Time units of one forward, one backward and one transfer, per stage: F,B,COMM (each at
    /// most 1000000000)
    #[arg(long, default_value = "1,2,0", value_name = "F,B,COMM")]
    pub costs: String,
    /// Print the lists with their sends and receives (SEND_F, RECV_F, SEND_B, RECV_B)
    #[arg(long)]
    pub lowered: bool,
    /// Also draw the timeline as an SVG Gantt chart into this file
    #[arg(long, value_name = "FILE.svg")]
    pub svg: Option<PathBuf>,
    /// Also write the lists and the simulated figures as JSON into this file
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

fn user(message: String) -> Failure {
    Failure { user: true, message }
}

/// F,B,COMM in whole time units: F and B from 1, COMM from 0, each at most [`MAX_COST`] (so the
/// simulated times, the ideal time and the bubble are exact: nothing near `u64::MAX`).
fn parse_costs(text: &str) -> Result<Costs, Failure> {
    // u128: a number past u64::MAX is still a number, refused below for its size.
    let parts: Vec<Option<u128>> = text.split(',').map(|p| p.trim().parse().ok()).collect();
    let [Some(f), Some(b), Some(comm)] = parts[..] else {
        return Err(user(format!("--costs '{text}' is not F,B,COMM in whole time units with F and B at least 1; e.g. --costs 1,2,0")));
    };
    if let Some((name, value)) = [("F", f), ("B", b), ("COMM", comm)].into_iter().find(|&(_, v)| v > u128::from(MAX_COST)) {
        return Err(user(format!(
            "--costs '{text}': {name} = {value} is more than {MAX_COST} time units, the most one action may cost; \
             use a coarser unit, e.g. --costs 1,2,0"
        )));
    }
    if f == 0 || b == 0 {
        return Err(user(format!("--costs '{text}' is not F,B,COMM in whole time units with F and B at least 1; e.g. --costs 1,2,0")));
    }
    // Each at most MAX_COST, which fits in a u64.
    Ok(Costs { f: f as u64, b: b as u64, comm: comm as u64 })
}

pub fn run(a: ScheduleArgs) -> Result<(), Failure> {
    let kind: Kind = a.schedule.parse().map_err(|e: fabbrica_pipeline::ScheduleError| user(format!("{KEY_SCHEDULE} {e}")))?;
    let v = a.virtual_stages.unwrap_or(if kind == Kind::Interleaved1F1B { 2 } else { 1 });
    let costs = parse_costs(&a.costs)?;
    let compute = Schedule::new(kind, a.pp, v, a.microbatches).map_err(|e| user(e.to_string()))?;
    let lowered = lower(&compute);
    // Generated schedules never deadlock (the crate's tests simulate every shape), and bounded
    // costs on a bounded shape never overflow: either here is a bug, not an input error.
    let timeline =
        simulate(&lowered, costs).map_err(|e| Failure { user: false, message: format!("the generated schedule does not simulate: {e}") })?;
    let shown = if a.lowered { &lowered } else { &compute };
    println!("{shown}");
    println!("costs: f={} b={} comm={} per stage", costs.f, costs.b, costs.comm);
    if timeline.makespan <= MAX_TEXT_UNITS {
        println!("\n{}", to_text(&timeline));
    } else {
        println!("{} (timeline of {} units not drawn: use --svg)", summary(&timeline), timeline.makespan);
    }
    // No overflow: F + B ≤ 2·MAX_COST and m·v ≤ MAX_ACTIONS / 2 (parse_costs and Schedule::new
    // checked both), and the makespan is at least each rank's compute time, this ideal.
    let ideal = (costs.f + costs.b) * (a.microbatches * v) as u64;
    println!("ideal {ideal} units of compute per rank; bubble overhead {:.1}% of ideal", 100.0 * (timeline.makespan - ideal) as f64 / ideal as f64);
    if let Some(path) = &a.svg {
        write_file(path, to_svg(&timeline).as_bytes())?;
        println!("svg: {}", path.display());
    }
    if let Some(path) = &a.json {
        let text = |s: &Schedule| -> Vec<Vec<String>> { s.ranks.iter().map(|r| r.iter().map(ToString::to_string).collect()).collect() };
        let doc = serde_json::json!({
            "schedule": kind.name(),
            "pp": a.pp,
            "virtual_stages": v,
            "microbatches": a.microbatches,
            "costs": {"f": costs.f, "b": costs.b, "comm": costs.comm},
            "makespan": timeline.makespan,
            "ideal": ideal,
            "bubble": timeline.bubble,
            "peak_in_flight": timeline.peak_in_flight,
            "ranks": text(&compute),
            "lowered": text(&lowered),
        });
        let body = serde_json::to_string_pretty(&doc).expect("plain JSON values") + "\n";
        write_file(path, body.as_bytes())?;
        println!("json: {}", path.display());
    }
    Ok(())
}

fn write_file(path: &std::path::Path, bytes: &[u8]) -> Result<(), Failure> {
    crate::files::write_bytes(path, bytes).map_err(|e| user(format!("cannot write {} ({e}): choose a writable path", path.display())))
}
