//! Creating an NCCL communicator: what each rank sets up on its own, the unique id that rank 0
//! makes and the host communicator broadcasts, and the group-wide id the watchdog uses.

use std::sync::Arc;

use cudarc::nccl::sys::ncclUniqueId;
use tch::Tensor;

use super::cuda::{DeviceGuard, Event, Stream};
use super::library::{self, Nccl, SUCCESS};
use crate::communicator::Communicator;

/// Group-wide watchdog id: the name alone can repeat across splits, so the member list is hashed
/// in (FNV-1a, identical on every rank).
pub(super) fn group_id(name: &str, members: &[usize]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &m in members {
        for b in (m as u64).to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("nccl:{name}:{h:016x}")
}

/// The 128-byte unique id as 16 i64 words (the host communicators move i64 tensors), and back.
fn id_to_words(id: &ncclUniqueId) -> [i64; 16] {
    let mut words = [0i64; 16];
    for (w, chunk) in words.iter_mut().zip(id.internal.chunks(8)) {
        let mut b = [0u8; 8];
        for (d, &s) in b.iter_mut().zip(chunk) {
            *d = s as u8;
        }
        *w = i64::from_ne_bytes(b);
    }
    words
}

fn id_from_words(words: &[i64]) -> ncclUniqueId {
    // SAFETY: a plain byte array.
    let mut id: ncclUniqueId = unsafe { std::mem::zeroed() };
    for (chunk, w) in id.internal.chunks_mut(8).zip(words) {
        for (d, s) in chunk.iter_mut().zip(w.to_ne_bytes()) {
            *d = s as _;
        }
    }
    id
}

/// Rank 0 creates the id and the host communicator broadcasts it. Every rank takes part, also one
/// whose own setup failed (`lib` is `None` then): a rank 0 without an id broadcasts all zeros (a
/// real id never is: it holds a socket address), and the vote that follows tells everyone.
pub(super) fn unique_id(lib: Option<&Nccl>, host: &Arc<dyn Communicator>) -> std::result::Result<ncclUniqueId, String> {
    // SAFETY: a plain byte array.
    let mut id: ncclUniqueId = unsafe { std::mem::zeroed() };
    let mut own_error = None;
    if host.rank() == 0 {
        match lib {
            Some(lib) => {
                // SAFETY: writes the 128 bytes of `id`, a local ncclUniqueId.
                let rc = unsafe { (lib.get_unique_id)(&mut id) };
                if rc != SUCCESS {
                    own_error = Some(lib.describe("ncclGetUniqueId", rc, std::ptr::null_mut()));
                    // SAFETY: a plain byte array.
                    id = unsafe { std::mem::zeroed() };
                }
            }
            None => own_error = Some("no NCCL set up on this rank".to_string()),
        }
    }
    if host.size() > 1 {
        let t = Tensor::f_from_slice(&id_to_words(&id)).map_err(|e| e.to_string())?;
        host.broadcast(&t, 0).map_err(|e| format!("broadcasting the NCCL unique id over the host communicator failed: {e}"))?;
        let words = Vec::<i64>::try_from(&t).map_err(|e| e.to_string())?;
        id = id_from_words(&words);
    }
    if let Some(e) = own_error {
        return Err(e);
    }
    if id.internal.iter().all(|&b| b == 0) {
        return Err("rank 0 could not create the NCCL unique id (its log says why)".into());
    }
    Ok(id)
}

/// What a rank sets up on its own before the group creates the communicator together.
pub(super) struct Local {
    pub(super) lib: &'static Nccl,
    /// NCCL binds a communicator to the device current at ncclCommInitRank.
    pub(super) _device: DeviceGuard,
    pub(super) stream: Stream,
    pub(super) ready: Event,
}

pub(super) fn local_setup(device: usize) -> std::result::Result<Local, String> {
    if !tch::Cuda::is_available() {
        return Err("libtorch sees no CUDA device; use comm.backend = auto or mpi".into());
    }
    let count = tch::Cuda::device_count();
    if device as i64 >= count {
        return Err(format!("cuda:{device} does not exist ({count} visible); check CUDA_VISIBLE_DEVICES and the local rank"));
    }
    let lib = library::nccl()?;
    let _device = DeviceGuard::new(device).map_err(|e| format!("cannot make cuda:{device} current: {e}"))?;
    let stream = Stream::from_pool(device).map_err(|e| format!("cannot get a CUDA stream: {e}"))?;
    let ready = Event::new().map_err(|e| format!("cannot create a CUDA event: {e}"))?;
    Ok(Local { lib, _device, stream, ready })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_id_survives_the_i64_round_trip() {
        // SAFETY: a plain byte array.
        let mut id: ncclUniqueId = unsafe { std::mem::zeroed() };
        for (i, b) in id.internal.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(5) as _;
        }
        let back = id_from_words(&id_to_words(&id));
        assert_eq!(id.internal, back.internal);
    }

    #[test]
    fn group_ids_differ_by_members() {
        assert_eq!(group_id("dp0", &[0, 2]), group_id("dp0", &[0, 2]));
        assert_ne!(group_id("dp0", &[0, 2]), group_id("dp0", &[1, 3]));
    }
}
