//! A yes/no vote over a host communicator: which ranks of a group said no. For the steps that a
//! group must take together or not at all (creating an NCCL communicator, choosing NCCL over host
//! staging): a rank that decided alone would leave the others waiting in a collective it never
//! joins, or pair its next host collective with theirs.

use tch::{Device, Kind, Tensor};

use crate::communicator::Communicator;

/// Collective over `host`: the group ranks that voted `false`, in order (empty: all agreed).
pub(crate) fn ranks_voting_no(host: &dyn Communicator, yes: bool) -> std::result::Result<Vec<usize>, String> {
    if host.size() == 1 {
        return Ok(if yes { vec![] } else { vec![0] });
    }
    let (all, mine) = tch::no_grad(|| -> std::result::Result<(Tensor, Tensor), tch::TchError> {
        Ok((Tensor::f_zeros([host.size() as i64], (Kind::Int64, Device::Cpu))?, Tensor::f_from_slice(&[yes as i64])?))
    })
    .map_err(|e| e.to_string())?;
    host.all_gather(&all, &mine).map_err(|e| format!("the vote over the host communicator failed: {e}"))?;
    let votes = Vec::<i64>::try_from(&all).map_err(|e| e.to_string())?;
    Ok(votes.iter().enumerate().filter(|(_, &v)| v == 0).map(|(r, _)| r).collect())
}
