//! A layout (execution plan): tensor × pipeline × data parallel degrees, model chunks per rank,
//! micro-batch, recomputation and ZeRO stage; and `--explain`'s `key=value` form of it.

use fabbrica_topology::ParallelDims;

use crate::error::PlanError;
use crate::model::Recompute;

/// One way to run the model on the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    /// Tensor-parallel degree (inside one node).
    pub tp: usize,
    /// Pipeline stages (ranks per pipeline).
    pub pp: usize,
    /// Data-parallel replicas.
    pub dp: usize,
    /// Model chunks per pipeline rank (v > 1: interleaved 1F1B).
    pub v: usize,
    /// Sequences per micro-batch.
    pub mb: usize,
    /// Activation recomputation.
    pub recompute: Recompute,
    /// ZeRO stage: 0 (replicated), 1 (optimizer state sharded; what the trainer runs), 2 and 3
    /// (gradients, then weights sharded too: what-if only).
    pub zero: u8,
}

impl Layout {
    /// GPUs the layout uses.
    pub fn gpus(&self) -> usize {
        self.tp * self.pp * self.dp
    }

    /// The topology's own check of the grid (dp × pp × tp against the world it uses).
    pub fn dims(&self) -> Result<ParallelDims, PlanError> {
        ParallelDims::new(self.dp, self.pp, self.tp, self.gpus()).map_err(|e| PlanError::input(e.to_string()))
    }

    /// `tp=8,pp=8,dp=16,v=2,mb=1,recompute=selective,zero=1`: the form `--explain` takes.
    pub fn spec(&self) -> String {
        format!("tp={},pp={},dp={},v={},mb={},recompute={},zero={}", self.tp, self.pp, self.dp, self.v, self.mb, self.recompute.as_str(), self.zero)
    }
}

/// The keys `--explain` forces; those left out are chosen by the search.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forced {
    /// Tensor-parallel degree.
    pub tp: Option<usize>,
    /// Pipeline stages.
    pub pp: Option<usize>,
    /// Data-parallel replicas.
    pub dp: Option<usize>,
    /// Chunks per pipeline rank.
    pub v: Option<usize>,
    /// Micro-batch size.
    pub mb: Option<usize>,
    /// Recomputation.
    pub recompute: Option<Recompute>,
    /// ZeRO stage.
    pub zero: Option<u8>,
}

impl Forced {
    /// Parses `tp=8,pp=8,dp=16,v=2,mb=1,recompute=selective,zero=1` (any subset, any order).
    pub fn parse(text: &str) -> Result<Forced, PlanError> {
        let mut f = Forced::default();
        let bad =
            |why: String| PlanError::input(format!("--explain {text:?}: {why}; e.g. --explain tp=8,pp=8,dp=16,v=2,mb=1,recompute=selective,zero=1"));
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            let (key, value) = (key.trim(), value.trim());
            let number = || -> Result<usize, PlanError> {
                match value.parse::<usize>() {
                    Ok(n) if (1..=1 << 24).contains(&n) => Ok(n),
                    _ => Err(bad(format!("{key}={value} must be a whole number in [1, {}]", 1 << 24))),
                }
            };
            match key {
                "tp" => f.tp = Some(number()?),
                "pp" => f.pp = Some(number()?),
                "dp" => f.dp = Some(number()?),
                "v" => f.v = Some(number()?),
                "mb" => f.mb = Some(number()?),
                "recompute" => {
                    f.recompute = Some(value.parse::<Recompute>().map_err(|_| bad(format!("recompute={value} is not none, selective or full")))?)
                }
                "zero" => {
                    f.zero = Some(match value {
                        "0" => 0,
                        "1" => 1,
                        "2" => 2,
                        "3" => 3,
                        _ => return Err(bad(format!("zero={value} must be 0, 1, 2 or 3"))),
                    })
                }
                _ => return Err(bad(format!("unknown key {key:?} (keys: tp, pp, dp, v, mb, recompute, zero)"))),
            }
        }
        Ok(f)
    }

    /// True when the layout agrees with every forced key.
    pub fn admits(&self, l: &Layout) -> bool {
        self.tp.is_none_or(|x| x == l.tp)
            && self.pp.is_none_or(|x| x == l.pp)
            && self.dp.is_none_or(|x| x == l.dp)
            && self.v.is_none_or(|x| x == l.v)
            && self.mb.is_none_or(|x| x == l.mb)
            && self.recompute.is_none_or(|x| x == l.recompute)
            && self.zero.is_none_or(|x| x == l.zero)
    }

    /// Checks the forced degrees against the GPU count: `tp·pp` (and `·dp` when given) must
    /// divide it, or equal it.
    pub fn check_gpus(&self, gpus: usize) -> Result<(), PlanError> {
        let tp_pp = self.tp.unwrap_or(1) * self.pp.unwrap_or(1);
        match self.dp {
            Some(dp) if tp_pp * dp != gpus => Err(PlanError::input(format!(
                "--explain forces tp × pp × dp = {} × {} × {dp} = {} GPUs, but --gpus is {gpus}: make the product {gpus}",
                self.tp.unwrap_or(1),
                self.pp.unwrap_or(1),
                tp_pp * dp
            ))),
            _ if !gpus.is_multiple_of(tp_pp) => Err(PlanError::input(format!(
                "--gpus {gpus} is not divisible by the forced tp × pp = {} × {} = {tp_pp}: use a multiple of {tp_pp} GPUs",
                self.tp.unwrap_or(1),
                self.pp.unwrap_or(1)
            ))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explain_parses_any_subset_and_refuses_the_rest() {
        let f = Forced::parse("tp=8,pp=8,dp=16,v=2,mb=1,recompute=selective").unwrap();
        assert_eq!(
            (f.tp, f.pp, f.dp, f.v, f.mb, f.recompute, f.zero),
            (Some(8), Some(8), Some(16), Some(2), Some(1), Some(Recompute::Selective), None)
        );
        assert_eq!(Forced::parse("").unwrap(), Forced::default());
        for bad in ["tp=0", "tp=x", "ep=2", "recompute=some", "zero=4", "tp"] {
            let e = Forced::parse(bad).unwrap_err();
            assert!(e.user && !e.message.contains('\n'), "{bad}: {e}");
        }
        assert!(Forced::parse("tp=8,pp=8").unwrap().check_gpus(100).is_err());
        assert!(Forced::parse("tp=8,pp=8,dp=2").unwrap().check_gpus(256).is_err());
        assert!(Forced::parse("tp=8,pp=8").unwrap().check_gpus(256).is_ok());
    }
}
