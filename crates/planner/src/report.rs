//! What the planner prints and writes: the table of best layouts, one layout's whole breakdown
//! (`--explain`), the cost to train a token budget, and every figure as JSON.

use serde::Serialize;
use serde_json::{json, Value};

use crate::cluster::{Cluster, GIB};
use crate::estimate::Estimate;
use crate::failures::{resilience, Resilience};
use crate::model::ModelShape;

/// Time, GPU-hours, energy and cost to train a token budget on one layout, failures included.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TrainCost {
    /// Tokens to train on.
    pub tokens: f64,
    /// Wall-clock seconds, including checkpoints, restarts and lost work.
    pub time_s: f64,
    /// GPU-hours of the GPUs the layout uses.
    pub gpu_hours: f64,
    /// Facility energy, MWh (GPUs' power × PUE).
    pub energy_mwh: f64,
    /// GPU-hours × price.
    pub cost: f64,
    /// Checkpoint interval and goodput.
    pub resilience: Resilience,
}

/// The cost of training `tokens` tokens with layout `e` on cluster `c`.
pub fn train_cost(e: &Estimate, c: &Cluster, tokens: f64) -> TrainCost {
    let useful_s = tokens / e.tokens_per_s;
    let r = resilience(c, e.gpus, useful_s);
    let time_s = useful_s / r.goodput.max(1e-12);
    let gpu_hours = time_s / 3600.0 * e.gpus as f64;
    TrainCost { tokens, time_s, gpu_hours, energy_mwh: gpu_hours * c.power_w * c.pue / 1e6, cost: gpu_hours * c.price_per_gpu_hour, resilience: r }
}

/// A duration in the largest unit that keeps it readable.
pub fn human_time(s: f64) -> String {
    match s {
        s if s < 1.0 => format!("{:.1} ms", s * 1e3),
        s if s < 120.0 => format!("{s:.2} s"),
        s if s < 7200.0 => format!("{:.1} min", s / 60.0),
        s if s < 3.0 * 86400.0 => format!("{:.1} h", s / 3600.0),
        s => format!("{:.1} days", s / 86400.0),
    }
}

fn pct(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        100.0 * part / whole
    } else {
        0.0
    }
}

/// The header of [`row`].
pub fn header(with_tokens: bool) -> String {
    let mut h = format!(
        "{:>3}  {:>3} {:>3} {:>5} {:>2} {:>3} {:<9} {:>4} {:>6}  {:>9}  {:>7} {:>5} {:>5} {:>5} {:>6}  {:>11} {:>6}  {:>7} {:>6} {:>6} {:>6} {:>6}",
        "#",
        "tp",
        "pp",
        "dp",
        "v",
        "mb",
        "recompute",
        "zero",
        "gpus",
        "step",
        "compute",
        "tp",
        "pp",
        "dp",
        "bubble",
        "tokens/s",
        "mfu",
        "mem GiB",
        "wts",
        "grads",
        "optim",
        "acts"
    );
    if with_tokens {
        h.push_str(&format!("  {:>10} {:>10} {:>8} {:>10}", "time", "GPU-hours", "MWh", "cost"));
    }
    h
}

/// One line of the table: layout, step time and its split (% of the step), throughput, MFU,
/// memory (GiB), and the cost to train when asked.
pub fn row(i: usize, e: &Estimate, cost: Option<&TrainCost>) -> String {
    let l = &e.layout;
    let g = |b: f64| b / GIB;
    let mut s = format!(
        "{:>3}  {:>3} {:>3} {:>5} {:>2} {:>3} {:<9} {:>4} {:>6}  {:>9}  {:>6.1}% {:>4.1}% {:>4.1}% {:>4.1}% {:>5.1}%  {:>11.0} {:>5.1}%  {:>7.1} {:>6.1} {:>6.1} {:>6.1} {:>6.1}",
        i,
        l.tp,
        l.pp,
        l.dp,
        l.v,
        l.mb,
        l.recompute.as_str(),
        l.zero,
        e.gpus,
        human_time(e.step_s),
        pct(e.compute_s, e.step_s),
        pct(e.tp_s, e.step_s),
        pct(e.pp_s, e.step_s),
        pct(e.dp_s, e.step_s),
        pct(e.bubble_s, e.step_s),
        e.tokens_per_s,
        100.0 * e.mfu,
        g(e.memory.total()),
        g(e.memory.weights),
        g(e.memory.grads),
        g(e.memory.optimizer),
        g(e.memory.activations),
    );
    if let Some(c) = cost {
        s.push_str(&format!("  {:>10} {:>10.3e} {:>8.1} {:>10.3e}", human_time(c.time_s), c.gpu_hours, c.energy_mwh, c.cost));
    }
    s
}

/// Why a layout does not fit, in one line.
pub fn unfit_reason(e: &Estimate) -> String {
    let m = &e.memory;
    format!(
        "needs {:.1} GiB per GPU (weights {:.1}, grads {:.1}, optimizer {:.1}, activations {:.1} for {} micro-batches in flight on pipeline rank {}) of {:.1} GiB usable",
        m.total() / GIB,
        m.weights / GIB,
        m.grads / GIB,
        m.optimizer / GIB,
        m.activations / GIB,
        e.in_flight,
        e.fullest_rank,
        e.usable_bytes / GIB
    )
}

/// `--explain`: every figure of one layout.
pub fn explain(model: &ModelShape, c: &Cluster, e: &Estimate, cost: Option<&TrainCost>) -> String {
    let l = &e.layout;
    let g = |b: f64| b / GIB;
    let ms = |s: f64| s * 1e3;
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!("layout      {} ({} schedule, {} GPUs of {}, {} micro-batches per step)", l.spec(), e.schedule, e.gpus, c.name, e.microbatches));
    line(format!(
        "model       {}: {} parameters, {:.4e} FLOPs per token (6N + 12·L·H·Q·T at seq {}), {} layers split {:?}",
        model.name, model.params, model.flops_per_token, model.seq, model.layers, e.stage_layers
    ));
    line(format!("step        {:.2} ms", ms(e.step_s)));
    line(format!(
        "  compute   {:>10.2} ms  {:>5.1}%  (forward, backward, recompute, element-wise; one rank)",
        ms(e.compute_s),
        pct(e.compute_s, e.step_s)
    ));
    line(format!("  tp comm   {:>10.2} ms  {:>5.1}%  (all-reduces in every block, not overlapped)", ms(e.tp_s), pct(e.tp_s, e.step_s)));
    line(format!("  pp comm   {:>10.2} ms  {:>5.1}%  (p2p transfers left exposed, simulated)", ms(e.pp_s), pct(e.pp_s, e.step_s)));
    line(format!("  bubble    {:>10.2} ms  {:>5.1}%  (pipeline idle, simulated)", ms(e.bubble_s), pct(e.bubble_s, e.step_s)));
    line(format!(
        "  dp comm   {:>10.2} ms  {:>5.1}%  (exposed of {:.2} ms gradient reduction{})",
        ms(e.dp_s),
        pct(e.dp_s, e.step_s),
        ms(e.dp_total_s),
        if l.zero >= 1 { " and weight gather" } else { "" }
    ));
    line(format!("  optimizer {:>10.2} ms  {:>5.1}%", ms(e.optimizer_s), pct(e.optimizer_s, e.step_s)));
    line(format!("throughput  {:.0} tokens/s, {:.1} model TFLOP/s per GPU, MFU {:.1}%", e.tokens_per_s, e.tflops_per_gpu, 100.0 * e.mfu));
    line(format!(
        "memory      {:.2} GiB of {:.2} usable on pipeline rank {} ({}): weights {:.2}, grads {:.2}, optimizer {:.2}, activations {:.2} ({} micro-batches in flight)",
        g(e.memory.total()),
        g(e.usable_bytes),
        e.fullest_rank,
        if e.fits() { "fits" } else { "does NOT fit" },
        g(e.memory.weights),
        g(e.memory.grads),
        g(e.memory.optimizer),
        g(e.memory.activations),
        e.in_flight
    ));
    if let Some(t) = cost {
        let r = &t.resilience;
        line(format!(
            "to train    {:.3e} tokens: {} ({:.3e} GPU-hours, {:.1} MWh at PUE {}, cost {:.3e})",
            t.tokens,
            human_time(t.time_s),
            t.gpu_hours,
            t.energy_mwh,
            c.pue,
            t.cost
        ));
        line(format!(
            "failures    job MTBF {:.2} h; checkpoint every {} (Young/Daly); goodput {:.1}%; about {:.0} interruptions",
            r.mtbf_h,
            human_time(r.checkpoint_interval_s),
            100.0 * r.goodput,
            r.expected_failures
        ));
    }
    out
}

/// One layout's figures as JSON: `mfu` a fraction, times in seconds, memory in bytes.
pub fn estimate_json(e: &Estimate, cost: Option<&TrainCost>) -> Value {
    let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("fits".into(), json!(e.fits()));
        m.insert("memory_total".into(), json!(e.memory.total()));
        if let Some(c) = cost {
            m.insert("train".into(), serde_json::to_value(c).unwrap_or(Value::Null));
        }
    }
    v
}

/// The model's figures as JSON.
pub fn model_json(m: &ModelShape) -> Value {
    json!({
        "name": m.name, "layers": m.layers, "hidden": m.hidden, "heads": m.heads, "kv_heads": m.kv_heads,
        "ffn_hidden": m.ffn_hidden, "vocab": m.vocab, "seq": m.seq, "glu": m.glu, "tied": m.tied,
        "params": m.params, "flops_per_token": m.flops_per_token,
    })
}
