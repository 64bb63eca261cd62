//! `run.trace = true`: every pipeline rank's executed actions, with their start and end times,
//! as Chrome trace-event JSON (`out_dir/trace/rank_N.json` and the merged `trace.json`) that opens
//! in Perfetto (ui.perfetto.dev) or chrome://tracing, plus the simulated schedule drawn with the
//! measured mean forward and backward times (`trace/simulated.svg`), to compare the real pipeline
//! with the ideal one. Ranks send their events to rank 0, which writes every file (other ranks
//! may not share its filesystem).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use fabbrica_pipeline::{Op, Trace};
use tch::{Device, Kind, Tensor};

use crate::error::{io_err, TrainError};
use crate::grid::Grid;

/// Events kept per rank; recording stops there (a note says so).
pub const MAX_EVENTS: usize = 1 << 20;
/// i64 fields per event: step, stage, micro, op, start µs, end µs (since the UNIX epoch).
const FIELDS: usize = 6;

#[derive(Default)]
pub struct TraceLog {
    events: Vec<[i64; FIELDS]>,
    pub truncated: bool,
}

/// Microseconds since the UNIX epoch (a common origin for ranks on one node; NTP-close across nodes).
pub fn wall_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

fn op_code(op: Op) -> i64 {
    Op::ALL.iter().position(|&o| o == op).unwrap_or(0) as i64
}

impl TraceLog {
    /// Records step `step`'s executed actions; `origin` is [`wall_us`] taken just before execution.
    pub fn record(&mut self, step: u64, origin: i64, t: &Trace) {
        for e in &t.entries {
            if self.events.len() >= MAX_EVENTS {
                self.truncated = true;
                return;
            }
            let a = e.action;
            self.events.push([step as i64, a.stage as i64, a.micro as i64, op_code(a.op), origin + e.start as i64, origin + e.end as i64]);
        }
    }

    /// Collective over the world: every rank's events to rank 0, which writes the files. Returns
    /// the merged file's path on rank 0.
    pub fn write(&self, grid: &Grid, out: &Path, simulated_svg: Option<String>) -> Result<Option<std::path::PathBuf>, TrainError> {
        let comm = &*grid.world;
        let comm_err = TrainError::Collective;
        let flat: Vec<i64> = self.events.iter().flatten().copied().collect();
        if grid.rank != 0 {
            comm.send(&Tensor::from_slice(&[flat.len() as i64]), 0).map_err(comm_err)?;
            if !flat.is_empty() {
                comm.send(&Tensor::from_slice(&flat), 0).map_err(comm_err)?;
            }
            return Ok(None);
        }
        let dir = out.join("trace");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut merged: Vec<String> = Vec::new();
        for r in 0..comm.size() {
            let events: Vec<i64> = if r == 0 {
                flat.clone()
            } else {
                let n = Tensor::zeros([1], (Kind::Int64, Device::Cpu));
                comm.recv(&n, r).map_err(comm_err)?;
                let n = n.int64_value(&[0]);
                if n < 0 || n as usize > MAX_EVENTS * FIELDS || !(n as usize).is_multiple_of(FIELDS) {
                    return Err(TrainError::Comm(format!("trace from rank {r}: {n} values announced")));
                }
                let t = Tensor::zeros([n], (Kind::Int64, Device::Cpu));
                if n > 0 {
                    comm.recv(&t, r).map_err(comm_err)?;
                }
                Vec::try_from(&t).map_err(|e: tch::TchError| TrainError::Torch(e.to_string()))?
            };
            let c = grid.dims.coords(r).map_err(|e| TrainError::Parallel(e.to_string()))?;
            let mut lines = vec![format!(r#"{{"name":"process_name","ph":"M","pid":{r},"args":{{"name":"rank {r} (pp {}, dp {})"}}}}"#, c.pp, c.dp)];
            for e in events.chunks(FIELDS) {
                let op = Op::ALL[e[3] as usize % Op::ALL.len()];
                let cat = match op {
                    Op::F => "forward",
                    Op::B => "backward",
                    Op::SendF | Op::SendB => "send",
                    Op::RecvF | Op::RecvB => "recv",
                };
                // Compute on row 0, communication on row 1 of the rank.
                let tid = matches!(op, Op::F | Op::B) as i64 ^ 1;
                lines.push(format!(
                    r#"{{"name":"{}{}{}","cat":"{cat}","ph":"X","ts":{},"dur":{},"pid":{r},"tid":{tid},"args":{{"step":{},"stage":{},"micro":{}}}}}"#,
                    e[1],
                    op.as_str(),
                    e[2],
                    e[4],
                    (e[5] - e[4]).max(0),
                    e[0],
                    e[1],
                    e[2]
                ));
            }
            let path = dir.join(format!("rank_{r}.json"));
            crate::checkpoint::write_atomic(&path, format!("{{\"traceEvents\":[\n{}\n]}}\n", lines.join(",\n")).as_bytes())?;
            merged.extend(lines);
        }
        let path = dir.join("trace.json");
        crate::checkpoint::write_atomic(&path, format!("{{\"traceEvents\":[\n{}\n]}}\n", merged.join(",\n")).as_bytes())?;
        if let Some(svg) = simulated_svg {
            crate::checkpoint::write_atomic(&dir.join("simulated.svg"), svg.as_bytes())?;
        }
        Ok(Some(path))
    }

    /// Mean forward and backward durations (µs) over the recorded compute, for the simulation.
    pub fn mean_compute_us(&self) -> (u64, u64) {
        let mean = |op: Op| {
            let v: Vec<i64> = self.events.iter().filter(|e| e[3] == op_code(op)).map(|e| e[5] - e[4]).collect();
            if v.is_empty() {
                1
            } else {
                (v.iter().sum::<i64>() / v.len() as i64).max(1) as u64
            }
        };
        (mean(Op::F), mean(Op::B))
    }
}
