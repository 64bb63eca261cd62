//! What rank 0 shows and writes: progress, atomic files, the bandwidth plot.

use super::*;
use crate::files::{write_bytes, write_via};
// ---------------------------------------------------------------------------------------------
// Progress (rank 0, on a terminal only)

pub(super) struct Progress(Option<ProgressBar>);

impl Progress {
    pub(super) fn new(rank0: bool, sizes: u64) -> Progress {
        if !rank0 {
            return Progress(None);
        }
        let target = ProgressDrawTarget::stderr();
        if target.is_hidden() {
            return Progress(None);
        }
        let bar = ProgressBar::with_draw_target(Some(sizes), target);
        bar.set_style(
            ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} sizes [{elapsed_precise}] {msg}")
                .expect("valid template")
                .progress_chars("█▉▊▋▌▍▎▏ "),
        );
        Progress(Some(bar))
    }
    pub(super) fn start(&self, bytes: u64) {
        if let Some(b) = &self.0 {
            b.set_message(human(bytes));
        }
    }
    pub(super) fn done(&self) {
        if let Some(b) = &self.0 {
            b.inc(1);
        }
    }
    pub(super) fn println(&self, s: &str) {
        match &self.0 {
            Some(b) => b.suspend(|| println!("{s}")),
            None => println!("{s}"),
        }
    }
    pub(super) fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Output files

/// What the chart shows, whatever the backend.
pub(super) struct Chart<'a> {
    title: String,
    x: (f64, f64),
    ymax: f64,
    n_labels: usize,
    fab: Vec<(f64, f64)>,
    raw: Vec<(f64, f64)>,
    label: &'a dyn Fn(&f64) -> String,
}

/// Bus bandwidth (fabbrica, and the raw baseline when there is one) against message size, on a
/// log2 x axis. Text needs a system font (through fontconfig); without one the chart is drawn
/// without text rather than not at all, and says so on stdout.
pub(super) fn plot(path: &Path, rows: &[Row], plan: &Plan, n: usize) -> std::result::Result<(), String> {
    use plotters::prelude::*;

    let png = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
    let size = (960u32, 600u32);
    let fab: Vec<(f64, f64)> = rows.iter().map(|r| ((r.bytes as f64).log2(), r.busbw)).collect();
    let raw: Vec<(f64, f64)> = rows.iter().filter_map(|r| r.raw_busbw.map(|b| ((r.bytes as f64).log2(), b))).collect();
    let (mut x0, mut x1) = (fab[0].0, fab[fab.len() - 1].0);
    if x1 - x0 < 1.0 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    let ymax = fab.iter().chain(raw.iter()).map(|p| p.1).fold(0.0, f64::max);
    let label = |x: &f64| {
        let r = x.round();
        if (x - r).abs() < 1e-6 && r >= 0.0 {
            human(1u64 << (r as u32))
        } else {
            String::new()
        }
    };
    let chart = Chart {
        title: format!("{} {}, {}, {} backend: bus bandwidth", plan.op.name(), plan.dtype, ranks(n), if plan.nccl { "nccl" } else { "mpi" }),
        x: (x0, x1),
        ymax: if ymax > 0.0 { ymax * 1.1 } else { 1.0 },
        n_labels: ((x1 - x0).round() as usize + 1).min(30),
        fab,
        raw,
        label: &label,
    };

    pub(super) fn draw<DB: DrawingBackend>(root: DrawingArea<DB, plotters::coord::Shift>, c: &Chart, text: bool) -> std::result::Result<(), String>
    where
        DB::ErrorType: 'static,
    {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(16);
        if text {
            builder.caption(&c.title, ("sans-serif", 22)).x_label_area_size(48).y_label_area_size(64);
        }
        let mut chart = builder.build_cartesian_2d(c.x.0..c.x.1, 0.0..c.ymax).map_err(e)?;
        if text {
            chart
                .configure_mesh()
                .x_labels(c.n_labels)
                .x_label_formatter(c.label)
                .x_desc("message size (bytes, log2 scale)")
                .y_desc("bus bandwidth (GB/s)")
                .draw()
                .map_err(e)?;
        } else {
            // The mesh looks its label font up even with no labels: a plain frame instead.
            let frame = [(c.x.0, 0.0), (c.x.1, 0.0), (c.x.1, c.ymax), (c.x.0, c.ymax), (c.x.0, 0.0)];
            chart.draw_series(std::iter::once(PathElement::new(frame.to_vec(), BLACK))).map_err(e)?;
        }
        let blue = RGBColor(31, 119, 180);
        let orange = RGBColor(255, 127, 14);
        for (points, color, name) in [(&c.fab, blue, "fabbrica"), (&c.raw, orange, "raw MPI (rsmpi)")] {
            if points.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
                .map_err(e)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(e)?;
        }
        if text {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(e)?;
        }
        root.present().map_err(e)
    }

    // One attempt: draw, then put the file in place atomically.
    let attempt = |text: bool| -> std::result::Result<(), String> {
        if png {
            write_via(path, |tmp| draw(BitMapBackend::new(tmp, size).into_drawing_area(), &chart, text))
        } else {
            let mut svg = String::new();
            draw(SVGBackend::with_string(&mut svg, size).into_drawing_area(), &chart, text)?;
            write_bytes(path, svg.as_bytes()).map_err(|e| format!("cannot write: {e}"))
        }
    };
    // Font lookup fails with an error, or (fontconfig missing, loaded at run time) with a panic:
    // both mean "no text", silently.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let with_text = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| attempt(true)));
    std::panic::set_hook(hook);
    match with_text {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.starts_with("cannot write") => Err(e),
        failed => {
            let why = match failed {
                Ok(Err(e)) => e,
                _ => "fontconfig is not available".into(),
            };
            let hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(|_| {}));
            let plain = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| attempt(false)));
            std::panic::set_hook(hook);
            plain.unwrap_or_else(|_| Err(format!("cannot draw the chart ({why})")))?;
            println!("# plot {}: drawn without text (no usable font: {why})", path.display());
            Ok(())
        }
    }
}
