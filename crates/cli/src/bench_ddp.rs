//! `fabbrica bench ddp`: what data parallelism costs. Run alone for the overhead of the DDP step
//! against the plain trainer step; under `mpirun -np N` for communication efficiency (the step
//! with gradient communication against the same step with it switched off), overlap on and off.

use std::path::PathBuf;

use clap::Args;
use fabbrica_train::bench::{run_ddp, DdpBenchResult};

use crate::commands::{ConfigArgs, Failure};

#[derive(Args)]
pub struct DdpArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Timed steps per mode per round.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps per mode before the first round.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Rounds; modes are interleaved within each round and the median round is reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Also write the result as JSON to this file (rank 0).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

fn user(message: String) -> Failure {
    Failure { user: true, message }
}

pub fn run(a: DdpArgs) -> Result<(), Failure> {
    if a.steps == 0 || a.rounds == 0 {
        return Err(user("--steps and --rounds must be at least 1".into()));
    }
    let cfg = fabbrica_train::Config::resolve(a.cfg.preset.as_deref(), a.cfg.config.as_deref(), &a.cfg.sets)?;
    // Rank 0 writes the results; under mpirun its early exit ends the job.
    if fabbrica_comm::launch::detect().is_ok_and(|l| l.rank == 0) {
        crate::files::check_outputs(&[("--json", a.json.as_deref())])?;
    }
    let world = fabbrica_comm::init(fabbrica_train::comm_options(&cfg)?).map_err(|e| user(e.to_string()))?;
    let launch = world.launch();
    let r = run_ddp(&cfg, world.comm(), (launch.local_rank, launch.local_world_size), a.steps, a.warmup, a.rounds)?;
    if world.rank() == 0 {
        print(&r, &cfg);
        if let Some(path) = &a.json {
            let text = serde_json::to_string_pretty(&r).expect("serializes");
            crate::files::write_bytes(path, text.as_bytes()).map_err(|e| user(format!("cannot write --json {}: {e}", path.display())))?;
        }
    }
    Ok(())
}

fn print(r: &DdpBenchResult, cfg: &fabbrica_train::Config) {
    println!(
        "# {} ranks, {}, {} parameters, micro-batch {} x {} tokens per rank, {} buckets (bucket_mb {}), reduce {}{}",
        r.world_size,
        r.device,
        r.params,
        r.batch,
        r.block,
        r.buckets,
        cfg.parallel.bucket_mb,
        cfg.parallel.reduce_dtype,
        if cfg.parallel.zero == 1 { ", ZeRO-1" } else { "" }
    );
    println!("# median of {} rounds of {} steps; step time is the slowest rank's", r.rounds, r.steps);
    let base = r.mode("no-comm").map(|m| m.step_ms);
    println!("{:>12} {:>10} {:>12} {:>14} {:>9}", "mode", "step ms", "tokens/s", "vs no-comm", "spread");
    for m in &r.modes {
        let ratio = match (base, m.mode.as_str()) {
            (Some(b), "overlap" | "no-overlap") => format!("{:.3}", b / m.step_ms),
            _ => "-".into(),
        };
        let (lo, hi) = m.rounds_ms.iter().fold((f64::MAX, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        println!("{:>12} {:>10.2} {:>12.0} {:>14} {:>8.1}%", m.mode, m.step_ms, m.tokens_per_s, ratio, 100.0 * (hi - lo) / m.step_ms);
    }
    if let (Some(p), Some(o)) = (r.mode("plain"), r.mode("overlap")) {
        println!(
            "DDP overhead at world size 1: {:+.2}% step time (overlap {:.2} ms vs plain {:.2} ms)",
            100.0 * (o.step_ms / p.step_ms - 1.0),
            o.step_ms,
            p.step_ms
        );
    }
    if let (Some(b), Some(o), Some(s)) = (base, r.mode("overlap"), r.mode("no-overlap")) {
        println!("communication efficiency: overlap {:.3}, no overlap {:.3} (no-comm step time / step time)", b / o.step_ms, b / s.step_ms);
    }
}

/// `fabbrica bench scaling`: a weak-scaling table and plot from `bench ddp --json` results at
/// several world sizes (`scripts/scaling.sh` runs the sweep).
#[derive(Args)]
pub struct ScalingArgs {
    /// `bench ddp --json` files, one per world size; one of them must be world size 1.
    #[arg(long, num_args = 1.., required = true, value_name = "FILE.json")]
    pub inputs: Vec<PathBuf>,
    /// Write the table (Markdown) here as well as to stdout.
    #[arg(long, value_name = "FILE.md")]
    pub table: Option<PathBuf>,
    /// Plot tokens/s and efficiency against world size (.svg or .png).
    #[arg(long, value_name = "FILE.svg|png")]
    pub plot: Option<PathBuf>,
}

struct Point {
    n: usize,
    tps: f64,
    eff: f64,
    comm_eff: Option<f64>,
}

pub fn scaling(a: ScalingArgs) -> Result<(), Failure> {
    if let Some(p) = &a.plot {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        if ext != "svg" && ext != "png" {
            return Err(user(format!("--plot {}: use a file name ending in .svg or .png", p.display())));
        }
    }
    let mut pts: Vec<(usize, f64, Option<f64>)> = Vec::new();
    for f in &a.inputs {
        let text = fabbrica_data::bounded::read_to_string(f, crate::files::MAX_INPUT_BYTES)
            .map_err(|e| user(format!("cannot read --inputs {}: {e}", f.display())))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| user(format!("--inputs {} is not JSON from `fabbrica bench ddp --json`: {e}", f.display())))?;
        let n = v["world_size"]
            .as_u64()
            .ok_or_else(|| user(format!("--inputs {}: no world_size; give files from `fabbrica bench ddp --json`", f.display())))?
            as usize;
        let mode = |m: &str| v["modes"].as_array().and_then(|ms| ms.iter().find(|x| x["mode"] == m)).cloned();
        let o = mode("overlap").ok_or_else(|| user(format!("--inputs {}: no overlap mode", f.display())))?;
        let tps = o["tokens_per_s"].as_f64().unwrap_or(0.0);
        let comm_eff = mode("no-comm").and_then(|b| Some(b["step_ms"].as_f64()? / o["step_ms"].as_f64()?));
        pts.push((n, tps, comm_eff));
    }
    pts.sort_by_key(|p| p.0);
    let x1 = pts
        .iter()
        .find(|p| p.0 == 1)
        .map(|p| p.1)
        .ok_or_else(|| user("--inputs needs a world-size-1 result (efficiency is X(N) / (N * X(1)))".into()))?;
    let points: Vec<Point> = pts.iter().map(|&(n, tps, c)| Point { n, tps, eff: tps / (n as f64 * x1), comm_eff: c }).collect();
    let mut table =
        String::from("| ranks | tokens/s | ideal N·X(1) | efficiency X(N)/(N·X(1)) | comm efficiency (no-comm/comm) |\n|---:|---:|---:|---:|---:|\n");
    for p in &points {
        table += &format!(
            "| {} | {:.0} | {:.0} | {:.3} | {} |\n",
            p.n,
            p.tps,
            p.n as f64 * x1,
            p.eff,
            p.comm_eff.map(|c| format!("{c:.3}")).unwrap_or_else(|| "-".into())
        );
    }
    print!("{table}");
    if let Some(t) = &a.table {
        crate::files::write_bytes(t, table.as_bytes()).map_err(|e| user(format!("cannot write --table {}: {e}", t.display())))?;
    }
    if let Some(p) = &a.plot {
        use plotters::prelude::IntoDrawingArea;
        let png = p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
        crate::files::write_via(p, |tmp| {
            if png {
                draw_scaling(plotters::prelude::BitMapBackend::new(tmp, (900, 700)).into_drawing_area(), &points, x1)
            } else {
                draw_scaling(plotters::prelude::SVGBackend::new(tmp, (900, 700)).into_drawing_area(), &points, x1)
            }
        })
        .map_err(|e| Failure { user: false, message: format!("cannot draw --plot {}: {e}", p.display()) })?;
    }
    Ok(())
}

fn draw_scaling<DB: plotters::prelude::DrawingBackend>(
    root: plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
    pts: &[Point],
    x1: f64,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    use plotters::prelude::*;
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let (top, bottom) = root.split_vertically(380);
    let nmax = pts.iter().map(|p| p.n).max().unwrap_or(1) as f64;
    let blue = RGBColor(31, 119, 180);
    let grey = RGBColor(150, 150, 150);
    let ymax = pts.iter().map(|p| p.tps).fold(nmax * x1, f64::max) * 1.1;
    let mut c = ChartBuilder::on(&top)
        .caption("weak scaling: tokens/s (all ranks)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0.5..nmax + 0.5, 0.0..ymax)
        .map_err(e)?;
    c.configure_mesh().x_desc("ranks").y_desc("tokens/s").draw().map_err(e)?;
    c.draw_series(LineSeries::new(pts.iter().map(|p| (p.n as f64, p.n as f64 * x1)), grey.stroke_width(1)))
        .map_err(e)?
        .label("ideal N·X(1)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey));
    c.draw_series(LineSeries::new(pts.iter().map(|p| (p.n as f64, p.tps)), blue.stroke_width(2)))
        .map_err(e)?
        .label("measured")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2)));
    c.draw_series(pts.iter().map(|p| Circle::new((p.n as f64, p.tps), 4, blue.filled()))).map_err(e)?;
    c.configure_series_labels().position(SeriesLabelPosition::UpperLeft).border_style(BLACK).background_style(WHITE.mix(0.85)).draw().map_err(e)?;
    let mut c = ChartBuilder::on(&bottom)
        .caption("efficiency X(N) / (N·X(1))", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0.5..nmax + 0.5, 0.0..1.2)
        .map_err(e)?;
    c.configure_mesh().x_desc("ranks").y_desc("efficiency").draw().map_err(e)?;
    c.draw_series(LineSeries::new(pts.iter().map(|p| (p.n as f64, p.eff)), blue.stroke_width(2))).map_err(e)?;
    c.draw_series(pts.iter().map(|p| Circle::new((p.n as f64, p.eff), 4, blue.filled()))).map_err(e)?;
    root.present().map_err(e)
}
