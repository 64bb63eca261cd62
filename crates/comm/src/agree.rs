//! Agreement among ranks: every rank's small status value, gathered (one fixed-size all-gather,
//! whose size never depends on the values). For the steps that a group must take together or not
//! at all (creating an NCCL communicator, choosing NCCL over host staging, the trainer stopping
//! at an error that happened on some ranks only): a rank that decided alone would leave the
//! others waiting in a collective it never joins, or pair its next collective with theirs.

use tch::{Device, Kind, Tensor};

use crate::communicator::Communicator;

/// Collective over `comm`: every rank's `mine`, in rank order (a vote, or a status code).
pub fn gather_status(comm: &dyn Communicator, mine: i64) -> std::result::Result<Vec<i64>, String> {
    if comm.size() == 1 {
        return Ok(vec![mine]);
    }
    let (all, me) = tch::no_grad(|| -> std::result::Result<(Tensor, Tensor), tch::TchError> {
        Ok((Tensor::f_zeros([comm.size() as i64], (Kind::Int64, Device::Cpu))?, Tensor::f_from_slice(&[mine])?))
    })
    .map_err(|e| e.to_string())?;
    comm.all_gather(&all, &me).map_err(|e| format!("gathering every rank's status failed: {e}"))?;
    Vec::<i64>::try_from(&all).map_err(|e| e.to_string())
}

/// Collective over `host`: the group ranks that voted `false`, in order (empty: all agreed).
pub(crate) fn ranks_voting_no(host: &dyn Communicator, yes: bool) -> std::result::Result<Vec<usize>, String> {
    let votes = gather_status(host, yes as i64)?;
    Ok(votes.iter().enumerate().filter(|(_, &v)| v == 0).map(|(r, _)| r).collect())
}
