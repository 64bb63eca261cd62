//! Debug mode's collective check, shared by the backends: every rank encodes what it is about
//! to call as five integers (operation, dtype, element count, reduction or root, sequence number),
//! the group all-gathers them before the collective, and any disagreement becomes an error that
//! names the ranks and what each called, on every rank, instead of a hang or corrupted data.

use crate::types::{DType, OpKind, ReduceOp};

/// What one rank is about to call.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sig {
    op: OpKind,
    dtype: Option<DType>,
    numel: i64,
    /// Reduction code, or root.
    extra: i64,
    pub(crate) seq: u64,
}

impl Sig {
    pub(crate) fn new(op: OpKind, dtype: Option<DType>, numel: i64, extra: i64) -> Sig {
        Sig { op, dtype, numel, extra, seq: 0 }
    }
    pub(crate) fn encode(&self) -> [i64; 5] {
        [self.op.code(), self.dtype.map(|d| d.code()).unwrap_or(0), self.numel, self.extra, self.seq as i64]
    }
    pub(crate) fn decode(v: &[i64]) -> String {
        let Some(op) = OpKind::from_code(v[0]) else { return format!("an unknown operation {v:?}") };
        let s = Sig { op, dtype: DType::from_code(v[1]), numel: v[2], extra: v[3], seq: v[4] as u64 };
        format!("{} #{}", s.describe(), s.seq)
    }
    pub(crate) fn describe(&self) -> String {
        let dt = self.dtype.map(|d| d.name()).unwrap_or("?");
        match self.op {
            OpKind::AllReduce | OpKind::ReduceScatter => {
                let op = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min]
                    .into_iter()
                    .find(|o| o.code() == self.extra)
                    .map(|o| o.name())
                    .unwrap_or("?");
                format!("{}({dt}, {} elements, {op})", self.op, self.numel)
            }
            OpKind::Broadcast => format!("{}({dt}, {} elements, root {})", self.op, self.numel, self.extra),
            OpKind::AllGather => format!("{}({dt}, {} elements per rank)", self.op, self.numel),
            _ => format!("{}()", self.op),
        }
    }
}

/// `None` when every rank's signature (5 words each, by rank) equals `mine`; else which ranks
/// called what.
pub(crate) fn mismatch_detail(all: &[i64], mine: &[i64; 5]) -> Option<String> {
    if all.chunks(5).all(|c| c == mine) {
        return None;
    }
    let mut groups: Vec<(Vec<usize>, &[i64])> = Vec::new();
    for (r, c) in all.chunks(5).enumerate() {
        match groups.iter_mut().find(|(_, g)| *g == c) {
            Some((ranks, _)) => ranks.push(r),
            None => groups.push((vec![r], c)),
        }
    }
    Some(
        groups
            .iter()
            .map(|(ranks, c)| {
                let who = if ranks.len() == 1 { format!("rank {}", ranks[0]) } else { format!("ranks {ranks:?}") };
                format!("{who} called {}", Sig::decode(c))
            })
            .collect::<Vec<_>>()
            .join("; "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{DType, OpKind, ReduceOp};

    #[test]
    fn mismatch_names_ranks_and_calls() {
        let mut a = Sig::new(OpKind::AllReduce, Some(DType::F32), 10, ReduceOp::Sum.code());
        a.seq = 3;
        let mut b = Sig::new(OpKind::AllGather, Some(DType::Bf16), 4, 0);
        b.seq = 3;
        let (ea, eb) = (a.encode(), b.encode());
        let same: Vec<i64> = ea.iter().chain(ea.iter()).copied().collect();
        assert_eq!(mismatch_detail(&same, &ea), None);
        let all: Vec<i64> = ea.iter().chain(eb.iter()).chain(ea.iter()).copied().collect();
        let d = mismatch_detail(&all, &ea).expect("a mismatch");
        assert_eq!(d, "ranks [0, 2] called all_reduce(f32, 10 elements, sum) #3; rank 1 called all_gather(bf16, 4 elements per rank) #3");
    }
}
