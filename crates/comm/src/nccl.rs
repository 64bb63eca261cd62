//! NCCL backend (placeholder until the backend lands).

use std::sync::Arc;

use crate::communicator::Communicator;
use crate::error::{CommError, Result};

pub fn available() -> bool {
    false
}

pub(crate) fn create(_host: &Arc<dyn Communicator>, _device: usize, _debug: bool) -> Result<Arc<dyn Communicator>> {
    Err(CommError::Init("the NCCL backend is not available in this build".into()))
}
