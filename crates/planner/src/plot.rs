//! `--plot`: MFU and time to train (or tokens/s without `--tokens`) against GPU count, log scale,
//! for the best layout at each count, as an SVG.

/// One GPU count's best layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// GPUs asked for.
    pub gpus: f64,
    /// MFU, a fraction.
    pub mfu: f64,
    /// Days to train the token budget, or tokens/s when there is none.
    pub second: f64,
    /// The layout, for the label.
    pub label: String,
}

/// Draws the chart into an SVG string. Text needs a system font (through fontconfig); without
/// one the chart is drawn without text rather than not at all (the second value says so).
pub fn svg(title: &str, points: &[Point], second_axis: &str) -> Result<(String, bool), String> {
    let attempt = |text: bool| -> Result<String, String> {
        let mut out = String::new();
        draw(&mut out, title, points, second_axis, text)?;
        Ok(out)
    };
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let with_text = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| attempt(true)));
    let result = match with_text {
        Ok(Ok(s)) => Ok((s, true)),
        _ => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| attempt(false))) {
            Ok(Ok(s)) => Ok((s, false)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("cannot draw the chart".into()),
        },
    };
    std::panic::set_hook(hook);
    result
}

fn draw(out: &mut String, title: &str, points: &[Point], second_axis: &str, text: bool) -> Result<(), String> {
    use plotters::prelude::*;

    if points.is_empty() {
        return Err("no GPU count has a layout that fits: nothing to plot".into());
    }
    let e = |e: DrawingAreaErrorKind<std::io::Error>| e.to_string();
    let x0 = points.iter().map(|p| p.gpus).fold(f64::INFINITY, f64::min).max(1.0);
    let x1 = points.iter().map(|p| p.gpus).fold(0.0, f64::max).max(x0 * 2.0);
    let (lx0, lx1) = (x0.log10() - 0.1, x1.log10() + 0.1);
    let root = SVGBackend::with_string(out, (960, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let root = if text { root.titled(title, ("sans-serif", 22)).map_err(e)? } else { root };
    let (top, bottom) = root.split_vertically(340);
    let blue = RGBColor(31, 119, 180);
    let orange = RGBColor(255, 127, 14);
    let ticks = |x: &f64| {
        let v = 10f64.powf(*x);
        if v >= 1000.0 {
            format!("{:.0}k", v / 1000.0)
        } else {
            format!("{v:.0}")
        }
    };
    let mfu: Vec<(f64, f64)> = points.iter().map(|p| (p.gpus.log10(), 100.0 * p.mfu)).collect();
    let second: Vec<(f64, f64)> = points.iter().map(|p| (p.gpus.log10(), p.second)).collect();
    for (area, series, ylabel, color) in [(&top, mfu, "MFU (%)", blue), (&bottom, second, second_axis, orange)] {
        let ymax = series.iter().map(|p| p.1).fold(0.0, f64::max) * 1.15 + 1e-9;
        let mut b = ChartBuilder::on(area);
        b.margin(16);
        if text {
            b.x_label_area_size(40).y_label_area_size(70);
        }
        let mut chart = b.build_cartesian_2d(lx0..lx1, 0.0..ymax).map_err(e)?;
        if text {
            chart.configure_mesh().x_labels(12).x_label_formatter(&ticks).x_desc("GPUs (log scale)").y_desc(ylabel).draw().map_err(e)?;
        } else {
            let frame = [(lx0, 0.0), (lx1, 0.0), (lx1, ymax), (lx0, ymax), (lx0, 0.0)];
            chart.draw_series(std::iter::once(PathElement::new(frame.to_vec(), BLACK))).map_err(e)?;
        }
        chart.draw_series(LineSeries::new(series.iter().copied(), color.stroke_width(2))).map_err(e)?;
        chart.draw_series(series.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(e)?;
        if text && color == blue {
            let labels = points.iter().zip(&series).map(|(p, &(x, y))| Text::new(p.label.clone(), (x, y), ("sans-serif", 11).into_font()));
            chart.draw_series(labels).map_err(e)?;
        }
    }
    root.present().map_err(e)?;
    Ok(())
}
