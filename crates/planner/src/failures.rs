//! Failures at scale: the optimal checkpoint interval and the expected goodput.
//!
//! With a per-GPU failure rate λ, a job on N GPUs fails every `M = 1/(λN)` on average. Writing a
//! checkpoint stops training for δ seconds and a failure costs the restart R plus the work since
//! the last checkpoint. Young (1974) gives the interval `τ = √(2δM)`; Daly (2006, eq. 37) the
//! higher-order one used here, `τ = √(2δM)·[1 + √(δ/(2M))/3 + δ/(18M)] − δ` for δ < 2M, else M.
//! Goodput (useful fraction of wall time), first order in 1/M: a segment of τ + δ seconds does τ
//! of work and meets `(τ + δ)/M` failures, each costing R plus half a segment on average:
//! `goodput = τ / ((τ + δ)·(1 + (R + (τ + δ)/2)/M))`.

use serde::Serialize;

use crate::cluster::Cluster;

/// Checkpointing and failures of one job.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Resilience {
    /// Mean time between failures of the whole job, hours.
    pub mtbf_h: f64,
    /// Checkpoint interval, seconds (Young/Daly).
    pub checkpoint_interval_s: f64,
    /// Useful fraction of wall-clock time.
    pub goodput: f64,
    /// Expected failures over the run (with `--tokens`; 0 otherwise).
    pub expected_failures: f64,
}

/// Young/Daly for `gpus` GPUs of cluster `c`; `run_s` (useful seconds) counts the failures.
pub fn resilience(c: &Cluster, gpus: usize, run_s: f64) -> Resilience {
    let rate = c.failures_per_gpu_hour * gpus as f64 / 3600.0; // failures per second
    if rate <= 0.0 {
        return Resilience { mtbf_h: f64::INFINITY, checkpoint_interval_s: f64::INFINITY, goodput: 1.0, expected_failures: 0.0 };
    }
    let m = 1.0 / rate;
    let (d, r) = (c.checkpoint_write_s, c.restart_s);
    let tau = if d < 2.0 * m { (2.0 * d * m).sqrt() * (1.0 + (d / (2.0 * m)).sqrt() / 3.0 + d / (18.0 * m)) - d } else { m };
    let tau = tau.max(1.0);
    let seg = tau + d;
    let goodput = (tau / (seg * (1.0 + (r + seg / 2.0) / m))).clamp(0.0, 1.0);
    Resilience { mtbf_h: m / 3600.0, checkpoint_interval_s: tau, goodput, expected_failures: run_s / goodput.max(1e-12) / m }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scale_interval_and_goodput() {
        let c = Cluster::preset("h100-sxm").unwrap();
        let r = resilience(&c, 16384, 0.0);
        // 419 failures in 54 days: one every ~3.1 hours on 16,384 GPUs.
        assert!((r.mtbf_h - 54.0 * 24.0 / 419.0).abs() < 1e-9, "{}", r.mtbf_h);
        // Young's first-order interval √(2δM) for δ = 60 s: about 22 minutes.
        let young = (2.0 * 60.0 * r.mtbf_h * 3600.0).sqrt();
        assert!((r.checkpoint_interval_s - young).abs() / young < 0.05, "{} vs {young}", r.checkpoint_interval_s);
        assert!((0.85..0.97).contains(&r.goodput), "{}", r.goodput);
    }

    #[test]
    fn more_gpus_fail_more_often_and_waste_more() {
        let c = Cluster::preset("h100-sxm").unwrap();
        let (a, b) = (resilience(&c, 1024, 0.0), resilience(&c, 100_000, 0.0));
        assert!(b.mtbf_h < a.mtbf_h && b.goodput < a.goodput && b.checkpoint_interval_s < a.checkpoint_interval_s);
        let none = resilience(&Cluster { failures_per_gpu_hour: 0.0, ..c }, 100_000, 0.0);
        assert_eq!(none.goodput, 1.0);
    }
}
