//! The tensor-parallel region operators ([`fabbrica_models::TpOps`]) over a communicator: each
//! is a custom autograd function (`fabbrica_torch_ext::function`) whose forward and backward run
//! the collective Megatron-LM runs there. The model holds them as a plan and never sees the
//! communicator; the group is bound once the grid exists ([`TpRegion::bind`]), after every
//! rank's setup has succeeded.
//!
//! Sequence-parallel shards are contiguous blocks of a micro-batch's B·T tokens, (B·T/tp, C):
//! Megatron splits the s of its [s, b, h] layout, which is the same contiguous split of the
//! tokens in s-major order; in fabbrica's [b, s, h] layout the contiguous split is the one that
//! gathers and scatters without copies.

use std::sync::{Arc, Mutex, OnceLock};

use fabbrica_comm::{Communicator, ReduceOp};
use fabbrica_models::TpOps;
use fabbrica_torch_ext::function::{apply, Function};
use tch::{Kind, Tensor};

/// The tensor-parallel group's operators; the group itself is bound after setup.
#[derive(Default)]
pub struct TpRegion {
    comm: OnceLock<Arc<dyn Communicator>>,
}

impl TpRegion {
    /// Sets the group the operators communicate over (once).
    pub fn bind(&self, comm: Arc<dyn Communicator>) {
        let _ = self.comm.set(comm);
    }

    fn comm(&self) -> Arc<dyn Communicator> {
        self.comm.get().cloned().unwrap_or_else(|| panic!("tensor-parallel operator used before the tensor-parallel group was bound"))
    }

    /// Runs `f` as one autograd node; a failure (a collective's) panics with a message that
    /// starts with "tensor-parallel", which the trainer turns into an error.
    fn run<F: Function>(&self, inputs: &[&Tensor], f: F, what: &str) -> Tensor {
        match apply(inputs, f) {
            Ok(mut outs) => outs.remove(0),
            Err(e) => panic!("tensor-parallel {what}: {e}"),
        }
    }
}

fn collective(comm: &dyn Communicator, what: &str, r: fabbrica_comm::Result<()>) -> Result<(), String> {
    r.map_err(|e| format!("{what} over {} failed: {e}", comm.name()))
}

/// Sum over the group, in place on a private contiguous copy.
fn all_reduce_sum(comm: &dyn Communicator, x: &Tensor) -> Result<Tensor, String> {
    let y = x.contiguous().copy();
    collective(comm, "all-reduce", comm.all_reduce(&y, ReduceOp::Sum))?;
    Ok(y)
}

/// Token shards (N, C) in rank order → all the tokens (n·N, C).
fn gather_tokens(comm: &dyn Communicator, x: &Tensor) -> Result<Tensor, String> {
    let n = comm.size() as i64;
    let c = x.size().last().copied().unwrap_or(1);
    let shard = x.reshape([-1, c]).contiguous();
    let out = Tensor::empty([n * shard.size()[0], c], (shard.kind(), shard.device()));
    collective(comm, "all-gather", comm.all_gather(&out, &shard))?;
    Ok(out)
}

/// Partial sums over all the tokens (…, C) → this rank's token shard (tokens/n, C) of their sum.
fn reduce_scatter_tokens(comm: &dyn Communicator, x: &Tensor) -> Result<Tensor, String> {
    let n = comm.size() as i64;
    let c = x.size().last().copied().unwrap_or(1);
    let all = x.reshape([-1, c]).contiguous();
    let tokens = all.size()[0];
    if tokens % n != 0 {
        return Err(format!("the micro-batch's {tokens} tokens do not split into {n} shards"));
    }
    let out = Tensor::empty([tokens / n, c], (all.kind(), all.device()));
    collective(comm, "reduce-scatter", comm.reduce_scatter(&out, &all, ReduceOp::Sum))?;
    Ok(out)
}

struct CopyTo(Arc<dyn Communicator>);
impl Function for CopyTo {
    fn forward(&self, x: &[Tensor]) -> Result<Vec<Tensor>, String> {
        Ok(vec![x[0].shallow_clone()])
    }
    fn backward(&self, g: &[Tensor]) -> Result<Vec<Tensor>, String> {
        Ok(vec![all_reduce_sum(&*self.0, &g[0])?])
    }
}

struct ReduceFrom(Arc<dyn Communicator>);
impl Function for ReduceFrom {
    fn forward(&self, x: &[Tensor]) -> Result<Vec<Tensor>, String> {
        Ok(vec![all_reduce_sum(&*self.0, &x[0])?])
    }
    fn backward(&self, g: &[Tensor]) -> Result<Vec<Tensor>, String> {
        Ok(vec![g[0].shallow_clone()])
    }
}

struct GatherSeq(Arc<dyn Communicator>);
impl Function for GatherSeq {
    fn forward(&self, x: &[Tensor]) -> Result<Vec<Tensor>, String> {
        Ok(vec![gather_tokens(&*self.0, &x[0])?])
    }
    fn backward(&self, g: &[Tensor]) -> Result<Vec<Tensor>, String> {
        Ok(vec![reduce_scatter_tokens(&*self.0, &g[0])?])
    }
}

struct ReduceScatterSeq(Arc<dyn Communicator>, Mutex<Vec<i64>>);
impl Function for ReduceScatterSeq {
    fn forward(&self, x: &[Tensor]) -> Result<Vec<Tensor>, String> {
        *self.1.lock().map_err(|_| "reduce-scatter state poisoned".to_string())? = x[0].size();
        Ok(vec![reduce_scatter_tokens(&*self.0, &x[0])?])
    }
    fn backward(&self, g: &[Tensor]) -> Result<Vec<Tensor>, String> {
        let shape = self.1.lock().map_err(|_| "reduce-scatter state poisoned".to_string())?.clone();
        Ok(vec![gather_tokens(&*self.0, &g[0])?.reshape(shape.as_slice())])
    }
}

/// Sequence parallelism's column-parallel linear: y = gather(x)·Wᵀ + b, keeping the shard x and
/// gathering it again in backward (the gathered input is never held between the passes).
struct GatherLinear {
    comm: Arc<dyn Communicator>,
    saved: Mutex<Option<(Tensor, Tensor, bool)>>,
}

impl Function for GatherLinear {
    fn forward(&self, x: &[Tensor]) -> Result<Vec<Tensor>, String> {
        let (shard, w) = (&x[0], &x[1]);
        let total = gather_tokens(&*self.comm, shard)?;
        let y = total.matmul(&w.tr());
        let y = match x.get(2) {
            Some(b) => y + b,
            None => y,
        };
        *self.saved.lock().map_err(|_| "gather-linear state poisoned".to_string())? = Some((shard.shallow_clone(), w.shallow_clone(), x.len() > 2));
        Ok(vec![y])
    }
    fn backward(&self, g: &[Tensor]) -> Result<Vec<Tensor>, String> {
        let (shard, w, has_bias) =
            self.saved.lock().map_err(|_| "gather-linear state poisoned".to_string())?.take().ok_or("gather-linear: backward ran twice")?;
        let g = &g[0];
        let kind = g.kind();
        let total = gather_tokens(&*self.comm, &shard)?.to_kind(kind);
        let (out_f, in_f) = (w.size()[0], w.size()[1]);
        let g2 = g.reshape([-1, out_f]);
        let grad_w = g2.tr().matmul(&total.reshape([-1, in_f])).to_kind(w.kind());
        let grad_total = g.matmul(&w.to_kind(kind));
        let grad_x = reduce_scatter_tokens(&*self.comm, &grad_total)?.to_kind(shard.kind());
        let mut out = vec![grad_x, grad_w];
        if has_bias {
            out.push(g2.sum_dim_intlist(0, false, kind).to_kind(w.kind()));
        }
        Ok(out)
    }
}

/// Megatron's `_VocabParallelCrossEntropy`: the softmax's maximum and normaliser and the target's
/// logit are reduced over the group (three all-reduces of N values), never the logits.
struct VocabParallelCe {
    comm: Arc<dyn Communicator>,
    vocab_start: i64,
    /// (softmax of the local logits, local target index, target-is-here mask, valid mask).
    saved: Mutex<Option<(Tensor, Tensor, Tensor, Tensor)>>,
}

impl Function for VocabParallelCe {
    fn forward(&self, x: &[Tensor]) -> Result<Vec<Tensor>, String> {
        let (logits, targets) = (&x[0], &x[1]);
        let comm = &*self.comm;
        let rows = logits.size()[1];
        let max = logits.amax([1], true).contiguous();
        collective(comm, "all-reduce (max)", comm.all_reduce(&max, ReduceOp::Max))?;
        let shifted = logits - &max;
        let valid = targets.ne(-100);
        let local = targets - self.vocab_start;
        let here = local.ge(0).logical_and(&local.lt(rows)).logical_and(&valid);
        let index = local.where_self(&here, &local.zeros_like());
        let picked = shifted.gather(1, &index.unsqueeze(1), false).squeeze_dim(1) * here.to_kind(Kind::Float);
        let predicted = all_reduce_sum(comm, &picked)?;
        let exp = shifted.exp();
        let sum_exp = all_reduce_sum(comm, &exp.sum_dim_intlist(1, false, Kind::Float))?;
        let loss = (sum_exp.log() - predicted) * valid.to_kind(Kind::Float);
        let softmax = exp / sum_exp.unsqueeze(1);
        *self.saved.lock().map_err(|_| "vocab-parallel cross-entropy state poisoned".to_string())? = Some((softmax, index, here, valid));
        Ok(vec![loss])
    }
    fn backward(&self, g: &[Tensor]) -> Result<Vec<Tensor>, String> {
        let (softmax, index, here, valid) = self
            .saved
            .lock()
            .map_err(|_| "vocab-parallel cross-entropy state poisoned".to_string())?
            .take()
            .ok_or("vocab-parallel cross-entropy: backward ran twice")?;
        let onehot = softmax.zeros_like().scatter(1, &index.unsqueeze(1), &here.to_kind(Kind::Float).unsqueeze(1));
        let scale = (&g[0] * valid.to_kind(Kind::Float)).unsqueeze(1);
        Ok(vec![(softmax - onehot) * scale, Tensor::new()])
    }
}

impl TpOps for TpRegion {
    fn copy_to(&self, x: &Tensor) -> Tensor {
        self.run(&[x], CopyTo(self.comm()), "copy_to")
    }
    fn reduce_from(&self, x: &Tensor) -> Tensor {
        self.run(&[x], ReduceFrom(self.comm()), "reduce_from")
    }
    fn gather_seq(&self, x: &Tensor) -> Tensor {
        self.run(&[x], GatherSeq(self.comm()), "all-gather of the sequence shards")
    }
    fn reduce_scatter_seq(&self, x: &Tensor) -> Tensor {
        self.run(&[x], ReduceScatterSeq(self.comm(), Mutex::new(Vec::new())), "reduce-scatter to sequence shards")
    }
    fn gather_linear(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
        let f = GatherLinear { comm: self.comm(), saved: Mutex::new(None) };
        match bias {
            Some(b) => self.run(&[x, weight, b], f, "column-parallel linear over the sequence shards"),
            None => self.run(&[x, weight], f, "column-parallel linear over the sequence shards"),
        }
    }
    fn vocab_parallel_cross_entropy(&self, logits: &Tensor, targets: &Tensor, vocab_start: i64) -> Tensor {
        let f = VocabParallelCe { comm: self.comm(), vocab_start, saved: Mutex::new(None) };
        self.run(&[logits, targets], f, "cross-entropy")
    }
}
