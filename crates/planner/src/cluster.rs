//! The system: what one GPU computes, holds and draws, how its links move bytes, what it costs,
//! and how often it fails. A preset (`a100`, `h100-sxm`, `h200`, `b200`, `cpu`) or a TOML file
//! with the same keys; unknown keys and impossible values are refused with one line naming the key.
//!
//! Figures of the GPU presets are the vendors' reference systems (DGX A100, DGX H100, DGX H200,
//! DGX B200: 8 GPUs per node on NVLink/NVSwitch, one InfiniBand NIC per GPU). Bandwidths are
//! *achievable bus bandwidths* in nccl-tests' sense (docs/PLANNER.md gives each source), which is
//! what `fabbrica plan calibrate` measures and writes.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::PlanError;

/// Default per-GPU failure rate, per GPU-hour: the Llama 3 report (Dubey et al. 2024, §3.3.4)
/// counts 419 unexpected interruptions in 54 days of pre-training on 16,384 H100 GPUs.
pub const LLAMA3_FAILURES_PER_GPU_HOUR: f64 = 419.0 / (54.0 * 24.0 * 16384.0);

/// Names of the presets, in the order `--cluster` lists them.
pub const PRESETS: [&str; 5] = ["a100", "h100-sxm", "h200", "b200", "cpu"];

/// One cluster: per-GPU compute, memory, links, power, price and failures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Name shown in reports.
    pub name: String,
    /// GPUs (ranks) per node: the tensor-parallel group and the intra-node tier stay inside one.
    pub gpus_per_node: usize,
    /// Dense bf16 peak of one GPU, TFLOP/s (the MFU denominator).
    pub peak_tflops: f64,
    /// Achievable fraction of the peak for the layers' matrix multiplies, by matmul size: pairs
    /// `[size, fraction]` with size the GEMMs' shared dimension (the model width h), increasing;
    /// interpolated in log(size), clamped at the ends.
    pub matmul_efficiency: Vec<[f64; 2]>,
    /// Achievable fraction of the peak for attention's score and value products (fused kernel).
    pub attention_efficiency: f64,
    /// Memory of one GPU, GiB.
    pub hbm_gib: f64,
    /// Of which the framework, the allocator's fragmentation and the communication buffers keep, GiB.
    pub reserved_gib: f64,
    /// HBM bandwidth, TB/s: element-wise kernels (norms, activations, residuals, the optimizer)
    /// are bound by it.
    pub hbm_tbps: f64,
    /// Achievable bus bandwidth per GPU inside a node (NVLink), GB/s.
    pub intra_gbps: f64,
    /// Latency of one step of a collective inside a node, µs.
    pub intra_latency_us: f64,
    /// Achievable bus bandwidth per GPU between nodes (one NIC per GPU), GB/s.
    pub inter_gbps: f64,
    /// Latency of one step of a collective between nodes, µs.
    pub inter_latency_us: f64,
    /// Power per GPU including its share of the node (CPUs, NICs, fans), W.
    pub power_w: f64,
    /// Power usage effectiveness of the data centre (facility power / IT power).
    pub pue: f64,
    /// Price of one GPU-hour.
    pub price_per_gpu_hour: f64,
    /// Unexpected interruptions per GPU-hour (default: the Llama 3 report's rate).
    #[serde(default = "default_failures")]
    pub failures_per_gpu_hour: f64,
    /// Seconds the job stops to write a checkpoint.
    #[serde(default = "default_checkpoint_s")]
    pub checkpoint_write_s: f64,
    /// Seconds from a failure to training again (detection, restart, checkpoint load).
    #[serde(default = "default_restart_s")]
    pub restart_s: f64,
}

fn default_failures() -> f64 {
    LLAMA3_FAILURES_PER_GPU_HOUR
}
fn default_checkpoint_s() -> f64 {
    60.0
}
fn default_restart_s() -> f64 {
    600.0
}

/// Matmul efficiency of A100 (fraction of the dense peak by model width), read off the published
/// Megatron-LM runs (docs/PLANNER.md, "Compute").
const A100_MATMUL: &[[f64; 2]] = &[[2048.0, 0.60], [4096.0, 0.70], [8192.0, 0.74]];
/// The same for Hopper (and, until measured, Blackwell): a higher peak is harder to reach with
/// narrow GEMMs.
const HOPPER_MATMUL: &[[f64; 2]] = &[[2048.0, 0.50], [4096.0, 0.62], [8192.0, 0.70], [16384.0, 0.74]];

#[allow(clippy::too_many_arguments)]
fn gpu(name: &str, peak: f64, curve: &[[f64; 2]], hbm_gib: f64, hbm_tbps: f64, intra: f64, inter: f64, power_w: f64, price: f64) -> Cluster {
    Cluster {
        name: name.into(),
        gpus_per_node: 8,
        peak_tflops: peak,
        matmul_efficiency: curve.to_vec(),
        attention_efficiency: 0.5,
        hbm_gib,
        reserved_gib: 4.0,
        hbm_tbps,
        intra_gbps: intra,
        intra_latency_us: 4.0,
        inter_gbps: inter,
        inter_latency_us: 8.0,
        power_w,
        pue: 1.2,
        price_per_gpu_hour: price,
        failures_per_gpu_hour: LLAMA3_FAILURES_PER_GPU_HOUR,
        checkpoint_write_s: default_checkpoint_s(),
        restart_s: default_restart_s(),
    }
}

impl Cluster {
    /// A named preset, or `None`.
    pub fn preset(name: &str) -> Option<Cluster> {
        Some(match name {
            // DGX A100 80GB: NVLink3 (600 GB/s bidirectional per GPU), 8x HDR 200 Gb/s; 6.5 kW per 8 GPUs.
            "a100" => gpu("a100", 312.0, A100_MATMUL, 80.0, 2.039, 230.0, 22.0, 810.0, 1.8),
            // DGX H100: NVLink4 (900 GB/s), 8x NDR 400 Gb/s; 10.2 kW per 8 GPUs.
            "h100-sxm" => gpu("h100-sxm", 989.0, HOPPER_MATMUL, 80.0, 3.35, 360.0, 45.0, 1275.0, 2.5),
            // DGX H200: H100's compute and links, 141 GB HBM3e at 4.8 TB/s.
            "h200" => gpu("h200", 989.0, HOPPER_MATMUL, 141.0, 4.8, 360.0, 45.0, 1275.0, 3.0),
            // DGX B200: NVLink5 (1.8 TB/s), 8x 400 Gb/s; 14.3 kW per 8 GPUs.
            "b200" => gpu("b200", 2250.0, HOPPER_MATMUL, 180.0, 8.0, 720.0, 45.0, 1790.0, 4.5),
            "cpu" => cpu(),
            _ => return None,
        })
    }

    /// A preset name or a TOML file (a path ending in `.toml`, or any existing file).
    pub fn resolve(spec: &str) -> Result<Cluster, PlanError> {
        if let Some(c) = Cluster::preset(spec) {
            return Ok(c);
        }
        let path = Path::new(spec);
        if spec.ends_with(".toml") || path.is_file() {
            return Cluster::from_file(path);
        }
        Err(PlanError::input(format!("--cluster {spec:?} is neither a preset ({}) nor a TOML file", PRESETS.join(", "))))
    }

    /// Reads and validates a cluster file.
    pub fn from_file(path: &Path) -> Result<Cluster, PlanError> {
        let text = fabbrica_data::bounded::read_to_string(path, MAX_CLUSTER_FILE_BYTES)
            .map_err(|e| PlanError::input(format!("cannot read cluster file {}: {e}", path.display())))?;
        Cluster::from_toml(&text).map_err(|e| PlanError::input(format!("cluster file {}: {}", path.display(), e.message)))
    }

    /// Parses and validates cluster TOML; a missing key takes the `base` preset's value when the
    /// file says `base = "<preset>"`.
    pub fn from_toml(text: &str) -> Result<Cluster, PlanError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| PlanError::input(one_line(&e.to_string())))?;
        if let Some(base) = table.remove("base") {
            let name = base.as_str().ok_or_else(|| PlanError::input(format!("base = {base} must be a preset name ({})", PRESETS.join(", "))))?;
            let preset = Cluster::preset(name)
                .ok_or_else(|| PlanError::input(format!("base = {name:?} is not a preset: use one of {}", PRESETS.join(", "))))?;
            let toml::Value::Table(mut merged) = toml::Value::try_from(&preset).map_err(|e| PlanError::internal(e.to_string()))? else {
                return Err(PlanError::internal("a preset does not serialize to a table".into()));
            };
            for (k, v) in table {
                merged.insert(k, v);
            }
            table = merged;
        }
        let cluster: Cluster = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| PlanError::input(one_line(&e.to_string())))?;
        cluster.validate()?;
        Ok(cluster)
    }

    /// The cluster as TOML (what `plan calibrate` writes).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Every value within physical bounds; each error names its key.
    pub fn validate(&self) -> Result<(), PlanError> {
        let bad = |key: &str, value: f64, why: &str| Err(PlanError::input(format!("cluster key `{key}` = {value} is impossible: {why}")));
        if self.gpus_per_node == 0 || self.gpus_per_node > 1024 {
            return bad("gpus_per_node", self.gpus_per_node as f64, "must be in [1, 1024]");
        }
        let positive: [(&str, f64, f64); 10] = [
            ("peak_tflops", self.peak_tflops, 1e5),
            ("hbm_gib", self.hbm_gib, 1e5),
            ("hbm_tbps", self.hbm_tbps, 1e3),
            ("intra_gbps", self.intra_gbps, 1e5),
            ("inter_gbps", self.inter_gbps, 1e5),
            ("intra_latency_us", self.intra_latency_us, 1e6),
            ("inter_latency_us", self.inter_latency_us, 1e6),
            ("power_w", self.power_w, 1e5),
            ("checkpoint_write_s", self.checkpoint_write_s, 1e6),
            ("restart_s", self.restart_s, 1e6),
        ];
        for (key, v, hi) in positive {
            if !(v.is_finite() && v > 0.0 && v <= hi) {
                return bad(key, v, &format!("must be a number in (0, {hi}]"));
            }
        }
        if !(self.reserved_gib.is_finite() && self.reserved_gib >= 0.0 && self.reserved_gib < self.hbm_gib) {
            return bad("reserved_gib", self.reserved_gib, "must be at least 0 and less than hbm_gib");
        }
        if !(self.pue.is_finite() && (1.0..=5.0).contains(&self.pue)) {
            return bad("pue", self.pue, "must be in [1, 5] (facility power over IT power)");
        }
        if !(self.price_per_gpu_hour.is_finite() && self.price_per_gpu_hour >= 0.0) {
            return bad("price_per_gpu_hour", self.price_per_gpu_hour, "must be at least 0");
        }
        if !(self.failures_per_gpu_hour.is_finite() && (0.0..1.0).contains(&self.failures_per_gpu_hour)) {
            return bad("failures_per_gpu_hour", self.failures_per_gpu_hour, "must be in [0, 1)");
        }
        let fraction = |key: &str, v: f64| if v.is_finite() && v > 0.0 && v <= 1.0 { Ok(()) } else { bad(key, v, "must be a fraction in (0, 1]") };
        fraction("attention_efficiency", self.attention_efficiency)?;
        if self.matmul_efficiency.is_empty() {
            return Err(PlanError::input(
                "cluster key `matmul_efficiency` is empty: give pairs [size, fraction], e.g. [[2048, 0.6], [8192, 0.75]]".into(),
            ));
        }
        for (i, &[size, f]) in self.matmul_efficiency.iter().enumerate() {
            if !(size.is_finite() && size >= 1.0) {
                return bad("matmul_efficiency", size, "each size must be at least 1");
            }
            fraction("matmul_efficiency", f)?;
            if i > 0 && size <= self.matmul_efficiency[i - 1][0] {
                return bad("matmul_efficiency", size, "sizes must increase");
            }
        }
        Ok(())
    }

    /// Achievable fraction of the peak for GEMMs of shared dimension `size` (log-linear between
    /// the table's points, clamped at its ends).
    pub fn matmul_fraction(&self, size: f64) -> f64 {
        let t = &self.matmul_efficiency;
        let first = t[0];
        if size <= first[0] {
            return first[1];
        }
        for w in t.windows(2) {
            let ([x0, y0], [x1, y1]) = (w[0], w[1]);
            if size <= x1 {
                let f = (size.ln() - x0.ln()) / (x1.ln() - x0.ln());
                return y0 + f * (y1 - y0);
            }
        }
        t[t.len() - 1][1]
    }

    /// Usable bytes per GPU.
    pub fn usable_bytes(&self) -> f64 {
        (self.hbm_gib - self.reserved_gib) * GIB
    }
}

/// The largest cluster file read.
const MAX_CLUSTER_FILE_BYTES: u64 = 1 << 20;

/// Bytes in a GiB.
pub const GIB: f64 = (1u64 << 30) as f64;

/// The machine this runs on, as a one-node cluster of one rank per core pair: fp32 FMA peak
/// estimated from the core count (2 AVX2 FMA units at 2.5 GHz: 32 FLOP/cycle per core) and the
/// memory from /proc/meminfo. Rough by nature: `fabbrica plan calibrate` measures it instead.
fn cpu() -> Cluster {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map(|kib| kib / (1u64 << 20) as f64)
        .unwrap_or(16.0);
    let ranks = cores.max(1);
    Cluster {
        name: "cpu".into(),
        gpus_per_node: ranks,
        peak_tflops: 32.0 * 2.5e9 / 1e12,
        matmul_efficiency: vec![[64.0, 0.3], [1024.0, 0.6]],
        attention_efficiency: 0.3,
        hbm_gib: (mem_gib / ranks as f64).max(0.5),
        reserved_gib: 0.4_f64.min(mem_gib / ranks as f64 / 4.0),
        hbm_tbps: 0.01,
        intra_gbps: 5.0,
        intra_latency_us: 5.0,
        inter_gbps: 1.0,
        inter_latency_us: 50.0,
        power_w: 15.0,
        pue: 1.0,
        price_per_gpu_hour: 0.0,
        failures_per_gpu_hour: LLAMA3_FAILURES_PER_GPU_HOUR,
        checkpoint_write_s: 5.0,
        restart_s: 30.0,
    }
}

/// One line of a (possibly multi-line) TOML error.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        for name in PRESETS {
            Cluster::preset(name).unwrap().validate().unwrap();
        }
        assert!(Cluster::preset("tpu").is_none());
    }

    #[test]
    fn a_file_over_a_base_preset_round_trips() {
        let c = Cluster::from_toml("base = \"h100-sxm\"\nname = \"mine\"\ninter_gbps = 25.0\n").unwrap();
        assert_eq!((c.name.as_str(), c.inter_gbps, c.peak_tflops), ("mine", 25.0, 989.0));
        assert_eq!(Cluster::from_toml(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn unknown_keys_and_impossible_values_name_the_key() {
        let e = Cluster::from_toml("base = \"a100\"\nintra_gbs = 3.0\n").unwrap_err().message;
        assert!(e.contains("intra_gbs") && !e.contains('\n'), "{e}");
        let e = Cluster::from_toml("base = \"a100\"\npue = 0.5\n").unwrap_err().message;
        assert!(e.contains("`pue`"), "{e}");
        let e = Cluster::from_toml("base = \"a100\"\nhbm_gib = -1.0\n").unwrap_err().message;
        assert!(e.contains("`hbm_gib`"), "{e}");
        let e = Cluster::from_toml("base = \"a100\"\nmatmul_efficiency = [[4096, 0.7], [2048, 0.6]]\n").unwrap_err().message;
        assert!(e.contains("`matmul_efficiency`") && e.contains("increase"), "{e}");
        let e = Cluster::from_toml("name = \"x\"\n").unwrap_err().message;
        assert!(e.contains("missing field"), "{e}");
    }

    #[test]
    fn matmul_fraction_interpolates_and_clamps() {
        let c = Cluster::preset("h100-sxm").unwrap();
        assert_eq!(c.matmul_fraction(100.0), 0.50);
        assert_eq!(c.matmul_fraction(1e6), 0.74);
        let mid = c.matmul_fraction((2048.0f64 * 4096.0).sqrt());
        assert!((mid - 0.56).abs() < 1e-12, "{mid}");
    }

    #[test]
    fn llama3_failure_rate_is_one_per_50k_gpu_hours() {
        let mtbf = 1.0 / LLAMA3_FAILURES_PER_GPU_HOUR;
        assert!((50_000.0..51_000.0).contains(&mtbf), "{mtbf}");
    }
}
