//! `fabbrica plan calibrate`: a cluster file from fabbrica's own measurements.
//!
//! - Links: each `bench collectives --json` table gives time against message size. A weighted
//!   least-squares line `t = a + b·S` (weights 1/t², so small and large messages count alike)
//!   gives the alpha-beta parameters of the op's algorithm: `α = a / steps` and
//!   `busbw = factor / b`, with (steps, factor) = (2(n−1), 2(n−1)/n) for all_reduce, (n−1, (n−1)/n)
//!   for all_gather and reduce_scatter, (1, 1) for broadcast and sendrecv (nccl-tests'
//!   bus-bandwidth factors).
//! - Compute: each `bench train --json` result is one GPU (rank) training a model at a batch.
//!   The matmul efficiency at that model's width is set so that the planner's own estimate of
//!   that single-rank step equals the measured tokens/s (bisection). When even the whole peak is
//!   too slow (the `cpu` preset's peak and memory bandwidth are guesses), both are doubled until
//!   it is not.

use serde_json::Value;

use crate::cluster::Cluster;
use crate::error::PlanError;
use crate::estimate::{estimate, Execution, Workload};
use crate::layout::Layout;
use crate::memory::StageMap;
use crate::model::{ModelShape, Recompute};
use crate::sim::Simulator;

/// One `bench collectives --json` table.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectiveTable {
    /// all_reduce, all_gather, reduce_scatter, broadcast or sendrecv.
    pub op: String,
    /// Ranks.
    pub world_size: usize,
    /// (bytes, seconds) of each correct row.
    pub rows: Vec<(f64, f64)>,
}

fn field<'a>(v: &'a Value, key: &str, what: &str) -> Result<&'a Value, PlanError> {
    v.get(key).ok_or_else(|| PlanError::input(format!("{what}: no `{key}` (is this a `fabbrica bench` --json file?)")))
}

/// Parses a `bench collectives --json` file's text; `what` names it in errors.
pub fn parse_collectives(text: &str, what: &str) -> Result<CollectiveTable, PlanError> {
    let v: Value = serde_json::from_str(text).map_err(|e| PlanError::input(format!("{what}: not JSON: {e}")))?;
    let op = field(&v, "op", what)?.as_str().unwrap_or("").to_string();
    let world_size = field(&v, "world_size", what)?.as_u64().unwrap_or(0) as usize;
    if world_size < 2 {
        return Err(PlanError::input(format!("{what}: world_size {world_size}: a link needs a run on at least 2 ranks (mpirun -np 2 ...)")));
    }
    let rows = field(&v, "rows", what)?.as_array().ok_or_else(|| PlanError::input(format!("{what}: `rows` is not a list")))?;
    let rows: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| r.get("ok").and_then(Value::as_bool).unwrap_or(true))
        .filter_map(|r| Some((r.get("bytes")?.as_f64()?, r.get("time_us")?.as_f64()? * 1e-6)))
        .filter(|&(b, t)| b > 0.0 && t > 0.0 && t.is_finite())
        .collect();
    if rows.len() < 2 {
        return Err(PlanError::input(format!("{what}: fewer than 2 correct rows to fit a line through")));
    }
    if !["all_reduce", "all_gather", "reduce_scatter", "broadcast", "sendrecv"].contains(&op.as_str()) {
        return Err(PlanError::input(format!("{what}: unknown op {op:?}")));
    }
    Ok(CollectiveTable { op, world_size, rows })
}

/// Latency per step (s) and bus bandwidth (bytes/s) of one table.
pub fn fit_link(t: &CollectiveTable) -> Result<(f64, f64), PlanError> {
    let n = t.world_size as f64;
    let (steps, factor) = match t.op.as_str() {
        "all_reduce" => (2.0 * (n - 1.0), 2.0 * (n - 1.0) / n),
        "all_gather" | "reduce_scatter" => (n - 1.0, (n - 1.0) / n),
        _ => (1.0, 1.0),
    };
    // Weighted least squares of t = a + b·S, weights 1/t².
    let (mut sw, mut sx, mut sy, mut sxx, mut sxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for &(x, y) in &t.rows {
        let w = 1.0 / (y * y);
        sw += w;
        sx += w * x;
        sy += w * y;
        sxx += w * x * x;
        sxy += w * x * y;
    }
    let det = sw * sxx - sx * sx;
    let b = if det > 0.0 { (sw * sxy - sx * sy) / det } else { 0.0 };
    let a = (sy - b * sx) / sw;
    if !(b > 0.0 && b.is_finite()) {
        return Err(PlanError::input(format!(
            "{} over {} ranks: time does not grow with size; measure up to larger messages (--max-bytes)",
            t.op, t.world_size
        )));
    }
    Ok((a.max(0.0) / steps, factor / b))
}

/// One `bench train --json` result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainBench {
    /// Parameters of the model measured.
    pub params: u64,
    /// Micro-batch.
    pub batch: usize,
    /// Sequence length.
    pub block: usize,
    /// Measured tokens/s.
    pub tokens_per_s: f64,
}

/// Parses a `bench train --json` file's text.
pub fn parse_train(text: &str, what: &str) -> Result<TrainBench, PlanError> {
    let v: Value = serde_json::from_str(text).map_err(|e| PlanError::input(format!("{what}: not JSON: {e}")))?;
    let num = |k: &str| field(&v, k, what).and_then(|x| x.as_f64().ok_or_else(|| PlanError::input(format!("{what}: `{k}` is not a number"))));
    let b = TrainBench {
        params: num("params")? as u64,
        batch: num("batch")? as usize,
        block: num("block")? as usize,
        tokens_per_s: num("tokens_per_s")?,
    };
    if b.batch == 0 || b.block == 0 || !(b.tokens_per_s > 0.0 && b.tokens_per_s.is_finite()) {
        return Err(PlanError::input(format!("{what}: batch, block and tokens_per_s must be positive")));
    }
    Ok(b)
}

/// The planner's tokens/s for one rank training `model` at `batch` on `c`.
fn single_rank_tokens_per_s(model: &ModelShape, c: &Cluster, batch: usize) -> Result<f64, PlanError> {
    let l = Layout { tp: 1, pp: 1, dp: 1, v: 1, mb: batch, recompute: Recompute::None, zero: 0 };
    let map = StageMap::new(model, 1, &[model.layers]);
    let e = estimate(model, c, &l, &Workload { global_batch: batch }, &Execution::default(), &map, &mut Simulator::default())?;
    Ok(e.tokens_per_s)
}

/// Sets `c`'s matmul efficiency (one point per model width) so that the planner reproduces each
/// measured single-rank step; returns the fraction found for each.
pub fn fit_compute(c: &mut Cluster, runs: &[(ModelShape, TrainBench)]) -> Result<Vec<f64>, PlanError> {
    let mut points: Vec<[f64; 2]> = Vec::new();
    for (model, bench) in runs {
        if model.params != bench.params {
            return Err(PlanError::input(format!(
                "the bench result has {} parameters but {} has {}: pass the --model the bench ran",
                bench.params, model.name, model.params
            )));
        }
        let mut trial = c.clone();
        let size = model.hidden as f64;
        let at = |t: &mut Cluster, f: f64| {
            t.matmul_efficiency = vec![[size, f]];
            t.attention_efficiency = f;
        };
        at(&mut trial, 1.0);
        // Faster than the peak allows: the peak and memory bandwidth were guesses; raise both.
        let mut doublings = 0;
        while single_rank_tokens_per_s(model, &trial, bench.batch)? < bench.tokens_per_s {
            doublings += 1;
            if doublings > 40 {
                return Err(PlanError::input(format!("{}: the measured {} tokens/s is beyond any peak", model.name, bench.tokens_per_s)));
            }
            c.peak_tflops *= 2.0;
            c.hbm_tbps *= 2.0;
            (trial.peak_tflops, trial.hbm_tbps) = (c.peak_tflops, c.hbm_tbps);
        }
        let (mut lo, mut hi) = (1e-4, 1.0);
        for _ in 0..60 {
            let mid = (lo + hi) / 2.0;
            at(&mut trial, mid);
            if single_rank_tokens_per_s(model, &trial, bench.batch)? < bench.tokens_per_s {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        points.push([size, (lo + hi) / 2.0]);
    }
    let found: Vec<f64> = points.iter().map(|p| p[1]).collect();
    points.sort_by(|a, b| a[0].total_cmp(&b[0]));
    points.dedup_by(|a, b| {
        let same = a[0] == b[0];
        if same {
            b[1] = (a[1] + b[1]) / 2.0;
        }
        same
    });
    if let Some(first) = points.first() {
        c.attention_efficiency = first[1];
        c.matmul_efficiency = points;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(op: &str, n: usize, alpha: f64, busbw: f64) -> String {
        let nf = n as f64;
        let (steps, factor) = if op == "all_reduce" { (2.0 * (nf - 1.0), 2.0 * (nf - 1.0) / nf) } else { (nf - 1.0, (nf - 1.0) / nf) };
        let rows: Vec<String> = (3..28)
            .map(|k| {
                let bytes = (1u64 << k) as f64;
                let t = steps * alpha + factor * bytes / busbw;
                format!("{{\"bytes\": {bytes}, \"time_us\": {}, \"ok\": true}}", t * 1e6)
            })
            .collect();
        format!("{{\"op\": \"{op}\", \"world_size\": {n}, \"rows\": [{}]}}", rows.join(","))
    }

    #[test]
    fn alpha_beta_is_recovered_from_a_synthetic_table() {
        for op in ["all_reduce", "all_gather", "reduce_scatter"] {
            let t = parse_collectives(&table(op, 4, 3e-6, 5e9), "t").unwrap();
            let (a, b) = fit_link(&t).unwrap();
            assert!((a - 3e-6).abs() / 3e-6 < 1e-3 && (b - 5e9).abs() / 5e9 < 1e-3, "{op}: {a} {b}");
        }
        assert!(parse_collectives("{\"op\": \"all_reduce\", \"world_size\": 1, \"rows\": []}", "t").is_err());
        assert!(parse_collectives("not json", "t").unwrap_err().message.contains("not JSON"));
    }

    #[test]
    fn compute_fit_reproduces_the_measured_step() {
        let model = ModelShape::from_gpt("gpt2-124m", &fabbrica_models::GptConfig::preset("gpt2-124m").unwrap(), 256).unwrap();
        let mut c = Cluster::preset("cpu").unwrap();
        let bench = TrainBench { params: model.params, batch: 4, block: 256, tokens_per_s: 3000.0 };
        let f = fit_compute(&mut c, &[(model.clone(), bench)]).unwrap();
        assert!(f[0] > 0.0 && f[0] <= 1.0);
        let got = single_rank_tokens_per_s(&model, &c, 4).unwrap();
        assert!((got - 3000.0).abs() / 3000.0 < 1e-3, "{got}");
        let wrong = TrainBench { params: 1, ..bench };
        assert!(fit_compute(&mut c, &[(model, wrong)]).unwrap_err().message.contains("parameters"));
    }
}
