//! The ranks of a job as a grid (`crates/topology`), and the communicators of its groups:
//! data-parallel (gradient reduction, evaluation), pipeline (activations and their gradients),
//! and the embedding group that keeps the tied embedding's two pipeline copies equal.
//! Every group is made from the topology's group lists, so the rank order is decided in one place.

use std::sync::Arc;

use fabbrica_comm::{Communicator, World};
use fabbrica_topology::{Coords, ParallelDims, RankOrder};

use crate::config::Config;
use crate::error::TrainError;

pub struct Grid {
    pub dims: ParallelDims,
    pub coords: Coords,
    pub rank: usize,
    pub world: Arc<dyn Communicator>,
    /// The ranks holding the same stages of other replicas (all-reduce gradients together).
    pub dp: Arc<dyn Communicator>,
    /// This replica's pipeline, in stage order (its rank is the pipeline coordinate).
    pub pp: Arc<dyn Communicator>,
    /// The ranks holding the other slices of the same layers (tensor parallelism), in tp order;
    /// its traffic is counted in `tp_traffic`.
    pub tp: Arc<dyn Communicator>,
    pub tp_traffic: Arc<fabbrica_comm::traffic::Traffic>,
    /// With pp > 1, on the ranks of the first and the last stage of every replica: the tied
    /// embedding's gradient is summed over it (Megatron's embedding group). `None` elsewhere.
    pub embedding: Option<Arc<dyn Communicator>>,
}

fn comm_err(e: fabbrica_comm::CommError) -> TrainError {
    TrainError::Collective(e)
}

/// The grid `cfg.parallel` describes over `nranks` ranks (validated: one line naming the key):
/// the one place the degrees and the rank order are read, for the trainer and `--dry-run` alike.
pub fn dims(cfg: &Config, nranks: usize) -> Result<ParallelDims, TrainError> {
    let order: RankOrder = cfg.parallel.order;
    Ok(ParallelDims::new(cfg.parallel.dp, cfg.parallel.pp, cfg.parallel.tp, nranks)
        .map_err(|e| TrainError::Parallel(e.to_string()))?
        .with_order(order))
}

/// Tensor-parallel groups are consecutive ranks, meant to share a node: with the launcher's
/// ranks per node (`local_world_size`, when the job spans more than one node), refuses a degree
/// that is larger than a node or does not divide it (a group would straddle two nodes and run
/// every layer's collectives over the network).
pub fn check_tp_fits_node(tp: usize, local_world_size: usize, world_size: usize) -> Result<(), TrainError> {
    if tp <= 1 || local_world_size == 0 || local_world_size >= world_size {
        return Ok(());
    }
    if tp > local_world_size || !local_world_size.is_multiple_of(tp) {
        return Err(TrainError::Parallel(format!(
            "parallel.tp = {tp} does not fit the {local_world_size} ranks per node the launcher reports: a tensor-parallel group communicates in every layer and must lie inside one node; use a parallel.tp that divides {local_world_size}, and pipeline or data parallelism across nodes"
        )));
    }
    Ok(())
}

impl Grid {
    /// Splits the world into the groups of `dims` (collective over the world).
    pub fn new(world: &World, dims: ParallelDims) -> Result<Grid, TrainError> {
        let w: Arc<dyn Communicator> = world.comm();
        let rank = w.rank();
        let coords = dims.coords(rank).map_err(|e| TrainError::Parallel(e.to_string()))?;
        let split = |groups: Vec<Vec<usize>>, name: &str| -> Result<Arc<dyn Communicator>, TrainError> {
            if groups.len() == 1 {
                return Ok(w.clone()); // the whole world: no new communicator
            }
            w.split_groups(&groups, name).map_err(comm_err)?.ok_or_else(|| TrainError::Parallel(format!("rank {rank} is in no {name} group")))
        };
        let dp = split(dims.dp_groups(), "dp")?;
        let pp = split(dims.pp_groups(), "pp")?;
        let tp = fabbrica_comm::traffic::CountingComm::new(split(dims.tp_groups(), "tp")?);
        let tp_traffic = tp.traffic();
        let tp: Arc<dyn Communicator> = Arc::new(tp);
        let embedding = if dims.pp > 1 {
            // Per tensor-parallel coordinate: the ends' slices of the tied embedding are the same rows.
            let ends: Vec<Vec<usize>> = (0..dims.tp)
                .map(|t| {
                    (0..dims.world_size)
                        .filter(|&r| dims.coords(r).map(|c| c.tp == t && (c.pp == 0 || c.pp + 1 == dims.pp)).unwrap_or(false))
                        .collect()
                })
                .collect();
            w.split_groups(&ends, "embedding").map_err(comm_err)?
        } else {
            None
        };
        Ok(Grid { dims, coords, rank, world: w, dp, pp, tp, tp_traffic, embedding })
    }

    pub fn is_first_stage(&self) -> bool {
        self.coords.pp == 0
    }

    pub fn is_last_stage(&self) -> bool {
        self.coords.pp + 1 == self.dims.pp
    }
}

/// Largest number of tensors, and of name bytes, in one [`send_named`] message.
const MAX_NAMED: i64 = 1 << 20;
const MAX_NAME_BYTES: i64 = 1 << 26;

/// Sends named fp32 tensors to `dst` (three messages: sizes, a header with each name's length
/// and shape plus the names' bytes, then the values in one buffer). The receiver needs no
/// knowledge of what is coming.
pub fn send_named(comm: &dyn Communicator, dst: usize, tensors: &[(String, tch::Tensor)]) -> Result<(), TrainError> {
    use tch::{Device, Kind, Tensor};
    let mut header: Vec<i64> = vec![tensors.len() as i64];
    let mut names: Vec<i64> = Vec::new();
    for (n, t) in tensors {
        header.push(n.len() as i64);
        header.push(t.dim() as i64);
        header.extend(t.size());
        names.extend(n.bytes().map(i64::from));
    }
    let flat: Vec<Tensor> =
        tch::no_grad(|| tensors.iter().map(|(_, t)| t.detach().to_device(Device::Cpu).to_kind(Kind::Float).reshape([-1])).collect());
    let values = if flat.is_empty() { Tensor::zeros([0], (Kind::Float, Device::Cpu)) } else { Tensor::cat(&flat, 0) };
    let sizes = Tensor::from_slice(&[header.len() as i64, names.len() as i64, values.numel() as i64]);
    comm.send(&sizes, dst).map_err(comm_err)?;
    comm.send(&Tensor::from_slice(&header), dst).map_err(comm_err)?;
    if !names.is_empty() {
        comm.send(&Tensor::from_slice(&names), dst).map_err(comm_err)?;
    }
    if values.numel() > 0 {
        comm.send(&values, dst).map_err(comm_err)?;
    }
    Ok(())
}

/// Receives what [`send_named`] sent from `src`, checking every size against the message before
/// allocating (a peer of the same job, but a bug must not become a huge allocation).
pub fn recv_named(comm: &dyn Communicator, src: usize) -> Result<Vec<(String, tch::Tensor)>, TrainError> {
    use tch::{Device, Kind, Tensor};
    let bad = |why: String| TrainError::Comm(format!("named tensors from rank {src}: {why}"));
    let sizes = Tensor::zeros([3], (Kind::Int64, Device::Cpu));
    comm.recv(&sizes, src).map_err(comm_err)?;
    let sizes: Vec<i64> = Vec::try_from(&sizes).map_err(|e: tch::TchError| bad(e.to_string()))?;
    let (h, nb, nv) = (sizes[0], sizes[1], sizes[2]);
    if !(1..=MAX_NAMED * 10).contains(&h) || !(0..=MAX_NAME_BYTES).contains(&nb) || nv < 0 {
        return Err(bad(format!("sizes {sizes:?} out of bounds")));
    }
    let header = Tensor::zeros([h], (Kind::Int64, Device::Cpu));
    comm.recv(&header, src).map_err(comm_err)?;
    let header: Vec<i64> = Vec::try_from(&header).map_err(|e: tch::TchError| bad(e.to_string()))?;
    let names = Tensor::zeros([nb], (Kind::Int64, Device::Cpu));
    if nb > 0 {
        comm.recv(&names, src).map_err(comm_err)?;
    }
    let names: Vec<i64> = Vec::try_from(&names).map_err(|e: tch::TchError| bad(e.to_string()))?;
    // Parse and check the header fully before receiving the values.
    let count = header[0];
    if !(0..=MAX_NAMED).contains(&count) {
        return Err(bad(format!("{count} tensors")));
    }
    let (mut at, mut name_at, mut numel_sum) = (1usize, 0usize, 0i64);
    let mut specs: Vec<(String, Vec<i64>)> = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let get = |i: usize| header.get(i).copied().ok_or_else(|| bad("header too short".into()));
        let (len, ndim) = (get(at)?, get(at + 1)?);
        if !(0..=4096).contains(&len) || !(0..=8).contains(&ndim) {
            return Err(bad(format!("name length {len} or {ndim} dimensions out of bounds")));
        }
        let dims: Vec<i64> = (0..ndim as usize).map(|k| get(at + 2 + k)).collect::<Result<_, _>>()?;
        at += 2 + ndim as usize;
        let bytes = names.get(name_at..name_at + len as usize).ok_or_else(|| bad("names too short".into()))?;
        name_at += len as usize;
        let name = String::from_utf8(bytes.iter().map(|&b| b as u8).collect()).map_err(|_| bad("a name is not UTF-8".into()))?;
        let numel = dims
            .iter()
            .try_fold(1i64, |acc, &d| if d < 0 { None } else { acc.checked_mul(d) })
            .ok_or_else(|| bad(format!("{name}: shape {dims:?}")))?;
        numel_sum = numel_sum.checked_add(numel).ok_or_else(|| bad("sizes overflow".into()))?;
        specs.push((name, dims));
    }
    if numel_sum != nv {
        return Err(bad(format!("the shapes hold {numel_sum} values but {nv} were announced")));
    }
    let values = Tensor::zeros([nv], (Kind::Float, Device::Cpu));
    if nv > 0 {
        comm.recv(&values, src).map_err(comm_err)?;
    }
    let mut out = Vec::with_capacity(specs.len());
    let mut off = 0i64;
    for (name, dims) in specs {
        let n: i64 = dims.iter().product();
        out.push((name, values.narrow(0, off, n).reshape(dims.as_slice())));
        off += n;
    }
    Ok(out)
}

/// Largest text [`send_text`] moves (a shard's list of tensor names, a directory path).
const MAX_TEXT_BYTES: i64 = 1 << 28;

/// Sends UTF-8 text to `dst` (its length, then its bytes as i64).
pub fn send_text(comm: &dyn Communicator, dst: usize, text: &str) -> Result<(), TrainError> {
    let bytes: Vec<i64> = text.bytes().map(i64::from).collect();
    comm.send(&tch::Tensor::from_slice(&[bytes.len() as i64]), dst).map_err(comm_err)?;
    if !bytes.is_empty() {
        comm.send(&tch::Tensor::from_slice(&bytes), dst).map_err(comm_err)?;
    }
    Ok(())
}

/// Receives what [`send_text`] sent from `src` (bounded).
pub fn recv_text(comm: &dyn Communicator, src: usize) -> Result<String, TrainError> {
    use tch::{Device, Kind, Tensor};
    let n = Tensor::zeros([1], (Kind::Int64, Device::Cpu));
    comm.recv(&n, src).map_err(comm_err)?;
    let n = n.int64_value(&[0]);
    if !(0..=MAX_TEXT_BYTES).contains(&n) {
        return Err(TrainError::Comm(format!("text from rank {src}: {n} bytes announced")));
    }
    let t = Tensor::zeros([n], (Kind::Int64, Device::Cpu));
    if n > 0 {
        comm.recv(&t, src).map_err(comm_err)?;
    }
    let v: Vec<i64> = Vec::try_from(&t).map_err(|e: tch::TchError| TrainError::Torch(e.to_string()))?;
    String::from_utf8(v.into_iter().map(|b| b as u8).collect()).map_err(|_| TrainError::Comm(format!("text from rank {src} is not UTF-8")))
}

/// Rank `root`'s `text` on every rank of `comm` (others pass anything; bounded).
pub fn broadcast_text(comm: &dyn Communicator, root: usize, text: &str) -> Result<String, TrainError> {
    use tch::{Device, Kind, Tensor};
    let n = Tensor::from_slice(&[text.len() as i64]);
    comm.broadcast(&n, root).map_err(comm_err)?;
    let n = n.int64_value(&[0]);
    if !(0..=MAX_TEXT_BYTES).contains(&n) {
        return Err(TrainError::Comm(format!("text from rank {root}: {n} bytes announced")));
    }
    let t = if comm.rank() == root {
        Tensor::from_slice(&text.bytes().map(i64::from).collect::<Vec<_>>())
    } else {
        Tensor::zeros([n], (Kind::Int64, Device::Cpu))
    };
    if n > 0 {
        comm.broadcast(&t, root).map_err(comm_err)?;
    }
    let v: Vec<i64> = Vec::try_from(&t).map_err(|e: tch::TchError| TrainError::Torch(e.to_string()))?;
    String::from_utf8(v.into_iter().map(|b| b as u8).collect()).map_err(|_| TrainError::Comm(format!("text from rank {root} is not UTF-8")))
}

#[cfg(test)]
mod node_tests {
    use super::check_tp_fits_node;

    #[test]
    fn tensor_parallel_groups_must_fit_a_node() {
        // 4 nodes of 8: tp 8, 4, 2 fit; 16 spans two nodes; 3 straddles node boundaries.
        for tp in [1, 2, 4, 8] {
            check_tp_fits_node(tp, 8, 32).unwrap();
        }
        for tp in [16, 3] {
            let msg = check_tp_fits_node(tp, 8, 32).unwrap_err().to_string();
            assert!(msg.contains(&format!("parallel.tp = {tp}")) && msg.contains("8 ranks per node"), "{msg}");
        }
        // One node (or a launcher that does not say): nothing to check.
        check_tp_fits_node(16, 16, 16).unwrap();
        check_tp_fits_node(3, 0, 12).unwrap();
    }
}
