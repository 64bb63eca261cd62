//! `fabbrica bench pipeline`: a table and a plot of pipeline runs (`fabbrica train` with
//! `parallel.pp > 1`, see scripts/pipeline_bench.sh): each run's layout, tokens/s, step time, and
//! the measured bubble (each stage's idle fraction while its schedule runs, from the executor's
//! trace, mean over stages and log intervals after the first) against the theory
//! (p-1)/(m+p-1) of GPipe and 1F1B, divided by v for interleaving.

use std::path::PathBuf;

use clap::Args;
use fabbrica_train::metrics::read;
use fabbrica_train::Config;

use crate::commands::Failure;

#[derive(Args)]
pub struct PipelineArgs {
    /// Run directories (`run.out_dir`) of `fabbrica train`, each with config.toml and metrics.jsonl.
    #[arg(long, num_args = 1.., required = true, value_name = "DIR")]
    pub runs: Vec<PathBuf>,
    /// Write the table (Markdown) here as well as to stdout.
    #[arg(long, value_name = "FILE.md")]
    pub table: Option<PathBuf>,
    /// Plot measured against theoretical bubble, and tokens/s, per run (.svg or .png).
    #[arg(long, value_name = "FILE.svg|png")]
    pub plot: Option<PathBuf>,
}

fn user(message: String) -> Failure {
    Failure { user: true, message }
}

struct Row {
    name: String,
    pp: usize,
    dp: usize,
    v: usize,
    m: usize,
    schedule: String,
    tps: f64,
    step_ms: f64,
    bubble: Option<f64>,
    theory: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

pub fn run(a: PipelineArgs) -> Result<(), Failure> {
    if let Some(p) = &a.plot {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        if ext != "svg" && ext != "png" {
            return Err(user(format!("--plot {}: use a file name ending in .svg or .png", p.display())));
        }
    }
    let mut rows = Vec::new();
    for dir in &a.runs {
        let cfg_path = dir.join("config.toml");
        let text = fabbrica_data::bounded::read_to_string(&cfg_path, fabbrica_train::config::MAX_CONFIG_BYTES).map_err(|e| {
            user(format!("--runs {}: cannot read {} ({e}): give run directories of `fabbrica train`", dir.display(), cfg_path.display()))
        })?;
        let cfg: Config = toml::from_str(&text)
            .map_err(|e| user(format!("{}: not a fabbrica config: {}", cfg_path.display(), e.to_string().lines().next().unwrap_or(""))))?;
        let recs = read(&dir.join("metrics.jsonl")).map_err(|e| user(format!("--runs {}: {e}", dir.display())))?;
        // The first interval holds start-up (allocator, first NCCL/MPI messages): left out.
        let train: Vec<_> = recs.iter().filter(|r| r.kind == "train").skip(1).collect();
        if train.is_empty() {
            return Err(user(format!(
                "--runs {}: fewer than 2 logged training intervals: run more steps or lower train.log_interval",
                dir.display()
            )));
        }
        let (pp, v, m) = (cfg.parallel.pp, cfg.parallel.virtual_stages, cfg.train.grad_accum);
        let world = train[0].stragglers.as_ref().map(|s| s.compute_ms.len()).unwrap_or(1);
        let dp = if cfg.parallel.dp > 0 { cfg.parallel.dp } else { world / pp.max(1) };
        let bubbles: Vec<f64> =
            train.iter().filter_map(|r| r.pipeline.as_ref()).map(|p| p.iter().map(|s| s.bubble).sum::<f64>() / p.len().max(1) as f64).collect();
        let (p, mf) = (pp as f64, m as f64);
        rows.push(Row {
            name: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            pp,
            dp,
            v,
            m,
            schedule: if pp > 1 { cfg.parallel.schedule.to_string() } else { "-".into() },
            tps: median(train.iter().filter_map(|r| r.tokens_per_s).collect()),
            step_ms: median(train.iter().filter_map(|r| r.step_ms).collect()),
            bubble: (!bubbles.is_empty()).then(|| bubbles.iter().sum::<f64>() / bubbles.len() as f64),
            theory: (pp > 1)
                .then(|| (p - 1.0) / (mf + p - 1.0) / if cfg.parallel.schedule == fabbrica_pipeline::Kind::Interleaved1F1B { v as f64 } else { 1.0 }),
        });
    }
    let mut table = String::from("| run | pp × dp | schedule | v | micro-batches | tokens/s | step ms | measured bubble | theory | measured / theory |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in &rows {
        let pct = |x: Option<f64>| x.map(|b| format!("{:.1}%", 100.0 * b)).unwrap_or_else(|| "-".into());
        let ratio = match (r.bubble, r.theory) {
            (Some(b), Some(t)) if t > 0.0 => format!("{:.2}", b / t),
            _ => "-".into(),
        };
        table += &format!(
            "| {} | {} × {} | {} | {} | {} | {:.0} | {:.1} | {} | {} | {ratio} |\n",
            r.name,
            r.pp,
            r.dp,
            r.schedule,
            r.v,
            r.m,
            r.tps,
            r.step_ms,
            pct(r.bubble),
            pct(r.theory)
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
                draw(plotters::prelude::BitMapBackend::new(tmp, (1000, 760)).into_drawing_area(), &rows)
            } else {
                draw(plotters::prelude::SVGBackend::new(tmp, (1000, 760)).into_drawing_area(), &rows)
            }
        })
        .map_err(|e| Failure { user: false, message: format!("cannot draw --plot {}: {e}", p.display()) })?;
    }
    Ok(())
}

fn draw<DB: plotters::prelude::DrawingBackend>(root: plotters::prelude::DrawingArea<DB, plotters::coord::Shift>, rows: &[Row]) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    use plotters::prelude::*;
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let (top, bottom) = root.split_vertically(380);
    let n = rows.len() as f64;
    let blue = RGBColor(31, 119, 180);
    let grey = RGBColor(160, 160, 160);
    let names: Vec<String> = rows.iter().map(|r| r.name.clone()).collect();
    let label = move |x: &f64| names.get(x.round() as usize).cloned().unwrap_or_default();
    let ymax = rows.iter().flat_map(|r| [r.bubble.unwrap_or(0.0), r.theory.unwrap_or(0.0)]).fold(0.1, f64::max) * 1.2;
    let mut c = ChartBuilder::on(&top)
        .caption("pipeline bubble: measured (blue) against (p-1)/(m+p-1)/v (grey)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..n - 0.5, 0.0..ymax)
        .map_err(e)?;
    c.configure_mesh().x_labels(rows.len().max(1)).x_label_formatter(&label).y_desc("idle fraction").draw().map_err(e)?;
    c.draw_series(
        rows.iter().enumerate().filter_map(|(i, r)| r.theory.map(|t| Rectangle::new([(i as f64 - 0.35, 0.0), (i as f64, t)], grey.filled()))),
    )
    .map_err(e)?;
    c.draw_series(
        rows.iter().enumerate().filter_map(|(i, r)| r.bubble.map(|b| Rectangle::new([(i as f64, 0.0), (i as f64 + 0.35, b)], blue.filled()))),
    )
    .map_err(e)?;
    let tmax = rows.iter().map(|r| r.tps).fold(1.0, f64::max) * 1.2;
    let names: Vec<String> = rows.iter().map(|r| r.name.clone()).collect();
    let label = move |x: &f64| names.get(x.round() as usize).cloned().unwrap_or_default();
    let mut c = ChartBuilder::on(&bottom)
        .caption("throughput (tokens/s, all ranks)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..n - 0.5, 0.0..tmax)
        .map_err(e)?;
    c.configure_mesh().x_labels(rows.len().max(1)).x_label_formatter(&label).y_desc("tokens/s").draw().map_err(e)?;
    c.draw_series(rows.iter().enumerate().map(|(i, r)| Rectangle::new([(i as f64 - 0.3, 0.0), (i as f64 + 0.3, r.tps)], blue.filled())))
        .map_err(e)?;
    root.present().map_err(e)
}
